"""Account events recorded in the ledger from day one: logins (and failed attempts), logouts,
role changes (group membership, staff and superuser flags)."""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db import transaction
from django.db.models.signals import m2m_changed, post_save, pre_save

from orchestration.ledger.chain import ledger_append

FLAGS = ("is_superuser", "is_staff", "is_active")


def _client_ip(request) -> str:
    return request.META.get("REMOTE_ADDR", "") if request is not None else ""


def on_login(sender, request, user, **kwargs) -> None:
    with transaction.atomic():
        ledger_append(
            "account.login", actor=user, user_id=user.pk, payload={"ip": _client_ip(request)}
        )


def on_logout(sender, request, user, **kwargs) -> None:
    if user is None:
        return
    with transaction.atomic():
        ledger_append(
            "account.logout", actor=user, user_id=user.pk, payload={"ip": _client_ip(request)}
        )


def on_login_failed(sender, credentials, request=None, **kwargs) -> None:
    username = str(credentials.get("username", ""))[:150]
    with transaction.atomic():
        ledger_append(
            "account.login_failed",
            actor="anonymous",
            payload={"username": username.replace("\x00", ""), "ip": _client_ip(request)},
        )


def on_groups_changed(sender, instance, action, reverse, pk_set, **kwargs) -> None:
    """``user.groups.add(g)`` arrives with the user as instance; ``group.user_set.add(u)`` with
    the group. ``clear()`` gives no ids after the fact, so they are captured before it."""
    if action == "pre_clear":
        related = instance.user_set if reverse else instance.groups
        instance._baton_cleared = set(related.values_list("pk", flat=True))
        return
    if action not in {"post_add", "post_remove", "post_clear"}:
        return
    ids = instance.__dict__.pop("_baton_cleared", set()) if action == "post_clear" else pk_set
    verb = "account.role_granted" if action == "post_add" else "account.role_revoked"
    User = get_user_model()
    if reverse:  # instance is a Group, ids are users
        pairs = [(user, instance) for user in User.objects.filter(pk__in=ids)]
    else:
        pairs = [(instance, group) for group in Group.objects.filter(pk__in=ids)]
    with transaction.atomic():
        for user, group in pairs:
            ledger_append(
                verb,
                user_id=user.pk,
                payload={"user": user.get_username(), "role": group.name},
            )


def remember_flags(sender, instance, update_fields=None, **kwargs) -> None:
    if update_fields is not None and not set(FLAGS) & set(update_fields):
        instance._baton_flags = None  # e.g. last_login on every login: nothing to compare
        return
    if instance.pk is None:
        instance._baton_flags = None
        return
    old = sender.objects.filter(pk=instance.pk).values(*FLAGS).first()
    instance._baton_flags = old


def record_flag_changes(sender, instance, created, **kwargs) -> None:
    old = instance.__dict__.pop("_baton_flags", None)
    new = {flag: getattr(instance, flag) for flag in FLAGS}
    if created:
        changes = {flag: value for flag, value in new.items() if value and flag != "is_active"}
        verb = "account.created"
    else:
        if old is None:
            return
        changes = {flag: value for flag, value in new.items() if old[flag] != value}
        verb = "account.flags_changed"
    if not changes and not created:
        return
    with transaction.atomic():
        ledger_append(
            verb, user_id=instance.pk, payload={"user": instance.get_username(), **changes}
        )


def connect_signals() -> None:
    User = get_user_model()
    user_logged_in.connect(on_login, dispatch_uid="baton.login")
    user_logged_out.connect(on_logout, dispatch_uid="baton.logout")
    user_login_failed.connect(on_login_failed, dispatch_uid="baton.login_failed")
    m2m_changed.connect(on_groups_changed, sender=User.groups.through, dispatch_uid="baton.groups")
    pre_save.connect(remember_flags, sender=User, dispatch_uid="baton.flags_pre")
    post_save.connect(record_flag_changes, sender=User, dispatch_uid="baton.flags_post")
