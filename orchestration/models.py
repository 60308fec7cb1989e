"""Models of the orchestration app, defined in its subpackages."""

from orchestration.demo.models import Booking, Email, Hotel, InfraChange, Order, Refund
from orchestration.ledger.models import AuditRecord, LedgerHead
from orchestration.registry.models import Agent, Tool
from orchestration.retrieval.models import Chunk, Document
from orchestration.runs.models import Event, Run, Step
from orchestration.workers import WorkerHeartbeat

__all__ = [
    "Agent",
    "AuditRecord",
    "Booking",
    "Chunk",
    "Document",
    "Email",
    "Event",
    "Hotel",
    "InfraChange",
    "LedgerHead",
    "Order",
    "Refund",
    "Run",
    "Step",
    "Tool",
    "WorkerHeartbeat",
]
