"""Config parsing reports every problem at once, naming each field."""

from __future__ import annotations

from pathlib import Path

import pytest

from portagent.durations import format_duration, parse_duration
from portagent.errors import ConfigError
from portagent.model import Protocol
from portagent.settings import load_settings
from portagent.testing.grants import TestSigner

VALID = """
host_id = "host-a"
[api]
listen = "10.0.0.1:7443"
ca_file = "ca.pem"
cert_file = "agent.pem"
key_file = "agent.key"
[policy]
guarded = ["22/tcp", "53/udp", "8000-8010/tcp"]
max_ttl = "2h"
[state]
dir = "state"
"""


def test_valid_config_resolves_relative_paths() -> None:
    settings = load_settings(VALID + TestSigner().toml(), base_dir=Path("/etc/portagent"))
    assert settings.api.ca_file == Path("/etc/portagent/ca.pem")
    assert settings.state_dir == Path("/etc/portagent/state")
    assert settings.policy.max_ttl == 7200
    assert [str(g) for g in settings.policy.guarded] == ["22/tcp", "8000-8010/tcp", "53/udp"]
    assert settings.policy.guarded[2].protocol is Protocol.UDP
    assert settings.refuse_action == "drop"


def test_every_problem_is_reported_at_once() -> None:
    text = """
host_id = 7
colour = "blue"
[api]
listen = "nowhere"
[policy]
guarded = ["22/sctp", "70000/tcp"]
min_prefix_v4 = 40
max_ttl = "soon"
[nftables]
refuse = "explode"
[[trusted_keys]]
key_id = "k"
public_key = "not base64!"
"""
    with pytest.raises(ConfigError) as info:
        load_settings(text)
    problems = "\n".join(info.value.problems)
    for expected in (
        "host_id: expected str",
        "colour: unknown setting",
        "api.listen: expected",
        "api.ca_file: required",
        "unknown protocol 'sctp'",
        "70000/tcp",
        "policy.min_prefix_v4",
        "policy.max_ttl",
        "nftables.refuse",
        "trusted_keys[0].public_key",
    ):
        assert expected in problems


def test_not_toml() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings("host_id = ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800), ("250ms", 0.25)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "1h 3", "-5s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(3725) == "1h2m"
    assert format_duration(59) == "59s"
    assert format_duration(-3) == "0s"
