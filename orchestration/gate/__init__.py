"""How the engine asks permission. ``settings.BATON_GATE`` names the implementation; the engine
never imports the control plane (``approvals``), only this protocol."""

from orchestration.gate.protocol import (
    Action,
    AllowAllGate,
    Answer,
    Gate,
    Pending,
    Question,
    Verdict,
    get_gate,
)

__all__ = ["Action", "AllowAllGate", "Answer", "Gate", "Pending", "Question", "Verdict", "get_gate"]
