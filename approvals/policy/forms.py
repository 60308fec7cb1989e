"""Forms of the policy pages. Conditions are checked as the gate will read them
(``condition_check``), and a bad one is shown with a pointer at the offending span."""

import difflib
import re
from dataclasses import dataclass
from typing import Any

from django import forms
from django.urls import reverse_lazy
from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from approvals.policy.cel import ConditionError
from approvals.policy.compiled import matches
from approvals.policy.drafts import FACTOR_FIELDS, RULE_FIELDS, THRESHOLD_FIELDS, thresholds_check
from approvals.policy.models import ArgumentFactor, Rule
from approvals.policy.services import condition_check
from orchestration.registry.declare import RISK_FIELDS, TOOLS, latest_workflows
from orchestration.registry.models import Agent, AgentStatus, Autonomy, Tool

VALIDATE_URL = reverse_lazy("policy:condition_validate")
_WORD = re.compile(r"[A-Za-z0-9_]+")
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")


# --- conditions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionCheck:
    """The outcome of checking a condition, ready to render: OK, or the message and a pointer."""

    source: str
    error: ConditionError | None = None
    optional: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def empty(self) -> bool:
        return not self.source.strip()

    @property
    def message(self) -> str:
        return self.error.message if self.error else ""

    @property
    def line(self) -> int:
        return self.error.line if self.error else 0

    @property
    def column(self) -> int:
        return self.error.column if self.error else 0

    def span(self) -> tuple[int, int]:
        """The offending span: the word at the error's position (one character otherwise); the
        whole first line for a failed dry run, which has no position of its own."""
        assert self.error is not None
        start = min(max(self.error.position, 0), len(self.source))
        if self.error.message.startswith("dry run failed"):
            newline = self.source.find("\n", start)
            return start, len(self.source) if newline < 0 else newline
        if word := _WORD.match(self.source, start):
            return start, word.end()
        if start < len(self.source) and self.source[start] != "\n":
            return start, start + 1
        return start, start

    def pointer(self) -> SafeString:
        """The condition with the offending span in ``<mark>`` and a caret line under it."""
        if self.error is None:
            return mark_safe(escape(self.source))  # noqa: S308 (escaped)
        start, end = self.span()
        out, offset = [], 0
        for text in self.source.split("\n"):
            line_end = offset + len(text)
            if offset <= start <= line_end:
                col, stop = start - offset, min(end, line_end) - offset
                marked = escape(text[col:stop]) or " "
                out.append(
                    f"{escape(text[:col])}<mark>{marked}</mark>{escape(text[stop:])}\n"
                    f'<span class="caret" aria-hidden="true">'
                    f"{''.join(c if c == chr(9) else ' ' for c in text[:col])}"
                    f"^{'~' * max(stop - col - 1, 0)}</span>"
                )
                start = -1  # marked
            else:
                out.append(escape(text))
            offset = line_end + 1
        return mark_safe("\n".join(out))  # noqa: S308 (every piece escaped)


def check_condition(source: str, tool_patterns: list[str], *, optional: bool = False):
    if optional and not source.strip():
        return ConditionCheck(source, optional=True)
    try:
        condition_check(source, tool_patterns=tool_patterns)
    except ConditionError as exc:
        return ConditionCheck(source, exc, optional)
    return ConditionCheck(source, None, optional)


def split_list(value: str) -> list[str]:
    seen: dict[str, None] = {}
    for item in (value or "").split(","):
        if item.strip():
            seen[item.strip()] = None
    return list(seen)


def tool_names() -> list[str]:
    return sorted({*TOOLS, *Tool.objects.values_list("name", flat=True)})


def pattern_problem(pattern: str, names: list[str]) -> str | None:
    if not _PATTERN.match(pattern):
        return f"“{pattern}” is not a tool pattern: use names like payments.refund or payments.*"
    if not any(matches((pattern,), name) for name in names):
        close = difflib.get_close_matches(pattern, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"“{pattern}” matches no tool{hint}."
    return None


class ListField(forms.Field):
    """A list of names typed comma-separated."""

    widget = forms.TextInput

    def __init__(self, *, patterns: bool = False, **kwargs: Any) -> None:
        self.patterns = patterns
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> str:
        return ", ".join(value) if isinstance(value, list | tuple) else (value or "")

    def to_python(self, value: Any) -> list[str]:
        return list(value) if isinstance(value, list | tuple) else split_list(value)

    def validate(self, value: list[str]) -> None:
        if self.required and not value:
            raise forms.ValidationError(self.error_messages["required"], code="required")
        if self.patterns:
            names = tool_names()
            problems = [p for p in (pattern_problem(v, names) for v in value) if p]
            if problems:
                raise forms.ValidationError(problems)

    def has_changed(self, initial: Any, data: Any) -> bool:
        return self.to_python(initial or []) != self.to_python(data)


def _names(current: list[str], known: list[str]) -> list[tuple[str, str]]:
    return [(name, name) for name in sorted({*known, *(current or [])})]


class ConditionMixin:
    """Checks ``condition`` against the tools in scope after the other fields are clean, and
    keeps the check for the pointer. Subclasses name the field holding the scope."""

    scope_field = "tool_patterns"
    condition_optional = False
    checked: ConditionCheck | None = None

    def _setup_condition(self) -> None:
        scope = self.fields[self.scope_field].widget
        scope.attrs.update(
            {"hx-post": VALIDATE_URL, "hx-trigger": "change", "hx-target": "#condition-check"}
        )
        self.fields["condition"].widget.attrs.update(
            {
                "class": "code",
                "rows": 3,
                "spellcheck": "false",
                "autocomplete": "off",
                "aria-describedby": f"{self['condition'].auto_id}_helptext condition-check",
                "hx-post": VALIDATE_URL,
                "hx-trigger": "keyup changed delay:400ms, change",
                "hx-target": "#condition-check",
                "hx-sync": "this:replace",
            }
        )

    def scope(self) -> list[str]:
        value = self.cleaned_data.get(self.scope_field)
        return value if isinstance(value, list) else [value] if value else []

    def _clean_condition(self) -> None:
        if "condition" in self.errors or self.scope_field in self.errors:
            return
        check = check_condition(
            self.cleaned_data.get("condition", ""),
            self.scope(),
            optional=self.condition_optional,
        )
        self.checked = check
        if not check.ok:
            self.add_error("condition", str(check.error))
            self.fields["condition"].widget.attrs["aria-invalid"] = "true"


# --- rules and factors --------------------------------------------------------------------


class RuleForm(ConditionMixin, forms.ModelForm):
    agents = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every agent.",
    )
    workflows = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every workflow.",
    )
    tool_patterns = ListField(
        patterns=True,
        label="Tool patterns",
        help_text="Comma-separated, e.g. payments.refund, email.*; empty: every tool.",
    )
    quorum = forms.IntegerField(min_value=1, max_value=3, initial=1)
    deadline_minutes = forms.IntegerField(min_value=1, initial=60, label="Deadline (minutes)")

    class Meta:
        model = Rule
        fields = RULE_FIELDS
        widgets = {
            "description": forms.Textarea(attrs={"rows": 2}),
            "message": forms.Textarea(attrs={"rows": 2}),
            "condition": forms.Textarea,
        }
        labels = {
            "allow_similar": "Reviewers may approve and allow similar actions",
            "message": "Message for the reviewer",
            "escalation_team": "Escalation team",
            "on_expiry": "On expiry",
        }

    OBLIGATIONS = (
        "team",
        "quorum",
        "deadline_minutes",
        "on_expiry",
        "escalation_team",
        "message",
        "allow_similar",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        current = self.instance if self.instance.pk else None
        agent_names = list(Agent.objects.values_list("name", flat=True))
        self.fields["agents"].choices = _names(current and current.agents, agent_names)
        workflow_names = [w.name for w in latest_workflows()]
        self.fields["workflows"].choices = _names(current and current.workflows, workflow_names)
        self.fields["condition"].help_text = (
            "CEL over action, args, tool, agent, run, risk and now, "
            'e.g. args.amount > 500.0 or "pii" in action.labels.'
        )
        self.fields["priority"].help_text = "Lower is evaluated first."
        self.fields["message"].help_text = ""  # the labels say it
        similar = "A reviewer may then grant similar actions for the run or an hour, unasked."
        self.fields["allow_similar"].help_text = similar
        self._setup_condition()

    def main_fields(self):
        return [self[f] for f in RULE_FIELDS if f not in self.OBLIGATIONS and f != "condition"]

    def obligation_fields(self):
        return [self[f] for f in self.OBLIGATIONS]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        self._clean_condition()
        return data

    def draft_data(self) -> dict[str, Any]:
        return {f: self.cleaned_data[f] for f in RULE_FIELDS}


class FactorForm(ConditionMixin, forms.ModelForm):
    tool_patterns = ListField(
        patterns=True,
        label="Tool patterns",
        help_text="Comma-separated, e.g. payments.*; empty: every tool.",
    )
    points = forms.IntegerField(
        min_value=-100, max_value=100, help_text="Added to the risk score (-100 to 100)."
    )

    class Meta:
        model = ArgumentFactor
        fields = FACTOR_FIELDS
        widgets = {"condition": forms.Textarea}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        help_text = "When true, the points are added, e.g. args.amount > 500.0."
        self.fields["condition"].help_text = help_text
        self._setup_condition()

    def other_fields(self):
        return [self[f] for f in FACTOR_FIELDS if f != "condition"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        self._clean_condition()
        return data

    def draft_data(self) -> dict[str, Any]:
        return {f: self.cleaned_data[f] for f in FACTOR_FIELDS}


# --- thresholds ---------------------------------------------------------------------------

THRESHOLD_LABELS = {
    "allow_below": "Allow below",
    "quorum2_above": "Quorum 2 above",
    "deny_above": "Deny above",
}


class ThresholdsForm(forms.Form):
    """One row per autonomy level; fields are named ``<autonomy>-<field>``."""

    def __init__(self, *args: Any, current: dict[str, dict[str, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for autonomy in Autonomy.values:
            for field in THRESHOLD_FIELDS:
                self.fields[f"{autonomy}-{field}"] = forms.IntegerField(
                    label=f"{autonomy.capitalize()}: {THRESHOLD_LABELS[field].lower()}",
                    min_value=0,
                    max_value=100,
                    initial=current.get(autonomy, {}).get(field),
                    widget=forms.NumberInput(attrs={"min": 0, "max": 100, "class": "score"}),
                )

    def rows(self):
        for autonomy in Autonomy.values:
            yield autonomy, [self[f"{autonomy}-{field}"] for field in THRESHOLD_FIELDS]

    def values(self) -> dict[str, dict[str, int]]:
        return {
            autonomy: {f: self.cleaned_data.get(f"{autonomy}-{f}") for f in THRESHOLD_FIELDS}
            for autonomy in Autonomy.values
        }

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        rows = {
            autonomy: row
            for autonomy, row in self.values().items()
            if not any(f"{autonomy}-{field}" in self.errors for field in THRESHOLD_FIELDS)
        }  # the order of a row is checked once its fields are valid numbers
        for key, message in thresholds_check(rows).items():
            self.add_error(key, message)
        return data


# --- tools --------------------------------------------------------------------------------


class ToolRiskForm(forms.ModelForm):
    labels_read = ListField(label="Labels read", help_text="Comma-separated, e.g. pii, financial.")
    labels_produced = ListField(label="Labels produced", help_text="Comma-separated.")
    impact = forms.IntegerField(min_value=0, max_value=4, help_text="0 (none) to 4 (severe).")

    class Meta:
        model = Tool
        fields = RISK_FIELDS
        labels = {
            "cost_per_call": "Cost per call (USD)",
            "compensating_tool": "Compensating tool",
            "allow_similar_forbidden": "Reviewers may not allow similar actions",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["compensating_tool"].help_text = "The tool that undoes this one, if any."

    def clean_compensating_tool(self) -> str:
        name = self.cleaned_data["compensating_tool"].strip()
        if name and name not in tool_names():
            close = difflib.get_close_matches(name, tool_names(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise forms.ValidationError(f"There is no tool named {name}{hint}.")
        return name

    def risk_changes(self) -> dict[str, Any]:
        return {f: self.cleaned_data[f] for f in RISK_FIELDS}


# --- agents and grants --------------------------------------------------------------------


class AgentForm(forms.Form):
    autonomy = forms.ChoiceField(choices=Autonomy.choices)
    status = forms.ChoiceField(choices=AgentStatus.choices)


class GrantForm(ConditionMixin, forms.Form):
    scope_field = "tool_pattern"
    condition_optional = True

    tool_pattern = forms.CharField(
        max_length=120, label="Tool pattern", help_text="e.g. payments.refund or travel.*"
    )
    condition = forms.CharField(
        required=False,
        widget=forms.Textarea,
        help_text="Optional CEL; the grant applies only when it is true.",
    )
    expires_at = forms.DateTimeField(
        required=False,
        label="Expires at (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"],
        help_text="Empty: until revoked.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_condition()
        self.fields["condition"].widget.attrs["hx-vals"] = '{"optional": "1"}'
        self.fields["tool_pattern"].widget.attrs["hx-vals"] = '{"optional": "1"}'

    def clean_tool_pattern(self) -> str:
        pattern = self.cleaned_data["tool_pattern"].strip()
        if problem := pattern_problem(pattern, tool_names()):
            raise forms.ValidationError(problem)
        return pattern

    def clean_expires_at(self):
        value = self.cleaned_data.get("expires_at")
        if value and value <= timezone.now():
            raise forms.ValidationError("Must be in the future.")
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        self._clean_condition()
        return data


class PublishForm(forms.Form):
    note = forms.CharField(
        required=False,
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="What changed and why; kept with the version and in the audit trail.",
    )
