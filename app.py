"""billing-service, the write model of traffic billing (README.md is the contract): cumulative per-user byte
counters, pulled from xray-exporters or pushed by them, become per-minute deltas, rated, and replay-safe facts
in PostgreSQL. Six sections, each using only those above it: config, exporter client, repository (all SQL),
billing core (pure), HTTP routes, collector. gunicorn serves ``app``, built on first access."""
from __future__ import annotations

import collections
import dataclasses
import decimal
import difflib
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
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import flask
import psycopg2  # with psycopg2.errors and psycopg2.extensions
import requests
import urllib3
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge

UTC = timezone.utc
MINUTE = timedelta(minutes=1)


utcnow = functools.partial(datetime.now, UTC)


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
        return self.scrub(dataclasses.asdict(value)) if dataclasses.is_dataclass(value) else self.redact(str(value))


MIN_TOKEN_LENGTH = 16  # a shorter secret cannot be told apart from ordinary text, so it cannot be redacted


class Token:
    """A bearer token: a fixed value, or a file read each time it is used (rotation needs no restart)."""

    def __init__(self, value: str, path: str, secrets: Secrets):
        self.path, self._value, self._secrets = path, value, secrets

    def get(self) -> str:
        """The current token; ValueError (with a message safe to show) when unusable."""
        if self.path:
            try:
                with open(self.path, encoding="utf-8") as handle:
                    self._value = handle.read().strip()
            except (OSError, UnicodeDecodeError):
                raise ValueError("token_file is not readable") from None
            self._secrets.add(self._value)
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
    price_per_byte: Decimal
    initial_included_quota: int
    initial_balance: Decimal
    image: str
    max_pages_per_run: int
    max_body_bytes: int  # largest exporter page or push body accepted
    peak: PeakHours | None
    suspend_after: float  # seconds in arrears before suspension; 0 = never
    secrets: Secrets
    quantum: Decimal = Decimal("0.000000001")  # MONEY_QUANTUM: every amount and balance is a multiple of it
    push_max_age: float = 86400.0  # seconds; 0 = pushed snapshots of any age are accepted
    tls: tuple[str, str, str] = ("", "", "")  # TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE ("": off)
    warnings: tuple[str, ...] = ()


DEFAULT_TIMEOUT_SECONDS = 15.0
# A double holds 15 significant digits exactly: every multiple of the quantum below quantum x 10^15.
EXACT_RANGE = 10**15
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
        return kind(default)
    try:
        value = kind(raw)
        finite = math.isfinite(value)
    except (ValueError, ArithmeticError):
        raise ConfigError(f"{name}: not a valid {'integer' if kind is int else 'number'}: {raw!r}") from None
    if not finite:
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
    """The listener's certificate, key and client CA, loaded here: a bad file stops start-up, not a handshake."""
    cert, key, client_ca = files = tuple(_env(environ, name, "") for name in TLS_VARIABLES)
    if bool(cert) != bool(key):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE go together")
    if client_ca and not cert:
        raise ConfigError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
    for name, path in zip(TLS_VARIABLES, files):
        if path:
            _readable_file(name, "file", path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for names, load, paths in (("TLS_CERT_FILE/TLS_KEY_FILE", context.load_cert_chain, (cert, key)),
                               ("TLS_CLIENT_CA_FILE", context.load_verify_locations, (client_ca,))):
        try:
            if paths[0]:
                load(*paths)
        except ssl.SSLError as exc:
            raise ConfigError(f"{names}: not usable as PEM ({exc.reason or exc})") from None
    return files


def _parse_source(raw, index: int, environ, warnings: list) -> Source:
    where = f"EXPORTER_SOURCES_JSON: source #{index}"
    if not isinstance(raw, dict) or not isinstance(raw.get("source_id"), str) or not raw["source_id"].strip():
        raise ConfigError(f"{where}: source_id is required (a non-empty string in a JSON object)")
    source_id, mode = raw["source_id"], raw.get("mode", "pull")
    where = f"EXPORTER_SOURCES_JSON: source {source_id!r}"
    if mode not in ("pull", "push"):
        raise ConfigError(f"{where}: mode must be \"pull\" or \"push\"")
    unknown = sorted(set(raw) - (_PUSH_FIELDS if mode == "push" else _SOURCE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) for a {mode} source: {', '.join(unknown)}")
    values = {"source_id": source_id, "mode": mode}
    for f in dataclasses.fields(Source):  # strings and booleans, as the defaults are
        if f.name in raw and isinstance(f.default, (str, bool)) and f.name not in values:
            if type(raw[f.name]) is not type(f.default):
                raise ConfigError(f"{where}: {f.name} must be {'a string' if f.type == 'str' else 'true or false'}")
            values[f.name] = raw[f.name].strip() if isinstance(f.default, str) else raw[f.name]
    if ":" in values.get("expected_env", ""):  # env:node is the storage node: a ":" in env would make it ambiguous
        raise ConfigError(f"{where}: expected_env must not contain ':'")
    if values.get("first_sight", "bill") not in ("bill", "baseline"):
        raise ConfigError(f"{where}: first_sight must be \"bill\" or \"baseline\"")
    if "token_file" in raw and "token_env" in raw:
        raise ConfigError(f"{where}: set token_file or token_env, not both")
    for name in ("token_file", "ca_bundle", "client_cert", "client_key"):
        if name in raw:
            values[name] = _readable_file(where, name, raw[name])
    if "token_env" in raw and not environ.get(raw["token_env"], "").strip():
        raise ConfigError(f"{where}: token_env: environment variable {raw['token_env']} is unset or empty")
    if mode == "push":
        if not values.get("expected_node_id") or not values.get("expected_env"):
            raise ConfigError(f"{where}: a push source needs expected_node_id and expected_env (its allowlist)")
        return Source(**values)
    timeout = raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
        raise ConfigError(f"{where}: timeout_seconds must be a number")
    values["timeout_seconds"] = float(timeout) if timeout > 0 else DEFAULT_TIMEOUT_SECONDS
    url = urlsplit(values.get("base_url", ""))
    try:
        host, _ = url.hostname, url.port
    except ValueError:
        raise ConfigError(f"{where}: base_url has an invalid port") from None
    if url.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{where}: base_url is required: an http(s) URL with a host")
    if url.username is not None or url.password is not None:
        # Credentials in URLs end up in logs and proxies: use token_file/token_env.
        raise ConfigError(f"{where}: base_url must not carry credentials; use token_file or token_env")
    if url.query or url.fragment:
        raise ConfigError(f"{where}: base_url must not have a query or fragment")
    if url.scheme == "http" and not is_loopback_host(host):
        if not values.get("allow_plain_http"):
            raise ConfigError(f"{where}: base_url uses plain http to a non-loopback host; use https "
                              "(or set allow_plain_http: true for a trusted private link)")
        warnings.append(f"source {source_id!r}: plain http to {host} (allow_plain_http): traffic is not encrypted")
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
    quantum = _number(environ, "MONEY_QUANTUM", "0.000000001", Decimal)
    if quantum <= 0:
        raise ConfigError(f"MONEY_QUANTUM: must be above zero, got {environ['MONEY_QUANTUM']!r}")
    balance = _number(environ, "INITIAL_BALANCE", "0", Decimal)
    if abs(balance) >= quantum * EXACT_RANGE or balance % quantum:
        raise ConfigError(f"INITIAL_BALANCE: must be a multiple of MONEY_QUANTUM ({quantum}) below "
                          f"{quantum * EXACT_RANGE} in magnitude, got {balance}")
    taken = set(KNOWN_VARIABLES) | {s.token_env for s in sources}
    for name in sorted(set(environ) - taken):
        near = difflib.get_close_matches(name.upper(), KNOWN_VARIABLES, n=1, cutoff=0.85)
        if near:
            warnings.append(f"{name} is not a billing-service variable: did you mean {near[0]}? (it is ignored)")
    return Config(
        database_url=database_url, service_token=token, sources=sources, tokens=tokens,
        listen_addr=_listen_addr(_env(environ, "LISTEN_ADDR", ":8081")), collect_interval=interval,
        region=environ.get("DEFAULT_REGION", ""),  # verbatim: it is part of every bucket's key
        source_revision=_env(environ, "SOURCE_REVISION", "billing-service-v1"),
        price_per_byte=_number(environ, "PRICE_PER_BYTE", "0", Decimal, minimum=0),
        initial_included_quota=_number(environ, "INITIAL_INCLUDED_QUOTA_BYTES", 0, int, minimum=0),
        initial_balance=balance, quantum=quantum, push_max_age=_duration(environ, "PUSH_MAX_AGE", "24h"),
        image=environ.get("IMAGE", "").strip(), peak=_peak_hours(environ),
        max_pages_per_run=_number(environ, "MAX_PAGES_PER_RUN", 10000, int, minimum=1),
        max_body_bytes=_number(environ, "MAX_BODY_BYTES", 16 * 1024 * 1024, int, minimum=65536),
        suspend_after=_duration(environ, "ARREARS_SUSPEND_THRESHOLD", "336h"),
        secrets=secrets, warnings=tuple(warnings), tls=_listener_tls(environ))


# Every variable the service reads (gunicorn.conf.py reads WEB_CONCURRENCY): a near miss is warned about.
KNOWN_VARIABLES = ("DATABASE_URL", "INTERNAL_SERVICE_TOKEN", "EXPORTER_SOURCES_JSON", "EXPORTER_BASE_URL", "LISTEN_ADDR",
                   "COLLECT_INTERVAL", "DEFAULT_REGION", "SOURCE_REVISION", "PRICE_PER_BYTE", "INITIAL_BALANCE", "IMAGE",
                   "INITIAL_INCLUDED_QUOTA_BYTES", "MAX_PAGES_PER_RUN", "MAX_BODY_BYTES", "PEAK_HOURS", "PEAK_TIMEZONE",
                   "ARREARS_SUSPEND_THRESHOLD", "MONEY_QUANTUM", "PUSH_MAX_AGE", "WEB_CONCURRENCY", *TLS_VARIABLES)


_log = logging.getLogger("billing_service")
if not _log.handlers:  # the message alone: each one is a JSON line (log_event)
    _log.addHandler(logging.StreamHandler(sys.stderr))
    _log.setLevel(logging.INFO)
    _log.propagate = False


def log_event(secrets: Secrets, event: str, **fields) -> None:
    """One JSON line on stderr; every string in it is redacted before encoding."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    _log.info(json.dumps({"time": now, "event": event, **secrets.scrub(fields)}))


class Throttled:
    """log_event at most once per ``interval`` s per event and ``key``; the next line counts those left out."""

    def __init__(self, secrets: Secrets, interval: float = 10.0):
        self._secrets, self._interval, self._lock = secrets, interval, threading.Lock()
        self._last, self._suppressed = {}, collections.Counter()

    def __call__(self, event: str, key=(), **fields) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last.get((event, key), -self._interval) < self._interval:
                self._suppressed[event, key] += 1
                return
            self._last[event, key], suppressed = now, self._suppressed.pop((event, key), 0)
        log_event(self._secrets, event, **fields, suppressed=suppressed)


_COMMIT = re.compile(r"(?:sha-)?([0-9a-f]{40})")


def parse_image(image: str) -> dict:
    """Tag, commit and version of an image reference; empty where unknown."""
    _, sep, tag = image.split("@", 1)[0].rpartition(":")
    tag = tag if sep and "/" not in tag else ""  # no tag, or the colon was a registry port
    commit = match.group(1) if (match := _COMMIT.fullmatch(tag)) else ""
    return {"image": image, "tag": tag, "commit": commit, "version": commit}


# ---- exporter client: pages and pushed snapshots, every byte treated as hostile --

class ExporterError(Exception):
    """A refused page or body; the message is for the token holder, open endpoints show only ``category``."""
    category = "bad_page"

    def __init__(self, message: str, category: str = ""):
        super().__init__(message)
        self.category = category or self.category


class WrongNode(ExporterError):
    """A snapshot of a node this source (or push token) may not deliver."""
    category = "wrong_node"


# account: canonical lowercase UUID; uplink, downlink: the cumulative counters.
Sample = collections.namedtuple("Sample", "account inbound_tag uplink downlink")
# collected_at: UTC, microseconds; storage_node: env:node_id (node_id when env is empty); source: who
# delivered it (its first_sight applies).
Snapshot = collections.namedtuple("Snapshot", "collected_at storage_node samples source", defaults=(None,))


@dataclass
class Page:
    snapshots: list  # of Snapshot, in collected_at order
    has_more: bool = False
    next_cursor: str = ""
    invalid: collections.Counter = field(default_factory=collections.Counter)  # invalid samples by reason
    sample_count: int = 0


MAX_PAGE_LIMIT = 120  # snapshots per page, the exporter protocol's page size
PAGE_SAMPLE_TARGET = 50000  # samples per pulled page: bounds memory, amortizes per-page work
# A worker's memory: a page or pushed body is parsed and written holding PAGE_SLOT,
# one at a time per process; only raw bodies (at most MAX_BODY_BYTES each) wait
# outside it. json.loads costs up to ~300 bytes per JSON value at its peak (one-key
# objects nested with a different key each; {} and [] take 25 times their text),
# and a body holds at most one value per comma, opening bracket or NDJSON line,
# plus one: a parse stays under ~210 MB. Writing holds ~2.5 KB a sample: ~250 MB
# at MAX_PAGE_SAMPLES.
MAX_JSON_VALUES = 700_000
MAX_PAGE_SAMPLES = 100_000
PAGE_SLOT = threading.Lock()
MAX_COUNTER = 2**63 - 1
MAX_LABEL = 255
MAX_PUSH_AHEAD = timedelta(minutes=5)  # a pushed snapshot from further ahead would freeze its series
INVALID_REASONS = ("not_an_object", "bad_counter", "bad_uuid", "bad_label", "duplicate")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# NUL and lone surrogates (JSON "\ud800"): no UTF-8 form, PostgreSQL and URLs cannot take them.
_UNENCODABLE = re.compile("[\x00\ud800-\udfff]")
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def parse_time(text) -> datetime | None:
    """RFC3339 (Z or offset, up to nanoseconds) as UTC, cut to microseconds as PostgreSQL stores it."""
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    try:
        return match and datetime.fromisoformat(
            f"{match[1]}T{match[2]}{(match[3] or '')[:7]}{'+00:00' if match[4] in 'Zz' else match[4]}").astimezone(UTC)
    except (ValueError, OverflowError):
        return None


@functools.lru_cache(maxsize=4096)  # a page repeats a few minutes and collection times in every row and ledger id
def format_time(stamp: datetime | None) -> str | None:
    """RFC3339 in UTC with Z, fractional seconds only when there are any."""
    return None if stamp is None else stamp.astimezone(UTC).isoformat().replace("+00:00", "Z")


def minute_floor(stamp: datetime) -> datetime:
    return stamp.replace(second=0, microsecond=0)


def parse_sample(raw) -> Sample | str:
    """One exporter sample, or the reason it is invalid (one of INVALID_REASONS: skipped and counted)."""
    if type(raw) is not dict:
        return "not_an_object"
    up, down = raw.get("uplink_bytes_total"), raw.get("downlink_bytes_total")
    # type() rather than isinstance(): JSON true/false must not count as 1/0. Both directions
    # together must fit one bucket's total_bytes (BIGINT).
    if type(up) is not int or type(down) is not int or not (0 <= up and 0 <= down and up + down <= MAX_COUNTER):
        return "bad_counter"
    account = raw.get("uuid")
    if type(account) is not str:
        return "bad_uuid"
    if not _UUID.fullmatch(account):
        try:
            account = str(uuid.UUID(account))
        except ValueError:
            return "bad_uuid"
    tag = raw.get("inbound_tag")
    if tag is None:
        tag = ""
    elif type(tag) is not str or len(tag) > MAX_LABEL or _UNENCODABLE.search(tag):
        return "bad_label"
    return Sample(account, tag, up, down)


def _label(raw, what: str, default: str, forbidden: str = "#") -> str:
    # Storage nodes are env:node and series keys node#tag: neither separator may hide inside a part.
    if raw is None:
        return default
    if not isinstance(raw, str) or len(raw) > MAX_LABEL or _UNENCODABLE.search(raw):
        raise ExporterError(f"malformed page: {what} is not a short string")
    for char in forbidden:
        if char in raw:
            raise ExporterError(f"malformed page: {what} contains '{char}'")
    return raw


def decode_json(body: bytes, ndjson: bool = False):
    """The JSON document, or for NDJSON an iterator of each line's, within the memory budget."""
    if body[:2] == b"\x1f\x8b":
        raise ExporterError("gzip is not accepted; send identity (uncompressed) JSON")
    values = body.count(b",") + body.count(b"[") + body.count(b"{") + (body.count(b"\n") if ndjson else 0)
    if values >= MAX_JSON_VALUES:
        raise ExporterError(f"body holds more than {MAX_JSON_VALUES} JSON values (the memory budget)", "budget")
    if ndjson:
        return _ndjson_lines(body)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        if getattr(exc, "msg", "") == "Extra data" and b"\n" in body.strip():
            raise ExporterError("body is not one JSON document: NDJSON needs Content-Type application/x-ndjson")
        raise ExporterError("malformed page: body is not JSON") from None


def _ndjson_lines(body: bytes):
    for number, line in enumerate(io.BytesIO(body), start=1):  # one line at a time, never a list of them
        if line.strip():
            try:
                yield json.loads(line)
            except (ValueError, RecursionError):
                raise ExporterError(f"malformed body: NDJSON line {number} is not JSON") from None


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
    """Add a snapshot to ``page`` from the first of ``sources`` expecting its node; invalid samples are counted."""
    if not isinstance(raw, dict):
        raise ExporterError("malformed page: a snapshot is not an object")
    collected_at = parse_time(raw.get("collected_at"))
    if collected_at is None:
        raise ExporterError("malformed page: a snapshot has no valid RFC3339 collected_at")
    node_id = _label(raw.get("node_id"), "snapshot node_id", node_default)
    env = _label(raw.get("env"), "snapshot env", env_default, "#:")
    if not node_id:
        raise ExporterError("malformed page: a snapshot has no node_id")
    source = next((s for s in sources if _expects(s, node_id, env)), None)
    if source is None:
        raise _wrong_node("snapshot", node_id, env, sources[0])
    raw_samples = _list(raw, "samples", "a snapshot's samples")
    page.sample_count += len(raw_samples)
    if page.sample_count > MAX_PAGE_SAMPLES:
        raise ExporterError(f"page holds more than {MAX_PAGE_SAMPLES} samples (the memory budget)", "budget")
    parsed = list(map(parse_sample, raw_samples))
    page.invalid.update(reason for reason in parsed if type(reason) is str)
    samples = [sample for sample in parsed if type(sample) is not str]
    series = collections.Counter((s.account, s.inbound_tag) for s in samples)
    if len(series) < len(samples):  # one series twice: neither value can be trusted, in any order
        page.invalid["duplicate"] += sum(count for count in series.values() if count > 1)
        samples = [s for s in samples if series[s.account, s.inbound_tag] == 1]
    page.snapshots.append(Snapshot(collected_at, f"{env}:{node_id}" if env else node_id, samples, source))
    return page.snapshots[-1]


def parse_page(body: bytes, source: Source, since: datetime, until: datetime) -> Page:
    """Validate one window page (call it holding PAGE_SLOT). Page-level faults raise; bad samples are counted."""
    doc = decode_json(body)
    if not isinstance(doc, dict):
        raise ExporterError("malformed page: body is not a JSON object")
    raw_snapshots = _list(doc, "snapshots", "snapshots")
    has_more = doc.get("has_more", False)
    if not isinstance(has_more, bool):
        raise ExporterError("malformed page: has_more is not a boolean")
    page = Page([], has_more, _label(doc.get("next_cursor"), "next_cursor", "", forbidden=""))
    page_node, page_env = _label(doc.get("node_id"), "node_id", ""), _label(doc.get("env"), "env", "", "#:")
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


def parse_push(body: bytes, ndjson: bool, sources, now: datetime, max_age: float) -> Page:
    """A pushed body (hold PAGE_SLOT): a snapshot, a JSON array or NDJSON of them; one fault refuses it all."""
    doc = decode_json(body, ndjson)
    page = Page([])
    for raw in doc if isinstance(doc, list) or ndjson else [doc]:
        snap = parse_snapshot(page, raw, sources)
        if snap.collected_at > now + MAX_PUSH_AHEAD:
            raise ExporterError(f"snapshot at {format_time(snap.collected_at)} is in the future")
        if max_age and snap.collected_at < now - timedelta(seconds=max_age):
            raise ExporterError(f"snapshot at {format_time(snap.collected_at)} is older than PUSH_MAX_AGE "
                                f"({max_age:g}s): deliver older history through a pull source")
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

    def fetch(self, since: datetime, until: datetime, limit: int, cursor: str) -> bytearray:
        """One window page's body, read within timeout_seconds and MAX_BODY_BYTES (parse_page validates it)."""
        try:
            token = self.token.get()
        except ValueError as exc:
            raise ExporterError(str(exc), "token") from None
        params = {"since": format_time(since), "until": format_time(until), "limit": str(limit),
                  **({"cursor": cursor} if cursor else {})}  # the cursor verbatim: exporters compare it to the ns
        # identity: a compressed body would be unpacked before the size cap could see it.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", "Authorization": f"Bearer {token}"}
        timeout = self.source.timeout_seconds
        deadline = time.monotonic() + timeout
        too_large = f"exporter page is larger than {self.max_body} bytes (MAX_BODY_BYTES)"
        unreachable = "exporter_unreachable"
        try:
            with self.session.get(self.url, params=params, headers=headers, timeout=timeout,
                                  stream=True, allow_redirects=False) as response:
                if response.status_code != 200:
                    raise ExporterError(f"exporter answered HTTP {response.status_code}", unreachable)
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
                        raise ExporterError(f"exporter page took longer than {timeout:g}s", unreachable)
        except requests.exceptions.SSLError:
            raise ExporterError("TLS handshake or certificate verification failed "
                                "(check ca_bundle / client_cert)", unreachable) from None
        except (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError):
            raise ExporterError(f"exporter did not answer within {timeout:g}s", unreachable) from None
        except requests.exceptions.ConnectionError:
            raise ExporterError("could not connect to the exporter", unreachable) from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            # requests' messages can echo URLs; keep only the kind of failure.
            raise ExporterError(f"request failed ({type(exc).__name__})", unreachable) from None
        except OSError:  # requests checks the TLS file paths itself; a rotation can remove one
            raise ExporterError("a TLS file (ca_bundle / client_cert / client_key) is missing or unreadable",
                                unreachable) from None
        return body


# ---- repository: every SQL statement, parameterized; I/O and nothing clever --

# The last applied totals of one series (one cumulative counter pair).
Checkpoint = collections.namedtuple("Checkpoint", "uplink downlink last_seen_at reset_epoch", defaults=(0,))


@dataclass(slots=True)
class QuotaState:
    remaining: int  # included bytes left
    balance: Decimal  # the decimal the stored double prints as
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
    multiplier: Decimal = Decimal(1)
    version: str = ""


LedgerEntry = collections.namedtuple("LedgerEntry", "id account bucket_start rated_bytes amount balance_after version")
# A source's row of billing_source_sync_state.
Watermark = collections.namedtuple("Watermark", "source_id last_completed_until last_attempted_at last_succeeded_at "
                                                "last_error", defaults=(None, None, None, ""))


# What a page transaction reads, under its node locks: ``known`` accounts (a users row); ``checkpoints``
# (series key, account) -> Checkpoint, each series' own and each (node, account)'s plain key; ``seen``
# (node, account) with any checkpoint on the node; ``inherited`` (node, account) whose plain-key row the
# original service left and nobody has taken over; ``marks`` node -> its newest snapshot applied.
SeriesReads = collections.namedtuple("SeriesReads", "known checkpoints seen inherited marks", defaults=({},))


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


def db_error_text(exc: psycopg2.Error) -> str:  # libpq's connection errors name hosts, ports, users, paths
    return f"database: {type(exc).__name__}" if exc.pgcode else "database: unavailable"


# What the service does in the shared database, table by table (README: Grants).
_WRITE = "SELECT, INSERT, UPDATE"
REQUIRED_GRANTS = {"users": "SELECT", "account_billing_profiles": "SELECT", "billing_ledger": "SELECT, INSERT",
                   "traffic_stat_checkpoints": f"{_WRITE}, DELETE", "traffic_minute_buckets": _WRITE,
                   "account_quota_states": _WRITE, "billing_source_sync_state": _WRITE, "billing_node_marks": _WRITE,
                   "billing_inherited_checkpoints": "SELECT, DELETE", "billing_job_runs": "SELECT, INSERT, DELETE",
                   "billing_job_totals": _WRITE, "billing_push_totals": _WRITE}


def missing_grants(conn) -> list:
    """What the connected role lacks (or tables schema.sql has not created), as 'table: PRIVILEGE'."""
    return [row[0] for row in _sql(conn, """
        SELECT DISTINCT CASE WHEN to_regclass('public.' || t) IS NULL THEN t || ': missing (apply schema.sql)'
                             ELSE t || ': ' || p END
        FROM unnest(%s::text[], %s::text[]) AS g(t, privileges), unnest(string_to_array(privileges, ', ')) AS p
        WHERE CASE WHEN to_regclass('public.' || t) IS NULL THEN true ELSE NOT has_table_privilege('public.' || t, p) END
        UNION ALL SELECT 'database: TEMPORARY' WHERE NOT has_database_privilege(current_database(), 'TEMPORARY')
        UNION ALL SELECT 'billing_job_runs_id_seq: USAGE'
        WHERE to_regclass('public.billing_job_runs_id_seq') IS NOT NULL
          AND NOT has_sequence_privilege('public.billing_job_runs_id_seq', 'USAGE')""",
        (list(REQUIRED_GRANTS), list(REQUIRED_GRANTS.values())))]


def priced_profiles(conn) -> tuple[int, int]:
    """(profiles with a price of their own, all profiles): whether a zero PRICE_PER_BYTE bills anyone."""
    return _sql(conn, "SELECT count(*) FILTER (WHERE base_price_per_byte > 0), count(*) FROM account_billing_profiles")[0]


BUSY_WAIT_SECONDS = 10.0  # how long an HTTP run (or a push) waits for a source or node another writer holds
_SOURCE_LOCKS, _NODE_LOCKS = 0x62696C6C, 0x62696C6E  # advisory lock namespaces: "bill", "biln"


def lock_key(name: str) -> int:
    return zlib.crc32(name.encode()) - 2**31


def try_lock_source(conn, source_id: str) -> bool:
    """One writer per source: a session lock, released when the connection closes."""
    return _sql(conn, "SELECT pg_try_advisory_lock(%s, %s)", (_SOURCE_LOCKS, lock_key(source_id)))[0][0]


def unlock_source(conn, source_id: str) -> None:
    """At once: a closed connection's backend lets go of its locks only when it exits (after the answer)."""
    conn.rollback()
    _sql(conn, "SELECT pg_advisory_unlock(%s, %s)", (_SOURCE_LOCKS, lock_key(source_id)))


def source_run_age(conn, source_id: str) -> tuple[float, float]:
    """(seconds since the source's current run started, seconds since its watermark last moved)."""
    rows = _sql(conn, """SELECT extract(epoch FROM now() - last_attempted_at), extract(epoch FROM now() - updated_at)
                         FROM billing_source_sync_state WHERE source_id = %s""", (source_id,))
    return tuple(float(value or 0) for value in rows[0]) if rows else (0.0, 0.0)


def lock_nodes(conn, nodes, wait_seconds: float | None = None) -> None:
    """One writer per storage node, whoever delivers it; in key order, so pages never deadlock."""
    if wait_seconds is not None:
        _sql(conn, "SELECT set_config('lock_timeout', %s, true)", (f"{int(wait_seconds * 1000)}ms",), False)
    for key in sorted({lock_key(node) for node in nodes}):
        _sql(conn, "SELECT pg_advisory_xact_lock(%s, %s)", (_NODE_LOCKS, key), False)


def write_sync_state(conn, source_id: str, completed=None, succeeded=None, error=None, attempted=None,
                     starting=False, commit=True) -> Watermark:
    """A run's start (and where it starts), progress, end or failure, or a push; None keeps a value."""
    return Watermark(*_sql(conn, """
        INSERT INTO billing_source_sync_state AS w
          (source_id, last_completed_until, last_attempted_at, last_succeeded_at, last_error)
        VALUES (%s, %s, %s, %s, coalesce(%s, ''))
        ON CONFLICT (source_id) DO UPDATE SET
          last_completed_until = GREATEST(w.last_completed_until, EXCLUDED.last_completed_until),
          last_attempted_at = GREATEST(w.last_attempted_at, EXCLUDED.last_attempted_at),
          last_succeeded_at = coalesce(EXCLUDED.last_succeeded_at, w.last_succeeded_at),
          last_error = coalesce(%s, w.last_error),
          run_from = CASE WHEN %s THEN w.last_completed_until ELSE w.run_from END, updated_at = now()
        RETURNING source_id, last_completed_until, last_attempted_at, last_succeeded_at, last_error""",
        (source_id, completed, attempted, succeeded, error, error, starting), commit)[0])


# Page-scoped scratch tables: filled with COPY, joined set-based, emptied at
# commit. One fixed set of statements per page, whatever its size.
_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS page_series (series_node TEXT, storage_node TEXT, account_uuid UUID) ON COMMIT DELETE ROWS;
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


@functools.lru_cache(maxsize=4096)  # a page repeats a few labels and minutes in every row
def _text(value) -> str:
    """A label or a time in COPY's text format: NULL, a time, or text escaped."""
    if value is None:
        return "\\N"
    return format_time(value) if isinstance(value, datetime) else value.translate(_COPY_ESCAPES)


def _copy(cur, table: str, lines) -> None:
    """COPY lines into a scratch table, as UTF-8 bytes. Accounts, ledger ids (canonical UUIDs) and numbers need no
    escaping; labels and times go through _text."""
    cur.copy_expert(f"COPY {table} FROM STDIN", io.BytesIO("".join(lines).encode()), size=65536)


def read_series(conn, series: list) -> SeriesReads:
    """What the core needs about the page's (series key, storage node, account) triples (SeriesReads); the
    costly prefix scan only when a series is new to the database."""
    with conn.cursor() as cur:
        cur.execute(_TEMP_TABLES)
        _copy(cur, "page_series", [f"{_text(key)}\t{_text(node)}\t{account}\n" for key, node, account in series])
    known = {row[0] for row in _sql(conn, "SELECT DISTINCT u.uuid::text FROM users u JOIN page_series s "
                                          "ON s.account_uuid = u.uuid", commit=False)}
    reads = SeriesReads(known, {}, set(), set(), {})
    for key, node, account, up, down, seen, epoch, inherited in _sql(conn, """
            SELECT s.series_node, s.storage_node, s.account_uuid::text, c.last_uplink_total, c.last_downlink_total,
                   c.last_seen_at, c.reset_epoch, i.node_id IS NOT NULL
            FROM page_series s
            JOIN traffic_stat_checkpoints c ON c.node_id = s.series_node AND c.account_uuid = s.account_uuid
            LEFT JOIN billing_inherited_checkpoints i ON i.node_id = c.node_id AND i.account_uuid = c.account_uuid""",
                                                                            commit=False):
        reads.checkpoints[(key, account)] = Checkpoint(up, down, seen, epoch)
        reads.seen.add((node, account))
        if inherited:
            reads.inherited.add((key, account))
    reads.marks.update(_sql(conn, "SELECT node_id, last_snapshot_at FROM billing_node_marks WHERE node_id = ANY(%s)",
                            (list({node for _, node, _ in series}),), False))
    if any((key, account) not in reads.checkpoints and (node, account) not in reads.seen and account in known
           for key, node, account in series):  # rare: a node's or an account's first series
        reads.seen.update(tuple(row) for row in _sql(conn, """
            SELECT DISTINCT s.storage_node, s.account_uuid::text FROM page_series s JOIN traffic_stat_checkpoints c
              ON c.account_uuid = s.account_uuid AND starts_with(c.node_id, s.storage_node || '#')""", commit=False))
    return reads


def read_profiles(conn, accounts) -> dict:
    return {row[0]: row[1:] for row in _sql(conn, """
        SELECT account_uuid::text, included_quota_bytes, base_price_per_byte, region_multiplier, line_multiplier,
               peak_multiplier, offpeak_multiplier, pricing_rule_version
        FROM account_billing_profiles WHERE account_uuid = ANY(%s::uuid[])""", (list(accounts),), False)}


def as_decimal(value) -> Decimal:
    """A stored double as the decimal it prints as (the shortest text that reads back as it)."""
    return Decimal(repr(float(value)))


def lock_quota_states(conn, initial: dict) -> dict:
    """Create missing quota rows from ``initial``, then lock all of them in account order (no deadlocks)."""
    with conn.cursor() as cur:
        _copy(cur, "page_quota", [f"{a}\t{q.remaining}\t{q.balance}\t\\N\t\\N\n" for a, q in initial.items()])
        cur.execute("""
            INSERT INTO account_quota_states (account_uuid, remaining_included_quota, current_balance, arrears,
              throttle_state, suspend_state) SELECT account_uuid, remaining, balance, balance < 0,
              CASE WHEN balance < 0 THEN 'throttled' ELSE 'normal' END, 'active'
            FROM page_quota ORDER BY account_uuid ON CONFLICT (account_uuid) DO NOTHING;
            SELECT q.account_uuid::text, q.remaining_included_quota, q.current_balance, q.last_rated_bucket_at,
              q.arrears_since FROM account_quota_states q JOIN page_quota p USING (account_uuid)
            ORDER BY q.account_uuid FOR UPDATE OF q""")
        states = {row[0]: QuotaState(row[1], as_decimal(row[2]), *row[3:]) for row in cur.fetchall()}
        cur.execute("TRUNCATE page_quota")
    missing = initial.keys() - states.keys()
    if missing:
        raise RuntimeError(f"the quota row of account {min(missing)} disappeared during the page")
    return states


def billed_ids(conn, ids: list) -> set:
    """Ids already in the ledger (checkpoints restored from an older backup, say): billed, not again."""
    return {r[0] for r in _sql(conn, "SELECT id::text FROM billing_ledger WHERE id = ANY(%s::uuid[])", (ids,), False)}


def write_page(conn, region: str, buckets, ledger, checkpoints: dict, quota: dict, dropped=(), taken=(),
               marks=None) -> None:
    """Write one page's facts inside its transaction (the caller commits); see MeteredPage for the rest."""
    with conn.cursor() as cur:
        if marks:
            cur.execute("""INSERT INTO billing_node_marks AS m SELECT * FROM unnest(%s::text[], %s::timestamptz[])
                ORDER BY 1 ON CONFLICT (node_id) DO UPDATE SET last_snapshot_at = GREATEST(m.last_snapshot_at,
                EXCLUDED.last_snapshot_at)""", (list(marks), list(marks.values())))
        if buckets:
            _copy(cur, "page_buckets", [f"{_text(b.bucket_start)}\t{_text(b.node_id)}\t{b.account}\t{_text(b.line_code)}\t"
                                        f"{b.uplink}\t{b.downlink}\t{b.multiplier}\t{_text(b.version)}\n" for b in buckets])
            # Bytes accumulate: a second sample of a minute adds, never overwrites. Rows go in account order
            # here and in the ledger: an account's rows of a page share a leaf of the account-first index.
            cur.execute("""
                INSERT INTO traffic_minute_buckets AS t (bucket_start, node_id, account_uuid, region, line_code,
                  uplink_bytes, downlink_bytes, total_bytes, multiplier, rating_status, source_revision)
                SELECT bucket_start, node_id, account_uuid, %s, line_code, uplink, downlink, uplink + downlink,
                  multiplier, 'rated', source_revision FROM page_buckets ORDER BY account_uuid
                ON CONFLICT (bucket_start, node_id, account_uuid, region, line_code) DO UPDATE SET
                  uplink_bytes = t.uplink_bytes + EXCLUDED.uplink_bytes, downlink_bytes = t.downlink_bytes +
                  EXCLUDED.downlink_bytes, total_bytes = t.total_bytes + EXCLUDED.total_bytes, multiplier =
                  EXCLUDED.multiplier, rating_status = 'rated', source_revision = EXCLUDED.source_revision,
                  updated_at = now()""", (region,))
        if ledger:
            _copy(cur, "page_ledger", [f"{i}\t{e.id}\t{e.account}\t{_text(e.bucket_start)}\t{e.rated_bytes}\t{e.amount}\t"
                                       f"{e.balance_after}\t{_text(e.version)}\n" for i, e in enumerate(ledger)])
            cur.execute("""
                INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
                  amount_delta, balance_after, pricing_rule_version, created_at)
                SELECT id, account_uuid, bucket_start, bucket_start + interval '1 minute', 'traffic_charge',
                  rated_bytes, amount_delta, balance_after, version, clock_timestamp() FROM page_ledger
                ORDER BY account_uuid, seq""")
        if checkpoints:
            _copy(cur, "page_checkpoints", [f"{_text(key)}\t{account}\t{c.uplink}\t{c.downlink}\t{_text(c.last_seen_at)}\t"
                                            f"{c.reset_epoch}\n" for (key, account), c in checkpoints.items()])
            cur.execute("""
                INSERT INTO traffic_stat_checkpoints AS t (node_id, account_uuid, last_uplink_total,
                  last_downlink_total, last_seen_at, reset_epoch) SELECT * FROM page_checkpoints
                ON CONFLICT (node_id, account_uuid) DO UPDATE SET last_uplink_total = EXCLUDED.last_uplink_total,
                  last_downlink_total = EXCLUDED.last_downlink_total, last_seen_at = EXCLUDED.last_seen_at,
                  reset_epoch = EXCLUDED.reset_epoch, updated_at = now() WHERE t.last_seen_at < EXCLUDED.last_seen_at""")
        for table, pairs in (("traffic_stat_checkpoints", dropped), ("billing_inherited_checkpoints", taken)):
            if pairs:
                cur.execute(f"DELETE FROM {table} WHERE (node_id, account_uuid) IN "
                            "(SELECT * FROM unnest(%s::text[], %s::uuid[]))", ([n for n, _ in pairs], [a for _, a in pairs]))
        if quota:
            _copy(cur, "page_quota", [f"{a}\t{q.remaining}\t{q.balance}\t{_text(q.last_rated_bucket_at)}\t"
                                      f"{_text(q.arrears_since)}\n" for a, q in quota.items()])
            cur.execute("""
                UPDATE account_quota_states q SET remaining_included_quota = p.remaining, current_balance = p.balance,
                  arrears = p.balance < 0, arrears_since = p.arrears_since, last_rated_bucket_at = p.last_rated,
                  throttle_state = CASE WHEN p.balance < 0 THEN 'throttled' ELSE 'normal' END, effective_at = now(),
                  updated_at = now() FROM page_quota p WHERE q.account_uuid = p.account_uuid""")


def sweep_arrears(conn, suspend_after: float) -> tuple[int, int]:
    """Every debtor gets an arrears clock (from now, where rating set none), is suspended after ``suspend_after``
    s (0: never), lifted at a balance >= 0 only from billing's own suspension. Rows locked in account order."""
    rows = _sql(conn, """
        WITH due AS (
          SELECT account_uuid, suspend_state AS was, current_balance < 0 AS owing,
                 coalesce(arrears_since, now()) AS since FROM account_quota_states
          WHERE CASE WHEN current_balance < 0
                     THEN NOT arrears OR arrears_since IS NULL OR (%(after)s > 0 AND suspend_state <> 'suspended'
                          AND arrears_since <= now() - make_interval(secs => %(after)s))
                     ELSE arrears OR arrears_since IS NOT NULL OR suspended_by_billing END
          ORDER BY account_uuid FOR UPDATE),
        moved AS (SELECT *, owing AND %(after)s > 0 AND was <> 'suspended'
                            AND since <= now() - make_interval(secs => %(after)s) AS suspend FROM due)
        UPDATE account_quota_states q
        SET arrears = m.owing, arrears_since = CASE WHEN m.owing THEN m.since END,
            throttle_state = CASE WHEN m.owing THEN 'throttled' ELSE 'normal' END,
            suspend_state = CASE WHEN m.suspend THEN 'suspended'
                                 WHEN NOT m.owing AND q.suspended_by_billing THEN 'active' ELSE q.suspend_state END,
            suspended_by_billing = m.suspend OR (m.owing AND q.suspended_by_billing), updated_at = now()
        FROM moved m WHERE q.account_uuid = m.account_uuid RETURNING q.suspend_state, m.was""", {"after": suspend_after})
    return (sum(now == "suspended" and was != "suspended" for now, was in rows),
            sum(now == "active" and was == "suspended" for now, was in rows))


RUN_RETENTION = 1000  # finished runs kept in billing_job_runs
RUN_COUNTS = ("processed_samples", "written_minutes", "replayed_minutes", "invalid_samples",
              "unknown_account_samples", "counter_resets", "already_billed", "baselined")  # each source run's
INVALID_FIELDS = tuple(f"invalid_{reason}" for reason in INVALID_REASONS)
TOTAL_FIELDS = RUN_COUNTS + INVALID_FIELDS + ("suspended", "lifted")  # a run's result: those, and the sweep's


def record_run(conn, result: dict, keep: bool = True) -> None:
    """Count a run (or push) in billing_job_totals; ``keep`` it for /v1/status and /healthz too."""
    if keep:
        _sql(conn, "INSERT INTO billing_job_runs (job, status, started_at, finished_at, result) "
                   "VALUES (%s, %s, %s, %s, %s)", (result["job"], result["status"], result["started_at"],
                                                   result["finished_at"], json.dumps(result)), False)
        _sql(conn, "DELETE FROM billing_job_runs WHERE id <= "
                   "(SELECT id FROM billing_job_runs ORDER BY id DESC OFFSET %s LIMIT 1)", (RUN_RETENTION,), False)
    counts = {**result, **{f"invalid_{k}": v for k, v in result["invalid_by_reason"].items()}}
    _sql(conn, f"""
        INSERT INTO billing_job_totals AS t (job, status, runs, {', '.join(TOTAL_FIELDS)})
        VALUES (%s, %s, 1, {', '.join(['%s'] * len(TOTAL_FIELDS))})
        ON CONFLICT (job, status) DO UPDATE SET runs = t.runs + 1,
          {', '.join(f"{name} = t.{name} + EXCLUDED.{name}" for name in TOTAL_FIELDS)}""",
         (result["job"], result["status"], *(counts.get(name, 0) for name in TOTAL_FIELDS)))


def add_push_totals(conn, counts: dict) -> None:
    """Add pushed bodies by (source_id, outcome): applied, failed, rejected."""
    _sql(conn, """INSERT INTO billing_push_totals AS t (source_id, outcome, pushes)
                  SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) ORDER BY 1, 2
                  ON CONFLICT (source_id, outcome) DO UPDATE SET pushes = t.pushes + EXCLUDED.pushes""",
         ([s for s, _ in counts], [o for _, o in counts], list(counts.values())))


def last_run(conn) -> dict | None:
    _sql(conn, "SET LOCAL statement_timeout = 2000", commit=False)  # a probe must not hang on a stuck database
    rows = _sql(conn, "SELECT result FROM billing_job_runs ORDER BY id DESC LIMIT 1")
    return rows[0][0] if rows else None


def read_source_views(conn, source_ids, started: datetime) -> dict:
    """Each source's row, lag (from ``started`` while it has no watermark), and whether a run holds it now."""
    return {row[0]: row for row in _sql(conn, """
        SELECT s.source_id, w.last_completed_until, w.last_attempted_at, w.last_succeeded_at, w.last_error,
               extract(epoch FROM now() - coalesce(w.last_completed_until, %s)),
               EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                       WHERE l.locktype = 'advisory' AND d.datname = current_database() AND l.granted
                         AND l.classid::bigint = %s AND l.objid::bigint = s.lock AND l.objsubid = 2),
               w.run_from, now()
        FROM unnest(%s::text[], %s::bigint[]) AS s(source_id, lock)
        LEFT JOIN billing_source_sync_state w USING (source_id)""",
        (started, _SOURCE_LOCKS, list(source_ids), [lock_key(s) & 0xFFFFFFFF for s in source_ids]))}


def read_counters(conn) -> tuple[list, list, tuple]:
    """Run totals, push totals (source, received, applied, rejected), and (accounts in arrears, suspended)."""
    return (_sql(conn, f"SELECT job, status, runs, {', '.join(TOTAL_FIELDS)} FROM billing_job_totals ORDER BY 1, 2"),
            _sql(conn, """SELECT source_id, sum(pushes), sum(pushes) FILTER (WHERE outcome = 'applied'),
                          sum(pushes) FILTER (WHERE outcome = 'rejected') FROM billing_push_totals GROUP BY 1 ORDER BY 1"""),
            _sql(conn, """SELECT count(*) FILTER (WHERE arrears), count(*) FILTER (WHERE suspend_state = 'suspended')
                          FROM account_quota_states""")[0])


def read_account(conn, account: str, since: datetime, until: datetime) -> dict | None:
    """One account's state and per-day bytes and ledger sums, from the account-first indexes (None: no user)."""
    rows = _sql(conn, """
        SELECT q.current_balance, q.remaining_included_quota, q.arrears, q.arrears_since, q.throttle_state,
               q.suspend_state, q.suspended_by_billing, q.last_rated_bucket_at
        FROM users u LEFT JOIN account_quota_states q ON q.account_uuid = u.uuid WHERE u.uuid = %s""", (account,))
    if not rows:
        return None
    lines = _sql(conn, """
        SELECT date_trunc('day', bucket_start), region, line_code, sum(uplink_bytes), sum(downlink_bytes),
               sum(total_bytes), count(*)
        FROM traffic_minute_buckets WHERE account_uuid = %s AND bucket_start >= %s AND bucket_start < %s
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""", (account, since, until))
    # A ledger row is written after its minute (a push at most MAX_PUSH_AHEAD before it): created_at bounds the scan.
    money = _sql(conn, """
        SELECT date_trunc('day', bucket_start), sum(rated_bytes), sum(amount_delta::numeric), count(*)
        FROM billing_ledger WHERE account_uuid = %s AND created_at >= %s AND bucket_start >= %s AND bucket_start < %s
        GROUP BY 1 ORDER BY 1""", (account, since - MAX_PUSH_AHEAD, since, until))
    return {"state": rows[0], "lines": lines, "money": money}


# ---- billing core: pure rating of samples against checkpoints and quota ----

ONE, ZERO = Decimal(1), Decimal(0)
# Money is decimal: enough digits that the one rounding per ledger row (to MONEY_QUANTUM) is the only one.
MONEY = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)


# included_quota: given on first sight; multiplier: region x line; peak, offpeak: x it inside/outside PEAK_HOURS.
Pricing = collections.namedtuple("Pricing", "included_quota price_per_byte multiplier version peak offpeak",
                                 defaults=(ONE, ONE))


def _positive(value, default):
    return as_decimal(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else default


def effective_pricing(profile, defaults: Pricing) -> Pricing:
    """Config defaults overridden by a profile row, its doubles read as the decimals they print as;
    non-positive or non-finite numbers fall back (never a NaN charge)."""
    if profile is None:
        return defaults
    included, price, region_mult, line_mult, peak, offpeak, version = profile
    return Pricing(int(_positive(included, defaults.included_quota)), _positive(price, defaults.price_per_byte),
                   _positive(region_mult, ONE) * _positive(line_mult, ONE),
                   version.strip() if isinstance(version, str) and version.strip() else defaults.version,
                   _positive(peak, ONE), _positive(offpeak, ONE))


def is_peak(minute: datetime, peak: PeakHours) -> bool:
    """Whether a minute starts inside the peak window on its zone's wall clock (DST changes its length)."""
    local = minute.astimezone(peak.zone)
    at = local.hour * 60 + local.minute
    return peak.start <= at < peak.end if peak.start < peak.end else at >= peak.start or at < peak.end


def minute_multiplier(price: Pricing, minute: datetime, peak: PeakHours | None) -> Decimal:
    if peak is None:
        return price.multiplier
    return price.multiplier * (price.peak if is_peak(minute, peak) else price.offpeak)


def series_key(storage: str, inbound_tag: str) -> str:
    """Checkpoint node_id of a series: untagged keeps the plain key (the original's); nodes never hold "#"."""
    return f"{storage}#{inbound_tag}" if inbound_tag else storage


def page_series(snapshots) -> list:
    """(series key, storage node, account) of every series in a page, and each (node, account)'s plain key."""
    return list(dict.fromkeys(key for snap in snapshots for s in snap.samples for key in (
        (series_key(snap.storage_node, s.inbound_tag), snap.storage_node, s.account),
        (snap.storage_node, snap.storage_node, s.account))))


def ledger_id(bucket_start: datetime, node: str, account: str, region: str, line_code: str,
              collected_at: datetime) -> str:
    """One sample's ledger id (RFC 9562 v8): the bucket minute's Unix ms, then a hash of the increment. A replay
    writes nothing, and a minute's rows share a few primary-key leaves (a random id costs one each)."""
    name = f"{format_time(bucket_start)}|{node}|{account}|{region}|{line_code}|{format_time(collected_at)}"
    h = hashlib.sha256(name.encode()).hexdigest()
    x = f"{int(bucket_start.timestamp()) * 1000:012x}8{h[:3]}{'89ab'[int(h[3], 16) & 3]}{h[4:19]}"
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


# Bytes one sample adds to its series' minute bucket (node_id: the storage node), and its ledger id.
Increment = collections.namedtuple("Increment", "id bucket_start node_id account line_code uplink downlink")


@dataclass
class MeteredPage:
    increments: list  # in application order
    checkpoints: dict  # (series key, account) -> Checkpoint, changed ones only
    marks: dict = field(default_factory=dict)  # storage node -> newest snapshot applied, where it moved
    dropped: set = field(default_factory=set)  # plain-key rows (node, account) no series holds any more
    taken: set = field(default_factory=set)  # (node, account) whose original checkpoint was taken over
    applied: int = 0  # samples that moved a checkpoint
    replayed: int = 0  # samples at or before their series' last_seen_at
    replayed_minutes: int = 0  # distinct (series, minute) among them
    resets: int = 0  # counter resets (re-baselined, nothing billed)
    baselined: int = 0  # first samples recorded without billing (first_sight baseline, new series, takeover)
    unknown: collections.Counter = field(default_factory=collections.Counter)  # samples by account without users row


def meter_page(snapshots, reads: SeriesReads, region: str) -> MeteredPage:
    """Snapshots (in collected_at order) into byte increments. Every decision follows from ``reads`` (the
    database before the page) and the snapshots before it, so any split of the same snapshots bills the
    same (I7); a snapshot no newer than its node's newest only replays, never starting a series. Pure."""
    out = MeteredPage([], {}, dict(reads.marks))
    marks = out.marks
    state = dict(reads.checkpoints)  # the checkpoints as this page has moved them so far
    seen, inherited, replayed = set(reads.seen), set(reads.inherited), set()

    def record(key, checkpoint):
        state[key] = out.checkpoints[key] = checkpoint
        out.dropped.discard(key)
        seen.add((key[0].partition("#")[0], key[1]))  # the account is on the node from now on

    for snap in snapshots:
        stamp, node = snap.collected_at, snap.storage_node
        minute, late = minute_floor(stamp), node in marks and stamp <= marks[node]
        accounts: dict = {}
        for s in snap.samples:
            if s.account in reads.known:
                accounts.setdefault(s.account, []).append(s)
            else:
                out.unknown[s.account] += 1
        for account, samples in accounts.items():
            plain = (node, account)
            original = state.get(plain) if plain in inherited else None
            takeover = original is not None and stamp > original.last_seen_at and not late  # the first one after it
            if takeover:
                inherited.discard(plain)
                out.taken.add(plain)
                # The original kept one row per account and node, whichever inbound it saw last: only
                # one series whose counters continue it can continue from it; any other is a baseline.
                one = samples[0]
                if len(samples) > 1 or one.uplink < original.uplink or one.downlink < original.downlink:
                    original = None
                if all(s.inbound_tag for s in samples):
                    del state[plain]
                    out.dropped.add(plain)
            # A new series bills from zero only for an account new to the node under first_sight "bill":
            # beside the account's other series its counter may hold bytes billed under another key.
            policy = snap.source.first_sight if snap.source else "bill"
            first = "baseline" if takeover or plain in seen or policy == "baseline" else "bill"
            for s in samples:
                key = (series_key(node, s.inbound_tag), account)
                # Before the takeover the original's row guards what it billed; at it, own rows do not count.
                basis = original if original is not None else None if takeover else state.get(key)
                if (late and (basis is None or basis is original)) or (
                        basis is not None and stamp <= basis.last_seen_at):
                    out.replayed += 1
                    replayed.add((minute, key))
                    continue
                out.applied += 1
                if basis is None:
                    up, down, epoch = s.uplink, s.downlink, 0  # first sight: the whole counter
                else:
                    up, down, epoch = s.uplink - basis.uplink, s.downlink - basis.downlink, basis.reset_epoch
                reset = up < 0 or down < 0  # the counter went back: re-baseline, bill nothing
                record(key, Checkpoint(s.uplink, s.downlink, stamp, epoch + reset))
                if basis is None and first == "baseline":
                    out.baselined += 1
                elif reset:
                    out.resets += 1
                elif up or down:
                    out.increments.append(Increment(ledger_id(minute, node, account, region, s.inbound_tag, stamp),
                                                    minute, node, account, s.inbound_tag, up, down))
        marks[node] = max(stamp, marks.get(node, stamp))
    out.marks = {node: stamp for node, stamp in marks.items() if reads.marks.get(node) != stamp}
    out.replayed_minutes = len(replayed)
    return out


@dataclass
class RatedPage:
    buckets: list  # Bucket, one per bucket key
    ledger: list  # LedgerEntry, in application order
    quota: dict  # account -> QuotaState, changed ones only
    already_billed: int = 0  # increments whose ledger id was already there: nothing billed again
    out_of_range: set = field(default_factory=set)  # accounts whose balance a double no longer holds exactly


def rate_increments(increments, pricing: dict, quota: dict, peak: PeakHours | None, quantum: Decimal,
                    billed: set = frozenset()) -> RatedPage:
    """Price increments in order: included quota first, then bytes x price x multipliers in decimal, rounded
    half-even once per ledger row to ``quantum``; balances move by exactly those amounts. Ids in ``billed``
    were billed before: no bytes, money or quota. Pure."""
    out = RatedPage([], [], {})
    buckets: dict = {}
    with decimal.localcontext(MONEY):
        for inc in increments:
            if inc.id in billed:
                out.already_billed += 1
                continue
            account = inc.account
            price = pricing[account]
            multiplier = minute_multiplier(price, inc.bucket_start, peak)
            key = (inc.bucket_start, inc.node_id, account, inc.line_code)
            if key not in buckets:
                buckets[key] = Bucket(*key)
            bucket = buckets[key]
            bucket.uplink += inc.uplink
            bucket.downlink += inc.downlink
            bucket.multiplier = multiplier
            bucket.version = price.version

            state = out.quota.get(account)
            if state is None:
                state = out.quota[account] = dataclasses.replace(quota[account])
            total = inc.uplink + inc.downlink
            used = min(max(state.remaining, 0), total)  # a negative remainder written elsewhere charges nothing extra
            chargeable = total - used
            amount = ZERO - (chargeable * price.price_per_byte * multiplier).quantize(quantum)  # ZERO -: no "-0"
            solvent = state.balance >= 0
            state.remaining -= used
            # A balance written with more digits (by the original, a top-up) lands on the quantum here.
            state.balance = (state.balance + amount).quantize(quantum)
            if state.balance >= 0:
                state.arrears_since = None
            elif solvent:  # this charge crossed zero (an older arrears_since was paid off by a top-up)
                state.arrears_since = inc.bucket_start  # a replay computes the same value
            if abs(state.balance) >= quantum * EXACT_RANGE:
                out.out_of_range.add(account)
            state.last_rated_bucket_at = max(state.last_rated_bucket_at or inc.bucket_start, inc.bucket_start)
            out.ledger.append(LedgerEntry(inc.id, account, inc.bucket_start, chargeable, amount, state.balance,
                                          price.version))
    out.buckets = list(buckets.values())
    return out


# ---- HTTP routes: probes, status, metrics, accounts, the job endpoints and push ingest --

MAX_REQUEST_BYTES = 64 * 1024
MAX_RECONCILE_RANGE = timedelta(days=7)
MAX_ACCOUNT_RANGE = timedelta(days=31)
_HTTP_STATUS = {"ok": 200, "partial": 200, "error": 503, "busy": 409}
# Every error text starts with its category, one word, all that the open endpoints show (the text can
# name nodes and accounts); text written by an older release has none and shows as "internal".
_CATEGORY = re.compile(r"[a-z_]+(?=: )")


def error_category(text: str) -> str:
    match = _CATEGORY.match(text or "")
    return match.group() if match else "internal" if text else ""


def open_view(run: dict) -> dict:
    """A run result as the endpoints without a token show it: each error's category, never its text."""
    errors = [{"source_id": e["source_id"], "category": e["category"]} for e in run.get(
        "errors", [{"source_id": "", "category": "internal"}] if run.get("error") else [])]  # older releases: no errors
    return {**run, "error": "; ".join(f"{e['source_id']}: {e['category']}" if e["source_id"] else e["category"]
                                      for e in errors), "errors": errors,
            "source_statuses": [{**s, "error": error_category(s.get("error", "")),
                                 "last_error": error_category(s.get("last_error", ""))}
                                for s in run.get("source_statuses", [])]}


def parse_range(since, until, longest: timedelta) -> tuple[datetime, datetime]:
    """A [since, until) pair of RFC3339 times, both given, since first, at most ``longest`` long."""
    since, until = parse_time(since), parse_time(until)
    if since is None or until is None:
        raise BadRequest("since and until must be RFC3339 times")
    if since >= until:
        raise BadRequest("since must be before until")
    if until - since > longest:
        raise BadRequest(f"the range is longer than {longest.days} days")
    return since, until


def parse_job_body(job: str, body: bytes, config: Config, now: datetime):
    """A reconcile's optional {"source_id", "since", "until"}: (source_ids or None, (since, until) or None)."""
    if not body.strip():
        return None, None
    if job != "reconcile":
        raise BadRequest(f"{job} takes no body (a ranged replay is POST /v1/jobs/reconcile)")
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
        match = [s for s in config.sources if s.source_id == doc["source_id"]]
        if not match or not match[0].enabled or match[0].mode == "push":
            raise BadRequest("source_id must name an enabled pull source (a push source has nothing to pull)")
        source_ids = [match[0].source_id]
    if ("since" in doc) != ("until" in doc):
        raise BadRequest("since and until go together")
    if "since" not in doc:
        return source_ids, None
    since, until = parse_range(doc["since"], doc["until"], MAX_RECONCILE_RANGE)
    if until >= minute_floor(now):
        raise BadRequest("until must be before the current minute (that minute is still being written)")
    return source_ids, (since, until)


def catch_up(row) -> dict | None:
    """How far a running catch-up has come, and when it ends at the speed its watermark has moved so far."""
    _, completed, attempted, _, _, _, running, run_from, now = row
    if not running or None in (completed, attempted, run_from):
        return None
    done, elapsed = (completed - run_from).total_seconds(), (now - attempted).total_seconds()
    remaining = max(0.0, (minute_floor(now) - MINUTE - completed).total_seconds())
    eta = remaining / (done / elapsed) if done > 0 and elapsed > 0 else None
    return {"from": format_time(run_from), "at": format_time(completed), "done_seconds": round(done, 3),
            "remaining_seconds": round(remaining, 3), "eta_seconds": None if eta is None else round(eta, 1),
            "eta": None if eta is None else format_time(now + timedelta(seconds=eta))}


def money_text(amount: Decimal) -> str:
    return format(amount.normalize() + 0, "f")  # + 0: never "-0"


_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", '"': '\\"'})


def _metric_line(name: str, labels: dict, value) -> str:
    label_text = ",".join(f'{key}="{str(val).translate(_LABEL_ESCAPES)}"' for key, val in labels.items())
    return f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}"


def render_metrics(config: Config, views: dict | None, counters) -> str:
    """Prometheus text format, from PostgreSQL only (views is None when the database did not answer)."""
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

    def per_source(pick, sources=config.sources):
        rows = [({"source_id": s.source_id}, pick(views[s.source_id])) for s in sources]
        return [(labels, value) for labels, value in rows if value is not None]

    enabled = [s for s in config.sources if s.enabled]
    family("billing_source_enabled", "gauge", "Whether the source is enabled.",
           [({"source_id": s.source_id}, int(s.enabled)) for s in config.sources])
    family("billing_source_watermark_lag_seconds", "gauge", "Seconds between now and the source's "
           "last_completed_until (push: its newest applied snapshot); since start-up while it has none.",
           per_source(lambda row: f"{float(row[5]):.3f}", enabled))
    for name, help_text, pick in (
            ("last_success_timestamp_seconds", "Unix time of the source's last successful run or applied push.",
             lambda row: row[3] and f"{row[3].timestamp():.3f}"),
            ("last_attempt_timestamp_seconds", "Unix time of the source's last attempted run or received push.",
             lambda row: row[2] and f"{row[2].timestamp():.3f}"),
            ("last_attempt_failed", "1 when the source's last attempt ended in an error.",
             lambda row: None if row[2] is None else int(bool(row[4]))),
            ("catchup_running", "1 while a run holds the source's lock.", lambda row: int(row[6])),
            ("catchup_remaining_seconds", "Seconds of exporter history a running catch-up still has to bill.",
             lambda row: (catch_up(row) or {}).get("remaining_seconds")),
            ("catchup_eta_seconds", "Seconds until a running catch-up should be done, at its speed so far.",
             lambda row: (catch_up(row) or {}).get("eta_seconds"))):
        family(f"billing_source_{name}", "gauge", help_text, per_source(pick))
    family("billing_job_runs_total", "counter", "Finished job runs (and pushes) by job and status.",
           [({"job": row[0], "status": row[1]}, row[2]) for row in totals])
    by_job = {name: collections.Counter() for name in TOTAL_FIELDS}
    for row in totals:
        for name, value in zip(TOTAL_FIELDS, row[3:]):
            by_job[name][row[0]] += value
    for name in RUN_COUNTS + ("suspended", "lifted"):
        family(f"billing_{name}_total", "counter", f"Sum of {name} over all runs, by job.",
               [({"job": job}, value) for job, value in sorted(by_job[name].items())])
    family("billing_invalid_samples_by_reason_total", "counter", "Invalid samples skipped, by job and reason.",
           [({"job": job, "reason": reason}, value) for reason, name in zip(INVALID_REASONS, INVALID_FIELDS)
            for job, value in sorted(by_job[name].items())])
    for index, outcome in enumerate(("received", "applied", "rejected"), start=1):
        family(f"billing_push_{outcome}_total", "counter", f"Pushed bodies {outcome}, by push source (source_id \"\": "
               "no source's token).", [({"source_id": row[0]}, row[index]) for row in pushes if row[index] is not None])
    family("billing_accounts_in_arrears", "gauge", "Accounts whose balance is below zero.", [({}, in_arrears)])
    family("billing_accounts_suspended", "gauge", "Accounts suspended (by billing or anyone else).",
           [({}, suspended)])
    return "\n".join(out) + "\n"


def source_view(source: Source, row, full: bool) -> dict:
    """One source as /v1/status shows it: watermark, lag, whether it runs now and how far it has come."""
    _, completed, attempted, succeeded, error, lag, running, _, _ = row
    view = {"source_id": source.source_id, "mode": source.mode, "enabled": source.enabled,
            "last_completed_until": format_time(completed), "last_attempted_at": format_time(attempted),
            "last_succeeded_at": format_time(succeeded), "last_error": error if full else error_category(error),
            "lag_seconds": round(float(lag), 3)}
    if source.mode == "push":
        return {**view, "last_push_at": format_time(attempted)}
    return {**view, "running": bool(running), "catch_up": catch_up(row)}


def account_view(account: str, since: datetime, until: datetime, found: dict) -> dict:
    """GET /v1/accounts/<uuid>: state, bytes per day, region and line, money per day (the ledger has no line)."""
    balance, remaining, arrears, arrears_since, throttle, suspend, by_billing, rated_at = found["state"]
    return {"account": account, "since": format_time(since), "until": format_time(until),
            "state": None if balance is None else {
                "balance": money_text(as_decimal(balance)), "remaining_included_quota_bytes": remaining,
                "arrears": arrears, "arrears_since": format_time(arrears_since), "throttle_state": throttle,
                "suspend_state": suspend, "suspended_by_billing": by_billing, "last_rated_minute": format_time(rated_at)},
            "bytes": [{"day": day.date().isoformat(), "region": region, "line_code": line, "uplink_bytes": int(up),
                       "downlink_bytes": int(down), "bytes": int(total), "minutes": minutes}
                      for day, region, line, up, down, total, minutes in found["lines"]],
            "money": [{"day": day.date().isoformat(), "rated_bytes": int(rated), "amount": money_text(amount),
                       "ledger_rows": rows} for day, rated, amount, rows in found["money"]]}


def make_wsgi_app(config: Config, db: Database, started: datetime, run_job, ingest, reject) -> flask.Flask:
    """The Flask app; the collector below provides run_job, ingest and reject (see Collector)."""
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False
    log_auth_failure = Throttled(config.secrets)
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

    def unavailable(exc: psycopg2.Error, where: str):  # the details to the log, a category to the client
        log_event(config.secrets, "database_error", where=where, detail=str(exc).strip())
        return db_error_text(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        allow = [header for header in exc.get_headers() if header[0] == "Allow"]  # a 405 says what is allowed
        return flask.jsonify(error=exc.description if exc.code in (400, 413) else exc.name.lower()), exc.code, allow

    @app.errorhandler(psycopg2.Error)
    def database_error(exc):  # the routes that read the database answer 503 when it does not
        return flask.jsonify(error=unavailable(exc, flask.request.path)), 503

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

    def has_job_token() -> bool:
        return hmac.compare_digest(given_token().encode(), config.service_token.encode())

    def unauthorized():
        log_auth_failure("auth_failed", path=flask.request.path, remote_addr=flask.request.remote_addr)
        return flask.jsonify(error="missing or wrong service token"), 401

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

    def job_endpoint(job: str):
        if not has_job_token():
            return unauthorized()
        source_ids, window = parse_job_body(job, read_body(MAX_REQUEST_BYTES), config, utcnow())  # else a 400
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
            error = (run if has_job_token() else open_view(run))["error"]
            return flask.jsonify(status="error", message=f"last run failed: {error}"), 503
        return flask.jsonify(status="ok", message="")

    @app.get("/v1/status")
    def status():
        full = has_job_token()  # the open view shows error categories; the token shows their text
        run, views = read_db(lambda conn: (last_run(conn), read_source_views(conn, source_ids, started)))
        payload = dict(run) if run else {"job": None, "started_at": None, "finished_at": None, "status": "starting",
                                         "error": "", **dict.fromkeys(RUN_COUNTS, 0), "source_statuses": []}
        payload = payload if full else open_view(payload)
        payload["sources"] = [source_view(s, views[s.source_id], full) for s in config.sources]
        return flask.jsonify(payload)

    @app.get("/metrics")
    def metrics():
        try:
            views, counters = read_db(lambda conn: (read_source_views(conn, source_ids, started), read_counters(conn)))
        except psycopg2.Error:
            views, counters = None, None
        return flask.Response(render_metrics(config, views, counters),
                              content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/accounts/<account>")
    def account_bill(account: str):
        if not has_job_token():
            return unauthorized()
        today, args = minute_floor(utcnow()).replace(hour=0, minute=0), flask.request.args
        try:
            account = str(uuid.UUID(account))
        except ValueError:
            flask.abort(400, "not an account UUID")
        since, until = parse_range(args.get("since", format_time(today)),
                                   args.get("until", format_time(today + timedelta(days=1))), MAX_ACCOUNT_RANGE)
        found = read_db(lambda conn: read_account(conn, account, since, until))
        if found is None:
            return flask.jsonify(error="no such account (no users row)"), 404
        return flask.jsonify(account_view(account, since, until, found))

    for job in ("collect-and-rate", "reconcile"):  # only a reconcile takes a body: its window
        app.add_url_rule(f"/v1/jobs/{job}", job, functools.partial(job_endpoint, job), methods=["POST"])

    def token_matches(source: Source, given: str) -> bool:
        try:
            return hmac.compare_digest(given.encode(), config.tokens[source.source_id].get().encode())
        except ValueError:  # an unusable token file matches nothing
            return False

    @app.post("/v1/ingest/snapshots")
    def ingest_snapshots():
        given, remote = given_token(), flask.request.remote_addr
        allowed = [s for s in push_sources if token_matches(s, given)]
        owner = allowed[0].source_id if len(allowed) == 1 else ""  # a shared token cannot tell who sent it
        encoding = flask.request.headers.get("Content-Encoding", "identity").strip().lower()
        if not allowed:  # answered from memory: a flood of strangers costs PostgreSQL nothing
            code, answer = reject(401, "", "missing or wrong push token", remote)
        elif encoding not in ("", "identity"):
            code, answer = reject(415, owner, f"{encoding} is not accepted; send identity (uncompressed)", remote)
        else:
            try:
                body = read_body(config.max_body_bytes)
            except HTTPException as exc:  # 413, or a client that went away (400)
                code, answer = reject(exc.code, owner, exc.description, remote)
            else:
                code, answer = ingest(body, flask.request.mimetype in ("application/x-ndjson", "application/ndjson"),
                                      allowed, remote)
        return flask.jsonify(answer), code

    return app


# ---- collector: job runs, push ingest, and the thread that repeats runs --

OVERLAP = 2 * MINUTE
MAX_EMPTY_PAGES = 3  # consecutive empty pages that still say has_more: a broken exporter
UNKNOWN_LOGGED = 10  # unknown account UUIDs named per source and run (in the log only)


@dataclass
class SourceRun:
    source_id: str
    state: str = "ok"  # ok | partial (stopped early, the next run continues) | failed | busy
    error: str = ""  # "category: text"
    counts: collections.Counter = field(default_factory=collections.Counter)  # RUN_COUNTS
    invalid: collections.Counter = field(default_factory=collections.Counter)  # invalid samples by reason
    unknown: set = field(default_factory=set)  # UUIDs of accounts without a users row, for the log
    pages: int = 0  # fetched
    committed: int = 0  # applied, each in its own transaction
    watermark: Watermark | None = None

    def add(self, page: Page, metered: MeteredPage, rated: RatedPage) -> None:
        # written_minutes: bucket rows written to; replayed_minutes: (series, minute) replayed; per page.
        self.counts.update(processed_samples=metered.applied + metered.replayed, written_minutes=len(rated.buckets),
                           replayed_minutes=metered.replayed_minutes, invalid_samples=sum(page.invalid.values()),
                           unknown_account_samples=sum(metered.unknown.values()), counter_resets=metered.resets,
                           already_billed=rated.already_billed, baselined=metered.baselined)
        self.invalid.update(page.invalid)
        self.unknown |= metered.unknown.keys()
        self.committed += 1

    def status(self) -> dict:
        mark = self.watermark or Watermark(self.source_id)
        return {"source_id": self.source_id, "state": self.state, "error": self.error,
                **{name: format_time(getattr(mark, name)) for name in Watermark._fields[1:4]}, "last_error": mark.last_error,
                **{name: self.counts[name] for name in RUN_COUNTS}, "invalid_by_reason": dict(self.invalid),
                "pages": self.pages}


def summarize(job: str, started: datetime, runs: list, sweep=(0, 0), idle: bool = False) -> dict:
    """The run result: ``error`` when no source made progress and one failed (or none is enabled, unless ``idle``);
    ``partial`` when some failed, stopped early or skipped; ``busy`` when every source was held elsewhere."""
    errors = [(r.source_id, r.error) for r in runs if r.state in ("failed", "partial")]
    errors += [(r.source_id, f"invalid_samples: {r.counts['invalid_samples']} skipped (" +
                ", ".join(f"{reason} {n}" for reason, n in sorted(r.invalid.items())) + ")")
               for r in runs if r.invalid]
    errors += [(r.source_id, f"unknown_accounts: {r.counts['unknown_account_samples']} samples of accounts "
                             "without a users row skipped") for r in runs if r.unknown]
    if not runs and not idle:
        status, errors = "error", [("", "no_source: no enabled source")]
    elif runs and all(r.state == "busy" for r in runs):
        status = "busy"
    elif any(r.state == "failed" for r in runs) and not any(r.state == "ok" or r.committed for r in runs):
        status = "error"
    else:
        status = "partial" if errors else "ok"
    return {"job": job, "started_at": format_time(started), "finished_at": format_time(utcnow()),
            "status": status, "error": "; ".join(f"{sid}: {text}" if sid else text for sid, text in errors),
            "errors": [{"source_id": sid, "category": error_category(text), "message": text}
                       for sid, text in errors],
            **{name: sum(r.counts[name] for r in runs) for name in RUN_COUNTS},
            "invalid_by_reason": dict(sum((r.invalid for r in runs), collections.Counter())),
            "suspended": sweep[0], "lifted": sweep[1],
            "source_statuses": [r.status() for r in runs]}


class Collector:
    """Runs collections (HTTP or its own thread) and pushes; one writer per source and per storage node."""

    def __init__(self, config: Config, db: Database):
        self.config, self.db = config, db
        self.clients = {s.source_id: ExporterClient(s, config.tokens[s.source_id], config.max_body_bytes)
                        for s in config.sources if s.mode == "pull"}
        self.defaults = Pricing(config.initial_included_quota, config.price_per_byte, ONE, config.source_revision)
        self._stop, self._thread = threading.Event(), None
        # Push outcomes and rejections are counted here and written with the next run's record, so a
        # flood of bad pushes costs PostgreSQL nothing; the log says how many lines it left out.
        self._pushes, self._push_errors = collections.Counter(), {}  # (source_id, outcome): bodies; last rejections
        self._counts_lock = threading.Lock()
        self._log_rejection = Throttled(config.secrets)
        self._out_of_range: set = set()  # accounts already warned about

    # -- one job run --------------------------------------------------------

    def run(self, job: str, source_ids=None, window=None, wait: float = BUSY_WAIT_SECONDS) -> dict:
        started, clock = utcnow(), time.monotonic()
        enabled = [s for s in self.config.sources if s.enabled]
        runs = [self.collect_source(s, window, wait) for s in enabled
                if s.mode == "pull" and (source_ids is None or s.source_id in source_ids)]
        result = summarize(job, started, runs, self.sweep(), idle=bool(enabled))
        if result["status"] == "busy" and wait == 0 and not (result["suspended"] or result["lifted"]):
            self.flush()
            return result  # the collector thread found others at work, and the sweep had nothing to do: no news
        self._record(result, keep=result["status"] != "busy")
        shown = {k: v for k, v in result.items() if k not in ("source_statuses", "started_at", "finished_at", "errors")}
        log_event(self.config.secrets, "run", duration_seconds=round(time.monotonic() - clock, 3), **shown,
                  sources=[{"source_id": r.source_id, "state": r.state, "error": r.error, "pages": r.pages,
                            **({"unknown_accounts": sorted(r.unknown)[:UNKNOWN_LOGGED]} if r.unknown else {})}
                           for r in runs])
        return result

    def _record(self, result: dict, keep: bool) -> None:
        try:
            with self.db.connection() as conn:
                record_run(conn, result, keep)
        except psycopg2.Error as exc:
            log_event(self.config.secrets, "run_not_recorded", job=result["job"], error=db_error_text(exc))
        self.flush()

    def flush(self) -> None:
        """Write the push counts and rejections gathered in memory (kept for the next try if that fails)."""
        with self._counts_lock:
            counts, errors, self._pushes, self._push_errors = self._pushes, self._push_errors, collections.Counter(), {}
        if not counts and not errors:
            return
        try:
            with self.db.connection() as conn:
                add_push_totals(conn, counts)
                for source_id, (error, when) in errors.items():
                    write_sync_state(conn, source_id, error=error, attempted=when)
        except psycopg2.Error:
            with self._counts_lock:
                self._pushes.update(counts)
                self._push_errors = {**errors, **self._push_errors}

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
                        # Another writer has it: nothing done, nothing to say, unless it has held it
                        # without moving the watermark for too long (stuck).
                        held, idle = source_run_age(conn, source.source_id)
                        run.state = "partial" if min(held, idle) > 3 * (self.config.collect_interval or 60) else "busy"
                        if run.state == "partial":
                            run.error = (f"busy: another writer has held this source for {held:.0f}s and not moved "
                                         f"its watermark for {idle:.0f}s (more than 3 x COLLECT_INTERVAL)")
                        return run
                    time.sleep(0.2)
                try:
                    self._collect_locked(conn, source, window, run)
                finally:
                    with contextlib.suppress(psycopg2.Error):
                        unlock_source(conn, source.source_id)
        except Exception as exc:  # one source's surprise never stops the others
            self._fail(run, exc, [] if window else [source.source_id])
        return run

    def _fail(self, run: SourceRun, exc: Exception, source_ids) -> None:
        """Record a failure on the sources' rows (a ranged reconcile's on none); watermarks stay put."""
        if isinstance(exc, ExporterError):
            error = f"{exc.category}: {exc}"
        elif isinstance(exc, psycopg2.errors.LockNotAvailable):
            error = "busy: another writer held the node or its accounts too long; the next run fills this in"
        elif isinstance(exc, psycopg2.Error):
            error = db_error_text(exc)
            log_event(self.config.secrets, "database_error", source_id=run.source_id, detail=str(exc).strip())
        else:
            error = f"internal: unexpected {type(exc).__name__}: {exc}"
        run.state, run.error = "failed", self.config.secrets.redact(error, 500)
        log_event(self.config.secrets, "source_failed", source_id=run.source_id, error=run.error)
        with contextlib.suppress(psycopg2.Error), self.db.connection() as conn:  # if the database is what failed,
            for source_id in source_ids:  # the run result still says why
                run.watermark = write_sync_state(conn, source_id, error=run.error)

    def _collect_locked(self, conn, source: Source, window, run: SourceRun) -> None:
        sid, client = source.source_id, self.clients[source.source_id]
        # A ranged reconcile replays the past on purpose: it never moves the watermark, nor touches its row.
        start = None if window else write_sync_state(conn, sid, attempted=utcnow(), starting=True).last_completed_until
        until = window[1] if window else minute_floor(utcnow()) - MINUTE  # the last whole minute
        since = window[0] if window else (start or until) - OVERLAP
        # Pages come in time order, each applied in its own transaction with the watermark at its last
        # snapshot. Pages that lie wholly inside the overlap (at or before the starting watermark) cost
        # no budget, so a run stopped by MAX_PAGES_PER_RUN has always moved the watermark.
        cursor, limit, budget, last_at, empty = "", 1, self.config.max_pages_per_run, None, 0
        while since <= until:
            body = client.fetch(since, until, limit, cursor)
            run.pages += 1
            with PAGE_SLOT:
                page = parse_page(body, source, since, until)
                del body
                if page.has_more and page.next_cursor in ("", cursor):
                    raise ExporterError("protocol error: has_more without a new next_cursor")
                newest = page.snapshots[-1].collected_at if page.snapshots else None
                if newest is not None and last_at is not None and newest <= last_at:
                    raise ExporterError("protocol error: a page did not move forward in time")
                empty = 0 if page.snapshots else empty + 1
                if page.has_more and empty >= MAX_EMPTY_PAGES:
                    raise ExporterError(f"protocol error: {empty} empty pages in a row with has_more")
                if page.snapshots:  # next pages of about PAGE_SAMPLE_TARGET samples
                    last_at = newest
                    self.apply(conn, page, run, None if window else
                               lambda: write_sync_state(conn, sid, completed=last_at, commit=False))
                    limit = max(1, min(MAX_PAGE_LIMIT, PAGE_SAMPLE_TARGET * len(page.snapshots)
                                       // max(1, page.sample_count)))
            if start is None or newest is None or newest > start:
                budget -= 1
            if not page.has_more:
                break
            if budget <= 0 or self._stop.is_set():
                run.state, run.error = "partial", (
                    f"page_limit: stopped after {run.pages} pages (MAX_PAGES_PER_RUN); the next run continues"
                    if budget <= 0 else "interrupted: the worker is stopping; the next run continues")
                break
            cursor = page.next_cursor
        completed = None if window or run.state == "partial" else min(last_at or until, until)
        run.watermark = (write_sync_state(conn, sid) if window else
                         write_sync_state(conn, sid, completed, None if run.state == "partial" else utcnow(), ""))

    # -- one page transaction, pulled or pushed --------------------------------

    def apply(self, conn, page: Page, run: SourceRun, after=None, wait: float | None = None) -> None:
        """One page (hold PAGE_SLOT), one transaction: its facts and its progress (``after``), or nothing."""
        metered, rated = self._rate_and_write(conn, page, wait)
        if after is not None:
            after()
        conn.commit()
        run.add(page, metered, rated)
        for account in sorted(rated.out_of_range - self._out_of_range):
            self._out_of_range.add(account)
            log_event(self.config.secrets, "balance_out_of_exact_range", account=account,
                      limit=str(self.config.quantum * EXACT_RANGE))

    def _rate_and_write(self, conn, page: Page, wait: float | None):
        """Lock the page's nodes, read, meter, rate, write."""
        snapshots, region = page.snapshots, self.config.region
        lock_nodes(conn, {snap.storage_node for snap in snapshots}, wait)
        metered = meter_page(snapshots, read_series(conn, page_series(snapshots)), region)
        accounts = sorted({inc.account for inc in metered.increments})
        pricing, quota, billed = {}, {}, set()
        if accounts:
            profiles = read_profiles(conn, accounts)
            pricing = {a: effective_pricing(profiles.get(a), self.defaults) for a in accounts}
            # First sight of an account: its quota row starts from its pricing.
            quota = lock_quota_states(conn, {a: QuotaState(p.included_quota, self.config.initial_balance)
                                             for a, p in pricing.items()})
            billed = billed_ids(conn, [inc.id for inc in metered.increments])
        rated = rate_increments(metered.increments, pricing, quota, self.config.peak, self.config.quantum, billed)
        write_page(conn, region, rated.buckets, rated.ledger, metered.checkpoints, rated.quota, metered.dropped,
                   metered.taken, metered.marks)
        return metered, rated

    # -- pushes ------------------------------------------------------------------

    def reject(self, code: int, source_id: str, reason: str, remote_addr=None, category="bad_page") -> tuple[int, dict]:
        """A refused push: counted in memory, its log line rate-limited; nothing touches PostgreSQL."""
        with self._counts_lock:
            self._pushes[(source_id, "rejected")] += 1
            if source_id:
                self._push_errors[source_id] = (f"{category}: push rejected: {reason}", utcnow())
        self._log_rejection("push_rejected", (source_id, code), source_id=source_id, status=code, reason=reason,
                            remote_addr=remote_addr)
        return code, {"error": reason}

    def ingest(self, body: bytes, ndjson: bool, sources, remote_addr=None) -> tuple[int, dict]:
        """A pushed body in one transaction with its sources' rows, or nothing; the slot is held for that alone."""
        started, owner = utcnow(), sources[0].source_id if len(sources) == 1 else ""  # a shared token: who?
        if not PAGE_SLOT.acquire(timeout=BUSY_WAIT_SECONDS):
            return 503, {"error": "busy: this worker is writing another page; push again"}
        try:
            page = parse_push(body, ndjson, sources, started, self.config.push_max_age)
            newest = {snap.source.source_id: snap.collected_at for snap in page.snapshots}  # time order: last wins
            run = SourceRun(",".join(sorted(newest)))

            def record_sources():  # in the page's transaction
                for source_id, position in newest.items():
                    run.watermark = write_sync_state(conn, source_id, position, started, "", started, commit=False)
            try:
                with self.db.connection() as conn:
                    self.apply(conn, page, run, record_sources, BUSY_WAIT_SECONDS)
            except Exception as exc:  # the pusher gets the reason; the next pull fills in
                self._fail(run, exc, sorted(newest))
            del page  # nothing parsed outlives the slot
        except ExporterError as exc:
            return self.reject(403 if isinstance(exc, WrongNode) else 400, owner, str(exc), remote_addr, exc.category)
        finally:
            PAGE_SLOT.release()
        result = summarize("push", started, [run], self.sweep())
        with self._counts_lock:
            for source_id in newest:
                self._pushes[(source_id, "failed" if result["status"] == "error" else "applied")] += 1
                if result["status"] != "error":  # this success is newer than any rejection still in memory
                    self._push_errors.pop(source_id, None)
        self._record(result, keep=False)
        return 503 if result["status"] == "error" else 200, result

    # -- the background thread ------------------------------------------------

    def start(self) -> None:
        """Start the collector thread (call after fork: threads do not survive it)."""
        if self.config.collect_interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="billing-collector", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()

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


def announce(config: Config, **settings) -> None:
    """Start-up (gunicorn's arbiter): the effective configuration, one JSON line, and its likely mistakes."""
    dsn = psycopg2.extensions.parse_dsn(config.database_url)
    if "password" in dsn:  # masked here too: one too short for Secrets to redact would show
        dsn["password"] = "***"
    log_event(config.secrets, "config", database_url=psycopg2.extensions.make_dsn(**dsn), **settings, **{
        f.name: getattr(config, f.name) for f in dataclasses.fields(Config)
        if f.name not in ("database_url", "service_token", "tokens", "secrets", "warnings")})
    for warning in config.warnings:
        log_event(config.secrets, "config_warning", message=warning)


def check_database(config: Config) -> None:
    """Start-up: missing grants are a ConfigError, a price of zero a warning, a database that is down a log."""
    try:
        with Database(config.database_url).connection(pooled=False) as conn:
            missing = missing_grants(conn)  # without them, reading the profiles could fail
            priced, profiles = (1, 0) if missing else priced_profiles(conn)
    except psycopg2.Error as exc:
        return log_event(config.secrets, "database_unchecked", error=db_error_text(exc))
    if config.price_per_byte == 0 and not priced:
        log_event(config.secrets, "config_warning", message=f"PRICE_PER_BYTE is 0 and none of the {profiles} "
                  "billing profiles sets a price: every charge is 0")
    if missing:
        raise ConfigError(f"DATABASE_URL: the database role lacks {'; '.join(missing)} (README: Grants)")


def create_app(environ=None) -> flask.Flask:
    config = load_config(os.environ if environ is None else environ)
    db = Database(config.database_url)
    collector = Collector(config, db)
    app = make_wsgi_app(config, db, utcnow(), collector.run, collector.ingest, collector.reject)
    app.extensions["billing_collector"] = collector
    return app


def __getattr__(name: str):
    # Build the WSGI app on first access (gunicorn's "app:app"), not at import:
    # tests import this module for its pure parts without any environment.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
