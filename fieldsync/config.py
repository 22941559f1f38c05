"""Settings: defaults, overridden by a TOML file, overridden by `FIELDSYNC_*` environment variables.

Every setting is declared once in `SETTINGS`; the README's configuration reference is checked
against that list by the tests. A bad value stops the server at start with a message naming it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class ConfigError(Exception):
    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"configuration: {setting}: {message}")
        self.setting = setting


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # TOML key; the environment variable is FIELDSYNC_<NAME>
    default: Any
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return f"FIELDSYNC_{self.name.upper()}"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0-65535")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _url(text: str) -> str:
    if not text:
        return ""
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("must be an http(s) URL")
    return text.rstrip("/")


def _database_url(text: str) -> str:
    """A libpq connection URI; its password, if any, is never repeated in a message."""
    if text and urlparse(text).scheme not in ("postgresql", "postgres"):
        raise ValueError("must be empty or a postgresql:// URL")
    return text


def _redis_url(text: str) -> str:
    if text and urlparse(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be empty or a redis:// URL")
    return text


def _name(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _scopes(text: str) -> str:
    """RFC 6749 §3.3: space-separated scope tokens of printable ASCII without `"` and `\\`."""
    scopes = text.split()
    if not scopes:
        raise ValueError("must name at least one scope")
    for scope in scopes:
        if any(not 0x21 <= ord(c) <= 0x7E or c in '"\\' for c in scope):
            raise ValueError(f"{scope!r} is not an OAuth scope")
    return " ".join(scopes)


def _versions(text: str) -> dict[str, str]:
    """'ios=2.4.0,android=2.3.1' -> {'ios': '2.4.0', 'android': '2.3.1'}"""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        platform, sep, version = item.partition("=")
        if not sep or not platform.strip() or not version.strip():
            raise ValueError("expected platform=version pairs separated by commas")
        result[platform.strip()] = version.strip()
    return result


def _upgrade_urls(text: str) -> dict[str, str]:
    """'ios=https://apps.apple.com/app/id1,android=https://play.google.com/...' per platform."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        platform, sep, url = item.partition("=")
        if not sep or not platform.strip() or not url.strip():
            raise ValueError("expected platform=URL pairs separated by commas")
        result[platform.strip()] = _url(url.strip())
    return result


def _origins(text: str) -> frozenset[str]:
    """'https://app.example.com, capacitor://localhost' -> origins as browsers send them
    (RFC 6454 §6.2: lower case, no path, no default port), so they compare as strings. The
    opaque origin `null` cannot be listed: every sandboxed page anywhere sends it."""
    result = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        parsed = urlparse(item.lower())
        if not parsed.scheme or not parsed.hostname:
            raise ValueError(f"{item!r} is not an origin: scheme://host[:port]")
        if parsed.path.strip("/") or parsed.query or parsed.fragment or "@" in parsed.netloc:
            raise ValueError(f"{item!r} is not an origin: scheme://host[:port] only")
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        port = parsed.port  # ValueError when it is not a port number
        default = {"http": 80, "https": 443}.get(parsed.scheme)
        suffix = f":{port}" if port not in (None, default) else ""
        result.add(f"{parsed.scheme}://{host}{suffix}")
    return frozenset(result)


@dataclass(frozen=True, slots=True)
class Deprecation:
    """A path prefix scheduled for removal: `Deprecation` (RFC 9745) and `Sunset` (RFC 8594)."""

    since: datetime
    sunset: datetime


def _moment(text: str) -> datetime:
    """An ISO 8601 date or date-time, UTC unless it names an offset."""
    moment = datetime.fromisoformat(text.strip())
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _deprecations(text: str) -> dict[str, Deprecation]:
    """'/v1/old=2027-06-30' (the sunset; deprecated from now on) or
    '/v1/old=2026-01-01/2027-06-30' (an ISO 8601 interval: deprecated since, then sunset)."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        prefix, sep, dates = item.partition("=")
        prefix = prefix.strip()
        if not sep or not prefix.startswith("/") or not dates.strip():
            raise ValueError("expected /path=sunset or /path=deprecated/sunset, comma-separated")
        start, _, end = dates.rpartition("/")
        sunset = _moment(end)
        if start:
            since = _moment(start)
            if sunset < since:
                raise ValueError(f"{prefix}: the sunset comes before the deprecation")
        else:
            # RFC 9745 §2.1 wants the moment deprecation took effect; without one, the server's
            # start is the earliest this server knows of (and never later than the sunset).
            since = min(datetime.now(UTC).replace(microsecond=0), sunset)
        result[prefix.rstrip("/") or "/"] = Deprecation(since, sunset)
    return result


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _listen(text: str) -> str:
    """'127.0.0.1:9464' or '[::1]:9464' (empty: no listener)."""
    if not text.strip():
        return ""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host.strip("[]"):
        raise ValueError("expected host:port")
    _port(port)
    return text.strip()


def listen_address(text: str) -> tuple[str, int]:
    """A `_listen` value as (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# The attachment types fieldsync can recognise from their bytes (`fieldsync.attachments._media`,
# which holds their magic numbers); `attachment_types` chooses among them.
ATTACHMENT_TYPES = ("image/jpeg", "image/png", "image/webp", "application/pdf")


def _attachment_types(text: str) -> frozenset[str]:
    """'image/jpeg, image/png' -> the allow-list; each must be one fieldsync recognises."""
    types = frozenset(filter(None, (part.strip().lower() for part in text.split(","))))
    if not types:
        raise ValueError("must name at least one type")
    unknown = sorted(types - set(ATTACHMENT_TYPES))
    if unknown:
        raise ValueError(f"unknown types {unknown}; known: {', '.join(ATTACHMENT_TYPES)}")
    return types


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", _name, "address to listen on"),
    Setting("port", 8080, _port, "port to listen on (0: any free port)"),
    Setting("data_dir", "data", _name, "folder for the SQLite database and attachments"),
    Setting(
        "database_url",
        "",
        _database_url,
        "PostgreSQL URL for cluster mode, postgresql://user:password@host/db (empty: SQLite)",
    ),
    Setting(
        "redis_url",
        "",
        _redis_url,
        "Redis URL for cluster mode's commit hints between nodes, redis://host:6379/0 (empty: "
        "nodes poll the feed)",
    ),
    Setting(
        "redis_channel",
        "fieldsync:hints",
        _name,
        "Redis pub/sub channel of the commit hints (one per cluster sharing a Redis)",
    ),
    Setting(
        "feed_poll",
        2.0,
        _positive_float,
        "cluster mode: seconds between reads of the change feed when no hint arrives",
    ),
    Setting(
        "views_refresh",
        5.0,
        _positive_float,
        "seconds between recomputations of the dashboards' live views without a commit",
    ),
    Setting("node_id", "", str, "this node's id in a cluster (empty: a random one at each start)"),
    Setting(
        "node_url",
        "",
        _url,
        "where the other nodes reach this node's cluster listener (empty: its address)",
    ),
    Setting(
        "cluster_listen",
        "",
        _listen,
        "host:port of the node-to-node listener in cluster mode (empty: `host`, any free port)",
    ),
    Setting(
        "cluster_secret",
        "",
        str,
        "secret the cluster's nodes authenticate each other with; required with database_url",
    ),
    Setting(
        "lease_ttl",
        10.0,
        _positive_float,
        "seconds a node's lease on a document outlives its last renewal (every third of it)",
    ),
    Setting("oidc_issuer", "", _url, "OpenID issuer URL; its discovery document and JWKS are used"),
    Setting("oidc_audience", "fieldsync", _name, "required `aud` of access tokens"),
    Setting("oidc_client_id", "fieldsync-app", _name, "client id of the apps at the provider"),
    Setting("oidc_scopes", "openid profile offline_access", _scopes, "scopes the apps ask for"),
    Setting("oidc_timeout", 10.0, _positive_float, "seconds to wait for the token endpoint"),
    Setting("token_rate", 10.0, _positive_float, "token relay requests per second per address"),
    Setting("token_burst", 60.0, _positive_float, "token relay request burst per address"),
    Setting("public_url", "", _url, "fieldsync's external base URL (empty: from the request)"),
    Setting("roles_claim", "roles", _name, "claim path of the roles (e.g. realm_access.roles)"),
    Setting("team_claim", "team", _name, "claim path of the team"),
    Setting("region_claim", "region", _name, "claim path of the region"),
    Setting("name_claim", "name", _name, "claim path of the display name"),
    Setting("token_leeway", 60, int, "seconds of clock skew allowed on exp/nbf/iat"),
    Setting("min_client_versions", {}, _versions, "e.g. ios=2.4.0,android=2.3.1,web=1.0.0"),
    Setting("upgrade_urls", {}, _upgrade_urls, "where each platform's app is upgraded"),
    Setting("deprecations", {}, _deprecations, "path prefix=sunset date, e.g. /v1/old=2027-06-30"),
    Setting("allowed_origins", frozenset(), _origins, "browser origins allowed on WebSockets"),
    Setting("policy", "", str, "access policy TOML file (empty: the shipped policy)"),
    Setting("form_templates", "", str, "folder of form templates (empty: the shipped ones)"),
    Setting("max_frame", 1 << 20, _positive_int, "largest WebSocket message accepted (bytes)"),
    Setting("max_body", 8 << 20, _positive_int, "largest frame body after zstd (bytes)"),
    Setting("max_doc_bytes", 16 << 20, _positive_int, "largest stored document (bytes)"),
    Setting("rate", 5000.0, _positive_float, "messages per second per connection"),
    Setting("burst", 20000.0, _positive_float, "message burst allowed per connection"),
    Setting("auth_timeout", 10.0, _positive_float, "seconds a socket may take to authenticate"),
    Setting(
        "max_sockets_per_subject",
        20,
        _positive_int,
        "WebSockets one token subject may hold open at once (4429 beyond)",
    ),
    Setting(
        "header_timeout",
        15.0,
        _positive_float,
        "seconds a connection may take to send a complete request head (and may stay idle)",
    ),
    Setting(
        "max_queued",
        32 << 20,
        _positive_int,
        "bytes of live updates waiting for a socket that reads slower (dropped beyond; resyncs)",
    ),
    Setting(
        "refusal_rate",
        20.0,
        _positive_float,
        "refused writes per second a connection may cost, past 5 s worth (its next message waits)",
    ),
    Setting("changes_page", 500, _positive_int, "documents per `changes` page"),
    Setting("max_offline_days", 30.0, _positive_float, "offline contract: days before a reset"),
    Setting("idle_seconds", 30.0, _positive_float, "unload a document idle this long"),
    Setting("max_rooms", 10000, _positive_int, "documents kept in memory at most"),
    Setting("compact_after", 500, _positive_int, "log rows per document before compaction"),
    Setting("attachment_max_bytes", 32 << 20, _positive_int, "largest attachment upload (bytes)"),
    Setting(
        "attachment_types",
        frozenset({"image/jpeg", "image/png", "application/pdf"}),
        _attachment_types,
        "attachment types accepted, as read from the bytes",
    ),
    Setting("attachment_max_pixels", 64_000_000, _positive_int, "largest image accepted (pixels)"),
    Setting("thumbnail_memory", 64 << 20, _positive_int, "memory a thumbnail may take (bytes)"),
    Setting("upload_expiry_hours", 24.0, _positive_float, "unfinished uploads kept this long idle"),
    Setting(
        "reference_retention_days",
        30.0,
        _positive_float,
        "days of reference data change history kept; older `since` gets 410 resync_required",
    ),
    Setting("reference_page", 1000, _positive_int, "row changes per reference `changes` page"),
    Setting("reference_import_chunk", 2000, _positive_int, "rows per reference import commit"),
    Setting("adapters", "", str, "adapters TOML file, [adapters.<name>] tables (empty: none)"),
    Setting(
        "outbox_retention_days",
        7.0,
        _positive_float,
        "days delivered and skipped outbox entries are kept (for replay)",
    ),
    Setting("log_level", "INFO", _name, "DEBUG, INFO, WARNING or ERROR"),
    Setting("log_format", "text", _log_format, "text (for a terminal) or json (one object a line)"),
    Setting(
        "metrics_token",
        "",
        str,
        "bearer token Prometheus sends for /metrics on the main listener (empty: refused there)",
    ),
    Setting(
        "metrics_listen",
        "",
        _listen,
        "host:port of a separate listener serving /metrics without a token (empty: none)",
    ),
    Setting(
        "drain_seconds",
        20.0,
        _positive_float,
        "on SIGTERM, seconds to finish commits and deliveries before exiting",
    ),
)


@dataclass(frozen=True)
class Settings:
    values: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def data_path(self) -> Path:
        return Path(self.values["data_dir"])

    @classmethod
    def load(
        cls,
        toml_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        environ = os.environ if environ is None else environ
        from_file: dict[str, Any] = {}
        if toml_path is not None:
            try:
                from_file = tomllib.loads(toml_path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(str(toml_path), str(exc)) from None
        known = {s.name for s in SETTINGS}
        for key in from_file:
            if key not in known:
                raise ConfigError(key, f"unknown setting in {toml_path}")
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.name in overrides:
                values[setting.name] = overrides[setting.name]
                continue
            raw: Any = setting.default
            source = None
            if setting.env in environ:
                raw, source = environ[setting.env], setting.env
            elif setting.name in from_file:
                raw, source = from_file[setting.name], setting.name
            if source is not None:
                try:
                    raw = setting.parse(raw if isinstance(raw, str) else _toml_text(raw))
                except (ValueError, TypeError) as exc:
                    raise ConfigError(source, f"{exc} (got {raw!r})") from None
            values[setting.name] = raw
        if values["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level", "must be DEBUG, INFO, WARNING or ERROR")
        return cls(values)


def _toml_text(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
