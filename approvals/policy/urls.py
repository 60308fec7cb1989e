from django.urls import path

from approvals.policy import views

app_name = "policy"

urlpatterns = [
    path("rules/", views.rule_list, name="rules"),
    path("rules/new/", views.rule_edit, name="rule_new"),
    path("rules/<int:pk>/", views.rule_edit, name="rule"),
    path("rules/<int:pk>/delete/", views.rule_delete_view, name="rule_delete"),
    path("conditions/check/", views.condition_validate, name="condition_validate"),
    path("factors/", views.factor_list, name="factors"),
    path("factors/new/", views.factor_edit, name="factor_new"),
    path("factors/<int:pk>/", views.factor_edit, name="factor"),
    path("factors/<int:pk>/delete/", views.factor_delete_view, name="factor_delete"),
    path("thresholds/", views.thresholds, name="thresholds"),
    path("tools/", views.tool_list, name="tools"),
    path("tools/<int:pk>/", views.tool_edit, name="tool"),
    path("agents/", views.agent_list, name="agents"),
    path("agents/<int:pk>/", views.agent_detail, name="agent"),
    path("agents/<int:pk>/grants/", views.grant_add, name="grant_add"),
    path("grants/<int:pk>/revoke/", views.grant_revoke_view, name="grant_revoke"),
    path("versions/", views.version_list, name="versions"),
    path("versions/publish/", views.publish, name="publish"),
    path("versions/simulation/", views.simulation, name="simulation"),
]
