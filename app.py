"""billing-service: the write model of traffic billing.

Pulls windows of cumulative per-user byte counters from xray-exporter
instances, turns them into per-minute deltas, rates them (included quota
first, then price x multipliers) and writes replay-safe facts to PostgreSQL.
The contract is ../shared/SPEC.md; the sections below follow its order:
config, exporter client, repository (all SQL), billing core (pure), HTTP
routes, collector (the job run and the thread that repeats it).

gunicorn serves the module-level ``app`` (built from the environment on first
access, so importing this module for its pure parts needs no configuration).
"""
from __future__ import annotations

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
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import flask
import psycopg2
import psycopg2.extensions
import requests
import urllib3
from werkzeug.exceptions import HTTPException

UTC = timezone.utc
MINUTE = timedelta(minutes=1)


# ---- config: environment variables, validated strictly at startup ----------

class ConfigError(ValueError):
    """A startup error; the message names the variable (never its secret value)."""


class Secrets:
    """Every string that must never leave the process (tokens, DB password).

    Token files can rotate at runtime, so the set grows while the service runs.
    """

    def __init__(self, values=()):
        self._lock = threading.Lock()
        self._values: set[str] = set()
        for value in values:
            self.add(value)

    def add(self, value: str) -> None:
        # Very short strings would blank out ordinary words; they are no secret.
        if value and len(value) >= 4:
            with self._lock:
                self._values.add(value)

    def redact(self, text: str) -> str:
        with self._lock:
            values = sorted(self._values, key=len, reverse=True)
        for value in values:
            if value in text:
                text = text.replace(value, "***")
        return text


@dataclass(frozen=True)
class Source:
    source_id: str
    base_url: str
    expected_node_id: str = ""
    expected_env: str = ""
    enabled: bool = True
    timeout_seconds: float = 15.0
    token_file: str = ""
    token_env: str = ""
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""
    allow_plain_http: bool = False


@dataclass(frozen=True)
class Config:
    database_url: str
    service_token: str
    sources: tuple[Source, ...]
    source_tokens: dict  # source_id -> token read at startup (token_env or default)
    listen_addr: str  # gunicorn bind form, host:port
    collect_interval: float  # seconds; 0 = no background collector
    region: str
    source_revision: str
    price_per_byte: float
    initial_included_quota: int
    initial_balance: float
    image: str
    max_pages_per_run: int
    secrets: Secrets
    warnings: tuple[str, ...] = ()


DEFAULT_TIMEOUT_SECONDS = 15.0
_SOURCE_FIELDS = {f.name for f in Source.__dataclass_fields__.values()}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go-style duration ("90s", "1m30s", "2h") in seconds; "0"/"off" is 0."""
    text = text.strip()
    if text in ("0", "off"):
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match:
            raise ValueError(f"not a duration like 90s, 1m30s or 2h: {text!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError("empty duration")
    return total


def _number(environ, name, default, kind):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: not a valid {kind.__name__}: {raw.strip()!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {raw.strip()!r}")
    return value


def _listen_addr(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"LISTEN_ADDR: expected [host]:port like :8081, got {raw!r}")
    return f"{host or '0.0.0.0'}:{int(port)}"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _readable_file(source_id: str, name: str, path) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"EXPORTER_SOURCES_JSON: source {source_id!r}: {name} must be a non-empty path")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(
            f"EXPORTER_SOURCES_JSON: source {source_id!r}: {name} {path!r} is not readable ({exc.strerror})"
        ) from None
    return path


def _parse_source(raw, index: int, environ, warnings: list) -> Source:
    where = f"EXPORTER_SOURCES_JSON: source #{index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    unknown = sorted(set(raw) - _SOURCE_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    source_id = raw.get("source_id")
    if not isinstance(source_id, str) or not source_id.strip():
        raise ConfigError(f"{where}: source_id is required (a non-empty string)")
    where = f"EXPORTER_SOURCES_JSON: source {source_id!r}"
    values = {"source_id": source_id}
    for name in ("base_url", "expected_node_id", "expected_env"):
        value = raw.get(name, "")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string")
        values[name] = value.strip()
    if not values["base_url"]:
        raise ConfigError(f"{where}: base_url is required")
    for name in ("enabled", "allow_plain_http"):
        value = raw.get(name, name == "enabled")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false")
        values[name] = value
    timeout = raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
        raise ConfigError(f"{where}: timeout_seconds must be a number")
    values["timeout_seconds"] = float(timeout) if timeout > 0 else DEFAULT_TIMEOUT_SECONDS

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
            raise ConfigError(
                f"{where}: base_url uses plain http to a non-loopback host; use https "
                "(or set allow_plain_http: true for a trusted private link)"
            )
        warnings.append(f"source {source_id!r}: plain http to {host} (allow_plain_http): traffic is not encrypted")

    if "token_file" in raw and "token_env" in raw:
        raise ConfigError(f"{where}: set token_file or token_env, not both")
    if "token_file" in raw:
        values["token_file"] = _readable_file(source_id, "token_file", raw["token_file"])
    if "token_env" in raw:
        name = raw["token_env"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: token_env must name an environment variable")
        if not environ.get(name, "").strip():
            raise ConfigError(f"{where}: token_env: environment variable {name} is unset or empty")
        values["token_env"] = name
    for name in ("ca_bundle", "client_cert", "client_key"):
        if name in raw:
            values[name] = _readable_file(source_id, name, raw[name])
    if values.get("client_key") and not values.get("client_cert"):
        raise ConfigError(f"{where}: client_key needs client_cert")
    return Source(**values)


def _parse_sources(environ, warnings: list) -> tuple[Source, ...]:
    raw_json = environ.get("EXPORTER_SOURCES_JSON")
    if raw_json is not None and raw_json.strip():
        try:
            raw = json.loads(raw_json)
        except ValueError as exc:
            raise ConfigError(f"EXPORTER_SOURCES_JSON: invalid JSON ({exc})") from None
        if not isinstance(raw, list) or not raw:
            raise ConfigError("EXPORTER_SOURCES_JSON: must be a non-empty JSON array of sources")
        sources = tuple(_parse_source(item, i, environ, warnings) for i, item in enumerate(raw))
        seen: set[str] = set()
        for source in sources:
            if source.source_id in seen:
                raise ConfigError(f"EXPORTER_SOURCES_JSON: duplicate source_id {source.source_id!r}")
            seen.add(source.source_id)
        return sources
    base_url = environ.get("EXPORTER_BASE_URL", "").strip()
    if base_url:
        legacy = {"source_id": "default", "base_url": base_url}
        return (_parse_source(legacy, 0, environ, warnings),)
    raise ConfigError("EXPORTER_SOURCES_JSON (or the legacy EXPORTER_BASE_URL) is required")


def load_config(environ) -> Config:
    database_url = environ.get("DATABASE_URL", "").strip()
    if not database_url:
        raise ConfigError("DATABASE_URL is required")
    try:
        dsn_parts = psycopg2.extensions.parse_dsn(database_url)
    except psycopg2.Error:
        # libpq's message echoes the DSN, password included: do not pass it on.
        raise ConfigError("DATABASE_URL: not a valid PostgreSQL URL or key=value DSN") from None
    token = environ.get("INTERNAL_SERVICE_TOKEN", "").strip()
    if not token:
        raise ConfigError("INTERNAL_SERVICE_TOKEN is required")
    secrets = Secrets([token, database_url, dsn_parts.get("password", "")])

    warnings: list[str] = []
    sources = _parse_sources(environ, warnings)
    source_tokens = {}
    for source in sources:
        source_tokens[source.source_id] = environ[source.token_env].strip() if source.token_env else token
        secrets.add(source_tokens[source.source_id])

    try:
        interval = parse_duration(environ.get("COLLECT_INTERVAL", "1m") or "1m")
    except ValueError as exc:
        raise ConfigError(f"COLLECT_INTERVAL: {exc}") from None
    if 0 < interval < 1:
        raise ConfigError("COLLECT_INTERVAL: must be 0/off or at least 1s")

    price = _number(environ, "PRICE_PER_BYTE", 0.0, float)
    quota = _number(environ, "INITIAL_INCLUDED_QUOTA_BYTES", 0, int)
    if price < 0:
        raise ConfigError("PRICE_PER_BYTE: must not be negative")
    if quota < 0:
        raise ConfigError("INITIAL_INCLUDED_QUOTA_BYTES: must not be negative")
    max_pages = _number(environ, "MAX_PAGES_PER_RUN", 10000, int)
    if max_pages < 1:
        raise ConfigError("MAX_PAGES_PER_RUN: must be at least 1")

    return Config(
        database_url=database_url,
        service_token=token,
        sources=sources,
        source_tokens=source_tokens,
        listen_addr=_listen_addr(environ.get("LISTEN_ADDR", ":8081").strip() or ":8081"),
        collect_interval=interval,
        region=environ.get("DEFAULT_REGION", ""),
        source_revision=environ.get("SOURCE_REVISION", "").strip() or "billing-service-v1",
        price_per_byte=price,
        initial_included_quota=quota,
        initial_balance=_number(environ, "INITIAL_BALANCE", 0.0, float),
        image=environ.get("IMAGE", "").strip(),
        max_pages_per_run=max_pages,
        secrets=secrets,
        warnings=tuple(warnings),
    )


_log = logging.getLogger("billing_service")
if not _log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


def log_event(secrets: Secrets, event: str, **fields) -> None:
    """One JSON line on stderr, with every known secret blanked out."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    line = json.dumps({"time": now, "event": event, **fields}, default=str)
    _log.info(secrets.redact(line))


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


# ---- exporter client: the window API, every byte of it treated as hostile --

class ExporterError(Exception):
    """This source fails for this run; the message is safe to show and store."""


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


@dataclass
class Page:
    snapshots: list  # of Snapshot, in collected_at order
    has_more: bool
    next_cursor: str
    invalid_samples: int
    sample_count: int


MAX_BODY_BYTES = 64 * 1024 * 1024  # a page with ~300k samples; far past any sane page
MAX_PAGE_LIMIT = 120  # snapshots per page, the exporter protocol's page size
PAGE_SAMPLE_TARGET = 50000  # samples per page we aim for: bounds memory, amortizes per-page work
MAX_COUNTER = 2**63 - 1
MAX_LABEL = 255
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# NUL and lone surrogates (JSON "\ud800"): no UTF-8 form, PostgreSQL and URLs cannot take them.
_UNENCODABLE = re.compile("[\x00\ud800-\udfff]")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_time(text) -> datetime | None:
    """RFC3339 (Z or offset, up to nanoseconds) as UTC, truncated to microseconds.

    Truncation is what PostgreSQL stores, so the replay guard compares like
    with like."""
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
    up = raw.get("uplink_bytes_total")
    down = raw.get("downlink_bytes_total")
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


def _label(raw, what: str, default: str) -> str:
    if raw is None:
        return default
    if not isinstance(raw, str) or len(raw) > MAX_LABEL or _UNENCODABLE.search(raw):
        raise ExporterError(f"malformed page: {what} is not a short string")
    return raw


def parse_page(body: bytes, source: Source, since: datetime, until: datetime) -> Page:
    """Validate one window page. Page-level faults raise; bad samples are counted."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ExporterError("malformed page: body is not JSON") from None
    if not isinstance(doc, dict):
        raise ExporterError("malformed page: body is not a JSON object")
    raw_snapshots = doc.get("snapshots")
    if raw_snapshots is None:
        raw_snapshots = []
    if not isinstance(raw_snapshots, list):
        raise ExporterError("malformed page: snapshots is not a list")
    has_more = doc.get("has_more", False)
    if not isinstance(has_more, bool):
        raise ExporterError("malformed page: has_more is not a boolean")
    next_cursor = _label(doc.get("next_cursor"), "next_cursor", "")
    page_node = _label(doc.get("node_id"), "node_id", "")
    page_env = _label(doc.get("env"), "env", "")
    if raw_snapshots:
        # Real exporters leave the page-level identity empty only on empty pages.
        if source.expected_node_id and page_node != source.expected_node_id:
            raise ExporterError(f"page node_id {page_node!r} is not the expected {source.expected_node_id!r}")
        if source.expected_env and page_env != source.expected_env:
            raise ExporterError(f"page env {page_env!r} is not the expected {source.expected_env!r}")

    snapshots, invalid, count = [], 0, 0
    for raw in raw_snapshots:
        if not isinstance(raw, dict):
            raise ExporterError("malformed page: a snapshot is not an object")
        collected_at = parse_time(raw.get("collected_at"))
        if collected_at is None:
            raise ExporterError("malformed page: a snapshot has no valid RFC3339 collected_at")
        if not since <= collected_at <= until:
            raise ExporterError(
                f"malformed page: snapshot at {format_time(collected_at)} is outside the requested window")
        node_id = _label(raw.get("node_id"), "snapshot node_id", page_node)
        env = _label(raw.get("env"), "snapshot env", page_env)
        if source.expected_node_id and node_id != source.expected_node_id:
            raise ExporterError(f"snapshot node_id {node_id!r} is not the expected {source.expected_node_id!r}")
        if source.expected_env and env != source.expected_env:
            raise ExporterError(f"snapshot env {env!r} is not the expected {source.expected_env!r}")
        if not node_id:
            raise ExporterError("malformed page: a snapshot has no node_id")
        raw_samples = raw.get("samples")
        if raw_samples is None:
            raw_samples = []
        if not isinstance(raw_samples, list):
            raise ExporterError("malformed page: a snapshot's samples is not a list")
        samples = []
        for raw_sample in raw_samples:
            sample = parse_sample(raw_sample)
            if sample is None:
                invalid += 1
            else:
                samples.append(sample)
        count += len(raw_samples)
        snapshots.append(Snapshot(collected_at, storage_node(env, node_id), samples))
    snapshots.sort(key=lambda snap: snap.collected_at)
    return Page(snapshots, has_more, next_cursor, invalid, count)


class ExporterClient:
    """One source's HTTP client: its own session, TLS material and token."""

    def __init__(self, source: Source, default_token: str, secrets: Secrets):
        self.source = source
        self.url = source.base_url.rstrip("/") + "/v1/snapshots/window"
        self._default_token = default_token
        self._secrets = secrets
        self._token_stamp = None
        self._token = ""
        self.session = requests.Session()
        # No proxies, netrc or CA overrides from the environment: a source's
        # transport is exactly what its configuration says.
        self.session.trust_env = False
        self.session.verify = source.ca_bundle or True
        if source.client_cert:
            self.session.cert = (source.client_cert, source.client_key) if source.client_key else source.client_cert

    def token(self) -> str:
        if not self.source.token_file:
            return self._default_token
        try:
            stat = os.stat(self.source.token_file)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp != self._token_stamp:  # rotated: read it again
                with open(self.source.token_file, encoding="utf-8") as handle:
                    token = handle.read().strip()
                self._secrets.add(token)
                self._token, self._token_stamp = token, stamp
        except OSError as exc:
            raise ExporterError(f"token_file is not readable ({exc.strerror})") from None
        if not self._token:
            raise ExporterError("token_file is empty")
        return self._token

    def fetch(self, since: datetime, until: datetime, limit: int, cursor: str) -> Page:
        params = {"since": format_time(since), "until": format_time(until), "limit": str(limit)}
        if cursor:
            params["cursor"] = cursor  # verbatim: exporters compare it to the nanosecond
        headers = {"Accept": "application/json", "Authorization": f"Bearer {self.token()}"}
        timeout = self.source.timeout_seconds
        deadline = time.monotonic() + timeout
        try:
            with self.session.get(self.url, params=params, headers=headers, timeout=timeout,
                                  stream=True, allow_redirects=False) as response:
                if response.status_code != 200:
                    raise ExporterError(f"exporter answered HTTP {response.status_code}")
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                    raise ExporterError(f"exporter page is larger than {MAX_BODY_BYTES} bytes")
                body = bytearray()
                # read1 returns what has arrived; iter_content would wait for a whole chunk,
                # so a byte-a-second exporter would never reach the deadline check below.
                while chunk := response.raw.read1(256 * 1024, decode_content=True):
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise ExporterError(f"exporter page is larger than {MAX_BODY_BYTES} bytes")
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
            # (urllib3's come from reading the body with read1.)
            raise ExporterError(f"request failed ({type(exc).__name__})") from None
        except OSError:  # requests checks the TLS file paths itself; a rotation can remove one
            raise ExporterError("a TLS file (ca_bundle / client_cert / client_key) is missing or unreadable") from None
        return parse_page(bytes(body), self.source, since, until)


# ---- repository: every SQL statement, parameterized; I/O and nothing clever --

@dataclass(slots=True)
class Checkpoint:
    """The last applied totals of one series (one cumulative counter pair)."""
    uplink: int
    downlink: int
    last_seen_at: datetime
    reset_epoch: int = 0


@dataclass(slots=True)
class QuotaState:
    remaining: int  # included bytes left
    balance: float
    last_rated_bucket_at: datetime | None = None


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
class Watermark:
    """A source's row of billing_source_sync_state."""
    source_id: str
    last_completed_until: datetime | None = None
    last_attempted_at: datetime | None = None
    last_succeeded_at: datetime | None = None
    last_error: str = ""


class _CountingCursor(psycopg2.extensions.cursor):
    """Counts statements per connection, so the benchmark can show round trips."""

    def execute(self, query, vars=None):
        self.connection.statements += 1
        return super().execute(query, vars)

    def copy_expert(self, sql, file, size=8192):
        self.connection.statements += 1
        return super().copy_expert(sql, file, size)


class _Connection(psycopg2.extensions.connection):
    statements = 0


class Database:
    """A small pool. A connection that failed at the transport level is closed,
    never handed out again, so the service recovers when PostgreSQL returns."""

    def __init__(self, dsn: str, secrets: Secrets, connect_timeout: int = 3, keep: int = 8):
        self._dsn = dsn
        self._secrets = secrets
        self._connect_timeout = connect_timeout
        self._keep = keep
        self._idle: list = []
        self._lock = threading.Lock()

    def _connect(self):
        return psycopg2.connect(
            self._dsn, connection_factory=_Connection, cursor_factory=_CountingCursor,
            connect_timeout=self._connect_timeout, application_name="billing-service",
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3, tcp_user_timeout=30000,
            options="-c TimeZone=UTC -c lock_timeout=60000 -c idle_in_transaction_session_timeout=600000")

    @contextmanager
    def connection(self, fresh: bool = False):
        conn = None
        if not fresh:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        except BaseException:
            self._release(conn, failed=True)
            raise
        self._release(conn, failed=False)

    def _release(self, conn, failed: bool) -> None:
        try:
            if not conn.closed and failed:
                conn.rollback()
            if not conn.closed and conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.rollback()
        except psycopg2.Error:
            pass
        with self._lock:
            if not conn.closed and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def db_error_text(exc: BaseException, secrets: Secrets) -> str:
    """A database error as one safe line (libpq can echo DSN parts)."""
    text = str(exc).strip().splitlines()
    return secrets.redact(f"database error: {text[0] if text else type(exc).__name__}")


_LOCK_NAMESPACE = 0x62696C6C  # "bill": keeps our advisory locks apart from others'


def _lock_key(source_id: str) -> int:
    import zlib
    return zlib.crc32(source_id.encode()) - 2**31


def try_lock_source(conn, source_id: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_NAMESPACE, _lock_key(source_id)))
        locked = cur.fetchone()[0]
    conn.commit()
    return locked


def unlock_source(conn, source_id: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_NAMESPACE, _lock_key(source_id)))
    conn.commit()


_WATERMARK_COLUMNS = "source_id, last_completed_until, last_attempted_at, last_succeeded_at, last_error"


def read_watermarks(conn, source_ids) -> dict:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_WATERMARK_COLUMNS} FROM billing_source_sync_state WHERE source_id = ANY(%s)",
                    (list(source_ids),))
        rows = cur.fetchall()
    conn.commit()
    return {row[0]: Watermark(*row) for row in rows}


def begin_source_run(conn, source_id: str, now: datetime) -> Watermark:
    """Record the attempt and reset the progress row; return the watermark."""
    with conn.cursor() as cur:
        cur.execute(
            f"""INSERT INTO billing_source_sync_state (source_id, last_attempted_at, updated_at)
                VALUES (%s, %s, now())
                ON CONFLICT (source_id) DO UPDATE
                SET last_attempted_at = EXCLUDED.last_attempted_at, updated_at = now()
                RETURNING {_WATERMARK_COLUMNS}""",
            (source_id, now))
        mark = Watermark(*cur.fetchone())
        cur.execute(
            """INSERT INTO billing_source_progress (source_id, run_started_at, running, updated_at)
               VALUES (%s, %s, true, now())
               ON CONFLICT (source_id) DO UPDATE
               SET run_started_at = EXCLUDED.run_started_at, running = true, window_since = NULL,
                   window_until = NULL, pages = 0, snapshots = 0, samples = 0, position = NULL,
                   updated_at = now()""",
            (source_id, now))
    conn.commit()
    return mark


def set_progress_window(conn, source_id: str, since: datetime, until: datetime) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE billing_source_progress SET window_since = %s, window_until = %s, updated_at = now() "
                    "WHERE source_id = %s", (since, until, source_id))
    conn.commit()


def finish_source_run(conn, source_id: str, completed_until, succeeded_at, error: str) -> Watermark:
    """Close a source's run: the watermark only ever moves forward."""
    with conn.cursor() as cur:
        cur.execute(
            f"""UPDATE billing_source_sync_state
                SET last_completed_until = GREATEST(last_completed_until, %s),
                    last_succeeded_at = COALESCE(%s, last_succeeded_at),
                    last_error = %s, updated_at = now()
                WHERE source_id = %s
                RETURNING {_WATERMARK_COLUMNS}""",
            (completed_until, succeeded_at, error, source_id))
        row = cur.fetchone()
        cur.execute("UPDATE billing_source_progress SET running = false, updated_at = now() WHERE source_id = %s",
                    (source_id,))
    conn.commit()
    return Watermark(*row) if row else Watermark(source_id)


# Page-scoped scratch tables: filled with COPY, joined set-based, emptied at
# commit. One fixed set of statements per page, whatever its size.
_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS page_series (
  series_node TEXT, storage_node TEXT, line_code TEXT, account_uuid UUID) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_quota (
  account_uuid UUID, remaining BIGINT, balance DOUBLE PRECISION, last_rated TIMESTAMPTZ) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_buckets (
  bucket_start TIMESTAMPTZ, node_id TEXT, account_uuid UUID, line_code TEXT, uplink BIGINT,
  downlink BIGINT, multiplier DOUBLE PRECISION, source_revision TEXT) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_ledger (
  seq INTEGER, id UUID, account_uuid UUID, bucket_start TIMESTAMPTZ, rated_bytes BIGINT,
  amount_delta DOUBLE PRECISION, balance_after DOUBLE PRECISION, version TEXT) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS page_checkpoints (
  node_id TEXT, account_uuid UUID, uplink BIGINT, downlink BIGINT, last_seen_at TIMESTAMPTZ,
  reset_epoch BIGINT) ON COMMIT DELETE ROWS;
"""
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class _CopyText(dict):
    """COPY text format of labels, times and None, memoized: a page repeats the
    same few nodes, tags, versions and minutes over thousands of rows.
    Integers go in as str(int); account UUIDs are canonical (parse_sample)."""

    def __missing__(self, value):
        if value is None:
            text = "\\N"
        elif isinstance(value, str):
            text = value.translate(_COPY_ESCAPES)
        elif isinstance(value, datetime):
            text = value.isoformat()
        else:
            text = repr(value)
        self[value] = text
        return text


def _copy_lines(cur, table: str, lines: list) -> None:
    """COPY already formatted lines (one per row, tab-separated) into a scratch table."""
    data = "".join(lines)
    # One read of the whole buffer: each read takes the GIL, which the thread
    # rating the next page holds most of the time.
    cur.copy_expert(f"COPY {table} FROM STDIN", io.StringIO(data), size=max(8192, len(data)))


def load_series(conn, series: list, region: str):
    """Lock and read the page's series. ``series`` holds (series_node,
    storage_node, line_code, account) tuples. Returns the accounts that exist,
    the checkpoints, and which series' last-seen minute already has a bucket."""
    with conn.cursor() as cur:
        cur.execute(_TEMP_TABLES)
        t = _CopyText().__getitem__
        _copy_lines(cur, "page_series", [f"{t(sn)}\t{t(node)}\t{t(line)}\t{account}\n"
                                         for sn, node, line, account in series])
        cur.execute("SELECT DISTINCT u.uuid::text FROM users u JOIN page_series s ON s.account_uuid = u.uuid")
        known = {row[0] for row in cur.fetchall()}
        # FOR UPDATE in key order: two writers of one series (a source
        # configured twice) queue here instead of billing it twice.
        cur.execute(
            """SELECT c.node_id, c.account_uuid::text, c.last_uplink_total, c.last_downlink_total,
                      c.last_seen_at, c.reset_epoch,
                      EXISTS (SELECT 1 FROM traffic_minute_buckets b
                              WHERE b.bucket_start = date_trunc('minute', c.last_seen_at)
                                AND b.node_id = s.storage_node AND b.account_uuid = s.account_uuid
                                AND b.region = %s AND b.line_code = s.line_code)
               FROM page_series s
               JOIN traffic_stat_checkpoints c ON c.node_id = s.series_node AND c.account_uuid = s.account_uuid
               ORDER BY c.node_id, c.account_uuid
               FOR UPDATE OF c""",
            (region,))
        checkpoints, open_buckets = {}, set()
        for node_id, account, up, down, seen, epoch, has_bucket in cur.fetchall():
            checkpoints[(node_id, account)] = Checkpoint(up, down, seen, epoch)
            if has_bucket:
                open_buckets.add((node_id, account))
    return known, checkpoints, open_buckets


def read_profiles(conn, accounts) -> dict:
    with conn.cursor() as cur:
        cur.execute(
            """SELECT account_uuid::text, included_quota_bytes, base_price_per_byte, region_multiplier,
                      line_multiplier, pricing_rule_version
               FROM account_billing_profiles WHERE account_uuid = ANY(%s::uuid[])""",
            (list(accounts),))
        return {row[0]: row[1:] for row in cur.fetchall()}


def lock_quota_states(conn, initial: dict) -> dict:
    """Create missing quota rows from ``initial`` (account -> QuotaState), then
    lock every one of them in account order (a fixed order: no deadlocks)."""
    with conn.cursor() as cur:
        _copy_lines(cur, "page_quota", [f"{a}\t{q.remaining}\t{q.balance!r}\t\\N\n" for a, q in initial.items()])
        cur.execute(
            """INSERT INTO account_quota_states (account_uuid, remaining_included_quota, current_balance,
                                                 arrears, throttle_state, suspend_state)
               SELECT account_uuid, remaining, balance, balance < 0,
                      CASE WHEN balance < 0 THEN 'throttled' ELSE 'normal' END, 'active'
               FROM page_quota ORDER BY account_uuid
               ON CONFLICT (account_uuid) DO NOTHING""")
        cur.execute(
            """SELECT q.account_uuid::text, q.remaining_included_quota, q.current_balance, q.last_rated_bucket_at
               FROM account_quota_states q JOIN page_quota p USING (account_uuid)
               ORDER BY q.account_uuid FOR UPDATE OF q""")
        states = {row[0]: QuotaState(row[1], row[2], row[3]) for row in cur.fetchall()}
        cur.execute("TRUNCATE page_quota")
    return states


def write_page(conn, region: str, buckets, ledger, checkpoints: dict, quota: dict) -> None:
    """Write one page's facts (inside the page transaction; the caller commits)."""
    t = _CopyText().__getitem__
    with conn.cursor() as cur:
        if buckets:
            _copy_lines(cur, "page_buckets", [
                f"{t(b.bucket_start)}\t{t(b.node_id)}\t{b.account}\t{t(b.line_code)}\t{b.uplink}\t{b.downlink}\t"
                f"{b.multiplier!r}\t{t(b.version)}\n" for b in buckets])
            # Bytes accumulate: a second sample of a minute adds, never overwrites.
            # No ORDER BY: buckets are per series, and load_series already
            # serialized every writer of these series (checkpoints FOR UPDATE).
            cur.execute(
                """INSERT INTO traffic_minute_buckets AS t
                     (bucket_start, node_id, account_uuid, region, line_code, uplink_bytes, downlink_bytes,
                      total_bytes, multiplier, rating_status, source_revision)
                   SELECT bucket_start, node_id, account_uuid, %s, line_code, uplink, downlink,
                          uplink + downlink, multiplier, 'rated', source_revision
                   FROM page_buckets
                   ON CONFLICT (bucket_start, node_id, account_uuid, region, line_code) DO UPDATE
                   SET uplink_bytes = t.uplink_bytes + EXCLUDED.uplink_bytes,
                       downlink_bytes = t.downlink_bytes + EXCLUDED.downlink_bytes,
                       total_bytes = t.total_bytes + EXCLUDED.total_bytes,
                       multiplier = EXCLUDED.multiplier, rating_status = 'rated',
                       source_revision = EXCLUDED.source_revision, updated_at = now()""",
                (region,))
        if ledger:
            _copy_lines(cur, "page_ledger", [
                f"{i}\t{e.id}\t{e.account}\t{t(e.bucket_start)}\t{e.rated_bytes}\t{e.amount!r}\t"
                f"{e.balance_after!r}\t{t(e.version)}\n" for i, e in enumerate(ledger)])
            # A plain INSERT: the deterministic id makes a fact applied twice a
            # primary-key error that rolls the page back, never a second charge.
            cur.execute(
                """INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
                                               amount_delta, balance_after, pricing_rule_version, created_at)
                   SELECT id, account_uuid, bucket_start, bucket_start + interval '1 minute', 'traffic_charge',
                          rated_bytes, amount_delta, balance_after, version, clock_timestamp()
                   FROM page_ledger ORDER BY seq""")
        if checkpoints:
            _copy_lines(cur, "page_checkpoints", [
                f"{t(node)}\t{account}\t{c.uplink}\t{c.downlink}\t{t(c.last_seen_at)}\t{c.reset_epoch}\n"
                for (node, account), c in checkpoints.items()])
            cur.execute(
                """INSERT INTO traffic_stat_checkpoints AS t
                     (node_id, account_uuid, last_uplink_total, last_downlink_total, last_seen_at, reset_epoch)
                   SELECT node_id, account_uuid, uplink, downlink, last_seen_at, reset_epoch
                   FROM page_checkpoints ORDER BY node_id, account_uuid
                   ON CONFLICT (node_id, account_uuid) DO UPDATE
                   SET last_uplink_total = EXCLUDED.last_uplink_total,
                       last_downlink_total = EXCLUDED.last_downlink_total,
                       last_seen_at = EXCLUDED.last_seen_at, reset_epoch = EXCLUDED.reset_epoch,
                       updated_at = now()""")
        if quota:
            _copy_lines(cur, "page_quota", [
                f"{account}\t{q.remaining}\t{q.balance!r}\t{t(q.last_rated_bucket_at)}\n"
                for account, q in quota.items()])
            cur.execute(
                """UPDATE account_quota_states q
                   SET remaining_included_quota = p.remaining, current_balance = p.balance,
                       arrears = p.balance < 0,
                       throttle_state = CASE WHEN p.balance < 0 THEN 'throttled' ELSE 'normal' END,
                       last_rated_bucket_at = p.last_rated, effective_at = now(), updated_at = now()
                   FROM page_quota p WHERE q.account_uuid = p.account_uuid""")


def record_page_progress(conn, source_id: str, snapshots: int, samples: int, position, move_watermark: bool) -> None:
    """The page's progress, in the page's own transaction: all of it or none."""
    with conn.cursor() as cur:
        cur.execute(
            """UPDATE billing_source_progress
               SET pages = pages + 1, snapshots = snapshots + %s, samples = samples + %s,
                   position = GREATEST(position, %s), updated_at = now()
               WHERE source_id = %s""",
            (snapshots, samples, position, source_id))
        if move_watermark:
            cur.execute(
                """UPDATE billing_source_sync_state
                   SET last_completed_until = GREATEST(last_completed_until, %s), updated_at = now()
                   WHERE source_id = %s""",
                (position, source_id))


RUN_RETENTION = 1000  # finished runs kept in billing_job_runs
_TOTAL_FIELDS = ("processed_samples", "written_minutes", "replayed_minutes", "invalid_samples",
                 "unknown_account_samples")


def record_run(conn, result: dict) -> None:
    with conn.cursor() as cur:
        if result["status"] != "busy":  # a run that did nothing is no news for /v1/status
            cur.execute(
                "INSERT INTO billing_job_runs (job, status, started_at, finished_at, result) "
                "VALUES (%s, %s, %s, %s, %s)",
                (result["job"], result["status"], result["started_at"], result["finished_at"], json.dumps(result)))
            cur.execute(
                "DELETE FROM billing_job_runs WHERE id <= "
                "(SELECT id FROM billing_job_runs ORDER BY id DESC OFFSET %s LIMIT 1)",
                (RUN_RETENTION,))
        columns = ", ".join(_TOTAL_FIELDS)
        increments = ", ".join(f"{name} = t.{name} + EXCLUDED.{name}" for name in _TOTAL_FIELDS)
        cur.execute(
            f"""INSERT INTO billing_job_totals AS t (job, status, runs, {columns})
                VALUES (%s, %s, 1, {', '.join(['%s'] * len(_TOTAL_FIELDS))})
                ON CONFLICT (job, status) DO UPDATE SET runs = t.runs + 1, {increments}""",
            (result["job"], result["status"], *(result.get(name, 0) for name in _TOTAL_FIELDS)))
    conn.commit()


def last_run(conn) -> dict | None:
    with conn.cursor() as cur:
        cur.execute("SELECT result FROM billing_job_runs ORDER BY id DESC LIMIT 1")
        row = cur.fetchone()
    conn.commit()
    return row[0] if row else None


def read_source_views(conn, source_ids) -> dict:
    """Watermark and progress of each source, with PostgreSQL's clock for lag."""
    with conn.cursor() as cur:
        cur.execute(
            """SELECT s.source_id, w.last_completed_until, w.last_attempted_at, w.last_succeeded_at,
                      w.last_error, p.running, p.run_started_at, p.window_since, p.window_until,
                      p.pages, p.snapshots, p.samples, p.position, p.updated_at,
                      extract(epoch FROM now() - w.last_completed_until)
               FROM unnest(%s::text[]) AS s(source_id)
               LEFT JOIN billing_source_sync_state w USING (source_id)
               LEFT JOIN billing_source_progress p USING (source_id)""",
            (list(source_ids),))
        rows = cur.fetchall()
    conn.commit()
    return {row[0]: row for row in rows}


def read_totals(conn) -> list:
    with conn.cursor() as cur:
        cur.execute(f"SELECT job, status, runs, {', '.join(_TOTAL_FIELDS)} FROM billing_job_totals ORDER BY 1, 2")
        rows = cur.fetchall()
    conn.commit()
    return rows


def ping_database(conn) -> None:
    with conn.cursor() as cur:
        cur.execute("SET LOCAL statement_timeout = 2000")
        cur.execute("SELECT 1")
    conn.commit()


# ---- billing core: pure rating of samples against checkpoints and quota ----

@dataclass(frozen=True, slots=True)
class Pricing:
    included_quota: int  # given on first sight
    price_per_byte: float
    multiplier: float
    version: str


def _positive(value, default):
    return value if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else default


def effective_pricing(profile, defaults: Pricing) -> Pricing:
    """Config defaults, overridden by an account_billing_profiles row
    (included_quota, base_price, region_multiplier, line_multiplier, version).
    Non-positive or non-finite profile numbers fall back, so a bad profile can
    never produce a NaN charge."""
    if profile is None:
        return defaults
    included, price, region_mult, line_mult, version = profile
    return Pricing(
        included_quota=int(_positive(included, defaults.included_quota)),
        price_per_byte=float(_positive(price, defaults.price_per_byte)),
        multiplier=float(_positive(region_mult, 1.0)) * float(_positive(line_mult, 1.0)),
        version=version.strip() if isinstance(version, str) and version.strip() else defaults.version,
    )


def series_node(storage: str, inbound_tag: str) -> str:
    """Checkpoint node_id of a series: the inbound tag rides in the node_id so
    the (node_id, account_uuid) primary key holds one counter pair per inbound."""
    return f"{storage}#{inbound_tag}" if inbound_tag else storage


def page_series(snapshots) -> list:
    """(series_node, storage_node, line_code, account) of every series in a page."""
    seen = {}
    for snap in snapshots:
        node = snap.storage_node
        for s in snap.samples:
            key = (node, s.inbound_tag, s.account)
            if key not in seen:
                seen[key] = (series_node(node, s.inbound_tag), node, s.inbound_tag, s.account)
    return list(seen.values())


_KEY_NAMESPACE = uuid.NAMESPACE_OID
_KEY_HASH = hashlib.sha1(_KEY_NAMESPACE.bytes)


def ledger_id(bucket_start: datetime, node: str, account: str, region: str, line_code: str,
              increment_at: datetime | None = None) -> str:
    """Deterministic ledger id. The first increment of a bucket keeps the
    established key; later increments of the same bucket add the sample time.

    It is uuid.uuid5(_KEY_NAMESPACE, name), spelled out: uuid5 builds two UUID
    objects per call, and a catch-up makes one id per sample."""
    name = f"{format_time(bucket_start)}|{node}|{account}|{region}|{line_code}"
    if increment_at is not None:
        name += f"|{format_time(increment_at)}"
    digest = _KEY_HASH.copy()
    digest.update(name.encode())
    raw = bytearray(digest.digest()[:16])
    raw[6] = raw[6] & 0x0F | 0x50  # version 5
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(slots=True)
class Increment:
    """Bytes one sample adds to its series' minute bucket."""
    bucket_start: datetime
    node_id: str  # storage node
    account: str
    line_code: str
    uplink: int
    downlink: int
    collected_at: datetime
    first: bool  # the bucket's first increment (keeps the established ledger key)


@dataclass
class MeteredPage:
    increments: list  # in application order
    checkpoints: dict  # (series_node, account) -> Checkpoint, changed ones only
    applied: int = 0  # samples that moved a checkpoint
    replayed: int = 0  # samples at or before their series' last_seen_at
    resets: int = 0  # counter resets (re-baselined, nothing billed)
    unknown: int = 0  # samples of accounts without a users row


def meter_page(snapshots, known: set, checkpoints: dict, open_buckets: set) -> MeteredPage:
    """Turn one page of snapshots (in collected_at order) into byte increments
    against the series checkpoints. Pure: the inputs are not modified.

    ``open_buckets`` names the series whose bucket at their checkpoint's
    minute already exists, so a later sample of that minute is not its first
    increment."""
    cps: dict = {}
    seen_buckets: set = set()
    out = MeteredPage([], cps)
    increments = out.increments
    for snap in snapshots:
        stamp = snap.collected_at
        minute = minute_floor(stamp)
        node = snap.storage_node
        for s in snap.samples:
            account = s.account
            if account not in known:
                out.unknown += 1
                continue
            tag = s.inbound_tag
            key = (series_node(node, tag), account)
            cp = cps.get(key) or checkpoints.get(key)
            if cp is None:
                up, down, epoch = s.uplink, s.downlink, 0  # first sight: bill from zero
            elif stamp <= cp.last_seen_at:
                out.replayed += 1
                continue
            else:
                up, down, epoch = s.uplink - cp.uplink, s.downlink - cp.downlink, cp.reset_epoch
            out.applied += 1
            if up < 0 or down < 0:
                cps[key] = Checkpoint(s.uplink, s.downlink, stamp, epoch + 1)
                out.resets += 1
                continue
            cps[key] = Checkpoint(s.uplink, s.downlink, stamp, epoch)
            if up or down:
                bucket_key = (minute, key)
                if bucket_key in seen_buckets:
                    first = False
                else:
                    seen_buckets.add(bucket_key)
                    stored = checkpoints.get(key)
                    first = not (key in open_buckets and stored is not None
                                 and minute_floor(stored.last_seen_at) == minute)
                increments.append(Increment(minute, node, account, tag, up, down, stamp, first))
    return out


@dataclass
class RatedPage:
    buckets: list  # Bucket, one per bucket key
    ledger: list  # LedgerEntry, in application order
    quota: dict  # account -> QuotaState, changed ones only


def rate_increments(increments, pricing: dict, quota: dict, region: str) -> RatedPage:
    """Price increments in order: included quota first, then price x
    multiplier; one immutable ledger row per increment. Pure."""
    buckets: dict = {}
    quotas: dict = {}
    ledger = []
    for inc in increments:
        account = inc.account
        price = pricing[account]
        key = (inc.bucket_start, inc.node_id, account, inc.line_code)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(inc.bucket_start, inc.node_id, account, inc.line_code)
        bucket.uplink += inc.uplink
        bucket.downlink += inc.downlink
        bucket.multiplier = price.multiplier
        bucket.version = price.version

        state = quotas.get(account)
        if state is None:
            start = quota[account]
            state = quotas[account] = QuotaState(start.remaining, start.balance, start.last_rated_bucket_at)
        total = inc.uplink + inc.downlink
        used = min(state.remaining, total)
        chargeable = total - used
        amount = -(chargeable * price.price_per_byte * price.multiplier) + 0.0  # + 0.0: no "-0"
        state.remaining -= used
        state.balance += amount
        if state.last_rated_bucket_at is None or inc.bucket_start > state.last_rated_bucket_at:
            state.last_rated_bucket_at = inc.bucket_start
        ledger.append(LedgerEntry(
            ledger_id(inc.bucket_start, inc.node_id, account, region, inc.line_code,
                      None if inc.first else inc.collected_at),
            account, inc.bucket_start, chargeable, amount, state.balance, price.version))
    return RatedPage(list(buckets.values()), ledger, quotas)


@dataclass
class PageReads:
    """What a page transaction reads for the core, restricted to the page: the
    accounts that exist, the series checkpoints, the series whose checkpoint
    minute has a bucket, and the pricing and quota of the charged accounts."""
    known: set
    checkpoints: dict
    open_buckets: set
    pricing: dict
    quota: dict


@dataclass
class Guess:
    """A page rated ahead of its transaction, against predicted reads."""
    reads: PageReads
    metered: MeteredPage
    rated: RatedPage


def reads_after(reads: PageReads, metered: MeteredPage, rated: RatedPage) -> PageReads:
    """The reads the next page's transaction will see if nobody else writes
    in between: this page's reads with its own writes applied."""
    checkpoints = {**reads.checkpoints, **metered.checkpoints}
    written = {(series_node(i.node_id, i.line_code), i.account, i.bucket_start) for i in metered.increments}
    open_buckets = set()
    for key, cp in checkpoints.items():
        minute = minute_floor(cp.last_seen_at)
        before = reads.checkpoints.get(key)
        if (*key, minute) in written or (key in reads.open_buckets and before is not None
                                         and minute_floor(before.last_seen_at) == minute):
            open_buckets.add(key)
    return PageReads(reads.known, checkpoints, open_buckets, reads.pricing, {**reads.quota, **rated.quota})


def guess_page(snapshots, prior: PageReads, region: str) -> Guess | None:
    """Meter and rate a page against ``prior`` (see reads_after). Pure, and
    only a guess: the page transaction compares ``reads`` with what it really
    reads and uses the result only when they are equal, so the outcome is the
    one the core computes from the real reads. None when ``prior`` does not
    cover the page's charged accounts."""
    series = page_series(snapshots)
    keys = {(s[0], s[3]) for s in series}
    metered = meter_page(snapshots, prior.known, prior.checkpoints, prior.open_buckets)
    charged = sorted({inc.account for inc in metered.increments})
    if any(a not in prior.pricing or a not in prior.quota for a in charged):
        return None
    pricing = {a: prior.pricing[a] for a in charged}
    quota = {a: prior.quota[a] for a in charged}
    reads = PageReads(prior.known & {s[3] for s in series},
                      {k: prior.checkpoints[k] for k in keys if k in prior.checkpoints},
                      prior.open_buckets & keys, pricing, quota)
    return Guess(reads, metered, rate_increments(metered.increments, pricing, quota, region))


# ---- HTTP routes: probes, status, metrics and the token-guarded job endpoints --

MAX_REQUEST_BYTES = 64 * 1024
MAX_RECONCILE_RANGE = timedelta(days=7)
_HTTP_STATUS = {"ok": 200, "partial": 200, "error": 503, "busy": 409}


class BadRequest(ValueError):
    pass


def parse_reconcile_body(body: bytes, config: Config, now: datetime):
    """Optional {"source_id", "since", "until"} of a replay on purpose.
    Returns (source_ids or None, (since, until) or None)."""
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


def render_metrics(config: Config, views: dict | None, totals: list) -> str:
    """Prometheus text format, derived from PostgreSQL only (views is None when
    the database did not answer)."""
    out = []

    def family(name, kind, help_text, samples):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_metric_line(name, labels, value) for labels, value in samples)

    family("billing_database_up", "gauge", "Whether PostgreSQL answered this scrape.",
           [({}, 0 if views is None else 1)])
    if views is not None:
        def per_source(pick):
            rows = []
            for source in config.sources:
                value = pick(views[source.source_id])
                if value is not None:
                    rows.append(({"source_id": source.source_id}, value))
            return rows

        def stamp(value):
            return None if value is None else f"{value.timestamp():.3f}"

        family("billing_source_enabled", "gauge", "Whether the source is enabled.",
               [({"source_id": s.source_id}, int(s.enabled)) for s in config.sources])
        family("billing_source_watermark_lag_seconds", "gauge",
               "Seconds between now and the source's last_completed_until.",
               per_source(lambda row: None if row[14] is None else f"{float(row[14]):.3f}"))
        family("billing_source_last_success_timestamp_seconds", "gauge",
               "Unix time of the source's last successful run.", per_source(lambda row: stamp(row[3])))
        family("billing_source_last_attempt_timestamp_seconds", "gauge",
               "Unix time of the source's last attempted run.", per_source(lambda row: stamp(row[2])))
        family("billing_source_last_attempt_failed", "gauge",
               "1 when the source's last attempt ended in an error.",
               per_source(lambda row: None if row[2] is None else int(bool(row[4]))))
        family("billing_source_catchup_running", "gauge", "1 while a run of the source is in progress.",
               per_source(lambda row: int(bool(row[5]))))
        family("billing_job_runs_total", "counter", "Finished job runs by job and status.",
               [({"job": row[0], "status": row[1]}, row[2]) for row in totals])
        for index, name in enumerate(_TOTAL_FIELDS, start=3):
            sums: dict = {}
            for row in totals:
                sums[row[0]] = sums.get(row[0], 0) + row[index]
            family(f"billing_{name}_total", "counter", f"Sum of {name} over all runs, by job.",
                   [({"job": job}, value) for job, value in sorted(sums.items())])
    return "\n".join(out) + "\n"


def source_view(source: Source, row) -> dict:
    """One source as /v1/status shows it: watermark, lag and live progress."""
    (_, completed, attempted, succeeded, error, running, run_started, since, until, pages, snapshots,
     samples, position, updated, lag) = row
    return {
        "source_id": source.source_id, "enabled": source.enabled,
        "last_completed_until": format_time(completed), "last_attempted_at": format_time(attempted),
        "last_succeeded_at": format_time(succeeded), "last_error": error or "",
        "lag_seconds": None if lag is None else round(float(lag), 3),
        "progress": {
            "running": bool(running), "run_started_at": format_time(run_started),
            "window_since": format_time(since), "window_until": format_time(until),
            "pages": pages or 0, "snapshots": snapshots or 0, "samples": samples or 0,
            "position": format_time(position), "updated_at": format_time(updated),
        },
    }


def make_wsgi_app(config: Config, db: Database, run_job) -> flask.Flask:
    """The Flask app. ``run_job(job, source_ids, window)`` runs one collection
    and returns its result (the collector below provides it)."""
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False
    auth_failures = {"count": 0}
    source_ids = [s.source_id for s in config.sources]

    def read_db(work):
        try:
            with db.connection() as conn:
                return work(conn)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            # Likely a pooled connection that died with a database restart:
            # drop them all and try once on a new one.
            db.close_all()
            with db.connection(fresh=True) as conn:
                return work(conn)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        message = {413: f"request body is larger than {MAX_REQUEST_BYTES} bytes"}.get(exc.code, exc.name.lower())
        response = flask.jsonify(error=message)
        response.status_code = exc.code
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def internal_error(exc):
        log_event(config.secrets, "internal_error", path=flask.request.path, error=type(exc).__name__,
                  detail=str(exc)[:500])
        return flask.jsonify(error="internal error"), 500

    def authorized() -> bool:
        header = flask.request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            given = flask.request.headers.get("X-Service-Token", "")
        return hmac.compare_digest(given.strip().encode(), config.service_token.encode())

    def job_endpoint(job: str, window_allowed: bool):
        if not authorized():
            auth_failures["count"] += 1
            log_event(config.secrets, "auth_failed", path=flask.request.path,
                      remote_addr=flask.request.remote_addr, failures=auth_failures["count"])
            return flask.jsonify(error="missing or wrong service token"), 401
        body = flask.request.get_data(cache=False)  # over the cap: 413
        if len(body) >= MAX_REQUEST_BYTES and flask.request.content_length is None:
            flask.abort(413)  # werkzeug cuts a chunked body at the cap instead of refusing it
        source_ids, window = None, None
        if window_allowed:
            try:
                source_ids, window = parse_reconcile_body(body, config, datetime.now(UTC))
            except BadRequest as exc:
                return flask.jsonify(error=str(exc)), 400
        result = run_job(job, source_ids, window)
        return flask.jsonify(result), _HTTP_STATUS[result["status"]]

    @app.get("/api/ping")
    def ping():
        return flask.jsonify(parse_image(config.image))

    @app.get("/healthz")
    def healthz():
        def check(conn):
            ping_database(conn)
            return last_run(conn)
        try:
            run = read_db(check)
        except psycopg2.Error as exc:
            return flask.jsonify(status="error", message=db_error_text(exc, config.secrets)), 503
        if run is None:
            return flask.jsonify(status="starting", message="no collection run has finished yet"), 503
        if run["status"] == "error":
            return flask.jsonify(status="error", message=f"last run failed: {run['error']}"), 503
        return flask.jsonify(status="ok", message="")

    @app.get("/v1/status")
    def status():
        def read(conn):
            return last_run(conn), read_source_views(conn, source_ids)
        try:
            run, views = read_db(read)
        except psycopg2.Error as exc:
            return flask.jsonify(error=db_error_text(exc, config.secrets)), 503
        payload = dict(run) if run else {
            "job": None, "started_at": None, "finished_at": None, "processed_samples": 0,
            "written_minutes": 0, "replayed_minutes": 0, "status": "starting", "error": "",
            "source_statuses": []}
        payload["sources"] = [source_view(s, views[s.source_id]) for s in config.sources]
        return flask.jsonify(payload)

    @app.get("/metrics")
    def metrics():
        def read(conn):
            return read_source_views(conn, source_ids), read_totals(conn)
        try:
            views, totals = read_db(read)
        except psycopg2.Error:
            views, totals = None, []
        return flask.Response(render_metrics(config, views, totals),
                              content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/jobs/collect-and-rate")
    def collect_and_rate():
        return job_endpoint("collect-and-rate", window_allowed=False)

    @app.post("/v1/jobs/reconcile")
    def reconcile():
        return job_endpoint("reconcile", window_allowed=True)

    return app


# ---- collector: one job run over the sources, and the thread that repeats it --

BUSY_WAIT_SECONDS = 10.0  # how long an HTTP-triggered run waits for a source another writer holds
OVERLAP = 2 * MINUTE
PAGE_ATTEMPTS = 3  # a page transaction that hit a deadlock or serialization failure is retried
MAX_EMPTY_PAGES = 3  # consecutive empty pages that still say has_more: a broken exporter


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class SourceRun:
    source_id: str
    state: str = "ok"  # ok | failed | busy
    error: str = ""
    processed_samples: int = 0
    written_minutes: int = 0
    replayed_minutes: int = 0
    invalid_samples: int = 0
    unknown_account_samples: int = 0
    counter_resets: int = 0
    pages: int = 0
    sql_statements: int = 0
    watermark: Watermark | None = None

    def add(self, metered: MeteredPage) -> None:
        self.processed_samples += metered.applied + metered.replayed
        self.written_minutes += len(metered.increments)
        self.replayed_minutes += metered.replayed
        self.unknown_account_samples += metered.unknown
        self.counter_resets += metered.resets

    def status(self) -> dict:
        mark = self.watermark or Watermark(self.source_id)
        return {
            "source_id": self.source_id,
            "last_completed_until": format_time(mark.last_completed_until),
            "last_attempted_at": format_time(mark.last_attempted_at),
            "last_succeeded_at": format_time(mark.last_succeeded_at),
            "last_error": mark.last_error, "state": self.state,
            "processed_samples": self.processed_samples, "written_minutes": self.written_minutes,
            "replayed_minutes": self.replayed_minutes, "invalid_samples": self.invalid_samples,
            "unknown_account_samples": self.unknown_account_samples, "counter_resets": self.counter_resets,
            "pages": self.pages, "sql_statements": self.sql_statements,
        }


def summarize(job: str, started: datetime, finished: datetime, runs: list) -> dict:
    """The run result of SPEC section 8 from the per-source outcomes."""
    totals = {name: sum(getattr(r, name) for r in runs) for name in
              ("processed_samples", "written_minutes", "replayed_minutes", "invalid_samples",
               "unknown_account_samples", "counter_resets")}
    errors = [f"{r.source_id}: {r.error}" for r in runs if r.state == "failed"]
    for r in runs:
        if r.invalid_samples:
            errors.append(f"{r.source_id}: {r.invalid_samples} invalid samples skipped")
        if r.unknown_account_samples:
            errors.append(f"{r.source_id}: {r.unknown_account_samples} samples of unknown accounts skipped")
    states = {r.state for r in runs}
    if not runs:
        status, errors = "error", ["no enabled source"]
    elif states == {"busy"}:
        status = "busy"
    elif "ok" not in states:
        status = "error"
    elif errors:
        status = "partial"
    else:
        status = "ok"
    return {
        "job": job, "started_at": format_time(started), "finished_at": format_time(finished),
        "processed_samples": totals["processed_samples"], "written_minutes": totals["written_minutes"],
        "replayed_minutes": totals["replayed_minutes"], "status": status, "error": "; ".join(errors),
        "invalid_samples": totals["invalid_samples"],
        "unknown_account_samples": totals["unknown_account_samples"],
        "counter_resets": totals["counter_resets"],
        "source_statuses": [r.status() for r in runs],
    }


class Collector:
    """Runs collections (from HTTP or its own thread) against the sources.

    One writer per source across threads, workers and hosts: a PostgreSQL
    advisory lock on the source, held for the whole run on the run's own
    connection (a crash releases it with the session)."""

    def __init__(self, config: Config, db: Database):
        self.config = config
        self.db = db
        self.clients = {s.source_id: ExporterClient(s, config.source_tokens[s.source_id], config.secrets)
                        for s in config.sources}
        self.defaults = Pricing(config.initial_included_quota, config.price_per_byte, 1.0, config.source_revision)
        self._page_limits: dict = {}  # learned per source: snapshots per page that fit PAGE_SAMPLE_TARGET
        self.guesses_used = 0  # pages whose rating ahead matched their real reads (the crash test checks)
        self._stop = threading.Event()
        self._thread = None

    # -- one job run --------------------------------------------------------

    def run(self, job: str, source_ids=None, window=None, wait: float = BUSY_WAIT_SECONDS) -> dict:
        started, clock = utcnow(), time.monotonic()
        sources = [s for s in self.config.sources if s.enabled and (source_ids is None or s.source_id in source_ids)]
        runs = [self.collect_source(source, window, wait) for source in sources]
        result = summarize(job, started, utcnow(), runs)
        try:
            with self.db.connection() as conn:
                record_run(conn, result)
        except psycopg2.Error as exc:
            log_event(self.config.secrets, "run_not_recorded", job=job, error=db_error_text(exc, self.config.secrets))
        log_event(self.config.secrets, "run", job=job, status=result["status"],
                  duration_seconds=round(time.monotonic() - clock, 3),
                  **{k: result[k] for k in ("processed_samples", "written_minutes", "replayed_minutes",
                                            "invalid_samples", "unknown_account_samples", "error")},
                  sources=[{"source_id": r.source_id, "state": r.state, "error": r.error, "pages": r.pages}
                           for r in runs])
        return result

    def _acquire(self, conn, source_id: str, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while not try_lock_source(conn, source_id):
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            time.sleep(0.2)
        return True

    def collect_source(self, source: Source, window, wait: float) -> SourceRun:
        run = SourceRun(source.source_id)
        try:
            with self.db.connection() as conn:
                if not self._acquire(conn, source.source_id, wait):
                    run.state = "busy"
                    run.watermark = read_watermarks(conn, [source.source_id]).get(source.source_id)
                    return run
                try:
                    self._collect_locked(conn, source, window, run)
                finally:
                    if not conn.closed:
                        unlock_source(conn, source.source_id)
        except psycopg2.Error as exc:
            self._fail(run, db_error_text(exc, self.config.secrets))
        return run

    def _fail(self, run: SourceRun, error: str) -> None:
        """Record a source failure; the watermark stays where it is."""
        run.state, run.error = "failed", self.config.secrets.redact(error)
        log_event(self.config.secrets, "source_failed", source_id=run.source_id, error=run.error)
        try:
            with self.db.connection() as conn:
                run.watermark = finish_source_run(conn, run.source_id, None, None, run.error)
        except psycopg2.Error:
            pass  # the database is what failed; the run result still says why

    def _collect_locked(self, conn, source: Source, window, run: SourceRun) -> None:
        sid = source.source_id
        statements_before = conn.statements
        mark = begin_source_run(conn, sid, utcnow())
        if window:
            since, until = window
        else:
            until = minute_floor(utcnow()) - MINUTE
            since = mark.last_completed_until - OVERLAP if mark.last_completed_until else until - OVERLAP
        if since > until:
            run.watermark = finish_source_run(conn, sid, until, utcnow(), "")
            return
        set_progress_window(conn, sid, since, until)
        client = self.clients[sid]
        cursor, last_at, empty_pages = "", None, 0
        # One page ahead: the next page downloads and parses while this one is
        # written (the GIL is free while PostgreSQL works). Pages apply in order.
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ahead-{sid}")
        guess = None  # the page being fetched, rated ahead against predicted reads (a Future)

        def rate_next_ahead(prior: PageReads) -> None:
            nonlocal guess
            if pending is not None:
                fetched = pending
                guess = ahead.submit(lambda: guess_page(fetched.result().snapshots, prior, self.config.region))

        try:
            pending = ahead.submit(client.fetch, since, until, self._page_limits.get(sid, 1), cursor)
            while pending is not None:
                page, pending = pending.result(), None
                this_guess, guess = guess, None
                # Checked before the page is applied: a page that breaks the protocol is rejected whole.
                if page.has_more and not page.next_cursor:
                    raise ExporterError("protocol error: has_more without a next_cursor")
                if page.has_more and page.next_cursor == cursor:
                    raise ExporterError("protocol error: next_cursor did not advance")
                run.pages += 1
                run.invalid_samples += page.invalid_samples
                if page.snapshots:
                    per_snapshot = max(1, -(-page.sample_count // len(page.snapshots)))
                    self._page_limits[sid] = max(1, min(MAX_PAGE_LIMIT, PAGE_SAMPLE_TARGET // per_snapshot))
                    empty_pages = 0
                else:
                    self._page_limits.setdefault(sid, MAX_PAGE_LIMIT)
                    empty_pages += 1
                stop_after = self._stop_reason(run.pages, empty_pages) if page.has_more else ""
                if page.has_more and not stop_after:
                    cursor = page.next_cursor
                    pending = ahead.submit(client.fetch, since, until, self._page_limits[sid], cursor)
                if page.snapshots:
                    run.add(self._apply_page(conn, sid, page, window is None, this_guess, rate_next_ahead))
                    last_at = page.snapshots[-1].collected_at
                if stop_after:
                    raise ExporterError(stop_after)
        except ExporterError as exc:
            run.sql_statements = conn.statements - statements_before
            self._fail(run, str(exc))
            return
        finally:
            ahead.shutdown(wait=False, cancel_futures=True)
        # A ranged reconcile replays the past on purpose: it never moves the watermark.
        completed = None if window else (last_at if last_at is not None and last_at < until else until)
        run.watermark = finish_source_run(conn, sid, completed, utcnow(), "")
        run.sql_statements = conn.statements - statements_before

    def _stop_reason(self, pages: int, empty_pages: int) -> str:
        """Why a run must not ask for another page ("" when it may)."""
        if empty_pages >= MAX_EMPTY_PAGES:
            return f"protocol error: {empty_pages} empty pages in a row with has_more"
        if pages >= self.config.max_pages_per_run:
            return f"more than {self.config.max_pages_per_run} pages in one run (MAX_PAGES_PER_RUN); " \
                   "the next run continues"
        if self._stop.is_set():
            return "interrupted: the worker is stopping; the next run continues"
        return ""

    def _apply_page(self, conn, source_id: str, page: Page, move_watermark: bool, guess=None,
                    on_rated=lambda prior: None) -> MeteredPage:
        """One page, one transaction: its facts and its progress, or nothing."""
        for attempt in range(PAGE_ATTEMPTS):
            try:
                rated = self._rate_and_write(conn, source_id, page, move_watermark, guess, on_rated)
                conn.commit()
                return rated
            except (psycopg2.errors.DeadlockDetected, psycopg2.errors.SerializationFailure):
                conn.rollback()
                if attempt == PAGE_ATTEMPTS - 1:
                    raise
            except BaseException:
                if not conn.closed:
                    try:
                        conn.rollback()
                    except psycopg2.Error:
                        pass
                raise
        raise AssertionError("unreachable")

    def _rate_and_write(self, conn, source_id: str, page: Page, move_watermark: bool, guess, on_rated):
        """Read (and lock) what the core needs, rate, write. ``guess`` (a Future
        of guess_page) is used only where its reads equal the real ones."""
        region = self.config.region
        known, checkpoints, open_buckets = load_series(conn, page_series(page.snapshots), region)
        try:
            guessed = guess.result() if guess is not None else None
        except Exception:  # noqa: BLE001 - a failed guess is only a missed shortcut
            guessed = None
        if guessed is not None and (known, checkpoints, open_buckets) == (
                guessed.reads.known, guessed.reads.checkpoints, guessed.reads.open_buckets):
            metered = guessed.metered
        else:
            guessed, metered = None, meter_page(page.snapshots, known, checkpoints, open_buckets)
        accounts = sorted({inc.account for inc in metered.increments})
        pricing, quota = {}, {}
        if accounts:
            profiles = read_profiles(conn, accounts)
            pricing = {a: effective_pricing(profiles.get(a), self.defaults) for a in accounts}
            # First sight of an account: its quota row starts from its pricing.
            quota = lock_quota_states(conn, {a: QuotaState(p.included_quota, self.config.initial_balance)
                                             for a, p in pricing.items()})
        if guessed is not None and (pricing, quota) == (guessed.reads.pricing, guessed.reads.quota):
            rated = guessed.rated
            self.guesses_used += 1
        else:
            rated = rate_increments(metered.increments, pricing, quota, region)
        # The next page is rated from here on while this one is written.
        on_rated(reads_after(PageReads(known, checkpoints, open_buckets, pricing, quota), metered, rated))
        write_page(conn, region, rated.buckets, rated.ledger, metered.checkpoints, rated.quota)
        record_page_progress(conn, source_id, len(page.snapshots), page.sample_count,
                             page.snapshots[-1].collected_at, move_watermark)
        return metered

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
                log_event(self.config.secrets, "collector_error", error=f"{type(exc).__name__}: {exc}"[:500])
            self._stop.wait(max(1.0, self.config.collect_interval - (time.monotonic() - begun)))


def create_app(environ=None) -> flask.Flask:
    """Application factory: config from the environment, strictly validated."""
    config = load_config(os.environ if environ is None else environ)
    db = Database(config.database_url, config.secrets)
    collector = Collector(config, db)
    app = make_wsgi_app(config, db, collector.run)
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
