"""Access-token verification against an OpenID provider: discovery, a cached JWKS, the checks of
RFC 8725 (JWT best current practice) and RFC 9068 (JWT access tokens), and claims → `Principal`.

Every refusal is an `AuthError`: `token_expired` only when the token is genuine and merely old
(the client refreshes and retries), `reauthenticate` for everything else. Messages name the check
that failed and never echo the token or any value read from it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import JWKRegistry, Key

from fieldsync.auth._principal import Principal, Role
from fieldsync.errors import AuthError, ErrorCode

__all__ = ["ClaimMapping", "TokenVerifier", "bearer_token", "is_loopback_host"]

log = logging.getLogger("fieldsync.auth")

# Asymmetric JWS algorithms and the key each needs: (kty, crv or None). RFC 8725 §3.1: the
# verifier fixes the algorithms it accepts and never lets the token choose its own. `none` and
# the HMAC family are absent on purpose: a JWKS holds public keys, and a public key used as an
# HMAC secret is the classic algorithm-confusion forgery.
_ASYMMETRIC: Mapping[str, tuple[str, str | None]] = MappingProxyType(
    {
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "ES256": ("EC", "P-256"),
        "ES384": ("EC", "P-384"),
        "ES512": ("EC", "P-521"),
        "EdDSA": ("OKP", None),  # RFC 8037; deprecated by RFC 9864 for the two below
        "Ed25519": ("OKP", "Ed25519"),
        "Ed448": ("OKP", "Ed448"),
    }
)

# RFC 9068 §2.1 types access tokens `at+jwt` (RFC 7515 §4.1.9: the `application/` prefix may be
# omitted; compared case-insensitively). RFC 9068 §4 would have us refuse anything else, but most
# providers (Keycloak, Entra ID, Auth0 by default) still type access tokens `JWT` or not at all,
# so those are accepted too. Other types (`dpop+jwt`, `logout+jwt`…) are refused (RFC 8725
# §3.11/§3.12). What keeps an ID token out is then the audience: see TokenVerifier.
_ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt", "jwt", "application/jwt"})

# Bounds on untrusted input: a real access token is a few KiB; a JWKS a few dozen KiB.
_MAX_TOKEN_CHARS = 16 * 1024
_MAX_DOCUMENT_BYTES = 1024 * 1024
_MIN_RSA_BITS = 2048  # RFC 7518 §3.3: RS*/PS* keys MUST be 2048 bits or larger
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)

# RFC 6750 §2.1: `Bearer` 1*SP b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

# The roles a token may carry: every role but `service`, which is for adapters inside the server
# only, so a token that claims it (a misconfigured IdP, a forged claim) gains nothing.
_TOKEN_ROLES = frozenset(r.value for r in Role if r is not Role.SERVICE)
_DEFAULT_ROLE_NAMES: Mapping[str, str] = MappingProxyType({r: r for r in sorted(_TOKEN_ROLES)})


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 7235
    §2.1), or None when the header is absent, uses another scheme, or is not a b64token."""
    if not authorization_header:
        return None
    scheme, _, rest = authorization_header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = rest.strip(" ")
    return token if _B64TOKEN.fullmatch(token) else None


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine only: `localhost`, 127.0.0.0/8 or ::1."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClaimMapping:
    """Where the identity provider puts what fieldsync needs.

    Each field is a claim path whose dots descend into objects (Keycloak: `realm_access.roles`).
    The roles claim may be a JSON list or a space- or comma-separated string; `role_names` maps
    the provider's role names to `Role` values, and roles it does not name are ignored.
    """

    roles: str = "roles"
    team: str = "team"
    region: str = "region"
    name: str = "name"
    role_names: Mapping[str, str] = field(default_factory=lambda: _DEFAULT_ROLE_NAMES)

    def __post_init__(self) -> None:
        unknown = sorted(v for v in self.role_names.values() if v not in _TOKEN_ROLES)
        if unknown:
            raise ValueError(f"role_names maps to roles no token may carry: {unknown}")
        # A read-only copy, so a caller mutating its dict cannot change a live mapping.
        object.__setattr__(self, "role_names", MappingProxyType(dict(self.role_names)))

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        """The principal of verified `claims` (whose `sub` and `exp` were already checked)."""
        return Principal(
            subject=str(claims["sub"]),
            roles=self._roles(_claim(claims, self.roles)),
            team=_string(_claim(claims, self.team)),
            region=_string(_claim(claims, self.region)),
            name=_string(_claim(claims, self.name)),
            expires_at=float(claims["exp"]),
        )

    def _roles(self, value: object) -> frozenset[Role]:
        if isinstance(value, str):
            names: list[object] = list(value.replace(",", " ").split())
        elif isinstance(value, list):
            names = value
        else:
            return frozenset()
        return frozenset(
            Role(self.role_names[n]) for n in names if isinstance(n, str) and n in self.role_names
        )


_DEFAULT_MAPPING = ClaimMapping()


def _claim(claims: Mapping[str, Any], path: str) -> object:
    value: object = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class _VerificationKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own `alg`, when the provider pins one
    key: Key  # a joserfc key holding the public key

    def fits(self, alg: str) -> bool:
        """RFC 8725 §3.1: a key verifies only the algorithm family it was made for (and exactly
        its own `alg` when the JWK names one), so a token cannot pick a weaker interpretation."""
        kty, crv = _ASYMMETRIC[alg]
        return (
            self.kty == kty
            and (crv is None or self.crv == crv)
            and (self.alg is None or self.alg == alg)
        )


def _reauthenticate(message: str) -> NoReturn:
    # `from None`: the JOSE library's exceptions may carry what was decoded of the token; keep
    # it out of tracebacks.
    raise AuthError(ErrorCode.REAUTHENTICATE, message) from None


class TokenVerifier:
    """Verifies access tokens of one OpenID provider for one audience.

    `start()` reads the provider's discovery document and its JWKS, then reads the JWKS again
    on a schedule: when the provider's `Cache-Control: max-age` says (RFC 9111 §5.2.2.1), never
    sooner than `jwks_min_age` seconds nor later than `jwks_max_age`, so a key the provider
    withdraws stops verifying tokens within `jwks_max_age` at most. `verify()` needs the
    network only when a token names a key it has not seen (key rotation), at most once per
    `jwks_cooldown` seconds. While the provider is unreachable the cached keys keep working.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        claims: ClaimMapping = _DEFAULT_MAPPING,
        *,
        algorithms: Sequence[str] = ("RS256", "ES256"),
        leeway: int = 60,
        jwks_cooldown: float = 30.0,
        jwks_min_age: float = 60.0,
        jwks_max_age: float = 3600.0,
    ) -> None:
        refused = [a for a in algorithms if a not in _ASYMMETRIC]
        if refused:
            # RFC 8725 §3.1/§3.2: `none` and shared-secret algorithms have no place in verifying
            # a provider's tokens; refusing the configuration beats silently ignoring it.
            raise ValueError(f"algorithms not allowed (asymmetric only): {refused}")
        if not algorithms:
            raise ValueError("at least one algorithm is required")
        _require_secure_url(issuer, "issuer")
        if leeway < 0 or jwks_cooldown < 0:
            raise ValueError("leeway and jwks_cooldown must not be negative")
        if not 0 < jwks_min_age <= jwks_max_age:
            raise ValueError("jwks_min_age must be positive and at most jwks_max_age")
        self._issuer = issuer
        self._audience = audience
        self._mapping = claims
        self._algorithms = frozenset(algorithms)
        self._leeway = leeway
        self._cooldown = jwks_cooldown
        # RFC 8725 §3.8/§3.9: the issuer must match exactly and the audience must name us; exp,
        # nbf and iat are NumericDates (finite numbers) within the leeway of the time of each
        # check.
        self._claims = jwt.JWTClaimsRegistry(
            leeway=leeway,
            iss={"essential": True, "value": issuer},
            sub={"essential": True},
            aud={"essential": True, "values": [audience]},
            exp={"essential": True},
        )
        self._min_age = jwks_min_age
        self._max_age = jwks_max_age
        self._scheduled: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._jwks_uri: str | None = None
        self._metadata: Mapping[str, Any] | None = None  # the discovery document
        self._keys: tuple[_VerificationKey, ...] = ()
        self._refresh_lock = asyncio.Lock()
        self._next_refresh = 0.0  # monotonic time before which unknown kids fetch nothing

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def audience(self) -> str:
        return self._audience

    def endpoint(self, name: str) -> str | None:
        """The URL the discovery document read by `start()` gives for `name` (`token_endpoint`,
        `end_session_endpoint`…; OpenID Connect Discovery §3), or None when it names none. Held
        to the same rule as the JWKS (https, http only on loopback): fieldsync sends
        authorization codes and refresh tokens there."""
        if self._metadata is None:
            raise RuntimeError("TokenVerifier not started")
        url = self._metadata.get(name)
        if url is None:
            return None
        if not isinstance(url, str):
            raise ValueError(f"discovery document: {name} is not a URL")
        _require_secure_url(url, name)
        return url

    async def start(self) -> None:
        """Read the discovery document and the JWKS; raises if the provider is unreachable or
        its discovery document names another issuer."""
        if self._session is not None:
            raise RuntimeError("TokenVerifier already started")
        self._session = aiohttp.ClientSession(timeout=_HTTP_TIMEOUT)
        try:
            config, _ = await self._get_json(
                self._issuer.rstrip("/") + "/.well-known/openid-configuration"
            )
            # OpenID Connect Discovery §4.3: the `issuer` must be identical to the one asked for,
            # or a provider could vouch for tokens in another's name.
            if config.get("issuer") != self._issuer:
                raise ValueError("discovery document names a different issuer")
            jwks_uri = config.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise ValueError("discovery document has no jwks_uri")
            _require_secure_url(jwks_uri, "jwks_uri")
            self._jwks_uri = jwks_uri
            self._metadata = MappingProxyType(config)
            fresh_for = await self._fetch_jwks()
        except BaseException:
            await self.close()
            raise
        self._scheduled = asyncio.create_task(self._refresh_on_schedule(fresh_for))

    async def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduled
            self._scheduled = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> TokenVerifier:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def verify(self, token: str) -> Principal:
        """The principal of a valid access token; raises `AuthError` otherwise."""
        if len(token) > _MAX_TOKEN_CHARS:
            _reauthenticate("token too large")
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            _reauthenticate("token algorithm not allowed")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
            _reauthenticate("token type not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            _reauthenticate("token key id malformed")
        # `jku`, `x5u`, `jwk` and `x5c` are never consulted (RFC 8725 §3.10 warns against
        # fetching or trusting keys a token points at): keys come only from the provider's JWKS.
        key = await self._key_for(kid, alg)
        return self._check(token, header, key)

    def _check(self, token: str, header: dict[str, Any], key: _VerificationKey) -> Principal:
        alg = header["alg"]
        try:
            # Only the algorithm already checked against the allow-list and the key (RFC 8725
            # §3.1): the library never chooses another.
            decoded = jwt.decode(token, key.key, algorithms=[alg])
        except BadSignatureError:
            _reauthenticate("token signature invalid")
        except (JoseError, ValueError, TypeError, RecursionError):
            _reauthenticate("token malformed")
        if dict(decoded.header) != header:
            # The key was chosen from our own reading of the header; joserfc must have read the
            # same one, or a parser difference could pair a key with another algorithm.
            _reauthenticate("token header malformed")
        claims = decoded.claims
        missing = [claim for claim in _REQUIRED_CLAIMS if claims.get(claim) is None]
        if missing:
            _reauthenticate(f"token claim missing: {', '.join(missing)}")
        # joserfc checks claims in the token's order; `exp` goes last, so that `token_expired`
        # is only said of a token that a refresh would fix (not of one for another audience).
        ordered = dict(sorted(claims.items(), key=lambda item: item[0] == "exp"))
        try:
            self._claims.validate(ordered)
        except ExpiredTokenError:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "token expired") from None
        except MissingClaimError:
            _reauthenticate("token claim missing")
        except InvalidClaimError as error:
            name = error.claim
            if name in ("nbf", "iat") and _numeric_date(claims.get(name)):
                _reauthenticate("token not yet valid")  # a number, but later than now + leeway
            _reauthenticate(_CLAIM_MESSAGES.get(name, "token claim invalid"))
        except JoseError:
            _reauthenticate("token claim invalid")
        # Whatever the library's version checks: a subject is a string, and an expiry a finite
        # number (JSON `NaN` or `1e999` would never expire).
        if not isinstance(claims["sub"], str):
            _reauthenticate("token subject invalid")
        if not _numeric_date(claims["exp"]):
            _reauthenticate("token expiry invalid")
        return self._mapping.principal(claims)

    async def _key_for(self, kid: str | None, alg: str) -> _VerificationKey:
        key, known = self._find(kid, alg)
        if not known and await self._refresh_for(kid, alg):
            key, known = self._find(kid, alg)
        if not known:
            _reauthenticate("token signing key unknown")
        if key is None and kid is None:
            _reauthenticate("token names no key and several fit its algorithm")
        if key is None:
            _reauthenticate("token signing key does not fit its algorithm")
        return key

    def _find(self, kid: str | None, alg: str) -> tuple[_VerificationKey | None, bool]:
        """(the key to verify with, whether the key id is known at all)."""
        if kid is None:
            # No kid: acceptable only when exactly one published key fits the algorithm.
            fitting = [k for k in self._keys if k.fits(alg)]
            return (fitting[0] if len(fitting) == 1 else None), bool(fitting)
        named = [k for k in self._keys if k.kid == kid]
        return next((k for k in named if k.fits(alg)), None), bool(named)

    async def _refresh_for(self, kid: str | None, alg: str) -> bool:
        """Refetch the JWKS for a key id we do not know, unless one was fetched within the
        cooldown: a flood of tokens with invented kids must not become a flood of requests to the
        provider. Returns whether a fetch happened (here or in a concurrent caller)."""
        async with self._refresh_lock:
            if self._find(kid, alg)[1]:
                return True  # a concurrent caller fetched it while we waited
            now = time.monotonic()
            if now < self._next_refresh:
                return False
            # Set before fetching, so a failing provider is also asked only once per cooldown.
            self._next_refresh = now + self._cooldown
            try:
                await self._fetch_jwks()
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                log.warning(
                    "JWKS refresh from %s failed, keeping cached keys: %r", self._jwks_uri, error
                )
                return False
            return True

    async def _refresh_on_schedule(self, fresh_for: float) -> None:
        """Read the JWKS again whenever the copy held goes stale, so that a key the provider
        withdrew (rotated out, or compromised) stops verifying tokens: without this, only a
        token naming an unknown kid would ever make us read the JWKS again."""
        while True:
            await asyncio.sleep(fresh_for)
            async with self._refresh_lock:
                try:
                    fresh_for = await self._fetch_jwks()
                except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                    log.warning(
                        "JWKS refresh from %s failed, keeping cached keys: %r",
                        self._jwks_uri,
                        error,
                    )
                    fresh_for = self._min_age

    async def _fetch_jwks(self) -> float:
        """Fetch and install the provider's keys; returns how long they stay fresh."""
        if self._jwks_uri is None:
            raise RuntimeError("TokenVerifier not started")
        document, headers = await self._get_json(self._jwks_uri)
        raw_keys = document.get("keys")
        if not isinstance(raw_keys, list):
            raise ValueError("JWKS has no keys list")
        keys = tuple(k for k in map(_import_key, raw_keys) if k is not None)
        if not keys:
            # Keep what we have: an empty or unusable set is likelier a provider fault than a
            # deliberate revocation of every key.
            raise ValueError("JWKS holds no usable signing key")
        self._keys = keys
        return freshness(headers, self._min_age, self._max_age)

    async def _get_json(self, url: str) -> tuple[dict[str, Any], Mapping[str, str]]:
        """The JSON object at `url`, and the answer's headers."""
        if self._session is None:
            raise RuntimeError("TokenVerifier not started")
        async with self._session.get(url, headers={"Accept": "application/json"}) as response:
            response.raise_for_status()
            headers = response.headers
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES:
                    raise ValueError(f"document at {url} too large")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError(f"document at {url} is not a JSON object")
        return document, headers


# Keys kept this long when the provider's JWKS answer says nothing of its freshness (Keycloak,
# for one): long enough to cost the provider nothing, short enough to drop a withdrawn key soon.
_DEFAULT_JWKS_AGE = 300.0

_MAX_AGE = re.compile(r'max-age\s*=\s*"?(\d+)"?')


def freshness(headers: Mapping[str, str], floor: float, ceiling: float) -> float:
    """Seconds a JWKS answer stays fresh, by its `Cache-Control` (RFC 9111 §5.2.2: `max-age`
    less the `Age` it already has; `no-cache` and `no-store` mean at once), within [floor,
    ceiling]: a provider asking for a refetch every second or every year gets neither."""
    directives = [d.strip().lower() for d in headers.get("Cache-Control", "").split(",")]
    age: float = _DEFAULT_JWKS_AGE
    if "no-cache" in directives or "no-store" in directives:
        age = 0.0
    else:
        found = next(filter(None, (_MAX_AGE.fullmatch(d) for d in directives)), None)
        if found is not None:
            already = headers.get("Age", "0").strip()
            age = int(found.group(1)) - (int(already) if already.isdigit() else 0)
    return min(max(age, floor), ceiling)


# RFC 9068 §2.2 requires these (and more: client_id, iat, jti, which we do not need); `exp` above
# all, so that no token lives forever.
_REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp")

_CLAIM_MESSAGES = {
    "iss": "token issuer not accepted",
    "aud": "token audience not accepted",
    "sub": "token subject invalid",
    "exp": "token expiry invalid",
    "nbf": "token not-before invalid",
    "iat": "token issued-at invalid",
}


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, read only to pick the key; nothing in it is trusted yet."""
    # Compact JWS only (three segments): a JWE or JSON serialisation is not an access token here.
    if token.count(".") != 2:
        _reauthenticate("token malformed")
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: JSON nested too deep
        _reauthenticate("token header malformed")
    if not isinstance(header, dict):
        _reauthenticate("token header malformed")
    return header


def _import_key(jwk: object) -> _VerificationKey | None:
    """A published key we may verify with, or None (logged) for anything else: symmetric keys,
    encryption keys, weak RSA keys, key types we do not know."""
    if not isinstance(jwk, dict):
        return None
    kty, kid, alg, use = jwk.get("kty"), jwk.get("kid"), jwk.get("alg"), jwk.get("use")
    if kty not in {"RSA", "EC", "OKP"}:
        log.info("JWKS key %r skipped: key type %r", kid, kty)
        return None
    if use not in (None, "sig") or (alg is not None and alg not in _ASYMMETRIC):
        log.info("JWKS key %r skipped: use %r, alg %r", kid, use, alg)
        return None
    if (kid is not None and not isinstance(kid, str)) or (
        isinstance(alg, str) and _ASYMMETRIC[alg][0] != kty
    ):
        log.info("JWKS key %r skipped: inconsistent kid or alg", kid)
        return None
    # Only the public members: a provider that leaks private ones must not make us sign-capable.
    public = {k: v for k, v in jwk.items() if k not in {"d", "p", "q", "dp", "dq", "qi", "oth"}}
    try:
        key = JWKRegistry.import_key(public)
        if key.is_private:
            raise ValueError("not a public key")
        size = getattr(key.raw_value, "key_size", None)
        if kty == "RSA" and (size is None or size < _MIN_RSA_BITS):
            log.info("JWKS key %r skipped: RSA key shorter than %d bits", kid, _MIN_RSA_BITS)
            return None
    except (JoseError, ValueError, TypeError, KeyError) as error:
        log.info("JWKS key %r skipped: %r", kid, error)
        return None
    crv = jwk.get("crv")
    return _VerificationKey(
        kid=kid, kty=kty, crv=crv if isinstance(crv, str) else None, alg=alg, key=key
    )


def _numeric_date(value: object) -> bool:
    """RFC 7519 §2: a JSON number, finite (JSON `NaN` or `1e999` would never expire)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _require_secure_url(url: str, what: str) -> None:
    """OpenID Connect Discovery requires https; plain http is allowed only on loopback (the
    development issuer), where nobody on the network can substitute keys."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return
    raise ValueError(f"{what} must be an https URL (http only on loopback): {url}")
