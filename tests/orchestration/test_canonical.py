import math

import pytest

from orchestration.canonical import CanonicalError, canonical_json


def test_key_order_and_whitespace_do_not_matter():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_integral_floats_are_integers_and_others_are_not():
    assert canonical_json({"x": 1.0}) == canonical_json({"x": 1}) == '{"x":1}'
    assert canonical_json({"x": 1.5}) == '{"x":1.5}'


def test_strings_are_nfc():
    decomposed = "cafe\u0301"  # e + combining acute accent
    assert canonical_json(decomposed) == canonical_json("caf\u00e9")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"reasoning": "ok\x00then"}, "value.reasoning contains a NUL character"),
        ({"n": math.nan}, "value.n is not a finite number"),
        ({"n": math.inf}, "value.n is not a finite number"),
        ({"when": object()}, "value.when is a object"),
        ({1: "x"}, "non-string key"),
        ({"e\u0301": 1, "\u00e9": 2}, "two keys that normalise"),
    ],
)
def test_values_without_a_canonical_form_are_refused_with_their_path(value, message):
    with pytest.raises(CanonicalError, match=message):
        canonical_json(value)
