"""Webhook signing and the receiver-side verification function."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spotguard_core import contracts, webhooks
from spotguard_core.webhooks import SignatureError, sign, verify

from tests.unit.documented_webhook_receiver import documented_receiver

SECRET = "whsec_test"
BODY = json.dumps({"event": "instance.migrated", "instanceId": "i-0123456789abcdef0"}).encode()


def test_signature_header_format():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    assert v1.startswith("v1=") and len(v1) == 3 + 64


def test_signature_verifies_and_returns_the_timestamp():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    assert verify(SECRET, header, BODY, now=1_700_000_010) == 1_700_000_000


def test_str_and_bytes_bodies_are_the_same():
    header = sign(SECRET, BODY.decode(), timestamp=1_700_000_000)
    assert verify(SECRET, header, BODY, now=1_700_000_000) == 1_700_000_000


def test_tampered_body_is_rejected():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    tampered = BODY.replace(b"i-0123456789abcdef0", b"i-0fffffffffffffff0")
    with pytest.raises(SignatureError, match="does not match"):
        verify(SECRET, header, tampered, now=1_700_000_000)


def test_wrong_secret_is_rejected():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    with pytest.raises(SignatureError):
        verify("another-secret", header, BODY, now=1_700_000_000)


def test_old_timestamp_is_rejected_as_a_replay():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    late = 1_700_000_000 + contracts.WEBHOOK_TOLERANCE_SECONDS + 1
    with pytest.raises(SignatureError, match="tolerance"):
        verify(SECRET, header, BODY, now=late)
    # exactly at the tolerance it is still accepted
    assert verify(SECRET, header, BODY, now=late - 1)


def test_future_timestamp_is_rejected():
    header = sign(SECRET, BODY, timestamp=1_700_001_000)
    with pytest.raises(SignatureError, match="tolerance"):
        verify(SECRET, header, BODY, now=1_700_000_000)


def test_moving_the_signature_to_another_timestamp_fails():
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    forged = header.replace("t=1700000000", "t=1700000100")
    with pytest.raises(SignatureError, match="does not match"):
        verify(SECRET, forged, BODY, now=1_700_000_100)


@pytest.mark.parametrize("header", [None, "", "garbage", "t=abc,v1=00", "v1=abcdef", "t=1700000000"])
def test_malformed_headers_are_rejected(header):
    with pytest.raises(SignatureError):
        verify(SECRET, header, BODY, now=1_700_000_000)


def test_any_of_several_v1_signatures_may_match_during_secret_rotation():
    good = sign(SECRET, BODY, timestamp=1_700_000_000)
    old = sign("old-secret", BODY, timestamp=1_700_000_000)
    header = f"t=1700000000,{old.split(',')[1]},{good.split(',')[1]}"
    assert verify(SECRET, header, BODY, now=1_700_000_000)


@given(
    secret=st.text(min_size=1, max_size=64), body=st.binary(max_size=2048), timestamp=st.integers(0, 2**33)
)
def test_property_signed_bodies_verify(secret, body, timestamp):
    assert verify(secret, sign(secret, body, timestamp=timestamp), body, now=timestamp) == timestamp


@given(body=st.binary(min_size=1, max_size=512), position=st.integers(min_value=0), flip=st.integers(1, 255))
def test_property_any_changed_byte_is_detected(body, position, flip):
    header = sign(SECRET, body, timestamp=1_700_000_000)
    index = position % len(body)
    changed = body[:index] + bytes([body[index] ^ flip]) + body[index + 1 :]
    with pytest.raises(SignatureError):
        verify(SECRET, header, changed, now=1_700_000_000)


def test_webhook_payload_has_the_seed_shape():
    event = {
        "id": "evt-1",
        "detail-type": "instance.migrated",
        "source": "spotguard",
        "time": "2026-01-15T10:45:00Z",
        "detail": {"instanceId": "inst-new123", "originalInstanceId": "inst-old456", "status": "running"},
    }
    payload = webhooks.webhook_payload(event)
    assert payload["event"] == "instance.migrated"
    assert payload["timestamp"] == "2026-01-15T10:45:00Z"
    assert payload["instanceId"] == "inst-new123" and payload["originalInstanceId"] == "inst-old456"
    # the detail's own event/timestamp win over the envelope's
    event["detail"]["timestamp"] = "2026-01-15T10:44:59.123Z"
    assert webhooks.webhook_payload(event)["timestamp"] == "2026-01-15T10:44:59.123Z"


def test_documented_receiver_function_agrees_with_the_library():
    documented = documented_receiver()
    documented_verify, documented_error = documented["verify"], documented["SignatureError"]
    header = sign(SECRET, BODY, timestamp=1_700_000_000)
    assert documented_verify(SECRET, header, BODY, now=1_700_000_100) == 1_700_000_000
    with pytest.raises(documented_error):
        documented_verify(SECRET, header, BODY + b" ", now=1_700_000_000)
    with pytest.raises(documented_error):
        documented_verify(SECRET, header, BODY, now=1_700_000_000 + contracts.WEBHOOK_TOLERANCE_SECONDS + 1)
    with pytest.raises(documented_error):
        documented_verify(SECRET, None, BODY)


# ------------------------------------------------------------------ strict header parsing (issue 13)
GOOD = sign(SECRET, BODY, timestamp=1_700_000_000)
GOOD_V1 = GOOD.split(",")[1]


@pytest.mark.parametrize(
    "header",
    [
        "t=1700000000,v1=" + "é" * 64,  # non-ASCII v1: hmac.compare_digest raised TypeError
        "t=1700000000,v1=٣" + "0" * 63,  # a non-ASCII digit
        "t=" + "9" * 400 + "," + GOOD_V1,  # huge timestamp: int - float raised OverflowError
        "t=" + "1" * 11 + "," + GOOD_V1,
        "t=1700000000,t=1700000000," + GOOD_V1,  # duplicate t
        "t=1700000000,t=1700000001," + GOOD_V1,
        f"t=1700000000,{GOOD_V1},{GOOD_V1}",  # duplicate v1
        f"{GOOD},",  # empty part
        f",{GOOD}",
        f"{GOOD},junk",  # a part without "="
        f"{GOOD},=x",  # empty key
        "t=,v1=" + "0" * 64,
        "t=-1700000000," + GOOD_V1,
        "t=+1700000000," + GOOD_V1,
        "t=1_700_000_000," + GOOD_V1,
        "t=1700000000,v1=" + "A" * 64,  # upper-case hex is not what sign() writes
        "t=1700000000,v1=" + "0" * 63,  # short
        "t=1700000000,v1=" + "0" * 65,
        "t=1700000000," + ",".join(f"v1={n:064x}" for n in range(9)),  # too many signatures
        GOOD + ",x=" + "y" * 1024,  # too long
        GOOD.replace(",", "\x00,"),
        b"t=1700000000",  # not text
        42,
    ],
)
def test_hostile_headers_raise_only_signature_error(header):
    with pytest.raises(SignatureError):
        verify(SECRET, header, BODY, now=1_700_000_000)
    assert webhooks.is_authentic(SECRET, header, BODY, now=1_700_000_000) is False


@pytest.mark.parametrize("body", [None, 42, "\ud800 lone surrogate"])
def test_hostile_bodies_raise_only_signature_error(body):
    with pytest.raises(SignatureError):
        verify(SECRET, GOOD, body, now=1_700_000_000)


def test_unknown_well_formed_parts_are_ignored_for_future_versions():
    assert verify(SECRET, f"{GOOD},v2=abc", BODY, now=1_700_000_000) == 1_700_000_000
    assert webhooks.is_authentic(SECRET, f" {GOOD} ", BODY, now=1_700_000_000) is True


def test_non_finite_now_is_never_within_the_tolerance():
    for now in (float("nan"), float("inf")):
        with pytest.raises(SignatureError, match="tolerance"):
            verify(SECRET, GOOD, BODY, now=now)


@given(
    header=st.one_of(
        st.text(max_size=200),
        st.lists(
            st.tuples(
                st.sampled_from(["t", "v1", "v0", "", "T", "v1 ", "é"]),
                st.one_of(
                    st.just("1700000000"),
                    st.just(GOOD_V1[3:]),
                    st.text(alphabet="0123456789abcdefé_-+ ", max_size=70),
                ),
            ),
            max_size=6,
        ).map(lambda parts: ",".join(f"{k}={v}" for k, v in parts)),
    ),
    body=st.one_of(st.just(BODY), st.binary(max_size=64)),
)
def test_property_documented_copy_agrees_with_the_library(header, body):
    documented = documented_receiver()["is_authentic"]
    assert documented(SECRET, header, body, now=1_700_000_000) == webhooks.is_authentic(
        SECRET, header, body, now=1_700_000_000
    )
