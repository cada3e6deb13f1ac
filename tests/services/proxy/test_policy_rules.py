"""`RequestPolicy.apply` as a pure function: any JSON body is passed, clamped or refused
with a 4xx naming the rule, and what passes is within the caps."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.proxy.bodies import JsonBody, Upload
from services.proxy.policy import RequestPolicy
from services.proxy.routes import PREFIX, ROUTES
from shared.errors import ApiError
from shared.policy import PolicyHolder, parse_policy
from shared.tokens import ProxyClaims, Scope

CHAT = ROUTES[PREFIX + "chat/completions"]
SPEECH = ROUTES[PREFIX + "audio/speech"]
STT = ROUTES[PREFIX + "audio/transcriptions"]
POLICY = """
[endpoints.chat]
models = ["m-small", "m-large"]
max_tokens = 100
max_n = 2
max_input_bytes = 4000
[endpoints.speech]
models = ["tts"]
max_input_chars = 20
[endpoints.transcription]
models = ["stt"]
max_input_bytes = 1000
[tiers.clamp.endpoints.chat]
over_cap = "clamp"
"""


def _holder(text: str) -> PolicyHolder:
    holder = PolicyHolder(None, service="test")
    holder.current = parse_policy(text)
    return holder


POLICY_NOW = RequestPolicy(_holder(POLICY))


def _claims(tier: str | None = None) -> ProxyClaims:
    return ProxyClaims(jti="j", sid="s", scopes=list(Scope), iat=0, exp=10, tier=tier)


def _body(payload: dict[str, Any]) -> JsonBody:
    return JsonBody(orjson.dumps(payload), payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
payloads = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m-small", "m-large", "other", ""]) | json_values,
        "max_tokens": st.integers(-5, 500) | json_values,
        "max_completion_tokens": st.integers(-5, 500) | json_values,
        "n": st.integers(-1, 5) | json_values,
        "input": st.text(max_size=40) | json_values,
        "messages": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(payload=payloads, tier=st.sampled_from([None, "clamp", "unknown"]))
def test_any_chat_body_is_passed_within_caps_or_refused_with_a_4xx(
    payload: dict[str, Any], tier: str | None
) -> None:
    try:
        out = POLICY_NOW.apply(CHAT, _claims(tier), _body(payload))
    except ApiError as exc:
        assert exc.status in (400, 403)
        assert exc.code in {
            "model_required",
            "model_not_allowed",
            "policy_limit_exceeded",
            "invalid_request",
        }
        return
    assert out.payload["model"] in ("m-small", "m-large")
    for name in ("max_tokens", "max_completion_tokens"):
        value = out.payload.get(name)
        assert value is None or value <= 100
    assert out.payload.get("n") is None or out.payload["n"] <= 2
    assert orjson.loads(out.raw) == out.payload
    if tier == "clamp":
        assert (
            out.payload.get("max_tokens") is not None
            or out.payload.get("max_completion_tokens") is not None
        )


def test_the_refusals_name_the_limit() -> None:
    with pytest.raises(ApiError, match="max_tokens exceeds the policy limit of 100"):
        POLICY_NOW.apply(CHAT, _claims(), _body({"model": "m-small", "max_tokens": 101}))
    with pytest.raises(ApiError, match="input length exceeds the policy limit of 20"):
        POLICY_NOW.apply(SPEECH, _claims(), _body({"model": "tts", "input": "x" * 21}))
    big = {"model": "m-small", "messages": [{"role": "user", "content": "x" * 5000}]}
    with pytest.raises(ApiError, match="the request body exceeds the policy limit of 4000"):
        POLICY_NOW.apply(CHAT, _claims(), _body(big))
    kept = _body({"model": "m-small", "max_tokens": 100})
    assert POLICY_NOW.apply(CHAT, _claims(), kept) is kept  # unchanged: not re-encoded


def test_an_upload_over_the_size_cap_or_of_another_model_is_refused_and_closed() -> None:
    for model, size, code in (
        ("stt", 1001, "policy_limit_exceeded"),
        ("x", 10, "model_not_allowed"),
    ):
        upload = Upload(io.BytesIO(b"a"), size, "multipart/form-data; boundary=b", model)
        with pytest.raises(ApiError) as refused:
            POLICY_NOW.check_upload(STT, _claims(), upload)
        assert refused.value.code == code
        assert upload.file.closed
    fine = Upload(io.BytesIO(b"a"), 1000, "multipart/form-data; boundary=b", "stt")
    POLICY_NOW.check_upload(STT, _claims(), fine)
    assert not fine.file.closed
    fine.close()
