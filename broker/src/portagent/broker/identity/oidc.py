"""OIDC ID tokens (JWT) to a verified `Identity` (ADR 0008), with PyJWT doing the JOSE.

Order, each step failing closed with its own reason code (IdentityError):
size and shape (TOKEN_MALFORMED) → unverified header: `alg` is an asymmetric
algorithm we support, never `none` or HS* (TOKEN_ALGORITHM) → unverified `iss` picks
the issuer config (TOKEN_ISSUER), whose allow-list must hold `alg` (TOKEN_ALGORITHM) →
the key by `kid` from the cached JWKS (one refetch on an unknown kid, at most once per
30 s per issuer: TOKEN_KEY_UNKNOWN; no keys at all: JWKS_UNAVAILABLE) → `jwt.decode`
with exactly that alg, the audiences, the issuer and the required claims
(TOKEN_SIGNATURE, TOKEN_AUDIENCE, …) → times against our clock with the issuer's leeway
(TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, TOKEN_CLAIMS for a too-long lifetime) → the
first-class claims of the issuer's kind, type-checked (TOKEN_CLAIMS) → Identity.

Times are checked here rather than by PyJWT: Debian's PyJWT 2.6 reads the wall clock
itself (no injectable clock) and raises TypeError instead of a PyJWT error on an `iat`
that is a list; one typed check behaves the same on 2.6 and on newer versions.

Only APIs present in PyJWT 2.6 are used (jwt.decode, jwt.get_unverified_header,
jwt.PyJWK, jwt.exceptions). Messages never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException, HTTPMessage
from pathlib import Path
from typing import IO, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from portagent.broker.identity.model import (
    FIRST_CLASS_CLAIMS,
    MAX_CLAIM_TEXT,
    MAX_GROUPS,
    ClaimValue,
    Identity,
    IdentityError,
    IdentityKind,
)
from portagent.broker.identity.settings import SUPPORTED_ALGORITHMS, IssuerSettings
from portagent.wire.config import read_config_text
from portagent.wire.errors import ConfigError

MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100
MAX_KID = 256
FETCH_TIMEOUT = 5.0
JWKS_CACHE_SECONDS = 600.0
REFETCH_INTERVAL = 30.0  # at most one fetch per issuer in this many seconds
MIN_RSA_BITS = 2048
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Header parameters that change what the signature covers; PyJWT 2.6 does not honour
# `crit`, so a token relying on one is refused rather than half-understood.
_REFUSED_HEADERS = ("crit", "b64", "jku", "x5u", "jwk")
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Which JWK can verify which algorithm: (kty, crv or None for any).
_ALG_KEY: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", "Ed25519"),
}
_DEFAULT_ALG = {("RSA", None): "RS256", ("EC", "P-256"): "ES256", ("EC", "P-384"): "ES384"}
_DEFAULT_ALG[("OKP", "Ed25519")] = "EdDSA"
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_INTS_ONLY = frozenset({"build_number"})  # Buildkite's build_number is a JSON number


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts (the last may be empty), at most 16 KiB: the API sends
    such a bearer token to `TokenVerifier.verify` and anything else to the admin tokens.
    An unsigned `x.y.` token is routed here too, to be refused as TOKEN_ALGORITHM."""
    return (
        isinstance(token, str)
        and len(token) <= MAX_TOKEN_BYTES
        and _SHAPE.fullmatch(token) is not None
    )


@dataclass(frozen=True)
class JwksKey:
    """One usable public key of an issuer's JWKS."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", when it states one
    key: Any  # the cryptography public key PyJWT verifies with

    def fits(self, alg: str) -> str | None:
        """Why this key cannot verify `alg`, or None."""
        if self.alg is not None and self.alg != alg:
            return f"key {self.kid!r} is for {self.alg}, the token says {alg}"
        kty, crv = _ALG_KEY[alg]
        if self.kty != kty or (crv is not None and self.crv != crv):
            return f"key {self.kid!r} ({self.kty} {self.crv or ''}) cannot verify {alg}".replace(
                " )", ")"
            )
        return None


class JwksError(Exception):
    """The keys could not be had (fetch, size, JSON, no usable key)."""


def parse_jwks(
    data: bytes | str, *, skipped: Callable[[str | None, str], None] | None = None
) -> tuple[JwksKey, ...]:
    """A JWKS document to its usable signature keys. Unusable keys are skipped (and
    reported through `skipped(kid, why)`): symmetric ("oct") keys always, private key
    material, `use` other than "sig", an `alg` we do not accept, curves other than
    P-256/P-384/Ed25519, RSA below 2048 bits. JwksError when nothing usable is left."""
    if len(data) > MAX_JWKS_BYTES:
        raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise JwksError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('not a JWKS (expected an object with a "keys" list)')
    items = doc["keys"]
    if len(items) > MAX_JWKS_KEYS:
        raise JwksError(f"more than {MAX_JWKS_KEYS} keys")
    keys: list[JwksKey] = []
    seen: set[str | None] = set()
    for item in items:
        why: str | None
        kid = item.get("kid") if isinstance(item, dict) else None
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID):
            kid, why = None, "its kid is not a string of at most 256 characters"
        else:
            why = _jwk_problem(item)
        if why is None and kid is not None and kid in seen:
            why = "a second key with the same kid"
        key = None
        if why is None:
            key, why = _load_jwk(item, kid)
        if key is None:
            if skipped is not None:
                skipped(kid, why or "unusable")
            continue
        seen.add(kid)
        keys.append(key)
    if not keys:
        raise JwksError("no usable signature key")
    return tuple(keys)


def _jwk_problem(item: object) -> str | None:
    if not isinstance(item, dict):
        return "not an object"
    kty = item.get("kty")
    if kty == "oct":
        # A symmetric key next to public ones is how HS256-with-the-public-key works.
        return "symmetric (kty oct) keys are never used"
    if kty not in ("RSA", "EC", "OKP"):
        return f"kty {str(kty)[:20]!r} is not RSA, EC or OKP"
    if any(m in item for m in _PRIVATE_MEMBERS):
        return "it carries private key material"
    if item.get("use", "sig") != "sig":
        return f"use {str(item.get('use'))[:20]!r} is not sig"
    alg = item.get("alg")
    crv = item.get("crv")
    if kty != "RSA" and (kty, crv) not in _DEFAULT_ALG:
        return f"curve {str(crv)[:20]!r} is not supported"
    if alg is not None:
        if alg not in SUPPORTED_ALGORITHMS:
            return f"alg {str(alg)[:20]!r} is not accepted"
        want_kty, want_crv = _ALG_KEY[alg]
        if kty != want_kty or (want_crv is not None and crv != want_crv):
            return f"alg {alg} does not fit a {kty} key"
    return None


def _load_jwk(item: dict[str, Any], kid: str | None) -> tuple[JwksKey | None, str | None]:
    kty: str = item["kty"]
    crv = item.get("crv") if kty != "RSA" else None
    alg = item.get("alg")
    try:
        # The algorithm is named explicitly so PyJWT never infers one (it would pick
        # HS256 for an "oct" key; those never get here either).
        pyjwk = jwt.PyJWK(item, algorithm=alg or _DEFAULT_ALG[(kty, crv)])
        public = pyjwk.key
    except Exception as exc:  # PyJWT and cryptography raise a variety of errors here
        return None, f"PyJWT cannot load it ({type(exc).__name__})"
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        return None, f"RSA key of {public.key_size} bits (at least {MIN_RSA_BITS})"
    if not hasattr(public, "verify"):
        return None, "not a public key"
    return JwksKey(kid=kid, kty=kty, crv=crv, alg=alg, key=public), None


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another https:// URL: a hop to http:// would let
    anyone on the path hand us keys."""

    max_redirections = 3

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise urllib.error.HTTPError(
                req.full_url, code, "redirect to a non-https URL refused", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_https(url: str, *, ca: Path | None, limit: int = MAX_JWKS_BYTES) -> bytes:
    """GET an https:// URL with the issuer's CA (or the system's), a 5 s timeout per
    operation and about 5 s in all, at most `limit` bytes. JwksError on any failure."""
    if urllib.parse.urlsplit(url).scheme != "https":
        raise JwksError("only https:// URLs are fetched")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ValueError) as exc:
        raise JwksError(f"cannot load the CA file {ca}: {exc}") from None
    opener = urllib.request.build_opener(
        _HttpsOnlyRedirects(), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(  # noqa: S310 (https only, checked above)
        url, headers={"Accept": "application/json", "User-Agent": "portagent-broker"}
    )
    deadline = time.monotonic() + FETCH_TIMEOUT
    chunks: list[bytes] = []
    size = 0
    try:
        with opener.open(request, timeout=FETCH_TIMEOUT) as response:
            # Bounded in bytes and in time: a server dripping a byte a second must not
            # hold a verification for minutes.
            for _ in range(limit // 1024 + 2):
                chunk = response.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise JwksError(f"{url}: larger than {limit} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise JwksError(f"{url}: took longer than {FETCH_TIMEOUT:g}s")
    except urllib.error.HTTPError as exc:
        raise JwksError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise JwksError(f"{url}: {exc.reason}") from None
    except (OSError, HTTPException, ValueError) as exc:
        raise JwksError(f"{url}: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)


@dataclass
class _IssuerState:
    settings: IssuerSettings
    lock: threading.Lock
    keys: tuple[JwksKey, ...] | None = None
    fetched_at: float | None = None
    last_attempt: float | None = None  # any fetch (start, stale cache, unknown kid)
    last_kid_refetch: float | None = None  # the last one an unknown kid asked for
    discovered_uri: str | None = None


def _noop(event: str, **fields: Any) -> None:
    return None


class TokenVerifier:
    """Verifies OIDC ID tokens of the configured issuers. Thread-safe: each issuer's
    key cache has its own lock (held during a fetch, so concurrent verifications of
    one issuer wait for that fetch instead of each starting their own)."""

    def __init__(
        self,
        issuers: Sequence[IssuerSettings],
        *,
        clock: Callable[[], float] = time.time,
        log: Callable[..., None] | None = None,
    ) -> None:
        self._issuers = tuple(issuers)
        self._clock = clock
        self._log: Callable[..., None] = log or _noop
        self._by_iss: dict[str, _IssuerState] = {
            s.issuer: _IssuerState(settings=s, lock=threading.Lock()) for s in self._issuers
        }

    @property
    def issuers(self) -> tuple[IssuerSettings, ...]:
        return self._issuers

    def prefetch(self) -> None:
        """Fetch every issuer's keys once (at start); failures are logged, not raised:
        the first token of that issuer tries again."""
        for state in self._by_iss.values():
            with state.lock:
                self._refresh(state, self._clock(), "start")

    # --- the verification --------------------------------------------------------------

    def verify(self, token: str) -> Identity:
        """The Identity a token proves, or IdentityError(reason, message). Blocking
        (it may fetch keys): call it from a worker thread in async code."""
        if not isinstance(token, str):
            raise IdentityError("TOKEN_MALFORMED", "the token is not text")
        if len(token) > MAX_TOKEN_BYTES:
            raise IdentityError(
                "TOKEN_MALFORMED", f"the token is longer than {MAX_TOKEN_BYTES} bytes"
            )
        if not looks_like_jwt(token):
            raise IdentityError(
                "TOKEN_MALFORMED",
                "the token is not a JWT (three base64url parts separated by dots)",
            )
        alg, kid = self._header(token)
        state = self._issuer(token)
        settings = state.settings
        if alg not in settings.algorithms:
            raise IdentityError(
                "TOKEN_ALGORITHM",
                f"issuer {settings.name!r} accepts {', '.join(settings.algorithms)}, "
                f"the token is signed with {alg}",
            )
        key = self._key(state, kid, alg)
        payload = self._decode(token, key, alg, settings)
        self._check_times(payload, settings)
        return _identity(settings, payload)

    def _header(self, token: str) -> tuple[str, str | None]:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise IdentityError(
                "TOKEN_MALFORMED", "the token's header is not a JSON object"
            ) from None
        if not isinstance(header, dict):
            raise IdentityError("TOKEN_MALFORMED", "the token's header is not a JSON object")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise IdentityError("TOKEN_ALGORITHM", "the token's header names no alg")
        if alg.lower() == "none":
            raise IdentityError(
                "TOKEN_ALGORITHM", 'alg "none" is never accepted: the token is unsigned'
            )
        if alg.upper().startswith("HS"):
            raise IdentityError(
                "TOKEN_ALGORITHM",
                f"alg {alg[:16]!r} is never accepted: ID tokens are verified with the "
                "issuer's public keys, never with a shared secret",
            )
        if alg not in SUPPORTED_ALGORITHMS:
            raise IdentityError(
                "TOKEN_ALGORITHM",
                f"alg {alg[:16]!r} is not supported ({', '.join(SUPPORTED_ALGORITHMS)})",
            )
        for name in _REFUSED_HEADERS:
            if name in header:
                raise IdentityError(
                    "TOKEN_MALFORMED", f"the token's header parameter {name!r} is not accepted"
                )
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID):
            raise IdentityError(
                "TOKEN_MALFORMED", "the token's kid is not a string of at most 256 characters"
            )
        return alg, kid

    def _issuer(self, token: str) -> _IssuerState:
        """The config of the token's (not yet verified) `iss`: only a choice of which
        keys to try; jwt.decode checks `iss` again once the signature holds."""
        part = token.split(".")[1]
        try:
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
            payload = json.loads(raw)
        except (binascii.Error, ValueError, RecursionError):
            raise IdentityError(
                "TOKEN_MALFORMED", "the token's payload is not a JSON object"
            ) from None
        if not isinstance(payload, dict):
            raise IdentityError("TOKEN_MALFORMED", "the token's payload is not a JSON object")
        iss = payload.get("iss")
        if not isinstance(iss, str):
            raise IdentityError("TOKEN_ISSUER", "the token has no iss (issuer) claim")
        state = self._by_iss.get(iss)
        if state is None:
            raise IdentityError("TOKEN_ISSUER", f"issuer {iss[:200]!r} is not configured")
        return state

    def _key(self, state: _IssuerState, kid: str | None, alg: str) -> JwksKey:
        name = state.settings.name
        with state.lock:
            now = self._clock()
            stale = state.keys is None or not _fresh(state.fetched_at, now, JWKS_CACHE_SECONDS)
            fetched = stale and self._may_fetch(state.last_attempt, now)
            if fetched:
                self._refresh(state, now, "stale" if state.keys is not None else "first use")
            key = _find(state.keys or (), kid, alg)
            rotated = key is None and state.keys is not None and not fetched
            if rotated and self._may_fetch(state.last_kid_refetch, now):
                # Rotation: the issuer signs with a key we have not seen yet. Its own
                # budget (one per 30 s), so a key published just after our last fetch is
                # still found, and made-up kids cost the issuer one fetch per 30 s.
                state.last_kid_refetch = now
                self._refresh(state, now, "unknown kid")
                key = _find(state.keys or (), kid, alg)
            if state.keys is None:
                raise IdentityError(
                    "JWKS_UNAVAILABLE", f"the keys of issuer {name!r} could not be fetched"
                )
        if key is None:
            if kid is not None:
                message = f"key {kid!r} is not among issuer {name!r}'s keys"
            else:
                message = f"the token names no key (kid) and no single key of {name!r} fits {alg}"
            raise IdentityError("TOKEN_KEY_UNKNOWN", message)
        why = key.fits(alg)
        if why is not None:
            raise IdentityError("TOKEN_ALGORITHM", why)
        return key

    @staticmethod
    def _may_fetch(last: float | None, now: float) -> bool:
        return last is None or not _fresh(last, now, REFETCH_INTERVAL)

    def _refresh(self, state: _IssuerState, now: float, why: str) -> None:
        """One fetch attempt (caller holds the lock). On failure the old keys stay."""
        settings = state.settings
        state.last_attempt = now
        try:
            keys, source = self._load(state)
        except JwksError as exc:
            self._log(
                "jwks_fetch_failed",
                issuer=settings.name,
                why=why,
                error=str(exc),
                kept_keys=len(state.keys or ()),
            )
            return
        state.keys = keys
        state.fetched_at = now
        self._log(
            "jwks_fetched",
            issuer=settings.name,
            why=why,
            source=source,
            kids=[k.kid for k in keys],
        )

    def _load(self, state: _IssuerState) -> tuple[tuple[JwksKey, ...], str]:
        settings = state.settings

        def skipped(kid: str | None, why: str) -> None:
            self._log("jwks_key_skipped", issuer=settings.name, kid=kid, why=why)

        if settings.jwks_file is not None:
            try:
                text = read_config_text(settings.jwks_file, "a JWKS file")
            except ConfigError as exc:
                raise JwksError("; ".join(exc.problems)) from None
            return parse_jwks(text, skipped=skipped), str(settings.jwks_file)
        uri = settings.jwks_uri or state.discovered_uri or self._discover(settings)
        try:
            keys = parse_jwks(fetch_https(uri, ca=settings.ca), skipped=skipped)
        except JwksError as exc:
            state.discovered_uri = None  # discover again next time: the URI may have moved
            raise JwksError(f"{uri}: {exc}" if not str(exc).startswith(uri) else str(exc)) from None
        if settings.jwks_uri is None:
            state.discovered_uri = uri
        return keys, uri

    def _discover(self, settings: IssuerSettings) -> str:
        url = settings.issuer.rstrip("/") + DISCOVERY_PATH
        data = fetch_https(url, ca=settings.ca, limit=MAX_JWKS_BYTES)
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise JwksError(f"{url}: not JSON") from None
        if not isinstance(doc, dict):
            raise JwksError(f"{url}: not a JSON object")
        # OpenID Connect Discovery 1.0 §4.3: the document's issuer is the one asked for.
        if doc.get("issuer") != settings.issuer:
            raise JwksError(f"{url}: its issuer is not {settings.issuer!r}")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or urllib.parse.urlsplit(uri).scheme != "https":
            raise JwksError(f"{url}: jwks_uri is not an https:// URL")
        return uri

    def _decode(
        self, token: str, key: JwksKey, alg: str, settings: IssuerSettings
    ) -> dict[str, Any]:
        try:
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=list(settings.audiences),
                issuer=settings.issuer,
                options={
                    "require": REQUIRED_CLAIMS,
                    # Times are ours (module docstring); sub and jti types too, so that
                    # PyJWT 2.6 and newer versions accept the same tokens.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise IdentityError(
                "TOKEN_SIGNATURE", "the token's signature does not verify"
            ) from None
        except jwt.InvalidAudienceError:
            raise IdentityError(
                "TOKEN_AUDIENCE",
                f"the token is not for this broker (aud must include one of "
                f"{', '.join(settings.audiences)})",
            ) from None
        except jwt.InvalidIssuerError:
            raise IdentityError(
                "TOKEN_ISSUER", f"the token's iss is not {settings.issuer!r}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise IdentityError("TOKEN_CLAIMS", f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise IdentityError("TOKEN_ALGORITHM", f"alg {alg} is not allowed here") from None
        except jwt.ExpiredSignatureError:  # not raised with verify_exp off; mapped anyway
            raise IdentityError("TOKEN_EXPIRED", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise IdentityError("TOKEN_NOT_YET_VALID", "the token is not valid yet") from None
        except jwt.DecodeError:
            raise IdentityError("TOKEN_MALFORMED", "the token cannot be decoded") from None
        except jwt.InvalidTokenError as exc:
            raise IdentityError(
                "TOKEN_CLAIMS", f"the token's claims are not valid ({type(exc).__name__})"
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:
            raise IdentityError(
                "TOKEN_MALFORMED", f"the token cannot be decoded ({type(exc).__name__})"
            ) from None
        if not isinstance(payload, dict):
            raise IdentityError("TOKEN_MALFORMED", "the token's payload is not a JSON object")
        return payload

    def _check_times(self, payload: Mapping[str, Any], settings: IssuerSettings) -> None:
        now = self._clock()
        leeway = settings.leeway
        exp = _time(payload, "exp")
        iat = _time(payload, "iat")
        nbf = _time(payload, "nbf")
        assert exp is not None and iat is not None  # required by jwt.decode
        if now > exp + leeway:
            raise IdentityError("TOKEN_EXPIRED", f"the token expired {now - exp:.0f}s ago")
        if nbf is not None and nbf > now + leeway:
            raise IdentityError(
                "TOKEN_NOT_YET_VALID", f"the token is valid only in {nbf - now:.0f}s (nbf)"
            )
        if iat > now + leeway:
            raise IdentityError(
                "TOKEN_NOT_YET_VALID", f"the token is issued {iat - now:.0f}s in the future (iat)"
            )
        if exp - iat > settings.max_lifetime:
            raise IdentityError(
                "TOKEN_CLAIMS",
                f"the token lives {exp - iat:.0f}s (exp - iat), longer than issuer "
                f"{settings.name!r} allows ({settings.max_lifetime:.0f}s)",
            )


def _fresh(since: float | None, now: float, seconds: float) -> bool:
    # A clock that stepped back makes the entry stale rather than fresh for ever.
    return since is not None and 0 <= now - since < seconds


def _find(keys: Sequence[JwksKey], kid: str | None, alg: str) -> JwksKey | None:
    if kid is not None:
        return next((k for k in keys if k.kid == kid), None)
    fitting = [k for k in keys if k.fits(alg) is None]
    return fitting[0] if len(fitting) == 1 else None


def _time(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IdentityError("TOKEN_CLAIMS", f"the token's {name} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise IdentityError("TOKEN_CLAIMS", f"the token's {name} is not a finite number")
    if isinstance(value, int) and not -(2**53) <= value <= 2**53:
        raise IdentityError("TOKEN_CLAIMS", f"the token's {name} is out of range")
    return float(value)


def _text(name: str, value: object, *, required: bool = False) -> str:
    if not isinstance(value, str):
        raise IdentityError("TOKEN_CLAIMS", f"the token's {name} claim is not a string")
    if len(value) > MAX_CLAIM_TEXT or not value.isprintable() or (required and not value):
        need = "non-empty, printable" if required else "printable"
        raise IdentityError(
            "TOKEN_CLAIMS",
            f"the token's {name} claim must be {need}, at most {MAX_CLAIM_TEXT} characters",
        )
    return value


def _identity(settings: IssuerSettings, payload: Mapping[str, Any]) -> Identity:
    """The first-class claims of the issuer's kind, type-checked; everything else is
    dropped. A missing first-class claim stays absent; a wrong type refuses the token."""
    kind = settings.kind
    subject = _text("sub", payload["sub"], required=True)
    claims: dict[str, ClaimValue] = {}
    groups: tuple[str, ...] = ()
    email = ""
    for name in FIRST_CLASS_CLAIMS[kind]:
        source = settings.groups_claim if name == "groups" else name
        if source not in payload or payload[source] is None:
            continue
        value = payload[source]
        if name == "groups":
            groups = _groups(source, value)
            claims["groups"] = groups
        elif name in _INTS_ONLY:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise IdentityError(
                    "TOKEN_CLAIMS", f"the token's {name} claim is not a non-negative integer"
                )
            claims[name] = value
        else:
            claims[name] = _text(name, value)
    if kind is IdentityKind.PERSON and "email" in claims:
        # An address the provider says it has not verified could be anyone's.
        if payload.get("email_verified") is False:
            del claims["email"]
        else:
            email = str(claims["email"])
    return Identity(
        kind=kind,
        issuer=settings.issuer,
        issuer_name=settings.name,
        subject=subject,
        claims=claims,
        groups=groups,
        email=email,
    )


def _groups(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise IdentityError("TOKEN_CLAIMS", f"the token's {name} claim is not a list of strings")
    if len(value) > MAX_GROUPS:
        # Refused, not cut: a dropped group could be the one a forbid rule names.
        raise IdentityError(
            "TOKEN_CLAIMS", f"the token's {name} claim has more than {MAX_GROUPS} groups"
        )
    return tuple(dict.fromkeys(_text(f"{name}[]", g, required=True) for g in value))
