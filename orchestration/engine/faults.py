"""Named points in the engine's critical windows where a fault can be injected.

The engine calls ``point(name, run_id)`` at the moments a crash is most costly (a run just
claimed, a run about to be suspended, a step's side effect done but not yet recorded). Nothing
is registered in production, so a point costs one empty loop. The fault suite registers a hook
in its worker processes (``tests/faults/``) to SIGKILL the worker exactly there."""

from collections.abc import Callable

CLAIMED = "claimed"  # the run's lease was taken and the run marked running; nothing else yet
FINISHING = "finishing"  # a slice ended; the run's new state is about to be written
EXECUTED = "executed"  # a step's call returned; its finish is not recorded yet

_hooks: list[Callable[[str, int], None]] = []


def point(name: str, run_id: int) -> None:
    for hook in _hooks:
        hook(name, run_id)


def install(hook: Callable[[str, int], None]) -> Callable[[], None]:
    """Register ``hook(name, run_id)``; returns the function that removes it."""
    _hooks.append(hook)
    return lambda: _hooks.remove(hook)
