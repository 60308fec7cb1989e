from django.urls import path

from approvals.queue.consumers import QueueConsumer
from orchestration.consumers import RunsConsumer, SystemStatusConsumer

websocket_urlpatterns = [
    path("ws/system/", SystemStatusConsumer.as_asgi()),
    path("ws/runs/", RunsConsumer.as_asgi()),
    path("ws/runs/<int:run_id>/", RunsConsumer.as_asgi()),
    path("ws/approvals/", QueueConsumer.as_asgi()),
    path("ws/approvals/<int:request_id>/", QueueConsumer.as_asgi()),
]
