"""Where the requester's token comes from: a file, PORTAGENT_TOKEN, or the CI's own OIDC.

Order: --token-file, else PORTAGENT_TOKEN, else OIDC (--oidc github|buildkite|auto; auto
when nothing else is given). The token is a credential: it is checked for shape (one
line of printable ASCII, at most 16 KiB — the broker's own limit) and never printed;
every error names the flag or variable it came from.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_TOKEN = 16 * 1024
GITHUB_URL = "ACTIONS_ID_TOKEN_REQUEST_URL"
GITHUB_TOKEN = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"  # noqa: S105 - a variable's name
BUILDKITE_JOB = "BUILDKITE_JOB_ID"
TOKEN_ENV = "PORTAGENT_TOKEN"  # noqa: S105 - a variable's name
OIDC_TIMEOUT = 15.0


class TokenError(Exception):
    """No usable token; `unreachable` when an OIDC endpoint did not answer (exit 69)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def check_token(text: str, origin: str) -> str:
    token = text.strip()
    if not token:
        raise TokenError(f"{origin}: the token is empty")
    if len(token) > MAX_TOKEN:
        raise TokenError(f"{origin}: the token is longer than {MAX_TOKEN} bytes")
    # A header value: anything outside printable ASCII (a newline above all) is refused
    # before it can reach a request line.
    if not all(33 <= ord(c) <= 126 for c in token):
        raise TokenError(f"{origin}: the token must be one line of printable ASCII "
                         "without spaces")
    return token


def from_file(path: str) -> str:
    try:
        with open(path, "rb") as stream:  # noqa: PTH123 - pathlib costs start-up time
            raw = stream.read(MAX_TOKEN + 2)
    except OSError as exc:
        raise TokenError(f"--token-file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TokenError(f"--token-file {path}: not ASCII text") from None
    return check_token(text, f"--token-file {path}")


def resolve(token_file: str | None, oidc: str | None, audience: str,
            environ: Mapping[str, str] | None = None) -> str:
    """The token to send, by the order above."""
    env = os.environ if environ is None else environ
    if token_file:
        return from_file(token_file)
    if oidc is None and env.get(TOKEN_ENV):
        return check_token(env[TOKEN_ENV], TOKEN_ENV)
    kind = oidc or "auto"
    if kind == "auto":
        if env.get(GITHUB_URL) and env.get(GITHUB_TOKEN):
            kind = "github"
        elif env.get(BUILDKITE_JOB):
            kind = "buildkite"
        else:
            raise TokenError(
                "no token: pass --token-file FILE, set PORTAGENT_TOKEN, or run in a CI job "
                f"with OIDC (GitHub: {GITHUB_URL} and {GITHUB_TOKEN}, i.e. `permissions: "
                f"id-token: write`; Buildkite: {BUILDKITE_JOB} and buildkite-agent)")
    if kind == "github":
        return github(audience, env)
    if kind == "buildkite":
        return buildkite(audience, env)
    raise TokenError(f"--oidc {kind!r}: use github, buildkite or auto")


def github(audience: str, env: Mapping[str, str]) -> str:
    """GitHub Actions' ID token: GET $URL&audience=AUD with the job's request token."""
    url, bearer = env.get(GITHUB_URL, ""), env.get(GITHUB_TOKEN, "")
    if not url or not bearer:
        raise TokenError(f"--oidc github: {GITHUB_URL} and {GITHUB_TOKEN} are not set "
                         "(the job needs `permissions: id-token: write`)")
    bearer = check_token(bearer, GITHUB_TOKEN)  # a header value: one clean line
    import json

    from portagent.request.api import HttpError, fetch, percent_encode

    separator = "&" if "?" in url else "?"
    target = f"{url}{separator}audience={percent_encode(audience)}"
    try:
        status, raw = fetch(target, {"Authorization": f"bearer {bearer}",
                                     "Accept": "application/json"}, OIDC_TIMEOUT)
    except ValueError as exc:
        raise TokenError(f"{GITHUB_URL}: {exc}") from None
    except (OSError, HttpError) as exc:
        raise TokenError(f"{GITHUB_URL}: {exc or type(exc).__name__}",
                         unreachable=True) from None
    if status != 200:
        raise TokenError(f"{GITHUB_URL} answered HTTP {status} "
                         "(is `permissions: id-token: write` set?)",
                         unreachable=status >= 500)
    try:
        value = json.loads(raw)["value"] if len(raw) <= MAX_TOKEN * 4 else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, str):
        raise TokenError(f"{GITHUB_URL}: the answer is not JSON with a string \"value\"")
    return check_token(value, f"{GITHUB_URL} answer")


def buildkite(audience: str, env: Mapping[str, str]) -> str:
    """Buildkite's job token: `buildkite-agent oidc request-token --audience AUD`."""
    import shutil
    import subprocess

    agent = shutil.which("buildkite-agent", path=env.get("PATH"))
    if not agent:
        raise TokenError("--oidc buildkite: buildkite-agent is not on PATH")
    try:
        done = subprocess.run([agent, "oidc", "request-token", "--audience", audience],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=OIDC_TIMEOUT, env=dict(env), check=False)
    except subprocess.TimeoutExpired:
        raise TokenError(f"--oidc buildkite: buildkite-agent gave no token in "
                         f"{OIDC_TIMEOUT:g}s", unreachable=True) from None
    except OSError as exc:
        raise TokenError(f"--oidc buildkite: cannot run buildkite-agent: {exc}") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-300:]
        raise TokenError(f"--oidc buildkite: buildkite-agent oidc request-token exited "
                         f"{done.returncode}: {tail}", unreachable=True)
    try:
        text = done.stdout[: MAX_TOKEN + 2].decode("ascii")
    except UnicodeDecodeError:
        raise TokenError("--oidc buildkite: buildkite-agent printed non-ASCII") from None
    return check_token(text, "buildkite-agent oidc request-token")
