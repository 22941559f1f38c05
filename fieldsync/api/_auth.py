"""Auth helpers for the apps (DESIGN.md §5, §6): how to sign in, and a token endpoint to sign in and
refresh through.

`GET /v1/auth/config` gives an app what it needs to run the authorization-code flow with PKCE
(RFC 6749 §4.1, RFC 7636) at the organisation's OpenID provider. `POST /v1/auth/token` relays that
flow's token requests, the code exchange with its `code_verifier` and the refreshes (RFC 6749 §6),
to the provider's token endpoint, and turns the provider's answers into fieldsync's error
vocabulary: a grant the provider refuses means "sign in again" (401 `reauthenticate`), a provider
that does not answer means "try again later" (503 `idp_unavailable` with Retry-After), so that an
outage never signs anybody out.

fieldsync keeps nothing it relays: tokens and codes live for one request and never reach a log.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web

from fieldsync.api._problems import problem
from fieldsync.errors import ErrorCode
from fieldsync.rates import PerKey

__all__ = ["AuthHelpers", "Provider"]

log = logging.getLogger("fieldsync.api.auth")

CONFIG_PATH = "/v1/auth/config"
TOKEN_PATH = "/v1/auth/token"

# A token request carries a code or a refresh token and a few short parameters; refresh tokens are
# at most a few KiB (Entra ID's are the largest). Anything bigger is not a token request.
_MAX_REQUEST_BYTES = 16 * 1024
_MAX_REQUEST_FIELDS = 16
# A token response holds an access token, a refresh token and an ID token.
_MAX_RESPONSE_BYTES = 256 * 1024

# Seconds an app waits after a 503, unless the provider asked for something else within bounds.
_RETRY_AFTER = 5
_MAX_RETRY_AFTER = 300
_DELAY_SECONDS = re.compile(r"[0-9]{1,9}")

_FORM = "application/x-www-form-urlencoded"
# RFC 6749 §5.1: token responses must not be cached; errors of the same endpoint neither.
_NO_STORE: Mapping[str, str] = MappingProxyType({"Cache-Control": "no-store", "Pragma": "no-cache"})

# RFC 7636 §4.1: 43 to 128 unreserved characters.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
# RFC 6749 §5.2: the syntax of an `error` value (bounded here, since it is relayed and logged).
_OAUTH_ERROR = re.compile(r"[\x20\x21\x23-\x5B\x5D-\x7E]{1,64}")

# Provider errors that only a new sign-in resolves: RFC 6749 §5.2 `invalid_grant` (the code or the
# refresh token is invalid, expired, revoked, or the PKCE verifier does not match it, RFC 7636
# §4.6), and the OpenID Connect Core §3.1.2.6 errors that Entra ID also answers on refresh when a
# policy demands an interactive sign-in.
_SIGN_IN_AGAIN = frozenset(
    {"invalid_grant", "interaction_required", "login_required", "consent_required"}
)

# What is relayed per grant: (required, optional) parameters besides grant_type and client_id.
# The code exchange must carry a PKCE verifier (RFC 7636 §4.5): this endpoint serves public
# clients, and a code without its verifier is what PKCE exists to make useless. Anything else the
# app sends is dropped, as a token endpoint ignores parameters it does not know (RFC 6749 §3.1):
# a public client has no secret to forward (RFC 6749 §2.1), and no other grant is relayed.
_GRANTS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = MappingProxyType(
    {
        "authorization_code": (frozenset({"code", "code_verifier"}), frozenset({"redirect_uri"})),
        "refresh_token": (frozenset({"refresh_token"}), frozenset({"scope"})),
    }
)


class Provider(Protocol):
    """What the helpers need of the OpenID provider: its issuer and the endpoints its discovery
    document names (`fieldsync.auth.TokenVerifier`, once started)."""

    @property
    def issuer(self) -> str: ...

    def endpoint(self, name: str) -> str | None: ...


class _BadRequest(Exception):
    """A token request fieldsync does not relay; `error` is its RFC 6749 §5.2 name."""

    def __init__(self, detail: str, error: str = "invalid_request") -> None:
        super().__init__(detail)
        self.detail = detail
        self.error = error


class AuthHelpers:
    """`GET /v1/auth/config` and `POST /v1/auth/token`. Add `lifecycle` to the application's
    `cleanup_ctx` after the token verifier's start: it reads the provider's endpoints then, and
    holds the one HTTP client session the token relay uses."""

    def __init__(
        self,
        provider: Provider,
        *,
        client_id: str,
        scopes: str,
        public_url: str = "",
        timeout: float = 10.0,
        rate: float = 10.0,
        burst: float = 60.0,
    ) -> None:
        self._provider = provider
        # Per client address: a flood of token requests reaches neither the provider nor the
        # relay's session (sign-ins and refreshes of a whole depot behind one address fit).
        self._limits = PerKey(rate, burst)
        self._client_id = client_id
        self._scopes = scopes.split()
        self._public_url = public_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._token_endpoint: str | None = None
        self._endpoints: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.get(CONFIG_PATH, self.config), web.post(TOKEN_PATH, self.token)]

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        # Raises (and so stops the server at start) when the token endpoint is missing or is not
        # https: codes and refresh tokens are sent there.
        self._token_endpoint = self._provider.endpoint("token_endpoint")
        if self._token_endpoint is None:
            raise ValueError("the OpenID provider's discovery document names no token_endpoint")
        for name in ("authorization_endpoint", "end_session_endpoint", "revocation_endpoint"):
            url = self._provider.endpoint(name)
            if url is not None:
                self._endpoints[name] = url
        if "authorization_endpoint" not in self._endpoints:
            log.warning(
                "the OpenID provider names no authorization_endpoint: apps cannot start the "
                "authorization-code flow that GET /v1/auth/config describes"
            )
        # No cookie jar: the session is shared by every user's requests, and a cookie the
        # provider sets for one must never travel with another's.
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar()
        )
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    async def config(self, request: web.Request) -> web.Response:
        """What an app needs to start the authorization-code flow with PKCE. The token endpoint
        is fieldsync's relay, so the app never talks to the provider's token endpoint directly."""
        body: dict[str, Any] = {
            "issuer": self._provider.issuer,
            **self._endpoints,
            "token_endpoint": self._base_url(request) + TOKEN_PATH,
            "client_id": self._client_id,
            "scopes": self._scopes,
            # S256 only (RFC 7636 §4.2, §7.2; RFC 9700 §2.1.1): `plain` protects nothing against
            # an attacker who can read the authorization request.
            "code_challenge_methods_supported": ["S256"],
        }
        return web.json_response(body, headers={"Cache-Control": "no-cache"})

    async def token(self, request: web.Request) -> web.Response:
        """Relay one token request; the answer is the provider's JSON, or a problem document
        whose `error` member carries the RFC 6749 §5.2 name for OAuth client libraries."""
        wait = self._limits.take(request.remote or "")
        if wait:
            log.info("token request refused: rate limited")
            response = problem(
                ErrorCode.RATE_LIMITED,
                f"too many token requests from this address: try again in {wait} s",
                error="slow_down",
            )
            response.headers["Retry-After"] = str(wait)
            return _no_store(response)
        try:
            upstream = self._upstream_form(await _read_form(request))
        except _BadRequest as bad:
            log.info("token request refused: %s", bad.error)
            return _no_store(problem(ErrorCode.PROTOCOL_ERROR, bad.detail, error=bad.error))
        grant = upstream["grant_type"]
        try:
            status, retry_after, body = await self._post(upstream)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp's client errors describe the connection (host, port, OS error), never the
            # request body: safe to log.
            log.warning("token endpoint unreachable (%s grant): %r", grant, exc)
            return _unavailable(None)
        return self._answer(grant, status, retry_after, body)

    def _base_url(self, request: web.Request) -> str:
        # Behind a reverse proxy the request's own URL may name an internal host or plain http;
        # `public_url` says what the apps reach.
        return self._public_url or str(request.url.origin())

    def _upstream_form(self, params: Mapping[str, str]) -> dict[str, str]:
        grant = params.get("grant_type")
        if grant is None:
            raise _BadRequest("grant_type is missing")
        if grant not in _GRANTS:
            raise _BadRequest(
                "only the authorization_code and refresh_token grants are relayed",
                "unsupported_grant_type",
            )
        required, optional = _GRANTS[grant]
        missing = sorted(required - params.keys())
        if missing:
            raise _BadRequest(f"missing for the {grant} grant: {', '.join(missing)}")
        # RFC 6749 §3.2.1: a public client names itself. The relay serves fieldsync's apps only,
        # not any client of the provider that would like an open proxy to it.
        client_id = params.get("client_id", self._client_id)
        if client_id != self._client_id:
            raise _BadRequest("this endpoint relays for the fieldsync apps only", "invalid_client")
        verifier = params.get("code_verifier")
        if verifier is not None and not _CODE_VERIFIER.fullmatch(verifier):
            raise _BadRequest("code_verifier is not an RFC 7636 verifier")
        form = {"grant_type": grant, "client_id": client_id}
        form.update((name, params[name]) for name in sorted(required | optional) if name in params)
        return form

    async def _post(self, form: Mapping[str, str]) -> tuple[int, str | None, bytes | None]:
        if self._session is None or self._token_endpoint is None:
            raise RuntimeError("AuthHelpers.lifecycle has not started")
        # Never follow a redirect: a token endpoint that answers 3xx is misconfigured or
        # compromised, and following it would hand the code or refresh token to whatever it names.
        async with self._session.post(
            self._token_endpoint,
            data=form,  # application/x-www-form-urlencoded, UTF-8 (RFC 6749 Appendix B)
            headers={"Accept": "application/json"},
            allow_redirects=False,
        ) as response:
            body = await _read_limited(response.content, _MAX_RESPONSE_BYTES)
            return response.status, response.headers.get("Retry-After"), body

    def _answer(
        self, grant: str, status: int, retry_after: str | None, body: bytes | None
    ) -> web.Response:
        document = _json_object(body)
        if status == 200 and document is not None and isinstance(document.get("access_token"), str):
            log.info("token endpoint granted a %s request", grant)
            # The provider's own bytes: fieldsync adds nothing to and takes nothing from what the
            # app's OAuth library expects.
            return web.Response(body=body, content_type="application/json", headers=_NO_STORE)
        error = document.get("error") if document is not None and status in (400, 401) else None
        if isinstance(error, str) and _OAUTH_ERROR.fullmatch(error):
            if error in _SIGN_IN_AGAIN:
                log.info("token endpoint refused a %s request: %s", grant, error)
                return _no_store(
                    problem(
                        ErrorCode.REAUTHENTICATE,
                        "the identity provider refused the grant: sign in again",
                        error=error,
                    )
                )
            # invalid_client, unauthorized_client, invalid_scope…: a configuration mismatch
            # between fieldsync, the app and the provider that signing in again will not fix.
            log.warning("token endpoint refused a %s request: %s", grant, error)
            return _no_store(
                problem(
                    ErrorCode.PROTOCOL_ERROR,
                    "the identity provider refused the request",
                    error=error,
                )
            )
        # 5xx, 429, a redirect, an HTML error page from a gateway, a truncated or oversized body:
        # the provider is not answering as a token endpoint, which is an outage, not a refusal.
        log.warning("token endpoint gave no usable answer to a %s request: HTTP %d", grant, status)
        return _unavailable(retry_after)


async def _read_form(request: web.Request) -> dict[str, str]:
    """The request's form parameters; RFC 6749 §3.1/§3.2 rules: parameters without a value are
    omitted, none may appear twice."""
    if request.content_type != _FORM:
        raise _BadRequest(f"send the parameters as {_FORM} (RFC 6749 §4.1.3, §6)")
    if request.content_length is not None and request.content_length > _MAX_REQUEST_BYTES:
        raise _BadRequest("request body too large")
    body = await _read_limited(request.content, _MAX_REQUEST_BYTES)
    if body is None:
        raise _BadRequest("request body too large")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=False,
            errors="strict",
            max_num_fields=_MAX_REQUEST_FIELDS,
        )
    except ValueError:  # UnicodeDecodeError included: RFC 6749 Appendix B says UTF-8
        raise _BadRequest("request body is not a UTF-8 form of at most 16 fields") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise _BadRequest(f"parameter {name[:32]!r} given more than once")
        params[name] = value
    return params


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None once it exceeds `limit` bytes (the rest is not read)."""
    body = bytearray()
    async for chunk in stream.iter_chunked(8192):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _json_object(body: bytes | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _retry_after(value: str | None) -> int:
    """The provider's Retry-After when it is delay-seconds (RFC 9110 §10.2.3) within bounds."""
    if value is not None and _DELAY_SECONDS.fullmatch(value.strip()):
        return min(max(int(value), 1), _MAX_RETRY_AFTER)
    return _RETRY_AFTER


def _unavailable(retry_after: str | None) -> web.Response:
    response = problem(
        ErrorCode.IDP_UNAVAILABLE,
        "the identity provider did not answer: keep the refresh token and try again later",
    )
    response.headers["Retry-After"] = str(_retry_after(retry_after))
    return _no_store(response)


def _no_store(response: web.Response) -> web.Response:
    response.headers.update(_NO_STORE)
    return response
