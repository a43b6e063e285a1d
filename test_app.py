"""billing-service tests: a real PostgreSQL cluster (started by the fixture
through ``deploy/local.sh pg-start``), real HTTP exporters on 127.0.0.1
(``deploy/demo_exporter.py``), real gunicorn where the process model matters.

Run them with ``./deploy/local.sh test``. The benchmark is ``-m bench``
(``./deploy/local.sh bench``), skipped by default.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app as billing
from deploy import demo_exporter as dx

ROOT = os.path.dirname(os.path.abspath(__file__))
UTC = timezone.utc
MINUTE = timedelta(minutes=1)
TOKEN = "tok-Internal-7f3c9a1e5b"
DB_PASSWORD = "pw-Db-Secret-4d8e2b6f"
NODE, ENV = "node-a", "prod"


# The benchmark runs only when asked for (./deploy/local.sh bench sets this).
bench = pytest.mark.skipif(os.environ.get("BILLING_BENCH") != "1", reason="benchmark: ./deploy/local.sh bench")


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


# ---- PostgreSQL ---------------------------------------------------------------

class Cluster:
    def __init__(self, directory: str, durable: bool = False):
        self.dir = directory
        self.port = free_port()
        args = [os.path.join(ROOT, "deploy", "local.sh"), "pg-start", directory, str(self.port)]
        if durable:
            args.append("--durable")
        self.admin_dsn = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        admin = self.admin()
        with admin.cursor() as cur:
            cur.execute("CREATE ROLE billing LOGIN PASSWORD %s", (DB_PASSWORD,))
            cur.execute("CREATE DATABASE billing_template OWNER billing")
        admin.close()
        with psycopg2.connect(self.url("billing_template")) as conn, conn.cursor() as cur:
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

    def set_profile(self, account, included=0, price=0.0, region=1.0, line=1.0, version="pricing-default-v1"):
        self.q("""INSERT INTO account_billing_profiles (account_uuid, included_quota_bytes, base_price_per_byte,
                  region_multiplier, line_multiplier, pricing_rule_version) VALUES (%s, %s, %s, %s, %s, %s)""",
               (account, included, price, region, line, version))

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


# ---- exporters and the service -------------------------------------------------

def account(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"account-{n}.test"))


A, B, C = account(1), account(2), account(3)


def at(minute: int, second: float = 0.0) -> datetime:
    """A fixed point in the recent past: minute 0 is 40 minutes ago, whole minute."""
    base = billing.minute_floor(datetime.now(UTC)) - 40 * MINUTE
    return base + timedelta(minutes=minute, seconds=second)


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
    for server in started:
        server.stop()


def source(source_id: str, server, **fields) -> dict:
    return {"source_id": source_id, "base_url": server.url, "expected_node_id": server.timeline.node_id,
            "expected_env": server.timeline.env, **fields}


def service_env(db: Db, sources, **env) -> dict:
    values = {"DATABASE_URL": db.url, "INTERNAL_SERVICE_TOKEN": TOKEN, "COLLECT_INTERVAL": "0",
              "EXPORTER_SOURCES_JSON": json.dumps(sources), "PRICE_PER_BYTE": "0.5"}
    values.update({key: str(value) for key, value in env.items()})
    return values


class Service:
    """The Flask app in-process, driven through its HTTP surface."""

    def __init__(self, env: dict):
        self.app = billing.create_app(env)
        self.client = self.app.test_client()

    def post(self, job="collect-and-rate", body=None, token=TOKEN, headers=None):
        all_headers = {"Authorization": f"Bearer {token}"} if token else {}
        all_headers.update(headers or {})
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        response = self.client.post(f"/v1/jobs/{job}", data=data, headers=all_headers)
        return response.status_code, response.get_json()

    def get(self, path):
        response = self.client.get(path)
        return response.status_code, response.get_json()


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


# ---- reference cases (issue 2) ---------------------------------------------------

def test_one_sample_without_profile_charges_price_and_throttles(db, exporters, service):
    db.add_users(A)
    _, svc = one_source(db, exporters, service, [snap(at(1, 5), (A, "xhttp", 100, 50))])
    status, result = svc.post()
    assert status == 200 and result["status"] == "ok", result
    assert result["processed_samples"] == 1 and result["written_minutes"] == 1
    assert db.buckets() == [(at(1), f"{ENV}:{NODE}", A, "", "xhttp", 100, 50, 150, 1.0, "rated",
                             "billing-service-v1")]
    (entry,) = db.ledger()
    expected_id = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{rfc(at(1))}|{ENV}:{NODE}|{A}||xhttp"))
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
    assert "bad: exporter answered HTTP 500" in result["error"]
    by_id = {s["source_id"]: s for s in result["source_statuses"]}
    assert by_id["bad"]["last_error"] == "exporter answered HTTP 500" and by_id["bad"]["state"] == "failed"
    assert by_id["good"]["last_error"] == "" and by_id["good"]["state"] == "ok"
    assert db.watermark("bad") == at(-1)
    assert db.watermark("good") == at(1, 5)
    assert [b[1] for b in db.buckets()] == [f"{ENV}:{NODE}"]


def test_all_sources_disabled_is_an_error(db, exporters, service):
    server = exporters()
    svc = service(db, [source("a", server, enabled=False)])
    status, result = svc.post()
    assert (status, result["status"], result["error"]) == (503, "error", "no enabled source")
    assert server.requests == []
    assert svc.get("/healthz")[0] == 503


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


def test_ping_reports_image_without_touching_anything(db, exporters, service):
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    server = exporters()
    svc = service(db, [source("a", server)], IMAGE=f"r.example.com/billing-service:sha-{sha}",
                  DATABASE_URL=f"postgresql://billing:x@127.0.0.1:{free_port()}/nowhere")
    status, body = svc.get("/api/ping")
    assert status == 200 and body["commit"] == sha and body["version"] == sha
    assert server.requests == []


# ---- configuration (SPEC section 2) -------------------------------------------------

def base_env(**extra) -> dict:
    env = {"DATABASE_URL": "postgresql://billing:pw@127.0.0.1:5432/account", "INTERNAL_SERVICE_TOKEN": TOKEN,
           "EXPORTER_SOURCES_JSON": json.dumps([{"source_id": "a", "base_url": "http://127.0.0.1:9100"}])}
    env.update(extra)
    return {key: value for key, value in env.items() if value is not None}


def test_config_defaults_and_legacy_source():
    config = billing.load_config(base_env(EXPORTER_SOURCES_JSON=None, EXPORTER_BASE_URL="http://localhost:9100"))
    assert config.sources == (billing.Source("default", "http://localhost:9100"),)
    assert config.sources[0].enabled and config.sources[0].timeout_seconds == 15
    assert config.listen_addr == "0.0.0.0:8081" and config.collect_interval == 60
    assert (config.region, config.source_revision, config.price_per_byte) == ("", "billing-service-v1", 0)
    assert (config.initial_included_quota, config.initial_balance, config.image) == (0, 0, "")


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


@pytest.mark.parametrize("env, message", [
    ({"DATABASE_URL": None}, "DATABASE_URL is required"),
    ({"DATABASE_URL": "just-a-hostname"}, "DATABASE_URL: not a valid"),
    ({"INTERNAL_SERVICE_TOKEN": ""}, "INTERNAL_SERVICE_TOKEN is required"),
    ({"EXPORTER_SOURCES_JSON": None}, "EXPORTER_SOURCES_JSON (or the legacy EXPORTER_BASE_URL) is required"),
    ({"EXPORTER_SOURCES_JSON": "[{"}, "EXPORTER_SOURCES_JSON: invalid JSON"),
    ({"EXPORTER_SOURCES_JSON": "[]"}, "EXPORTER_SOURCES_JSON: must be a non-empty JSON array"),
    ({"EXPORTER_SOURCES_JSON": '[{"base_url": "http://127.0.0.1:1"}]'}, "source_id is required"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a"}]'}, "source 'a': base_url is required"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1"},'
                               '{"source_id": "a", "base_url": "http://127.0.0.1:2"}]'}, "duplicate source_id 'a'"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1", "colour": 1}]'},
     "unknown field(s) colour"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "http://127.0.0.1:1", "enabled": "yes"}]'},
     "enabled must be true or false"),
    ({"EXPORTER_SOURCES_JSON": '[{"source_id": "a", "base_url": "ftp://127.0.0.1:1"}]'}, "http(s) URL"),
    ({"COLLECT_INTERVAL": "5"}, "COLLECT_INTERVAL: not a duration"),
    ({"COLLECT_INTERVAL": "1x"}, "COLLECT_INTERVAL"),
    ({"COLLECT_INTERVAL": "100ms"}, "COLLECT_INTERVAL: must be 0/off or at least 1s"),
    ({"PRICE_PER_BYTE": "0,5"}, "PRICE_PER_BYTE: not a valid float"),
    ({"PRICE_PER_BYTE": "nan"}, "PRICE_PER_BYTE: must be a finite number"),
    ({"PRICE_PER_BYTE": "-1"}, "PRICE_PER_BYTE: must not be negative"),
    ({"INITIAL_INCLUDED_QUOTA_BYTES": "1e9"}, "INITIAL_INCLUDED_QUOTA_BYTES: not a valid int"),
    ({"INITIAL_BALANCE": "ten"}, "INITIAL_BALANCE: not a valid float"),
    ({"LISTEN_ADDR": "8081"}, "LISTEN_ADDR"),
    ({"LISTEN_ADDR": ":99999"}, "LISTEN_ADDR"),
])
def test_bad_config_is_a_startup_error_naming_the_variable(env, message):
    with pytest.raises(billing.ConfigError) as error:
        billing.load_config(base_env(**env))
    assert message in str(error.value)


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
    assert "configuration error: PRICE_PER_BYTE: not a valid float: '0.5.1'" in done.stderr
    assert "Traceback" not in done.stderr


# ---- HTTP surface (SPEC section 8) -------------------------------------------------

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
    status, body = svc.post("reconcile", body=b"x" * (64 * 1024 + 1))
    assert status == 413 and "larger than 65536 bytes" in body["error"]
    for path in ("/api/ping", "/healthz", "/v1/status"):
        assert svc.client.get(path).is_json
