"""A standards-compliant OpenID provider on loopback for the tests, assembled from authlib's
authorization-server components rather than signing tokens by hand:

- the authorization code grant (RFC 6749 §4.1) with PKCE required, S256 only (RFC 7636), and ID
  tokens (OpenID Connect Core, `authlib.oidc.core.OpenIDCode`);
- the refresh token grant (RFC 6749 §6) with rotation: a public client's refresh token is
  single-use, and replaying a rotated one revokes the whole grant (RFC 9700 §4.14.2);
- a code used twice is refused and the tokens issued from it revoked (RFC 6749 §4.1.2);
- token revocation (RFC 7009) and RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0);
- JWT access tokens (RFC 9068: `typ: at+jwt`, RS256, iss/sub/aud/exp/iat/jti/client_id plus
  roles/team/region/name) with a JWKS publishing the current and the previous key, and rotation;
- discovery (OpenID Connect Discovery 1.0, RFC 8414), checked with authlib's metadata models.

authlib has no aiohttp integration. `_Request` is the thin adapter: a handler reads the request
body (its only await), then authlib's server runs synchronously over in-memory stores, the way
its Flask integration runs it over Flask's request.

Only the login page is simulated: the test, playing the browser, names its user with the OpenID
Connect `login_hint` parameter (Core §3.1.2.1), and consent is given on the user's behalf.

For key tests: `rotate_keys()`, `retire_previous_key()` and `jwks_cache_control`. For outage
tests: `stop()` (connection refused), `fail_token_requests(status)` (the token
endpoint answers like a broken gateway) and `hold_token_requests()` (it never answers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidRequestError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
    TokenMixin,
    grants,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from authlib.oidc import rpinitiated
from authlib.oidc.core import AuthorizationCodeMixin, OpenIDCode, UserInfo
from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc.jwk import KeySet, RSAKey
from multidict import CIMultiDict, MultiDict, MultiDictProxy

__all__ = [
    "AUDIENCE",
    "CLIENT_ID",
    "POST_LOGOUT_REDIRECT_URI",
    "REDIRECT_URI",
    "SCOPES",
    "OpenIDProvider",
    "User",
]

CLIENT_ID = "fieldsync-app"
# RFC 8252 §7.1: a native app's private-use URI scheme redirect.
REDIRECT_URI = "org.example.fieldsync:/oauth2redirect"
POST_LOGOUT_REDIRECT_URI = "org.example.fieldsync:/signed-out"
AUDIENCE = "fieldsync"  # the resource server; ID tokens name the client instead
SCOPES = ("openid", "profile", "offline_access")

# authlib logs every token it issues at DEBUG ("Issue token %r to %r"). This stand-in's logs are
# not fieldsync's, but a test run scanned for secrets in its log lines must not find them either.
logging.getLogger("authlib").setLevel(logging.INFO)

_CODE_TTL = 60  # RFC 6749 §4.1.2: a code lives shortly (10 minutes at most)


@dataclass(frozen=True)
class User:
    subject: str
    roles: tuple[str, ...]
    team: str | None = None
    region: str | None = None
    name: str | None = None

    def get_user_id(self) -> str:
        return self.subject


@dataclass(frozen=True)
class _Client(ClientMixin):
    """The fieldsync apps: a public client (no secret), authorization code + refresh only."""

    client_id: str
    redirect_uris: tuple[str, ...]
    scope: str
    post_logout_redirect_uris: tuple[str, ...] = ()

    @property
    def client_metadata(self) -> dict[str, Any]:
        return {"post_logout_redirect_uris": list(self.post_logout_redirect_uris)}

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return self.scope
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris  # exact match (RFC 9700 §4.1.3)

    def check_client_secret(self, client_secret: str) -> bool:
        return False  # it has none

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"  # RFC 7591 §2: a public client

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


@dataclass
class _Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    subject: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    auth_time: int
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


@dataclass
class _Token(TokenMixin):
    """One issued grant step; `grant` names the authorization code the chain started from."""

    client: _Client
    user: User
    scope: str
    access_token: str
    refresh_token: str | None
    grant: str
    issued_at: float
    expires_in: int
    revoked: bool = False

    def check_client(self, client: _Client) -> bool:
        return client.client_id == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> User:
        return self.user

    def get_client(self) -> _Client:
        return self.client


@dataclass
class _Stores:
    users: dict[str, User]
    clients: dict[str, _Client]
    codes: dict[str, _Code] = field(default_factory=dict)
    spent_codes: set[str] = field(default_factory=set)
    nonces: set[str] = field(default_factory=set)
    tokens: list[_Token] = field(default_factory=list)

    def revoke_grant(self, grant: str) -> None:
        for token in self.tokens:
            if token.grant == grant:
                token.revoked = True

    def by_refresh_token(self, value: str) -> _Token | None:
        return next((t for t in self.tokens if t.refresh_token == value), None)


class _Payload(OAuth2Payload):
    def __init__(self, values: MultiDict[str]) -> None:
        self._values = values

    @property
    def data(self) -> dict[str, str]:
        return {name: self._values.getone(name) for name in self._values}

    @property
    def datalist(self) -> dict[str, list[str]]:
        return {name: self._values.getall(name) for name in self._values}


class _Request(OAuth2Request):
    """An aiohttp request as authlib's server reads one: query and (already read) form."""

    def __init__(self, request: web.Request, form: MultiDict[str]) -> None:
        super().__init__(request.method, str(request.url), headers=request.headers)
        self._args = MultiDict(request.query)
        self._form = form
        self.payload = _Payload(MultiDict([*request.query.items(), *form.items()]))

    @property
    def args(self) -> MultiDict[str]:
        return self._args

    @property
    def form(self) -> MultiDict[str]:
        return self._form


class _Server(AuthorizationServer):
    def __init__(self, stores: _Stores) -> None:
        super().__init__(scopes_supported=list(SCOPES))
        self.stores = stores

    def query_client(self, client_id: str) -> _Client | None:
        return self.stores.clients.get(client_id)

    def save_token(self, token: Mapping[str, Any], request: OAuth2Request) -> None:
        code = request.authorization_code
        grant = code.code if code is not None else request.refresh_token.grant
        self.stores.tokens.append(
            _Token(
                client=request.client,
                user=request.user,
                scope=token.get("scope", ""),
                access_token=token["access_token"],
                refresh_token=token.get("refresh_token"),
                grant=grant,
                issued_at=time.time(),
                expires_in=token["expires_in"],
            )
        )

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request  # the handlers build it, having awaited the body

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError("no JSON endpoints here")

    def handle_response(
        self, status: int, body: Any, headers: list[tuple[str, str]]
    ) -> web.Response:
        text = json.dumps(body) if isinstance(body, dict) else str(body or "")
        return web.Response(status=status, body=text.encode(), headers=CIMultiDict(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


class _CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]
    server: _Server

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        nonce = data.get("nonce")
        if nonce:
            self.server.stores.nonces.add(nonce)
        self.server.stores.codes[code] = _Code(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri or request.client.get_default_redirect_uri(),
            scope=request.scope,
            subject=request.user.subject,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
            nonce=nonce,
            auth_time=int(time.time()),
            expires_at=time.time() + _CODE_TTL,
        )

    def query_authorization_code(self, code: str, client: _Client) -> _Code | None:
        stores = self.server.stores
        if code in stores.spent_codes:
            # RFC 6749 §4.1.2: a code used twice is refused, and what it granted is revoked.
            stores.revoke_grant(code)
            return None
        item = stores.codes.get(code)
        if item is None or item.client_id != client.client_id or time.time() > item.expires_at:
            return None
        return item

    def delete_authorization_code(self, authorization_code: _Code) -> None:
        del self.server.stores.codes[authorization_code.code]
        self.server.stores.spent_codes.add(authorization_code.code)

    def authenticate_user(self, authorization_code: _Code) -> User | None:
        return self.server.stores.users.get(authorization_code.subject)


class _RefreshGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation (RFC 9700 §4.14.2)
    server: _Server

    def authenticate_refresh_token(self, refresh_token: str) -> _Token | None:
        token = self.server.stores.by_refresh_token(refresh_token)
        if token is None:
            return None
        if token.revoked:
            # A rotated (or revoked) refresh token presented again: someone holds a copy, so the
            # whole grant goes (RFC 9700 §4.14.2).
            self.server.stores.revoke_grant(token.grant)
            return None
        return token

    def authenticate_user(self, refresh_token: _Token) -> User:
        return refresh_token.user

    def revoke_old_credential(self, refresh_token: _Token) -> None:
        refresh_token.revoked = True


class _PKCE(CodeChallenge):
    """RFC 7636 required of every authorization request, S256 only (RFC 9700 §2.1.1: `plain`
    does not protect against an attacker who can read the authorization request)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge") or data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE with code_challenge_method=S256 is required")
        super().validate_code_challenge(grant, redirect_uri)


class _IDTokens(OpenIDCode):
    def __init__(self, provider: OpenIDProvider) -> None:
        super().__init__(require_nonce=False)
        self._provider = provider

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        return nonce in self._provider.stores.nonces

    def resolve_client_private_key(self, client: _Client) -> KeySet:
        return KeySet([self._provider.signing_key])

    def get_client_claims(self, client: _Client) -> dict[str, Any]:
        return {"iss": self._provider.issuer, "aud": [client.client_id]}

    def generate_user_info(self, user: User, scope: str) -> UserInfo:
        claims = {"sub": user.subject, "name": user.name}
        return UserInfo({name: value for name, value in claims.items() if value is not None})


class _AccessTokens(JWTBearerTokenGenerator):
    """RFC 9068 access tokens for fieldsync, signed with the provider's current key."""

    def __init__(self, provider: OpenIDProvider) -> None:
        super().__init__(
            issuer=provider.issuer,
            alg="RS256",
            refresh_token_generator=lambda **_: secrets.token_urlsafe(32),
            expires_generator=lambda client, grant_type: provider.token_ttl,
        )
        self._provider = provider

    def get_jwks(self) -> KeySet:
        # One key: joserfc then names it in the `kid` header.
        return KeySet([self._provider.signing_key])

    def get_audiences(self, client: _Client, user: User | None, scope: str) -> str:
        return AUDIENCE

    def get_extra_claims(
        self, client: _Client, grant_type: str, user: User | None, scope: str
    ) -> dict[str, Any]:
        if user is None:
            return {}
        claims = {"roles": list(user.roles), "team": user.team, "region": user.region}
        claims["name"] = user.name
        return {name: value for name, value in claims.items() if value is not None}


class _Revocation(RevocationEndpoint):
    CLIENT_AUTH_METHODS = ["none"]  # RFC 7009 §2.1: public clients identify themselves

    def __init__(self, server: _Server) -> None:
        super().__init__(server)
        self.stores = server.stores

    def query_token(self, token_string: str, token_type_hint: str | None) -> _Token | None:
        return self.stores.by_refresh_token(token_string) or next(
            (t for t in self.stores.tokens if t.access_token == token_string), None
        )

    def revoke_token(self, token: _Token, request: OAuth2Request) -> None:
        # RFC 7009 §2.1: revoking a refresh token ends its grant.
        self.stores.revoke_grant(token.grant)


class _EndSession(rpinitiated.EndSessionEndpoint):
    def __init__(self, provider: OpenIDProvider) -> None:
        super().__init__()
        self._provider = provider

    def get_server_jwks(self) -> KeySet:
        return self._provider.public_keys()

    def end_session(self, end_session_request: rpinitiated.EndSessionRequest) -> None:
        claims = end_session_request.id_token_claims or {}
        for token in self._provider.stores.tokens:
            if token.user.subject == claims.get("sub"):
                token.revoked = True


def _new_key() -> RSAKey:
    # The kid is the RFC 7638 thumbprint, so every rotation publishes a new kid.
    return RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)


class OpenIDProvider:
    """`async with OpenIDProvider(users) as idp:` serves on 127.0.0.1; `idp.issuer` is its URL."""

    def __init__(
        self,
        users: Mapping[str, User],
        *,
        token_ttl: int = 300,
        end_session: bool = True,
    ) -> None:
        self.token_ttl = token_ttl
        self.stores = _Stores(
            users=dict(users),
            clients={
                CLIENT_ID: _Client(
                    CLIENT_ID, (REDIRECT_URI,), " ".join(SCOPES), (POST_LOGOUT_REDIRECT_URI,)
                )
            },
        )
        self._end_session = end_session
        self._keys: list[RSAKey] = [_new_key()]  # the signing key first, then the previous one
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._issuer: str | None = None
        self._server: _Server | None = None
        self.requests: list[str] = []  # the path of every request served
        # The JWKS answer's Cache-Control (RFC 9111 §5.2.2), None for none: how long a client
        # may keep the keys before fetching them again.
        self.jwks_cache_control: str | None = None
        self._token_fault: tuple[int, dict[str, str]] | None = None
        self._released = asyncio.Event()
        self._released.set()

    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise RuntimeError("OpenIDProvider not started")
        return self._issuer

    @property
    def signing_key(self) -> RSAKey:
        return self._keys[0]

    @property
    def kid(self) -> str:
        return str(self.signing_key.kid)

    def public_keys(self) -> KeySet:
        return KeySet([RSAKey.import_key(k.as_dict(private=False)) for k in self._keys])

    def served(self, path: str) -> int:
        """How many requests to `path` the provider has served (faulted ones included)."""
        return self.requests.count(path)

    def rotate_keys(self) -> None:
        """Sign with a new key from now on; the previous one stays published (tokens it signed
        remain valid until they expire), any older one is retired."""
        self._keys = [_new_key(), self._keys[0]]

    def retire_previous_key(self) -> None:
        """Publish only the signing key: tokens the previous one signed must no longer verify
        (a key withdrawn after a compromise, or at the end of its rotation)."""
        self._keys = self._keys[:1]

    def fail_token_requests(self, status: int, headers: Mapping[str, str] | None = None) -> None:
        """The token endpoint answers `status` with an HTML page, as a broken gateway does."""
        self._token_fault = (status, dict(headers or {}))

    def hold_token_requests(self) -> None:
        """Token requests wait, unanswered, until `heal()` or `stop()`."""
        self._released.clear()

    def heal(self) -> None:
        """Answer token requests normally again (held ones included)."""
        self._token_fault = None
        self._released.set()

    async def start(self) -> str:
        if self._runner is not None:
            raise RuntimeError("OpenIDProvider already started")
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_route("*", "/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/revoke", self._revoke)
        if self._end_session:
            app.router.add_route("*", "/logout", self._logout)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        # Keep the port, so a restarted provider keeps its issuer URL (and `iss`).
        self._port = runner.addresses[0][1]
        self._issuer = f"http://127.0.0.1:{self._port}"
        if self._server is None:
            self._server = self._authorization_server()
        self.metadata()  # fails here if discovery would not validate
        return self._issuer

    async def stop(self) -> None:
        self._released.set()  # let held requests finish, or the runner waits for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpenIDProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def metadata(self) -> dict[str, Any]:
        issuer = self.issuer
        document: dict[str, Any] = {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks",
            "revocation_endpoint": f"{issuer}/revoke",
            "scopes_supported": list(SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["sub", "name", "roles", "team", "region"],
        }
        if self._end_session:
            document["end_session_endpoint"] = f"{issuer}/logout"
        OpenIDProviderMetadata(document).validate(
            metadata_classes=[rpinitiated.OpenIDProviderMetadata]
        )
        AuthorizationServerMetadata(document).validate()  # RFC 8414: the PKCE and RFC 7009 parts
        return document

    def _authorization_server(self) -> _Server:
        server = _Server(self.stores)
        server.register_token_generator("default", _AccessTokens(self))
        server.register_grant(_CodeGrant, [_PKCE(required=True), _IDTokens(self)])
        server.register_grant(_RefreshGrant)
        server.register_endpoint(_Revocation(server))
        server.register_endpoint(_EndSession(self))
        return server

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(request.path)
        return await handler(request)

    async def _oauth_request(self, request: web.Request) -> _Request:
        form: MultiDict[str] = MultiDict()
        if request.method == "POST":
            posted: MultiDictProxy[Any] = await request.post()
            form.extend((name, value) for name, value in posted.items() if isinstance(value, str))
        return _Request(request, form)

    @property
    def _oauth(self) -> _Server:
        if self._server is None:
            raise RuntimeError("OpenIDProvider not started")
        return self._server

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(self.metadata())

    async def _jwks(self, request: web.Request) -> web.Response:
        headers = {"Cache-Control": self.jwks_cache_control} if self.jwks_cache_control else None
        return web.json_response(self.public_keys().as_dict(private=False), headers=headers)

    async def _authorize(self, request: web.Request) -> web.Response:
        oauth = await self._oauth_request(request)
        # The login page: the browser names the user; an unknown one is denied (access_denied).
        user = self.stores.users.get(oauth.payload.data.get("login_hint", ""))
        try:
            grant = self._oauth.get_consent_grant(oauth, end_user=user)
        except OAuth2Error as error:
            response: web.Response = self._oauth.handle_error_response(oauth, error)
            return response
        # The consent page, approved on the user's behalf.
        approved: web.Response = self._oauth.create_authorization_response(
            oauth, grant_user=user, grant=grant
        )
        return approved

    async def _token(self, request: web.Request) -> web.Response:
        await self._released.wait()
        if self._token_fault is not None:
            status, headers = self._token_fault
            return web.Response(
                status=status,
                text="<html>Bad gateway</html>",
                content_type="text/html",
                headers=headers,
            )
        response: web.Response = self._oauth.create_token_response(
            await self._oauth_request(request)
        )
        return response

    async def _revoke(self, request: web.Request) -> web.Response:
        response: web.Response = self._oauth.create_endpoint_response(
            "revocation", await self._oauth_request(request)
        )
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        response: web.Response | None = self._oauth.create_endpoint_response(
            "end_session", await self._oauth_request(request)
        )
        return response or web.Response(text="signed out")
