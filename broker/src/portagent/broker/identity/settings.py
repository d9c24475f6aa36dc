"""The OIDC issuers the broker trusts (`[[service.issuers]]` in service.toml), read
through portagent.wire.config.Reader like every other setting: one pure parse that
reports every problem at once, each naming its key (`service.issuers[0].audience`).

    [[service.issuers]]
    name = "github"                      # short name: labels, policy entity ids, logs
    kind = "github"                      # github | buildkite | person
    issuer = "https://token.actions.githubusercontent.com"
    audience = "portagent"               # a string or a list (required)
    jwks_uri = "https://…/jwks"          # default: {issuer}/.well-known/openid-configuration
    # jwks_file = "github-jwks.json"     # or keys read from a file (no fetching)
    # ca = "issuer-ca.pem"               # CA bundle for fetching (default: system CAs)
    algorithms = ["RS256"]               # allow-list (default RS256, ES256)
    leeway = "60s"                       # clock skew allowed on exp/nbf/iat (max 5m)
    max_lifetime = "24h"                 # refuse a token whose exp - iat is longer
    groups_claim = "groups"              # person only
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portagent.broker.identity.model import IdentityKind
from portagent.wire.config import Reader

# Asymmetric signatures only: "none" proves nothing, and HS* would need a secret shared
# with the issuer (and, fed a public key, is the classic key-confusion attack).
SUPPORTED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "EdDSA",
)
DEFAULT_ALGORITHMS = ("RS256", "ES256")
DEFAULT_LEEWAY = 60.0
MAX_LEEWAY = 300.0
DEFAULT_MAX_LIFETIME = 86400.0
MAX_LIFETIME = 30 * 86400.0
DEFAULT_GROUPS_CLAIM = "groups"
MAX_ISSUERS = 32
MAX_AUDIENCES = 16
MAX_URL = 1024
MAX_AUDIENCE = 256
# The name prefixes labels (`github:repo:…`) and Cedar entity ids (`github:<sub>`), so
# no ":"; "admin" is the admins' own prefix (`admin:ops`) and must not be impersonated.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
RESERVED_NAMES = frozenset({"admin"})
CLAIM_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")

KNOWN_KEYS = frozenset(
    {
        "name",
        "kind",
        "issuer",
        "audience",
        "jwks_uri",
        "jwks_file",
        "ca",
        "algorithms",
        "leeway",
        "max_lifetime",
        "groups_claim",
    }
)
_KINDS = {k.value: k for k in IdentityKind if k is not IdentityKind.ADMIN}


@dataclass(frozen=True)
class IssuerSettings:
    name: str
    kind: IdentityKind
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None
    jwks_file: Path | None
    ca: Path | None
    algorithms: tuple[str, ...]
    leeway: float
    max_lifetime: float
    groups_claim: str


def https_url_problem(text: str) -> str | None:
    """Why `text` is not an absolute https:// URL with a host, or None. Plain http is
    refused even for loopback: anyone on the path could swap the keys."""
    if len(text) > MAX_URL:
        return f"longer than {MAX_URL} characters"
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in text):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme != "https":
        return f"must be an https:// URL, got {text[:80]!r}"
    if not parts.hostname:
        return f"has no host: {text[:80]!r}"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if parts.fragment:
        return "must not have a #fragment"
    return None


def _algorithm_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"expected strings, got {name!r}"
    if name.lower() == "none":
        return '"none" is never accepted: an unsigned token proves nothing'
    if name.upper().startswith("HS"):
        return (
            f"{name!r} is never accepted: HMAC needs a secret shared with the issuer, and "
            "keyed with the issuer's public key it is the key-confusion attack"
        )
    if name not in SUPPORTED_ALGORITHMS:
        return f"{name[:40]!r} is not supported (one of {', '.join(SUPPORTED_ALGORITHMS)})"
    return None


def _parse_one(
    read: Reader, table: dict[str, Any], where: str, base_dir: Path
) -> IssuerSettings | None:
    problems = read.problems
    before = len(problems)
    read.unknown(table, KNOWN_KEYS, where)

    name: str = read.get(table, "name", str, where, "", required=True)
    if "name" in table and isinstance(table["name"], str):
        if not NAME_PATTERN.fullmatch(name):
            problems.append(f"{where}name: {name[:40]!r} is not 1-32 of [A-Za-z0-9._-]")
        elif name.lower() in RESERVED_NAMES:
            problems.append(f"{where}name: {name!r} is reserved for admin credentials")

    kind_text: str = read.get(table, "kind", str, where, "", required=True)
    kind = _KINDS.get(kind_text)
    if kind is None and isinstance(table.get("kind"), str):
        problems.append(
            f"{where}kind: {kind_text[:40]!r} is not one of {', '.join(sorted(_KINDS))}"
        )

    issuer: str = read.get(table, "issuer", str, where, "", required=True)
    if isinstance(table.get("issuer"), str):
        why = https_url_problem(issuer)
        if why:
            problems.append(f"{where}issuer: {why}")
        elif urllib.parse.urlsplit(issuer).query:
            problems.append(f"{where}issuer: must not have a ?query")

    audiences: tuple[str, ...] = ()
    if "audience" not in table:
        problems.append(
            f"{where}audience: required (the `aud` this broker's tokens carry, e.g. "
            '"portagent"; without it a token minted for any other service would do)'
        )
    else:
        raw = table["audience"]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            problems.append(f"{where}audience: expected a string or a non-empty list of strings")
        elif len(items) > MAX_AUDIENCES:
            problems.append(f"{where}audience: at most {MAX_AUDIENCES} audiences")
        else:
            for i, aud in enumerate(items):
                if not isinstance(aud, str) or not aud.strip() or len(aud) > MAX_AUDIENCE:
                    problems.append(
                        f"{where}audience[{i}]: expected a non-empty string of at most "
                        f"{MAX_AUDIENCE} characters, got {str(aud)[:40]!r}"
                    )
            audiences = tuple(dict.fromkeys(a for a in items if isinstance(a, str)))

    jwks_uri: str | None = read.get(table, "jwks_uri", str, where)
    if jwks_uri is not None:
        why = https_url_problem(jwks_uri)
        if why:
            problems.append(f"{where}jwks_uri: {why}")
    jwks_file = read.path(table, "jwks_file", where, base_dir) if "jwks_file" in table else None
    ca = read.path(table, "ca", where, base_dir) if "ca" in table else None
    if "jwks_uri" in table and "jwks_file" in table:
        problems.append(
            f"{where}jwks_file: give either jwks_uri (fetched) or jwks_file (read), not both"
        )
    if "jwks_file" in table and "ca" in table:
        problems.append(f"{where}ca: used only for fetching keys; jwks_file is read, not fetched")

    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    if "algorithms" in table:
        raw_algs = table["algorithms"]
        if not isinstance(raw_algs, list) or not raw_algs:
            problems.append(f"{where}algorithms: expected a non-empty list of strings")
        else:
            for i, alg in enumerate(raw_algs):
                why = _algorithm_problem(alg)
                if why:
                    problems.append(f"{where}algorithms[{i}]: {why}")
            algorithms = tuple(dict.fromkeys(a for a in raw_algs if isinstance(a, str)))

    leeway = read.duration(table, "leeway", where, DEFAULT_LEEWAY, high=MAX_LEEWAY)
    max_lifetime = read.duration(
        table, "max_lifetime", where, DEFAULT_MAX_LIFETIME, low=1.0, high=MAX_LIFETIME
    )

    groups_claim: str = read.get(table, "groups_claim", str, where, DEFAULT_GROUPS_CLAIM)
    if "groups_claim" in table and isinstance(table["groups_claim"], str):
        if not CLAIM_NAME_PATTERN.fullmatch(groups_claim):
            problems.append(
                f"{where}groups_claim: {groups_claim[:40]!r} is not a claim name "
                "(1-64 of [A-Za-z0-9_.:/-])"
            )
        elif kind is not None and kind is not IdentityKind.PERSON:
            problems.append(f'{where}groups_claim: only for kind = "person"')

    if len(problems) > before or kind is None:
        return None
    return IssuerSettings(
        name=name,
        kind=kind,
        issuer=issuer,
        audiences=audiences,
        jwks_uri=jwks_uri,
        jwks_file=jwks_file,
        ca=ca,
        algorithms=algorithms,
        leeway=leeway,
        max_lifetime=max_lifetime,
        groups_claim=groups_claim,
    )


def parse_issuers(
    read: Reader, service: dict[str, Any], base_dir: Path
) -> tuple[IssuerSettings, ...]:
    """`service["issuers"]` (an array of tables; absent → ()) as IssuerSettings. Each
    problem is appended to `read.problems` naming its key; the issuers returned are only
    the valid ones, so a caller raises ConfigError when problems is not empty."""
    if "issuers" not in service:
        return ()
    raw = service["issuers"]
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        read.problems.append(
            "service.issuers: expected an array of tables ([[service.issuers]] blocks)"
        )
        return ()
    if len(raw) > MAX_ISSUERS:
        read.problems.append(f"service.issuers: at most {MAX_ISSUERS} issuers")
        return ()
    out: list[IssuerSettings] = []
    names: dict[str, int] = {}
    urls: dict[str, int] = {}
    for i, table in enumerate(raw):
        where = f"service.issuers[{i}]."
        parsed = _parse_one(read, table, where, base_dir)
        name, url = table.get("name"), table.get("issuer")
        # Duplicates are named even when the entry has other problems.
        if isinstance(name, str):
            folded = name.casefold()
            if folded in names:
                read.problems.append(
                    f"{where}name: {name!r} is already service.issuers[{names[folded]}]'s name"
                )
            names.setdefault(folded, i)
        if isinstance(url, str):
            # The token's `iss` picks the config: two configs for one issuer is ambiguous.
            if url in urls:
                read.problems.append(
                    f"{where}issuer: already configured as service.issuers[{urls[url]}]"
                )
            urls.setdefault(url, i)
        if parsed is not None:
            out.append(parsed)
    return tuple(out)
