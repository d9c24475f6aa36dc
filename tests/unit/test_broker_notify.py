"""Webhooks (portagent.broker.fleet.notify) against a real local HTTP receiver: the JSON
and Slack bodies, the HMAC signature, retries after 5xx, no retry after a 4xx, a dead
receiver holding up neither `submit` nor another webhook, the bounded queue."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portagent.broker.fleet.notify import (
    SIGNATURE_HEADER,
    Notifier,
    Webhook,
    read_secret,
    signature,
    summary,
)

WAIT = 10.0
FAST = (0.01, 0.02, 0.04, 0.08)

REQUEST: dict[str, Any] = {
    "id": "r-0123456789abcdef",
    "state": "pending",
    "requester": {"label": "github:repo:octo/app:ref:refs/heads/main", "kind": "github"},
    "host_id": "db-1",
    "protocol": "tcp",
    "ports": "5432",
    "ttl_seconds": 900,
    "reason": "INC-42",
    "rule": "dba-db",
    "approvals_required": 2,
    "approved": 1,
    "approvers": "dba",
}


class Receiver:
    """An HTTP server in a thread: answers each POST with the next status of
    `statuses` (then 200), records (headers, body); `hold` blocks every answer."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.got: queue.Queue[tuple[dict[str, str], bytes, int]] = queue.Queue()
        self.hold: threading.Event | None = None
        self.entered = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                outer.entered.set()
                if outer.hold is not None:
                    outer.hold.wait(WAIT)
                status = outer.statuses.pop(0) if outer.statuses else 200
                outer.got.put(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def next(self) -> tuple[dict[str, str], bytes, int]:
        return self.got.get(timeout=WAIT)

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def _receiver(made: list[Receiver], statuses: list[int] | None = None) -> Receiver:
    r = Receiver(statuses)
    r.thread.start()
    made.append(r)
    return r


class Logs(list[tuple[str, dict[str, Any]]]):
    def __call__(self, event: str, **fields: Any) -> None:
        self.append((event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self if e == name]


async def _in_thread(fn: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def test_json_body_is_delivered_with_a_verifiable_signature(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    r = _receiver(receivers)
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret-value\n")
    logs = Logs()

    async def main() -> tuple[dict[str, str], bytes, int]:
        notifier = Notifier(
            [Webhook(r.url, secret_file=secret_file)], logs, retry_delays=FAST, clock=lambda: 0.0
        )
        notifier.start()
        notifier.submit("request.pending", REQUEST)
        got = await _in_thread(r.next)
        await notifier.close()
        return got  # type: ignore[no-any-return]

    headers, body, _ = asyncio.run(main())
    value = json.loads(body)
    assert value == {
        "event": "request.pending",
        "request": REQUEST,
        "time": "1970-01-01T00:00:00.000Z",
    }
    expected = "sha256=" + hmac.new(b"s3cret-value", body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER.lower()] == expected
    assert headers["content-type"] == "application/json"
    assert not logs.events("webhook_failed")


def test_slack_body_reads_and_unsubscribed_events_are_not_sent(
    receivers: list[Receiver],
) -> None:
    r = _receiver(receivers)

    async def main() -> tuple[dict[str, str], bytes, int]:
        notifier = Notifier(
            [Webhook(r.url, format="slack", events=frozenset({"request.granted"}))], Logs()
        )
        notifier.start()
        notifier.submit("request.pending", REQUEST)  # not subscribed: never sent
        notifier.submit("request.granted", {**REQUEST, "state": "granted"})
        got = await _in_thread(r.next)
        await notifier.close()
        return got  # type: ignore[no-any-return]

    headers, body, _ = asyncio.run(main())
    value = json.loads(body)
    assert set(value) == {"text", "blocks"}
    text = value["text"]
    assert text.startswith(
        "Access granted: github:repo:octo/app:ref:refs/heads/main → db-1:5432/tcp"
    )
    for part in ("for 15m", "reason: INC-42", "rule: dba-db", "approvals: 1/2 (group dba)"):
        assert part in text
    assert value["blocks"][0]["text"]["text"] == text
    assert SIGNATURE_HEADER.lower() not in headers
    assert r.got.empty()  # the pending one was never posted


def test_retries_after_5xx_then_delivers(receivers: list[Receiver]) -> None:
    r = _receiver(receivers, [500, 503, 502])
    logs = Logs()

    async def main() -> list[int]:
        notifier = Notifier([Webhook(r.url)], logs, retry_delays=FAST)
        notifier.start()
        notifier.submit("request.denied", REQUEST)
        statuses = [(await _in_thread(r.next))[2] for _ in range(4)]
        await notifier.close()
        return statuses

    assert asyncio.run(main()) == [500, 503, 502, 200]
    failed = logs.events("webhook_failed")
    assert [f["status"] for f in failed] == [500, 503, 502]
    assert not any(f["gave_up"] for f in failed)


def test_gives_up_after_five_attempts_and_on_a_4xx(receivers: list[Receiver]) -> None:
    dead = _receiver(receivers, [500] * 5)
    refusing = _receiver(receivers, [400])
    logs = Logs()

    async def main() -> None:
        notifier = Notifier([Webhook(dead.url), Webhook(refusing.url)], logs, retry_delays=FAST)
        notifier.start()
        notifier.submit("request.expired", REQUEST)
        for _ in range(5):
            await _in_thread(dead.next)
        await _in_thread(refusing.next)
        await notifier.close()

    asyncio.run(main())
    dead_fails = [f for f in logs.events("webhook_failed") if f["url"] == dead.url]
    assert [f["attempt"] for f in dead_fails] == [1, 2, 3, 4, 5]
    assert dead_fails[-1]["gave_up"] is True
    refused = [f for f in logs.events("webhook_failed") if f["url"] == refusing.url]
    assert len(refused) == 1 and refused[0]["status"] == 400 and refused[0]["gave_up"] is True
    assert dead.got.empty() and refusing.got.empty()  # no sixth, no second attempt


def test_a_hanging_receiver_delays_neither_submit_nor_another_webhook(
    receivers: list[Receiver],
) -> None:
    hanging = _receiver(receivers)
    hanging.hold = threading.Event()
    healthy = _receiver(receivers)
    logs = Logs()

    async def main() -> None:
        notifier = Notifier(
            [Webhook(hanging.url), Webhook(healthy.url)], logs, retry_delays=FAST, queue_limit=2
        )
        notifier.start()
        notifier.submit("request.pending", {**REQUEST, "id": "r-1"})
        # The hanging receiver holds its first message; submit still returns at once
        # and the second webhook gets everything.
        await _in_thread(lambda: hanging.entered.wait(WAIT))
        first = await _in_thread(healthy.next)
        assert json.loads(first[1])["request"]["id"] == "r-1"
        for n in range(2, 6):
            notifier.submit("request.pending", {**REQUEST, "id": f"r-{n}"})
            got = await _in_thread(healthy.next)
            assert json.loads(got[1])["request"]["id"] == f"r-{n}"
        assert hanging.got.empty()  # still held: nothing answered there yet
        # Its queue holds 2: r-2 and r-3 were dropped (oldest first).
        dropped = [f for f in logs.events("webhook_dropped") if f["url"] == hanging.url]
        assert len(dropped) == 2
        assert hanging.hold is not None
        hanging.hold.set()
        later = [json.loads((await _in_thread(hanging.next))[1])["request"]["id"] for _ in range(3)]
        assert later == ["r-1", "r-4", "r-5"]
        await notifier.close()

    asyncio.run(main())


def test_close_stops_within_its_deadline_when_a_receiver_is_down(tmp_path: Path) -> None:
    # A port nobody listens on: every attempt is refused; close() gives up the rest.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logs = Logs()

    async def main() -> None:
        notifier = Notifier([Webhook(f"http://127.0.0.1:{port}/")], logs, retry_delays=(60.0,))
        notifier.start()
        notifier.submit("request.closed", REQUEST)
        await notifier.close(deadline=0.2)

    asyncio.run(main())
    assert logs.events("webhook_failed")[0]["status"] is None
    assert logs.events("webhook_unsent")


def test_secret_file_and_signature_helpers(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"abc\n")
    assert read_secret(path) == b"abc"
    assert signature(b"abc", b"{}") == "sha256=" + hmac.new(b"abc", b"{}", "sha256").hexdigest()
    path.write_bytes(b"\n")
    with pytest.raises(ValueError, match="empty"):
        read_secret(path)
    path.write_bytes(b"x" * 5000)
    with pytest.raises(ValueError, match="longer than"):
        read_secret(path)
    assert "approvals" not in summary("request.granted", {**REQUEST, "approvals_required": 0})


def test_maintenance_expires_pending_requests_and_sends_request_expired(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    # The service's own maintenance step on a real SQLite store: a pending request past
    # its time becomes expired, never a grant, and the webhook says so.
    from portagent.broker.fleet import api
    from portagent.broker.fleet.keyring import KeyRing, generate_key
    from portagent.broker.fleet.model import RequestState
    from portagent.broker.fleet.store import FleetStore
    from portagent.broker.identity.model import Identity, IdentityKind
    from portagent.broker.policy.model import PolicyDecision, RuleLimits
    from portagent.broker.signing import grant_request

    r = _receiver(receivers)
    store = FleetStore.open(f"sqlite:///{tmp_path / 'b.db'}", replica="t")
    generate_key(tmp_path / "keys", now=0.0)
    keyring = KeyRing.load(tmp_path / "keys")
    carol = Identity(
        kind=IdentityKind.PERSON,
        issuer="https://idp.example",
        issuer_name="corp",
        subject="u-carol",
        email="carol@example.com",
        groups=("oncall",),
    )
    store.add_host("db-1", {}, actor="admin:t", now=1000.0)
    access, grant, created = store.create_access_request(
        requester=carol,
        grant_request=grant_request(
            host_id="db-1",
            subject=carol.label,
            sources=["10.0.0.1"],
            port="22",
            ttl=300.0,
            reason="INC-9",
        ),
        decision=PolicyDecision(
            allowed=True,
            rule="oncall",
            message="allowed",
            limits=RuleLimits("oncall", approvals=1, approvers="dba"),
        ),
        keyring=keyring,
        client_request_id=None,
        pending_ttl=60.0,
        now=1000.0,
    )
    assert created and grant is None and access.state is RequestState.PENDING
    logs = Logs()
    notifier = Notifier([Webhook(r.url)], logs, retry_delays=FAST)
    ctx = api.ApiContext(
        store=store,
        keyring=lambda: keyring,
        tokens=lambda: api.Tokens({}),
        publish=lambda host_id: None,
        log=logs,
        clock=lambda: 1061.0,  # past the request's 60 s
        notifier=notifier,
    )

    async def main() -> tuple[dict[str, str], bytes, int]:
        notifier.start()
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(api.maintenance(ctx, stop))
        got = await _in_thread(r.next)
        stop.set()
        await task
        await notifier.close()
        return got  # type: ignore[no-any-return]

    try:
        _, body, _ = asyncio.run(main())
    finally:
        ctx.close()
    value = json.loads(body)
    assert value["event"] == "request.expired"
    assert value["request"]["id"] == access.request_id
    assert value["request"]["state"] == "expired" and value["request"]["grant_id"] is None
    stored = store.get_access_request(access.request_id)
    assert stored is not None and stored.state is RequestState.EXPIRED
    assert [f["request_id"] for e, f in logs if e == "request_expired"] == [access.request_id]
    store.close()
