#!/usr/bin/env python3
"""Integration tests of active health checks (README "Upstream clusters"):
the real daemon checks the servers of a backend (two stubs); a stub's
/healthz answers what GET /__health/NNN set, so a test makes one server
unhealthy and healthy again and reads the daemon's error log for the state
changes, within the thresholds (unhealthy * interval + margin). The request
path does not use the health state yet: these tests see the checker alone.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_hcheck.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, check, main  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

htest = tp.ptest  # stubs made during a test are closed after it
Stub = tp.Stub

INTERVAL = 200


def hc(**kw):
    h = {"path": "/healthz", "interval_ms": tp.ms(INTERVAL), "timeout_ms": tp.ms(150), "healthy": 2, "unhealthy": 3}
    h.update(kw)
    return h


def cfg(servers, health=None, **extra):
    b = {"servers": servers, "connect_timeout_ms": tp.ms(1000), "timeout_ms": tp.ms(5000),
         "health_check": health or hc()}
    b.update(extra)
    return tp.config({"c": b}, routes=[{"path": "/local", "respond": {"body": {"ok": True}}}])


def reload(d, c):
    c = dict(c, listen=[f"127.0.0.1:{d.port}"])
    d.reload(c)


def line(hostport, state):
    return f"backend c server {hostport} is {state}"


def wait_line(d, text, within_s, after=0):
    """Waits for the (after+1)-th occurrence of text in the daemon's log;
    returns the seconds it took. within_s is scaled for sanitizer builds."""
    t0 = time.monotonic()
    deadline = t0 + within_s * SLOW
    while d.log().count(text) <= after:
        if time.monotonic() > deadline:
            raise TestFailure(f"no {text!r} within {within_s * SLOW:.1f} s:\n{d.log()[-3000:]}")
        time.sleep(0.02)
    return time.monotonic() - t0


# unhealthy after 3 failed checks: the first runs when the failure starts
# or up to one interval later, then 2 more intervals (+10% jitter each), plus a margin
UNHEALTHY_S = (3 * 1.1 * INTERVAL + 150) / 1000 + 1.0
HEALTHY_S = (2 * 1.1 * INTERVAL + 150) / 1000 + 1.0


@htest
def hcheck_marks_a_server_unhealthy_and_healthy_again():
    a, b = Stub(), Stub()
    d = Daemon(cfg([a.url, b.url]), workers=1, log_level="info")
    time.sleep(0.3 * SLOW)  # some checks pass
    b.get("/__health/503")
    wait_line(d, line(b.hostport, "unhealthy: status 503 from health check (3 in a row)"), UNHEALTHY_S)
    b.get("/__health/200")
    wait_line(d, line(b.hostport, "healthy again (2 checks in a row passed)"), HEALTHY_S)
    time.sleep(3 * INTERVAL / 1000 * SLOW)
    log = d.log()
    check(line(a.hostport, "unhealthy") not in log, f"server a was never unhealthy:\n{log[-2000:]}")
    check(log.count(line(b.hostport, "unhealthy")) == 1, "one line per change")
    check(a.stats()["requests"] >= 3, "server a is checked too")


@htest
def hcheck_requests_are_plain_gets_with_the_servers_host():
    a = Stub()
    d = Daemon(cfg([a.url], hc(path="/healthz?tag=hc&echo=1", statuses=[200, 204])), workers=1)
    deadline = time.monotonic() + 3 * SLOW
    while time.monotonic() < deadline:
        entries = a.get("/log?tag=hc").json()["requests"]
        if len(entries) >= 2:
            break
        time.sleep(0.05)
    else:
        raise TestFailure(f"no checks reached the stub: {a.get('/log?tag=hc').json()}")
    check(all(e["method"] == "GET" for e in entries), f"checks are GETs: {entries}")
    check(len({e["conn"] for e in entries}) == len(entries), f"one connection per check: {entries}")
    check("is unhealthy" not in d.log(), "the stub passes")


@htest
def hcheck_connect_failures_and_timeouts():
    dead = tp.closed_port()
    hole = tp.Blackhole()  # accepts, never answers
    ok = Stub()
    servers = [ok.url, f"http://127.0.0.1:{dead}", hole.url]
    d = Daemon(cfg(servers), workers=1, log_level="info")
    wait_line(d, f"backend c server 127.0.0.1:{dead} is unhealthy: health check cannot connect: Connection refused "
                 "(3 in a row)", UNHEALTHY_S)
    wait_line(d, f"backend c server 127.0.0.1:{hole.port} is unhealthy: health check timed out after {tp.ms(150)} ms "
                 "(3 in a row)", UNHEALTHY_S + 3 * 0.15)
    check(line(ok.hostport, "unhealthy") not in d.log(), "the good server stays healthy")
    # a graceful stop does not wait for the check in flight (the blackhole's): the
    # daemon stops promptly and the harness finds no leak in its report
    t0 = time.monotonic()
    d.stop()
    check(time.monotonic() - t0 < 3 * SLOW, "stopped without waiting for checks")


@htest
def hcheck_state_survives_a_reload_unless_its_settings_change():
    a, b = Stub(), Stub()
    d = Daemon(cfg([a.url, b.url]), workers=1, log_level="info")
    b.get("/__health/500")
    unhealthy = line(b.hostport, "unhealthy: status 500")
    wait_line(d, unhealthy, UNHEALTHY_S)
    # the same servers and health settings (another timeout_ms): the state is kept,
    # so the unhealthy server is not taken for healthy, and nothing is logged again
    reload(d, cfg([b.url, a.url], timeout_ms=tp.ms(4000)))
    time.sleep(5 * INTERVAL / 1000 * SLOW)
    check(d.log().count(unhealthy) == 1, "kept: not marked unhealthy a second time")
    b.get("/__health/200")
    wait_line(d, line(b.hostport, "healthy again"), HEALTHY_S)
    # other health settings: a fresh state (healthy), so it is found unhealthy anew
    b.get("/__health/500")
    wait_line(d, unhealthy, UNHEALTHY_S, after=1)
    reload(d, cfg([a.url, b.url], hc(unhealthy=2)))
    wait_line(d, line(b.hostport, "unhealthy: status 500 from health check (2 in a row)"), UNHEALTHY_S)


@htest
def hcheck_added_by_a_reload_and_removed():
    a = Stub()
    plain = tp.config({"c": tp.backend(a.url)}, routes=[{"path": "/local", "respond": {"body": {}}}])
    d = Daemon(plain, workers=1, log_level="info")
    a.get("/__health/503")
    reload(d, cfg([a.url]))
    wait_line(d, line(a.hostport, "unhealthy"), UNHEALTHY_S)
    reload(d, plain)
    n = a.stats()["requests"]
    time.sleep(4 * INTERVAL / 1000 * SLOW)
    check(a.stats()["requests"] == n, "no checks after the reload that removed health_check")


if __name__ == "__main__":
    sys.exit(main())
