"""The live queue over the websocket (in-memory channel layer): the whole list on connect, a new
request appears after ``queue.changed``, a decided one leaves; anonymous users are refused."""

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client

from approvals.queue.models import ApprovalRequest
from approvals.queue.services import QUEUE_GROUP, approval_claim
from approvals.roles import AUDITOR
from config.asgi import application
from tests.approvals.queue.test_views import make_request, make_run, member

CHANGED = {"type": "queue.changed", "request_id": 0}


def _socket(path: str, cookie: str = "") -> WebsocketCommunicator:
    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, path, headers=headers)


@database_sync_to_async
def _cookie(name: str, *teams: str, role=None) -> tuple[str, object]:
    kwargs = {"role": role} if role else {}
    account = member(name, *teams, **kwargs)
    client = Client()
    client.force_login(account)
    return f"sessionid={client.cookies['sessionid'].value}", account


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_queue_socket_sends_the_list_then_arrivals_claims_and_departures():
    cookie, _ = await _cookie("fin", "finance")
    run = await database_sync_to_async(make_run)()
    first = await database_sync_to_async(make_request)(run, seq=1, minutes=30)
    ws = _socket("/ws/approvals/", cookie)
    assert (await ws.connect())[0]
    counts = await ws.receive_from(timeout=3)
    assert counts.startswith('\n<p hx-swap-oob="true" id="queue-counts"')
    html = await ws.receive_from(timeout=3)
    assert html.lstrip().startswith('<tbody hx-swap-oob="true" id="queue-body"')
    assert f'id="req-{first.pk}"' in html

    sooner = await database_sync_to_async(make_request)(run, seq=2, minutes=5)
    layer = get_channel_layer()
    for _ in range(3):  # a burst: one render
        await layer.group_send(QUEUE_GROUP, CHANGED)
    assert "<strong>2</strong> open" in await ws.receive_from(timeout=3)
    html = await ws.receive_from(timeout=3)
    assert html.index(f'id="req-{sooner.pk}"') < html.index(f'id="req-{first.pk}"')
    assert await ws.receive_nothing(timeout=0.5)

    dana = await database_sync_to_async(member)("dana", "finance")
    await database_sync_to_async(approval_claim)(request=first.pk, reviewer=dana)
    await layer.group_send(QUEUE_GROUP, CHANGED)
    assert "<strong>1</strong> unclaimed" in await ws.receive_from(timeout=3)
    html = await ws.receive_from(timeout=3)
    assert "claimed by dana" in html

    await database_sync_to_async(ApprovalRequest.objects.filter(pk=first.pk).update)(
        status="approved", decided_by="dana"
    )
    await layer.group_send(QUEUE_GROUP, CHANGED)
    assert "<strong>1</strong> open" in await ws.receive_from(timeout=3)
    html = await ws.receive_from(timeout=3)
    assert f'id="req-{first.pk}"' not in html and f'id="req-{sooner.pk}"' in html
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_another_teams_request_never_reaches_the_socket():
    cookie, _ = await _cookie("ops", "operations")
    ws = _socket("/ws/approvals/", cookie)
    assert (await ws.connect())[0]
    await ws.receive_from(timeout=3)
    await ws.receive_from(timeout=3)
    request = await database_sync_to_async(make_request)(team="finance")
    await get_channel_layer().group_send(QUEUE_GROUP, CHANGED)
    html = await ws.receive_nothing(timeout=0.7)  # nothing this viewer sees changed
    assert html is True, request
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_request_socket_sends_the_state_when_it_changes():
    cookie, _ = await _cookie("fin", "finance")
    request = await database_sync_to_async(make_request)()
    ws = _socket(f"/ws/approvals/{request.pk}/", cookie)
    assert (await ws.connect())[0]
    html = await ws.receive_from(timeout=3)
    assert 'id="request-state"' in html and 'id="request-decide"' not in html
    await database_sync_to_async(ApprovalRequest.objects.filter(pk=request.pk).update)(
        status="rejected", decided_by="dana", reason="no"
    )
    await get_channel_layer().group_send(QUEUE_GROUP, CHANGED)
    html = await ws.receive_from(timeout=3)
    assert "Already decided by dana" in html and 'id="request-decide"' in html
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_queue_socket_refuses_anonymous_users_and_other_roles():
    anonymous = _socket("/ws/approvals/")
    assert await anonymous.connect() == (False, 4401)
    cookie, _ = await _cookie("aud", role=AUDITOR)
    auditor = _socket("/ws/approvals/", cookie)
    assert await auditor.connect() == (False, 4403)
    await anonymous.wait()
    await auditor.wait()
