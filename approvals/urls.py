from django.urls import include, path

from approvals import views
from approvals.queue import views as queue_views

app_name = "approvals"

urlpatterns = [
    path("approvals/", queue_views.queue, name="queue"),
    path("approvals/<int:request_id>/", queue_views.request_detail, name="request"),
    path("approvals/<int:request_id>/claim/", queue_views.request_claim, name="claim"),
    path("approvals/<int:request_id>/release/", queue_views.request_release, name="release"),
    path("approvals/<int:request_id>/decide/", queue_views.request_decide, name="decide"),
    path("approvals/runs/<int:run_id>/grants/", queue_views.run_grants, name="run_grants"),
    path(
        "approvals/grants/<int:grant_id>/revoke/",
        queue_views.run_grant_revoke,
        name="grant_revoke",
    ),
    path("roles/", views.roles, name="roles"),
    path("audit/", include("approvals.audit.urls")),
]
