"""The local audit chain: writer, verifier and resume on real files (no root)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from portagent.agent.audit_chain import (
    GAP_ACTION,
    GENESIS,
    HEAD_ACTION,
    MAX_LINE_BYTES,
    AuditTrail,
    ChainWriter,
    canonical,
    chain_files,
    parse_head,
    parse_line,
    read_records,
    seal,
    verify_files,
)
from portagent.agent.cli import main as cli_main


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def writer(path: Path, **kwargs: int) -> ChainWriter:
    chain = ChainWriter(path, clock=Clock(), **kwargs)
    assert chain.open() == []
    return chain


def fill(chain: ChainWriter, count: int, start: int = 0) -> None:
    for index in range(start, start + count):
        chain.append("apply", 6, f"grant applied: g-{index}", {"GRANT_ID": f"g-{index}"})


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def verify(path: Path, expect: tuple[int, str] | None = None) -> tuple[bool, str]:
    verdict = verify_files(chain_files(path), expect)
    return verdict.ok, verdict.summary()


def test_a_written_chain_verifies_and_is_canonical_json(log: Path) -> None:
    chain = writer(log)
    fill(chain, 5)
    chain.append("refuse", 4, "grant refused: \u202e\x1b[31m", {"REASON": "BAD_SIGNATURE"})
    chain.close()
    raw = lines(log)
    assert len(raw) == 6
    first = json.loads(raw[0])
    assert (first["seq"], first["prev"]) == (1, GENESIS)
    for line in raw:  # one spelling: what canonical() writes, ASCII only
        assert canonical(json.loads(line)) + b"\n" == line
        assert line.isascii()
    assert json.loads(raw[5])["message"] == "grant refused: \u202e\x1b[31m"
    ok, summary = verify(log)
    assert ok, summary
    seq, digest = chain.head
    assert summary == f"6 records, chain intact, head 6:{digest}" and seq == 6
    assert log.stat().st_mode & 0o777 == 0o640


def _rewrite(path: Path, index: int, edit: dict[str, object]) -> None:
    raw = lines(path)
    record = json.loads(raw[index])
    record.update(edit)
    raw[index] = canonical(record) + b"\n"
    path.write_bytes(b"".join(raw))


def test_an_edited_field_is_named_by_seq_and_line(log: Path) -> None:
    chain = writer(log)
    fill(chain, 5)
    _rewrite(log, 2, {"fields": {"GRANT_ID": "g-evil"}})
    ok, summary = verify(log)
    assert not ok
    assert f"seq 3 ({log}:3): record edited" in summary


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(log: Path) -> None:
    chain = writer(log)
    fill(chain, 5)
    raw = lines(log)
    record = json.loads(raw[1])
    record["message"] = "nothing happened"
    del record["hash"]
    record["hash"] = hashlib.sha256(canonical(record)).hexdigest()
    raw[1] = canonical(record) + b"\n"
    log.write_bytes(b"".join(raw))
    ok, summary = verify(log)
    assert not ok and f"seq 3 ({log}:3): broken link" in summary


def test_a_deleted_line_is_a_seq_gap(log: Path) -> None:
    chain = writer(log)
    fill(chain, 6)
    raw = lines(log)
    log.write_bytes(b"".join(raw[:2] + raw[3:]))
    ok, summary = verify(log)
    assert not ok
    assert "seq gap" in summary and "(seq 3..3)" in summary and f"{log}:3" in summary


def test_swapped_lines_are_reported_as_out_of_order(log: Path) -> None:
    chain = writer(log)
    fill(chain, 6)
    raw = lines(log)
    raw[2], raw[3] = raw[3], raw[2]
    log.write_bytes(b"".join(raw))
    ok, summary = verify(log)
    assert not ok
    assert "out of order: seq 3" in summary


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json\n",
        b"[" * 100_000 + b"\n",  # deeper than the parser's recursion limit
        b'{"seq":' + b"9" * 10_000 + b"}\n",  # past int's digit limit
        b"\xff\xfe garbage\n",
        b"{}\n",
        b'{"action":1}\n',
        b"x" * (MAX_LINE_BYTES + 10) + b"\n",
    ],
)
def test_garbage_lines_are_clear_errors_not_tracebacks(log: Path, garbage: bytes) -> None:
    chain = writer(log)
    fill(chain, 3)
    with log.open("ab") as handle:
        handle.write(garbage)
    fill(chain, 1, start=3)
    ok, summary = verify(log)
    assert not ok
    assert f"{log}:4 after seq 3: unreadable line" in summary


def test_a_line_cut_mid_way_is_reported(log: Path) -> None:
    chain = writer(log)
    fill(chain, 4)
    chain.close()
    with log.open("r+b") as handle:
        handle.truncate(log.stat().st_size - 30)
    ok, summary = verify(log)
    assert not ok
    assert f"{log}:4 after seq 3: unreadable line: truncated" in summary


def test_a_cut_tail_is_only_caught_against_a_saved_head(log: Path) -> None:
    chain = writer(log)
    fill(chain, 5)
    saved = chain.head
    raw = lines(log)
    log.write_bytes(b"".join(raw[:3]))  # whole records removed from the end
    assert verify(log)[0]  # undetectable on its own (docs/audit.md says so)
    ok, summary = verify(log, saved)
    assert not ok and "before the saved head seq 5" in summary
    other = (3, "f" * 64)
    ok, summary = verify(log, other)
    assert not ok and "not the saved" in summary
    assert parse_head(f"{saved[0]}:{saved[1]}") == saved
    with pytest.raises(ValueError):
        parse_head("5:xyz")


def test_rotation_keeps_the_chain_across_files(log: Path) -> None:
    chain = writer(log, max_bytes=2000, keep=3)
    fill(chain, 40)
    chain.close()
    files = chain_files(log)
    assert [f.name for f in files] == ["audit.log.3", "audit.log.2", "audit.log.1", "audit.log"]
    verdict = verify_files(files)
    assert verdict.ok and verdict.head_seq == 40
    assert verdict.first_seq > 1 and "rotated away" in verdict.notes[0]
    # each file's first record links to the previous file's last
    last = json.loads(lines(files[1])[-1])
    first = json.loads(lines(files[2])[0])
    assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
    # a whole middle file removed is a gap
    files[1].unlink()
    assert "seq gap" in verify_files([files[0], files[2], files[3]]).summary()


def test_a_restart_resumes_from_the_last_record(log: Path) -> None:
    chain = writer(log)
    fill(chain, 3)
    head = chain.head
    chain.close()
    again = writer(log)
    assert again.head == head
    fill(again, 2, start=3)
    again.close()
    ok, summary = verify(log)
    assert ok and summary.startswith("5 records, chain intact")


def test_a_restart_after_a_rotation_continues_in_a_new_file(log: Path) -> None:
    chain = writer(log)
    fill(chain, 3)
    chain.close()
    log.rename(f"{log}.1")  # as if stopped between rotating and the first record
    again = writer(log)
    fill(again, 1, start=3)
    again.close()
    verdict = verify_files(chain_files(log))
    assert verdict.ok and verdict.records == 4


def test_a_garbled_tail_at_start_opens_a_declared_segment(log: Path) -> None:
    chain = writer(log)
    fill(chain, 3)
    chain.close()
    with log.open("ab") as handle:
        handle.write(b'{"action":"apply","fie')  # a torn write: no newline
    again = ChainWriter(log, clock=Clock())
    notices = again.open()
    assert len(notices) == 1 and "1 unreadable line(s)" in notices[0][1]
    fill(again, 1, start=3)
    again.close()
    verdict = verify_files(chain_files(log))
    assert verdict.ok, verdict.summary()
    assert verdict.head_seq == 5  # 3, the gap record, 1 new
    assert any("1 unreadable line(s)" in note for note in verdict.notes)
    records = [r for _, r in read_records([log]) if not isinstance(r, Exception)]
    assert records[3].action == GAP_ACTION and records[3].fields["UNREADABLE_LINES"] == "1"


def test_a_file_of_garbage_at_start_never_crashes(log: Path) -> None:
    log.write_bytes(b"\x00" * 5000 + b"\nnot a record\n")
    chain = ChainWriter(log, clock=Clock())
    assert chain.open()  # reported
    fill(chain, 2)
    chain.close()
    assert chain.head[0] == 3


class FailingWrites:
    """os.write that fails while `failing` is set (ENOSPC), as a full disk does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = False
        real = os.write

        def write(fd: int, data: bytes) -> int:
            if self.failing:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)


def test_write_failures_are_reported_once_and_declared_as_a_gap(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = writer(log)
    fill(chain, 2)
    disk = FailingWrites(monkeypatch)
    disk.failing = True
    first = chain.append("apply", 6, "lost 1", {})
    assert first is not None and first[0] == 3 and "No space left" in first[1]
    assert chain.append("apply", 6, "lost 2", {}) is None  # reported once
    assert chain.append("apply", 6, "lost 3", {}) is None
    assert chain.sync() is None  # still failing: retried, quiet
    assert chain.lost == 3
    disk.failing = False
    recovered = chain.sync()
    assert recovered is not None and "writing again" in recovered[1]
    fill(chain, 1, start=10)
    chain.close()
    verdict = verify_files(chain_files(log))
    assert verdict.ok and verdict.records == 4
    assert any("3 record(s) lost (No space left on device)" in n for n in verdict.notes)


def test_a_removed_file_is_reopened_and_the_missing_records_declared(log: Path) -> None:
    chain = writer(log, max_bytes=1500, keep=2)
    fill(chain, 12)  # some rotated into audit.log.1
    first_in_current = json.loads(lines(log)[0])["seq"]
    fill(chain, 2, start=12)
    log.unlink()
    fill(chain, 1, start=14)  # went to the removed file
    chain.sync()
    fill(chain, 1, start=15)
    chain.close()
    verdict = verify_files(chain_files(log))
    assert verdict.ok, verdict.summary()
    assert any(f"declared missing: seq {first_in_current}..15" in n for n in verdict.notes)


def test_many_threads_append_in_one_order(log: Path) -> None:
    chain = writer(log, max_bytes=20_000, keep=1000)

    def work(name: int) -> None:
        for index in range(200):
            chain.append("apply", 6, f"t{name} #{index}", {"THREAD": str(name)})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    chain.close()
    verdict = verify_files(chain_files(log))
    assert verdict.ok, verdict.summary()
    assert verdict.records == 1600 and verdict.first_seq == 1


def test_the_trail_records_decisions_not_connections_and_anchors_the_head(log: Path) -> None:
    reports: list[tuple[str, int, str, Mapping[str, str]]] = []
    trail = AuditTrail(
        ChainWriter(log, clock=Clock()),
        lambda *record: reports.append(record),
        sync_interval=3600,
        anchor_interval=3600,
    )
    trail.start()
    trail.observe("apply", 6, "grant applied", {"GRANT_ID": "g-1"})
    trail.observe("connection_opened", 6, "connection opened", {"GRANT_ID": "g-1"})
    trail.observe(HEAD_ACTION, 6, "not chained", {})
    trail.observe("revoke", 5, "grant revoked", {"GRANT_ID": "g-1"})
    trail.close()
    actions = [r.action for _, r in read_records([log]) if not isinstance(r, Exception)]
    assert actions == ["apply", "revoke"]
    anchors = [r for r in reports if r[0] == HEAD_ACTION]
    assert [a[3]["AUDIT_SEQ"] for a in anchors] == ["0", "2"]
    assert anchors[-1][3]["AUDIT_HASH"] == trail.writer.head[1]


def test_cli_verify_and_show(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chain = writer(log)
    fill(chain, 3)
    chain.close()
    assert cli_main(["audit", "verify", "--file", str(log)]) == 0
    assert "3 records, chain intact" in capsys.readouterr().out
    assert cli_main(["audit", "show", "--file", str(log), "-n", "2", "-o", "json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in shown] == [2, 3]
    assert cli_main(["audit", "show", "--file", str(log)]) == 0
    table = capsys.readouterr().out
    assert "grant applied: g-2" in table and table.startswith("TIME")
    _rewrite(log, 1, {"message": "edited"})
    assert cli_main(["audit", "verify", "--file", str(log)]) == 1
    assert "seq 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        cli_main(["audit", "verify", "--file", str(log.parent / "none.log")])
    assert exited.value.code == 2 and "no audit chain" in capsys.readouterr().err


def test_parse_line_refuses_what_is_not_a_record() -> None:
    digest, line = seal(1, 1_700_000_000.5, "apply", 6, "m", {"A": "b"}, GENESIS)
    record, content_hash = parse_line(line)
    assert content_hash == record.hash == digest
    assert record.time == "2023-11-14T22:13:20.500000Z"
    for bad in (
        line[:-1],
        line.replace(b'"seq":1', b'"seq":true'),
        line.replace(b'"A"', b'"a"'),
        line.replace(b":", b": ", 1),
    ):
        with pytest.raises(ValueError):
            parse_line(bad)


def test_cli_show_flags_are_parsed_before_use(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = ChainWriter(log)  # the real clock: --since counts back from now
    assert chain.open() == []
    fill(chain, 3)
    chain.close()
    # Bad values are argparse errors naming the flag (exit 2), never a crash.
    for flag, value in (("-n", "-3"), ("-n", "x"), ("--since", "yesterday")):
        with pytest.raises(SystemExit) as exited:
            cli_main(["audit", "show", "--file", str(log), flag, value])
        assert exited.value.code == 2
        assert f"argument {'-n/--lines' if flag == '-n' else flag}" in capsys.readouterr().err
    # --since takes bare seconds like every other duration flag: all 3 are recent.
    assert cli_main(["audit", "show", "--file", str(log), "--since", "3600", "-o", "json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
