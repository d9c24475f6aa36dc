"""The verified identity of a caller: plain values shared by the verifier, the policy,
the store and the API. No I/O here.

An Identity is built only by a verifier (an OIDC token whose signature, issuer,
audience and times checked out, or an admin token / client certificate); nothing a
caller writes as free text becomes one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Claim values policy sees: strings, integers (Buildkite's build_number) or a tuple
# of strings (groups).
ClaimValue = str | int | tuple[str, ...]

MAX_CLAIM_TEXT = 512
MAX_GROUPS = 64
MAX_LABEL = 256  # = the wire's MAX_SUBJECT_LENGTH: the label is the grant's subject


class IdentityKind(Enum):
    GITHUB = "github"  # a GitHub Actions job (token.actions.githubusercontent.com)
    BUILDKITE = "buildkite"  # a Buildkite job (agent.buildkite.com)
    PERSON = "person"  # a person, from any OIDC identity provider
    ADMIN = "admin"  # an admin token or admin client certificate (not OIDC)


# The first-class claims kept for each kind (and given to policy as attributes);
# every other claim of the token is dropped after verification.
FIRST_CLASS_CLAIMS: dict[IdentityKind, tuple[str, ...]] = {
    IdentityKind.GITHUB: (
        "sub",
        "repository",
        "repository_owner",
        "ref",
        "environment",
        "workflow",
        "job_workflow_ref",
        "actor",
        "run_id",
    ),
    IdentityKind.BUILDKITE: (
        "sub",
        "organization_slug",
        "pipeline_slug",
        "build_branch",
        "build_number",
        "job_id",
    ),
    IdentityKind.PERSON: ("sub", "email", "groups"),
    IdentityKind.ADMIN: (),
}

ADMIN_TOKEN_ISSUER = "portagent:admin-token"  # noqa: S105 (an issuer name, not a secret)
ADMIN_CERT_ISSUER = "portagent:admin-cert"


class IdentityError(Exception):
    """A credential that does not prove an identity. `reason` is the API's reason code
    (TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, TOKEN_AUDIENCE, TOKEN_ISSUER, TOKEN_SIGNATURE,
    TOKEN_ALGORITHM, TOKEN_KEY_UNKNOWN, TOKEN_MALFORMED, TOKEN_CLAIMS, JWKS_UNAVAILABLE);
    the message says what is wrong without echoing the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Identity:
    kind: IdentityKind
    issuer: str  # the token's `iss`, or ADMIN_TOKEN_ISSUER / ADMIN_CERT_ISSUER
    issuer_name: str  # the configured short name ("github", "corp-sso"; "admin")
    subject: str  # the token's `sub`, or the admin token's name / the certificate's CN
    claims: Mapping[str, ClaimValue] = field(default_factory=dict)  # first-class only
    groups: tuple[str, ...] = ()
    email: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What makes two identities the same one (self-approval, concurrency)."""
        return (self.issuer, self.subject)

    @property
    def label(self) -> str:
        """Short readable name, used as the grant's subject on the wire and in logs:
        `corp-sso:alice@example.com`, `github:repo:octo/app:ref:refs/heads/main`,
        `admin:ops`. Never more than MAX_LABEL characters."""
        who = self.email if self.kind is IdentityKind.PERSON and self.email else self.subject
        return f"{self.issuer_name}:{who}"[:MAX_LABEL]

    @property
    def actor(self) -> str:
        """The audit chain's actor text (the label: same for admins as before,
        `admin:NAME`)."""
        return self.label

    def to_json(self) -> dict[str, Any]:
        claims: dict[str, Any] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.claims.items()
        }
        return {
            "kind": self.kind.value,
            "issuer": self.issuer,
            "issuer_name": self.issuer_name,
            "subject": self.subject,
            "label": self.label,
            "email": self.email,
            "groups": list(self.groups),
            "claims": claims,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Identity:
        """Read back what to_json wrote (the store's own rows). ValueError on anything
        else: a damaged row is named by the caller."""
        try:
            kind = IdentityKind(obj["kind"])
            claims_in = obj.get("claims", {})
            if not isinstance(claims_in, dict):
                raise ValueError("claims is not an object")
            claims: dict[str, ClaimValue] = {}
            for k, v in claims_in.items():
                if isinstance(v, list) and all(isinstance(x, str) for x in v):
                    claims[str(k)] = tuple(v)
                elif isinstance(v, str | int) and not isinstance(v, bool):
                    claims[str(k)] = v
                else:
                    raise ValueError(f"claim {k!r} has an unexpected type")
            groups = obj.get("groups", [])
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                raise ValueError("groups is not a list of strings")
            for name in ("issuer", "issuer_name", "subject"):
                if not isinstance(obj.get(name), str) or not obj[name]:
                    raise ValueError(f"{name} is missing")
            email = obj.get("email", "")
            if not isinstance(email, str):
                raise ValueError("email is not a string")
            return cls(
                kind=kind,
                issuer=obj["issuer"],
                issuer_name=obj["issuer_name"],
                subject=obj["subject"],
                claims=claims,
                groups=tuple(groups),
                email=email,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an identity: {exc}") from None


def admin_identity(name: str, *, certificate: bool = False) -> Identity:
    """An admin authenticated by an API token (its name) or a client certificate (CN)."""
    return Identity(
        kind=IdentityKind.ADMIN,
        issuer=ADMIN_CERT_ISSUER if certificate else ADMIN_TOKEN_ISSUER,
        issuer_name="admin",
        subject=name,
    )
