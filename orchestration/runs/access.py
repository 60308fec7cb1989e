"""Who may see and act on runs: the extension point the control plane fills.

``settings.BATON_RUN_ACCESS`` names a class implementing ``RunAccess`` (the product's is
``approvals.access.RunAccess``: roles and reviewer teams); orchestration only calls it, the way
the engine calls the gate, and never imports the control plane. Without one, ``OpenRunAccess``
lets every active signed-in user see and act on every run.

Every place that shows or acts on a run asks here: the run list, the run page and its timeline,
the run socket, and ``run_halt`` itself (under the run's lock). The run page also shows the
links and sections the control plane offers, so its template names nothing of it."""

from collections.abc import Mapping
from functools import cache
from typing import NamedTuple, Protocol

from django.conf import settings
from django.utils.module_loading import import_string

from orchestration.runs.models import Run

DEFAULT = "orchestration.runs.access.OpenRunAccess"


class Link(NamedTuple):
    label: str
    url: str


class RunAccess(Protocol):
    def can_view(self, user) -> bool:
        """Whether ``user`` may see runs (their list, pages and sockets) at all."""
        ...

    def can_operate(self, user) -> bool:
        """Whether ``user`` may start runs and retry failed ones."""
        ...

    def can_halt(self, user) -> bool:
        """Whether ``user`` may halt runs at all (``halt_refusal`` says whether this one)."""
        ...

    def halt_refusal(self, user, run: Run) -> str:
        """Why ``user`` may not halt ``run`` now, or "" if they may. Asked again by
        ``run_halt`` with the run locked."""
        ...

    def hidden_steps(self, user, run: Run) -> Mapping[int, str]:
        """The steps of ``run`` whose content ``user`` may not read, each with whom it is for
        ("the finance team"): the timeline shows that they happened, not what they carry."""
        ...

    def page_links(self, user, run: Run) -> list[Link]:
        """Links the run page shows ``user`` beside its breadcrumbs (the run's audit replay)."""
        ...

    def page_panels(self, user, run: Run) -> list[Link]:
        """Sections the run page loads for ``user`` from their URL (reviewers' grants)."""
        ...


def _signed_in(user) -> bool:
    return bool(user and user.is_active and user.is_authenticated)


class OpenRunAccess:
    """No control plane: every active signed-in user sees and acts on every run."""

    def can_view(self, user) -> bool:
        return _signed_in(user)

    def can_operate(self, user) -> bool:
        return _signed_in(user)

    def can_halt(self, user) -> bool:
        return _signed_in(user)

    def halt_refusal(self, user, run: Run) -> str:
        return "" if _signed_in(user) else "Sign in to halt runs."

    def hidden_steps(self, user, run: Run) -> Mapping[int, str]:
        return {}

    def page_links(self, user, run: Run) -> list[Link]:
        return []

    def page_panels(self, user, run: Run) -> list[Link]:
        return []


@cache
def _access_class(path: str) -> type:
    return import_string(path)


def run_access() -> RunAccess:
    return _access_class(getattr(settings, "BATON_RUN_ACCESS", DEFAULT))()
