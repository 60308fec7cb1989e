from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import Group
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse

from approvals.queue.views import queue  # noqa: F401  (the queue page lives with the queue)
from approvals.roles import MANAGE_POLICY, ROLE_PERMISSIONS, role_required
from approvals.shell import landing_url


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """Sends each role to where it works; a user with no role is told so."""
    url = landing_url(request.user)
    if url:
        return redirect(url)
    return TemplateResponse(request, "approvals/no_role.html", status=403)


@role_required(MANAGE_POLICY)
def roles(request: HttpRequest) -> HttpResponse:
    groups = Group.objects.filter(name__in=ROLE_PERMISSIONS).prefetch_related(
        "permissions", "user_set"
    )
    return TemplateResponse(request, "approvals/roles.html", {"groups": groups})
