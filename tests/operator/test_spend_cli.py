"""`keyveil spend` over a real usage stream, and `keyveil budgets` over a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import nats
import redis as sync_redis

from keyveil.commands.spend import sum_spend
from keyveil.servers import bootstrap_nats, start_nats
from shared.budgets import CONFIG_KEY
from shared.events import UsageEvent
from tests.operator.test_cli import keyveil


def _event(user: str, model: str, cost: int, *, ts: float, tokens: int = 10) -> UsageEvent:
    return UsageEvent(
        service="proxy",
        type="proxy.request",
        mode="proxy",
        user=user,
        app="demo",
        model=model,
        token_id=uuid.uuid4().hex,
        prompt_tokens=tokens,
        completion_tokens=tokens,
        total_tokens=2 * tokens,
        cost_micros=cost,
        price_version="2026-12-01",
        ts=ts,
    )


def test_spend_adds_up_costs_by_user_and_model_since_a_time(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "nats")
    try:
        bootstrap_nats(server.url)
        now = time.time()
        events = [
            _event("u1", "gpt-4o-mini", 1_500, ts=now - 60),
            _event("u1", "gpt-4o", 250_000, ts=now - 30),
            _event("u2", "gpt-4o-mini", 700, ts=now - 10),
            _event("u2", "gpt-4o-mini", 9_999_999, ts=now - 3 * 86_400),  # too old
        ]

        async def publish() -> None:
            nc = await nats.connect(server.url)
            try:
                for event in events:
                    await nc.jetstream().publish(event.subject, event.model_dump_json().encode())
            finally:
                await nc.close()

        asyncio.run(publish())
        done = keyveil(
            "spend", "--since", "1d", "--by", "user", "--json",
            state_dir=tmp_path, NATS_URL=server.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        assert [(r["key"], r["cost_micros"], r["calls"]) for r in rows] == [
            ("u1", 251_500, 2),
            ("u2", 700, 1),
        ]
        assert rows[0]["dollars"] == 0.2515
        table = keyveil("spend", "--since", "1d", "--by", "model", state_dir=tmp_path,
                        NATS_URL=server.url)  # fmt: skip
        assert table.returncode == 0, table.stderr
        assert "gpt-4o " in table.stdout
        assert "0.252200" in table.stdout.splitlines()[-1]  # the total, in dollars
    finally:
        server.stop()


def test_spend_skips_refusals_costs_and_old_events() -> None:
    now = time.time()
    refused = _event("u", "m", 0, ts=now).model_dump(mode="json") | {"cost_micros": None}
    rows = sum_spend(
        [refused, _event("u", "m", 5, ts=now).model_dump(mode="json")], by="token", since=now - 1
    )
    assert sorted(r.cost_micros for r in rows) == [0, 5]
    assert sum_spend([refused], by="user", since=now + 1) == []


def test_budgets_set_show_remove_reset(tmp_path: Path, redis_url: str) -> None:
    store = sync_redis.Redis.from_url(redis_url)
    store.delete(CONFIG_KEY)
    user = uuid.uuid4().hex
    try:
        done = keyveil("budgets", "set", "user", user, "micros", "day", "5000000",
                       state_dir=tmp_path, REDIS_URL=redis_url)  # fmt: skip
        assert done.returncode == 0, done.stderr
        shown = keyveil("budgets", "show", "--json", state_dir=tmp_path, REDIS_URL=redis_url)
        [state] = [json.loads(line) for line in shown.stdout.splitlines()]
        assert state == {
            "scope": "user", "subject": user, "unit": "micros", "window": "day",
            "limit": 5_000_000, "used": 0, "held": 0,
        }  # fmt: skip
        seconds = keyveil("budgets", "set", "user", user, "seconds", "month", "36000",
                          state_dir=tmp_path, REDIS_URL=redis_url)  # fmt: skip
        assert seconds.returncode == 0, seconds.stderr
        assert seconds.stdout.strip() == f"user:{user} seconds/month = 36000"
        table = keyveil("budgets", "show", state_dir=tmp_path, REDIS_URL=redis_url)
        assert f"user:{user[:24]} seconds/month" in table.stdout
        dropped = keyveil("budgets", "remove", "user", user, "seconds", "month",
                          state_dir=tmp_path, REDIS_URL=redis_url)  # fmt: skip
        assert dropped.returncode == 0
        bad = keyveil("budgets", "set", "user", user, "dollars", "day", "5",
                      state_dir=tmp_path, REDIS_URL=redis_url)  # fmt: skip
        assert bad.returncode == 2
        reset = keyveil("budgets", "reset", "user", user, state_dir=tmp_path, REDIS_URL=redis_url)
        assert reset.returncode == 0
        gone = keyveil("budgets", "remove", "user", user, "micros", "day",
                       state_dir=tmp_path, REDIS_URL=redis_url)  # fmt: skip
        assert (gone.returncode, gone.stdout.strip()) == (0, "removed")
        assert store.hlen(CONFIG_KEY) == 0
    finally:
        store.delete(CONFIG_KEY)
        store.close()
