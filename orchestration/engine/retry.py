"""Retries per step kind: bounded attempts, exponential backoff with jitter, timeouts, and the
errors no retry can fix."""

import random
from dataclasses import dataclass

import jsonschema
from django.conf import settings

from orchestration.engine.errors import NonRetryable, WorkflowError


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    base_seconds: float
    max_seconds: float
    timeout: float

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**(attempt-1))], at least a tenth of it."""
        scale = getattr(settings, "BATON_BACKOFF_SCALE", 1.0)
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1)) * scale
        return random.uniform(ceiling / 10, ceiling)  # noqa: S311 - jitter, not security


RETRY_POLICIES = {
    "llm": RetryPolicy(attempts=4, base_seconds=1.0, max_seconds=30.0, timeout=60.0),
    "tool": RetryPolicy(attempts=3, base_seconds=0.5, max_seconds=10.0, timeout=30.0),
    "retrieve": RetryPolicy(attempts=3, base_seconds=0.2, max_seconds=2.0, timeout=10.0),
}

NOT_RETRYABLE = (
    NonRetryable,
    WorkflowError,
    jsonschema.ValidationError,
    TypeError,
    ValueError,
    KeyError,
    LookupError,
    PermissionError,
)


def is_retryable(error: Exception) -> bool:
    retryable = getattr(error, "retryable", None)  # ProviderError says so itself
    if retryable is not None:
        return bool(retryable)
    return not isinstance(error, NOT_RETRYABLE)
