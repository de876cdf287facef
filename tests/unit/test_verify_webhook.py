"""verify_webhook (clients/python): Herald's lifecycle webhooks are signed with the Standard
Webhooks scheme; a receiver accepts only a genuine, fresh signature over the raw body."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from herald_client import WebhookVerificationError, verify_webhook
from werkzeug.datastructures import Headers

KEY = b"herald-test-key-0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OLD_KEY = b"the-previous-key-before-rotation"
OLD_SECRET = "whsec_" + base64.b64encode(OLD_KEY).decode()
NOW = 1_764_886_236
MSG_ID = "hk_0_3_1764886236123-0"
EVENT = {
    "id": MSG_ID,
    "type": "channel.occupied",
    "timestamp": "2025-12-04T22:10:36.123Z",
    "data": {"channel": "prices"},
}
BODY = json.dumps(EVENT, separators=(",", ":")).encode()


def sign(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The scheme, written out here (not the code under test): v1,<base64 HMAC-SHA256>."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(
    body: bytes = BODY, *keys: bytes, msg_id: str = MSG_ID, timestamp: int | str = NOW
) -> dict[str, str]:
    signatures = " ".join(sign(key, msg_id, timestamp, body) for key in keys or (KEY,))
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}


def verify(
    body: bytes | bytearray = BODY, hdrs: Any = None, secret: Any = SECRET, **kwargs: Any
) -> dict[str, Any]:
    return verify_webhook(body, headers(bytes(body)) if hdrs is None else hdrs, secret, now=NOW, **kwargs)


def rejected(match: str, body: bytes = BODY, hdrs: Any = None, **kwargs: Any) -> None:
    with pytest.raises(WebhookVerificationError, match=match) as caught:
        verify(body, hdrs, **kwargs)
    for text in (SECRET, SECRET.removeprefix("whsec_"), OLD_SECRET.removeprefix("whsec_")):
        assert text not in str(caught.value)


# -- what passes --


def test_a_valid_signature_returns_the_event() -> None:
    assert verify() == EVENT


def test_the_scheme_matches_a_signature_computed_independently() -> None:
    # A fixed vector: the HMAC input is "<id>.<timestamp>." followed by the body bytes.
    digest = hmac.new(KEY, b"hk_0_3_1764886236123-0.1764886236." + BODY, hashlib.sha256).digest()
    hdrs = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": "1764886236",
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }
    assert verify(hdrs=hdrs) == EVENT


def test_the_test_vector_of_the_docs_holds() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "webhook-receivers.md").read_text()
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    signature = "v1,PShyBJMfi1M1yxM8x4rJ3Uper9fqtXXPYOPTviHLAuA="
    assert BODY.decode() in doc and f"exactly those {len(BODY)} bytes" in " ".join(doc.split())
    assert secret in doc and signature in doc and MSG_ID in doc and str(NOW) in doc
    assert sign(bytes(range(32)), MSG_ID, NOW, BODY) == signature
    hdrs = {"webhook-id": MSG_ID, "webhook-timestamp": str(NOW), "webhook-signature": signature}
    assert verify(hdrs=hdrs, secret=secret) == EVENT


def test_a_batch_is_returned_whole() -> None:
    batch = {
        "type": "batch",
        "timestamp": "2025-12-04T22:10:37.000Z",
        "data": {"events": [EVENT, {**EVENT, "type": "channel.vacated"}]},
    }
    body = json.dumps(batch).encode()
    assert verify(body) == batch


def test_a_body_that_is_not_utf8_text_is_signed_as_bytes() -> None:
    body = '{"data":{"channel":"caf\u00e9"}}'.encode("utf-16")
    assert verify(body) == {"data": {"channel": "caf\u00e9"}}


def test_a_bytearray_body_is_accepted() -> None:
    assert verify(bytearray(BODY), headers()) == EVENT


def test_the_secret_may_lack_the_prefix_or_its_padding() -> None:
    assert verify(secret=SECRET.removeprefix("whsec_")) == EVENT
    key = b"k" * 31  # base64 of 31 bytes ends with "="
    unpadded = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    assert verify(hdrs=headers(BODY, key), secret=unpadded) == EVENT


# -- header names, case-insensitively, from any mapping --


def test_header_names_are_case_insensitive() -> None:
    hdrs = {
        name.upper() if i % 2 else name.title(): value for i, (name, value) in enumerate(headers().items())
    }
    assert set(hdrs) == {"Webhook-Id", "WEBHOOK-TIMESTAMP", "Webhook-Signature"}
    assert verify(hdrs=hdrs) == EVENT


def test_werkzeug_and_httpx_header_objects_are_accepted() -> None:
    assert verify(hdrs=Headers(headers())) == EVENT
    assert verify(hdrs=httpx.Headers(headers())) == EVENT


def test_an_id_sent_twice_with_different_values_is_refused() -> None:
    hdrs = Headers(headers())
    hdrs.add("Webhook-Id", "hk_forged")
    rejected("webhook-id header sent more than once", hdrs=hdrs)


# -- rotation: several signatures, several secrets --


def test_rotation_two_signatures_either_secret_on_the_receiver() -> None:
    hdrs = headers(BODY, OLD_KEY, KEY)
    assert len(hdrs["webhook-signature"].split(" ")) == 2
    assert verify(hdrs=hdrs, secret=SECRET) == EVENT
    assert verify(hdrs=hdrs, secret=OLD_SECRET) == EVENT
    assert verify(hdrs=hdrs, secret=[OLD_SECRET, SECRET]) == EVENT


def test_rotation_the_receiver_holds_both_secrets() -> None:
    for key in (KEY, OLD_KEY):
        assert verify(hdrs=headers(BODY, key), secret=[OLD_SECRET, SECRET]) == EVENT
        assert verify(hdrs=headers(BODY, key), secret=(SECRET, OLD_SECRET)) == EVENT


def test_an_unknown_signature_among_others_is_ignored() -> None:
    hdrs = headers()
    hdrs["webhook-signature"] = "v1a,c29tZXRoaW5n v1,bm90IGl0 " + hdrs["webhook-signature"] + " v1,\u00e9"
    assert verify(hdrs=hdrs) == EVENT


# -- what is refused --


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_refused(missing: str) -> None:
    hdrs = headers()
    del hdrs[missing]
    rejected(f"missing {missing} header", hdrs=hdrs)
    rejected(f"missing {missing} header", hdrs={**hdrs, missing: ""})


@pytest.mark.parametrize(
    "stamp",
    ["1764886236.5", "-1764886236", "+1764886236", "1_764_886_236", "0x6931a0dc", "\u00b2", "١٧٦٤", "", "01"],
)
def test_a_timestamp_that_is_not_ascii_integer_seconds_is_refused(stamp: str) -> None:
    hdrs = headers(timestamp=stamp)
    if stamp:
        rejected("not an integer number of Unix seconds", hdrs=hdrs)
    else:
        rejected("missing webhook-timestamp header", hdrs=hdrs)


def test_a_timestamp_of_many_digits_is_refused_without_int() -> None:
    rejected("not an integer number of Unix seconds", hdrs=headers(timestamp="9" * 5000))


def test_a_stale_timestamp_is_refused() -> None:
    rejected("301 s old, beyond the 300 s tolerance", hdrs=headers(timestamp=NOW - 301))
    assert verify(hdrs=headers(timestamp=NOW - 300)) == EVENT


def test_a_future_timestamp_is_refused() -> None:
    rejected("301 s in the future", hdrs=headers(timestamp=NOW + 301))
    assert verify(hdrs=headers(timestamp=NOW + 300)) == EVENT


def test_the_tolerance_is_configurable() -> None:
    hdrs = headers(timestamp=NOW - 60)
    assert verify(hdrs=hdrs, tolerance_seconds=60) == EVENT
    rejected("60 s old, beyond the 30 s tolerance", hdrs=hdrs, tolerance_seconds=30)
    with pytest.raises(ValueError, match="tolerance_seconds"):
        verify(tolerance_seconds=float("inf"))
    with pytest.raises(ValueError, match="tolerance_seconds"):
        verify(tolerance_seconds=-1)


def test_now_defaults_to_the_clock() -> None:
    assert verify_webhook(BODY, headers(timestamp=int(time.time())), SECRET) == EVENT
    with pytest.raises(WebhookVerificationError, match="s old"):
        verify_webhook(BODY, headers(timestamp=int(time.time()) - 3600), SECRET)


def test_a_signature_by_another_secret_is_refused() -> None:
    rejected("no webhook-signature matches", hdrs=headers(BODY, OLD_KEY))
    rejected("no webhook-signature matches", secret=[OLD_SECRET])


def test_a_tampered_body_is_refused() -> None:
    hdrs = headers()
    for i in (0, len(BODY) // 2, len(BODY) - 1):
        tampered = bytearray(BODY)
        tampered[i] ^= 0x01
        rejected("no webhook-signature matches", bytes(tampered), hdrs)


def test_a_signature_replayed_with_another_id_or_timestamp_is_refused() -> None:
    signature = headers()["webhook-signature"]
    rejected("no webhook-signature matches", hdrs={**headers(), "webhook-id": "hk_0_3_other-0"})
    rejected(
        "no webhook-signature matches",
        hdrs={**headers(timestamp=NOW + 1), "webhook-signature": signature},
    )


def test_a_str_body_is_refused_with_a_type_error() -> None:
    with pytest.raises(TypeError, match="raw request body as bytes"):
        verify_webhook(BODY.decode(), headers(), SECRET, now=NOW)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not dict"):
        verify_webhook(EVENT, headers(), SECRET, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("body", [b"", b"not json", b'{"id":', b"\xff\xfe\x00", b"[" * 100_000])
def test_a_signed_body_that_is_not_json_is_refused(body: bytes) -> None:
    rejected("the signed body is not JSON", body, headers(body))


def test_a_signed_body_that_is_not_an_object_is_refused() -> None:
    rejected("not an object", b"[1,2]", headers(b"[1,2]"))


def test_the_signature_is_checked_before_the_body_is_parsed() -> None:
    rejected("no webhook-signature matches", b"not json", headers(BODY))


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_", "whsec_====", [], [SECRET, "whsec_%%"]])
def test_a_bad_secret_is_a_value_error_that_does_not_show_it(secret: Any) -> None:
    with pytest.raises(ValueError) as caught:
        verify(secret=secret)
    assert not isinstance(caught.value, WebhookVerificationError)
    for text in ("not base64!", "%%", SECRET.removeprefix("whsec_")):
        assert text not in str(caught.value)


def test_a_bytes_secret_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        verify(secret=KEY)
