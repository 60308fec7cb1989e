"""The Celery app. Durability settings (late acks, reject on worker lost, prefetch 1, time
limits) live in ``config.settings`` under the ``CELERY_`` namespace."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("baton")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
