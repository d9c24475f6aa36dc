"""Webhooks for access requests (ADR 0008 §Notifications): a JSON POST when a request
needs review (`request.pending`) and when it is decided.

A decision never waits for a webhook: `Notifier.submit` only appends to a bounded
queue (per webhook, so a dead receiver does not hold up the others; full: the oldest
message is dropped and `webhook_dropped` logged). One background task per webhook
posts its queue in order, with urllib in a thread (5 s timeout), retrying after 1, 2, 4
and 8 seconds; a message still refused is logged `webhook_failed` and given up.

Bodies: `{"event", "request", "time"}` (format "json") or a Slack-compatible
`{"text", "blocks"}` (format "slack"). With a `secret_file`, `X-Portagent-Signature:
sha256=<hex HMAC-SHA256 of the body>` lets the receiver check the sender.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS = (
    "request.pending",
    "request.granted",
    "request.denied",
    "request.expired",
    "request.cancelled",
    "request.closed",
)
FORMATS = ("json", "slack")
QUEUE_LIMIT = 1000
POST_TIMEOUT = 5.0
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # 5 attempts in all
CLOSE_DEADLINE = 3.0
MAX_SECRET_BYTES = 4096
SIGNATURE_HEADER = "X-Portagent-Signature"
USER_AGENT = "portagent-broker-webhook"

Log = Callable[..., None]

_TITLES = {
    "request.pending": "Access request needs review",
    "request.granted": "Access granted",
    "request.denied": "Access request denied",
    "request.expired": "Access request expired",
    "request.cancelled": "Access request cancelled",
    "request.closed": "Access closed",
}


@dataclass(frozen=True)
class Webhook:
    """One `[[service.webhooks]]` entry, parsed (service_settings)."""

    url: str
    format: str = "json"
    events: frozenset[str] = field(default_factory=lambda: frozenset(EVENTS))
    secret_file: Path | None = None
    ca: Path | None = None


class WebhookError(Exception):
    def __init__(self, message: str, status: int | None = None, retry: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


def read_secret(path: Path) -> bytes:
    """The HMAC key: the file's bytes without the trailing newline; never empty."""
    with path.open("rb") as handle:
        data = handle.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"{path}: longer than {MAX_SECRET_BYTES} bytes")
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"{path}: empty")
    return secret


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "?"
    seconds = int(seconds)
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def summary(event: str, request: Mapping[str, Any]) -> str:
    """One readable line: who, what host:port, ttl, reason, rule, approvals n/N."""
    requester = request.get("requester")
    who = requester.get("label", "?") if isinstance(requester, Mapping) else "?"
    host, ports, protocol = (request.get(k, "?") for k in ("host_id", "ports", "protocol"))
    ttl = _duration(request.get("ttl_seconds"))
    parts = [
        f"{_TITLES.get(event, event)}: {who} → {host}:{ports}/{protocol} for {ttl}",
        f"reason: {request.get('reason', '')}",
    ]
    if request.get("rule"):
        parts.append(f"rule: {request['rule']}")
    required = request.get("approvals_required")
    if isinstance(required, int) and required > 0:
        parts.append(
            f"approvals: {request.get('approved', 0)}/{required}"
            f" (group {request.get('approvers', '?')})"
        )
    parts.append(f"request: {request.get('id', '?')}")
    return " · ".join(parts)


def render(webhook: Webhook, event: str, request: Mapping[str, Any], now: float) -> bytes:
    if webhook.format == "slack":
        text = summary(event, request)
        value: dict[str, Any] = {
            "text": text,
            "blocks": [{"type": "section", "text": {"type": "plain_text", "text": text}}],
        }
    else:
        when = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds")
        value = {"event": event, "request": dict(request), "time": when.replace("+00:00", "Z")}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would send the (signed) body somewhere the config does not name.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Target:
    def __init__(self, webhook: Webhook) -> None:
        self.webhook = webhook
        self.secret = read_secret(webhook.secret_file) if webhook.secret_file else None
        context = ssl.create_default_context(cafile=str(webhook.ca) if webhook.ca else None)
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), _NoRedirect()
        )
        self.queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def post(self, body: bytes, timeout: float) -> int:
        request = urllib.request.Request(self.webhook.url, data=body, method="POST")  # noqa: S310
        request.add_header("Content-Type", "application/json")
        request.add_header("User-Agent", USER_AGENT)
        if self.secret is not None:
            request.add_header(SIGNATURE_HEADER, signature(self.secret, body))
        try:
            with self.opener.open(request, timeout=timeout) as response:
                response.read(65536)
                status: int = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (OSError, ValueError) as exc:  # refused, reset, TLS, timeout
            raise WebhookError(str(exc)[:200] or type(exc).__name__) from None
        if 200 <= status < 300:
            return status
        # A 4xx other than these will not change with a retry.
        retry = status >= 500 or status in (408, 425, 429)
        raise WebhookError(f"HTTP {status}", status, retry)


class Notifier:
    def __init__(
        self,
        webhooks: Iterable[Webhook],
        log: Log,
        *,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        timeout: float = POST_TIMEOUT,
        queue_limit: int = QUEUE_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Reads each webhook's secret now (OSError / ValueError when it cannot)."""
        self._targets = [_Target(w) for w in webhooks]
        self._log = log
        self._delays = retry_delays
        self._timeout = timeout
        self._limit = queue_limit
        self._clock = clock
        self._pool: ThreadPoolExecutor | None = None
        self._closing = False

    def __len__(self) -> int:
        return len(self._targets)

    def start(self) -> None:
        """Start the senders on the running loop."""
        if not self._targets or self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(
            max_workers=min(len(self._targets), 8), thread_name_prefix="webhook"
        )
        loop = asyncio.get_running_loop()
        for target in self._targets:
            target.task = loop.create_task(self._run(target))

    def submit(self, event: str, request: Mapping[str, Any]) -> None:
        """Queue `event` for every webhook that wants it; never blocks, never raises
        for a receiver's sake. Call on the loop."""
        if self._closing:
            return
        now = self._clock()
        for target in self._targets:
            if event not in target.webhook.events:
                continue
            if len(target.queue) >= self._limit:
                dropped, _ = target.queue.popleft()
                self._log("webhook_dropped", url=target.webhook.url, notification=dropped)
            target.queue.append((event, render(target.webhook, event, request, now)))
            target.wake.set()

    async def _run(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not target.queue:
                if self._closing:
                    return
                target.wake.clear()
                await target.wake.wait()
                continue
            event, body = target.queue.popleft()
            for attempt in range(len(self._delays) + 1):
                try:
                    await loop.run_in_executor(self._pool, target.post, body, self._timeout)
                    break
                except Exception as exc:  # a bug must not end this webhook's sender
                    if not isinstance(exc, WebhookError):
                        exc = WebhookError(repr(exc)[:200], retry=False)
                    last = attempt == len(self._delays) or not exc.retry
                    self._log(
                        "webhook_failed",
                        url=target.webhook.url,
                        notification=event,
                        attempt=attempt + 1,
                        status=exc.status,
                        error=str(exc),
                        gave_up=last,
                    )
                    if last:
                        break
                    await asyncio.sleep(self._delays[attempt])

    async def close(self, deadline: float = CLOSE_DEADLINE) -> None:
        """Send what is queued for at most `deadline` seconds, then stop."""
        self._closing = True
        tasks = [t.task for t in self._targets if t.task is not None]
        for target in self._targets:
            target.wake.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                left = sum(len(t.queue) for t in self._targets if t.task is task)
                self._log("webhook_unsent", count=left + 1)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
