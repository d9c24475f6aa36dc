"""Config parsing reports every problem at once, naming each field."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portagent.agent.settings import load_settings, load_settings_file, parse_listen
from portagent.testing.grants import TestSigner
from portagent.wire.config import MAX_CONFIG_BYTES
from portagent.wire.durations import format_duration, parse_duration
from portagent.wire.errors import ConfigError
from portagent.wire.ports import Protocol

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


# ---- hostile config files: one clear ConfigError, never another exception ----------------


def test_unknown_settings_in_every_table_are_reported() -> None:
    text = VALID.replace("[policy]", 'lisen = "x"\n[policy]\nmax_tll = "1h"')
    text = text.replace('dir = "state"', 'dir = "state"\nDir = "x"')
    text += TestSigner().toml() + 'publickey = "x"\n[agent]\nreconcile = "5s"\n'
    with pytest.raises(ConfigError) as info:
        load_settings(text)
    problems = "\n".join(info.value.problems)
    for name in ("api.lisen", "policy.max_tll", "publickey", "agent.reconcile", "state.Dir"):
        assert f"{name}: unknown setting" in problems, (name, problems)


def test_unknown_settings_get_a_did_you_mean_hint() -> None:
    text = VALID.replace("[policy]", '[policy]\nmax_tll = "1h"\nGuarded = []')
    text = text.replace("[state]", '[nftables]\nrefused = "drop"\n[state]')
    text += TestSigner().toml() + 'publickey = "x"\n[admin]\nsocket_path = "s"\nzzz = 1\n'
    text += '[agnet]\nreconcile_interval = "5s"\n'
    with pytest.raises(ConfigError) as info:
        load_settings(text)
    problems = info.value.problems
    for expected in (
        'policy.max_tll: unknown setting; did you mean "max_ttl"?',
        'policy.Guarded: unknown setting; did you mean "guarded"?',
        'nftables.refused: unknown setting; did you mean "refuse"?',
        'trusted_keys[0].publickey: unknown setting; did you mean "public_key"?',
        'admin.socket_path: unknown setting; did you mean "socket"?',
        'agnet: unknown setting; did you mean "agent"?',
    ):
        assert expected in problems, (expected, problems)
    # No hint when nothing is close.
    assert "admin.zzz: unknown setting" in problems


def test_a_huge_unknown_key_is_refused_cheaply() -> None:
    # The hint compares a bounded prefix: difflib is quadratic in the name's length.
    with pytest.raises(ConfigError) as info:
        load_settings("k" * 100_000 + " = 1\n" + VALID + TestSigner().toml())
    assert any(p.startswith("k" * 100) and "unknown setting" in p for p in info.value.problems)


def test_an_oversized_config_names_the_agent() -> None:
    with pytest.raises(ConfigError, match="not an agent config"):
        load_settings(" " * (MAX_CONFIG_BYTES + 1))


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("max_ttl", '"' + "9" * 400 + 'd"', "policy.max_ttl: must be between"),
        ("max_ttl", '"0s"', "policy.max_ttl: must be between"),
        ("max_ttl", '"400d"', "policy.max_ttl: must be between"),
        ("clock_skew", '"2d"', "policy.clock_skew: must be between"),
        ("keep_established_max", '"0s"', "policy.keep_established_max"),
    ],
)
def test_durations_are_finite_and_bounded(setting: str, value: str, message: str) -> None:
    text = VALID.replace('max_ttl = "2h"', f"{setting} = {value}") + TestSigner().toml()
    with pytest.raises(ConfigError, match=message):
        load_settings(text)


def test_reconcile_interval_bounds() -> None:
    for value in ('"1ms"', '"2d"'):
        with pytest.raises(ConfigError, match=r"agent\.reconcile_interval"):
            load_settings(VALID + f"[agent]\nreconcile_interval = {value}\n" + TestSigner().toml())


@pytest.mark.parametrize(
    ("listen", "ok"),
    [
        ("10.0.0.1:7443", True),
        ("[::]:7443", True),
        ("[fd00::1]:1", True),
        ("agent.example:65535", True),
        ("10.0.0.1", False),
        ("10.0.0.1:0", False),
        ("10.0.0.1:65536", False),
        ("10.0.0.1:07443", False),
        ("10.0.0.300:7443", False),
        ("::1:7443", False),
        ("[::1]7443", False),
        ("[nothing]:7443", False),
        (":7443", False),
        ("-x:7443", False),
        ("10.0.0.1:+1", False),
        ("10.0.0.1:٣", False),
    ],
)
def test_api_listen_is_parsed(listen: str, ok: bool) -> None:
    text = VALID.replace('"10.0.0.1:7443"', f'"{listen}"') + TestSigner().toml()
    if ok:
        assert load_settings(text).api.listen == listen
    else:
        with pytest.raises(ConfigError, match=r"api\.listen"):
            load_settings(text)


@given(st.text(max_size=60))
def test_parse_listen_accepts_only_what_it_can_write_back(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except ValueError:
        return
    written = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert written == text


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (('dir = "state"', 'dir = ""'), "state.dir: must not be empty"),
        (('dir = "state"', 'dir = "a\\u0000b"'), "state.dir: must not contain a NUL"),
        (('ca_file = "ca.pem"', 'ca_file = " "'), "api.ca_file: must not be empty"),
        (('host_id = "host-a"', 'host_id = "host a"'), "host_id:"),
        (('host_id = "host-a"', 'host_id = "-x"'), "host_id:"),
    ],
)
def test_paths_and_names_are_checked(replace: tuple[str, str], message: str) -> None:
    text = VALID.replace(*replace) + TestSigner().toml()
    with pytest.raises(ConfigError, match=message):
        load_settings(text)


def test_blank_key_id_is_refused() -> None:
    text = VALID + TestSigner().toml().replace('key_id = "', 'key_id = " ', 1)
    with pytest.raises(ConfigError, match=r"trusted_keys\[0\].key_id"):
        load_settings(text)


def test_deeply_nested_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_settings("a = " + "[" * 100_000 + "]" * 100_000)


def test_config_files_that_are_not_text_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_settings_file(fifo)  # returns at once: a FIFO must not block start-up
    with pytest.raises(ConfigError, match="not a regular file"):
        load_settings_file(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"host_id = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings_file(binary)
    big = tmp_path / "big.toml"
    with big.open("wb") as handle:
        handle.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than"):
        load_settings_file(big)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings_file(tmp_path / "missing.toml")


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_any_text_is_settings_or_a_config_error(text: str) -> None:
    try:
        load_settings(VALID + text)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


def _toml(value: object) -> str:
    """A TOML value (inline tables, arrays) for the property test below."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value).replace("inf", "inf").lower() if value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


@settings(max_examples=300)
@given(
    st.recursive(
        st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from(
        ["host_id", "api", "policy", "trusted_keys", "state", "admin", "agent", "nftables"]
    ),
)
def test_any_value_in_any_setting_is_a_config_error_or_valid(value: object, name: str) -> None:
    doc = tomllib.loads(VALID + TestSigner().toml())
    doc[name] = value
    text = "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items())
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # e.g. a float repr TOML does not take; not what this test is about
    try:
        load_settings(text)
    except ConfigError as exc:
        assert exc.problems


def test_audit_section_defaults_and_limits() -> None:
    base = Path("/etc/portagent")
    default = load_settings(VALID + TestSigner().toml(), base_dir=base)
    assert default.audit.enabled
    assert default.audit_path == Path("/etc/portagent/state/audit.log")
    custom = load_settings(
        VALID
        + '[audit]\nfile = "/var/log/pa/audit.log"\nmax_file_mib = 4\nkeep_files = 2\n'
        + 'sync_interval = "500ms"\nanchor_interval = "1m"\n'
        + TestSigner().toml(),
        base_dir=base,
    )
    assert custom.audit_path == Path("/var/log/pa/audit.log")
    assert (custom.audit.max_file_bytes, custom.audit.keep_files) == (4 << 20, 2)
    assert (custom.audit.sync_interval, custom.audit.anchor_interval) == (0.5, 60.0)
    with pytest.raises(ConfigError) as caught:
        load_settings(
            VALID
            + '[audit]\nenabled = "yes"\nmax_file_mib = 0\nkeep_files = 5000\nsize = 1\n'
            + TestSigner().toml(),
            base_dir=base,
        )
    problems = " | ".join(caught.value.problems)
    for name in ("audit.enabled", "audit.max_file_mib", "audit.keep_files", "audit.size"):
        assert name in problems, problems
