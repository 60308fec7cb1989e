"""Model providers the workflow engine calls: one neutral interface, vendor translations, and a
deterministic scripted provider. None of them retries; see :mod:`.base`."""

from .anthropic_provider import AnthropicProvider
from .base import (
    PRICES,
    Completion,
    Provider,
    ProviderError,
    ToolCall,
    ToolSpec,
    cost_usd,
)
from .openai_provider import OpenAIProvider
from .scripted import ScriptedProvider

PROVIDERS: dict[str, type] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "scripted": ScriptedProvider,
}


def get_provider(name: str) -> Provider:
    """A provider by name: ``openai``, ``anthropic`` or ``scripted``; ValueError otherwise."""
    try:
        return PROVIDERS[name]()
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"unknown model provider {name!r}; known: {known}") from None


__all__ = [
    "PRICES",
    "AnthropicProvider",
    "Completion",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "ScriptedProvider",
    "ToolCall",
    "ToolSpec",
    "cost_usd",
    "get_provider",
]
