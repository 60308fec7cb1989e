from django.urls import path

from orchestration.runs import views

app_name = "runs"

urlpatterns = [
    path("runs/", views.run_list, name="list"),
    path("runs/new/", views.run_pick, name="pick"),
    path("runs/new/<str:name>/", views.run_new, name="start"),
    path("runs/<int:run_id>/", views.run_detail, name="detail"),
    path("runs/<int:run_id>/timeline/", views.run_timeline, name="timeline"),
    path("runs/<int:run_id>/halt/", views.run_halt_view, name="halt"),
    path("runs/<int:run_id>/retry/", views.run_retry_view, name="retry"),
]
