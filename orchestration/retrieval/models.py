"""Documents and their chunks, the units that search ranks and returns."""

from django.db import models
from django.utils import timezone


class Document(models.Model):
    """A text stored for retrieval, filed under a short ``source`` slug such as "policies"."""

    source = models.SlugField(max_length=64, help_text='a short slug, e.g. "policies"')
    title = models.CharField(max_length=200)
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.source}: {self.title}"


class Chunk(models.Model):
    """One searchable piece of a document's body, ``seq`` counting from 0.

    Search indexes ``text`` outside the ORM (see ``orchestration.retrieval.search``): on SQLite
    through triggers on this table, so a future migration that makes SQLite rebuild the table
    (most field alterations do) must recreate them (``search_index_create`` in 0003_retrieval).
    """

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    text = models.TextField()

    class Meta:
        ordering = ["document_id", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["document", "seq"], name="chunk_document_seq_uniq")
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.seq}"
