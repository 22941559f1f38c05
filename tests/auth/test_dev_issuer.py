"""The development OpenID provider: loopback only, discovery, JWKS, the password grant, and the
authorization-code flow with PKCE and refresh tokens."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from fieldsync.auth import DevIssuer, DevUser


def decode_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return await response.json()


async def post_token(issuer: DevIssuer, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{issuer.issuer}/token", data=form) as response,
    ):
        assert response.headers["Cache-Control"] == "no-store"  # RFC 6749 §5.1
        return response.status, await response.json()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "192.168.1.20", "example.com"])
def test_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match=host.replace(".", r"\.")):
        DevIssuer({}, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_accepts_loopback_hosts(host: str) -> None:
    DevIssuer({}, host=host)


async def test_localhost_binds_one_ipv4_address() -> None:
    async with DevIssuer({}, host="localhost") as issuer:
        assert issuer.issuer.startswith("http://127.0.0.1:")


def test_issuer_before_start() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = DevIssuer({}).issuer


async def test_discovery_and_jwks(issuer: DevIssuer) -> None:
    config = await get_json(f"{issuer.issuer}/.well-known/openid-configuration")
    assert config["issuer"] == issuer.issuer
    assert config["token_endpoint"] == f"{issuer.issuer}/token"
    assert config["grant_types_supported"] == ["authorization_code", "refresh_token", "password"]
    assert config["authorization_endpoint"] == f"{issuer.issuer}/authorize"
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert set(config["id_token_signing_alg_values_supported"]) == {"RS256", "ES256"}
    jwks = await get_json(config["jwks_uri"])
    by_alg = {key["alg"]: key for key in jwks["keys"]}
    assert set(by_alg) == {"RS256", "ES256"}
    assert by_alg["RS256"]["kty"] == "RSA"
    assert (by_alg["ES256"]["kty"], by_alg["ES256"]["crv"]) == ("EC", "P-256")
    for alg, key in by_alg.items():
        assert key["use"] == "sig"
        assert key["kid"] == issuer.kid(alg)
        assert "d" not in key  # public halves only


async def test_rotate_keys_publishes_only_new_kids(issuer: DevIssuer) -> None:
    old = {issuer.kid("RS256"), issuer.kid("ES256")}
    issuer.rotate_keys()
    jwks = await get_json(f"{issuer.issuer}/jwks")
    published = {key["kid"] for key in jwks["keys"]}
    assert published == {issuer.kid("RS256"), issuer.kid("ES256")}
    assert not published & old


async def test_password_grant(issuer: DevIssuer) -> None:
    status, body = await post_token(
        issuer, {"grant_type": "password", "username": "ada", "password": "s3cret"}
    )
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["access_token"].count(".") == 2


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "password", "username": "ada", "password": "demo"}, "invalid_grant"),
        ({"grant_type": "password", "username": "nobody", "password": "demo"}, "invalid_grant"),
        ({"grant_type": "password", "username": "tom"}, "invalid_grant"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({"username": "tom", "password": "demo"}, "unsupported_grant_type"),
    ],
)
async def test_token_endpoint_errors(form: dict[str, str], error: str, issuer: DevIssuer) -> None:
    status, body = await post_token(issuer, form)
    assert status == 400
    assert body["error"] == error
    assert "access_token" not in body


def test_issue_refuses_unknown_algorithms() -> None:
    issuer = DevIssuer({"u": DevUser("u", ("admin",))})
    with pytest.raises(ValueError, match="HS256"):
        issuer.issue("u", alg="HS256")


# --- the authorization-code flow with PKCE ------------------------------------------------------

VERIFIER = "v" * 20 + "-._~" + "0123456789abcdefghijklmn"  # 48 unreserved characters
REDIRECT = "http://127.0.0.1:9/callback"


def challenge(verifier: str = VERIFIER) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorization(**overrides: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": "fieldsync-app",
        "redirect_uri": REDIRECT,
        "state": "st<&>",
        "code_challenge": challenge(),
        "code_challenge_method": "S256",
    } | overrides


async def sign_in(issuer: DevIssuer, user: str, password: str) -> aiohttp.ClientResponse:
    """Load the login page as a browser does, post its form; the answer, not followed."""
    params = authorization()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{issuer.issuer}/authorize", params=params) as page:
            assert page.status == 200
            text = await page.text()
            # The state is escaped in the page, never injected; the page runs no script.
            assert "st&lt;&amp;&gt;" in text
            assert "st<&>" not in text
            assert "<script" not in text
        form = params | {"username": user, "password": password}
        url = f"{issuer.issuer}/authorize"
        async with http.post(url, data=form, allow_redirects=False) as response:
            await response.read()
            return response


async def test_the_code_flow_signs_in_with_pkce_and_refreshes(issuer: DevIssuer) -> None:
    response = await sign_in(issuer, "sue", "demo")
    assert response.status == 302
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = dict(parse_qsl(location.query))
    assert (query["state"], query["iss"]) == ("st<&>", issuer.issuer)
    exchange = {
        "grant_type": "authorization_code",
        "code": query["code"],
        "code_verifier": VERIFIER,
        "redirect_uri": REDIRECT,
        "client_id": "fieldsync-app",
    }
    status, tokens = await post_token(issuer, exchange)
    assert status == 200, tokens
    claims = decode_claims(tokens["access_token"])
    assert (claims["sub"], claims["team"]) == ("u-sue", "north-1")
    assert claims["client_id"] == "fieldsync-app"
    assert decode_claims(tokens["id_token"])["aud"] == "fieldsync-app"
    # A code is used once.
    assert (await post_token(issuer, exchange))[1]["error"] == "invalid_grant"
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    status, renewed = await post_token(issuer, refresh)
    assert status == 200
    assert decode_claims(renewed["access_token"])["sub"] == "u-sue"
    # Refresh tokens rotate: the old one is spent; a revoked one is refused.
    assert (await post_token(issuer, refresh))[1]["error"] == "invalid_grant"
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{issuer.issuer}/revoke", data={"token": renewed["refresh_token"]}) as answer,
    ):
        assert answer.status == 200
    again = {"grant_type": "refresh_token", "refresh_token": renewed["refresh_token"]}
    assert (await post_token(issuer, again))[1]["error"] == "invalid_grant"


async def test_a_wrong_verifier_or_password_gets_no_token(issuer: DevIssuer) -> None:
    assert (await sign_in(issuer, "ada", "demo")).status == 401
    response = await sign_in(issuer, "ada", "s3cret")
    code = dict(parse_qsl(urlsplit(response.headers["Location"]).query))["code"]
    exchange = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": "w" * 48,
        "redirect_uri": REDIRECT,
        "client_id": "fieldsync-app",
    }
    status, body = await post_token(issuer, exchange)
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(
    "overrides",
    [
        {"redirect_uri": "https://evil.example/cb"},
        {"code_challenge_method": "plain"},
        {"code_challenge": ""},
        {"response_type": "token"},
        {"client_id": ""},
    ],
)
async def test_an_authorization_request_it_cannot_honour_is_refused_on_the_page(
    issuer: DevIssuer, overrides: dict[str, str]
) -> None:
    url = f"{issuer.issuer}/authorize"
    params = authorization(**overrides)
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, params=params, allow_redirects=False) as page,
    ):
        assert page.status == 400
        assert "Location" not in page.headers
