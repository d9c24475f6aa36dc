"""The conventions portagent, portagent-broker and portagent-request share, run as the
real console scripts where the behaviour is the process's: --version everywhere, a
closed pipe and Ctrl-C end quietly (141, 130), duration flags read 1s/5m/1h30m or bare
seconds, errors name a path once, times carry their zone. (The agent's socket cases,
with a real admin server: tests/unit/test_admin_protocol.py.)"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portagent.agent import cli as agent_cli
from portagent.broker import pki
from portagent.request import cli as request_cli
from portagent.wire.cli import format_time, parse_duration_arg, seconds_or_duration
from portagent.wire.ports import parse_port_spec

BIN = Path(sys.executable).parent
COMMANDS = ("portagent", "portagent-broker", "portagent-request")


def script(name: str) -> str:
    return str(BIN / name)


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["portagent", "--version"], "portagent "),
        (["portagent", "list", "--version"], "portagent "),
        (["portagent", "status", "--version"], "portagent "),
        (["portagentd", "--version"], "portagentd "),
        (["portagent-broker", "--version"], "portagent-broker "),
        (["portagent-broker", "grants", "--version"], "portagent-broker "),
        (["portagent-broker", "hosts", "add", "--version"], "portagent-broker "),
        (["portagent-broker", "serve", "--version"], "portagent-broker "),
        (["portagent-request", "--version"], "portagent-request "),
    ],
)
def test_version_everywhere(argv: list[str], wanted: str) -> None:
    out = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert out.stdout.startswith(wanted) and out.stdout.count("\n") == 1, out.stdout
    version = out.stdout.split()[1]
    assert version[0].isdigit() and version.count(".") == 2, version
    assert out.stderr == ""


def run_into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run with stdout a pipe whose reader is already gone (`cmd | true`)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_closed_pipe_ends_quietly_with_141(command: str) -> None:
    done = run_into_closed_pipe([script(command), "--version"])
    assert (done.returncode, done.stderr) == (141, b"")
    # argparse's --help drops a failed write itself (status 0); quiet all the same.
    done = run_into_closed_pipe([script(command), "--help"])
    assert done.returncode in (0, 141) and done.stderr == b""


def test_a_closed_pipe_after_a_table_ends_quietly(tmp_path: Path) -> None:
    # A command's own output, not argparse's: the broker's offline `keys list`.
    subprocess.run([script("portagent-broker"), "keys", "generate", "--dir", str(tmp_path)],
                   capture_output=True, timeout=60, check=True)  # fmt: skip
    done = run_into_closed_pipe([script("portagent-broker"), "keys", "list", "--dir",
                                 str(tmp_path)])  # fmt: skip
    assert (done.returncode, done.stderr) == (141, b"")


# ---- Ctrl-C while waiting on the network: 130, nothing printed ---------------------------


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A TCP listener on loopback that accepts and never answers (not even TLS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.settimeout(30)
        yield server


def interrupt_while_waiting(argv: list[str], server: socket.socket) -> tuple[int, bytes, bytes]:
    """Start argv, wait until it has sent its first bytes to `server` (it now waits for
    an answer that never comes), send SIGINT; its status and output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            assert conn.recv(4096)  # a TLS ClientHello or an HTTP request
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def test_ctrl_c_on_the_broker_grpc_path(tmp_path: Path, silent_server: socket.socket) -> None:
    port = silent_server.getsockname()[1]
    pki.init_dev_setup(tmp_path, host_id="web1", agent_address=f"127.0.0.1:{port}",
                       guarded=[parse_port_spec("22/tcp")])  # fmt: skip
    argv = [script("portagent-broker"), "--config", str(tmp_path / "broker.toml"), "list",
            "--host", "web1"]  # fmt: skip
    assert interrupt_while_waiting(argv, silent_server) == (130, b"", b"")


def test_ctrl_c_on_the_broker_service_path(tmp_path: Path, silent_server: socket.socket) -> None:
    port = silent_server.getsockname()[1]
    (tmp_path / "token").write_text("t0ken\n")
    (tmp_path / "token").chmod(0o600)
    config = tmp_path / "broker.toml"
    config.write_text(f'[api]\nurl = "https://127.0.0.1:{port}"\n'
                      f'token_file = "{tmp_path / "token"}"\n')  # fmt: skip
    argv = [script("portagent-broker"), "--config", str(config), "grants"]
    assert interrupt_while_waiting(argv, silent_server) == (130, b"", b"")


def test_ctrl_c_on_the_request_client(tmp_path: Path, silent_server: socket.socket) -> None:
    port = silent_server.getsockname()[1]
    (tmp_path / "token").write_text("t0ken\n")
    argv = [script("portagent-request"), "--broker", f"https://127.0.0.1:{port}",
            "--token-file", str(tmp_path / "token"), "--whoami"]  # fmt: skip
    assert interrupt_while_waiting(argv, silent_server) == (130, b"", b"")


# ---- durations --------------------------------------------------------------------------

ACCEPTED = [("90", 90.0), ("0.5", 0.5), ("1s", 1.0), ("500ms", 0.5), ("5m", 300.0),
            ("2h", 7200.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("2d", 172800.0),
            (" 15m ", 900.0), ("0", 0.0)]  # fmt: skip
REFUSED = ["", "x", "5x", "m5", "-5", "-5s", "1h 30m", "1e3", "1.2.3", "5 s", "\u0665s",
           "1h30", ".s", "1" * 40]  # fmt: skip


@pytest.mark.parametrize(("text", "seconds"), ACCEPTED)
def test_duration_flags_take_units_and_bare_seconds(text: str, seconds: float) -> None:
    # One rule for the three commands: wire's parser (portagent, portagent-broker) and
    # the request client's own (standard library only) agree.
    assert parse_duration_arg(text) == seconds
    assert request_cli.parse_duration(text, "--ttl") == seconds


@pytest.mark.parametrize("text", REFUSED)
def test_duration_flags_refuse_the_same_inputs(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_arg(text)
    with pytest.raises(request_cli.UsageError, match=r"--ttl .*not a duration .*e\.g\. 90s"):
        request_cli.parse_duration(text, "--ttl")


def test_a_bad_duration_flag_is_named_with_an_example(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = agent_cli.build_parser()
    for bad in (["--interval", "1x"], ["--interval", "0"], ["--duration", "soon"]):
        with pytest.raises(SystemExit) as caught:
            parser.parse_args(["list", "--watch", *bad])
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {bad[0]}: '{bad[1]}'" in err and "e.g. 90s" in err, err
    args = parser.parse_args(["list", "--interval", "1s", "--duration", "1h30m"])
    assert (args.interval, args.duration) == (1.0, 5400.0)
    assert parser.parse_args(["list", "--interval", "0.25"]).interval == 0.25


def test_a_ttl_passed_on_turns_bare_seconds_into_a_number() -> None:
    # The broker service reads a text TTL as a duration only ("90" is refused there).
    assert seconds_or_duration("90") == 90.0 and seconds_or_duration("0.5") == 0.5
    assert seconds_or_duration("15m") == "15m" and seconds_or_duration("-5") == "-5"
    body = request_cli.request_body(request_cli.parse_args(
        ["--host", "h", "--port", "22", "--reason", "r", "--ttl", "90"]))  # fmt: skip
    assert body["ttl"] == 90


# ---- paths named once, times with their zone --------------------------------------------


def test_the_broker_names_its_config_once(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    for argv in (["--config", str(config), "grants"], ["serve", "--config", str(config)]):
        out = subprocess.run([script("portagent-broker"), *argv], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode in (2, 78) and out.stderr.count(str(config)) == 1, out.stderr
        assert "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_wall_clock_times_carry_their_offset(local_zone: Callable[[str], None]) -> None:
    moment = dt.datetime(2026, 11, 30, 12, 26, 40, tzinfo=dt.UTC).timestamp()
    local_zone("UTC0")
    assert format_time(moment) == "2026-11-30 12:26:40 +00:00"
    local_zone("CET-1")
    assert format_time(moment) == "2026-11-30 13:26:40 +01:00"
    assert format_time("2026-11-30T12:26:40Z") == "2026-11-30 13:26:40 +01:00"
    assert format_time("2026-11-30T12:26:40.5+00:00") == "2026-11-30 13:26:40 +01:00"
    local_zone("NST+3:30")  # a half-hour zone west of UTC
    assert format_time(moment) == "2026-11-30 08:56:40 -03:30"
    assert format_time(None) == "-" and format_time("") == "-"
    assert format_time("not a time") == "not a time" and format_time(1e30) == "1e+30"
