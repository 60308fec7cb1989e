"""The live queue over the websocket (in-memory channel layer): the whole list on connect, a new
request appears after ``queue.changed``, a decided one leaves; anonymous users are refused.
Queue sockets share renders by audience: each still gets exactly what its own render gives."""

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.http import QueryDict
from django.test import Client
from django.utils import timezone

from approvals.queue.consumers import render_batch
from approvals.queue.models import ApprovalRequest, ReviewerTeam
from approvals.queue.selectors import QueueFilters
from approvals.queue.services import approval_claim
from approvals.queue.transitions import QUEUE_GROUP
from approvals.queue.views import LiveQueue
from approvals.roles import AUDITOR
from config.asgi import application
from orchestration.consumers import FORBIDDEN
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


class _Connection:
    """What ``render_batch`` reads of a queue socket."""

    def __init__(self, live, user_id: int):
        self.live, self.user_id = live, user_id

    @property
    def shares(self) -> bool:
        return type(self.live) is LiveQueue


@pytest.mark.django_db
def test_shared_queue_renders_match_each_viewers_own():
    run = make_run()
    fin, holder, ops = (
        member("fin", "finance"),
        member("holder", "finance"),
        member("ops", "operations"),
    )
    both, loose = member("both", "finance", "operations"), member("loose")  # loose: no team
    fin2, gone = member("fin2", "finance"), member("gone", "finance")
    ignored = member("ignored", "finance", role=None)
    claimed = make_request(run, seq=1)
    make_request(run, seq=2, minutes=5)
    make_request(run, seq=3, team="operations", score=20)
    make_request(run, seq=4, team="")
    make_request(
        run,
        seq=5,
        team="finance",
        status="escalated",
        obligations={"escalation_team": "operations"},
    )
    ApprovalRequest.objects.filter(pk=claimed.pk).update(
        claimed_by=holder,
        claimed_at=timezone.now(),
        claim_expires_at=timezone.now() + timedelta(minutes=5),
    )
    viewers = [
        (fin, ""),
        (fin2, ""),
        (holder, ""),
        (holder, "claim=mine"),
        (fin, "claim=unclaimed"),
        (ops, ""),
        (both, ""),
        (loose, ""),
        (fin, "team=finance"),
        (gone, ""),
        (ignored, ""),
    ]
    shared = [
        _Connection(LiveQueue(QueueFilters.from_query(QueryDict(q))), u.pk) for u, q in viewers
    ]
    own = [LiveQueue(QueueFilters.from_query(QueryDict(q))) for _, q in viewers]

    def compare() -> list:
        results = render_batch(shared)
        assert all(r is not None for r in results)
        for result, live, (user, query) in zip(results, own, viewers, strict=True):
            expected = live.update(user.pk, set())
            assert result == (FORBIDDEN if expected is None else expected), (user, query)
        return results

    first = compare()
    assert first[0] and first[0] == first[1]  # fin and fin2 share a render ...
    assert first[2] != first[0]  # ... the claim's holder does not
    assert first[-1] == FORBIDDEN  # no reviewer role

    gone.is_active = False
    gone.save()
    make_request(run, seq=6, minutes=1)  # a new request, first in the finance queues
    second = compare()
    assert second[0] and second[-2] == FORBIDDEN
    assert compare()[:-2] == [[]] * (len(viewers) - 2)  # nothing changed: nothing sent


@pytest.mark.django_db
def test_a_team_change_during_a_shared_render_does_not_leak_the_new_teams_requests(monkeypatch):
    run = make_run()
    finance = make_request(run, seq=1, team="finance")
    operations = make_request(run, seq=2, team="operations")
    alice, bob = member("alice", "operations"), member("bob", "operations")
    original = LiveQueue.update

    def update_after_alice_joins_finance(self, user_id, *args, **kwargs):
        alice.reviewer_teams.add(ReviewerTeam.objects.get_or_create(name="finance")[0])  # meanwhile
        return original(self, user_id, *args, **kwargs)

    connections = [_Connection(LiveQueue(QueueFilters()), user.pk) for user in (alice, bob)]
    monkeypatch.setattr(LiveQueue, "update", update_after_alice_joins_finance)
    results = render_batch(connections)
    monkeypatch.setattr(LiveQueue, "update", original)

    bobs_own = LiveQueue(QueueFilters()).update(bob.pk, set())
    assert results[1] == bobs_own
    sent = "".join(results[1])
    assert f'id="req-{finance.pk}"' not in sent and f'id="req-{operations.pk}"' in sent


@pytest.mark.django_db
def test_a_wave_of_one_teams_sockets_costs_a_few_queries_not_a_few_per_socket(
    django_assert_max_num_queries,
):
    make_request()
    viewers = [member(f"r{i}", "finance") for i in range(20)]
    sockets = [_Connection(LiveQueue(QueueFilters()), viewer.pk) for viewer in viewers]
    # the viewers, their claims again, one render (its rows with their approvals, the counts)
    with django_assert_max_num_queries(11):
        results = render_batch(sockets)
    assert len({tuple(r) for r in results}) == 1 and len(results[0]) == 2


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_sockets_of_one_team_get_the_same_update_and_a_claimant_their_own():
    (a, _), (b, _) = await _cookie("fa", "finance"), await _cookie("fb", "finance")
    holder_cookie, holder = await _cookie("fh", "finance")
    run = await database_sync_to_async(make_run)()
    first = await database_sync_to_async(make_request)(run, seq=1)
    sockets = [_socket("/ws/approvals/", cookie) for cookie in (a, b, holder_cookie)]
    for ws in sockets:
        assert (await ws.connect())[0]
        assert 'id="queue-counts"' in await ws.receive_from(timeout=3)
        assert f'id="req-{first.pk}"' in await ws.receive_from(timeout=3)

    await database_sync_to_async(approval_claim)(request=first.pk, reviewer=holder)
    await get_channel_layer().group_send(QUEUE_GROUP, CHANGED)
    bodies = []
    for ws in sockets:
        assert "<strong>0</strong> unclaimed" in await ws.receive_from(timeout=3)
        bodies.append(await ws.receive_from(timeout=3))
    assert bodies[0] == bodies[1] and "claimed by fh" in bodies[0]
    assert "claimed by you" in bodies[2]
    for ws in sockets:
        assert await ws.receive_nothing(timeout=0.3)
        await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_reviewer_whose_role_is_taken_away_is_closed_the_others_stay():
    from django.contrib.auth.models import Group

    from approvals.roles import REVIEWER

    (kept, _), (lost_cookie, lost) = (
        await _cookie("keep", "finance"),
        await _cookie("lose", "finance"),
    )
    sockets = [_socket("/ws/approvals/", cookie) for cookie in (kept, lost_cookie)]
    for ws in sockets:
        assert (await ws.connect())[0]
        await ws.receive_from(timeout=3)
        await ws.receive_from(timeout=3)
    await database_sync_to_async(lost.groups.remove)(
        await database_sync_to_async(Group.objects.get)(name=REVIEWER)
    )
    request = await database_sync_to_async(make_request)()
    await get_channel_layer().group_send(QUEUE_GROUP, CHANGED)
    assert "<strong>1</strong> open" in await sockets[0].receive_from(timeout=3)
    assert f'id="req-{request.pk}"' in await sockets[0].receive_from(timeout=3)
    closed = await sockets[1].receive_output(timeout=3)
    assert closed == {"type": "websocket.close", "code": FORBIDDEN}
    await sockets[0].disconnect()
