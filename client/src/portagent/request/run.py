"""Open access, wait for approval and the agent, run CMD, close access when it ends.

The request is closed when CMD exits or when the wrapper gets SIGTERM, SIGINT or SIGHUP
(forwarded to CMD first). If the wrapper itself is SIGKILLed nothing can run: the grant's
TTL is then the hard stop, enforced by the host's kernel.

Signals while waiting: during the create call a signal is only recorded (the request's id
is not known until the answer arrives, and a request we cannot name could not be closed);
it is acted on right after. During long polls it interrupts the wait at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from portagent.request.api import MAX_WAIT, Broker, BrokerError, request_view, trace

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs start-up time; annotations are strings here
    from types import FrameType
    from typing import IO, Any

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
CLOSE_BUDGET = 5.0  # seconds spent retrying the close at the end
KILL_GRACE = 10.0  # after forwarding a stop signal, CMD gets this long before SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TERMINAL_STATES = {"denied", "expired", "cancelled", "closed"}


class Interrupted(BaseException):
    """A stop signal arrived while waiting (BaseException: nothing may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Exit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def exit_code(err: BrokerError) -> int:
    if err.status == 0:
        return EX_TEMPFAIL if err.code == "DEADLINE_EXCEEDED" else EX_UNAVAILABLE
    if err.status in (401, 403):
        return EX_NOPERM
    if err.status in (408, 504):
        return EX_TEMPFAIL
    if err.status >= 500 or err.status == 429:
        return EX_UNAVAILABLE
    return EX_USAGE  # 400/404/409: the request itself is wrong


class Signals:
    """The wrapper's stop-signal handling, in one place (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.raise_now = False
        self.child_pid: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.setitimer(signal.ITIMER_REAL, 0)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if self.child_pid is not None:
            self.forward(signum)
            if first:
                # CMD may ignore the signal: it gets KILL_GRACE seconds, then SIGKILL,
                # so the close still happens in bounded time.
                signal.signal(signal.SIGALRM, self._kill_child)
                signal.setitimer(signal.ITIMER_REAL, KILL_GRACE)
            return
        if self.raise_now:
            raise Interrupted(signum)

    def forward(self, signum: int) -> None:
        if self.child_pid is None:
            return
        # Ctrl-C in a terminal already reached CMD (same foreground process group);
        # sending it again would make it see two.
        if signum == signal.SIGINT and _terminal_foreground():
            return
        _kill(self.child_pid, signum)

    def _kill_child(self, signum: int, frame: FrameType | None) -> None:
        if self.child_pid is not None:
            _kill(self.child_pid, signal.SIGKILL)


def _kill(pid: int, signum: int) -> None:
    try:  # noqa: SIM105 - contextlib costs start-up time
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it ended meanwhile


def _terminal_foreground() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


class Session:
    """One access request from creation to close."""

    def __init__(self, broker: Broker, body: dict[str, Any], wait_approval: float,
                 err: IO[str] | None = None) -> None:
        self.broker = broker
        self.body = body
        self.wait_approval = wait_approval
        self.err = err if err is not None else sys.stderr
        self.signals = Signals()
        self.request_id: str | None = None
        self.state = ""  # the request's last known state
        self.closed = False
        self.answer: dict[str, Any] = {}

    def say(self, text: str) -> None:
        print(f"portagent-request: {text}", file=self.err, flush=True)

    # -- opening -----------------------------------------------------------------------

    def open(self) -> None:
        """Create the request and return once its grant is applied; Exit otherwise."""
        deadline = time.monotonic() + self.wait_approval
        body = dict(self.body, wait=max(0, min(MAX_WAIT, int(self.wait_approval))))
        try:
            self.answer = self.broker.create(body)
        except BrokerError as exc:
            raise Exit(exit_code(exc), exc.describe()) from None
        request, _, applied = request_view(self.answer)
        self.request_id, self.state = request["id"], request["state"]
        trace("created")
        self._check_signal()
        if request["state"] == "pending":
            self.say(f"waiting for approval (request {self.request_id}, "
                     f"{_needs(request)})")
        announced_apply = False
        while not (request["state"] == "granted" and applied):
            if request["state"] in TERMINAL_STATES:
                raise Exit(EX_NOPERM, _ended(request))
            if request["state"] not in ("pending", "granted"):
                raise Exit(EX_UNAVAILABLE, f"request {self.request_id}: unknown state "
                           f"{request['state'][:40]!r}")
            if request["state"] == "granted" and not announced_apply:
                announced_apply = True
                self.say(f"request {self.request_id} granted; waiting for the host to apply it")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = "approval" if request["state"] == "pending" else "the host to apply it"
                self.close_quietly()
                raise Exit(EX_TEMPFAIL, f"request {self.request_id}: gave up waiting for "
                           f"{what} after --wait-approval {self.wait_approval:g}s; closed it")
            self.signals.raise_now = True
            try:
                self._check_signal()
                self.answer = self.broker.get(self.request_id, wait=max(1, min(
                    MAX_WAIT, int(remaining + 0.999))))
            except BrokerError as exc:
                if exc.status == 0 and exc.code == "DEADLINE_EXCEEDED":
                    continue  # a long poll that outlived its socket timeout: ask again
                raise Exit(exit_code(exc), exc.describe()) from None
            finally:
                self.signals.raise_now = False
            request, _, applied = request_view(self.answer)
            self.state = request["state"]
        trace("applied")

    def _check_signal(self) -> None:
        if self.signals.received is not None:
            raise Interrupted(self.signals.received)

    # -- closing -----------------------------------------------------------------------

    def close(self, budget: float = CLOSE_BUDGET) -> bool:
        """POST close, retried on transport errors and 5xx for at most `budget` seconds."""
        if self.request_id is None:
            return True
        trace("closing")
        deadline = time.monotonic() + budget
        pause = 0.1
        last = ""
        for _ in range(20):  # bounded by count as well as by time
            try:
                self.broker.close_request(self.request_id)
                trace("closed")
                self.closed = True
                return True
            except BrokerError as exc:
                if exc.status == 409 or (exc.status == 400 and exc.reason.endswith("STATE")):
                    return True  # already ended (expired, closed, denied): nothing is open
                if exc.status and exc.status < 500 and exc.status != 429:
                    self.say(f"closing request {self.request_id} failed: {exc.describe()}")
                    return False
                last = exc.describe()
                self.broker.drop()
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        self.say(f"closing request {self.request_id} failed ({last}); its grant stays open "
                 "until its TTL runs out")
        return False

    def close_quietly(self) -> None:
        self.broker.drop()  # an interrupted call may have left the connection mid-answer
        self.close()

    # -- running -----------------------------------------------------------------------

    def run(self, argv: list[str]) -> int:
        """Run CMD with inherited stdio; its exit status (128+N if signal N killed it)."""
        import subprocess

        try:
            proc = subprocess.Popen(argv)
        except FileNotFoundError:
            self.say(f"{argv[0]}: command not found")
            return 127
        except OSError as exc:
            self.say(f"{argv[0]}: {exc.strerror or exc}")
            return 126
        self.signals.child_pid = proc.pid
        if self.signals.received is not None:  # arrived between fork and here
            self.signals.forward(self.signals.received)
        status = proc.wait()
        self.signals.child_pid = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        return 128 - status if status < 0 else status


def _needs(request: dict[str, Any]) -> str:
    required = request.get("approvals_required")
    group = request.get("approvers")
    if isinstance(required, int) and isinstance(group, str) and group:
        got = request.get("approved")
        have = f", has {got}" if isinstance(got, int) and got else ""
        return f"needs {required} of group {group}{have}"
    return "needs approval"


def _ended(request: dict[str, Any]) -> str:
    state = str(request.get("state"))
    text = f"request {request.get('id')} {state}"
    approvals = request.get("approvals")
    if state == "denied" and isinstance(approvals, list):
        for vote in approvals:
            if isinstance(vote, dict) and vote.get("approve") is False:
                who = vote.get("approver")
                label = who.get("label") if isinstance(who, dict) else who
                comment = vote.get("comment")
                text += f" by {str(label)[:200]}" if label else ""
                text += f": {str(comment)[:300]}" if comment else ""
                break
    elif state == "expired":
        text += ": not enough approvals in time"
    return text


def session_main(broker: Broker, body: dict[str, Any], wait_approval: float,
                 command: list[str], as_json: bool) -> int:
    """The whole life of one request; returns the exit status."""
    import json

    session = Session(broker, body, wait_approval)
    session.signals.install()
    try:
        try:
            session.open()
        except Interrupted as stop:
            session.close_quietly()
            return 128 + stop.signum
        except Exit as done:
            if done.message:
                session.say(done.message)
            # Given up while the request may still become (or be) granted: withdraw it,
            # so no access opens that nobody will use.
            if (session.request_id is not None and not session.closed
                    and session.state not in TERMINAL_STATES):
                session.close_quietly()
            if session.signals.received is not None:
                return 128 + session.signals.received
            return done.code
        if not command:
            print(json.dumps(session.answer, indent=1) if as_json else session.request_id,
                  flush=True)
            return EX_OK
        status = session.run(command)
        # From here on a further signal only gets recorded: the close must happen.
        session.signals.raise_now = False
        session.close()
        return status
    finally:
        session.signals.restore()


def close_main(broker: Broker, request_id: str) -> int:
    try:
        broker.close_request(request_id)
    except BrokerError as exc:
        print(f"portagent-request: closing {request_id}: {exc.describe()}", file=sys.stderr)
        return exit_code(exc)
    return EX_OK
