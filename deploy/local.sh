#!/usr/bin/env bash
# Local run, tests and benchmark of billing-service on a fresh machine of this
# project's kind (Debian, Python 3, PostgreSQL server binaries), as root or not.
#
#   ./deploy/local.sh run      virtualenv (requirements.txt only), throwaway
#                              PostgreSQL under .local/, schema + users stub +
#                              demo accounts, demo exporter, gunicorn on :8081.
#                              Ctrl-C stops all; when one of them exits on its
#                              own, run stops the others and exits 1, saying why
#   ./deploy/local.sh test     virtualenv (requirements.txt, requirements-test.txt
#                              and the Ansible tools), then the whole pytest suite
#                              (its fixtures start their own PostgreSQL through
#                              pg-start below); exit code is the suite's
#   ./deploy/local.sh bench [--full | --history N]
#                              the throughput benchmark (about a minute;
#                              --full bills a whole day for 10,000 accounts;
#                              --history N: the catch-up without and with N older
#                              ledger rows and as many buckets, four rounds
#                              alternating, on PostgreSQL's defaults; 20000000
#                              is 1.4 days of 10,000 accounts)
#   ./deploy/local.sh pg-start DIR PORT [--durable | --defaults]
#                              start a throwaway cluster in DIR on 127.0.0.1:PORT
#                              and print its superuser DSN (used by the tests);
#                              both options keep fsync on; --defaults changes no
#                              other setting; both add BENCH_PG_SETTINGS="a=1 b=2"
#   ./deploy/local.sh pg-stop DIR
#                              stop the cluster in DIR, or remove the stale
#                              postmaster.pid a killed run left there
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python
# The deployment tests' tools, installed by `test` only (never on hosts).
TEST_TOOLS=(ansible-core==2.19.14 ansible-lint==26.10.1)

say() { printf 'local.sh: %s\n' "$*" >&2; }

# .venv with the runtime packages (requirements.txt): all that `run` needs.
ensure_venv() {
  local stamp=$VENV/.requirements
  if [ ! -x "$PY" ] || ! cmp -s "$ROOT/requirements.txt" "$stamp"; then
    say "installing requirements.txt into $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
    cp "$ROOT/requirements.txt" "$stamp"
  fi
}

# ...and the test-only packages (requirements-test.txt): `test` and `bench`.
ensure_test_requirements() {
  local stamp=$VENV/.requirements-test
  ensure_venv
  if ! cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" | cmp -s - "$stamp"; then
    say "installing requirements-test.txt into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-test.txt"
    cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" > "$stamp"
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

# The PID of the PostgreSQL server holding DATA/postmaster.pid, if one does:
# the process is alive, runs a `postgres` binary and works in DATA (a server
# chdirs into its data directory). What cannot be read (another user's
# process, as non-root) counts as holding. A dead PID, or one the system has
# given to another process since (a reboot, a killed run), leaves the file
# stale: PostgreSQL refuses to start over a PID that is alive.
pg_holder() {
  local data=$1 pid argv0= cwd
  pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ ]] && [ -d "/proc/$pid" ] || return 0
  if [ -r "/proc/$pid/cmdline" ]; then
    { IFS= read -r -d '' argv0 < "/proc/$pid/cmdline"; } 2>/dev/null || true
    [ "${argv0##*/}" = postgres ] || return 0
  fi
  if cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null); then
    [ "$cwd" = "$(cd "$data" && pwd -P)" ] || return 0
  fi
  printf '%s\n' "$pid"
}

# Before starting a cluster in DIR: a stale postmaster.pid is removed; a live
# server is left alone (it may be another run's) and named with the command
# that stops it.
pg_claim() {
  local dir=$1 pid
  [ -f "$dir/data/postmaster.pid" ] || return 0
  pid=$(pg_holder "$dir/data")
  if [ -n "$pid" ]; then
    say "PostgreSQL (PID $pid) is still running in $dir: a killed run left it, or another run is using it"
    say "stop it with: $(printf '%q' "$0") pg-stop $(printf '%q' "$dir")"
    exit 1
  fi
  rm -f "$dir/data/postmaster.pid"
  say "removed the stale $dir/data/postmaster.pid (no PostgreSQL holds it; a killed run left it)"
}

pg_start() {
  local dir=$1 port=$2 durable=${3:-} bindir user password
  bindir=$(pg_bindir)
  user=$(pg_user)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ "$(id -u)" = 0 ] && chown "$user" "$dir"
  pg_claim "$dir"
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
  # server.log keeps every start: show this one's end only.
  as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$opts" start >/dev/null \
    || { tail -n 20 "$dir/server.log" >&2; say "PostgreSQL did not start in $dir (log: $dir/server.log)"; exit 1; }
  printf 'postgresql://postgres:%s@127.0.0.1:%s/postgres\n' "$password" "$port"
}

pg_stop() {
  local dir=$1 pid bindir
  [ -f "$dir/data/postmaster.pid" ] || return 0
  pid=$(pg_holder "$dir/data")
  if [ -z "$pid" ]; then
    rm -f "$dir/data/postmaster.pid"
    say "removed the stale $dir/data/postmaster.pid (no PostgreSQL holds it)"
    return 0
  fi
  bindir=$(pg_bindir)
  as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null && return 0
  say "PostgreSQL (PID $pid) in $dir/data did not stop (log: $dir/server.log)"
  return 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Exit 0 when HOST:PORT cannot be bound because something listens there (the
# way gunicorn binds: SO_REUSEADDR). Anything else (free, a name that does not
# resolve) is left to the program that binds it.
port_taken() {
  python3 - "$1" "$2" <<'EOF'
import errno, socket, sys
host, port = sys.argv[1].strip("[]") or "0.0.0.0", int(sys.argv[2])
try:
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
except OSError:
    sys.exit(1)
for family, kind, proto, _, address in addresses:
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                sys.exit(0)
sys.exit(1)
EOF
}

# A process that exists and is not a zombie. Builtins only (no child): see
# cmd_run's wait loop.
alive() {
  local stat
  { read -r stat < "/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# How a child of this shell ended, in ENDED: "status N" or "killed by signal N".
# (Not through $(...): a subshell cannot wait for its parent's children.)
ENDED=''
ended() {
  local status=0
  wait "$1" 2>/dev/null || status=$?
  if [ "$status" -gt 128 ]; then ENDED="killed by signal $((status - 128))"; else ENDED="status $status"; fi
}

# SIGTERM to a child, SIGKILL (to it and its children) after SECONDS.
stop_child() {
  local pid=$1 name=$2 seconds=$3 deadline
  alive "$pid" || { wait "$pid" 2>/dev/null; return 0; }
  kill -TERM "$pid" 2>/dev/null
  deadline=$((SECONDS + seconds))
  while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  if alive "$pid"; then
    say "$name (PID $pid) did not stop within ${seconds}s: killing it"
    kill -KILL $(ps -o pid= --ppid "$pid") "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  return 0
}

# What `run` started, for its EXIT trap. Globals, not cmd_run's locals: the
# trap may run after cmd_run has returned (set -u makes a missing one fatal).
RUN_STATE='' RUN_PG='' RUN_EXPORTER='' RUN_GUNICORN=''

run_cleanup() {
  set +e
  trap '' INT TERM HUP  # a second Ctrl-C must not cut the cleanup short
  [ -n "$RUN_GUNICORN" ] && stop_child "$RUN_GUNICORN" gunicorn 40  # graceful_timeout is 30 s
  [ -n "$RUN_EXPORTER" ] && stop_child "$RUN_EXPORTER" "the demo exporter" 10
  [ -n "$RUN_PG" ] && pg_stop "$RUN_PG"
  [ -n "$RUN_STATE" ] && say "stopped (data kept in $RUN_STATE; rm -rf it to start over)"
}

cmd_run() {
  ensure_venv
  # Overridable so a test can run this next to another copy of itself.
  local state=${BILLING_LOCAL_DIR:-$ROOT/.local} pg_port=${BILLING_PG_PORT:-55432}
  local exporter_port=${BILLING_EXPORTER_PORT:-9108} token admin db_url http_host http_port reason=
  mkdir -p "$state"
  state=$(cd "$state" && pwd)
  # Loopback unless told otherwise: a demo has no business on every interface.
  export LISTEN_ADDR=${LISTEN_ADDR:-127.0.0.1:8081}
  http_host=${LISTEN_ADDR%:*} http_port=${LISTEN_ADDR##*:}

  # Refuse before starting anything: a live PostgreSQL in the state directory,
  # or a port in use (gunicorn would retry for 5 s and leave the rest running).
  pg_claim "$state/pg"
  if [[ $pg_port =~ ^[0-9]+$ ]] && port_taken 127.0.0.1 "$pg_port"; then
    say "127.0.0.1:$pg_port (PostgreSQL, BILLING_PG_PORT) is already in use: stop what listens there or set BILLING_PG_PORT"
    exit 1
  fi
  if [[ $exporter_port =~ ^[0-9]+$ ]] && port_taken 127.0.0.1 "$exporter_port"; then
    say "127.0.0.1:$exporter_port (the demo exporter, BILLING_EXPORTER_PORT) is already in use: stop what listens there or set BILLING_EXPORTER_PORT"
    exit 1
  fi
  if [[ $http_port =~ ^[0-9]+$ ]] && port_taken "$http_host" "$http_port"; then
    say "$LISTEN_ADDR (the service, LISTEN_ADDR) is already in use: stop what listens there or set LISTEN_ADDR=127.0.0.1:PORT"
    exit 1
  fi

  RUN_STATE=$state
  trap run_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  token=$(cat "$state/token" 2>/dev/null || head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  printf '%s\n' "$token" > "$state/token"
  chmod 600 "$state/token"
  RUN_PG=$state/pg
  admin=$(pg_start "$state/pg" "$pg_port")
  db_url=${admin%/postgres}/account
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
  RUN_EXPORTER=$!
  export DATABASE_URL=$db_url INTERNAL_SERVICE_TOKEN=$token
  export EXPORTER_SOURCES_JSON="[{\"source_id\":\"demo\",\"base_url\":\"http://127.0.0.1:$exporter_port\",\"expected_node_id\":\"demo-node\",\"expected_env\":\"demo\"}]"
  export PRICE_PER_BYTE=${PRICE_PER_BYTE:-0.000001}
  export INITIAL_INCLUDED_QUOTA_BYTES=${INITIAL_INCLUDED_QUOTA_BYTES:-100000} INITIAL_BALANCE=${INITIAL_BALANCE:-10}
  export COLLECT_INTERVAL=${COLLECT_INTERVAL:-1m}
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
  # From gunicorn's start on, this shell runs no command in the foreground:
  # bash drops a Ctrl-C that arrives while it waits for a child which then
  # exits normally, and the traps would never run. So the postmaster's PID
  # and a pipe that never delivers (this shell holds its write end; reading
  # it with a timeout is the loop's sleep) come first.
  local tick pg_pid
  pg_pid=$(pg_holder "$state/pg/data")
  exec {tick}<> <(:)
  # The launcher: checks the configuration (one line, exit 2), then becomes gunicorn.
  "$PY" "$ROOT/gunicorn.conf.py" &
  RUN_GUNICORN=$!
  # Until Ctrl-C (the traps above) or until one of the three exits on its own.
  while [ -z "$reason" ]; do
    read -r -t 0.5 -u "$tick" || true
    if ! alive "$RUN_GUNICORN"; then
      ended "$RUN_GUNICORN"
      reason="gunicorn exited on its own ($ENDED; its output is above)"
      RUN_GUNICORN=''
    elif ! alive "$RUN_EXPORTER"; then
      ended "$RUN_EXPORTER"
      reason="the demo exporter exited on its own ($ENDED; its output is above)"
      RUN_EXPORTER=''
    elif ! alive "${pg_pid:-0}"; then
      reason="PostgreSQL exited on its own (log: $state/pg/server.log)"
    fi
  done
  say "$reason: stopping the rest"
  exit 1
}

cmd_test() {
  ensure_test_requirements
  ensure_test_tools
  cd "$ROOT"
  PATH=$VENV/bin:$PATH "$PY" -m pytest -q "$@" test_app.py
}

cmd_bench() {
  ensure_test_requirements
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
  *) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
