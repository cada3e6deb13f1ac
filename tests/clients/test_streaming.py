"""Server-Sent Events parsing for streamed chat completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from keyveil.client.streaming import iter_sse_data


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def collect(*items: str) -> list[str]:
    return [data async for data in iter_sse_data(lines(*items))]


async def test_events_are_split_on_blank_lines() -> None:
    got = await collect('data: {"a":1}', "", 'data: {"b":2}', "", "data: [DONE]", "")
    assert got == ['{"a":1}', '{"b":2}', "[DONE]"]


async def test_multiline_data_comments_and_other_fields() -> None:
    got = await collect(": keep-alive", "event: x", "id: 3", "data: one", "data:two", "", "")
    assert got == ["one\ntwo"]


async def test_a_last_event_without_a_blank_line_is_kept() -> None:
    assert await collect("data: tail") == ["tail"]
