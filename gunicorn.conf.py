"""gunicorn settings for billing-service, and its launcher.

    python gunicorn.conf.py [GUNICORN OPTIONS]           # the launcher (systemd, local.sh)
    gunicorn --config gunicorn.conf.py app:app           # plain gunicorn works too

Run as a script, this file checks the configuration first (a bad value is one
line naming the variable, exit status 2) and then replaces itself with
``python -m gunicorn --config <this file> app:app`` (same process, so systemd's
main PID is gunicorn's arbiter). The launcher exists because gunicorn parses
WEB_CONCURRENCY with int() when it is imported, before it reads this file: under
plain gunicorn, WEB_CONCURRENCY=two is a traceback, not a configuration error.

Each worker runs one collector thread, started after fork (threads do not
survive fork) and stopped when the worker exits. PostgreSQL advisory locks
make the workers share the sources instead of collecting them twice.

With TLS_CERT_FILE and TLS_KEY_FILE the listener speaks HTTPS only (TLS 1.2 or
later); TLS_CLIENT_CA_FILE also requires a client certificate signed by that
CA. The files are re-read when they change (README: Rotating the listener's
certificate): no signal, no restart.
"""
import gc
import os
import signal
import ssl
import sys
import threading

import app as billing

try:
    # WEB_CONCURRENCY first: it is the one gunicorn itself trips over.
    workers = billing._number(os.environ, "WEB_CONCURRENCY", 2, int, minimum=1)
    _config = billing.load_config(os.environ)
    if __name__ != "__main__":  # gunicorn's arbiter, once (the launcher only checks the variables)
        billing.announce(_config, workers=workers)  # the effective configuration, and its likely mistakes
        billing.check_database(_config)  # the grants it needs, named in one line when missing
except billing.ConfigError as exc:
    # Fail before any worker forks, with the variable named and no traceback.
    print(f"billing-service: configuration error: {exc}", file=sys.stderr)
    sys.exit(2)

bind = _config.listen_addr
# gthread: the worker's main thread keeps heart-beating while a request
# thread runs a long collection, so gunicorn's timeout never kills a catch-up.
worker_class = "gthread"
threads = 4
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
# Access log without query strings or auth headers: nothing secret in it.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
# No control socket: its default path is shared by every gunicorn of the user
# (and lies in a home directory the systemd unit protects). systemd manages us.
control_socket_disable = True
_tls_files = _config.tls
if _tls_files[0]:
    certfile, keyfile = _tls_files[:2]
    if _tls_files[2]:
        ca_certs, cert_reqs = _tls_files[2], ssl.CERT_REQUIRED
del _config


def _stamp(path: str):
    """What changes when a file is rewritten or another one renamed over it."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return exc.errno
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class ListenerTLS:
    """The SSLContext of every new connection. gunicorn's gthread worker asks
    for one per accepted connection and its default factory reads the files
    each time, so a rotation needs no signal, but a half-done one (a new key
    beside the old certificate, a half-written file) would refuse every
    handshake until it is finished. Here the context is built only when a file
    changed, and a build that fails keeps the last good one: clients see the
    old certificate until the new files make a pair, then the new one."""

    def __init__(self, paths):
        self.paths = tuple(path for path in paths if path)
        self._lock = threading.Lock()
        self._context = self._stamps = self._failed = None

    def context(self, factory) -> ssl.SSLContext:
        stamps = tuple(_stamp(path) for path in self.paths)
        with self._lock:
            if stamps not in (self._stamps, self._failed):
                try:
                    context = factory()
                    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
                        context.minimum_version = ssl.TLSVersion.TLSv1_2
                except OSError as exc:  # ssl.SSLError included
                    if self._context is None:
                        raise
                    self._failed = stamps
                    billing.log_event(billing.Secrets(), "listener_tls_reload_failed", error=str(exc),
                                      message="kept the previous certificate; new connections still get it")
                else:
                    if self._context is not None:
                        billing.log_event(billing.Secrets(), "listener_tls_reloaded",
                                          message="new connections get the new certificate")
                    self._context, self._stamps, self._failed = context, stamps, None
            return self._context


_listener_tls = ListenerTLS(_tls_files)


def ssl_context(config, default_ssl_context_factory):
    return _listener_tls.context(default_ssl_context_factory)


def when_ready(server):
    # Built once in the arbiter, so that every worker (a replacement too) starts
    # with a good context to fall back on; again after a reload (SIGHUP), which
    # ran this file anew.
    if server.cfg.is_ssl:
        from gunicorn import sock
        try:
            sock.ssl_context(server.cfg)
        except OSError as exc:  # changed since load_config read them: each worker tries again
            billing.log_event(billing.Secrets(), "listener_tls_load_failed", error=str(exc))


on_reload = when_ready


def post_fork(server, worker):
    # The worker builds the app from the environment again (app:app), and
    # load_config would check the TLS files once more. They are the arbiter's:
    # checked at start-up, then by ListenerTLS on each connection. A worker
    # replacing a dead one mid-rotation (new key, old certificate) must not
    # fail to boot over them: gunicorn would then stop the whole service.
    for name in billing.TLS_VARIABLES:
        os.environ.pop(name, None)


def post_worker_init(worker):
    # A catch-up allocates millions of short-lived, acyclic objects per page;
    # with the default thresholds the cyclic collector walks every live object
    # several times a page (half of the rating time). Reference counting frees
    # them; cycles are still collected, just less often.
    gc.set_threshold(50_000, 20, 100)
    # Ctrl-C in a terminal reaches the workers too, and the arbiter then sends
    # them SIGQUIT: gthread's quit handler, entered twice, can deadlock on its
    # thread pool's lock until the arbiter kills the worker 30 s later. The
    # arbiter's signal alone stops the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker.wsgi.extensions["billing_collector"].start()


def worker_exit(server, worker):
    collector = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("billing_collector")
    if collector is not None:
        collector.stop(timeout=graceful_timeout - 5)


if __name__ == "__main__":
    # The configuration is valid (checked above): become gunicorn, with this
    # file as its configuration, from its directory (where app.py is), whatever
    # the caller's. Extra arguments pass through (for example --check-config).
    _here = os.path.abspath(__file__)
    os.chdir(os.path.dirname(_here))
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "--config", _here, "app:app", *sys.argv[1:]])
