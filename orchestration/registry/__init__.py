"""Agents, tools and workflows: what can run. Tools and workflows are declared on Python
functions with decorators; tool metadata syncs to the database (``manage.py sync_registry``)."""
