#!/usr/bin/env bash
# Local run, tests and benchmark of billing-service on a fresh machine of this
# project's kind (Debian, Python 3, PostgreSQL server binaries), as root or not.
#
#   ./deploy/local.sh run      virtualenv, throwaway PostgreSQL under .local/,
#                              schema + users stub + demo accounts, demo
#                              exporter, gunicorn on :8081 (Ctrl-C stops all)
#   ./deploy/local.sh test     virtualenv, then the whole pytest suite (its
#                              fixtures start their own PostgreSQL through
#                              pg-start below); exit code is the suite's
#   ./deploy/local.sh bench [--full | --history N]
#                              the throughput benchmark (about a minute;
#                              --full bills a whole day for 10,000 accounts;
#                              --history N: the catch-up before and after N rows
#                              of older history, on PostgreSQL's defaults)
#   ./deploy/local.sh pg-start DIR PORT [--durable | --defaults]
#                              start a throwaway cluster in DIR on 127.0.0.1:PORT
#                              and print its superuser DSN (used by the tests);
#                              both options keep fsync on; --defaults changes no
#                              other setting; both add BENCH_PG_SETTINGS="a=1 b=2"
#   ./deploy/local.sh pg-stop DIR
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python
# Test-only tools, kept out of requirements.txt (which the hosts install).
TEST_TOOLS=(ansible-core==2.19.14 ansible-lint==26.10.1)

say() { printf 'local.sh: %s\n' "$*" >&2; }

ensure_venv() {
  local stamp=$VENV/.requirements
  if [ ! -x "$PY" ] || ! cmp -s "$ROOT/requirements.txt" "$stamp"; then
    say "installing requirements into $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
    cp "$ROOT/requirements.txt" "$stamp"
  fi
}

ensure_test_tools() {
  local stamp=$VENV/.test-tools want
  want=$(printf '%s\n' "${TEST_TOOLS[@]}")
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing test tools: ${TEST_TOOLS[*]}"
    "$PY" -m pip install -q --disable-pip-version-check "${TEST_TOOLS[@]}"
    printf '%s\n' "$want" > "$stamp"
  fi
}

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$dir" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "no PostgreSQL server binaries: installing Debian's postgresql"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  [ -n "$dir" ] || { say "PostgreSQL server binaries not found under /usr/lib/postgresql"; exit 1; }
  printf '%s\n' "$dir"
}

# PostgreSQL refuses to run as root: as root, the cluster belongs to an
# unprivileged user (postgres when it exists, else nobody).
pg_user() {
  if [ "$(id -u)" != 0 ]; then id -un
  elif id postgres >/dev/null 2>&1; then echo postgres
  else echo nobody; fi
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$(pg_user)" -- "$@"; else "$@"; fi
}

pg_start() {
  local dir=$1 port=$2 durable=${3:-} bindir user password
  bindir=$(pg_bindir)
  user=$(pg_user)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ "$(id -u)" = 0 ] && chown "$user" "$dir"
  password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    printf '%s\n' "$password" > "$dir/pwfile"
    [ "$(id -u)" = 0 ] && chown "$user" "$dir/pwfile"
    chmod 600 "$dir/pwfile"
    as_pg "$bindir/initdb" -D "$dir/data" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 --pwfile="$dir/pwfile" >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    printf '%s\n' "$password" > "$dir/password"
    chmod 600 "$dir/password"
    rm -f "$dir/pwfile"
  fi
  password=$(cat "$dir/password")
  # Throwaway clusters skip fsync (tests); --durable keeps production's
  # durability so the benchmark measures real commits, and counts statements
  # (pg_stat_statements) so the service itself need not. --defaults is durable
  # too and keeps every setting at PostgreSQL's default (shared_buffers,
  # max_connections, checkpoints): the history benchmark's main figures.
  # BENCH_PG_SETTINGS adds (or overrides) settings of either durable kind.
  local opts="-c listen_addresses=127.0.0.1 -p $port -k $dir" setting
  case "$durable" in
    --durable) opts="$opts -c max_connections=200 -c shared_buffers=256MB"
               opts="$opts -c shared_preload_libraries=pg_stat_statements" ;;
    --defaults) ;;
    "") opts="$opts -c max_connections=200 -c shared_buffers=256MB"
        opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off" ;;
    *) say "pg-start: unknown option $durable (--durable or --defaults)"; exit 2 ;;
  esac
  if [ -n "$durable" ]; then
    for setting in ${BENCH_PG_SETTINGS:-}; do
      [[ $setting =~ ^[a-z_.]+=[A-Za-z0-9_.:/-]+$ ]] \
        || { say "BENCH_PG_SETTINGS: '$setting' is not name=value"; exit 2; }
      opts="$opts -c $setting"
    done
  fi
  as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$opts" start >/dev/null \
    || { cat "$dir/server.log" >&2; exit 1; }
  printf 'postgresql://postgres:%s@127.0.0.1:%s/postgres\n' "$password" "$port"
}

pg_stop() {
  local dir=$1 bindir
  bindir=$(pg_bindir)
  [ -f "$dir/data/postmaster.pid" ] && as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cmd_run() {
  ensure_venv
  # Overridable so a test can run this next to another copy of itself.
  local state=${BILLING_LOCAL_DIR:-$ROOT/.local} pg_port=${BILLING_PG_PORT:-55432}
  local exporter_port=${BILLING_EXPORTER_PORT:-9108} token admin db_url http_port
  mkdir -p "$state"
  token=$(cat "$state/token" 2>/dev/null || head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  printf '%s\n' "$token" > "$state/token"
  chmod 600 "$state/token"
  admin=$(pg_start "$state/pg" "$pg_port")
  db_url=${admin%/postgres}/account
  local pids=()
  cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pg_stop "$state/pg"
    say "stopped (data kept in $state; rm -rf it to start over)"
  }
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  "$PY" - "$admin" "$ROOT" <<'EOF'
import sys, subprocess, psycopg2
admin, root = sys.argv[1], sys.argv[2]
conn = psycopg2.connect(admin)
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = 'account'")
    if not cur.fetchone():
        cur.execute("CREATE DATABASE account")
conn.close()
conn = psycopg2.connect(admin.rsplit("/", 1)[0] + "/account")
accounts = subprocess.run([sys.executable, f"{root}/deploy/demo_exporter.py", "--token", "x",
                           "--print-accounts"], check=True, capture_output=True, text=True).stdout.split()
with conn, conn.cursor() as cur:
    cur.execute(open(f"{root}/deploy/users_stub.sql").read())
    cur.execute(open(f"{root}/schema.sql").read())
    for i, account in enumerate(accounts):
        cur.execute("INSERT INTO users (uuid, username, email) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (account, f"demo{i}", f"demo{i}@example.com"))
print(f"local.sh: database ready: schema.sql, users stub, {len(accounts)} demo accounts", file=sys.stderr)
EOF
  "$PY" "$ROOT/deploy/demo_exporter.py" --port "$exporter_port" --token "$token" &
  pids+=($!)
  export DATABASE_URL=$db_url INTERNAL_SERVICE_TOKEN=$token
  export EXPORTER_SOURCES_JSON="[{\"source_id\":\"demo\",\"base_url\":\"http://127.0.0.1:$exporter_port\",\"expected_node_id\":\"demo-node\",\"expected_env\":\"demo\"}]"
  # Loopback unless told otherwise: a demo has no business on every interface.
  export LISTEN_ADDR=${LISTEN_ADDR:-127.0.0.1:8081} PRICE_PER_BYTE=${PRICE_PER_BYTE:-0.000001}
  export INITIAL_INCLUDED_QUOTA_BYTES=${INITIAL_INCLUDED_QUOTA_BYTES:-100000} INITIAL_BALANCE=${INITIAL_BALANCE:-10}
  export COLLECT_INTERVAL=${COLLECT_INTERVAL:-1m}
  http_port=${LISTEN_ADDR##*:}
  cat >&2 <<EOF

billing-service is starting on ${LISTEN_ADDR}. Try, in another terminal:
  curl -s 127.0.0.1:$http_port/healthz
  curl -s -X POST -H "Authorization: Bearer $token" 127.0.0.1:$http_port/v1/jobs/collect-and-rate
  curl -s 127.0.0.1:$http_port/v1/status
  curl -s 127.0.0.1:$http_port/metrics
  psql -h $state/pg -p $pg_port -U postgres account -c 'SELECT * FROM traffic_minute_buckets ORDER BY bucket_start DESC LIMIT 5'
Ctrl-C stops gunicorn, the demo exporter and PostgreSQL.

EOF
  cd "$ROOT"
  "$VENV/bin/gunicorn" --config gunicorn.conf.py app:app &
  pids+=($!)
  wait "${pids[-1]}"
}

cmd_test() {
  ensure_venv
  ensure_test_tools
  cd "$ROOT"
  PATH=$VENV/bin:$PATH "$PY" -m pytest -q "$@" test_app.py
}

cmd_bench() {
  ensure_venv
  cd "$ROOT"
  # --history N selects the history benchmark alone; otherwise every other one.
  local full=0 history="" select="bench and not bench_history"
  while [ $# -gt 0 ]; do
    case "$1" in
      --full) full=1 ;;
      --history)
        history=${2:-}
        [[ $history =~ ^[0-9]+$ ]] || { say "bench --history needs a row count, e.g. --history 20000000"; exit 2; }
        select=bench_history
        shift ;;
      *) say "bench: unknown option $1 (--full, --history N)"; exit 2 ;;
    esac
    shift
  done
  PATH=$VENV/bin:$PATH BILLING_BENCH=1 BENCH_FULL=$full BENCH_HISTORY=$history \
    "$PY" -m pytest -q -s -p no:cacheprovider test_app.py -k "$select"
}

case "${1:-}" in
  run) shift; cmd_run "$@" ;;
  test) shift; cmd_test "$@" ;;
  bench) shift; cmd_bench "$@" ;;
  pg-start) shift; pg_start "$@" ;;
  pg-stop) shift; pg_stop "$@" ;;
  *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
