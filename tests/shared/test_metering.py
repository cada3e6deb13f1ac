"""Reading the provider's usage shapes, and the proxy's tap over relayed bodies."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from services.proxy.bodies import JsonBody
from services.proxy.routes import PREFIX, ROUTES
from services.proxy.usage import UsageTap, ask_for_usage
from shared.metering import SpendMeter, read_usage, usage_of
from shared.pricing import DEFAULT_PRICES_FILE, Usage, load_prices

PRICES = load_prices(DEFAULT_PRICES_FILE)


def test_chat_usage_with_cached_and_audio_details() -> None:
    usage = {
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 10, "audio_tokens": 5},
    }
    assert read_usage(usage) == Usage(
        input_tokens=120, cached_tokens=64, output_tokens=30, audio_output_tokens=5
    )


def test_realtime_response_done_splits_cached_text_and_audio() -> None:
    done = {
        "type": "response.done",
        "response": {
            "id": "resp_1",
            "usage": {
                "total_tokens": 1750,
                "input_tokens": 1200,
                "output_tokens": 550,
                "input_token_details": {
                    "text_tokens": 200,
                    "audio_tokens": 1000,
                    "cached_tokens": 150,
                    "cached_tokens_details": {"text_tokens": 50, "audio_tokens": 100},
                },
                "output_token_details": {"text_tokens": 50, "audio_tokens": 500},
            },
        },
    }
    usage = usage_of(done)
    assert usage == Usage(
        input_tokens=1200,
        cached_tokens=50,
        audio_input_tokens=1000,
        cached_audio_tokens=100,
        output_tokens=550,
        audio_output_tokens=500,
    )
    # $4 text in, $0.40 cached, $32 audio in, $0.40 cached audio, $16 / $64 out.
    assert PRICES.cost("gpt-realtime", usage) == 600 + 20 + 28_800 + 40 + 800 + 32_000


def test_transcription_duration_speech_and_nonsense() -> None:
    assert read_usage({"type": "duration", "seconds": 42}) == Usage(seconds=42.0)
    speech = {"input_tokens": 10, "output_tokens": 900, "total_tokens": 910}
    assert read_usage(speech, audio_output=True) == Usage(
        input_tokens=10, output_tokens=900, audio_output_tokens=900
    )
    assert read_usage({"prompt_tokens": "9"}) is None
    assert read_usage(None) is None
    assert read_usage({"type": "duration", "seconds": True}) is None
    assert usage_of({"choices": []}) is None


def _sse(*events: dict[str, object], named: bool = False) -> bytes:
    out = b""
    for event in events:
        head = f"event: {event.get('type')}\n".encode() if named else b""
        out += head + b"data: " + orjson.dumps(event) + b"\n\n"
    return out


_COMPLETED = {
    "type": "response.completed",
    "response": {
        "output": [{"type": "message", "content": [{"text": "x" * 20_000}]}],
        "usage": {"input_tokens": 33, "output_tokens": 4000, "total_tokens": 4033},
    },
}
_STREAM = _sse(
    {"type": "response.created", "response": {"usage": None}},
    *({"type": "response.output_text.delta", "delta": "x" * 100} for _ in range(50)),
    _COMPLETED,
    named=True,
)


@given(cuts=st.lists(st.integers(1, len(_STREAM) - 1), max_size=30))
def test_a_large_final_event_is_found_however_the_stream_is_cut(cuts: list[int]) -> None:
    tap = UsageTap(sse=True, json_body=False)
    start = 0
    for cut in sorted(set(cuts)):
        tap.feed(_STREAM[start:cut])
        start = cut
    tap.feed(_STREAM[start:])
    assert tap.result() == Usage(input_tokens=33, output_tokens=4000)


def test_the_chat_usage_chunk_before_done_and_a_json_body() -> None:
    chunk = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
    tap = UsageTap(sse=True, json_body=False)
    tap.feed(_sse({"choices": [{"delta": {"content": "hi"}}]}, chunk) + b"data: [DONE]\n\n")
    assert tap.result() == Usage(input_tokens=9, output_tokens=3)
    whole = UsageTap(sse=False, json_body=True)
    whole.feed(orjson.dumps({"usage": {"input_tokens": 5, "output_tokens": 1}}))
    assert whole.result() == Usage(input_tokens=5, output_tokens=1)
    plain = UsageTap(sse=False, json_body=False, characters=12)
    plain.feed(b"ID3 audio")
    assert plain.result() == Usage(characters=12)
    nothing = UsageTap(sse=True, json_body=False)
    nothing.feed(b"data: {}\n\n")
    assert nothing.result() is None


def test_streaming_chat_requests_ask_for_usage_and_keep_their_options() -> None:
    chat = ROUTES[PREFIX + "chat/completions"]
    payload = {"model": "m", "stream": True, "stream_options": {"x": 1}}
    changed = ask_for_usage(chat, JsonBody(orjson.dumps(payload), payload))
    assert changed.payload["stream_options"] == {"x": 1, "include_usage": True}
    assert orjson.loads(changed.raw) == changed.payload
    unchanged = {"model": "m", "stream": False}
    body = JsonBody(orjson.dumps(unchanged), unchanged)
    assert ask_for_usage(chat, body) is body
    responses = ROUTES[PREFIX + "responses"]
    streamed = {"model": "m", "stream": True}
    body = JsonBody(orjson.dumps(streamed), streamed)
    assert ask_for_usage(responses, body) is body


@given(ticks=st.lists(st.floats(0.001, 30, allow_nan=False), min_size=1, max_size=40))
def test_voice_ticks_cost_exactly_what_their_total_costs(ticks: list[float]) -> None:
    meter = SpendMeter(PRICES)
    billed = Usage()
    spent = 0
    for tick in ticks:
        priced = meter.record(
            model="gpt-live-1", app=None, usage=Usage(seconds=tick), already=billed
        )
        assert priced.cost_micros is not None
        assert priced.cost_micros >= 0
        spent += priced.cost_micros
        billed = billed + Usage(seconds=tick)
    assert spent == PRICES.cost("gpt-live-1", billed)
