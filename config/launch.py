"""``make run``: prepare the embedded demo, then start every Procfile process with honcho.

Keeps a generated secret key in ``var/secret_key`` (git-ignored), migrates, collects static files,
seeds the demo (idempotent) and prints the address and the demo logins."""

import os
import secrets
import shutil
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def ensure_secret_key(var_dir: Path) -> None:
    key_file = var_dir / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    var_dir = Path(os.environ.get("BATON_VAR_DIR", BASE_DIR / "var"))
    var_dir.mkdir(parents=True, exist_ok=True)
    ensure_secret_key(var_dir)  # config.settings reads it unless SECRET_KEY is set

    import django
    from django.conf import settings
    from django.core.management import CommandError, call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)
    call_command("seed_demo")
    try:  # the audit pages show this check until beat's periodic one replaces it
        call_command("audit_verify")
    except CommandError as broken:  # start anyway: auditors need the pages to look into it
        print(f"WARNING: {broken}", file=sys.stderr, flush=True)

    port = os.environ.get("PORT", "8000")
    processes = [] if settings.EMBEDDED_REDIS else ["web", "worker", "beat"]
    print(f"\nBaton is starting at http://127.0.0.1:{port}/  (Ctrl-C stops it)\n", flush=True)
    bin_dir = str(Path(sys.executable).parent)  # the Procfile's commands live beside this python
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    honcho = shutil.which("honcho", path=bin_dir) or "honcho"
    command = [honcho, "start", "-d", str(BASE_DIR), "-f", str(BASE_DIR / "Procfile")]
    command += ["-p", port, *processes]
    os.execv(honcho, command)  # noqa: S606


if __name__ == "__main__":
    main()
