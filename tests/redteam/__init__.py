"""The red-team suite: attacks and benign tasks run through the real engine with a compromised
model against the seeded demo policy.

Full run (every scenario; prints the figures and every failing scenario)::

    .venv/bin/python -m tests.redteam

CI-sized run (the scenarios marked ``ci``; part of ``make test``)::

    .venv/bin/pytest -q tests/redteam
"""
