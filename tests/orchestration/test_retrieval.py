"""The document store and ``retrieve``: the same tests on SQLite (FTS5) and PostgreSQL."""

import json

import pytest
from django.db import connection, transaction

from orchestration.retrieval.models import Chunk, Document
from orchestration.retrieval.search import TERMS_MAX, Snippet, retrieve, search_terms
from orchestration.retrieval.services import document_add, split_into_chunks

pytestmark = pytest.mark.django_db

REFUND_POLICY = """Refunds

Orders over 500 dollars need a manager's approval before a refund is issued.

Smaller refunds are issued by support within five days."""


@pytest.fixture
def library():
    """A refund policy among travel documents, in two sources, and unrelated notes."""
    for topic in ["printers", "parking", "badges", "lunch", "holidays", "laptops"]:
        document_add(source="misc", title=topic, body=f"Ask the office about {topic}.")
    return {
        "refund": document_add(
            source="policies", title="Refund policy", body=REFUND_POLICY, chunk_chars=80
        ),
        "travel": document_add(
            source="travel",
            title="Travel guide",
            body="Book hotels close to the venue.\n\nFlights over 500 miles may be business class.",
        ),
        "expenses": document_add(
            source="policies",
            title="Travel expenses",
            body="Travel is booked through the portal. Taxis are reimbursed with a receipt.",
        ),
    }


def test_the_most_relevant_chunk_ranks_first(library):
    assert library["refund"].chunks.count() == 3  # one per paragraph
    results = retrieve("refund over 500")
    assert results[0].document_id == library["refund"].pk
    assert "manager's approval" in results[0].text
    assert results[0].title == "Refund policy"
    assert results[0].source == "policies"
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_stemming_matches_other_forms_of_a_word():
    document_add(source="notes", title="Ticket", body="The customer was refunded yesterday.")
    assert [r.title for r in retrieve("refunds")] == ["Ticket"]
    assert [r.title for r in retrieve("refunding")] == ["Ticket"]


def test_the_source_filter(library):
    results = retrieve("travel", source="policies", k=10)
    assert {r.document_id for r in results} == {library["expenses"].pk}
    assert retrieve("travel", source="nowhere") == []


def test_k_limits_the_results():
    for n in range(5):
        document_add(source="faq", title=f"Q{n}", body=f"Answer {n} about invoices.")
    assert len(retrieve("invoices", k=2)) == 2
    assert len(retrieve("invoices")) == 3
    assert len(retrieve("invoices", k=50)) == 5


@pytest.mark.parametrize("k", [0, 51, -1, True, 2.0, "3"])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="k must be an integer from 1 to 50"):
        retrieve("refund", k=k)


@pytest.mark.parametrize(
    "query",
    [
        '"refund" AND (NOT',
        "refund a-b:c*",
        "refund'; DROP TABLE orchestration_chunk; --",
        'refund "unbalanced',
        "refund NEAR(",
        "refund^ {col}: OR AND NOT * + -",
        'refund "" \\" \x00',
    ],
)
def test_operators_and_punctuation_cannot_break_the_query(library, query):
    chunks = Chunk.objects.count()
    results = retrieve(query)
    assert results and results[0].document_id == library["refund"].pk
    assert Chunk.objects.count() == chunks


def test_operator_like_words_alone_never_raise(library):
    for query in ["a-b:c*", "NEAR(", "'; DROP TABLE", 'AND OR NOT "', "and or not", "* ^ : ( )"]:
        assert isinstance(retrieve(query), list)


def test_only_the_real_words_of_a_query_are_searched():
    assert search_terms('"refund" AND (NOT') == '"refund" OR "and" OR "not"'
    assert search_terms("a-b:c*") == '"a" OR "b" OR "c"'
    assert search_terms("Refund refund REFUND") == '"refund"'
    assert search_terms(" ;-) ") == ""
    assert search_terms(" ".join(f"w{n}" for n in range(100))).count('"') == 2 * TERMS_MAX


@pytest.mark.parametrize("query", ["", "   \n\t", "?!-*", '""'])
def test_a_query_without_words_returns_nothing(library, query):
    assert retrieve(query) == []


def test_the_body_is_chunked_on_paragraphs_within_the_size_bound():
    paragraphs = [f"Paragraph {n} " + "word " * 20 for n in range(10)]
    document = document_add(
        source="manual", title="Manual", body="\n\n \n".join(paragraphs), chunk_chars=300
    )
    texts = list(document.chunks.values_list("text", flat=True))
    assert len(texts) > 1
    assert all(len(text) <= 300 for text in texts)
    assert list(document.chunks.values_list("seq", flat=True)) == list(range(len(texts)))
    # Paragraphs are packed whole, in order, separated by a blank line.
    assert "\n\n".join(texts).split("\n\n") == [p.strip() for p in paragraphs]


def test_a_long_paragraph_is_split_at_whitespace_or_hard():
    assert split_into_chunks("aaaa bbbb cccc", 9) == ["aaaa bbbb", "cccc"]
    assert split_into_chunks("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_into_chunks("short\n\nparagraphs\n\n\n\npack", 100) == [
        "short\n\nparagraphs\n\npack"
    ]
    assert split_into_chunks(" \n\n ", 10) == []


def test_invalid_documents_are_refused():
    with pytest.raises(ValueError, match="slug"):
        document_add(source="Has spaces", title="T", body="text")
    with pytest.raises(ValueError, match="no text"):
        document_add(source="notes", title="T", body="\n\n  ")
    with pytest.raises(ValueError, match="NUL"):
        document_add(source="notes", title="T", body="a\x00b")
    with pytest.raises(ValueError, match="chunk_chars"):
        document_add(source="notes", title="T", body="text", chunk_chars=0)
    assert not Document.objects.exists()


def test_a_document_is_added_whole_or_not_at_all():
    with pytest.raises(RuntimeError), transaction.atomic():
        document_add(source="notes", title="Gone", body="rolled back refund")
        raise RuntimeError
    assert not Chunk.objects.exists()
    assert retrieve("refund") == []


def test_deleting_a_document_removes_its_chunks_from_search(library):
    library["refund"].delete()
    assert not Chunk.objects.filter(document_id=library["refund"].pk).exists()
    assert all(r.document_id != library["refund"].pk for r in retrieve("refund over 500", k=50))
    assert retrieve("refunds") == []


def test_editing_a_chunk_updates_search(library):
    chunk = library["travel"].chunks.get(seq=0)
    chunk.text = "Hotels accept refunds for cancellations."
    chunk.save()
    assert retrieve("venue") == []
    assert library["travel"].pk in {r.document_id for r in retrieve("cancellations")}


def test_snippets_are_json_serialisable(library):
    snippet = retrieve("refund")[0]
    assert isinstance(snippet, Snippet)
    record = json.loads(json.dumps(snippet.to_record()))
    assert record == {
        "document_id": library["refund"].pk,
        "chunk_id": snippet.chunk_id,
        "source": "policies",
        "title": "Refund policy",
        "text": snippet.text,
        "score": snippet.score,
    }
    assert snippet.score > 0


def test_str():
    document = document_add(source="notes", title="Note", body="text")
    assert str(document) == "notes: Note"
    assert str(document.chunks.get()) == f"{document.pk}#0"


def test_the_search_index_exists_for_this_database():
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'orchestration_chunk_text_fts'"
            )
            assert "gin" in cursor.fetchone()[0].lower()
        else:
            cursor.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'"
                " AND name LIKE 'orchestration_chunk_fts_%'"
            )
            assert cursor.fetchone()[0] == 3
