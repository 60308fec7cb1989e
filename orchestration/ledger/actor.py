"""Who is acting, for ledger records written where no caller passes an actor (signal handlers
such as role changes made in Django's admin).

The context variable holds an actor (a user or a label) or a function returning one. Requests
store ``lambda: request.user``, never the lazy user itself: asgiref compares context values when
it hops between threads, and comparing a lazy user would load it from inside the event loop."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware

_current_actor: ContextVar[Any] = ContextVar("baton_ledger_actor", default="system")


def current_actor() -> Any:
    actor = _current_actor.get()
    return actor() if callable(actor) else actor


@contextmanager
def acting_as(actor: Any) -> Iterator[None]:
    token = _current_actor.set(actor)
    try:
        yield
    finally:
        _current_actor.reset(token)


@sync_and_async_middleware
def ledger_actor_middleware(get_response: Callable) -> Callable:
    """Makes the request's user the actor of records written while the request runs."""
    if iscoroutinefunction(get_response):

        async def middleware(request):
            with acting_as(lambda: request.user):
                return await get_response(request)

    else:

        def middleware(request):
            with acting_as(lambda: request.user):
                return get_response(request)

    return middleware
