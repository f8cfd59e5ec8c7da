"""JWT verification and issuing, roles, and request authentication (API keys and JWTs)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ipc.config import JwtSection
from workers.rest_api.api_keys import ApiKeyStore
from workers.rest_api.auth import (AUTHENTICATOR, PRINCIPAL_KEY, AuthError, AuthFailure,
                                   Authenticator, JwtIssuer, JwtVerifier, Principal, Role,
                                   requires)

from .test_api_keys import MemoryStorage

ISSUER, AUDIENCE = "https://issuer.example", "llm-optimizer"
SECRET = b"s" * 48


def pem_private(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def section(tmp_path: Path) -> Any:
    """A JwtSection for the given algorithms, with key files written under tmp_path."""
    def make(algorithms: list[str], private: Any = None, **extra: Any) -> JwtSection:
        secret_file = tmp_path / "secret"
        secret_file.write_bytes(SECRET + b"\n")
        files: dict[str, str] = {"secret_file": str(secret_file)}
        if private is not None:
            (tmp_path / "key.pem").write_bytes(pem_private(private))
            (tmp_path / "pub.pem").write_bytes(pem_public(private))
            files |= {"private_key_file": str(tmp_path / "key.pem"),
                      "public_key_file": str(tmp_path / "pub.pem")}
        return JwtSection(issuer=ISSUER, audience=AUDIENCE, algorithms=algorithms,
                          leeway_s=30.0, max_ttl_s=3600, **(files | extra))
    return make


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "role": "operator", "iat": now,
            "exp": now + 600}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def refused(verifier: JwtVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token)
    return caught.value


def test_roles_are_ordered() -> None:
    assert Role.VIEWER < Role.OPERATOR < Role.ADMIN
    assert Role.ADMIN >= Role.OPERATOR and not Role.VIEWER >= Role.OPERATOR
    assert max([Role.OPERATOR, Role.ADMIN, Role.VIEWER]) is Role.ADMIN


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256"])
def test_valid_tokens_of_each_algorithm(section: Any, rsa_key: Any, ec_key: Any,
                                        algorithm: str) -> None:
    private = {"HS256": None, "RS256": rsa_key, "ES256": ec_key}[algorithm]
    config = section([algorithm], private)
    token = JwtIssuer(config).issue("alice", Role.OPERATOR, 600)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    assert JwtVerifier(config).verify(token) == Principal("alice", Role.OPERATOR, "jwt", None)


def test_issuer_refuses_a_ttl_over_the_maximum(section: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        JwtIssuer(section(["HS256"])).issue("alice", Role.ADMIN, 3601)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 4000}, AuthFailure.EXPIRED),
    ({"nbf": int(time.time()) + 3600}, AuthFailure.NOT_YET_VALID),
    ({"aud": "someone-else"}, AuthFailure.WRONG_AUDIENCE),
    ({"iss": "https://evil.example"}, AuthFailure.WRONG_ISSUER),
    ({"exp": None}, AuthFailure.MISSING_CLAIM),
    ({"iat": None}, AuthFailure.MISSING_CLAIM),
    ({"exp": int(time.time()) + 3600 + 600}, AuthFailure.TTL_TOO_LONG),
])
def test_invalid_claims_are_refused_with_their_reason(section: Any, changes: dict[str, Any],
                                                      reason: AuthFailure) -> None:
    verifier = JwtVerifier(section(["HS256"]))
    error = refused(verifier, jwt.encode(claims(**changes), SECRET, algorithm="HS256"))
    assert (error.status, error.reason) == (401, reason)
    assert "WWW-Authenticate" in error.headers


def test_leeway_accepts_small_clock_skew(section: Any) -> None:
    now = int(time.time())
    token = jwt.encode(claims(exp=now - 5, iat=now - 600, nbf=now + 5), SECRET, algorithm="HS256")
    assert JwtVerifier(section(["HS256"])).verify(token).subject == "alice"


def test_forged_signatures_are_refused(section: Any, rsa_key: Any) -> None:
    hs = JwtVerifier(section(["HS256"]))
    assert refused(hs, jwt.encode(claims(), b"x" * 48, algorithm="HS256")).reason \
        is AuthFailure.BAD_SIGNATURE
    rs = JwtVerifier(section(["RS256"], rsa_key))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(rs, jwt.encode(claims(), other, algorithm="RS256")).reason \
        is AuthFailure.BAD_SIGNATURE
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    head, payload, _ = token.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["role"] = "admin"
    forged_payload = base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b"=").decode()
    assert refused(rs, f"{head}.{forged_payload}.{token.split('.')[2]}").reason \
        is AuthFailure.BAD_SIGNATURE


def test_alg_none_and_unconfigured_algorithms_are_refused(section: Any, ec_key: Any) -> None:
    verifier = JwtVerifier(section(["HS256"]))
    unsigned = jwt.encode(claims(role="admin"), None, algorithm="none")
    assert refused(verifier, unsigned).reason is AuthFailure.ALGORITHM
    es = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert refused(verifier, es).reason is AuthFailure.ALGORITHM
    assert refused(verifier, "not-a-jwt").reason is AuthFailure.MALFORMED


def _hs256_signed_with(key: bytes, payload: dict[str, Any]) -> str:
    """What an attacker builds: an HS256 token whose HMAC key is the server's public key."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + b64(json.dumps(payload).encode()))
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def test_hs_rs_key_confusion_is_refused(section: Any, rsa_key: Any) -> None:
    public_pem = pem_public(rsa_key)
    forged = _hs256_signed_with(public_pem, claims(role="admin"))
    # RS256 only: HS256 is not an accepted algorithm at all
    assert refused(JwtVerifier(section(["RS256"], rsa_key)), forged).reason \
        is AuthFailure.ALGORITHM
    # both accepted: HS256 is checked with the shared secret only, never the public key
    assert refused(JwtVerifier(section(["HS256", "RS256"], rsa_key)), forged).reason \
        is AuthFailure.BAD_SIGNATURE


def test_a_pem_key_is_not_taken_as_the_hs256_secret(section: Any, rsa_key: Any,
                                                    tmp_path: Path) -> None:
    config = section(["HS256"], rsa_key)
    Path(config.secret_file).write_bytes(pem_public(rsa_key))
    with pytest.raises(ValueError, match="PEM"):
        JwtVerifier(config)
    Path(config.secret_file).write_bytes(b"short")
    with pytest.raises(ValueError, match="at least"):
        JwtVerifier(config)


def test_a_key_of_the_wrong_type_is_refused(section: Any, ec_key: Any) -> None:
    with pytest.raises(ValueError, match="RS256"):
        JwtVerifier(section(["RS256"], ec_key))


def test_roles_from_claims(section: Any) -> None:
    verifier = JwtVerifier(section(["HS256"]))

    def verify(**changes: Any) -> Principal:
        return verifier.verify(jwt.encode(claims(**changes), SECRET, algorithm="HS256"))

    assert verify(role=None, roles=["viewer", "admin", "operator"]).role is Role.ADMIN
    assert verify(role=None, roles=["root", "viewer"]).role is Role.VIEWER
    for changes in ({"role": "root"}, {"role": None}, {"role": None, "roles": ["root"]},
                    {"role": 3}):
        error = refused(verifier, jwt.encode(claims(**changes), SECRET, algorithm="HS256"))
        assert (error.status, error.reason) == (403, AuthFailure.UNKNOWN_ROLE)


# --- requests ----------------------------------------------------------------------------------

def authenticate(authenticator: Authenticator, headers: dict[str, str]) -> Principal:
    """As HTTP headers, then as gRPC metadata (lower-case names): the same principal."""
    over_http = asyncio.run(authenticator.authenticate(
        make_mocked_request("GET", "/", headers=headers).headers))
    over_grpc = asyncio.run(authenticator.authenticate(
        {name.lower(): value for name, value in headers.items()}))
    assert over_http == over_grpc
    return over_http


def test_authenticator_tells_api_keys_from_jwts(section: Any) -> None:
    store = ApiKeyStore(MemoryStorage())
    record, key = asyncio.run(store.create("ci", Role.OPERATOR))
    config = section(["HS256"])
    authenticator = Authenticator(store, JwtVerifier(config))
    by_key = Principal("ci", Role.OPERATOR, "api_key", record.id)
    assert authenticate(authenticator, {"Authorization": f"Bearer {key}"}) == by_key
    assert authenticate(authenticator, {"X-API-Key": key}) == by_key
    assert authenticate(authenticator, {"X-API-Key": key,
                                        "Authorization": f"Bearer {key}"}) == by_key
    token = JwtIssuer(config).issue("bob", Role.VIEWER, 60)
    assert authenticate(authenticator, {"Authorization": f"bearer {token}"}) == \
        Principal("bob", Role.VIEWER, "jwt")


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, AuthFailure.MISSING),
    ({"Authorization": "Basic dXNlcjpwdw=="}, AuthFailure.MALFORMED),
    ({"Authorization": "Bearer "}, AuthFailure.MALFORMED),
    ({"X-API-Key": "eyJhbGciOi.x.y"}, AuthFailure.MALFORMED),
    ({"Authorization": "Bearer llmo_aaaaaaaaaaaa_" + "A" * 43}, AuthFailure.INVALID_API_KEY),
    ({"Authorization": "Bearer eyJ.x.y"}, AuthFailure.JWT_DISABLED),
    ({"Authorization": "Bearer llmo_a", "X-API-Key": "llmo_b"}, AuthFailure.MALFORMED),
])
def test_authenticator_refusals(headers: dict[str, str], reason: AuthFailure) -> None:
    with pytest.raises(AuthError) as caught:
        authenticate(Authenticator(ApiKeyStore(MemoryStorage()), None), headers)
    assert (caught.value.status, caught.value.reason) == (401, reason)
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_requires_decorator_checks_the_role() -> None:
    store = ApiKeyStore(MemoryStorage())
    _, viewer = asyncio.run(store.create("v", Role.VIEWER))
    _, admin = asyncio.run(store.create("a", Role.ADMIN))
    app = web.Application()
    app[AUTHENTICATOR] = Authenticator(store, None)

    @requires(Role.OPERATOR)
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=request[PRINCIPAL_KEY].subject)

    def call(key: str) -> Any:
        return asyncio.run(handler(make_mocked_request("GET", "/", app=app,
                                                       headers={"X-API-Key": key})))

    assert call(admin).text == "a"
    with pytest.raises(AuthError) as caught:
        call(viewer)
    assert caught.value.status == 403 and "operator" in caught.value.detail
