"""A development OpenID provider for the demo and the tests: discovery, a JWKS, a login page with
the authorization-code flow and PKCE (RFC 6749 §4.1, RFC 7636, S256 only), refresh tokens,
revocation (RFC 7009), and a password grant, serving loopback only.

It signs RFC 9068 access tokens with one RSA (RS256) and one EC P-256 (ES256) key, both generated
at start-up and never written anywhere. It is not an identity provider: passwords are compared
in plain text, codes and refresh tokens live in memory, any client id is taken (public clients,
no consent) and redirects go to loopback addresses only. It refuses to bind anything but a
loopback address so it cannot end up serving a real network by mistake.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from joserfc import jws
from joserfc.jwk import ECKey, Key, RSAKey

from fieldsync.auth._oidc import is_loopback_host

__all__ = ["DevIssuer", "DevUser"]

_ALGORITHMS = ("RS256", "ES256")
_CODE_TTL = 60.0  # seconds an authorization code may wait for its exchange (RFC 6749 §4.1.2)
_REFRESH_TTL = 8 * 3600.0  # seconds a refresh token lives (rotated at each use)
_CLIENT_ID = "fieldsync-dev"


@dataclass(frozen=True, slots=True)
class DevUser:
    subject: str
    roles: tuple[str, ...]
    team: str | None = None
    region: str | None = None
    name: str | None = None
    password: str = "demo"


def _generate_keys() -> dict[str, Key]:
    """A fresh signing key per algorithm; the kid is the RFC 7638 thumbprint, so it changes
    with the key and rotation always publishes new kids. `alg` and `use` pin each key to its
    one purpose (RFC 8725 §3.1), in the JWKS too."""
    return {
        "RS256": RSAKey.generate_key(2048, {"alg": "RS256", "use": "sig"}, auto_kid=True),
        "ES256": ECKey.generate_key("P-256", {"alg": "ES256", "use": "sig"}, auto_kid=True),
    }


class DevIssuer:
    """A loopback-only OpenID provider: `await start()` returns its issuer URL."""

    def __init__(
        self,
        users: Mapping[str, DevUser],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        audience: str = "fieldsync",
        token_ttl: int = 3600,
    ) -> None:
        if not is_loopback_host(host):
            raise ValueError(
                f"DevIssuer serves loopback only (127.0.0.0/8, ::1, localhost), not {host!r}"
            )
        # `localhost` may resolve to both ::1 and 127.0.0.1, and port 0 would then bind two
        # different ports; one concrete address gives one issuer URL.
        self._host = "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")
        self._port = port
        self._users = dict(users)
        self._audience = audience
        self._token_ttl = token_ttl
        self._keys = _generate_keys()
        self._runner: web.AppRunner | None = None
        self._issuer: str | None = None
        self._jwks_requests = 0
        self._codes: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}

    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise RuntimeError("DevIssuer not started")
        return self._issuer

    @property
    def audience(self) -> str:
        return self._audience

    @property
    def jwks_requests(self) -> int:
        """How many times `/jwks` was served: lets tests prove a verifier's refetch limits."""
        return self._jwks_requests

    def kid(self, alg: str = "RS256") -> str:
        """The key id currently signing `alg` tokens."""
        return str(self._key(alg).kid)

    async def start(self) -> str:
        if self._runner is not None:
            raise RuntimeError("DevIssuer already started")
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/token", self._token)
        app.router.add_get("/authorize", self._login_page)
        app.router.add_post("/authorize", self._login)
        app.router.add_post("/revoke", self._revoke)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        # Keep the port across stop()/start(), so a restarted issuer keeps its URL (and `iss`).
        self._port = port
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._issuer = f"http://{host}:{port}"
        return self._issuer

    async def stop(self) -> None:
        """Stop serving; `issue()` keeps working and `issuer` keeps its value."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DevIssuer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def rotate_keys(self) -> None:
        """Replace both signing keys; the old ones are no longer published."""
        self._keys = _generate_keys()

    def issue(
        self,
        subject: str,
        *,
        ttl: int | None = None,
        alg: str = "RS256",
        claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign an RFC 9068 access token for `subject` (a DevUser's claims when one has that
        subject). `claims` and `headers` override or add members; a None value removes one, which
        is how tests craft tokens that must be refused."""
        key = self._key(alg)
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self._audience,
            "client_id": _CLIENT_ID,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "nbf": now,
            "exp": now + (self._token_ttl if ttl is None else ttl),
        }
        user = next((u for u in self._users.values() if u.subject == subject), None)
        if user is not None:
            payload.update(
                roles=list(user.roles), team=user.team, region=user.region, name=user.name
            )
        header: dict[str, Any] = {"alg": alg, "typ": "at+jwt", "kid": key.kid}
        _merge(payload, claims)
        _merge(header, headers)
        body = json.dumps(payload, separators=(",", ":")).encode()
        return jws.serialize_compact(header, body, key, algorithms=[alg])

    def _key(self, alg: str) -> Key:
        try:
            return self._keys[alg]
        except KeyError:
            raise ValueError(f"DevIssuer signs {', '.join(_ALGORITHMS)} only, not {alg}") from None

    async def _discovery(self, request: web.Request) -> web.Response:
        issuer = self.issuer
        return web.json_response(
            {
                "issuer": issuer,
                "jwks_uri": f"{issuer}/jwks",
                "token_endpoint": f"{issuer}/token",
                "authorization_endpoint": f"{issuer}/authorize",
                "revocation_endpoint": f"{issuer}/revoke",
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "grant_types_supported": ["authorization_code", "refresh_token", "password"],
                "token_endpoint_auth_methods_supported": ["none"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": list(_ALGORITHMS),
                "claims_supported": ["sub", "name", "roles", "team", "region"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self._jwks_requests += 1
        keys = [key.as_dict(private=False) for key in self._keys.values()]
        return web.json_response({"keys": keys})

    def _check_password(self, username: object, password: object) -> DevUser | None:
        user = self._users.get(username) if isinstance(username, str) else None
        if (
            user is None
            or not isinstance(password, str)
            or not hmac.compare_digest(password.encode(), user.password.encode())
        ):
            return None
        return user

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange_code(form)
        if grant_type == "refresh_token":
            return self._exchange_refresh(form)
        if grant_type != "password":
            return _oauth_error("unsupported_grant_type", f"{str(grant_type)[:40]} is not offered")
        user = self._check_password(form.get("username"), form.get("password"))
        if user is None:
            return _oauth_error("invalid_grant", "unknown user or wrong password")
        return self._tokens(_Grant(user.subject, _CLIENT_ID, "", "", 0.0), refresh=False)

    def _tokens(self, grant: _Grant, *, refresh: bool = True) -> web.Response:
        ttl = self._token_ttl
        body: dict[str, Any] = {
            "access_token": self.issue(grant.subject, ttl=ttl, claims={"client_id": grant.client}),
            "token_type": "Bearer",
            "expires_in": ttl,
        }
        if refresh:
            token = secrets.token_urlsafe(32)
            self._refresh[token] = _Grant(
                grant.subject, grant.client, "", "", time.monotonic() + _REFRESH_TTL
            )
            body["refresh_token"] = token
            # An OpenID ID token for the app (its audience is the app, not the API).
            body["id_token"] = self.issue(
                grant.subject, ttl=ttl, claims={"aud": grant.client}, headers={"typ": "JWT"}
            )
        return web.json_response(body, headers=_NO_STORE)

    def _exchange_code(self, form: Mapping[str, Any]) -> web.Response:
        code, verifier = form.get("code"), form.get("code_verifier")
        grant = self._codes.pop(code, None) if isinstance(code, str) else None  # used once
        if grant is None or grant.expires < time.monotonic():
            return _oauth_error("invalid_grant", "unknown, used or expired code")
        if form.get("client_id") != grant.client or form.get("redirect_uri") != grant.redirect:
            return _oauth_error("invalid_grant", "the code was issued to another client")
        # RFC 7636 §4.6: BASE64URL(SHA256(verifier)) must be the challenge the code was bound to.
        if not isinstance(verifier, str) or not hmac.compare_digest(
            _s256(verifier), grant.challenge
        ):
            return _oauth_error("invalid_grant", "the code_verifier does not match")
        return self._tokens(grant)

    def _exchange_refresh(self, form: Mapping[str, Any]) -> web.Response:
        token = form.get("refresh_token")
        grant = self._refresh.pop(token, None) if isinstance(token, str) else None  # rotated
        if grant is None or grant.expires < time.monotonic():
            return _oauth_error("invalid_grant", "unknown, revoked or expired refresh token")
        if form.get("client_id") not in (None, grant.client):
            return _oauth_error("invalid_grant", "the refresh token was issued to another client")
        return self._tokens(grant)

    async def _revoke(self, request: web.Request) -> web.Response:
        """RFC 7009: the token is forgotten; an unknown one is answered alike (200)."""
        form = await request.post()
        token = form.get("token")
        if isinstance(token, str):
            self._refresh.pop(token, None)
        return web.Response(status=200, headers=_NO_STORE)

    def _authorization(self, query: Mapping[str, Any]) -> tuple[dict[str, str], str | None]:
        """The authorization request's parameters, and what is wrong with them (None: fine)."""
        wanted = ("client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method")
        params = {name: str(query.get(name, ""))[:512] for name in (*wanted, "response_type")}
        if params["response_type"] != "code":
            return params, "response_type must be code"
        if not params["client_id"]:
            return params, "client_id is required"
        redirect = urlsplit(params["redirect_uri"])
        if redirect.scheme not in ("http", "https") or not is_loopback_host(
            redirect.hostname or ""
        ):
            return params, "redirect_uri must be an http(s) address on loopback"
        if params["code_challenge_method"] != "S256" or len(params["code_challenge"]) != 43:
            return params, "PKCE with code_challenge_method S256 is required"
        return params, None

    async def _login_page(self, request: web.Request) -> web.Response:
        params, wrong = self._authorization(request.query)
        if wrong is not None:
            # An invalid redirect is never followed (RFC 6749 §4.1.2.1): say it here.
            return web.Response(status=400, text=wrong)
        return _login_form(params, None)

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        params, wrong = self._authorization(form)
        if wrong is not None:
            return web.Response(status=400, text=wrong)
        user = self._check_password(form.get("username"), form.get("password"))
        if user is None:
            return _login_form(params, "Unknown user or wrong password.", status=401)
        code = secrets.token_urlsafe(32)
        self._codes[code] = _Grant(
            user.subject,
            params["client_id"],
            params["redirect_uri"],
            params["code_challenge"],
            time.monotonic() + _CODE_TTL,
        )
        answer = {"code": code, "iss": self.issuer}  # RFC 9207: the issuer names itself
        if params["state"]:
            answer["state"] = params["state"]
        separator = "&" if "?" in params["redirect_uri"] else "?"
        raise web.HTTPFound(params["redirect_uri"] + separator + urlencode(answer))


@dataclass(frozen=True, slots=True)
class _Grant:
    """What a code or a refresh token stands for: who signed in, for which client, where the
    code goes back to and its PKCE challenge, and until when (monotonic seconds)."""

    subject: str
    client: str
    redirect: str
    challenge: str
    expires: float


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _login_form(params: Mapping[str, str], error: str | None, status: int = 200) -> web.Response:
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
        for name, value in params.items()
    )
    problem = f'<p role="alert" class="error">{html.escape(error)}</p>' if error else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in: fieldsync development issuer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;max-width:22rem;margin:4rem auto;color:#111}}
label{{display:block;margin:.8rem 0 .2rem}}input[type=text],input[type=password]{{width:100%;
padding:.5rem;font-size:1rem;box-sizing:border-box}}button{{margin-top:1rem;padding:.5rem 1.2rem;
font-size:1rem;background:#0b57d0;color:#fff;border:0;border-radius:4px}}
.error{{color:#a50e0e;font-weight:600}}</style></head>
<body><main><h1>Sign in</h1><p>fieldsync development issuer (loopback only)</p>{problem}
<form method="post" action="authorize">{hidden}
<label for="username">User</label><input type="text" id="username" name="username"
 autocomplete="username" required autofocus>
<label for="password">Password</label><input type="password" id="password" name="password"
 autocomplete="current-password" required>
<button type="submit">Sign in</button></form></main></body></html>"""
    # No script at all; the form posts here, and the redirect after it leaves for the app (a
    # `form-action` directive would block that redirect in Chromium).
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
        "X-Frame-Options": "DENY",
    }
    return web.Response(text=page, content_type="text/html", status=status, headers=headers)


# RFC 6749 §5.1: token responses must not be cached.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(error: str, description: str) -> web.Response:
    """An RFC 6749 §5.2 error response."""
    return web.json_response(
        {"error": error, "error_description": description}, status=400, headers=_NO_STORE
    )


def _merge(target: dict[str, Any], changes: Mapping[str, Any] | None) -> None:
    for name, value in (changes or {}).items():
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
