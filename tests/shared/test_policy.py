"""The usage policy file: validation that names the field, tier overrides, live reloads."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from shared.errors import ConfigError
from shared.policy import PolicyHolder, default_policy, load_policy, parse_policy


def _reloads(result: str) -> float:
    labels = {"service": "test", "result": result}
    return REGISTRY.get_sample_value("keyveil_policy_reloads_total", labels) or 0.0


def test_the_built_in_policy_bounds_models_and_output() -> None:
    policy = default_policy()
    chat = policy.rules("chat")
    assert chat.allows_model("gpt-4o-mini")
    assert not chat.allows_model("o1-pro-most-expensive")
    assert chat.max_tokens == 4096
    assert policy.rules("realtime").client_instructions == "refuse"
    assert load_policy(None) == policy


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[endpoints.chat]\nmax_tokens = 0\n", "endpoints.chat.max_tokens"),
        ("[endpoints.chat]\nmax_tokenz = 10\n", "endpoints.chat.max_tokenz"),
        ("[endpoints.video]\nmodels = ['x']\n", "endpoints.video"),
        ("[endpoints.chat]\nmodels = []\n", "endpoints.chat.models"),
        ("[endpoints.chat]\nover_cap = 'shrug'\n", "endpoints.chat.over_cap"),
        ("[tiers.pro.endpoints.speech]\nmax_input_chars = 'many'\n", "tiers.pro.endpoints.speech"),
        ("version = 2\n", "version"),
        ("voice = 3\n", "voice"),
        ("[voice]\nmax_session_s = 1\n", "voice.max_session_s"),
        ("[voice]\nlive_modelz = []\n", "voice.live_modelz"),
        ("[endpoints.chat\n", "not valid TOML"),
    ],
)
def test_an_invalid_file_is_refused_naming_the_field(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_policy(text)
    variables = {name for name, _ in refused.value.problems}
    assert variables == {"KEYVEIL_POLICY_FILE"}
    assert named in str(refused.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KEYVEIL_POLICY_FILE: cannot be read"):
        load_policy(tmp_path / "absent.toml")


def test_a_tier_overrides_only_the_fields_it_names() -> None:
    policy = parse_policy(
        """
        [endpoints.chat]
        models = ["a", "b"]
        max_tokens = 100
        max_n = 1
        [tiers.pro.endpoints.chat]
        max_tokens = 1000
        [tiers.any.endpoints.speech]
        models = ["*"]
        [voice]
        live_models = ["gpt-live-1"]
        max_session_s = 120
        """
    )
    pro = policy.rules("chat", "pro")
    assert (pro.models, pro.max_tokens, pro.max_n) == (("a", "b"), 1000, 1)
    assert policy.rules("chat", "nobody") == policy.rules("chat")
    assert policy.rules("speech", "any").allows_model("anything-at-all")
    assert not policy.rules("speech").allows_model("anything-at-all")  # the default list
    assert policy.tier_names == frozenset({"pro", "any"})
    assert policy.voice is not None
    assert (policy.voice.live_models, policy.voice.max_session_s) == (["gpt-live-1"], 120)
    assert policy.voice.voices  # VoicePolicy's defaults for what the table leaves out
    assert default_policy().voice is None  # the broker's VOICE_* settings then


async def test_the_holder_reloads_on_sighup_and_on_change_keeping_a_good_policy(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[endpoints.chat]\nmodels = ["one"]\n')
    holder = PolicyHolder(path, service="test", poll_s=3600)  # only SIGHUP reloads
    first = holder.current
    assert first.rules("chat").models == ("one",)
    holder.start()
    try:
        path.write_text('[endpoints.chat]\nmodels = ["two"]\n')
        before = _reloads("ok")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if holder.current is not first:
                break
            await asyncio.sleep(0.01)
        assert holder.current.rules("chat").models == ("two",)
        assert _reloads("ok") == before + 1
        assert first.rules("chat").models == ("one",)  # the old object never changed
        invalid = _reloads("invalid")
        path.write_text("[endpoints.chat]\nmax_tokens = -1\n")
        assert holder.reload() is False
        assert holder.current.rules("chat").models == ("two",)
        assert _reloads("invalid") == invalid + 1
    finally:
        await holder.stop()
    assert signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, signal.default_int_handler, None)


async def test_the_holder_notices_a_file_change_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[endpoints.speech]\nmax_input_chars = 10\n")
    holder = PolicyHolder(path, service="test", poll_s=0.05)
    holder.start()
    try:
        path.write_text("[endpoints.speech]\nmax_input_chars = 20\n")
        for _ in range(100):
            if holder.current.rules("speech").max_input_chars == 20:
                break
            await asyncio.sleep(0.02)
        assert holder.current.rules("speech").max_input_chars == 20
    finally:
        await holder.stop()
