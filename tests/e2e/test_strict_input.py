"""Strict parsing through the Compose nginx (issue 16, item 6): a sample of the
property test of tests/integration/test_bad_input.py, every request parameter
of /stream, /history, /publish and /channels/<x> fed Unicode digits, huge
values, repeats and odd bytes: never a 5xx, and every 4xx a JSON error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.support import Stack
from tests.support import strict_input as strict

pytestmark = pytest.mark.e2e

SAMPLE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SAMPLE
@given(call=st.one_of(strict.stream_calls(), strict.history_calls()))
def test_stream_service_parameters_through_nginx(stack: Stack, call: strict.Call) -> None:
    strict.check_answer(call, call.send(stack.base_url))


@SAMPLE
@given(call=st.one_of(strict.publish_calls(["e2e.strict"]), strict.channel_calls()), authorized=st.booleans())
def test_publisher_parameters_through_nginx(stack: Stack, call: strict.Call, authorized: bool) -> None:
    if authorized:
        call.headers.setdefault("Authorization", f"Bearer {stack.token}")
    strict.check_answer(call, call.send(stack.base_url))


def test_the_unicode_limit_that_was_a_500_through_nginx(stack: Stack) -> None:
    answer = stack.session.get(stack.url("/history?channel=a&limit=%C2%B2"), timeout=10)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_limit"
