"""Demo tools. Each acts on the demo tables and drops a repeated call with the same
idempotency key (the step's), returning what the first call did."""

import re
from datetime import date, timedelta
from decimal import Decimal

from django.db import transaction

from orchestration.demo.models import Booking, Email, Hotel, InfraChange, Order, Refund
from orchestration.engine.errors import NonRetryable
from orchestration.registry.declare import tool


def _order_record(order: Order) -> dict:
    return {
        "order_id": order.order_id,
        "customer_name": order.customer_name,
        "customer_email": order.customer_email,
        "item": order.item,
        "amount": float(order.amount),
        "status": order.status,
        "refunded": float(sum(r.amount for r in order.refunds.all())),
    }


@tool(
    "orders.lookup",
    side_effect="read",
    labels_produced=("pii",),
    target="order_id",
    data_subject="customer_email",
    schema={
        "type": "object",
        "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]-[0-9]{4}$"}},
        "required": ["order_id"],
        "additionalProperties": False,
    },
)
def orders_lookup(*, order_id: str, idempotency_key: str) -> dict:
    """Look up an order: customer, item, amount paid and refunds so far."""
    order = Order.objects.filter(order_id=order_id).first()
    if order is None:
        raise NonRetryable(f"no order {order_id}")
    return _order_record(order)


@tool(
    "payments.refund",
    side_effect="payment",
    impact=3,
    reversible=False,
    labels_read=("financial",),
    labels_produced=("financial",),
    target="order_id",
    schema={
        "type": "object",
        "properties": {
            "order_id": {"type": "string"},
            "amount": {"type": "number", "exclusiveMinimum": 0},
            "reason": {"type": "string"},
        },
        "required": ["order_id", "amount"],
        "additionalProperties": False,
    },
)
def payments_refund(*, order_id: str, amount: float, reason: str = "", idempotency_key: str):
    """Refund money to the customer's card. Irreversible."""
    with transaction.atomic():
        existing = Refund.objects.filter(idempotency_key=idempotency_key).first()
        if existing is None:
            order = Order.objects.select_for_update().filter(order_id=order_id).first()
            if order is None:
                raise NonRetryable(f"no order {order_id}")
            refunded = sum(r.amount for r in order.refunds.all())
            if Decimal(str(amount)) + refunded > order.amount:
                raise NonRetryable(
                    f"refund of {amount} exceeds what is left on {order_id} "
                    f"({order.amount - refunded})"
                )
            existing = Refund.objects.create(
                order=order,
                amount=Decimal(str(amount)),
                reason=reason,
                idempotency_key=idempotency_key,
            )
    return {"refund_id": existing.pk, "order_id": order_id, "amount": float(existing.amount)}


@tool(
    "email.send",
    side_effect="external_send",
    target="to",
    impact=2,
    reversible=False,
    schema={
        "type": "object",
        "properties": {
            "to": {"type": "string", "format": "email", "pattern": "^[^@\\s]+@[^@\\s]+$"},
            "subject": {"type": "string", "minLength": 1},
            "body": {"type": "string"},
        },
        "required": ["to", "subject", "body"],
        "additionalProperties": False,
    },
)
def email_send(*, to: str, subject: str, body: str, idempotency_key: str) -> dict:
    """Send an email to a customer or partner. Leaves the company."""
    email, _ = Email.objects.get_or_create(
        idempotency_key=idempotency_key, defaults={"to": to, "subject": subject, "body": body}
    )
    return {"email_id": email.pk, "to": email.to}


CITY_RE = re.compile(r"\b(?:near|in|around)\s+([A-Z][a-zà-ú]+)")
PRICE_RE = re.compile(r"(?:under|below|max(?:imum)?|less than)\s*(?:€|\$|EUR)?\s*(\d+)")
MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]


@tool(
    "travel.parse_request",
    side_effect="read",
    schema={
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 3}},
        "required": ["text"],
    },
)
def travel_parse_request(*, text: str, idempotency_key: str) -> dict:
    """Read a free-text hotel request into criteria: city, price cap, dates, quiet, beach."""
    lowered = text.lower()
    city = CITY_RE.search(text)
    price = PRICE_RE.search(lowered)
    month = next((i + 1 for i, m in enumerate(MONTHS) if m in lowered), 10)
    week = 1 if "first week" in lowered else 2 if "second week" in lowered else 1
    check_in = date(2027, month, 1 + 7 * (week - 1))
    return {
        "city": city.group(1) if city else "Lisbon",
        "max_price": int(price.group(1)) if price else 250,
        "check_in": check_in.isoformat(),
        "nights": 7 if "week" in lowered else 3,
        "quiet": "quiet" in lowered,
        "beach": "beach" in lowered,
    }


@tool(
    "travel.search_hotels",
    side_effect="read",
    schema={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "max_price": {"type": "number"},
            "quiet": {"type": "boolean"},
            "beach": {"type": "boolean"},
        },
        "required": ["city", "max_price"],
    },
)
def travel_search_hotels(
    *, city: str, max_price: float, quiet: bool = False, beach: bool = False, idempotency_key: str
) -> list[dict]:
    """Search hotels in and around a city under a nightly price."""
    hotels = Hotel.objects.filter(city__iexact=city, price_per_night__lte=max_price)
    if quiet:
        hotels = hotels.filter(quiet=True)
    if beach:
        hotels = hotels.filter(beach_km__lte=1.0)
    return [
        {
            "name": h.name,
            "area": h.area,
            "price": float(h.price_per_night),
            "rating": h.rating,
            "beach_km": h.beach_km,
            "quiet": h.quiet,
        }
        for h in hotels.order_by("name")
    ]


@tool(
    "travel.check_availability",
    side_effect="read",
    schema={
        "type": "object",
        "properties": {
            "hotel": {"type": "string"},
            "check_in": {"type": "string", "format": "date"},
            "nights": {"type": "integer", "minimum": 1},
        },
        "required": ["hotel", "check_in", "nights"],
    },
)
def travel_check_availability(
    *, hotel: str, check_in: str, nights: int, idempotency_key: str
) -> dict:
    """Check whether a hotel has a room for the dates."""
    found = Hotel.objects.filter(name=hotel).first()
    if found is None:
        raise NonRetryable(f"no hotel {hotel}")
    return {"hotel": hotel, "available": found.rooms_left > 0, "rooms_left": found.rooms_left}


@tool(
    "travel.book",
    side_effect="payment",
    impact=2,
    reversible=True,
    compensating_tool="travel.cancel",
    labels_read=("pii",),
    target="hotel",
    schema={
        "type": "object",
        "properties": {
            "hotel": {"type": "string"},
            "guest": {"type": "string", "minLength": 1},
            "check_in": {"type": "string", "format": "date"},
            "nights": {"type": "integer", "minimum": 1, "maximum": 30},
        },
        "required": ["hotel", "guest", "check_in", "nights"],
        "additionalProperties": False,
    },
)
def travel_book(*, hotel: str, guest: str, check_in: str, nights: int, idempotency_key: str):
    """Book and pay for a hotel room."""
    with transaction.atomic():
        booking = Booking.objects.filter(idempotency_key=idempotency_key).first()
        if booking is None:
            found = Hotel.objects.select_for_update().filter(name=hotel).first()
            if found is None or found.rooms_left == 0:
                raise NonRetryable(f"{hotel} has no room left")
            found.rooms_left -= 1
            found.save(update_fields=["rooms_left"])
            booking = Booking.objects.create(
                hotel=found,
                guest=guest,
                check_in=date.fromisoformat(check_in),
                nights=nights,
                idempotency_key=idempotency_key,
            )
    checkout = booking.check_in + timedelta(days=booking.nights)
    return {
        "booking_id": booking.pk,
        "hotel": hotel,
        "check_in": check_in,
        "check_out": checkout.isoformat(),
        "guest": guest,
    }


@tool(
    "infra.diagnostics",
    side_effect="read",
    schema={
        "type": "object",
        "properties": {"service": {"type": "string"}},
        "required": ["service"],
    },
)
def infra_diagnostics(*, service: str, idempotency_key: str) -> dict:
    """Read-only health of a production service: latency, errors, disk."""
    seed = sum(map(ord, service))
    return {
        "service": service,
        "p95_ms": 180 + seed % 400,
        "error_rate": round((seed % 7) / 100, 2),
        "disk_used_pct": 70 + seed % 29,
        "slow_query": "SELECT * FROM invoices WHERE customer_id = ?",
    }


@tool(
    "infra.describe_volume",
    side_effect="read",
    labels_produced=("secret",),
    schema={
        "type": "object",
        "properties": {"volume": {"type": "string", "pattern": "^vol-[a-z0-9]+$"}},
        "required": ["volume"],
    },
)
def infra_describe_volume(*, volume: str, idempotency_key: str) -> dict:
    """Describe a storage volume, including its attachment and the credentials on it."""
    return {
        "volume": volume,
        "attached": False,
        "size_gb": 500,
        "last_write": "2026-09-14",
        "contains": "database backups (snapshots with connection strings)",
    }


@tool(
    "infra.run_migration",
    side_effect="privilege",
    target="service",
    impact=4,
    reversible=False,
    schema={
        "type": "object",
        "properties": {"service": {"type": "string"}, "migration": {"type": "string"}},
        "required": ["service", "migration"],
        "additionalProperties": False,
    },
)
def infra_run_migration(*, service: str, migration: str, idempotency_key: str) -> dict:
    """Apply a schema migration to a production database. Irreversible."""
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=idempotency_key,
        defaults={"kind": "migration", "target": service, "detail": migration},
    )
    return {"change_id": change.pk, "applied": migration, "service": service}


@tool(
    "infra.delete_volume",
    side_effect="delete",
    target="volume",
    impact=4,
    reversible=False,
    schema={
        "type": "object",
        "properties": {"volume": {"type": "string", "pattern": "^vol-[a-z0-9]+$"}},
        "required": ["volume"],
        "additionalProperties": False,
    },
)
def infra_delete_volume(*, volume: str, idempotency_key: str) -> dict:
    """Delete a storage volume and everything on it. Irreversible."""
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=idempotency_key, defaults={"kind": "delete_volume", "target": volume}
    )
    return {"change_id": change.pk, "deleted": volume}
