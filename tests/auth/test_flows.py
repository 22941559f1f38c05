"""Signing in through fieldsync against a standards-compliant OpenID provider on loopback
(`tests/auth/provider.py`, built from authlib's authorization-server components).

The test plays the app and its browser: it reads `GET /v1/auth/config`, runs the authorization
code flow with PKCE at the provider (RFC 6749 §4.1, RFC 7636), exchanges the code and refreshes
through `POST /v1/auth/token`, and uses the access tokens on `/v1/sync`. Then it breaks things:
revocation (RFC 7009), replayed codes and refresh tokens, a wrong verifier, key rotation, ID
tokens offered as access tokens, provider outages, and requests the relay must not forward.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from fieldsync.errors import CloseCode
from tests.auth.provider import (
    CLIENT_ID,
    POST_LOGOUT_REDIRECT_URI,
    REDIRECT_URI,
    OpenIDProvider,
    User,
)
from tests.harness import USERS, Reply, Server, assert_problem, running_server
from tests.wire import connect

PEOPLE = {
    subject: User(subject, user.roles, user.team, user.region, user.name)
    for subject, user in USERS.items()
}

IdPServer = Server[OpenIDProvider]


@pytest.fixture
async def idp() -> AsyncIterator[OpenIDProvider]:
    async with OpenIDProvider(PEOPLE) as idp:
        yield idp


@pytest.fixture
def issuer(idp: OpenIDProvider) -> OpenIDProvider:
    """The provider `server` (tests/conftest.py) trusts: this one, with its authorization code
    flow, rather than the DevIssuer."""
    return idp


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"oidc_client_id": CLIENT_ID}


# --- the app's side of the flow -------------------------------------------------------------


@dataclass(frozen=True)
class Authorization:
    code: str
    verifier: str


async def auth_config(http: aiohttp.ClientSession, server: IdPServer) -> dict[str, Any]:
    async with http.get(f"{server.url}/v1/auth/config") as response:
        assert response.status == 200
        config: dict[str, Any] = await response.json()
        return config


async def authorize(
    http: aiohttp.ClientSession, config: Mapping[str, Any], subject: str = "tina"
) -> Authorization:
    """The browser's part: the authorization request with a fresh PKCE pair, the provider's
    login (named by `login_hint`) and consent, and the redirect back carrying the code."""
    verifier = secrets.token_urlsafe(48)  # 64 characters (RFC 7636 §4.1: 43-128)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    state = secrets.token_urlsafe(16)
    params = {
        "response_type": "code",
        "client_id": config["client_id"],
        "redirect_uri": REDIRECT_URI,
        "scope": " ".join(config["scopes"]),
        "state": state,
        "nonce": secrets.token_urlsafe(16),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "login_hint": subject,
    }
    async with http.get(
        config["authorization_endpoint"], params=params, allow_redirects=False
    ) as response:
        assert response.status == 302
        location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}:{location.path}" == REDIRECT_URI
    returned = parse_qs(location.query)
    assert returned["state"] == [state]  # RFC 6749 §4.1.2: the state comes back unchanged
    return Authorization(returned["code"][0], verifier)


async def post_form(http: aiohttp.ClientSession, url: str, **form: str) -> Reply:
    async with http.post(url, data=form) as response:
        return Reply(response.status, response.headers, await response.read())


async def exchange(
    http: aiohttp.ClientSession, config: Mapping[str, Any], grant: Authorization
) -> Reply:
    return await post_form(
        http,
        config["token_endpoint"],
        grant_type="authorization_code",
        code=grant.code,
        code_verifier=grant.verifier,
        redirect_uri=REDIRECT_URI,
        client_id=config["client_id"],
    )


async def refresh(
    http: aiohttp.ClientSession, config: Mapping[str, Any], refresh_token: str
) -> Reply:
    return await post_form(
        http,
        config["token_endpoint"],
        grant_type="refresh_token",
        refresh_token=refresh_token,
        client_id=config["client_id"],
    )


async def sign_in(
    http: aiohttp.ClientSession, server: IdPServer, subject: str = "tina"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the auth config, the token response) of a complete sign-in through fieldsync."""
    config = await auth_config(http, server)
    answer = await exchange(http, config, await authorize(http, config, subject))
    assert answer.status == 200, answer.body
    return config, answer.json


def jwt_part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    part: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return part


async def syncs_with(server: IdPServer, access_token: str) -> None:
    """The access token opens a `fieldsync.v1` session whose token is this one."""
    async with connect(server.sync_url, access_token) as wire:
        welcome = await wire.hello()
        assert welcome["token_expires_at"] == jwt_part(access_token, 1)["exp"]


def assert_tokens(answer: Reply) -> None:
    assert answer.status == 200, answer.body
    # RFC 6749 §5.1: token responses are never cached.
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json["token_type"] == "Bearer"


def assert_refused(answer: Reply, status: int, code: str, error: str | None = None) -> None:
    """A problem document that carries the OAuth `error` too, never cached (RFC 6749 §5.2)."""
    assert assert_problem(answer, status, code).get("error") == error
    assert answer.headers["Cache-Control"] == "no-store"


# --- the flow ---------------------------------------------------------------------------------


async def test_config_tells_the_app_how_to_sign_in(
    server: IdPServer, idp: OpenIDProvider, http: aiohttp.ClientSession
) -> None:
    config = await auth_config(http, server)
    discovery = idp.metadata()
    assert config == {
        "issuer": idp.issuer,
        "authorization_endpoint": discovery["authorization_endpoint"],
        # The app's token requests go through fieldsync, never straight to the provider.
        "token_endpoint": f"{server.url}/v1/auth/token",
        "end_session_endpoint": discovery["end_session_endpoint"],
        "revocation_endpoint": discovery["revocation_endpoint"],
        "client_id": CLIENT_ID,
        "scopes": ["openid", "profile", "offline_access"],
        "code_challenge_methods_supported": ["S256"],
    }


async def test_config_names_only_what_the_provider_has_and_the_public_url(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        OpenIDProvider(PEOPLE, end_session=False) as idp,
        running_server(
            tmp_path, idp, public_url="https://sync.example.com/", oidc_scopes="openid  app"
        ) as server,
    ):
        config = await auth_config(http, server)
    assert "end_session_endpoint" not in config
    assert config["token_endpoint"] == "https://sync.example.com/v1/auth/token"
    assert config["scopes"] == ["openid", "app"]


async def test_sign_in_sync_refresh_then_revocation_means_sign_in_again(
    server: IdPServer,
    idp: OpenIDProvider,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = await auth_config(http, server)
    grant = await authorize(http, config)
    signed_in = await exchange(http, config, grant)
    assert_tokens(signed_in)
    tokens = signed_in.json
    claims = jwt_part(tokens["access_token"], 1)
    assert jwt_part(tokens["access_token"], 0)["typ"] == "at+jwt"  # RFC 9068 §2.1
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == "fieldsync"
    assert (claims["sub"], claims["roles"], claims["team"]) == ("tina", ["technician"], "north")
    await syncs_with(server, tokens["access_token"])

    refreshed = await refresh(http, config, tokens["refresh_token"])
    assert_tokens(refreshed)
    assert refreshed.json["access_token"] != tokens["access_token"]
    await syncs_with(server, refreshed.json["access_token"])

    # The user signs out elsewhere: the app's refresh token is revoked at the provider.
    revoked = await post_form(
        http,
        idp.metadata()["revocation_endpoint"],
        token=refreshed.json["refresh_token"],
        token_type_hint="refresh_token",
        client_id=CLIENT_ID,
    )
    assert revoked.status == 200
    again = await refresh(http, config, refreshed.json["refresh_token"])
    assert_refused(again, 401, "reauthenticate", "invalid_grant")
    assert again.headers["WWW-Authenticate"] == 'Bearer error="reauthenticate"'

    # Nothing secret reached a log line, at any level.
    secrets_seen = {
        grant.code,
        grant.verifier,
        *(tokens[k] for k in ("access_token", "refresh_token", "id_token")),
        *(refreshed.json[k] for k in ("access_token", "refresh_token")),
    }
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/v1/auth/token" in logged  # the access log saw the requests
    for secret in secrets_seen:
        assert secret not in logged
        assert secret[-20:] not in logged  # a fragment of a signature is enough to matter


async def test_signing_out_at_the_provider_means_sign_in_again(
    server: IdPServer, http: aiohttp.ClientSession
) -> None:
    """The app's sign-out (OpenID Connect RP-Initiated Logout) through the endpoint the config
    names ends the session's grants at the provider: the refresh token is refused after it."""
    config, tokens = await sign_in(http, server)
    params = {
        "id_token_hint": tokens["id_token"],
        "client_id": CLIENT_ID,
        "post_logout_redirect_uri": POST_LOGOUT_REDIRECT_URI,
        "state": "bye",
    }
    async with http.get(
        config["end_session_endpoint"], params=params, allow_redirects=False
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == f"{POST_LOGOUT_REDIRECT_URI}?state=bye"
    answer = await refresh(http, config, tokens["refresh_token"])
    assert_refused(answer, 401, "reauthenticate", "invalid_grant")


async def test_signing_key_rotation_at_the_provider(
    server: IdPServer, idp: OpenIDProvider, http: aiohttp.ClientSession
) -> None:
    config, tokens = await sign_in(http, server)
    old_kid = idp.kid
    idp.rotate_keys()
    jwks_fetches = idp.served("/jwks")

    refreshed = await refresh(http, config, tokens["refresh_token"])
    assert_tokens(refreshed)
    assert jwt_part(refreshed.json["access_token"], 0)["kid"] == idp.kid != old_kid
    # fieldsync has never seen the new kid: it fetches the JWKS once, and the token verifies.
    await syncs_with(server, refreshed.json["access_token"])
    assert idp.served("/jwks") == jwks_fetches + 1
    # The previous key is still published, so tokens it signed stay good until they expire.
    await syncs_with(server, tokens["access_token"])
    await syncs_with(server, refreshed.json["access_token"])
    assert idp.served("/jwks") == jwks_fetches + 1


async def test_a_wrong_code_verifier_means_sign_in_again(
    server: IdPServer, idp: OpenIDProvider, http: aiohttp.ClientSession
) -> None:
    config = await auth_config(http, server)
    grant = await authorize(http, config)
    # Well-formed (RFC 7636 §4.1) but not the one the challenge was made from: RFC 7636 §4.6.
    stolen = Authorization(grant.code, secrets.token_urlsafe(48))
    assert_refused(await exchange(http, config, stolen), 401, "reauthenticate", "invalid_grant")


async def test_a_code_used_twice_is_refused_and_ends_its_grant(
    server: IdPServer, http: aiohttp.ClientSession
) -> None:
    config = await auth_config(http, server)
    grant = await authorize(http, config)
    first = await exchange(http, config, grant)
    assert_tokens(first)
    replay = await exchange(http, config, grant)
    assert_refused(replay, 401, "reauthenticate", "invalid_grant")
    # RFC 6749 §4.1.2: the provider revoked what the code had granted.
    dead = await refresh(http, config, first.json["refresh_token"])
    assert_refused(dead, 401, "reauthenticate", "invalid_grant")


async def test_a_replayed_refresh_token_is_refused_and_ends_its_grant(
    server: IdPServer, http: aiohttp.ClientSession
) -> None:
    config, tokens = await sign_in(http, server)
    rotated = await refresh(http, config, tokens["refresh_token"])
    assert_tokens(rotated)
    replay = await refresh(http, config, tokens["refresh_token"])
    assert_refused(replay, 401, "reauthenticate", "invalid_grant")
    # RFC 9700 §4.14.2: the rotated token is dead too, whoever holds it.
    dead = await refresh(http, config, rotated.json["refresh_token"])
    assert_refused(dead, 401, "reauthenticate", "invalid_grant")


async def test_an_id_token_is_not_an_access_token(
    server: IdPServer, http: aiohttp.ClientSession
) -> None:
    _, tokens = await sign_in(http, server)
    assert jwt_part(tokens["id_token"], 1)["aud"] == [CLIENT_ID]
    async with connect(server.sync_url, tokens["id_token"]) as wire:
        assert await wire.closed_with() == (CloseCode.UNAUTHORIZED, "reauthenticate")


async def test_the_provider_refusing_the_client_is_not_a_sign_in_problem(
    tmp_path: Path, idp: OpenIDProvider, http: aiohttp.ClientSession
) -> None:
    async with running_server(tmp_path, idp, oidc_client_id="not-registered") as server:
        config = await auth_config(http, server)
        answer = await refresh(http, config, "any-refresh-token")
    assert_refused(answer, 400, "protocol_error", "invalid_client")


class ReshapedDiscovery:
    """The provider's discovery document served from another loopback address with
    `token_endpoint` replaced (None: left out); keys still come from the provider's JWKS."""

    def __init__(self, idp: OpenIDProvider, token_endpoint: str | None) -> None:
        self._idp = idp
        self._token_endpoint = token_endpoint
        self.issuer = ""

    async def _discovery(self, request: web.Request) -> web.Response:
        document = {**self._idp.metadata(), "issuer": self.issuer}
        document.pop("token_endpoint")
        if self._token_endpoint is not None:
            document["token_endpoint"] = self._token_endpoint
        return web.json_response(document)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[ReshapedDiscovery]:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.issuer = f"http://127.0.0.1:{runner.addresses[0][1]}"
            yield self
        finally:
            await runner.cleanup()


@pytest.mark.parametrize(
    ("token_endpoint", "refusal"),
    [
        ("http://idp.example.com/token", "token_endpoint must be an https URL"),
        ("ftp://127.0.0.1/token", "token_endpoint must be an https URL"),
        (None, "names no token_endpoint"),
    ],
)
async def test_codes_and_refresh_tokens_never_travel_in_clear(
    token_endpoint: str | None, refusal: str, tmp_path: Path, idp: OpenIDProvider
) -> None:
    """A discovery document whose token endpoint is plain http off loopback (or missing) stops
    fieldsync at start, before any code or refresh token could be sent there."""
    async with ReshapedDiscovery(idp, token_endpoint).serving() as reshaped:
        with pytest.raises(ValueError, match=refusal):
            async with running_server(tmp_path, reshaped):
                pass


# --- outages --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outage", "retry_after"),
    [
        ("down", "5"),
        ("500", "5"),
        ("502", "5"),
        ("503 Retry-After: 42", "42"),
        ("503 Retry-After: 86400", "300"),
        ("429", "5"),
        ("200 HTML", "5"),
        ("307 to elsewhere", "5"),
    ],
)
async def test_a_provider_outage_is_503_with_retry_after_and_signs_nobody_out(
    outage: str,
    retry_after: str,
    server: IdPServer,
    idp: OpenIDProvider,
    http: aiohttp.ClientSession,
) -> None:
    config, tokens = await sign_in(http, server)
    if outage == "down":
        await idp.stop()
    elif outage == "307 to elsewhere":
        idp.fail_token_requests(307, {"Location": f"{idp.issuer}/elsewhere"})
    elif "Retry-After" in outage:
        idp.fail_token_requests(503, {"Retry-After": outage.rpartition(" ")[2]})
    else:
        idp.fail_token_requests(int(outage.split()[0]))

    answer = await refresh(http, config, tokens["refresh_token"])
    assert_refused(answer, 503, "idp_unavailable")
    assert answer.headers["Retry-After"] == retry_after
    assert "/elsewhere" not in idp.requests  # a redirect is never followed with the token

    # The provider is back: the same refresh token works, nobody had to sign in again.
    if outage == "down":
        await idp.start()
    idp.heal()
    assert_tokens(await refresh(http, config, tokens["refresh_token"]))


async def test_a_provider_that_never_answers_is_503_after_the_timeout(
    tmp_path: Path, idp: OpenIDProvider, http: aiohttp.ClientSession
) -> None:
    async with running_server(tmp_path, idp, oidc_timeout=0.3) as server:
        config, tokens = await sign_in(http, server)
        idp.hold_token_requests()
        answer = await refresh(http, config, tokens["refresh_token"])
        assert_refused(answer, 503, "idp_unavailable")
        assert answer.headers["Retry-After"] == "5"
        idp.heal()


# --- what the relay refuses to forward ------------------------------------------------------

FORM = "application/x-www-form-urlencoded"
VERIFIER = "v" * 43

NOT_RELAYED: dict[str, tuple[bytes, str, str]] = {
    "no grant_type": (b"refresh_token=r", FORM, "invalid_request"),
    "password grant": (
        b"grant_type=password&username=tina&password=demo",
        FORM,
        "unsupported_grant_type",
    ),
    "client_credentials grant": (b"grant_type=client_credentials", FORM, "unsupported_grant_type"),
    "refresh without a token": (b"grant_type=refresh_token", FORM, "invalid_request"),
    "empty refresh token": (b"grant_type=refresh_token&refresh_token=", FORM, "invalid_request"),
    "code without a verifier (PKCE)": (
        b"grant_type=authorization_code&code=c&redirect_uri=x",
        FORM,
        "invalid_request",
    ),
    "verifier too short": (
        b"grant_type=authorization_code&code=c&code_verifier=" + b"v" * 42,
        FORM,
        "invalid_request",
    ),
    "verifier with reserved characters": (
        b"grant_type=authorization_code&code=c&code_verifier=" + b"v" * 42 + b"%2F",
        FORM,
        "invalid_request",
    ),
    "another client": (
        b"grant_type=refresh_token&refresh_token=r&client_id=someone-else",
        FORM,
        "invalid_client",
    ),
    "a parameter twice": (
        b"grant_type=refresh_token&refresh_token=r&refresh_token=s",
        FORM,
        "invalid_request",
    ),
    "JSON instead of a form": (
        b'{"grant_type": "refresh_token", "refresh_token": "r"}',
        "application/json",
        "invalid_request",
    ),
    "no content type": (b"grant_type=refresh_token&refresh_token=r", "", "invalid_request"),
    "body too large": (
        b"grant_type=refresh_token&refresh_token=" + b"r" * (16 * 1024),
        FORM,
        "invalid_request",
    ),
    "not UTF-8": (b"grant_type=refresh_token&refresh_token=%FF%FE", FORM, "invalid_request"),
    "too many fields": (
        b"grant_type=refresh_token&refresh_token=r&" + b"&".join(b"f%d=x" % i for i in range(15)),
        FORM,
        "invalid_request",
    ),
}


@pytest.mark.parametrize("case", NOT_RELAYED)
async def test_a_request_the_relay_does_not_forward_is_400(
    case: str, server: IdPServer, idp: OpenIDProvider, http: aiohttp.ClientSession
) -> None:
    body, content_type, error = NOT_RELAYED[case]
    headers = {"Content-Type": content_type} if content_type else {}
    async with http.post(f"{server.url}/v1/auth/token", data=body, headers=headers) as response:
        answer = Reply(response.status, response.headers, await response.read())
    assert_refused(answer, 400, "protocol_error", error)
    assert idp.served("/token") == 0  # refused before anything reached the provider


async def test_only_the_grant_parameters_reach_the_provider(
    server: IdPServer, http: aiohttp.ClientSession
) -> None:
    """A client secret or stray parameters sent by a confused app are not relayed, and a missing
    client_id is filled in. Had the secret travelled, the provider would have refused the public
    client's request as `invalid_client` (authlib's `none` authentication demands no secret)."""
    config, tokens = await sign_in(http, server)
    answer = await post_form(
        http,
        config["token_endpoint"],
        grant_type="refresh_token",
        refresh_token=tokens["refresh_token"],
        client_secret="should-not-travel",
        username="tina",
    )
    assert_tokens(answer)
