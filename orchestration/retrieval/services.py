"""Adding documents: the body is stored whole and split into chunks for search."""

import re

from django.db import transaction

from orchestration.retrieval.models import Chunk, Document

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_SLUG = re.compile(r"[-a-zA-Z0-9_]{1,64}")
_TITLE_MAX = Document._meta.get_field("title").max_length


def document_add(*, source: str, title: str, body: str, chunk_chars: int = 800) -> Document:
    """Store a document and its chunks together, inside the caller's transaction if any.

    ``source`` is a slug (letters, digits, ``-`` or ``_``, at most 64). The body is split on blank
    lines into paragraphs, which are packed into chunks of at most ``chunk_chars`` characters; a
    longer paragraph is cut at whitespace where it can be, else mid-word.
    """
    if not isinstance(source, str) or not _SLUG.fullmatch(source):
        raise ValueError(f"source must be a slug of 1 to 64 letters, digits, - or _: {source!r}")
    if not title.strip() or len(title) > _TITLE_MAX:
        raise ValueError(f"title must be 1 to {_TITLE_MAX} characters")
    if "\x00" in title or "\x00" in body:
        raise ValueError("title and body must not contain NUL characters")
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise ValueError(f"chunk_chars must be a positive integer, got {chunk_chars!r}")
    texts = split_into_chunks(body, chunk_chars)
    if not texts:
        raise ValueError("body has no text to store")
    with transaction.atomic():
        document = Document.objects.create(source=source, title=title, body=body)
        Chunk.objects.bulk_create(
            Chunk(document=document, seq=seq, text=text) for seq, text in enumerate(texts)
        )
    return document


def split_into_chunks(body: str, chunk_chars: int) -> list[str]:
    """Paragraphs (separated by blank lines) packed greedily, joined by a blank line, into
    chunks of at most ``chunk_chars`` characters; longer paragraphs are hard-split."""
    chunks: list[str] = []
    current = ""
    for paragraph in _PARAGRAPH_BREAK.split(body):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        for piece in _hard_split(paragraph, chunk_chars):
            if current and len(current) + 2 + len(piece) <= chunk_chars:
                current = f"{current}\n\n{piece}"
            else:
                if current:
                    chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return chunks


def _hard_split(text: str, limit: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` characters, at the last whitespace that
    fits when there is one."""
    pieces = []
    while len(text) > limit:
        cut = max(text.rfind(space, 0, limit + 1) for space in " \n\t")
        if cut <= 0:
            cut = limit
        piece, text = text[:cut].rstrip(), text[cut:].lstrip()
        if piece:
            pieces.append(piece)
    if text:
        pieces.append(text)
    return pieces
