"""Fuzz ``webhooks.verify`` with the headers included: structured headers (t/v1 parts with
hostile values, duplicates, empties), real signatures with mutations, and arbitrary text.
``verify`` returns the timestamp or raises ``SignatureError`` — nothing else — and
``is_authentic`` and the copy printed in docs/operations.md give the same answer."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from spotguard_core import webhooks
from spotguard_core.webhooks import SignatureError, sign, verify

from tests.fuzz.profiles import share
from tests.unit.documented_webhook_receiver import documented_receiver

NOW = 1_700_000_000
SECRET = "whsec_fuzz"


timestamps = st.one_of(
    st.integers(NOW - 400, NOW + 400).map(str),
    st.sampled_from(["", "-1", "+1700000000", "1_700_000_000", "9" * 400, "1e9", " 1700000000", "٣"]),
    st.integers(0, 10**30).map(str),
)
v1_values = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=60, max_size=68),
    st.text(alphabet="0123456789abcdefABCDEFé٣ \x00", max_size=70),
    st.text(max_size=70),
)
keys = st.sampled_from(["t", "v1", "v0", "v2", "T", "V1", "", " t", "v1 ", "é", "t\x00"])
part = st.one_of(
    st.tuples(st.just("t"), timestamps),
    st.tuples(st.just("v1"), v1_values),
    st.tuples(keys, st.text(max_size=20)),
).map(lambda kv: f"{kv[0]}={kv[1]}")
structured = st.lists(part | st.text(max_size=10), max_size=12).flatmap(
    lambda parts: st.sampled_from([",", ", ", ",,", ";"]).map(lambda sep: sep.join(parts))
)
bodies = st.one_of(st.binary(max_size=256), st.text(max_size=256))


@st.composite
def mutated_signature(draw: st.DrawFn) -> tuple[str, bytes | str, bool]:
    """A real header for a body (it verifies), then maybe changed."""
    body = draw(bodies)
    header = sign(SECRET, body, timestamp=draw(st.integers(NOW - 300, NOW + 300)))
    changed = False
    if draw(st.booleans()):
        position = draw(st.integers(0, len(header) - 1))
        insert = draw(st.text(max_size=3))
        header = header[:position] + insert + header[position + draw(st.integers(0, 2)) :]
        changed = True
    return header, body, changed


def check(header: Any, body: Any, secret: str = SECRET) -> bool:
    try:
        result = verify(secret, header, body, now=NOW)
    except SignatureError:
        accepted = False
    else:
        assert isinstance(result, int) and abs(result - NOW) <= 300
        accepted = True
    assert webhooks.is_authentic(secret, header, body, now=NOW) is accepted
    assert documented_receiver()["is_authentic"](secret, header, body, now=NOW) is accepted
    return accepted


@share(0.5)
@given(header=st.one_of(structured, st.text(max_size=300), st.none()), body=bodies)
def test_structured_and_arbitrary_headers(header, body, count_inputs):
    count_inputs["webhooks.verify"] += 1
    check(header, body)


@share(0.4)
@given(case=mutated_signature())
def test_real_signatures_with_mutations(case, count_inputs):
    count_inputs["webhooks.verify"] += 1
    header, body, changed = case
    accepted = check(header, body)
    if not changed:
        assert accepted  # an untouched signature always verifies


@share(0.1)
@given(
    secret=st.text(max_size=40),
    header=st.one_of(structured, st.text(max_size=100)),
    body=st.one_of(bodies, st.none(), st.integers()),
)
def test_any_secret_and_body_type(secret, header, body, count_inputs):
    count_inputs["webhooks.verify"] += 1
    check(header, body, secret)
