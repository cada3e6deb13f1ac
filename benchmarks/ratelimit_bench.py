"""Rate-limit accuracy across proxy replicas: one token, one limit, many replicas at once.

Runs `keyveil up --fake-upstream --proxy-replicas R` with a per-token limit of N per
minute, then fires M signed chat requests concurrently, spread round-robin over the
replicas. With the limit held in Redis (one atomic script per request) the replicas
together must admit N, not N x R; GCRA refills N/60 per second, so a run lasting t
seconds may admit up to N + t*N/60 (the `ceiling` printed).

    .venv/bin/python -m benchmarks.ratelimit_bench --replicas 3 --limit 50 --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from benchmarks.common import add_json_option, write_json
from tests.stack import issue_token, running_stack, signed_headers

CHAT_PATH = "/api/voice-agent/proxy/v1/chat/completions"
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


async def fire(urls: list[str], token: dict[str, str], total: int) -> tuple[list[int], float]:
    # Signed ahead of time (each with its own nonce), so the burst is as tight as possible.
    prepared = []
    for n in range(total):
        url = urls[n % len(urls)]
        headers = signed_headers(
            token, method="POST", path=CHAT_PATH, body=BODY.encode(), authority=urlsplit(url).netloc
        )
        prepared.append((f"{url}{CHAT_PATH}", headers))
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(client.post(url, content=BODY, headers=headers) for url, headers in prepared)
        )
        elapsed = time.perf_counter() - started
    return [a.status_code for a in answers], elapsed


def measure(replicas: int, limit: int, total: int) -> dict[str, float]:
    env = {
        "VOICE_AGENT_PROXY_RATE_LIMIT": str(limit),
        "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "1000000",
        "VOICE_AGENT_RATE_LIMIT": "1000",
        "LOG_LEVEL": "WARNING",
    }
    with (
        tempfile.TemporaryDirectory(prefix="keyveil-rl-") as tmp,
        running_stack(
            Path(tmp), args=("--fake-upstream", "--proxy-replicas", str(replicas)), env=env
        ) as stack,
    ):
        token = issue_token(stack).json()
        statuses, elapsed = asyncio.run(fire(stack.info["proxy_urls"], token, total))
    allowed = statuses.count(200)
    limited = statuses.count(429)
    ceiling = limit + int(elapsed * limit / 60)
    print(
        f"{replicas} proxy replicas, limit {limit}/min per token, {total} concurrent requests "
        f"in {elapsed:.2f}s: {allowed} allowed, {limited} limited, "
        f"{total - allowed - limited} other (ceiling {ceiling})"
    )
    return {
        "replicas": replicas,
        "limit": limit,
        "requests": total,
        "allowed": allowed,
        "limited": limited,
        "other": total - allowed - limited,
        "seconds": round(elapsed, 3),
        "ceiling": ceiling,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    add_json_option(parser)
    args = parser.parse_args()
    write_json(args.json, measure(args.replicas, args.limit, args.requests))


if __name__ == "__main__":
    main()
