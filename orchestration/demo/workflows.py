"""The three demo workflows. Their timelines should read like a story a reviewer can follow."""

from orchestration.canonical import canonical_json
from orchestration.engine.errors import ActionDenied, ActionRejected
from orchestration.registry.declare import workflow

INFRA_TOOLS = [
    "infra.diagnostics",
    "infra.describe_volume",
    "infra.run_migration",
    "infra.delete_volume",
]
REFUND_DECISION = {
    "type": "object",
    "properties": {
        "amount": {"type": "number", "minimum": 0},
        "rationale": {"type": "string"},
    },
    "required": ["amount", "rationale"],
}


@workflow(
    "customer_refund",
    version=1,
    tools=["orders.lookup", "payments.refund", "email.send"],
    input_schema={
        "type": "object",
        "title": "Customer refund",
        "properties": {
            "order_id": {
                "type": "string",
                "title": "Order",
                "pattern": "^[A-Z]-[0-9]{4}$",
                "default": "A-1001",
            },
            "reason": {
                "type": "string",
                "title": "Customer's reason",
                "minLength": 3,
                "default": "The blender arrived broken.",
            },
        },
        "required": ["order_id", "reason"],
    },
)
def customer_refund(ctx, order_id: str, reason: str) -> dict:
    """Look up the order, read the refund policy, decide, refund, and tell the customer."""
    ctx.progress(0.1, "Looking up the order")
    order = ctx.tool(
        "orders.lookup",
        order_id=order_id,
        _reasoning="I need the order to see what the customer paid and what was refunded.",
        _confidence=0.95,
    )
    ctx.progress(0.3, "Reading the refund policy")
    policy = ctx.retrieve(f"refund policy {reason}", k=2, source="policies")
    ctx.progress(0.5, "Deciding")
    decision = ctx.llm(
        [
            {"role": "system", "content": "You decide customer refunds strictly by the policy."},
            {
                "role": "user",
                "content": f"Order: {canonical_json(order)}\n"
                f"Policy: {' '.join(s['text'] for s in policy)}\n"
                f"Customer's reason: {reason}\n"
                "Decide the refund amount and explain why.",
            },
        ],
        output_schema=REFUND_DECISION,
        name="decide refund",
    )
    amount = round(float(decision["amount"]), 2)
    left = round(order["amount"] - order["refunded"], 2)
    ctx.check(
        "refund within what was paid",
        0 < amount <= left,
        detail=f"refund {amount} of {left} left on {order_id}",
    )
    ctx.progress(0.7, "Refunding")
    try:
        refund = ctx.tool(
            "payments.refund",
            order_id=order_id,
            amount=amount,
            reason=reason,
            _reasoning=decision["rationale"],
            _confidence=0.8,
        )
    except (ActionDenied, ActionRejected) as refused:
        ctx.tool(
            "email.send",
            to=order["customer_email"],
            subject=f"Your refund request for {order_id}",
            body=f"Dear {order['customer_name']}, we could not refund automatically "
            f"({refused.reason}). A colleague will contact you.",
            _reasoning="The refund was not allowed; the customer should hear from us.",
        )
        return {"refunded": 0, "note": refused.reason}
    ctx.progress(0.9, "Telling the customer")
    done = {"refunded": refund["amount"], "refund_id": refund["refund_id"]}
    try:
        ctx.tool(
            "email.send",
            to=order["customer_email"],
            subject=f"Your refund for {order_id}",
            body=f"Dear {order['customer_name']}, we refunded {refund['amount']:.2f} EUR "
            f"for {order['item']}.",
            _reasoning="Confirm the refund to the customer.",
            _confidence=0.9,
        )
    except (ActionDenied, ActionRejected) as refused:  # the refund stands; no email goes out
        return {**done, "customer_emailed": False, "note": refused.reason}
    return {**done, "customer_emailed": True}


@workflow(
    "travel_booking",
    version=1,
    tools=[
        "travel.parse_request",
        "travel.search_hotels",
        "travel.check_availability",
        "travel.book",
    ],
    input_schema={
        "type": "object",
        "title": "Travel booking",
        "properties": {
            "request": {
                "type": "string",
                "title": "Request",
                "minLength": 10,
                "default": "a quiet beach hotel near Lisbon, first week of October, "
                "under 200 a night",
            },
            "guest": {"type": "string", "title": "Guest", "minLength": 1, "default": "Ana Silva"},
        },
        "required": ["request", "guest"],
    },
)
def travel_booking(ctx, request: str, guest: str) -> dict:
    """Parse a free-text request, search, rank, check availability (rerouting to alternatives
    when a check fails), shortlist, ask the customer, and book only after the pick."""
    criteria = ctx.tool(
        "travel.parse_request", text=request, _reasoning="Turn the request into search criteria."
    )
    ctx.progress(0.2, "Searching hotels")
    hotels = ctx.tool(
        "travel.search_hotels",
        city=criteria["city"],
        max_price=criteria["max_price"],
        quiet=criteria["quiet"],
        beach=criteria["beach"],
        _reasoning=f"Search {criteria['city']} under {criteria['max_price']} a night.",
    )
    if not hotels and criteria["quiet"]:
        hotels = ctx.tool(
            "travel.search_hotels",
            city=criteria["city"],
            max_price=criteria["max_price"],
            beach=criteria["beach"],
            _reasoning="Nothing quiet matched; widen the search to any beach hotel.",
        )
    ranked = sorted(hotels, key=lambda h: (-h["rating"], h["price"], h["beach_km"]))
    ctx.progress(0.4, "Checking availability")
    shortlist = []
    for hotel in ranked:
        availability = ctx.tool(
            "travel.check_availability",
            hotel=hotel["name"],
            check_in=criteria["check_in"],
            nights=criteria["nights"],
            _reasoning=f"{hotel['name']} ranks well; is a room free for the dates?",
        )
        if ctx.check(
            f"{hotel['name']} available",
            availability["available"],
            detail="rerouting to the next alternative" if not availability["available"] else "",
            continue_on_fail=True,
        ):
            shortlist.append(hotel)
        if len(shortlist) == 3:
            break
    ctx.check("shortlist found", bool(shortlist), detail=f"{len(shortlist)} hotel(s)")
    summary = ctx.llm(
        [
            {"role": "system", "content": "You write short, friendly hotel shortlists."},
            {
                "role": "user",
                "content": f"Request: {request}\nShortlist: "
                f"{canonical_json(shortlist)}\nSummarise the options for {guest}.",
            },
        ],
        name="summarise shortlist",
    )["text"]
    ctx.progress(0.7, "Waiting for the customer's pick")
    pick = ctx.ask_human(
        f"{guest} asked for: {request}. {summary} Which hotel should we book?",
        choices=[h["name"] for h in shortlist],
        about={"guest": guest},
    )
    ctx.progress(0.9, "Booking")
    booking = ctx.tool(
        "travel.book",
        hotel=pick,
        guest=guest,
        check_in=criteria["check_in"],
        nights=criteria["nights"],
        _reasoning=f"The customer picked {pick}.",
        _confidence=0.9,
    )
    return {"booking": booking}


@workflow(
    "infra_change",
    version=1,
    tools=INFRA_TOOLS,
    input_schema={
        "type": "object",
        "title": "Infrastructure change",
        "properties": {
            "goal": {
                "type": "string",
                "title": "Goal",
                "minLength": 5,
                "default": "Invoices are slow: add the missing index and free the disk "
                "taken by the old backup volume.",
            },
            "service": {"type": "string", "title": "Service", "default": "billing"},
            "migration": {
                "type": "string",
                "title": "Migration",
                "default": "0042_invoice_customer_index",
            },
            "volume": {"type": "string", "title": "Volume", "default": "vol-7f3a"},
        },
        "required": ["goal", "service"],
    },
)
def infra_change(ctx, goal: str, service: str, migration: str = "", volume: str = "") -> dict:
    """An agent plans, runs read-only diagnostics and proposes irreversible production changes."""
    ctx.progress(0.1, "Planning")
    facts = f"service: {service}\nmigration: {migration}\nvolume: {volume}"
    answer = ctx.agent("infra-agent", goal=f"{goal}\n{facts}", tools=INFRA_TOOLS, max_steps=6)
    return {"summary": answer}
