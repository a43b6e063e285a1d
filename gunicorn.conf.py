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
"""
import gc
import os
import sys

import app as billing

try:
    # WEB_CONCURRENCY first: it is the one gunicorn itself trips over.
    workers = billing._number(os.environ, "WEB_CONCURRENCY", 2, int, minimum=1)
    _config = billing.load_config(os.environ)
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
del _config


def post_worker_init(worker):
    # A catch-up allocates millions of short-lived, acyclic objects per page;
    # with the default thresholds the cyclic collector walks every live object
    # several times a page (half of the rating time). Reference counting frees
    # them; cycles are still collected, just less often.
    gc.set_threshold(50_000, 20, 100)
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
