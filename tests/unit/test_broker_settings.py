"""broker.toml parsing and the small TOML/address helpers behind it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from portagent.broker.fleet.notify import EVENTS, Webhook
from portagent.broker.fleet.service_settings import (
    PolicySettings,
    ServiceSettings,
    check_files,
    load_service_settings,
)
from portagent.broker.settings import (
    load_broker_settings,
    parse_address,
    parse_api_url,
    render_broker_toml,
    toml_string,
)
from portagent.wire.errors import ConfigError

MINIMAL = """
[tls]
ca_file = "ca.pem"
cert_file = "/etc/pb/broker.pem"
key_file = "broker.key"
[signing]
key_file = "signing.key"
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.5:50051", ("192.0.2.5", 50051)),
        ("[2001:db8::5]:443", ("2001:db8::5", 443)),
        ("agent.example.net:50051", ("agent.example.net", 50051)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "192.0.2.5",
        ":50051",
        "192.0.2.5:",
        "192.0.2.5:0",
        "192.0.2.5:65536",
        "192.0.2.5:x",
        "2001:db8::5:50051",
        "[not-v6]:1",
        "exa mple:1",
        "-bad.example:1",
        "a..b:1",
    ],
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"ADDRESS:PORT|IPv6|neither"):
        parse_address(text)


def test_minimal_settings_and_defaults() -> None:
    settings = load_broker_settings(MINIMAL, base_dir=Path("/srv/pb"))
    assert settings.ca_file == Path("/srv/pb/ca.pem")
    assert settings.cert_file == Path("/etc/pb/broker.pem")  # absolute stays absolute
    assert settings.signing_key_file == Path("/srv/pb/signing.key")
    assert settings.signing_key_id is None
    assert settings.hosts == {}
    assert (settings.default_ttl, settings.timeout) == (3600, 10)


def test_hosts() -> None:
    text = (
        MINIMAL
        + """
[hosts.web1]
address = "192.0.2.5:50051"
[hosts."db.example.net"]
address = "10.0.0.7:50051"
server_name = "db.example.net"
"""
    )
    hosts = load_broker_settings(text).hosts
    assert hosts["web1"].address == "192.0.2.5:50051"
    assert hosts["db.example.net"].server_name == "db.example.net"


def test_every_problem_is_reported_at_once() -> None:
    text = """
default_ttl = "forever"
timeout = "0s"
colour = "blue"
[tls]
ca_file = 5
[signing]
key_file = "signing.key"
key_id = true
[hosts.web1]
address = "web1"
[hosts.web2]
"""
    with pytest.raises(ConfigError) as caught:
        load_broker_settings(text)
    problems = caught.value.problems
    for expected in (
        "colour: unknown setting",
        "tls.ca_file: expected str",
        "tls.cert_file: required",
        "tls.key_file: required",
        "signing.key_id: expected str",
        "hosts.web1.address: expected ADDRESS:PORT",
        "hosts.web2.address: required",
        "default_ttl: not a duration",
        "timeout: must be positive",
    ):
        assert any(p.startswith(expected) for p in problems), (expected, problems)


def test_unknown_keys_are_refused_in_every_table_with_a_hint() -> None:
    text = MINIMAL.replace("[signing]", 'ca_fiel = "x"\n[signing]\nkeyid = "k"')
    text = 'defualt_ttl = "1h"\n' + text
    text += '[hosts.web1]\naddress = "192.0.2.5:50051"\nservername = "a"\nport = 1\n'
    with pytest.raises(ConfigError) as caught:
        load_broker_settings(text)
    problems = caught.value.problems
    for expected in (
        'defualt_ttl: unknown setting; did you mean "default_ttl"?',
        'tls.ca_fiel: unknown setting; did you mean "ca_file"?',
        'signing.keyid: unknown setting; did you mean "key_id"?',
        'hosts.web1.servername: unknown setting; did you mean "server_name"?',
        "hosts.web1.port: unknown setting",
    ):
        assert expected in problems, (expected, problems)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # The shared reader's checks now apply to the broker too.
        (MINIMAL.replace('"ca.pem"', '""'), "tls.ca_file: must not be empty"),
        ('default_ttl = "' + "9" * 400 + 'd"' + MINIMAL, "default_ttl: must be between"),
        ("timeout = 5\n" + MINIMAL, "timeout: expected str"),
        (MINIMAL + '[hosts."bad host"]\naddress = "192.0.2.5:1"\n', "hosts.bad host: "),
        ("a = " + "[" * 100_000 + "]" * 100_000, "not valid TOML: nested too deeply"),
        (" " * ((1 << 20) + 1), "not a broker config"),
    ],
)
def test_bad_broker_configs_are_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_broker_settings(text)
    assert any(message in p for p in caught.value.problems), caught.value.problems


def test_invalid_toml() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_broker_settings("[tls")


@pytest.mark.parametrize("text", ["plain", 'with "quotes"', "back\\slash", "ünïcode"])
def test_toml_string_round_trips(text: str) -> None:
    assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text


@pytest.mark.parametrize("text", ["new\nline", "tab\there", "del\x7f"])
def test_toml_string_refuses_control_characters(text: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        toml_string(text)


def test_rendered_broker_toml_parses() -> None:
    text = render_broker_toml(
        host_id="web.1", address="[2001:db8::5]:50051", signing_key_id="broker-00000000"
    )
    settings = load_broker_settings(text, base_dir=Path("/d"))
    assert settings.hosts["web.1"].address == "[2001:db8::5]:50051"
    assert settings.signing_key_id == "broker-00000000"


def test_api_only_config_needs_no_direct_tables() -> None:
    text = '[api]\nurl = "https://broker.example:8443/x/"\nca = "ca.pem"\ntoken_file = "t"\n'
    settings = load_broker_settings(text, base_dir=Path("/srv/pb"))
    assert settings.api is not None
    assert (settings.api.url, settings.api.ca_file) == (
        "https://broker.example:8443/x/", Path("/srv/pb/ca.pem"))  # fmt: skip
    assert (settings.api.token_file, settings.api.cert_file) == (Path("/srv/pb/t"), None)
    assert settings.ca_file is None and settings.signing_key_file is None
    assert parse_api_url(settings.api.url) == ("broker.example", 8443, "/x")
    assert parse_api_url("https://[::1]") == ("::1", 443, "")


@pytest.mark.parametrize(
    ("api", "problem"),
    [
        ('url = "http://b:1"', "api.url: 'http://b:1': expected https://HOST[:PORT]"),
        ('url = "https://u:p@b:1"', "api.url: 'https://u:p@b:1': no user or password"),
        ('url = "https://b:1/?t=x"', "api.url: 'https://b:1/?t=x': no query or fragment"),
        ('url = "https://b:99999"', "api.url: 'https://b:99999' is not a URL"),
        ('url = "https://-b-:1"', "api.url: '-b-' in 'https://-b-:1' is neither"),
        ('url = "https://b:1"\ncert = "c.pem"', "api.cert, api.key: set both"),
        ('url = "https://b:1"\ntoken = "x"', "api.token: unknown setting; did you mean"),
        ('ca = "x"', "api.url: required"),
    ],
)
def test_api_table_refusals(api: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_broker_settings(f"[api]\n{api}\n")
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_without_api_the_direct_tables_are_required() -> None:
    with pytest.raises(ConfigError) as caught:
        load_broker_settings('default_ttl = "1h"\n')
    # The same as before [api] existed: the tables and each of their keys.
    assert caught.value.problems[:2] == ["tls: required", "signing: required"]
    assert "signing.key_file: required" in caught.value.problems


@pytest.mark.parametrize("use_service", [False, True])
def test_rendered_api_table_is_commented_unless_the_service_is_used(use_service: bool) -> None:
    text = render_broker_toml(
        host_id="web1", address="192.0.2.5:1", signing_key_id="k", use_service=use_service
    )
    api = load_broker_settings(text, base_dir=Path("/d")).api
    if use_service:
        assert api is not None and api.url == "https://127.0.0.1:8443"
        assert (api.ca_file, api.token_file) == (Path("/d/ca.pem"), Path("/d/admin.token"))
    else:
        assert api is None and "# url = " in text


# --- service.toml: issuers, policy, webhooks (ADR 0008) ------------------------------------

SERVICE_BASE = """
[service]
[service.fleet]
cert = "f.pem"
key = "f.key"
client_ca = "ca.pem"
[service.api]
cert = "a.pem"
key = "a.key"
tokens_file = "tokens"
"""


def _service(extra: str) -> ServiceSettings:
    return load_service_settings(SERVICE_BASE + extra, base_dir=Path("/etc/pb"))


def _service_problems(extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _service(extra)
    return "\n".join(caught.value.problems)


def test_service_without_policy_issuers_or_webhooks() -> None:
    settings = _service("")
    assert settings.policy is None and settings.issuers == () and settings.webhooks == ()


def test_service_policy_issuers_and_webhooks_parse() -> None:
    settings = _service(
        """
[service.policy]
file = "policy.cedar"
request_ttl = "30m"

[[service.issuers]]
name = "gh"
kind = "github"
issuer = "https://token.actions.githubusercontent.com"
audience = "portagent"

[[service.webhooks]]
url = "https://hooks.example/portagent"
format = "slack"
events = ["request.pending", "request.granted"]
secret_file = "hook.secret"
ca = "/etc/ssl/hooks.pem"

[[service.webhooks]]
url = "http://127.0.0.1:9000/hook"

[[service.webhooks]]
url = "http://[::1]:9000/hook"
"""
    )
    assert settings.policy == PolicySettings(Path("/etc/pb/policy.cedar"), 1800.0)
    assert [i.name for i in settings.issuers] == ["gh"]
    first, second, third = settings.webhooks
    assert first == Webhook(
        url="https://hooks.example/portagent",
        format="slack",
        events=frozenset({"request.pending", "request.granted"}),
        secret_file=Path("/etc/pb/hook.secret"),
        ca=Path("/etc/ssl/hooks.pem"),
    )
    assert second.format == "json" and second.events == frozenset(EVENTS)
    assert second.secret_file is None and second.ca is None
    assert third.url == "http://[::1]:9000/hook"
    assert _service('[service.policy]\nfile = "p.cedar"\n').policy == PolicySettings(
        Path("/etc/pb/p.cedar"), 3600.0
    )


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("[service.policy]\n", "service.policy.file: required"),
        ('[service.policy]\nfile = "p"\nrequest_ttl = "10s"\n', "service.policy.request_ttl:"),
        ('[service.policy]\nfile = "p"\nrequest_ttl = "30d"\n', "service.policy.request_ttl:"),
        ('[service.policy]\nfile = "p"\nttl = "1h"\n', "service.policy.ttl: unknown setting"),
        ('[service]\npolicy = "p.cedar"\n', "service.policy: expected dict"),
        ("[[service.webhooks]]\nformat = 'json'\n", "service.webhooks[0].url: required"),
        ("[[service.webhooks]]\nurl = 'ftp://x/'\n", "service.webhooks[0].url:"),
        ("[[service.webhooks]]\nurl = 'http://hooks.example/'\n", "only to 127.0.0.0/8 or [::1]"),
        ("[[service.webhooks]]\nurl = 'http://localhost:80/'\n", "only to 127.0.0.0/8 or [::1]"),
        ("[[service.webhooks]]\nurl = 'http://10.0.0.1/'\n", "only to 127.0.0.0/8 or [::1]"),
        ("[[service.webhooks]]\nurl = 'https://u:p@h.example/'\n", "user name or password"),
        ("[[service.webhooks]]\nurl = 'https://h.example:99999/'\n", "service.webhooks[0].url:"),
        ("[[service.webhooks]]\nurl = 'https://h.example/a b'\n", "spaces or control"),
        ("[[service.webhooks]]\nurl = 'https://'\n", "service.webhooks[0].url:"),
        (
            "[[service.webhooks]]\nurl = 'https://h.example/'\nformat = 'xml'\n",
            "service.webhooks[0].format: 'xml' is not one of json, slack",
        ),
        (
            "[[service.webhooks]]\nurl = 'https://h.example/'\nevents = ['request.maybe']\n",
            "service.webhooks[0].events: 'request.maybe' is not one of",
        ),
        (
            "[[service.webhooks]]\nurl = 'https://h.example/'\nevents = []\n",
            "service.webhooks[0].events: empty",
        ),
        (
            "[[service.webhooks]]\nurl = 'https://h.example/'\n"
            "events = ['request.denied', 'request.denied']\n",
            "appears twice",
        ),
        (
            "[[service.webhooks]]\nurl = 'https://h.example/'\nsecret = 'x'\n",
            "service.webhooks[0].secret: unknown setting",
        ),
        ("[[service.webhooks]]\nurl = 'https://h.example/'\nsecret_file = ''\n", "must not be"),
        ('[service]\nwebhooks = "https://h.example/"\n', "service.webhooks: expected list"),
        ("[[service.issuers]]\nname = 'gh'\n", "service.issuers[0]."),
    ],
)
def test_service_policy_and_webhook_problems_name_the_key(extra: str, problem: str) -> None:
    if extra.startswith("[service]\n"):
        # A key of [service] itself: put it in the one [service] table.
        text = SERVICE_BASE.replace("[service]\n", extra, 1)
        with pytest.raises(ConfigError) as caught:
            load_service_settings(text, base_dir=Path("/etc/pb"))
        assert problem in "\n".join(caught.value.problems)
        return
    assert problem in _service_problems(extra)


def test_service_problems_are_reported_together() -> None:
    problems = _service_problems(
        "[service.policy]\nrequest_ttl = 'soon'\n"
        "[[service.webhooks]]\nurl = 'http://example.com/'\nformat = 'xml'\n"
    )
    for expected in (
        "service.policy.file: required",
        "service.policy.request_ttl:",
        "service.webhooks[0].url:",
        "service.webhooks[0].format:",
    ):
        assert expected in problems


def test_check_files_names_policy_and_webhook_files(tmp_path: Path) -> None:
    for name in ("f.pem", "f.key", "ca.pem", "a.pem", "a.key", "tokens"):
        (tmp_path / name).write_text("x")
    (tmp_path / "keys").mkdir()
    settings = load_service_settings(
        SERVICE_BASE.replace("[service]\n", '[service]\nkeys_dir = "keys"\n', 1)
        + '[service.policy]\nfile = "missing.cedar"\n'
        "[[service.webhooks]]\nurl = 'https://h.example/'\nsecret_file = 'no.secret'\n"
        "ca = 'no-ca.pem'\n",
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as caught:
        check_files(settings)
    problems = "\n".join(caught.value.problems)
    assert "service.policy.file: cannot read" in problems
    assert "service.webhooks[0].secret_file: cannot read" in problems
    assert "service.webhooks[0].ca: cannot read" in problems
    for name in ("missing.cedar", "no.secret", "no-ca.pem"):
        (tmp_path / name).write_text("x")
    check_files(settings)
