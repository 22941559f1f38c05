"""The development OpenID provider: loopback only, discovery, JWKS, and the password grant."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from fieldsync.auth import DevIssuer, DevUser


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
    assert config["grant_types_supported"] == ["password"]
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
