"""A local OIDC issuer for tests: keys generated here, discovery and JWKS served over
real HTTPS on loopback (or a given address), tokens with the claims GitHub Actions,
Buildkite and a person's identity provider put in theirs.

    with TestIssuer(tmp / "issuer") as issuer:           # serves in a thread
        token = issuer.github(environment="prod")        # RS256, kid = issuer.kid
        issuer.url, issuer.ca_path, issuer.jwks_path      # for [[service.issuers]]
        issuer.rotate()                                   # new key; the old one leaves the JWKS
        issuer.available = False                          # discovery/JWKS answer 503
        issuer.jwks_fetches                               # how often the JWKS was fetched

Hostile tokens for the verifier's tests: `unsigned()` (alg none),
`hs256_with_public_key()` (HMAC keyed with the issuer's public key PEM, the classic
key-confusion attack), `add_oct_key()` (a symmetric key served in the JWKS).

The CI token endpoints the requester's client uses are served too:
GitHub's `ACTIONS_ID_TOKEN_REQUEST_URL` (`github_request_url`, bearer
`github_request_token`, `&audience=X` → `{"value": token}`) and a fake
`buildkite-agent oidc request-token --audience X` (`write_fake_buildkite_agent`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from jwt.algorithms import get_default_algorithms

from portagent.broker import pki as pkilib

SERVE_TIMEOUT = 5.0  # per connection: a stuck client never holds a handler thread long
STOP_TIMEOUT = 10.0
JWKS_PATH = "/.well-known/jwks"
DISCOVERY_PATH = "/.well-known/openid-configuration"
GITHUB_TOKEN_PATH = "/_github/token"  # noqa: S105 (a URL path)
BUILDKITE_TOKEN_PATH = "/_buildkite/token"  # noqa: S105 (a URL path)
DEFAULT_AUDIENCE = "portagent"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class _Key:
    kid: str
    alg: str
    private: PrivateKey | None  # None for a symmetric ("oct") key
    jwk: dict[str, Any]  # the public JWK as served
    published: bool = True


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64_uint(value: int) -> str:
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _new_key(alg: str) -> PrivateKey:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"the test issuer cannot make a key for {alg!r}")


def public_jwk(private: PrivateKey) -> dict[str, Any]:
    """The public JWK of a key (written here, so the test issuer does not depend on
    which PyJWT version can export which key type)."""
    if isinstance(private, rsa.RSAPrivateKey):
        numbers = private.public_key().public_numbers()
        return {"kty": "RSA", "n": _b64_uint(numbers.n), "e": _b64_uint(numbers.e)}
    if isinstance(private, ec.EllipticCurvePrivateKey):
        pub = private.public_key().public_numbers()
        size = (private.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[private.curve.name]
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url(pub.x.to_bytes(size, "big")),
            "y": b64url(pub.y.to_bytes(size, "big")),
        }
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def public_pem(private: PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    issuer: TestIssuer
    tls: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the connection's own thread, so a client
        # that never finishes it cannot stall the accept loop.
        request.settimeout(SERVE_TIMEOUT)
        try:
            tls = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ValueError):
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            tls.close()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    timeout = SERVE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        return None  # quiet: tests read the counters, not stderr

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        issuer = self.server.issuer
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        audience = query.get("audience", [None])[0]
        auth = self.headers.get("Authorization", "")
        if parts.path in (DISCOVERY_PATH, JWKS_PATH):
            with issuer._lock:
                if parts.path == JWKS_PATH:
                    issuer.jwks_fetches += 1
                else:
                    issuer.discovery_fetches += 1
                available = issuer.available
                body = issuer._discovery() if parts.path == DISCOVERY_PATH else issuer.jwks()
            if not available:
                self._send(503, {"error": "the test issuer is unavailable"})
            else:
                self._send(200, body)
        elif parts.path == GITHUB_TOKEN_PATH:
            scheme, _, secret = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                secret.strip(), issuer.github_request_token
            ):
                self._send(401, {"message": "bad ACTIONS_ID_TOKEN_REQUEST_TOKEN"})
                return
            issuer._note_request("github", audience)
            self._send(200, {"value": issuer._ci_github(audience)})
        elif parts.path == BUILDKITE_TOKEN_PATH:
            scheme, _, secret = auth.partition(" ")
            if scheme != "Token" or not hmac.compare_digest(secret, issuer._buildkite_secret):
                self._send(401, {"message": "bad agent token"})
                return
            lifetime = query.get("lifetime", [None])[0]
            issuer._note_request("buildkite", audience)
            token = issuer._ci_buildkite(audience, float(lifetime) if lifetime else None)
            self._send(200, {"token": token})
        else:
            self._send(404, {"error": "not found"})


class TestIssuer:
    """An OIDC issuer over HTTPS in a thread (context manager; see the module doc)."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", alg: str = "RS256") -> None:
        self.workdir = workdir
        self.host = host
        self.alg = alg
        self.available = True
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.token_requests: list[tuple[str, str | None]] = []  # (github|buildkite, audience)
        # Claims merged into the tokens the CI endpoints hand out (client tests set them).
        self.github_claims: dict[str, Any] = {}
        self.buildkite_claims: dict[str, Any] = {}
        self.github_request_token = secrets.token_hex(16)
        self._buildkite_secret = secrets.token_hex(16)
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._server: _Server | None = None
        self._port = 0  # after a close(), start() serves on the same port again
        self._thread: threading.Thread | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.jwks_path = workdir / "jwks.json"
        self.ca_path = workdir / "issuer-ca.pem"
        self.kid = self._make_key(alg)
        self._write_tls()
        self._bind()
        self._write_jwks()

    # --- life cycle ------------------------------------------------------------------------

    def _write_tls(self) -> None:
        now = dt.datetime.now(dt.UTC)
        ca_key = pkilib.new_tls_key()
        ca = pkilib.make_ca(ca_key, now, "portagent test OIDC issuer CA")
        pkilib.write_atomic(self.ca_path, pkilib.cert_pem(ca), 0o644)
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        try:
            own = ipaddress.ip_address(self.host)
            if own not in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
                sans.append(x509.IPAddress(own))
        except ValueError:
            sans.append(x509.DNSName(self.host))
        key = pkilib.new_tls_key()
        cert = pkilib.issue_leaf(
            ca_key,
            ca,
            key.public_key(),
            common_name="portagent test OIDC issuer",
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=sans,
            now=now,
        )
        self._cert_path = self.workdir / "issuer-server.pem"
        self._key_path = self.workdir / "issuer-server.key"
        pkilib.write_atomic(self._cert_path, pkilib.cert_pem(cert), 0o644)
        pkilib.write_atomic(self._key_path, pkilib.private_key_pem(key), 0o600)

    def _bind(self) -> None:
        v6 = ":" in self.host
        server_class = _Server6 if v6 else _Server
        server = server_class((self.host, self._port), _Handler, bind_and_activate=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._cert_path, self._key_path)
        server.tls = context
        server.issuer = self
        self._server = server
        port = self._port = server.server_address[1]
        netloc = f"[{self.host}]:{port}" if v6 else f"{self.host}:{port}"
        self.url = f"https://{netloc}"
        self.jwks_uri = self.url + JWKS_PATH
        self.github_request_url = f"{self.url}{GITHUB_TOKEN_PATH}?api-version=2.0"

    def start(self) -> TestIssuer:
        if self._server is None:
            self._bind()
        if self._thread is None:
            assert self._server is not None
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="test-oidc-issuer",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the socket (a stopped issuer refuses connections)."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            if thread is not None:
                server.shutdown()
                thread.join(STOP_TIMEOUT)
            server.server_close()

    def __enter__(self) -> TestIssuer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- keys ------------------------------------------------------------------------------

    def _make_key(self, alg: str, *, publish_alg: bool = True) -> str:
        private = _new_key(alg)
        kid = secrets.token_hex(8)
        jwk = {**public_jwk(private), "kid": kid, "use": "sig"}
        if publish_alg:
            jwk["alg"] = alg
        with self._lock:
            self._keys[kid] = _Key(kid=kid, alg=alg, private=private, jwk=jwk)
        return kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(k.jwk) for k in self._keys.values() if k.published]}

    def _discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self._keys.values()}),
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "nbf"],
        }

    def _write_jwks(self) -> None:
        with self._lock:
            data = json.dumps(self.jwks(), indent=1).encode()
        pkilib.write_atomic(self.jwks_path, data, 0o644)

    def add_key(self, alg: str | None = None, *, publish_alg: bool = True) -> str:
        """One more key served alongside the current one (not used unless a token names
        it); returns its kid."""
        kid = self._make_key(alg or self.alg, publish_alg=publish_alg)
        self._write_jwks()
        return kid

    def rotate(self) -> str:
        """A new current key; the old one is dropped from the JWKS (its private half is
        kept, so tests can still sign with `mint(kid=old)`). Returns the new kid."""
        old = self.kid
        self.kid = self._make_key(self.alg)
        with self._lock:
            self._keys[old].published = False
        self._write_jwks()
        return self.kid

    def add_oct_key(self, secret: bytes) -> str:
        """Serve a symmetric JWK (kty "oct") — something a verifier must never use."""
        kid = secrets.token_hex(8)
        jwk = {"kty": "oct", "k": b64url(secret), "kid": kid, "alg": "HS256", "use": "sig"}
        with self._lock:
            self._keys[kid] = _Key(kid=kid, alg="HS256", private=None, jwk=jwk)
        self._write_jwks()
        return kid

    def public_pem(self, kid: str | None = None) -> bytes:
        private = self._keys[kid or self.kid].private
        assert private is not None
        return public_pem(private)

    # --- tokens ----------------------------------------------------------------------------

    def claims(
        self,
        claims: dict[str, Any],
        *,
        lifetime: float = 300,
        audience: str | list[str] = DEFAULT_AUDIENCE,
        iat: float | None = None,
        omit: Sequence[str] = (),
    ) -> dict[str, Any]:
        """`claims` with iss/aud/iat/nbf/exp added unless given; `omit` drops names."""
        issued = int(time.time() if iat is None else iat)
        payload: dict[str, Any] = {
            "iss": self.url,
            "aud": audience,
            "iat": issued,
            "nbf": issued,
            "exp": int(issued + lifetime),
        }
        payload.update(claims)
        for name in omit:
            payload.pop(name, None)
        return payload

    def mint(
        self,
        claims: dict[str, Any],
        *,
        kid: str | None = None,
        alg: str | None = None,
        lifetime: float = 300,
        audience: str | list[str] = DEFAULT_AUDIENCE,
        iat: float | None = None,
        headers: dict[str, Any] | None = None,
        omit: Sequence[str] = (),
    ) -> str:
        """A token signed with key `kid` (default: the current key) using `alg`
        (default: the key's). `headers` are written as given, even when they lie (an
        "alg" other than the one signed with, a "kid" of another key); a header value of
        None removes that header. Signed here rather than by jwt.encode, which refuses
        the hostile headers and claims tests need."""
        key = self._keys[kid or self.kid]
        assert key.private is not None, "an oct key signs with hs256_with_public_key"
        signing_alg = alg or key.alg
        payload = self.claims(claims, lifetime=lifetime, audience=audience, iat=iat, omit=omit)
        header: dict[str, Any] = {"alg": signing_alg, "typ": "JWT", "kid": key.kid}
        header.update(headers or {})
        header = {k: v for k, v in header.items() if v is not None}
        signing_input = self._assemble(header, payload)
        algorithm = get_default_algorithms()[signing_alg]
        signature = algorithm.sign(
            signing_input.encode("ascii"), algorithm.prepare_key(key.private)
        )
        return f"{signing_input}.{b64url(signature)}"

    def _assemble(self, header: dict[str, Any], payload: dict[str, Any]) -> str:
        return ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode("utf-8", "surrogatepass"))
            for part in (header, payload)
        )

    def unsigned(self, claims: dict[str, Any], **kwargs: Any) -> str:
        """alg "none": no signature at all (an empty third part)."""
        header = {"alg": "none", "typ": "JWT", "kid": self.kid}
        return self._assemble(header, self.claims(claims, **kwargs)) + "."

    def hs256_with_public_key(
        self,
        claims: dict[str, Any],
        *,
        kid: str | None = None,
        secret: bytes | None = None,
        **kwargs: Any,
    ) -> str:
        """HS256 keyed with the issuer's public key PEM (or `secret`), naming key `kid`:
        what a verifier that lets the token pick the algorithm would accept."""
        key = secret if secret is not None else self.public_pem()
        header = {"alg": "HS256", "typ": "JWT", "kid": kid or self.kid}
        signing_input = self._assemble(header, self.claims(claims, **kwargs))
        mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"

    def github_claims_for(
        self,
        *,
        repository: str = "octo-org/app",
        ref: str = "refs/heads/main",
        environment: str = "prod",
        actor: str = "octocat",
        run_id: str = "4242",
        **overrides: Any,
    ) -> dict[str, Any]:
        """The claims of a GitHub Actions ID token (docs.github.com, "About security
        hardening with OpenID Connect"), strings throughout as GitHub sends them."""
        # Hostile tests pass non-strings: derive what can be derived, never fail here.
        owner = repository.split("/")[0] if isinstance(repository, str) else "octo-org"
        workflow_ref = f"{repository}/.github/workflows/deploy.yml@{ref}"
        sub = (
            f"repo:{repository}:environment:{environment}"
            if environment
            else f"repo:{repository}:ref:{ref}"
        )
        claims: dict[str, Any] = {
            "jti": secrets.token_hex(16),
            "sub": sub,
            "ref": ref,
            "sha": "d6e8a1b2c3f4e5d6a7b8c9d0e1f2a3b4c5d6e7f8",
            "repository": repository,
            "repository_owner": owner,
            "repository_owner_id": "65432",
            "repository_id": "123456",
            "repository_visibility": "private",
            "run_id": run_id,
            "run_number": "7",
            "run_attempt": "1",
            "actor": actor,
            "actor_id": "583231",
            "workflow": "deploy",
            "workflow_ref": workflow_ref,
            "workflow_sha": "d6e8a1b2c3f4e5d6a7b8c9d0e1f2a3b4c5d6e7f8",
            "job_workflow_ref": workflow_ref,
            "job_workflow_sha": "d6e8a1b2c3f4e5d6a7b8c9d0e1f2a3b4c5d6e7f8",
            "head_ref": "",
            "base_ref": "",
            "event_name": "push",
            "ref_type": "branch",
            "ref_protected": "true",
            "runner_environment": "github-hosted",
        }
        if environment:
            claims["environment"] = environment
        claims.update(overrides)
        return claims

    def github(
        self,
        *,
        audience: str | list[str] = DEFAULT_AUDIENCE,
        lifetime: float = 300,
        kid: str | None = None,
        iat: float | None = None,
        **claims: Any,
    ) -> str:
        """A GitHub Actions token: `claims` as github_claims_for takes them."""
        return self.mint(
            self.github_claims_for(**claims), kid=kid, lifetime=lifetime, audience=audience, iat=iat
        )

    def buildkite_claims_for(
        self,
        *,
        organization_slug: str = "acme",
        pipeline_slug: str = "deploy",
        build_branch: str = "main",
        build_number: int = 17,
        job_id: str = "0190a3b6-5a8e-4c3e-9d2f-1b7c6e5d4a3f",
        **overrides: Any,
    ) -> dict[str, Any]:
        """The claims of `buildkite-agent oidc request-token` (buildkite.com docs,
        "OIDC with Buildkite"): build_number is a JSON number."""
        commit = "9f3182061f1e2cca4702c368cbc039b7dc9d4485"
        claims: dict[str, Any] = {
            "sub": (
                f"organization:{organization_slug}:pipeline:{pipeline_slug}"
                f":ref:refs/heads/{build_branch}:commit:{commit}:step:"
            ),
            "organization_slug": organization_slug,
            "pipeline_slug": pipeline_slug,
            "build_number": build_number,
            "build_branch": build_branch,
            "build_tag": None,
            "build_commit": commit,
            "build_source": "ui",
            "step_key": None,
            "job_id": job_id,
            "agent_id": "0190a3b6-6b9f-4d4f-8e3a-2c8d7f6e5b4a",
            "runner_environment": "self-hosted",
        }
        claims.update(overrides)
        return claims

    def buildkite(
        self,
        *,
        audience: str | list[str] = DEFAULT_AUDIENCE,
        lifetime: float = 300,
        kid: str | None = None,
        iat: float | None = None,
        **claims: Any,
    ) -> str:
        """A Buildkite token: `claims` as buildkite_claims_for takes them."""
        return self.mint(
            self.buildkite_claims_for(**claims),
            kid=kid,
            lifetime=lifetime,
            audience=audience,
            iat=iat,
        )

    def person(
        self,
        sub: str,
        *,
        email: str = "",
        groups: Sequence[str] = (),
        audience: str | list[str] = DEFAULT_AUDIENCE,
        lifetime: float = 300,
        kid: str | None = None,
        iat: float | None = None,
        **overrides: Any,
    ) -> str:
        """A person's ID token from a generic identity provider."""
        claims: dict[str, Any] = {"sub": sub, "groups": list(groups), "name": sub.title()}
        if email:
            claims["email"] = email
            claims["email_verified"] = True
            claims["preferred_username"] = email.split("@")[0]
        claims.update(overrides)
        return self.mint(claims, kid=kid, lifetime=lifetime, audience=audience, iat=iat)

    # --- the CI token endpoints ------------------------------------------------------------

    def _note_request(self, kind: str, audience: str | None) -> None:
        with self._lock:
            self.token_requests.append((kind, audience))

    def _ci_github(self, audience: str | None) -> str:
        claims = self.github_claims_for(**self.github_claims)
        default = f"https://github.com/{claims['repository_owner']}"
        return self.mint(claims, audience=audience or default)

    def _ci_buildkite(self, audience: str | None, lifetime: float | None) -> str:
        claims = self.buildkite_claims_for(**self.buildkite_claims)
        default = f"https://buildkite.com/{claims['organization_slug']}"
        return self.mint(claims, audience=audience or default, lifetime=lifetime or 300)

    def write_fake_buildkite_agent(self, bin_dir: Path) -> Path:
        """An executable `buildkite-agent` (system python3, standard library only):
        `buildkite-agent oidc request-token [--audience X] [--lifetime N]` prints a
        Buildkite token from this issuer; any other command exits 1."""
        bin_dir.mkdir(parents=True, exist_ok=True)
        path = bin_dir / "buildkite-agent"
        script = _FAKE_BUILDKITE_AGENT.format(
            url=json.dumps(self.url + BUILDKITE_TOKEN_PATH),
            ca=json.dumps(str(self.ca_path)),
            secret=json.dumps(self._buildkite_secret),
        )
        pkilib.write_atomic(path, script.encode(), 0o755)
        return path


_FAKE_BUILDKITE_AGENT = '''#!/usr/bin/env python3
"""A stand-in for `buildkite-agent oidc request-token` written by portagent's tests:
fetches a Buildkite-like ID token from the local test issuer."""
import json
import ssl
import sys
import urllib.parse
import urllib.request

URL = {url}
CA = {ca}
SECRET = {secret}
USAGE = "usage: buildkite-agent oidc request-token [--audience AUD] [--lifetime SECONDS]"


def main(argv):
    if argv[:2] != ["oidc", "request-token"]:
        sys.stderr.write("fake buildkite-agent: only `oidc request-token` is supported\\n")
        sys.stderr.write(USAGE + "\\n")
        return 1
    query = {{}}
    rest = argv[2:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if "=" in arg and arg.startswith("--"):
            name, value = arg.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            name, value = arg, rest[i + 1]
            i += 2
        else:
            name, value = arg, None
            i += 1
        if name not in ("--audience", "--lifetime") or value is None:
            sys.stderr.write("fake buildkite-agent: bad argument " + repr(arg) + "\\n")
            sys.stderr.write(USAGE + "\\n")
            return 1
        query[name[2:]] = value
    request = urllib.request.Request(
        URL + "?" + urllib.parse.urlencode(query), headers={{"Authorization": "Token " + SECRET}}
    )
    try:
        context = ssl.create_default_context(cafile=CA)
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            body = json.loads(response.read(1 << 20))
        token = body["token"]
    except Exception as exc:
        sys.stderr.write("fake buildkite-agent: cannot get a token: " + str(exc) + "\\n")
        return 1
    sys.stdout.write(token + "\\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''
