"""What the PostgreSQL + Redis benchmarks check before Django reads its settings."""

import os
import sys
from urllib.parse import urlsplit


def require_services(script: str, *, redis_example: str) -> None:
    """Exit with a clear message unless DATABASE_URL (PostgreSQL) and REDIS_URL are set and
    answering."""

    def refuse(message: str) -> None:
        sys.exit(f"{script}: {message}")

    database_url = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL", "")
    if urlsplit(database_url).scheme not in {"postgres", "postgresql"}:
        refuse(
            "set DATABASE_URL to a PostgreSQL server, e.g. "
            "DATABASE_URL=postgres://postgres@127.0.0.1:5432/baton"
        )
    if urlsplit(redis_url).scheme not in {"redis", "rediss", "unix"}:
        refuse(f"set REDIS_URL to a Redis server, e.g. REDIS_URL={redis_example}")
    import psycopg
    import redis

    try:
        with psycopg.connect(database_url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        refuse(f"PostgreSQL at DATABASE_URL is not answering: {exc}")
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        refuse(f"Redis at REDIS_URL is not answering: {exc}")
