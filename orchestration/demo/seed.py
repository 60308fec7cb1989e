"""Demo data: orders, hotels, documents, three agents and a few runs. Idempotent."""

from decimal import Decimal

from django.db import transaction

from orchestration.demo.models import Hotel, Order
from orchestration.registry.models import Agent, Autonomy, Tool
from orchestration.retrieval.models import Document
from orchestration.retrieval.services import document_add
from orchestration.runs.models import Run

ORDERS = [
    ("A-1001", "Cam Rivera", "cam@example.com", "Blender", "89.00"),
    ("A-1002", "Dana Okafor", "dana@example.org", "Espresso machine", "649.00"),
    ("A-1003", "Eli Novak", "eli@example.net", "Noise-cancelling headphones", "219.00"),
    ("A-1004", "Fatima Zahra", "fatima@example.com", "Laptop", "1899.00"),
    ("A-1005", "Gus Lind", "gus@example.org", "Desk lamp", "45.00"),
]

HOTELS = [
    # name, area, beach km, quiet, rating, price, rooms left
    ("Casa do Mar", "Cascais", 0.3, True, 4.7, "185.00", 0),
    ("Quinta da Praia", "Comporta", 0.5, True, 4.6, "170.00", 4),
    ("Hotel Maré Serena", "Costa da Caparica", 0.2, True, 4.4, "140.00", 2),
    ("Estoril Palace Suites", "Estoril", 0.4, False, 4.5, "240.00", 5),
    ("Sintra Hills Lodge", "Sintra", 9.0, True, 4.8, "160.00", 3),
    ("Baixa Central", "Baixa", 6.0, False, 4.1, "120.00", 8),
]

DOCUMENTS = [
    (
        "policies",
        "Refund policy",
        "Refunds are allowed within 30 days of delivery when an item arrives broken, "
        "defective or not as described. Refund the full amount paid for the item.\n\n"
        "Refunds above 500 EUR must be approved by a finance reviewer before they are issued. "
        "Never refund more than the customer paid.\n\n"
        "Change-of-mind returns are refunded only after the item is back in the warehouse.",
    ),
    (
        "policies",
        "Customer email policy",
        "Emails to customers are sent from support and never include card numbers, "
        "internal notes or other customers' data. Confirm every refund by email.",
    ),
    (
        "runbooks",
        "Billing database runbook",
        "Slow invoice queries usually mean a missing index on invoices.customer_id. "
        "Schema migrations on billing run in the maintenance window and need a second "
        "engineer's approval.\n\nVolumes holding backups must be kept 90 days. Deleting a "
        "volume is irreversible; confirm it is detached and its snapshots are verified first.",
    ),
    (
        "travel",
        "Travel policy",
        "Book the hotel the customer picked from the shortlist we sent them, for the guest who "
        "asked, within their nightly budget. A booking the customer did not pick needs a "
        "reviewer's approval first, and so does a stay longer than 14 nights or a second "
        "booking for one request.",
    ),
]

AGENTS = [
    (
        "refund-bot",
        "You handle customer refund requests by the refund policy.",
        ["orders.lookup", "payments.refund", "email.send"],
    ),
    (
        "travel-agent",
        "You book travel for customers within their budget.",
        [
            "travel.parse_request",
            "travel.search_hotels",
            "travel.check_availability",
            "travel.book",
        ],
    ),
    (
        "infra-agent",
        "You keep production services healthy. Diagnose before you change "
        "anything; propose changes with your reasoning.",
        [
            "infra.diagnostics",
            "infra.describe_volume",
            "infra.run_migration",
            "infra.delete_volume",
        ],
    ),
]

FIRST_RUNS = [
    (
        "customer_refund",
        "refund-bot",
        {"order_id": "A-1002", "reason": "The espresso machine arrived broken."},
        "Refund a broken espresso machine",
    ),
    (
        "travel_booking",
        "travel-agent",
        {
            "request": "a quiet beach hotel near Lisbon, first week of October, under 200 a night",
            "guest": "Ana Silva",
        },
        "Book a quiet beach hotel",
    ),
    (
        "infra_change",
        None,
        {
            "goal": "Invoices are slow: add the missing index and free the "
            "disk taken by the old backup volume.",
            "service": "billing",
            "migration": "0042_invoice_customer_index",
            "volume": "vol-7f3a",
        },
        "Speed up invoices",
    ),
]


def demo_data_seed(*, owner=None) -> list[Agent]:
    with transaction.atomic():
        for order_id, name, email, item, amount in ORDERS:
            Order.objects.get_or_create(
                order_id=order_id,
                defaults={
                    "customer_name": name,
                    "customer_email": email,
                    "item": item,
                    "amount": Decimal(amount),
                },
            )
        for name, area, beach_km, quiet, rating, price, rooms in HOTELS:
            Hotel.objects.get_or_create(
                name=name,
                defaults={
                    "city": "Lisbon",
                    "area": area,
                    "beach_km": beach_km,
                    "quiet": quiet,
                    "rating": rating,
                    "price_per_night": Decimal(price),
                    "rooms_left": rooms,
                },
            )
        for source, title, body in DOCUMENTS:
            if not Document.objects.filter(source=source, title=title).exists():
                document_add(source=source, title=title, body=body)
        agents = []
        for name, description, tools in AGENTS:
            agent, created = Agent.objects.get_or_create(
                name=name,
                defaults={
                    "description": description,
                    "owner": owner,
                    "autonomy": Autonomy.SUPERVISED,
                },
            )
            if created:
                agent.tools.set(Tool.objects.filter(name__in=tools))
            agents.append(agent)
    return agents


def demo_runs_seed(*, started_by=None) -> list[Run]:
    """Start the first runs, once, so the dashboard is alive on first open."""
    from orchestration.runs.services import run_start

    if Run.objects.exists():
        return []
    return [
        run_start(
            workflow=workflow, input=data, agent=agent, started_by=started_by, intent={"goal": goal}
        )
        for workflow, agent, data, goal in FIRST_RUNS
    ]
