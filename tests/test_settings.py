"""config/settings.py read from the environment: each case imports the real settings in a fresh
process (settings are read once per process), plus in-process checks of the served login page."""

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOOD_KEY = "k" * 50
CLEARED = {
    "DJANGO_SETTINGS_MODULE",
    "DATABASE_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "DEBUG",
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "LOG_LEVEL",
    "PYTHONPATH",
}
DUMP = """
import django, json
django.setup()
from django.conf import settings as s
db = s.DATABASES["default"]
print(json.dumps({
    "DEBUG": s.DEBUG,
    "ENGINE": db["ENGINE"], "NAME": str(db["NAME"]), "HOST": db.get("HOST"),
    "PORT": db.get("PORT"), "OPTIONS": db.get("OPTIONS", {}),
    "HTTPS": [s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT],
    "HSTS": s.SECURE_HSTS_SECONDS,
    "ALLOWED_HOSTS": s.ALLOWED_HOSTS, "CSRF_TRUSTED_ORIGINS": s.CSRF_TRUSTED_ORIGINS,
    "REDIS_URL": s.REDIS_URL, "CELERY_BROKER_URL": s.CELERY_BROKER_URL,
    "CHANNEL_HOSTS": s.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"],
    "CELERY": {k: getattr(s, k) for k in dir(s) if k.startswith("CELERY_TASK")
               or k in ("CELERY_WORKER_PREFETCH_MULTIPLIER", "CELERY_BROKER_TRANSPORT_OPTIONS")},
}))
"""
DB_PROBE = """
import django, json
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    journal = cursor.execute("PRAGMA journal_mode").fetchone()[0]
    busy = cursor.execute("PRAGMA busy_timeout").fetchone()[0]
print(json.dumps({"journal": journal, "busy": busy, "mode": connection.transaction_mode}))
"""


def run_settings(tmp_path, code=DUMP, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("BATON_")}
    env.update(DJANGO_SETTINGS_MODULE="config.settings", BATON_VAR_DIR=str(tmp_path / "var"))
    env.update(env_vars)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def load(tmp_path, code=DUMP, **env_vars):
    result = run_settings(tmp_path, code, **env_vars)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key", [None, "changeme", "django-insecure-" + "x" * 40, "abc"])
def test_weak_secret_key_refuses_to_start_without_debug(tmp_path, key):
    env = {} if key is None else {"SECRET_KEY": key}
    result = run_settings(tmp_path, **env)
    assert result.returncode != 0
    assert "SECRET_KEY is missing, too short or a known default" in result.stderr


def test_debug_starts_without_secret_key(tmp_path):
    assert load(tmp_path, DEBUG="1")["DEBUG"] is True


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("true", True), ("0", False), ("false", False)]
)
def test_debug_parses_booleans(tmp_path, raw, expected):
    assert load(tmp_path, DEBUG=raw, SECRET_KEY=GOOD_KEY)["DEBUG"] is expected


def test_debug_rejects_non_boolean(tmp_path):
    result = run_settings(tmp_path, DEBUG="maybe", SECRET_KEY=GOOD_KEY)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "DEBUG='maybe' is not a boolean" in result.stderr


def test_https_turns_on_secure_cookies_redirect_and_hsts_without_debug(tmp_path):
    values = load(tmp_path, BATON_HTTPS="1", DEBUG="0", SECRET_KEY=GOOD_KEY)
    assert values["HTTPS"] == [True, True, True]
    assert values["HSTS"] > 0


@pytest.mark.parametrize("debug", ["0", "1"])
def test_https_off_by_default_whatever_debug(tmp_path, debug):
    values = load(tmp_path, DEBUG=debug, SECRET_KEY=GOOD_KEY)
    assert values["HTTPS"] == [False, False, False]
    assert values["HSTS"] == 0


def test_host_and_origin_lists_from_env(tmp_path):
    values = load(
        tmp_path,
        SECRET_KEY=GOOD_KEY,
        ALLOWED_HOSTS="a.example, b.example",
        CSRF_TRUSTED_ORIGINS="https://a.example, https://b.example,",
    )
    assert values["ALLOWED_HOSTS"] == ["a.example", "b.example"]
    assert values["CSRF_TRUSTED_ORIGINS"] == ["https://a.example", "https://b.example"]


def test_embedded_sqlite_in_var_dir_with_wal_immediate_and_busy_timeout(tmp_path):
    values = load(tmp_path, SECRET_KEY=GOOD_KEY)
    assert values["ENGINE"] == "django.db.backends.sqlite3"
    assert Path(values["NAME"]).parent == tmp_path / "var"
    assert values["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert values["OPTIONS"]["timeout"] > 0
    probe = load(tmp_path, DB_PROBE, SECRET_KEY=GOOD_KEY)
    assert probe["journal"] == "wal"
    assert probe["mode"] == "IMMEDIATE"
    assert probe["busy"] == values["OPTIONS"]["timeout"] * 1000
    assert Path(values["NAME"]).exists()


def test_database_url_selects_postgresql(tmp_path):
    url = "postgres://u:p@db.example:5433/baton"
    values = load(tmp_path, SECRET_KEY=GOOD_KEY, DATABASE_URL=url)
    assert values["ENGINE"] == "django.db.backends.postgresql"
    assert (values["HOST"], values["PORT"], values["NAME"]) == ("db.example", 5433, "baton")


def test_embedded_redis_socket_in_var_dir(tmp_path):
    values = load(tmp_path, SECRET_KEY=GOOD_KEY)
    sock = tmp_path / "var" / "redis.sock"
    assert values["REDIS_URL"] == f"unix://{sock}"
    assert values["CELERY_BROKER_URL"] == f"redis+socket://{sock}"
    assert values["CHANNEL_HOSTS"] == [{"address": f"unix://{sock}", "socket_timeout": 15}]


def test_redis_url_used_by_celery_and_channels(tmp_path):
    url = "redis://127.0.0.1:6379/3"
    values = load(tmp_path, SECRET_KEY=GOOD_KEY, REDIS_URL=url)
    assert values["REDIS_URL"] == values["CELERY_BROKER_URL"] == url
    assert values["CHANNEL_HOSTS"] == [{"address": url, "socket_timeout": 15}]


def test_celery_is_configured_for_durable_delivery(tmp_path):
    celery = load(tmp_path, SECRET_KEY=GOOD_KEY)["CELERY"]
    assert celery["CELERY_TASK_ACKS_LATE"] is True
    assert celery["CELERY_TASK_REJECT_ON_WORKER_LOST"] is True
    assert celery["CELERY_WORKER_PREFETCH_MULTIPLIER"] == 1
    assert 0 < celery["CELERY_TASK_SOFT_TIME_LIMIT"] < celery["CELERY_TASK_TIME_LIMIT"]
    visibility = celery["CELERY_BROKER_TRANSPORT_OPTIONS"]["visibility_timeout"]
    assert visibility > celery["CELERY_TASK_TIME_LIMIT"]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts, self.stylesheets = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs)
        elif tag == "link" and "stylesheet" in (attrs.get("rel") or "").split():
            self.stylesheets.append(attrs["href"])


def _login_page(client):
    response = client.get("/login/")
    assert response.status_code == 200
    tags = _Tags()
    tags.feed(response.content.decode())
    return response, tags


@pytest.mark.django_db
def test_login_page_has_strict_csp_and_no_inline_script(client):
    response, tags = _login_page(client)
    csp = response.headers["Content-Security-Policy"]
    assert re.search(r"(^|;)\s*script-src 'self'\s*(;|$)", csp), csp
    assert "unsafe-inline" not in csp
    assert tags.scripts, "expected at least the htmx script"
    assert all(script.get("src") for script in tags.scripts), tags.scripts


@pytest.mark.django_db
def test_login_page_stylesheet_is_served(client):
    # The test client runs the full middleware stack, so WhiteNoise (WHITENOISE_USE_FINDERS in
    # tests/settings.py) serves the file exactly as Daphne would.
    _, tags = _login_page(client)
    assert tags.stylesheets
    for href in tags.stylesheets:
        response = client.get(href)
        assert response.status_code == 200, href
        assert response["Content-Type"].startswith("text/css")
        assert b"".join(response.streaming_content if response.streaming else [response.content])


def test_the_key_make_run_keeps_in_var_is_used_when_secret_key_is_unset(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "secret_key").write_text("kept-" + "x" * 40 + "\n")
    code = (
        "import django; django.setup(); "
        "from django.conf import settings; print(settings.SECRET_KEY)"
    )
    result = run_settings(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kept-" + "x" * 40
    assert (
        run_settings(tmp_path, code, SECRET_KEY="env-" + "y" * 40).stdout.strip()
        == "env-" + "y" * 40
    )
