import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import Http404, QueryDict
from django.template.loader import render_to_string
from django.utils import timezone

from orchestration.broadcast import SYSTEM_GROUP
from orchestration.runs.access import run_access
from orchestration.runs.realtime import RUNS_GROUP, run_group
from orchestration.runs.selectors import RunFilters
from orchestration.runs.views import LiveDetail, LiveList, csrf_token_for
from orchestration.workers import worker_status

log = logging.getLogger(__name__)

UNAUTHENTICATED = 4401


class AuthenticatedConsumer(AsyncWebsocketConsumer):
    """Refuses anonymous users before the handshake completes."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=UNAUTHENTICATED)
            return
        await self.accept()
        await self.on_accept()

    async def on_accept(self) -> None:
        pass


class SystemStatusConsumer(AuthenticatedConsumer):
    """Keeps the shell's worker banner current: re-rendered on every worker heartbeat and again
    when the newest heartbeat goes stale. Sends the banner at once on (re)connect."""

    stale_timer: asyncio.Task | None = None

    async def on_accept(self) -> None:
        await self.channel_layer.group_add(SYSTEM_GROUP, self.channel_name)
        await self.send_status()

    async def disconnect(self, code: int) -> None:
        if self.stale_timer:
            self.stale_timer.cancel()
        await self.channel_layer.group_discard(SYSTEM_GROUP, self.channel_name)

    async def system_status(self, event: dict) -> None:
        await self.send_status()

    async def send_status(self) -> None:
        status = await database_sync_to_async(worker_status)()
        html = render_to_string("base.html#worker-status", {"worker_status": status})
        await self.send(text_data=html)
        if self.stale_timer:
            self.stale_timer.cancel()
        if status.alive:
            delay = (status.stale_at - timezone.now()).total_seconds() + 0.5
            self.stale_timer = asyncio.create_task(self._resend_after(delay))

    async def _resend_after(self, delay: float) -> None:
        await asyncio.sleep(max(delay, 0))
        self.stale_timer = None
        await self.send_status()


FORBIDDEN = 4403
NOT_FOUND = 4404
RENDER_INTERVAL = 0.2  # seconds: at most one render per connection per interval

# What a render gives a connection: the messages to send, or the code to close it with.
Rendered = list[str] | int
GATHER_SECONDS = 0.003  # a wave waits this long for the other copies of a group message
WAVE_SPACING = 0.02  # seconds between the end of a wave and the start of the next, at least


class RenderWaves:
    """The connections of one kind in this process (one instance per event loop, see
    ``of_loop``), rendered together, in waves. The channel layer hands each connection its own
    copy of a group message, one after another; the first copy starts a wave. After
    ``GATHER_SECONDS`` the wave takes every connection whose copy has come (or that has just
    connected), and every connection ``shared`` names (those whose renders ``render_batch``
    shares: their copies are on the way), renders them all in one thread hop and gives each its
    result (its ``deliver``). Copies that come while a wave renders start the next one, so no
    change is missed and a burst is coalesced. Waves are at least ``WAVE_SPACING`` apart; when
    copies wait at the end of a wave (a storm of events), the next one also waits as long as the
    last one took, so that rendering takes at most about half of the process's time. An event
    after a quiet spell renders at once."""

    _instances: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RenderWaves]]"
    _instances = weakref.WeakKeyDictionary()

    def __init__(
        self,
        render_batch: Callable[[list[Any]], list[Rendered | None]],
        *,
        shared: Callable[[Any], bool] = lambda connection: False,
    ) -> None:
        self.render_batch = render_batch
        self.shared = shared
        self.connections: dict[Any, None] = {}  # insertion-ordered sets
        self.pending: dict[Any, None] = {}
        self.task: asyncio.Task | None = None
        self.ready_at = 0.0

    @classmethod
    def of_loop(cls, name: str, factory: Callable[[], "RenderWaves"]) -> "RenderWaves":
        """The running event loop's instance called ``name``, made by ``factory`` if new."""
        named = cls._instances.setdefault(asyncio.get_running_loop(), {})
        if name not in named:
            named[name] = factory()
        return named[name]

    def join(self, connection) -> None:
        self.connections[connection] = None

    def leave(self, connection) -> None:
        self.connections.pop(connection, None)
        self.pending.pop(connection, None)

    def request(self, connection) -> None:
        if connection not in self.connections:
            return
        self.pending[connection] = None
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                await asyncio.sleep(max(GATHER_SECONDS, self.ready_at - loop.time()))
                batch = dict(self.pending)
                batch.update((c, None) for c in self.connections if self.shared(c))
                self.pending = {}
                started = loop.time()
                connections = list(batch)
                try:
                    results = await database_sync_to_async(self.render_batch)(connections)
                except Exception:  # the next event, or a reconnect, renders again
                    log.exception("a render wave of %d connections failed", len(connections))
                    results = [None] * len(connections)
                for connection, rendered in zip(connections, results, strict=True):
                    if rendered is not None and connection in self.connections:
                        try:
                            await connection.deliver(rendered)
                        except Exception:  # that socket's trouble, not the others'
                            log.exception("sending a render to %s failed", connection)
                ended = loop.time()
                storm = bool(self.pending)  # copies came while rendering: back to back
                self.ready_at = ended + max(WAVE_SPACING, ended - started if storm else 0)
        finally:
            self.task = None


class RunsConsumer(AuthenticatedConsumer):
    """Keeps the runs list (``/ws/runs/?status=...``) or one run's page (``/ws/runs/<id>/``)
    current. On (re)connect it sends the page's live fragments at once; on each ``run.changed``
    it re-reads under the viewer's permissions and sends what changed, rendered from the same
    partials as the pages. Bursts are coalesced: at most one render per ``RENDER_INTERVAL``."""

    live = None
    group = ""
    flusher: asyncio.Task | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        signed_in = user is not None and user.is_authenticated
        if signed_in and not await database_sync_to_async(run_access().can_view)(user):
            await self.close(code=FORBIDDEN)
            return
        await super().connect()  # refuses anonymous users

    async def on_accept(self) -> None:
        run_id = self.scope["url_route"]["kwargs"].get("run_id")
        if run_id is None:
            query = QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
            self.live, self.group = LiveList(RunFilters.from_query(query)), RUNS_GROUP
        else:
            csrf = await database_sync_to_async(csrf_token_for)(self.scope.get("cookies", {}))
            self.live, self.group = LiveDetail(run_id, csrf), run_group(run_id)
        self.changed: set[int] = set()
        self.last_render = 0.0
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.render(set())

    async def disconnect(self, code: int) -> None:
        if self.flusher:
            self.flusher.cancel()
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def run_changed(self, event: dict) -> None:
        self.changed.add(int(event["run_id"]))
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.changed:
                wait = self.last_render + RENDER_INTERVAL - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                changed, self.changed = self.changed, set()
                await self.render(changed)
        finally:
            self.flusher = None

    async def render(self, changed: set[int]) -> None:
        self.last_render = asyncio.get_running_loop().time()
        try:
            messages = await database_sync_to_async(self.live.update)(
                self.scope["user"].pk, changed
            )
        except Http404:
            await self.close(code=NOT_FOUND)
            return
        if messages is None:  # the viewer's role was taken away
            await self.close(code=FORBIDDEN)
            return
        for html in messages:
            await self.send(text_data=html)
