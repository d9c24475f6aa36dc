"""The portagent-broker command line: the direct path with a fake agent client (no
network), the service commands against a real `portagent-broker serve` subprocess."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from portagent.agent.settings import load_settings, load_settings_file
from portagent.agent.verify import Verifier
from portagent.broker import cli, pki
from portagent.broker import client as agent_client
from portagent.broker.client import AgentRefusedError, AgentUnreachableError, TlsFiles
from portagent.testing.broker_service import BrokerService, broker_service, make_pki
from portagent.v1 import agent_pb2 as pb
from portagent.wire.ports import parse_port_spec


class FakeClient:
    """Stands in for AgentClient: records calls, answers like an agent, or fails."""

    instances: ClassVar[list[FakeClient]] = []
    fail_with: ClassVar[Exception | None] = None

    def __init__(
        self, address: str, tls: TlsFiles, *, server_name: str | None = None, timeout: float = 10.0
    ) -> None:
        self.address, self.timeout = address, timeout
        self.applied: list[Any] = []
        self.revoked: list[Any] = []
        FakeClient.instances.append(self)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def apply(self, signed: Any) -> Any:
        if self.fail_with:
            raise self.fail_with
        self.applied.append(signed)
        return pb.GrantStatus(grant=pb.Grant.FromString(signed.grant), state=pb.GRANT_STATE_ACTIVE)

    def revoke(self, signed: Any) -> Any:
        self.revoked.append(signed)
        return None


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pki.init_dev_setup(
        tmp_path,
        host_id="web1",
        agent_address="192.0.2.5:50051",
        guarded=[parse_port_spec("22/tcp")],
    )
    FakeClient.instances = []
    FakeClient.fail_with = None
    monkeypatch.setattr(agent_client, "AgentClient", FakeClient)
    monkeypatch.setenv(cli.CONFIG_ENV, str(tmp_path / "broker.toml"))
    return tmp_path


GRANT = [
    "grant",
    "--host",
    "web1",
    "--source",
    "192.0.2.10",
    "--port",
    "22",
    "--ttl",
    "5m",
    "--subject",
    "alice",
]


def test_grant_prints_only_the_id_and_the_agent_verifies_it(
    dev: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(GRANT) == 0
    grant_id = capsys.readouterr().out
    (client,) = FakeClient.instances
    assert client.address == "192.0.2.5:50051" and client.timeout == 10
    (signed,) = client.applied
    settings = load_settings_file(dev / "agent.toml")
    verifier = Verifier(settings.host_id, settings.trusted_keys, settings.policy)
    grant = verifier.verify_grant(
        signed.grant,
        signed.signature,
        signed.key_id,
        pb.Grant.FromString(signed.grant).issue_time.seconds,
    )
    assert grant_id == grant.grant_id + "\n"


def test_grant_json(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*GRANT, "-o", "json", "--reason", "CHG-1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == "active" and out["reason"] == "CHG-1"
    assert (out["ports"], out["protocol"]) == ("22", "tcp")
    assert out["sources"] == ["192.0.2.10/32"] and out["expire_time"].endswith("Z")
    assert out["apply_time"] is None and out["revoke_time"] is None  # not set by the agent
    assert 0 < out["remaining_seconds"] <= 300


def _listed_status(grant_id: str, state: int = pb.GRANT_STATE_ACTIVE) -> pb.GrantStatus:
    status = pb.GrantStatus(state=state)
    status.grant.grant_id, status.grant.host_id = grant_id, "web1"
    status.grant.source_prefixes.append("192.0.2.10/32")
    status.grant.protocol, status.grant.port_start, status.grant.port_end = pb.PROTOCOL_UDP, 53, 54
    status.grant.expire_time.FromJsonString("2099-01-01T00:00:00Z")
    status.apply_time.FromJsonString("2026-11-30T14:05:00.250Z")
    status.usage.connections = 1
    flow = status.usage.flows.add(protocol="udp", source_address="192.0.2.10", source_port=999)
    flow.destination_address, flow.destination_port, flow.bytes_in = "192.0.2.5", 53, 80
    return status


class ListingClient(FakeClient):
    def list(self) -> list[pb.GrantStatus]:
        return [_listed_status("g-1"), _listed_status("g-2", pb.GRANT_STATE_REVOKED)]

    def get(self, grant_id: str) -> pb.GrantStatus:
        return _listed_status(grant_id)

    def watch(self, after: int) -> list[pb.Event]:
        event = pb.Event(sequence=after + 1, kind=pb.EVENT_KIND_CONNECTION_CLOSED, grant_id="g-1")
        event.event_time.FromJsonString("2026-11-30T14:05:01Z")
        event.flow.CopyFrom(_listed_status("g-1").usage.flows[0])
        return [event]


def test_list_get_watch_json_use_the_shared_projection(
    dev: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_client, "AgentClient", ListingClient)
    assert cli.main(["list", "--host", "web1", "-o", "json"]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert (first["grant_id"], first["state"], second["state"]) == ("g-1", "active", "revoked")
    assert (first["ports"], first["protocol"]) == ("53-54", "udp")
    assert first["expire_time"] == "2099-01-01T00:00:00Z"
    assert first["apply_time"] == "2026-11-30T14:05:00.250Z"
    assert first["connections"] == 1 and first["flows"][0]["source_port"] == 999
    assert first["flows"][0]["state"] is None and "timeout" not in first["flows"][0]
    assert cli.main(["get", "--host", "web1", "g-7", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["grant_id"] == "g-7"
    assert cli.main(["watch", "--host", "web1", "--count", "1", "-o", "json"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert (event["sequence"], event["time"], event["kind"], event["reason"]) == (
        1, "2026-11-30T14:05:01Z", "connection_closed", "")  # fmt: skip
    assert (event["flow"]["source"], event["flow"]["source_port"]) == ("192.0.2.10", 999)


def test_list_get_watch_tables(
    dev: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    local_zone: Callable[[str], None],
) -> None:
    monkeypatch.setattr(agent_client, "AgentClient", ListingClient)
    local_zone("UTC0")  # times print as local time with their offset
    for output in ([], ["-o", "table"], ["-o", "text"]):  # text: the old name, same output
        assert cli.main(["list", "--host", "web1", *output]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:4] == ["GRANT_ID", "STATE", "SUBJECT", "PORT"]
        assert "53-54/udp" in lines[1] and lines[2].split()[1] == "revoked"
    assert cli.main(["get", "--host", "web1", "g-7"]) == 0
    out = capsys.readouterr().out
    assert "expire_time:       2099-01-01 00:00:00 +00:00" in out
    assert "flow:" in out and "udp 192.0.2.10:999 -> 192.0.2.5:53" in out
    assert cli.main(["watch", "--host", "web1", "--count", "1"]) == 0
    assert "#1 2026-11-30 14:05:01 +00:00 connection_closed g-1" in capsys.readouterr().out


def test_default_ttl_and_agent_override(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [a for a in GRANT if a not in ("--ttl", "5m")]
    assert cli.main([*args, "--agent", "[::1]:6000"]) == 0
    (client,) = FakeClient.instances
    assert client.address == "[::1]:6000"
    grant = pb.Grant.FromString(client.applied[0].grant)
    assert grant.expire_time.seconds - grant.not_before.seconds in (3600, 3601)


def test_config_option_after_the_command(dev: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.CONFIG_ENV)
    assert cli.main([*GRANT, "--config", str(dev / "broker.toml")]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "example.com"], "--source: 'example.com' is not an IP address or network"),
        (["--port", "22/icmp"], "--port: unknown protocol 'icmp'"),
        (["--ttl", "0s"], "--ttl: '0s' must be longer than 0s"),
        (["--port", "53/udp", "--protocol", "tcp"], "--protocol: 'tcp' contradicts --port"),
        (["--host", "db9"], "--host: 'db9' is not in"),
        (["--agent", "nowhere"], "--agent: expected ADDRESS:PORT"),
    ],
)
def test_bad_input_exits_2_naming_the_field(
    dev: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli.main([*GRANT, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"portagent-broker: {message}")
    assert not any(c.applied for c in FakeClient.instances)


def test_exact_source_message(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*GRANT, "--source", "example.com"]) == 2
    assert capsys.readouterr().err == (
        "portagent-broker: --source: 'example.com' is not an IP address or network\n"
    )


def test_refusal_exits_1(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    FakeClient.fail_with = AgentRefusedError(
        "PERMISSION_DENIED",
        "SOURCE_TOO_BROAD: source_prefixes: 10.0.0.0/8 is broader than /16",
        reason="SOURCE_TOO_BROAD",  # from the agent's ErrorInfo (test_api_limits)
        field="source_prefixes",
    )
    assert cli.main(GRANT) == 1
    assert capsys.readouterr().err == (
        "portagent-broker: refused by agent: PERMISSION_DENIED SOURCE_TOO_BROAD: "
        "source_prefixes: 10.0.0.0/8 is broader than /16\n"
    )


def test_unreachable_exits_2(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    FakeClient.fail_with = AgentUnreachableError("192.0.2.5:50051", "connection refused")
    assert cli.main(GRANT) == 2
    assert capsys.readouterr().err == (
        "portagent-broker: cannot reach agent at 192.0.2.5:50051: connection refused\n"
    )


def test_timeout_names_the_grant_to_check(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    FakeClient.fail_with = AgentUnreachableError(
        "192.0.2.5:50051", "no answer within 10s", timed_out=True
    )
    assert cli.main(GRANT) == 2
    err = capsys.readouterr().err
    assert "may have been applied" in err and "portagent-broker get --host web1 g-" in err


def test_revoke_unknown_grant(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["revoke", "--host", "web1", "g-0123456789abcdef"]) == 0
    assert "did not know this grant" in capsys.readouterr().out
    assert cli.main(["revoke", "--host", "web1", "../x"]) == 2
    assert capsys.readouterr().err.startswith("portagent-broker: GRANT_ID: '../x'")


def test_missing_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cli.CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(GRANT) == 2
    assert capsys.readouterr().err.startswith("portagent-broker: broker.toml: ")


def test_missing_signing_key(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dev / "signing.key").unlink()
    assert cli.main(GRANT) == 2
    assert capsys.readouterr().err.startswith("portagent-broker: signing.key_file: cannot read")


def test_init_refuses_then_forces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "init",
        "--dir",
        str(tmp_path / "d"),
        "--host-id",
        "web1",
        "--agent-address",
        "127.0.0.1:50051",
        "--guard",
        "22/tcp",
        "--guard",
        "8000-8010/tcp",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"/signing\.key +0600", out) and "portagent-broker grant --host web1" in out
    assert cli.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main([*args, "--force"]) == 0
    assert cli.main([*args[:-1], "22/icmp", "--force"]) == 2
    assert capsys.readouterr().err.startswith("portagent-broker: --guard: unknown protocol")


def test_keygen_and_pubkey_print_a_trusted_keys_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "signing-2.key"
    assert cli.main(["keygen", "--out", str(key)]) == 0
    keygen_out = capsys.readouterr().out
    assert key.stat().st_mode & 0o777 == 0o600
    assert cli.main(["keygen", "--out", str(key)]) == 2
    capsys.readouterr()
    assert cli.main(["pubkey", str(key)]) == 0
    entry = capsys.readouterr().out
    assert entry in keygen_out
    (trusted,) = tomllib.loads(entry)["trusted_keys"]
    # The printed entry is one the agent accepts as is.
    agent = load_settings(
        f'host_id = "h"\n[api]\nlisten = "127.0.0.1:1"\nca_file = "a"\n'
        f'cert_file = "b"\nkey_file = "c"\n[policy]\nguarded = ["22/tcp"]\n'
        f"{entry}"
    )
    assert agent.trusted_keys[0].key_id == trusted["key_id"]


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--help"], ["grant", "--help"], ["init", "--help"]):
        with pytest.raises(SystemExit) as caught:
            cli.main(args)
        assert caught.value.code == 0
        assert "example" in capsys.readouterr().out


# --- through the broker service: a real `serve` subprocess (portagent.testing.broker_service)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerService]:
    directory = tmp_path_factory.mktemp("service")
    with broker_service(directory / "broker", make_pki(directory / "pki")) as broker:
        yield broker


def _service_config(service: BrokerService, directory: Path, *, with_cert: bool = False) -> Path:
    pki_files = service.pki
    if with_cert:  # the admin client certificate (CN "ops") instead of a token
        credentials = f'cert = "{pki_files.admin_cert}"\nkey = "{pki_files.admin_key}"\n'
    else:
        token = directory / "admin.token"
        pki.write_atomic(token, pki_files.admin_token.encode() + b"\n", 0o600)
        credentials = f'token_file = "{token}"\n'
    config = directory / "broker.toml"
    config.write_text(f'[api]\nurl = "{service.api_url}"\nca = "{pki_files.ca_pem}"\n{credentials}')
    return config


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_grant_list_revoke_through_the_service(
    service: BrokerService, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv(cli.CONFIG_ENV, str(_service_config(service, tmp_path)))
    monkeypatch.setattr(agent_client, "AgentClient", FakeClient)  # must not be used
    FakeClient.instances = []
    assert _run(capsys, "hosts", "add", "svc1", "--label", "env=prod")[0] == 0
    status, out, err = _run(capsys, *GRANT[:2], "svc1", *GRANT[3:], "--reason", "INC-42")
    assert (status, err) == (0, "")
    grant_id = out.strip()
    assert grant_id.startswith("g-") and FakeClient.instances == []

    status, out, _ = _run(capsys, "grants", "--label", "env=prod", "--state", "active")
    header, *rows = out.splitlines()
    assert header.split() == ["GRANT", "HOST", "SUBJECT", "SOURCES", "PORT", "STATE", "EXPIRES",
                              "CONNS", "BYTES", "LAST", "SEEN"]  # fmt: skip
    (row,) = [r.split() for r in rows if r.startswith(grant_id)]
    assert row[1:7] == ["svc1", "alice", "192.0.2.10/32", "22/tcp", "active", "in"]
    status, out, _ = _run(capsys, "grants", "--host", "svc1", "-o", "json")
    (listed,) = [g for g in json.loads(out) if g["grant_id"] == grant_id]
    assert (listed["reason"], listed["created_by"]) == ("INC-42", "admin:tests")
    assert listed["request_id"].startswith("cli-")
    assert json.loads(_run(capsys, "grants", "--label", "env=none", "-o", "json")[1]) == []

    assert _run(capsys, "revoke", grant_id, "--reason", "done")[1] == f"{grant_id}: revoked\n"
    assert _run(capsys, "revoke", grant_id)[1] == f"{grant_id}: revoked\n"  # idempotent
    out = _run(capsys, "grants", "--host", "svc1", "--state", "revoked", "-o", "json")[1]
    assert [g["revoke_reason"] for g in json.loads(out)] == ["done"]

    status, out, _ = _run(capsys, "hosts")
    assert out.splitlines()[0].split() == ["HOST", "LABELS", "VERSION", "CONNECTED", "SINCE",
                                           "GEN", "ACKED", "DRIFT"]  # fmt: skip
    (row,) = [r.split() for r in out.splitlines() if r.startswith("svc1 ")]
    assert row == ["svc1", "env=prod", "-", "-", "2", "0", "no"]  # created + revoked
    host = json.loads(_run(capsys, "hosts", "label", "svc1", "env=dev", "role=db", "-o", "json")[1])
    assert host["labels"] == {"env": "dev", "role": "db"}
    assert _run(capsys, "hosts", "--label", "role=db")[1].count("svc1") == 1


def test_service_refusals_and_exit_codes(
    service: BrokerService, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv(cli.CONFIG_ENV, str(_service_config(service, tmp_path)))
    assert _run(capsys, "hosts", "add", "svc2")[0] == 0
    status, _, err = _run(capsys, *GRANT[:2], "svc2", *GRANT[3:7], "--ttl", "0s", *GRANT[9:])
    assert (status, err) == (
        2, "portagent-broker: ttl: '0s' must be longer than 0s (INVALID_ARGUMENT INVALID_TTL)\n"
    )  # fmt: skip
    status, _, err = _run(capsys, *GRANT[:2], "nohost", *GRANT[3:])
    assert status == 1 and err.startswith("portagent-broker: host: ") and "UNKNOWN_HOST" in err
    status, _, err = _run(capsys, "hosts", "add", "svc2")
    assert status == 1 and "(ALREADY_EXISTS HOST_EXISTS)" in err
    status, _, err = _run(capsys, "revoke", "g-0000000000000000")
    assert status == 1 and "NOT_FOUND" in err
    monkeypatch.setenv("PORTAGENT_BROKER_TOKEN", "not-the-token")
    status, _, err = _run(capsys, "grants")
    assert status == 2 and "(UNAUTHENTICATED" in err
    monkeypatch.delenv("PORTAGENT_BROKER_TOKEN")
    assert _run(capsys, "hosts", "remove", "svc2")[1] == "svc2: removed\n"
    status, _, err = _run(capsys, "hosts", "remove", "svc2")
    assert status == 1 and "NOT_FOUND" in err


def test_admin_client_certificate_instead_of_a_token(
    service: BrokerService, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    config = _service_config(service, tmp_path, with_cert=True)
    monkeypatch.setenv(cli.CONFIG_ENV, str(config))
    assert _run(capsys, "hosts", "add", "svc3")[0] == 0
    grant_id = _run(capsys, *GRANT[:2], "svc3", *GRANT[3:])[1].strip()
    grant = json.loads(_run(capsys, "grants", "--host", "svc3", "-o", "json")[1])[0]
    assert (grant["grant_id"], grant["created_by"]) == (grant_id, "admin:ops")


def test_audit_export_and_verify_detect_an_edit_and_a_deletion(
    service: BrokerService, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv(cli.CONFIG_ENV, str(_service_config(service, tmp_path)))
    assert _run(capsys, "hosts", "add", "svc4")[0] == 0
    _run(capsys, *GRANT[:2], "svc4", *GRANT[3:])
    status, out, _ = _run(capsys, "audit", "verify")
    assert status == 0 and out.startswith("audit chain intact: ")
    count = int(out.split()[3])
    export = tmp_path / "audit.jsonl"
    status, _, err = _run(capsys, "audit", "export", "--output", str(export))
    assert status == 0 and err == f"exported {count} audit records to {export}\n"
    assert export.stat().st_mode & 0o777 == 0o600
    status, out, _ = _run(capsys, "audit", "verify", "--file", str(export))
    assert (status, out.split()[3]) == (0, str(count))
    assert _run(capsys, "audit", "export", "--output", str(export))[0] == 2  # exists
    lines = export.read_text().splitlines()
    assert len(lines) == count

    edited = json.loads(lines[1])
    edited["reason"] = "nothing to see"
    (tmp_path / "edited.jsonl").write_text("\n".join([lines[0], json.dumps(edited), *lines[2:]]))
    status, _, err = _run(capsys, "audit", "verify", "--file", str(tmp_path / "edited.jsonl"))
    assert status == 1 and err.startswith(
        f"portagent-broker: audit chain broken at record #{edited['seq']}: "
    )
    (tmp_path / "deleted.jsonl").write_text("\n".join([lines[0], *lines[2:]]))
    status, _, err = _run(capsys, "audit", "verify", "--file", str(tmp_path / "deleted.jsonl"))
    assert status == 1 and "audit chain broken at record #" in err
    (tmp_path / "junk.jsonl").write_text(lines[0] + "\n{not json\n")
    status, _, err = _run(capsys, "audit", "verify", "--file", str(tmp_path / "junk.jsonl"))
    assert status == 1 and err.startswith(f"portagent-broker: {tmp_path / 'junk.jsonl'}:2: ")


def test_path_choice_without_api_or_host(dev: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No [api]: grant goes to the agent; the service commands name the missing setting."""
    status, _, err = _run(capsys, "grants")
    assert status == 2 and err.startswith("portagent-broker: api.url: not set in ")
    status, _, err = _run(capsys, *GRANT[:2], "db9", *GRANT[3:])
    assert status == 2 and "set [api] url to go through the broker service" in err


def test_direct_flag_with_an_api_config(
    dev: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """[api] set: --direct and --agent still deliver straight to the agent."""
    config = dev / "broker.toml"
    config.write_text(config.read_text().replace("# [api]", "[api]").replace(
        '# url = "', 'url = "').replace('# ca = "', 'ca = "').replace(
        '# token_file = "', 'token_file = "'))  # fmt: skip
    assert _run(capsys, *GRANT, "--direct")[0] == 0
    assert _run(capsys, *GRANT, "--agent", "127.0.0.1:1")[0] == 0
    assert [c.address for c in FakeClient.instances] == ["192.0.2.5:50051", "127.0.0.1:1"]
    status, _, err = _run(capsys, *GRANT)  # through the service: nothing listens there
    assert status == 2 and "broker service at https://127.0.0.1:8443: connection refused" in err
    assert len(FakeClient.instances) == 2


def test_version_and_every_command_has_help_with_an_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.startswith("portagent-broker ")
    commands = [["grant"], ["revoke"], ["grants"], ["hosts"], ["hosts", "add"], ["hosts", "label"],
                ["hosts", "remove"], ["audit"], ["audit", "export"], ["audit", "verify"], ["keys"],
                ["keys", "generate"], ["keys", "list"], ["init"], ["keygen"], ["pubkey"], ["list"],
                ["get"], ["watch"], ["policy"], ["policy", "validate"], ["policy", "explain"],
                ["policy", "show"], ["requests"], ["requests", "list"], ["requests", "show"],
                ["requests", "approve"], ["requests", "deny"], ["requests", "close"],
                ["whoami"]]  # fmt: skip
    for command in commands:
        with pytest.raises(SystemExit) as caught:
            cli.main([*command, "--help"])
        assert caught.value.code == 0
        assert "example" in capsys.readouterr().out, command


def test_keys_generate_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    status, out, _ = _run(capsys, "keys", "generate", "--dir", str(keys), "-o", "json")
    first = json.loads(out)
    assert status == 0 and Path(first["path"]).stat().st_mode & 0o777 == 0o600
    (trusted,) = tomllib.loads(first["trusted_keys_toml"])["trusted_keys"]
    assert trusted["key_id"] == first["key_id"] and Path(first["path"]).name.endswith(
        f"-{first['key_id']}.pem"
    )
    status, out, _ = _run(capsys, "keys", "generate", "--dir", str(keys))
    assert status == 0 and "[[trusted_keys]]" in out
    second = out.split("key id: ")[1].split()[0]
    status, out, _ = _run(capsys, "keys", "list", "--dir", str(keys))
    rows = [line.split() for line in out.splitlines()[1:]]
    assert status == 0 and [(r[1], r[3]) for r in rows] == [
        (first["key_id"], "no"),
        (second, "yes"),
    ]
    Path(first["path"]).chmod(0o644)  # the service would refuse to start
    status, out, err = _run(capsys, "keys", "list", "--dir", str(keys))
    assert status == 1 and first["path"] in err


# --- policy validate / explain offline (the Cedar engine here, no service) -----------------

POLICY = """\
@id("dba-db")
@max_ttl("15m")
@approvals("1")
@approvers("dba")
permit (principal in Group::"dba", action == Action::"request", resource)
when { resource.labels.contains("role=db") && resource.port == 5432 };

@id("ci-prod")
@max_ttl("1h")
permit (principal is GithubWorkflow, action == Action::"request", resource in Host::"db-1")
when { principal.repository == "octo/app" && principal.environment == "prod" };

@id("no-weekends")
forbid (principal, action, resource) when { context.weekday == 9 };
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.cedar"
    path.write_text(POLICY)
    return path


def test_policy_validate_a_good_file(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from portagent.broker.policy.cedar import Policy

    digest = Policy.load(policy_file).digest
    status, out, err = _run(capsys, "policy", "validate", str(policy_file))
    assert (status, err) == (0, "")
    assert out == f"{policy_file}: valid (2 rules: dba-db, ci-prod; digest {digest})\n"
    status, out, _ = _run(capsys, "policy", "validate", str(policy_file), "-o", "json")
    answer = json.loads(out)
    assert (status, answer["valid"], answer["digest"]) == (0, True, digest)
    assert [(r["rule"], r["max_ttl"], r["approvals"]) for r in answer["rules"]] == [
        ("dba-db", 900, 1), ("ci-prod", 3600, 0)]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # a typo in an attribute: Cedar's validator names it, with the file and line
        (("principal.repository ==", "principal.repo =="), ("policy.cedar:", "repo")),
        # approvals without approvers: the rule is named
        (('@approvers("dba")\n', ""), ("dba-db", "@approvers")),
        # an annotation the broker does not know
        (('@max_ttl("1h")', '@max_tll("1h")'), ("ci-prod", "max_tll")),
        # a syntax error: the rule's line and Cedar's message
        (
            ("when { context.weekday == 9 };", "when { context.weekday == };"),
            ("policy.cedar:13: ", "unexpected token"),
        ),
    ],
)
def test_policy_validate_a_bad_file_lists_each_problem(
    policy_file: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str],
    expected: tuple[str, ...],
) -> None:  # fmt: skip
    assert edit[0] in POLICY
    policy_file.write_text(POLICY.replace(*edit))
    status, out, err = _run(capsys, "policy", "validate", str(policy_file))
    assert (status, out) == (1, "")
    lines = err.splitlines()
    assert lines and not any(line.startswith("portagent-broker:") for line in lines)
    for text in expected:
        assert text in err, (text, err)


def test_policy_validate_two_problems_two_lines(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_file.write_text(POLICY.replace('@approvers("dba")\n', "").replace("@max_ttl", "@ttl"))
    status, _, err = _run(capsys, "policy", "validate", str(policy_file))
    assert status == 1 and len(err.splitlines()) >= 2
    status, _, err = _run(capsys, "policy", "validate", str(policy_file.with_name("none.cedar")))
    assert status == 1 and "none.cedar" in err


EXPLAIN = ["policy", "explain", "--host", "db-1", "--port", "5432/tcp", "--ttl", "15m"]


def test_explain_offline_with_quick_flags(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    person = ["--kind", "person", "--subject", "alice", "--issuer-name", "corp",
              "--email", "alice@example.com", "--group", "dba", "--label", "role=db"]  # fmt: skip
    status, out, err = _run(capsys, *EXPLAIN, "--policy", str(policy_file), *person)
    assert (status, err) == (0, "")
    assert out.startswith("ALLOWED by rule dba-db\n")
    assert "1 approval(s) from dba" in out and 'Person::"corp:alice"' in out
    # Not in the group: denied by default, exit 1, and the rule says why it did not apply.
    others = [a if a != "dba" else "web" for a in person]
    status, out, _ = _run(capsys, *EXPLAIN, "--policy", str(policy_file), *others)
    assert status == 1 and out.startswith("DENIED (POLICY_DENIED)")
    assert re.search(r"^  - permit dba-db ", out, re.MULTILINE)
    # Over the rule's @max_ttl: the limit that failed.
    status, out, _ = _run(capsys, *EXPLAIN[:-1], "2h", "--policy", str(policy_file), *person)
    assert status == 1 and out.startswith("DENIED (TTL_TOO_LONG)")
    # -o json: explanation_json.
    github = ["--kind", "github", "--subject", "repo:octo/app:environment:prod",
              "--issuer-name", "gh", "--claim", "repository=octo/app",
              "--claim", "environment=prod"]  # fmt: skip
    status, out, _ = _run(capsys, *EXPLAIN, "--policy", str(policy_file), *github, "-o", "json")
    answer = json.loads(out)
    assert status == 0 and answer["decision"]["allowed"] is True
    assert answer["decision"]["rule"] == "ci-prod"
    assert {r["rule"]: r["applies"] for r in answer["rules"]}["dba-db"] is False


def test_explain_offline_identity_file_and_unverified_token(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import base64

    from portagent.broker.identity.model import Identity, IdentityKind

    identity = Identity(IdentityKind.GITHUB, "https://token.actions.githubusercontent.com",
                        "gh", "repo:octo/app:environment:prod",
                        {"repository": "octo/app", "environment": "prod"})  # fmt: skip
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"identity": identity.to_json()}))  # as `whoami -o json` prints
    status, out, _ = _run(capsys, *EXPLAIN, "--policy", str(policy_file), "--identity", str(path))
    assert status == 0 and out.startswith("ALLOWED by rule ci-prod")

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"iss": "https://token.actions.githubusercontent.com", "aud": "portagent",
              "sub": "repo:octo/app:environment:prod", "repository": "octo/app",
              "environment": "prod", "run_id": "4242",
              "runner_environment": "github-hosted"}  # fmt: skip
    token = tmp_path / "job.jwt"
    # Signed by nobody: offline explain decodes, it does not verify (its help says so).
    pki.write_atomic(token, f"{part({'alg': 'RS256'})}.{part(claims)}.AAAA".encode(), 0o600)
    args = [*EXPLAIN, "--policy", str(policy_file), "--token-file", str(token), "-o", "json"]
    status, out, _ = _run(capsys, *args)
    answer = json.loads(out)
    assert status == 0 and answer["decision"]["rule"] == "ci-prod"
    principal = answer["entities"][0]
    assert principal["uid"] == {"type": "GithubWorkflow",
                                "id": "github:repo:octo/app:environment:prod"}  # fmt: skip
    assert principal["attrs"]["run_id"] == "4242"
    # Bad input names the option it came from; nothing is explained.
    path.write_text(json.dumps({"kind": "robot", "issuer_name": "x", "subject": "y"}))
    status, out, err = _run(capsys, *EXPLAIN, "--policy", str(policy_file), "--identity", str(path))
    assert (status, out) == (2, "") and err.startswith(
        "portagent-broker: --identity (identity.kind)"
    )
    # One source of identity: the quick flags do not mix with a file or a token.
    status, _, err = _run(capsys, *EXPLAIN, "--policy", str(policy_file), "--identity", str(path),
                          "--group", "dba")  # fmt: skip
    assert status == 2 and err.startswith("portagent-broker: --identity: the whole identity")
    status, _, err = _run(capsys, *EXPLAIN, "--policy", str(policy_file), "--token-file",
                          str(token), "--claim", "repository=x")  # fmt: skip
    assert status == 2 and err.startswith("portagent-broker: --claim: the identity comes from")
    token.write_text("not-a-jwt")
    status, _, err = _run(
        capsys, *EXPLAIN, "--policy", str(policy_file), "--token-file", str(token)
    )
    assert status == 2 and "--token-file: " in err and "does not hold a JWT" in err
    status, _, err = _run(capsys, *EXPLAIN[:-1], "0s", "--policy", str(policy_file),
                          "--subject", "alice")  # fmt: skip
    assert status == 2 and err.startswith("portagent-broker: --ttl: ")
    status, _, err = _run(capsys, *EXPLAIN, "--policy", str(policy_file), "--subject", "a",
                          "--source", "example.com")  # fmt: skip
    assert status == 2 and err.startswith("portagent-broker: --source: ")


def test_online_explanation_text_matches_the_engine_text(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service's JSON printed here reads exactly like the offline explain."""
    from portagent.broker.policy.cedar import (
        Policy,
        explanation_json,
        explanation_text,
        query_from_json,
    )

    policy = Policy.load(policy_file)
    for group, ttl in (("dba", "15m"), ("dba", "2h"), ("web", "15m")):
        query = {"identity": {"kind": "person", "issuer": "https://sso", "issuer_name": "corp",
                              "subject": "alice", "groups": [group]},
                 "host": "db-1", "labels": {"role": "db"}, "port": "5432/tcp",
                 "ttl": ttl}  # fmt: skip
        explanation = policy.explain(query_from_json(query, now=1_800_000_000))
        assert cli._explanation_text(explanation_json(explanation)) == (
            explanation_text(explanation) + "\n"
        )


# --- requests, whoami, policy show/explain against a real `serve` with issuers and a policy

SERVICE_POLICY = """\
@id("dba-db")
@max_ttl("15m")
@approvals("1")
@approvers("dba")
permit (principal is Person, action == Action::"request", resource)
when { resource.labels.contains("role=db") };
"""


@pytest.fixture(scope="module")
def policy_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerService, Any]]:
    from portagent.testing.broker_service import BrokerService as Service
    from portagent.testing.oidc_issuer import TestIssuer

    directory = tmp_path_factory.mktemp("policy-service")
    (directory / "policy.cedar").write_text(SERVICE_POLICY)
    with TestIssuer(directory / "issuer") as issuer:
        service = Service(directory / "broker", make_pki(directory / "pki"))
        with service.config_path.open("a") as config:
            config.write(
                f'\n[service.policy]\nfile = "{directory / "policy.cedar"}"\n\n'
                f'[[service.issuers]]\nname = "corp"\nkind = "person"\n'
                f'issuer = "{issuer.url}"\naudience = "portagent"\n'
                f'jwks_file = "{issuer.jwks_path}"\n'
            )
        try:
            service.start()
            yield service, issuer
        finally:
            service.close()


def _person_token(directory: Path, issuer: Any, name: str, groups: list[str]) -> Path:
    path = directory / f"{name}.jwt"
    token = issuer.person(f"u-{name}", email=f"{name}@example.com", groups=groups)
    pki.write_atomic(path, token.encode() + b"\n", 0o600)
    return path


def test_requests_approve_whoami_and_policy_against_the_service(
    policy_service: tuple[BrokerService, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    service, issuer = policy_service
    monkeypatch.setenv(cli.CONFIG_ENV, str(_service_config(service, tmp_path)))
    monkeypatch.delenv("PORTAGENT_TOKEN", raising=False)
    assert _run(capsys, "hosts", "add", "db-1", "--label", "role=db")[0] == 0
    carol = _person_token(tmp_path, issuer, "carol", ["oncall", "dba"])
    dave = _person_token(tmp_path, issuer, "dave", ["dba"])

    status, out, _ = _run(capsys, "whoami", "--token-file", str(carol))
    assert status == 0 and out.splitlines()[0].split() == ["label:", "corp:carol@example.com"]
    assert "groups:       oncall,dba" in out
    assert json.loads(_run(capsys, "whoami", "-o", "json")[1])["identity"]["label"] == (
        "admin:tests"
    )

    status, out, _ = _run(capsys, "policy", "show")
    assert status == 0 and out.splitlines()[4].split() == ["dba-db", "15m", "1", "dba",
                                                           "requester", "10"]  # fmt: skip
    # Online explain: the service's policy and the host's labels from its inventory.
    status, out, _ = _run(capsys, "policy", "explain", "--subject", "u-carol", "--issuer-name",
                          "corp", "--group", "dba", "--host", "db-1", "--port", "5432/tcp",
                          "--ttl", "15m")  # fmt: skip
    assert status == 0 and out.startswith("ALLOWED by rule dba-db")
    status, out, _ = _run(capsys, "policy", "explain", "--token-file", str(carol), "--host",
                          "db-1", "--port", "5432/tcp", "--ttl", "1h")  # fmt: skip
    assert status == 1 and out.startswith("DENIED (TTL_TOO_LONG)")

    # Carol asks (through the API, as portagent-request does); the request waits.
    code, answer = service.request(
        "POST", "/v1/requests",
        {"host": "db-1", "port": "5432/tcp", "ttl": "10m", "reason": "INC-42"},
        token=carol.read_text().strip(),
    )  # fmt: skip
    assert code == 202, answer
    request_id = answer["request"]["id"]
    status, out, _ = _run(capsys, "requests", "--state", "pending", "--host", "db-1")
    (row,) = [line.split() for line in out.splitlines()[1:]]
    assert row[:8] == [request_id, "pending", "corp:carol@example.com", "db-1", "5432/tcp",
                       "10m", "0/1", "INC-42"]  # fmt: skip

    # Her own approval is refused (exit 1, the API's code and reason), an admin may not
    # approve either; Dave's approval makes the grant.
    status, _, err = _run(capsys, "requests", "approve", request_id, "--token-file", str(carol))
    assert status == 1 and "(PERMISSION_DENIED SELF_APPROVAL)" in err
    status, _, err = _run(capsys, "requests", "approve", request_id)
    assert status == 1 and "PERMISSION_DENIED" in err
    status, out, err = _run(capsys, "requests", "approve", request_id, "--token-file", str(dave),
                            "--comment", "ok for INC-42")  # fmt: skip
    assert (status, err) == (0, "")
    assert out.startswith(f"{request_id}: granted (1/1 approvals), grant g-")
    shown = json.loads(_run(capsys, "requests", "show", request_id, "-o", "json")[1])
    assert shown["state"] == "granted" and shown["grant"]["state"] == "active"
    assert [(a["approver"]["label"], a["comment"]) for a in shown["approvals"]] == [
        ("corp:dave@example.com", "ok for INC-42")]  # fmt: skip
    status, out, _ = _run(capsys, "requests", "close", request_id, "--token-file", str(carol))
    assert status == 0 and out.startswith(f"{request_id}: closed")
    grants = json.loads(_run(capsys, "grants", "--host", "db-1", "-o", "json")[1])
    assert [g["state"] for g in grants] == ["revoked"]
    # Nobody sees a request that is not theirs: the id is unknown to them.
    erin = _person_token(tmp_path, issuer, "erin", ["web"])
    status, _, err = _run(capsys, "requests", "show", request_id, "--token-file", str(erin))
    assert status == 1 and "NOT_FOUND" in err
