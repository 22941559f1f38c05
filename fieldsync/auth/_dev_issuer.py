"""A development OpenID provider for the demo and the tests: discovery, a JWKS, and a password
grant token endpoint, serving loopback only.

It signs RFC 9068 access tokens with one RSA (RS256) and one EC P-256 (ES256) key, both generated
at start-up and never written anywhere. It is not an identity provider: passwords are compared
in plain text and there are no refresh tokens, clients or consent. It refuses to bind anything
but a loopback address so it cannot end up serving a real network by mistake.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from joserfc import jws
from joserfc.jwk import ECKey, Key, RSAKey

from fieldsync.auth._oidc import is_loopback_host

__all__ = ["DevIssuer", "DevUser"]

_ALGORITHMS = ("RS256", "ES256")
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
                "grant_types_supported": ["password"],
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

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = form.get("grant_type")
        if grant_type != "password":
            return _oauth_error("unsupported_grant_type", "only the password grant is supported")
        username, password = form.get("username"), form.get("password")
        user = self._users.get(username) if isinstance(username, str) else None
        if (
            user is None
            or not isinstance(password, str)
            or not hmac.compare_digest(password.encode(), user.password.encode())
        ):
            return _oauth_error("invalid_grant", "unknown user or wrong password")
        ttl = self._token_ttl
        return web.json_response(
            {
                "access_token": self.issue(user.subject, ttl=ttl),
                "token_type": "Bearer",
                "expires_in": ttl,
            },
            headers=_NO_STORE,
        )


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
