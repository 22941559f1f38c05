"""TokenVerifier against a real DevIssuer over loopback HTTP: the RFC 8725 / RFC 9068 checks, the
claim mapping, and the JWKS cache (rotation, refetch cooldown, provider outage)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fieldsync.auth import (
    ClaimMapping,
    DevIssuer,
    Principal,
    Role,
    TokenVerifier,
    bearer_token,
)
from fieldsync.auth._oidc import freshness
from fieldsync.errors import AuthError, ErrorCode
from tests.auth.provider import AUDIENCE, CLIENT_ID, SCOPES, OpenIDProvider, User
from tests.auth.test_flows import authorize, exchange
from tests.harness import eventually

# --- crafting tokens by hand: what an attacker can do without the issuer's private keys --------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value).encode())


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")

    def pad(s: str) -> str:
        return s + "=" * (-len(s) % 4)

    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
    )


async def rsa_public_pem(issuer: DevIssuer) -> bytes:
    """The RSA key exactly as anyone can read it from the published JWKS."""
    async with aiohttp.ClientSession() as http, http.get(f"{issuer.issuer}/jwks") as response:
        jwks = await response.json()
    jwk = next(k for k in jwks["keys"] if k["kty"] == "RSA")
    n, e = (int.from_bytes(base64.urlsafe_b64decode(jwk[m] + "=="), "big") for m in ("n", "e"))
    return (
        RSAPublicNumbers(e, n)
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )


async def alg_none(issuer: DevIssuer) -> str:
    _, payload = segments(issuer.issue("u-tom"))
    header = {"alg": "none", "typ": "at+jwt", "kid": issuer.kid("RS256")}
    return f"{b64url_json(header)}.{b64url_json(payload)}."


async def hs256_with_public_key(issuer: DevIssuer) -> str:
    """The algorithm-confusion forgery (RFC 8725 §2.1): HMAC keyed with the public RSA key."""
    _, payload = segments(issuer.issue("u-tom"))
    payload["roles"] = ["admin"]
    header = {"alg": "HS256", "typ": "at+jwt", "kid": issuer.kid("RS256")}
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    secret = await rsa_public_pem(issuer)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


async def tampered(issuer: DevIssuer) -> str:
    token = issuer.issue("u-tom")
    header, _, signature = token.split(".")
    _, claims = segments(token)
    claims["roles"] = ["admin"]
    return f"{header}.{b64url_json(claims)}.{signature}"


async def es256_header_on_rsa_kid(issuer: DevIssuer) -> str:
    """Signed by the issuer's EC key but naming the RSA key: a key verifies only its own alg."""
    return issuer.issue("u-tom", alg="ES256", headers={"kid": issuer.kid("RS256")})


Build = Callable[[DevIssuer], str | Awaitable[str]]


def now() -> int:
    return int(time.time())


async def token_from(build: Build, issuer: DevIssuer) -> str:
    token = build(issuer)
    return await token if inspect.isawaitable(token) else token


# Every way a token must be refused: (how to build it, the code, a word the message must hold).
REFUSED: dict[str, tuple[Build, ErrorCode, str]] = {
    "expired": (lambda i: i.issue("u-tom", ttl=-120), ErrorCode.TOKEN_EXPIRED, "expired"),
    "not yet valid": (
        lambda i: i.issue("u-tom", claims={"nbf": now() + 600}),
        ErrorCode.REAUTHENTICATE,
        "not yet valid",
    ),
    "issued in the future": (
        lambda i: i.issue("u-tom", claims={"iat": now() + 600, "nbf": None}),
        ErrorCode.REAUTHENTICATE,
        "not yet valid",
    ),
    "wrong issuer": (
        lambda i: i.issue("u-tom", claims={"iss": "https://idp.example"}),
        ErrorCode.REAUTHENTICATE,
        "issuer",
    ),
    "issuer with a trailing slash": (
        lambda i: i.issue("u-tom", claims={"iss": i.issuer + "/"}),
        ErrorCode.REAUTHENTICATE,
        "issuer",
    ),
    "wrong audience": (
        lambda i: i.issue("u-tom", claims={"aud": "another-api"}),
        ErrorCode.REAUTHENTICATE,
        "audience",
    ),
    "expired and wrong audience": (
        # A refresh would not help this token, so it must not say `token_expired`.
        lambda i: i.issue("u-tom", ttl=-120, claims={"aud": "another-api"}),
        ErrorCode.REAUTHENTICATE,
        "audience",
    ),
    "no subject": (
        lambda i: i.issue("u-tom", claims={"sub": None}),
        ErrorCode.REAUTHENTICATE,
        "sub",
    ),
    "non-string subject": (
        lambda i: i.issue("u-tom", claims={"sub": 42}),
        ErrorCode.REAUTHENTICATE,
        "subject",
    ),
    "no expiry": (
        lambda i: i.issue("u-tom", claims={"exp": None}),
        ErrorCode.REAUTHENTICATE,
        "exp",
    ),
    "non-numeric expiry": (
        lambda i: i.issue("u-tom", claims={"exp": "tomorrow"}),
        ErrorCode.REAUTHENTICATE,
        "expiry",
    ),
    "NaN expiry": (
        lambda i: i.issue("u-tom", claims={"exp": float("nan")}),
        ErrorCode.REAUTHENTICATE,
        "expiry",
    ),
    "infinite expiry": (
        lambda i: i.issue("u-tom", claims={"exp": float("inf")}),
        ErrorCode.REAUTHENTICATE,
        "expiry",
    ),
    "no audience": (
        lambda i: i.issue("u-tom", claims={"aud": None}),
        ErrorCode.REAUTHENTICATE,
        "aud",
    ),
    "alg none": (alg_none, ErrorCode.REAUTHENTICATE, "algorithm"),
    "HS256 keyed with the RSA public key": (
        hs256_with_public_key,
        ErrorCode.REAUTHENTICATE,
        "algorithm",
    ),
    "tampered payload": (tampered, ErrorCode.REAUTHENTICATE, "signature"),
    "ES256 naming the RSA key": (es256_header_on_rsa_kid, ErrorCode.REAUTHENTICATE, "fit"),
    "typ of another kind of token": (
        lambda i: i.issue("u-tom", headers={"typ": "dpop+jwt"}),
        ErrorCode.REAUTHENTICATE,
        "type",
    ),
    "garbage": (lambda i: "not-a-token", ErrorCode.REAUTHENTICATE, "malformed"),
    "header not JSON": (
        lambda i: "bm90IGpzb24." + i.issue("u-tom").split(".", 1)[1],
        ErrorCode.REAUTHENTICATE,
        "header",
    ),
    "JWE-shaped": (lambda i: "a.b.c.d.e", ErrorCode.REAUTHENTICATE, "malformed"),
    "oversized": (lambda i: "a." + "b" * 20_000 + ".c", ErrorCode.REAUTHENTICATE, "large"),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_refused(case: str, issuer: DevIssuer, verifier: TokenVerifier) -> None:
    build, code, word = REFUSED[case]
    token = await token_from(build, issuer)
    with pytest.raises(AuthError) as refused:
        await verifier.verify(token)
    assert refused.value.code is code
    assert word in refused.value.message
    # The message names the check, never the token (it ends up in logs and close reasons).
    # Nor does the traceback: authlib's exceptions (which carry the token) are not chained.
    assert refused.value.__cause__ is None
    assert refused.value.__suppress_context__
    for part in token.split("."):
        if len(part) > 8:
            assert part not in refused.value.message


# --- accepted tokens and the principal ------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_valid_token_gives_the_principal(
    alg: str, issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.issue("u-sue", alg=alg)
    principal = await verifier.verify(token)
    _, claims = segments(token)
    assert principal == Principal(
        subject="u-sue",
        roles=frozenset({Role.SUPERVISOR}),
        team="north-1",
        region="north",
        name="Sue Super",
        expires_at=float(claims["exp"]),
    )


@pytest.mark.parametrize(
    "headers",
    [{"typ": "JWT"}, {"typ": None}, {"typ": "application/at+jwt"}, {"kid": None}],
    ids=["typ JWT", "no typ", "typ application/at+jwt", "no kid, one RSA key"],
)
async def test_accepted_headers(
    headers: dict[str, Any], issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    principal = await verifier.verify(issuer.issue("u-tom", headers=headers))
    assert principal.subject == "u-tom"


async def test_expired_within_leeway_is_accepted(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    principal = await verifier.verify(issuer.issue("u-tom", ttl=-30))  # leeway is 60 s
    assert principal.expires_at is not None
    assert principal.expires_at < time.time()


async def test_nbf_within_leeway_is_accepted(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    token = issuer.issue("u-tom", claims={"nbf": now() + 30, "iat": now() + 30})
    assert (await verifier.verify(token)).subject == "u-tom"


async def test_zero_leeway(issuer: DevIssuer) -> None:
    async with TokenVerifier(issuer.issuer, issuer.audience, leeway=0) as strict:
        with pytest.raises(AuthError) as refused:
            await strict.verify(issuer.issue("u-tom", ttl=-30))
    assert refused.value.code is ErrorCode.TOKEN_EXPIRED


async def test_audience_list(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    token = issuer.issue("u-tom", claims={"aud": ["account", issuer.audience]})
    assert (await verifier.verify(token)).subject == "u-tom"


async def test_algorithm_outside_the_allow_list(issuer: DevIssuer) -> None:
    async with TokenVerifier(issuer.issuer, issuer.audience, algorithms=("RS256",)) as rs_only:
        assert (await rs_only.verify(issuer.issue("u-tom"))).subject == "u-tom"
        with pytest.raises(AuthError) as refused:
            await rs_only.verify(issuer.issue("u-tom", alg="ES256"))
    assert refused.value.code is ErrorCode.REAUTHENTICATE
    assert "algorithm" in refused.value.message


@pytest.mark.parametrize("algorithms", [("RS256", "HS256"), ("none",), ("HS512",), ()])
def test_symmetric_and_none_algorithms_cannot_be_configured(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="algorithm"):
        TokenVerifier("https://idp.example", "fieldsync", algorithms=algorithms)


def test_plain_http_issuer_only_on_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        TokenVerifier("http://idp.example", "fieldsync")
    TokenVerifier("http://127.0.0.1:8080", "fieldsync")  # the development issuer
    TokenVerifier("https://idp.example/realms/field", "fieldsync")


# --- claim mapping ---------------------------------------------------------------------------


async def test_keycloak_nested_claims_and_role_names(issuer: DevIssuer) -> None:
    keycloak = ClaimMapping(
        roles="realm_access.roles",
        team="org.team",
        region="org.region",
        name="preferred_username",
        role_names={"fs-supervisor": "supervisor", "fs-technician": "technician"},
    )
    token = issuer.issue(
        "kc-subject",
        claims={
            "realm_access": {"roles": ["offline_access", "fs-supervisor", "uma_authorization"]},
            "org": {"team": "south-2", "region": "south"},
            "preferred_username": "kim",
            "roles": ["admin"],  # not where this mapping looks: must not count
        },
    )
    async with TokenVerifier(issuer.issuer, issuer.audience, keycloak) as verifier:
        principal = await verifier.verify(token)
    assert principal.roles == {Role.SUPERVISOR}
    assert (principal.team, principal.region, principal.name) == ("south-2", "south", "kim")


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["technician", "supervisor"], {Role.TECHNICIAN, Role.SUPERVISOR}),
        ("supervisor technician", {Role.TECHNICIAN, Role.SUPERVISOR}),
        ("supervisor,technician", {Role.TECHNICIAN, Role.SUPERVISOR}),
        ("manager, admin", {Role.MANAGER, Role.ADMIN}),
        (["owner", "technician", 7, None], {Role.TECHNICIAN}),
        ("Admin", set()),  # names are case-sensitive, as IdPs treat them
        ({"admin": True}, set()),
        (None, set()),
    ],
)
async def test_roles_claim_shapes(
    roles: object, expected: set[Role], issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.issue("someone", claims={"roles": roles} if roles is not None else None)
    assert (await verifier.verify(token)).roles == expected


async def test_missing_nested_path_and_non_string_values(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    nested = ClaimMapping(roles="a.b.c", team="team.name")
    token = issuer.issue("x", claims={"a": {"b": "not-an-object"}, "team": {"name": 5}})
    async with TokenVerifier(issuer.issuer, issuer.audience, nested) as v:
        principal = await v.verify(token)
    assert principal.roles == frozenset()
    assert principal.team is None


def test_role_names_must_name_fieldsync_roles() -> None:
    with pytest.raises(ValueError, match="superuser"):
        ClaimMapping(role_names={"root": "superuser"})


def test_role_names_cannot_change_after_construction() -> None:
    names = {"fs-admin": "admin"}
    mapping = ClaimMapping(role_names=names)
    names["fs-admin"] = "technician"
    assert mapping.role_names["fs-admin"] == "admin"


# --- the JWKS cache ----------------------------------------------------------------------------


async def test_rotation_refetches_once_then_verifies(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    old_token = issuer.issue("u-tom")
    assert issuer.jwks_requests == 1  # start()
    issuer.rotate_keys()
    for alg in ("RS256", "ES256"):
        assert (await verifier.verify(issuer.issue("u-tom", alg=alg))).subject == "u-tom"
    assert issuer.jwks_requests == 2
    # The old key is no longer published, so tokens it signed no longer verify.
    with pytest.raises(AuthError) as refused:
        await verifier.verify(old_token)
    assert refused.value.code is ErrorCode.REAUTHENTICATE
    assert issuer.jwks_requests == 2  # and asking again about its kid waits for the cooldown


async def test_flood_of_unknown_kids_fetches_at_most_once(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    before = issuer.jwks_requests
    tokens = [issuer.issue("u-tom", headers={"kid": secrets.token_hex(8)}) for _ in range(50)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results)
    assert {r.code for r in results if isinstance(r, AuthError)} == {ErrorCode.REAUTHENTICATE}
    assert issuer.jwks_requests - before <= 1
    # Known keys keep working throughout.
    assert (await verifier.verify(issuer.issue("u-tom"))).subject == "u-tom"


async def test_cooldown_zero_refetches_each_unknown_kid(issuer: DevIssuer) -> None:
    async with TokenVerifier(issuer.issuer, issuer.audience, jwks_cooldown=0) as eager:
        for _ in range(3):
            with pytest.raises(AuthError):
                await eager.verify(issuer.issue("u-tom", headers={"kid": secrets.token_hex(8)}))
    assert issuer.jwks_requests == 1 + 3


async def test_cached_keys_work_while_the_issuer_is_down(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    await issuer.stop()
    for alg in ("RS256", "ES256"):
        assert (await verifier.verify(issuer.issue("u-tom", alg=alg))).subject == "u-tom"
    # An unknown kid tries the (unreachable) provider and is refused, not crashed on.
    issuer.rotate_keys()
    with pytest.raises(AuthError) as refused:
        await verifier.verify(issuer.issue("u-tom"))
    assert refused.value.code is ErrorCode.REAUTHENTICATE


async def provider_token(http: aiohttp.ClientSession, idp: OpenIDProvider) -> str:
    """An access token from the provider's authorization-code flow, signed with its key now."""
    config = {
        "client_id": CLIENT_ID,
        "scopes": SCOPES,
        "authorization_endpoint": f"{idp.issuer}/authorize",
        "token_endpoint": f"{idp.issuer}/token",
    }
    answer = await exchange(http, config, await authorize(http, config, "tina"))
    assert answer.status == 200, answer.body
    return str(answer.json["access_token"])


async def test_a_key_the_provider_withdraws_stops_verifying_when_the_keys_go_stale() -> None:
    """The provider rotates (the previous key still published), then withdraws the previous
    key. Nothing makes the verifier ask for an unknown kid, yet tokens of the withdrawn key are
    refused once the cached JWKS goes stale (here at once: `no-cache`, the floor applies)."""
    people = {"tina": User("tina", ("technician",), "north", "east")}
    async with OpenIDProvider(people) as idp, aiohttp.ClientSession() as http:
        idp.jwks_cache_control = "no-cache"
        old = await provider_token(http, idp)
        idp.rotate_keys()
        new = await provider_token(http, idp)
        async with TokenVerifier(idp.issuer, AUDIENCE, jwks_min_age=0.05) as verifier:
            for token in (old, new):
                assert (await verifier.verify(token)).subject == "tina"
            idp.retire_previous_key()
            fetched = idp.served("/jwks")
            # Two more fetches: the first one that started after the withdrawal has ended.
            await eventually(lambda: idp.served("/jwks") >= fetched + 2)
            with pytest.raises(AuthError) as refused:
                await verifier.verify(old)
            assert refused.value.code is ErrorCode.REAUTHENTICATE
            assert "unknown" in refused.value.message
            assert (await verifier.verify(new)).subject == "tina"


async def test_a_long_max_age_is_capped_by_the_ceiling() -> None:
    async with OpenIDProvider({}) as idp:
        idp.jwks_cache_control = "public, max-age=31536000"
        async with TokenVerifier(idp.issuer, AUDIENCE, jwks_min_age=0.05, jwks_max_age=0.1):
            await eventually(lambda: idp.served("/jwks") >= 3)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, 300),  # nothing said: five minutes
        ({"Cache-Control": "max-age=900"}, 900),
        ({"Cache-Control": "public, max-age=900, must-revalidate"}, 900),
        ({"Cache-Control": 'max-age="900"'}, 900),
        ({"Cache-Control": "max-age=900", "Age": "600"}, 300),  # already 600 s old in a cache
        ({"Cache-Control": "MAX-AGE=900"}, 900),
        ({"Cache-Control": "max-age=5"}, 60),  # the floor
        ({"Cache-Control": "no-cache"}, 60),
        ({"Cache-Control": "no-store, max-age=900"}, 60),
        ({"Cache-Control": "max-age=86400"}, 3600),  # the ceiling
        ({"Cache-Control": "max-age=soon"}, 300),
        ({"Cache-Control": "s-maxage=900"}, 300),  # for shared caches, not for us
    ],
)
def test_how_long_a_jwks_stays_fresh(headers: dict[str, str], seconds: float) -> None:
    assert freshness(headers, 60, 3600) == seconds


@pytest.mark.parametrize(("floor", "ceiling"), [(0, 10), (-1, 10), (20, 10)])
def test_the_refresh_bounds_must_make_sense(floor: float, ceiling: float) -> None:
    with pytest.raises(ValueError, match="jwks_min_age"):
        TokenVerifier("https://idp.example", "fieldsync", jwks_min_age=floor, jwks_max_age=ceiling)


async def test_key_urls_in_the_token_are_never_followed(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    """RFC 8725 §3.10: a token pointing at its own keys (`jku`, `x5u`) proves nothing."""
    async with DevIssuer({}) as attacker:
        token = attacker.issue(
            "u-ada",
            claims={"iss": issuer.issuer, "roles": ["admin"]},
            headers={"jku": f"{attacker.issuer}/jwks", "x5u": f"{attacker.issuer}/jwks"},
        )
        with pytest.raises(AuthError) as refused:
            await verifier.verify(token)
        assert refused.value.code is ErrorCode.REAUTHENTICATE
        assert attacker.jwks_requests == 0


async def test_discovery_must_name_the_configured_issuer(issuer: DevIssuer) -> None:
    verifier = TokenVerifier(issuer.issuer + "/", issuer.audience)
    with pytest.raises(ValueError, match="issuer"):
        await verifier.start()
    await verifier.close()


async def test_start_fails_when_the_provider_is_down(issuer: DevIssuer) -> None:
    await issuer.stop()
    verifier = TokenVerifier(issuer.issuer, issuer.audience)
    with pytest.raises(aiohttp.ClientError):
        await verifier.start()


async def test_token_from_the_token_endpoint(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    form = {"grant_type": "password", "username": "max", "password": "demo"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{issuer.issuer}/token", data=form) as response,
    ):
        body = await response.json()
    principal = await verifier.verify(body["access_token"])
    assert principal.subject == "u-max"
    assert principal.roles == {Role.MANAGER}
    assert principal.region == "north"


# --- the Authorization header --------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("BEARER  abc-_.~+/=", "abc-_.~+/="),
        ("  Bearer abc  ", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("Bearer a,b", None),
        ("Basic dXNlcjpwdw==", None),
        ("Bearerabc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
