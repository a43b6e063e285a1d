"""A small xray-exporter stand-in that speaks the window API (README: The exporter protocol).

Used three ways: ``./deploy/local.sh run`` serves synthetic, steadily growing
counters for the demo accounts; the tests serve their own snapshots (and
their own faults) through the same server; the benchmark serves a day of
backlog for thousands of accounts, rendered on the fly.

    python deploy/demo_exporter.py --port 9108 --token TOKEN [--accounts N]
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import ssl
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEMO_NAMESPACE = uuid.UUID("6f1c1c2e-7d1b-4a55-9b6a-0d5b1c1e7a10")


def to_ns(stamp: datetime) -> int:
    delta = stamp - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def ns_text(ns: int) -> str:
    """RFC3339 with nanoseconds, as real exporters write cursors and times."""
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = EPOCH + timedelta(seconds=seconds)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def parse_ns(text: str) -> int | None:
    """Nanoseconds of an RFC3339 UTC time (Z), or None."""
    try:
        head, _, frac = text.rstrip("Zz").partition(".")
        stamp = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        return to_ns(stamp) + int((frac or "0").ljust(9, "0")[:9])
    except ValueError:
        return None


class Timeline:
    """Snapshots by time: ``times`` (sorted ns) and ``render(ns)`` -> JSON text."""

    def __init__(self, node_id: str, env: str):
        self.node_id = node_id
        self.env = env
        self.lock = threading.Lock()

    def times(self) -> list:
        raise NotImplementedError

    def render(self, ns: int) -> str:
        raise NotImplementedError

    def page(self, since: int, until: int, limit: int, cursor: int | None) -> bytes:
        """One window page, cursor-paged like a real exporter."""
        with self.lock:
            times = self.times()
            lo = bisect.bisect_left(times, since)
            if cursor is not None:
                lo = max(lo, bisect.bisect_right(times, cursor))
            hi = bisect.bisect_right(times, until)
            chosen = times[lo:min(hi, lo + limit)]
            rendered = [self.render(ns) for ns in chosen]
        has_more = lo + len(chosen) < hi
        if not chosen:  # real exporters: empty identity and no cursor on an empty page
            return b'{"node_id":"","env":"","snapshots":[],"has_more":false}'
        head = json.dumps({"node_id": self.node_id, "env": self.env})[:-1]
        tail = json.dumps({"has_more": has_more, "next_cursor": ns_text(chosen[-1]) if has_more else ""})[1:]
        return f'{head},"snapshots":[{",".join(rendered)}],{tail}'.encode()


class ListTimeline(Timeline):
    """Explicit snapshots (dicts with a ``collected_at``), for tests."""

    def __init__(self, node_id: str = "node-a", env: str = "prod", snapshots=()):
        super().__init__(node_id, env)
        self._by_ns: dict = {}
        self._times: list = []
        self.extend(snapshots)

    def extend(self, snapshots) -> None:
        with self.lock:
            for snap in snapshots:
                snap = {"node_id": self.node_id, "env": self.env, **snap}
                ns = parse_ns(snap["collected_at"])
                self._by_ns[ns] = json.dumps(snap)
            self._times = sorted(self._by_ns)

    def times(self) -> list:
        return self._times

    def render(self, ns: int) -> str:
        return self._by_ns[ns]


class SyntheticTimeline(Timeline):
    """Counters that grow steadily for ``accounts``, one snapshot every
    ``step`` seconds from ``start`` up to now (or ``end``); nothing is stored,
    so a day of backlog for ten thousand accounts costs no memory."""

    def __init__(self, accounts: list, start: datetime, step: float = 60.0, end: datetime | None = None,
                 node_id: str = "demo-node", env: str = "demo", inbound_tag: str = "xhttp-demo"):
        super().__init__(node_id, env)
        self.accounts = accounts
        self.start_ns = to_ns(start)
        self.step_ns = int(step * 1_000_000_000)
        self.end_ns = None if end is None else to_ns(end)
        prefix = json.dumps({"collected_at": "", "node_id": node_id, "env": env})
        self._prefix = prefix[:prefix.index('""')] + '"'
        self._middle = '"' + prefix[prefix.index('""') + 2:-1] + ',"samples":['
        self._sample = ('{"uuid":"%s","email":"","inbound_tag":"' + inbound_tag +
                        '","uplink_bytes_total":%d,"downlink_bytes_total":%d}')

    def times(self) -> list:
        end = self.end_ns if self.end_ns is not None else to_ns(datetime.now(UTC))
        count = max(0, (end - self.start_ns) // self.step_ns + 1)
        return _Arithmetic(self.start_ns, self.step_ns, count)

    def render(self, ns: int) -> str:
        k = (ns - self.start_ns) // self.step_ns + 1  # snapshots so far: counters grow with it
        sample = self._sample
        body = ",".join(sample % (acct, k * (1000 + i % 7), k * (3000 + i % 11))
                        for i, acct in enumerate(self.accounts))
        return f"{self._prefix}{ns_text(ns)}{self._middle}{body}]}}"


class _Arithmetic:
    """A read-only sorted sequence start + i*step (bisect works on it)."""

    def __init__(self, start: int, step: int, count: int):
        self.start, self.step, self.count = start, step, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.start + index * self.step


class ExporterServer(ThreadingHTTPServer):
    """The window API over a Timeline. ``tokens`` are the accepted bearer
    tokens; ``fault`` (settable by tests) may answer a request instead:
    a callable(query) -> (status, body bytes) or None."""

    daemon_threads = True

    def __init__(self, timeline: Timeline, tokens, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.timeline = timeline
        self.tokens = set(tokens)
        self.fault = None
        self.requests: list = []  # (query dict, authorization header) of every request

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def use_tls(self, context: ssl.SSLContext) -> None:
        self.socket = context.wrap_socket(self.socket, server_side=True)

    def start(self) -> "ExporterServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: tests and the demo print their own
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        server: ExporterServer = self.server
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        server.requests.append((query, self.headers.get("Authorization", "")))
        if url.path != "/v1/snapshots/window":
            return self._send(404, b'{"error":"not found"}')
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in server.tokens:
            return self._send(401, b'{"error":"unauthorized"}')
        if server.fault is not None:
            answer = server.fault(query)
            if answer is not None:
                return self._send(*answer)
        since, until = parse_ns(query.get("since", "")), parse_ns(query.get("until", ""))
        if since is None or until is None or not query.get("limit", "").isdigit():
            return self._send(400, b'{"error":"since, until and limit are required"}')
        cursor = None
        if "cursor" in query:
            cursor = parse_ns(query["cursor"])
            if cursor is None:
                return self._send(400, b'{"error":"bad cursor"}')
        limit = max(1, min(int(query["limit"]), 1000))
        self._send(200, server.timeline.page(since, until, limit, cursor))


def demo_accounts(count: int) -> list:
    """Stable demo account UUIDs (local.sh inserts the same ones into users)."""
    return [str(uuid.uuid5(DEMO_NAMESPACE, f"demo-account-{i}")) for i in range(count)]


def print_lines(lines) -> None:
    """Write lines to stdout in one go; a reader that stops early (``| head -n 1``) is not an error."""
    try:
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:
        # Nothing more can be written; point stdout at /dev/null so that the flush
        # at exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9108)
    parser.add_argument("--token", required=True, help="bearer token the exporter accepts")
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--history-minutes", type=int, default=10, help="history served at start")
    parser.add_argument("--step", type=float, default=15.0, help="seconds between snapshots")
    parser.add_argument("--print-accounts", action="store_true", help="print the demo account UUIDs and exit")
    args = parser.parse_args()
    accounts = demo_accounts(args.accounts)
    if args.print_accounts:
        print_lines(accounts)
        return
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=args.history_minutes)
    server = ExporterServer(SyntheticTimeline(accounts, start, args.step), [args.token], args.host, args.port)
    print(f"demo exporter: {len(accounts)} accounts, a snapshot every {args.step:g}s since "
          f"{start:%H:%M}Z, on {server.url}/v1/snapshots/window", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
