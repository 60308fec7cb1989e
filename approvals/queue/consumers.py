"""The live queue (``ws/approvals/?filters``) and one request's page (``ws/approvals/<id>/``).
Both join ``approvals.queue``; on each ``queue.changed`` they re-read under the viewer's
permissions and send what changed as out-of-band fragments, rendered from the same partials as
the pages. On (re)connect the queue sends its whole list. Bursts are coalesced."""

import asyncio

from channels.db import database_sync_to_async
from django.http import Http404, QueryDict

from approvals.queue.selectors import QueueFilters, can_review
from approvals.queue.services import QUEUE_GROUP
from approvals.queue.views import LiveQueue, LiveRequest
from orchestration.consumers import FORBIDDEN, NOT_FOUND, RENDER_INTERVAL, AuthenticatedConsumer
from orchestration.runs.views import csrf_token_for


class QueueConsumer(AuthenticatedConsumer):
    live = None
    flusher: asyncio.Task | None = None
    joined = False

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
        self.pending = False
        self.last_render = 0.0
        await self.channel_layer.group_add(QUEUE_GROUP, self.channel_name)
        self.joined = True
        await self.render()

    async def disconnect(self, code: int) -> None:
        if self.flusher:
            self.flusher.cancel()
        if self.joined:
            await self.channel_layer.group_discard(QUEUE_GROUP, self.channel_name)

    async def queue_changed(self, event: dict) -> None:
        self.pending = True
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                wait = self.last_render + RENDER_INTERVAL - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.pending = False
                await self.render()
        finally:
            self.flusher = None

    async def render(self) -> None:
        self.last_render = asyncio.get_running_loop().time()
        try:
            messages = await database_sync_to_async(self.live.update)(self.scope["user"].pk, set())
        except Http404:
            await self.close(code=NOT_FOUND)
            return
        if messages is None:  # the viewer's role (or team) was taken away
            await self.close(code=FORBIDDEN)
            return
        for html in messages:
            await self.send(text_data=html)
