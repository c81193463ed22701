"""webhook.signature.js_stringify must equal Node's JSON.stringify, byte for byte: an
Actions batch signature is checked against it."""

import json
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.segment_wire import node_stringify
from webhook.signature import js_stringify

pytestmark = pytest.mark.requires("node")  # the oracle


def _random_doubles(count, seed=7):
    rng = random.Random(seed)
    values = []
    while len(values) < count:
        value = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        if value == value and abs(value) != float("inf"):
            values.append(value)
    return values


def test_numbers_strings_and_key_order_match_node():
    document = {
        "doubles": _random_doubles(3000),
        "edges": [
            0.0,
            -0.0,
            1.0,
            1e21,
            1e20,
            1e-6,
            1e-7,
            1.5e-7,
            5e-324,
            2**53,
            2**53 + 1,
            12345678901234567890,
            -1e300,
            0.1,
            100.0,
            123.456,
        ],
        "big_ints": [random.Random(3).randint(-(10**30), 10**30) for _ in range(500)],
        "text": 'quote" backslash\\ slash/ \b\f\n\r\t \x01\x1f \x7f \u2028\u2029 é 💡 \ud800',
        "2": "integer-like keys come first",
        "10": 1,
        "01": "not an index",
        "b": 2,
        "1": 3,
        "4294967295": "not an index (2**32-1)",
        "4294967294": "an index",
        "nested": [{"z": None, "a": True, "n": [False, [], {}]}],
    }
    text = json.dumps(document)  # escapes the lone surrogate, as Segment's JSON may
    assert js_stringify(json.loads(text)).encode("utf-8", "surrogatepass") == node_stringify(
        json.loads(text)
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**25), max_value=10**25)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=30,
)


# Node is asked once an example, for a list of up to 40 generated values: quick enough for
# `make test-fast` (the independent check must run in every loop, not only in the full run).
@settings(max_examples=25, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=40))
def test_arbitrary_json_matches_node(values):
    expected = node_stringify(values)
    assert js_stringify(json.loads(json.dumps(values))).encode("utf-8", "surrogatepass") == expected
