"""The document store workflows search with ``ctx.retrieve``.

``document_add`` (in ``services``) stores a document split into paragraph-packed chunks;
``retrieve`` (in ``search``) ranks chunks by full-text relevance: PostgreSQL's text search with a
GIN expression index, or SQLite's FTS5 kept in sync by triggers. Both are created by migration
``0003_retrieval``. This package imports no models, so it is safe to import before apps load.
"""
