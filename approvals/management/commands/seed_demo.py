from django.core.management.base import BaseCommand

from approvals.demo import demo_seed


class Command(BaseCommand):
    help = "Create the demo users (one per role and a superuser). Safe to run again."

    def handle(self, *args, **options) -> None:
        logins = demo_seed()
        self.stdout.write("Demo logins:")
        for login in logins:
            password = login.password or "(unchanged; set it with manage.py changepassword)"
            self.stdout.write(f"  {login.role:<13} {login.username:<9} {password}")
