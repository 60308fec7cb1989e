"""Baton settings, read from the environment.

Embedded mode (nothing set): a SQLite file and a private Redis socket under ``var/``.
Services mode: ``DATABASE_URL`` (PostgreSQL) and ``REDIS_URL``. See README, "Run with services".
"""

import os
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("BATON_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean; use 1 or 0.")


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG")

# --- Secret key -------------------------------------------------------------------------------
# `make run` generates one into var/secret_key on first start; SECRET_KEY overrides it.
KNOWN_DEFAULT_SECRET_KEYS = {"", "changeme", "change-me", "secret", "django-insecure", "baton"}
SECRET_KEY_FILE = VAR_DIR / "secret_key"
SECRET_KEY = os.environ.get("SECRET_KEY", "").strip()
if not SECRET_KEY and SECRET_KEY_FILE.exists():
    SECRET_KEY = SECRET_KEY_FILE.read_text().strip()
if not DEBUG and (
    SECRET_KEY.lower() in KNOWN_DEFAULT_SECRET_KEYS
    or SECRET_KEY.lower().startswith("django-insecure")
    or len(SECRET_KEY) < 32
):
    raise ImproperlyConfigured(
        "SECRET_KEY is missing, too short or a known default. Run `make run` once (it keeps a "
        "generated key in var/secret_key), or set SECRET_KEY to a random string "
        "of at least 32 characters (for example: python3 -c 'import secrets; "
        "print(secrets.token_urlsafe(50))'), or set DEBUG=1 for local development only."
    )
if not SECRET_KEY:
    SECRET_KEY = "django-insecure-baton-debug-only"  # noqa: S105 - only reachable with DEBUG=1

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# --- HTTPS (independent of DEBUG so the demo works over http on loopback) ----------------------
BATON_HTTPS = env_bool("BATON_HTTPS")
SESSION_COOKIE_SECURE = BATON_HTTPS
CSRF_COOKIE_SECURE = BATON_HTTPS
SECURE_SSL_REDIRECT = BATON_HTTPS
SECURE_HSTS_SECONDS = 31_536_000 if BATON_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = BATON_HTTPS
if env_bool("BATON_BEHIND_PROXY"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# --- Applications -----------------------------------------------------------------------------
INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "csp",
    "channels",
    "orchestration",
    "approvals",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "orchestration.ledger.actor.ledger_actor_middleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "approvals.shell.navigation",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------
SQLITE_PATH = VAR_DIR / "baton.sqlite3"
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"])}
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    # WAL lets readers run beside one writer; IMMEDIATE takes the write lock at BEGIN, so the
    # lock-check-transition pattern cannot deadlock between Daphne and the worker.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
# Connections are kept for a minute and checked before reuse after every request, task and
# step call (a failover or a restart of the server leaves dead connections behind, which are then
# replaced instead of failing the next query).
DATABASES["default"].update(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: channels and Celery -----------------------------------------------------------------
REDIS_SOCKET = VAR_DIR / "redis.sock"
REDIS_URL = os.environ.get("REDIS_URL") or f"unix://{REDIS_SOCKET}"
EMBEDDED_REDIS = not os.environ.get("REDIS_URL")


def celery_broker_url(redis_url: str) -> str:
    """kombu spells a unix-socket Redis ``redis+socket://``; redis-py spells it ``unix://``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 times socket reads out after 5 s, the length of channels-redis's
            # blocking receive, which made idle websockets fail; keep above it.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
            "capacity": 1000,
            "expiry": 30,
        },
    }
}

CELERY_BROKER_URL = celery_broker_url(REDIS_URL)
CELERY_TASK_ACKS_LATE = True  # a task is acknowledged after it ran, so a killed worker loses none
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Publishing gives up quickly: a run is committed before its message is sent, and beat's reaper
# enqueues runs whose message never arrived.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5}
# Unacknowledged messages return to the queue after this; it must exceed the task time limit.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup closes the database connection around every task unless told to reuse
# it; a run advances in many short tasks, so reconnecting each time would dominate.
CELERY_DB_REUSE_MAX = 100
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "sweep-runs": {
        "task": "orchestration.tasks.sweep_runs",
        "schedule": 1.0,
        "options": {"expires": 5.0},
    },
    "worker-heartbeat": {
        "task": "orchestration.tasks.worker_heartbeat",
        "schedule": 10.0,
        "options": {"expires": 10.0},
    },
    "sweep-requests": {
        "task": "approvals.tasks.sweep_requests",
        "schedule": 5.0,
        "options": {"expires": 5.0},
    },
}
# A worker holds a run's lease this long, renewed at every step start and, while a step runs,
# every quarter of it. A run whose worker died is picked up again once its lease expires.
BATON_LEASE_SECONDS = int(os.environ.get("BATON_LEASE_SECONDS", "60"))
# A reviewer's claim on an approval request lapses after this long idle.
BATON_CLAIM_SECONDS = int(os.environ.get("BATON_CLAIM_SECONDS", "600"))
# A worker counts as alive while its last heartbeat is younger than this.
BATON_WORKER_STALE_AFTER = int(os.environ.get("BATON_WORKER_STALE_AFTER", "45"))

# --- Audit ledger: signed checkpoints, verification, retention ---------------------------------
# Checkpoints of the hash chain are signed (HMAC-SHA256) and kept outside the database. Without
# BATON_AUDIT_KEY the key is derived from SECRET_KEY; set it (and keep it) to separate the two.
BATON_AUDIT_KEY = os.environ.get("BATON_AUDIT_KEY", "")
BATON_AUDIT_CHECKPOINT_DIR = Path(
    os.environ.get("BATON_AUDIT_CHECKPOINT_DIR", VAR_DIR / "checkpoints")
)
# Beat verifies the records since the last checkpoint and writes a new one this often.
BATON_AUDIT_CHECKPOINT_MINUTES = float(os.environ.get("BATON_AUDIT_CHECKPOINT_MINUTES", "5"))
# Records older than this are pruned daily (0 keeps them forever). 183 days: the EU AI Act's
# minimum of six months for the logs of high-risk systems.
BATON_AUDIT_RETENTION_DAYS = int(os.environ.get("BATON_AUDIT_RETENTION_DAYS", "183"))
CELERY_BEAT_SCHEDULE["ledger-checkpoint"] = {
    "task": "orchestration.tasks.ledger_checkpoint",
    "schedule": BATON_AUDIT_CHECKPOINT_MINUTES * 60,
    "options": {"expires": BATON_AUDIT_CHECKPOINT_MINUTES * 60},
}
CELERY_BEAT_SCHEDULE["ledger-prune"] = {
    "task": "orchestration.tasks.ledger_prune",
    "schedule": crontab(hour=3, minute=30),
    "options": {"expires": 3600.0},
}

# --- Notifications of new high-risk approval requests ------------------------------------------
BATON_NOTIFY_RISK = int(os.environ.get("BATON_NOTIFY_RISK", "60"))
BATON_BASE_URL = os.environ.get("BATON_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
BATON_WEBHOOK_URLS = env_list("BATON_WEBHOOK_URLS")
BATON_WEBHOOK_SECRET = os.environ.get("BATON_WEBHOOK_SECRET", "")
if BATON_WEBHOOK_URLS and not BATON_WEBHOOK_SECRET:
    raise ImproperlyConfigured("BATON_WEBHOOK_URLS needs BATON_WEBHOOK_SECRET to sign webhooks.")
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "baton@localhost")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_TIMEOUT = 5

# --- Auth ---------------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# --- I18N, static -----------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

# --- Content-Security-Policy: no inline script, no third-party origin -------------------------
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
# Every action passes this gate: the policy gate; "orchestration.gate.AllowAllGate" allows all.
BATON_GATE = os.environ.get("BATON_GATE", "approvals.policy.gate.PolicyGate")
# Who may see and act on runs (roles, and reviewer teams on gated steps and halting); without
# the control plane "orchestration.runs.access.OpenRunAccess" lets every signed-in user.
BATON_RUN_ACCESS = "approvals.access.RunAccess"
