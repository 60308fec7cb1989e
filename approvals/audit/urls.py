"""Included under ``audit/`` by ``approvals.urls``: the names live in the ``approvals``
namespace (``approvals:audit`` is the search, as it always was)."""

from django.urls import path

from approvals.audit import export, views

urlpatterns = [
    path("", views.audit_search, name="audit"),
    path("export.csv", export.export_csv, name="audit_export_csv"),
    path("export.jsonl", export.export_jsonl, name="audit_export_jsonl"),
    path("decisions/<int:decision_id>/", views.audit_decision, name="audit_decision"),
    path("runs/<int:run_id>/", views.audit_run, name="audit_run"),
]
