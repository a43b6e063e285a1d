"""billing-service tests, in the order of app.py's sections: config,
exporter client, repository, billing core, HTTP routes, collector; then
deployment, the quick start and the benchmark.

Everything runs against a real PostgreSQL cluster (started by the fixture
through ``deploy/local.sh pg-start``), real HTTP exporters on 127.0.0.1
(``deploy/demo_exporter.py``) and real gunicorn where the process model
matters. Run them with ``./deploy/local.sh test``; the benchmark is
``./deploy/local.sh bench`` (skipped otherwise).
"""
from __future__ import annotations

import grp
import http.client
import io

import collections
import glob
import json
import logging
import os
import pwd
import random
import re
import runpy
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from datetime import datetime, timedelta, timezone
from importlib import metadata
from types import SimpleNamespace
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import psycopg2
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families
import trustme

import app as billing
from deploy import demo_exporter as dx

ROOT = os.path.dirname(os.path.abspath(__file__))
UTC = timezone.utc
MINUTE = timedelta(minutes=1)
TOKEN = "tok-Internal-7f3c9a1e5b"
DB_PASSWORD = "pw-Db-Secret-4d8e2b6f"
NODE, ENV = "node-a", "prod"
SOURCE_TOKEN = "tok-Source-b-9c2e1d7a40"  # a per-source exporter token (token_env)
SECRET_FILE_TOKEN = "tokFile-Secret-9a8b7c6d5e"
SECRET_ENV_TOKEN = "tokEnv-Secret-1f2e3d4c5b"
WRONG_TOKEN = "wrongTok-Secret-5e6f7a8b"


# BILLING_NOSHRINK=1: a failing example is reported as found, without minutes
# of shrinking against PostgreSQL (for debugging).
settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])
if os.environ.get("BILLING_NOSHRINK") == "1":
    settings.load_profile("noshrink")

# The benchmark runs only when asked for (./deploy/local.sh bench sets this).
bench = pytest.mark.skipif(os.environ.get("BILLING_BENCH") != "1", reason="benchmark: ./deploy/local.sh bench")


# ---- test infrastructure: PostgreSQL, exporters, the service, gunicorn, logs, metrics ----

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value. No blind sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Cluster:
    def __init__(self, directory: str, option: str = "", database: str = "billing_template"):
        """``option``: pg-start's --durable or --defaults (none: the suite's fast, non-durable settings)."""
        self.dir = directory
        self.port = free_port()
        args = [os.path.join(ROOT, "deploy", "local.sh"), "pg-start", directory, str(self.port)]
        if option:
            args.append(option)
        self.admin_dsn = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        admin = self.admin()
        with admin.cursor() as cur:
            cur.execute("CREATE ROLE billing LOGIN PASSWORD %s", (DB_PASSWORD,))
            cur.execute(f"CREATE DATABASE {database} OWNER billing")
        admin.close()
        with psycopg2.connect(self.url(database)) as conn, conn.cursor() as cur:
            cur.execute(open(os.path.join(ROOT, "deploy", "users_stub.sql")).read())
            cur.execute(open(os.path.join(ROOT, "schema.sql")).read())
        conn.close()
        self._count = 0

    def admin(self):
        conn = psycopg2.connect(self.admin_dsn)
        conn.autocommit = True
        return conn

    def url(self, name: str) -> str:
        return f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{self.port}/{name}"

    def new_database(self) -> str:
        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        admin = self.admin()
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE billing_template OWNER billing")
        admin.close()
        return self.url(name)

    def drop_database(self, url: str) -> None:
        admin = self.admin()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")
        admin.close()

    def stop(self):
        subprocess.run([os.path.join(ROOT, "deploy", "local.sh"), "pg-stop", self.dir], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    directory = tempfile.mkdtemp(prefix="billing-test-pg-")
    os.chmod(directory, 0o755)
    pg = Cluster(directory)
    yield pg
    pg.stop()


class Db:
    """A fresh database with schema.sql and the users stub, and the queries
    the tests assert on."""

    def __init__(self, url: str):
        self.url = url
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True

    def q(self, sql, params=None):
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None

    def one(self, sql, params=None):
        rows = self.q(sql, params)
        assert len(rows) == 1, rows
        return rows[0]

    def add_users(self, *accounts):
        for account in accounts:
            self.q("INSERT INTO users (uuid) VALUES (%s) ON CONFLICT DO NOTHING", (account,))

    def set_watermark(self, source_id: str, at: datetime):
        self.q("""INSERT INTO billing_source_sync_state (source_id, last_completed_until) VALUES (%s, %s)
                  ON CONFLICT (source_id) DO UPDATE SET last_completed_until = EXCLUDED.last_completed_until""",
               (source_id, at))

    def watermark(self, source_id: str):
        rows = self.q("SELECT last_completed_until FROM billing_source_sync_state WHERE source_id = %s",
                      (source_id,))
        return rows[0][0] if rows else None

    def set_checkpoint(self, node_id, account, up, down, seen, epoch=0):
        self.q("""INSERT INTO traffic_stat_checkpoints (node_id, account_uuid, last_uplink_total,
                  last_downlink_total, last_seen_at, reset_epoch) VALUES (%s, %s, %s, %s, %s, %s)""",
               (node_id, account, up, down, seen, epoch))

    def set_profile(self, account, included=0, price=0.0, region=1.0, line=1.0, version="pricing-default-v1",
                    peak=1.0, offpeak=1.0):
        self.q("""INSERT INTO account_billing_profiles (account_uuid, included_quota_bytes, base_price_per_byte,
                  region_multiplier, line_multiplier, pricing_rule_version, peak_multiplier, offpeak_multiplier)
                  VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""", (account, included, price, region, line, version, peak,
                                                               offpeak))

    def buckets(self):
        return self.q("""SELECT bucket_start, node_id, account_uuid::text, region, line_code, uplink_bytes,
                                downlink_bytes, total_bytes, multiplier, rating_status, source_revision
                         FROM traffic_minute_buckets ORDER BY 1, 2, 3, 4, 5""")

    def ledger(self, with_balance=True):
        cols = "id::text, account_uuid::text, bucket_start, bucket_end, entry_type, rated_bytes, amount_delta, " \
               "pricing_rule_version" + (", balance_after" if with_balance else "")
        return self.q(f"SELECT {cols} FROM billing_ledger ORDER BY id")

    def checkpoints(self):
        return self.q("""SELECT node_id, account_uuid::text, last_uplink_total, last_downlink_total,
                                last_seen_at, reset_epoch FROM traffic_stat_checkpoints ORDER BY 1, 2""")

    def quota(self):
        return self.q("""SELECT account_uuid::text, remaining_included_quota, current_balance, arrears,
                                throttle_state, suspend_state, last_rated_bucket_at
                         FROM account_quota_states ORDER BY 1""")

    def facts(self, with_balance=True):
        """Every billing fact, for "same rows as an uninterrupted run" checks."""
        return {"buckets": self.buckets(), "ledger": self.ledger(with_balance),
                "checkpoints": self.checkpoints(), "quota": self.quota()}

    def close(self):
        self.conn.close()


@pytest.fixture
def db(cluster):
    database = Db(cluster.new_database())
    yield database
    database.close()


def account(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"account-{n}.test"))


A, B, C = account(1), account(2), account(3)
D, E = account(4), account(5)


# Minute 0 of every test's data: a whole minute well in the past, fixed for the
# whole session so times computed at different moments of a test agree.
BASE = billing.minute_floor(datetime.now(UTC)) - 45 * MINUTE


def at(minute: int, second: float = 0.0) -> datetime:
    return BASE + timedelta(minutes=minute, seconds=second)


def rfc(stamp: datetime) -> str:
    return billing.format_time(stamp)


def snap(stamp: datetime, *samples, **extra) -> dict:
    """A snapshot dict: samples are (account, inbound_tag, uplink, downlink)."""
    return {"collected_at": rfc(stamp), **extra,
            "samples": [{"uuid": a, "email": "user@example.com", "inbound_tag": tag,
                         "uplink_bytes_total": up, "downlink_bytes_total": down}
                        for a, tag, up, down in samples]}


class Exporter(dx.ExporterServer):
    """The demo exporter's server with test controls: a page-size cap."""

    page_cap = None

    def __init__(self, snapshots=(), node_id=NODE, env=ENV, tokens=(TOKEN,)):
        super().__init__(dx.ListTimeline(node_id, env, snapshots), tokens)
        self.fault = self._cap

    def _cap(self, query):
        if self.page_cap and query.get("limit", "").isdigit() and int(query["limit"]) > self.page_cap:
            query["limit"] = str(self.page_cap)
        return None

    def add(self, *snapshots):
        self.timeline.extend(snapshots)


@pytest.fixture
def exporters():
    started = []

    def start(snapshots=(), **kwargs) -> Exporter:
        server = Exporter(snapshots, **kwargs).start()
        started.append(server)
        return server

    yield start
    # Together: each stop waits up to serve_forever's 0.5 s poll, and a hypothesis test starts hundreds.
    stopping = [threading.Thread(target=server.stop) for server in started]
    for thread in stopping:
        thread.start()
    for thread in stopping:
        thread.join()


def source(source_id: str, server, **fields) -> dict:
    return {"source_id": source_id, "base_url": server.url, "expected_node_id": server.timeline.node_id,
            "expected_env": server.timeline.env, **fields}


def service_env(db: Db, sources, **env) -> dict:
    values = {"DATABASE_URL": db.url, "INTERNAL_SERVICE_TOKEN": TOKEN, "COLLECT_INTERVAL": "0",
              "EXPORTER_SOURCES_JSON": json.dumps(sources), "PRICE_PER_BYTE": "0.5"}
    values.update({key: str(value) for key, value in env.items()})
    return values


class Service:
    """The Flask app in-process, driven through its HTTP surface. Its
    connection pool is closed when the test ends (``close`` ends it sooner,
    for a hypothesis example): hundreds of examples must not pile up idle
    connections."""

    live: list = []

    def __init__(self, env: dict):
        self.app = billing.create_app(env)
        self.client = self.app.test_client()
        while len(Service.live) >= 12:  # hypothesis examples: their pools would use up the connection slots
            Service.live.pop(0).close()
        Service.live.append(self)

    def close(self) -> None:
        self.app.extensions["billing_collector"].db.close_all()

    def post(self, job="collect-and-rate", body=None, token=TOKEN, headers=None):
        all_headers = {"Authorization": f"Bearer {token}"} if token else {}
        all_headers.update(headers or {})
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        response = self.client.post(f"/v1/jobs/{job}", data=data, headers=all_headers)
        return response.status_code, response.get_json()

    def get(self, path, token=None):
        response = self.client.get(path, headers={"Authorization": f"Bearer {token}"} if token else {})
        return response.status_code, response.get_json()


@pytest.fixture(autouse=True)
def _close_services():
    yield
    while Service.live:
        Service.live.pop().close()


@pytest.fixture
def service():
    def make(db: Db, sources, **env) -> Service:
        return Service(service_env(db, sources, **env))
    return make


def one_source(db, exporters, service, snapshots, watermark_minute=-1, **env):
    """The common arrangement: one exporter, one source "a", watermark set."""
    server = exporters(snapshots)
    db.set_watermark("a", at(watermark_minute))
    return server, service(db, [source("a", server)], **env)


def terminate_session(proc) -> None:
    """SIGTERM (gunicorn's graceful stop), then SIGKILL to its whole session after 40 s."""
    proc.terminate()
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Gunicorn:
    """billing-service under real gunicorn, in its own session so a test can
    SIGKILL the master and every worker at once. Output goes to a file."""

    def __init__(self, env: dict, workers: int = 2, split_streams: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"PATH": os.environ["PATH"], **env, "LISTEN_ADDR": f"127.0.0.1:{self.port}",
                    "WEB_CONCURRENCY": str(workers)}
        handle, self.log_path = tempfile.mkstemp(prefix="billing-gunicorn-", suffix=".log")
        os.close(handle)
        # split_streams: stdout (gunicorn's access log) in log_path, stderr
        # (gunicorn's error log and our JSON lines) in stderr_path.
        self.stderr_path = self.log_path + ".stderr" if split_streams else None
        self.proc = None

    def start(self) -> "Gunicorn":
        with open(self.log_path, "ab") as out, open(self.stderr_path or os.devnull, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "app:app"],
                cwd=ROOT, env=self.env, stdout=out, stderr=err if self.stderr_path else subprocess.STDOUT,
                start_new_session=True)
        wait_for(self._answers, what="gunicorn answering /api/ping")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        try:
            return requests.get(self.url + "/api/ping", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def post(self, job="collect-and-rate", body=None, token=TOKEN, timeout=120):
        response = requests.post(f"{self.url}/v1/jobs/{job}", data=None if body is None else json.dumps(body),
                                 headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        return response.status_code, response.json()

    def get(self, path, timeout=10):
        return requests.get(self.url + path, timeout=timeout)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            terminate_session(self.proc)  # graceful: workers stop their collector threads

    def stdout(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def stderr(self) -> str:
        if self.stderr_path is None:
            return ""
        with open(self.stderr_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def remove_logs(self) -> None:
        for path in (self.log_path, self.stderr_path):
            if path and os.path.exists(path):
                os.unlink(path)


@pytest.fixture
def gunicorns():
    started = []

    def start(env: dict, workers: int = 2, split_streams: bool = False) -> Gunicorn:
        server = Gunicorn(env, workers, split_streams).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        server.remove_logs()


def booted(server, workers: int) -> None:
    """Wait until every worker has booted (/api/ping answers once the first has)."""
    wait_for(lambda: server.output().count("Booting worker with pid") >= workers, timeout=30,
             what=f"{workers} gunicorn workers")


def stop_cleanly(server) -> None:
    """SIGTERM and a clean exit within the helper's deadline (not a SIGKILL)."""
    server.stop()
    assert server.proc.returncode == 0, server.output()[-3000:]


# gunicorn's own error-log lines: "[2025-01-01 00:00:00 +0000] [123] [INFO] ..."
GUNICORN_LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] ")
# gunicorn's access log with gunicorn.conf.py's format: 127.0.0.1 "GET /healthz HTTP/1.1" 200 33 1ms
ACCESS_LOG_LINE = re.compile(r'\S+ "[A-Z]+ /\S* HTTP/[\d.]+" \d{3} \S+ \d+ms$')


def our_log_lines(output: str) -> list:
    """Every output line that is neither gunicorn's error log nor its access
    log, parsed: each must be one JSON object with a time and an event (a
    traceback or a stray print fails)."""
    events = []
    for line in output.splitlines():
        if not line.strip() or GUNICORN_LOG_LINE.match(line) or ACCESS_LOG_LINE.fullmatch(line):
            continue
        event = json.loads(line)
        assert isinstance(event, dict) and event.get("event") and event.get("time"), line
        events.append(event)
    return events


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def app_log():
    """Every line the service logs (logger "billing_service", which does not
    propagate to the root logger, so caplog alone would miss it)."""
    handler = _Records()
    logger = logging.getLogger("billing_service")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def events(lines, name):
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == name:
            out.append(doc)
    return out


def assert_no_secret(haystacks, secrets):
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"secret {secret[:6]}... leaked into {where}: {text[:2000]}"


def parse_metrics(text: str):
    """(samples {(name, labels...): value}, types {family: type}) via the official parser."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, *sorted(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples, types


def metric(samples: dict, name: str, **labels):
    return samples.get((name, *sorted(labels.items())))


LAG = "billing_source_watermark_lag_seconds"


BILLING_TABLES = ("traffic_stat_checkpoints", "traffic_minute_buckets", "billing_ledger", "account_quota_states",
                  "billing_source_sync_state", "billing_job_runs", "billing_job_totals", "billing_push_totals",
                  "billing_inherited_checkpoints", "billing_node_marks")


def reset_database(db: Db, known):
    db.q(f"TRUNCATE {', '.join(BILLING_TABLES)}, account_billing_profiles, users")
    db.add_users(*known)
    for account_id in known:
        if account_id in PROFILES:
            db.set_profile(account_id, **PROFILES[account_id])


def row_versions(db: Db):
    """xmin of every fact row: a replay that rewrote a row, even with equal
    values, changes its xmin."""
    return {table: db.q(f"SELECT xmin::text, * FROM {table} ORDER BY 2, 3") for table in BILLING_TABLES[:4]}


def base_env(**extra) -> dict:
    env = {"DATABASE_URL": "postgresql://billing:pw@127.0.0.1:5432/account", "INTERNAL_SERVICE_TOKEN": TOKEN,
           "EXPORTER_SOURCES_JSON": json.dumps([{"source_id": "a", "base_url": "http://127.0.0.1:9100"}])}
    env.update(extra)
    return {key: value for key, value in env.items() if value is not None}


PUSH_PATH = "/v1/ingest/snapshots"
NDJSON = "application/x-ndjson"
TOKEN_A = "tok-Push-A-3b9d2f71c6e0"  # per-source push tokens (token_env)
TOKEN_B = "tok-Push-B-8e4a6c05d2f1"


def push_source(source_id: str, node: str = NODE, env: str = ENV, **fields) -> dict:
    return {"source_id": source_id, "mode": "push", "expected_node_id": node, "expected_env": env, **fields}


def push_body(snapshots, node: str = NODE, env: str = ENV, ndjson: bool = False) -> bytes:
    """What a node's pusher sends: each snapshot with its node_id and env (a
    snapshot's own keys win, so a test can spoil one); one dict is one JSON
    object, a list a JSON array or NDJSON lines."""
    if isinstance(snapshots, dict):
        return json.dumps({"node_id": node, "env": env, **snapshots}).encode()
    docs = [{"node_id": node, "env": env, **s} for s in snapshots]
    if ndjson:
        return b"".join(json.dumps(doc).encode() + b"\n" for doc in docs)
    return json.dumps(docs).encode()


def push(svc: Service, body: bytes, token: str | None = TOKEN, content_type: str = "application/json"):
    """POST a body to the in-process service the way an exporter does."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = svc.client.post(PUSH_PATH, data=body, headers=headers, content_type=content_type)
    return response.status_code, response.get_json()


def padded_body(size: int, snapshot: dict) -> bytes:
    """A one-snapshot body of exactly ``size`` bytes: unknown snapshot fields
    are ignored, so the padding only makes it big."""
    bare = len(push_body({"padding": "", **snapshot}))
    return push_body({"padding": "x" * (size - bare), **snapshot})


def nothing_written(db: Db) -> bool:
    return db.buckets() == [] and db.ledger() == [] and db.checkpoints() == [] and db.quota() == []


def by_source(result: dict) -> dict:
    return {s["source_id"]: s for s in result["source_statuses"]}


def worker_pids(master_pid: int) -> list:
    with open(f"/proc/{master_pid}/task/{master_pid}/children") as children:
        return [int(pid) for pid in children.read().split()]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def metrics_of(svc: Service) -> dict:
    text = svc.client.get("/metrics").get_data(as_text=True)
    return parse_metrics(text)[0]


# ---- config: environment variables, validated strictly at startup ------------------------

def test_config_defaults_and_legacy_source():
    config = billing.load_config(base_env(EXPORTER_SOURCES_JSON=None, EXPORTER_BASE_URL="http://localhost:9100"))
    assert config.sources == (billing.Source("default", base_url="http://localhost:9100"),)
    assert config.sources[0].enabled and config.sources[0].timeout_seconds == 15
    assert config.listen_addr == "0.0.0.0:8081" and config.collect_interval == 60
    assert (config.region, config.source_revision, config.price_per_byte) == ("", "billing-service-v1", 0)
    assert (config.initial_included_quota, config.initial_balance, config.image) == (0, 0, "")
    assert (config.max_body_bytes, config.peak, config.suspend_after) == (16 * 1024 * 1024, None, 336 * 3600)


def test_config_sources_json_wins_over_legacy_and_keeps_fields():
    raw = [{"source_id": "jp", "base_url": "https://jp.example.com:9443/", "expected_node_id": "jp-1",
            "expected_env": "prod", "enabled": False, "timeout_seconds": 0},
           {"source_id": "local", "base_url": "http://[::1]:9100", "timeout_seconds": 2.5}]
    config = billing.load_config(base_env(EXPORTER_SOURCES_JSON=json.dumps(raw), EXPORTER_BASE_URL="http://x"))
    jp, local = config.sources
    assert (jp.source_id, jp.expected_node_id, jp.expected_env, jp.enabled, jp.timeout_seconds) == \
        ("jp", "jp-1", "prod", False, 15)
    assert local.enabled and local.timeout_seconds == 2.5


@pytest.mark.parametrize("value, seconds", [
    ("90s", 90), ("1m30s", 90), ("2m", 120), ("1h", 3600), ("1.5m", 90), ("0", 0), ("off", 0)])
def test_collect_interval_durations(value, seconds):
    assert billing.load_config(base_env(COLLECT_INTERVAL=value)).collect_interval == seconds


PUSH = {"source_id": "p", "mode": "push", "expected_node_id": "n", "expected_env": "prod"}


@pytest.mark.parametrize("env, message", [
    ({"DATABASE_URL": None}, "DATABASE_URL is required"),
    ({"DATABASE_URL": "just-a-hostname"}, "DATABASE_URL: not a valid"),
    ({"INTERNAL_SERVICE_TOKEN": None}, "INTERNAL_SERVICE_TOKEN is required"),
    ({"EXPORTER_SOURCES_JSON": None}, "EXPORTER_SOURCES_JSON (or the legacy EXPORTER_BASE_URL) is required"),
    ({"EXPORTER_SOURCES_JSON": "[{"}, "EXPORTER_SOURCES_JSON: invalid JSON"),
    ({"EXPORTER_SOURCES_JSON": "[]"}, "EXPORTER_SOURCES_JSON: must be a non-empty JSON array"),
    ({"EXPORTER_SOURCES_JSON": '[{"base_url": "http://127.0.0.1:1"}]'}, "source_id is required"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a"}]'}, "source 'a': base_url is required"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1"},'
                               '{"source_id": "a", "base_url": "http://127.0.0.1:2"}]'}, "duplicate source_id 'a'"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1", "colour": 1}]'},
     "unknown field(s) for a pull source: colour"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1", "enabled": "yes"}]'},
     "enabled must be true or false"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "ftp://127.0.0.1:1"}]'}, "http(s) URL"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1", "first_sight": "skip"}]'},
     "source 'a': first_sight must be \"bill\" or \"baseline\""),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1", "mode": "poll"}]'},
     "source 'a': mode must be \"pull\" or \"push\""),
    ({"EXPORTER_SOURCES_JSON": json.dumps([{**PUSH, "expected_env": ""}])},
     "source 'p': a push source needs expected_node_id and expected_env"),
    ({"EXPORTER_SOURCES_JSON": json.dumps([{**PUSH, "base_url": "http://127.0.0.1:1"}])},
     "source 'p': unknown field(s) for a push source: base_url"),
    ({"EXPORTER_SOURCES_JSON": json.dumps([{**PUSH, "timeout_seconds": 3}])}, "for a push source: timeout_seconds"),
    ({"COLLECT_INTERVAL": "5"}, "COLLECT_INTERVAL: not a duration"),
    ({"COLLECT_INTERVAL": "1x"}, "COLLECT_INTERVAL"),
    ({"COLLECT_INTERVAL": "100ms"}, "COLLECT_INTERVAL: must be 0/off or at least 1s"),
    ({"PRICE_PER_BYTE": "0,5"}, "PRICE_PER_BYTE: not a valid number"),
    ({"PRICE_PER_BYTE": "nan"}, "PRICE_PER_BYTE: must be a finite number"),
    ({"PRICE_PER_BYTE": "-1"}, "PRICE_PER_BYTE: must be at least 0"),
    ({"INITIAL_INCLUDED_QUOTA_BYTES": "1e9"}, "INITIAL_INCLUDED_QUOTA_BYTES: not a valid integer"),
    ({"INITIAL_BALANCE": "ten"}, "INITIAL_BALANCE: not a valid number"),
    ({"MAX_BODY_BYTES": "1000"}, "MAX_BODY_BYTES: must be at least 65536"),
    ({"MAX_PAGES_PER_RUN": "0"}, "MAX_PAGES_PER_RUN: must be at least 1"),
    ({"LISTEN_ADDR": "8081"}, "LISTEN_ADDR"),
    ({"LISTEN_ADDR": ":99999"}, "LISTEN_ADDR"),
    ({"PEAK_HOURS": "25:00-01:00"}, "PEAK_HOURS: expected HH:MM-HH:MM"),
    ({"PEAK_HOURS": "9-17"}, "PEAK_HOURS: expected HH:MM-HH:MM"),
    ({"PEAK_HOURS": "10:00-10:00"}, "PEAK_HOURS: expected HH:MM-HH:MM with two different times"),
    ({"PEAK_TIMEZONE": "Mars/Olympus"}, "PEAK_TIMEZONE: not an IANA time zone name"),
    ({"PEAK_HOURS": "09:00-17:00", "PEAK_TIMEZONE": "../etc/passwd"}, "PEAK_TIMEZONE: not an IANA time zone name"),
    ({"ARREARS_SUSPEND_THRESHOLD": "two weeks"}, "ARREARS_SUSPEND_THRESHOLD: not a duration"),
    ({"ARREARS_SUSPEND_THRESHOLD": "-1h"}, "ARREARS_SUSPEND_THRESHOLD: not a duration"),
])
def test_bad_config_is_a_startup_error_naming_the_variable(env, message):
    with pytest.raises(billing.ConfigError) as error:
        billing.load_config(base_env(**env))
    assert message in str(error.value)


def test_empty_values_that_mean_something_are_accepted():
    """DEFAULT_REGION and IMAGE may be empty (that is their default), and an
    empty PEAK_HOURS turns peak pricing off, as unset does."""
    config = billing.load_config(base_env(DEFAULT_REGION="", IMAGE="", PEAK_HOURS=""))
    assert (config.region, config.image, config.peak) == ("", "", None)
    push = billing.load_config(base_env(EXPORTER_SOURCES_JSON=json.dumps([PUSH])))
    assert push.sources == (billing.Source("p", mode="push", expected_node_id="n", expected_env="prod"),)
    assert push.tokens["p"].get() == TOKEN  # a push source without a token of its own takes the service token


@pytest.mark.parametrize("dsn", [f"postgresql://u:{DB_PASSWORD}@[h/db", f"{DB_PASSWORD}@host"])
def test_bad_dsn_error_does_not_echo_the_password(dsn):
    with pytest.raises(psycopg2.Error) as libpq:  # libpq's own message does echo it...
        psycopg2.extensions.parse_dsn(dsn)
    assert DB_PASSWORD in str(libpq.value)
    with pytest.raises(billing.ConfigError) as error:  # ...ours must not
        billing.load_config(base_env(DATABASE_URL=dsn))
    assert DB_PASSWORD not in str(error.value) and "DATABASE_URL" in str(error.value)


def run_gunicorn_until_exit(env: dict, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "app:app"],
                          cwd=ROOT, env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_gunicorn_refuses_to_start_on_bad_config_naming_the_variable():
    done = run_gunicorn_until_exit(base_env(PRICE_PER_BYTE="0.5.1", LISTEN_ADDR=f"127.0.0.1:{free_port()}"))
    assert done.returncode != 0
    assert "configuration error: PRICE_PER_BYTE: not a valid number: '0.5.1'" in done.stderr
    assert "Traceback" not in done.stderr


# gunicorn.conf.py run as a script: what systemd and local.sh start.
LAUNCHER = [sys.executable, os.path.join(ROOT, "gunicorn.conf.py")]


@pytest.mark.parametrize("value, message", [
    ("two", "WEB_CONCURRENCY: not a valid integer: 'two'"),
    ("0", "WEB_CONCURRENCY: must be at least 1, got '0'"),
    ("", "WEB_CONCURRENCY is set but empty (unset it to use the default)")])
def test_the_launcher_refuses_a_bad_web_concurrency_in_one_line(value, message, tmp_path):
    """gunicorn parses WEB_CONCURRENCY with int() when it is imported, before
    it reads gunicorn.conf.py (a traceback); the launcher checks it first.
    From any working directory."""
    env = {"PATH": os.environ["PATH"], **base_env(WEB_CONCURRENCY=value, LISTEN_ADDR=f"127.0.0.1:{free_port()}")}
    done = subprocess.run(LAUNCHER, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"billing-service: configuration error: {message}"], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_the_launcher_becomes_gunicorn_in_its_own_process_and_passes_arguments_on(tmp_path):
    """A valid configuration: the launcher execs gunicorn, so the process
    systemd started (its main PID, Type=notify) is gunicorn's arbiter, run
    from the code directory whatever the caller's; extra arguments reach it."""
    env = {"PATH": os.environ["PATH"], **base_env(WEB_CONCURRENCY="1", COLLECT_INTERVAL="off")}
    checked = subprocess.run([*LAUNCHER, "--check-config"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr  # gunicorn checked this config and loaded app:app
    refused = subprocess.run([*LAUNCHER, "--no-such-option"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "unrecognized arguments: --no-such-option" in refused.stderr, refused.stderr
    port = free_port()
    log = tmp_path / "launcher.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(LAUNCHER, cwd=tmp_path, env={**env, "LISTEN_ADDR": f"127.0.0.1:{port}"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def serving():
            assert proc.poll() is None, log.read_text()
            try:
                return requests.get(f"http://127.0.0.1:{port}/api/ping", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(serving, what="the launcher's gunicorn answering /api/ping")
        assert f"[{proc.pid}] [INFO] Listening at: http://127.0.0.1:{port}" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=40)
    assert proc.returncode == 0, log.read_text()


def sources_env(**fields) -> dict:
    return base_env(EXPORTER_SOURCES_JSON=json.dumps([{"source_id": "edge-1", **fields}]))


@pytest.mark.parametrize("url", [
    "http://10.0.0.5:8080", "http://exporter.example.com", "HTTP://10.0.0.5:8080", "http://0.0.0.0:8080",
    "http://127.0.0.1.nip.io:8080", "http://localhost.example.com:8080", "http://[2001:db8::1]:8080",
    "http://169.254.169.254"])
def test_plain_http_to_a_remote_host_is_rejected_at_startup(url):
    with pytest.raises(billing.ConfigError) as error:
        billing.load_config(sources_env(base_url=url))
    message = str(error.value)
    assert "source 'edge-1'" in message and "base_url" in message and "https" in message


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080", "http://127.8.9.10:8080", "http://[::1]:8080", "http://localhost:8080",
    "http://LOCALHOST:8080/prefix/", "https://10.0.0.5:8443", "https://exporter.example.com"])
def test_loopback_http_and_any_https_are_accepted(url, app_log):
    billing.announce(billing.load_config(sources_env(base_url=url)))
    assert events(app_log, "config_warning") == []


def test_allow_plain_http_is_accepted_with_a_warning(app_log):
    config = billing.load_config(sources_env(base_url="http://10.0.0.5:8080", allow_plain_http=True))
    assert config.sources[0].allow_plain_http
    billing.announce(config)
    (warning,) = events(app_log, "config_warning")
    assert "edge-1" in warning["message"] and "allow_plain_http" in warning["message"]
    assert "not encrypted" in warning["message"]
    with pytest.raises(billing.ConfigError, match="allow_plain_http must be true or false"):
        billing.load_config(sources_env(base_url="http://10.0.0.5:8080", allow_plain_http="yes"))


@pytest.mark.parametrize("field", ["token_file", "ca_bundle", "client_cert", "client_key"])
@pytest.mark.parametrize("kind", ["missing", "directory", "empty path", "not a string"])
def test_missing_or_unreadable_credential_files_are_startup_errors(field, kind, tmp_path, pki):
    path = {"missing": str(tmp_path / "nope.pem"), "directory": str(tmp_path), "empty path": "",
            "not a string": 7}[kind]
    fields = {"base_url": "https://exporter.example.com", field: path}
    if field == "client_key":
        fields["client_cert"] = pki.client_cert
    with pytest.raises(billing.ConfigError) as error:
        billing.load_config(sources_env(**fields))
    message = str(error.value)
    assert "EXPORTER_SOURCES_JSON" in message and "source 'edge-1'" in message and field in message


def test_token_env_must_name_a_set_variable_and_credentials_are_exclusive(tmp_path):
    with pytest.raises(billing.ConfigError, match="source 'edge-1': token_env: environment variable EDGE_TOKEN"):
        billing.load_config(sources_env(base_url="https://x.example.com", token_env="EDGE_TOKEN"))
    token_file = tmp_path / "t"
    token_file.write_text("x-token-0123456789")
    with pytest.raises(billing.ConfigError, match="token_file or token_env, not both"):
        billing.load_config(sources_env(base_url="https://x.example.com", token_env="EDGE_TOKEN",
                                        token_file=str(token_file)))
    with pytest.raises(billing.ConfigError, match="client_key needs client_cert"):
        billing.load_config(sources_env(base_url="https://x.example.com", client_key=str(token_file)))


@pytest.mark.parametrize("fields", [
    {"verify": False}, {"insecure": True}, {"tls_verify": False}, {"verify_tls": False}, {"ssl_verify": False},
    {"insecure_skip_verify": True}, {"ca_bundle": False}, {"ca_bundle": ""}, {"ca_bundle": None}])
def test_tls_verification_cannot_be_disabled(fields):
    with pytest.raises(billing.ConfigError) as error:
        billing.load_config(sources_env(base_url="https://exporter.example.com", **fields))
    assert "source" in str(error.value)


@pytest.mark.parametrize("url", [
    "https://user:{s}@exporter.example.com", "https://{s}@exporter.example.com", "http://user:{s}@127.0.0.1:9100",
    "https://user:{s}@exporter.example.com:99999", "https://exporter.example.com/?token={s}",
    "https://exporter.example.com/#{s}", "http://user:{s}@10.0.0.5:8080"])
def test_credentials_in_base_url_are_rejected_without_echoing_them(url):
    secret = "urlSecret-3c4d5e6f7a"
    for env in (sources_env(base_url=url.format(s=secret)),
                base_env(EXPORTER_SOURCES_JSON=None, EXPORTER_BASE_URL=url.format(s=secret))):
        with pytest.raises(billing.ConfigError) as error:
            billing.load_config(env)
        assert "base_url" in str(error.value) and secret not in str(error.value)


def test_gunicorn_refuses_a_credentialed_url_without_echoing_it():
    secret = "urlSecret-8e9f0a1b2c"
    done = run_gunicorn_until_exit(base_env(
        LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        EXPORTER_SOURCES_JSON=json.dumps([{"source_id": "edge", "base_url": f"https://ops:{secret}@x.example.com"}])))
    assert done.returncode != 0 and "source 'edge': base_url must not carry credentials" in done.stderr
    assert secret not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_image_parsing():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert billing.parse_image(f"registry.example.com/billing-service:sha-{sha}") == {
        "image": f"registry.example.com/billing-service:sha-{sha}", "tag": f"sha-{sha}",
        "commit": sha, "version": sha}
    assert billing.parse_image("registry.example.com/billing-service:sha-1234") == {
        "image": "registry.example.com/billing-service:sha-1234", "tag": "sha-1234", "commit": "", "version": ""}
    assert billing.parse_image(f"r.example.com/b:{sha}")["commit"] == sha
    assert billing.parse_image(f"r.example.com/b:{sha.upper()}")["commit"] == ""
    for untagged in ("", "registry:5000/billing-service", "billing-service", "billing-service:"):
        assert billing.parse_image(untagged)["tag"] == "" and billing.parse_image(untagged)["commit"] == ""


def test_tokens_shorter_than_16_characters_are_refused_at_startup_naming_where(tmp_path):
    """A short secret cannot be told from ordinary text, so it cannot be
    redacted: INTERNAL_SERVICE_TOKEN, a token_env variable and a token_file
    shorter than 16 characters each stop startup, named, without the value."""
    short = "Short-Secret-15"
    assert len(short) == 15
    token_file = tmp_path / "token"
    token_file.write_text(short + "\n")
    other = {"source_id": "b", "base_url": "http://127.0.0.1:9101"}
    plain = {"source_id": "a", "base_url": "http://127.0.0.1:9100"}
    cases = [
        (base_env(INTERNAL_SERVICE_TOKEN=short), ["INTERNAL_SERVICE_TOKEN"]),
        (base_env(EXPORTER_SOURCES_JSON=json.dumps([plain, {**other, "token_env": "B_TOKEN"}]), B_TOKEN=short),
         ["'b'", "B_TOKEN"]),
        (base_env(EXPORTER_SOURCES_JSON=json.dumps([plain, {**other, "token_file": str(token_file)}])),
         ["'b'", "token_file"]),
    ]
    for env, names in cases:
        with pytest.raises(billing.ConfigError) as error:
            billing.create_app(env)
        message = str(error.value)
        assert all(name in message for name in names) and "16" in message, message
        assert short not in message
    ok = base_env(EXPORTER_SOURCES_JSON=json.dumps([plain, {**other, "token_env": "B_TOKEN"}]), B_TOKEN=short + "x")
    assert [s.source_id for s in billing.load_config(ok).sources] == ["a", "b"]


@pytest.mark.parametrize("name", ["DATABASE_URL", "INTERNAL_SERVICE_TOKEN", "PRICE_PER_BYTE", "COLLECT_INTERVAL", "INITIAL_BALANCE", "EXPORTER_SOURCES_JSON",
                                  "LISTEN_ADDR", "SOURCE_REVISION", "INITIAL_INCLUDED_QUOTA_BYTES",
                                  "MAX_PAGES_PER_RUN", "MAX_BODY_BYTES", "ARREARS_SUSPEND_THRESHOLD",
                                  "PEAK_TIMEZONE"])
@pytest.mark.parametrize("value", ["", "  "])
def test_a_present_but_empty_variable_stops_startup_naming_it(name, value):
    """A templating slip (an empty PRICE_PER_BYTE would bill at zero) is a
    startup error naming the variable, never a silent default."""
    # With the legacy EXPORTER_BASE_URL also set, an empty EXPORTER_SOURCES_JSON must not fall back to it.
    with pytest.raises(billing.ConfigError) as error:
        billing.create_app(base_env(**{name: value}, EXPORTER_BASE_URL="http://127.0.0.1:9100"))
    assert name in str(error.value), str(error.value)


def runtime_closure(roots) -> dict:
    """Installed distributions the roots need (markers evaluated for this
    interpreter, no extras), by canonical name -> installed version."""
    found, todo = {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = metadata.version(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def imported_distributions(*files) -> set:
    """The installed distributions whose modules these files import (the
    standard library and this repository's own modules left out)."""
    import ast
    providers, found = metadata.packages_distributions(), set()
    for name in files:
        with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for top in {module.split(".")[0] for module in modules}:
                if top in sys.stdlib_module_names or top in ("app", "deploy", "__future__"):
                    continue
                assert top in providers, f"{name} imports {top}, which no installed distribution provides"
                found.update(providers[top])
    return found


def requirement_pins(name: str) -> tuple[dict, list]:
    """A requirements file's pins (canonical name -> version) and the files it includes (-r)."""
    pins, includes = {}, []
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                includes.append(line[3:].strip())
            elif line:
                match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
                assert match, f"{name}: not pinned as name==version: {line!r}"
                assert canonicalize_name(match.group(1)) not in pins, f"{name}: {line!r} twice"
                pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins, includes


def test_requirements_pin_every_runtime_dependency_at_the_installed_version():
    """requirements.txt pins (name==version) exactly what app.py and
    gunicorn.conf.py import, gunicorn and tzdata, and what those pull in,
    transitively, at the version installed here: nothing more (hosts install
    it). requirements-test.txt includes it and pins exactly what test_app.py
    needs on top, likewise."""
    runtime, runtime_includes = requirement_pins("requirements.txt")
    test_only, test_includes = requirement_pins("requirements-test.txt")
    assert (runtime_includes, test_includes) == ([], ["requirements.txt"])
    assert runtime.keys() & test_only.keys() == set()

    roots = imported_distributions("app.py", "gunicorn.conf.py") | {"gunicorn", "tzdata"}
    assert {"flask", "psycopg2-binary", "requests"} <= {canonicalize_name(root) for root in roots}
    needed = runtime_closure(roots)
    assert {"werkzeug", "jinja2", "markupsafe", "urllib3", "certifi", "idna"} <= needed.keys()
    assert sorted(needed.keys() - runtime.keys()) == [], "unpinned runtime dependencies"
    assert sorted(runtime.keys() - needed.keys()) == [], "pinned in requirements.txt, but not needed at runtime"

    test_needed = {name: version for name, version in runtime_closure(imported_distributions("test_app.py")).items()
                   if name not in needed}
    assert {"pytest", "hypothesis", "prometheus-client", "trustme", "cryptography"} <= test_needed.keys()
    assert sorted(test_needed.keys() - test_only.keys()) == [], "unpinned test dependencies"
    assert sorted(test_only.keys() - test_needed.keys()) == [], "pinned in requirements-test.txt, but not needed"

    installed = {**needed, **test_needed}
    wrong = {name: (version, installed[name]) for name, version in {**runtime, **test_only}.items()
             if version != installed[name]}
    assert wrong == {}, f"pinned != installed: {wrong}"


def test_peak_and_arrears_config_values_that_are_accepted():
    assert billing.load_config(base_env()).peak is None
    wrap = billing.load_config(base_env(PEAK_HOURS=" 22:00-02:00 ", PEAK_TIMEZONE="Europe/Berlin")).peak
    assert (wrap.start, wrap.end, wrap.zone) == (22 * 60, 2 * 60, ZoneInfo("Europe/Berlin"))
    assert billing.load_config(base_env(PEAK_HOURS="09:00-17:00")).peak.zone == ZoneInfo("UTC")
    assert billing.load_config(base_env()).suspend_after == 336 * 3600
    for value, seconds in (("1h", 3600), ("90m", 5400), ("off", 0), ("0", 0)):
        assert billing.load_config(base_env(ARREARS_SUSPEND_THRESHOLD=value)).suspend_after == seconds


# -- an operator's first hour: typos, the effective configuration, zero prices, grants --

# Near misses of the service's variables, and what the operator meant.
TYPOS = {"PRICE_PER_BYT": "PRICE_PER_BYTE", "EXPORTER_SOURCE_JSON": "EXPORTER_SOURCES_JSON",
         "COLLECT_INTERVALL": "COLLECT_INTERVAL", "WEB_CONCURENCY": "WEB_CONCURRENCY",
         "INTERNAL_SERVICE_TOKN": "INTERNAL_SERVICE_TOKEN"}
# What a shell, systemd (the unit, socket activation, the journal) and gunicorn put beside ours.
UNRELATED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/var/lib/billing-service", "LANG": "C.UTF-8",
                 "LC_ALL": "C.UTF-8", "TZ": "UTC", "USER": "billing", "LOGNAME": "billing", "SHELL": "/bin/sh",
                 "PWD": "/opt/billing-service", "TERM": "xterm", "PYTHONUNBUFFERED": "1",
                 "PYTHONDONTWRITEBYTECODE": "1", "INVOCATION_ID": "0f3c2a9e5d8b4c7a9e1f2d3c4b5a6978",
                 "JOURNAL_STREAM": "8:123456", "SYSTEMD_EXEC_PID": "4242", "NOTIFY_SOCKET": "/run/systemd/notify",
                 "LISTEN_FDS": "1", "LISTEN_PID": "4242", "GUNICORN_CMD_ARGS": "--log-level info",
                 "SERVER_SOFTWARE": "gunicorn/23.0.0"}
TYPO_SECRET = "tok-Typo-Secret-0a1b2c3d4e"  # a value meant for a mistyped variable may well be a secret


def variable_names(message: str) -> set:
    """The environment variable names a message mentions (whole words: PRICE_PER_BYT is not PRICE_PER_BYTE)."""
    return set(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", message))


@pytest.mark.parametrize("typo, meant", TYPOS.items())
def test_a_variable_named_close_to_one_of_ours_is_a_warning_naming_both(typo, meant, app_log):
    billing.announce(billing.load_config(base_env(**{typo: TYPO_SECRET}, **UNRELATED_ENV)))
    (warning,) = events(app_log, "config_warning")
    assert variable_names(warning["message"]) == {typo, meant}, warning
    assert "ignored" in warning["message"]
    assert_no_secret({"log": "\n".join(app_log)}, [TYPO_SECRET, TOKEN])


def test_variables_of_the_shell_systemd_and_gunicorn_are_no_warning(app_log):
    billing.announce(billing.load_config(base_env(**UNRELATED_ENV)))
    assert [e["event"] for e in map(json.loads, app_log)] == ["config"]


def test_several_typos_are_one_warning_each(app_log):
    billing.announce(billing.load_config(base_env(**dict.fromkeys(TYPOS, TYPO_SECRET), **UNRELATED_ENV)))
    named = [variable_names(w["message"]) for w in events(app_log, "config_warning")]
    assert sorted(named, key=sorted) == sorted(({t, m} for t, m in TYPOS.items()), key=sorted)


@pytest.mark.parametrize("typo, meant", [("price_per_byte", "PRICE_PER_BYTE"),
                                         ("Collect_Interval", "COLLECT_INTERVAL")])
def test_a_variable_that_differs_from_one_of_ours_only_in_case_is_a_warning(typo, meant, app_log):
    config = billing.load_config(base_env(**{typo: "0.5"}))
    assert config.price_per_byte == 0 and config.collect_interval == 60  # ignored, as said
    billing.announce(config)
    warnings = [w["message"] for w in events(app_log, "config_warning")]
    assert len(warnings) == 1 and variable_names(warnings[0]) >= {meant}, warnings
    assert typo in warnings[0]


# Every variable of the service (KNOWN_VARIABLES) and where the start-up line shows it. The tokens are
# secrets: never shown. WEB_CONCURRENCY is gunicorn's (see the worker count test below).
CONFIG_KEY_OF = {"DATABASE_URL": "database_url", "EXPORTER_SOURCES_JSON": "sources", "EXPORTER_BASE_URL": "sources",
                 "LISTEN_ADDR": "listen_addr", "COLLECT_INTERVAL": "collect_interval", "DEFAULT_REGION": "region",
                 "SOURCE_REVISION": "source_revision", "PRICE_PER_BYTE": "price_per_byte",
                 "INITIAL_INCLUDED_QUOTA_BYTES": "initial_included_quota", "INITIAL_BALANCE": "initial_balance",
                 "IMAGE": "image", "MAX_PAGES_PER_RUN": "max_pages_per_run", "MAX_BODY_BYTES": "max_body_bytes",
                 "PEAK_HOURS": "peak", "PEAK_TIMEZONE": "peak", "ARREARS_SUSPEND_THRESHOLD": "suspend_after",
                 "MONEY_QUANTUM": "quantum", "PUSH_MAX_AGE": "push_max_age", "TLS_CERT_FILE": "tls",
                 "TLS_KEY_FILE": "tls", "TLS_CLIENT_CA_FILE": "tls"}


def test_the_effective_configuration_is_one_json_line_with_every_setting_and_no_secret(
        app_log, listener_pki, tmp_path):
    token_file = tmp_path / "exporter-token"
    token_file.write_text(SECRET_FILE_TOKEN + "\n")
    port = free_port()
    sources = [{"source_id": "jp", "base_url": "http://127.0.0.1:9100/", "expected_node_id": "jp-1",
                "expected_env": "prod", "token_env": "JP_EXPORTER_TOKEN", "timeout_seconds": 5},
               {"source_id": "de", "base_url": "https://de.example.com:9443", "token_file": str(token_file),
                "first_sight": "baseline", "enabled": False},
               {"source_id": "p", "mode": "push", "expected_node_id": "p-1", "expected_env": "prod",
                "token_env": "P_PUSH_TOKEN"}]
    env = {"DATABASE_URL": f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{port}/account",
           "INTERNAL_SERVICE_TOKEN": TOKEN, "EXPORTER_SOURCES_JSON": json.dumps(sources),
           "JP_EXPORTER_TOKEN": SOURCE_TOKEN, "P_PUSH_TOKEN": SECRET_ENV_TOKEN, "LISTEN_ADDR": "127.0.0.1:18081",
           "COLLECT_INTERVAL": "1m30s", "DEFAULT_REGION": "jp", "SOURCE_REVISION": "rev-7",
           "PRICE_PER_BYTE": "0.0000013", "INITIAL_INCLUDED_QUOTA_BYTES": "1000", "INITIAL_BALANCE": "2.5",
           "IMAGE": "r.example.com/billing-service:v7", "MAX_PAGES_PER_RUN": "50", "MAX_BODY_BYTES": "1048576",
           "PEAK_HOURS": "22:00-02:00", "PEAK_TIMEZONE": "Asia/Tokyo", "ARREARS_SUSPEND_THRESHOLD": "48h",
           "MONEY_QUANTUM": "0.0001", "PUSH_MAX_AGE": "1h", "TLS_CERT_FILE": listener_pki.cert,
           "TLS_KEY_FILE": listener_pki.key, "TLS_CLIENT_CA_FILE": listener_pki.ca, **UNRELATED_ENV}
    assert set(CONFIG_KEY_OF) | {"INTERNAL_SERVICE_TOKEN", "WEB_CONCURRENCY"} == set(billing.KNOWN_VARIABLES)
    assert set(CONFIG_KEY_OF) - set(env) == {"EXPORTER_BASE_URL"}  # every setting away from its default
    billing.announce(billing.load_config(env))
    assert len(app_log) == 1, app_log  # one line, and no warning
    line = json.loads(app_log[0])
    assert line.pop("event") == "config" and billing.parse_time(line.pop("time")) is not None
    assert set(line) == set(CONFIG_KEY_OF.values())
    # The DSN with its password masked (in whatever form): every other part as given.
    masked = psycopg2.extensions.parse_dsn(line.pop("database_url"))
    assert masked == {**psycopg2.extensions.parse_dsn(env["DATABASE_URL"]), "password": "***"}
    source_defaults = {"mode": "pull", "base_url": "", "expected_node_id": "", "expected_env": "", "enabled": True,
                       "first_sight": "bill", "timeout_seconds": 15.0, "token_file": "", "token_env": "",
                       "ca_bundle": "", "client_cert": "", "client_key": "", "allow_plain_http": False}
    assert line == {
        "sources": [{**source_defaults, "source_id": "jp", "base_url": "http://127.0.0.1:9100/",
                     "expected_node_id": "jp-1", "expected_env": "prod", "token_env": "JP_EXPORTER_TOKEN",
                     "timeout_seconds": 5.0},
                    {**source_defaults, "source_id": "de", "base_url": "https://de.example.com:9443",
                     "token_file": str(token_file), "first_sight": "baseline", "enabled": False},
                    {**source_defaults, "source_id": "p", "mode": "push", "expected_node_id": "p-1",
                     "expected_env": "prod", "token_env": "P_PUSH_TOKEN"}],
        "listen_addr": "127.0.0.1:18081", "collect_interval": 90.0, "region": "jp", "source_revision": "rev-7",
        "price_per_byte": "0.0000013", "initial_included_quota": 1000, "initial_balance": "2.5",
        "image": "r.example.com/billing-service:v7", "max_pages_per_run": 50, "max_body_bytes": 1048576,
        "peak": {"start": 22 * 60, "end": 2 * 60, "zone": "Asia/Tokyo"}, "suspend_after": 48 * 3600.0,
        "quantum": "0.0001", "push_max_age": 3600.0,
        "tls": [listener_pki.cert, listener_pki.key, listener_pki.ca]}
    assert_no_secret({"config line": app_log[0]}, [DB_PASSWORD, TOKEN, SOURCE_TOKEN, SECRET_ENV_TOKEN,
                                                   SECRET_FILE_TOKEN])


@pytest.mark.parametrize("dsn", ["postgresql://billing:{pw}@db.example:5432/account",
                                 "host=db.example port=5432 user=billing password={pw} dbname=account"])
@pytest.mark.parametrize("password", ["abc", "Q7"])
def test_the_config_line_shows_no_database_password_however_short(dsn, password, app_log):
    billing.announce(billing.load_config(base_env(DATABASE_URL=dsn.format(pw=password))))
    (line,) = events(app_log, "config")
    shown = psycopg2.extensions.parse_dsn(line["database_url"])
    assert shown["host"] == "db.example" and shown.get("password") != password, line["database_url"]


def test_the_config_line_shows_the_worker_count(monkeypatch, app_log):
    load_gunicorn_conf(monkeypatch, WEB_CONCURRENCY="3",
                       DATABASE_URL=f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{free_port()}/account")
    (line,) = events(app_log, "config")
    assert 3 in [value for key, value in line.items() if key in ("workers", "web_concurrency")], line


def first_line_index(lines: list, text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def test_gunicorn_logs_the_configuration_and_a_typo_once_from_the_arbiter(db, exporters, gunicorns):
    """Two workers, one `config` line and one `config_warning`: both written by the arbiter while it
    reads gunicorn.conf.py, before "Starting gunicorn", not by each worker as it boots."""
    server = exporters([])
    env = service_env(db, [source("a", server, token_env="A_EXPORTER_TOKEN")], A_EXPORTER_TOKEN=SOURCE_TOKEN,
                      PRICE_PER_BYT=TYPO_SECRET, HOME="/var/lib/billing-service", LANG="C.UTF-8")
    g = gunicorns(env, workers=2, split_streams=True)
    booted(g, 2)
    assert requests.get(g.url + "/healthz", timeout=10).status_code == 503  # serving (no run has finished yet)
    stop_cleanly(g)
    stderr = g.stderr()
    ours = our_log_lines(stderr)
    assert [e["event"] for e in ours] == ["config", "config_warning"], ours
    config, warning = ours
    assert variable_names(warning["message"]) == {"PRICE_PER_BYT", "PRICE_PER_BYTE"}
    assert config["listen_addr"] == f"127.0.0.1:{g.port}" and config["price_per_byte"] == "0.5"
    assert psycopg2.extensions.parse_dsn(config["database_url"]) == {
        **psycopg2.extensions.parse_dsn(db.url), "password": "***"}
    assert [s["token_env"] for s in config["sources"]] == ["A_EXPORTER_TOKEN"]
    lines = stderr.splitlines()
    assert first_line_index(lines, '"event": "config_warning"') < first_line_index(lines, "Starting gunicorn") \
        < first_line_index(lines, "Booting worker")
    assert stderr.count("Booting worker") == 2
    assert_no_secret({"stdout": g.stdout(), "stderr": stderr}, [TOKEN, DB_PASSWORD, SOURCE_TOKEN, TYPO_SECRET])
    assert "Traceback" not in stderr


def zero_price_config(db, price) -> billing.Config:
    env = service_env(db, [{"source_id": "a", "base_url": "http://127.0.0.1:9"}])
    env.pop("PRICE_PER_BYTE")
    return billing.load_config(env if price is None else {**env, "PRICE_PER_BYTE": price})


def start_up_check(app_log, config) -> list:
    """The lines check_database (the arbiter's start-up check) logs."""
    del app_log[:]
    billing.check_database(config)
    return [json.loads(line) for line in app_log]


@pytest.mark.parametrize("price", ["0", "0.000", None])
def test_a_zero_price_and_no_priced_profile_is_a_warning_at_start(db, app_log, price):
    """PRICE_PER_BYTE of 0 (or unset) bills every byte at 0 unless a profile sets a price: the start-up
    check says so, also beside profiles without a price, and is quiet once one profile has a price."""
    config = zero_price_config(db, price)
    assert config.price_per_byte == 0
    (warning,) = start_up_check(app_log, config)
    assert warning["event"] == "config_warning" and "PRICE_PER_BYTE" in variable_names(warning["message"])
    db.add_users(A, B)
    db.set_profile(A, included=10**9)  # a quota-only package: no price of its own
    (warning,) = start_up_check(app_log, config)
    assert warning["event"] == "config_warning" and "PRICE_PER_BYTE" in variable_names(warning["message"])
    db.set_profile(B, price=0.25)
    assert start_up_check(app_log, config) == []


def test_a_price_in_the_environment_is_no_warning_even_without_profiles(db, app_log):
    assert start_up_check(app_log, zero_price_config(db, "0.000000001")) == []


# -- grants: the role the service connects as ------------------------------------------------------

LIMITED_PASSWORD = "pw-Limited-Secret-6a7b8c9d0e"
PRIVILEGE = re.compile(r"\b([a-z_]+): (SELECT|INSERT|UPDATE|DELETE|USAGE|TEMPORARY)\b")


@pytest.fixture
def service_role(cluster):
    """make(db, lacking=()): a new login role with the privileges of REQUIRED_GRANTS in db's database (and
    USAGE on the run id sequence, TEMPORARY through PUBLIC), less those in ``lacking`` ("table: PRIVILEGE",
    "database: TEMPORARY"); returns its DATABASE_URL. The roles are dropped afterwards."""
    made = []

    def connect(dbname):
        conn = psycopg2.connect(cluster.admin_dsn.rsplit("/", 1)[0] + "/" + dbname)
        conn.autocommit = True
        return conn

    def make(db, lacking=()) -> str:
        name, dbname = f"t19_role_{os.getpid()}_{len(made)}", db.url.rsplit("/", 1)[1]
        conn = connect(dbname)
        made.append((name, dbname))
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (LIMITED_PASSWORD,))
            for table, privileges in billing.REQUIRED_GRANTS.items():
                granted = [p for p in privileges.split(", ") if f"{table}: {p}" not in lacking]
                if granted:
                    cur.execute(f"GRANT {', '.join(granted)} ON public.{table} TO {name}")
            if "billing_job_runs_id_seq: USAGE" not in lacking:
                cur.execute(f"GRANT USAGE ON SEQUENCE public.billing_job_runs_id_seq TO {name}")
            if "database: TEMPORARY" in lacking:
                cur.execute(f"REVOKE TEMPORARY ON DATABASE {dbname} FROM PUBLIC")
        conn.close()
        return f"postgresql://{name}:{LIMITED_PASSWORD}@127.0.0.1:{cluster.port}/{dbname}"

    yield make
    for name, dbname in made:
        conn = connect(dbname)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            cur.execute(f"DROP OWNED BY {name}")
            cur.execute(f"DROP ROLE {name}")
        conn.close()


NO_EXPORTER = [{"source_id": "a", "base_url": "http://127.0.0.1:9"}]


def test_gunicorn_exits_2_naming_a_missing_grant_in_one_line(db, service_role):
    url = service_role(db, lacking=["billing_ledger: INSERT"])
    done = run_gunicorn_until_exit(service_env(db, NO_EXPORTER, DATABASE_URL=url,
                                               LISTEN_ADDR=f"127.0.0.1:{free_port()}"))
    assert done.returncode == 2, done.stderr
    ours = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (error,) = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert error.startswith("billing-service: configuration error: DATABASE_URL: "), error
    assert PRIVILEGE.findall(error) == [("billing_ledger", "INSERT")], error
    assert [e["event"] for e in ours] == ["config"]  # logged before the check; no worker ever started
    assert_no_secret({"stderr": done.stderr, "stdout": done.stdout}, [LIMITED_PASSWORD, TOKEN])
    assert done.stdout == "" and "Traceback" not in done.stderr


def test_every_missing_grant_is_named_in_the_one_start_up_error(db, service_role):
    lacking = ["billing_ledger: INSERT", "traffic_stat_checkpoints: DELETE", "account_quota_states: UPDATE",
               "users: SELECT", "billing_job_runs_id_seq: USAGE", "database: TEMPORARY"]
    config = billing.load_config(service_env(db, NO_EXPORTER, DATABASE_URL=service_role(db, lacking)))
    with pytest.raises(billing.ConfigError) as error:
        billing.check_database(config)
    message = str(error.value)
    assert sorted(f"{table}: {privilege}" for table, privilege in PRIVILEGE.findall(message)) == sorted(lacking)
    assert message.startswith("DATABASE_URL: ") and LIMITED_PASSWORD not in message


def test_a_role_with_exactly_the_required_grants_passes_the_check_and_does_all_the_work(
        db, exporters, service_role, app_log):
    """REQUIRED_GRANTS is enough: a run (page scratch tables, buckets, ledger, quota, checkpoints, a
    takeover's deletes, the sweep suspending, the run record and its retention), a push, a ranged
    reconcile and every read endpoint, as a role that has just those privileges."""
    db.add_users(A, B)
    node = f"{ENV}:{NODE}"
    db.set_checkpoint(node, B, 10, 10, at(0))  # the original service's row: taken over and removed
    db.q("INSERT INTO billing_inherited_checkpoints (node_id, account_uuid) VALUES (%s, %s)", (node, B))
    server = exporters([snap(at(1, 5), (A, "", 100, 50), (B, "xhttp", 30, 30)), snap(at(2, 5), (A, "", 300, 50))])
    db.set_watermark("a", at(-1))
    env = service_env(db, [source("a", server), push_source("p", node="node-p")],
                      DATABASE_URL=service_role(db), ARREARS_SUSPEND_THRESHOLD="1s")
    assert start_up_check(app_log, billing.load_config(env)) == []  # no missing grant, priced: nothing to say
    svc = Service(env)
    status, result = svc.post()
    # A's two minutes and B's first after the takeover (40 bytes); both in arrears for over 1 s: suspended.
    assert (status, result["status"], result["written_minutes"], result["suspended"]) == (200, "ok", 3, 2), result
    status, pushed = push(svc, push_body(snap(at(3, 5), (A, "", 7, 0)), node="node-p"))
    assert (status, pushed["status"], pushed["written_minutes"]) == (200, "ok", 1), pushed
    status, replay = svc.post("reconcile", {"source_id": "a", "since": rfc(at(0)), "until": rfc(at(3))})
    assert (status, replay["status"], replay["replayed_minutes"]) == (200, "ok", 3), replay  # nothing billed again
    assert svc.get("/healthz") == (200, {"status": "ok", "message": ""})
    assert svc.get("/v1/status")[1]["status"] == "ok"
    assert metric(metrics_of(svc), "billing_database_up") == 1
    assert svc.get(f"/v1/accounts/{A}", token=TOKEN)[0] == 200
    assert db.q("SELECT count(*) FROM billing_inherited_checkpoints") == [(0,)]
    assert db.q("SELECT node_id FROM traffic_stat_checkpoints WHERE account_uuid = %s", (B,)) == [(f"{node}#xhttp",)]
    assert db.q("SELECT suspend_state FROM account_quota_states WHERE account_uuid = %s", (A,)) == [("suspended",)]
    assert events(app_log, "database_error") == [] and events(app_log, "source_failed") == []


def test_gunicorn_with_the_database_down_at_start_serves_and_logs_database_unchecked_once(exporters, gunicorns):
    server = exporters([])
    url = f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{free_port()}/account"
    env = {"DATABASE_URL": url, "INTERNAL_SERVICE_TOKEN": TOKEN, "COLLECT_INTERVAL": "0",
           "EXPORTER_SOURCES_JSON": json.dumps([source("a", server)])}
    g = gunicorns(env, workers=2, split_streams=True)
    booted(g, 2)
    assert requests.get(g.url + "/api/ping", timeout=10).status_code == 200
    stop_cleanly(g)
    stderr = g.stderr()
    ours = our_log_lines(stderr)
    assert [e["event"] for e in ours] == ["config", "database_unchecked"], ours
    assert ours[1]["error"] == "database: unavailable"
    lines = stderr.splitlines()
    assert first_line_index(lines, '"event": "database_unchecked"') < first_line_index(lines, "Starting gunicorn")
    assert_no_secret({"stdout": g.stdout(), "stderr": stderr}, [DB_PASSWORD, url, TOKEN])
    assert "Traceback" not in stderr


# ---- exporter client: the window API against real, and hostile, exporters ----------------

@dataclass
class Pki:
    ca: object
    server: object
    client: object
    ca_path: str
    client_cert: str
    client_key: str
    client_combined: str
    stranger_cert: str  # a client certificate from a CA the exporter does not trust
    stranger_key: str
    key_secret: str  # a line of the client key's PEM body: must never leave the process


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("billing-service.client.test")
    stranger = trustme.CA().issue_cert("billing-service.client.test")
    paths = {name: str(directory / name) for name in
             ("ca.pem", "client.pem", "client.key", "client-combined.pem", "stranger.pem", "stranger.key")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    client.cert_chain_pems[0].write_to_path(paths["client.pem"])
    client.private_key_pem.write_to_path(paths["client.key"])
    client.private_key_and_cert_chain_pem.write_to_path(paths["client-combined.pem"])
    stranger.cert_chain_pems[0].write_to_path(paths["stranger.pem"])
    stranger.private_key_pem.write_to_path(paths["stranger.key"])
    key_lines = client.private_key_pem.bytes().decode().splitlines()
    return Pki(ca, server, client, paths["ca.pem"], paths["client.pem"], paths["client.key"],
               paths["client-combined.pem"], paths["stranger.pem"], paths["stranger.key"], key_lines[1])


@pytest.fixture
def tls_exporters(pki):
    """Like ``exporters``, but HTTPS with the test CA's 127.0.0.1 certificate;
    ``require_client_cert`` makes the server demand a certificate of that CA."""
    started = []

    def start(snapshots=(), require_client_cert=False, **kwargs) -> Exporter:
        server = Exporter(snapshots, **kwargs)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        pki.server.configure_cert(context)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(pki.ca_path)
        server.use_tls(context)
        started.append(server.start())
        assert server.url.startswith("https://127.0.0.1:")
        return server

    yield start
    for server in started:
        server.stop()


def test_https_exporter_needs_its_ca_bundle_and_verification_cannot_be_switched_off(
        db, tls_exporters, pki, monkeypatch):
    db.add_users(A)
    server = tls_exporters([snap(at(1, 5), (A, "", 100, 50))])
    db.set_watermark("a", at(-1))
    # Environment variables that loosen verification in other clients change nothing here.
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    monkeypatch.setenv("PYTHONHTTPSVERIFY", "0")
    status, result = Service(service_env(db, [source("a", server)])).post()
    assert (status, result["status"]) == (503, "error"), result
    state = by_source(result)["a"]
    assert state["state"] == "failed" and "certificate verification failed" in state["last_error"]
    assert "a: exporter_unreachable: TLS handshake or certificate verification failed" in result["error"]
    assert db.watermark("a") == at(-1) and db.buckets() == [] and db.ledger() == []
    assert server.requests == []  # the token never reached an unverified peer

    status, result = Service(service_env(db, [source("a", server, ca_bundle=pki.ca_path)])).post()
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", 1), result
    assert db.watermark("a") == at(1, 5) and len(db.buckets()) == 1
    assert [auth for _, auth in server.requests] == [f"Bearer {TOKEN}"]


def test_https_exporter_requiring_a_client_certificate(db, tls_exporters, pki):
    db.add_users(A)
    server = tls_exporters([snap(at(1, 5), (A, "", 100, 50))], require_client_cert=True)
    db.set_watermark("a", at(-1))
    without = Service(service_env(db, [source("a", server, ca_bundle=pki.ca_path)]))
    stranger = Service(service_env(db, [source("a", server, ca_bundle=pki.ca_path,
                                                     client_cert=pki.stranger_cert, client_key=pki.stranger_key)]))
    for svc in (without, stranger):
        status, result = svc.post()
        assert (status, result["status"]) == (503, "error"), result
        assert by_source(result)["a"]["last_error"] == \
            "exporter_unreachable: TLS handshake or certificate verification failed (check ca_bundle / client_cert)"
        assert db.watermark("a") == at(-1) and db.buckets() == []
    assert server.requests == []  # the exporter never served a request without a trusted certificate

    with_cert = Service(service_env(db, [source("a", server, ca_bundle=pki.ca_path,
                                                      client_cert=pki.client_cert, client_key=pki.client_key)]))
    status, result = with_cert.post()
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", 1), result
    assert db.watermark("a") == at(1, 5)
    # A single PEM holding key and certificate works too (client_cert without client_key).
    server.add(snap(at(2, 5), (A, "", 200, 50)))
    combined = Service(service_env(db, [source("a", server, ca_bundle=pki.ca_path,
                                                     client_cert=pki.client_combined)]))
    status, result = combined.post()
    assert (status, result["status"], result["written_minutes"]) == (200, "ok", 1), result
    assert sum(b[7] for b in db.buckets()) == 250


def test_per_source_tokens_and_token_file_rotation_without_restart(db, exporters, tmp_path, app_log):
    db.add_users(A, B)
    one = exporters([snap(at(1, 5), (A, "", 100, 50))], node_id="node-1", tokens=[SECRET_FILE_TOKEN])
    two = exporters([snap(at(1, 5), (B, "", 10, 5))], node_id="node-2", tokens=[SECRET_ENV_TOKEN])
    token_file = tmp_path / "exporter-1.token"
    token_file.write_text(SECRET_FILE_TOKEN + "\n")  # trailing newline as editors and echo leave it
    db.set_watermark("one", at(-1))
    db.set_watermark("two", at(-1))
    svc = Service(service_env(db, [source("one", one, token_file=str(token_file)),
                                        source("two", two, token_env="EXPORTER_TWO_TOKEN")],
                                   EXPORTER_TWO_TOKEN=SECRET_ENV_TOKEN))
    status, result = svc.post()
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", 2), result
    assert {a for _, a in one.requests} == {f"Bearer {SECRET_FILE_TOKEN}"}
    assert {a for _, a in two.requests} == {f"Bearer {SECRET_ENV_TOKEN}"}
    assert sorted((b[1], b[2]) for b in db.buckets()) == sorted([(f"{ENV}:node-1", A), (f"{ENV}:node-2", B)])

    # Rotation in place: the exporter now accepts only the new token; same app instance.
    rotated = "tokFile-Rotated-0c1d2e3f4a"
    one.tokens = {rotated}
    one.add(snap(at(2, 5), (A, "", 300, 50)))
    token_file.write_text(rotated + "\n")
    seen = len(one.requests)
    status, result = svc.post()
    assert (status, result["status"]) == (200, "ok"), result
    assert {a for _, a in one.requests[seen:]} == {f"Bearer {rotated}"}
    assert db.watermark("one") == at(2, 5)

    # Rotation by atomic rename (how secret managers swap files).
    renamed = "tokFile-Renamed-6b7c8d9e0f"
    one.tokens = {renamed}
    one.add(snap(at(3, 5), (A, "", 400, 50)))
    staged = tmp_path / "exporter-1.token.new"
    staged.write_text(renamed)
    os.replace(staged, token_file)
    status, result = svc.post()
    assert (status, result["status"]) == (200, "ok"), result
    assert sum(b[7] for b in db.buckets() if b[2] == A) == 450

    # The token file disappears: that source fails clearly, the other one still runs.
    token_file.unlink()
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial"), result
    assert by_source(result)["one"]["last_error"] == "token: token_file is not readable"
    assert by_source(result)["two"]["state"] == "ok"
    assert_no_secret({"logs": "\n".join(app_log), "result": json.dumps(result)},
                     [SECRET_FILE_TOKEN, rotated, renamed, SECRET_ENV_TOKEN, TOKEN])


@pytest.mark.parametrize("field", ["ca_bundle", "client_cert", "client_key"])
@pytest.mark.parametrize("change", ["removed", "garbage"])
def test_tls_files_that_vanish_or_break_after_startup_fail_the_source_cleanly(
        db, tls_exporters, pki, tmp_path, field, change):
    """Certificates get rotated under a running service: a missing or broken
    file fails that source for the run (no 500), and the next run recovers."""
    db.add_users(A)
    server = tls_exporters([snap(at(1, 5), (A, "", 100, 50))], require_client_cert=True)
    originals = {"ca_bundle": pki.ca_path, "client_cert": pki.client_cert, "client_key": pki.client_key}
    files = {}
    for name, original in originals.items():
        files[name] = tmp_path / f"{name}.pem"
        shutil.copy(original, files[name])
    db.set_watermark("a", at(-1))
    svc = Service(service_env(db, [source("a", server, **{k: str(v) for k, v in files.items()})]))
    if change == "removed":
        files[field].unlink()
    else:
        files[field].write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    status, result = svc.post()
    assert (status, result["status"]) == (503, "error"), result
    assert by_source(result)["a"]["state"] == "failed" and str(tmp_path) not in result["error"]
    assert db.watermark("a") == at(-1)
    assert_still_serving(svc)
    shutil.copy(originals[field], files[field])  # the rotation completes
    status, result = svc.post()
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", 1), result


class RawHandler(dx._Handler):
    """Lets a test write the exporter's answer byte by byte (``server.raw``)."""

    def do_GET(self):
        raw = getattr(self.server, "raw", None)
        if raw is None:
            return super().do_GET()
        self.server.requests.append(({}, self.headers.get("Authorization", "")))
        self.close_connection = True
        try:
            raw(self)
        except OSError:
            pass  # the client hung up, as it should


def raw_exporter(exporters, raw) -> Exporter:
    server = exporters([])
    server.RequestHandlerClass = RawHandler
    server.raw = raw
    return server


def head(handler, status=200, **headers):
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json", "Connection: close"]
    lines += [f"{key.replace('_', '-')}: {value}" for key, value in headers.items()]
    handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    handler.wfile.flush()


def run_against(db, server, env=None, **fields):
    db.set_watermark("a", at(-1))
    svc = Service(service_env(db, [source("a", server, **fields)], **(env or {})))
    clock = time.monotonic()
    status, result = svc.post()
    return status, result, time.monotonic() - clock


def test_gigantic_streamed_body_hits_the_real_cap(db, exporters):
    sent = {"bytes": 0}
    cap = 1 << 20

    def endless_body(handler):
        head(handler)  # no Content-Length: the cap must hold while streaming
        handler.wfile.write(b'{"snapshots":[')
        block = b" " * (1 << 18)
        while sent["bytes"] < cap + (8 << 20):
            handler.wfile.write(block)
            sent["bytes"] += len(block)

    server = raw_exporter(exporters, endless_body)
    status, result, _ = run_against(db, server, env={"MAX_BODY_BYTES": cap})
    assert status == 503 and by_source(result)["a"]["last_error"] == \
        f"bad_page: exporter page is larger than {cap} bytes (MAX_BODY_BYTES)"
    assert db.watermark("a") == at(-1)


def test_declared_oversize_and_compressed_pages_are_refused(db, exporters):
    """A declared Content-Length over the cap is refused before reading; a
    compressed body is refused whatever its size (the service asks for
    identity: a gzip bomb would be unpacked before any cap could see it)."""
    server = raw_exporter(exporters, lambda h: head(h, Content_Length=10**12))
    status, result, _ = run_against(db, server, env={"MAX_BODY_BYTES": 1 << 20})
    assert status == 503 and "larger than 1048576 bytes" in result["error"]

    db.add_users(B)
    page = json.dumps({"node_id": NODE, "env": ENV, "has_more": False,
                       "snapshots": [snap(at(1, 5), (B, "", 10, 10))]}).encode()
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip: a valid page, then 64 MiB of blanks
    bomb = squeeze.compress(page[:-1]) + b"".join(squeeze.compress(b" " * (1 << 20)) for _ in range(64))
    bomb += squeeze.compress(b"}") + squeeze.flush()
    assert len(bomb) < (1 << 20)  # small on the wire, huge when inflated
    asked = []

    def send_bomb(handler):
        asked.append(handler.headers.get("Accept-Encoding"))
        head(handler, Content_Length=len(bomb), Content_Encoding="gzip")
        handler.wfile.write(bomb)

    server.raw = send_bomb
    status, result, _ = run_against(db, server)
    assert asked == ["identity"]
    assert status == 503 and "compressed page" in by_source(result)["a"]["last_error"], result
    assert db.buckets() == [] and db.watermark("a") == at(-1)


def test_slow_exporters_are_bounded_by_the_source_timeout(db, exporters):
    stop = threading.Event()

    def drip(handler):  # a byte at a time: every read succeeds, the page never ends (well, in 8 s)
        head(handler, Content_Length=100000)
        deadline = time.monotonic() + 8
        while not stop.wait(0.05) and time.monotonic() < deadline:
            handler.wfile.write(b" ")
            handler.wfile.flush()

    def stall(handler):
        head(handler, Content_Length=100)
        stop.wait(10)

    def silent(handler):
        stop.wait(10)

    try:
        for behaviour, message in ((silent, "did not answer within 1s"), (stall, "did not answer within 1s"),
                                   (drip, "took longer than 1s")):
            server = raw_exporter(exporters, behaviour)
            status, result, seconds = run_against(db, server, timeout_seconds=1)
            assert status == 503 and message in by_source(result)["a"]["last_error"], (behaviour, result)
            assert seconds < 4, (behaviour.__name__, seconds)
            assert db.watermark("a") == at(-1)
    finally:
        stop.set()


def test_redirects_are_not_followed(db, exporters):
    db.add_users(A)
    elsewhere = exporters([snap(at(1, 5), (A, "", 100, 50))])
    server = raw_exporter(exporters, lambda h: head(h, 302, Location=elsewhere.url + "/v1/snapshots/window",
                                                    Content_Length=0))
    status, result, _ = run_against(db, server)
    assert status == 503 and by_source(result)["a"]["last_error"] == "exporter_unreachable: exporter answered HTTP 302"
    assert elsewhere.requests == [] and db.buckets() == []


FUZZ_CAP = 65536  # MAX_BODY_BYTES during the fuzz (its smallest allowed value)
FUZZ_MAX_PAGES = 4  # MAX_PAGES_PER_RUN during the fuzz


def page_doc(snapshots, has_more=False, next_cursor="", node_id=NODE, env=ENV) -> dict:
    return {"node_id": node_id, "env": env, "snapshots": snapshots, "has_more": has_more,
            "next_cursor": next_cursor}


def good_page(index: int, has_more=True) -> bytes:
    """Page ``index`` of a well-behaved exporter: account A's growing counter."""
    return json.dumps(page_doc([snap(at(1 + index, 10), (A, "good", 100 * (index + 1), 10 * (index + 1)))],
                               has_more, f"c{index + 1}" if has_more else "")).encode()


def hostile_snapshots() -> list:
    """What a faulty page carries: account B, which must never be billed."""
    return [snap(at(20, 5), (B, "bad", 500, 500)), snap(at(21, 5), (B, "bad", 900, 900))]


JSON_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=8), st.lists(st.integers(), max_size=2),
                      st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
BAD_TIMES = st.one_of(
    st.sampled_from(["", "yesterday", "2026-02-30T00:00:00Z", "2026-04-08T12:00:00", "2026-04-08 12:00:00Z",
                     "2026-04-08T25:00:00Z", "2026-04-08T12:00:00.1234567890Z", "2026-04-08T12:00:00+24:00",
                     "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59Z",
                     "1999-01-01T00:00:00Z", rfc(at(-10)), rfc(BASE + timedelta(days=1)), "\ud800"]),
    st.integers(), st.none(), st.text(max_size=30).filter(lambda t: not re.match(r"\d{4}-\d\d-\d\d[Tt]", t)))
WRONG_LABELS = st.one_of(st.sampled_from(["", "node-b", "node-a ", "NODE-A", "prod", "\ud800", "x" * 300, "a\x00", "node-a#x"]),
                         st.text(min_size=1, max_size=10).filter(lambda t: t not in (NODE, ENV)))


@st.composite
def page_faults(draw):
    """A page-level fault: (kind, script(index, cursor) -> (status, body))."""
    kind = draw(st.sampled_from([
        "status", "not json", "truncated", "deep nesting", "huge number", "top level", "snapshots type",
        "has_more type", "next_cursor type", "page identity", "snapshot identity", "snapshot type",
        "collected_at", "samples type", "gigantic", "cursor stuck", "cursor missing", "endless empty",
        "endless data"]))
    snaps = hostile_snapshots()
    doc = page_doc(snaps)
    body = None
    status = 200
    if kind == "status":
        status = draw(st.sampled_from([201, 204, 301, 302, 400, 401, 403, 404, 429, 500, 502, 503]))
        body = b"" if status == 204 else json.dumps(doc).encode()
    elif kind == "not json":
        body = draw(st.one_of(st.binary(max_size=200), st.sampled_from(
            [b"", b"null\x00", b"\xff\xfe{}", b"{'a': 1}", b"{\"snapshots\": [}", b"NaN-", b"<html>502</html>"])))
        try:
            json.loads(body)
            body = b"<" + body  # still not JSON
        except (ValueError, RecursionError):
            pass
    elif kind == "truncated":
        full = json.dumps(doc).encode()
        body = full[:draw(st.integers(0, len(full) - 1))]
    elif kind == "deep nesting":
        body = b'{"snapshots":' + b"[" * draw(st.integers(10**4, 10**5)) + b"]"
    elif kind == "huge number":  # past Python's int parsing limit: the whole page is not JSON
        digits = "9" * draw(st.integers(4301, 6000))
        body = json.dumps(doc).replace('"uplink_bytes_total": 500', f'"uplink_bytes_total": {digits}').encode()
    elif kind == "top level":
        body = json.dumps(draw(st.one_of(st.lists(JSON_JUNK, max_size=3), st.text(max_size=5), st.integers(),
                                         st.just([doc])))).encode()
    elif kind == "snapshots type":
        doc["snapshots"] = draw(JSON_JUNK.filter(lambda v: v is not None and not isinstance(v, list))
                                | st.just({"0": snaps[0]}))
    elif kind == "has_more type":
        doc["has_more"] = draw(JSON_JUNK.filter(lambda v: not isinstance(v, bool)) | st.sampled_from(["true", 1, 0]))
    elif kind == "next_cursor type":
        doc["has_more"] = draw(st.booleans())
        doc["next_cursor"] = draw(JSON_JUNK.filter(lambda v: v is not None and not isinstance(v, str))
                                  | st.sampled_from(["c" * 256, "c1\x00", "\ud800"]))
    elif kind == "page identity":
        label, expected = draw(st.sampled_from([("node_id", NODE), ("env", ENV)]))
        doc[label] = draw(WRONG_LABELS.filter(lambda v: v != expected) | JSON_JUNK.filter(
            lambda v: v is not None and not isinstance(v, str)))
    elif kind == "snapshot identity":  # one snapshot of the page is foreign: the page goes whole
        label, expected = draw(st.sampled_from([("node_id", NODE), ("env", ENV)]))
        doc["snapshots"][draw(st.integers(0, 1))][label] = draw(WRONG_LABELS.filter(lambda v: v != expected))
    elif kind == "snapshot type":
        doc["snapshots"].insert(draw(st.integers(0, 2)), draw(JSON_JUNK.filter(lambda v: not isinstance(v, dict))))
    elif kind == "collected_at":
        target = doc["snapshots"][draw(st.integers(0, 1))]
        if draw(st.booleans()):
            target["collected_at"] = draw(BAD_TIMES)
        else:
            del target["collected_at"]
    elif kind == "samples type":
        doc["snapshots"][draw(st.integers(0, 1))]["samples"] = draw(
            JSON_JUNK.filter(lambda v: v is not None and not isinstance(v, list)))
    elif kind == "gigantic":  # a perfectly valid page, only too big
        body = json.dumps({**doc, "padding": " " * draw(st.integers(FUZZ_CAP, 2 * FUZZ_CAP))}).encode()
    elif kind == "cursor stuck":  # has_more, but next_cursor is the cursor just sent
        def script(index, cursor):
            return 200, json.dumps(page_doc(snaps, True, cursor)).encode()
        return kind, script
    elif kind == "cursor missing":
        doc["has_more"] = True
        if draw(st.booleans()):
            del doc["next_cursor"]
    elif kind == "endless data":
        return kind, None
    elif kind == "endless empty":  # cursors advance, has_more never ends, nothing is ever served
        def script(index, cursor):
            return 200, json.dumps(page_doc([], True, f"c{index + 1}", "", "")).encode()
        return kind, script
    if body is None:
        body = json.dumps(doc).encode()
    return kind, lambda index, cursor: (status, body)


def serve_script(prefix: int, script):
    """Exporter fault hook: ``prefix`` good pages, then ``script`` (cursor cN = page N)."""
    def fault(query):
        cursor = query.get("cursor", "")
        match = re.fullmatch(r"c(\d+)", cursor)
        index = int(match.group(1)) if match else 0 if cursor == "" else None
        if index is None:
            return 400, b'{"error":"bad cursor"}'
        if index < prefix:
            return 200, good_page(index)
        return script(index, cursor)
    return fault


@pytest.fixture
def fuzz_exporter(exporters):
    """One exporter for all examples of a fuzz test; each example sets its ``fault``."""
    return exporters([])


def assert_still_serving(svc):
    for path, allowed in (("/healthz", (200, 503)), ("/v1/status", (200,)), ("/metrics", (200,)),
                          ("/api/ping", (200,))):
        response = svc.client.get(path)
        assert response.status_code in allowed, (path, response.status_code, response.data[:300])


def billed_of(db, account_id):
    return sum(b[7] for b in db.buckets() if b[2] == account_id)


def assert_nothing_of(db, account_id):
    assert billed_of(db, account_id) == 0
    assert not [r for r in db.ledger() if r[1] == account_id]
    assert not [r for r in db.checkpoints() if r[1] == account_id]
    assert not [r for r in db.quota() if r[0] == account_id]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault=page_faults(), prefix=st.integers(0, 2))
def test_fuzz_page_level_faults_move_no_watermark_and_write_nothing_of_the_page(
        db, fuzz_exporter, fault, prefix):
    kind, script = fault
    if kind == "endless data":  # good pages that never end: MAX_PAGES_PER_RUN bounds them
        prefix = 10**9
    reset_database(db, [A, B])
    db.set_watermark("a", at(-1))
    server = fuzz_exporter
    server.fault = serve_script(prefix, script)
    server.requests.clear()
    svc = Service(service_env(db, [source("a", server)], MAX_PAGES_PER_RUN=FUZZ_MAX_PAGES,
                               MAX_BODY_BYTES=FUZZ_CAP))
    try:
        check_page_fault(db, svc, server, kind, prefix)
    finally:
        svc.close()


def check_page_fault(db, svc, server, kind, prefix):
    status, result = svc.post()
    applied = min(prefix, FUZZ_MAX_PAGES)
    # Pages committed before the fault stay: the run made progress, so it is partial, not an error.
    assert (status, result["status"]) == ((200, "partial") if applied else (503, "error")), (kind, result)
    state = by_source(result)["a"]
    if state["state"] == "partial":  # stopped at MAX_PAGES_PER_RUN before the fault showed: the next run continues
        assert kind.startswith("endless") and "MAX_PAGES_PER_RUN" in state["error"], (kind, result)
    else:
        assert state["state"] == "failed" and state["last_error"], (kind, result)
    assert db.watermark("a") == (at(applied, 10) if applied else at(-1)), (kind, result)
    assert billed_of(db, A) == 110 * applied
    assert_nothing_of(db, B)
    assert len(server.requests) <= FUZZ_MAX_PAGES + 1
    assert_still_serving(svc)


BAD_COUNTERS = st.one_of(
    st.sampled_from([True, False, 1.0, 1.5, -1, -2**63, 2**63, 2**64, 10**30, "100", "", None, [], {},
                     float("nan"), float("inf")]),
    st.floats(allow_nan=True), st.integers(max_value=-1), st.integers(min_value=2**63), st.text(max_size=5))
BAD_UUIDS = st.one_of(
    st.sampled_from(["", "not-a-uuid", B[:-1], B + "0", B.replace("-", "_"), "\ud800", 123, None, [B], {"u": B}]),
    st.text(max_size=40).filter(lambda t: not _parses_as_uuid(t)))


def _parses_as_uuid(text) -> bool:
    try:
        uuid.UUID(text)
        return True
    except (ValueError, TypeError, AttributeError):
        return False


@st.composite
def bad_samples(draw):
    sample = {"uuid": B, "email": "b@example.com", "inbound_tag": "bad", "uplink_bytes_total": 7,
              "downlink_bytes_total": 9}
    kind = draw(st.sampled_from(["counter", "missing counter", "uuid", "missing uuid", "tag", "not an object"]))
    if kind == "counter":
        sample[draw(st.sampled_from(["uplink_bytes_total", "downlink_bytes_total"]))] = draw(BAD_COUNTERS)
    elif kind == "missing counter":
        del sample[draw(st.sampled_from(["uplink_bytes_total", "downlink_bytes_total"]))]
    elif kind == "uuid":
        sample["uuid"] = draw(BAD_UUIDS)
    elif kind == "missing uuid":
        del sample["uuid"]
    elif kind == "tag":
        sample["inbound_tag"] = draw(st.sampled_from([7, [], {}, True, "t" * 256, "a\x00b", "\ud800", "x\udfff"]))
    else:
        sample = draw(JSON_JUNK.filter(lambda v: not isinstance(v, dict)))
    return kind, sample


GOOD_COUNTERS = st.one_of(st.integers(0, 2**40), st.sampled_from([0, 1, 2**62 - 1]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_samples(), prefix=st.integers(0, 2),
       good=st.lists(st.tuples(GOOD_COUNTERS, GOOD_COUNTERS), min_size=1, max_size=4),
       split=st.integers(0, 4), position=st.integers(0, 4))
def test_fuzz_a_bad_sample_is_skipped_counted_and_the_rest_billed(db, fuzz_exporter, bad, prefix, good, split,
                                                                  position):
    kind, bad_sample = bad
    reset_database(db, [A, B])
    db.set_watermark("a", at(-1))
    good_samples = [{"uuid": A.upper() if i % 2 else A, "inbound_tag": f"g{i}", "uplink_bytes_total": up,
                     "downlink_bytes_total": down} for i, (up, down) in enumerate(good)]
    # Good samples over one or two snapshots; the bad one somewhere among them.
    split = min(split, len(good_samples))
    groups = [good_samples[:split], good_samples[split:]]
    target = groups[position % 2]
    target.insert(position % (len(target) + 1), bad_sample)
    snapshots = [{"collected_at": rfc(at(10 + i, 30)), "samples": samples}
                 for i, samples in enumerate(group for group in groups if group)]
    last = json.dumps(page_doc(snapshots)).encode()
    # New series of account A: billed from zero in the first snapshot that holds A, unless the
    # prefix pages already brought A to the node (then they are baselines: see first_sight).
    first = next(group for group in (s["samples"] for s in snapshots) if any(x in good_samples for x in group))
    expected = 110 * prefix + (0 if prefix else sum(x["uplink_bytes_total"] + x["downlink_bytes_total"]
                                                    for x in first if x in good_samples))
    server = fuzz_exporter
    server.fault = serve_script(prefix, lambda index, cursor: (200, last))
    svc = Service(service_env(db, [source("a", server)]))
    try:
        check_bad_sample(db, svc, kind, bad_sample, prefix, good, snapshots, expected)
    finally:
        svc.close()


def check_bad_sample(db, svc, kind, bad_sample, prefix, good, snapshots, expected):
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial"), (kind, bad_sample, result)
    assert result["invalid_samples"] == 1 and by_source(result)["a"]["invalid_samples"] == 1
    assert "a: invalid_samples: 1 skipped" in result["error"]
    assert result["processed_samples"] == prefix + len(good)
    assert billed_of(db, A) == expected
    assert_nothing_of(db, B)
    assert db.watermark("a") == at(10 + len(snapshots) - 1, 30)
    assert_still_serving(svc)


@pytest.mark.parametrize("where", ["next_cursor", "page node_id", "snapshot env", "inbound_tag"])
@pytest.mark.parametrize("text", ["\ud800", "x\udfff", "a\x00b"])
def test_unencodable_exporter_text_is_rejected_not_a_crash(db, exporters, where, text):
    """A lone surrogate ("\\ud800" in JSON) or NUL has no UTF-8 form: it can
    reach neither PostgreSQL nor a URL. Sources without expected node/env let
    exporter labels through, so that is the case tested here."""
    db.add_users(A)
    doc = page_doc([snap(at(1, 5), (A, "good", 10, 10), (A, "other", 1, 1))])
    if where == "next_cursor":
        doc.update(has_more=True, next_cursor=text)
    elif where == "page node_id":
        doc["node_id"] = text
    elif where == "snapshot env":
        doc["snapshots"][0]["env"] = text
    else:
        doc["snapshots"][0]["samples"][1]["inbound_tag"] = text
    server = exporters([])
    server.fault = lambda query: (200, json.dumps(doc).encode()) if "cursor" not in query else (
        200, json.dumps(page_doc([])).encode())
    db.set_watermark("a", at(-1))
    svc = Service(service_env(db, [{"source_id": "a", "base_url": server.url}]))
    status, result = svc.post()
    assert_still_serving(svc)
    if where == "inbound_tag":  # one bad sample: skipped and counted, the rest billed
        assert (status, result["status"], result["invalid_samples"]) == (200, "partial", 1), result
        assert [(b[4], b[7]) for b in db.buckets()] == [("good", 20)]
    else:  # a bad page: the source fails clearly, nothing written
        assert (status, result["status"]) == (503, "error"), result
        assert "malformed page" in result["error"] and db.buckets() == [] and db.watermark("a") == at(-1)


def test_counters_at_the_limit_never_crash_the_service(db, exporters):
    """2^63-1 in both directions: each counter is in range, but their sum
    cannot be stored as a bucket's total (BIGINT). That sample is invalid
    (skipped, counted) and the source does not get stuck on its page; a
    sample whose sum fits is billed."""
    db.add_users(A, B)
    top = 2**63 - 1
    server = exporters([snap(at(1, 5), (A, "", top, top), (B, "", top - 10, 10))])
    db.set_watermark("a", at(-1))
    svc = Service(service_env(db, [source("a", server)]))
    status, result = svc.post()
    assert status == 200 and result["status"] == "partial" and result["invalid_samples"] == 1, result
    assert_still_serving(svc)
    assert billed_of(db, A) == 0 and billed_of(db, B) == top
    assert db.watermark("a") == at(1, 5)


RSS_LIMIT_MB = 400


def filled(doc, placeholder_text: str, budget_bytes: int) -> bytes:
    """``doc`` as JSON with its "@" item replaced by ``placeholder_text``
    items (comma-separated), as many as fit in ``budget_bytes``."""
    before, after = json.dumps(doc).split('"@"')
    count = (budget_bytes - len(before) - len(after)) // (len(placeholder_text) + 1)
    return (before + ",".join([placeholder_text] * count) + after).encode()


def hostile_page_doc(stamp) -> dict:
    return {"node_id": NODE, "env": ENV, "snapshots": [{"collected_at": rfc(stamp), "node_id": NODE,
                                                        "samples": ["@"]}], "has_more": False}


def nested_values_page(stamp, values: int) -> tuple[bytes, int]:
    """A page just under ``values`` JSON values, each the costliest per value
    json.loads builds: a one-key object nested in the next, so no comma is
    needed between them, each with a key of its own (json.loads shares a key
    it has seen in the same document: ~240 bytes a value parsed, ~300 at the
    parse's peak, against ~184 for one repeated key). Returns the body and
    the number of samples (chains) in it."""
    depth = 800  # below the decoder's recursion limit, whatever the stack above it
    chain = "".join(f'{{"k{level:05d}":' for level in range(depth)) + "0" + "}" * depth
    before, after = json.dumps(hostile_page_doc(stamp)).split('"@"')
    overhead = before.count(",") + before.count("[") + before.count("{") + after.count(",")
    chains = (values - overhead - 10) // (depth + 1)
    body = (before + ",".join([chain] * chains) + after).encode()
    assert values - 2 * depth < body.count(b",") + body.count(b"[") + body.count(b"{") < values
    return body, chains


def json_values(body: bytes, ndjson: bool = False) -> int:
    """What decode_json counts against MAX_JSON_VALUES."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + (body.count(b"\n") if ndjson else 0)


def costliest_ndjson(stamp, node: str, values: int) -> tuple[bytes, int]:
    """NDJSON snapshot lines just under ``values`` JSON values, each line's
    one sample the costliest per JSON value json.loads builds (the chain of
    nested_values_page). Returns the body and its line count."""
    depth = 800
    chain = "".join(f'{{"k{level:05d}":' for level in range(depth)) + "0" + "}" * depth
    line = json.dumps({"collected_at": rfc(stamp), "node_id": node, "env": ENV, "samples": ["@"]})
    line = line.replace('"@"', chain).encode() + b"\n"
    lines = (values - 1) // json_values(line, ndjson=True)
    body = line * lines
    assert values - json_values(line, ndjson=True) < json_values(body, ndjson=True) < values
    return body, lines


def test_hostile_pages_and_bodies_keep_the_worker_under_400_mb(db, exporters, gunicorns):
    """Real gunicorn, one worker: an NDJSON push just under MAX_JSON_VALUES of
    the costliest values is parsed a line at a time (the worker's peak RSS
    hardly moves), one line more is a 400 naming the budget; a page just
    under MAX_BODY_BYTES made of millions of empty objects fails its source
    cleanly (nothing written, watermark kept); a page just under
    MAX_JSON_VALUES of the costliest values is parsed (its samples skipped as
    invalid); a pushed body of the first kind is a 400. The worker's peak RSS
    stays under 400 MB throughout."""
    db.add_users(A)
    server = exporters()
    db.set_watermark("a", at(-1))
    push = {"source_id": "p", "mode": "push", "expected_node_id": "node-p", "expected_env": ENV}
    g = gunicorns(service_env(db, [source("a", server), push]), workers=1)
    worker, = worker_pids(g.proc.pid)
    max_body = 16 * 1024 * 1024

    # First, while the worker's peak is still its own: NDJSON of the costliest lines, all of them parsed.
    def push_ndjson(body):
        return requests.post(f"{g.url}/v1/ingest/snapshots", data=body, timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": NDJSON})

    assert push_ndjson(push_body(snap(at(0, 1)), node="node-p", ndjson=True)).status_code == 200  # warmed up
    idle = peak_rss_mb(worker)
    ndjson, lines = costliest_ndjson(at(0, 5), "node-p", billing.MAX_JSON_VALUES)
    response = push_ndjson(ndjson)
    assert response.status_code == 200, response.text[:500]
    assert (response.json()["status"], response.json()["invalid_samples"]) == ("partial", lines), response.text[:500]
    ndjson_peak = peak_rss_mb(worker)
    print(f"\nhardening: peak RSS of the worker before and after an NDJSON push of {lines} lines "
          f"({json_values(ndjson, ndjson=True)} JSON values, {len(ndjson)} bytes): {idle:.0f} MB, {ndjson_peak:.0f} MB")
    assert ndjson_peak - idle < 40, f"worker peak RSS {idle:.0f} MB, then {ndjson_peak:.0f} MB"
    over = ndjson + b"10\n" * (billing.MAX_JSON_VALUES - json_values(ndjson, ndjson=True))
    assert json_values(over) < billing.MAX_JSON_VALUES == json_values(over, ndjson=True)  # its lines tip it over
    response = push_ndjson(over)
    assert response.status_code == 400, response.text[:500]
    assert response.json() == {"error": f"body holds more than {billing.MAX_JSON_VALUES} JSON values "
                                        "(the memory budget)"}
    assert db.watermark("p") == at(0, 5)

    # Millions of empty objects: one per 3 bytes, each a 64-byte dict once parsed.
    over_budget = filled(hostile_page_doc(at(1, 5)), "{}", max_body - 4096)
    assert len(over_budget) <= max_body
    assert over_budget.count(b",") + over_budget.count(b"{") > 5 * billing.MAX_JSON_VALUES
    server.fault = lambda query: (200, over_budget)
    status, result = g.post()
    assert (status, result["status"]) == (503, "error"), result
    assert "JSON values" in by_source(result)["a"]["error"], result
    assert db.watermark("a") == at(-1)
    assert db.buckets() == [] and db.ledger() == [] and db.checkpoints() == [] and db.quota() == []

    within_budget, chains = nested_values_page(at(1, 5), billing.MAX_JSON_VALUES)
    server.fault = lambda query: (200, within_budget)
    status, result = g.post()
    assert (status, result["status"], result["invalid_samples"]) == (200, "partial", chains), result
    assert db.watermark("a") == at(1, 5) and db.buckets() == [] and db.ledger() == []

    pushed_body = filled([{"collected_at": rfc(at(1, 5)), "node_id": "node-p", "env": ENV, "samples": ["@"]}],
                         "{}", max_body - 4096)
    assert len(pushed_body) <= max_body and pushed_body.count(b"{") > 3 * billing.MAX_JSON_VALUES
    response = requests.post(f"{g.url}/v1/ingest/snapshots", data=pushed_body, timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON values" in response.json()["error"], response.text[:500]
    assert db.buckets() == [] and db.watermark("p") == at(0, 5)

    peak = peak_rss_mb(worker)
    print(f"\nhardening: peak RSS of the gunicorn worker after hostile pages and a hostile push: {peak:.0f} MB")
    assert g.proc.poll() is None and worker_pids(g.proc.pid) == [worker]  # the same worker survived it all
    assert peak < RSS_LIMIT_MB, f"worker peak RSS {peak:.0f} MB"


def test_the_largest_pages_of_valid_samples_keep_the_worker_under_400_mb(db, exporters, gunicorns):
    """The other hostile pages: one snapshot (it cannot be split, so
    PAGE_SAMPLE_TARGET does not apply) of MAX_PAGE_SAMPLES valid samples of
    known accounts is billed; one sample more and the page is refused whole,
    naming the memory budget; a page at PAGE_SAMPLE_TARGET is written while
    the next page, just under MAX_JSON_VALUES of the costliest values,
    parses beside it. The worker's peak RSS stays under 400 MB throughout."""
    count = billing.MAX_PAGE_SAMPLES
    accounts = [row[0] for row in db.q("""INSERT INTO users (uuid) SELECT gen_random_uuid() FROM generate_series(1, %s)
                                          RETURNING uuid::text""", (count + 1,))]

    def page(stamp, samples, uplink=10000, next_cursor=""):
        snapshot = snap(stamp, *((a, "", uplink + i % 90000, 1) for i, a in enumerate(samples)))
        return json.dumps(page_doc([snapshot], bool(next_cursor), next_cursor)).encode()

    largest = page(at(1, 5), accounts[:count])
    assert len(largest) <= 16 * 1024 * 1024 and largest.count(b",") + largest.count(b"{") < billing.MAX_JSON_VALUES
    server = exporters()
    server.fault = lambda query: (200, largest)
    db.set_watermark("a", at(-1))
    g = gunicorns(service_env(db, [source("a", server)]), workers=1)
    worker, = worker_pids(g.proc.pid)
    status, result = g.post()
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", count), result
    peak = peak_rss_mb(worker)
    print(f"\nhardening: peak RSS of the gunicorn worker after one page of {count} valid samples: {peak:.0f} MB")
    assert peak < RSS_LIMIT_MB, f"worker peak RSS {peak:.0f} MB"

    server.fault = lambda query: (200, page(at(2, 5), accounts))  # one sample more
    status, result = g.post()
    assert (status, result["status"]) == (503, "error"), result
    assert by_source(result)["a"]["last_error"] == f"budget: page holds more than {count} samples (the memory budget)"
    assert db.watermark("a") == at(1, 5) and db.one("SELECT count(*) FROM billing_ledger") == (count,)

    target = page(at(2, 5), accounts[:billing.PAGE_SAMPLE_TARGET], uplink=100000, next_cursor="c1")
    costliest, chains = nested_values_page(at(2, 35), billing.MAX_JSON_VALUES)
    server.fault = lambda query: (200, costliest if query.get("cursor") == "c1" else target)
    status, result = g.post()
    assert (status, result["status"], result["processed_samples"]) == (200, "partial", billing.PAGE_SAMPLE_TARGET)
    assert result["invalid_samples"] == chains and db.watermark("a") == at(2, 35), result
    assert db.one("SELECT count(*) FROM billing_ledger") == (count + billing.PAGE_SAMPLE_TARGET,)
    peak = peak_rss_mb(worker)
    print(f"hardening: peak RSS after a page of {billing.PAGE_SAMPLE_TARGET} samples written beside "
          f"the next page's parse of {billing.MAX_JSON_VALUES} values: {peak:.0f} MB")
    assert peak < RSS_LIMIT_MB, f"worker peak RSS {peak:.0f} MB"


# Quote, backslash and a non-ASCII letter: JSON escapes all three, so a
# redaction run on encoded text would miss them. Latin-1 letters only: HTTP
# header values travel as Latin-1.
QUOTED_TOKEN = 'Zq7"Xv\\Wk9é-Rm4"Pj\\Ln2ü'
QUOTED_SOURCE_TOKEN = 'Hb3\\Nc8"Qd5ß-Vf6\\Gs1"Yt'


def leaks(text: str, secret: str) -> list:
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    found = [form for form in forms if form in text]
    found += [secret[i:i + 8] for i in range(len(secret) - 7) if secret[i:i + 8] in text]
    return found


def test_tokens_with_quotes_backslashes_and_non_ascii_never_leave_the_process(db, exporters, service, app_log):
    """Exporters echo the Authorization header back (in the page's node_id
    and env, placed so one copy straddles the 500-character cut of a stored
    error, and in an error body): no token shows in the HTTP answers,
    /v1/status, /metrics or the log, raw, JSON-escaped, or in 8-character pieces."""
    db.add_users(A, B)
    assert len(QUOTED_TOKEN) >= 16 and len(QUOTED_SOURCE_TOKEN) >= 16
    echo_node = exporters([snap(at(1, 5), (A, "", 100, 0))], tokens=(QUOTED_TOKEN,))
    echo_body = exporters([snap(at(1, 5), (B, "", 100, 0))], node_id="node-b", tokens=(QUOTED_SOURCE_TOKEN,))

    def echo_in_identity(query):
        auth = echo_node.requests[-1][1]
        assert QUOTED_TOKEN in auth  # the exporter really was handed the token
        node = ("n" * 255)[:255 - len(auth)] + auth
        env = "e" * (433 - (255 - len(auth))) + auth  # its 2nd copy straddles the error's 500th character
        return 200, json.dumps({"node_id": node, "env": env, "has_more": False, "snapshots": [
            {"collected_at": rfc(at(1, 5)), "samples": []}]}).encode()

    def echo_in_error(query):
        return 500, json.dumps({"error": f"bad token {echo_body.requests[-1][1]}"}).encode()

    echo_node.fault, echo_body.fault = echo_in_identity, echo_in_error
    db.set_watermark("a", at(-1))
    db.set_watermark("b", at(-1))
    env = service_env(db, [source("a", echo_node), source("b", echo_body, token_env="B_EXPORTER_TOKEN")],
                      B_EXPORTER_TOKEN=QUOTED_SOURCE_TOKEN, INTERNAL_SERVICE_TOKEN=QUOTED_TOKEN)
    svc = Service(env)
    answers = [svc.post(token=QUOTED_TOKEN), svc.post("reconcile", token=QUOTED_TOKEN)]
    pages = [svc.client.get(path).get_data(as_text=True) for path in ("/v1/status", "/metrics", "/healthz")]
    for status, result in answers:
        assert (status, result["status"]) == (503, "error"), result
        assert by_source(result)["a"]["state"] == "failed" and by_source(result)["b"]["state"] == "failed"
    assert len(echo_node.requests) == 2 and len(echo_body.requests) == 2
    stored = by_source(answers[0][1])["a"]["last_error"]
    assert "node_id" in stored and "***" in stored, stored
    texts = {"answers": json.dumps(answers), "raw answers": "".join(pages), "log": "\n".join(app_log),
             "stored errors": json.dumps(db.q("SELECT source_id, last_error FROM billing_source_sync_state")),
             "stored runs": json.dumps(db.q("SELECT result::text FROM billing_job_runs"))}
    assert events(app_log, "source_failed"), app_log
    for where, text in texts.items():
        for secret in (QUOTED_TOKEN, QUOTED_SOURCE_TOKEN):
            assert not leaks(text, secret), f"{where} shows {leaks(text, secret)}: {text[:3000]}"


# ---- repository: locks, schema, the database going away ----------------------------------

def test_a_run_waits_for_a_busy_source_then_says_busy(db, exporters, service):
    """Another writer (here: the test itself) holds the source's lock: the
    HTTP run waits BUSY_WAIT_SECONDS, then answers 409 without touching it."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1), (A, "xhttp", 100, 0))])
    holder = psycopg2.connect(db.url)
    assert billing.try_lock_source(holder, "a")
    try:
        began = time.monotonic()
        status, result = svc.post()
        waited = time.monotonic() - began
    finally:
        holder.close()
    assert status == 409 and result["status"] == "busy", result
    assert result["source_statuses"][0]["state"] == "busy"
    assert billing.BUSY_WAIT_SECONDS <= waited < billing.BUSY_WAIT_SECONDS + 5
    assert db.buckets() == [] and db.watermark("a") == at(-1) and server.requests == []
    assert svc.post()[0] == 200 and len(db.buckets()) == 1


def test_schema_on_a_database_without_users_stops_at_once_naming_public_users(cluster):
    """schema.sql on a database without accounts' users table raises its own
    message naming public.users at its first statement, and creates nothing."""
    name = f"nousers_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = cluster.admin()
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} OWNER billing")
    finally:
        admin.close()
    conn = psycopg2.connect(cluster.url(name))
    conn.autocommit = True
    try:
        with open(os.path.join(ROOT, "schema.sql"), encoding="utf-8") as handle:
            schema = handle.read()
        with pytest.raises(psycopg2.Error) as error, conn.cursor() as cur:
            cur.execute(schema)
        message = str(error.value)
        assert error.value.pgcode == "P0001", (error.value.pgcode, message)  # RAISE EXCEPTION, not a missing relation
        assert "public.users does not exist" in message, message
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = 'public'")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


def test_a_failed_bookkeeping_statement_leaves_no_source_lock_behind(db, exporters, service):
    """The run's first statement after taking the source lock fails (a
    trigger): afterwards no advisory lock is held by any session, and another
    worker's Service (its own pool) runs the source: `ok`, not `busy`."""
    db.add_users(A)
    server, first = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0))])
    db.q("CREATE TABLE fail_flag (on_ boolean)")
    db.q("""CREATE FUNCTION refuse_sync_update() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF EXISTS (SELECT 1 FROM fail_flag) THEN RAISE EXCEPTION 'bookkeeping refused'; END IF;
              RETURN NEW;
            END $$""")
    db.q("""CREATE TRIGGER refuse_sync_update BEFORE UPDATE ON billing_source_sync_state
            FOR EACH ROW EXECUTE FUNCTION refuse_sync_update()""")
    db.q("INSERT INTO fail_flag VALUES (true)")
    status, result = first.post()
    assert (status, result["status"]) == (503, "error"), result
    assert by_source(result)["a"]["state"] == "failed"
    db.q("DROP TRIGGER refuse_sync_update ON billing_source_sync_state")

    def advisory_locks():
        return db.q("""SELECT l.pid, l.classid, l.objid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                       WHERE l.locktype = 'advisory' AND d.datname = current_database()""")
    # A closed session's locks go with its backend, which exits a moment after the client hangs up.
    wait_for(lambda: advisory_locks() == [], timeout=5, what="no advisory lock held")
    assert advisory_locks() == []
    second = service(db, [source("a", server)])
    status, result = second.post()
    assert (status, result["status"]) == (200, "ok"), result
    assert db.watermark("a") == at(1, 5) and len(db.buckets()) == 1


# ---- billing core (pure): rating, and the invariants it must keep ------------------------

NODES = ("node-a", "node-b")
TAGS = ("", "xhttp", "tcp")
# Prices and multipliers as an operator writes them; money is decimal, rounded once per ledger row.
PRICE = Decimal("0.5")
PROFILES = {B: dict(included=3000, price=0.25, region=1.5, line=2.0, peak=2.0, offpeak=0.5, version="pricing-v2"),
            C: dict(included=0, price=0.0, region=0.0, line=4.0, peak=0.0, offpeak=0.25, version=" ")}
QUANTUM = Decimal("0.000000001")


@dataclass
class Scenario:
    """Cumulative counters per series, as exporters on NODES would report them."""
    snapshots: list  # (collected_at, node_id, [(account, tag, up, down)]), in time order
    accounts: list

    def series(self):
        return sorted({(node, s[0], s[1]) for _, node, samples in self.snapshots for s in samples})


@st.composite
def scenarios(draw, max_steps=10, start_minute=1):
    nodes = NODES[:draw(st.integers(1, 2))]
    accounts = draw(st.lists(st.sampled_from([A, B, C]), min_size=1, max_size=3, unique=True))
    tags = draw(st.sampled_from([("",), ("xhttp",), ("xhttp", "tcp"), ("", "tcp")]))
    totals = {(n, a, t): [0, 0] for n in nodes for a in accounts for t in tags}
    snapshots = []
    for node in nodes:
        # Sub-minute snapshots, several per minute, and silent minutes.
        offset = draw(st.integers(0, 59))
        for _ in range(draw(st.integers(1, max_steps))):
            offset += draw(st.sampled_from([0.25, 7, 20, 30, 59, 60, 61, 125, 240]))
            samples = []
            for account_id in accounts:
                for tag in tags:
                    action = draw(st.sampled_from(["grow", "grow", "grow", "same", "absent", "reset"]))
                    counter = totals[(node, account_id, tag)]
                    if action == "absent":
                        continue
                    if action == "grow":
                        counter[0] += draw(st.integers(0, 5000))
                        counter[1] += draw(st.integers(0, 5000))
                    elif action == "reset":  # the exporter or xray restarted
                        counter[0] = draw(st.integers(0, max(0, counter[0] - 1)))
                        counter[1] = draw(st.integers(0, 5000))
                    samples.append((account_id, tag, counter[0], counter[1]))
            snapshots.append((at(start_minute, offset), node, samples))
    snapshots.sort(key=lambda s: (s[0], s[1]))
    return Scenario(snapshots, accounts)


def expected_billing(deliveries, known, first_sight="bill") -> dict:
    """I1, stated independently of the service: per series, every positive step between consecutive
    applied samples, plus the first sample's totals when its account had no series on the node before
    that snapshot and the policy is "bill" (else the first sample is a baseline); a sample at or before
    the last applied one changes nothing, and a snapshot no newer than the node's newest one so far
    starts no series."""
    last, billed, on_node, newest = {}, {}, set(), {}
    for stamp, node, samples in deliveries:
        before, late = set(on_node), node in newest and stamp <= newest[node]
        newest[node] = max(stamp, newest.get(node, stamp))
        for account_id, tag, up, down in samples:
            key = (f"{ENV}:{node}", account_id, tag)
            if account_id not in known or (key in last and stamp <= last[key][0]) or (key not in last and late):
                continue
            if key in last:
                d_up, d_down = up - last[key][1], down - last[key][2]
                step = 0 if d_up < 0 or d_down < 0 else d_up + d_down
            else:
                step = up + down if first_sight == "bill" and (node, account_id) not in before else 0
            last[key] = (stamp, up, down)
            billed[key] = billed.get(key, 0) + step
            on_node.add((node, account_id))
    return billed


def pricing_of(account_id) -> billing.Pricing:
    defaults = billing.Pricing(0, PRICE, Decimal(1), "billing-service-v1")
    profile = PROFILES.get(account_id)
    if profile is None:
        return defaults
    return billing.effective_pricing((profile["included"], profile["price"], profile["region"], profile["line"],
                                      profile["peak"], profile["offpeak"], profile["version"]), defaults)


def money(value) -> Decimal:
    """A stored amount or balance (a double, or already a decimal) as the decimal it prints as."""
    return value if isinstance(value, Decimal) else billing.as_decimal(value)


def check_invariants(billed: dict, buckets, ledger, quota, initial_balance=Decimal(0), peak=None,
                     quantum=QUANTUM):
    """I1-I3 over rows: buckets (start, node, account, line, up, down, total),
    ledger (account, rated_bytes, amount, balance_after, bucket_start) in
    application order, quota {account: (remaining, balance)}; ``peak``: PEAK_HOURS.
    Money is exact: every amount is its bytes x price x multipliers rounded once to the
    quantum, and the ledger adds up to the balance to the last digit."""
    per_series, per_account = {}, {}
    for _, node, account_id, line, up, down, total in buckets:
        assert total == up + down >= 0  # I2
        per_series[(node, account_id, line)] = per_series.get((node, account_id, line), 0) + total
    assert {k: v for k, v in per_series.items() if v} == {k: v for k, v in billed.items() if v}  # I1
    for (_, account_id, _), value in billed.items():
        per_account[account_id] = per_account.get(account_id, 0) + value
    for account_id, billed_bytes in per_account.items():
        rows = [row for row in ledger if row[0] == account_id]
        if billed_bytes == 0:
            assert rows == [] and account_id not in quota
            continue
        remaining, balance = quota[account_id]
        included = pricing_of(account_id).included_quota
        assert sum(r[1] for r in rows) + (included - remaining) == billed_bytes  # I3 bytes
        assert remaining == max(0, included - billed_bytes)  # included quota is used first
        assert money(initial_balance) + sum(money(r[2]) for r in rows) == money(balance)  # I3 money, exactly
        running = money(initial_balance)
        for _, _, amount, balance_after, _ in rows:  # I3 chain
            running += money(amount)
            assert money(balance_after) == running
        price = pricing_of(account_id)
        for _, rated, amount, _, minute in rows:
            cost = rated * price.price_per_byte * billing.minute_multiplier(price, minute, peak)
            assert money(amount) == -cost.quantize(quantum), (rated, amount)


class CoreModel:
    """The pure core driven the way the collector drives it, over dict "tables"
    (this tests the core's arithmetic; the database path has its own tests)."""

    def __init__(self, known, peak=None, inherited=(), first_sight="bill"):
        self.known, self.peak, self.inherited = set(known), peak, set(inherited)
        self.source = billing.Source("model", first_sight=first_sight)
        self.checkpoints, self.buckets, self.ledger, self.quota, self.marks = {}, {}, {}, {}, {}
        self.ledger_order = []

    def apply(self, snapshots):
        snaps = [billing.Snapshot(stamp, f"{ENV}:{node}", [billing.Sample(a, t, u, d) for a, t, u, d in samples],
                                  self.source) for stamp, node, samples in sorted(snapshots, key=lambda s: s[0])]
        seen = {(key.partition("#")[0], account) for key, account in self.checkpoints}
        reads = billing.SeriesReads(self.known, dict(self.checkpoints), seen, set(self.inherited), dict(self.marks))
        metered = billing.meter_page(snaps, reads, "")
        accounts = {inc.account for inc in metered.increments}
        pricing = {a: pricing_of(a) for a in accounts}
        quota = {a: self.quota.get(a) or billing.QuotaState(pricing[a].included_quota, Decimal(0)) for a in accounts}
        rated = billing.rate_increments(metered.increments, pricing, quota, self.peak, QUANTUM)
        for bucket in rated.buckets:
            key = (bucket.bucket_start, bucket.node_id, bucket.account, bucket.line_code)
            up, down = self.buckets.get(key, (0, 0))
            self.buckets[key] = (up + bucket.uplink, down + bucket.downlink)
        for entry in rated.ledger:
            assert entry.id not in self.ledger, "a fact applied twice (ledger primary key)"
            self.ledger[entry.id] = entry
            self.ledger_order.append(entry.id)
        self.checkpoints.update(metered.checkpoints)
        for key in metered.dropped:
            del self.checkpoints[key]
        self.inherited -= metered.taken
        self.marks.update(metered.marks)
        self.quota.update(rated.quota)
        return metered

    def state(self):
        return (dict(self.checkpoints), dict(self.buckets), list(self.ledger_order),
                {a: (q.remaining, q.balance) for a, q in self.quota.items()}, dict(self.marks))

    def check(self, billed):
        buckets = [(k[0], k[1], k[2], k[3], up, down, up + down) for k, (up, down) in self.buckets.items()]
        ledger = [(e.account, e.rated_bytes, e.amount, e.balance_after, e.bucket_start)
                  for e in (self.ledger[i] for i in self.ledger_order)]
        check_invariants(billed, buckets, ledger, {a: (q.remaining, q.balance) for a, q in self.quota.items()},
                         peak=self.peak)


def windows_of(snapshots, cuts):
    """Split a time-ordered snapshot list into overlapping windows and pages."""
    out = []
    for start, length, page in cuts:
        window = snapshots[start % max(1, len(snapshots)):][:length]
        out.extend(window[i:i + page] for i in range(0, len(window), page))
    return out


cut_lists = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40), st.integers(1, 7)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(scenario=scenarios(), cuts=cut_lists, replay_cuts=cut_lists, known_all=st.booleans())
def test_core_invariants_under_any_delivery(scenario, cuts, replay_cuts, known_all):
    known = scenario.accounts if known_all else scenario.accounts[1:]
    model = CoreModel(known)
    # Random overlapping windows in any order, then a full in-order sweep in pages.
    deliveries = windows_of(scenario.snapshots, cuts) + windows_of(scenario.snapshots, [(0, 10**6, 3)])
    for page in deliveries:
        model.apply(page)
    billed = expected_billing([s for page in deliveries for s in sorted(page, key=lambda s: s[0])], set(known))
    model.check(billed)
    # I4: any further overlapping or identical delivery changes nothing.
    before = model.state()
    for page in windows_of(scenario.snapshots, replay_cuts + [(0, 10**6, 5)]):
        replayed = model.apply(page)
        assert replayed.increments == [] and replayed.applied == 0
    assert model.state() == before


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios(), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8),
       first_sight=st.sampled_from(["bill", "baseline"]), known_all=st.booleans())
def test_core_bills_the_same_snapshots_the_same_whatever_the_pages(scenario, sizes, first_sight, known_all):
    """I7 in the pure core: the snapshots in one page each, or in pages of any sizes, give the same facts."""
    known = scenario.accounts if known_all else scenario.accounts[1:]
    one, cut = CoreModel(known, first_sight=first_sight), CoreModel(known, first_sight=first_sight)
    for snapshot in scenario.snapshots:
        one.apply([snapshot])
    position = 0
    while position < len(scenario.snapshots):
        size = sizes[position % len(sizes)]
        cut.apply(scenario.snapshots[position:position + size])
        position += size
    assert cut.state() == one.state()
    one.check(expected_billing(scenario.snapshots, set(known), first_sight))


def test_core_sub_minute_samples_accumulate_in_one_bucket_with_distinct_ledger_ids():
    model = CoreModel([A])
    model.apply([(at(1, 5), NODE, [(A, "", 100, 0)]), (at(1, 30), NODE, [(A, "", 150, 20)])])
    model.apply([(at(1, 45), NODE, [(A, "", 160, 20)])])  # same minute, next page
    assert model.buckets == {(at(1), f"{ENV}:{NODE}", A, ""): (160, 20)}
    ids = model.ledger_order
    assert len(ids) == 3 == len(set(ids))
    assert ids == [billing.ledger_id(at(1), f"{ENV}:{NODE}", A, "", "", at(1, second)) for second in (5, 30, 45)]


def test_ledger_ids_are_deterministic_uuids_led_by_their_minute():
    """Version 8 UUIDs whose first 48 bits are the bucket minute in Unix milliseconds: a minute's ledger
    rows sit together in the primary key, and the same increment always gets the same id."""
    first = billing.ledger_id(at(1), f"{ENV}:{NODE}", A, "", "xhttp", at(1, 5))
    assert first == billing.ledger_id(at(1), f"{ENV}:{NODE}", A, "", "xhttp", at(1, 5))
    parsed = uuid.UUID(first)
    assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122) and str(parsed) == first
    assert parsed.int >> 80 == int(at(1).timestamp()) * 1000
    others = {billing.ledger_id(at(1), f"{ENV}:{NODE}", A, region, line, at(1, second))
              for region in ("", "eu") for line in ("", "xhttp") for second in (5, 6)}
    assert len(others) == 8 and first in others
    later = billing.ledger_id(at(2), f"{ENV}:{NODE}", A, "", "xhttp", at(2, 5))
    assert later > first  # ids of later minutes sort after earlier ones, as the index stores them


def test_series_keys_are_unambiguous_and_a_node_with_a_hash_is_refused():
    """Untagged series keep the plain storage-node key (the original
    service's); tagged ones add "#tag". A storage node may not contain "#",
    so node "a#b" untagged and node "a" tagged "b" can never share a key."""
    model = CoreModel([A])
    for minute in range(3):  # the original design ping-ponged one checkpoint between these
        model.apply([(at(minute, 10), NODE, [(A, "xhttp", 1000 * (minute + 1), 0), (A, "tcp", 10 * (minute + 1), 0),
                                             (A, "", 5 * (minute + 1), 0)])])
    assert set(model.checkpoints) == {(f"{ENV}:{NODE}#xhttp", A), (f"{ENV}:{NODE}#tcp", A), (f"{ENV}:{NODE}", A)}
    assert sum(up for up, _ in model.buckets.values()) == 3000 + 30 + 15
    assert billing.series_key("prod:a", "b#c") == "prod:a#b#c"
    for label in ("node_id", "env"):
        page = {"node_id": "a", "env": "prod", "snapshots": [{"collected_at": rfc(at(1)), label: "a#b", "samples": []}]}
        with pytest.raises(billing.ExporterError, match="contains '#'"):
            billing.parse_page(json.dumps(page).encode(), billing.Source("s", base_url="http://x"), at(0), at(2))


def test_core_included_quota_used_never_exceeds_what_is_left_or_goes_negative():
    """A remaining quota below zero (written by something else) charges the
    whole increment at the price, never more; a positive one is used first."""
    increments = [billing.Increment("id-1", at(1), "n", A, "", 100, 0), billing.Increment("id-2", at(2), "n", B, "", 100, 0)]
    pricing = {a: billing.Pricing(0, Decimal("0.5"), Decimal(1), "v") for a in (A, B)}
    rated = billing.rate_increments(increments, pricing, {A: billing.QuotaState(-500, Decimal(0)),
                                                          B: billing.QuotaState(30, Decimal(0))}, None, QUANTUM)
    assert [(e.account, e.rated_bytes, e.amount) for e in rated.ledger] == [(A, 100, -50), (B, 70, -35)]
    assert (rated.quota[A].remaining, rated.quota[B].remaining) == (-500, 0)


def core_page(*snapshots, source=None):
    return [billing.Snapshot(stamp, f"{ENV}:{NODE}", [billing.Sample(*sample) for sample in samples], source)
            for stamp, samples in snapshots]


PLAIN = (f"{ENV}:{NODE}", A)


def original_reads(up=100, down=0, seen_at=at(1, 30), inherited=True, known=(A,)):
    """What the original service left for account A on the node: one plain-key checkpoint."""
    return billing.SeriesReads(set(known), {PLAIN: billing.Checkpoint(up, down, seen_at)}, {PLAIN},
                               {PLAIN} if inherited else set())


def billed_lines(metered) -> list:
    return [(i.line_code, i.uplink, i.bucket_start) for i in metered.increments]


def test_core_takeover_one_series_continues_the_original_checkpoint():
    """The first snapshot after the original's last sample decides, once: one tagged series whose counters
    continue the plain checkpoint is billed exactly its bytes after it; the plain row goes, the series
    keeps its own, and what the original billed (at or before its last sample) is a replay."""
    page = core_page((at(1, 15), [(A, "x", 90, 0)]), (at(1, 45), [(A, "x", 130, 0)]), (at(2, 15), [(A, "x", 150, 0)]))
    metered = billing.meter_page(page, original_reads(), "")
    assert billed_lines(metered) == [("x", 30, at(1)), ("x", 20, at(2))]
    assert metered.replayed == 1 and metered.taken == {PLAIN} and metered.dropped == {PLAIN}
    assert metered.checkpoints == {(f"{ENV}:{NODE}#x", A): billing.Checkpoint(150, 0, at(2, 15))}
    # Split anywhere, the same: a page of replays only decides nothing yet.
    early = billing.meter_page(page[:1], original_reads(), "")
    assert early.increments == [] and early.taken == set() and early.checkpoints == {}
    # The untagged series of the current exporter simply continues its own plain key.
    untagged = core_page((at(1, 45), [(A, "", 130, 0)]))
    metered = billing.meter_page(untagged, original_reads(), "")
    assert billed_lines(metered) == [("", 30, at(1))] and metered.dropped == set() and metered.taken == {PLAIN}


def test_core_takeover_never_bills_what_the_original_may_have_billed():
    """Counters below the plain checkpoint, several series in the first snapshot after it (untagged
    beside tagged too), or a series that appears later: baselines, never a first sight or a reset."""
    below = billing.meter_page(core_page((at(1, 45), [(A, "x", 50, 0)]), (at(2, 5), [(A, "x", 70, 0)])),
                               original_reads(), "")
    assert billed_lines(below) == [("x", 20, at(2))] and below.baselined == 1 and below.resets == 0
    several = billing.meter_page(core_page((at(1, 45), [(A, "x", 500, 0), (A, "y", 7, 0)]),
                                           (at(2, 5), [(A, "x", 510, 0), (A, "y", 9, 0)])), original_reads(), "")
    assert billed_lines(several) == [("x", 10, at(2)), ("y", 2, at(2))] and several.baselined == 2
    assert several.dropped == {PLAIN}
    mixed = billing.meter_page(core_page((at(1, 45), [(A, "", 130, 0), (A, "x", 5, 0)]),
                                         (at(2, 5), [(A, "", 140, 0), (A, "x", 6, 0)])), original_reads(), "")
    assert billed_lines(mixed) == [("", 10, at(2)), ("x", 1, at(2))] and mixed.baselined == 2
    assert mixed.dropped == set() and mixed.checkpoints[PLAIN] == billing.Checkpoint(140, 0, at(2, 5))
    late = core_page((at(1, 45), [(A, "x", 130, 0)]), (at(2, 5), [(A, "x", 140, 0), (A, "tcp", 44000, 0)]),
                     (at(3, 5), [(A, "x", 150, 0), (A, "tcp", 44100, 0)]))
    for pages in ([late], [late[:1], late[1:]], [[snapshot] for snapshot in late]):
        reads, lines = original_reads(), []
        for page in pages:
            metered = billing.meter_page(page, reads, "")
            lines += billed_lines(metered)
            checkpoints = {**reads.checkpoints, **metered.checkpoints}
            for key in metered.dropped:
                del checkpoints[key]
            reads = billing.SeriesReads(reads.known, checkpoints, reads.seen | {PLAIN}, reads.inherited - metered.taken)
        assert lines == [("x", 30, at(1)), ("x", 10, at(2)), ("x", 10, at(3)), ("tcp", 100, at(3))], pages


def test_core_new_series_bill_from_zero_only_for_an_account_new_to_the_node():
    """first_sight "bill": a new account's series bill their whole counters; a new series beside the
    account's others on the node (a new inbound, an exporter switching to untagged samples) is a
    baseline, its counter may hold bytes billed under another key. "baseline": every new series is."""
    page = core_page((at(1, 5), [(A, "x", 500, 5), (A, "y", 40, 0)]), (at(1, 35), [(A, "x", 520, 5), (A, "", 560, 5)]),
                     (at(2, 5), [(A, "", 600, 5), (B, "", 70, 1)]))
    reads = billing.SeriesReads({A, B}, {}, set(), set())
    billed = billing.meter_page(page, reads, "")
    assert billed_lines(billed) == [("x", 500, at(1)), ("y", 40, at(1)), ("x", 20, at(1)), ("", 40, at(2)),
                                    ("", 70, at(2))]
    assert billed.baselined == 1 and reads.seen == set()  # its input is not modified
    baseline = billing.meter_page([billing.Snapshot(s.collected_at, s.storage_node, s.samples,
                                                    billing.Source("s", first_sight="baseline")) for s in page], reads, "")
    assert billed_lines(baseline) == [("x", 20, at(1)), ("", 40, at(2))] and baseline.baselined == 4


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=UTC)


NINE_TO_FIVE = billing.PeakHours(9 * 60, 17 * 60, ZoneInfo("UTC"))


def test_peak_window_holds_its_start_minute_and_not_its_end_minute():
    """Start inclusive, end exclusive, on both edges; 480 peak minutes a day."""
    day = utc(2026, 5, 12)
    edges = [day + timedelta(hours=h, minutes=m) for h, m in ((8, 59), (9, 0), (16, 59), (17, 0))]
    assert [billing.is_peak(minute, NINE_TO_FIVE) for minute in edges] == [False, True, True, False]
    assert sum(billing.is_peak(day + i * MINUTE, NINE_TO_FIVE) for i in range(1440)) == 480


def test_peak_window_is_read_on_the_zones_wall_clock():
    """09:00-17:00 in Asia/Tokyo (UTC+9) is 00:00-08:00 UTC."""
    tokyo = billing.PeakHours(9 * 60, 17 * 60, ZoneInfo("Asia/Tokyo"))
    day = utc(2026, 5, 12)
    edges = [day - MINUTE, day, day + timedelta(hours=7, minutes=59), day + timedelta(hours=8),
             day + timedelta(hours=9)]
    assert [billing.is_peak(minute, tokyo) for minute in edges] == [False, True, True, False, False]


def test_peak_window_that_wraps_midnight_covers_both_sides_of_it():
    wrap = billing.PeakHours(22 * 60, 2 * 60, ZoneInfo("UTC"))
    day = utc(2026, 5, 12)
    minutes = {(h, m): day + timedelta(hours=h, minutes=m)
               for h, m in ((21, 59), (22, 0), (23, 59), (24, 0), (25, 59), (26, 0), (12, 0))}
    assert {hm: billing.is_peak(minute, wrap) for hm, minute in minutes.items()} == {
        (21, 59): False, (22, 0): True, (23, 59): True, (24, 0): True, (25, 59): True, (26, 0): False,
        (12, 0): False}
    assert sum(billing.is_peak(day + i * MINUTE, wrap) for i in range(1440)) == 240


def local_day_peak_minutes(year: int, month: int, day: int, peak: billing.PeakHours) -> tuple[int, list]:
    """(UTC minutes in that local day, the peak ones among them)."""
    start = datetime(year, month, day, tzinfo=peak.zone)
    first, end = start.astimezone(UTC), (start + timedelta(days=1)).astimezone(UTC)
    minutes = [first + i * MINUTE for i in range((end - first) // MINUTE)]
    return len(minutes), [minute for minute in minutes if billing.is_peak(minute, peak)]


@pytest.mark.parametrize("day, length, peak_first, peak_count", [
    ((2026, 3, 28), 1440, utc(2026, 3, 28, 0, 0), 180),  # an ordinary day: 01:00 CET is 00:00 UTC
    ((2026, 3, 29), 1380, utc(2026, 3, 29, 0, 0), 120),  # spring forward at 02:00: 01:00-04:00 lasts 2 h
    ((2026, 10, 25), 1500, utc(2026, 10, 24, 23, 0), 240),  # fall back at 03:00: it lasts 4 h
])
def test_peak_window_follows_daylight_saving_changes(day, length, peak_first, peak_count):
    """Europe/Berlin 01:00-04:00, counted in UTC minutes over the local day."""
    berlin = billing.PeakHours(60, 240, ZoneInfo("Europe/Berlin"))
    minutes, peak = local_day_peak_minutes(*day, berlin)
    assert minutes == length
    assert len(peak) == peak_count
    # One unbroken run of UTC minutes, however long the wall clock made it.
    assert peak == [peak_first + i * MINUTE for i in range(peak_count)]


def test_minute_multiplier_is_profile_times_peak_or_offpeak_and_plain_without_peak_hours():
    price = billing.Pricing(0, Decimal("0.5"), Decimal("3.0"), "v", peak=Decimal(3), offpeak=Decimal("0.5"))
    day = utc(2026, 5, 12)
    assert billing.minute_multiplier(price, day + timedelta(hours=8, minutes=59), NINE_TO_FIVE) == 1.5
    assert billing.minute_multiplier(price, day + timedelta(hours=9), NINE_TO_FIVE) == 9.0
    assert billing.minute_multiplier(price, day + timedelta(hours=9), None) == 3.0


def test_rate_increments_prices_each_increment_by_its_own_minute():
    """Increments on both edges of 09:00-17:00, included quota first: the
    bucket multiplier and the ledger amount follow each bucket's minute."""
    day = utc(2026, 5, 12)
    minutes = [day + timedelta(hours=h, minutes=m) for h, m in ((8, 59), (9, 0), (16, 59), (17, 0))]
    increments = [billing.Increment(str(uuid.uuid4()), minute, f"{ENV}:{NODE}", A, "", 100, 0) for minute in minutes]
    price = billing.Pricing(150, Decimal("0.5"), Decimal(3), "pricing-peak-v3", peak=Decimal(3), offpeak=Decimal("0.5"))
    rated = billing.rate_increments(increments, {A: price}, {A: billing.QuotaState(150, Decimal(0))}, NINE_TO_FIVE,
                                    QUANTUM)
    assert [b.multiplier for b in rated.buckets] == [1.5, 9.0, 9.0, 1.5]
    assert {b.version for b in rated.buckets} == {"pricing-peak-v3"}
    # 100 included, then 50 included + 50 at peak, then 100 at peak, then 100 off peak.
    assert [e.rated_bytes for e in rated.ledger] == [0, 50, 100, 100]
    assert [e.amount for e in rated.ledger] == [0.0, -225.0, -450.0, -75.0]
    assert rated.quota[A].balance == -750.0 and rated.quota[A].remaining == 0

    flat = billing.rate_increments(increments, {A: price}, {A: billing.QuotaState(0, Decimal(0))}, None, QUANTUM)
    assert [b.multiplier for b in flat.buckets] == [3.0] * 4
    assert [e.amount for e in flat.ledger] == [-150.0] * 4


# ---- HTTP routes: probes, status, metrics, job endpoints, push ingest --------------------

def test_ping_reports_image_without_touching_anything(db, exporters, service):
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    server = exporters()
    svc = service(db, [source("a", server)], IMAGE=f"r.example.com/billing-service:sha-{sha}",
                  DATABASE_URL=f"postgresql://billing:x@127.0.0.1:{free_port()}/nowhere")
    status, body = svc.get("/api/ping")
    assert status == 200 and body["commit"] == sha and body["version"] == sha
    assert server.requests == []


def test_job_endpoints_need_the_token(db, exporters, service):
    server, svc = one_source(db, exporters, service, [])
    for job in ("collect-and-rate", "reconcile"):
        assert svc.post(job, token=None) == (401, {"error": "missing or wrong service token"})
        assert svc.post(job, token="wrong-token")[0] == 401
    assert server.requests == []  # nothing ran
    assert svc.post(token=None, headers={"X-Service-Token": TOKEN})[0] == 200
    assert svc.post(token=None, headers={"Authorization": f"bearer {TOKEN}"})[0] == 200


def test_errors_are_json(db, exporters, service):
    _, svc = one_source(db, exporters, service, [])
    response = svc.client.get("/nope")
    assert response.status_code == 404 and response.is_json and response.get_json() == {"error": "not found"}
    response = svc.client.get("/v1/jobs/collect-and-rate")
    assert response.status_code == 405 and response.is_json and "POST" in response.headers["Allow"]
    response = svc.client.post("/healthz")
    assert response.status_code == 405 and response.get_json() == {"error": "method not allowed"}
    for path in ("/api/ping", "/healthz", "/v1/status"):
        assert svc.client.get(path).is_json


def test_job_body_over_64_kib_is_413_json(db, exporters, service):
    _, svc = one_source(db, exporters, service, [])
    for job in ("collect-and-rate", "reconcile"):
        response = svc.client.post(f"/v1/jobs/{job}", data=b" " * (64 * 1024 + 1),
                                   headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 413 and response.is_json
        assert response.get_json() == {"error": "request body is larger than 65536 bytes"}
    status, _ = svc.post("reconcile", body=b" " * (64 * 1024))  # exactly the cap: accepted
    assert status == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(given_token=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=80),
       header=st.sampled_from(["Authorization", "X-Service-Token"]), scheme=st.sampled_from(["Bearer ", "bearer ", ""]))
def test_any_wrong_token_is_a_logged_401_that_never_logs_the_token(app_log, given_token, header, scheme):
    if given_token.strip() == TOKEN:
        return
    svc = Service(base_env(COLLECT_INTERVAL="0"))  # the token check comes before any database or exporter
    value = (scheme if header == "Authorization" else "") + given_token
    before = len(app_log)
    response = svc.client.post("/v1/jobs/collect-and-rate", headers={header: value})
    assert response.status_code == 401 and response.get_json() == {"error": "missing or wrong service token"}
    (logged,) = app_log[before:]
    entry = json.loads(logged)
    # Only these fields, none of them carrying what the client sent as a token.
    assert set(entry) == {"time", "event", "path", "remote_addr", "suppressed"} and entry["event"] == "auth_failed"
    assert entry["path"] == "/v1/jobs/collect-and-rate" and entry["suppressed"] == 0


def _now_minute():
    # Keep clear of a minute boundary between the test's clock and the app's.
    wait_for(lambda: datetime.now(UTC).second < 55, timeout=10, interval=0.2, what="a fresh minute")
    return billing.minute_floor(datetime.now(UTC))


@pytest.mark.parametrize("case, message", [
    ("not json", "body is not valid JSON"),
    ("truncated json", "body is not valid JSON"),
    ("array", "body must be a JSON object"),
    ("string", "body must be a JSON object"),
    ("null", "body must be a JSON object"),
    ("unknown key", "unknown field(s): colour"),
    ("unknown source", "source_id must name an enabled pull source"),
    ("source not a string", "source_id must name an enabled pull source"),
    ("disabled source", "source_id must name an enabled pull source"),
    ("since alone", "since and until go together"),
    ("until alone", "since and until go together"),
    ("since not a time", "since and until must be RFC3339 times"),
    ("until a number", "since and until must be RFC3339 times"),
    ("no time zone", "since and until must be RFC3339 times"),
    ("since equals until", "since must be before until"),
    ("since after until", "since must be before until"),
    ("until in the current minute", "until must be before the current minute"),
    ("until in the future", "until must be before the current minute"),
    ("longer than 7 days", "the range is longer than 7 days"),
])
def test_reconcile_bad_bodies_are_400_with_the_reason(db, exporters, service, case, message):
    server = exporters()
    svc = service(db, [source("a", server), source("off", server, enabled=False)])
    # Only the current-minute case needs to keep clear of a minute boundary.
    now = _now_minute() if case == "until in the current minute" else billing.minute_floor(datetime.now(UTC))
    ok_since, ok_until = rfc(now - 10 * MINUTE), rfc(now - 5 * MINUTE)
    body = {
        "not json": b"since=yesterday",
        "truncated json": b'{"since": "2024-01-01T00:00:00Z"',
        "array": b'["a"]',
        "string": b'"a"',
        "null": b"null",
        "unknown key": {"source_id": "a", "since": ok_since, "until": ok_until, "colour": "red"},
        "unknown source": {"source_id": "nope"},
        "source not a string": {"source_id": ["a"]},
        "disabled source": {"source_id": "off"},
        "since alone": {"since": ok_since},
        "until alone": {"until": ok_until},
        "since not a time": {"since": "yesterday", "until": ok_until},
        "until a number": {"since": ok_since, "until": 1700000000},
        "no time zone": {"since": ok_since, "until": rfc(now - 5 * MINUTE).rstrip("Z")},
        "since equals until": {"since": ok_until, "until": ok_until},
        "since after until": {"since": ok_until, "until": ok_since},
        "until in the current minute": {"since": ok_since, "until": rfc(now + timedelta(seconds=1))},
        "until in the future": {"since": ok_since, "until": rfc(now + timedelta(hours=1))},
        "longer than 7 days": {"since": rfc(now - MINUTE - timedelta(days=7, seconds=1)), "until": rfc(now - MINUTE)},
    }[case]
    response = svc.client.post("/v1/jobs/reconcile", data=body if isinstance(body, bytes) else json.dumps(body),
                               headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.is_json, response.get_data()
    body = response.get_json()
    assert set(body) == {"error"} and body["error"].startswith(message), body
    assert server.requests == []  # nothing ran
    assert db.q("SELECT count(*) FROM billing_job_runs")[0][0] == 0


def test_reconcile_range_limits_are_inclusive_where_they_should_be(db, exporters, service):
    server = exporters()
    svc = service(db, [source("a", server)])
    now = _now_minute()
    # Exactly 7 days, ending at the start of the previous minute (the last whole one): accepted.
    body = {"since": rfc(now - MINUTE - timedelta(days=7)), "until": rfc(now - MINUTE)}
    status, result = svc.post("reconcile", body)
    assert (status, result["status"], result["job"]) == (200, "ok", "reconcile"), result
    assert db.watermark("a") is None  # a range never sets a watermark
    # Offsets are accepted and read as UTC.
    local = (now - 3 * MINUTE).astimezone(timezone(timedelta(hours=9))).isoformat()
    status, result = svc.post("reconcile", {"since": rfc(now - 4 * MINUTE), "until": local})
    assert status == 200, result
    query = server.requests[-1][0]
    assert query["until"] == rfc(now - 3 * MINUTE)


def test_healthz_starting_then_ok_then_database_down_and_back(db, exporters, service, cluster, app_log):
    db.add_users(A)
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 50))])
    assert svc.get("/healthz") == (503, {"status": "starting", "message": "no collection run has finished yet"})
    assert svc.get("/v1/status")[1]["status"] == "starting"
    assert svc.post()[1]["status"] == "ok"
    assert svc.get("/healthz") == (200, {"status": "ok", "message": ""})

    name = urlsplit(db.url).path.lstrip("/")
    admin = cluster.admin()
    try:
        with admin.cursor() as cur:  # the database stops answering: new sessions refused, pooled ones killed
            cur.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        status, body = svc.get("/healthz")
        assert status == 503 and body["status"] == "error", body
        assert body["message"] == "database: unavailable", body  # no host, port or user on an open endpoint
        status, body = svc.get("/v1/status")
        assert status == 503 and body == {"error": "database: unavailable"}
        response = svc.client.get("/metrics")
        samples, _ = parse_metrics(response.get_data(as_text=True))
        assert response.status_code == 200 and metric(samples, "billing_database_up") == 0
        assert metric(samples, LAG, source_id="a") is None  # no stale numbers when the database is away
        status, result = svc.post()
        assert (status, result["status"]) == (503, "error") and result["error"] == "a: database: unavailable"
        # The full libpq error goes to the log only (redacted), where the operator reads the real cause.
        details = " ".join(e["detail"] for e in events(app_log, "database_error"))
        assert "not currently accepting connections" in details and DB_PASSWORD not in "\n".join(app_log)
        for text in (json.dumps(body), json.dumps(result), response.get_data(as_text=True)):
            assert DB_PASSWORD not in text and TOKEN not in text
    finally:
        with admin.cursor() as cur:
            cur.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin.close()
    # Back by itself: broken pooled connections were dropped, not reused.
    assert svc.get("/healthz") == (200, {"status": "ok", "message": ""})
    assert metric(metrics_of(svc), "billing_database_up") == 1


def test_healthz_fails_fast_when_the_database_never_answers(exporters, service):
    # A listener that accepts connections and never says a word (a hung host).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        server = exporters()
        nowhere = SimpleNamespace(url=f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{port}/account")
        svc = Service(service_env(nowhere, [source("a", server)]))
        begun = time.monotonic()
        status, body = svc.get("/healthz")
        elapsed = time.monotonic() - begun
        assert status == 503 and body["status"] == "error" and body["message"] == "database: unavailable", body
        assert DB_PASSWORD not in body["message"]
        assert elapsed < 10, f"/healthz took {elapsed:.1f}s against a silent database"
    finally:
        silent.close()


def post_result_fields(result: dict) -> dict:
    return {key: result[key] for key in ("job", "started_at", "finished_at", "status", "processed_samples",
                                         "written_minutes", "replayed_minutes", "error", "source_statuses")}


def without_lag(status: dict) -> dict:
    """/v1/status minus lag_seconds, the one field computed from "now"."""
    doc = json.loads(json.dumps(status))
    for view in doc["sources"]:
        view.pop("lag_seconds")
    return doc


def test_three_gunicorn_workers_give_one_answer(db, exporters, gunicorns):
    db.add_users(A)
    server = exporters([snap(at(1, 5), (A, "", 100, 50)), snap(at(2, 5), (A, "", 300, 50))])
    db.set_watermark("a", at(-1))
    # %(p)s: the pid of the worker that answered, so the test sees the spread
    # (GUNICORN_CMD_ARGS overrides gunicorn.conf.py's format).
    env = service_env(db, [source("a", server)],
                      GUNICORN_CMD_ARGS="--access-logformat 'pid=%(p)s \"%(m)s %(U)s\" %(s)s'")
    g = gunicorns(env, workers=3)
    booted(g, 3)
    status, run = g.post()
    assert (status, run["status"], run["written_minutes"]) == (200, "ok", 2), run
    assert db.watermark("a") == at(2, 5)

    def fetch(path):
        # A new connection per request (no keep-alive), several in flight:
        # the kernel hands them to whichever worker accepts first.
        with requests.Session() as http:
            http.trust_env = False
            sent = time.time()
            answer = http.get(g.url + path, headers={"Connection": "close"}, timeout=30)
            return path, sent, answer.status_code, answer.headers["Content-Type"], answer.text

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(fetch, ["/v1/status", "/healthz", "/metrics"] * 30))
    assert len(answers) == 90

    health = {(code, text) for path, _, code, _, text in answers if path == "/healthz"}
    assert len(health) == 1 and json.loads(health.pop()[1]) == {"status": "ok", "message": ""}

    statuses = [json.loads(text) for path, _, code, _, text in answers if path == "/v1/status" and code == 200]
    assert len(statuses) == 30
    # Everything agrees but lag_seconds, which is "now - watermark" at the
    # moment of each answer (checked below against the watermark).
    assert all(without_lag(s) == without_lag(statuses[0]) for s in statuses)
    status = statuses[0]
    assert post_result_fields(status) == post_result_fields(run)
    (view,) = status["sources"]
    assert view["last_completed_until"] == rfc(at(2, 5)) and view["last_error"] == ""
    assert view["running"] is False and view["mode"] == "pull"

    metric_answers = [(sent, parse_metrics(text)[0]) for path, sent, code, ctype, text in answers
                      if path == "/metrics" and code == 200 and ctype.startswith("text/plain")]
    assert len(metric_answers) == 30
    lag_key = (LAG, ("source_id", "a"))
    reference = {k: v for k, v in metric_answers[0][1].items() if k != lag_key}
    assert metric(reference, "billing_database_up") == 1
    assert metric(reference, "billing_job_runs_total", job="collect-and-rate", status="ok") == 1
    for sent, samples in metric_answers:
        assert {k: v for k, v in samples.items() if k != lag_key} == reference
        # The lag names the same watermark on every worker (clock skew and
        # request latency allowance: 3 s).
        assert abs((sent - samples[lag_key]) - at(2, 5).timestamp()) < 3
    for _, sent, _, _, text in answers:
        if text.startswith("{") and "lag_seconds" in text:
            lag = json.loads(text)["sources"][0]["lag_seconds"]
            assert abs((sent - lag) - at(2, 5).timestamp()) < 3

    # The answers came from more than one worker, none from the arbiter.
    def access_lines():
        lines = [line for line in g.output().splitlines()
                 if re.search(r'"GET /(v1/status|healthz|metrics)" 200', line)]
        return lines if len(lines) >= 90 else None

    access = wait_for(access_lines, timeout=10, what="90 access log lines")
    pids = {int(re.match(r"pid=<(\d+)>", line).group(1)) for line in access}
    assert len(access) == 90 and len(pids) >= 2 and g.proc.pid not in pids, pids

    stop_cleanly(g)
    assert "Traceback" not in g.output()


def test_metrics_parse_and_follow_a_failing_source(db, exporters, service):
    db.add_users(A)
    good = exporters([snap(at(1, 5), (A, "", 100, 50))])
    bad = exporters([snap(at(1, 10), (A, "", 100, 50))], node_id="node-b")
    db.set_watermark("good", at(-1))
    db.set_watermark("bad", at(-1))
    svc = service(db, [source("good", good), source("bad", bad), source("off", bad, enabled=False)])

    def scrape():
        response = svc.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(response.get_data(as_text=True))

    samples, types = scrape()  # before any run: watermarks only
    assert metric(samples, "billing_database_up") == 1
    assert metric(samples, "billing_source_last_attempt_timestamp_seconds", source_id="good") is None
    assert metric(samples, LAG, source_id="off") is None

    begun = time.time()
    assert svc.post()[1]["status"] == "ok"
    samples, types = scrape()
    scraped = time.time()
    assert types == {
        "billing_database_up": "gauge", "billing_source_enabled": "gauge", LAG: "gauge",
        "billing_source_last_success_timestamp_seconds": "gauge",
        "billing_source_last_attempt_timestamp_seconds": "gauge", "billing_source_last_attempt_failed": "gauge",
        "billing_source_catchup_running": "gauge", "billing_job_runs": "counter",
        "billing_source_catchup_remaining_seconds": "gauge", "billing_source_catchup_eta_seconds": "gauge",
        **{f"billing_{name}": "counter" for name in billing.RUN_COUNTS + ("suspended", "lifted")},
        "billing_invalid_samples_by_reason": "counter",
        **{f"billing_push_{outcome}": "counter" for outcome in ("received", "applied", "rejected")},
        "billing_accounts_in_arrears": "gauge", "billing_accounts_suspended": "gauge"}
    for sid in ("good", "bad"):
        assert metric(samples, "billing_source_enabled", source_id=sid) == 1
        assert metric(samples, "billing_source_last_attempt_failed", source_id=sid) == 0
        assert metric(samples, "billing_source_catchup_running", source_id=sid) == 0
        for name in ("billing_source_last_success_timestamp_seconds",
                     "billing_source_last_attempt_timestamp_seconds"):
            assert begun - 1 <= metric(samples, name, source_id=sid) <= scraped + 1
    assert metric(samples, "billing_source_enabled", source_id="off") == 0
    assert abs(metric(samples, LAG, source_id="good") - (scraped - at(1, 5).timestamp())) < 3
    assert abs(metric(samples, LAG, source_id="bad") - (scraped - at(1, 10).timestamp())) < 3
    assert metric(samples, "billing_job_runs_total", job="collect-and-rate", status="ok") == 1
    assert metric(samples, "billing_job_runs_total", job="collect-and-rate", status="partial") is None
    assert metric(samples, "billing_processed_samples_total", job="collect-and-rate") == 2
    assert metric(samples, "billing_written_minutes_total", job="collect-and-rate") == 2
    assert metric(samples, "billing_replayed_minutes_total", job="collect-and-rate") == 0
    assert metric(samples, "billing_accounts_in_arrears") == 1 and metric(samples, "billing_accounts_suspended") == 0
    first_success = metric(samples, "billing_source_last_success_timestamp_seconds", source_id="bad")

    # The bad source starts failing: its flag flips, partial runs are counted,
    # its last success stays put while its last attempt moves on.
    bad.fault = lambda query: (500, b'{"error":"boom"}')
    good.add(snap(at(2, 5), (A, "", 200, 50)))
    db.set_watermark("good", at(-1))  # and replay the old window on the good one
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial")
    samples, _ = scrape()
    assert metric(samples, "billing_source_last_attempt_failed", source_id="bad") == 1
    assert metric(samples, "billing_source_last_attempt_failed", source_id="good") == 0
    assert metric(samples, "billing_job_runs_total", job="collect-and-rate", status="partial") == 1
    assert metric(samples, "billing_job_runs_total", job="collect-and-rate", status="ok") == 1
    assert metric(samples, "billing_source_last_success_timestamp_seconds", source_id="bad") == first_success
    assert metric(samples, "billing_source_last_attempt_timestamp_seconds", source_id="bad") > first_success
    assert metric(samples, "billing_processed_samples_total", job="collect-and-rate") == 2 + 2
    assert metric(samples, "billing_written_minutes_total", job="collect-and-rate") == 2 + 1
    assert metric(samples, "billing_replayed_minutes_total", job="collect-and-rate") == 1

    status, result = svc.post()  # failing again: the counter keeps counting
    samples, _ = scrape()
    assert metric(samples, "billing_job_runs_total", job="collect-and-rate", status="partial") == 2
    bad.fault = None  # and recovers
    assert svc.post()[1]["status"] == "ok"
    samples, _ = scrape()
    assert metric(samples, "billing_source_last_attempt_failed", source_id="bad") == 0
    assert metric(samples, "billing_job_runs_total", job="collect-and-rate", status="ok") == 2


def test_logs_one_json_line_per_run_and_failure_and_no_secret(db, exporters):
    db.add_users(A)
    good = exporters([snap(at(1, 5), (A, "", 100, 50))])
    bad = exporters([snap(at(1, 5), (A, "", 100, 50))], node_id="node-b", tokens=(SOURCE_TOKEN,))
    bad.fault = lambda query: (500, f'{{"error":"boom {SOURCE_TOKEN}"}}'.encode())
    db.set_watermark("good", at(-1))
    db.set_watermark("bad", at(-1))
    env = service_env(db, [source("good", good), source("bad", bad, token_env="BAD_EXPORTER_TOKEN")],
                      BAD_EXPORTER_TOKEN=SOURCE_TOKEN)
    g = Gunicorn(env, workers=1, split_streams=True)
    try:
        g.start()
        status, result = g.post()
        assert (status, result["status"]) == (200, "partial")
        assert bad.requests and bad.requests[0][1] == f"Bearer {SOURCE_TOKEN}"  # the token really was in play
        assert g.post(token="not-the-token")[0] == 401
        assert g.get(f"/healthz?token={TOKEN}&password={DB_PASSWORD}").status_code == 200
        wait_for(lambda: '"GET /healthz HTTP/1.1" 200' in g.stdout(), timeout=10, what="the access log line")
        stop_cleanly(g)
        stdout, stderr = g.stdout(), g.stderr()
    finally:
        g.stop()
        g.remove_logs()
    events = our_log_lines(stderr)  # every line of ours is JSON
    runs = [e for e in events if e["event"] == "run"]
    assert len(runs) == 1, runs
    (run,) = runs
    assert (run["job"], run["status"]) == ("collect-and-rate", "partial")
    assert (run["processed_samples"], run["written_minutes"], run["replayed_minutes"]) == (1, 1, 0)
    assert (run["invalid_samples"], run["unknown_account_samples"], run["counter_resets"]) == (0, 0, 0)
    assert (run["already_billed"], run["suspended"], run["lifted"]) == (0, 0, 0)
    assert run["error"] == "bad: exporter_unreachable: exporter answered HTTP 500"
    assert isinstance(run["duration_seconds"], float) and 0 <= run["duration_seconds"] < 30
    assert run["sources"] == [
        {"source_id": "good", "state": "ok", "error": "", "pages": 1},
        {"source_id": "bad", "state": "failed", "error": "exporter_unreachable: exporter answered HTTP 500", "pages": 0}]
    failures = [e for e in events if e["event"] == "source_failed"]
    assert [(f["source_id"], f["error"]) for f in failures] == [("bad", "exporter_unreachable: exporter answered HTTP 500")]
    assert [e["event"] for e in events if e["event"] == "auth_failed"] == ["auth_failed"]
    # gunicorn's access log stays on (stdout, nothing else there), without query strings.
    assert all(ACCESS_LOG_LINE.fullmatch(line) for line in stdout.splitlines()), stdout
    assert re.search(r'"POST /v1/jobs/collect-and-rate HTTP/1.1" 200 ', stdout)
    assert re.search(r'"GET /healthz HTTP/1.1" 200 ', stdout)
    for secret in (TOKEN, SOURCE_TOKEN, DB_PASSWORD):
        assert secret not in stdout and secret not in stderr
    assert "Traceback" not in stderr


def test_status_shows_a_catchup_moving(db, exporters, service):
    """From another worker, a long catch-up visibly moves: the watermark and
    lag follow every committed page, and the source shows as running (its
    lock, seen in pg_locks) until the run ends."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service,
                             [snap(at(m, 5), (A, "", 100 * m, 0)) for m in range(1, 7)])
    server.page_cap = 1  # six pages
    reached = {3: threading.Event(), 5: threading.Event()}
    release = {3: threading.Event(), 5: threading.Event()}
    seen = {"count": 0}
    lock = threading.Lock()

    def hold(query):
        with lock:
            seen["count"] += 1
            number = seen["count"]
        if number in reached:  # the 3rd and 5th page request wait for the test
            reached[number].set()
            release[number].wait(20)
        return server._cap(query)

    server.fault = hold
    outcome = {}
    # The run goes through a second app instance (another "worker"); this one only watches.
    runner = Service(service_env(db, [source("a", server)]))
    worker = threading.Thread(target=lambda: outcome.update(result=runner.post()))
    worker.start()
    try:
        for number, pages in ((3, 2), (5, 4)):
            assert reached[number].wait(20)
            # The page fetched ahead waits; the ones before it are committed.
            view = wait_for(lambda: (lambda v: v if v["last_completed_until"] == rfc(at(pages, 5)) else None)(
                svc.get("/v1/status")[1]["sources"][0]), timeout=10, what=f"{pages} pages in /v1/status")
            assert view["running"] is True
            assert abs(view["lag_seconds"] - (time.time() - at(pages, 5).timestamp())) < 3
            samples = metrics_of(svc)
            assert metric(samples, "billing_source_catchup_running", source_id="a") == 1
            assert svc.get("/v1/status")[1]["status"] == "starting"  # no run has finished yet
            release[number].set()
    finally:
        for event in release.values():
            event.set()
        worker.join(30)
    status, result = outcome["result"]
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", 6)
    status, body = svc.get("/v1/status")
    assert body["status"] == "ok" and body["finished_at"] == result["finished_at"]
    assert body["sources"][0]["running"] is False and body["sources"][0]["last_completed_until"] == rfc(at(6, 5))


def test_one_pushed_snapshot_is_billed_like_a_pulled_sample(db, service):
    """One snapshot object per POST bills exactly what the same sample pulled
    bills, and the push source's watermark is the snapshot's collected_at."""
    db.add_users(A)
    svc = service(db, [push_source("p")])
    status, result = push(svc, push_body(snap(at(1, 5), (A, "xhttp", 100, 50))))
    assert status == 200 and result["job"] == "push" and result["status"] == "ok", result
    assert (result["processed_samples"], result["written_minutes"], result["replayed_minutes"]) == (1, 1, 0)
    assert [(s["source_id"], s["state"], s["last_completed_until"]) for s in result["source_statuses"]] == \
        [("p", "ok", rfc(at(1, 5)))]
    # The very rows test_one_sample_without_profile_charges_price_and_throttles expects of a pull.
    assert db.buckets() == [(at(1), f"{ENV}:{NODE}", A, "", "xhttp", 100, 50, 150, 1.0, "rated",
                             "billing-service-v1")]
    (entry,) = db.ledger()
    expected_id = billing.ledger_id(at(1), f"{ENV}:{NODE}", A, "", "xhttp", at(1, 5))
    assert entry == (expected_id, A, at(1), at(2), "traffic_charge", 150, -75.0, "billing-service-v1", -75.0)
    assert db.quota() == [(A, 0, -75.0, True, "throttled", "active", at(1))]
    assert db.checkpoints() == [(f"{ENV}:{NODE}#xhttp", A, 100, 50, at(1, 5), 0)]
    sync = "SELECT last_completed_until, last_succeeded_at IS NOT NULL, last_error FROM billing_source_sync_state " \
           "WHERE source_id = 'p'"
    assert db.one(sync) == (at(1, 5), True, "")

    # The next snapshot bills the delta from the pushed checkpoint.
    status, result = push(svc, push_body(snap(at(2, 5), (A, "xhttp", 130, 90))))
    assert status == 200 and result["status"] == "ok" and result["written_minutes"] == 1, result
    assert [b[5:8] for b in db.buckets()] == [(100, 50, 150), (30, 40, 70)]
    assert db.quota()[0][2] == -110.0
    assert db.one(sync) == (at(2, 5), True, "")


def test_a_json_array_and_an_ndjson_body_are_both_accepted_and_billed(db, service):
    """Several snapshots per body, as a JSON array (applied in collected_at
    order, whatever the array's order) or as NDJSON lines."""
    db.add_users(A, B)
    svc = service(db, [push_source("p")])
    array = push_body([snap(at(2, 5), (A, "xhttp", 300, 0)), snap(at(1, 5), (A, "xhttp", 100, 0), (B, "", 10, 0))])
    status, result = push(svc, array)
    assert status == 200 and result["status"] == "ok", result
    assert (result["processed_samples"], result["written_minutes"]) == (3, 3)
    assert db.watermark("p") == at(2, 5)

    lines = push_body([snap(at(3, 5), (A, "xhttp", 350, 0)), snap(at(4, 5), (A, "xhttp", 400, 0), (B, "", 30, 0))],
                      ndjson=True)
    assert lines.count(b"\n") == 2
    status, result = push(svc, lines, content_type=NDJSON)
    assert status == 200 and result["status"] == "ok", result
    assert (result["processed_samples"], result["written_minutes"]) == (3, 3)
    node = f"{ENV}:{NODE}"
    assert sorted((b[0], b[1], b[2], b[4], b[7]) for b in db.buckets()) == sorted([
        (at(1), node, A, "xhttp", 100), (at(1), node, B, "", 10), (at(2), node, A, "xhttp", 200),
        (at(3), node, A, "xhttp", 50), (at(4), node, A, "xhttp", 50), (at(4), node, B, "", 20)])
    assert {r[0]: r[2] for r in db.quota()} == {A: -200.0, B: -15.0}
    assert db.watermark("p") == at(4, 5)


def test_a_duplicate_push_and_an_older_push_write_nothing(db, service):
    """The same body twice, and an older snapshot after a newer one: 200,
    nothing written (no row rewritten either), the watermark stays."""
    db.add_users(A)
    svc = service(db, [push_source("p")])
    newer = push_body(snap(at(2, 5), (A, "xhttp", 300, 30)))
    assert push(svc, newer)[0] == 200
    before = row_versions(db)
    again = push(svc, newer)
    older = push(svc, push_body(snap(at(1, 5), (A, "xhttp", 100, 10))))
    for status, result in (again, older):
        assert status == 200 and result["status"] == "ok", result
        assert (result["processed_samples"], result["written_minutes"], result["replayed_minutes"]) == (1, 0, 1)
    assert row_versions(db) == before
    assert len(db.ledger()) == 1 and db.quota()[0][2] == -165.0
    assert db.watermark("p") == at(2, 5)


def test_wrong_token_other_node_and_malformed_bodies_are_refused_and_write_nothing(db, service):
    """401 for a token no push source has, 403 for a snapshot of another
    node or env, 400 for a malformed body: each answers a JSON error and
    writes no fact and no progress."""
    db.add_users(A)
    svc = service(db, [push_source("p")])
    good = snap(at(1, 5), (A, "xhttp", 100, 50))
    no_node = json.dumps({"env": ENV, **good}).encode()
    cases = [
        ("wrong token", push_body(good), "application/json", "not-the-push-token-0123", 401, "token"),
        ("no token", push_body(good), "application/json", None, 401, "token"),
        ("another node", push_body(good, node="node-b"), "application/json", TOKEN, 403, "node-b"),
        ("another env", push_body(good, env="staging"), "application/json", TOKEN, 403, "staging"),
        ("not JSON", b'{"collected_at": "', "application/json", TOKEN, 400, "not JSON"),
        ("bad collected_at", push_body({**good, "collected_at": "2024-02-30T00:00:00Z"}), "application/json",
         TOKEN, 400, "collected_at"),
        ("missing node_id", no_node, "application/json", TOKEN, 400, "node_id"),
        ("NDJSON line not an object", push_body([good], ndjson=True) + b"[1, 2]\n", NDJSON, TOKEN, 400,
         "not an object"),
        ("# in node_id", push_body(good, node=f"{NODE}#xhttp"), "application/json", TOKEN, 400, "'#'"),
    ]
    for what, body, content_type, token, code, reason in cases:
        status, answer = push(svc, body, token=token, content_type=content_type)
        assert status == code and reason in answer["error"], (what, status, answer)
        assert nothing_written(db), what
        assert db.watermark("p") is None, what
    # The same snapshot, well formed and from the right node, is billed.
    assert push(svc, push_body(good))[0] == 200
    assert len(db.buckets()) == 1 and db.watermark("p") == at(1, 5)


def test_a_batch_with_one_bad_snapshot_writes_nothing_but_a_bad_sample_is_only_skipped(db, service):
    """A page-level fault in one snapshot of three refuses the whole array;
    an invalid sample in a valid snapshot is skipped and counted, the rest billed."""
    db.add_users(A, B)
    svc = service(db, [push_source("p")])
    batch = [snap(at(m, 5), (A, "xhttp", 100 * m, 0)) for m in (1, 2, 3)]
    bad_time = json.loads(push_body(batch))
    bad_time[1]["collected_at"] = "yesterday"
    other_node = json.loads(push_body(batch))
    other_node[2]["node_id"] = "node-b"
    for body, code in ((bad_time, 400), (other_node, 403)):
        status, answer = push(svc, json.dumps(body).encode())
        assert status == code and answer["error"], answer
        assert nothing_written(db) and db.watermark("p") is None

    batch[1]["samples"].append({"uuid": B, "inbound_tag": "", "uplink_bytes_total": -5, "downlink_bytes_total": 0})
    status, result = push(svc, push_body(batch))
    assert status == 200 and result["status"] == "partial", result
    assert (result["invalid_samples"], result["processed_samples"], result["written_minutes"]) == (1, 3, 3)
    assert "p: invalid_samples: 1 skipped" in result["error"]
    assert [(b[0], b[2], b[7]) for b in db.buckets()] == [(at(1), A, 100), (at(2), A, 100), (at(3), A, 100)]
    assert [r[0] for r in db.quota()] == [A] and db.watermark("p") == at(3, 5)


def test_a_body_over_max_body_bytes_is_413_with_a_json_error_and_writes_nothing(db, service):
    """MAX_BODY_BYTES bounds a pushed body; the same body under the default cap is billed."""
    db.add_users(A)
    svc = service(db, [push_source("p")], MAX_BODY_BYTES=65536)
    body = padded_body(70000, snap(at(1, 5), (A, "xhttp", 100, 50)))
    status, answer = push(svc, body)
    assert (status, answer) == (413, {"error": "request body is larger than 65536 bytes"})
    assert nothing_written(db) and db.watermark("p") is None
    roomy = service(db, [push_source("p")])
    assert push(roomy, body)[0] == 200 and len(db.buckets()) == 1


def test_a_chunked_body_is_held_to_max_body_bytes_like_one_with_a_content_length(db, gunicorns):
    """Under gunicorn a pusher may stream its body (chunked, no
    Content-Length): over the cap it is 413 and writes nothing; exactly at the
    cap it is accepted, as the same body with a Content-Length is."""
    db.add_users(A)
    g = gunicorns(service_env(db, [push_source("p")], MAX_BODY_BYTES=65536), workers=1)

    def post_chunked(body):
        chunks = (body[i:i + 4096] for i in range(0, len(body), 4096))
        return requests.post(g.url + PUSH_PATH, data=chunks, timeout=30, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})

    response = post_chunked(padded_body(70000, snap(at(1, 5), (A, "xhttp", 100, 50))))
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 413 and response.json() == {"error": "request body is larger than 65536 bytes"}
    assert nothing_written(db) and db.watermark("p") is None
    at_cap = padded_body(65536, snap(at(1, 5), (A, "xhttp", 100, 50)))
    response = post_chunked(at_cap)
    assert response.status_code == 200 and response.json()["status"] == "ok", response.text
    assert len(db.buckets()) == 1 and db.watermark("p") == at(1, 5)


def test_each_push_token_may_push_only_its_own_sources_node(db, service):
    """token_env gives a push source its own token, good for its node only;
    a push source without one takes INTERNAL_SERVICE_TOKEN."""
    db.add_users(A)
    svc = service(db, [push_source("pa", node="node-a", token_env="PUSH_TOKEN_A"),
                       push_source("pb", node="node-b", token_env="PUSH_TOKEN_B"),
                       push_source("pc", node="node-c")], PUSH_TOKEN_A=TOKEN_A, PUSH_TOKEN_B=TOKEN_B)

    def one(node):
        return push_body(snap(at(1, 5), (A, "xhttp", 100, 0)), node=node)

    for token, node in ((TOKEN_A, "node-b"), (TOKEN_A, "node-c"), (TOKEN_B, "node-a"), (TOKEN, "node-a")):
        status, answer = push(svc, one(node), token=token)
        assert status == 403 and f"'{node}'" in answer["error"], (token, node, answer)
    assert nothing_written(db)
    for token, node in ((TOKEN_A, "node-a"), (TOKEN_B, "node-b"), (TOKEN, "node-c")):
        status, result = push(svc, one(node), token=token)
        assert status == 200 and result["status"] == "ok", (token, node, result)
    assert sorted(b[1] for b in db.buckets()) == [f"{ENV}:node-a", f"{ENV}:node-b", f"{ENV}:node-c"]
    assert [db.watermark(s) for s in ("pa", "pb", "pc")] == [at(1, 5)] * 3


def test_status_metrics_and_log_follow_good_and_rejected_pushes(db, service, app_log):
    """/v1/status and /metrics show the push source, its lag and its push
    counts (rejections are counted in memory and written with the next run);
    a rejected push logs a push_rejected line with the reason, at most one per
    source and status every few seconds, never the body or a token."""
    db.add_users(A)
    svc = service(db, [push_source("p")])
    marker = "body-Marker-5c1e9d"  # only ever in rejected bodies
    wrong = "wrong-Push-Token-77aa11"
    answers = [
        push(svc, push_body(snap(at(1, 5), (A, "xhttp", 100, 0)))),
        push(svc, push_body(snap(at(1, 30), (A, marker, 5, 0))), token=wrong),
        push(svc, push_body(snap(at(1, 40), (A, marker, 5, 0)), node="node-b")),
        push(svc, f'{{"collected_at": "{marker}'.encode()),
        push(svc, push_body(snap(at(2, 5), (A, "xhttp", 300, 0)))),
    ]
    last_push = datetime.now(UTC)
    answers.append(push(svc, push_body({**snap(at(3, 5), (A, marker, 5, 0)), "collected_at": marker})))
    assert [status for status, _ in answers] == [200, 401, 403, 400, 200, 400], answers

    text = "\n".join(app_log)
    rejected = events(app_log, "push_rejected")
    assert len(rejected) == 3 and all(json.loads(line) for line in app_log)  # every line is JSON
    assert [(e["source_id"], e["status"], e["suppressed"]) for e in rejected] == [("", 401, 0), ("p", 403, 0),
                                                                                ("p", 400, 0)]
    assert "token" in rejected[0]["reason"] and "node-b" in rejected[1]["reason"]
    assert "not JSON" in rejected[2]["reason"]
    for secret in (marker, TOKEN, wrong, "user@example.com"):
        assert secret not in text, secret

    assert svc.post()[1]["status"] == "ok"  # the run's record writes the counts held in memory
    status, body = svc.get("/v1/status")
    assert status == 200
    (view,) = [v for v in body["sources"] if v["source_id"] == "p"]
    assert view["mode"] == "push" and view["last_completed_until"] == rfc(at(2, 5))
    assert billing.parse_time(view["last_push_at"]) >= last_push
    assert abs(view["lag_seconds"] - (time.time() - at(2, 5).timestamp())) < 5

    samples = metrics_of(svc)
    assert abs(metric(samples, LAG, source_id="p") - (time.time() - at(2, 5).timestamp())) < 5
    counts = {(name, sid): metric(samples, f"billing_push_{name}_total", source_id=sid)
              for name in ("received", "applied", "rejected") for sid in ("p", "")}
    assert counts == {("received", "p"): 5, ("applied", "p"): 2, ("rejected", "p"): 3,
                      ("received", ""): 1, ("applied", ""): None, ("rejected", ""): 1}


def test_the_collector_never_touches_push_sources_and_reconcile_refuses_them(db, exporters, service):
    """collect-and-rate pulls the pull sources only; the push source's row is
    left as the last push wrote it; reconcile naming a push source is 400."""
    db.add_users(A)
    server = exporters([snap(at(1, 5), (A, "", 100, 0))])
    db.set_watermark("a", at(-1))
    svc = service(db, [source("a", server), push_source("p", node="node-b")])
    assert push(svc, push_body(snap(at(1, 5), (A, "", 10, 0)), node="node-b"))[0] == 200

    def push_row():
        return db.one("SELECT xmin::text, * FROM billing_source_sync_state WHERE source_id = 'p'")

    before = push_row()
    status, result = svc.post()
    assert status == 200 and result["status"] == "ok", result
    assert [s["source_id"] for s in result["source_statuses"]] == ["a"]
    assert server.requests  # the run did pull: the push row is unchanged although a run happened
    assert push_row() == before
    status, answer = svc.post("reconcile", {"source_id": "p"})
    assert status == 400 and "push source" in answer["error"], answer
    assert push_row() == before
    assert sorted(b[1] for b in db.buckets()) == [f"{ENV}:node-a", f"{ENV}:node-b"]


def test_collect_and_rate_with_a_body_is_400_and_runs_nothing(db, exporters, service):
    """A body meant for reconcile sent to collect-and-rate is refused, not ignored."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0))])
    status, body = svc.post(body={"source_id": "a", "since": rfc(at(0)), "until": rfc(at(2))})
    assert status == 400 and "takes no body" in body["error"], body
    assert set(body) == {"error"}
    assert server.requests == [] and db.buckets() == []
    assert db.q("SELECT count(*) FROM billing_job_runs") == [(0,)]
    assert db.q("SELECT count(*) FROM billing_job_totals") == [(0,)]


# Push across an untrusted network: floods, the NDJSON budget, PUSH_MAX_AGE,
# what the open endpoints show, compressed bodies.

class QuietDatabase:
    """The service's database with no session of ours in it and autovacuum
    paused (its workers' transactions count in pg_stat_database too), its
    transaction counters read from the cluster's maintenance database, so
    the reading session never counts itself."""

    def __init__(self, cluster, db: Db):
        self.cluster, self.db, self.name = cluster, db, db.url.rsplit("/", 1)[1]

    def __enter__(self) -> "QuietDatabase":
        self.admin = self.cluster.admin()
        try:
            self._run("ALTER SYSTEM SET autovacuum = off")
            self._run("SELECT pg_reload_conf()")
            self.db.conn.close()  # a closed session flushes its statistics as it exits
            wait_for(lambda: self.sessions() == 0, what="no session (nor autovacuum worker) in the service's database")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._run("ALTER SYSTEM RESET autovacuum")
        self._run("SELECT pg_reload_conf()")
        self.admin.close()
        self.db.conn = psycopg2.connect(self.db.url)
        self.db.conn.autocommit = True

    def _run(self, sql, params=None):
        with self.admin.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None

    def sessions(self) -> int:
        return self._run("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.name,))[0][0]

    def transactions(self) -> tuple[int, int]:
        """(xact_commit, xact_rollback) as the statistics hold them now (no cached snapshot)."""
        self._run("SELECT pg_stat_clear_snapshot()")
        return tuple(self._run("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s",
                               (self.name,))[0])


def rejection_lines(server) -> list:
    return [e for e in our_log_lines(server.output()) if e["event"] == "push_rejected"]


def test_a_flood_of_wrong_token_pushes_costs_postgresql_nothing_and_logs_a_few_lines(cluster, db, gunicorns):
    """Real gunicorn, one worker, no collector thread: 1000 pushes with a
    token no push source has are each a 401 and log one push_rejected line;
    the limiter's next line, for a rejection 10 s later, counts every one it
    left out. Meanwhile the service's database has no session and its
    pg_stat_database transaction counters do not move (read after the
    statistics' 10 s flush delay). The next run writes the count:
    billing_push_rejected_total{source_id=""} is every rejection."""
    n = 1000
    g = gunicorns(service_env(db, [push_source("p")]), workers=1)
    body = push_body(snap(at(1, 5), (A, "xhttp", 100, 0)))
    client, sent = requests.Session(), 0

    def push_wrong():
        nonlocal sent
        response = client.post(g.url + PUSH_PATH, data=body, timeout=10, headers={
            "Authorization": "Bearer wrong-Push-Token-0c4e8a", "Content-Type": "application/json"})
        sent += 1
        return response.status_code, response.json()["error"]

    with QuietDatabase(cluster, db) as quiet:
        before = quiet.transactions()
        began = time.monotonic()
        answers = collections.Counter(push_wrong() for _ in range(n))
        flood_seconds = time.monotonic() - began
        assert answers == {(401, "missing or wrong push token"): n}
        lines = rejection_lines(g)
        assert 1 <= len(lines) <= 2 + flood_seconds // 10 and lines[0]["suppressed"] == 0, lines
        assert (quiet.sessions(), quiet.transactions()) == (0, before)

        # The limiter's next line: a rejection at least 10 s after the last line, saying how many it left out.
        seen = len(lines)
        wait_for(lambda: push_wrong()[0] == 401 and len(rejection_lines(g)) > seen, timeout=40, interval=0.25,
                 what="the next push_rejected line")
        lines = rejection_lines(g)
        assert all((e["source_id"], e["status"]) == ("", 401) for e in lines)
        assert len(lines) >= 2 and lines[-1]["suppressed"] > 0, lines
        assert sum(1 + e["suppressed"] for e in lines) == sent  # each rejection logged or counted as left out
        assert len(lines) <= 3 + (time.monotonic() - began) // 10 and sent < n + 100
        assert (quiet.sessions(), quiet.transactions()) == (0, before)  # the worker never even connected

        status, result = g.post()  # a run records what was counted in memory
        assert (status, result["status"]) == (200, "ok"), result
        wait_for(lambda: quiet.transactions()[0] > before[0], timeout=30,
                 what="the run's transactions in pg_stat_database (the measurement sees the service)")
    samples = parse_metrics(g.get("/metrics").text)[0]
    assert metric(samples, "billing_push_rejected_total", source_id="") == sent
    assert metric(samples, "billing_push_received_total", source_id="") == sent
    assert db.q("SELECT source_id, outcome, pushes FROM billing_push_totals") == [("", "rejected", sent)]
    assert db.q("SELECT count(*) FROM billing_source_sync_state") == [(0,)]  # no source's row was touched


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@bench
def test_bench_a_flood_of_wrong_token_pushes(cluster, db, gunicorns):
    """10,000 pushes with a wrong token from four clients against one
    worker: the database's transaction counters, and the worker's CPU time."""
    n, clients = 10000, 4
    g = gunicorns(service_env(db, [push_source("p")]), workers=1)
    worker, = worker_pids(g.proc.pid)
    body = push_body(snap(at(1, 5), (A, "xhttp", 100, 0)))

    def flood(count):
        session, statuses = requests.Session(), collections.Counter()
        for _ in range(count):
            statuses[session.post(g.url + PUSH_PATH, data=body, timeout=10, headers={
                "Authorization": "Bearer wrong-Push-Token-0c4e8a",
                "Content-Type": "application/json"}).status_code] += 1
        return statuses

    with QuietDatabase(cluster, db) as quiet:
        before, cpu, began = quiet.transactions(), process_cpu_seconds(worker), time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            statuses = sum(pool.map(flood, [n // clients] * clients), collections.Counter())
        elapsed, cpu = time.monotonic() - began, process_cpu_seconds(worker) - cpu
        after, sessions = quiet.transactions(), quiet.sessions()
    delta = (after[0] - before[0], after[1] - before[1])
    lines = rejection_lines(g)
    print(f"\npush flood: {n} wrong-token pushes in {elapsed:.1f} s ({n / elapsed:.0f}/s) from {clients} clients; "
          f"worker CPU {cpu:.2f} s ({1000 * cpu / n:.3f} ms a push); xact_commit/xact_rollback delta {delta}; "
          f"sessions in the database {sessions}; push_rejected log lines {len(lines)}")
    assert statuses == {401: n} and delta == (0, 0) and sessions == 0


def test_ndjson_is_held_to_the_json_values_budget_before_parsing_and_parsed_line_by_line(db, service):
    """Each NDJSON line counts as a JSON value: MAX_JSON_VALUES lines of
    "10" are refused naming the budget, before any line is parsed (one line
    fewer is parsed, and its first line refused for what it is). Lines are
    parsed one at a time: a broken line is named by its number; blank lines
    and CRLF endings are fine, and application/ndjson is NDJSON too."""
    db.add_users(A)
    svc = service(db, [push_source("p")])
    budget = f"body holds more than {billing.MAX_JSON_VALUES} JSON values (the memory budget)"
    status, answer = push(svc, b"10\n" * billing.MAX_JSON_VALUES, content_type=NDJSON)
    assert (status, answer) == (400, {"error": budget})
    status, answer = push(svc, b"10\n" * (billing.MAX_JSON_VALUES - 1), content_type=NDJSON)
    assert (status, answer) == (400, {"error": "malformed page: a snapshot is not an object"})
    # The same values in a JSON array are counted by their commas alike.
    status, answer = push(svc, b"[" + b"10," * (billing.MAX_JSON_VALUES - 1) + b"10]")
    assert (status, answer) == (400, {"error": budget})

    good = push_body([snap(at(1, 5), (A, "xhttp", 100, 0))], ndjson=True)
    for body, line in ((good + b'{"collected_at": \n' + b"[1,\n", 2), (b"\n" + good + b"\n" + b"{]\n", 4)):
        status, answer = push(svc, body, content_type=NDJSON)
        assert (status, answer) == (400, {"error": f"malformed body: NDJSON line {line} is not JSON"}), body
    assert nothing_written(db) and db.watermark("p") is None
    two = push_body([snap(at(1, 5), (A, "xhttp", 100, 0)), snap(at(2, 5), (A, "xhttp", 150, 0))], ndjson=True)
    status, result = push(svc, b"\r\n" + two.replace(b"\n", b"\r\n\r\n"), content_type="application/ndjson")
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", 2), result
    assert [b[7] for b in db.buckets()] == [100, 50] and db.watermark("p") == at(2, 5)


def test_push_max_age_bounds_how_old_a_pushed_snapshot_may_be(db, service):
    """PUSH_MAX_AGE (24h by default): a pushed snapshot older than that is a
    400 naming PUSH_MAX_AGE and the pull source that delivers older history,
    and refuses its whole body; 0 or off accepts any age; another value moves
    the bound; a malformed value stops start-up naming the variable."""
    db.add_users(A)
    now = datetime.now(UTC).replace(microsecond=0)
    old = snap(now - timedelta(hours=24, minutes=5), (A, "xhttp", 100, 0))
    recent = snap(now - timedelta(hours=23, minutes=55), (A, "xhttp", 300, 0))
    assert billing.load_config(base_env()).push_max_age == 86400
    svc = service(db, [push_source("p")])
    for body, content_type in ((push_body(old), "application/json"), (push_body([recent, old]), "application/json"),
                               (push_body([recent, old], ndjson=True), NDJSON)):
        status, answer = push(svc, body, content_type=content_type)
        assert status == 400, answer
        assert "older than PUSH_MAX_AGE (86400s)" in answer["error"] and "through a pull source" in answer["error"]
    assert nothing_written(db) and db.watermark("p") is None

    for value in ("off", "0"):
        reset_database(db, [A])
        status, result = push(service(db, [push_source("p")], PUSH_MAX_AGE=value), push_body(old))
        assert (status, result["status"]) == (200, "ok"), (value, result)
        assert [(b[0], b[7]) for b in db.buckets()] == [(billing.minute_floor(now - timedelta(hours=24, minutes=5)),
                                                         100)], value

    reset_database(db, [A])
    hourly = service(db, [push_source("p")], PUSH_MAX_AGE="1h")
    status, answer = push(hourly, push_body(snap(now - timedelta(minutes=61), (A, "xhttp", 100, 0))))
    assert status == 400 and "older than PUSH_MAX_AGE (3600s)" in answer["error"], answer
    status, result = push(hourly, push_body(snap(now - timedelta(minutes=59), (A, "xhttp", 100, 0))))
    assert (status, result["status"]) == (200, "ok"), result

    with pytest.raises(billing.ConfigError, match=r"^PUSH_MAX_AGE: not a duration like 90s"):
        billing.load_config(base_env(PUSH_MAX_AGE="1x"))
    done = run_gunicorn_until_exit(base_env(PUSH_MAX_AGE="1x", LISTEN_ADDR=f"127.0.0.1:{free_port()}"))
    assert done.returncode != 0
    assert "configuration error: PUSH_MAX_AGE: not a duration like 90s, 1m30s or 2h: '1x'" in done.stderr
    assert "Traceback" not in done.stderr


def test_open_endpoints_show_error_categories_and_the_token_shows_the_text(db, exporters, service):
    """Without the job token /v1/status and /healthz show each error as its
    category only (the texts name nodes and accounts); with it, the redacted
    texts. A last_error an older release wrote (no category) shows as
    internal."""
    db.add_users(A)
    wrong = exporters([snap(at(1, 5), (A, "", 100, 0))], node_id="node-Secret-71")
    broken = exporters()
    broken.fault = lambda query: (200, b'{"snapshots": [')
    sources = [{"source_id": "down", "base_url": f"http://127.0.0.1:{free_port()}", "expected_node_id": NODE,
                "expected_env": ENV}, source("wrong", wrong, expected_node_id=NODE), source("bad", broken),
               push_source("p", node="node-p")]
    for s in ("down", "wrong", "bad"):
        db.set_watermark(s, at(-1))
    older = f"malformed page: a snapshot of node-Secret-71 for account {A} has no node_id"
    db.q("INSERT INTO billing_source_sync_state (source_id, last_error) VALUES ('p', %s)", (older,))
    svc = service(db, sources)
    status, result = svc.post()
    assert (status, result["status"]) == (503, "error"), result
    texts = {"down": "exporter_unreachable: could not connect to the exporter",
             "wrong": "wrong_node: page of node_id 'node-Secret-71' env 'prod' is not what this source expects "
                      "('node-a' env 'prod')",
             "bad": "bad_page: malformed page: body is not JSON"}
    categories = {"down": "exporter_unreachable", "wrong": "wrong_node", "bad": "bad_page"}
    assert {s: v["error"] for s, v in by_source(result).items()} == texts  # the job token's answer: the texts

    status, shown = svc.get("/v1/status")
    assert status == 200
    assert shown["error"] == "down: exporter_unreachable; wrong: wrong_node; bad: bad_page"
    assert shown["errors"] == [{"source_id": s, "category": c} for s, c in categories.items()]
    assert {s["source_id"]: (s["error"], s["last_error"]) for s in shown["source_statuses"]} == \
        {s: (c, c) for s, c in categories.items()}
    assert {s["source_id"]: s["last_error"] for s in shown["sources"]} == {**categories, "p": "internal"}
    assert "Secret" not in json.dumps(shown) and A not in json.dumps(shown)
    assert svc.get("/healthz") == (503, {"status": "error", "message": "last run failed: down: "
                                         "exporter_unreachable; wrong: wrong_node; bad: bad_page"})

    status, full = svc.get("/v1/status", token=TOKEN)
    assert status == 200 and full["error"] == "; ".join(f"{s}: {t}" for s, t in texts.items())
    assert [e["message"] for e in full["errors"]] == list(texts.values())
    assert {s["source_id"]: s["last_error"] for s in full["sources"]} == {**texts, "p": older}
    assert svc.get("/healthz", token=TOKEN) == (503, {"status": "error",
                                                      "message": f"last run failed: {full['error']}"})
    assert TOKEN not in json.dumps(full)


def test_compressed_pushes_are_refused_and_ndjson_needs_its_content_type(db, service):
    """Content-Encoding gzip (or any but identity) is a 415; gzip bytes sent
    as plain JSON or NDJSON are a 400 saying gzip is not accepted; NDJSON sent
    as application/json is a 400 naming the content type it needs. None of
    them writes anything; the same snapshots sent as they should be bill."""
    db.add_users(A)
    svc = service(db, [push_source("p")])
    lines = push_body([snap(at(1, 5), (A, "xhttp", 100, 0)), snap(at(2, 5), (A, "xhttp", 150, 0))], ndjson=True)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    packed = squeeze.compress(lines) + squeeze.flush()
    assert packed[:2] == b"\x1f\x8b"

    def post(body, content_type="application/json", token=TOKEN, encoding=None):
        headers = {"Authorization": f"Bearer {token}"}
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        response = svc.client.post(PUSH_PATH, data=body, content_type=content_type, headers=headers)
        return response.status_code, response.get_json()

    for encoding, name in (("gzip", "gzip"), ("GZIP ", "gzip"), ("deflate", "deflate")):
        assert post(packed, NDJSON, encoding=encoding) == \
            (415, {"error": f"{name} is not accepted; send identity (uncompressed)"}), encoding
    assert post(packed, NDJSON, token="wrong-Push-Token-0c4e8a", encoding="gzip")[0] == 401
    for content_type in ("application/json", NDJSON):
        assert post(packed, content_type) == (400, {"error": "gzip is not accepted; send identity (uncompressed) JSON"})
    assert post(lines) == (400, {"error": "body is not one JSON document: NDJSON needs Content-Type "
                                          "application/x-ndjson"})
    assert nothing_written(db) and db.watermark("p") is None
    status, result = post(lines, NDJSON, encoding="identity")
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", 2), result
    assert db.watermark("p") == at(2, 5)
    samples = metrics_of(svc)
    assert metric(samples, "billing_push_rejected_total", source_id="p") == 6


# HTTPS on the listener (TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE, served by gunicorn.conf.py).

@dataclass
class ListenerPki:
    ca: str  # the CA of the listener's certificate
    cert: str  # the listener's certificate for 127.0.0.1, and its key
    key: str
    next_cert: str  # what a rotation installs: another CA's certificate (another issuer and serial)
    next_key: str
    trust: str  # both CAs: what the clients trust across a rotation
    der: bytes  # the two certificates as the listener presents them in a handshake
    next_der: bytes


@pytest.fixture(scope="module")
def listener_pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("listener-pki")
    paths, ders = {}, {}
    for name in ("first", "next"):
        ca = trustme.CA(organization_name=f"billing-service listener CA ({name})")
        leaf = ca.issue_cert("127.0.0.1")
        for kind, pem in (("ca", ca.cert_pem), ("cert", leaf.cert_chain_pems[0]), ("key", leaf.private_key_pem)):
            paths[name, kind] = str(directory / f"{name}-{kind}.pem")
            pem.write_to_path(paths[name, kind])
        ders[name] = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    trust = str(directory / "trust.pem")
    with open(trust, "wb") as out:
        for name in ("first", "next"):
            with open(paths[name, "ca"], "rb") as ca_file:
                out.write(ca_file.read())
    return ListenerPki(paths["first", "ca"], paths["first", "cert"], paths["first", "key"], paths["next", "cert"],
                       paths["next", "key"], trust, ders["first"], ders["next"])


def tls_client(trust: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the chain and the host name (never less)."""
    context = ssl.create_default_context(cafile=trust)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def tls_request(port: int, context: ssl.SSLContext, path: str = "/api/ping") -> tuple[bytes, int]:
    """GET on a new connection: (the certificate the listener presented, in DER; the HTTP status)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.connect()
        peer = conn.sock.getpeercert(binary_form=True)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return peer, response.status
    finally:
        conn.close()


def install_file(source: str, target) -> None:
    """The README's rotation step: a temporary name in the same directory, renamed over the target."""
    staged = f"{target}.new"
    shutil.copyfile(source, staged)
    os.replace(staged, target)


class TlsGunicorn(Gunicorn):
    """Gunicorn serving HTTPS: its own requests trust ``trust`` and present
    ``cert`` (a (certificate, key) pair) when given."""

    def __init__(self, env: dict, trust: str, cert=None, workers: int = 2):
        super().__init__(env, workers)
        self.url = f"https://127.0.0.1:{self.port}"
        self.trust, self.cert = trust, cert

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        try:
            return self.get("/api/ping", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def post(self, job="collect-and-rate", body=None, token=TOKEN, timeout=120):
        response = requests.post(f"{self.url}/v1/jobs/{job}", data=None if body is None else json.dumps(body),
                                 headers={"Authorization": f"Bearer {token}"} if token else {},
                                 verify=self.trust, cert=self.cert, timeout=timeout)
        return response.status_code, response.json()

    def get(self, path, timeout=10):
        return requests.get(self.url + path, verify=self.trust, cert=self.cert, timeout=timeout)


@pytest.fixture
def tls_gunicorns():
    started = []

    def start(env: dict, trust: str, cert=None, workers: int = 2) -> TlsGunicorn:
        server = TlsGunicorn(env, trust, cert, workers)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        server.remove_logs()


PUSH_NODE = "node-push"


def tls_env(db, exporters, cert, key, client_ca=None, **env) -> dict:
    """A pull source (an empty exporter) and a push source, served over HTTPS."""
    server = exporters([])
    db.set_watermark("a", at(-1))
    tls = {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}
    if client_ca:
        tls["TLS_CLIENT_CA_FILE"] = client_ca
    return service_env(db, [source("a", server), push_source("p", node=PUSH_NODE)], **tls, **env)


def load_gunicorn_conf(monkeypatch, **env) -> dict:
    """gunicorn.conf.py's settings and hooks, as gunicorn reads them, under this environment."""
    for name in billing.TLS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in base_env(**env).items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))


def server_context(cert: str, key: str, minimum=ssl.TLSVersion.MINIMUM_SUPPORTED) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.minimum_version = minimum
    return context


def test_gunicorn_conf_serves_the_tls_files_at_tls_1_2_or_later_and_keeps_the_last_good_pair(
        monkeypatch, listener_pki, pki, tmp_path, app_log):
    plain = load_gunicorn_conf(monkeypatch)
    assert {"certfile", "keyfile", "ca_certs", "cert_reqs"} & plain.keys() == set()

    cert, key = tmp_path / "listener.pem", tmp_path / "listener.key"
    shutil.copyfile(listener_pki.cert, cert)
    shutil.copyfile(listener_pki.key, key)
    conf = load_gunicorn_conf(monkeypatch, TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    assert (conf["certfile"], conf["keyfile"]) == (str(cert), str(key))
    assert {"ca_certs", "cert_reqs"} & conf.keys() == set()
    mutual = load_gunicorn_conf(monkeypatch, TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key),
                                TLS_CLIENT_CA_FILE=pki.ca_path)
    assert (mutual["ca_certs"], mutual["cert_reqs"]) == (pki.ca_path, ssl.CERT_REQUIRED)

    # The hook raises the minimum of whatever gunicorn's factory builds to TLS 1.2.
    builds = []

    def factory():  # gunicorn's default factory, but permissive: every version OpenSSL has
        builds.append(1)
        return server_context(str(cert), str(key))

    assert factory().minimum_version == ssl.TLSVersion.MINIMUM_SUPPORTED
    context = conf["ssl_context"](None, factory)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    # Built once, then the same context for every connection while the files stay as they are.
    assert conf["ssl_context"](None, factory) is context and len(builds) == 2

    # A new key beside the old certificate: the last good pair stays, logged once.
    install_file(listener_pki.next_key, key)
    assert conf["ssl_context"](None, factory) is context
    assert conf["ssl_context"](None, factory) is context
    (failed,) = events(app_log, "listener_tls_reload_failed")
    assert "KEY_VALUES_MISMATCH" in failed["error"] and listener_pki.key not in json.dumps(failed)
    # The certificate follows: a new context, at TLS 1.2 or later too.
    install_file(listener_pki.next_cert, cert)
    rotated = conf["ssl_context"](None, factory)
    assert rotated is not context and rotated.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(events(app_log, "listener_tls_reloaded")) == 1
    # The other order, certificate first, is as safe.
    install_file(listener_pki.cert, cert)
    assert conf["ssl_context"](None, factory) is rotated
    install_file(listener_pki.key, key)
    back = conf["ssl_context"](None, factory)
    assert back is not rotated and len(events(app_log, "listener_tls_reloaded")) == 2
    rotated = back
    # A file that disappears or breaks: still the last good context.
    cert.unlink()
    assert conf["ssl_context"](None, factory) is rotated
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert conf["ssl_context"](None, factory) is rotated
    assert len(events(app_log, "listener_tls_reload_failed")) == 4
    # With nothing good to fall back on (a new worker whose files are broken), the error is gunicorn's.
    fresh = conf["ListenerTLS"]((str(cert), str(key), ""))
    with pytest.raises(ssl.SSLError):
        fresh.context(factory)


@pytest.mark.parametrize("files, message", [
    ({"TLS_CERT_FILE": "cert"}, "TLS_CERT_FILE and TLS_KEY_FILE go together"),
    ({"TLS_KEY_FILE": "key"}, "TLS_CERT_FILE and TLS_KEY_FILE go together"),
    ({"TLS_CLIENT_CA_FILE": "ca"}, "TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE"),
    ({"TLS_CERT_FILE": "cert", "TLS_KEY_FILE": "next key"},
     "TLS_CERT_FILE/TLS_KEY_FILE: not usable as PEM (KEY_VALUES_MISMATCH)"),
    ({"TLS_CERT_FILE": "garbage", "TLS_KEY_FILE": "key"}, "TLS_CERT_FILE/TLS_KEY_FILE: not usable as PEM"),
    ({"TLS_CERT_FILE": "cert", "TLS_KEY_FILE": "key", "TLS_CLIENT_CA_FILE": "garbage"},
     "TLS_CLIENT_CA_FILE: not usable as PEM"),
    ({"TLS_CERT_FILE": "cert", "TLS_KEY_FILE": "key", "TLS_CLIENT_CA_FILE": "directory"},
     "TLS_CLIENT_CA_FILE: file "),
    ({"TLS_CERT_FILE": "", "TLS_KEY_FILE": "key"}, "TLS_CERT_FILE is set but empty"),
])
def test_listener_tls_files_that_cannot_work_stop_startup_naming_the_variable(files, message, listener_pki,
                                                                              tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    paths = {"cert": listener_pki.cert, "key": listener_pki.key, "next key": listener_pki.next_key,
             "ca": listener_pki.ca, "garbage": str(garbage), "directory": str(tmp_path), "": ""}
    with pytest.raises(billing.ConfigError) as error:
        billing.load_config(base_env(**{name: paths[kind] for name, kind in files.items()}))
    assert message in str(error.value)
    assert billing.load_config(base_env(TLS_CERT_FILE=listener_pki.cert, TLS_KEY_FILE=listener_pki.key)).tls == \
        (listener_pki.cert, listener_pki.key, "")


@pytest.mark.parametrize("name", billing.TLS_VARIABLES)
@pytest.mark.parametrize("kind", ["no permission", "missing"])
def test_gunicorn_will_not_start_with_an_unreadable_tls_file_and_names_it(name, kind, listener_pki, pki, tmp_path):
    """One of the files cannot be read: gunicorn exits 2 with one line naming
    the variable, before any worker starts."""
    files = {}
    for variable, original in zip(billing.TLS_VARIABLES, (listener_pki.cert, listener_pki.key, pki.ca_path)):
        files[variable] = str(tmp_path / f"{variable.lower()}.pem")
        shutil.copyfile(original, files[variable])
    prefix = []
    if kind == "missing":
        os.unlink(files[name])
    else:
        os.chmod(files[name], 0)
        if IS_ROOT:  # root reads any file: take away the two capabilities that let it
            if not shutil.which("setpriv"):
                pytest.skip("setpriv (util-linux) is not installed")
            prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    done = subprocess.run([*prefix, sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "app:app"],
                          cwd=ROOT, env={"PATH": os.environ["PATH"], **base_env(
                              LISTEN_ADDR=f"127.0.0.1:{free_port()}", **files)},
                          capture_output=True, text=True, timeout=30)
    reason = "No such file or directory" if kind == "missing" else "Permission denied"
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"billing-service: configuration error: {name}: file {files[name]!r} is not readable ({reason})"]
    assert done.stdout == ""


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_https_listener_serves_with_its_ca_only_at_tls_1_2_or_later_and_not_plain_http(
        db, exporters, tls_gunicorns, listener_pki):
    g = tls_gunicorns(tls_env(db, exporters, listener_pki.cert, listener_pki.key), trust=listener_pki.trust,
                      workers=1)
    assert g.get("/api/ping").json() == {"image": "", "tag": "", "commit": "", "version": ""}
    assert g.get("/healthz").json()["status"] == "starting"
    status, result = g.post()
    assert (status, result["status"]) == (200, "ok"), result
    assert g.get("/healthz").json() == {"status": "ok", "message": ""}
    peer, status = tls_request(g.port, tls_client(listener_pki.trust))
    assert (peer, status) == (listener_pki.der, 200)
    # Verification stays on: a client that does not trust the test CA refuses the listener.
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(g.url + "/api/ping", timeout=10)
    # Plain HTTP to the TLS port is not served (the path below is asked for nowhere else).
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{g.port}/v1/status", timeout=10)

    # TLS 1.3 and 1.2 are served...
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        client = tls_client(listener_pki.trust)
        client.minimum_version = client.maximum_version = version
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == version.name.replace("v1_", "v1.")
    # ...TLS 1.1 is not, though this OpenSSL can speak it (at security level 0) with a server that allows it.
    legacy = tls_client(listener_pki.trust)
    legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
    legacy.minimum_version, legacy.maximum_version = ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1
    permissive = server_context(listener_pki.cert, listener_pki.key)
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve():
            conn, _ = listener.accept()
            with permissive.wrap_socket(conn, server_side=True):
                pass
        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                legacy.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.1"
        thread.join(10)
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"):
        tls_request(g.port, legacy)

    stop_cleanly(g)
    assert "/v1/status" not in g.output() and "Traceback" not in g.output()


def test_mutual_tls_wants_a_certificate_of_the_client_ca_and_the_token_still(db, exporters, tls_gunicorns,
                                                                              listener_pki, pki):
    g = tls_gunicorns(tls_env(db, exporters, listener_pki.cert, listener_pki.key, client_ca=pki.ca_path),
                      trust=listener_pki.trust, cert=(pki.client_cert, pki.client_key), workers=1)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # No certificate, or one of another CA: the handshake fails, whatever the token (these paths are asked
    # for by nobody else, so the log shows whether any of them reached the service).
    for cert in (None, (pki.stranger_cert, pki.stranger_key)):
        with pytest.raises(requests.ConnectionError):
            requests.get(g.url + "/v1/status", verify=listener_pki.trust, cert=cert, timeout=10)
        with pytest.raises(requests.ConnectionError):
            requests.post(g.url + "/v1/jobs/reconcile", headers=auth, verify=listener_pki.trust, cert=cert,
                          timeout=10)
        with pytest.raises(requests.ConnectionError):
            requests.post(g.url + PUSH_PATH, headers=auth, verify=listener_pki.trust, cert=cert, timeout=10,
                          data=push_body(snap(at(1, 5), (A, "xhttp", 100, 50)), node=PUSH_NODE))
    with pytest.raises(ssl.SSLError):
        tls_request(g.port, tls_client(listener_pki.trust, pki.stranger_cert, pki.stranger_key), "/v1/status")

    # With a certificate of the client CA: served, and the endpoints still want their tokens.
    assert g.get("/healthz").json()["status"] == "starting"
    assert g.post(token=None)[0] == 401 and g.post(token=WRONG_TOKEN)[0] == 401
    status, result = g.post()
    assert (status, result["status"]) == (200, "ok"), result
    assert g.get("/healthz").json() == {"status": "ok", "message": ""}
    body = push_body(snap(at(1, 5), (A, "xhttp", 100, 50)), node=PUSH_NODE)
    pushed = requests.post(g.url + PUSH_PATH, data=body, verify=listener_pki.trust, cert=g.cert, timeout=10)
    assert pushed.status_code == 401
    db.add_users(A)
    pushed = requests.post(g.url + PUSH_PATH, data=body, headers=auth, verify=listener_pki.trust, cert=g.cert,
                           timeout=10)
    assert pushed.status_code == 200 and pushed.json()["written_minutes"] == 1, pushed.text
    # A certificate and key in one file (curl --cert FILE) does as well.
    peer, status = tls_request(g.port, tls_client(listener_pki.trust, pki.client_combined))
    assert (peer, status) == (listener_pki.der, 200)

    stop_cleanly(g)
    log = g.output()
    assert "/v1/status" not in log and "/v1/jobs/reconcile" not in log and "Traceback" not in log
    assert log.count(f'"POST {PUSH_PATH} ') == 2


def test_the_readmes_curl_commands_over_mutual_tls(db, exporters, tls_gunicorns, listener_pki, pki):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    g = tls_gunicorns(tls_env(db, exporters, listener_pki.cert, listener_pki.key, client_ca=pki.ca_path),
                      trust=listener_pki.trust, cert=(pki.client_cert, pki.client_key), workers=1)

    def curl(*args):
        return subprocess.run(["curl", "-s", "--cacert", listener_pki.trust, *args], capture_output=True, text=True,
                              timeout=30)

    refused = curl(f"{g.url}/healthz")
    assert refused.returncode != 0 and refused.stdout == ""
    mutual = ["--cert", pki.client_cert, "--key", pki.client_key]
    assert json.loads(curl(*mutual, f"{g.url}/healthz").stdout)["status"] == "starting"
    job = curl(*mutual, "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}", f"{g.url}/v1/jobs/collect-and-rate")
    assert job.returncode == 0 and json.loads(job.stdout)["status"] == "ok", job.stdout
    no_token = curl(*mutual, "-X", "POST", f"{g.url}/v1/jobs/collect-and-rate")
    assert json.loads(no_token.stdout) == {"error": "missing or wrong service token"}


def test_replacing_the_client_ca_file_applies_to_new_connections(db, exporters, tls_gunicorns, listener_pki, pki,
                                                                 tmp_path):
    """Moving callers to a new client CA: both CAs in the file, then only the new one."""
    clients = tmp_path / "clients.pem"
    shutil.copyfile(pki.ca_path, clients)
    g = tls_gunicorns(tls_env(db, exporters, listener_pki.cert, listener_pki.key, client_ca=str(clients)),
                      trust=listener_pki.trust, cert=(pki.client_cert, pki.client_key), workers=1)
    old_ca_client = tls_client(listener_pki.trust, pki.client_cert, pki.client_key)
    new_ca_client = tls_client(listener_pki.trust, listener_pki.cert, listener_pki.key)  # a leaf of another CA

    def served(client) -> bool:
        try:
            return tls_request(g.port, client)[1] == 200
        except (ssl.SSLError, ConnectionError):
            return False

    assert (served(old_ca_client), served(new_ca_client)) == (True, False)
    both = tmp_path / "both.pem"
    both.write_bytes(open(pki.ca_path, "rb").read() + open(listener_pki.ca, "rb").read())
    install_file(str(both), clients)
    assert (served(old_ca_client), served(new_ca_client)) == (True, True)
    install_file(listener_pki.ca, clients)
    assert (served(old_ca_client), served(new_ca_client)) == (False, True)


def test_rotating_the_certificate_needs_no_signal_and_drops_no_request(db, exporters, tls_gunicorns, listener_pki,
                                                                        tmp_path):
    """The README's rotation: the new key and certificate each written to a
    temporary name and renamed over the old one, nothing else. Requests on new
    connections, on one kept-alive connection and one in flight all succeed;
    every new connection from the certificate's rename on gets the new one."""
    assert listener_pki.der != listener_pki.next_der
    live = tmp_path / "tls"
    live.mkdir()
    cert, key = live / "listener.pem", live / "listener.key"
    shutil.copyfile(listener_pki.cert, cert)
    shutil.copyfile(listener_pki.key, key)
    db.add_users(A)
    g = tls_gunicorns(tls_env(db, exporters, cert, key), trust=listener_pki.trust, workers=2)
    booted(g, 2)
    workers = sorted(worker_pids(g.proc.pid))
    client = tls_client(listener_pki.trust)  # trusts both CAs
    stop = threading.Event()
    fresh, kept = [], []  # (started, finished, peer certificate, status or the error)

    def new_connections():
        while not stop.is_set():
            started = time.monotonic()
            try:
                peer, status = tls_request(g.port, client)
            except Exception as exc:  # recorded, and fails the test below
                peer, status = None, repr(exc)
            fresh.append((started, time.monotonic(), peer, status))

    def one_connection():
        conn = http.client.HTTPSConnection("127.0.0.1", g.port, context=client, timeout=10)
        try:
            conn.connect()
            first = conn.sock
            while not stop.is_set():
                started = time.monotonic()
                try:
                    conn.request("GET", "/api/ping")
                    response = conn.getresponse()
                    response.read()
                    # http.client reconnects by itself after a close: the same socket is what proves none
                    peer = conn.sock.getpeercert(binary_form=True) if conn.sock is first else None
                    kept.append((started, time.monotonic(), peer, response.status))
                except Exception as exc:
                    kept.append((started, time.monotonic(), None, repr(exc)))
                    return
        finally:
            conn.close()

    body = push_body(snap(at(1, 5), (A, "xhttp", 100, 50)), node=PUSH_NODE)
    sent_head, release, in_flight = threading.Event(), threading.Event(), []

    def chunks():
        yield body[:20]
        sent_head.set()
        release.wait(60)
        yield body[20:]

    def slow_push():
        try:
            response = requests.post(g.url + PUSH_PATH, data=chunks(), headers={"Authorization": f"Bearer {TOKEN}"},
                                     verify=listener_pki.trust, timeout=60)
            in_flight.append((response.status_code, response.json()))
        except Exception as exc:
            in_flight.append(repr(exc))

    def done_after(records, moment):
        return sum(1 for started, _, _, status in records if started > moment and status == 200)

    threads = [threading.Thread(target=target) for target in (new_connections, one_connection, slow_push)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sent_head.is_set() and done_after(fresh, 0) >= 3 and done_after(kept, 0) >= 3,
                 what="requests flowing under the first certificate")

        # The new key first: until the certificate follows, it matches nothing, and the listener
        # keeps presenting the pair it has.
        install_file(listener_pki.next_key, key)
        for _ in range(5):
            assert tls_request(g.port, client) == (listener_pki.der, 200)
        wait_for(lambda: '"event": "listener_tls_reload_failed"' in g.output(),
                 what="a worker to notice the half-done rotation")

        # The certificate: from its rename on, every new connection gets it.
        before_rename = time.monotonic()
        install_file(listener_pki.next_cert, cert)
        renamed = time.monotonic()
        for _ in range(5):
            assert tls_request(g.port, client) == (listener_pki.next_der, 200)
        wait_for(lambda: done_after(fresh, renamed) >= 3 and done_after(kept, renamed) >= 3,
                 what="requests flowing under the new certificate")
        release.set()
        threads[2].join(60)
    finally:
        release.set()
        stop.set()
        for thread in threads:
            thread.join(60)

    assert [r for r in fresh + kept if r[3] != 200] == []
    assert in_flight[0][0] == 200 and in_flight[0][1]["written_minutes"] == 1, in_flight
    assert {r[2] for r in fresh if r[1] < before_rename} == {listener_pki.der}
    assert {r[2] for r in fresh if r[0] > renamed} == {listener_pki.next_der}
    # The kept-alive connection was never dropped: one socket, the old certificate, to the end.
    assert {r[2] for r in kept} == {listener_pki.der} and done_after(kept, renamed) >= 3
    # No signal, no restart: the same workers throughout.
    assert sorted(worker_pids(g.proc.pid)) == workers
    stop_cleanly(g)
    log = g.output()
    assert log.count('"event": "listener_tls_reloaded"') >= 1 and "Traceback" not in log


def test_a_worker_started_during_a_half_done_rotation_serves_the_pair_the_arbiter_loaded(
        db, exporters, tls_gunicorns, listener_pki, tmp_path):
    """A worker that replaces a dead one while the key is new and the
    certificate still old has never built a context of its own: it falls back
    on the arbiter's, then takes the new pair once the certificate follows."""
    cert, key = tmp_path / "listener.pem", tmp_path / "listener.key"
    shutil.copyfile(listener_pki.cert, cert)
    shutil.copyfile(listener_pki.key, key)
    g = tls_gunicorns(tls_env(db, exporters, cert, key), trust=listener_pki.trust, workers=1)
    booted(g, 1)
    (first,) = worker_pids(g.proc.pid)
    client = tls_client(listener_pki.trust)
    install_file(listener_pki.next_key, key)
    os.kill(first, signal.SIGKILL)
    (second,) = wait_for(lambda: [pid for pid in worker_pids(g.proc.pid) if pid != first], what="a new worker")
    booted(g, 2)  # its "Booting worker" line: it is ready to accept
    for _ in range(3):
        assert tls_request(g.port, client) == (listener_pki.der, 200)
    assert worker_pids(g.proc.pid) == [second]
    install_file(listener_pki.next_cert, cert)
    assert tls_request(g.port, client) == (listener_pki.next_der, 200)
    stop_cleanly(g)


def test_a_reload_after_a_rotation_keeps_serving_and_one_in_the_middle_stops_the_service(
        db, exporters, tls_gunicorns, listener_pki, tmp_path):
    """SIGHUP (systemctl reload) is not part of a rotation: after both renames
    it changes nothing a client sees; between them, the reload checks the
    files like a start and stops gunicorn (exit 2) naming the variables."""
    cert, key = tmp_path / "listener.pem", tmp_path / "listener.key"
    shutil.copyfile(listener_pki.cert, cert)
    shutil.copyfile(listener_pki.key, key)
    g = tls_gunicorns(tls_env(db, exporters, cert, key), trust=listener_pki.trust, workers=1)
    booted(g, 1)
    client = tls_client(listener_pki.trust)
    install_file(listener_pki.next_key, key)
    install_file(listener_pki.next_cert, cert)
    assert tls_request(g.port, client) == (listener_pki.next_der, 200)

    def replaced(old: int) -> int:
        def new_only():
            pids = worker_pids(g.proc.pid)
            return pids if pids and old not in pids else None
        (new,) = wait_for(new_only, what="the worker replaced")
        return new

    (first,) = worker_pids(g.proc.pid)
    g.proc.send_signal(signal.SIGHUP)
    second = replaced(first)
    assert tls_request(g.port, client) == (listener_pki.next_der, 200)
    # The arbiter loaded the pair again on reload: a worker that boots mid-rotation falls back on it.
    install_file(listener_pki.key, key)
    os.kill(second, signal.SIGKILL)
    replaced(second)
    booted(g, 3)
    assert tls_request(g.port, client) == (listener_pki.next_der, 200)

    g.proc.send_signal(signal.SIGHUP)
    assert g.proc.wait(timeout=30) == 2
    assert "billing-service: configuration error: TLS_CERT_FILE/TLS_KEY_FILE: not usable as PEM " \
           "(KEY_VALUES_MISMATCH)" in g.output()


# -- an operator's first month: lag from day one, one account's bill, a catch-up's progress ---------

def test_lag_is_exported_from_start_up_for_sources_that_never_succeeded_and_grows(db, exporters, service):
    """A pull source whose exporter has been down from the start and a push source never pushed have a lag
    from the service's start-up, growing (a failed attempt does not reset it); a disabled source has none."""
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sources = [{"source_id": "down", "base_url": down}, push_source("p"),
               {"source_id": "off", "base_url": down, "enabled": False}]
    begun = time.time()
    svc = service(db, sources)
    ready = time.time()

    def lags():
        before = time.time()
        samples = metrics_of(svc)
        after = time.time()
        # Seconds since start-up: between (before - ready) and (after - begun), with the metric's rounding.
        for sid in ("down", "p"):
            lag = metric(samples, LAG, source_id=sid)
            assert lag is not None and before - ready - 0.01 <= lag <= after - begun + 0.01, (sid, lag)
        assert metric(samples, LAG, source_id="off") is None
        return samples

    first = lags()
    for sid in ("down", "p"):
        wait_for(lambda: metric(lags(), LAG, source_id=sid) >= metric(first, LAG, source_id=sid) + 1, timeout=10,
                 what=f"the lag of {sid} to grow")
    status, result = svc.post()  # the exporter is down: the run fails, no watermark
    assert (status, result["status"]) == (503, "error") and db.watermark("down") is None, result
    samples = lags()  # still from start-up
    assert metric(samples, "billing_source_last_attempt_failed", source_id="down") == 1
    views = {v["source_id"]: v for v in svc.get("/v1/status")[1]["sources"]}
    assert views["down"]["last_completed_until"] is None and views["down"]["lag_seconds"] >= 1


ACCOUNT_PROFILE = dict(included=500, price=0.0000013, region=1.5, line=2.0, version="pricing-jp-v3")


def account_bill(svc, account_id, token=TOKEN, **query):
    path = f"/v1/accounts/{account_id}" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    return svc.get(path, token=token)


def test_account_bill_needs_the_token_and_refuses_bad_requests(db, exporters, service):
    db.add_users(A)
    _, svc = one_source(db, exporters, service, [])
    day = datetime(2026, 3, 1, tzinfo=UTC)
    ok = {"since": rfc(day), "until": rfc(day + timedelta(days=1))}
    for token in (None, WRONG_TOKEN):
        for account_id in (A, "not-a-uuid"):  # the token comes first, before anything is parsed or read
            assert account_bill(svc, account_id, token=token, **ok) == (
                401, {"error": "missing or wrong service token"})
    for bad in ("not-a-uuid", A[:-1], A + "0", "0" * 31):
        assert account_bill(svc, bad, **ok) == (400, {"error": "not an account UUID"}), bad
    bad_times = ("yesterday", "", "2026-13-01T00:00:00Z", "2026-03-01T00:00:00", "2026-03-01", "1772323200")
    for field in ("since", "until"):
        for bad in bad_times:
            status, body = account_bill(svc, A, **{**ok, field: bad})
            assert (status, body) == (400, {"error": "since and until must be RFC3339 times"}), (field, bad)
    for since, until in ((day, day), (day + MINUTE, day)):
        assert account_bill(svc, A, since=rfc(since), until=rfc(until)) == (
            400, {"error": "since must be before until"})
    longest = timedelta(days=31)
    assert account_bill(svc, A, since=rfc(day), until=rfc(day + longest + timedelta(seconds=1))) == (
        400, {"error": "the range is longer than 31 days"})
    status, body = account_bill(svc, A, since=rfc(day), until=rfc(day + longest))  # 31 days exactly: fine
    assert status == 200 and (body["since"], body["until"]) == (rfc(day), rfc(day + longest))
    # A users row and nothing billed yet: 200, no state, no lines; no users row: 404.
    assert body == {"account": A, "since": rfc(day), "until": rfc(day + longest), "state": None, "bytes": [],
                    "money": []}
    assert account_bill(svc, B, **ok) == (404, {"error": "no such account (no users row)"})


def day_start(day) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


def test_account_bill_shows_state_bytes_and_money_as_billed(db, exporters, service):
    """Traffic of A on two UTC days, two inbounds of one node (region jp) and one of another (region eu),
    priced by a profile (included 500 bytes, 0.0000013 x region 1.5 x line 2) from a balance of 0.02 into
    arrears and, by the second service's sweep, suspension; B on the same node. The answer equals the rows
    billed, day by day, and the hand-computed bill."""
    today = datetime.now(UTC).date()
    day1, day2 = day_start(today - timedelta(days=2)), day_start(today - timedelta(days=1))

    def t(day, hour, minute, second=30):
        return day + timedelta(hours=hour, minutes=minute, seconds=second)

    db.add_users(A, B, C)
    db.set_profile(A, **ACCOUNT_PROFILE)
    jp = exporters([snap(t(day1, 23, 58), (A, "xhttp", 100, 1000), (A, "tcp", 10, 20), (B, "xhttp", 5, 5)),
                    snap(t(day1, 23, 59), (A, "xhttp", 300, 3000), (A, "tcp", 30, 60), (B, "xhttp", 10, 10)),
                    snap(t(day2, 0, 0), (A, "xhttp", 600, 6000), (A, "tcp", 60, 120)),
                    snap(t(day2, 0, 5), (A, "xhttp", 1000, 10000))])
    eu = exporters([snap(t(day2, 0, 2), (A, "", 50, 50)), snap(t(day2, 0, 3), (A, "", 150, 150))], node_id="node-b")
    db.set_watermark("jp", t(day1, 23, 50))
    db.set_watermark("eu", t(day2, 0, 1))
    status, result = service(db, [source("jp", jp)], DEFAULT_REGION="jp", INITIAL_BALANCE="0.02").post()
    assert (status, result["status"], result["suspended"]) == (200, "ok", 0), result
    status, result = service(db, [source("eu", eu)], DEFAULT_REGION="eu", INITIAL_BALANCE="0.02",
                             ARREARS_SUSPEND_THRESHOLD="24h").post()
    assert (status, result["status"], result["suspended"]) == (200, "ok", 2), result  # A and B
    svc = service(db, [source("jp", jp)])

    # By hand: rated bytes are A's increments less the 500 included ones (taken by the first), each row
    # charged bytes x 0.0000039; the balance crosses zero at day 2's first minute.
    per_byte = Decimal("0.0000039")
    expected_state = {"balance": "-0.022822", "remaining_included_quota_bytes": 0, "arrears": True,
                      "arrears_since": rfc(t(day2, 0, 0, 0)), "throttle_state": "throttled",
                      "suspend_state": "suspended", "suspended_by_billing": True,
                      "last_rated_minute": rfc(t(day2, 0, 5, 0))}
    d1, d2 = day1.date().isoformat(), day2.date().isoformat()

    def line(day, region, code, up, down, minutes):
        return {"day": day, "region": region, "line_code": code, "uplink_bytes": up, "downlink_bytes": down,
                "bytes": up + down, "minutes": minutes}

    def money(day, rated, rows, amount):
        assert Decimal(amount) == -rated * per_byte  # the hand computation, written out as the exact string
        return {"day": day, "rated_bytes": rated, "amount": amount, "ledger_rows": rows}

    cases = [  # (query, bytes, money)
        ({"since": rfc(day1), "until": rfc(day2 + timedelta(days=1))},
         [line(d1, "jp", "tcp", 30, 60, 2), line(d1, "jp", "xhttp", 300, 3000, 2),
          line(d2, "eu", "", 150, 150, 2), line(d2, "jp", "tcp", 30, 60, 1), line(d2, "jp", "xhttp", 700, 7000, 2)],
         [money(d1, 600 + 30 + 2200 + 60, 4, "-0.011271"), money(d2, 3300 + 90 + 4400 + 100 + 200, 5, "-0.031551")]),
        # Another offset, the same instant; until is exclusive: 00:05 is left out.
        ({"since": (day2 + timedelta(hours=9)).strftime("%Y-%m-%dT%H:%M:%S") + "%2B09:00",
          "until": rfc(t(day2, 0, 5, 0))},
         [line(d2, "eu", "", 150, 150, 2), line(d2, "jp", "tcp", 30, 60, 1), line(d2, "jp", "xhttp", 300, 3000, 1)],
         [money(d2, 3300 + 90 + 100 + 200, 4, "-0.014391")]),
        ({"since": rfc(t(day2, 0, 5, 0)), "until": rfc(t(day2, 0, 6, 0))},  # since is inclusive
         [line(d2, "jp", "xhttp", 400, 4000, 1)], [money(d2, 4400, 1, "-0.01716")]),
        ({"since": rfc(day1 - timedelta(days=1)), "until": rfc(day1)}, [], []),
    ]
    for query, expected_bytes, expected_money in cases:
        status, body = account_bill(svc, A.upper(), **query)
        assert status == 200, (query, body)
        assert (body["account"], body["state"]) == (A, expected_state), query
        assert (body["bytes"], body["money"]) == (expected_bytes, expected_money), query
        since, until = billing.parse_time(body["since"]), billing.parse_time(body["until"])
        assert (body["bytes"], body["money"]) == rows_billed(db, A, since, until), query
    assert all(isinstance(m["amount"], str) for m in account_bill(svc, A, **cases[0][0])[1]["money"])

    # The state is the account_quota_states row, the balance its double as the decimal it prints as.
    balance, remaining, arrears_since, suspended, by_billing, rated = db.one(
        """SELECT current_balance, remaining_included_quota, arrears_since, suspend_state, suspended_by_billing,
                  last_rated_bucket_at FROM account_quota_states WHERE account_uuid = %s""", (A,))
    assert (repr(balance), remaining, rfc(arrears_since), suspended, by_billing, rfc(rated)) == (
        "-0.022822", 0, expected_state["arrears_since"], "suspended", True, expected_state["last_rated_minute"])

    # Without a range: today, UTC (nothing billed today); B's and C's answers are their own.
    before = datetime.now(UTC).date()
    status, body = account_bill(svc, A)
    after = datetime.now(UTC).date()
    assert status == 200 and (body["bytes"], body["money"]) == ([], [])
    assert (body["since"], body["until"]) in {(rfc(day_start(d)), rfc(day_start(d + timedelta(days=1))))
                                              for d in (before, after)}
    status, body = account_bill(svc, B, since=rfc(day1), until=rfc(day2))
    assert status == 200 and body["bytes"] == [line(d1, "jp", "xhttp", 10, 10, 2)]
    assert (body["state"]["balance"], body["state"]["suspended_by_billing"]) == ("-9.98", True)  # 0.02 - 20 x 0.5
    assert account_bill(svc, C, since=rfc(day1), until=rfc(day2))[1]["state"] is None


def rows_billed(db, account_id, since, until) -> tuple:
    """An account's bytes and money per UTC day, summed here from its rows (not by read_account's SQL)."""
    lines, money = {}, {}
    for start, _, acct, region, code, up, down, total, *_ in db.buckets():
        if acct == account_id and since <= start < until:
            entry = lines.setdefault((start.astimezone(UTC).date().isoformat(), region, code), [0, 0, 0, 0])
            for i, value in enumerate((up, down, total, 1)):
                entry[i] += value
    for _, acct, start, _, _, rated, amount, *_ in db.ledger():
        if acct == account_id and since <= start < until:
            entry = money.setdefault(start.astimezone(UTC).date().isoformat(), [0, Decimal(0), 0])
            entry[0] += rated
            entry[1] += Decimal(repr(amount))
            entry[2] += 1
    return ([{"day": day, "region": region, "line_code": code, "uplink_bytes": up, "downlink_bytes": down,
              "bytes": total, "minutes": minutes}
             for (day, region, code), (up, down, total, minutes) in sorted(lines.items())],
            [{"day": day, "rated_bytes": rated, "amount": billing.money_text(amount), "ledger_rows": rows}
             for day, (rated, amount, rows) in sorted(money.items())])


def explain(conn, sql: str, params) -> tuple[str, dict]:
    """The plan of one statement as PostgreSQL would run it: text (for the report) and JSON."""
    with conn.cursor() as cur:
        statement = cur.mogrify(sql, params).decode()
        cur.execute("EXPLAIN (FORMAT TEXT) " + statement)
        text = "\n".join(row[0] for row in cur.fetchall())
        cur.execute("EXPLAIN (FORMAT JSON) " + statement)
        return text, cur.fetchone()[0][0]["Plan"]


def plan_nodes(plan: dict) -> list:
    """Every node of a plan, depth first."""
    return [plan] + [node for child in plan.get("Plans", []) for node in plan_nodes(child)]


def test_account_bill_range_queries_use_the_account_first_indexes(db, monkeypatch):
    """read_account's two range statements, on 10 days of minute rows (every 5 minutes, two lines) of 8
    accounts, analyzed: each reads its table through the account-first index (account and time in the
    index condition), never a scan of the whole table. The plans are printed (pytest -s)."""
    accounts = [account(200 + n) for n in range(8)]
    db.add_users(*accounts)
    first = billing.minute_floor(datetime.now(UTC)) - timedelta(days=10)
    db.q("""INSERT INTO traffic_minute_buckets (bucket_start, node_id, account_uuid, region, line_code, uplink_bytes,
              downlink_bytes, total_bytes, multiplier, rating_status, source_revision)
            SELECT m, 'prod:node-a', a::uuid, 'jp', l, 100, 200, 300, 1, 'rated', 'v'
            FROM unnest(%s::text[]) a, generate_series(%s::timestamptz, %s::timestamptz, '5 minutes') m,
                 unnest(ARRAY['xhttp', 'tcp']) l""", (accounts, first, first + timedelta(days=10)))
    db.q("""INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
              amount_delta, balance_after, pricing_rule_version, created_at)
            SELECT gen_random_uuid(), a::uuid, m, m + interval '1 minute', 'traffic_charge', 300, -0.0003, 0, 'v',
                   m + interval '65 seconds'
            FROM unnest(%s::text[]) a, generate_series(%s::timestamptz, %s::timestamptz, '5 minutes') m,
                 unnest(ARRAY['xhttp', 'tcp']) l""", (accounts, first, first + timedelta(days=10)))
    db.q("ANALYZE traffic_minute_buckets")
    db.q("ANALYZE billing_ledger")
    counts = db.one("SELECT (SELECT count(*) FROM traffic_minute_buckets), (SELECT count(*) FROM billing_ledger)")
    assert counts[0] == counts[1] > 20000, counts
    statements = []
    real_sql = billing._sql

    def recording(conn, sql, params=(), commit=True):
        statements.append((sql, params))
        return real_sql(conn, sql, params, commit)

    monkeypatch.setattr(billing, "_sql", recording)
    since = day_start((first + timedelta(days=5)).date())  # one whole day, as the endpoint's default asks
    conn = psycopg2.connect(db.url)
    try:
        found = billing.read_account(conn, accounts[3], since, since + timedelta(days=1))
        assert sum(row[-1] for row in found["lines"]) == 2 * 288 and sum(row[-1] for row in found["money"]) == 2 * 288
        ranged = {table: (sql, params) for sql, params in statements for table in ("traffic_minute_buckets",
                                                                                    "billing_ledger")
                  if f"FROM {table}" in sql}
        assert len(statements) == 3 and len(ranged) == 2, statements
        for table, index, column in (("traffic_minute_buckets", "idx_traffic_minute_buckets_account_bucket",
                                      "bucket_start"),
                                     ("billing_ledger", "idx_billing_ledger_account_created", "created_at")):
            text, plan = explain(conn, *ranged[table])
            print(f"\nEXPLAIN of read_account's {table} range ({counts[0]} rows, 8 accounts, one day):\n{text}")
            nodes = plan_nodes(plan)
            # The table is read through the index alone (an index scan, or a bitmap of it), never whole.
            assert [n for n in nodes if n["Node Type"] == "Seq Scan"] == [], text
            used = [n for n in nodes if "Index Name" in n]
            assert used and {n["Index Name"] for n in used} == {index}, text
            assert all("account_uuid" in n["Index Cond"] and column in n["Index Cond"] for n in used), text
    finally:
        conn.close()


def catch_up_view(client, expected_at) -> tuple:
    """Source a's /v1/status view once its watermark is at ``expected_at``, and the times around the answer."""
    def answer():
        before = time.time()
        view = client.get("/v1/status").get_json()["sources"][0]
        return (view, before, time.time()) if view["last_completed_until"] == rfc(expected_at) else None
    return wait_for(answer, timeout=20, what=f"the watermark at {rfc(expected_at)}")


def remaining_between(before: float, after: float, watermark: datetime) -> set:
    """What remaining_seconds can be when "now" lies between two moments: the last whole minute's start
    (the run's end) less the watermark."""
    return {(billing.minute_floor(datetime.fromtimestamp(moment, UTC)) - MINUTE - watermark).total_seconds()
            for moment in (before, after)}


def assert_eta(eta_seconds, remaining, done, attempted: datetime, before: float, after: float):
    """eta = remaining / (done / elapsed), elapsed = now - the run's start, now between before and after."""
    low = remaining * (before - attempted.timestamp()) / done
    high = remaining * (after - attempted.timestamp()) / done
    assert low - 0.06 <= eta_seconds <= high + 0.06, (eta_seconds, low, high)


def test_status_and_metrics_show_a_catch_up_progress_and_eta_then_nothing(db, exporters, service):
    """38 minutes of backlog, one snapshot a page; the run is held at its 4th and 9th page requests.
    Meanwhile any instance's /v1/status shows the source running with catch_up: from (the watermark the run
    started at), at (the watermark now), done_seconds growing, remaining_seconds (to the last whole minute)
    shrinking, an eta; /metrics the same remaining and eta. Once the run ends: catch_up null, no gauges."""
    db.add_users(A)
    start = at(-40)
    stamps = [at(m, 30) for m in range(-39, -1)]
    server = exporters([snap(stamp, (A, "", 1000 * (i + 1), 0)) for i, stamp in enumerate(stamps)])
    server.page_cap = 1
    db.set_watermark("a", start)
    gates = [PageGate(server, 4), PageGate(server, 9)]
    runner = Service(service_env(db, [source("a", server)]))
    watcher = Service(service_env(db, [source("a", server)]))
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=runner.post()))
    worker.start()
    seen = []
    try:
        for gate, pages in zip(gates, (3, 8)):
            assert gate.reached.wait(30)
            watermark = stamps[pages - 1]  # the pages before the held request are committed
            for client in (watcher.client, runner.app.test_client()):  # any worker: the same answer
                view, before, after = catch_up_view(client, watermark)
                progress = view["catch_up"]
                assert view["running"] is True and progress is not None, view
                assert (progress["from"], progress["at"]) == (rfc(start), rfc(watermark))
                assert progress["done_seconds"] == (watermark - start).total_seconds()
                assert progress["remaining_seconds"] in remaining_between(before, after, watermark), progress
                attempted = billing.parse_time(view["last_attempted_at"])
                assert_eta(progress["eta_seconds"], progress["remaining_seconds"], progress["done_seconds"],
                           attempted, before, after)
                eta = billing.parse_time(progress["eta"]).timestamp()
                assert before + progress["eta_seconds"] - 0.06 <= eta <= after + progress["eta_seconds"] + 0.06
                seen.append(progress)
            before = time.time()
            samples = metrics_of(watcher)
            after = time.time()
            remaining = metric(samples, "billing_source_catchup_remaining_seconds", source_id="a")
            assert metric(samples, "billing_source_catchup_running", source_id="a") == 1
            assert remaining in remaining_between(before, after, watermark)
            assert_eta(metric(samples, "billing_source_catchup_eta_seconds", source_id="a"), remaining,
                       (watermark - start).total_seconds(), attempted, before, after)
            gate.release.set()  # (the gates are chained: each is removed only at the end)
    finally:
        for gate in reversed(gates):
            gate.remove()
        worker.join(60)
    early, late = seen[0], seen[-1]
    assert late["done_seconds"] > early["done_seconds"] and late["remaining_seconds"] < early["remaining_seconds"]
    status, result = outcome["result"]
    assert (status, result["status"], result["processed_samples"]) == (200, "ok", len(stamps)), result
    # Polled all the same: a run unlocks its source before it answers, but the last read may race it.
    for client in (watcher.client, runner.app.test_client()):
        view = wait_for(lambda: (lambda v: v if not v["running"] else None)(
            client.get("/v1/status").get_json()["sources"][0]), timeout=10, what="the run to end")
        assert (view["catch_up"], view["last_completed_until"]) == (None, rfc(stamps[-1]))
    samples = wait_for(lambda: (lambda s: s if metric(s, "billing_source_catchup_running", source_id="a") == 0
                                else None)(metrics_of(watcher)), timeout=10, what="catchup_running 0")
    for name in ("billing_source_catchup_remaining_seconds", "billing_source_catchup_eta_seconds"):
        assert [key for key in samples if key[0] == name] == [], name


class TerminateHold:
    """A TCP proxy to PostgreSQL that holds every client's Terminate message until ``release()``: a closed
    connection's backend, and every session lock it holds, then stays until the test lets it go (as it
    can for a moment on any server: closing a connection does not wait for its backend to exit)."""

    TERMINATE = b"X\x00\x00\x00\x04"

    def __init__(self, port: int):
        self.target, self.released = ("127.0.0.1", port), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for args in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src, dst, from_client: bool):
        try:
            while data := src.recv(65536):
                if from_client and data.endswith(self.TERMINATE):
                    self.released.wait(60)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self) -> None:
        self.released.set()
        self.listener.close()


def test_a_run_that_has_answered_no_longer_shows_as_running(db, exporters, cluster):
    db.add_users(A)
    server = exporters([snap(at(1, 5), (A, "", 100, 0))])
    db.set_watermark("a", at(-1))
    proxy = TerminateHold(cluster.port)
    try:
        url = db.url.replace(f":{cluster.port}/", f":{proxy.port}/")
        svc = Service(service_env(db, [source("a", server)], DATABASE_URL=url))
        status, result = svc.post()
        assert (status, result["status"]) == (200, "ok"), result
        (view,) = svc.get("/v1/status")[1]["sources"]
        running = metric(metrics_of(svc), "billing_source_catchup_running", source_id="a")
        assert (view["running"], view["catch_up"], running) == (False, None, 0), view
    finally:
        proxy.release()


# ---- collector: job runs, replays, takeover, crashes, concurrency ------------------------

def test_one_sample_without_profile_charges_price_and_throttles(db, exporters, service):
    db.add_users(A)
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "xhttp", 100, 50))])
    status, result = svc.post()
    assert status == 200 and result["status"] == "ok", result
    assert result["processed_samples"] == 1 and result["written_minutes"] == 1
    assert db.buckets() == [(at(1), f"{ENV}:{NODE}", A, "", "xhttp", 100, 50, 150, 1.0, "rated",
                             "billing-service-v1")]
    (entry,) = db.ledger()
    expected_id = billing.ledger_id(at(1), f"{ENV}:{NODE}", A, "", "xhttp", at(1, 5))
    assert entry == (expected_id, A, at(1), at(2), "traffic_charge", 50 + 100, -75.0, "billing-service-v1", -75.0)
    assert db.quota() == [(A, 0, -75.0, True, "throttled", "active", at(1))]


def test_profile_prices_included_quota_and_multipliers(db, exporters, service):
    db.add_users(A)
    db.set_profile(A, included=100, price=0.5, region=1.2, line=2.0, version="pricing-v2")
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 50))], PRICE_PER_BYTE="7")
    status, result = svc.post()
    assert (status, result["status"]) == (200, "ok")
    (bucket,) = db.buckets()
    assert bucket[7:] == (150, pytest.approx(2.4), "rated", "pricing-v2")
    (entry,) = db.ledger()
    assert entry[5:] == (50, pytest.approx(-60.0), "pricing-v2", pytest.approx(-60.0))
    (state,) = db.quota()
    assert state[1] == 0 and state[2] == pytest.approx(-60.0) and state[3] is True


def test_same_window_twice_writes_once_and_reports_replay(db, exporters, service):
    db.add_users(A)
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 50))])
    first = svc.post()[1]
    db.set_watermark("a", at(-1))  # pull the very same window again
    second = svc.post()[1]
    assert first["written_minutes"] == 1 and first["replayed_minutes"] == 0
    assert second["written_minutes"] == 0 and second["replayed_minutes"] == 1 and second["status"] == "ok"
    assert len(db.buckets()) == 1 and len(db.ledger()) == 1
    assert db.quota()[0][2] == -75.0


def test_counter_reset_rebaselines_without_billing(db, exporters, service):
    db.add_users(A)
    db.set_checkpoint(f"{ENV}:{NODE}", A, 200, 200, at(0))
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 10, 20))])
    status, result = svc.post()
    assert (status, result["status"], result["counter_resets"]) == (200, "ok", 1)
    assert db.buckets() == [] and db.ledger() == [] and db.quota() == []
    assert db.checkpoints() == [(f"{ENV}:{NODE}", A, 10, 20, at(1, 5), 1)]


def test_delta_from_checkpoint(db, exporters, service):
    db.add_users(A)
    db.set_checkpoint(f"{ENV}:{NODE}", A, 100, 100, at(0))
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 130, 160))])
    assert svc.post()[0] == 200
    assert [(b[5], b[6], b[7]) for b in db.buckets()] == [(30, 60, 90)]


COPY_SPECIAL_TAGS = ["", "tab\there", "back\\slash", "new\nline", "cr\rret", "\\N", "\\", "é\\t"]


def test_tags_with_copy_text_specials_are_stored_and_continued_exactly(db, exporters, service):
    """Pages reach PostgreSQL as COPY text: a tag holding a tab, newline, carriage return, backslash or a
    literal \\N (COPY's NULL) is stored as sent, in buckets and checkpoints, and its series continues."""
    db.add_users(A)
    first = [(A, tag, 100 + i, 0) for i, tag in enumerate(COPY_SPECIAL_TAGS)]
    second = [(A, tag, 100 + i + 7, 3) for i, tag in enumerate(COPY_SPECIAL_TAGS)]
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), *first), snap(at(2, 5), *second)])
    status, result = svc.post()
    assert (status, result["status"], result["invalid_samples"]) == (200, "ok", 0), result
    totals = {(b[0], b[4]): b[7] for b in db.buckets()}
    assert totals == {**{(at(1), tag): 100 + i for i, tag in enumerate(COPY_SPECIAL_TAGS)},
                      **{(at(2), tag): 10 for tag in COPY_SPECIAL_TAGS}}
    assert sorted(c[0] for c in db.checkpoints()) == sorted(billing.series_key(f"{ENV}:{NODE}", tag)
                                                            for tag in COPY_SPECIAL_TAGS)
    assert len(db.ledger()) == 2 * len(COPY_SPECIAL_TAGS)


def test_failing_source_is_partial_and_keeps_its_watermark(db, exporters, service):
    db.add_users(A)
    good = exporters([snap(at(1, 5), (A, "", 100, 50))])
    bad = exporters([snap(at(1, 5), (A, "", 100, 50))], node_id="node-b")
    bad.fault = lambda query: (500, b'{"error":"boom"}')
    db.set_watermark("good", at(-1))
    db.set_watermark("bad", at(-1))
    svc = service(db, [source("good", good), source("bad", bad)])
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial")
    assert "bad: exporter_unreachable: exporter answered HTTP 500" in result["error"]
    by_id = {s["source_id"]: s for s in result["source_statuses"]}
    assert by_id["bad"]["last_error"] == "exporter_unreachable: exporter answered HTTP 500" and by_id["bad"]["state"] == "failed"
    assert by_id["good"]["last_error"] == "" and by_id["good"]["state"] == "ok"
    assert db.watermark("bad") == at(-1)
    assert db.watermark("good") == at(1, 5)
    assert [b[1] for b in db.buckets()] == [f"{ENV}:{NODE}"]


def test_all_sources_disabled_is_an_error(db, exporters, service):
    server = exporters()
    svc = service(db, [source("a", server, enabled=False)])
    status, result = svc.post()
    assert (status, result["status"], result["error"]) == (503, "error", "no_source: no enabled source")
    assert server.requests == []
    assert svc.get("/healthz")[0] == 503


def test_unknown_accounts_are_skipped_counted_and_do_not_hold_the_source(db, exporters, service):
    stranger = str(uuid.uuid4())
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [
        snap(at(1), (A, "xhttp", 100, 0), (stranger, "xhttp", 500, 500)),
        snap(at(2), (A, "xhttp", 150, 0), (stranger, "xhttp", 900, 900))])
    status, result = svc.post()
    assert status == 200 and result["status"] == "partial", result
    assert result["unknown_account_samples"] == 2
    assert "a: unknown_accounts: 2 samples" in result["error"]
    assert [(r[2], r[7]) for r in db.buckets()] == [(A, 100), (A, 50)]
    assert {r[1] for r in db.ledger()} == {A} and db.watermark("a") == at(2)


def test_run_log_retention_is_bounded_and_counters_keep_counting(db, exporters, service, monkeypatch):
    monkeypatch.setattr(billing, "RUN_RETENTION", 3)
    _, svc = one_source(db, exporters, service, [])
    results = [svc.post()[1] for _ in range(5)]
    assert [r["status"] for r in results] == ["ok"] * 5
    assert db.q("SELECT count(*) FROM billing_job_runs")[0][0] == 3
    assert [row[0] for row in db.q("SELECT finished_at FROM billing_job_runs ORDER BY id")] == \
        [billing.parse_time(r["finished_at"]) for r in results[2:]]
    assert svc.get("/v1/status")[1]["finished_at"] == results[-1]["finished_at"]
    samples = metrics_of(svc)
    assert metric(samples, "billing_job_runs_total", job="collect-and-rate", status="ok") == 5


def test_a_ranged_reconcile_replays_and_an_account_created_since_starts_at_its_next_snapshot(
        db, exporters, service):
    """A's samples are skipped while it has no users row. Once it has one, a ranged reconcile over the
    old minutes bills nothing again (B is replayed; A's old snapshots are older than what the node has
    applied, so they start no series: otherwise a re-read would bill A at minutes other deliveries of
    the same snapshots never do). A's traffic is in its cumulative counter: the next new snapshot bills
    all of it, once."""
    db.add_users(B)  # A does not exist yet when its samples are first collected
    server, svc = one_source(db, exporters, service, [
        snap(at(1, 5), (A, "", 100, 50), (B, "", 10, 10)),
        snap(at(2, 5), (A, "", 200, 100), (B, "", 20, 20))])
    status, first = svc.post()
    assert (status, first["status"]) == (200, "partial")
    assert first["unknown_account_samples"] == 2 and "a: unknown_accounts: 2 samples" in first["error"]
    assert first["written_minutes"] == 2  # B's two minutes
    assert db.watermark("a") == at(2, 5)  # unknown accounts never hold the watermark back
    assert {row[2] for row in db.buckets()} == {B}

    db.add_users(A)
    before = row_versions(db)
    body = {"source_id": "a", "since": rfc(at(0)), "until": rfc(at(3))}
    status, result = svc.post("reconcile", body)
    assert (status, result["status"], result["job"]) == (200, "ok", "reconcile"), result
    assert (result["written_minutes"], result["replayed_minutes"], result["processed_samples"]) == (0, 4, 4)
    assert row_versions(db) == before and db.watermark("a") == at(2, 5)  # a range moves no watermark
    assert result["source_statuses"][0]["last_completed_until"] == rfc(at(2, 5))
    # An old range (before anything) leaves everything where it is.
    status, old = svc.post("reconcile", {"since": rfc(at(-30)), "until": rfc(at(-20))})
    assert (status, old["status"], old["written_minutes"]) == (200, "ok", 0)
    assert db.watermark("a") == at(2, 5) and row_versions(db) == before

    # The next normal run bills A's whole counter (first sight) in its minute, B's step.
    server.add(snap(at(3, 5), (A, "", 300, 150), (B, "", 20, 20)))
    status, later = svc.post()
    assert (status, later["status"], later["written_minutes"]) == (200, "ok", 1)
    assert [(row[0], row[7]) for row in db.buckets() if row[2] == A] == [(at(3), 450)]
    assert sum(row[7] for row in db.buckets() if row[2] == B) == 40
    assert {row[0]: row[2] for row in db.quota()} == {A: -225.0, B: -20.0}
    assert db.watermark("a") == at(3, 5)

    samples = metrics_of(svc)
    assert metric(samples, "billing_job_runs_total", job="reconcile", status="ok") == 2
    assert metric(samples, "billing_unknown_account_samples_total", job="collect-and-rate") == 2
    assert metric(samples, "billing_written_minutes_total", job="reconcile") == 0


def test_reconcile_without_a_body_or_with_an_empty_object_is_a_normal_run(db, exporters, service):
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 50))])
    status, result = svc.post("reconcile")
    assert (status, result["status"], result["job"], result["written_minutes"]) == (200, "ok", "reconcile", 1)
    assert db.watermark("a") == at(1, 5)
    status, result = svc.post("reconcile", {})
    assert (status, result["status"], result["written_minutes"]) == (200, "ok", 0)
    status, result = svc.post("reconcile", {"source_id": "a"})
    assert (status, result["status"], [s["source_id"] for s in result["source_statuses"]]) == (200, "ok", ["a"])


def db_invariant_rows(db: Db):
    buckets = [row[:3] + (row[4],) + row[5:8] for row in db.buckets()]
    ledger = db.q("""SELECT account_uuid::text, rated_bytes, amount_delta, balance_after, bucket_start FROM billing_ledger
                     ORDER BY created_at, balance_after DESC""")
    quota = {row[0]: (row[1], row[2]) for row in db.quota()}
    return buckets, ledger, quota


def exporter_snapshots(scenario, node, until=None):
    return [snap(stamp, *samples) for stamp, n, samples in scenario.snapshots
            if n == node and (until is None or stamp <= until)]


def peak_windows():
    """PEAK_HOURS values around the scenarios' times (minutes -100..-55), in
    UTC and in a zone with an offset, plus one that wraps midnight."""
    out = [None]
    for zone in ("UTC", "America/New_York"):
        start, end = (at(m).astimezone(ZoneInfo(zone)).strftime("%H:%M") for m in (-92, -70))
        out += [(f"{start}-{end}", zone), (f"{end}-{start}", zone)]
    return out


def peak_of(window):
    if window is None:
        return None
    config = billing.load_config(base_env(PEAK_HOURS=window[0], PEAK_TIMEZONE=window[1]))
    return config.peak


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(max_steps=8, start_minute=-100), data=st.data())
def test_invariants_end_to_end_through_postgres(db, exporters, scenario, data):
    """Random counter series delivered in stages by real exporters of two
    nodes, a second pull source of node-a with stages of its own, and pushes
    of node-b's snapshots (duplicates and out of order included), with random
    page sizes, rewound watermarks, ranged reconciles and peak pricing.
    Whoever delivers a sample first bills it, once: I1-I4 hold against every
    snapshot offered, in the order it was offered."""
    known = scenario.accounts if data.draw(st.booleans(), "all known") else scenario.accounts[1:]
    reset_database(db, known)
    servers = {node: exporters([], node_id=node) for node in NODES}
    twin = exporters([], node_id=NODES[0])  # node-a again, say a second base URL of its exporter
    pulls = [(node, servers[node]) for node in NODES] + [("twin", twin)]
    window = data.draw(st.sampled_from(peak_windows()), "peak hours")
    env = {"PEAK_HOURS": window[0], "PEAK_TIMEZONE": window[1]} if window else {}
    push_source = {"source_id": "push-b", "mode": "push", "expected_node_id": NODES[1], "expected_env": ENV}
    svc = Service(service_env(db, [source(name, server) for name, server in pulls] + [push_source], **env))
    for name, _ in pulls:
        db.set_watermark(name, at(-102))
    times = [stamp for stamp, _, _ in scenario.snapshots]
    # An exporter that has answered "nothing yet" cannot later produce the
    # past (the watermark moved to `until`), so a source's stages start at
    # its node's first snapshot.
    first = {node: min(stamp for stamp, n, _ in scenario.snapshots if n == node)
             for node in {n for _, n, _ in scenario.snapshots}}
    stages = sorted(data.draw(st.lists(st.sampled_from([t for t in times if t >= max(first.values())]),
                                       max_size=3), "stages")) + [times[-1]]
    # What was offered to the service, in order. A pull offers its whole
    # prefix again: whatever lies before its window was offered before and
    # is a replay by now, in the service as in expected_billing.
    offered = []
    for stage in stages:
        twin_stage = data.draw(st.sampled_from([t for t in times if t >= first[NODES[0]]]), "twin stage")
        for name, server in pulls:
            node = NODES[0] if name == "twin" else name
            server.timeline = dx.ListTimeline(node, ENV, exporter_snapshots(scenario, node,
                                                                             twin_stage if name == "twin" else stage))
            server.page_cap = data.draw(st.sampled_from([None, 1, 2, 3]), "page cap")
        if data.draw(st.booleans(), "rewind"):  # backwards only: moving it forward skips data on purpose
            name = data.draw(st.sampled_from([name for name, _ in pulls]))
            db.set_watermark(name, min(db.watermark(name), data.draw(st.sampled_from(times)) - 3 * MINUTE))
        pushable = [s for s in scenario.snapshots if s[1] == NODES[1] and s[0] <= stage]
        for pushed in data.draw(st.lists(st.lists(st.sampled_from(pushable), min_size=1, max_size=3), max_size=2)
                                if pushable else st.just([]), "pushes"):
            form = data.draw(st.sampled_from(["array", "ndjson"] + (["object"] if len(pushed) == 1 else [])))
            snaps = [snap(stamp, *samples) for stamp, _, samples in pushed]
            body = push_body(snaps[0] if form == "object" else snaps, node=NODES[1], ndjson=form == "ndjson")
            status, result = push(svc, body, content_type=NDJSON if form == "ndjson" else "application/json")
            assert status == 200 and result["status"] in ("ok", "partial"), result
            offered.extend(sorted(pushed, key=lambda s: s[0]))
        status, result = svc.post()
        assert status == 200 and result["status"] in ("ok", "partial"), result
        for name, server in pulls:
            node = NODES[0] if name == "twin" else name
            offered.extend(s for s in scenario.snapshots if s[1] == node and
                           s[0] <= (twin_stage if name == "twin" else stage))
        if data.draw(st.booleans(), "reconcile"):
            since = data.draw(st.sampled_from(times), "since") - MINUTE
            body = {"since": rfc(since), "until": rfc(since + data.draw(st.integers(1, 30)) * MINUTE)}
            status, result = svc.post("reconcile", body)
            assert status == 200 and result["status"] in ("ok", "partial"), result
    check_invariants(expected_billing(offered, set(known)), *db_invariant_rows(db), peak=peak_of(window))
    unknown = [a for a in scenario.accounts if a not in known]
    if unknown and any(s[0] in unknown for _, _, samples in scenario.snapshots for s in samples):
        assert "unknown_accounts:" in svc.post("reconcile", {
            "since": rfc(times[0] - MINUTE), "until": rfc(times[-1])})[1]["error"]

    # I4: rewound watermarks, ranged reconciles, other page sizes, pushes again: no row changes.
    before = row_versions(db)
    for name, server in pulls:
        server.page_cap = data.draw(st.sampled_from([None, 1, 2]), "replay page cap")
        db.set_watermark(name, at(-103))
    assert svc.post()[1]["written_minutes"] == 0
    result = svc.post("reconcile", {"since": rfc(times[0] - MINUTE), "until": rfc(times[-1])})[1]
    assert result["written_minutes"] == 0 and result["replayed_minutes"] >= 0
    if any(n == NODES[1] for _, n, _ in scenario.snapshots):
        status, result = push(svc, push_body(exporter_snapshots(scenario, NODES[1]), node=NODES[1]))
        assert (status, result["written_minutes"]) == (200, 0), result
    assert row_versions(db) == before


def backlog(node: str, accounts: list, count: int, seed: int, start_minute: int = -40, step: float = 20.0):
    """`count` snapshots, `step` seconds apart, of random growth, counter
    resets and absences for `accounts` on two inbounds: a catch-up window."""
    rng = random.Random(seed)
    totals = {(a, tag): [0, 0] for a in accounts for tag in ("xhttp", "tcp")}
    snapshots = []
    for i in range(count):
        samples = []
        for (account_id, tag), counter in totals.items():
            roll = rng.random()
            if roll < 0.05:
                continue
            if roll < 0.07:
                counter[0], counter[1] = rng.randrange(0, 100), rng.randrange(0, 100)
            else:
                counter[0] += rng.randrange(0, 5000)
                counter[1] += rng.randrange(0, 20000)
            samples.append((account_id, tag, counter[0], counter[1]))
        snapshots.append(snap(at(start_minute, i * step), *samples))
    return snapshots


class PageGate:
    """An exporter fault hook that holds the `n`th page request until released:
    the collecting worker then sits between two page transactions."""

    def __init__(self, server, n: int):
        self.n, self.seen = n, 0
        self.reached, self.release = threading.Event(), threading.Event()
        self.server, self.previous = server, server.fault
        server.fault = self._hook

    def _hook(self, query):
        self.seen += 1
        if self.seen == self.n:
            self.reached.set()
            self.release.wait(60)
        return self.previous(query) if self.previous else None

    def remove(self) -> None:
        self.release.set()
        self.server.fault = self.previous


class LedgerFreeze:
    """Holds billing_ledger locked against inserts: the next page transaction
    stops inside write_page, after its bucket upserts, before its ledger rows."""

    def __init__(self, cluster, db: Db):
        self.db = db
        self.conn = psycopg2.connect(db.url)
        with self.conn.cursor() as cur:
            cur.execute("LOCK TABLE billing_ledger IN EXCLUSIVE MODE")

    def blocked_backend(self):
        rows = self.db.q("""SELECT pid FROM pg_stat_activity WHERE datname = current_database()
                            AND wait_event_type = 'Lock' AND query ILIKE '%%billing_ledger%%'""")
        return rows[0][0] if rows else None

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def pages_applied(db: Db, source_id: str, first: datetime, per_page: timedelta) -> int:
    """Pages a catch-up has committed, read off its watermark: each page moves
    it to the page's last snapshot (snapshots ``per_page`` apart from ``first``)."""
    mark = db.watermark(source_id)
    return 0 if mark is None or mark < first else int((mark - first) / per_page) + 1


def backend_gone(db: Db, pid: int) -> bool:
    return not db.q("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))


def reference_facts(cluster, server, known, sources=None, with_balance=True):
    """The facts an uninterrupted, sequential run bills from the same exporters."""
    ref = Db(cluster.new_database())
    try:
        reset_database(ref, known)
        for s in sources or [source("a", server)]:
            ref.set_watermark(s["source_id"], at(-60))
        status, result = Service(service_env(ref, sources or [source("a", server)])).post()
        assert status == 200 and result["status"] in ("ok", "partial"), result
        return ref.facts(with_balance)
    finally:
        ref.close()


CRASH_ACCOUNTS = [A, B] + [account(n) for n in range(10, 130)]


def test_sigkill_at_any_point_of_a_catch_up_loses_and_doubles_nothing(cluster, db, exporters, gunicorns):
    """SIGKILL gunicorn (master and workers) mid-page, between pages and at an
    arbitrary moment, restart it each time: the facts equal an uninterrupted
    run's, row for row, balances included."""
    server = exporters(backlog(NODE, CRASH_ACCOUNTS, 90, seed=7))
    server.page_cap = 2  # 45 pages
    expected = reference_facts(cluster, server, CRASH_ACCOUNTS)
    assert len(expected["ledger"]) > 10000
    reset_database(db, CRASH_ACCOUNTS)
    db.set_watermark("a", at(-60))
    env = service_env(db, [source("a", server)])

    def run_in_background(svc):
        def post():
            try:
                svc.post()
            except requests.RequestException:
                pass  # killed under it: that is the point
        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        return thread

    # 1. Mid-page: the page transaction has written its buckets, not its ledger rows.
    svc = gunicorns(env)
    thread = run_in_background(svc)
    def applied():  # pages of 2 snapshots, 20 s apart
        return pages_applied(db, "a", at(-40, 20), timedelta(seconds=40))

    wait_for(lambda: applied() >= 5, what="5 pages")
    freeze = LedgerFreeze(cluster, db)
    pid = wait_for(freeze.blocked_backend, what="a page transaction blocked on the ledger")
    svc.kill()
    freeze.release()
    wait_for(lambda: backend_gone(db, pid), what="the killed worker's backend to end")
    thread.join(10)
    assert 5 <= applied() < 45 and db.buckets() != expected["buckets"]

    # 2. Between pages: the worker waits on the exporter for its next page.
    svc = gunicorns(env)
    gate = PageGate(server, 8)
    thread = run_in_background(svc)
    assert gate.reached.wait(60), svc.output()[-3000:]
    svc.kill()
    gate.remove()
    thread.join(10)

    # 3. Whenever: as soon as two more pages have committed.
    svc = gunicorns(env)
    previous = applied()
    thread = run_in_background(svc)
    wait_for(lambda: applied() >= previous + 2, what="two pages of a new run")
    svc.kill()
    thread.join(10)

    # Finally an undisturbed run finishes the backlog.
    svc = gunicorns(env)
    status, result = svc.post()
    assert status == 200 and result["status"] == "ok", result
    assert db.facts() == expected
    assert db.watermark("a") == at(-40, 89 * 20.0)


def test_connection_terminated_mid_page_loses_and_doubles_nothing(cluster, db, exporters):
    """pg_terminate_backend on the collecting connection while its page
    transaction is half written, twice: the source fails cleanly (no secret
    in the error), the next runs finish, and the facts equal an
    uninterrupted run's."""
    server = exporters(backlog(NODE, CRASH_ACCOUNTS, 60, seed=11))
    server.page_cap = 2
    expected = reference_facts(cluster, server, CRASH_ACCOUNTS)
    reset_database(db, CRASH_ACCOUNTS)
    db.set_watermark("a", at(-60))
    svc = Service(service_env(db, [source("a", server)]))
    for pages in (3, 12):  # 2 snapshots per page, 20 s apart
        answers = []
        thread = threading.Thread(target=lambda: answers.append(svc.post()))
        thread.start()
        wait_for(lambda: pages_applied(db, "a", at(-40, 20), timedelta(seconds=40)) >= pages, what=f"{pages} pages")
        freeze = LedgerFreeze(cluster, db)
        pid = wait_for(freeze.blocked_backend, what="a page transaction blocked on the ledger")
        assert db.one("SELECT pg_terminate_backend(%s)", (pid,)) == (True,)
        freeze.release()
        thread.join(60)
        (status, result), = answers
        # Pages committed before the connection died stay: progress, so partial, not an error.
        assert (status, result["status"], result["source_statuses"][0]["state"]) == (200, "partial", "failed"), result
        error = result["source_statuses"][0]["last_error"]
        assert error in ("database: unavailable", "database: AdminShutdown"), error
        assert DB_PASSWORD not in json.dumps(result)
        assert db.facts() != expected
    status, result = svc.post()
    assert status == 200 and result["status"] == "ok", result
    assert db.facts() == expected


def test_workers_and_simultaneous_jobs_over_shared_accounts_bill_like_one_sequential_run(
        cluster, db, exporters, gunicorns):
    """Three gunicorn workers, each with its collector thread, plus 8
    simultaneous collect/reconcile calls, over two sources that bill the same
    accounts: no deadlock, no error, and the rows of one sequential run."""
    accounts = CRASH_ACCOUNTS[:60]
    servers = [exporters(backlog(node, accounts, 30, seed=n), node_id=node) for n, node in enumerate(NODES)]
    for server in servers:
        server.page_cap = 3
    sources = [source(node, server) for node, server in zip(NODES, servers)]
    expected = reference_facts(cluster, None, accounts, sources, with_balance=False)
    reset_database(db, accounts)
    for node in NODES:
        db.set_watermark(node, at(-60))
    svc = gunicorns(service_env(db, sources, COLLECT_INTERVAL="1s"), workers=3)
    window = {"since": rfc(at(-45)), "until": rfc(at(-20))}
    calls = [("collect-and-rate", None), ("reconcile", None), ("reconcile", window),
             ("reconcile", {**window, "source_id": NODES[1]})] * 2
    answers = [None] * len(calls)

    def call(i):
        answers[i] = svc.post(*calls[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for status, result in answers:
        assert (status, result["status"]) in ((200, "ok"), (409, "busy")), result
    status, result = svc.post()  # whatever was busy above is done now
    assert status == 200 and result["status"] == "ok", result
    svc.stop()
    output = svc.output()
    assert "deadlock" not in output.lower() and "Traceback" not in output
    facts = db.facts(with_balance=False)
    # Included quota goes to whichever page comes first, so B's rows may
    # split differently; its totals may not.
    for table in ("buckets", "checkpoints"):
        assert facts[table] == expected[table], table
    assert [r for r in facts["ledger"] if r[1] != B] == [r for r in expected["ledger"] if r[1] != B]
    assert [r[:4] + r[5:] for r in facts["quota"] if r[0] != B] == \
        [r[:4] + r[5:] for r in expected["quota"] if r[0] != B]
    # B's ledger and quota, whatever the split: I3 against the (equal) buckets.
    billed = {}
    for _, node, account_id, _, line, _, _, total, *_ in facts["buckets"]:
        billed[(node, account_id, line)] = billed.get((node, account_id, line), 0) + total
    check_invariants(billed, *db_invariant_rows(db))


def original_service_state(db: Db, snapshots, last_at: datetime, price: float, initial_balance: float):
    """Write what the original Go service leaves in the shared database after
    billing ``snapshots`` up to ``last_at``: one checkpoint per (env:node,
    account) holding the last sample it processed (whatever the inbound),
    buckets and ledger rows of its last billed minute (established ids),
    balances, and the source's watermark. Returns the rows it wrote."""
    node = f"{ENV}:{NODE}"
    last, per_minute, billed = {}, {}, {}
    for stamp, samples in snapshots:
        if stamp > last_at:
            break
        for account_id, tag, up, down in samples:
            previous = last.get(account_id)  # one checkpoint per account: inbounds overwrite each other
            step = (up + down) if previous is None else max(0, up - previous[0]) + max(0, down - previous[1])
            last[account_id] = (up, down, stamp)
            billed[account_id] = billed.get(account_id, 0) + step
            if billing.minute_floor(stamp) == billing.minute_floor(last_at):
                per_minute[(account_id, tag)] = per_minute.get((account_id, tag), 0) + step
    for account_id, (up, down, stamp) in last.items():
        db.set_checkpoint(node, account_id, up, down, stamp)
        db.q("""INSERT INTO account_quota_states (account_uuid, remaining_included_quota, current_balance, arrears,
                throttle_state, suspend_state, last_rated_bucket_at) VALUES (%s, 0, %s, false, 'normal', 'active', %s)""",
             (account_id, initial_balance - price * billed[account_id], billing.minute_floor(last_at)))
    minute = billing.minute_floor(last_at)
    for (account_id, tag), total in per_minute.items():
        db.q("""INSERT INTO traffic_minute_buckets (bucket_start, node_id, account_uuid, region, line_code, uplink_bytes,
                downlink_bytes, total_bytes, multiplier, rating_status, source_revision)
                VALUES (%s, %s, %s, '', %s, %s, 0, %s, 1, 'rated', 'billing-service-go')""",
             (minute, node, account_id, tag, total, total))
        entry = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{rfc(minute)}|{node}|{account_id}||{tag}"))
        db.q("""INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
                amount_delta, balance_after, pricing_rule_version) VALUES (%s, %s, %s, %s, 'traffic_charge', %s, %s,
                %s, 'billing-service-go')""",
             (entry, account_id, minute, minute + MINUTE, total, -price * total, initial_balance - price * total))
    db.set_watermark("a", last_at)
    return {"ledger": db.ledger(), "buckets": db.buckets()}


def take_over(db: Db) -> None:
    """What an operator's first deploy over the original's database does: schema.sql, applied where no
    release of this service has run (no billing_inherited_checkpoints, no billing_job_runs), records
    every plain-key checkpoint as the original's."""
    db.q("DROP TABLE billing_inherited_checkpoints, billing_job_runs")
    db.q(open(os.path.join(ROOT, "schema.sql")).read())


def test_takeover_from_the_original_service_bills_every_byte_after_it_exactly_once(db, exporters, service):
    """The shared database holds the original service's state; this service
    is pointed at it. One tagged account continues from the original's
    checkpoint, one untagged account simply continues, one account with two
    inbounds re-baselines each (never more than its truth, at most one sample
    interval less). The original's ledger rows stay as they are, nothing
    collides, balances continue, and a second run or a reconcile changes
    nothing."""
    tagged, untagged, two = account(41), account(42), account(43)
    db.add_users(tagged, untagged, two)
    snapshots = []
    for i in range(16):  # every 20 s from minute 1: sub-minute samples
        n = i + 1
        snapshots.append((at(1, 20 * i), [(tagged, "xhttp", 100 * n, 10 * n), (untagged, "", 50 * n, 5 * n),
                                          (two, "xhttp", 1000 * n, 0), (two, "tcp", 300 * n, 30 * n)]))
    price, initial = 0.5, 100000.0
    last_at = at(3, 20)  # the original's last sample; the next one falls in its last billed minute
    original = original_service_state(db, snapshots, last_at, price, initial)
    take_over(db)
    assert len(db.q("SELECT * FROM billing_inherited_checkpoints")) == 3
    balances_before = {row[0]: row[2] for row in db.quota()}
    server = exporters([snap(t, *s) for t, s in snapshots])
    svc = service(db, [source("a", server)], PRICE_PER_BYTE=str(price))

    status, result = svc.post()
    assert (status, result["status"], result["already_billed"]) == (200, "ok", 0), result
    assert db.watermark("a") == snapshots[-1][0]

    def truth(account_id, tag):
        totals = [s[2] + s[3] for t, samples in snapshots for s in samples if s[:2] == (account_id, tag)]
        return totals[-1] - totals[7]  # what came after the original's last sample (the 8th)

    def bytes_of(rows):
        out = {}
        for bucket in rows:
            out[bucket[2]] = out.get(bucket[2], 0) + bucket[7]
        return out

    # Ours = everything in the buckets now minus what the original had written
    # (its last minute's buckets also received our later samples of that minute).
    now, before = bytes_of(db.buckets()), bytes_of(original["buckets"])
    billed = {account_id: now[account_id] - before.get(account_id, 0) for account_id in now}
    assert billed[tagged] == truth(tagged, "xhttp") == 8 * 110
    assert billed[untagged] == truth(untagged, "") == 8 * 55
    full, interval = truth(two, "xhttp") + truth(two, "tcp"), 1000 + 330  # one 20 s step of each inbound
    assert billed[two] == full - interval
    # The original's ledger rows are untouched, and none of ours collided with them.
    assert [row for row in db.ledger() if row[7] == "billing-service-go"] == original["ledger"]
    assert len({row[0] for row in db.ledger()}) == len(db.ledger())
    # Balances continue from the original's.
    for account_id, balance in {row[0]: row[2] for row in db.quota()}.items():
        assert balance == pytest.approx(balances_before[account_id] - price * billed[account_id])
    # Every series now has its own checkpoint; the original's plain-key rows of tagged series are taken over.
    assert {row[0] for row in db.checkpoints()} == {f"{ENV}:{NODE}#xhttp", f"{ENV}:{NODE}", f"{ENV}:{NODE}#tcp"}
    assert [row[1] for row in db.checkpoints() if row[0] == f"{ENV}:{NODE}"] == [untagged]
    assert db.q("SELECT * FROM billing_inherited_checkpoints") == []  # every takeover decided, once

    before = row_versions(db)
    assert svc.post()[1]["written_minutes"] == 0
    db.set_watermark("a", at(0))  # an operator rewinds it: replays only
    status, again = svc.post("reconcile", {"source_id": "a", "since": rfc(at(0)), "until": rfc(at(8))})
    assert (status, again["status"], again["written_minutes"]) == (200, "ok", 0), again
    assert svc.post()[1]["written_minutes"] == 0
    assert row_versions(db) == before


def takeover_of_one_account(db, exporters, service, pages, plain=(1000, 100), **env):
    """Account A with the original's plain checkpoint (at minute 1, 0 s); ``pages`` of snapshots are
    delivered one collect run each. Returns the bytes billed per inbound and the last run."""
    db.add_users(A)
    db.set_checkpoint(f"{ENV}:{NODE}", A, plain[0], plain[1], at(1))
    take_over(db)
    server, svc = one_source(db, exporters, service, [], **env)
    for page in pages:
        server.add(*page)
        status, result = svc.post()
        assert status == 200 and result["status"] in ("ok", "partial"), result
    billed = {}
    for bucket in db.buckets():
        billed[bucket[4]] = billed.get(bucket[4], 0) + bucket[7]
    return billed, result


def test_takeover_an_inbound_that_appears_later_is_a_baseline_never_its_lifetime(db, exporters, service):
    """The first page after the takeover carries only xhttp (it continues the original's checkpoint);
    tcp appears in the next page with its whole lifetime counter: a baseline, not a first sight."""
    billed, result = takeover_of_one_account(db, exporters, service, [
        [snap(at(2, 5), (A, "xhttp", 1100, 120))],
        [snap(at(3, 5), (A, "xhttp", 1200, 140), (A, "tcp", 44000, 0))],
        [snap(at(4, 5), (A, "xhttp", 1300, 160), (A, "tcp", 44300, 20))]])
    assert billed == {"xhttp": 120 + 120 + 120, "tcp": 320}
    assert result["status"] == "ok" and result["already_billed"] == 0


def test_takeover_counters_below_the_original_checkpoint_are_a_baseline_not_a_reset(db, exporters, service):
    """The plain row held another inbound's (higher) totals: the one series' first sample after it is
    recorded, not billed and not counted as a counter reset; its growth after that is billed."""
    billed, result = takeover_of_one_account(db, exporters, service, [
        [snap(at(2, 5), (A, "xhttp", 300, 10))], [snap(at(3, 5), (A, "xhttp", 350, 20))]])
    assert billed == {"xhttp": 60}
    assert db.q("SELECT sum(counter_resets), sum(baselined) FROM billing_job_totals") == [(0, 1)]


def test_takeover_untagged_beside_tagged_samples_both_baseline(db, exporters, service):
    """A first snapshot after the takeover with an untagged and a tagged sample of the account: the
    original's one row cannot tell which counter it held, so each is a baseline; the plain key stays
    the untagged series' own."""
    billed, _ = takeover_of_one_account(db, exporters, service, [
        [snap(at(2, 5), (A, "", 5000, 500), (A, "xhttp", 1100, 110))],
        [snap(at(3, 5), (A, "", 5100, 510), (A, "xhttp", 1150, 120))]])
    assert billed == {"": 110, "xhttp": 60}
    assert sorted(row[0] for row in db.checkpoints()) == [f"{ENV}:{NODE}", f"{ENV}:{NODE}#xhttp"]


def push_baseline_node(db, service):
    return service(db, [push_source("p", first_sight="baseline")])


def test_first_sight_baseline_does_not_depend_on_how_snapshots_are_grouped(db, service):
    """first_sight "baseline" on a node whose first snapshot is empty: the same two snapshots in one
    pushed body or in two bill the same, nothing (the counters are from before billing was attached)."""
    db.add_users(A)
    first, second = snap(at(1, 5)), snap(at(2, 5), (A, "", 10**9, 10**9))
    status, result = push(push_baseline_node(db, service), push_body([first, second]))
    assert (status, result["status"], result["baselined"]) == (200, "ok", 1), result
    one_body = (db.buckets(), db.checkpoints(), db.quota())
    assert one_body == ([], [(f"{ENV}:{NODE}", A, 10**9, 10**9, at(2, 5), 0)], [])
    reset_database(db, [A])
    svc = push_baseline_node(db, service)
    for body in (first, second):
        assert push(svc, push_body(body))[0] == 200
    assert (db.buckets(), db.checkpoints(), db.quota()) == one_body


def test_first_sight_baseline_an_account_unknown_at_first_is_baselined_when_recorded(db, service):
    """Under "baseline", account B has no users row in the node's first snapshots; once it exists, its
    first recorded sample is a baseline, never its pre-attach counter."""
    db.add_users(A)
    svc = push_baseline_node(db, service)
    assert push(svc, push_body(snap(at(1, 5), (A, "", 100, 0), (B, "", 7000, 700))))[1]["unknown_account_samples"] == 1
    db.add_users(B)
    for minute, (a_up, b_up) in ((2, (150, 7100)), (3, (170, 7300))):
        status, result = push(svc, push_body(snap(at(minute, 5), (A, "", a_up, 0), (B, "", b_up, 700))))
        assert (status, result["status"]) == (200, "ok"), result
    assert sorted((row[2], row[7]) for row in db.buckets()) == sorted([(A, 50), (A, 20), (B, 200)])


def test_first_sight_bill_bills_accounts_new_to_the_node_and_baselines_new_series_of_known_ones(
        db, exporters, service):
    """first_sight "baseline" (node-a) records every new series; "bill" (node-b) bills a new account's
    whole counter, but a new series beside the account's other series on the node (a new inbound, an
    exporter switching from tagged to untagged samples) is a baseline: its counter may hold bytes
    billed under another key."""
    db.add_users(A, B, C)
    old = exporters([snap(at(1, 5), (A, "x", 5000, 500), (B, "", 7000, 0)),
                     snap(at(2, 5), (A, "x", 5100, 510), (B, "", 7000, 20)),
                     snap(at(3, 5), (A, "x", 5200, 520), (B, "", 7000, 40), (C, "x", 30, 3))])
    old.page_cap = 1
    billed = exporters([snap(at(1, 5), (A, "x", 5000, 500)),
                        snap(at(2, 5), (A, "", 5100, 510), (B, "x", 9, 1)),
                        snap(at(3, 5), (A, "", 5200, 520), (B, "x", 19, 1))], node_id="node-b")
    for name in ("old", "billed"):
        db.set_watermark(name, at(-1))
    svc = service(db, [source("old", old, first_sight="baseline"), source("billed", billed)])
    status, result = svc.post()
    assert (status, result["status"], result["baselined"]) == (200, "ok", 4), result
    per_series = {}
    for bucket in db.buckets():
        per_series[(bucket[1], bucket[2], bucket[4])] = per_series.get((bucket[1], bucket[2], bucket[4]), 0) + bucket[7]
    assert per_series == {(f"{ENV}:{NODE}", A, "x"): 220, (f"{ENV}:{NODE}", B, ""): 40,
                          (f"{ENV}:node-b", A, "x"): 5500, (f"{ENV}:node-b", A, ""): 110,
                          (f"{ENV}:node-b", B, "x"): 20}


def test_a_run_stopped_by_its_page_budget_always_moves_the_watermark(db, exporters, service):
    """Snapshots every 20 s, one per page, MAX_PAGES_PER_RUN=1: the pages inside the 2-minute overlap
    before the watermark cost no budget, so every run bills one new snapshot and moves on."""
    db.add_users(A)
    stamps = [at(1, 20 * i) for i in range(12)]
    server, svc = one_source(db, exporters, service, [snap(t, (A, "", 10 * (i + 1), 0)) for i, t in enumerate(stamps)],
                             watermark_minute=0, MAX_PAGES_PER_RUN=1)
    server.page_cap = 1
    marks = []
    for _ in range(len(stamps)):
        status, result = svc.post()
        assert status == 200 and result["status"] in ("ok", "partial"), result
        marks.append(db.watermark("a"))
    assert marks == stamps  # one snapshot further every run, whatever the overlap holds
    assert result["status"] == "ok" and sum(row[7] for row in db.buckets()) == 120


def test_a_duplicated_series_in_one_snapshot_is_invalid_whichever_comes_first(db, exporters, service):
    """The same (uuid, inbound_tag) twice in one snapshot: neither value is trusted (both invalid,
    counted under "duplicate"), the rest of the snapshot is billed, and the exporter's order changes
    nothing."""
    db.add_users(A, B)
    server, svc = one_source(db, exporters, service, [
        snap(at(1, 5), (A, "x", 100, 0), (B, "", 10, 0)),
        snap(at(2, 5), (A, "x", 3000, 0), (A, "x", 2400, 0), (B, "", 20, 0)),
        snap(at(3, 5), (A, "x", 2400, 0), (A, "x", 3000, 0), (B, "", 30, 0)),
        snap(at(4, 5), (A, "x", 3100, 0), (B, "", 40, 0))])
    status, result = svc.post()
    assert (status, result["status"], result["invalid_samples"]) == (200, "partial", 4), result
    assert result["invalid_by_reason"] == {"duplicate": 4} and "duplicate 4" in result["error"]
    assert result["counter_resets"] == 0
    assert {row[2]: 0 for row in db.buckets()} == {A: 0, B: 0}
    totals = {}
    for row in db.buckets():
        totals[row[2]] = totals.get(row[2], 0) + row[7]
    assert totals == {A: 3100, B: 40}  # A: 100, then 3000 from 100 to 3100 in minute 4
    samples = metrics_of(svc)
    assert metric(samples, "billing_invalid_samples_by_reason_total", job="collect-and-rate", reason="duplicate") == 4


@pytest.mark.parametrize("where", ["page", "snapshot", "config"])
def test_a_colon_in_env_is_refused_so_storage_nodes_stay_unambiguous(db, exporters, service, where):
    """env "a" with node "b:c" and env "a:b" with node "c" would both be storage node a:b:c."""
    if where == "config":
        with pytest.raises(billing.ConfigError, match="expected_env must not contain ':'"):
            billing.load_config(base_env(EXPORTER_SOURCES_JSON=json.dumps([push_source("p", env="a:b")])))
        return
    db.add_users(A)
    server = exporters([snap(at(1, 5), (A, "", 100, 0), **({"env": "a:b"} if where == "snapshot" else {}))],
                       env="a:b" if where == "page" else ENV)
    db.set_watermark("a", at(-1))
    status, result = service(db, [{"source_id": "a", "base_url": server.url}]).post()
    assert (status, result["status"]) == (503, "error"), result
    assert "env contains ':'" in result["error"] and db.buckets() == []


# ---- I7: the same snapshots, delivered in any split, write the same facts ------------------

I7_START = at(-100)


@st.composite
def split_streams(draw):
    """One node's snapshots: accounts whose inbounds appear late, growth, resets and absences, empty
    snapshots, invalid and duplicated samples; C without a users row until snapshot ``known_from``."""
    count = draw(st.integers(2, 7))
    tags = {a: draw(st.sampled_from([("",), ("x",), ("x", "y"), ("", "x")])) for a in (A, B, C)}
    appear = {(a, t): draw(st.integers(0, count - 1)) if i else 0 for a in tags for i, t in enumerate(tags[a])}
    totals = {key: [draw(st.integers(0, 9000)), draw(st.integers(0, 900))] for key in appear}
    stamp, snapshots = I7_START + timedelta(seconds=draw(st.integers(0, 59))), []
    for i in range(count):
        stamp += timedelta(seconds=draw(st.sampled_from([7, 20, 30, 61, 125])))
        samples = []
        for (account_id, tag), counter in totals.items():
            action = draw(st.sampled_from(["grow", "grow", "same", "absent", "reset"]))
            if i < appear[account_id, tag] or action == "absent" or draw(st.integers(0, 9)) == 0:
                continue
            if action == "grow":
                counter[0] += draw(st.integers(0, 5000))
                counter[1] += draw(st.integers(0, 500))
            elif action == "reset":
                counter[:] = [draw(st.integers(0, max(0, counter[0] - 1))), draw(st.integers(0, 500))]
            samples.append((account_id, tag, *counter))
        if samples and draw(st.integers(0, 4)) == 0:  # the same series twice, other counters
            account_id, tag, up, down = samples[draw(st.integers(0, len(samples) - 1))]
            samples.append((account_id, tag, up + 1, down))
        if draw(st.integers(0, 4)) == 0:
            samples.append(("not-a-uuid", "", 5, 5))
        snapshots.append((stamp, samples))
    return snapshots, draw(st.sampled_from([0, 1, count - 1, None]))


@st.composite
def delivery_plans(draw, count: int, known_from):
    """Consecutive chunks of the stream, each pulled (a page cap; runs cut by MAX_PAGES_PER_RUN; the
    worker restarted between runs, or not) or pushed (in bodies of any size, as JSON or NDJSON)."""
    cuts = sorted({0, count, *([known_from] if known_from else []),
                   *draw(st.lists(st.integers(1, count - 1), max_size=3))})
    chunks = []
    for start, end in zip(cuts, cuts[1:]):
        if draw(st.booleans()):
            chunks.append(("pull", start, end, draw(st.sampled_from([None, 1, 2])), draw(st.booleans())))
        else:
            sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=end - start))
            chunks.append(("push", start, end, sizes, draw(st.booleans())))
    return draw(st.sampled_from([1, 2, 10000])), chunks


def original_leftovers(db: Db, snapshots, draw_choices) -> None:
    """The original service's state before the stream: for the accounts chosen, one plain checkpoint
    (totals at, below or above the account's first sample), its last minute's bucket and ledger row, a
    balance (some below zero with no arrears_since); then the first deploy records them as inherited."""
    node = f"{ENV}:{NODE}"
    firsts = {}
    for _, samples in snapshots:
        for account_id, tag, up, down in samples:
            firsts.setdefault(account_id, (up, down))
    for account_id, (shift, balance) in draw_choices.items():
        if account_id not in firsts:
            continue
        up, down = firsts[account_id]
        db.set_checkpoint(node, account_id, max(0, up + shift), down, I7_START - MINUTE + timedelta(seconds=30))
        minute = I7_START - MINUTE
        db.q("""INSERT INTO traffic_minute_buckets (bucket_start, node_id, account_uuid, region, line_code,
                uplink_bytes, downlink_bytes, total_bytes, rating_status) VALUES (%s, %s, %s, '', '', 40, 0, 40, 'rated')""",
             (minute, node, account_id))
        db.q("""INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
                amount_delta, balance_after) VALUES (%s, %s, %s, %s, 'traffic_charge', 40, -20, %s)""",
             (str(uuid.uuid5(uuid.NAMESPACE_OID, f"{rfc(minute)}|{node}|{account_id}||")), account_id, minute,
              minute + MINUTE, balance))
        db.q("INSERT INTO account_quota_states (account_uuid, current_balance, arrears) VALUES (%s, %s, %s)",
             (account_id, balance, balance < 0))
    take_over(db)


def add_accounts(db: Db, *accounts) -> None:
    """users rows and, where PROFILES has one, the billing profile (pricing_of prices by them)."""
    for account_id in accounts:
        if not db.q("SELECT 1 FROM users WHERE uuid = %s", (account_id,)):
            db.add_users(account_id)
            if account_id in PROFILES:
                db.set_profile(account_id, **PROFILES[account_id])


def deliver(db: Db, exporter, snapshots, known_from, plan, first_sight: str) -> None:
    budget, chunks = plan
    env = service_env(db, [source("pull", exporter, first_sight=first_sight),
                           push_source("push", first_sight=first_sight)],
                      MAX_PAGES_PER_RUN=budget, ARREARS_SUSPEND_THRESHOLD="off")
    svc = Service(env)
    db.set_watermark("pull", I7_START - 3 * MINUTE)
    for kind, start, end, how, flag in chunks:
        if known_from is not None and start >= known_from:
            add_accounts(db, C)
        if kind == "push":
            position = start
            for size in how:
                if position >= end:
                    break
                body = [snap(t, *samples) for t, samples in snapshots[position:min(end, position + size)]]
                status, result = push(svc, push_body(body, ndjson=flag), content_type=NDJSON if flag else
                                      "application/json")
                assert status == 200 and result["status"] in ("ok", "partial"), result
                position += size
            if position < end:
                body = [snap(t, *samples) for t, samples in snapshots[position:end]]
                assert push(svc, push_body(body))[0] == 200
            continue
        exporter.timeline = dx.ListTimeline(NODE, ENV, [snap(t, *samples) for t, samples in snapshots[:end]])
        exporter.page_cap = how
        for _ in range(3 * (end + 2)):  # a budget of one page moves the watermark one page a run
            status, result = svc.post()
            assert status == 200 and result["status"] in ("ok", "partial"), result
            if db.watermark("pull") >= snapshots[end - 1][0]:
                break
            if flag:  # the worker restarts between runs: nothing in memory carries over
                svc.close()
                svc = Service(env)
        assert db.watermark("pull") >= snapshots[end - 1][0]
    svc.close()


def split_facts(db: Db) -> dict:
    facts = db.facts()
    facts["arrears_since"] = db.q("""SELECT account_uuid::text, arrears_since < %s FROM account_quota_states
                                     ORDER BY 1""", (I7_START + 60 * MINUTE,))  # traffic time, or the sweep's
    facts["inherited"] = db.q("SELECT node_id, account_uuid::text FROM billing_inherited_checkpoints ORDER BY 1, 2")
    return facts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(stream=split_streams(), data=st.data())
def test_the_same_snapshots_split_any_way_write_the_same_facts(cluster, exporters, stream, data):
    """I7 through PostgreSQL: one node's snapshot stream (inbounds appearing late, resets, empty
    snapshots, unknown accounts, invalid and duplicated samples), over an empty database or the
    original service's leftovers (balances below zero without arrears_since among them), under
    first_sight bill or baseline, delivered in two different splits (pull pages of any size, push
    bodies of any grouping, pulls and pushes interleaved, runs cut by MAX_PAGES_PER_RUN, restarts):
    the same buckets, ledger rows (ids and amounts), checkpoints, balances, quota and account states.
    Then I1 (without takeover), I2, I3 exactly, and I4 (the whole stream again changes no row)."""
    snapshots, known_from = stream
    first_sight = data.draw(st.sampled_from(["bill", "baseline"]), "first_sight")
    leftovers = data.draw(st.sampled_from([{}, {A: (0, -5.5), B: (-3, 12.0)}, {A: (700, 3.0), C: (0, -1.0)}]),
                          "the original's leftovers")
    plans = [data.draw(delivery_plans(len(snapshots), known_from), f"plan {i}") for i in range(2)]
    facts = []
    for plan in plans:
        db = Db(cluster.new_database())
        try:
            add_accounts(db, A, B, *([C] if known_from == 0 or C in leftovers else []))
            original_leftovers(db, snapshots, leftovers)
            balances = {row[0]: billing.as_decimal(row[2]) for row in db.quota()}
            deliver(db, exporters(), snapshots, known_from, plan, first_sight)
            facts.append(split_facts(db))
            buckets, ledger, quota = db_invariant_rows(db)
            ours = [row for row in ledger if row[4] >= I7_START]  # the original's ledger row lies before
            for account_id, (_, balance) in quota.items():  # I3, to the last digit
                start = balances.get(account_id, Decimal(0))
                assert start + sum(money(r[2]) for r in ours if r[0] == account_id) == money(balance)
            for _, _, _, _, up, down, total in buckets:  # I2
                assert total == up + down
            if not leftovers:  # I1 against the stream as the service sees it
                known = [(t, NODE, [s for s in samples if s[0] != C or (known_from is not None and i >= known_from)])
                         for i, (t, samples) in enumerate(snapshots)]
                counts = collections.Counter((i, s[0], s[1]) for i, (_, _, samples) in enumerate(known) for s in samples)
                known = [(t, n, [s for s in samples if counts[i, s[0], s[1]] == 1])
                         for i, (t, n, samples) in enumerate(known)]
                check_invariants(expected_billing(known, {A, B, C}, first_sight), buckets,
                                 ledger, quota)
            # I4: the whole stream again, pulled from the start and pushed in one body, changes no row.
            before = row_versions(db)
            server = exporters([snap(t, *samples) for t, samples in snapshots])
            replay = Service(service_env(db, [source("pull", server, first_sight=first_sight),
                                              push_source("push", first_sight=first_sight)]))
            db.set_watermark("pull", I7_START - 3 * MINUTE)
            assert replay.post()[1]["written_minutes"] == 0
            assert push(replay, push_body([snap(t, *samples) for t, samples in snapshots]))[1]["written_minutes"] == 0
            replay.close()
            assert row_versions(db) == before
        finally:
            db.close()
            cluster.drop_database(db.url)
    assert facts[0] == facts[1]


def test_an_existing_ledger_id_is_already_billed_and_never_wedges_the_source(db, exporters, service, app_log):
    """A ledger id that is already in billing_ledger (its checkpoint restored
    from an older backup, say) means that increment is billed: no bytes, money
    or quota again, counted and logged once; the rest of the page is billed and
    the source moves on."""
    db.add_users(A, B)
    planted = billing.ledger_id(at(2), f"{ENV}:{NODE}", A, "", "xhttp", at(2, 5))
    db.q("""INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
            amount_delta, balance_after, pricing_rule_version) VALUES (%s, %s, %s, %s, 'traffic_charge', 7, -3.5,
            -3.5, 'elsewhere')""", (planted, A, at(2), at(3)))
    db.set_checkpoint(f"{ENV}:{NODE}#xhttp", A, 100, 0, at(1, 5))
    _, svc = one_source(db, exporters, service, [snap(at(2, 5), (A, "xhttp", 130, 0), (B, "xhttp", 9, 0)),
                                                 snap(at(3, 5), (A, "xhttp", 150, 0), (B, "xhttp", 10, 0))])
    status, result = svc.post()
    assert (status, result["status"], result["already_billed"]) == (200, "ok", 1), result
    assert db.watermark("a") == at(3, 5)
    assert [(b[0], b[7]) for b in db.buckets() if b[2] == A] == [(at(3), 20)]  # minute 2's 30 bytes: billed elsewhere
    assert [c[2:5] for c in db.checkpoints() if c[1] == A] == [(150, 0, at(3, 5))]  # it still moved past it
    assert {row[0]: row[2] for row in db.quota()} == {A: -10.0, B: -5.0}
    (logged,) = events(app_log, "run")
    assert logged["already_billed"] == 1
    samples = metrics_of(svc)
    assert metric(samples, "billing_already_billed_total", job="collect-and-rate") == 1


def test_two_sources_of_one_node_under_concurrency_bill_like_one_sequential_pass(cluster, db, exporters, gunicorns):
    """Two sources deliver the same node (two base URLs of one exporter), with
    2 gunicorn workers collecting every second and 8 simultaneous collect and
    ranged-reconcile calls: one writer per storage node, so the facts equal
    one sequential pass of one source, balances included."""
    accounts = CRASH_ACCOUNTS[:40]
    snapshots = backlog(NODE, accounts, 24, seed=5)
    first, second = exporters(snapshots), exporters(snapshots)
    for server in (first, second):
        server.page_cap = 3
    expected = reference_facts(cluster, first, accounts)
    reset_database(db, accounts)
    sources = [source("a", first), source("a-again", second)]
    for s in sources:
        db.set_watermark(s["source_id"], at(-60))
    svc = gunicorns(service_env(db, sources, COLLECT_INTERVAL="1s"), workers=2)
    window = {"since": rfc(at(-45)), "until": rfc(at(-20))}
    calls = [("collect-and-rate", None), ("reconcile", {**window, "source_id": "a"}),
             ("reconcile", {**window, "source_id": "a-again"}), ("reconcile", window)] * 2
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        answers = list(pool.map(lambda call: svc.post(*call), calls))
    for status, result in answers:
        assert (status, result["status"]) in ((200, "ok"), (409, "busy")), result
    status, result = svc.post()
    assert (status, result["status"]) == (200, "ok"), result
    svc.stop()
    assert "deadlock" not in svc.output().lower() and "Traceback" not in svc.output()
    assert db.facts() == expected


def everything_visible(svc, results, lines, caplog) -> dict:
    out = {"result " + str(i): json.dumps(r) for i, r in enumerate(results)}
    for path in ("/v1/status", "/healthz", "/metrics", "/api/ping"):
        out[path] = svc.client.get(path).get_data(as_text=True)
    for path in ("/v1/status", "/healthz"):  # what the job token shows: the error texts, redacted
        out[f"{path} with the token"] = svc.client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).get_data(
            as_text=True)
    out["service log"] = "\n".join(lines)
    out["other loggers"] = caplog.text
    return out


def test_no_secret_leaves_the_process(db, exporters, tls_exporters, pki, tmp_path, app_log, caplog):
    caplog.set_level(logging.DEBUG)
    db.add_users(A)
    token_file = tmp_path / "token"
    token_file.write_text(SECRET_FILE_TOKEN)
    good = tls_exporters([snap(at(1, 5), (A, "", 100, 50))], require_client_cert=True)
    refusing = exporters([snap(at(1, 5), (A, "", 1, 1))], node_id="node-401", tokens=["some-other-token"])
    # A hostile exporter that reflects the bearer token it was given into the page.
    reflecting = exporters([], node_id="node-echo", tokens=[SECRET_FILE_TOKEN])
    reflecting.fault = lambda query: (200, json.dumps(page_doc(
        [snap(at(1, 5), (A, "", 1, 1))], node_id=reflecting.requests[-1][1].split(" ", 1)[1])).encode())
    closed = free_port()
    sources = [source("good", good, ca_bundle=pki.ca_path, client_cert=pki.client_cert, client_key=pki.client_key),
               source("refusing", refusing, token_env="EXPORTER_TOKEN"),
               source("reflecting", reflecting, token_file=str(token_file)),
               {"source_id": "closed", "base_url": f"http://127.0.0.1:{closed}/exporter"}]
    for s in sources:
        db.set_watermark(s["source_id"], at(-1))
    svc = Service(service_env(db, sources, EXPORTER_TOKEN=SECRET_ENV_TOKEN))
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial"), result
    errors = {s["source_id"]: s["last_error"] for s in result["source_statuses"]}
    assert errors["good"] == "" and errors["refusing"] == "exporter_unreachable: exporter answered HTTP 401"
    assert errors["reflecting"] == "wrong_node: page of node_id '***' env 'prod' is not what this source expects " \
        "('node-echo' env 'prod')"
    assert errors["closed"] == "exporter_unreachable: could not connect to the exporter"
    assert "since=" not in result["error"] and "127.0.0.1" not in result["error"]  # no requests text, no URL
    # Wrong job tokens, repeatedly, by both headers.
    for headers in ({"Authorization": f"Bearer {WRONG_TOKEN}"}, {"X-Service-Token": WRONG_TOKEN},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
        assert svc.post(token=None, headers=headers) == (401, {"error": "missing or wrong service token"})
    failures = events(app_log, "auth_failed")  # one line per few seconds: the next one counts the rest
    assert [f["suppressed"] for f in failures] == [0] and failures[0]["path"] == "/v1/jobs/collect-and-rate"
    visible = everything_visible(svc, [result], app_log, caplog)
    assert_no_secret(visible, [TOKEN, DB_PASSWORD, SECRET_FILE_TOKEN, SECRET_ENV_TOKEN, WRONG_TOKEN, pki.key_secret])
    assert "***" in visible["/v1/status with the token"]  # the reflected token was stored redacted
    assert "node_id" not in visible["/v1/status"] and "wrong_node" in visible["/v1/status"]  # categories only


@pytest.mark.parametrize("dsn", [
    "postgresql://billing:{pw}@127.0.0.1:{port}/account",
    "postgres://billing@127.0.0.1:{port}/account?password={pw}&connect_timeout=2",
    "host=127.0.0.1 port={port} user=billing password={pw} dbname=account",
    "wrong password"])
def test_database_down_or_refusing_the_service_starts_and_reveals_no_password(
        dsn, cluster, exporters, app_log, caplog):
    caplog.set_level(logging.DEBUG)
    password = DB_PASSWORD
    if dsn == "wrong password":
        password = "pw-Wrong-Secret-77aa11bb"
        dsn, port = "postgresql://billing:{pw}@127.0.0.1:{port}/billing_template", cluster.port
    else:
        port = free_port()  # nothing listens there
    url = dsn.format(pw=password, port=port)
    server = exporters([])
    svc = Service(service_env(types.SimpleNamespace(url=url), [source("a", server)]))
    status, health = svc.get("/healthz")
    assert status == 503 and health["status"] == "error" and health["message"] == "database: unavailable"
    assert svc.get("/v1/status")[0] == 503
    metrics = svc.client.get("/metrics")
    assert metrics.status_code == 200 and "billing_database_up 0" in metrics.get_data(as_text=True)
    assert svc.get("/api/ping")[0] == 200
    status, result = svc.post()
    assert (status, result["status"]) == (503, "error") and result["error"] == "a: database: unavailable", result
    assert server.requests == []
    assert events(app_log, "source_failed") and events(app_log, "run_not_recorded")
    details = [e["detail"] for e in events(app_log, "database_error")]  # libpq's own words, for the operator
    assert details and all("127.0.0.1" in detail for detail in details), details
    visible = everything_visible(svc, [result, health], app_log, caplog)
    assert_no_secret(visible, [password, url, TOKEN])


def test_gunicorn_with_the_database_down_serves_probes_and_leaks_nothing(exporters, gunicorns, tmp_path):
    server = exporters([])
    token_file = tmp_path / "token"
    token_file.write_text(SECRET_FILE_TOKEN)
    database_url = f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{free_port()}/account"
    env = {"DATABASE_URL": database_url, "INTERNAL_SERVICE_TOKEN": TOKEN, "COLLECT_INTERVAL": "1s",
           "EXPORTER_SOURCES_JSON": json.dumps([source("a", server, token_file=str(token_file))])}
    svc = gunicorns(env, workers=1)
    url = svc.url
    health = requests.get(url + "/healthz", timeout=10)
    assert health.status_code == 503 and health.json()["message"] == "database: unavailable"
    assert requests.get(url + "/v1/status", timeout=10).status_code == 503
    for _ in range(3):
        response = requests.post(url + "/v1/jobs/collect-and-rate", timeout=10,
                                 headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
        assert response.status_code == 401 and response.json() == {"error": "missing or wrong service token"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = requests.post(url + "/v1/jobs/reconcile", data=b" " * (70 * 1024), headers=auth, timeout=10)
    assert response.status_code == 413 and response.json()["error"].startswith("request body is larger")
    chunked = requests.post(url + "/v1/jobs/reconcile", headers=auth, timeout=10,
                            data=(b" " * 8192 for _ in range(10)))  # no Content-Length: chunked
    assert chunked.status_code == 413 and chunked.headers["Content-Type"] == "application/json"
    response = requests.post(url + "/v1/jobs/collect-and-rate", headers=auth, timeout=30)
    assert response.status_code == 503 and response.json()["error"] == "a: database: unavailable"
    assert DB_PASSWORD not in response.text
    wait_for(lambda: svc.output().count('"event": "source_failed"') >= 2, timeout=15,
             what="the collector thread to fail a run on its own")
    svc.stop()
    log = svc.output()
    assert log.count('"event": "auth_failed"') == 1 and '"suppressed": 0' in log  # one line per few seconds
    assert_no_secret({"gunicorn output": log, "health": health.text},
                     [DB_PASSWORD, database_url, TOKEN, WRONG_TOKEN, SECRET_FILE_TOKEN])
    assert "Traceback" not in log


def test_max_pages_per_run_is_partial_moves_the_watermark_and_the_next_run_continues(db, exporters, service):
    """MAX_PAGES_PER_RUN=2 against five one-snapshot pages: the run is a 200
    `partial` (source state `partial`, not failed), the watermark stands at the
    second page's snapshot, /healthz stays 200, and the next run goes on."""
    db.add_users(A)
    # Three minutes apart: the 2-minute overlap re-reads only the watermark's own snapshot.
    stamps = [at(1 + 3 * i, 5) for i in range(5)]
    server, svc = one_source(db, exporters, service,
                             [snap(t, (A, "", 100 * (i + 1), 0)) for i, t in enumerate(stamps)],
                             MAX_PAGES_PER_RUN=2)
    server.page_cap = 1
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial"), result
    state = by_source(result)["a"]
    assert (state["state"], state["pages"]) == ("partial", 2), state
    assert "MAX_PAGES_PER_RUN" in state["error"] and "MAX_PAGES_PER_RUN" in result["error"]
    assert db.watermark("a") == stamps[1]
    assert len(db.buckets()) == 2
    assert svc.get("/healthz") == (200, {"status": "ok", "message": ""})

    # The next run re-reads the watermark's page for free (the overlap) and takes two new pages.
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial"), result
    assert by_source(result)["a"]["pages"] == 3
    assert db.watermark("a") == stamps[3] and len(db.buckets()) == 4
    status, result = svc.post()
    assert (status, result["status"]) == (200, "ok"), result
    assert db.watermark("a") == stamps[4]
    assert sum(row[7] for row in db.buckets()) == 500  # every byte once, none twice
    assert svc.get("/healthz")[0] == 200


def test_a_run_interrupted_by_worker_shutdown_is_partial_not_error(db, exporters, service):
    """The worker stops (the collector's stop event, what gunicorn's
    worker_exit sets) while the exporter holds the second page: the committed
    pages stay, the run is a 200 `partial`, and /healthz stays 200."""
    db.add_users(A)
    stamps = [at(1 + 3 * i, 5) for i in range(3)]
    server, svc = one_source(db, exporters, service,
                             [snap(t, (A, "", 100 * (i + 1), 0)) for i, t in enumerate(stamps)])
    server.page_cap = 1
    gate = PageGate(server, 2)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(svc.post)
        try:
            assert gate.reached.wait(30), "the second page was never asked for"
            svc.app.extensions["billing_collector"]._stop.set()
        finally:
            gate.remove()
        status, result = running.result(timeout=60)
    assert (status, result["status"]) == (200, "partial"), result
    state = by_source(result)["a"]
    assert state["state"] == "partial" and "interrupted" in state["error"], state
    assert state["pages"] == 2 and len(server.requests) == 2  # no third page asked for after the stop
    assert db.watermark("a") == stamps[1] and len(db.buckets()) == 2
    assert svc.get("/healthz") == (200, {"status": "ok", "message": ""})


def test_a_vanishing_quota_row_fails_its_source_and_the_others_still_bill(db, exporters, service):
    """A rule swallows inserts into account_quota_states: the source whose page
    needs a new quota row fails with a last_error about that row; the source
    whose accounts already have quota rows bills; the run is recorded."""
    db.add_users(A, B)
    first = exporters([snap(at(1, 5), (A, "", 100, 0))])
    second = exporters([snap(at(1, 5), (B, "", 200, 0))], node_id="node-b")
    db.set_watermark("a", at(-1))
    db.set_watermark("b", at(-1))
    db.q("""INSERT INTO account_quota_states (account_uuid, remaining_included_quota, current_balance)
            VALUES (%s, 0, 1000)""", (B,))
    db.q("CREATE RULE no_quota AS ON INSERT TO account_quota_states DO INSTEAD NOTHING")
    svc = service(db, [source("a", first), source("b", second)])
    status, result = svc.post()
    assert (status, result["status"]) == (200, "partial"), result
    states = by_source(result)
    assert states["a"]["state"] == "failed" and states["b"]["state"] == "ok", states
    assert "quota row" in states["a"]["last_error"], states["a"]
    assert db.watermark("a") == at(-1) and db.watermark("b") == at(1, 5)
    assert [(row[2], row[7]) for row in db.buckets()] == [(B, 200)]
    assert db.q("SELECT status FROM billing_job_runs") == [("partial",)]
    # The text names an account: the job token shows it, the open view only its category.
    status, shown = svc.get("/v1/status", token=TOKEN)
    assert status == 200 and shown["status"] == "partial"
    assert "quota row" in {s["source_id"]: s for s in shown["sources"]}["a"]["last_error"]
    assert A in shown["error"] and A in shown["errors"][0]["message"]
    status, shown = svc.get("/v1/status")
    assert {s["source_id"]: s for s in shown["sources"]}["a"]["last_error"] == "internal"
    assert shown["error"] == "a: internal" and A not in json.dumps(shown)


def latin1_database(cluster) -> Db:
    name = f"latin1_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = cluster.admin()
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' "
                        "LC_COLLATE 'C' LC_CTYPE 'C' OWNER billing")
    finally:
        admin.close()
    url = cluster.url(name)
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        for path in (os.path.join(ROOT, "deploy", "users_stub.sql"), os.path.join(ROOT, "schema.sql")):
            with open(path, encoding="utf-8") as handle:
                cur.execute(handle.read())
    conn.close()
    return Db(url)


def test_a_tag_the_database_cannot_encode_fails_only_its_source(cluster, exporters, service):
    """On a LATIN1 database an inbound_tag "東京" cannot be stored: that
    source fails with a last_error saying so; an ASCII source bills in the same run."""
    latin = latin1_database(cluster)
    try:
        latin.add_users(A, B)
        tokyo = exporters([snap(at(1, 5), (A, "東京", 100, 0))])
        plain = exporters([snap(at(1, 5), (B, "xhttp", 200, 0))], node_id="node-b")
        latin.set_watermark("tokyo", at(-1))
        latin.set_watermark("plain", at(-1))
        svc = service(latin, [source("tokyo", tokyo), source("plain", plain)])
        status, result = svc.post()
        assert (status, result["status"]) == (200, "partial"), result
        states = by_source(result)
        assert states["tokyo"]["state"] == "failed" and states["plain"]["state"] == "ok", states
        # "database error: UntranslatableCharacter" (the service talks UTF8 whatever the database's
        # encoding), not the "QueryCanceled" psycopg2 reports for a COPY the client could not encode.
        assert re.search(r"encod|latin|charset|translat|character", states["tokyo"]["last_error"], re.I), \
            states["tokyo"]
        assert latin.watermark("tokyo") == at(-1) and latin.watermark("plain") == at(1, 5)
        assert [(row[2], row[4], row[7]) for row in latin.buckets()] == [(B, "xhttp", 200)]
        assert latin.q("SELECT status FROM billing_job_runs") == [("partial",)]
    finally:
        latin.close()


def test_a_collector_thread_run_finding_every_source_busy_records_nothing_but_http_says_409(
        db, exporters, service):
    """Another writer holds the only source: the collector thread's run
    (wait=0) is no news, so neither billing_job_runs nor billing_job_totals
    gain a row; an HTTP job in the same situation answers 409."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0))])
    collector = svc.app.extensions["billing_collector"]
    holder = psycopg2.connect(db.url)
    try:
        assert billing.try_lock_source(holder, "a")
        result = collector.run("collect-and-rate", wait=0)
        assert result["status"] == "busy" and by_source(result)["a"]["state"] == "busy", result
        assert db.q("SELECT count(*) FROM billing_job_runs") == [(0,)]
        assert db.q("SELECT count(*) FROM billing_job_totals") == [(0,)]
        status, result = svc.post()
        assert (status, result["status"]) == (409, "busy"), result
    finally:
        holder.close()
    assert server.requests == [] and db.buckets() == []


def test_written_minutes_counts_bucket_rows_and_counter_resets_are_reported(db, exporters, service, app_log):
    """Nine snapshots 15 s apart for five accounts: written_minutes is the
    number of (minute, account) buckets written (15), not the 45 samples; a
    counter reset is counted in the result, the run log line and /metrics."""
    accounts = [A, B, C, D, E]
    db.add_users(*accounts)
    # 1:45 alone on the first page (a run asks for one snapshot first), then
    # minutes 2 and 3 whole on the second: no bucket is written by two pages.
    stamps = [at(1, 45 + 15 * i) for i in range(9)]
    snapshots = []
    for i, stamp in enumerate(stamps):
        samples = [(a, "", 1000 * (i + 1) + n, 0) for n, a in enumerate(accounts)]
        if i == 5:  # 3:00: E's counter restarts
            samples[4] = (E, "", 10, 0)
        elif i > 5:
            samples[4] = (E, "", 10 + 100 * (i - 5), 0)
        snapshots.append(snap(stamp, *samples))
    server, svc = one_source(db, exporters, service, snapshots)
    status, result = svc.post()
    assert (status, result["status"]) == (200, "ok"), result
    assert by_source(result)["a"]["pages"] == 2
    rows = db.buckets()
    assert len(rows) == 15 == len({(row[0], row[2]) for row in rows})
    assert result["processed_samples"] == 45 and len(db.ledger()) == 44
    assert result["written_minutes"] == 15, result
    assert result["counter_resets"] == 1 and by_source(result)["a"]["counter_resets"] == 1
    run, = events(app_log, "run")
    assert (run["written_minutes"], run["counter_resets"]) == (15, 1), run
    samples = metrics_of(svc)
    assert metric(samples, "billing_counter_resets_total", job="collect-and-rate") == 1
    assert metric(samples, "billing_written_minutes_total", job="collect-and-rate") == 15


# Push across an untrusted network: the page slot shared by a catch-up and
# pushes, counts and errors a run reports, a source held without progress.

class HeldPages:
    """An exporter fault hook that holds every page request until the test
    lets it through: while one is held, the collecting worker waits between
    two page transactions."""

    def __init__(self, server):
        self.server, self.previous = server, server.fault
        self.arrived, self.go, self.open = threading.Semaphore(0), threading.Semaphore(0), False
        server.fault = self._hook

    def _hook(self, query):
        if not self.open:
            self.arrived.release()
            self.go.acquire(timeout=60)
        return self.previous(query) if self.previous else None

    def remove(self) -> None:
        self.open = True
        for _ in range(100):
            self.go.release()
        self.server.fault = self.previous


def sweep_waiting(db: Db) -> bool:
    return db.q("""SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND wait_event_type = 'Lock' AND query LIKE '%%WITH due AS%%'""")[0][0] > 0


def test_pushes_during_a_long_catch_up_take_the_page_slot_between_its_pages(db, exporters, gunicorns):
    """One gunicorn worker catches up a backlog (48 snapshots of 300
    accounts, pages of 4) while another node pushes to it: a push while the
    catch-up waits for its next page is applied at once (the slot is held
    for a page's parse and transaction only); a push as the page arrives
    waits for that page at most; a push whose arrears sweep is held up by a
    lock elsewhere has already left the slot: the catch-up's next page
    commits meanwhile. Every push is a 200 (never 503 busy)."""
    accounts = [account(n) for n in range(500, 800)]
    db.add_users(*accounts, A, D)
    db.q("INSERT INTO account_quota_states (account_uuid, remaining_included_quota, current_balance) "
         "VALUES (%s, 0, -5)", (D,))  # a debtor: the sweep that ends a push takes its row
    snapshots = backlog(NODE, accounts, 48, seed=5)
    server = exporters(snapshots)
    server.page_cap = 4
    db.set_watermark("a", at(-41))
    g = gunicorns(service_env(db, [source("a", server), push_source("p", node="node-p")]), workers=1)
    gate = HeldPages(server)
    pushed, latencies = [], []

    def push_next() -> float:
        stamp = at(0, len(pushed) + 1)
        pushed.append(stamp)
        began = time.monotonic()
        response = requests.post(g.url + PUSH_PATH, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"},
                                 data=push_body(snap(stamp, (A, "", 100 * len(pushed), 0)), node="node-p"))
        took = time.monotonic() - began
        assert response.status_code == 200 and response.json()["status"] == "ok", response.text[:500]
        return took

    try:
        with ThreadPoolExecutor(2) as pool:
            run = pool.submit(g.post)

            def next_page():
                if gate.arrived.acquire(blocking=False):
                    return "page"
                return "done" if run.done() else None

            held = 0
            while wait_for(next_page, timeout=60, what="the next page request or the run's end") == "page":
                held += 1
                latencies.append(("waiting for its page", push_next()))
                if held == 3:
                    db.q("UPDATE account_quota_states SET arrears = false, arrears_since = NULL "
                         "WHERE account_uuid = %s", (D,))  # due for the sweep again
                    locker = psycopg2.connect(db.url)
                    try:
                        with locker.cursor() as cur:
                            cur.execute("SELECT 1 FROM account_quota_states WHERE account_uuid = %s FOR UPDATE", (D,))
                        stuck = pool.submit(push_next)
                        wait_for(lambda: db.watermark("p") == pushed[-1] and sweep_waiting(db),
                                 what="a push committed, its sweep waiting for a row lock")
                        mark = db.watermark("a")
                        gate.go.release()
                        wait_for(lambda: db.watermark("a") > mark, timeout=20,
                                 what="the catch-up's page to commit while the push's sweep waits")
                        assert not stuck.done()
                    finally:
                        locker.close()
                    stuck.result(timeout=60)
                    continue
                gate.go.release()
                latencies.append(("as its page arrives", push_next()))
            status, result = run.result(timeout=120)
    finally:
        gate.remove()
    assert (status, result["status"]) == (200, "ok"), result
    assert held >= 10 and by_source(result)["a"]["pages"] == held, (held, result)
    slow = [(when, round(took, 2)) for when, took in latencies if took > (3 if when == "waiting for its page" else 6)]
    assert slow == [], slow
    assert db.watermark("a") == billing.parse_time(snapshots[-1]["collected_at"])
    assert db.watermark("p") == pushed[-1]
    assert sum(row[7] for row in db.buckets() if row[1] == f"{ENV}:node-p") == 100 * len(pushed)


def test_baselined_series_are_counted_in_the_result_the_run_log_and_metrics(db, exporters, service, app_log):
    """first_sight "baseline": each new series' first sample is recorded,
    not billed, and counted as baselined in the run (and its source's)
    result, the JSON run log line and billing_baselined_total by job; a
    push counts its own."""
    db.add_users(A, B)
    server = exporters([snap(at(1, 5), (A, "xhttp", 5000, 500), (A, "", 70, 0), (B, "", 700, 0)),
                        snap(at(2, 5), (A, "xhttp", 5100, 510), (A, "", 90, 0), (B, "", 750, 0))])
    db.set_watermark("a", at(-1))
    svc = service(db, [source("a", server, first_sight="baseline"),
                       push_source("p", node="node-p", first_sight="baseline")])
    status, result = svc.post()
    assert (status, result["status"], result["baselined"]) == (200, "ok", 3), result
    assert by_source(result)["a"]["baselined"] == 3
    assert sum(row[7] for row in db.buckets()) == 110 + 20 + 50  # the growth after the baselines only
    run, = events(app_log, "run")
    assert (run["status"], run["baselined"]) == ("ok", 3), run
    status, result = push(svc, push_body([snap(at(1, 5), (A, "", 9000, 0)), snap(at(2, 5), (A, "", 9010, 0))],
                                         node="node-p"))
    assert (status, result["status"], result["baselined"]) == (200, "ok", 1), result
    assert svc.post()[1]["baselined"] == 0  # nothing new: nothing counted twice
    samples = metrics_of(svc)
    assert metric(samples, "billing_baselined_total", job="collect-and-rate") == 3
    assert metric(samples, "billing_baselined_total", job="push") == 1
    assert db.q("SELECT job, sum(baselined) FROM billing_job_totals GROUP BY 1 ORDER BY 1") == \
        [("collect-and-rate", 3), ("push", 1)]


def sync_row(db: Db, source_id: str):
    return db.one("""SELECT last_completed_until, last_succeeded_at, last_error FROM billing_source_sync_state
                     WHERE source_id = %s""", (source_id,))


def test_a_ranged_reconcile_never_clears_or_sets_the_last_error_of_normal_runs(db, exporters, service):
    """A normal run fails: its last_error stays through a successful ranged
    reconcile (which bills its window but says nothing about the source's
    runs), on the row, /v1/status and /metrics; the next successful normal
    run clears it; a failing ranged reconcile does not set it either."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0))])
    server.fault = lambda query: (500, b'{"error": "down"}')
    status, result = svc.post()
    assert (status, result["status"]) == (503, "error"), result
    failed = sync_row(db, "a")
    assert failed[0] == at(-1) and failed[2] == "exporter_unreachable: exporter answered HTTP 500", failed

    server.fault = server._cap
    window = {"source_id": "a", "since": rfc(at(0)), "until": rfc(at(2))}
    status, result = svc.post("reconcile", window)
    assert (status, result["status"], result["written_minutes"]) == (200, "ok", 1), result
    assert sync_row(db, "a") == failed
    (view,) = svc.get("/v1/status", token=TOKEN)[1]["sources"]
    assert view["last_error"] == failed[2]
    assert metric(metrics_of(svc), "billing_source_last_attempt_failed", source_id="a") == 1

    status, result = svc.post()
    assert (status, result["status"]) == (200, "ok"), result
    cleared = sync_row(db, "a")
    assert cleared[0] == at(1, 5) and cleared[1] is not None and cleared[2] == "", cleared
    assert metric(metrics_of(svc), "billing_source_last_attempt_failed", source_id="a") == 0

    server.fault = lambda query: (500, b'{"error": "down"}')
    status, result = svc.post("reconcile", window)
    assert (status, result["status"]) == (503, "error"), result
    assert sync_row(db, "a") == cleared


def set_run_ages(db: Db, source_id: str, held: float, idle: float) -> None:
    """The source's current run started ``held`` s ago and its watermark last moved ``idle`` s ago."""
    db.q("""UPDATE billing_source_sync_state SET last_attempted_at = now() - make_interval(secs => %s),
              updated_at = now() - make_interval(secs => %s) WHERE source_id = %s""", (held, idle, source_id))


BUSY_STUCK = re.compile(r"busy: another writer has held this source for (\d+)s and not moved its watermark for "
                        r"(\d+)s \(more than 3 x COLLECT_INTERVAL\)")


def test_a_source_held_without_progress_for_over_3_intervals_is_partial_and_one_moving_is_busy(
        db, exporters, service):
    """COLLECT_INTERVAL=10s. Another writer holds the source: when it has
    held it for more than 3 x 10 s and not moved the watermark for as long,
    the run is partial with a busy: reason saying for how long (recorded;
    the open view shows "busy"); when either is younger, or the holder keeps
    moving the watermark through the HTTP run's wait, the source is just
    busy: 409, nothing recorded."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0))], COLLECT_INTERVAL="10s")
    collector = svc.app.extensions["billing_collector"]
    holder = psycopg2.connect(db.url)
    holder.autocommit = True
    assert billing.try_lock_source(holder, "a")
    try:
        set_run_ages(db, "a", 600, 35)
        result = collector.run("collect-and-rate", wait=0)
        assert result["status"] == "partial" and by_source(result)["a"]["state"] == "partial", result
        match = BUSY_STUCK.fullmatch(by_source(result)["a"]["error"])
        assert match and 600 <= int(match[1]) < 610 and 35 <= int(match[2]) < 45, result
        assert result["error"] == f"a: {match[0]}"
        status, shown = svc.get("/v1/status")
        assert (shown["status"], shown["error"]) == ("partial", "a: busy"), shown
        assert svc.get("/v1/status", token=TOKEN)[1]["error"] == result["error"]
        runs = db.q("SELECT count(*) FROM billing_job_runs")

        for held, idle in ((600, 25), (25, 600)):
            set_run_ages(db, "a", held, idle)
            result = collector.run("collect-and-rate", wait=0)
            assert result["status"] == "busy" and by_source(result)["a"]["error"] == "", (held, idle, result)
        assert db.q("SELECT count(*) FROM billing_job_runs") == runs

        # A holder still at work: it moves the watermark while the HTTP run waits BUSY_WAIT_SECONDS.
        set_run_ages(db, "a", 600, 600)
        stop = threading.Event()

        def keep_moving():
            mover = psycopg2.connect(db.url)
            mover.autocommit = True  # each move committed at once, as a page transaction is
            try:
                with mover.cursor() as cur:
                    while not stop.wait(0.5):
                        cur.execute("""UPDATE billing_source_sync_state SET updated_at = now(),
                                         last_completed_until = last_completed_until + interval '1 second'
                                       WHERE source_id = 'a'""")
            finally:
                mover.close()

        with ThreadPoolExecutor(1) as pool:
            moving = pool.submit(keep_moving)
            try:
                status, result = svc.post()
            finally:
                stop.set()
            moving.result(timeout=10)
        assert (status, result["status"], by_source(result)["a"]["error"]) == (409, "busy", ""), result
        assert db.q("SELECT count(*) FROM billing_job_runs") == runs
    finally:
        holder.close()
    assert server.requests == [] and db.buckets() == []


def test_push_then_pull_of_the_same_node_bills_every_byte_once(db, exporters, service):
    """The pusher sent only some snapshots; the pull then delivers them all:
    each series is billed its true traffic once, and what the push already
    covered comes back from the pull as replays."""
    db.add_users(A, B)
    totals = {(A, "xhttp"): [(100 * k * k, 10 * k) for k in range(1, 7)],
              (A, "tcp"): [(7 * k, 1000 + 50 * k) for k in range(1, 7)],
              (B, ""): [(500 + 3 * k * k, 0) for k in range(1, 7)]}
    snapshots = [snap(at(i + 1, 5), *[(a, tag, *values[i]) for (a, tag), values in totals.items()])
                 for i in range(6)]
    server = exporters(snapshots)
    db.set_watermark("pull", at(-1))
    svc = service(db, [source("pull", server), push_source("push")])
    for i in (1, 2, 4):  # minutes 2, 3 and 5, one POST each
        status, result = push(svc, push_body(snapshots[i]))
        assert status == 200 and result["status"] == "ok", result
    status, result = svc.post()
    assert status == 200 and result["status"] == "ok", result
    # Minutes 1 to 5 are covered by the pushed checkpoints (minute 1's and 4's
    # bytes are in the next pushed totals); only minute 6 is new.
    assert (result["processed_samples"], result["replayed_minutes"], result["written_minutes"]) == (18, 15, 3)

    truth = {}
    for (a, tag), values in totals.items():
        billed = sum(values[0])  # first sight bills the whole counter
        for (up0, down0), (up1, down1) in zip(values, values[1:]):
            if up1 >= up0 and down1 >= down0:
                billed += up1 - up0 + down1 - down0
        truth[(f"{ENV}:{NODE}", a, tag)] = billed
    billed = {}
    for _, node, a, _, tag, _, _, total, *_ in db.buckets():
        billed[(node, a, tag)] = billed.get((node, a, tag), 0) + total
    assert billed == truth
    per_account = {A: truth[(f"{ENV}:{NODE}", A, "xhttp")] + truth[(f"{ENV}:{NODE}", A, "tcp")],
                   B: truth[(f"{ENV}:{NODE}", B, "")]}
    rated = {}
    for _, a, _, _, _, rated_bytes, *_ in db.ledger():
        rated[a] = rated.get(a, 0) + rated_bytes
    assert rated == per_account
    assert {r[0]: r[2] for r in db.quota()} == {a: -0.5 * n for a, n in per_account.items()}


def test_eight_pushers_and_a_pull_over_shared_accounts_bill_like_one_sequential_pass(
        cluster, db, exporters, gunicorns):
    """Eight nodes each pushing in order, and a pull of one of them at the
    same time, over the same accounts, under two gunicorn workers: no error,
    no deadlock, and the facts of pushing every body one after the other."""
    accounts = [account(n) for n in range(200, 220)]
    nodes = [f"node-{i}" for i in range(8)]
    timelines = {node: backlog(node, accounts, 10, seed=40 + i) for i, node in enumerate(nodes)}
    bodies = {node: [push_body(s, node=node) for s in snapshots] for node, snapshots in timelines.items()}
    pulled = nodes[3]
    server = exporters(timelines[pulled], node_id=pulled)
    server.page_cap = 3
    pushed = {node: 0 for node in nodes}
    third_push = threading.Event()

    def gate(query):
        # Later pages wait until that node's pusher is under way: both writers meet on the node.
        if "cursor" in query:
            third_push.wait(30)
        return server._cap(query)

    server.fault = gate
    sources = [push_source(f"push-{node}", node=node) for node in nodes] + [source("pull", server)]

    ref = Db(cluster.new_database())
    try:
        ref.add_users(*accounts)
        reference = Service(service_env(ref, sources))
        for node in nodes:
            for body in bodies[node]:
                status, result = push(reference, body)
                assert status == 200 and result["status"] == "ok", result
        expected = ref.facts(with_balance=False)
    finally:
        ref.close()

    db.add_users(*accounts)
    db.set_watermark("pull", at(-60))
    g = gunicorns(service_env(db, sources), workers=2)
    answers = {node: [] for node in nodes}
    start = threading.Barrier(len(nodes) + 1)
    pull_answer = {}

    def pusher(node):
        session = requests.Session()
        start.wait(30)
        for body in bodies[node]:
            response = session.post(g.url + PUSH_PATH, data=body, timeout=60, headers={
                "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            answers[node].append((response.status_code, response.json()))
            pushed[node] += 1
            if node == pulled and pushed[node] == 3:
                third_push.set()

    def puller():
        start.wait(30)
        pull_answer["result"] = g.post()

    threads = [threading.Thread(target=pusher, args=(node,)) for node in nodes] + [threading.Thread(target=puller)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    for node in nodes:
        assert len(answers[node]) == len(bodies[node])
        for status, result in answers[node]:
            assert status == 200 and result["status"] == "ok", (node, result)
    status, result = pull_answer["result"]
    assert status == 200 and result["status"] == "ok", result
    assert result["processed_samples"] == sum(len(s["samples"]) for s in timelines[pulled])
    g.stop()
    output = g.output()
    assert "deadlock" not in output.lower() and "Traceback" not in output

    facts = db.facts(with_balance=False)
    assert facts["buckets"] == expected["buckets"]
    assert facts["checkpoints"] == expected["checkpoints"]
    assert facts["ledger"] == expected["ledger"]
    # No included quota: every amount is price x bytes, the same in any order.
    assert facts["quota"] == expected["quota"]
    assert len(facts["quota"]) == len(accounts) and all(row[2] < 0 for row in facts["quota"])


def peak_hours(first: datetime, end: datetime, zone: str = "UTC") -> str:
    """PEAK_HOURS covering the minutes [first, end) on ``zone``'s wall clock."""
    tz = ZoneInfo(zone)
    return f"{first.astimezone(tz):%H:%M}-{end.astimezone(tz):%H:%M}"


def set_peak(db: Db, account: str, peak, offpeak) -> None:
    db.q("UPDATE account_billing_profiles SET peak_multiplier = %s::float8, offpeak_multiplier = %s::float8 "
         "WHERE account_uuid = %s", (str(peak), str(offpeak), account))


def bucket_multipliers(db: Db, account: str) -> dict:
    return {row[0]: row[8] for row in db.buckets() if row[2] == account}


def ledger_amounts(db: Db, account: str) -> dict:
    return {row[2]: row[6] for row in db.ledger() if row[1] == account}


def put_quota(db: Db, account: str, balance: float, since: str | None = None, suspend: str = "active",
              by_billing: bool = False) -> None:
    """A quota row as another writer left it (an older run, the accounts
    service, the original): ``since`` is how long ago arrears began (an SQL
    interval), None where nobody recorded it; ``by_billing``: the suspension
    is billing-service's own."""
    db.add_users(account)
    db.q("""INSERT INTO account_quota_states (account_uuid, current_balance, arrears, throttle_state,
                                              suspend_state, arrears_since, suspended_by_billing)
            VALUES (%s, %s, %s, %s, %s, now() - %s::interval, %s)""",
         (account, balance, balance < 0, "throttled" if balance < 0 else "normal", suspend, since, by_billing))


def quota_state(db: Db, account: str) -> tuple:
    """(balance, arrears, arrears_since, throttle_state, suspend_state)."""
    return db.one("""SELECT current_balance, arrears, arrears_since, throttle_state, suspend_state
                     FROM account_quota_states WHERE account_uuid = %s""", (account,))


def sweep_service(db, exporters, service, **env) -> Service:
    """A service whose one source has nothing to deliver: its runs only sweep."""
    return one_source(db, exporters, service, [], **env)[1]


PEAK_PROFILE = dict(price=0.5, region=1.5, line=2.0, version="pricing-peak-v3")


PEAK_MINUTES = (0, 1, 2, 3)  # 0: before the window, 1: its start, 2: its last minute, 3: its end


def bill_four_minutes(db, exporters, service, **env) -> dict:
    """A: region 1.5, line 2, peak 3, offpeak 0.5; B: no profile; C: peak
    and offpeak <= 0; D: peak and offpeak not finite. 100 bytes each minute."""
    db.add_users(A, B, C, D)
    for account_id, (peak, offpeak) in ((A, (3, 0.5)), (C, (0, -2)), (D, ("NaN", "Infinity"))):
        db.set_profile(account_id, **PEAK_PROFILE)
        set_peak(db, account_id, peak, offpeak)
    _, svc = one_source(db, exporters, service, [
        snap(at(m, 5), *[(a, "", 100 * (m + 1), 0) for a in (A, B, C, D)]) for m in PEAK_MINUTES], **env)
    status, result = svc.post()
    assert (status, result["status"], result["written_minutes"]) == (200, "ok", 16), result
    return result


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata"])  # Kolkata: +05:30, a half-hour shift
def test_peak_minutes_cost_region_times_line_times_peak_and_the_others_offpeak(db, exporters, service, zone):
    bill_four_minutes(db, exporters, service, PEAK_HOURS=peak_hours(at(1), at(3), zone), PEAK_TIMEZONE=zone)
    minutes = [at(m) for m in PEAK_MINUTES]
    expected = {A: [1.5, 9.0, 9.0, 1.5], B: [1.0] * 4, C: [3.0] * 4, D: [3.0] * 4}
    for account_id, multipliers in expected.items():
        assert bucket_multipliers(db, account_id) == dict(zip(minutes, multipliers)), account_id
        # 100 bytes at the default PRICE_PER_BYTE 0.5 (the profile's price is 0.5 too).
        assert ledger_amounts(db, account_id) == dict(zip(minutes, [-50.0 * m for m in multipliers])), account_id
    versions = {row[1]: row[7] for row in db.ledger()}
    assert versions == {A: "pricing-peak-v3", B: "billing-service-v1", C: "pricing-peak-v3", D: "pricing-peak-v3"}
    assert {(row[2], row[10]) for row in db.buckets()} == set(versions.items())
    assert {row[0]: row[2] for row in db.quota()} == {A: -1050.0, B: -200.0, C: -600.0, D: -600.0}


@pytest.mark.parametrize("env", [{}, {"PEAK_HOURS": ""}], ids=["unset", "empty"])
def test_without_peak_hours_the_peak_and_offpeak_columns_are_ignored(db, exporters, service, env):
    bill_four_minutes(db, exporters, service, **env)
    minutes = [at(m) for m in PEAK_MINUTES]
    for account_id, multiplier in ((A, 3.0), (B, 1.0), (C, 3.0), (D, 3.0)):
        assert bucket_multipliers(db, account_id) == dict.fromkeys(minutes, multiplier), account_id
        assert ledger_amounts(db, account_id) == dict.fromkeys(minutes, -50.0 * multiplier), account_id


def test_ranged_reconcile_prices_old_minutes_by_their_own_time_of_day(db, exporters, service):
    """Six old minutes replayed on purpose, long after they happened: each
    one is priced by its bucket's time of day, not by the time of the run."""
    db.add_users(A)
    db.set_profile(A, **PEAK_PROFILE)
    set_peak(db, A, 3, 0.5)
    old = range(-30, -24)
    _, svc = one_source(db, exporters, service, [snap(at(m, 5), (A, "", 100 * (m + 31), 0)) for m in old],
                        PEAK_HOURS=peak_hours(at(-28), at(-26)))
    body = {"source_id": "a", "since": rfc(at(-31)), "until": rfc(at(-24))}
    status, result = svc.post("reconcile", body)
    assert (status, result["status"], result["written_minutes"]) == (200, "ok", 6), result
    expected = dict(zip([at(m) for m in old], [1.5, 1.5, 9.0, 9.0, 1.5, 1.5]))
    assert bucket_multipliers(db, A) == expected
    assert ledger_amounts(db, A) == {minute: -50.0 * m for minute, m in expected.items()}
    assert db.watermark("a") == at(-1)  # a ranged replay moves no watermark


def test_arrears_since_is_the_bucket_of_the_charge_that_crossed_zero_and_stays_put(db, exporters, service):
    """INITIAL_BALANCE 100, 50 per minute: minute 2 reaches exactly 0 (not
    arrears), minute 3 crosses. Later charges and a replay leave it alone."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0))], INITIAL_BALANCE="100")
    assert svc.post()[1]["status"] == "ok"
    assert quota_state(db, A) == (50.0, False, None, "normal", "active")

    server.add(*[snap(at(m, 5), (A, "", 100 * m, 0)) for m in (2, 3, 4)])  # one page, crossing in its middle
    status, result = svc.post()
    assert (status, result["status"], result["written_minutes"]) == (200, "ok", 3), result
    crossing = db.one("""SELECT bucket_start FROM billing_ledger WHERE account_uuid = %s
                         AND balance_after < 0 AND balance_after - amount_delta >= 0""", (A,))[0]
    assert crossing == at(3)
    assert quota_state(db, A) == (-100.0, True, at(3), "throttled", "active")

    server.add(snap(at(5, 5), (A, "", 500, 0)))
    assert svc.post()[1]["written_minutes"] == 1
    assert quota_state(db, A) == (-150.0, True, at(3), "throttled", "active")

    before = row_versions(db)
    db.set_watermark("a", at(-1))  # replay every charge, the crossing one included
    status, result = svc.post()
    assert (status, result["written_minutes"], result["replayed_minutes"]) == (200, 0, 5), result
    assert row_versions(db) == before


def test_arrears_after_a_top_up_start_at_the_charge_that_crossed_zero_again(db, exporters, service):
    """The accounts service tops a balance up (arrears_since is the sweep's to
    clear), and the next run charges it below zero before its sweep: the new
    arrears began with that charge, not with the old, paid-off ones."""
    db.add_users(A)
    server, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0))])
    assert svc.post()[1]["status"] == "ok"
    assert quota_state(db, A) == (-50.0, True, at(1), "throttled", "active")

    db.q("UPDATE account_quota_states SET current_balance = 20 WHERE account_uuid = %s", (A,))
    server.add(snap(at(2, 5), (A, "", 200, 0)))  # 20 - 50: below zero again
    assert svc.post()[1]["written_minutes"] == 1
    assert quota_state(db, A) == (-30.0, True, at(2), "throttled", "active")


def test_arrears_older_than_the_threshold_suspend_and_younger_ones_do_not(db, exporters, service, app_log):
    put_quota(db, A, -50.0, "2 hours")
    put_quota(db, B, -50.0, "10 minutes")
    put_quota(db, C, 25.0)
    a_since, b_since = quota_state(db, A)[2], quota_state(db, B)[2]
    svc = sweep_service(db, exporters, service, ARREARS_SUSPEND_THRESHOLD="1h")
    status, result = svc.post()
    assert (status, result["status"], result["suspended"], result["lifted"]) == (200, "ok", 1, 0), result
    assert quota_state(db, A) == (-50.0, True, a_since, "throttled", "suspended")
    assert quota_state(db, B) == (-50.0, True, b_since, "throttled", "active")
    assert quota_state(db, C) == (25.0, False, None, "normal", "active")
    (run,) = events(app_log, "run")
    assert (run["suspended"], run["lifted"]) == (1, 0)

    samples = metrics_of(svc)
    assert metric(samples, "billing_suspended_total", job="collect-and-rate") == 1
    assert metric(samples, "billing_lifted_total", job="collect-and-rate") == 0
    assert metric(samples, "billing_accounts_in_arrears") == 2
    assert metric(samples, "billing_accounts_suspended") == 1

    # Already suspended: the next run does not count it again.
    status, again = svc.post("reconcile")
    assert (status, again["suspended"], again["lifted"]) == (200, 0, 0), again
    assert quota_state(db, A)[4] == "suspended"
    samples = metrics_of(svc)
    assert metric(samples, "billing_suspended_total", job="collect-and-rate") == 1
    assert metric(samples, "billing_suspended_total", job="reconcile") == 0
    assert metric(samples, "billing_accounts_suspended") == 1


def test_a_suspended_account_topped_up_to_zero_or_more_is_lifted_by_the_next_run(db, exporters, service):
    put_quota(db, A, -50.0, "2 hours", suspend="suspended", by_billing=True)
    put_quota(db, B, -20.0, "10 minutes")  # in arrears, not suspended
    svc = sweep_service(db, exporters, service, ARREARS_SUSPEND_THRESHOLD="1h")
    status, result = svc.post()
    assert (status, result["suspended"], result["lifted"]) == (200, 0, 0), result

    db.q("UPDATE account_quota_states SET current_balance = -0.01 WHERE account_uuid = %s", (A,))
    status, result = svc.post()
    assert (status, result["suspended"], result["lifted"]) == (200, 0, 0), result
    assert quota_state(db, A)[4] == "suspended"

    # What the accounts service does on a payment: the balance, nothing else.
    db.q("UPDATE account_quota_states SET current_balance = 0 WHERE account_uuid = %s", (A,))
    db.q("UPDATE account_quota_states SET current_balance = 5 WHERE account_uuid = %s", (B,))
    status, result = svc.post()
    assert (status, result["status"], result["suspended"], result["lifted"]) == (200, "ok", 0, 1), result
    assert quota_state(db, A) == (0.0, False, None, "normal", "active")
    assert quota_state(db, B) == (5.0, False, None, "normal", "active")  # cleared, but never suspended
    samples = metrics_of(svc)
    assert metric(samples, "billing_lifted_total", job="collect-and-rate") == 1
    assert metric(samples, "billing_suspended_total", job="collect-and-rate") == 0
    assert metric(samples, "billing_accounts_in_arrears") == 0
    assert metric(samples, "billing_accounts_suspended") == 0
    assert svc.post()[1]["lifted"] == 0


def test_every_debtor_gets_an_arrears_clock_and_is_suspended_after_the_threshold(db, exporters, service):
    """Balances below zero that rating did not take there (the original service's debtors, a negative
    INITIAL_BALANCE, a debit outside rating) have no arrears_since: the next sweep starts their clock
    (now, when it first saw them), and they are suspended once the threshold has passed since then.
    A replay changes nothing."""
    put_quota(db, A, -50.0, None)  # taken over from the original: in arrears, no clock
    db.q("UPDATE account_quota_states SET effective_at = now() - interval '365 days', "
         "updated_at = now() - interval '365 days' WHERE account_uuid = %s", (A,))
    db.add_users(B)
    db.q("INSERT INTO account_quota_states (account_uuid, current_balance) VALUES (%s, -7)", (B,))  # a debit
    db.add_users(C)
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 100, 0), (C, "", 10, 0))],
                        ARREARS_SUSPEND_THRESHOLD="2s", INITIAL_BALANCE="-1")
    begun = datetime.now(UTC)
    status, result = svc.post()
    assert (status, result["status"], result["suspended"], result["written_minutes"]) == (200, "ok", 0, 2), result
    clocks = {account_id: quota_state(db, account_id) for account_id in (A, B, C)}
    assert clocks[A][:2] == (-100.0, True) and clocks[A][3:] == ("throttled", "active")
    assert clocks[B][:2] == (-7.0, True) and clocks[B][3:] == ("throttled", "active")
    # C started below zero (INITIAL_BALANCE -1) and was charged 5 more: no charge crossed zero.
    assert clocks[C][:2] == (-6.0, True) and clocks[C][3:] == ("throttled", "active")
    for account_id in (A, B, C):
        assert begun - timedelta(seconds=1) <= clocks[account_id][2] <= datetime.now(UTC)
    facts = (db.buckets(), db.ledger(), db.checkpoints())
    assert svc.post("reconcile", {"since": rfc(at(0)), "until": rfc(at(2))})[1]["written_minutes"] == 0
    assert (db.buckets(), db.ledger(), db.checkpoints()) == facts  # a replay bills nothing again
    suspended = wait_for(lambda: svc.post()[1]["suspended"], timeout=30, what="the threshold to pass")
    assert suspended == 3 and [quota_state(db, a)[4] for a in (A, B, C)] == ["suspended"] * 3
    assert [quota_state(db, a)[2] for a in (A, B, C)] == [clocks[a][2] for a in (A, B, C)]  # the clocks stay put


def test_the_sweep_lifts_only_the_suspensions_billing_made(db, exporters, service):
    """An account suspended by the accounts service or an administrator (or by anyone before this release)
    stays suspended when its balance is at or above zero; billing's own suspension is lifted."""
    put_quota(db, A, 30.0, None, suspend="suspended")  # an administrator's, for another reason
    put_quota(db, B, 30.0, "3 hours", suspend="suspended", by_billing=True)
    put_quota(db, C, -30.0, "3 hours", suspend="suspended")  # an administrator's, and in arrears too
    svc = sweep_service(db, exporters, service, ARREARS_SUSPEND_THRESHOLD="1h")
    status, result = svc.post()
    assert (status, result["status"], result["suspended"], result["lifted"]) == (200, "ok", 0, 1), result
    assert quota_state(db, A)[4] == "suspended" and quota_state(db, B)[4] == "active"
    assert quota_state(db, C)[4] == "suspended"
    db.q("UPDATE account_quota_states SET current_balance = 5 WHERE account_uuid = %s", (C,))  # C pays
    assert svc.post()[1]["lifted"] == 0
    assert quota_state(db, C) == (5.0, False, None, "normal", "suspended")  # the debt is gone, not its suspension
    assert db.q("SELECT account_uuid::text FROM account_quota_states WHERE suspended_by_billing") == []


@pytest.mark.parametrize("threshold", ["off", "0"])
def test_threshold_off_suspends_nothing_but_still_lifts(db, exporters, service, threshold):
    put_quota(db, A, -50.0, "1000 hours")
    put_quota(db, B, 10.0, "3 hours", suspend="suspended", by_billing=True)  # suspended earlier, paid since
    svc = sweep_service(db, exporters, service, ARREARS_SUSPEND_THRESHOLD=threshold)
    status, result = svc.post()
    assert (status, result["status"], result["suspended"], result["lifted"]) == (200, "ok", 0, 1), result
    assert quota_state(db, A)[0:2] == (-50.0, True) and quota_state(db, A)[4] == "active"
    assert quota_state(db, B) == (10.0, False, None, "normal", "active")
    samples = metrics_of(svc)
    assert metric(samples, "billing_accounts_suspended") == 0 and metric(samples, "billing_accounts_in_arrears") == 1


def test_suspensions_by_a_collector_run_that_found_every_source_busy_are_counted(db, exporters, gunicorns):
    """The collector thread's run finds its only source held by another
    writer; its sweep still suspends an account: that must show in /metrics
    and in a run log line like any other suspension."""
    put_quota(db, A, -50.0, "2 hours")
    server = exporters([])
    db.set_watermark("a", at(-1))
    holder = psycopg2.connect(db.url)
    try:
        assert billing.try_lock_source(holder, "a")
        g = gunicorns(service_env(db, [source("a", server)], COLLECT_INTERVAL="1s",
                                  ARREARS_SUSPEND_THRESHOLD="1h"), workers=1)
        wait_for(lambda: quota_state(db, A)[4] == "suspended", timeout=20, what="the collector's sweep")
        samples = parse_metrics(g.get("/metrics").text)[0]
        assert metric(samples, "billing_accounts_suspended") == 1
        g.stop()
    finally:
        holder.close()
    assert "Traceback" not in g.output()
    assert server.requests == []  # no run got the source: only sweeps ran
    runs = [e for e in our_log_lines(g.output()) if e["event"] == "run"]
    assert metric(samples, "billing_suspended_total", job="collect-and-rate") == 1
    assert sum(run["suspended"] for run in runs) == 1


TRAFFIC = [str(uuid.uuid5(uuid.NAMESPACE_DNS, f"arrears-traffic-{n}.test")) for n in range(40)]
TOGGLED = [str(uuid.uuid5(uuid.NAMESPACE_DNS, f"arrears-toggled-{n}.test")) for n in range(20)]
SWEEP_NODES = ("node-a", "node-b")
START_BALANCE = 500.0


def traffic_backlog(seed: int, count: int = 60, step: float = 10.0):
    """``count`` snapshots from at(-40), ``step`` seconds apart, of every
    TRAFFIC account; returns them and each account's final counter."""
    rng = random.Random(seed)
    totals = dict.fromkeys(TRAFFIC, 0)
    snapshots = []
    for i in range(count):
        for account_id in TRAFFIC:
            totals[account_id] += rng.randrange(1, 400)
        snapshots.append(snap(at(-40, i * step), *[(a, "xhttp", up, 0) for a, up in totals.items()]))
    return snapshots, totals


def test_sweeps_in_parallel_with_page_transactions_keep_every_rule(db, exporters, gunicorns):
    """Two workers (collector threads every second) and threads of POSTs
    catch up two backlogs billing the same 40 accounts into arrears (old
    enough to be suspended at once), while other threads keep sweeping
    (reconciles of an empty source end in a sweep at once) and rewriting
    other accounts' arrears and balances: no deadlock, no error, and
    afterwards the quota rows obey the arrears rules and the ledger adds up."""
    db.add_users(*TRAFFIC)
    for account_id in TOGGLED:
        put_quota(db, account_id, 100.0)
    servers, billed = [], dict.fromkeys(TRAFFIC, 0)
    gate = threading.Event()  # pages wait until the test's own writers are running
    for n, node in enumerate(SWEEP_NODES):
        snapshots, totals = traffic_backlog(seed=n)
        server = exporters(snapshots, node_id=node)
        server.page_cap = 1
        server.fault = lambda query, server=server: (gate.wait(20), server._cap(query))[1]
        servers.append(server)
        db.set_watermark(node, at(-41))
        for account_id, total in totals.items():
            billed[account_id] += total
    idle = exporters([], node_id="node-idle")
    db.set_watermark("idle", at(-1))

    caught_up, errors, toggles, answers, sweeps = threading.Event(), [], [0], [], []

    def toggle():
        """What the accounts service (or time) does to other accounts: one row per statement."""
        writer, rng = Db(db.url), random.Random(7)
        try:
            while not caught_up.is_set():
                account_id, kind = rng.choice(TOGGLED), rng.choice(("old", "young", "top-up"))
                if kind == "top-up":
                    writer.q("UPDATE account_quota_states SET current_balance = %s WHERE account_uuid = %s",
                             (float(rng.randrange(0, 200)), account_id))
                else:
                    writer.q("""UPDATE account_quota_states SET current_balance = %s, arrears = true,
                                throttle_state = 'throttled', arrears_since = now() - %s::interval
                                WHERE account_uuid = %s""",
                             (-float(rng.randrange(1, 200)), "2 hours" if kind == "old" else "5 minutes",
                              account_id))
                toggles[0] += 1
                caught_up.wait(0.01)  # pacing, not waiting for anything: 2 cores are shared
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            writer.close()

    env = service_env(db, [source(node, server) for node, server in zip(SWEEP_NODES, servers)] +
                      [source("idle", idle)],
                      COLLECT_INTERVAL="1s", INITIAL_BALANCE=str(START_BALANCE), ARREARS_SUSPEND_THRESHOLD="1h")
    toggler = threading.Thread(target=toggle)
    toggler.start()
    threads = []
    try:
        g = gunicorns(env, workers=2)
        window = {"since": rfc(at(-41)), "until": rfc(at(-29))}

        def post(calls):
            try:
                for job, body in calls:
                    answers.append(g.post(job, body))
            except Exception as exc:
                errors.append(exc)

        def sweep():
            try:
                while not caught_up.is_set():
                    answer = g.post("reconcile", {"source_id": "idle"})
                    answers.append(answer)
                    sweeps.append((billing.parse_time(answer[1]["finished_at"]), answer[1]["suspended"]))
            except Exception as exc:
                errors.append(exc)

        # Few long POSTs (each holds one of gunicorn's 4 threads per worker while
        # it waits for a busy source), so the sweeping POSTs keep getting through.
        calls = [("collect-and-rate", None), ("reconcile", None), ("reconcile", window)]
        threads = [threading.Thread(target=post, args=([call],)) for call in calls]
        threads += [threading.Thread(target=sweep) for _ in range(3)]
        for thread in threads:
            thread.start()
        gate.set()
        last = at(-40, 59 * 10.0)  # traffic_backlog's last snapshot
        wait_for(lambda: all((db.watermark(node) or at(-41)) >= last for node in SWEEP_NODES),
                 timeout=60, what="both backlogs billed")
    finally:
        gate.set()
        caught_up.set()
        for thread in threads + [toggler]:
            thread.join(60)
    assert not errors, errors
    assert toggles[0] >= 20  # the other accounts really were rewritten while pages ran
    assert len(answers) == len(calls) + len(sweeps)
    for status, result in answers:
        assert (status, result["status"]) in ((200, "ok"), (409, "busy")), result
    # Sweeps really did suspend traffic accounts while their pages were still being written.
    last_charge = db.one("SELECT max(created_at) FROM billing_ledger")[0]
    assert any(suspended and finished < last_charge for finished, suspended in sweeps), sweeps

    # A last deterministic rewrite, then one run: each rule has rows to hold for.
    for i, account_id in enumerate(TOGGLED):
        if i % 3 == 2:
            db.q("UPDATE account_quota_states SET current_balance = 50 WHERE account_uuid = %s", (account_id,))
        else:
            db.q("""UPDATE account_quota_states SET current_balance = -10, arrears = true,
                    throttle_state = 'throttled', arrears_since = now() - %s::interval WHERE account_uuid = %s""",
                 ("2 hours" if i % 3 == 0 else "5 minutes", account_id))
    status, final = wait_for(lambda: (lambda answer: answer if answer[0] == 200 else None)(g.post()),
                             timeout=60, what="a run that is not busy")
    assert final["status"] == "ok", final
    samples = parse_metrics(g.get("/metrics").text)[0]
    g.stop()
    output = g.output()
    assert "Traceback" not in output and "deadlock" not in output.lower()
    events = our_log_lines(output)
    assert not [e for e in events if e["event"] in ("sweep_failed", "source_failed", "database_error",
                                                    "collector_error", "internal_error")], events

    rows = db.q("""SELECT account_uuid::text, current_balance, arrears, arrears_since, suspend_state,
                          arrears_since <= now() - interval '1 hour'
                   FROM account_quota_states""")
    assert len(rows) == len(TRAFFIC) + len(TOGGLED)
    assert [r for r in rows if r[1] < 0 and not r[2]] == []  # in debt: flagged in arrears
    assert [r for r in rows if r[1] < 0 and r[5] and r[4] != "suspended"] == []  # old debt: suspended
    assert [r for r in rows if r[1] >= 0 and (r[4] != "active" or r[2] or r[3] is not None)] == []
    states = {r[0]: r for r in rows}
    assert all(states[a][1] < 0 and states[a][4] == "suspended" for a in TOGGLED[::3])
    assert all(states[a][1] >= 0 for a in TOGGLED[2::3])
    # Every traffic account ran into arrears over an hour ago (buckets from at(-40) on).
    assert all(states[a][1] < 0 and states[a][4] == "suspended" for a in TRAFFIC)

    # I3: every byte billed once, and each balance is the start plus its ledger.
    money = dict(db.q("SELECT account_uuid::text, sum(amount_delta) FROM billing_ledger GROUP BY 1"))
    volume = dict(db.q("SELECT account_uuid::text, sum(total_bytes) FROM traffic_minute_buckets GROUP BY 1"))
    assert volume == billed
    for account_id in TRAFFIC:
        assert money[account_id] == pytest.approx(states[account_id][1] - START_BALANCE), account_id
        assert money[account_id] == pytest.approx(-0.5 * billed[account_id]), account_id

    # Suspensions are only made by sweeps and lifts undo them: the counters
    # must agree with the gauge (the test never writes suspend_state itself).
    assert metric(samples, "billing_accounts_suspended") == sum(r[4] == "suspended" for r in rows)
    suspended = sum(v for k, v in samples.items() if k[0] == "billing_suspended_total")
    lifted = sum(v for k, v in samples.items() if k[0] == "billing_lifted_total")
    assert suspended - lifted == metric(samples, "billing_accounts_suspended")


# -- skips explained: invalid samples by reason, unknown accounts named in the log only ---------------

def raw_sample(account_id, tag, up, down) -> dict:
    return {"uuid": account_id, "email": "user@example.com", "inbound_tag": tag, "uplink_bytes_total": up,
            "downlink_bytes_total": down}


# One sample of each invalid kind; a duplicated series is invalid twice (both of its samples).
ONE_OF_EACH_REASON = {"not_an_object": 1, "bad_counter": 1, "bad_uuid": 1, "bad_label": 1, "duplicate": 2}


def one_of_each_invalid() -> list:
    return ["junk", raw_sample(B, "c", "100", 0), raw_sample("not-a-uuid", "", 1, 1), raw_sample(B, 7, 1, 1),
            raw_sample(B, "dup", 5, 5), raw_sample(B, "dup", 6, 6)]


def invalid_by_reason_metrics(samples: dict, job: str) -> dict:
    found = {reason: metric(samples, "billing_invalid_samples_by_reason_total", job=job, reason=reason)
             for reason in billing.INVALID_REASONS}
    return {reason: value for reason, value in found.items() if value is not None}


def test_invalid_samples_are_counted_by_reason_in_the_result_the_run_log_and_metrics(
        db, exporters, service, app_log):
    """Beside a good sample: the run result, the source's status, the run's log line and /metrics count
    them by reason; the counters add up over runs; a push's are counted under job "push"."""
    db.add_users(A, B)
    assert set(ONE_OF_EACH_REASON) == set(billing.INVALID_REASONS)
    server = exporters([{"collected_at": rfc(at(1, 5)), "samples": [raw_sample(A, "", 100, 50),
                                                                     *one_of_each_invalid()]}])
    db.set_watermark("a", at(-1))
    svc = service(db, [source("a", server), push_source("p", node="node-p")])
    status, result = svc.post()
    assert (status, result["status"], result["invalid_samples"]) == (200, "partial", 6), result
    assert result["invalid_by_reason"] == ONE_OF_EACH_REASON
    assert by_source(result)["a"]["invalid_by_reason"] == ONE_OF_EACH_REASON
    assert "a: invalid_samples: 6 skipped (bad_counter 1, bad_label 1, bad_uuid 1, duplicate 2, not_an_object 1)" \
        in result["error"]
    (line,) = events(app_log, "run")
    assert (line["invalid_samples"], line["invalid_by_reason"]) == (6, ONE_OF_EACH_REASON), line
    samples = metrics_of(svc)
    assert invalid_by_reason_metrics(samples, "collect-and-rate") == ONE_OF_EACH_REASON
    assert metric(samples, "billing_invalid_samples_total", job="collect-and-rate") == 6
    assert [(row[2], row[7]) for row in db.buckets()] == [(A, 150)]  # the good one billed, nothing of B

    # Another run past the first snapshot (the watermark moved on by hand: no overlap re-read) with
    # two more: the counters add up.
    server.add({"collected_at": rfc(at(8, 5)),
                "samples": [raw_sample(A, "", 200, 50), [1, 2], raw_sample(B, "", -1, 0)]})
    db.set_watermark("a", at(6))
    status, result = svc.post()
    assert (status, result["invalid_by_reason"]) == (200, {"not_an_object": 1, "bad_counter": 1}), result
    assert events(app_log, "run")[-1]["invalid_by_reason"] == {"not_an_object": 1, "bad_counter": 1}
    assert invalid_by_reason_metrics(metrics_of(svc), "collect-and-rate") == {
        **ONE_OF_EACH_REASON, "not_an_object": 2, "bad_counter": 2}

    status, pushed = push(svc, push_body([{"collected_at": rfc(at(9, 5)), "samples": [
        raw_sample(A, "", 1, 1), raw_sample(A.replace("-", "x"), "", 1, 1)]}], node="node-p"))
    assert (status, pushed["status"], pushed["invalid_by_reason"]) == (200, "partial", {"bad_uuid": 1}), pushed
    samples = metrics_of(svc)
    assert invalid_by_reason_metrics(samples, "push") == {**dict.fromkeys(billing.INVALID_REASONS, 0), "bad_uuid": 1}
    assert invalid_by_reason_metrics(samples, "collect-and-rate")["bad_uuid"] == 1  # unchanged by the push


def test_the_run_log_names_ten_unknown_accounts_per_source_and_no_open_endpoint_any(
        db, exporters, service, app_log):
    """12 unknown accounts on one source (half of them in upper case), 3 on another: the run's log line
    names 10 of the first (sorted, canonical) and the 3 of the second; the run result counts them all;
    /v1/status without the token, /healthz and /metrics name none of them, in any form."""
    db.add_users(A)
    strangers = [account(300 + n) for n in range(12)]
    others = [account(400 + n) for n in range(3)]
    a = exporters([snap(at(1, 5), (A, "", 100, 0),
                        *[(s.upper() if i % 2 else s, "", 10, 10) for i, s in enumerate(strangers)])])
    b = exporters([snap(at(1, 10), *[(s, "x", 1, 1) for s in others])], node_id="node-b")
    db.set_watermark("a", at(-1))
    db.set_watermark("b", at(-1))
    svc = service(db, [source("a", a), source("b", b)])
    status, result = svc.post()
    assert (status, result["status"], result["unknown_account_samples"]) == (200, "partial", 15), result
    (line,) = events(app_log, "run")
    named = {s["source_id"]: s.get("unknown_accounts") for s in line["sources"]}
    assert len(named["a"]) == 10 and named["a"] == sorted(set(named["a"])), named
    assert set(named["a"]) <= set(strangers) and named["b"] == sorted(others), named
    visible = {path: svc.client.get(path).get_data(as_text=True) for path in ("/v1/status", "/healthz", "/metrics")}
    assert svc.client.get("/healthz").status_code == 200 and "unknown_accounts" in visible["/v1/status"]
    for path, text in visible.items():
        for stranger in strangers + others:
            for form in (stranger, stranger.upper(), stranger.replace("-", "")):
                assert form not in text, f"{path} names unknown account {form}"


# ---- money: exact decimals on a fixed quantum over the shared double columns ---------------

@pytest.mark.parametrize("value, message", [
    ("abc", "MONEY_QUANTUM: not a valid number"), ("1e-9x", "MONEY_QUANTUM: not a valid number"),
    ("0", "MONEY_QUANTUM: must be above zero"), ("-0.01", "MONEY_QUANTUM: must be above zero"),
    ("nan", "MONEY_QUANTUM: must be a finite number"), ("", "MONEY_QUANTUM is set but empty")])
def test_a_bad_money_quantum_stops_startup_naming_it(value, message):
    with pytest.raises(billing.ConfigError, match=re.escape(message)):
        billing.load_config(base_env(MONEY_QUANTUM=value))


def test_money_quantum_and_initial_balance_are_exact_decimals():
    config = billing.load_config(base_env(MONEY_QUANTUM="0.01", INITIAL_BALANCE="-12.34", PRICE_PER_BYTE="0.000000731"))
    assert (config.quantum, config.initial_balance, config.price_per_byte) == (
        Decimal("0.01"), Decimal("-12.34"), Decimal("0.000000731"))
    with pytest.raises(billing.ConfigError, match="INITIAL_BALANCE: must be a multiple of MONEY_QUANTUM"):
        billing.load_config(base_env(MONEY_QUANTUM="0.01", INITIAL_BALANCE="0.005"))
    with pytest.raises(billing.ConfigError, match="INITIAL_BALANCE: must be a multiple"):  # beyond the exact range
        billing.load_config(base_env(INITIAL_BALANCE="1000000"))


MONEY_PROFILES = {B: dict(price=0.0000123, region=1.1, line=0.7, peak=1.3, offpeak=0.9, version="money-v1"),
                  C: dict(price=0.0, region=0.7, line=1.0, version="money-c")}
MONEY_PRICE = Decimal("0.000000731")


def money_pricing(account_id) -> billing.Pricing:
    defaults = billing.Pricing(0, MONEY_PRICE, Decimal(1), "billing-service-v1")
    p = MONEY_PROFILES.get(account_id)
    return defaults if p is None else billing.effective_pricing(
        (0, p["price"], p["region"], p["line"], p.get("peak", 1.0), p.get("offpeak", 1.0), p["version"]), defaults)


def on_quantum(value: Decimal) -> bool:
    return value == value.quantize(QUANTUM)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_money_is_exact_on_the_quantum_whatever_the_order_of_pulls_pushes_and_top_ups(db, exporters, data):
    """Prices like 0.000000731, region and line multipliers like 1.1 and 0.7, peak and off-peak, pulls
    and pushes of two nodes, top-ups between runs: every amount is quantize(bytes x price x multipliers)
    (half-even, once per ledger row), every stored amount and balance is on the quantum and reads back
    as that decimal, and each balance equals its start plus its top-ups plus its ledger amounts,
    exactly, in decimal."""
    reset_database(db, [])
    db.add_users(A, B, C)
    for account_id, profile in MONEY_PROFILES.items():
        db.set_profile(account_id, **profile)
    peak = data.draw(st.sampled_from([None, "UTC"]), "peak hours")
    window = peak_hours(at(-40), at(-25)) if peak else None
    server = exporters([])
    svc = Service(service_env(db, [source("pull", server), push_source("push", node="node-b")],
                              PRICE_PER_BYTE=str(MONEY_PRICE), INITIAL_BALANCE="10.5",
                              **({"PEAK_HOURS": window} if window else {})))
    db.set_watermark("pull", at(-62))
    counters, top_ups, stamp = {}, collections.Counter(), at(-60)
    for _ in range(data.draw(st.integers(2, 6), "rounds")):
        pulled, pushed = [], []
        for _ in range(data.draw(st.integers(1, 4), "snapshots")):
            stamp += timedelta(seconds=data.draw(st.sampled_from([13, 40, 61, 130])))
            node = data.draw(st.sampled_from(["node-a", "node-b"]), "node")
            samples = []
            for account_id in (A, B, C):
                for tag in ("", "x"):
                    counter = counters.setdefault((node, account_id, tag), [0, 0])
                    counter[0] += data.draw(st.integers(1, 3_000_000_007), "up")
                    counter[1] += data.draw(st.integers(0, 999_999), "down")
                    samples.append((account_id, tag, *counter))
            (pulled if node == "node-a" else pushed).append(snap(stamp, *samples))
        server.add(*pulled)
        if pushed:
            assert push(svc, push_body(pushed, node="node-b"))[0] == 200
        status, result = svc.post()
        assert status == 200 and result["status"] == "ok", result
        for account_id in data.draw(st.lists(st.sampled_from([A, B, C]), max_size=2, unique=True), "top-ups"):
            amount = data.draw(st.sampled_from([Decimal("1.25"), Decimal("0.000000001"), Decimal("7.3")]))
            # As the README asks the accounts service to: in numeric, so the double stays on the quantum.
            db.q("UPDATE account_quota_states SET current_balance = (current_balance::numeric + %s)::float8 "
                 "WHERE account_uuid = %s", (amount, account_id))
            top_ups[account_id] += amount
    config = billing.load_config(base_env(**({"PEAK_HOURS": window} if window else {})))
    rows = db.q("""SELECT account_uuid::text, bucket_start, rated_bytes, amount_delta, amount_delta::text,
                          balance_after FROM billing_ledger ORDER BY created_at""")
    assert rows
    for account_id, minute, rated, amount, printed, balance_after in rows:
        price = money_pricing(account_id)
        with localcontext() as context:
            context.prec = 60
            expected = Decimal(0) - (rated * price.price_per_byte *
                                     billing.minute_multiplier(price, minute, config.peak)).quantize(
                QUANTUM, rounding=ROUND_HALF_EVEN)
        assert money(amount) == expected == Decimal(printed), (account_id, rated, amount, expected)
        assert on_quantum(money(balance_after))
    for account_id, _, balance, *_ in db.quota():
        charged = sum(money(row[3]) for row in rows if row[0] == account_id)
        assert Decimal("10.5") + top_ups[account_id] + charged == money(balance), account_id  # to the last digit
        assert on_quantum(money(balance))


def test_a_balance_written_with_more_digits_lands_on_the_quantum_with_the_next_charge(db, exporters, service):
    """The original service (or a top-up) left 3.14159265358979: the next charge's balance_after and the
    balance are that plus the amount, rounded half-even once to the quantum; from there on they add up."""
    db.add_users(A)
    db.q("INSERT INTO account_quota_states (account_uuid, current_balance) VALUES (%s, 3.14159265358979)", (A,))
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "", 1000, 0)), snap(at(2, 5), (A, "", 3000, 0))],
                        PRICE_PER_BYTE="0.000000731")
    assert svc.post()[1]["status"] == "ok"
    first, second = [money(row[0]) for row in db.q("SELECT balance_after FROM billing_ledger ORDER BY bucket_start")]
    assert first == Decimal("3.140861654")  # 3.14159265358979 - 0.000731 = 3.14086165358979, rounded once
    assert second == first - Decimal("0.001462") == money(db.quota()[0][2])


def test_a_balance_leaving_the_exact_range_is_logged_once_per_account(db, exporters, service, app_log):
    """Beyond quantum x 10**15 (one million units at 1e-9) a double no longer holds every value on the
    quantum: the first page that takes an account there logs it, later pages do not again."""
    db.add_users(A, B)
    server, svc = one_source(db, exporters, service, [
        snap(at(1, 5), (A, "", 1000, 0), (B, "", 10, 0)), snap(at(2, 5), (A, "", 3_000_001_000, 0), (B, "", 20, 0)),
        snap(at(3, 5), (A, "", 3_000_001_010, 0), (B, "", 30, 0))])
    server.page_cap = 1  # one snapshot a page: the range is checked page by page
    status, result = svc.post()
    assert (status, result["status"], by_source(result)["a"]["pages"]) == (200, "ok", 3), result
    assert money(db.one("SELECT current_balance FROM account_quota_states WHERE account_uuid = %s", (A,))[0]) \
        == Decimal("-1500000505")
    logged = events(app_log, "balance_out_of_exact_range")
    assert [(e["account"], e["limit"]) for e in logged] == [(A, "1000000.000000000")], logged


# ---- deployment: Ansible playbook and systemd unit ---------------------------------------

DEPLOY = os.path.join(ROOT, "deploy")
PLAYBOOK = os.path.join(DEPLOY, "deploy_billing_service.yml")
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
SERVICE_USER = "billing-test"
# Every character that needs care in an EnvironmentFile (and in a shell).
TRICKY_TOKEN = "tok-$HOME-\"q\"-\\-`id`-'s'-#;-%h"
TRICKY_REGION = "ap east $x \"y\" \\z `q` 'w' #n ;m %i"
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
IS_ROOT = os.geteuid() == 0


def tool(name: str) -> str:
    path = os.path.join(VENV_BIN, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is missing from {VENV_BIN}: run the suite through ./deploy/local.sh test")
    return path


def ansible_env(**values) -> dict:
    """The operator's environment: no inherited secrets, plain output."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "INTERNAL_SERVICE_TOKEN")}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_LOAD_CALLBACK_PLUGINS="0",
               ANSIBLE_LINT_SKIP_SCHEMA_UPDATE="1", PY_COLORS="0", NO_COLOR="1")
    env.update(values)
    return env


def run_tool(args, env=None, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, env=env or ansible_env(), capture_output=True, text=True,
                          timeout=timeout)
    done.output = done.stdout + done.stderr
    return done


def local_inventory(tmp_path) -> str:
    path = tmp_path / "inventory.ini"
    path.write_text("[billing_service]\n"
                    f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    return str(path)


def vars_file(tmp_path, name: str, values: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return f"--extra-vars=@{path}"


def playbook(inventory: str, *args, env=None) -> subprocess.CompletedProcess:
    return run_tool([tool("ansible-playbook"), "-i", inventory, PLAYBOOK, *args], env=env)


def recap(output: str, host: str = "localhost") -> dict:
    found = {m.group(1): dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()[1:])))
             for m in RECAP.finditer(output)}
    assert host in found, output[-3000:]
    return found[host]


def deploy_vars(root: str, sources, **extra) -> dict:
    """Variables of a run into the temporary root: nothing outside it is touched
    (but the system user, as root)."""
    values = {"billing_exporter_sources": sources, "billing_install_prefix": f"{root}/opt",
              "billing_config_dir": f"{root}/etc", "billing_unit_dir": f"{root}/systemd",
              "billing_install_packages": False, "billing_manage_service": False,
              "billing_venv_python": "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"}
    if IS_ROOT:
        values["billing_user"] = SERVICE_USER
    else:
        me, my_group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
        values.update(billing_user=me, billing_group=my_group, billing_create_user=False,
                      billing_admin_owner=me, billing_admin_group=my_group)
    values.update(extra)
    return values


@pytest.fixture
def deploy_root():
    """A world-traversable temporary root (the service user must reach the code
    in it), the system user removed afterwards if this test created it."""
    root = tempfile.mkdtemp(prefix="billing-deploy-")
    os.chmod(root, 0o755)
    had_user = user_exists(SERVICE_USER)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    if IS_ROOT and not had_user and user_exists(SERVICE_USER):
        subprocess.run(["userdel", SERVICE_USER], check=False, capture_output=True)
        subprocess.run(["groupdel", SERVICE_USER], check=False, capture_output=True)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def parse_env_file(text: str) -> dict:
    """EnvironmentFile= semantics (systemd's parse_env_file_internal, env-file.c):
    comments, unquoted/single-quoted/double-quoted values and their escapes."""
    values, key, value, state = {}, "", None, "PRE_KEY"

    def push():
        if key.strip():
            values[key.strip()] = "" if value is None else value

    trailing_ws = None  # where trailing whitespace of an unquoted value starts
    for c in text:
        if state == "PRE_KEY":
            if c in "#;":
                state = "COMMENT"
            elif c not in " \t\n\r":
                state, key, value = "KEY", c, None
        elif state == "KEY":
            if c in "\n\r":
                state, key = "PRE_KEY", ""
            elif c == "=":
                state, value = "PRE_VALUE", ""
            else:
                key += c
        elif state == "PRE_VALUE":
            if c in "\n\r":
                push()
                state = "PRE_KEY"
            elif c == "'":
                state = "SINGLE"
            elif c == '"':
                state = "DOUBLE"
            elif c == "\\":
                state = "VALUE_ESCAPE"
            elif c not in " \t":
                state, value, trailing_ws = "VALUE", value + c, None
        elif state == "VALUE":
            if c in "\n\r":
                if trailing_ws is not None:
                    value = value[:trailing_ws]
                push()
                state = "PRE_KEY"
            elif c == "\\":
                state, trailing_ws = "VALUE_ESCAPE", None
            else:
                if c not in " \t":
                    trailing_ws = None
                elif trailing_ws is None:
                    trailing_ws = len(value)
                value += c
        elif state == "VALUE_ESCAPE":
            state = "VALUE"
            if c not in "\n\r":
                value += c
        elif state == "SINGLE":
            if c == "'":
                state = "PRE_VALUE"
            else:
                value += c
        elif state == "DOUBLE":
            if c == '"':
                state = "PRE_VALUE"
            elif c == "\\":
                state = "DOUBLE_ESCAPE"
            else:
                value += c
        elif state == "DOUBLE_ESCAPE":
            state = "DOUBLE"
            if c in '"\\`$':
                value += c
            elif c != "\n":
                value += "\\" + c
        elif state == "COMMENT":
            if c in "\n\r":
                state = "PRE_KEY"
    if state in ("PRE_VALUE", "VALUE", "VALUE_ESCAPE", "SINGLE", "DOUBLE", "DOUBLE_ESCAPE"):
        if state == "VALUE" and trailing_ws is not None:
            value = value[:trailing_ws]
        push()
    return values


def parse_unit(text: str) -> dict:
    """{(section, key): [values]} of a unit file (no continuation lines in ours)."""
    entries, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


def unit_process(unit: dict, env_file_text: str) -> tuple[list, dict, str]:
    """argv, environment and working directory systemd would give ExecStart=."""
    (exec_start,) = unit[("Service", "ExecStart")]
    assert exec_start[0] not in "-@:+!", exec_start  # no special prefixes in our unit
    argv = shlex.split(exec_start)
    user = unit[("Service", "User")][0]
    account = pwd.getpwnam(user)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": account.pw_dir, "USER": user, "LOGNAME": user, "SHELL": account.pw_shell}
    for assignments in unit.get(("Service", "Environment"), []):
        env.update(item.split("=", 1) for item in shlex.split(assignments))
    env.update(parse_env_file(env_file_text))
    return argv, env, unit[("Service", "WorkingDirectory")][0]


def test_env_file_parser_follows_systemd_rules():
    text = ('# comment "x"\n; other\nA=plain  value  \nB="d \\"q\\" \\$x \\\\ \\n `x`"\n'
            "C='s \\ \"$x\"'\nD=\nE = spaced\nF=\"multi\nline\"\n")
    assert parse_env_file(text) == {"A": "plain  value", "B": 'd "q" $x \\ \\n `x`', "C": 's \\ "$x"',
                                    "D": "", "E": "spaced", "F": "multi\nline"}


def test_playbook_syntax_check_passes():
    done = run_tool([tool("ansible-playbook"), "-i", os.path.join(DEPLOY, "inventory.ini.example"),
                     "--syntax-check", PLAYBOOK])
    assert done.returncode == 0, done.output


def test_ansible_lint_reports_no_violation():
    # --offline: no collection installs, no schema refresh from the network.
    done = run_tool([tool("ansible-lint"), "--offline", "--nocolor", "deploy/deploy_billing_service.yml"])
    assert done.returncode == 0, done.output
    assert "0 failure(s), 0 warning(s)" in done.output, done.output


def test_example_inventory_puts_the_host_in_the_group_with_sources():
    inventory = os.path.join(DEPLOY, "inventory.ini.example")
    done = run_tool([tool("ansible-playbook"), "-i", inventory, PLAYBOOK, "--list-hosts",
                     "-l", "jp_xhttp_contabo_host"])
    assert done.returncode == 0 and "jp_xhttp_contabo_host" in done.stdout, done.output
    done = run_tool([tool("ansible-inventory"), "-i", inventory, "--host", "jp_xhttp_contabo_host"])
    assert done.returncode == 0, done.output
    sources = json.loads(done.stdout)["billing_exporter_sources"]
    sources = json.loads(sources) if isinstance(sources, str) else sources  # the play takes both
    assert sources and all(s["source_id"] and s["base_url"] for s in sources)


def test_dry_run_needs_database_url_and_names_it(tmp_path):
    # The operator's own command line (example inventory, -l HOST); the connection
    # is forced local so that nothing ever tries the placeholder address.
    done = playbook(os.path.join(DEPLOY, "inventory.ini.example"), "-D", "-C", "-l", "jp_xhttp_contabo_host",
                    "-e", "ansible_connection=local", "-e", "ansible_become=false",
                    "-e", f"ansible_python_interpreter={sys.executable}",
                    env=ansible_env(INTERNAL_SERVICE_TOKEN=TOKEN))
    assert done.returncode != 0
    assert "DATABASE_URL is not set: export DATABASE_URL=" in done.output, done.output
    assert recap(done.output, "jp_xhttp_contabo_host")["failed"] == 1


def test_dry_run_needs_the_token_and_names_it(tmp_path):
    done = playbook(local_inventory(tmp_path), "-D", "-C",
                    vars_file(tmp_path, "vars.json", deploy_vars(str(tmp_path), [])),
                    env=ansible_env(DATABASE_URL=f"postgresql://billing:{DB_PASSWORD}@db.invalid/account"))
    assert done.returncode != 0
    assert "INTERNAL_SERVICE_TOKEN is not set" in done.output, done.output
    assert DB_PASSWORD not in done.output


def test_dry_run_passes_preflight_and_renders_the_plan_without_touching_the_host(tmp_path):
    root = str(tmp_path / "host")
    sources = [{"source_id": "a", "base_url": "http://127.0.0.1:9108", "enabled": False}]
    had_user = user_exists(SERVICE_USER)
    # The token as an extra var (the other way the preflight accepts it).
    done = playbook(local_inventory(tmp_path), "-D", "-C", "-e", f"internal_service_token={TOKEN}",
                    vars_file(tmp_path, "vars.json", deploy_vars(root, sources, billing_manage_service=True)),
                    env=ansible_env(DATABASE_URL=f"postgresql://billing:{DB_PASSWORD}@db.invalid/account"))
    assert done.returncode == 0, done.output
    result = recap(done.output)
    assert result["failed"] == 0 and result["changed"] > 0, done.output
    # The plan: the unit as it would be written (diff), the env file without its secrets.
    assert "ExecStart=" in done.stdout and "TASK [Env file" in done.stdout
    assert DB_PASSWORD not in done.output and TOKEN not in done.output
    assert not os.path.exists(root), "check mode must not write anything"
    assert user_exists(SERVICE_USER) == had_user


# The listener's TLS files through the playbook (billing_tls_*): preflight, the service user's read, the env file.

def place_tls_files(directory: str, listener_pki, pki, key_mode: int = 0o640, group: int = -1) -> dict:
    """The listener's certificate, key (for the service's group) and client CA
    in a directory others may traverse, as playbook variables."""
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    files = {}
    for name, original, mode in (("billing_tls_cert_file", listener_pki.cert, 0o644),
                                 ("billing_tls_key_file", listener_pki.key, key_mode),
                                 ("billing_tls_client_ca_file", pki.ca_path, 0o644)):
        files[name] = os.path.join(directory, name.replace("billing_tls_", "").replace("_file", ".pem"))
        shutil.copyfile(original, files[name])
        os.chown(files[name], -1, group)
        os.chmod(files[name], mode)
    return files


def test_dry_run_checks_the_listener_tls_files_as_the_service_user(tmp_path, listener_pki, pki):
    """Check mode still reads the files, as the service user: a key it cannot
    read or a key of another certificate fails, naming the variable; a user
    the play has yet to create is reported unchecked and the dry run passes."""
    root = str(tmp_path / "host")
    sources = [{"source_id": "a", "base_url": "http://127.0.0.1:9108"}]
    user = "nobody" if IS_ROOT else pwd.getpwuid(os.getuid()).pw_name  # exists, and is not root
    directory = tempfile.mkdtemp(prefix="billing-deploy-tls-")
    try:
        files = place_tls_files(directory, listener_pki, pki, group=pwd.getpwnam(user).pw_gid)
        key = files["billing_tls_key_file"]
        env = ansible_env(DATABASE_URL=f"postgresql://billing:{DB_PASSWORD}@db.invalid/account",
                          INTERNAL_SERVICE_TOKEN=TOKEN)

        def dry_run(**values):
            return playbook(local_inventory(tmp_path), "-D", "-C", "-v", vars_file(
                tmp_path, "vars.json", deploy_vars(root, sources, **{"billing_user": user,
                                                                      "billing_create_user": False,
                                                                      **files, **values})), env=env)

        done = dry_run()
        assert done.returncode == 0, done.output
        assert f"readable by {user} and usable" in done.stdout, done.output
        os.chmod(key, 0o600 if IS_ROOT else 0)  # root's own key, or nobody's read bit
        done = dry_run()
        assert done.returncode != 0 and recap(done.output)["failed"] == 1
        assert f"TLS_KEY_FILE: {key} is not readable by {user} (Permission denied)" in done.output, done.output
        install_file(listener_pki.next_key, key)  # readable again, but not this certificate's key
        os.chmod(key, 0o644)
        done = dry_run()
        assert done.returncode != 0
        assert "TLS_CERT_FILE/TLS_KEY_FILE: not usable as PEM (KEY_VALUES_MISMATCH)" in done.output, done.output
        key_line = open(key).read().splitlines()[1]
        assert key_line not in done.output

        # First deploy: the service user does not exist yet.
        assert not user_exists("billing-tls-new")
        done = dry_run(billing_user="billing-tls-new", billing_create_user=IS_ROOT)
        assert done.returncode == 0, done.output
        assert "not checked: the service user billing-tls-new does not exist yet" in done.stdout
        assert not user_exists("billing-tls-new") and not os.path.exists(root)
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("values, message", [
    ({"billing_tls_cert_file": "/etc/billing-service/tls/listener.pem"}, "billing_tls_cert_file (TLS_CERT_FILE) and"),
    ({"billing_tls_cert_file": "tls/listener.pem", "billing_tls_key_file": "tls/listener.key"},
     "each is an absolute path on the host outside /home"),
    ({"billing_tls_cert_file": "/root/listener.pem", "billing_tls_key_file": "/root/listener.key"},
     "each is an absolute path on the host outside /home"),
    ({"billing_tls_cert_file": "/etc/b/listener.pem", "billing_tls_key_file": "/etc/b/listener.key",
      "billing_tls_client_ca_file": "/etc/b/clients.pem", "billing_manage_service": True},
     "set billing_healthz_client_cert and billing_healthz_client_key"),
])
def test_dry_run_refuses_listener_tls_variables_that_cannot_work(tmp_path, values, message):
    done = playbook(local_inventory(tmp_path), "-C", vars_file(tmp_path, "vars.json", deploy_vars(
        str(tmp_path / "host"), [{"source_id": "a", "base_url": "http://127.0.0.1:9108"}], **values)),
        env=ansible_env(DATABASE_URL="postgresql://billing@db.invalid/account", INTERNAL_SERVICE_TOKEN=TOKEN))
    assert done.returncode != 0 and message in done.output, done.output
    assert recap(done.output)["failed"] == 1 and "TASK [System packages" not in done.output


@pytest.fixture
def tls_service_user():
    """A service user of its own: SERVICE_USER is shared with the suites of
    other checkouts on this machine, whose teardown may remove it meanwhile."""
    name = "billing-tls-test"
    had_user = user_exists(name)
    yield name
    if IS_ROOT and not had_user and user_exists(name):
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def test_real_run_with_listener_tls_serves_mutual_tls_from_the_installed_unit(
        db, exporters, deploy_root, tls_service_user, tmp_path, listener_pki, pki):
    """The three variables reach the env file; the unit's command, as its user,
    serves HTTPS with that certificate to clients of that CA only."""
    # The play creates the service user: nothing can be its group's before it runs.
    files = place_tls_files(os.path.join(deploy_root, "tls"), listener_pki, pki, key_mode=0o644)
    server = exporters([])
    db.set_watermark("a", at(-1))
    port = free_port()
    values = deploy_vars(deploy_root, [source("a", server)], billing_listen_addr=f"127.0.0.1:{port}",
                         billing_apply_schema=False, **files)
    if IS_ROOT:
        values["billing_user"] = tls_service_user
    done = playbook(local_inventory(tmp_path), vars_file(tmp_path, "vars.json", values),
                    env=ansible_env(DATABASE_URL=db.url, INTERNAL_SERVICE_TOKEN=TOKEN))
    assert done.returncode == 0, done.output
    env_path = f"{values['billing_config_dir']}/billing-service.env"
    with open(env_path) as handle:
        env_text = handle.read()
    assert {name: value for name, value in parse_env_file(env_text).items() if name.startswith("TLS_")} == {
        "TLS_CERT_FILE": files["billing_tls_cert_file"], "TLS_KEY_FILE": files["billing_tls_key_file"],
        "TLS_CLIENT_CA_FILE": files["billing_tls_client_ca_file"]}

    with open(f"{values['billing_unit_dir']}/billing-service.service") as handle:
        unit = parse_unit(handle.read())
    argv, unit_env, cwd = unit_process(unit, env_text)
    user = {"user": unit[("Service", "User")][0], "group": unit[("Service", "Group")][0], "extra_groups": []} \
        if IS_ROOT else {}
    log = open(tmp_path / "service.log", "w+")
    proc = subprocess.Popen(argv, cwd=cwd, env=unit_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, **user)
    url = f"https://127.0.0.1:{port}/healthz"
    try:
        def healthy():
            assert proc.poll() is None, open(tmp_path / "service.log").read()
            try:
                return requests.get(url, verify=listener_pki.trust, cert=(pki.client_cert, pki.client_key),
                                    timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_for(healthy, timeout=60, interval=0.2, what="/healthz 200 over mutual TLS from the installed unit")
        with pytest.raises(requests.ConnectionError):
            requests.get(url, verify=listener_pki.trust, timeout=10)
    finally:
        terminate_session(proc)
        log.close()
    assert proc.returncode == 0, open(tmp_path / "service.log").read()


def bare_database(cluster) -> str:
    """A database with only the users stub: the playbook must apply schema.sql."""
    name = f"deploy{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = cluster.admin()
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} OWNER billing")
    admin.close()
    url = cluster.url(name)
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(open(os.path.join(DEPLOY, "users_stub.sql")).read())
    conn.close()
    return url


def tables(db: Db) -> set:
    return {row[0] for row in db.q("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_real_run_installs_a_service_that_starts_from_its_unit_then_changes_nothing(
        cluster, exporters, deploy_root, tmp_path):
    started = time.monotonic()
    db = Db(bare_database(cluster))
    assert tables(db) == {"users"}
    server = exporters([snap(at(-2, 5), (A, "xhttp", 100, 50))], tokens=(TRICKY_TOKEN,))
    port = free_port()
    values = deploy_vars(deploy_root, [source("a", server)], billing_listen_addr=f"127.0.0.1:{port}",
                         billing_default_region=TRICKY_REGION)
    args = ["-D", vars_file(tmp_path, "vars.json", values)]
    env = ansible_env(DATABASE_URL=db.url, INTERNAL_SERVICE_TOKEN=TRICKY_TOKEN)
    inventory = local_inventory(tmp_path)

    first = playbook(inventory, *args, env=env)
    assert first.returncode == 0, first.output
    assert recap(first.output)["changed"] > 0
    assert DB_PASSWORD not in first.output and TRICKY_TOKEN not in first.output
    first_took = time.monotonic() - started

    # Installed: code, virtualenv, env file (0600, admin-owned), unit, schema.
    prefix = values["billing_install_prefix"]
    for name in ("app.py", "schema.sql", "gunicorn.conf.py", "requirements.txt"):
        with open(os.path.join(ROOT, name), "rb") as want, open(f"{prefix}/app/{name}", "rb") as got:
            assert got.read() == want.read(), name
    assert os.access(f"{prefix}/venv/bin/gunicorn", os.X_OK)
    # Runtime packages only: the host gets neither requirements-test.txt nor what it lists.
    assert not os.path.exists(f"{prefix}/app/requirements-test.txt")
    absent = subprocess.run([f"{prefix}/venv/bin/python", "-c", FIND_TEST_PACKAGES], capture_output=True, text=True)
    assert absent.returncode == 0 and absent.stdout.split() == [], absent.stdout + absent.stderr
    env_path = f"{values['billing_config_dir']}/billing-service.env"
    info = os.stat(env_path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert pwd.getpwuid(info.st_uid).pw_name == values.get("billing_admin_owner", "root")
    unit_path = f"{values['billing_unit_dir']}/billing-service.service"
    with open(unit_path) as handle:
        unit = parse_unit(handle.read())
    assert unit[("Service", "User")] == [values["billing_user"]]
    assert unit[("Service", "EnvironmentFile")] == [env_path]
    assert unit[("Service", "Restart")] == ["on-failure"]
    assert {"billing_source_sync_state", "traffic_minute_buckets", "billing_ledger"} <= tables(db)
    if IS_ROOT:
        assert user_exists(SERVICE_USER)
        analyzed = subprocess.run(["systemd-analyze", "verify", unit_path], capture_output=True, text=True)
        assert analyzed.returncode == 0 and "billing-service" not in analyzed.stderr, analyzed.stderr

    # The env file, read the way systemd reads it, holds the exact values
    # (and a shell sourcing it agrees).
    with open(env_path) as handle:
        env_text = handle.read()
    parsed = parse_env_file(env_text)
    assert parsed["DATABASE_URL"] == db.url and parsed["INTERNAL_SERVICE_TOKEN"] == TRICKY_TOKEN
    assert parsed["DEFAULT_REGION"] == TRICKY_REGION
    assert json.loads(parsed["EXPORTER_SOURCES_JSON"]) == [source("a", server)]
    shell = subprocess.run(["bash", "-c", 'set -a; . "$0"; exec "$1" -c "import json, os; print(json.dumps(dict(os.environ)))"',
                            env_path, sys.executable], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert shell.returncode == 0, shell.stderr
    assert {k: v for k, v in json.loads(shell.stdout).items() if k in parsed} == parsed

    # Start exactly the unit's ExecStart= as its User= with its environment,
    # and wait for /healthz (after the first collection run) and the bill.
    db.add_users(A)
    db.set_watermark("a", at(-5))
    argv, unit_env, cwd = unit_process(unit, env_text)
    assert argv == [f"{prefix}/venv/bin/python", f"{prefix}/app/gunicorn.conf.py"]  # the launcher
    log = open(tmp_path / "service.log", "w+")
    user = {"user": unit[("Service", "User")][0], "group": unit[("Service", "Group")][0], "extra_groups": []} \
        if IS_ROOT else {}
    proc = subprocess.Popen(argv, cwd=cwd, env=unit_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, **user)
    try:
        def healthy():
            assert proc.poll() is None, open(tmp_path / "service.log").read()
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_for(healthy, timeout=60, interval=0.2, what="/healthz 200 from the installed unit's command")
        (bucket,) = wait_for(db.buckets, timeout=10, what="the bucket billed by the deployed service")
        assert bucket[2:5] == (A, TRICKY_REGION, "xhttp") and bucket[7] == 150
    finally:
        terminate_session(proc)
        log.close()
    assert proc.returncode == 0, open(tmp_path / "service.log").read()

    # Idempotent: a second run changes nothing (psql is skipped by its marker).
    second = playbook(inventory, *args, env=env)
    assert second.returncode == 0, second.output
    assert recap(second.output) == {"ok": recap(second.output)["ok"], "changed": 0, "unreachable": 0, "failed": 0}
    print(f"real run {first_took:.0f}s, whole test {time.monotonic() - started:.0f}s")
    db.close()


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The template rendered by Ansible's own engine with paths that exist here
    (gunicorn from the test venv, the current user); `systemd-analyze verify`
    checks keys, values and that ExecStart is executable."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    (tmp_path / "app").mkdir()
    (tmp_path / "billing-service.env").write_text("")
    me, my_group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    rendered = tmp_path / "billing-service.service"
    template_vars = {"bs_app_dir": str(tmp_path / "app"), "bs_venv": str(venv), "bs_user": me,
                     "bs_group": my_group, "bs_env_file": str(tmp_path / "billing-service.env")}
    done = run_tool([tool("ansible"), "localhost", "-c", "local", "-i", "localhost,",
                     "-e", f"ansible_python_interpreter={sys.executable}",
                     "-e", json.dumps(template_vars), "-m", "ansible.builtin.template",
                     "-a", f"src={DEPLOY}/billing-service.service.j2 dest={rendered} mode=0644"])
    assert done.returncode == 0, done.output
    # deploy/render_examples.py renders exactly as Ansible does (the plain unit is made with it).
    assert rendered.read_text() == render_examples.render("billing-service.service.j2", template_vars)
    analyzed = subprocess.run([analyze, "verify", str(rendered)], capture_output=True, text=True)
    # Lines about other units of this host (its own unit files) are not ours to judge.
    ours = [line for line in analyzed.stderr.splitlines() if "billing-service" in line]
    assert analyzed.returncode == 0 and ours == [], analyzed.stderr
    # ...and the check is real: a typo and a missing binary are reported.
    broken = tmp_path / "broken" / "billing-service.service"
    broken.parent.mkdir()
    broken.write_text(rendered.read_text().replace("ProtectSystem=", "ProtectSystm=")
                      .replace(str(venv), "/nonexistent"))
    analyzed = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert analyzed.returncode != 0 and "Unknown key" in analyzed.stderr and "/nonexistent" in analyzed.stderr


# Prints the test-only packages a Python can import (none, on a host).
FIND_TEST_PACKAGES = ("import importlib.util; print(*[name for name in ('pytest', 'hypothesis', 'trustme', "
                      "'cryptography', 'prometheus_client') if importlib.util.find_spec(name)])")


def test_a_virtualenv_from_requirements_txt_runs_the_service_without_the_test_packages(tmp_path):
    """What a host installs (the playbook, README's steps): a fresh virtualenv
    with requirements.txt imports app.py and runs gunicorn.conf.py (the
    launcher checks the configuration and gunicorn loads app:app), and none
    of the test-only packages is in it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = str(venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                                os.path.join(ROOT, "requirements.txt")], capture_output=True, text=True, timeout=1200)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {"PATH": os.environ["PATH"], **base_env(WEB_CONCURRENCY="1", COLLECT_INTERVAL="off")}
    imported = subprocess.run([python, "-c", "import app, flask, psycopg2, requests, gunicorn; print(app.__file__)"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == os.path.join(ROOT, "app.py")
    checked = subprocess.run([python, os.path.join(ROOT, "gunicorn.conf.py"), "--check-config"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    absent = subprocess.run([python, "-c", FIND_TEST_PACKAGES], capture_output=True, text=True, timeout=60)
    assert absent.returncode == 0 and absent.stdout.split() == [], absent.stdout + absent.stderr
    # ...while the suite's own virtualenv has them all: the probe finds what is there.
    here = subprocess.run([sys.executable, "-c", FIND_TEST_PACKAGES], capture_output=True, text=True, timeout=60)
    assert here.stdout.split() == ["pytest", "hypothesis", "trustme", "cryptography", "prometheus_client"]


from deploy import render_examples  # noqa: E402  (the plain env file and unit for installs without Ansible)


@pytest.mark.parametrize("name", sorted(render_examples.EXAMPLES))
def test_plain_env_file_and_unit_are_the_templates_rendered_with_the_example_values(name, tmp_path):
    """deploy/billing-service.env.example and deploy/billing-service.service
    are, byte for byte, the playbook's templates rendered with the example
    values (/opt/billing-service, user billing-service, ...), and that
    rendering is Ansible's own (its template module, same values)."""
    template, values, _ = render_examples.EXAMPLES[name]
    path = os.path.join(DEPLOY, name)
    with open(path, "rb") as handle:
        assert handle.read() == render_examples.rendered()[path].encode(), \
            f"{name} is out of date: run .venv/bin/python deploy/render_examples.py"
    by_ansible = tmp_path / name
    done = run_tool([tool("ansible"), "localhost", "-c", "local", "-i", "localhost,",
                     "-e", f"ansible_python_interpreter={sys.executable}", "-e", json.dumps(values),
                     "-m", "ansible.builtin.template", "-a", f"src={DEPLOY}/{template} dest={by_ansible}"])
    assert done.returncode == 0, done.output
    assert by_ansible.read_text() == render_examples.render(template, values)


def test_plain_env_file_and_unit_fit_together_and_the_example_token_is_refused():
    with open(os.path.join(DEPLOY, "billing-service.service")) as handle:
        unit = parse_unit(handle.read())
    assert unit[("Service", "ExecStart")] == ["/opt/billing-service/venv/bin/python "
                                              "/opt/billing-service/app/gunicorn.conf.py"]
    assert unit[("Service", "WorkingDirectory")] == ["/opt/billing-service/app"]
    assert unit[("Service", "User")] == unit[("Service", "Group")] == ["billing-service"]
    assert unit[("Service", "EnvironmentFile")] == ["/etc/billing-service/billing-service.env"]
    with open(os.path.join(DEPLOY, "billing-service.env.example")) as handle:
        example = parse_env_file(handle.read())
    # Copied as is, the service refuses to start: the token placeholder is too short.
    with pytest.raises(billing.ConfigError, match="INTERNAL_SERVICE_TOKEN"):
        billing.load_config(example)
    # With a token, the rest is a valid configuration (the playbook's defaults).
    config = billing.load_config({**example, "INTERNAL_SERVICE_TOKEN": TOKEN})
    assert [s.source_id for s in config.sources] == ["jp-xhttp-contabo"] and config.listen_addr == "0.0.0.0:8081"


# ---- the README's operator snippets and SQL, run as written -----------------------------

def readme_example(name: str) -> str:
    """The fenced block that follows ``<!-- example: NAME -->`` in README.md, as an operator copies it."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    found = re.findall(rf"(?m)^([ \t]*)<!-- example: {re.escape(name)} -->\n\1```\w*\n(.*?)^\1```$", readme, re.S)
    assert len(found) == 1, f"README.md has no single example {name!r}"
    indent, block = found[0]
    return "".join(line[len(indent):] if line.startswith(indent) else line for line in block.splitlines(True))


def test_the_readmes_demo_account_command_survives_head_closing_the_pipe():
    """``A=$(... --print-accounts | head -n 1)``: head exits after one line; the exporter script must
    neither fail nor print a BrokenPipeError (it did with PYTHONUNBUFFERED=1, as often as not)."""
    (line,) = [line for line in readme_example("push").splitlines() if line.startswith("A=$(")]
    command = line[len("A=$("):-1]
    assert command.endswith("--print-accounts | head -n 1"), command
    for unbuffered in (True, False) * 6:
        env = {"PATH": os.environ["PATH"], **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})}
        done = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert done.stdout == dx.demo_accounts(1)[0] + "\n"


def sql_statements(block: str) -> list:
    """The statements of a README SQL block, each without its final semicolon."""
    return [part.strip() for part in re.split(r";[ \t]*(?:\n|$)", block) if part.strip()]


class SharedDatabase:
    """An ``account`` database as production has it: accounts' role owns the database, ``users`` and
    ``account_billing_profiles``; PUBLIC has been refused everything it can be refused, so the billing
    role (a role of its own) has only what the README grants it."""

    def __init__(self, cluster, tag: str):
        self.cluster, suffix = cluster, f"{os.getpid()}_{tag.replace('-', '_')}"
        self.owner, self.role, self.name = f"accounts_{suffix}", f"billing_{suffix}", f"shared_{suffix}"
        admin = cluster.admin()
        with admin.cursor() as cur:
            for role in (self.owner, self.role):
                cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (DB_PASSWORD,))
            cur.execute(f"CREATE DATABASE {self.name} OWNER {self.owner} TEMPLATE template0")
            cur.execute(f"REVOKE ALL ON DATABASE {self.name} FROM PUBLIC")
            cur.execute(f"GRANT CONNECT ON DATABASE {self.name} TO {self.owner}")
        admin.close()
        with psycopg2.connect(cluster.admin_dsn.rsplit("/", 1)[0] + "/" + self.name) as conn, conn.cursor() as cur:
            cur.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.close()
        schema = open(os.path.join(ROOT, "schema.sql")).read()
        profiles = re.search(r"CREATE TABLE IF NOT EXISTS public\.account_billing_profiles \(.*?\n\);", schema, re.S)
        self.sql(self.owner, open(os.path.join(ROOT, "deploy", "users_stub.sql")).read() + profiles.group())

    def url(self, role: str) -> str:
        return f"postgresql://{role}:{DB_PASSWORD}@127.0.0.1:{self.cluster.port}/{self.name}"

    def sql(self, role: str, text: str):
        with psycopg2.connect(self.url(role)) as conn, conn.cursor() as cur:
            cur.execute(text)
            rows = cur.fetchall() if cur.description else None
        conn.close()
        return rows

    def grants(self, example: str) -> str:
        """The README's GRANT statements for this database and role."""
        text = readme_example(example)
        assert text.count("DATABASE account ") == 1 and text.count(" TO billing;") == len(sql_statements(text))
        return text.replace("DATABASE account ", f"DATABASE {self.name} ").replace(" TO billing;", f" TO {self.role};")

    def missing(self) -> list:
        with psycopg2.connect(self.url(self.role)) as conn:
            missing = billing.missing_grants(conn)
        conn.close()
        return missing

    def drop(self) -> None:
        admin = self.cluster.admin()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
            for role in (self.role, self.owner):
                cur.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def granted_privileges(grants: str) -> dict:
    """{object: {privilege}} of GRANT statements (objects without their schema)."""
    out = {}
    for statement in sql_statements(grants):
        match = re.fullmatch(r"GRANT (.+?) ON (?:(DATABASE|SCHEMA|SEQUENCE) )?(.+?) TO \w+", " ".join(statement.split()))
        assert match, statement
        privileges, kind, objects = match.groups()
        for name in objects.split(", "):
            key = kind.lower() if kind in ("DATABASE", "SCHEMA") else name.split(".")[-1]
            out.setdefault(key, set()).update(privileges.split(", "))
    return out


def bills_as(shared: SharedDatabase, exporters) -> None:
    """A real collection, status, metrics and an account view as the billing role: the grants suffice."""
    shared.sql(shared.owner, f"INSERT INTO users (uuid) VALUES ('{A}')")
    server = exporters([snap(at(1, 5), (A, "x", 100, 0)), snap(at(2, 5), (A, "x", 250, 0))])
    svc = Service({"DATABASE_URL": shared.url(shared.role), "INTERNAL_SERVICE_TOKEN": TOKEN, "COLLECT_INTERVAL": "0",
                   "PRICE_PER_BYTE": "0.5", "EXPORTER_SOURCES_JSON": json.dumps([source("a", server)])})
    shared.sql(shared.owner if shared.owns else shared.role,
               f"INSERT INTO billing_source_sync_state (source_id, last_completed_until) VALUES ('a', '{rfc(at(0))}')")
    status, result = svc.post()
    assert (status, result["status"], result["written_minutes"]) == (200, "ok", 2), result
    for path in ("/v1/status", "/metrics", f"/v1/accounts/{A}"):
        response = svc.client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, (path, response.get_data(as_text=True))
    assert shared.sql(shared.role, "SELECT sum(total_bytes) FROM traffic_minute_buckets") == [(250,)]
    svc.close()


def test_the_readmes_grants_are_what_the_service_needs_when_it_applies_schema_sql(cluster, exporters, tmp_path):
    """The first way: the billing role, granted exactly the README's statements by the owner of users
    and account_billing_profiles, applies schema.sql with the README's psql command and then lacks
    nothing (app.missing_grants), bills, and each grant it was given and still needs is named once
    revoked."""
    if not shutil.which("psql"):
        pytest.skip("psql is not installed")
    shared = SharedDatabase(cluster, "grants")
    shared.owns = False
    try:
        shared.sql(shared.owner, shared.grants("grants"))
        (command,) = [line for line in readme_example("apply-schema").splitlines() if line.startswith("psql ")]
        assert command.endswith(" 'postgresql://billing@db.example:5432/account'")
        command = command.replace("'postgresql://billing@db.example:5432/account'", shlex.quote(shared.url(shared.role)))
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={"PATH": os.environ["PATH"]})
        assert done.returncode == 0, done.stderr
        assert shared.missing() == []
        bills_as(shared, exporters)
        for revoke, named in (("SELECT ON public.account_billing_profiles", "account_billing_profiles: SELECT"),
                              ("SELECT ON public.users", "users: SELECT"),
                              (f"TEMPORARY ON DATABASE {shared.name}", "database: TEMPORARY")):
            shared.sql(shared.owner, f"REVOKE {revoke} FROM {shared.role}")
            assert shared.missing() == [named]
            shared.sql(shared.owner, f"GRANT {revoke} TO {shared.role}")
        assert shared.missing() == []
    finally:
        shared.drop()


def test_the_readmes_grants_when_the_owner_applies_schema_sql_are_exactly_required_grants(cluster, exporters):
    """The second way: the owner applies schema.sql and grants the README's list. It is REQUIRED_GRANTS
    (plus what connecting needs), the billing role lacks nothing and bills, and revoking any one
    privilege makes app.missing_grants name exactly that one."""
    shared = SharedDatabase(cluster, "grants_owner")
    shared.owns = True
    try:
        shared.sql(shared.owner, open(os.path.join(ROOT, "schema.sql")).read())
        grants = shared.grants("grants-owner")
        privileges = granted_privileges(grants)
        tables = {table: set(wanted.split(", ")) for table, wanted in billing.REQUIRED_GRANTS.items()}
        assert privileges == {**tables, "database": {"CONNECT", "TEMPORARY"}, "schema": {"USAGE"},
                              "billing_job_runs_id_seq": {"USAGE"}}
        shared.sql(shared.owner, grants)
        assert shared.missing() == []
        bills_as(shared, exporters)
        named = []
        for table, wanted in sorted(tables.items()):
            for privilege in sorted(wanted):
                shared.sql(shared.owner, f"REVOKE {privilege} ON public.{table} FROM {shared.role}")
                named.append((f"{table}: {privilege}", shared.missing()))
                shared.sql(shared.owner, f"GRANT {privilege} ON public.{table} TO {shared.role}")
        for revoke, what in ((f"TEMPORARY ON DATABASE {shared.name}", "database: TEMPORARY"),
                             ("USAGE ON SEQUENCE public.billing_job_runs_id_seq", "billing_job_runs_id_seq: USAGE")):
            shared.sql(shared.owner, f"REVOKE {revoke} FROM {shared.role}")
            named.append((what, shared.missing()))
            shared.sql(shared.owner, f"GRANT {revoke} TO {shared.role}")
        assert [(what, [what]) for what, _ in named] == named
        assert len(named) == sum(map(len, tables.values())) + 2 and shared.missing() == []
    finally:
        shared.drop()


def test_gunicorn_checks_the_grants_and_logs_the_configuration_once_at_start_up(cluster, tmp_path):
    """README (Configuration, Grants): before any worker starts, gunicorn's arbiter logs the effective
    configuration once (secrets redacted) and its warnings, and checks the role's grants: one missing
    stops the launcher with one line and exit status 2; a database that is down is only logged."""
    shared = SharedDatabase(cluster, "startup")
    try:
        shared.sql(shared.owner, open(os.path.join(ROOT, "schema.sql")).read())
        shared.sql(shared.owner, shared.grants("grants-owner"))
        shared.sql(shared.owner, f"REVOKE INSERT ON public.billing_ledger FROM {shared.role}")
        env = {"PATH": os.environ["PATH"], "DATABASE_URL": shared.url(shared.role), "INTERNAL_SERVICE_TOKEN": TOKEN,
               "EXPORTER_SOURCES_JSON": json.dumps([{"source_id": "a", "base_url": "http://127.0.0.1:9"}]),
               "COLLECT_INTERVAL": "0", "LISTEN_ADDR": f"127.0.0.1:{free_port()}", "PRICE_PER_BYT": "1"}
        log = tmp_path / "launcher.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "gunicorn.conf.py"], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: proc.poll() is not None or "Booting worker" in log.read_text(), timeout=60,
                     what="the launcher to exit or a worker to boot")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        lines = log.read_text().splitlines()
        assert (proc.returncode, lines[-1:]) == (2, [
            "billing-service: configuration error: DATABASE_URL: the database role lacks billing_ledger: INSERT "
            "(README: Grants)"]), "\n".join(lines[-20:])
        assert "Traceback" not in log.read_text() and DB_PASSWORD not in log.read_text()

        shared.sql(shared.owner, f"GRANT INSERT ON public.billing_ledger TO {shared.role}")
        for database_up in (True, False):
            if not database_up:
                env["DATABASE_URL"] = f"postgresql://billing:{DB_PASSWORD}@127.0.0.1:{free_port()}/account"
            g = Gunicorn({k: v for k, v in env.items() if k != "LISTEN_ADDR"}, workers=2, split_streams=True)
            try:
                g.start()
                booted(g, 2)
                stop_cleanly(g)
            finally:
                g.stop()
            logged = our_log_lines(g.stderr())
            g.remove_logs()
            (config,) = [e for e in logged if e["event"] == "config"]
            configured = psycopg2.extensions.parse_dsn(env["DATABASE_URL"])
            assert psycopg2.extensions.parse_dsn(config["database_url"]) == {**configured, "password": "***"}
            assert config["price_per_byte"] == "0" and config["push_max_age"] == 86400.0
            assert TOKEN not in json.dumps(logged) and DB_PASSWORD not in json.dumps(logged)
            warnings = sorted(e["message"] for e in logged if e["event"] == "config_warning")
            typo = "PRICE_PER_BYT is not a billing-service variable: did you mean PRICE_PER_BYTE? (it is ignored)"
            zero = "PRICE_PER_BYTE is 0 and none of the 0 billing profiles sets a price: every charge is 0"
            assert warnings == sorted([typo, zero] if database_up else [typo]), warnings
            unchecked = [e for e in logged if e["event"] == "database_unchecked"]
            assert len(unchecked) == (0 if database_up else 1), unchecked
    finally:
        shared.drop()


def readme_json_after(name: str):
    """The JSON block that follows the README's example NAME (its sample output)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    after = readme.split(f"<!-- example: {name} -->\n```", 1)[1].split("\n```\n", 1)[1]
    assert after.lstrip().startswith("```json\n"), after[:200]
    return json.loads(after.split("```json\n", 1)[1].split("```", 1)[0])


def same_shape(example, answer, where="") -> None:
    """The same keys in the same order, and the same kinds of values (a time may be null)."""
    if isinstance(example, dict):
        assert isinstance(answer, dict) and list(answer) == list(example), (where, list(answer), list(example))
        for key in example:
            same_shape(example[key], answer[key], f"{where}.{key}")
    elif isinstance(example, list):
        assert isinstance(answer, list) and answer, where
        for item in answer:
            same_shape(example[0], item, f"{where}[]")
    elif example is None or isinstance(example, str):
        assert answer is None or isinstance(answer, str), (where, answer)
    else:
        assert type(answer) is type(example), (where, answer, example)


def test_the_readmes_account_view_is_what_the_endpoint_answers(db, exporters, service):
    """GET /v1/accounts/<uuid> answers the README example's shape; its numbers are the account's rows
    (bytes per day and line, ledger money as exact decimal text, the quota row), and the README's
    400/404 answers are the endpoint's."""
    db.add_users(A, B)
    server, svc = one_source(db, exporters, service, [
        snap(at(1, 5), (A, "x", 100, 10), (A, "", 7, 0)), snap(at(1, 35), (A, "x", 160, 10), (A, "", 9, 1)),
        snap(at(2, 5), (A, "x", 400, 30), (A, "", 9, 1))], PRICE_PER_BYTE="0.000001", INITIAL_BALANCE="10",
        INITIAL_INCLUDED_QUOTA_BYTES="50")
    assert svc.post()[1]["status"] == "ok"
    day = datetime.combine(at(1).date(), datetime.min.time(), UTC)
    query = f"?since={rfc(day)}&until={rfc(day + timedelta(days=1))}"
    status, view = svc.get(f"/v1/accounts/{A}{query}", token=TOKEN)
    assert status == 200, view
    same_shape(readme_json_after("account"), view)
    assert view["bytes"] == [
        {"day": day.date().isoformat(), "region": "", "line_code": "", "uplink_bytes": 9, "downlink_bytes": 1,
         "bytes": 10, "minutes": 1},
        {"day": day.date().isoformat(), "region": "", "line_code": "x", "uplink_bytes": 400, "downlink_bytes": 30,
         "bytes": 430, "minutes": 2}]
    # 440 bytes, the first 50 included: 390 at one millionth, in 5 ledger rows (one per increment)
    assert view["money"] == [{"day": day.date().isoformat(), "rated_bytes": 390, "amount": "-0.00039",
                              "ledger_rows": 5}]
    assert view["state"] == {"balance": "9.99961", "remaining_included_quota_bytes": 0, "arrears": False,
                             "arrears_since": None, "throttle_state": "normal", "suspend_state": "active",
                             "suspended_by_billing": False, "last_rated_minute": rfc(at(2))}
    if at(1).date() == datetime.now(UTC).date():  # the default range is today (UTC)
        assert svc.get(f"/v1/accounts/{A}", token=TOKEN) == (200, view)
    assert svc.get(f"/v1/accounts/{B}{query}", token=TOKEN) == (200, {
        "account": B, "since": rfc(day), "until": rfc(day + timedelta(days=1)), "state": None, "bytes": [],
        "money": []})
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        api = handle.read().split("## API\n", 1)[1].split("\n## ", 1)[0]
    for path, answer in ((f"/v1/accounts/not-a-uuid{query}", (400, "not an account UUID")),
                         (f"/v1/accounts/{uuid.uuid4()}{query}", (404, "no such account (no users row)")),
                         (f"/v1/accounts/{A}?since={rfc(day)}&until={rfc(day + timedelta(days=32))}",
                          (400, "the range is longer than 31 days")),
                         (f"/v1/accounts/{A}?since={rfc(day)}&until={rfc(day)}", (400, "since must be before until")),
                         (f"/v1/accounts/{A}?since=yesterday", (400, "since and until must be RFC3339 times"))):
        status, body = svc.get(path, token=TOKEN)
        assert (status, body) == (answer[0], {"error": answer[1]}), path
        assert f"`{answer[1]}`" in api.replace("\n", " ")
    assert svc.get(f"/v1/accounts/{A}{query}")[0] == 401


def takeover_stream(count: int):
    """The scenario of test_takeover_from_the_original_service_bills_every_byte_after_it_exactly_once,
    longer: a tagged account, an untagged one and one with two inbounds, a snapshot every 20 s."""
    tagged, untagged, two = account(41), account(42), account(43)
    return (tagged, untagged, two), [
        (at(1, 20 * i), [(tagged, "xhttp", 100 * (i + 1), 10 * (i + 1)), (untagged, "", 50 * (i + 1), 5 * (i + 1)),
                         (two, "xhttp", 1000 * (i + 1), 0), (two, "tcp", 300 * (i + 1), 30 * (i + 1))])
        for i in range(count)]


def test_the_readmes_takeover_verification_reports_the_truth_per_account(db, exporters, service):
    """The README's verification SQL, run as written: over the original service's rows (the takeover
    test's scenario) it shows billed_since = counter_growth for the one-series accounts and leaves the
    two-inbound account's growth empty (it is billed one interval per inbound short); run again over the
    rows this service has written (tagged series keys), it shows billed_since = counter_growth for every
    account; the money query explains every balance."""
    (tagged, untagged, two), snapshots = takeover_stream(24)
    db.add_users(tagged, untagged, two)
    price = 0.5
    original_service_state(db, snapshots[:16], at(3, 20), price, 100000.0)  # its last sample: the 8th
    db.q(readme_example("takeover-before"))
    take_over(db)
    server = exporters([snap(t, *samples) for t, samples in snapshots[:16]])
    svc = service(db, [source("a", server)], PRICE_PER_BYTE=str(price))
    assert svc.post()[1]["status"] == "ok"
    node = f"{ENV}:{NODE}"

    def report():
        rows = db.q(readme_example("takeover-after"))
        assert {row[0] for row in rows} == {node}
        return {row[1]: tuple(None if value is None else int(value) for value in row[2:]) for row in rows}

    def money(billed):
        rows = {row[0]: row for row in db.q(readme_example("takeover-money"))}
        assert {a: (float(r[2]), r[3] > 0, r[5]) for a, r in rows.items()} == {
            a: (-price * billed[a], True, 0) for a in billed}

    # (series before, series now, billed_since, counter_growth): 8 snapshots after the original's last
    assert report() == {tagged: (1, 1, 8 * 110, 8 * 110), untagged: (1, 1, 8 * 55, 8 * 55),
                        two: (1, 2, 8 * 1330 - 1330, None)}
    money({tagged: 8 * 110, untagged: 8 * 55, two: 7 * 1330})

    # Again, on the database this service has written: tagged keys are counted under their storage node.
    db.q("DROP TABLE takeover_before, takeover_balances")
    db.q(readme_example("takeover-before"))
    server.add(*[snap(t, *samples) for t, samples in snapshots[16:]])
    assert svc.post()[1]["status"] == "ok"
    assert report() == {tagged: (1, 1, 8 * 110, 8 * 110), untagged: (1, 1, 8 * 55, 8 * 55),
                        two: (2, 2, 8 * 1330, 8 * 1330)}
    money({tagged: 8 * 110, untagged: 8 * 55, two: 8 * 1330})


def the_original_runs_again(db: Db, snapshots, price: float) -> None:
    """The original Go service started again over this service's rows, as original_service_state
    models it: one plain-key checkpoint per (env:node, account), whichever inbound it saw last; without
    one, an account is new and its whole counter is billed; otherwise each direction's growth, never
    below zero. Tagged keys are not its own, so it never reads them. Buckets add up, one uuid5 ledger
    row per (minute, account, line), balances move, the watermark follows."""
    node = f"{ENV}:{NODE}"
    rows = {row[1]: row[2:4] for row in db.checkpoints() if row[0] == node}
    billed = collections.Counter()
    for stamp, samples in snapshots:
        for account_id, tag, up, down in samples:
            previous = rows.get(account_id)
            step = up + down if previous is None else max(0, up - previous[0]) + max(0, down - previous[1])
            rows[account_id] = (up, down)
            db.q("""INSERT INTO traffic_stat_checkpoints (node_id, account_uuid, last_uplink_total, last_downlink_total,
                    last_seen_at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (node_id, account_uuid) DO UPDATE
                    SET last_uplink_total = EXCLUDED.last_uplink_total,
                        last_downlink_total = EXCLUDED.last_downlink_total, last_seen_at = EXCLUDED.last_seen_at""",
                 (node, account_id, up, down, stamp))
            billed[(billing.minute_floor(stamp), account_id, tag)] += step
    for (minute, account_id, tag), total in billed.items():
        if not total:
            continue
        db.q("""INSERT INTO traffic_minute_buckets AS t (bucket_start, node_id, account_uuid, region, line_code,
                uplink_bytes, downlink_bytes, total_bytes, rating_status, source_revision)
                VALUES (%s, %s, %s, '', %s, %s, 0, %s, 'rated', 'billing-service-go')
                ON CONFLICT (bucket_start, node_id, account_uuid, region, line_code) DO UPDATE
                SET uplink_bytes = t.uplink_bytes + EXCLUDED.uplink_bytes, total_bytes = t.total_bytes + EXCLUDED.total_bytes""",
             (minute, node, account_id, tag, total, total))
        (balance,) = db.one("""UPDATE account_quota_states SET current_balance = current_balance - %s
                               WHERE account_uuid = %s RETURNING current_balance""", (price * total, account_id))
        db.q("""INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes,
                amount_delta, balance_after, pricing_rule_version) VALUES (%s, %s, %s, %s, 'traffic_charge', %s, %s,
                %s, 'billing-service-go')""",
             (str(uuid.uuid5(uuid.NAMESPACE_OID, f"{rfc(minute)}|{node}|{account_id}||{tag}")), account_id, minute,
              minute + MINUTE, total, -price * total, balance))
    db.set_watermark("a", snapshots[-1][0])


def test_going_back_to_the_original_and_returning_as_the_readme_says_bills_each_byte_once(db, exporters, service):
    """This service bills a node, makes way for the original (the README's rollback statement first),
    then comes back (the README's return and inherit statements). A one-inbound tagged account, an
    untagged one and a tagged one the original never saw are billed exactly their counters over the
    whole time, whoever billed which part; the two-inbound account (the original's one row cannot
    follow it) is never billed more than its growth after the return; no ledger id collides and every
    balance is its ledger."""
    (tagged, untagged, two), stream = takeover_stream(30)
    idle = account(44)
    # The idle account is away while the original runs; the two-inbound account's tcp misses the first
    # snapshot after the return (its stale checkpoint of this service must not bill the original's time).
    snapshots = [(t, [s for s in samples if i != 20 or s[:2] != (two, "tcp")] +
                  ([(idle, "xhttp", 70 * (i + 1), 7 * (i + 1))] if not 10 <= i < 20 else []))
                 for i, (t, samples) in enumerate(stream)]
    db.add_users(tagged, untagged, two, idle)
    price = 0.5
    server = exporters([snap(t, *samples) for t, samples in snapshots[:10]])
    db.set_watermark("a", at(0))
    svc = service(db, [source("a", server)], PRICE_PER_BYTE=str(price))
    assert svc.post()[1]["status"] == "ok"
    svc.close()

    db.q(readme_example("rollback"))  # this service stopped; before the original starts
    the_original_runs_again(db, snapshots[10:20], price)

    db.q(readme_example("return"))  # the original stopped
    db.q(readme_example("inherit"))
    server.add(*[snap(t, *samples) for t, samples in snapshots[10:]])
    svc = service(db, [source("a", server)], PRICE_PER_BYTE=str(price))
    status, result = svc.post()
    assert (status, result["status"], result["already_billed"]) == (200, "ok", 0), result
    assert db.watermark("a") == snapshots[-1][0]

    billed = collections.Counter()
    ours_after = collections.Counter()
    for bucket in db.buckets():
        billed[bucket[2]] += bucket[7]
    for row in db.q("""SELECT account_uuid::text, sum(total_bytes) FROM traffic_minute_buckets
                       WHERE bucket_start >= %s AND source_revision <> 'billing-service-go' GROUP BY 1""",
                    (billing.minute_floor(snapshots[20][0]) + MINUTE,)):
        ours_after[row[0]] = row[1]
    last = {(a, tag): up + down for a, tag, up, down in snapshots[-1][1]}
    assert billed[tagged] == last[tagged, "xhttp"]  # 110 a snapshot, from zero, once
    assert billed[untagged] == last[untagged, ""]
    assert billed[idle] == last[idle, "xhttp"]
    first = {(a, tag): up + down for i in (21, 20) for a, tag, up, down in snapshots[i][1]}
    # each inbound's first sample after the return is a baseline (below the original's row; beside the
    # account's other series), then exact
    assert ours_after[two] == last[two, "xhttp"] - first[two, "xhttp"] + last[two, "tcp"] - first[two, "tcp"]
    assert db.q("SELECT count(*) FROM billing_inherited_checkpoints") == [(0,)]
    ids = [row[0] for row in db.ledger()]
    assert len(ids) == len(set(ids))
    balances = db.q("""SELECT q.account_uuid::text, q.current_balance::numeric, sum(l.amount_delta::numeric)
                       FROM account_quota_states q JOIN billing_ledger l USING (account_uuid) GROUP BY 1, 2""")
    assert len(balances) == 4 and all(balance == ledger for _, balance, ledger in balances), balances


def readme_queries(name: str, url: str, **variables) -> list:
    """Each query of the README's SQL example NAME, run through psql as an operator pastes it (its
    set lines first, with ``variables`` instead of the README's values): the rows of each, as text."""
    import csv
    import io
    if not shutil.which("psql"):
        pytest.skip("psql is not installed")
    block = readme_example(name)
    settings_ = [line for line in block.splitlines() if line.startswith("\\set ")]
    for key, value in variables.items():
        (line,) = [line for line in settings_ if line.split()[1] == key]
        settings_[settings_.index(line)] = f"\\set {key} {value}"
    body = "\n".join(line for line in block.splitlines() if not line.startswith("\\set "))
    results = []
    for statement in sql_statements(body):
        done = subprocess.run(["psql", "-X", "-q", "--csv", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"],
                              input="\n".join(settings_ + [statement + ";"]), capture_output=True, text=True,
                              timeout=120, env={"PATH": os.environ["PATH"]})
        assert done.returncode == 0, done.stderr
        results.append(list(csv.reader(io.StringIO(done.stdout)))[1:])
    return results


def months_stream():
    """Three accounts over ten minutes, a snapshot every 30 s: A heavy on two inbounds, B light, C once."""
    return [snap(at(1, 30 * i), (A, "x", 1000 * (i + 1), 100 * (i + 1)), (A, "", 10 * (i + 1), 0),
                 (B, "x", 7 * (i + 1), 0), *([(C, "y", 5000, 5)] if i == 3 else [])) for i in range(20)]


def test_the_readmes_queries_for_months_answer_from_the_rows(db, exporters, service):
    """Running it for months: one account's minutes and ledger rows today, the top accounts this month by
    bytes and by money, and the balance check (quiet while every balance is INITIAL_BALANCE plus its
    ledger; naming a topped-up account with its starting balance), run through psql as written."""
    db.add_users(A, B, C)
    _, svc = one_source(db, exporters, service, months_stream(), PRICE_PER_BYTE="0.000001", INITIAL_BALANCE="10")
    assert svc.post()[1]["status"] == "ok"
    now = datetime.now(UTC)
    today = datetime.combine(now.date(), datetime.min.time(), UTC)
    month = today.replace(day=1)
    minutes, ledger = readme_queries("months-account", db.url, account=f"'{A}'")
    assert [(billing.parse_time(r[0].replace(" ", "T").replace("+00", "Z")), r[1], r[2], int(r[5])) for r in minutes] == [
        (b[0], b[1], b[4], b[7]) for b in db.buckets() if b[2] == A and b[0] >= today]
    assert [r[5] for r in ledger] == [r[0] for r in db.q(
        "SELECT id::text FROM billing_ledger WHERE account_uuid = %s AND bucket_start >= %s ORDER BY created_at, id",
        (A, today))]
    assert sum(Decimal(r[2]) for r in ledger) == sum(
        (billing.as_decimal(r[6]) for r in db.ledger() if r[1] == A and r[2] >= today), Decimal(0))
    by_bytes, by_money = readme_queries("months-top", db.url)
    expected = collections.Counter()
    for b in db.buckets():
        if b[0] >= month:
            expected[b[2]] += b[7]
    assert [(r[0], int(r[1])) for r in by_bytes] == sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))
    assert [r[0] for r in by_money] == [a for a, _ in sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))]
    assert readme_queries("months-balance", db.url, initial_balance="10") == [[]]
    assert readme_queries("months-balance", db.url, initial_balance="0")[0] != []  # the check can fail
    db.q("UPDATE account_quota_states SET current_balance = current_balance + 5 WHERE account_uuid = %s", (B,))
    ((row,),) = readme_queries("months-balance", db.url, initial_balance="10")
    assert (row[0], Decimal(row[3])) == (B, Decimal(15))


def test_the_readmes_backup_restores_facts_that_agree_and_billing_continues(cluster, exporters, tmp_path):
    """The README's pg_dump of the billing tables, restored with its pg_restore into an empty copy of
    the schema: the same facts, and the next run bills on both databases exactly alike."""
    if not (shutil.which("pg_dump") and shutil.which("pg_restore")):
        pytest.skip("pg_dump and pg_restore are not installed")
    source_db, restored = Db(cluster.new_database()), Db(cluster.new_database())
    try:
        stream = months_stream()
        for database in (source_db, restored):
            database.add_users(A, B, C)
        server = exporters(stream[:12])
        source_db.set_watermark("a", at(0))
        env = dict(PRICE_PER_BYTE="0.000001", INITIAL_BALANCE="10")
        assert Service(service_env(source_db, [source("a", server)], **env)).post()[1]["status"] == "ok"
        url = "'postgresql://billing@db.example:5432/account'"
        dump = readme_example("backup")
        assert dump.count(url) == 1
        done = subprocess.run(["bash", "-c", dump.replace(url, shlex.quote(source_db.url))], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"]})
        assert done.returncode == 0, done.stderr
        (dumped,) = [name for name in os.listdir(tmp_path) if name.endswith(".dump")]
        restore = readme_example("restore")
        assert restore.count(url.replace("'", "")) == 1 and restore.count("billing-20261201T000000Z.dump") == 1
        command = restore.replace(url.replace("'", ""), restored.url).replace("billing-20261201T000000Z.dump", dumped)
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={"PATH": os.environ["PATH"]})
        assert done.returncode == 0, done.stderr
        assert restored.facts() == source_db.facts() and restored.facts()["ledger"]
        assert restored.q("SELECT * FROM billing_node_marks") == source_db.q("SELECT * FROM billing_node_marks")
        server.add(*stream[12:])
        for database in (source_db, restored):
            result = Service(service_env(database, [source("a", server)], **env)).post()[1]
            assert (result["status"], result["already_billed"]) == ("ok", 0), result
        assert restored.facts(with_balance=True) == source_db.facts(with_balance=True)
    finally:
        for database in (source_db, restored):
            database.close()
            cluster.drop_database(database.url)


def test_deleting_old_buckets_as_the_readme_says_keeps_billing_and_replays_intact(cluster, exporters):
    """Two databases bill the same snapshots; on one, the README's batch deletion removes the buckets
    before minute 6 half-way. Then both bill the rest, a reconcile of the whole range and a rewound
    watermark replay everything: the deleted minutes stay deleted (billing never reads a bucket back),
    and every other fact (ledger, balances, checkpoints, the remaining buckets) is the same as on the
    untouched database. The remaining window keeps I2, its bytes are its counters' growth, and the
    ledger still adds up to every balance (I3)."""
    kept, pruned = Db(cluster.new_database()), Db(cluster.new_database())
    try:
        stream = months_stream()
        server = exporters(stream[:12])
        cutoff = at(6)
        block = readme_example("delete-buckets")
        age = "date_trunc('day', now(), 'UTC') - interval '90 days'"
        assert block.count(age) == 1
        for database in (kept, pruned):
            database.add_users(A, B, C)
            database.set_watermark("a", at(0))
            svc = Service(service_env(database, [source("a", server)], PRICE_PER_BYTE="0.000001"))
            assert svc.post()[1]["status"] == "ok"
        assert pruned.q("SELECT count(*) FROM traffic_minute_buckets WHERE bucket_start < %s", (cutoff,))[0][0] > 0
        pruned.q(block.replace(age, f"'{rfc(cutoff)}'::timestamptz"))  # autocommit: the DO block commits
        assert pruned.q("SELECT count(*) FROM traffic_minute_buckets WHERE bucket_start < %s", (cutoff,)) == [(0,)]
        server.add(*stream[12:])
        for database in (kept, pruned):
            svc = Service(service_env(database, [source("a", server)], PRICE_PER_BYTE="0.000001"))
            assert svc.post()[1]["status"] == "ok"
            before = row_versions(database)
            status, again = svc.post("reconcile", {"source_id": "a", "since": rfc(at(0)), "until": rfc(at(12))})
            assert (status, again["written_minutes"], again["already_billed"]) == (200, 0, 0), again
            database.set_watermark("a", at(0))
            assert svc.post()[1]["written_minutes"] == 0
            assert row_versions(database) == before
        kept_facts, pruned_facts = kept.facts(), pruned.facts()
        assert pruned_facts["buckets"] == [b for b in kept_facts["buckets"] if b[0] >= cutoff]
        assert {k: v for k, v in pruned_facts.items() if k != "buckets"} == \
            {k: v for k, v in kept_facts.items() if k != "buckets"}
        # The remaining window: I2, and each series' bytes are its counter's growth over the window.
        growth, last = collections.Counter(), {}
        for snapshot in stream:
            stamp = billing.parse_time(snapshot["collected_at"])
            for sample in snapshot["samples"]:
                key = (sample["uuid"], sample["inbound_tag"])
                total = sample["uplink_bytes_total"] + sample["downlink_bytes_total"]
                if stamp >= cutoff:
                    growth[key] += total - last.get(key, 0)
                last[key] = total
        window = collections.Counter()
        for b in pruned_facts["buckets"]:
            assert b[7] == b[5] + b[6]
            window[(b[2], b[4])] += b[7]
        assert window == +growth
        for account_id, balance, ledger_sum in pruned.q("""
                SELECT q.account_uuid::text, q.current_balance::numeric, sum(l.amount_delta::numeric)
                FROM account_quota_states q JOIN billing_ledger l USING (account_uuid) GROUP BY 1, 2"""):
            assert balance == ledger_sum, account_id
    finally:
        for database in (kept, pruned):
            database.close()
            cluster.drop_database(database.url)


def account_first_index_options(db) -> dict:
    """Each account-first index's recorded storage options (``fillfactor=80``), ``""`` for none."""
    return dict(db.q("""SELECT relname, coalesce(array_to_string(reloptions, ','), '') FROM pg_class
                        WHERE relname = ANY(%s)""", (list(ACCOUNT_FIRST_INDEXES),)))


def test_account_first_indexes_are_built_at_fillfactor_80_and_the_readme_records_it_on_older_ones(
        db, exporters, service):
    """schema.sql builds both account-first indexes at fillfactor 80. Over indexes built as the original
    built them (PostgreSQL's default), schema.sql changes nothing; the README's two statements record 80
    while billing goes on, and the REINDEX it names rebuilds each index valid, with every row."""
    assert account_first_index_options(db) == {name: "fillfactor=80" for name in ACCOUNT_FIRST_INDEXES}
    db.q("DROP INDEX idx_traffic_minute_buckets_account_bucket, idx_billing_ledger_account_created")
    db.q("CREATE INDEX idx_traffic_minute_buckets_account_bucket ON traffic_minute_buckets "
         "(account_uuid, bucket_start DESC)")
    db.q("CREATE INDEX idx_billing_ledger_account_created ON billing_ledger (account_uuid, created_at DESC)")
    db.q(open(os.path.join(ROOT, "schema.sql")).read())
    assert account_first_index_options(db) == {name: "" for name in ACCOUNT_FIRST_INDEXES}
    db.add_users(A, B)
    server, svc = one_source(db, exporters, service, [snap(at(0, 5), (A, "", 100, 10), (B, "", 7, 0)),
                                                      snap(at(1, 5), (A, "", 300, 30), (B, "", 9, 1))],
                             PRICE_PER_BYTE="0.000001")
    assert svc.post()[1]["status"] == "ok"
    statements = sql_statements(readme_example("index-fillfactor"))
    assert len(statements) == 2
    for statement in statements:
        db.q(statement)
    assert account_first_index_options(db) == {name: "fillfactor=80" for name in ACCOUNT_FIRST_INDEXES}
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        (reindex,) = re.findall(r"`(REINDEX INDEX CONCURRENTLY \w+);`", handle.read())
    for name in ACCOUNT_FIRST_INDEXES:
        db.q(reindex.replace(ACCOUNT_FIRST_INDEXES[0], name))  # one statement: outside a transaction block
    assert db.q("""SELECT c.relname, i.indisvalid, array_to_string(c.reloptions, ',') FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY(%s) ORDER BY 1""",
                (list(ACCOUNT_FIRST_INDEXES),)) == [(name, True, "fillfactor=80")
                                                     for name in sorted(ACCOUNT_FIRST_INDEXES)]
    server.add(snap(at(2, 5), (A, "", 1000, 100), (B, "", 10, 1)))
    assert svc.post()[1]["status"] == "ok"
    assert sorted((b[2], b[0], b[7]) for b in db.buckets()) == \
        sorted([(A, at(0), 110), (A, at(1), 220), (A, at(2), 770), (B, at(0), 7), (B, at(1), 3), (B, at(2), 1)])
    db.q("SET enable_seqscan = off")  # this session only: the plan must show that each index is usable
    for table, index, column in (("billing_ledger", ACCOUNT_FIRST_INDEXES[0], "created_at"),
                                 ("traffic_minute_buckets", ACCOUNT_FIRST_INDEXES[1], "bucket_start")):
        plan = db.q(f"EXPLAIN SELECT count(*) FROM {table} WHERE account_uuid = %s AND {column} > now() - "
                    "interval '100 years'", (A,))
        assert index in "\n".join(row[0] for row in plan), plan
        assert db.q(f"SELECT count(*) FROM {table} WHERE account_uuid = %s", (A,)) == [(3,)]


def test_upgrading_from_an_earlier_release_as_the_readme_says_keeps_its_series_and_suspensions(
        db, exporters, service):
    """A database an earlier release billed: A has an untagged and a tagged series on the node, and an
    account it suspended. Applying this release's schema.sql there records nothing as the original's
    (billing_job_runs says a release of this service has run), so the tagged series continues from its
    own checkpoint. The README's UPDATE hands the old suspension to billing, and the next sweep lifts it."""
    db.add_users(A, B)
    node = f"{ENV}:{NODE}"
    db.set_checkpoint(node, A, 5000, 500, at(1, 5))
    db.set_checkpoint(f"{node}#x", A, 100, 10, at(1, 5))
    db.q("""INSERT INTO account_quota_states (account_uuid, current_balance, arrears, suspend_state)
            VALUES (%s, 3, false, 'suspended')""", (B,))
    db.q("DROP TABLE billing_inherited_checkpoints")  # new in this release: schema.sql creates it
    db.q(open(os.path.join(ROOT, "schema.sql")).read())
    assert db.q("SELECT node_id, account_uuid::text FROM billing_inherited_checkpoints") == []
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        upgrading = handle.read().split("### Upgrading without Ansible\n", 1)[1].split("\n### ", 1)[0]
    statements = re.findall(r"`(UPDATE account_quota_states[^`]*;)`", upgrading)
    assert len(statements) == 1, statements
    for statement in statements:
        db.q(statement)
    _, svc = one_source(db, exporters, service, [snap(at(2, 5), (A, "x", 400, 30))], watermark_minute=1)
    result = svc.post()[1]
    assert (result["status"], result["baselined"], result["lifted"]) == ("ok", 0, 1), result
    assert [(b[4], b[7]) for b in db.buckets()] == [("x", 320)]
    assert db.q("SELECT suspend_state, suspended_by_billing FROM account_quota_states WHERE account_uuid = %s",
                (B,)) == [("active", False)]


# ---- the quick start: ./deploy/local.sh run ----------------------------------------------

def test_local_run_bills_demo_traffic_and_ctrl_c_stops_everything():
    """The README's first command, as a person runs it (ports and a state
    directory of its own, the default listen address): it binds loopback
    only, a POST bills the demo exporter's traffic, the README's reconcile
    example works as written, and Ctrl-C stops gunicorn, the exporter and PostgreSQL."""
    state = tempfile.mkdtemp(prefix="billing-local-run-")
    os.chmod(state, 0o755)
    pg_port, exporter_port, http_port = free_port(), free_port(), 8081  # LISTEN_ADDR unset: the default
    env = {key: value for key, value in os.environ.items() if key != "LISTEN_ADDR"}
    env.update(BILLING_LOCAL_DIR=state, BILLING_PG_PORT=str(pg_port), BILLING_EXPORTER_PORT=str(exporter_port))
    with open(os.path.join(state, "run.log"), "wb") as log:
        proc = subprocess.Popen([os.path.join(ROOT, "deploy", "local.sh"), "run"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"

    def log_text():
        with open(os.path.join(state, "run.log"), encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def answers():
        assert proc.poll() is None, log_text()
        try:
            return requests.get(url + "/api/ping", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(answers, timeout=120, what="local.sh run to serve")
        with open(os.path.join(state, "token")) as handle:
            token = handle.read().strip()
        assert f'curl -s -X POST -H "Authorization: Bearer {token}" 127.0.0.1:{http_port}/v1/jobs/collect-and-rate' \
            in log_text()
        response = requests.post(url + "/v1/jobs/collect-and-rate", timeout=60,
                                 headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200 and response.json()["processed_samples"] > 0, response.text
        with open(os.path.join(state, "pg", "password")) as handle:
            password = handle.read().strip()
        conn = psycopg2.connect(f"postgresql://postgres:{password}@127.0.0.1:{pg_port}/account")
        with conn, conn.cursor() as cur:
            cur.execute("SELECT (SELECT count(*) FROM traffic_minute_buckets), (SELECT count(*) FROM billing_ledger)")
            buckets, ledger = cur.fetchone()
        conn.close()
        assert buckets > 0 and ledger > 0
        assert "Listening at: http://127.0.0.1:8081" in log_text()  # loopback only, unless LISTEN_ADDR says otherwise
        # The README's reconcile example, run as written with the README's TOKEN and BASE.
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
            readme = handle.read()
        example = readme.split("<!-- example: reconcile -->\n```sh\n", 1)[1].split("```", 1)[0]
        done = subprocess.run(["bash", "-c", example], capture_output=True, text=True, timeout=60,
                              env={"PATH": os.environ["PATH"], "TOKEN": token, "BASE": url})
        answer = json.loads(done.stdout)
        assert (answer["job"], answer["status"]) == ("reconcile", "ok"), done.stdout + done.stderr
        assert [s["source_id"] for s in answer["source_statuses"]] == ["demo"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(state, "pg", "data", "postmaster.pid")), log_text()
    for port in (exporter_port, http_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert "stopped" in log_text()
    shutil.rmtree(state, ignore_errors=True)


LOCAL_SH = os.path.join(ROOT, "deploy", "local.sh")


class LocalRun:
    """./deploy/local.sh run with a state directory and ports of its own, in its
    own session (so a test can Ctrl-C it like a terminal), output in a file."""

    def __init__(self, **env):
        self.state = tempfile.mkdtemp(prefix="billing-local-run-")
        os.chmod(self.state, 0o755)
        self.pg_port, self.exporter_port, self.http_port = free_port(), free_port(), free_port()
        self.env = {key: value for key, value in os.environ.items() if key != "LISTEN_ADDR"}
        self.env.update(BILLING_LOCAL_DIR=self.state, BILLING_PG_PORT=str(self.pg_port),
                        BILLING_EXPORTER_PORT=str(self.exporter_port), LISTEN_ADDR=f"127.0.0.1:{self.http_port}")
        self.env.update(env)
        self.log_path = os.path.join(self.state, "run.log")
        self.proc = None

    def start(self) -> "LocalRun":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([LOCAL_SH, "run"], cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def serving(self) -> None:
        def answers():
            assert self.proc.poll() is None, self.log()
            try:
                return requests.get(f"http://127.0.0.1:{self.http_port}/api/ping", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(answers, timeout=120, what="local.sh run to serve")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"local.sh run still running after {timeout}s:\n{self.log()}") from None

    def processes(self, name: bytes = b"") -> list:
        """(pid, command line) of the processes this run started that are still
        there: PostgreSQL's postmaster names the state directory on its command
        line, gunicorn (and its workers) and the demo exporter in their
        environment (BILLING_LOCAL_DIR)."""
        found, state = [], self.state.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read().replace(b"\0", b" ")
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    environ = handle.read().split(b"\0")
            except PermissionError:
                environ = []
            except OSError:  # gone meanwhile
                continue
            if (state in cmdline or b"BILLING_LOCAL_DIR=" + state in environ) and name in cmdline:
                found.append((int(entry), cmdline.decode(errors="replace")))
        return found

    def leftovers(self) -> list:
        """What is left of the run: processes, ports that still answer, PostgreSQL's lock file."""
        left = [f"process {pid}: {cmdline}" for pid, cmdline in self.processes()]
        for port in (self.pg_port, self.exporter_port, self.http_port):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    left.append(f"127.0.0.1:{port} answers")
        if os.path.exists(os.path.join(self.state, "pg", "data", "postmaster.pid")):
            left.append("pg/data/postmaster.pid")
        return left

    def close(self) -> None:
        """Whatever a failed test left: the session killed, the cluster stopped."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        subprocess.run([LOCAL_SH, "pg-stop", os.path.join(self.state, "pg")], capture_output=True, check=False)
        shutil.rmtree(self.state, ignore_errors=True)


def test_local_run_with_the_http_port_taken_exits_naming_it_and_leaves_nothing_running():
    """The port is checked before anything starts (gunicorn alone would retry
    for 5 s, then leave PostgreSQL and the exporter running): exit status 1,
    the address and the variable to change named, nothing left."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    run = LocalRun(LISTEN_ADDR=f"127.0.0.1:{taken.getsockname()[1]}")
    run.http_port = taken.getsockname()[1]
    try:
        started = time.monotonic()
        status = run.start().wait(timeout=60)
        took = time.monotonic() - started
        log = run.log()
        assert status == 1, log
        assert f"local.sh: 127.0.0.1:{run.http_port} (the service, LISTEN_ADDR) is already in use: stop what " \
               "listens there or set LISTEN_ADDR=127.0.0.1:PORT" in log
        assert took < 30, f"took {took:.1f}s"
        assert "database ready" not in log and "Traceback" not in log  # refused before starting anything
        taken.close()  # the port is free again: nothing of the run may answer on it
        assert run.leftovers() == []
    finally:
        taken.close()
        run.close()


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def kill_demo_exporter(run: LocalRun) -> None:
    (pid, _), = run.processes(b"demo_exporter.py")
    os.kill(pid, signal.SIGKILL)


def kill_postgres(run: LocalRun) -> None:
    with open(os.path.join(run.state, "pg", "data", "postmaster.pid")) as handle:
        os.kill(int(handle.readline()), signal.SIGKILL)


@pytest.mark.parametrize("part, env, crash, message", [
    ("gunicorn", {"WEB_CONCURRENCY": "two"}, None, "local.sh: gunicorn exited on its own (status 2;"),
    ("demo exporter", {}, kill_demo_exporter, "local.sh: the demo exporter exited on its own (killed by signal 9;"),
    ("PostgreSQL", {}, kill_postgres, "local.sh: PostgreSQL exited on its own (log: "),
], ids=["gunicorn", "demo-exporter", "postgresql"])
def test_local_run_stops_everything_when_one_part_exits_on_its_own(part, env, crash, message):
    """gunicorn (here: a configuration error), the demo exporter or
    PostgreSQL ending on its own ends the run within seconds: exit status 1,
    the reason, and the other two stopped (a killed PostgreSQL's lock file
    removed, so the next run starts)."""
    run = LocalRun(**env).start()
    try:
        if crash is None:
            status = run.wait(timeout=120)
        else:
            run.serving()
            crash(run)
            crashed = time.monotonic()
            status = run.wait(timeout=60)
            assert time.monotonic() - crashed < 20, run.log()
        log = run.log()
        assert status == 1, log
        assert "database ready" in log and "demo exporter: 5 accounts" in log  # all three had been started
        assert message in log and "stopping the rest" in log, log
        if part == "gunicorn":
            assert "billing-service: configuration error: WEB_CONCURRENCY: not a valid integer: 'two'" in log
            assert "Traceback" not in log
        assert log.rstrip().endswith(f"local.sh: stopped (data kept in {run.state}; rm -rf it to start over)"), log
        assert run.leftovers() == []
    finally:
        run.close()


def test_local_run_names_pg_stop_for_a_live_postgres_and_recovers_a_stale_postmaster_pid():
    """A run killed with SIGKILL leaves its PostgreSQL running (pg_ctl gives it
    a session of its own): the next run leaves it alone (it may be another
    run's) and names the command that stops it. After a reboot the lock
    file's PID may belong to another process of PostgreSQL's user, which
    PostgreSQL itself takes for a live server: run removes such a stale file."""
    run = LocalRun()
    pg_dir = os.path.join(run.state, "pg")
    lock_path = os.path.join(pg_dir, "data", "postmaster.pid")
    decoy = None
    try:
        subprocess.run([LOCAL_SH, "pg-start", pg_dir, str(run.pg_port)], check=True, capture_output=True)
        with open(lock_path) as handle:
            lock = handle.read()
        postmaster = int(lock.split("\n", 1)[0])
        status = run.start().wait(timeout=60)
        log = run.log()
        assert status == 1, log
        command = f"{LOCAL_SH} pg-stop {pg_dir}"
        assert f"local.sh: PostgreSQL (PID {postmaster}) is still running in {pg_dir}" in log
        assert f"local.sh: stop it with: {command}\n" in log
        assert not process_gone(postmaster) and os.path.exists(lock_path)  # left alone
        stopped = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert stopped.returncode == 0, stopped.stderr
        assert not os.path.exists(lock_path)
        wait_for(lambda: process_gone(postmaster), timeout=10, what=f"PostgreSQL (PID {postmaster}) to exit")

        pg_user = ("postgres" if user_exists("postgres") else "nobody") if IS_ROOT else None  # local.sh's choice
        decoy = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd="/", user=pg_user)
        with open(lock_path, "w") as handle:
            handle.write(f"{decoy.pid}\n" + lock.split("\n", 1)[1])
        run.start().serving()
        assert f"local.sh: removed the stale {lock_path} (no PostgreSQL holds it" in run.log()
        os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C
        assert run.wait(timeout=60) == 130, run.log()
        assert "stopped (data kept in" in run.log()
        assert run.leftovers() == []
        assert decoy.poll() is None  # never touched
    finally:
        if decoy is not None:
            decoy.stdin.close()
            decoy.wait(timeout=10)
        run.close()


def test_ci_runs_exactly_the_quick_start_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        commands = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "exec ./deploy/local.sh test", commands
    assert os.access(os.path.join(ROOT, ".ci", "run"), os.X_OK)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        quick_start = handle.read().split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert "\n./deploy/local.sh test   # the whole test suite, as CI runs it (.ci/run)\n" in quick_start


def test_no_tracked_file_points_outside_the_repository():
    """No file git tracks points at the spec or the docs that live outside
    this repository: it is read and used on its own."""
    # Spelled in pieces so this file can be tracked without matching itself.
    needles = ["SPEC" + ".md", "SPEC" + " section", ".." + "/shared", "shared" + " docs"]
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    hits = []
    for path in filter(None, files.decode().split("\0")):
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue
        with open(full, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if any(needle.lower() in line.lower() for needle in needles):
                    hits.append(f"{path}:{number}: {line.strip()}")
    assert hits == [], "\n".join(hits)


# ---- benchmark: ./deploy/local.sh bench [--full] (skipped by the test command) -----------

def per_sample_baseline(url: str, samples: list, node: str, price: float) -> float:
    """The original design's write path, for comparison: every read and write
    of every sample its own round trip (about ten), one commit per sample.
    Returns samples per second."""
    conn = psycopg2.connect(url)
    began = time.perf_counter()
    with conn.cursor() as cur:
        for stamp, account_id, tag, up, down in samples:
            minute = billing.minute_floor(stamp)
            cur.execute("SELECT 1 FROM users WHERE uuid = %s", (account_id,))
            cur.fetchone()
            cur.execute("SELECT last_uplink_total, last_downlink_total FROM traffic_stat_checkpoints "
                        "WHERE node_id = %s AND account_uuid = %s FOR UPDATE", (node + "#" + tag, account_id))
            last = cur.fetchone() or (0, 0)
            delta = max(0, up - last[0]) + max(0, down - last[1])
            cur.execute("""INSERT INTO traffic_stat_checkpoints (node_id, account_uuid, last_uplink_total,
                           last_downlink_total, last_seen_at) VALUES (%s, %s, %s, %s, %s)
                           ON CONFLICT (node_id, account_uuid) DO UPDATE SET last_uplink_total = EXCLUDED.
                           last_uplink_total, last_downlink_total = EXCLUDED.last_downlink_total,
                           last_seen_at = EXCLUDED.last_seen_at""", (node + "#" + tag, account_id, up, down, stamp))
            cur.execute("SELECT total_bytes FROM traffic_minute_buckets WHERE bucket_start = %s AND node_id = %s "
                        "AND account_uuid = %s AND region = '' AND line_code = %s", (minute, node, account_id, tag))
            cur.fetchone()
            cur.execute("""INSERT INTO traffic_minute_buckets (bucket_start, node_id, account_uuid, region, line_code,
                           uplink_bytes, downlink_bytes, total_bytes, multiplier, source_revision)
                           VALUES (%s, %s, %s, '', %s, %s, 0, %s, 1, 'baseline')
                           ON CONFLICT (bucket_start, node_id, account_uuid, region, line_code) DO UPDATE
                           SET total_bytes = traffic_minute_buckets.total_bytes + EXCLUDED.total_bytes""",
                        (minute, node, account_id, tag, delta, delta))
            cur.execute("SELECT * FROM account_billing_profiles WHERE account_uuid = %s", (account_id,))
            cur.fetchone()
            cur.execute("""INSERT INTO account_quota_states (account_uuid) VALUES (%s)
                           ON CONFLICT (account_uuid) DO UPDATE SET current_balance = account_quota_states.
                           current_balance - %s RETURNING current_balance""", (account_id, delta * price))
            balance = cur.fetchone()[0]
            cur.execute("""INSERT INTO billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type,
                           rated_bytes, amount_delta, balance_after, pricing_rule_version)
                           VALUES (%s, %s, %s, %s, 'traffic_charge', %s, %s, %s, 'baseline')""",
                        (str(uuid.uuid4()), account_id, minute, minute + MINUTE, delta, -delta * price, balance))
            conn.commit()
    elapsed = time.perf_counter() - began
    conn.close()
    return len(samples) / elapsed


def floor_run(url: str, exporter_url: str, since: datetime, until: datetime, per_page: int) -> tuple[int, float]:
    """The PostgreSQL floor: the same pages written through the same
    repository statements as the service (node locks, series reads, quota
    locks, the COPY-and-upsert writes, the watermark, one commit per page),
    timing only those; fetching, JSON and rating are left out. Returns
    (samples, seconds)."""
    source_ = billing.Source("floor", base_url=exporter_url, timeout_seconds=120)
    client = billing.ExporterClient(source_, billing.Token(TOKEN, "", billing.Secrets()), 64 << 20)
    conn = billing.Database(url).connect()
    defaults = billing.Pricing(0, Decimal("0.000001"), Decimal(1), "bench")
    samples, seconds, cursor = 0, 0.0, ""
    while True:
        page = billing.parse_page(client.fetch(since, until, per_page, cursor), source_, since, until)
        if page.snapshots:
            clock = time.perf_counter()
            billing.lock_nodes(conn, {s.storage_node for s in page.snapshots})
            reads = billing.read_series(conn, billing.page_series(page.snapshots))
            seconds += time.perf_counter() - clock
            metered = billing.meter_page(page.snapshots, reads, "")
            accounts = sorted({inc.account for inc in metered.increments})
            clock = time.perf_counter()
            billing.read_profiles(conn, accounts)
            quota = billing.lock_quota_states(conn, {a: billing.QuotaState(0, Decimal(0)) for a in accounts})
            billed = billing.billed_ids(conn, [inc.id for inc in metered.increments])
            seconds += time.perf_counter() - clock
            rated = billing.rate_increments(metered.increments, {a: defaults for a in accounts}, quota, None,
                                            QUANTUM, billed)
            clock = time.perf_counter()
            billing.write_page(conn, "", rated.buckets, rated.ledger, metered.checkpoints, rated.quota,
                               metered.dropped, metered.taken, metered.marks)
            billing.write_sync_state(conn, "floor", completed=page.snapshots[-1].collected_at, commit=False)
            conn.commit()
            seconds += time.perf_counter() - clock
            samples += page.sample_count
        if not page.has_more:
            break
        cursor = page.next_cursor
    conn.close()
    return samples, seconds


def statement_count(pg, database: str) -> int:
    """Statements the service ran since the last reset (pg_stat_statements;
    transaction control left out, as a client library sends it implicitly)."""
    admin = pg.admin()
    with admin.cursor() as cur:
        cur.execute("""SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                       WHERE d.datname = %s AND s.query NOT IN ('BEGIN', 'COMMIT', 'ROLLBACK')""", (database,))
        (count,) = cur.fetchone()
    admin.close()
    return int(count)


@bench
def test_bench_backlog_catch_up():
    """A backlog of SNAPSHOTS x ACCOUNTS samples (one inbound each) from the
    demo exporter's synthetic timeline (own process, over HTTP) into a durable
    PostgreSQL through real gunicorn; then the PostgreSQL-only floor of the
    same backlog, the original design's per-sample baseline, and pushes of
    10,000-sample snapshots. Prints one line per figure."""
    full = os.environ.get("BENCH_FULL") == "1"
    n_accounts = int(os.environ.get("BENCH_ACCOUNTS", "10000"))
    n_snapshots = int(os.environ.get("BENCH_SNAPSHOTS", "1440" if full else "120"))
    n_pushes = int(os.environ.get("BENCH_PUSHES", "30"))
    directory = tempfile.mkdtemp(prefix="billing-bench-pg-")
    os.chmod(directory, 0o755)
    pg = Cluster(directory, "--durable")
    exporter = service = None
    try:
        db = Db(pg.new_database())
        name = urlsplit(db.url).path.lstrip("/")
        admin = pg.admin()
        with admin.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        admin.close()
        accounts = dx.demo_accounts(n_accounts)
        db.q("INSERT INTO users (uuid) SELECT unnest(%s::uuid[])", (accounts,))
        port = free_port()
        exporter = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "deploy", "demo_exporter.py"), "--port", str(port),
             "--token", TOKEN, "--accounts", str(n_accounts), "--history-minutes", str(n_snapshots),
             "--step", "60"], stdout=subprocess.PIPE, text=True)
        exporter.stdout.readline()  # its banner: listening
        now = billing.minute_floor(datetime.now(UTC))
        since = now - (n_snapshots + 5) * MINUTE
        db.set_watermark("bench", since)
        bench_source = {"source_id": "bench", "base_url": f"http://127.0.0.1:{port}",
                        "expected_node_id": "demo-node", "expected_env": "demo", "timeout_seconds": 120}
        push_source = {"source_id": "pushed", "mode": "push", "expected_node_id": "push-node", "expected_env": "demo"}
        service = Gunicorn(service_env(db, [bench_source, push_source], PRICE_PER_BYTE="0.000001"), workers=1).start()
        worker, = worker_pids(service.proc.pid)
        rss_before = peak_rss_mb(worker)
        admin = pg.admin()
        with admin.cursor() as cur:
            cur.execute("SELECT pg_stat_statements_reset()")
        admin.close()
        began = time.perf_counter()
        status, result = service.post(timeout=4 * 3600)
        elapsed = time.perf_counter() - began
        assert status == 200 and result["status"] == "ok", result
        statements = statement_count(pg, name)
        rss_peak = peak_rss_mb(worker)
        run = result["source_statuses"][0]
        samples = result["processed_samples"]
        snapshots = samples // n_accounts
        assert samples == snapshots * n_accounts and snapshots >= n_snapshots - 1
        # Speed buys nothing off the bill: every snapshot of every account is in it.
        per_snapshot = sum(4000 + i % 7 + i % 11 for i in range(n_accounts))
        assert db.one("SELECT sum(total_bytes) FROM traffic_minute_buckets") == (snapshots * per_snapshot,)

        # Pushes: snapshots of 10,000 samples of another node, one after the other, as fast as one client can.
        timeline = dx.SyntheticTimeline(accounts[:10000], now - n_pushes * MINUTE, 60.0, node_id="push-node")
        bodies = [timeline.render(ns).encode() for ns in timeline.times()[:n_pushes]]
        with requests.Session() as http:
            began = time.perf_counter()
            for body in bodies:
                answer = http.post(service.url + "/v1/ingest/snapshots", data=body, timeout=600, headers={
                    "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
                assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
            pushed = time.perf_counter() - began
        push_samples = len(bodies) * min(n_accounts, 10000)
        push_rss = peak_rss_mb(worker)

        # The floor: the same backlog through the same statements, PostgreSQL only.
        floor_db = Db(pg.new_database())
        floor_db.q("INSERT INTO users (uuid) SELECT unnest(%s::uuid[])", (accounts,))
        floor_db.set_watermark("floor", since)
        floor_samples, floor_seconds = floor_run(floor_db.url, f"http://127.0.0.1:{port}", since,
                                                 now - MINUTE, max(1, billing.PAGE_SAMPLE_TARGET // n_accounts))
        assert floor_samples == samples
        assert floor_db.one("SELECT sum(total_bytes) FROM traffic_minute_buckets") == (snapshots * per_snapshot,)
        floor_db.close()

        # The baseline: the first snapshots, one sample at a time, on a fresh database.
        base_db = Db(pg.new_database())
        base_db.q("INSERT INTO users (uuid) SELECT unnest(%s::uuid[])", (accounts,))
        body = requests.get(f"http://127.0.0.1:{port}/v1/snapshots/window", timeout=120, params={
            "since": rfc(since), "until": rfc(now), "limit": 1},
            headers={"Authorization": f"Bearer {TOKEN}"}).json()
        baseline_samples = [(billing.parse_time(s["collected_at"]), x["uuid"], x["inbound_tag"],
                             x["uplink_bytes_total"], x["downlink_bytes_total"])
                            for s in body["snapshots"] for x in s["samples"]][:int(os.environ.get("BENCH_BASELINE",
                                                                                                  "5000"))]
        baseline = per_sample_baseline(base_db.url, baseline_samples, "demo:demo-node", 0.000001)
        base_db.close()
        db.close()

        rate, floor = samples / elapsed, floor_samples / floor_seconds
        print(f"\nbench: backlog {snapshots} snapshots x {n_accounts} accounts = {samples} samples, "
              f"{run['pages']} pages, durable PostgreSQL, gunicorn gthread worker")
        print(f"bench: samples/s {rate:,.0f} ({elapsed:.1f} s; a day of 14.4M samples would take "
              f"{14_400_000 / rate / 60:.1f} min)")
        print(f"bench: floor samples/s {floor:,.0f} (PostgreSQL only: the same statements, {floor_seconds:.1f} s); "
              f"service share of the floor {rate / floor:.2f}")
        print(f"bench: baseline samples/s {baseline:,.0f} (per-sample round trips, {len(baseline_samples)} samples)")
        print(f"bench: ratio {rate / baseline:.1f}x")
        print(f"bench: peak RSS of the collecting worker {rss_peak:.0f} MB (after start-up: {rss_before:.0f} MB)")
        print(f"bench: SQL statements per page {statements / run['pages']:.1f} "
              f"({statements} statements, {run['pages']} pages, from pg_stat_statements)")
        print(f"bench: push samples/s {push_samples / pushed:,.0f} ({len(bodies)} pushes of "
              f"{min(n_accounts, 10000):,} samples, {1000 * pushed / len(bodies):.0f} ms each; "
              f"peak RSS {push_rss:.0f} MB)")
    finally:
        if service is not None:
            service.stop()
        if exporter is not None:
            exporter.terminate()
            exporter.wait(10)
        pg.stop()


# ---- benchmark: ./deploy/local.sh bench --history N (skipped by the test command) -----------------
#
# The same catch-up twice in one run, into one durable cluster on PostgreSQL's default settings: 30
# snapshots x 10,000 accounts into the empty database, then N rows of older history bulk-loaded (buckets
# and ledger rows shaped like the service's own, ids from app.ledger_id), then the next 30 snapshots.

HISTORY_TABLES = ("billing_ledger", "traffic_minute_buckets")
SAMPLES_PER_DAY = 14_400_000  # 10,000 active accounts, one sample a minute each
ACCOUNT_FIRST_INDEXES = ("idx_billing_ledger_account_created", "idx_traffic_minute_buckets_account_bucket")

# The demo exporter's synthetic counters (counting from `start`), served only between two snapshot times
# that the benchmark sets on stdin ("first_ns last_ns"; answered "ok"): one phase's snapshots, no more,
# so each phase fetches exactly its own minutes whatever the service's re-read overlap.
PHASE_EXPORTER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from datetime import datetime, timezone
from deploy import demo_exporter as dx

class Phase(dx.SyntheticTimeline):
    first = last = -1

    def times(self):
        return list(range(self.first, self.last + 1, self.step_ns)) if self.first >= 0 else []

timeline = Phase(dx.demo_accounts(int(sys.argv[3])), datetime.fromtimestamp(int(sys.argv[4]), timezone.utc), 60.0)
server = dx.ExporterServer(timeline, [sys.argv[2]]).start()
print(server.url, flush=True)
for line in sys.stdin:
    first, last = (int(word) for word in line.split())
    with timeline.lock:
        timeline.first, timeline.last = first, last
    print("ok", flush=True)
"""


class DefaultsCluster(Cluster):
    """One durable cluster on PostgreSQL's own settings (pg-start --defaults, plus BENCH_PG_SETTINGS)
    and one database with the users stub and schema.sql."""

    def __init__(self, directory: str):
        super().__init__(directory, option="--defaults", database="billing_bench")

    def superuser(self, name: str = "billing_bench"):
        """A superuser connection to database `name` (statistics, CHECKPOINT, the bulk load)."""
        conn = psycopg2.connect(self.admin_dsn.rsplit("/", 1)[0] + "/" + name)
        conn.autocommit = True
        return conn


def io_counters(conn) -> dict:
    """Cumulative counters: the cluster's checkpoints; this database's blocks read from outside
    shared_buffers (all user tables; per table and per index of HISTORY_TABLES), buffer hits, rows
    inserted and autovacuum runs. (WAL is counted from the WAL itself, see wal_between: pg_stat_wal's
    counters arrive when each backend reports them, up to seconds late.)"""
    out = {}
    with conn.cursor() as cur:
        cur.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
        out["checkpoints"] = cur.fetchone()[0]
        cur.execute("""SELECT relname, coalesce(heap_blks_read, 0), coalesce(idx_blks_read, 0),
                              coalesce(toast_blks_read, 0) + coalesce(tidx_blks_read, 0),
                              coalesce(heap_blks_hit, 0) + coalesce(idx_blks_hit, 0) + coalesce(toast_blks_hit, 0)
                                + coalesce(tidx_blks_hit, 0)
                       FROM pg_statio_user_tables""")
        out["read"] = out["hit"] = out["read other"] = 0
        for table, heap, index, toast, hit in cur.fetchall():
            out["read"] += heap + index + toast
            out["hit"] += hit
            if table in HISTORY_TABLES:
                out["heap", table] = heap + toast
            else:
                out["read other"] += heap + index + toast
        cur.execute("SELECT indexrelname, idx_blks_read FROM pg_statio_user_indexes WHERE relname = ANY(%s)",
                    (list(HISTORY_TABLES),))
        for index, read in cur.fetchall():
            out["index", index] = read
        cur.execute("""SELECT relname, n_tup_ins, autovacuum_count + autoanalyze_count FROM pg_stat_user_tables
                       WHERE relname = ANY(%s)""", (list(HISTORY_TABLES),))
        for table, inserted, autovacuums in cur.fetchall():
            out["inserted", table], out["autovacuum", table] = inserted, autovacuums
    return out


def relation_sizes(conn) -> dict:
    """{name: (table, bytes)} of each HISTORY_TABLES heap (with its TOAST) and each of its indexes, each
    table before its indexes."""
    with conn.cursor() as cur:
        cur.execute("""SELECT t.relname, t.relname, pg_table_size(t.oid), 0 FROM pg_class t
                       WHERE t.relname = ANY(%s) AND t.relkind = 'r'
                       UNION ALL
                       SELECT t.relname, i.relname, pg_relation_size(i.oid), 1 FROM pg_index x
                       JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
                       WHERE t.relname = ANY(%s) ORDER BY 1, 4, 2""", (list(HISTORY_TABLES), list(HISTORY_TABLES)))
        return {name: (table, size) for table, name, size, _ in cur.fetchall()}


def settled_counters(conn, before: dict, ledger_rows: int) -> dict:
    """The counters once the phase's writer has reported its statistics (PostgreSQL flushes a
    backend's counters at most once a second, and when it exits): its ledger rows counted, then two
    readings a second apart alike (or 15 s)."""
    wait_for(lambda: io_counters(conn)["inserted", "billing_ledger"] - before["inserted", "billing_ledger"]
             >= ledger_rows, timeout=60, interval=0.5, what="the phase's ledger rows in pg_stat_user_tables")
    reading, deadline = io_counters(conn), time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(1.0)
        again = io_counters(conn)
        if again == reading:
            break
        reading = again
    return reading


def history_ledger_chunks(accounts: list, first: datetime, minutes: int, shape: dict, price: float):
    """The history's ledger rows in COPY text format, one minute (one row per account) per chunk, the
    ids from app.ledger_id(bucket_start, storage node, account, region, line_code, collected_at) with
    every argument positional: whatever id format app.py writes, the history has it."""
    node, region, line = shape["node_id"], shape["region"], shape["line_code"]
    kind, version = shape["entry_type"], shape["pricing_rule_version"]
    rated = [(a, 4000 + i % 7 + i % 11) for i, a in enumerate(accounts)]
    for k in range(minutes):
        start = first + k * MINUTE
        collected = start  # the synthetic exporter's snapshots fall on the minute
        end = start + MINUTE
        middle = f"\t{start.isoformat()}\t{end.isoformat()}\t{kind}\t"
        tail = f"\t{version}\t{(end + timedelta(seconds=2)).isoformat()}\n"
        yield "".join(
            f"{billing.ledger_id(start, node, a, region, line, collected)}\t{a}{middle}{b}\t{-b * price!r}\t"
            f"{10.0 - b * price * (k + 1)!r}{tail}" for a, b in rated).encode()


class ChunkReader:
    """A file-like object over byte chunks, for COPY FROM STDIN (one chunk per read)."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)

    def read(self, size=-1) -> bytes:
        return next(self.chunks, b"")


def load_history(conn, accounts: list, first: datetime, minutes: int, price: float) -> tuple[list, float]:
    """Bulk-load `minutes` x accounts older buckets and as many ledger rows (before `first` + minutes),
    shaped like the rows the service wrote in phase 1, plus the series' checkpoints: the indexes and
    unique constraints of both tables dropped first and built after, FK triggers off during the load
    (session_replication_role = replica; checked after with one anti-join per table), VACUUM ANALYZE,
    CHECKPOINT. Returns (lines saying what was done, total seconds)."""
    done, began = [], time.perf_counter()

    def step(what: str, sql: str | None = None, params=None, action=None):
        clock = time.perf_counter()
        with conn.cursor() as cur:
            result = action(cur) if action else cur.execute(sql, params)
            count = cur.rowcount
        done.append(f"{what}: {time.perf_counter() - clock:.1f} s" + (f", {count:,} rows" if count > 0 else ""))
        return result

    with conn.cursor() as cur:
        # The rows the service wrote in phase 1 give the history its shape.
        cur.execute("""SELECT DISTINCT node_id, region, line_code, multiplier, rating_status, source_revision
                       FROM traffic_minute_buckets""")
        buckets_shape = cur.fetchall()
        cur.execute("SELECT DISTINCT entry_type, pricing_rule_version, bucket_end - bucket_start FROM billing_ledger")
        ledger_shape = cur.fetchall()
        cur.execute("SELECT DISTINCT node_id FROM traffic_stat_checkpoints")
        series_nodes = [row[0] for row in cur.fetchall()]
        cur.execute("""SELECT t.relname, coalesce(c.conname, i.relname),
                              CASE WHEN c.oid IS NULL THEN pg_get_indexdef(i.oid)
                                   ELSE format('ALTER TABLE %%I ADD CONSTRAINT %%I %%s', t.relname, c.conname,
                                               pg_get_constraintdef(c.oid)) END,
                              CASE WHEN c.oid IS NULL THEN format('DROP INDEX %%I', i.relname)
                                   ELSE format('ALTER TABLE %%I DROP CONSTRAINT %%I', t.relname, c.conname) END
                       FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
                       LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
                                                AND c.contype IN ('p', 'u', 'x')
                       WHERE t.relname = ANY(%s) ORDER BY 1, 2""", (list(HISTORY_TABLES),))
        indexes = cur.fetchall()
    assert len(buckets_shape) == 1 and len(ledger_shape) == 1 and ledger_shape[0][2] == MINUTE, \
        (buckets_shape, ledger_shape)
    assert series_nodes and indexes
    node, region, line, multiplier, status, revision = buckets_shape[0]
    kind, version, _ = ledger_shape[0]
    shape = {"node_id": node, "region": region, "line_code": line, "entry_type": kind,
             "pricing_rule_version": version}
    assert not any(ch in value for value in shape.values() for ch in "\t\n\r\\"), shape
    last = first + (minutes - 1) * MINUTE
    done.append(f"shape from phase 1: node_id {node!r}, region {region!r}, line_code {line!r}, "
                f"entry_type {kind!r}, pricing_rule_version {version!r}; {minutes:,} minutes "
                f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} x {len(accounts):,} accounts")
    # How the history's ids relate to the ones the service wrote in phase 1 (said, not asserted: the
    # history's ids are app.ledger_id's, whichever way the service calls it).
    with conn.cursor() as cur:
        cur.execute("SELECT id::text, bucket_start, account_uuid::text FROM billing_ledger ORDER BY id LIMIT 5")
        own = cur.fetchall()
    with_time = sum(i == billing.ledger_id(b, node, a, region, line, b) for i, b, a in own)
    without = sum(i == billing.ledger_id(b, node, a, region, line, None) for i, b, a in own)
    done.append(f"ledger ids: app.ledger_id(bucket_start, {node!r}, account, {region!r}, {line!r}, collected_at "
                f"= bucket_start), e.g. {billing.ledger_id(first, node, accounts[0], region, line, first)}; of "
                f"{len(own)} ids the service wrote in phase 1, {with_time} equal that call and {without} the same "
                "call with None as the sixth argument")

    with conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        cur.execute("SET maintenance_work_mem = '1GB'")  # this session's index builds only
    for table, name, _, drop in indexes:
        step(f"drop {name}", drop)
    step("COPY billing_ledger (ids from app.ledger_id, streamed from Python a minute at a time)",
         action=lambda cur: cur.copy_expert(
             "COPY billing_ledger (id, account_uuid, bucket_start, bucket_end, entry_type, rated_bytes, "
             "amount_delta, balance_after, pricing_rule_version, created_at) FROM STDIN",
             ChunkReader(history_ledger_chunks(accounts, first, minutes, shape, price)), size=1 << 20))
    # Minute after minute, the accounts in the exporter's order within each: the service's heap order.
    step("INSERT ... SELECT generate_series traffic_minute_buckets", """
        INSERT INTO traffic_minute_buckets (bucket_start, node_id, account_uuid, region, line_code, uplink_bytes,
                                            downlink_bytes, total_bytes, multiplier, rating_status, source_revision,
                                            created_at, updated_at)
        SELECT m, %(node)s, a.uuid, %(region)s, %(line)s, 1000 + (a.i - 1) %% 7, 3000 + (a.i - 1) %% 11,
               4000 + (a.i - 1) %% 7 + (a.i - 1) %% 11, %(multiplier)s, %(status)s, %(revision)s,
               m + interval '62 seconds', m + interval '62 seconds'
        FROM generate_series(%(first)s::timestamptz, %(last)s::timestamptz, interval '1 minute') AS m,
             LATERAL (SELECT * FROM unnest(%(accounts)s::uuid[]) WITH ORDINALITY AS u(uuid, i)
                      WHERE m IS NOT NULL ORDER BY i) AS a""",
         dict(node=node, region=region, line=line, multiplier=multiplier, status=status, revision=revision,
              first=first, last=last, accounts=accounts))
    # Each series' checkpoint as of the history's last minute; phase 1's are newer and stay.
    step("INSERT traffic_stat_checkpoints (ON CONFLICT DO NOTHING)", """
        INSERT INTO traffic_stat_checkpoints (node_id, account_uuid, last_uplink_total, last_downlink_total,
                                              last_seen_at)
        SELECT n, a, 0, 0, %s FROM unnest(%s::text[]) AS n, unnest(%s::uuid[]) AS a
        ON CONFLICT (node_id, account_uuid) DO NOTHING""", (last, series_nodes, accounts))
    for table, name, create, _ in indexes:
        step(f"build {name}", create)
    with conn.cursor() as cur:
        cur.execute("RESET session_replication_role")
        for table in HISTORY_TABLES:
            cur.execute(f"SELECT count(*) FROM {table} r WHERE NOT EXISTS (SELECT 1 FROM users u "
                        "WHERE u.uuid = r.account_uuid)")
            assert cur.fetchone()[0] == 0, f"{table}: rows of accounts missing from users"
    done.append("foreign keys checked: every row's account is in users")
    step("VACUUM ANALYZE", "VACUUM ANALYZE")
    step("CHECKPOINT", "CHECKPOINT")
    return done, time.perf_counter() - began


def wal_between(stats, data_dir: str, start_lsn: str, end_lsn: str) -> tuple[int, dict]:
    """The WAL from start_lsn to end_lsn (pg_waldump over the segments a replication slot kept): its
    records, and {relation name: full-page images} for the relations of this database, the rest under
    "(other)"."""
    waldump = os.path.join(sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                  key=lambda d: int(d.split("/")[-2]))[-1], "pg_waldump")
    image = re.compile(r"rel \d+/(\d+)/(\d+)(?: fork \w+)? blk \d+ FPW")
    counts, records = collections.Counter(), 0
    with subprocess.Popen([waldump, "-p", os.path.join(data_dir, "pg_wal"), "-s", start_lsn, "-e", end_lsn],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as dump:
        for line in dump.stdout:
            records += 1
            counts.update(image.findall(line))
        error = dump.stderr.read()
    assert dump.returncode == 0, error[-500:]
    with stats.cursor() as cur:
        cur.execute("""SELECT d.oid::text, pg_relation_filenode(c.oid)::text, c.relname FROM pg_class c, pg_database d
                       WHERE d.datname = current_database() AND pg_relation_filenode(c.oid) IS NOT NULL""")
        names = {(db, node): name for db, node, name in cur.fetchall()}
    out = collections.Counter()
    for key, n in counts.items():
        out[names.get(key, "(other)")] += n
    return records, dict(out)


def cpu_seconds(data_dir: str, service, exporter) -> dict:
    """CPU seconds used so far: by the service's workers; by PostgreSQL (the postmaster, its live children,
    and its exited children, which the kernel adds to it when it reaps them); by the exporter; and the
    machine's user + system, iowait and idle time."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int, reaped: bool = False) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # gone meanwhile
            return 0.0
        times = [int(v) for v in fields[11:15]]  # utime, stime, cutime, cstime
        return sum(times if reaped else times[:2]) / tick

    def children(pid: int) -> list:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]

    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    with open("/proc/stat") as f:
        machine = [int(v) / tick for v in f.readline().split()[1:]]
    return {"worker": sum(map(used, children(service.proc.pid))),
            "postgresql": used(postmaster, reaped=True) + sum(map(used, children(postmaster))),
            "exporter": used(exporter.pid), "machine user + system": sum(machine[:3]) + sum(machine[5:8]),
            "machine iowait": machine[4], "machine idle": machine[3]}


def run_phase(service, exporter, stats, first: datetime, snapshots: int, n_accounts: int, data_dir: str) -> dict:
    """One catch-up of `snapshots` x n_accounts samples from `first`, after a CHECKPOINT, through the
    service's HTTP job endpoint; its time, counter deltas, the WAL written from its start to its end (bytes,
    records, full-page images by relation: a replication slot keeps it for pg_waldump; it changes what is
    kept, not what is written) and rows checked."""
    exporter.stdin.write(f"{dx.to_ns(first)} {dx.to_ns(first + (snapshots - 1) * MINUTE)}\n")
    exporter.stdin.flush()
    assert exporter.stdout.readline().strip() == "ok"
    with stats.cursor() as cur:
        cur.execute("SELECT pg_create_physical_replication_slot('bench_wal', true)")
        cur.execute("CHECKPOINT")
        cur.execute("SELECT pg_current_wal_lsn()::text")
        start_lsn = cur.fetchone()[0]
        cur.execute("SELECT pg_stat_force_next_flush()")  # this session's own counters (the load's), now
    before, cpu = io_counters(stats), cpu_seconds(data_dir, service, exporter)
    began = time.perf_counter()
    status, result = service.post(timeout=3600)
    elapsed = time.perf_counter() - began
    cpu = {key: value - cpu[key] for key, value in cpu_seconds(data_dir, service, exporter).items()}
    with stats.cursor() as cur:
        cur.execute("SELECT pg_current_wal_lsn()::text, pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint",
                    (start_lsn,))
        end_lsn, wal_bytes = cur.fetchone()
    assert status == 200 and result["status"] == "ok", result
    samples = snapshots * n_accounts
    assert result["processed_samples"] == samples, result
    after = settled_counters(stats, before, samples)
    with stats.cursor() as cur:
        # Speed buys nothing off the bill: every byte of the phase is in it, once.
        cur.execute("""SELECT count(*), sum(total_bytes) FROM traffic_minute_buckets
                       WHERE bucket_start BETWEEN %s AND %s""", (first, first + (snapshots - 1) * MINUTE))
        buckets = cur.fetchone()
        cur.execute("SELECT count(*) FROM billing_ledger WHERE bucket_start BETWEEN %s AND %s",
                    (first, first + (snapshots - 1) * MINUTE))
        ledger = cur.fetchone()[0]
    assert buckets == (samples, snapshots * sum(4000 + i % 7 + i % 11 for i in range(n_accounts))), buckets
    assert ledger == samples, ledger
    try:
        records, images = wal_between(stats, data_dir, start_lsn, end_lsn)
    finally:
        with stats.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot('bench_wal')")
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    delta.update({"wal_bytes": wal_bytes, "wal_records": records, "wal_fpi": sum(images.values()),
                  **{("cpu", key): value for key, value in cpu.items()}})
    return {"seconds": elapsed, "samples": samples, "delta": delta, "sizes": relation_sizes(stats),
            "images": images}


def ratio_text(new: float, old: float) -> str:
    return f"{new / old:.2f}" if old else ("-" if not new else "from 0")


def combined(phases: list) -> dict:
    """Phases taken together: their samples, seconds, counter deltas and images summed."""
    total = {"samples": sum(p["samples"] for p in phases), "seconds": sum(p["seconds"] for p in phases),
             "delta": collections.Counter(), "images": collections.Counter()}
    for p in phases:
        total["delta"].update(p["delta"])
        total["images"].update(p["images"])
    return total


def print_history_report(settings_text, load_lines, load_seconds, history_rows, rounds, loaded_sizes, n_accounts):
    """``rounds``: (phase 1 of each round, phase 2 of each round); the first phase 1 ran before the load, into
    the database that then got the history, and gives the sizes and the growth per day."""
    first, last = rounds[0][0], rounds[1][-1]
    phases = one, two = combined(rounds[0]), combined(rounds[1])
    per = [{k: v / p["samples"] for k, v in p["delta"].items()} for p in phases]
    rows = [("samples/s", one["samples"] / one["seconds"], two["samples"] / two["seconds"], "{:,.0f}"),
            ("seconds", one["seconds"], two["seconds"], "{:.1f}"),
            ("WAL bytes/sample", per[0]["wal_bytes"], per[1]["wal_bytes"], "{:,.0f}"),
            ("full-page images/sample", per[0]["wal_fpi"], per[1]["wal_fpi"], "{:.3f}"),
            ("WAL records/sample", per[0]["wal_records"], per[1]["wal_records"], "{:.2f}"),
            ("blocks read/sample, all tables", per[0]["read"], per[1]["read"], "{:.3f}")]
    for name, (table, _) in last["sizes"].items():
        key = ("heap", name) if name == table else ("index", name)
        rows.append((f"  {name} ({key[0]})", per[0].get(key, 0), per[1].get(key, 0), "{:.3f}"))
    rows += [("  other tables (heap + indexes)", per[0]["read other"], per[1]["read other"], "{:.3f}"),
             ("buffer hits/sample, all tables", per[0]["hit"], per[1]["hit"], "{:.1f}"),
             *((f"CPU seconds per 10,000 samples: {name}", 1e4 * per[0][("cpu", name)], 1e4 * per[1][("cpu", name)],
                "{:.3f}") for name in ("worker", "postgresql", "exporter", "machine user + system",
                                       "machine iowait", "machine idle")),
             ("checkpoints during the phases", one["delta"]["checkpoints"], two["delta"]["checkpoints"], "{:.0f}"),
             ("autovacuum + autoanalyze runs, both tables",
              sum(v for k, v in one["delta"].items() if isinstance(k, tuple) and k[0] == "autovacuum"),
              sum(v for k, v in two["delta"].items() if isinstance(k, tuple) and k[0] == "autovacuum"), "{:.0f}")]
    print(f"\nbench-history: PostgreSQL settings: {settings_text}")
    print(f"bench-history: history {history_rows:,} rows loaded in {load_seconds:.0f} s:")
    for line in load_lines:
        print(f"bench-history:   {line}")
    print(f"bench-history: {len(rounds[0])} rounds, one after the other; in each, phase 1 = {first['samples']:,} "
          "samples into an empty database (round 1: before the load, into the database that then gets the "
          "history; later rounds: a database that never held any), then phase 2 = the same number of samples, "
          "the same minutes as that round's phase 1 from round 2 on, into the database with the history; each "
          "phase after a CHECKPOINT, through gunicorn (1 worker); the phases of all rounds taken together "
          "(samples/s = their samples / their seconds); per sample = per billed sample; WAL and checkpoints are "
          "the cluster's; blocks read = blocks not found in shared_buffers (read from the OS, new pages "
          "included)\n")
    print("| round | phase 1: samples/s | phase 2: samples/s | ratio 2/1 |")
    print("| --- | ---: | ---: | ---: |")
    for k, (a, b) in enumerate(zip(*rounds)):
        print(f"| {k + 1} | {a['samples'] / a['seconds']:,.0f} | {b['samples'] / b['seconds']:,.0f} | "
              f"{ratio_text(b['samples'] / b['seconds'], a['samples'] / a['seconds'])} |")
    print(f"| all | {rows[0][1]:,.0f} | {rows[0][2]:,.0f} | {ratio_text(rows[0][2], rows[0][1])} |\n")
    print("| figure | phase 1: empty database | phase 2: with history | ratio 2/1 |")
    print("| --- | ---: | ---: | ---: |")
    for label, a, b, fmt in rows:
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio_text(b, a)} |")
    print("\n| full-page images/sample, by relation | phase 1 | phase 2 |")
    print("| --- | ---: | ---: |")
    per_image = [{n: c / p["samples"] for n, c in p["images"].items()} for p in phases]
    shown = sorted((n for n in set(per_image[0]) | set(per_image[1])
                    if max(per_image[0].get(n, 0), per_image[1].get(n, 0)) >= 0.0005),
                   key=lambda n: -per_image[1].get(n, 0))
    for name in shown:
        print(f"| {name} | {per_image[0].get(name, 0):.4f} | {per_image[1].get(name, 0):.4f} |")
    print("| everything else | " + " | ".join(f"{sum(v for n, v in p.items() if n not in shown):.4f}"
                                             for p in per_image) + " |")
    cycles = len(rounds[1]) + two["delta"]["checkpoints"]
    floor = len(ACCOUNT_FIRST_INDEXES) * n_accounts * cycles
    actual = sum(two["images"].get(name, 0) for name in ACCOUNT_FIRST_INDEXES)
    print(f"\nbench-history: the account-first indexes' floor in phase 2: {len(ACCOUNT_FIRST_INDEXES)} indexes x "
          f"{n_accounts:,} accounts x {cycles} checkpoint cycles (one before each phase 2 + {cycles - len(rounds[1])} "
          "during them) "
          f"= {floor:,} full-page images ({floor / two['samples']:.3f}/sample); measured on them: {actual:,} "
          f"({actual / two['samples']:.3f}/sample); on everything: {sum(two['images'].values()):,}")
    mib = 1 << 20
    print("\n| relation | MiB after phase 1 | MiB after the load | MiB after the last phase 2 |")
    print("| --- | ---: | ---: | ---: |")
    for name, (_, size) in last["sizes"].items():
        print(f"| {name} | {first['sizes'].get(name, (0, 0))[1] / mib:,.1f} | "
              f"{loaded_sizes.get(name, (0, 0))[1] / mib:,.1f} | {size / mib:,.1f} |")
    # Round 1's phase 1 started from empty tables: what they hold after it is what its samples added.
    print(f"\nbench-history: growth per day at 10,000 active accounts ({SAMPLES_PER_DAY / 1e6:.1f} M samples/day), "
          "from round 1's phase 1 (bytes per sample x samples per day):\n")
    print("| relation | rows/day | bytes/sample | GiB/day |")
    print("| --- | ---: | ---: | ---: |")
    total = 0.0
    for name, (table, size) in first["sizes"].items():
        per_sample = size / first["samples"]
        total += per_sample
        rows_day = f"{first['rows'][name] / first['samples'] * SAMPLES_PER_DAY / 1e6:.1f} M" if name == table else ""
        print(f"| {name} | {rows_day} | {per_sample:,.1f} | {per_sample * SAMPLES_PER_DAY / (1 << 30):,.2f} |")
    print(f"| both tables with their indexes | | {total:,.1f} | {total * SAMPLES_PER_DAY / (1 << 30):,.2f} |")
    print(f"| WAL (phase 1, all rounds) | | {per[0]['wal_bytes']:,.0f} | "
          f"{per[0]['wal_bytes'] * SAMPLES_PER_DAY / (1 << 30):,.2f} |")


@bench
def test_bench_history_catch_up():
    """The catch-up into an empty database and into one holding BENCH_HISTORY (default 20 M) older ledger
    rows and as many buckets (20 M: 1.4 days at 10,000 accounts), in one run on one durable cluster with PostgreSQL's default
    settings (plus BENCH_PG_SETTINGS), in BENCH_ROUNDS (4) rounds of a phase without the history, then one
    with it (a noisy machine moves both alike): samples/s, WAL bytes, full-page images and blocks read per
    sample of each, with the ratios; the sizes of both tables' indexes; a day's growth."""
    n_accounts = int(os.environ.get("BENCH_ACCOUNTS", "10000"))
    n_snapshots = int(os.environ.get("BENCH_SNAPSHOTS", "30"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "4"))
    history_rows = int(os.environ.get("BENCH_HISTORY") or "20000000")
    minutes = history_rows // n_accounts  # N ledger rows, and as many buckets
    assert minutes >= 1, f"BENCH_HISTORY={history_rows} is under one minute of {n_accounts} accounts"
    assert rounds >= 1, f"BENCH_ROUNDS={rounds}"
    price = 0.000001
    directory = tempfile.mkdtemp(prefix="billing-bench-history-pg-")
    os.chmod(directory, 0o755)
    pg = DefaultsCluster(directory)
    exporter = stats = None
    services, connections = [], []
    try:
        # Rounds after the first bill into empty copies made now, while the template has no session.
        admin = pg.admin()
        with admin.cursor() as cur:
            for k in range(1, rounds):
                cur.execute(f"CREATE DATABASE billing_empty_{k} TEMPLATE billing_bench OWNER billing")
        admin.close()
        stats = pg.superuser()
        connections.append(stats)
        with stats.cursor() as cur:
            cur.execute("SELECT version()")
            version = cur.fetchone()[0].split(" on ")[0]
            cur.execute("""SELECT name || '=' || current_setting(name) FROM pg_settings WHERE name IN
                           ('fsync', 'full_page_writes', 'synchronous_commit', 'shared_buffers', 'wal_compression',
                            'checkpoint_timeout', 'max_wal_size', 'wal_buffers', 'autovacuum') ORDER BY name""")
            settings_text = f"{version}; " + ", ".join(row[0] for row in cur.fetchall())
            cur.execute("SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings "
                        "WHERE source = 'command line' AND name NOT IN ('port', 'listen_addresses', "
                        "'unix_socket_directories')")
            extra = cur.fetchone()[0]
            settings_text += f"; set on the command line: {extra or 'nothing'}"
        accounts = dx.demo_accounts(n_accounts)
        # Round 1's phase 1 bills the first minutes, the history lies before them; phase 2 of round k bills
        # the next minutes after round k - 1's, and phase 1 of rounds 2 and on the same minutes as their phase
        # 2. All far enough back to be whole past minutes.
        start = datetime.now(UTC).replace(second=0, microsecond=0) - ((rounds + 1) * n_snapshots + 2) * MINUTE
        exporter = subprocess.Popen(
            [sys.executable, "-c", PHASE_EXPORTER, ROOT, TOKEN, str(n_accounts), str(int(start.timestamp()))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        exporter_url = exporter.stdout.readline().strip()
        assert exporter_url.startswith("http://127.0.0.1:"), exporter_url
        bench_source = {"source_id": "bench", "base_url": exporter_url, "expected_node_id": "demo-node",
                        "expected_env": "demo", "timeout_seconds": 120}

        def service(name: str, first: datetime, state_from=None):
            """billing-service on database `name`, its watermark before `first`; with ``state_from``, that
            database's checkpoints, quota rows and node marks copied (the history's state, not its rows)."""
            db = Db(pg.url(name))
            connections.append(db.conn)
            db.q("INSERT INTO users (uuid) SELECT unnest(%s::uuid[])", (accounts,))
            db.set_watermark("bench", first - MINUTE)
            copied = () if state_from is None else ("traffic_stat_checkpoints", "account_quota_states",
                                                    "billing_node_marks")
            for table in copied:
                rows = io.StringIO()
                with state_from.cursor() as source, db.conn.cursor() as target:
                    source.copy_expert(f"COPY {table} TO STDOUT", rows)
                    rows.seek(0)
                    target.copy_expert(f"COPY {table} FROM STDIN", rows)
            services.append(Gunicorn(service_env(db, [bench_source], PRICE_PER_BYTE=str(price)), workers=1).start())
            return services[-1]

        def phase(gunicorn, conn, first: datetime) -> dict:
            return run_phase(gunicorn, exporter, conn, first, n_snapshots, n_accounts,
                             os.path.join(directory, "data"))

        history = service("billing_bench", start)
        empty, full = [phase(history, stats, start)], []
        with stats.cursor() as cur:
            cur.execute("SELECT count(*) FROM billing_ledger")
            ledger_rows = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM traffic_minute_buckets")
            empty[0]["rows"] = dict(zip(HISTORY_TABLES, (ledger_rows, cur.fetchone()[0])))

        load_lines, load_seconds = load_history(stats, accounts, start - minutes * MINUTE, minutes, price)
        loaded_sizes = relation_sizes(stats)
        with stats.cursor() as cur:
            cur.execute("SELECT count(*) FROM billing_ledger WHERE bucket_start < %s", (start,))
            assert cur.fetchone()[0] == minutes * n_accounts
            cur.execute("SELECT count(*), sum(total_bytes) FROM traffic_minute_buckets WHERE bucket_start < %s",
                        (start,))
            assert cur.fetchone() == (minutes * n_accounts,
                                      minutes * sum(4000 + i % 7 + i % 11 for i in range(n_accounts)))

        for k in range(rounds):
            first = start + (k + 1) * n_snapshots * MINUTE
            if k:  # this round's phase 2 in a database without the history: its state, none of its rows
                name = f"billing_empty_{k}"
                superuser = pg.superuser(name)
                connections.append(superuser)
                empty.append(phase(service(name, first, state_from=stats), superuser, first))
                services[-1].stop()
                # Its sessions report their counters as they go, and no autovacuum of it runs in phase 2.
                pg.drop_database(pg.url(name))
            full.append(phase(history, stats, first))
        print_history_report(settings_text, load_lines, load_seconds, 2 * minutes * n_accounts, (empty, full),
                             loaded_sizes, n_accounts)
    finally:
        for gunicorn in services:
            gunicorn.stop()
            gunicorn.remove_logs()
        if exporter is not None:
            exporter.terminate()
            exporter.wait(10)
        for conn in connections:
            conn.close()
        pg.stop()
