"""billing-service: the write model of traffic billing (README.md is the contract).

It pulls windows of cumulative per-user byte counters from xray-exporters, or
takes the snapshots they push, turns them into per-minute deltas, rates them and
writes replay-safe facts to PostgreSQL. Six sections, each using only those
above it: config, exporter client, repository (all SQL), billing core (pure),
HTTP routes, collector. gunicorn serves ``app``, built on first access.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import re
import ssl
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import flask
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import requests
import urllib3
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

UTC = timezone.utc
MINUTE = timedelta(minutes=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---- config: environment variables, validated strictly at startup ----------

class ConfigError(ValueError):
    """A startup error; the message names the variable (never its secret value)."""


class Secrets:
    """Every string that must never leave the process; rotated token files add to it."""

    def __init__(self, values=()):
        self._lock, self._values = threading.Lock(), ()
        for value in values:
            self.add(value)

    def add(self, value: str) -> None:
        if value and len(value) >= 4:  # shorter ones would blank ordinary words
            with self._lock:
                self._values = tuple(sorted({*self._values, value}, key=len, reverse=True))

    def redact(self, text: str, limit: int | None = None) -> str:
        # Cut only after redacting: a cut secret could no longer be recognised.
        for value in self._values:
            text = text.replace(value, "***")
        return text if limit is None else text[:limit]

    def scrub(self, value):
        # Before JSON encoding: an escaped quote or backslash would hide a secret from redact.
        if isinstance(value, dict):
            return {key: self.scrub(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub(item) for item in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self.redact(str(value))


MIN_TOKEN_LENGTH = 16  # a shorter secret cannot be told apart from ordinary text, so it cannot be redacted


class Token:
    """A bearer token: a fixed value, or a file re-read whenever it changes (rotation)."""

    def __init__(self, value: str, path: str, secrets: Secrets):
        self.path, self._value, self._stamp, self._secrets = path, value, None, secrets

    def get(self) -> str:
        """The current token; ValueError (with a message safe to show) when unusable."""
        if self.path:
            try:
                stat = os.stat(self.path)
                if (stat.st_mtime_ns, stat.st_size, stat.st_ino) != self._stamp:
                    with open(self.path, encoding="utf-8") as handle:
                        value = handle.read().strip()
                    self._secrets.add(value)
                    self._value, self._stamp = value, (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            except (OSError, UnicodeDecodeError):
                raise ValueError("token_file is not readable") from None
        if len(self._value) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token is shorter than {MIN_TOKEN_LENGTH} characters")
        return self._value


@dataclass(frozen=True)
class Source:
    source_id: str
    mode: str = "pull"  # pull: we fetch windows from base_url; push: the exporter posts snapshots
    base_url: str = ""
    expected_node_id: str = ""
    expected_env: str = ""
    enabled: bool = True
    first_sight: str = "bill"  # bill: a new series bills its whole counter; baseline: see README
    timeout_seconds: float = 15.0
    token_file: str = ""
    token_env: str = ""
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""
    allow_plain_http: bool = False


_SOURCE_FIELDS = {f.name for f in dataclasses.fields(Source)}
_PUSH_FIELDS = {"source_id", "mode", "expected_node_id", "expected_env", "enabled", "first_sight", "token_file",
                "token_env"}


@dataclass(frozen=True)
class PeakHours:
    """PEAK_HOURS in PEAK_TIMEZONE as minutes of the local day: [start, end), wrapping midnight."""
    start: int
    end: int
    zone: ZoneInfo


@dataclass(frozen=True)
class Config:
    database_url: str
    service_token: str
    sources: tuple[Source, ...]
    tokens: dict  # source_id -> Token
    listen_addr: str  # gunicorn bind form, host:port
    collect_interval: float  # seconds; 0 = no background collector
    region: str
    source_revision: str
    price_per_byte: float
    initial_included_quota: int
    initial_balance: float
    image: str
    max_pages_per_run: int
    max_body_bytes: int  # largest exporter page or push body accepted
    peak: PeakHours | None
    suspend_after: float  # seconds in arrears before suspension; 0 = never
    secrets: Secrets
    warnings: tuple[str, ...] = ()
    tls: tuple[str, str, str] = ("", "", "")  # TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE ("": off)


DEFAULT_TIMEOUT_SECONDS = 15.0
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go-style duration ("90s", "1m30s", "2h") in seconds; "0"/"off" is 0."""
    text = text.strip()
    if text in ("0", "off"):
        return 0.0
    if not re.fullmatch(f"(?:{_DURATION_PART})+", text):
        raise ValueError(f"not a duration like 90s, 1m30s or 2h: {text!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in re.findall(_DURATION_PART, text))


def _env(environ, name: str, default: str | None = None) -> str | None:
    # Present but empty is an error: a templating slip must not become a default (a price of zero).
    raw = environ.get(name)
    if raw is None:
        return default
    if not raw.strip():
        raise ConfigError(f"{name} is set but empty (unset it to use the default)")
    return raw.strip()


def _number(environ, name: str, default, kind, minimum=None):
    raw = _env(environ, name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}: not a valid {'integer' if kind is int else 'number'}: {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {raw!r}")
    return value


def _duration(environ, name: str, default: str) -> float:
    try:
        return parse_duration(_env(environ, name, default))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _listen_addr(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"LISTEN_ADDR: expected [host]:port like :8081, got {raw!r}")
    return f"{host or '0.0.0.0'}:{int(port)}"


_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def _peak_hours(environ) -> PeakHours | None:
    name = _env(environ, "PEAK_TIMEZONE", "UTC")
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"PEAK_TIMEZONE: not an IANA time zone name: {name!r}") from None
    raw = environ.get("PEAK_HOURS", "").strip()  # unset or empty: peak pricing is off
    if not raw:
        return None
    match = _HHMM.fullmatch(raw)
    if not match or match.group(1, 2) == match.group(3, 4):
        raise ConfigError(f"PEAK_HOURS: expected HH:MM-HH:MM with two different times, got {raw!r}")
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    return PeakHours(h1 * 60 + m1, h2 * 60 + m2, zone)


def is_loopback_host(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _readable_file(where: str, name: str, path) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: {name} must be a non-empty path")
    try:
        open(path, "rb").close()
    except OSError as exc:
        raise ConfigError(f"{where}: {name} {path!r} is not readable ({exc.strerror})") from None
    return path


TLS_VARIABLES = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")


def _listener_tls(environ) -> tuple[str, str, str]:
    """The listener's certificate, key and client CA, loaded once here so that a
    wrong file stops start-up naming its variable, not the first handshake."""
    cert, key, client_ca = (_env(environ, name, "") for name in TLS_VARIABLES)
    if bool(cert) != bool(key):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE go together")
    if client_ca and not cert:
        raise ConfigError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
    for name, path in zip(TLS_VARIABLES, (cert, key, client_ca)):
        if path:
            _readable_file(name, "file", path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for names, load in (("TLS_CERT_FILE/TLS_KEY_FILE", lambda: cert and context.load_cert_chain(cert, key)),
                        ("TLS_CLIENT_CA_FILE", lambda: client_ca and context.load_verify_locations(client_ca))):
        try:
            load()
        except ssl.SSLError as exc:
            raise ConfigError(f"{names}: not usable as PEM ({exc.reason or exc})") from None
    return cert, key, client_ca


def _parse_source(raw, index: int, environ, warnings: list) -> Source:
    where = f"EXPORTER_SOURCES_JSON: source #{index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    source_id = raw.get("source_id")
    if not isinstance(source_id, str) or not source_id.strip():
        raise ConfigError(f"{where}: source_id is required (a non-empty string)")
    where = f"EXPORTER_SOURCES_JSON: source {source_id!r}"
    mode = raw.get("mode", "pull")
    if mode not in ("pull", "push"):
        raise ConfigError(f"{where}: mode must be \"pull\" or \"push\"")
    unknown = sorted(set(raw) - (_PUSH_FIELDS if mode == "push" else _SOURCE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) for a {mode} source: {', '.join(unknown)}")
    values = {"source_id": source_id, "mode": mode}
    for name in ("base_url", "expected_node_id", "expected_env", "first_sight"):
        value = raw.get(name, "bill" if name == "first_sight" else "")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string")
        values[name] = value.strip()
    if values["first_sight"] not in ("bill", "baseline"):
        raise ConfigError(f"{where}: first_sight must be \"bill\" or \"baseline\"")
    for name in ("enabled", "allow_plain_http"):
        value = raw.get(name, name == "enabled")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false")
        values[name] = value
    if "token_file" in raw and "token_env" in raw:
        raise ConfigError(f"{where}: set token_file or token_env, not both")
    if "token_file" in raw:
        values["token_file"] = _readable_file(where, "token_file", raw["token_file"])
    if "token_env" in raw:
        name = raw["token_env"]
        if not isinstance(name, str) or not name or not environ.get(name, "").strip():
            raise ConfigError(f"{where}: token_env: environment variable {name} is unset or empty")
        values["token_env"] = name
    if mode == "push":
        if not values["expected_node_id"] or not values["expected_env"]:
            raise ConfigError(f"{where}: a push source needs expected_node_id and expected_env (its allowlist)")
        return Source(**values)

    timeout = raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
        raise ConfigError(f"{where}: timeout_seconds must be a number")
    values["timeout_seconds"] = float(timeout) if timeout > 0 else DEFAULT_TIMEOUT_SECONDS
    if not values["base_url"]:
        raise ConfigError(f"{where}: base_url is required")
    url = urlsplit(values["base_url"])
    try:
        host, _ = url.hostname, url.port
    except ValueError:
        raise ConfigError(f"{where}: base_url has an invalid port") from None
    if url.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{where}: base_url must be an http(s) URL with a host")
    if url.username is not None or url.password is not None:
        # Credentials in URLs end up in logs and proxies: use token_file/token_env.
        raise ConfigError(f"{where}: base_url must not carry credentials; use token_file or token_env")
    if url.query or url.fragment:
        raise ConfigError(f"{where}: base_url must not have a query or fragment")
    if url.scheme == "http" and not is_loopback_host(host):
        if not values["allow_plain_http"]:
            raise ConfigError(f"{where}: base_url uses plain http to a non-loopback host; use https "
                              "(or set allow_plain_http: true for a trusted private link)")
        warnings.append(f"source {source_id!r}: plain http to {host} (allow_plain_http): traffic is not encrypted")
    for name in ("ca_bundle", "client_cert", "client_key"):
        if name in raw:
            values[name] = _readable_file(where, name, raw[name])
    if values.get("client_key") and not values.get("client_cert"):
        raise ConfigError(f"{where}: client_key needs client_cert")
    return Source(**values)


def _parse_sources(environ, warnings: list) -> tuple[Source, ...]:
    raw_json = _env(environ, "EXPORTER_SOURCES_JSON")
    if raw_json is None:
        base_url = _env(environ, "EXPORTER_BASE_URL")
        if base_url is None:
            raise ConfigError("EXPORTER_SOURCES_JSON (or the legacy EXPORTER_BASE_URL) is required")
        return (_parse_source({"source_id": "default", "base_url": base_url}, 0, environ, warnings),)
    try:
        raw = json.loads(raw_json)
    except ValueError as exc:
        raise ConfigError(f"EXPORTER_SOURCES_JSON: invalid JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError("EXPORTER_SOURCES_JSON: must be a non-empty JSON array of sources")
    sources = tuple(_parse_source(item, i, environ, warnings) for i, item in enumerate(raw))
    ids = [s.source_id for s in sources]
    for source_id in {i for i in ids if ids.count(i) > 1}:
        raise ConfigError(f"EXPORTER_SOURCES_JSON: duplicate source_id {source_id!r}")
    return sources


def load_config(environ) -> Config:
    database_url = _env(environ, "DATABASE_URL")
    if database_url is None:
        raise ConfigError("DATABASE_URL is required")
    try:
        dsn_parts = psycopg2.extensions.parse_dsn(database_url)
    except psycopg2.Error:
        # libpq's message echoes the DSN, password included: do not pass it on.
        raise ConfigError("DATABASE_URL: not a valid PostgreSQL URL or key=value DSN") from None
    token = _env(environ, "INTERNAL_SERVICE_TOKEN")
    if token is None:
        raise ConfigError("INTERNAL_SERVICE_TOKEN is required")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"INTERNAL_SERVICE_TOKEN: must be at least {MIN_TOKEN_LENGTH} characters")
    secrets = Secrets([token, dsn_parts.get("password", "")])

    warnings: list[str] = []
    sources = _parse_sources(environ, warnings)
    tokens = {}
    for source in sources:
        value = environ[source.token_env].strip() if source.token_env else token
        secrets.add(value)
        tokens[source.source_id] = Token(value, source.token_file, secrets)
        try:
            tokens[source.source_id].get()
        except ValueError as exc:
            raise ConfigError(f"EXPORTER_SOURCES_JSON: source {source.source_id!r}: "
                              f"{source.token_env or 'token_file'}: {exc}") from None

    interval = _duration(environ, "COLLECT_INTERVAL", "1m")
    if 0 < interval < 1:
        raise ConfigError("COLLECT_INTERVAL: must be 0/off or at least 1s")
    return Config(
        database_url=database_url, service_token=token, sources=sources, tokens=tokens,
        listen_addr=_listen_addr(_env(environ, "LISTEN_ADDR", ":8081")), collect_interval=interval,
        region=environ.get("DEFAULT_REGION", ""),  # verbatim: it is part of every bucket's key
        source_revision=_env(environ, "SOURCE_REVISION", "billing-service-v1"),
        price_per_byte=_number(environ, "PRICE_PER_BYTE", 0.0, float, minimum=0),
        initial_included_quota=_number(environ, "INITIAL_INCLUDED_QUOTA_BYTES", 0, int, minimum=0),
        initial_balance=_number(environ, "INITIAL_BALANCE", 0.0, float),
        image=environ.get("IMAGE", "").strip(), peak=_peak_hours(environ),
        max_pages_per_run=_number(environ, "MAX_PAGES_PER_RUN", 10000, int, minimum=1),
        max_body_bytes=_number(environ, "MAX_BODY_BYTES", 16 * 1024 * 1024, int, minimum=65536),
        suspend_after=_duration(environ, "ARREARS_SUSPEND_THRESHOLD", "336h"),
        secrets=secrets, warnings=tuple(warnings), tls=_listener_tls(environ))


_log = logging.getLogger("billing_service")
if not _log.handlers:  # the message alone: each one is a JSON line (log_event)
    _log.addHandler(logging.StreamHandler(sys.stderr))
    _log.setLevel(logging.INFO)
    _log.propagate = False


def log_event(secrets: Secrets, event: str, **fields) -> None:
    """One JSON line on stderr; every string in it is redacted before encoding."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    _log.info(json.dumps({"time": now, "event": event, **secrets.scrub(fields)}))


_COMMIT = re.compile(r"(?:sha-)?([0-9a-f]{40})")


def parse_image(image: str) -> dict:
    """Tag, commit and version of an image reference; empty where unknown."""
    reference = image.split("@", 1)[0]
    _, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:  # no tag, or the colon was a registry port
        tag = ""
    match = _COMMIT.fullmatch(tag)
    commit = match.group(1) if match else ""
    return {"image": image, "tag": tag, "commit": commit, "version": commit}


# ---- exporter client: pages and pushed snapshots, every byte treated as hostile --

class ExporterError(Exception):
    """A refused page or body (a pulled source fails for this run); the message is safe to show."""


class WrongNode(ExporterError):
    """A snapshot of a node this source (or push token) may not deliver."""


@dataclass(slots=True)
class Sample:
    account: str  # canonical lowercase UUID
    inbound_tag: str
    uplink: int
    downlink: int


@dataclass(slots=True)
class Snapshot:
    collected_at: datetime  # UTC, microsecond precision
    storage_node: str  # env:node_id, or node_id when env is empty
    samples: list
    source: Source | None = None  # who delivered it (its first_sight policy applies)


@dataclass
class Page:
    snapshots: list  # of Snapshot, in collected_at order
    has_more: bool = False
    next_cursor: str = ""
    invalid_samples: int = 0
    sample_count: int = 0


MAX_PAGE_LIMIT = 120  # snapshots per page, the exporter protocol's page size
PAGE_SAMPLE_TARGET = 50000  # samples per pulled page: bounds memory, amortizes per-page work
# A worker's memory: per process at most one parse (PARSE_SLOT) and one page being
# written (PAGE_SLOT; a push holds it from its parse on). json.loads costs up to
# ~190 bytes per JSON value (a nested one-key object; {} and [] take 25 times
# their text), and a body holds at most one value per comma or opening bracket,
# plus one: a parse stays under ~130 MB. Writing holds ~2.5 KB a sample: ~125 MB
# at the sample target; a page over it (one huge snapshot) is written holding
# both slots, so nothing is parsed beside it.
MAX_JSON_VALUES = 700_000
MAX_PAGE_SAMPLES = 100_000
PARSE_SLOT, PAGE_SLOT = threading.Lock(), threading.RLock()
MAX_COUNTER = 2**63 - 1
MAX_LABEL = 255
MAX_PUSH_AHEAD = timedelta(minutes=5)  # a pushed snapshot from further ahead would freeze its series
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# NUL and lone surrogates (JSON "\ud800"): no UTF-8 form, PostgreSQL and URLs cannot take them.
_UNENCODABLE = re.compile("[\x00\ud800-\udfff]")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))")


def parse_time(text) -> datetime | None:
    """RFC3339 (Z or offset, up to nanoseconds) as UTC, cut to microseconds as PostgreSQL stores it."""
    if not isinstance(text, str):
        return None
    match = _RFC3339.fullmatch(text)
    if not match:
        return None
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = match.groups()
    try:
        offset = UTC if zulu else timezone(
            (1 if sign == "+" else -1) * timedelta(hours=int(off_h), minutes=int(off_m)))
        stamp = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                         int((frac or "0")[:6].ljust(6, "0")), tzinfo=offset)
        return stamp.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


@functools.lru_cache(maxsize=4096)  # a page formats the same minutes over and over
def format_time(stamp: datetime | None) -> str | None:
    if stamp is None:
        return None
    stamp = stamp.astimezone(UTC)
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    if stamp.microsecond:
        text += f".{stamp.microsecond:06d}"
    return text + "Z"


def minute_floor(stamp: datetime) -> datetime:
    return stamp.replace(second=0, microsecond=0)


def storage_node(env: str, node_id: str) -> str:
    return f"{env}:{node_id}" if env else node_id


def parse_sample(raw) -> Sample | None:
    """One exporter sample, or None when it is invalid (skipped and counted)."""
    if type(raw) is not dict:
        return None
    up, down = raw.get("uplink_bytes_total"), raw.get("downlink_bytes_total")
    # type() rather than isinstance(): JSON true/false must not count as 1/0.
    if type(up) is not int or type(down) is not int or not (0 <= up <= MAX_COUNTER and 0 <= down <= MAX_COUNTER):
        return None
    if up + down > MAX_COUNTER:  # its bytes could never be stored as one bucket's total_bytes (BIGINT)
        return None
    account = raw.get("uuid")
    if type(account) is not str:
        return None
    if not _UUID.fullmatch(account):
        try:
            account = str(uuid.UUID(account))
        except ValueError:
            return None
    tag = raw.get("inbound_tag")
    if tag is None:
        tag = ""
    elif type(tag) is not str or len(tag) > MAX_LABEL or _UNENCODABLE.search(tag):
        return None
    return Sample(account, tag, up, down)


def _label(raw, what: str, default: str, node_part: bool = True) -> str:
    if raw is None:
        return default
    if not isinstance(raw, str) or len(raw) > MAX_LABEL or _UNENCODABLE.search(raw):
        raise ExporterError(f"malformed page: {what} is not a short string")
    if node_part and "#" in raw:  # "#" separates a series key's node from its inbound tag
        raise ExporterError(f"malformed page: {what} contains '#'")
    return raw


def decode_json(body: bytes, ndjson: bool = False):
    """json.loads (of each line, for NDJSON) within the memory budget (call it holding PARSE_SLOT)."""
    if body.count(b",") + body.count(b"[") + body.count(b"{") >= MAX_JSON_VALUES:
        raise ExporterError(f"body holds more than {MAX_JSON_VALUES} JSON values (the memory budget)")
    try:
        return [json.loads(line) for line in body.splitlines() if line.strip()] if ndjson else json.loads(body)
    except (ValueError, RecursionError):
        raise ExporterError("malformed page: body is not JSON") from None


def _list(doc: dict, key: str, what: str) -> list:
    value = doc.get(key)
    if value is not None and not isinstance(value, list):
        raise ExporterError(f"malformed page: {what} is not a list")
    return value or []


def _expects(source: Source, node_id: str, env: str) -> bool:
    return source.expected_node_id in ("", node_id) and source.expected_env in ("", env)


def _wrong_node(what: str, node_id: str, env: str, source: Source) -> WrongNode:
    return WrongNode(f"{what} of node_id '{node_id}' env '{env}' is not what this source expects "
                     f"('{source.expected_node_id}' env '{source.expected_env}')")


def parse_snapshot(page: Page, raw, sources, node_default: str = "", env_default: str = "") -> Snapshot:
    """Add one snapshot object to ``page``, delivered by the first of ``sources`` that
    expects its node and env. Snapshot-level faults raise; invalid samples are counted."""
    if not isinstance(raw, dict):
        raise ExporterError("malformed page: a snapshot is not an object")
    collected_at = parse_time(raw.get("collected_at"))
    if collected_at is None:
        raise ExporterError("malformed page: a snapshot has no valid RFC3339 collected_at")
    node_id = _label(raw.get("node_id"), "snapshot node_id", node_default)
    env = _label(raw.get("env"), "snapshot env", env_default)
    if not node_id:
        raise ExporterError("malformed page: a snapshot has no node_id")
    source = next((s for s in sources if _expects(s, node_id, env)), None)
    if source is None:
        raise _wrong_node("snapshot", node_id, env, sources[0])
    raw_samples = _list(raw, "samples", "a snapshot's samples")
    samples = [sample for sample in map(parse_sample, raw_samples) if sample is not None]
    page.snapshots.append(Snapshot(collected_at, storage_node(env, node_id), samples, source))
    page.invalid_samples += len(raw_samples) - len(samples)
    page.sample_count += len(raw_samples)
    if page.sample_count > MAX_PAGE_SAMPLES:
        raise ExporterError(f"page holds more than {MAX_PAGE_SAMPLES} samples (the memory budget)")
    return page.snapshots[-1]


def parse_page(body: bytes, source: Source, since: datetime, until: datetime) -> Page:
    """Validate one window page. Page-level faults raise; bad samples are counted."""
    with PARSE_SLOT:
        return _parse_page(decode_json(body), source, since, until)


def _parse_page(doc, source: Source, since: datetime, until: datetime) -> Page:
    if not isinstance(doc, dict):
        raise ExporterError("malformed page: body is not a JSON object")
    raw_snapshots = _list(doc, "snapshots", "snapshots")
    has_more = doc.get("has_more", False)
    if not isinstance(has_more, bool):
        raise ExporterError("malformed page: has_more is not a boolean")
    page = Page([], has_more, _label(doc.get("next_cursor"), "next_cursor", "", node_part=False))
    page_node, page_env = _label(doc.get("node_id"), "node_id", ""), _label(doc.get("env"), "env", "")
    if raw_snapshots and not _expects(source, page_node, page_env):
        # Real exporters leave the page-level identity empty only on empty pages.
        raise _wrong_node("page", page_node, page_env, source)
    for raw in raw_snapshots:
        snap = parse_snapshot(page, raw, [source], page_node, page_env)
        if not since <= snap.collected_at <= until:
            raise ExporterError(f"malformed page: snapshot at {format_time(snap.collected_at)} "
                                "is outside the requested window")
    page.snapshots.sort(key=lambda snap: snap.collected_at)
    return page


def parse_push(body: bytes, ndjson: bool, sources, now: datetime) -> Page:
    """A pushed body: one snapshot object, a JSON array of them, or NDJSON (one per line).
    Any snapshot-level fault refuses the whole body."""
    with PARSE_SLOT:
        doc = decode_json(body, ndjson)
        page = Page([])
        for raw in doc if isinstance(doc, list) else [doc]:
            snap = parse_snapshot(page, raw, sources)
            if snap.collected_at > now + MAX_PUSH_AHEAD:
                raise ExporterError(f"snapshot at {format_time(snap.collected_at)} is in the future")
    if not page.snapshots:
        raise ExporterError("the body holds no snapshot")
    page.snapshots.sort(key=lambda snap: snap.collected_at)
    return page


class ExporterClient:
    """One pull source's HTTP client: its own session, TLS material and token."""

    def __init__(self, source: Source, token: Token, max_body_bytes: int):
        self.source, self.token, self.max_body = source, token, max_body_bytes
        self.url = source.base_url.rstrip("/") + "/v1/snapshots/window"
        self.session = requests.Session()
        # No proxies, netrc or CA overrides from the environment: a source's
        # transport is exactly what its configuration says.
        self.session.trust_env = False
        self.session.verify = source.ca_bundle or True
        if source.client_cert:
            self.session.cert = (source.client_cert, source.client_key) if source.client_key else source.client_cert

    def fetch(self, since: datetime, until: datetime, limit: int, cursor: str) -> Page:
        """One window page, read within timeout_seconds and MAX_BODY_BYTES, and validated."""
        try:
            token = self.token.get()
        except ValueError as exc:
            raise ExporterError(str(exc)) from None
        params = {"since": format_time(since), "until": format_time(until), "limit": str(limit)}
        if cursor:
            params["cursor"] = cursor  # verbatim: exporters compare it to the nanosecond
        # identity: a compressed body would be unpacked before the size cap could see it.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", "Authorization": f"Bearer {token}"}
        timeout = self.source.timeout_seconds
        deadline = time.monotonic() + timeout
        too_large = f"exporter page is larger than {self.max_body} bytes (MAX_BODY_BYTES)"
        try:
            with self.session.get(self.url, params=params, headers=headers, timeout=timeout,
                                  stream=True, allow_redirects=False) as response:
                if response.status_code != 200:
                    raise ExporterError(f"exporter answered HTTP {response.status_code}")
                if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
                    raise ExporterError("exporter sent a compressed page although identity was asked for")
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.max_body:
                    raise ExporterError(too_large)
                body = bytearray()
                # read1 returns what has arrived; iter_content would wait for a whole chunk,
                # so a byte-a-second exporter would never reach the deadline check below.
                while chunk := response.raw.read1(256 * 1024, decode_content=False):
                    body += chunk
                    if len(body) > self.max_body:
                        raise ExporterError(too_large)
                    if time.monotonic() > deadline:
                        raise ExporterError(f"exporter page took longer than {timeout:g}s")
        except requests.exceptions.SSLError:
            raise ExporterError("TLS handshake or certificate verification failed "
                                "(check ca_bundle / client_cert)") from None
        except (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError):
            raise ExporterError(f"exporter did not answer within {timeout:g}s") from None
        except requests.exceptions.ConnectionError:
            raise ExporterError("could not connect to the exporter") from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            # requests' messages can echo URLs; keep only the kind of failure.
            raise ExporterError(f"request failed ({type(exc).__name__})") from None
        except OSError:  # requests checks the TLS file paths itself; a rotation can remove one
            raise ExporterError("a TLS file (ca_bundle / client_cert / client_key) is missing or unreadable") from None
        return parse_page(body, self.source, since, until)  # json.loads takes the bytearray: no copy


# ---- repository: every SQL statement, parameterized; I/O and nothing clever --

@dataclass(slots=True)
class Checkpoint:
    """The last applied totals of one series (one cumulative counter pair)."""
    uplink: int
    downlink: int
    last_seen_at: datetime
    reset_epoch: int = 0
    baseline: bool = False  # totals unknown: the next sample only re-baselines (never stored)


@dataclass(slots=True)
class QuotaState:
    remaining: int  # included bytes left
    balance: float
    last_rated_bucket_at: datetime | None = None
    arrears_since: datetime | None = None


@dataclass(slots=True)
class Bucket:
    """Bytes to add into one traffic_minute_buckets row."""
    bucket_start: datetime
    node_id: str  # storage node
    account: str
    line_code: str
    uplink: int = 0
    downlink: int = 0
    multiplier: float = 1.0
    version: str = ""


@dataclass(slots=True)
class LedgerEntry:
    id: str
    account: str
    bucket_start: datetime
    rated_bytes: int
    amount: float
    balance_after: float
    version: str


@dataclass
class Watermark:  # a source's row of billing_source_sync_state
    source_id: str
    last_completed_until: datetime | None = None
    last_attempted_at: datetime | None = None
    last_succeeded_at: datetime | None = None
    last_error: str = ""


@dataclass
class SeriesReads:
    """What a page transaction reads, under its node locks, about its series."""
    known: set  # accounts that have a users row
    checkpoints: dict  # (series key, account) -> Checkpoint
    open_buckets: set  # (series key, account) whose checkpoint's minute already has its bucket
    inherited: dict = field(default_factory=dict)  # (storage node, account) -> plain-key Checkpoint (adoption)
    fresh_nodes: set = field(default_factory=set)  # baseline-policy nodes without any checkpoint


class Database:
    """A few pooled connections; one that raised is closed, never reused (recovery after a restart)."""

    def __init__(self, dsn: str, keep: int = 8):
        self._dsn, self._keep, self._idle, self._lock = dsn, keep, [], threading.Lock()

    def connect(self):
        return psycopg2.connect(
            # UTF8 whatever the database's encoding: PostgreSQL then refuses (by
            # name) a character the database cannot store, instead of storing garbage.
            self._dsn, connect_timeout=3, application_name="billing-service", client_encoding="UTF8",
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3, tcp_user_timeout=30000,
            options="-c TimeZone=UTC -c lock_timeout=60000 -c idle_in_transaction_session_timeout=600000")

    @contextmanager
    def connection(self, pooled: bool = True):
        """A connection for one piece of work; ``pooled=False``: a new one, closed afterwards."""
        with self._lock:
            conn = self._idle.pop() if pooled and self._idle else None
        conn = conn or self.connect()
        try:
            yield conn
            if not conn.closed:
                conn.rollback()  # whatever the work left open
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if pooled and not conn.closed and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _sql(conn, sql: str, params=(), commit: bool = True) -> list:
    """One statement: its rows, if it returns any; ``commit=False`` inside a page transaction."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall() if cur.description else []
    if commit:
        conn.commit()
    return rows


def db_error_text(exc: psycopg2.Error) -> str:
    # Short and safe: libpq's connection errors name hosts, ports, users and paths (open endpoints show this).
    return f"database error: {type(exc).__name__}" if exc.pgcode else "database unavailable"


BUSY_WAIT_SECONDS = 10.0  # how long an HTTP run (or a push) waits for a source or node another writer holds
_SOURCE_LOCKS, _NODE_LOCKS = 0x62696C6C, 0x62696C6E  # advisory lock namespaces: "bill", "biln"


def lock_key(name: str) -> int:
    return zlib.crc32(name.encode()) - 2**31


def try_lock_source(conn, source_id: str) -> bool:
    """One writer per source: a session lock, released when the connection closes."""
    return _sql(conn, "SELECT pg_try_advisory_lock(%s, %s)", (_SOURCE_LOCKS, lock_key(source_id)))[0][0]


def lock_nodes(conn, nodes, wait_seconds: float | None = None) -> None:
    """One writer per storage node, whoever delivers it; in key order, so pages never deadlock."""
    if wait_seconds is not None:
        _sql(conn, "SELECT set_config('lock_timeout', %s, true)", (f"{int(wait_seconds * 1000)}ms",), False)
    for key in sorted({lock_key(node) for node in nodes}):
        _sql(conn, "SELECT pg_advisory_xact_lock(%s, %s)", (_NODE_LOCKS, key), False)


def write_sync_state(conn, source_id: str, completed=None, succeeded=None, error=None, attempted=None,
                     commit=True) -> Watermark:
    """Record a run's start, progress, end or failure, or a push: the watermark
    only ever moves forward, and what is None stays as it is."""
    return Watermark(*_sql(conn, """
        INSERT INTO billing_source_sync_state AS w
          (source_id, last_completed_until, last_attempted_at, last_succeeded_at, last_error)
        VALUES (%s, %s, %s, %s, coalesce(%s, ''))
        ON CONFLICT (source_id) DO UPDATE SET
          last_completed_until = GREATEST(w.last_completed_until, EXCLUDED.last_completed_until),
          last_attempted_at = coalesce(EXCLUDED.last_attempted_at, w.last_attempted_at),
          last_succeeded_at = coalesce(EXCLUDED.last_succeeded_at, w.last_succeeded_at),
          last_error = coalesce(%s, w.last_error), updated_at = now()
        RETURNING source_id, last_completed_until, last_attempted_at, last_succeeded_at, last_error""", (source_id, completed, attempted, succeeded, error, error), commit)[0])


# Page-scoped scratch tables: filled with COPY, joined set-based, emptied at
# commit. One fixed set of statements per page, whatever its size.
_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS page_series (series_node TEXT, storage_node TEXT, line_code TEXT,
  account_uuid UUID) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_quota (account_uuid UUID, remaining BIGINT, balance DOUBLE PRECISION,
  last_rated TIMESTAMPTZ, arrears_since TIMESTAMPTZ) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_buckets (bucket_start TIMESTAMPTZ, node_id TEXT, account_uuid UUID,
  line_code TEXT, uplink BIGINT, downlink BIGINT, multiplier DOUBLE PRECISION, source_revision TEXT) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_ledger (seq INTEGER, id UUID, account_uuid UUID, bucket_start TIMESTAMPTZ,
  rated_bytes BIGINT, amount_delta DOUBLE PRECISION, balance_after DOUBLE PRECISION, version TEXT) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_checkpoints (node_id TEXT, account_uuid UUID, uplink BIGINT, downlink BIGINT,
  last_seen_at TIMESTAMPTZ, reset_epoch BIGINT) ON COMMIT DELETE ROWS;
"""
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(value: str | None) -> str:
    """A label or NULL in COPY's text format (integers go in as str(int), times through format_time)."""
    return "\\N" if value is None else value.translate(_COPY_ESCAPES)


def _copy(cur, table: str, lines) -> None:
    """COPY formatted lines into a scratch table, as UTF-8 bytes (a str costs up to 4 bytes a character)."""
    cur.copy_expert(f"COPY {table} FROM STDIN", io.BytesIO("".join(lines).encode()), size=65536)


def read_series(conn, series: list, region: str, baseline_nodes: set, first_minute: datetime) -> SeriesReads:
    """What the core needs about the page's (series key, storage node, line_code, account): the
    original's plain-key checkpoints and a baseline node's emptiness only when series are new."""
    t = functools.lru_cache(maxsize=None)(_text)
    with conn.cursor() as cur:
        cur.execute(_TEMP_TABLES)
        _copy(cur, "page_series", [f"{t(key)}\t{t(node)}\t{t(line)}\t{account}\n" for key, node, line, account in series])
    known = _sql(conn, "SELECT DISTINCT u.uuid::text FROM users u JOIN page_series s ON s.account_uuid = u.uuid",
                 commit=False)
    reads = SeriesReads({row[0] for row in known}, {}, set())
    # Whether the checkpoint's minute already has its bucket; a checkpoint before the page's
    # first minute shares no minute with any of its samples, so its bucket is not looked up.
    checkpoint_of = """c.last_uplink_total, c.last_downlink_total, c.last_seen_at, c.reset_epoch,
        CASE WHEN c.last_seen_at >= %s THEN EXISTS (SELECT 1 FROM traffic_minute_buckets b
          WHERE b.bucket_start = date_trunc('minute', c.last_seen_at) AND b.node_id = s.storage_node
            AND b.account_uuid = s.account_uuid AND b.region = %s AND b.line_code = s.line_code) END"""
    for key, account, up, down, seen, epoch, is_open in _sql(conn, f"""
            SELECT s.series_node, s.account_uuid::text, {checkpoint_of} FROM page_series s
            JOIN traffic_stat_checkpoints c ON c.node_id = s.series_node AND c.account_uuid = s.account_uuid""",
                                                           (first_minute, region), False):
        reads.checkpoints[(key, account)] = Checkpoint(up, down, seen, epoch)
        if is_open:
            reads.open_buckets.add((key, account))
    new = [(node, line) for key, node, line, account in series
           if (key, account) not in reads.checkpoints and account in reads.known]
    if any(line for _, line in new):
        for key, node, account, up, down, seen, epoch, is_open in _sql(conn, f"""
                SELECT s.series_node, s.storage_node, s.account_uuid::text, {checkpoint_of} FROM page_series s
                JOIN traffic_stat_checkpoints c ON c.node_id = s.storage_node AND c.account_uuid = s.account_uuid
                WHERE s.line_code <> '' AND NOT EXISTS (SELECT 1 FROM traffic_stat_checkpoints o
                                                        WHERE o.node_id = s.series_node AND o.account_uuid = s.account_uuid)""",
                                                                             (first_minute, region), False):
            reads.inherited[(node, account)] = Checkpoint(up, down, seen, epoch)
            if is_open:
                reads.open_buckets.add((key, account))
    candidates = sorted({node for node, _ in new} & baseline_nodes)
    if candidates:
        reads.fresh_nodes = {row[0] for row in _sql(conn, """
            SELECT n FROM unnest(%s::text[]) AS n
            WHERE NOT EXISTS (SELECT 1 FROM traffic_stat_checkpoints WHERE node_id = n)
              AND NOT EXISTS (SELECT 1 FROM traffic_stat_checkpoints WHERE starts_with(node_id, n || '#'))""",
                                                        (candidates,), False)}
    return reads


def read_profiles(conn, accounts) -> dict:
    return {row[0]: row[1:] for row in _sql(conn, """
        SELECT account_uuid::text, included_quota_bytes, base_price_per_byte, region_multiplier, line_multiplier,
               peak_multiplier, offpeak_multiplier, pricing_rule_version
        FROM account_billing_profiles WHERE account_uuid = ANY(%s::uuid[])""", (list(accounts),), False)}


def lock_quota_states(conn, initial: dict) -> dict:
    """Create missing quota rows from ``initial``, then lock all of them in account order (no deadlocks)."""
    with conn.cursor() as cur:
        _copy(cur, "page_quota", [f"{a}\t{q.remaining}\t{q.balance!r}\t\\N\t\\N\n" for a, q in initial.items()])
        cur.execute("""
            INSERT INTO account_quota_states (account_uuid, remaining_included_quota, current_balance, arrears,
                                              throttle_state, suspend_state)
            SELECT account_uuid, remaining, balance, balance < 0,
                   CASE WHEN balance < 0 THEN 'throttled' ELSE 'normal' END, 'active'
            FROM page_quota ORDER BY account_uuid ON CONFLICT (account_uuid) DO NOTHING""")
        cur.execute("""
            SELECT q.account_uuid::text, q.remaining_included_quota, q.current_balance, q.last_rated_bucket_at,
                   q.arrears_since
            FROM account_quota_states q JOIN page_quota p USING (account_uuid) ORDER BY q.account_uuid FOR UPDATE OF q""")
        states = {row[0]: QuotaState(*row[1:]) for row in cur.fetchall()}
        cur.execute("TRUNCATE page_quota")
    missing = initial.keys() - states.keys()
    if missing:
        raise RuntimeError(f"the quota row of account {min(missing)} disappeared during the page")
    return states


class LedgerConflict(Exception):
    """The page met ledger ids already there: redo it leaving those increments out (billed_ids)."""


def billed_ids(conn, ids: list) -> set:
    """The ids already in the ledger: billed before (by the original service, or anything else)."""
    return {row[0] for row in _sql(conn, "SELECT id::text FROM billing_ledger WHERE id = ANY(%s::uuid[])", (ids,),
                                   False)}


def write_page(conn, region: str, buckets, ledger, checkpoints: dict, quota: dict, adopted) -> None:
    """Write one page's facts (inside the page transaction; the caller commits)."""
    t = functools.lru_cache(maxsize=None)(_text)  # a page repeats a few nodes, tags and versions

    def later_rows():  # formatted in a helper thread while PostgreSQL upserts the buckets
        return ([f"{i}\t{e.id}\t{e.account}\t{format_time(e.bucket_start)}\t{e.rated_bytes}\t{e.amount!r}\t"
                 f"{e.balance_after!r}\t{t(e.version)}\n" for i, e in enumerate(ledger)],
                [f"{t(node)}\t{account}\t{c.uplink}\t{c.downlink}\t{format_time(c.last_seen_at)}\t{c.reset_epoch}\n"
                 for (node, account), c in checkpoints.items()],
                [f"{account}\t{q.remaining}\t{q.balance!r}\t{t(format_time(q.last_rated_bucket_at))}\t"
                 f"{t(format_time(q.arrears_since))}\n" for account, q in quota.items()])
    with conn.cursor() as cur, ThreadPoolExecutor(max_workers=1) as helper:
        formatted = helper.submit(later_rows)
        if buckets:
            _copy(cur, "page_buckets", [
                f"{format_time(b.bucket_start)}\t{t(b.node_id)}\t{b.account}\t{t(b.line_code)}\t{b.uplink}\t"
                f"{b.downlink}\t{b.multiplier!r}\t{t(b.version)}\n" for b in buckets])
            # Bytes accumulate: a second sample of a minute adds, never overwrites.
            cur.execute("""
                INSERT INTO traffic_minute_buckets AS t (bucket_start, node_id, account_uuid, region, line_code,
                  uplink_bytes, downlink_bytes, total_bytes, multiplier, rating_status, source_revision)
                SELECT bucket_start, node_id, account_uuid, %s, line_code, uplink, downlink, uplink + downlink,
                       multiplier, 'rated', source_revision FROM page_buckets
                ON CONFLICT (bucket_start, node_id, account_uuid, region, line_code) DO UPDATE
                SET uplink_bytes = t.uplink_bytes + EXCLUDED.uplink_bytes,
                    downlink_bytes = t.downlink_bytes + EXCLUDED.downlink_bytes,
                    total_bytes = t.total_bytes + EXCLUDED.total_bytes, multiplier = EXCLUDED.multiplier,
                    rating_status = 'rated', source_revision = EXCLUDED.source_revision, updated_at = now()""",
                        (region,))
        ledger_rows, checkpoint_rows, quota_rows = formatted.result()
        if ledger:
            _copy(cur, "page_ledger", ledger_rows)
            # An id already there means that increment was billed before: the
            # page must not count it again, so it is redone without it.
            cur.execute("""
                INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
                                            amount_delta, balance_after, pricing_rule_version, created_at)
                SELECT id, account_uuid, bucket_start, bucket_start + interval '1 minute', 'traffic_charge',
                       rated_bytes, amount_delta, balance_after, version, clock_timestamp()
                FROM page_ledger ORDER BY seq ON CONFLICT (id) DO NOTHING""")
            if cur.rowcount < len(ledger):
                raise LedgerConflict("ledger ids already present kept colliding; the page was not applied")
        if checkpoints:
            _copy(cur, "page_checkpoints", checkpoint_rows)
            cur.execute("""
                INSERT INTO traffic_stat_checkpoints AS t (node_id, account_uuid, last_uplink_total,
                                                           last_downlink_total, last_seen_at, reset_epoch)
                SELECT node_id, account_uuid, uplink, downlink, last_seen_at, reset_epoch FROM page_checkpoints
                ON CONFLICT (node_id, account_uuid) DO UPDATE
                SET last_uplink_total = EXCLUDED.last_uplink_total, last_downlink_total = EXCLUDED.last_downlink_total,
                    last_seen_at = EXCLUDED.last_seen_at, reset_epoch = EXCLUDED.reset_epoch, updated_at = now()
                WHERE t.last_seen_at < EXCLUDED.last_seen_at""")
        if adopted:  # the original's plain-key checkpoints, now held by their series
            cur.execute("DELETE FROM traffic_stat_checkpoints WHERE (node_id, account_uuid) IN "
                        "(SELECT * FROM unnest(%s::text[], %s::uuid[]))",
                        ([node for node, _ in adopted], [account for _, account in adopted]))
        if quota:
            _copy(cur, "page_quota", quota_rows)
            cur.execute("""
                UPDATE account_quota_states q
                SET remaining_included_quota = p.remaining, current_balance = p.balance, arrears = p.balance < 0,
                    arrears_since = p.arrears_since,
                    throttle_state = CASE WHEN p.balance < 0 THEN 'throttled' ELSE 'normal' END,
                    last_rated_bucket_at = p.last_rated, effective_at = now(), updated_at = now()
                FROM page_quota p WHERE q.account_uuid = p.account_uuid""")


def sweep_arrears(conn, suspend_after: float) -> tuple[int, int]:
    """Suspend accounts in arrears for more than ``suspend_after`` seconds (0: never; a NULL
    arrears_since, from before that column: never); lift those whose balance is back at or above
    zero. Rows locked in account order, as rating does. Returns (suspended, lifted)."""
    rows = _sql(conn, """
        WITH due AS (
          SELECT account_uuid, suspend_state AS was FROM account_quota_states
          WHERE (current_balance >= 0 AND (suspend_state = 'suspended' OR arrears OR arrears_since IS NOT NULL))
             OR (%(after)s > 0 AND current_balance < 0 AND suspend_state <> 'suspended'
                 AND arrears_since <= now() - make_interval(secs => %(after)s))
          ORDER BY account_uuid FOR UPDATE)
        UPDATE account_quota_states q
        SET suspend_state = CASE WHEN q.current_balance >= 0 THEN 'active' ELSE 'suspended' END,
            arrears = q.current_balance < 0,
            arrears_since = CASE WHEN q.current_balance >= 0 THEN NULL ELSE q.arrears_since END,
            throttle_state = CASE WHEN q.current_balance >= 0 THEN 'normal' ELSE q.throttle_state END,
            updated_at = now()
        FROM due WHERE q.account_uuid = due.account_uuid
        RETURNING q.suspend_state, due.was""", {"after": suspend_after})
    return (sum(now == "suspended" for now, _ in rows),
            sum(now == "active" and was == "suspended" for now, was in rows))


RUN_RETENTION = 1000  # finished runs kept in billing_job_runs
RUN_COUNTS = ("processed_samples", "written_minutes", "replayed_minutes", "invalid_samples",
              "unknown_account_samples", "counter_resets", "already_billed")  # what each source run counts
TOTAL_FIELDS = RUN_COUNTS + ("suspended", "lifted")  # a run's result: those, plus the arrears sweep's


def record_run(conn, result: dict, keep: bool = True) -> None:
    """Count a run (or push) in billing_job_totals; ``keep`` it for /v1/status and /healthz too."""
    if keep:
        _sql(conn, "INSERT INTO billing_job_runs (job, status, started_at, finished_at, result) "
                   "VALUES (%s, %s, %s, %s, %s)", (result["job"], result["status"], result["started_at"],
                                                   result["finished_at"], json.dumps(result)), False)
        _sql(conn, "DELETE FROM billing_job_runs WHERE id <= "
                   "(SELECT id FROM billing_job_runs ORDER BY id DESC OFFSET %s LIMIT 1)", (RUN_RETENTION,), False)
    _sql(conn, f"""
        INSERT INTO billing_job_totals AS t (job, status, runs, {', '.join(TOTAL_FIELDS)})
        VALUES (%s, %s, 1, {', '.join(['%s'] * len(TOTAL_FIELDS))})
        ON CONFLICT (job, status) DO UPDATE SET runs = t.runs + 1,
          {', '.join(f"{name} = t.{name} + EXCLUDED.{name}" for name in TOTAL_FIELDS)}""",
         (result["job"], result["status"], *(result.get(name, 0) for name in TOTAL_FIELDS)))


def count_push(conn, source_id: str, outcome: str) -> None:
    _sql(conn, """INSERT INTO billing_push_totals AS t (source_id, outcome, pushes) VALUES (%s, %s, 1)
                  ON CONFLICT (source_id, outcome) DO UPDATE SET pushes = t.pushes + 1""", (source_id, outcome))


def last_run(conn) -> dict | None:
    _sql(conn, "SET LOCAL statement_timeout = 2000", commit=False)  # a probe must not hang on a stuck database
    rows = _sql(conn, "SELECT result FROM billing_job_runs ORDER BY id DESC LIMIT 1")
    return rows[0][0] if rows else None


def read_source_views(conn, source_ids) -> dict:
    """Each source's watermark, lag (PostgreSQL's clock) and whether a run holds its lock (pg_locks)."""
    return {row[0]: row for row in _sql(conn, """
        SELECT s.source_id, w.last_completed_until, w.last_attempted_at, w.last_succeeded_at, w.last_error,
               extract(epoch FROM now() - w.last_completed_until),
               EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                       WHERE l.locktype = 'advisory' AND d.datname = current_database() AND l.granted
                         AND l.classid::bigint = %s AND l.objid::bigint = s.lock AND l.objsubid = 2)
        FROM unnest(%s::text[], %s::bigint[]) AS s(source_id, lock)
        LEFT JOIN billing_source_sync_state w USING (source_id)""",
        (_SOURCE_LOCKS, list(source_ids), [lock_key(s) & 0xFFFFFFFF for s in source_ids]))}


def read_counters(conn) -> tuple[list, list, tuple]:
    """Run totals, push totals, and (accounts in arrears, accounts suspended)."""
    return (_sql(conn, f"SELECT job, status, runs, {', '.join(TOTAL_FIELDS)} FROM billing_job_totals ORDER BY 1, 2"),
            _sql(conn, "SELECT source_id, outcome, pushes FROM billing_push_totals ORDER BY 1, 2"),
            _sql(conn, """SELECT count(*) FILTER (WHERE arrears), count(*) FILTER (WHERE suspend_state = 'suspended')
                          FROM account_quota_states""")[0])


# ---- billing core: pure rating of samples against checkpoints and quota ----

@dataclass(frozen=True, slots=True)
class Pricing:
    included_quota: int  # given on first sight
    price_per_byte: float
    multiplier: float  # region x line
    version: str
    peak: float = 1.0  # x multiplier inside PEAK_HOURS
    offpeak: float = 1.0  # x multiplier outside them


def _positive(value, default):
    return value if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else default


def effective_pricing(profile, defaults: Pricing) -> Pricing:
    """Config defaults, overridden by an account_billing_profiles row (included, price, region, line,
    peak, offpeak, version). Non-positive or non-finite numbers fall back: never a NaN charge."""
    if profile is None:
        return defaults
    included, price, region_mult, line_mult, peak, offpeak, version = profile
    return Pricing(int(_positive(included, defaults.included_quota)), float(_positive(price, defaults.price_per_byte)),
                   float(_positive(region_mult, 1.0)) * float(_positive(line_mult, 1.0)),
                   version.strip() if isinstance(version, str) and version.strip() else defaults.version,
                   float(_positive(peak, 1.0)), float(_positive(offpeak, 1.0)))


@functools.lru_cache(maxsize=4096)
def is_peak(minute: datetime, peak: PeakHours) -> bool:
    """Whether a minute starts inside the peak window on its zone's wall clock
    (a daylight-saving day has a shorter or a longer peak, as the clock does)."""
    local = minute.astimezone(peak.zone)
    at = local.hour * 60 + local.minute
    return peak.start <= at < peak.end if peak.start < peak.end else at >= peak.start or at < peak.end


def minute_multiplier(price: Pricing, minute: datetime, peak: PeakHours | None) -> float:
    if peak is None:
        return price.multiplier
    return price.multiplier * (price.peak if is_peak(minute, peak) else price.offpeak)


def series_key(storage: str, inbound_tag: str) -> str:
    """Checkpoint node_id of a series: one counter pair per inbound under the (node_id, account_uuid) key.
    Untagged keeps the plain key (the original's); storage nodes never hold "#": no two series share one."""
    return f"{storage}#{inbound_tag}" if inbound_tag else storage


def page_series(snapshots) -> list:
    """(series key, storage node, line_code, account) of every series in a page."""
    seen = {}
    for snap in snapshots:
        for s in snap.samples:
            if (snap.storage_node, s.inbound_tag, s.account) not in seen:
                seen[snap.storage_node, s.inbound_tag, s.account] = (
                    series_key(snap.storage_node, s.inbound_tag), snap.storage_node, s.inbound_tag, s.account)
    return list(seen.values())


_KEY_HASH = hashlib.sha1(uuid.NAMESPACE_OID.bytes)


def ledger_id(bucket_start: datetime, node: str, account: str, region: str, line_code: str,
              increment_at: datetime | None = None) -> str:
    """uuid5(NAMESPACE_OID, name), spelled out (uuid.uuid5 is slower). The first increment of a
    bucket keeps the established key; later ones add their sample time."""
    name = f"{format_time(bucket_start)}|{node}|{account}|{region}|{line_code}"
    if increment_at is not None:
        name += f"|{format_time(increment_at)}"
    digest = _KEY_HASH.copy()
    digest.update(name.encode())
    h = digest.hexdigest()  # then version 5 and the RFC 4122 variant in their nibbles
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


@dataclass(slots=True)
class Increment:
    """Bytes one sample adds to its series' minute bucket, and its ledger id."""
    id: str
    bucket_start: datetime
    node_id: str  # storage node
    account: str
    line_code: str
    uplink: int
    downlink: int


@dataclass
class MeteredPage:
    increments: list  # in application order
    checkpoints: dict  # (series key, account) -> Checkpoint, changed ones only
    adopted: set = field(default_factory=set)  # (storage node, account): plain-key rows now held by their series
    applied: int = 0  # samples that moved a checkpoint
    replayed: int = 0  # samples at or before their series' last_seen_at
    replayed_minutes: int = 0  # distinct (series, minute) among them
    resets: int = 0  # counter resets (re-baselined, nothing billed)
    baselined: int = 0  # first samples recorded without billing (first_sight baseline, takeover)
    unknown: int = 0  # samples of accounts without a users row


def adoptions(snapshots, reads: SeriesReads) -> tuple[dict, dict]:
    """Checkpoints, for series without their own, from the original service's one per account and
    node (plain key, whatever the inbound): one series continues from it; several each re-baseline,
    as it cannot tell them apart. Its last_seen_at guards what the original billed. Returns the
    adopted checkpoints and, for each, the plain-key row it comes from."""
    tags: dict = {}
    for snap in snapshots:
        for s in snap.samples:
            if (snap.storage_node, s.account) in reads.inherited:
                tags.setdefault((snap.storage_node, s.account), set()).add(s.inbound_tag)
    adopted, owners = {}, {}
    for (node, account), plain in reads.inherited.items():
        page_tags = tags.get((node, account), set())
        if "" in page_tags:  # the plain key is that untagged series' own checkpoint
            continue
        for tag in page_tags:
            key = (series_key(node, tag), account)
            if key not in reads.checkpoints:
                adopted[key] = dataclasses.replace(plain, baseline=len(page_tags) > 1)
                owners[key] = (node, account)
    return adopted, owners


def meter_page(snapshots, reads: SeriesReads, region: str) -> MeteredPage:
    """Turn one page of snapshots (in collected_at order) into byte increments
    against the series checkpoints. Pure: ``reads`` is not modified."""
    out = MeteredPage([], {})
    cps = out.checkpoints
    adopted, owners = adoptions(snapshots, reads) if reads.inherited else ({}, {})
    fresh = set(reads.fresh_nodes)
    seen_buckets, replayed = set(), set()
    for snap in snapshots:
        stamp, node = snap.collected_at, snap.storage_node
        minute = minute_floor(stamp)
        first_snapshot_of_fresh_node = node in fresh
        fresh.discard(node)
        for s in snap.samples:
            account = s.account
            if account not in reads.known:
                out.unknown += 1
                continue
            key = (series_key(node, s.inbound_tag), account)
            stored = reads.checkpoints.get(key) or adopted.get(key)
            cp = cps.get(key) or stored
            if cp is not None and stamp <= cp.last_seen_at:
                out.replayed += 1
                replayed.add((minute, key))
                continue
            out.applied += 1
            if (cp is None and first_snapshot_of_fresh_node) or (cp is not None and cp.baseline):
                cps[key] = Checkpoint(s.uplink, s.downlink, stamp, cp.reset_epoch if cp else 0)
                out.baselined += 1
                continue
            if cp is None:
                up, down, epoch = s.uplink, s.downlink, 0  # first sight: bill from zero
            else:
                up, down, epoch = s.uplink - cp.uplink, s.downlink - cp.downlink, cp.reset_epoch
            if up < 0 or down < 0:
                cps[key] = Checkpoint(s.uplink, s.downlink, stamp, epoch + 1)
                out.resets += 1
                continue
            cps[key] = Checkpoint(s.uplink, s.downlink, stamp, epoch)
            if up or down:
                # The first increment of a bucket keeps the established ledger key,
                # unless an earlier page already opened that bucket.
                first = (minute, key) not in seen_buckets and not (
                    key in reads.open_buckets and stored is not None and minute_floor(stored.last_seen_at) == minute)
                seen_buckets.add((minute, key))
                out.increments.append(Increment(
                    ledger_id(minute, node, account, region, s.inbound_tag, None if first else stamp),
                    minute, node, account, s.inbound_tag, up, down))
    out.replayed_minutes = len(replayed)
    # A plain-key row is taken over once every series that adopted it holds its own checkpoint.
    done: dict = {}
    for key, row in owners.items():
        done[row] = done.get(row, True) and key in cps
    out.adopted = {row for row, complete in done.items() if complete}
    return out


@dataclass
class RatedPage:
    buckets: list  # Bucket, one per bucket key
    ledger: list  # LedgerEntry, in application order
    quota: dict  # account -> QuotaState, changed ones only
    already_billed: int = 0  # increments whose ledger id was already there: nothing billed again


def rate_increments(increments, pricing: dict, quota: dict, peak: PeakHours | None,
                    billed: set = frozenset()) -> RatedPage:
    """Price increments in order: included quota first, then price x
    multiplier; one immutable ledger row per increment. An increment whose
    ledger id is in ``billed`` was billed before: no bytes, money or quota. Pure."""
    out = RatedPage([], [], {})
    buckets: dict = {}
    for inc in increments:
        if inc.id in billed:
            out.already_billed += 1
            continue
        account = inc.account
        price = pricing[account]
        multiplier = minute_multiplier(price, inc.bucket_start, peak)
        key = (inc.bucket_start, inc.node_id, account, inc.line_code)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(inc.bucket_start, inc.node_id, account, inc.line_code)
        bucket.uplink += inc.uplink
        bucket.downlink += inc.downlink
        bucket.multiplier = multiplier
        bucket.version = price.version

        state = out.quota.get(account)
        if state is None:
            start = quota[account]
            state = out.quota[account] = QuotaState(start.remaining, start.balance, start.last_rated_bucket_at,
                                                    start.arrears_since)
        total = inc.uplink + inc.downlink
        used = min(max(state.remaining, 0), total)  # a negative remainder written elsewhere charges nothing extra
        chargeable = total - used
        amount = -(chargeable * price.price_per_byte * multiplier) + 0.0  # + 0.0: no "-0"
        solvent = state.balance >= 0
        state.remaining -= used
        state.balance += amount
        if state.balance >= 0:
            state.arrears_since = None
        elif solvent:  # this charge crossed zero (an older arrears_since was paid off by a top-up)
            state.arrears_since = inc.bucket_start  # a replay computes the same value
        state.last_rated_bucket_at = max(state.last_rated_bucket_at or inc.bucket_start, inc.bucket_start)
        out.ledger.append(LedgerEntry(inc.id, account, inc.bucket_start, chargeable, amount, state.balance,
                                      price.version))
    out.buckets = list(buckets.values())
    return out


# ---- HTTP routes: probes, status, metrics, the job endpoints and push ingest --

MAX_REQUEST_BYTES = 64 * 1024
MAX_RECONCILE_RANGE = timedelta(days=7)
_HTTP_STATUS = {"ok": 200, "partial": 200, "error": 503, "busy": 409}


class BadRequest(ValueError):
    pass


def parse_reconcile_body(body: bytes, config: Config, now: datetime):
    """Optional {"source_id", "since", "until"}: (source_ids or None, (since, until) or None)."""
    if not body.strip():
        return None, None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    unknown = sorted(set(doc) - {"source_id", "since", "until"})
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    source_ids = None
    if "source_id" in doc:
        wanted = doc["source_id"]
        match = [s for s in config.sources if s.source_id == wanted]
        if not isinstance(wanted, str) or not match:
            raise BadRequest("source_id is not a configured source")
        if not match[0].enabled:
            raise BadRequest("source_id names a disabled source")
        if match[0].mode == "push":
            raise BadRequest("source_id names a push source: there is nothing to pull")
        source_ids = [wanted]
    if ("since" in doc) != ("until" in doc):
        raise BadRequest("since and until go together")
    if "since" not in doc:
        return source_ids, None
    since, until = parse_time(doc["since"]), parse_time(doc["until"])
    if since is None or until is None:
        raise BadRequest("since and until must be RFC3339 times")
    if since >= until:
        raise BadRequest("since must be before until")
    if until >= minute_floor(now):
        raise BadRequest("until must be before the current minute (that minute is still being written)")
    if until - since > MAX_RECONCILE_RANGE:
        raise BadRequest("the range is longer than 7 days")
    return source_ids, (since, until)


def _metric_line(name: str, labels: dict, value) -> str:
    def escape(text):
        return str(text).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    label_text = ",".join(f'{key}="{escape(val)}"' for key, val in labels.items())
    return f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}"


def render_metrics(config: Config, views: dict | None, counters) -> str:
    """Prometheus text format, derived from PostgreSQL only (views is None when
    the database did not answer)."""
    out = []

    def family(name, kind, help_text, samples):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_metric_line(name, labels, value) for labels, value in samples)

    family("billing_database_up", "gauge", "Whether PostgreSQL answered this scrape.",
           [({}, 0 if views is None else 1)])
    if views is None:
        return "\n".join(out) + "\n"
    totals, pushes, (in_arrears, suspended) = counters

    def per_source(pick):
        rows = [({"source_id": s.source_id}, pick(views[s.source_id])) for s in config.sources]
        return [(labels, value) for labels, value in rows if value is not None]

    def stamp(value):
        return None if value is None else f"{value.timestamp():.3f}"

    family("billing_source_enabled", "gauge", "Whether the source is enabled.",
           [({"source_id": s.source_id}, int(s.enabled)) for s in config.sources])
    family("billing_source_watermark_lag_seconds", "gauge",
           "Seconds between now and the source's last_completed_until (push: its newest applied snapshot).",
           per_source(lambda row: None if row[5] is None else f"{float(row[5]):.3f}"))
    family("billing_source_last_success_timestamp_seconds", "gauge",
           "Unix time of the source's last successful run or applied push.", per_source(lambda row: stamp(row[3])))
    family("billing_source_last_attempt_timestamp_seconds", "gauge",
           "Unix time of the source's last attempted run or received push.", per_source(lambda row: stamp(row[2])))
    family("billing_source_last_attempt_failed", "gauge", "1 when the source's last attempt ended in an error.",
           per_source(lambda row: None if row[2] is None else int(bool(row[4]))))
    family("billing_source_catchup_running", "gauge", "1 while a run holds the source's lock.",
           per_source(lambda row: int(row[6])))
    family("billing_job_runs_total", "counter", "Finished job runs (and pushes) by job and status.",
           [({"job": row[0], "status": row[1]}, row[2]) for row in totals])
    for index, name in enumerate(TOTAL_FIELDS, start=3):
        sums = collections.Counter()
        for row in totals:
            sums[row[0]] += row[index]
        family(f"billing_{name}_total", "counter", f"Sum of {name} over all runs, by job.",
               [({"job": job}, value) for job, value in sorted(sums.items())])
    for outcome in ("received", "applied", "rejected"):
        sums = collections.Counter()
        for source_id, kind, count in pushes:
            if outcome in ("received", kind):
                sums[source_id] += count
        family(f"billing_push_{outcome}_total", "counter", f"Pushed bodies {outcome}, by push source "
               "(source_id \"\": no source's token).", [({"source_id": s}, n) for s, n in sorted(sums.items())])
    family("billing_accounts_in_arrears", "gauge", "Accounts whose balance is below zero.", [({}, in_arrears)])
    family("billing_accounts_suspended", "gauge", "Accounts suspended for arrears.", [({}, suspended)])
    return "\n".join(out) + "\n"


def source_view(source: Source, row) -> dict:
    """One source as /v1/status shows it: watermark, lag, and whether it runs now."""
    _, completed, attempted, succeeded, error, lag, running = row
    return {"source_id": source.source_id, "mode": source.mode, "enabled": source.enabled,
            "last_completed_until": format_time(completed), "last_attempted_at": format_time(attempted),
            "last_succeeded_at": format_time(succeeded), "last_error": error or "",
            "lag_seconds": None if lag is None else round(float(lag), 3),
            **({"last_push_at": format_time(attempted)} if source.mode == "push" else {"running": bool(running)})}


def make_wsgi_app(config: Config, db: Database, run_job, ingest) -> flask.Flask:
    """The Flask app. The collector below provides ``run_job(job, source_ids, window)`` and
    ``ingest(page)``, each answering a run result."""
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False
    auth_failures = {"count": 0}
    source_ids = [s.source_id for s in config.sources]
    push_sources = [s for s in config.sources if s.mode == "push" and s.enabled]

    def read_db(work):
        try:
            with db.connection() as conn:
                return work(conn)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            # Likely pooled connections that died with a database restart:
            # drop them all and try once on a new one.
            db.close_all()
            with db.connection(pooled=False) as conn:
                return work(conn)

    def unavailable(exc: psycopg2.Error, where: str):
        log_event(config.secrets, "database_error", where=where, detail=str(exc).strip())
        return db_error_text(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        allow = [header for header in exc.get_headers() if header[0] == "Allow"]  # a 405 says what is allowed
        return flask.jsonify(error=exc.description if exc.code == 413 else exc.name.lower()), exc.code, allow

    @app.errorhandler(Exception)
    def internal_error(exc):
        log_event(config.secrets, "internal_error", path=flask.request.path, error=type(exc).__name__,
                  detail=config.secrets.redact(str(exc), 500))
        return flask.jsonify(error="internal error"), 500

    def given_token() -> str:
        scheme, _, given = flask.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = flask.request.headers.get("X-Service-Token", "")
        return given.strip()

    def read_body(limit: int) -> bytes:
        # werkzeug cuts a chunked body at max_content_length instead of
        # refusing it: one byte more than the limit tells the two apart.
        flask.request.max_content_length = limit + 1
        try:
            body = flask.request.get_data(cache=False)
        except RequestEntityTooLarge:  # a declared Content-Length over it
            body = None
        if body is None or len(body) > limit:
            flask.abort(413, f"request body is larger than {limit} bytes")
        return body

    def job_endpoint(job: str, window_allowed: bool):
        if not hmac.compare_digest(given_token().encode(), config.service_token.encode()):
            auth_failures["count"] += 1
            log_event(config.secrets, "auth_failed", path=flask.request.path,
                      remote_addr=flask.request.remote_addr, failures=auth_failures["count"])
            return flask.jsonify(error="missing or wrong service token"), 401
        body = read_body(MAX_REQUEST_BYTES)
        source_ids, window = None, None
        try:
            if window_allowed:
                source_ids, window = parse_reconcile_body(body, config, datetime.now(UTC))
            elif body.strip():
                raise BadRequest(f"{job} takes no body (a ranged replay is POST /v1/jobs/reconcile)")
        except BadRequest as exc:
            return flask.jsonify(error=str(exc)), 400
        result = run_job(job, source_ids, window)
        return flask.jsonify(result), _HTTP_STATUS[result["status"]]

    @app.get("/api/ping")
    def ping():
        return flask.jsonify(parse_image(config.image))

    @app.get("/healthz")
    def healthz():
        try:
            run = read_db(last_run)
        except psycopg2.Error as exc:
            return flask.jsonify(status="error", message=unavailable(exc, "/healthz")), 503
        if run is None:
            return flask.jsonify(status="starting", message="no collection run has finished yet"), 503
        if run["status"] == "error":
            return flask.jsonify(status="error", message=f"last run failed: {run['error']}"), 503
        return flask.jsonify(status="ok", message="")

    @app.get("/v1/status")
    def status():
        try:
            run, views = read_db(lambda conn: (last_run(conn), read_source_views(conn, source_ids)))
        except psycopg2.Error as exc:
            return flask.jsonify(error=unavailable(exc, "/v1/status")), 503
        payload = dict(run) if run else {"job": None, "started_at": None, "finished_at": None, "status": "starting",
                                         "error": "", **dict.fromkeys(TOTAL_FIELDS, 0), "source_statuses": []}
        payload["sources"] = [source_view(s, views[s.source_id]) for s in config.sources]
        return flask.jsonify(payload)

    @app.get("/metrics")
    def metrics():
        try:
            views, counters = read_db(lambda conn: (read_source_views(conn, source_ids), read_counters(conn)))
        except psycopg2.Error:
            views, counters = None, None
        return flask.Response(render_metrics(config, views, counters),
                              content_type="text/plain; version=0.0.4; charset=utf-8")

    for job in ("collect-and-rate", "reconcile"):  # only a reconcile takes a window
        app.add_url_rule(f"/v1/jobs/{job}", job, functools.partial(job_endpoint, job, job == "reconcile"),
                         methods=["POST"])

    def reject(code: int, source_id: str, reason: str):
        log_event(config.secrets, "push_rejected", source_id=source_id, status=code, reason=reason,
                  remote_addr=flask.request.remote_addr)
        try:
            with db.connection() as conn:
                count_push(conn, source_id, "rejected")
                if source_id:
                    write_sync_state(conn, source_id, error=f"push rejected: {reason}", attempted=utcnow())
        except psycopg2.Error as exc:
            unavailable(exc, "/v1/ingest/snapshots")
        return flask.jsonify(error=reason), code

    def token_matches(source: Source, given: str) -> bool:
        try:
            return hmac.compare_digest(given.encode(), config.tokens[source.source_id].get().encode())
        except ValueError:  # an unusable token file matches nothing
            return False

    @app.post("/v1/ingest/snapshots")
    def ingest_snapshots():
        given = given_token()
        allowed = [s for s in push_sources if token_matches(s, given)]
        if not allowed:
            return reject(401, "", "missing or wrong push token")
        owner = allowed[0].source_id if len(allowed) == 1 else ""  # a shared token cannot tell who sent it
        try:
            body = read_body(config.max_body_bytes)
        except HTTPException as exc:  # 413, or a client that went away (400)
            return reject(exc.code, owner, exc.description)
        if not PAGE_SLOT.acquire(timeout=BUSY_WAIT_SECONDS):  # held from the parse on: no parsed body waits
            return flask.jsonify(error="busy: this worker is writing another page; push again"), 503
        try:
            page = parse_push(body, flask.request.mimetype in ("application/x-ndjson", "application/ndjson"),
                              allowed, utcnow())
            result = ingest(page)
        except ExporterError as exc:
            return reject(403 if isinstance(exc, WrongNode) else 400, owner, str(exc))
        finally:
            PAGE_SLOT.release()
        return flask.jsonify(result), 503 if result["status"] == "error" else 200

    return app


# ---- collector: job runs, push ingest, and the thread that repeats runs --

OVERLAP = 2 * MINUTE
PAGE_ATTEMPTS = 3  # a page transaction that hit a deadlock or serialization failure is retried
MAX_EMPTY_PAGES = 3  # consecutive empty pages that still say has_more: a broken exporter


@dataclass
class SourceRun:
    source_id: str
    state: str = "ok"  # ok | partial (stopped early, the next run continues) | failed | busy
    error: str = ""
    processed_samples: int = 0
    written_minutes: int = 0  # minute-bucket rows written to, per page
    replayed_minutes: int = 0  # (series, minute) pairs with samples that were applied before, per page
    invalid_samples: int = 0
    unknown_account_samples: int = 0
    counter_resets: int = 0
    already_billed: int = 0
    pages: int = 0  # fetched
    committed: int = 0  # applied, each in its own transaction
    watermark: Watermark | None = None

    def add(self, metered: MeteredPage, rated: RatedPage) -> None:
        self.processed_samples += metered.applied + metered.replayed
        self.written_minutes += len(rated.buckets)
        self.replayed_minutes += metered.replayed_minutes
        self.unknown_account_samples += metered.unknown
        self.counter_resets += metered.resets
        self.already_billed += rated.already_billed
        self.committed += 1

    def status(self) -> dict:
        mark = self.watermark or Watermark(self.source_id)
        times = ("last_completed_until", "last_attempted_at", "last_succeeded_at")
        return {"source_id": self.source_id, "state": self.state, "error": self.error,
                **{name: format_time(getattr(mark, name)) for name in times}, "last_error": mark.last_error,
                **{name: getattr(self, name) for name in RUN_COUNTS}, "pages": self.pages}


def summarize(job: str, started: datetime, runs: list, sweep=(0, 0), idle: bool = False) -> dict:
    """The run result: ``error`` when no source made progress and one failed (or none is enabled,
    unless ``idle``: only push sources); ``partial`` when something failed, stopped early or was
    skipped but work was done; ``busy`` when every source was held by another writer."""
    errors = [f"{r.source_id}: {r.error}" for r in runs if r.state in ("failed", "partial")]
    errors += [f"{r.source_id}: {r.invalid_samples} invalid samples skipped" for r in runs if r.invalid_samples]
    errors += [f"{r.source_id}: {r.unknown_account_samples} samples of unknown accounts skipped"
               for r in runs if r.unknown_account_samples]
    if not runs and not idle:
        status, errors = "error", ["no enabled source"]
    elif runs and all(r.state == "busy" for r in runs):
        status = "busy"
    elif any(r.state == "failed" for r in runs) and not any(r.state == "ok" or r.committed for r in runs):
        status = "error"
    else:
        status = "partial" if errors else "ok"
    return {"job": job, "started_at": format_time(started), "finished_at": format_time(utcnow()),
            "status": status, "error": "; ".join(errors),
            **{name: sum(getattr(r, name) for r in runs) for name in RUN_COUNTS},
            "suspended": sweep[0], "lifted": sweep[1], "source_statuses": [r.status() for r in runs]}


class Collector:
    """Runs collections (from HTTP or its own thread) and applies pushes. One writer per source: a
    session lock on the run's own connection; per storage node: locks in every page transaction."""

    def __init__(self, config: Config, db: Database):
        self.config, self.db = config, db
        self.clients = {s.source_id: ExporterClient(s, config.tokens[s.source_id], config.max_body_bytes)
                        for s in config.sources if s.mode == "pull"}
        self.defaults = Pricing(config.initial_included_quota, config.price_per_byte, 1.0, config.source_revision)
        self._stop = threading.Event()
        self._thread = None

    # -- one job run --------------------------------------------------------

    def run(self, job: str, source_ids=None, window=None, wait: float = BUSY_WAIT_SECONDS) -> dict:
        started, clock = utcnow(), time.monotonic()
        enabled = [s for s in self.config.sources if s.enabled]
        runs = [self.collect_source(s, window, wait) for s in enabled
                if s.mode == "pull" and (source_ids is None or s.source_id in source_ids)]
        result = summarize(job, started, runs, self.sweep(), idle=bool(enabled))
        if result["status"] == "busy" and wait == 0 and not (result["suspended"] or result["lifted"]):
            return result  # the collector thread found others at work, and the sweep had nothing to do: no news
        self._record(result, keep=result["status"] != "busy")
        log_event(self.config.secrets, "run", duration_seconds=round(time.monotonic() - clock, 3),
                  **{k: v for k, v in result.items() if k not in ("source_statuses", "started_at", "finished_at")},
                  sources=[{"source_id": r.source_id, "state": r.state, "error": r.error, "pages": r.pages}
                           for r in runs])
        return result

    def _record(self, result: dict, keep: bool, pushed=()) -> None:
        for source in result["source_statuses"]:
            if source["already_billed"]:  # ledger ids already present: billed by the original service or others
                log_event(self.config.secrets, "already_billed", source_id=source["source_id"],
                          increments=source["already_billed"])
        try:
            with self.db.connection() as conn:
                record_run(conn, result, keep)
                for source_id in pushed:
                    count_push(conn, source_id, "failed" if result["status"] == "error" else "applied")
        except psycopg2.Error as exc:
            log_event(self.config.secrets, "run_not_recorded", job=result["job"], error=db_error_text(exc))

    def sweep(self) -> tuple[int, int]:
        """The arrears sweep that ends every run and push; a failure only logs (the next one repeats it)."""
        try:
            with self.db.connection() as conn:
                return sweep_arrears(conn, self.config.suspend_after)
        except psycopg2.Error as exc:
            log_event(self.config.secrets, "sweep_failed", error=db_error_text(exc))
        return (0, 0)

    def collect_source(self, source: Source, window, wait: float) -> SourceRun:
        run = SourceRun(source.source_id)
        try:
            # The source lock lives with this connection's session, and the
            # connection is closed after the run: no failure can leave it held.
            with self.db.connection(pooled=False) as conn:
                deadline = time.monotonic() + wait
                while not try_lock_source(conn, source.source_id):
                    if time.monotonic() >= deadline or self._stop.is_set():
                        run.state = "busy"  # another writer has it: nothing done, nothing to say
                        return run
                    time.sleep(0.2)
                self._collect_locked(conn, source, window, run)
        except Exception as exc:  # one source's surprise never stops the others
            self._fail(run, exc, [source.source_id])
        return run

    def _fail(self, run: SourceRun, exc: Exception, source_ids) -> None:
        """Record a failure on the sources' rows; their watermarks stay where they are."""
        if isinstance(exc, ExporterError):
            error = str(exc)
        elif isinstance(exc, psycopg2.errors.LockNotAvailable):
            error = "busy: another writer held the node or its accounts too long; the next run fills this in"
        elif isinstance(exc, psycopg2.Error):
            error = db_error_text(exc)
            log_event(self.config.secrets, "database_error", source_id=run.source_id, detail=str(exc).strip())
        else:
            error = f"unexpected {type(exc).__name__}: {exc}"
        run.state, run.error = "failed", self.config.secrets.redact(error, 500)
        log_event(self.config.secrets, "source_failed", source_id=run.source_id, error=run.error)
        try:
            with self.db.connection() as conn:
                for source_id in source_ids:
                    run.watermark = write_sync_state(conn, source_id, error=run.error)
        except psycopg2.Error:
            pass  # the database is what failed; the run result still says why

    def _collect_locked(self, conn, source: Source, window, run: SourceRun) -> None:
        sid = source.source_id
        mark = write_sync_state(conn, sid, attempted=utcnow())
        until = window[1] if window else minute_floor(utcnow()) - MINUTE  # the last whole minute
        since = window[0] if window else (mark.last_completed_until or until) - OVERLAP
        client = self.clients[sid]
        cursor, last_at, empty_pages, limit = "", None, 0, 1
        # One page ahead, in a helper thread (the GIL is free while PostgreSQL works); pages apply in order.
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ahead-{sid}")
        try:
            pending = ahead.submit(client.fetch, since, until, limit, cursor) if since <= until else None
            while pending is not None:
                page, pending, stop = pending.result(), None, ""
                # Checked before the page is applied: a page that breaks the protocol is rejected whole.
                if page.has_more and page.next_cursor in ("", cursor):
                    raise ExporterError("protocol error: has_more without a new next_cursor")
                run.pages += 1
                run.invalid_samples += page.invalid_samples
                empty_pages = 0 if page.snapshots else empty_pages + 1
                if page.snapshots:  # pages of about PAGE_SAMPLE_TARGET samples
                    per_snapshot = max(1, -(-page.sample_count // len(page.snapshots)))
                    limit = max(1, min(MAX_PAGE_LIMIT, PAGE_SAMPLE_TARGET // per_snapshot))
                if page.has_more:
                    if empty_pages >= MAX_EMPTY_PAGES:
                        raise ExporterError(f"protocol error: {empty_pages} empty pages in a row with has_more")
                    if run.pages >= self.config.max_pages_per_run:
                        stop = f"stopped after {run.pages} pages (MAX_PAGES_PER_RUN); the next run continues"
                    elif self._stop.is_set():
                        stop = "interrupted: the worker is stopping; the next run continues"
                    else:  # the next page downloads and parses while this one is written
                        cursor = page.next_cursor
                        pending = ahead.submit(client.fetch, since, until, limit, cursor)
                if page.snapshots:
                    last_at = page.snapshots[-1].collected_at
                    self.apply(conn, page, run, None if window else
                               lambda: write_sync_state(conn, sid, completed=last_at, commit=False))
                if stop:
                    run.state, run.error = "partial", stop
                    break
        finally:
            ahead.shutdown(wait=False, cancel_futures=True)
        # A ranged reconcile replays the past on purpose: it never moves the watermark.
        completed = None if window or run.state == "partial" else (
            last_at if last_at is not None and last_at < until else until)
        run.watermark = write_sync_state(conn, sid, completed, None if run.state == "partial" else utcnow(), "")

    # -- one page transaction, pulled or pushed --------------------------------

    def apply(self, conn, page: Page, run: SourceRun, after=None, wait: float | None = None) -> None:
        """One page, one transaction: its facts and its progress (``after``), or nothing."""
        check = False
        # A page over the sample target (one huge snapshot) is written with nothing parsed beside it.
        with PAGE_SLOT, PARSE_SLOT if page.sample_count > PAGE_SAMPLE_TARGET else nullcontext():
            for attempt in range(PAGE_ATTEMPTS):
                try:
                    metered, rated = self._rate_and_write(conn, page, wait, check)
                    if after is not None:
                        after()
                    conn.commit()
                    run.add(metered, rated)
                    return
                except (LedgerConflict, psycopg2.errors.DeadlockDetected,
                        psycopg2.errors.SerializationFailure) as exc:
                    conn.rollback()
                    check = check or isinstance(exc, LedgerConflict)
                    if attempt == PAGE_ATTEMPTS - 1:
                        raise

    def _rate_and_write(self, conn, page: Page, wait: float | None, check: bool):
        """Lock the page's nodes, read, rate, write (``check``: first look up ledger ids already there)."""
        snapshots, region = page.snapshots, self.config.region
        lock_nodes(conn, {snap.storage_node for snap in snapshots}, wait)
        baseline = {snap.storage_node for snap in snapshots if snap.source and snap.source.first_sight == "baseline"}
        reads = read_series(conn, page_series(snapshots), region, baseline, minute_floor(snapshots[0].collected_at))
        metered = meter_page(snapshots, reads, region)
        accounts = sorted({inc.account for inc in metered.increments})
        pricing, quota, billed = {}, {}, set()
        if accounts:
            profiles = read_profiles(conn, accounts)
            pricing = {a: effective_pricing(profiles.get(a), self.defaults) for a in accounts}
            # First sight of an account: its quota row starts from its pricing.
            quota = lock_quota_states(conn, {a: QuotaState(p.included_quota, self.config.initial_balance)
                                             for a, p in pricing.items()})
            if check:
                billed = billed_ids(conn, [inc.id for inc in metered.increments])
        rated = rate_increments(metered.increments, pricing, quota, self.config.peak, billed)
        write_page(conn, region, rated.buckets, rated.ledger, metered.checkpoints, rated.quota, metered.adopted)
        return metered, rated

    def ingest(self, page: Page) -> dict:
        """A pushed body, applied whole in one transaction (with its sources' sync state), or not at all."""
        started = utcnow()
        newest = {snap.source.source_id: snap.collected_at for snap in page.snapshots}  # in time order: the last wins
        run = SourceRun(",".join(sorted(newest)), invalid_samples=page.invalid_samples)

        def record_sources():
            for source_id, position in newest.items():
                run.watermark = write_sync_state(conn, source_id, position, started, "", started, commit=False)
        try:
            with self.db.connection() as conn:
                self.apply(conn, page, run, record_sources, wait=BUSY_WAIT_SECONDS)
        except Exception as exc:  # the pusher gets the reason; the next pull fills in
            self._fail(run, exc, sorted(newest))
        result = summarize("push", started, [run], self.sweep())
        self._record(result, keep=False, pushed=sorted(newest))
        return result

    # -- the background thread ------------------------------------------------

    def start(self) -> None:
        """Start the collector thread (call after fork: threads do not survive it)."""
        if self.config.collect_interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="billing-collector", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            begun = time.monotonic()
            try:
                # No waiting for busy sources: another worker is already on them.
                self.run("collect-and-rate", wait=0)
            except Exception as exc:  # the thread must outlive any one bad run
                log_event(self.config.secrets, "collector_error",
                          error=self.config.secrets.redact(f"{type(exc).__name__}: {exc}", 500))
            self._stop.wait(max(1.0, self.config.collect_interval - (time.monotonic() - begun)))


def create_app(environ=None) -> flask.Flask:
    config = load_config(os.environ if environ is None else environ)
    db = Database(config.database_url)
    collector = Collector(config, db)
    app = make_wsgi_app(config, db, collector.run, collector.ingest)
    app.extensions["billing_collector"] = collector
    for warning in config.warnings:
        log_event(config.secrets, "config_warning", message=warning)
    return app


def __getattr__(name: str):
    # Build the WSGI app on first access (gunicorn's "app:app"), not at import:
    # tests import this module for its pure parts without any environment.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
