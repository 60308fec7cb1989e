"""A real Celery worker process on Redis and the test database (PostgreSQL in CI)."""

import asyncio

import pytest
from channels_redis.core import RedisChannelLayer
from django.db import connections

from config.celery import app
from config.settings import celery_broker_url
from orchestration.broadcast import SYSTEM_GROUP
from orchestration.workers import WorkerHeartbeat, worker_status
from tests.services import wait_for

pytestmark = [pytest.mark.redis]


def seen_at(hostname: str):
    return (
        WorkerHeartbeat.objects.filter(hostname=hostname).values_list("seen_at", flat=True).first()
    )


def seen_at_from_thread(hostname: str):
    try:
        return seen_at(hostname)
    finally:
        connections.close_all()  # this thread's own connection only


def test_a_worker_commits_a_tasks_effect_and_broadcasts_it(celery_worker, redis_url):
    hostname, process = celery_worker

    def started():
        assert process.poll() is None, process.log_path.read_text()
        return seen_at(hostname)

    on_start = wait_for(started, timeout=30, what="the worker's first heartbeat")
    assert worker_status().alive

    async def heartbeat_seen_with_event():
        layer = RedisChannelLayer(hosts=[redis_url])
        channel = await layer.new_channel()
        await layer.group_add(SYSTEM_GROUP, channel)
        with app.connection_for_write(celery_broker_url(redis_url)) as conn:
            app.send_task("orchestration.tasks.worker_heartbeat", connection=conn)
        try:
            # The startup heartbeat's own broadcast may still be in flight and arrive first:
            # keep listening until an event finds the task's heartbeat committed.
            while True:
                event = await asyncio.wait_for(layer.receive(channel), timeout=20)
                assert event == {"type": "system.status"}
                seen = await asyncio.to_thread(seen_at_from_thread, hostname)
                if seen > on_start:
                    return seen
        finally:
            await layer.group_discard(SYSTEM_GROUP, channel)

    # The broadcast happens on commit, so an event arrives once the new heartbeat is visible;
    # without one, the wait above times out.
    assert asyncio.run(heartbeat_seen_with_event()) > on_start
