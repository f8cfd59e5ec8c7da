"""Who is calling, and may they: roles, API keys or JWTs, and the checks on each.

Credentials arrive as ``Authorization: Bearer <credential>`` or ``X-API-Key: <key>``. An API key
starts with ``llmo_`` (see ``api_keys``); anything else presented as a bearer credential is taken
for a JWT. JWTs are checked against ``[rest_api.jwt]``: only the configured algorithms, each with
its own key, so that an RS256 public key can never be used as an HS256 secret (key confusion)
and ``alg: none`` is never accepted.
"""
from __future__ import annotations

import enum
import functools
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ipc.config import JwtSection
from workers.rest_api.problems import Problem

if TYPE_CHECKING:
    from workers.rest_api.api_keys import ApiKeyStore

API_KEY_PREFIX = "llmo_"
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash


class Role(enum.Enum):
    """Ordered: each role may do everything the ones below it may."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def __ge__(self, other: Role) -> bool:
        return self.rank >= other.rank

    def __gt__(self, other: Role) -> bool:
        return self.rank > other.rank

    def __le__(self, other: Role) -> bool:
        return self.rank <= other.rank

    def __lt__(self, other: Role) -> bool:
        return self.rank < other.rank


_RANKS = {role: rank for rank, role in enumerate(Role)}
_ROLE_NAMES = frozenset(role.value for role in Role)


class AuthFailure(enum.StrEnum):
    """Why a credential was refused; also the problem type's suffix."""

    MISSING = "credentials-missing"
    MALFORMED = "credentials-malformed"
    INVALID_API_KEY = "api-key-invalid"
    JWT_DISABLED = "jwt-disabled"
    ALGORITHM = "token-algorithm-refused"
    BAD_SIGNATURE = "token-bad-signature"
    EXPIRED = "token-expired"
    NOT_YET_VALID = "token-not-yet-valid"
    WRONG_AUDIENCE = "token-wrong-audience"
    WRONG_ISSUER = "token-wrong-issuer"
    MISSING_CLAIM = "token-missing-claim"
    TTL_TOO_LONG = "token-lifetime-too-long"
    INVALID_TOKEN = "token-invalid"
    UNKNOWN_ROLE = "role-unknown"
    FORBIDDEN = "role-insufficient"


class AuthError(Problem):
    """A refused credential (401, with ``WWW-Authenticate``) or role (403)."""

    def __init__(self, status: Literal[401, 403], reason: AuthFailure, detail: str) -> None:
        if status == 401:
            error = "invalid_request" if reason is AuthFailure.MISSING else "invalid_token"
            challenge = 'Bearer realm="llm-optimizer"'
            if reason is not AuthFailure.MISSING:  # RFC 6750 3: no error code without a token
                challenge += f', error="{error}"'
            super().__init__(401, "Unauthorized", detail, type_suffix=reason.value,
                             headers={"WWW-Authenticate": challenge})
        else:
            super().__init__(403, "Forbidden", detail, type_suffix=reason.value)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: Role
    via: Literal["api_key", "jwt", "mtls"]  # mtls: a gRPC client certificate
    key_id: str | None = None

    @property
    def rate_key(self) -> str:
        """Whose budget a request spends: one per API key, one per token subject."""
        return f"key:{self.key_id}" if self.via == "api_key" else f"sub:{self.subject}"


def authorize(principal: Principal, needed: Role) -> None:
    if not principal.role >= needed:
        raise AuthError(403, AuthFailure.FORBIDDEN,
                        f"this operation requires the {needed.value} role; "
                        f"{principal.subject} has {principal.role.value}")


def role_from_claims(claims: Mapping[str, Any]) -> Role:
    """``role`` (one name) or ``roles`` (a list: the highest known one counts)."""
    names: list[Any] = []
    if "role" in claims:
        names = [claims["role"]]
    elif isinstance(claims.get("roles"), list):
        names = claims["roles"]
    known = [Role(n) for n in names if isinstance(n, str) and n in _ROLE_NAMES]
    if not known:
        raise AuthError(403, AuthFailure.UNKNOWN_ROLE,
                        f"the token names no known role (one of "
                        f"{', '.join(r.value for r in Role)})")
    return max(known, key=lambda r: r.rank)


# --- keys --------------------------------------------------------------------------------------

def _read(path: str, what: str) -> bytes:
    if not path:
        raise ValueError(f"[rest_api.jwt] {what} is required by the configured algorithms")
    return Path(path).read_bytes()


def _load_secret(section: JwtSection) -> bytes:
    secret = _read(section.secret_file, "secret_file").strip()
    if len(secret) < MIN_HS256_SECRET_BYTES:
        raise ValueError(f"the HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes")
    if secret.startswith(b"-----BEGIN"):  # a PEM key used as a shared secret: key confusion
        raise ValueError("the HS256 secret_file holds a PEM key, not a shared secret")
    return secret


def _check_key_type(key: Any, algorithm: str) -> None:
    wanted = rsa.RSAPublicKey if algorithm == "RS256" else ec.EllipticCurvePublicKey
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key, wanted):
        raise ValueError(f"the key file does not hold a {algorithm} key")
    if algorithm == "ES256" and not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("ES256 needs a P-256 key")


def _verification_keys(section: JwtSection) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for algorithm in dict.fromkeys(section.algorithms):
        if algorithm == "HS256":
            keys[algorithm] = _load_secret(section)
        else:
            key = serialization.load_pem_public_key(_read(section.public_key_file,
                                                          "public_key_file"))
            _check_key_type(key, algorithm)
            keys[algorithm] = key
    return keys


# --- JWT ---------------------------------------------------------------------------------------

_JWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], AuthFailure], ...] = (
    (jwt.ExpiredSignatureError, AuthFailure.EXPIRED),
    (jwt.ImmatureSignatureError, AuthFailure.NOT_YET_VALID),
    (jwt.InvalidAudienceError, AuthFailure.WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, AuthFailure.WRONG_ISSUER),
    (jwt.InvalidSignatureError, AuthFailure.BAD_SIGNATURE),
    (jwt.MissingRequiredClaimError, AuthFailure.MISSING_CLAIM),
    (jwt.InvalidAlgorithmError, AuthFailure.ALGORITHM),
)


class JwtVerifier:
    """Checks bearer tokens against ``[rest_api.jwt]``; keys are read once, at construction."""

    def __init__(self, section: JwtSection) -> None:
        if not section.issuer:
            raise ValueError("[rest_api.jwt] issuer is empty: JWTs are disabled")
        self.section = section
        self.keys = _verification_keys(section)

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(401, AuthFailure.MALFORMED, f"not a JWT: {exc}") from None
        algorithm = header.get("alg")
        key = self.keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None:
            raise AuthError(401, AuthFailure.ALGORITHM,
                            f"token algorithm {algorithm!r} is not accepted "
                            f"(accepted: {', '.join(self.keys)})")
        s = self.section
        try:
            # Only this one algorithm, with its own key: pyjwt never picks a key by header.
            claims = jwt.decode(token, key, algorithms=[algorithm], audience=s.audience,
                                issuer=s.issuer, leeway=s.leeway_s,
                                options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            reason = next((r for kind, r in _JWT_ERRORS if isinstance(exc, kind)),
                          AuthFailure.INVALID_TOKEN)
            raise AuthError(401, reason, f"token refused: {exc}") from None
        lifetime = claims["exp"] - claims["iat"]
        if lifetime > s.max_ttl_s:
            raise AuthError(401, AuthFailure.TTL_TOO_LONG,
                            f"token lifetime {lifetime:g} s exceeds the {s.max_ttl_s} s allowed")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise AuthError(401, AuthFailure.MISSING_CLAIM, "the sub claim must be a string")
        return Principal(subject=subject, role=role_from_claims(claims), via="jwt")


class JwtIssuer:
    """Signs tokens for ``optimizerctl token create``; the first configured algorithm whose
    signing key is configured is used unless one is named."""

    def __init__(self, section: JwtSection, algorithm: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not section.issuer:
            raise ValueError("[rest_api.jwt] issuer is empty: JWTs are disabled")
        usable = [a for a in section.algorithms
                  if (section.secret_file if a == "HS256" else section.private_key_file)]
        chosen = algorithm or (usable[0] if usable else None)
        if chosen is None or chosen not in section.algorithms:
            raise ValueError(f"no signing key for {algorithm or 'the configured algorithms'}")
        self.section, self.algorithm, self.clock = section, chosen, clock
        if chosen == "HS256":
            self.key: Any = _load_secret(section)
        else:
            self.key = serialization.load_pem_private_key(
                _read(section.private_key_file, "private_key_file"), password=None)
            _check_key_type(self.key, chosen)

    def issue(self, subject: str, role: Role, ttl_s: int) -> str:
        if not 0 < ttl_s <= self.section.max_ttl_s:
            raise ValueError(f"ttl must be in 1..{self.section.max_ttl_s} s")
        now = int(self.clock())
        claims = {"iss": self.section.issuer, "aud": self.section.audience, "sub": subject,
                  "role": role.value, "iat": now, "nbf": now, "exp": now + ttl_s,
                  "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self.key, algorithm=self.algorithm)


# --- requests ----------------------------------------------------------------------------------

def credential_of(headers: Mapping[str, str]) -> str:
    """The one credential a request's headers (or gRPC metadata) carry; two different ones are
    refused. ``headers`` must find lower-case names whatever the sent case, as aiohttp's
    headers do (gRPC metadata names are lower case on the wire)."""
    found = []
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError(401, AuthFailure.MALFORMED,
                            "the Authorization header must be 'Bearer <API key or token>'")
        found.append(value.strip())
    api_key = headers.get("x-api-key")
    if api_key is not None:
        if not api_key.startswith(API_KEY_PREFIX):
            raise AuthError(401, AuthFailure.MALFORMED, "X-API-Key carries API keys only")
        found.append(api_key.strip())
    if not found:
        raise AuthError(401, AuthFailure.MISSING,
                        "send 'Authorization: Bearer <API key or token>' or 'X-API-Key'")
    if len(found) == 2 and not hmac.compare_digest(found[0].encode(), found[1].encode()):
        raise AuthError(401, AuthFailure.MALFORMED, "two different credentials sent")
    return found[0]


class Authenticator:
    """Turns a request's credential into a Principal, or raises AuthError 401."""

    def __init__(self, api_keys: ApiKeyStore, jwt_verifier: JwtVerifier | None) -> None:
        self.api_keys = api_keys
        self.jwt = jwt_verifier

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        credential = credential_of(headers)
        if credential.startswith(API_KEY_PREFIX):
            record = await self.api_keys.verify(credential)
            if record is None:
                raise AuthError(401, AuthFailure.INVALID_API_KEY,
                                "the API key is unknown or revoked")
            return Principal(subject=record.name, role=record.role, via="api_key",
                             key_id=record.id)
        if self.jwt is None:
            raise AuthError(401, AuthFailure.JWT_DISABLED,
                            "bearer tokens are not accepted here; use an API key")
        return self.jwt.verify(credential)


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
PRINCIPAL_KEY = web.RequestKey("principal", Principal)

PlainHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requires(role: Role) -> Callable[[PlainHandler], PlainHandler]:
    """For plain aiohttp handlers outside a RouteTable: authenticate with the app's
    ``AUTHENTICATOR``, check the role, and leave the Principal in ``request["principal"]``."""
    def decorate(handler: PlainHandler) -> PlainHandler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            principal = await request.app[AUTHENTICATOR].authenticate(request.headers)
            authorize(principal, role)
            request[PRINCIPAL_KEY] = principal
            return await handler(request)
        return guarded
    return decorate
