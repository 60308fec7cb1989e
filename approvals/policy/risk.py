"""The risk score: 0-100 from named factors, each with its contribution."""

from typing import Any

import cel

from approvals.policy.cel import EvaluationError, evaluate

SIDE_EFFECT_POINTS = {
    "read": 0,
    "write": 10,
    "delete": 20,
    "external_send": 15,
    "payment": 20,
    "privilege": 25,
    "other": 10,
}
IMPACT_POINTS = 6  # per level, 0-4
IRREVERSIBLE_POINTS = 15
LABEL_POINTS = {"secret": 25, "pii": 10, "untrusted_input": 10, "financial": 5}


def risk_score(data: dict[str, Any], policy, ctx: cel.Context) -> tuple[list[dict], int]:
    tool = data["tool"]
    factors: list[dict[str, Any]] = []

    def add(name: str, points: int, detail: str = "") -> None:
        if points:
            factors.append({"name": name, "points": points, "detail": detail})

    add("side effect", SIDE_EFFECT_POINTS.get(tool["side_effect"], 10), tool["side_effect"])
    add("impact", IMPACT_POINTS * int(tool["impact"]), f"impact {tool['impact']}")
    if not tool["reversible"]:
        add("irreversible", IRREVERSIBLE_POINTS)
    for factor in policy.factors_for(tool["name"]):
        try:
            if evaluate(factor.program, ctx):
                add(factor.name, factor.points, "argument factor")
        except EvaluationError as exc:  # a factor that cannot be checked counts against
            add(factor.name, max(factor.points, 0), f"could not be checked: {exc}")
    confidence = data["action"]["confidence"]
    if confidence >= 0:
        add("low confidence", round((1 - min(confidence, 1.0)) * 20), f"stated {confidence:.0%}")
    record = data["agent"]["record"]
    add(
        "agent record",
        round(record["reject_rate"] * 25 + record["error_rate"] * 10),
        f"rejected {record['reject_rate']:.0%}, errors {record['error_rate']:.0%}",
    )
    touched = set(data["run"]["labels"]) | set(data["action"]["labels"])
    for label in sorted(touched):
        add(
            f"label {label}",
            LABEL_POINTS.get(label, 0),
            "carried by the arguments"
            if label in data["action"]["labels"]
            else "touched by the run",
        )
    score = max(0, min(100, sum(f["points"] for f in factors)))
    return factors, score
