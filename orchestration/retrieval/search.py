"""Ranked full-text search over chunks: ``retrieve(query, k=..., source=...)``.

The query is reduced to its words (``\\w+``), each quoted, joined with OR: any word matches and
relevance does the ranking, and no punctuation or operator in user text (``AND``, ``NOT``,
``NEAR(``, ``*``, ``:``, ``-``, quotes) can change the query or make it fail. Both backends
get the same terms, so a workflow finds the same things on SQLite as on PostgreSQL:

- PostgreSQL: ``websearch_to_tsquery('english', ...)`` matched against the GIN-indexed expression
  ``to_tsvector('english', text)``, ranked by ``ts_rank``. English stop words are ignored.
- SQLite: the FTS5 table ``orchestration_chunk_fts`` (porter stemming) ranked by ``bm25``.

``score`` is higher for better matches on both, but the scales differ between backends.
"""

import re
from dataclasses import asdict, dataclass
from typing import Any

from django.db import connection

K_MAX = 50
TERMS_MAX = 64
_WORD = re.compile(r"\w+", re.UNICODE)

_POSTGRES_SQL = """
SELECT c.document_id, c.id, d.source, d.title, c.text,
       ts_rank(to_tsvector('english', c.text), q.query) AS score
FROM orchestration_chunk c
JOIN orchestration_document d ON d.id = c.document_id
CROSS JOIN websearch_to_tsquery('english', %s) AS q(query)
WHERE to_tsvector('english', c.text) @@ q.query {source_filter}
ORDER BY score DESC, c.id
LIMIT %s
"""

_SQLITE_SQL = """
SELECT c.document_id, c.id, d.source, d.title, c.text,
       -bm25(orchestration_chunk_fts) AS score
FROM orchestration_chunk_fts
JOIN orchestration_chunk c ON c.id = orchestration_chunk_fts.rowid
JOIN orchestration_document d ON d.id = c.document_id
WHERE orchestration_chunk_fts MATCH %s {source_filter}
ORDER BY score DESC, c.id
LIMIT %s
"""


@dataclass(frozen=True)
class Snippet:
    """One retrieved chunk, with its document's source and title."""

    document_id: int
    chunk_id: int
    source: str
    title: str
    text: str
    score: float

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field, e.g. for a workflow step's output."""
        return asdict(self)


def retrieve(query: str, *, k: int = 3, source: str | None = None) -> list[Snippet]:
    """The ``k`` chunks most relevant to ``query``, best first, from ``source`` if given.

    A query with no words (empty, whitespace, punctuation only) returns ``[]``. Only the first
    ``TERMS_MAX`` distinct words are used.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K_MAX:
        raise ValueError(f"k must be an integer from 1 to {K_MAX}, got {k!r}")
    terms = search_terms(query)
    if not terms:
        return []
    if connection.vendor == "postgresql":
        sql = _POSTGRES_SQL
    elif connection.vendor == "sqlite":
        sql = _SQLITE_SQL
    else:
        raise NotImplementedError(
            f"retrieve supports PostgreSQL and SQLite, not {connection.vendor}"
        )
    params: list[Any] = [terms]
    source_filter = ""
    if source is not None:
        source_filter = "AND d.source = %s"
        params.append(source)
    params.append(k)
    with connection.cursor() as cursor:
        cursor.execute(sql.format(source_filter=source_filter), params)
        rows = cursor.fetchall()
    return [
        Snippet(
            document_id=document_id,
            chunk_id=chunk_id,
            source=source_,
            title=title,
            text=text,
            score=float(score),
        )
        for document_id, chunk_id, source_, title, text, score in rows
    ]


def search_terms(query: str) -> str:
    """The query's distinct words, each double-quoted (quotes inside doubled), joined by OR;
    ``""`` when it has none. Valid for both FTS5 ``MATCH`` and ``websearch_to_tsquery``."""
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(query)))[:TERMS_MAX]
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)
