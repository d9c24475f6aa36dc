"""The stderr fallback of the event log: one record is one line, whatever the values."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from portagent.agent.adapters.journal import MAX_FIELD_CHARS, MAX_MESSAGE_CHARS, EventLog, escape
from portagent.agent.events_catalog import MESSAGE_IDS

REFUSE_ID = MESSAGE_IDS["refuse"]

HOSTILE = st.text(
    alphabet=st.sampled_from(
        [
            "a",
            " ",
            "=",
            '"',
            "\\",
            "\n",
            "\r",
            "\x00",
            "\x1b",
            "\x85",
            "\u2028",
            "\u2029",
            "\x0b",
            "\x0c",
            "\x1c",
            "\x7f",
            "\x9b",
            "<",
            "\u202e",
            "\u00a0",
            "\U000e0001",
            "é",
            "\ud800",
        ]
    )
    | st.characters(),
    max_size=300,
)


def fallback() -> tuple[io.StringIO, EventLog]:
    out = io.StringIO()
    return out, EventLog(stream=out, use_journal=False)


@settings(max_examples=3000, deadline=None)
@given(
    HOSTILE,
    st.dictionaries(
        st.sampled_from(["key_id", "grant_id", "subject", "peer"]), HOSTILE, max_size=4
    ),
)
def test_one_record_is_one_line(message: str, fields: dict[str, str]) -> None:
    out, log = fallback()
    log.emit("refuse", message, **fields)
    text = out.getvalue()
    assert text.endswith("\n")
    assert text.splitlines() == [text[:-1]]  # no other break of any kind inside
    assert text[:-1].isprintable()
    assert text.encode("utf-8")  # no lone surrogates left: the write cannot fail


def test_forged_line_is_escaped() -> None:
    out, log = fallback()
    log.emit("refuse", "bad\n<1>portagentd: root login", KEY_ID="k\n<1>ACTION=apply\r")
    assert out.getvalue() == (
        '<6>bad\\x0a<1>portagentd: root login ACTION=refuse KEY_ID="k\\x0a<1>ACTION=apply\\x0d"'
        f" MESSAGE_ID={REFUSE_ID}\n"
    )


def test_fields_and_message_are_capped() -> None:
    out, log = fallback()
    log.emit("refuse", "m" * 10 * MAX_MESSAGE_CHARS, GRANT_ID="g" * 10 * MAX_FIELD_CHARS)
    line = out.getvalue()
    assert len(line) < MAX_MESSAGE_CHARS + MAX_FIELD_CHARS + 100
    assert "g" * (MAX_FIELD_CHARS - 1) + "…" in line


def test_escape_is_unambiguous() -> None:
    # A literal backslash-x in the input cannot pass for an escaped control character.
    assert escape("\\x0a") != escape("\n")
    assert escape("\\x0a") == "\\\\x0a"


def test_journald_path_caps_fields_and_survives_refusal() -> None:
    sent: list[dict[str, Any]] = []

    def sendv(*lines: str) -> None:
        # systemd.journal.sendv refuses a NUL in any line as the C API would.
        if any("\x00" in line for line in lines):
            raise ValueError("embedded null character")
        sent.append(dict(line.split("=", 1) for line in lines))

    out, log = fallback()
    log._sendv = sendv  # what a reachable journald looks like to the log
    log.emit("refuse", "x" * 100_000, KEY_ID="k" * 100_000)
    assert len(sent[0]["MESSAGE"]) == MAX_MESSAGE_CHARS
    assert len(sent[0]["KEY_ID"]) == MAX_FIELD_CHARS
    log.emit("refuse", "nul\x00here", KEY_ID="k")
    assert out.getvalue() == f"<6>nul\\x00here ACTION=refuse KEY_ID=k MESSAGE_ID={REFUSE_ID}\n"


def test_observers_see_the_record_as_sent_and_cannot_stop_it() -> None:
    out, log = fallback()
    seen: list[tuple[str, int, str, dict[str, str]]] = []

    def broken(*_: object) -> None:
        raise RuntimeError("disk full")

    log.add_observer(lambda a, p, m, r: seen.append((a, int(p), m, dict(r))))
    log.add_observer(broken)
    log.emit("apply", "x" * (MAX_MESSAGE_CHARS + 10), grant_id="g1", port=5432, none=None)
    assert seen == [
        (
            "apply",
            6,
            "x" * (MAX_MESSAGE_CHARS - 1) + "…",
            {"GRANT_ID": "g1", "PORT": "5432", "MESSAGE_ID": MESSAGE_IDS["apply"]},
        )
    ]
    lines = out.getvalue().splitlines()
    assert "event observer failed: RuntimeError: disk full" in lines[0]
    assert "GRANT_ID=g1" in lines[1] and "ACTION=apply" in lines[1]
    log.remove_observer(broken)
    log.emit("stop", "bye")
    assert len(out.getvalue().splitlines()) == 3 and seen[-1][0] == "stop"


def test_message_id_per_action_and_none_for_others() -> None:
    out, log = fallback()
    log.emit("expire", "gone", grant_id="g1")
    log.emit("not_an_action", "x")
    first, second = out.getvalue().splitlines()
    assert f"MESSAGE_ID={MESSAGE_IDS['expire']}" in first
    assert "MESSAGE_ID" not in second


def test_booleans_are_true_and_false_on_both_paths() -> None:
    sent: list[dict[str, str]] = []
    out, log = fallback()
    log.emit("expire", "m", keep_established=False, final=True, flags=[True, False], count=1)
    line = out.getvalue()
    assert "KEEP_ESTABLISHED=false" in line and "FINAL=true" in line
    assert "FLAGS=true,false" in line and "COUNT=1" in line
    log._sendv = lambda *lines: sent.append(dict(x.split("=", 1) for x in lines))
    log.emit("expire", "m", keep_established=True)
    assert sent[0]["KEEP_ESTABLISHED"] == "true"
