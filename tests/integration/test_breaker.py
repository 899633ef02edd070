#!/usr/bin/env python3
"""Integration tests of the circuit breaker ("circuit_breaker") and the
per-backend wait queue ("max_pending", "queue_timeout_ms"): the real daemon in
front of the stub backend, raw HTTP on both sides. The stub's /stats says how
many requests reached it (so "failed fast" means: no new request there) and how
many were in flight at once (so "queued" means: never more than
max_connections).

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_breaker.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed"; the exit code is 1 when
anything failed.
"""

import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, check, contains, eq, main, req  # noqa: E402

# test_proxy holds the Stub, Client and config helpers; importing it
# registers its tests, so the registry is put back afterwards.
_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

btest = tp.ptest  # stubs and clients made by the test are closed when it ends
Stub = tp.Stub
Client = tp.Client

# "fails fast": far below the 2000 ms the backend would take
FAST = 0.5 * SLOW


def call(name, path, backend="cb", **kw):
    c = {"name": name, "backend": backend, "path": path}
    c.update(kw)
    return c


def route(path, calls, **kw):
    r = {"path": path, "methods": ["GET"], "calls": calls}
    r.update(kw)
    return r


ROUTES = [
    route("/req/fail", [call("c", "/u?status=500", required=True)]),
    route("/req/ok", [call("c", "/u", required=True)]),
    route("/req/slow", [call("c", "/u?delay=2000", required=True)]),
    route("/req/wait", [call("c", "/u?delay=300", required=True)]),
    route("/opt/slow", [call("c", "/u?delay=2000", fallback={"fb": 1})], errors=True),
    {"path": "/p/*", "proxy": {"backend": "cb", "strip_prefix": "/p"}},
]


def cb_daemon(stub, breaker=None, workers=1, routes=None, log_level=None, **bopts):
    b = tp.backend(stub.url, **bopts)
    if breaker is not None:
        b["circuit_breaker"] = breaker
    return Daemon(tp.config({"cb": b}, routes=routes or ROUTES), workers=workers, log_level=log_level)


def get(d, path, timeout=10.0):
    """One request on a new connection: (response, seconds)."""
    with Client(d, timeout=timeout) as c:
        t0 = time.monotonic()
        r = c.request(req("GET", path))
        return r, time.monotonic() - t0


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


def expect_error(r, status, code, what):
    eq(r.status, status, f"{what}: status (response {r.raw[:400]!r})")
    eq(error_code(r), code, f"{what}: error.code in {r.body[:300]!r}")


def retry_after(r, what):
    v = r.header("Retry-After")
    check(v is not None and re.fullmatch(r"[0-9]+", v), f"{what}: Retry-After {v!r}")
    return int(v)


def trip(d, n, path="/req/fail"):
    for k in range(n):
        r, _ = get(d, path)
        check(r.status in (502, 500), f"failure {k + 1} of {n}: status {r.status} ({r.raw[:300]!r})")
        check(error_code(r) != "circuit_open", f"failure {k + 1} of {n} was already refused: {r.raw[:300]!r}")


# --- the breaker -----------------------------------------------------------------------------

@btest
def breaker_opens_after_consecutive_failures_and_fails_fast():
    s = Stub()
    d = cb_daemon(s, {"consecutive_failures": 3, "failure_ratio": 0, "open_ms": 5000})
    r, _ = get(d, "/req/ok")
    eq(r.status, 200, "a call before any failure")
    trip(d, 2)
    r, _ = get(d, "/req/ok")
    eq(r.status, 200, "a success resets the count of failures in a row")
    trip(d, 3)
    check(d.wait_log("circuit breaker opened for 5000 ms: 3 consecutive failures"), f"no open line in the log:\n{d.log()[-2000:]}")
    before = s.stats()["requests"]
    r, dt = get(d, "/req/slow")
    expect_error(r, 503, "circuit_open", "required call while open")
    eq(r.json()["error"].get("call"), "c", "error.call")
    check(dt < FAST, f"open circuit answered after {dt:.3f}s (the backend would take 2 s)")
    ra = retry_after(r, "required call while open")
    check(1 <= ra <= 5, f"Retry-After {ra} for an open time of 5 s")
    contains(r.header("Server-Timing") or "", 'desc="circuit_open"', "Server-Timing")
    # optional call: its fallback, at once
    r, dt = get(d, "/opt/slow")
    eq(r.status, 200, f"optional call while open: status ({r.raw[:300]!r})")
    eq(r.header("X-Gateway-Completed"), "false", "X-Gateway-Completed")
    j = r.json()
    eq(j.get("c"), {"fb": 1}, "the fallback in place of the call")
    eq(j["_errors"]["c"]["code"], "circuit_open", "_errors.c.code")
    check(dt < FAST, f"optional call answered after {dt:.3f}s")
    time.sleep(0.1)
    eq(s.stats()["requests"], before, "requests that reached the backend while the circuit was open")


@btest
def breaker_half_open_lets_probes_through_then_closes():
    s = Stub()
    d = cb_daemon(s, {"consecutive_failures": 2, "failure_ratio": 0, "open_ms": 400, "probe_requests": 2})
    trip(d, 2)
    r, _ = get(d, "/req/ok")
    expect_error(r, 503, "circuit_open", "right after the trip")
    time.sleep(0.5)
    before = s.stats()["requests"]
    clients = [Client(d) for _ in range(3)]
    for c in clients[:2]:
        c.send(req("GET", "/req/wait"))
    s.wait_stats(lambda st: st["in_flight"] == 2, 3, "two probes at the backend")
    t0 = time.monotonic()
    clients[2].send(req("GET", "/req/wait"))
    r = clients[2].read_response()
    dt = time.monotonic() - t0
    expect_error(r, 503, "circuit_open", "a third call while both probes are out")
    check(dt < FAST, f"refused probe answered after {dt:.3f}s")
    for k, c in enumerate(clients[:2]):
        r = c.read_response()
        eq(r.status, 200, f"probe {k + 1} ({r.raw[:300]!r})")
    eq(s.stats()["requests"] - before, 2, "requests let through half-open (probe_requests)")
    check(d.wait_log("circuit breaker closed"), "no close line in the log")
    for k in range(3):
        r, _ = get(d, "/req/ok")
        eq(r.status, 200, f"call {k + 1} after it closed")


@btest
def breaker_probe_failure_reopens_for_twice_as_long():
    s = Stub()
    d = cb_daemon(s, {"consecutive_failures": 1, "failure_ratio": 0, "open_ms": 400, "max_open_ms": 10000})
    trip(d, 1)
    check(d.wait_log("opened for 400 ms"), "first open time")
    time.sleep(0.5)
    r, _ = get(d, "/req/fail")  # the probe fails
    eq(r.status, 502, f"the failing probe reached the backend ({r.raw[:300]!r})")
    check(d.wait_log("opened for 800 ms: a half-open probe failed (trip 2 in a row)"),
          f"second open time:\n{d.log()[-1500:]}")
    time.sleep(0.5)
    r, _ = get(d, "/req/ok")
    expect_error(r, 503, "circuit_open", "0.5 s into an 800 ms open time")
    time.sleep(0.45)
    r, _ = get(d, "/req/ok")
    eq(r.status, 200, f"the probe after 0.95 s ({r.raw[:300]!r})")
    # closed: the next trip is back to open_ms
    trip(d, 1)
    check(d.wait_log("opened for 400 ms: 1 consecutive failures (trip 1 in a row)"), "open time after it closed")


@btest
def breaker_ratio_trigger():
    s = Stub()
    d = cb_daemon(s, {"consecutive_failures": 0, "failure_ratio": 0.5, "window_ms": 10000, "min_requests": 10})
    for k in range(4):
        r, _ = get(d, "/req/ok")
        eq(r.status, 200, f"success {k + 1}")
    for k in range(5):  # 5 of 9: over the ratio, but under min_requests
        r, _ = get(d, "/req/fail")
        eq(r.status, 502, f"failure {k + 1} (under min_requests: still closed)")
    r, _ = get(d, "/req/ok")  # 5 of 10 = 0.5: not above it
    eq(r.status, 200, "5 failures of 10 do not exceed 0.5")
    r, _ = get(d, "/req/fail")  # 6 of 11
    eq(r.status, 502, "failure 6")
    check(d.wait_log("6 of 11 calls failed"), f"ratio trip line:\n{d.log()[-1500:]}")
    r, dt = get(d, "/req/ok")
    expect_error(r, 503, "circuit_open", "after the ratio trip")


@btest
def breaker_state_is_shared_by_workers():
    s = Stub()
    d = cb_daemon(s, {"consecutive_failures": 8, "failure_ratio": 0, "open_ms": 5000}, workers=4, log_level="info")
    trip(d, 8)  # new connections: spread over the workers by SO_REUSEPORT
    check(d.wait_log("8 consecutive failures"), "the breaker opened")
    time.sleep(0.2)  # the log writer flushes every 100 ms: the failure lines of every worker are in
    workers = set(re.findall(r"\] (w\d+): aggregate /req/fail: call c failed", d.log()))
    check(len(workers) >= 2, f"failures all on one worker ({workers}); SO_REUSEPORT should spread 8 connections")
    before = s.stats()["requests"]
    for k in range(12):
        r, _ = get(d, "/req/ok")
        expect_error(r, 503, "circuit_open", f"call {k + 1} on a new connection (any worker)")
    eq(s.stats()["requests"], before, "requests that reached the backend while open")


def metric(d, name):
    """The value of one sample of the admin listener's /metrics (e.g. 'gatherd_breaker_trips_total{backend="cb"}')."""
    with gwtest.Conn("127.0.0.1", d.admin_port) as c:
        text = c.request(req("GET", "/metrics")).body.decode()
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+]+)$", text, re.M)
    check(m, f"no {name} in /metrics")
    return float(m.group(1))


@btest
def breaker_cycles_under_concurrent_workers():
    """Open -> half-open -> (the probe fails) -> open, hundreds of times a
    second, while every worker asks the breaker at once: the state a worker
    reads without the lock is the one another worker wrote under it (the
    ThreadSanitizer build checks that), and the counts agree: every call
    that reached the backend was admitted (502), every other one was
    refused (503 circuit_open), and each trip was caused by one of them."""
    s = Stub()
    d = cb_daemon(s, {"consecutive_failures": 1, "failure_ratio": 0, "open_ms": 2, "max_open_ms": 2,
                      "probe_requests": 1}, workers=4)
    clients, seconds = 8, 1.5
    counts = {}
    problems = []
    lock = threading.Lock()

    def client():
        try:
            with Client(d, timeout=10) as c:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    r = c.request(req("GET", "/req/fail"))
                    key = (r.status, error_code(r))
                    with lock:
                        counts[key] = counts.get(key, 0) + 1
        except Exception as e:  # reported below, in the test's thread
            problems.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60 * SLOW)
    check(not problems, f"clients failed: {problems[:3]}")
    admitted = sum(n for (st, code), n in counts.items() if st == 502)
    refused = counts.get((503, "circuit_open"), 0)
    eq(admitted + refused, sum(counts.values()), f"answers other than 502 and 503 circuit_open: {counts}")
    requests = s.stats()["requests"]
    eq(requests, admitted, "requests that reached the backend vs. 502 answers")
    trips = metric(d, 'gatherd_breaker_trips_total{backend="cb"}')
    print(f"# {counts}; {int(trips)} trips")
    check(trips >= 3, f"only {trips} trips in {seconds} s with open_ms 2: the half-open state was barely reached")
    # Each trip was caused by a failed call that reached the backend; at
    # most the calls admitted together before the first trip (one per
    # client) did not cause one of their own, since half-open admits one probe.
    check(trips <= requests <= trips + clients, f"{requests} backend requests for {trips} trips")


@btest
def breaker_on_proxy_routes():
    s = Stub()
    d = cb_daemon(s, {"consecutive_failures": 2, "failure_ratio": 0, "open_ms": 3000})
    with Client(d) as c:
        r = c.request(req("GET", "/p/x?status=404"))
        eq(r.status, 404, "a 404 passed through (not a failure)")
        for k in range(2):
            r = c.request(req("GET", "/p/x?status=503"))
            eq(r.status, 503, f"backend 503 passed through ({k + 1})")
            check(error_code(r) is None, f"the backend's own answer, not gatherd's: {r.raw[:200]!r}")
    check(d.wait_log("2 consecutive failures"), "the proxy failures opened it")
    before = s.stats()["requests"]
    r, dt = get(d, "/p/x?delay=2000")
    expect_error(r, 503, "circuit_open", "proxy while open")
    check(dt < FAST, f"proxy answered after {dt:.3f}s")
    ra = retry_after(r, "proxy while open")
    check(1 <= ra <= 3, f"Retry-After {ra} for an open time of 3 s")
    eq(s.stats()["requests"], before, "requests that reached the backend")


@btest
def breaker_404_and_timeouts_count_right():
    # 4xx are not failures; a call timeout is one
    s = Stub()
    routes = ROUTES + [route("/req/404", [call("c", "/u?status=404", required=True)]),
                       route("/req/timeout", [call("c", "/u?delay=2000", required=True, timeout_ms=100)])]
    d = cb_daemon(s, {"consecutive_failures": 2, "failure_ratio": 0, "open_ms": 5000}, routes=routes)
    for k in range(4):
        r, _ = get(d, "/req/404")
        eq(r.status, 502, f"404 call {k + 1}: bad_status")
    r, _ = get(d, "/req/ok")
    eq(r.status, 200, "closed after four 404s")
    for k in range(2):
        r, _ = get(d, "/req/timeout")
        expect_error(r, 504, "timeout", f"timeout {k + 1}")
    r, _ = get(d, "/req/ok")
    expect_error(r, 503, "circuit_open", "after two timeouts")


@btest
def breaker_state_survives_a_reload():
    import json
    import signal
    s = Stub()
    breaker = {"consecutive_failures": 2, "failure_ratio": 0, "open_ms": 20000}
    d = cb_daemon(s, breaker)

    def reload(brk):
        b = tp.backend(s.url)
        b["circuit_breaker"] = brk
        cfg = tp.config({"cb": b}, routes=ROUTES)
        cfg["listen"] = [f"127.0.0.1:{d.port}"]
        d.reload(cfg)

    trip(d, 2)
    reload(dict(breaker))  # the same settings: still open
    r, _ = get(d, "/req/ok")
    expect_error(r, 503, "circuit_open", "after a reload with the same breaker settings")
    check(retry_after(r, "after the reload") > 10, "the open time went on, it did not restart")
    reload(dict(breaker, open_ms=20001))  # changed settings: a fresh, closed breaker
    r, _ = get(d, "/req/ok")
    eq(r.status, 200, f"after a reload with other breaker settings ({r.raw[:300]!r})")


# --- the wait queue --------------------------------------------------------------------------

@btest
def queue_serializes_then_fills():
    s = Stub()
    d = cb_daemon(s, max_connections=1, max_pending=2, queue_timeout_ms=5000)
    cs = [Client(d) for _ in range(3)]
    t0 = time.monotonic()
    for c in cs:
        c.send(req("GET", "/req/wait"))
    s.wait_stats(lambda st: st["in_flight"] == 1, 3, "the first call at the backend")
    time.sleep(0.05)
    r, dt = get(d, "/req/wait")
    expect_error(r, 503, "queue_full", "a fourth call")
    eq(retry_after(r, "queue_full"), 1, "Retry-After of queue_full")
    check(dt < 0.25 * SLOW, f"queue_full answered after {dt:.3f}s")
    check(d.wait_log("queue full (max_pending 2)"), "log line")  # the log writer flushes every 100 ms
    for k, c in enumerate(cs):
        r = c.read_response()
        eq(r.status, 200, f"queued call {k + 1} ({r.raw[:300]!r})")
    total = time.monotonic() - t0
    st = s.stats()
    eq(st["max_in_flight"], 1, "calls at the backend at once (max_connections 1)")
    check(total >= 0.85, f"three 300 ms calls over one connection took {total:.3f}s: not serial")


@btest
def queue_timeout():
    s = Stub()
    d = cb_daemon(s, max_connections=1, max_pending=4, queue_timeout_ms=200)
    holder = Client(d)
    holder.send(req("GET", "/req/slow"))
    s.wait_stats(lambda st: st["in_flight"] == 1, 3, "the holder at the backend")
    r, dt = get(d, "/req/ok")
    expect_error(r, 503, "queue_timeout", "a call queued for longer than queue_timeout_ms")
    eq(retry_after(r, "queue_timeout"), 1, "Retry-After of queue_timeout")
    check(0.15 <= dt < 1.5 * SLOW, f"queue_timeout of 200 ms answered after {dt:.3f}s")
    # the proxy the same
    r, dt = get(d, "/p/x")
    expect_error(r, 503, "queue_timeout", "proxy queued for longer than queue_timeout_ms")
    r = holder.read_response()
    eq(r.status, 200, "the holder")


@btest
def queue_call_timeout_and_deadline_while_waiting():
    s = Stub()
    routes = ROUTES + [route("/req/short", [call("c", "/u", required=True, timeout_ms=150)]),
                       route("/req/deadline", [call("c", "/u", required=True)], deadline_ms=150)]
    d = cb_daemon(s, max_connections=1, max_pending=4, queue_timeout_ms=5000, routes=routes)
    holder = Client(d)
    holder.send(req("GET", "/req/slow"))
    s.wait_stats(lambda st: st["in_flight"] == 1, 3, "the holder at the backend")
    r, dt = get(d, "/req/short")
    expect_error(r, 504, "timeout", "the call's own timeout while queued")
    check(dt < 1.0 * SLOW, f"a 150 ms call timeout answered after {dt:.3f}s")
    r, dt = get(d, "/req/deadline")
    expect_error(r, 504, "timeout", "the route's deadline while queued")
    check(dt < 1.0 * SLOW, f"a 150 ms deadline answered after {dt:.3f}s")
    r = holder.read_response()
    eq(r.status, 200, "the holder")
    r, _ = get(d, "/req/ok")
    eq(r.status, 200, "a call afterwards")
    eq(s.stats()["requests"], 2, "requests at the backend (the timed-out waiters never went)")


@btest
def queue_cancelled_waiter_leaves():
    s = Stub()
    d = cb_daemon(s, max_connections=1, max_pending=1, queue_timeout_ms=5000)
    holder = Client(d)
    holder.send(req("GET", "/req/wait"))
    s.wait_stats(lambda st: st["in_flight"] == 1, 3, "the holder at the backend")
    gone = Client(d)
    gone.send(req("GET", "/req/ok"))
    time.sleep(0.05)
    gone.close()  # the waiter's client goes away: it leaves the queue (max_pending 1 has room again)
    time.sleep(0.05)
    later = Client(d)
    later.send(req("GET", "/req/ok"))
    r = holder.read_response()
    eq(r.status, 200, "the holder")
    r = later.read_response()
    eq(r.status, 200, f"a call queued after the cancelled one ({r.raw[:300]!r})")
    eq(s.stats()["requests"], 2, "requests at the backend (the cancelled waiter never went)")
    for k in range(3):
        r, _ = get(d, "/req/ok")
        eq(r.status, 200, f"call {k + 1} afterwards")


@btest
def queue_foreach_beyond_max_connections():
    s = Stub()
    items = list(range(10))
    import json
    import urllib.parse
    body = urllib.parse.quote(json.dumps({"items": items}, separators=(",", ":")), safe="")
    routes = [route("/fe", [call("src", "/src?body=" + body),
                            call("fe", "/fe/{item}?delay=50", foreach="src.items", foreach_concurrency=8)])]
    d = cb_daemon(s, max_connections=2, routes=routes)
    s.get("/stats?reset=1")
    r, _ = get(d, "/fe")
    eq(r.status, 200, f"status ({r.raw[:300]!r})")
    eq(r.header("X-Gateway-Completed"), "true", f"every element succeeded ({r.body[:400]!r})")
    j = r.json()
    eq(len(j["fe"]), 10, "elements answered")
    check(s.stats()["max_in_flight"] <= 2, "never more than max_connections at the backend")


@btest
def queue_on_proxy_routes():
    s = Stub()
    d = cb_daemon(s, max_connections=1, max_pending=1, queue_timeout_ms=5000)
    holder = Client(d)
    holder.send(req("GET", "/p/x?delay=300&echo=1"))
    s.wait_stats(lambda st: st["in_flight"] == 1, 3, "the holder at the backend")
    queued = Client(d)
    queued.send(req("POST", "/p/y?echo=1", body=b"hello"))
    time.sleep(0.05)
    r, dt = get(d, "/p/z")
    expect_error(r, 503, "queue_full", "a third proxied request")
    eq(retry_after(r, "proxy queue_full"), 1, "Retry-After")
    check(dt < 0.25 * SLOW, f"queue_full answered after {dt:.3f}s")
    r = holder.read_response()
    eq(r.status, 200, "the holder")
    r = queued.read_response("POST")
    eq(r.status, 200, f"the queued request ({r.raw[:300]!r})")
    eq(r.json().get("body"), "hello", "its body, held while it waited")
    eq(s.stats()["max_in_flight"], 1, "requests at the backend at once")


if __name__ == "__main__":
    sys.exit(main())
