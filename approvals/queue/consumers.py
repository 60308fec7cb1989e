"""The live queue (``ws/approvals/?filters``) and one request's page (``ws/approvals/<id>/``).
Both join ``approvals.queue``; on each ``queue.changed`` they re-read under the viewer's
permissions and send what changed as out-of-band fragments, rendered from the same partials as
the pages. On (re)connect each sends its whole state at once.

The connections of a process render in waves (``RenderWaves``): one thread hop per wave for
all of them, bursts coalesced, first renders included. Queue connections share renders: the
queue a viewer sees depends on the viewer only through being an active reviewer
(``selectors.can_review``), their teams (``services.visible_to``) and their own claims
(``selectors.decorate``: "claimed by you"). So a wave reads the permissions, teams and claims
of all its viewers in one query, and renders once per ``audience`` (the same filters, the
same teams, no claim of their own among the open requests: a claimant renders alone), as one
of its viewers, with ``LiveQueue``; each connection still sends only what changed for it.
Change ``audience`` together with those functions; ``tests/approvals/queue/test_consumers.py``
compares shared renders with each viewer's own."""

import logging

from channels.db import database_sync_to_async
from django.contrib.auth import get_backends, get_user_model
from django.contrib.auth.backends import ModelBackend
from django.db.models import Exists, OuterRef
from django.http import Http404, QueryDict

from approvals.queue.models import OPEN, ApprovalRequest
from approvals.queue.selectors import QueueFilters, can_review
from approvals.queue.transitions import QUEUE_GROUP
from approvals.queue.views import LiveQueue, LiveRequest
from approvals.roles import REVIEW
from orchestration.consumers import (
    FORBIDDEN,
    NOT_FOUND,
    AuthenticatedConsumer,
    Rendered,
    RenderWaves,
)
from orchestration.runs.views import csrf_token_for, oob

log = logging.getLogger(__name__)


class QueueConsumer(AuthenticatedConsumer):
    live = None
    waves: RenderWaves | None = None
    closing = False

    async def connect(self) -> None:
        user = self.scope.get("user")
        signed_in = user is not None and user.is_authenticated
        if signed_in and not await database_sync_to_async(can_review)(user):
            await self.close(code=FORBIDDEN)
            return
        await super().connect()  # refuses anonymous users

    async def on_accept(self) -> None:
        request_id = self.scope["url_route"]["kwargs"].get("request_id")
        if request_id is None:
            query = QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
            self.live = LiveQueue(QueueFilters.from_query(query))
        else:
            csrf = await database_sync_to_async(csrf_token_for)(self.scope.get("cookies", {}))
            self.live = LiveRequest(request_id, csrf)
        await self.channel_layer.group_add(QUEUE_GROUP, self.channel_name)
        self.waves = RenderWaves.of_loop("approvals.queue", _queue_waves)
        self.waves.join(self)
        self.waves.request(self)  # the whole state at once (reconnects share the render)

    async def disconnect(self, code: int) -> None:
        if self.waves is not None:
            self.waves.leave(self)
            await self.channel_layer.group_discard(QUEUE_GROUP, self.channel_name)

    @property
    def user_id(self) -> int:
        return self.scope["user"].pk

    @property
    def shares(self) -> bool:
        return type(self.live) is LiveQueue

    async def queue_changed(self, event: dict) -> None:
        self.waves.request(self)

    async def deliver(self, rendered: Rendered) -> None:
        if self.closing:
            return
        if isinstance(rendered, int):
            self.closing = True
            self.waves.leave(self)
            await self.close(code=rendered)
            return
        for html in rendered:
            await self.send(text_data=html)


def _queue_waves() -> RenderWaves:
    return RenderWaves(render_batch, shared=lambda connection: connection.shares)


def render_one(live, user_id: int) -> Rendered:
    """One connection's own render: its messages, or why it closes."""
    try:
        messages = live.update(user_id, set())
    except Http404:
        return NOT_FOUND
    return FORBIDDEN if messages is None else messages  # the role (or team) was taken away


def render_batch(connections: list[QueueConsumer]) -> list[Rendered | None]:
    """A wave: the queue connections share renders (see the module's docstring), the request
    pages render each their own. A connection whose render fails gets None (nothing sent)."""
    results: list[Rendered | None] = [None] * len(connections)
    queues = [i for i, c in enumerate(connections) if c.shares]
    if queues:
        try:
            shared = _render_shared([connections[i] for i in queues])
        except Exception:
            log.exception("a shared render of the queue failed; rendering each on its own")
            shared = None
        for i, rendered in zip(queues, shared or [None] * len(queues), strict=True):
            results[i] = rendered
    for i, connection in enumerate(connections):
        if results[i] is None:
            try:
                results[i] = render_one(connection.live, connection.user_id)
            except Exception:
                log.exception(
                    "rendering %s for user %s failed", connection.live, connection.user_id
                )
    return results


def audience(filters: QueueFilters, teams: frozenset[str], claimant: int | None) -> tuple:
    """What a viewer's queue depends on besides the open requests: one render per audience."""
    return (filters.querystring(), teams, claimant)


def _render_shared(connections: list[QueueConsumer]) -> list[Rendered | None] | None:
    """The queue connections' renders, one per audience (None for one whose representative
    lost its role meanwhile: it renders on its own); None for all if a role, team or claim
    changed while rendering, or if the permissions cannot be read for many viewers at once (an
    authentication backend other than Django's model backend)."""
    backends = get_backends()
    if len(backends) != 1 or type(backends[0]) is not ModelBackend:
        return None
    open_claims = ApprovalRequest.objects.filter(status__in=OPEN, claimed_by__isnull=False)
    user_ids = {c.user_id for c in connections}

    def who_sees_what() -> tuple[dict[int, set[str]], set[int]]:
        """The viewers who may review, with their teams, and those who hold a claim."""
        viewers = (
            get_user_model()
            .objects.with_perm(REVIEW, is_active=True, include_superusers=True)
            .filter(pk__in=user_ids)
            .annotate(claiming=Exists(open_claims.filter(claimed_by=OuterRef("pk"))))
            .values_list("pk", "reviewer_teams__name", "claiming")
        )
        teams: dict[int, set[str]] = {}
        claiming: set[int] = set()
        for user_id, team, claims in viewers:
            teams.setdefault(user_id, set()).update([team] if team else [])
            if claims:
                claiming.add(user_id)
        return teams, claiming

    teams, claiming = who_sees_what()

    renders: dict[tuple, dict[str, str] | None] = {}
    chosen: list[dict[str, str] | int | None] = []
    for connection in connections:
        user_id = connection.user_id
        if user_id not in teams:
            chosen.append(FORBIDDEN)
            continue
        filters = connection.live.filters
        key = audience(filters, frozenset(teams[user_id]), user_id if user_id in claiming else None)
        if key not in renders:
            probe = LiveQueue(filters)  # a full re-read under this viewer's permissions
            renders[key] = probe.sent if probe.update(user_id, set()) is not None else None
        chosen.append(renders[key])  # None: the viewer rendered lost its role meanwhile
    if who_sees_what() != (teams, claiming):
        return None  # a role, a team or a claim changed while rendering: each on its own
    results: list[Rendered | None] = []
    for connection, fragments in zip(connections, chosen, strict=True):
        if fragments is None or isinstance(fragments, int):
            results.append(fragments)
            continue
        sent = connection.live.sent
        results.append([oob(html) for name, html in fragments.items() if sent.get(name) != html])
        connection.live.sent = dict(fragments)
    return results
