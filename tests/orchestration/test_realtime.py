"""Websockets: the ASGI app's auth and origin checks, the system consumer, and a group message
through channels-redis on a real Redis."""

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from config.asgi import application
from orchestration.broadcast import SYSTEM_GROUP
from orchestration.workers import WorkerHeartbeat

NO_WORKER = "No worker is running"


@database_sync_to_async
def session_cookie() -> str:
    user = get_user_model().objects.create_user("wsuser")
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def communicator(*, cookie: str = "", origin: str = "http://127.0.0.1:8000"):
    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", origin.encode())]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, "/ws/system/", headers=headers)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_anonymous_users_are_refused():
    connected, code = await communicator().connect()
    assert not connected
    assert code == 4401


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_foreign_origin_is_refused():
    ws = communicator(cookie=await session_cookie(), origin="https://evil.example")
    connected, _ = await ws.connect()
    assert not connected


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_banner_is_sent_on_connect_and_again_on_each_heartbeat(settings):
    ws = communicator(cookie=await session_cookie())
    connected, _ = await ws.connect()
    assert connected
    first = await ws.receive_from(timeout=2)
    assert 'id="worker-status"' in first
    assert NO_WORKER in first

    await database_sync_to_async(WorkerHeartbeat.objects.create)(
        hostname="w1", seen_at=timezone.now()
    )
    await get_channel_layer().group_send(SYSTEM_GROUP, {"type": "system.status"})
    second = await ws.receive_from(timeout=2)
    assert 'id="worker-status"' in second
    assert NO_WORKER not in second
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_banner_returns_by_itself_when_the_heartbeat_goes_stale(settings):
    settings.BATON_WORKER_STALE_AFTER = 1
    await database_sync_to_async(WorkerHeartbeat.objects.create)(
        hostname="w1", seen_at=timezone.now()
    )
    ws = communicator(cookie=await session_cookie())
    await ws.connect()
    assert NO_WORKER not in await ws.receive_from(timeout=2)
    assert NO_WORKER in await ws.receive_from(timeout=4)  # no event: the consumer's own timer
    await ws.disconnect()


@pytest.mark.redis
@pytest.mark.asyncio
async def test_group_message_round_trips_through_channels_redis(redis_url):
    layer = RedisChannelLayer(hosts=[redis_url])
    channel = await layer.new_channel()
    await layer.group_add("runs.42", channel)
    await layer.group_send("runs.42", {"type": "run.changed", "run_id": 42})
    message = await asyncio.wait_for(layer.receive(channel), timeout=5)
    assert message == {"type": "run.changed", "run_id": 42}
    await layer.group_discard("runs.42", channel)
    await layer.flush()


@pytest.mark.redis
def test_an_idle_listener_outlives_the_redis_clients_read_timeout(redis_url):
    """A websocket with nothing to receive blocks in channels-redis's 5 s pops; the project's
    channel layer settings keep the Redis client's read timeout above that."""
    from config import settings as project

    config = project.CHANNEL_LAYERS["default"]["CONFIG"]
    hosts = [{**host, "address": redis_url} for host in config["hosts"]]

    async def idle() -> None:
        layer = RedisChannelLayer(hosts=hosts)
        channel = await layer.new_channel()
        try:
            with pytest.raises(TimeoutError):  # ours, not the Redis client's
                await asyncio.wait_for(layer.receive(channel), timeout=6.5)
            await layer.send(channel, {"type": "still.listening"})
            assert await asyncio.wait_for(layer.receive(channel), timeout=2) == {
                "type": "still.listening"
            }
        finally:
            await layer.close_pools()

    asyncio.run(idle())
