"""CEL conditions: field paths, static validation against the context and the tools' schemas,
the dry run, positions of errors, the compile cache and evaluation."""

import datetime as dt
import time

import cel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from approvals.policy.cel import (
    CONTEXT_FIELDS,
    ConditionError,
    EvaluationError,
    FieldPath,
    compile_condition,
    evaluate,
    field_paths,
    sample_contexts,
    validate_condition,
)

PAY = {
    "type": "object",
    "properties": {
        "amount": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            },
        },
        "shipping": {
            "type": "object",
            "additionalProperties": True,
            "properties": {"country": {"type": "string"}, "express": {"type": "boolean"}},
        },
    },
    "additionalProperties": True,
}
EMAIL = {
    "type": "object",
    "properties": {
        "to": {"type": "string", "format": "email"},
        "cc": {"type": "array", "items": {"type": "string"}},
        "subject": {"type": "string"},
    },
}


def paths(source: str) -> list[tuple[tuple[str, ...], str]]:
    """Each path with the exact text of its span."""
    return [(fp.parts, source[fp.start : fp.end]) for fp in field_paths(source)]


def refused(source: str, schemas: list[dict] | None = None) -> ConditionError:
    with pytest.raises(ConditionError) as info:
        validate_condition(
            source,
            context=CONTEXT_FIELDS,
            args_schemas=[PAY, EMAIL] if schemas is None else schemas,
        )
    return info.value


# field_paths


def test_simple_chains_with_exact_spans():
    source = "args.amount > 100 && agent.record.reject_rate < 0.2"
    assert field_paths(source) == [
        FieldPath(("args", "amount"), 0, 11),
        FieldPath(("agent", "record", "reject_rate"), 21, 45),
    ]
    assert paths(source)[1] == (("agent", "record", "reject_rate"), "agent.record.reject_rate")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # strings containing dots, quotes and escaped quotes are skipped whole
        ('"args.fake" == args.to', [(("args", "to"), "args.to")]),
        ("'agent.x' != action.tool", [(("action", "tool"), "action.tool")]),
        (r'"say \"args.x\" now" == args.to', [(("args", "to"), "args.to")]),
        (r"'it\'s args.y' == args.to", [(("args", "to"), "args.to")]),
        ('"\\\\" + args.to == "a\\\\"', [(("args", "to"), "args.to")]),  # "\\" ends at its quote
        # triple quotes may hold quotes and newlines
        ('"""a "args.z"\nline""" == args.subject', [(("args", "subject"), "args.subject")]),
        ("'''it's 'args.q' '''.size() > 1", []),
        # raw strings: a backslash does not escape the quote; bytes are strings too
        (r'r"C:\" == args.to', [(("args", "to"), "args.to")]),
        (r"R'\d+\.x' == args.to && rb'a.b' != b'c.d'", [(("args", "to"), "args.to")]),
        ('br"x.y" == args.data', [(("args", "data"), "args.data")]),
        # comments run to the end of the line
        (
            'args.amount > 1 // args.fake "\n&& run.steps < 3',
            [(("args", "amount"), "args.amount"), (("run", "steps"), "run.steps")],
        ),
    ],
)
def test_string_literals_and_comments_are_skipped(source, expected):
    assert paths(source) == expected


def test_calls_are_not_paths():
    source = 'action.tool.startsWith("pay") && size(args.items) > 2 && timestamp(args.when) < now'
    assert paths(source) == [
        (("action", "tool"), "action.tool"),
        (("args", "items"), "args.items"),
        (("args", "when"), "args.when"),
        (("now",), "now"),
    ]
    # nothing after a call's result is a path from the context
    assert paths('args.to.lowerAscii().size() > 1 && f(1).y == 1 && "a".size() == 1') == [
        (("args", "to"), "args.to")
    ]


def test_macro_variables_are_not_paths_but_are_scoped():
    source = 'args.items.exists(i, i.sku == "x" && i.qty > args.limit)'
    assert paths(source) == [(("args", "items"), "args.items"), (("args", "limit"), "args.limit")]
    nested = "args.orders.all(o, o.lines.exists(l, l.sku == o.sku)) && o.total > 1"
    assert paths(nested) == [(("args", "orders"), "args.orders"), (("o", "total"), "o.total")]
    assert paths("[1, 2].map(x, x * 2).filter(y, y > agent.record.actions).size() > 0") == [
        (("agent", "record", "actions"), "agent.record.actions")
    ]
    assert paths("action.labels.exists_one(l, l == 'pii')") == [
        (("action", "labels"), "action.labels")
    ]


def test_string_indexes_are_parts():
    source = """args["to"] == "x" && args['cc'].size() > 0 && args.items[0].sku == "a" """
    assert paths(source) == [
        (("args", "to"), 'args["to"]'),
        (("args", "cc"), "args['cc']"),
        (("args", "items"), "args.items"),
    ]
    assert paths('run["intent"].goal == "x" && args[key] == 1 && args[b"k"] == 1') == [
        (("run", "intent", "goal"), 'run["intent"].goal'),
        (("args",), "args"),
        (("key",), "key"),
        (("args",), "args"),
    ]


def test_in_parentheses_literals_and_layout():
    assert paths('"pii" in action.labels && args.to in ["a@x.com", agent.name]') == [
        (("action", "labels"), "action.labels"),
        (("args", "to"), "args.to"),
        (("agent", "name"), "agent.name"),
    ]
    assert paths("((args.amount) > (agent.record.actions * (2))) == (true)") == [
        (("args", "amount"), "args.amount"),
        (("agent", "record", "actions"), "agent.record.actions"),
    ]
    source = "true && null == args.x && 1.5e3 > 0x1F && 3u > 1e-2 && type(args.to) == string"
    assert paths(source) == [(("args", "x"), "args.x"), (("args", "to"), "args.to")]
    assert paths("agent\n  .record\n  . actions > 1") == [
        (("agent", "record", "actions"), "agent\n  .record\n  . actions")
    ]
    assert paths("has(args.cc) && !has(args.shipping.country)") == [
        (("args", "cc"), "args.cc"),
        (("args", "shipping", "country"), "args.shipping.country"),
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.text() | st.text(alphabet="ab._()[],'\"\\rb/ \n1eu") | st.from_regex(r"[a-z.()\[\]'\" ]*")
)
def test_field_paths_never_raises_and_spans_are_inside(source):
    for fp in field_paths(source):
        assert 0 <= fp.start < fp.end <= len(source)
        assert source[fp.start :].startswith(fp.parts[0])
        assert fp.parts


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "args",
                ".",
                "amount",
                "items",
                "exists(",
                "i",
                ",",
                ")",
                "(",
                "'",
                '"',
                "r",
                "[",
                "]",
                " > 1",
                " && ",
                "has(",
                "1",
                "\n",
            ]
        ),
        max_size=20,
    ).map("".join)
)
def test_validation_only_ever_raises_condition_errors_inside_the_source(source):
    try:
        validate_condition(source, context=CONTEXT_FIELDS, args_schemas=[PAY])
    except ConditionError as error:
        assert 0 <= error.position <= len(source)


# validate_condition


@pytest.mark.parametrize(
    ("source", "message", "at"),
    [
        ("acton.tool == 'x'", "unknown variable 'acton' (did you mean action?)", "acton"),
        (
            "agent.recrd.actions > 1",
            "agent.recrd is not a field of agent (did you mean agent.record?)",
            "recrd",
        ),
        (
            "agent.record.rejct_rate > 0.5",
            "agent.record.rejct_rate is not a field of "
            "agent.record (did you mean agent.record.reject_rate?)",
            "rejct_rate",
        ),
        (
            "args.amout > 5",
            "args.amout is not an argument of the tools in scope (did you mean args.amount?)",
            "amout",
        ),
        (
            "action.args.amout > 5",
            "action.args.amout is not an argument of the tools in scope "
            "(did you mean action.args.amount?)",
            "amout",
        ),
        (
            'args.shipping.cuntry == "FR"',
            "args.shipping.cuntry is not an argument of the tools "
            "in scope (did you mean args.shipping.country?)",
            "cuntry",
        ),
        (
            'args["amout"] > 5',
            "args.amout is not an argument of the tools in scope (did you mean args.amount?)",
            '"amout"',
        ),
        ("has(args.amout)", "args.amout is not an argument", "amout"),  # has() would be false
        (
            'args.items.exists(i, i.skuu == "x")',
            "i.skuu is not an argument of the tools in scope (did you mean i.sku?)",
            "skuu",
        ),
        ("action.tool.name == 'x'", "action.tool is a string and has no field 'name'", "name"),
        ("action.labels.first == 'x'", "action.labels is a list and has no field 'first'", "first"),
        ("args.amount.cents > 1", "args.amount.cents is not an argument", "cents"),
        ("args.extra == 1", "args.extra is not an argument", "extra"),  # additionalProperties
        ("[1].all(x, x > 0) && x", "unknown variable 'x'", "x"),  # x is bound inside only
        (".acton.tool == 'x'", "unknown variable '.acton'", "acton"),
        (
            "args.to.endswith('@x.com')",
            "unknown function 'endswith' (did you mean endsWith?)",
            "endswith",
        ),
        (
            "args.amount > 5 && args.to.lowerAsci() == 'x'",
            "unknown function 'lowerAsci' (did you mean lowerAscii?)",
            "lowerAsci",
        ),
        ("args.to.toLowerCase() == 'x'", "unknown function 'toLowerCase'", "toLowerCase"),
        (
            "totals.target.sum.amout > 500.0",
            "totals.target.sum.amout is not a numeric argument of the tools "
            "(did you mean totals.target.sum.amount?)",
            "amout",
        ),
        (
            "totals.run.sum.currency > 1.0",  # a string argument is not summed
            "totals.run.sum.currency is not a numeric argument of the tools",
            "currency",
        ),
        ("totals.order.count > 1", "totals.order is not a field of totals", "order"),
        ("totals.target.cnt > 1", "totals.target.cnt is not a field of totals.target", "cnt"),
        ("totals.run.sum.amount.cents > 1", "totals.run.sum.amount is a double", "cents"),
        ("run.data_subjekt == 'x'", "run.data_subjekt is not a field of run", "data_subjekt"),
    ],
)
def test_typos_are_refused_with_position_and_suggestion(source, message, at):
    error = refused(source)
    assert error.message.startswith(message)
    assert source[error.position :].startswith(at)


def test_typo_on_a_later_line_has_line_and_column():
    source = "args.amount > 5\n  && agent.record.rejct_rate > 0.5"
    error = refused(source)
    assert (error.line, error.column) == (2, 19)
    assert str(error).endswith("(did you mean agent.record.reject_rate?) (at 2:19)")


@pytest.mark.parametrize(
    "source",
    [
        "args.amount > 100 && args.currency == 'EUR'",
        'args.items.exists(i, i.sku.startsWith("gift") && i.qty > 3)',
        "args.items.all(item, item.qty <= 10) && args.items[0].qty > 1 && args.items[3].qty > 1",
        'args["shipping"].country == "FR" && !args.shipping.express',
        "agent.record.reject_rate > 0.2 && agent.record.actions >= 10 && risk.score > 50",
        "'pii' in action.labels && tool.side_effect == 'write' && !tool.reversible",
        "run.cost_usd > 1.5 && run.steps > 2 && run.intent.goal.contains('refund')",
        "now.getHours() < 6 || now > timestamp('2025-01-01T00:00:00Z') + duration('1h')",
        "action.confidence < 0.5 && action.args.amount > 3 && type(tool.impact) == int",
        "args.items.exists(tool, tool.sku == 'x')",  # a macro variable may shadow a field
        "action.labels.exists(l, l.startsWith('secret'))",
        "risk.factors.exists(f, f.name == 'irreversible' && f.points > 10)",
        "totals.target.sum.amount + args.amount > 500.0 || totals.run.count >= 3",
        "totals.agent.sum.amount > 1000.0 && totals.agent.count > 2",
        "args.currency.lowerAscii() == 'eur' && args.currency.upperAscii().trim() == 'EUR'",
        "run.data_subject != '' && run.labels.all(l, l in ['pii'])",
    ],
)
def test_valid_conditions_pass(source):
    validate_condition(source, context=CONTEXT_FIELDS, args_schemas=[PAY])


def test_a_rule_over_several_tools_may_use_the_fields_of_one_behind_has():
    both = [PAY, EMAIL]
    for source in [
        '!has(args.to) || args.to.endsWith("@corp.com")',
        "has(args.amount) && args.amount > 10 || has(args.to) && size(args.cc) < 5",
        "has(action.args.items) && args.items.exists(i, i.qty > 3)",
    ]:
        validate_condition(source, context=CONTEXT_FIELDS, args_schemas=both)
    # unguarded, it would fail (and so match, stricter) on every action of the other tool
    error = refused('args.to.endsWith("@corp.com") || args.amount > 1000', both)
    assert error.message == (
        "dry run failed: no such key 'to' (a field some tools in scope lack needs a has() guard)"
    )


def test_fields_of_other_tools_are_unknown_when_only_one_is_in_scope():
    assert refused("args.to == 'a'", [PAY]).message.startswith("args.to is not an argument")
    assert refused("args.amount > 1", []).message == (
        "args.amount is not an argument of the tools in scope"
    )
    validate_condition("size(args) == 0", context=CONTEXT_FIELDS, args_schemas=[])


def test_the_runs_answers_are_a_list_of_strings_rules_may_read():
    """``run.answers`` (the answers to the run's questions, e.g. the customer's pick) validates
    and evaluates; a misspelt field is refused with the right name suggested."""
    HOTEL = {"type": "object", "properties": {"hotel": {"type": "string"}}}
    source = "!(args.hotel in run.answers)"
    validate_condition(source, context=CONTEXT_FIELDS, args_schemas=[HOTEL])
    validate_condition("size(run.answers) > 0", context=CONTEXT_FIELDS, args_schemas=[HOTEL])
    typo = "!(args.hotel in run.answer)"
    error = refused(typo, [HOTEL])
    assert error.message == "run.answer is not a field of run (did you mean run.answers?)"
    assert typo[error.position :] == "answer)"
    picked = {"args": {"hotel": "Hotel Sol"}, "run": {"answers": ["Hotel Sol"]}}
    assert not evaluate(compile_condition(source), picked)
    assert evaluate(compile_condition(source), {**picked, "run": {"answers": ["Casa Mar"]}})


def test_dry_run_refuses_type_errors_and_non_bool_results():
    error = refused("args.to > 5", [EMAIL])  # to is a string
    assert error.position == 0
    assert error.message.startswith("dry run failed: No such overload")
    assert refused("args.amount + 1.0", [PAY]).message == (
        "dry run failed: condition must be true or false, got 2.5"
    )
    assert "got 'sample'" in refused("true ? args.subject : false", [EMAIL]).message
    assert "got 1" in refused("risk.score", [PAY]).message
    # a method on the wrong type reads as an unknown function in this CEL package
    error = refused("args.items.exists(i, i.qty.startsWith('a'))", [PAY])
    assert error.message.startswith("dry run failed: Undefined variable or function: 'startsWith'")


def test_syntax_errors_have_positions():
    error = refused("args.amount > 5 &&")
    assert error.position == len("args.amount > 5 &&")
    assert error.message.startswith("Syntax error: mismatched input '<EOF>'")
    with pytest.raises(ConditionError) as info:
        compile_condition("args.amount >\n  * 2")
    assert (info.value.position, info.value.line, info.value.column) == (16, 2, 3)
    assert str(info.value).endswith("(at 2:3)")
    with pytest.raises(ConditionError) as info:
        compile_condition("'é😀' == 'x' &&& 1")  # columns count characters
    assert "'é😀' == 'x' &&& 1"[info.value.position :] == "& 1"


@pytest.mark.parametrize("source", ["", "   ", "\n\t"])
def test_a_condition_is_required(source):
    with pytest.raises(ConditionError) as info:
        compile_condition(source)
    assert (info.value.message, info.value.position) == ("a condition is required", 0)
    assert str(info.value) == "a condition is required (at 1:1)"


def test_compile_is_cached():
    source = "agent.record.actions > 7 && run.steps < 70"
    assert compile_condition(source) is compile_condition(source)
    assert compile_condition(source) is not compile_condition(source + " ")


# sample_contexts


def test_sample_contexts_fill_every_field_and_argument():
    first, second = sample_contexts(CONTEXT_FIELDS, [PAY, EMAIL])
    assert first["args"] == {
        "amount": 1.5,
        "currency": "EUR",
        "items": [{"sku": "sample", "qty": 1}],
        "shipping": {"country": "sample", "express": True},
    }
    assert second["args"] == {"to": "a@example.com", "cc": ["sample"], "subject": "sample"}
    assert first["action"]["args"] is first["args"]
    assert first["agent"]["record"] == {"actions": 1, "reject_rate": 1.5, "error_rate": 1.5}
    assert first["tool"]["reversible"] is True
    assert first["run"]["intent"]["constraints"] == []  # items of an unknown type: none
    assert first["now"].tzinfo is not None and isinstance(first["now"], dt.datetime)
    assert [c["args"] for c in sample_contexts(CONTEXT_FIELDS, [])] == [{}]


# evaluate


def test_evaluate_returns_bools_and_explains_failures():
    ctx = {"args": {"amount": 150, "to": "a@b.c"}}
    assert evaluate(compile_condition("args.amount > 100"), ctx) is True
    assert evaluate(compile_condition("args.amount > 100"), cel.Context(ctx)) is True
    with pytest.raises(EvaluationError, match="no such key 'amout'"):
        evaluate(compile_condition("args.amout > 100"), ctx)
    with pytest.raises(EvaluationError, match="No such overload"):
        evaluate(compile_condition("args.to > 5"), ctx)
    with pytest.raises(EvaluationError, match="condition must be true or false, got 3"):
        evaluate(compile_condition("1 + 2"), ctx)
    with pytest.raises(EvaluationError, match="Undefined variable or function: 'acton'"):
        evaluate(compile_condition("acton.tool == 'x'"), ctx)
    with pytest.raises(EvaluationError, match="division by zero"):
        evaluate(compile_condition("args.amount / 0 > 1"), ctx)


def test_evaluate_is_fast_with_a_context():
    program = compile_condition(
        "args.amount > 100 && agent.record.reject_rate < 0.2 && 'pii' in action.labels"
    )
    data = sample_contexts(CONTEXT_FIELDS, [PAY])[0]
    ctx, n = cel.Context(data), 5000
    start = time.perf_counter()
    for _ in range(n):
        evaluate(program, ctx)
    with_context = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(n // 10):
        evaluate(program, data)
    with_dict = (time.perf_counter() - start) / (n // 10) * 1e6
    print(f"\nevaluate: {with_context:.2f} µs with a cel.Context, {with_dict:.1f} µs with a dict")
