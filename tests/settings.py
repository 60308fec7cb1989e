"""Settings for the test suite: the project's settings with a test key, a fast hasher and the
in-memory channel layer for unit tests. Processes the tests start (Daphne, a Celery worker) get
``BATON_TEST_LIVE=1`` and the test database's name, and keep the Redis channel layer."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("SECRET_KEY", "tests-only-" + "k" * 40)
os.environ.setdefault("BATON_VAR_DIR", tempfile.mkdtemp(prefix="baton-tests-"))

from config.settings import *  # noqa: F403
from config.settings import DATABASES, VAR_DIR

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # Daphne in tests serves static files without collectstatic
WHITENOISE_AUTOREFRESH = True

if not os.environ.get("BATON_TEST_LIVE"):
    # Connections opened in worker threads (channels' database_sync_to_async) close after each
    # use, so none is left open on the test database at teardown. Processes the tests start keep
    # the production setting.
    DATABASES["default"]["CONN_MAX_AGE"] = 0

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not memory, so that Daphne and worker processes share the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(Path(VAR_DIR) / "test.sqlite3")}

if os.environ.get("BATON_TEST_DATABASE_NAME"):  # a process started by the tests
    DATABASES["default"]["NAME"] = os.environ["BATON_TEST_DATABASE_NAME"]

if not os.environ.get("BATON_TEST_LIVE"):
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # Unit tests drive the engine's task bodies directly; what they enqueue goes to kombu's
    # in-process transport. Tests with a real worker point the producer at Redis
    # (tests.conftest.celery_worker).
    CELERY_BROKER_URL = "memory://"

BATON_BACKOFF_SCALE = 0.01  # retries back off in tens of milliseconds

# The engine's own tests run on the allow-all gate; policy and queue tests switch to the policy
# gate themselves (and pass BATON_GATE on to the processes they start).
BATON_GATE = os.environ.get("BATON_GATE", "orchestration.gate.AllowAllGate")
