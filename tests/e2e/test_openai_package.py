"""The official `openai` package, unchanged, through the signing proxy via `KeyveilAuth`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from keyveil.client import KeyveilAuth, TokenSource
from tests.stack import ORIGIN, Stack
from tests.support import TEST_PROVIDER_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> TokenSource:
    # One token source for the sync and async clients: one token issuance for the module.
    return TokenSource(stack.url("token"), origin=ORIGIN)


def base_url(stack: Stack) -> str:
    return f"{stack.url('proxy')}/api/voice-agent/proxy/v1"


async def test_async_openai_chat_stream_speech_and_transcription(
    stack: Stack, tokens: TokenSource
) -> None:
    http = httpx.AsyncClient(auth=KeyveilAuth(tokens=tokens))
    async with openai.AsyncOpenAI(
        api_key="not-a-provider-key",
        base_url=base_url(stack),
        http_client=http,  # type: ignore[arg-type]  # openai types httpx2; httpx works too
    ) as client:
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert completion.choices[0].message.content == "Hello from the fake."

        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == "Hello from the fake stream"

        speech = await client.audio.speech.create(
            model="gpt-4o-mini-tts", voice="alloy", input="hello"
        )
        assert speech.content.startswith(b"ID3")

        transcript = await client.audio.transcriptions.create(
            model="whisper-1", file=("clip.webm", b"\x00" * 2048, "audio/webm")
        )
        assert transcript.text == "transcribed 2048 bytes"
        assert TEST_PROVIDER_KEY not in json.dumps(completion.model_dump())
    assert tokens.fetches == 1


def test_sync_openai_client_shares_the_token(stack: Stack, tokens: TokenSource) -> None:
    with openai.OpenAI(
        api_key="not-a-provider-key",
        base_url=base_url(stack),
        # openai 3.x types name httpx2, and it accepts (legacy) httpx clients at runtime.
        http_client=httpx.Client(auth=KeyveilAuth(tokens=tokens)),  # type: ignore[arg-type]
    ) as client:
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from the fake stream"
    assert tokens.fetches <= 1


def test_without_keyveil_auth_the_proxy_refuses_the_openai_package(stack: Stack) -> None:
    with (
        openai.OpenAI(
            api_key="not-a-provider-key", base_url=base_url(stack), max_retries=0
        ) as client,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert TEST_PROVIDER_KEY not in str(refused.value)
