"""Forms of the run pages. ``WorkflowInputForm`` is built from a workflow's JSON Schema input;
the schema itself (through ``run_start``) stays the final word, and its messages are mapped back
onto the fields they name."""

import re
from typing import Any

from django import forms
from django.core.validators import RegexValidator

from orchestration.registry.models import Agent, AgentStatus

LONG_TEXT = 60  # a string whose default is longer than this gets a text area

_REQUIRED = re.compile(r"'(?P<name>[^']+)' is a required property")


def _string_field(spec: dict, required: bool) -> forms.Field:
    validators = []
    if spec.get("pattern"):
        example = f", like {spec['default']}" if spec.get("default") else ""
        message = f"Must match the pattern {spec['pattern']}{example}."
        validators.append(RegexValidator(spec["pattern"], message=message))
    default = str(spec.get("default", ""))
    long = len(default) > LONG_TEXT or (spec.get("maxLength") or 0) > 200
    return forms.CharField(
        required=required,
        min_length=spec.get("minLength"),
        max_length=spec.get("maxLength"),
        validators=validators,
        widget=forms.Textarea(attrs={"rows": 3}) if long else forms.TextInput,
    )


def _number_field(spec: dict, required: bool, *, integer: bool) -> forms.Field:
    bounds = {"min_value": spec.get("minimum"), "max_value": spec.get("maximum")}
    if integer:
        return forms.IntegerField(required=required, **bounds)
    return forms.FloatField(required=required, widget=forms.NumberInput({"step": "any"}), **bounds)


COERCE = {"integer": int, "number": float, "string": str}


def schema_field(spec: dict, *, required: bool) -> forms.Field:
    kind = spec.get("type")
    if spec.get("enum") and kind in COERCE:
        field = forms.TypedChoiceField(
            choices=[("", "---"), *((v, v) for v in spec["enum"])],
            coerce=COERCE[kind],
            required=required,
            empty_value=None,
        )
    elif kind == "integer":
        field = _number_field(spec, required, integer=True)
    elif kind == "number":
        field = _number_field(spec, required, integer=False)
    elif kind == "boolean":
        field = forms.BooleanField(required=False)
    else:  # strings, and anything else typed in as text
        field = _string_field(spec, required)
    if "default" in spec:
        field.initial = spec["default"]
    return field


class WorkflowInputForm(forms.Form):
    """A field per top-level property: string, number, integer, boolean; ``title``, ``default``,
    ``description``, ``enum``, ``minLength``, ``maxLength``, ``pattern``, ``minimum`` and
    ``maximum`` are honoured."""

    def __init__(self, schema: dict, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.schema = schema
        required = set(schema.get("required") or [])
        for name, spec in (schema.get("properties") or {}).items():
            if not isinstance(spec, dict):
                continue
            field = schema_field(spec, required=name in required)
            field.label = spec.get("title") or name.replace("_", " ").capitalize()
            field.help_text = spec.get("description", "")
            self.fields[name] = field

    def workflow_input(self) -> dict[str, Any]:
        """The cleaned data as the workflow's input: empty optional values are left out."""
        return {
            name: value
            for name, value in self.cleaned_data.items()
            if value not in (None, "") or name in set(self.schema.get("required") or [])
        }

    def add_schema_errors(self, messages: list[str]) -> None:
        """Place ``run_start``'s messages (``"<path>: <message>"``) on the fields they name."""
        for message in messages:
            path, _, detail = message.partition(": ")
            name = path.split("/")[0]
            missing = _REQUIRED.search(detail)
            if name == "input" and missing:
                name = missing.group("name")
            if detail and name in self.fields:
                self.add_error(name, detail)
            else:
                self.add_error(None, message)


class RunOptionsForm(forms.Form):
    """What every run may carry besides its input: an agent and the goal of its intent."""

    agent = forms.ModelChoiceField(
        queryset=Agent.objects.filter(status=AgentStatus.ACTIVE).order_by("name"),
        required=False,
        to_field_name="name",
        empty_label="No agent",
        help_text="The agent's tools, model and budgets apply to the run.",
    )
    goal = forms.CharField(
        required=False,
        max_length=500,
        help_text="The intent: every action the run proposes is checked against it.",
    )
