#!/usr/bin/env python3
"""Integration tests of retries, the retry budget and hedging (README
"Retries and hedging"): the real daemon in front of the stub backend. The
stub's tag log (tag=T; GET /log?tag=T) tells how many requests of a call
reached the backend, when (received_ms, CLOCK_MONOTONIC) and whether gatherd
closed a connection before its answer (abandoned, with abort_on_eof=1);
fail_first=N / fail_mode / delay_first make the first tries of a tag fail or
wait.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_retry.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TempDir, check, eq, main, req  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms
rtest = tp.ptest  # stubs and clients made during a test are closed after it
Stub = tp.Stub
Client = tp.Client


def retry(**kw):
    r = {"attempts": 3, "backoff_base_ms": 20, "backoff_cap_ms": 100}
    r.update(kw)
    return r


def call(name, path, backend="r", **kw):
    c = {"name": name, "backend": backend, "path": path, "required": True}
    c.update(kw)
    return c


def route(path, calls, methods=("GET",), **kw):
    r = {"path": path, "methods": list(methods), "calls": calls}
    r.update(kw)
    return r


def daemon(stub, routes, backends=None, workers=1, resolver=None, log_level="info", **rb):
    """gatherd with backend "r" (the stub, retry section rb, default retry())
    and "plain" (the stub, no retry section), plus backends."""
    bs = {"r": tp.backend(stub.url, retry=rb.pop("retry", retry())),
          "plain": tp.backend(stub.url)}
    bs["r"].update(rb)
    bs.update(backends or {})
    top = {"resolver": resolver} if resolver else {}
    return Daemon(tp.config(bs, routes=routes, **top), workers=workers, log_level=log_level)


def get(d, path, method="GET", body=b"", headers=None, timeout=20.0):
    """One request on a new connection: (response, seconds)."""
    r, dt, _ = get_timed(d, path, method, body, headers, timeout)
    return r, dt


def get_timed(d, path, method="GET", body=b"", headers=None, timeout=20.0):
    """get(), plus the time.monotonic() in ms just before the request was
    sent, comparable with the stub's received times (both CLOCK_MONOTONIC)."""
    with Client(d, timeout=timeout) as c:
        t0 = time.monotonic()
        r = c.request(req(method, path, body=body, headers=headers))
        return r, time.monotonic() - t0, t0 * 1000


def tag_log(stub, tag):
    return stub.get(f"/log?tag={tag}").json()


def wait_log(stub, tag, cond, timeout, what):
    deadline = time.monotonic() + timeout * SLOW
    while True:
        lg = tag_log(stub, tag)
        if cond(lg):
            return lg
        if time.monotonic() > deadline:
            raise gwtest.TestFailure(f"stub tag {tag}: {what} not reached within {timeout}s: {lg}")
        time.sleep(0.02)


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


# --- aggregate calls: retries ----------------------------------------------------------

@rtest
def retry_count_and_spacing_seen_by_the_backend():
    """attempts 3 against a backend that always answers 503: three requests,
    each gap within [0, backoff_cap_ms] (plus scheduling slack), then the
    last failure."""
    s = Stub()
    d = daemon(s, [route("/a", [call("c", "/x?tag=sp&status=503")])])
    r, _ = get(d, "/a")
    eq(r.status, 502, f"status ({r.raw[:300]!r})")
    e = r.json()["error"]
    eq((e["code"], e.get("status")), ("bad_status", 503), "the last failure is reported")
    lg = tag_log(s, "sp")
    eq(lg["count"], 3, "requests seen by the backend")
    t = [x["ms"] for x in lg["requests"]]
    gaps = [b - a for a, b in zip(t, t[1:])]
    slack = 80 * SLOW
    for i, g in enumerate(gaps):
        # retry n sleeps random(0, min(cap, base * 2^(n-1))): 20 then 40 ms at most
        check(0 <= g <= min(100, 20 * 2 ** i) + slack, f"gap {i + 1} {g:.1f} ms outside [0, {min(100, 20 * 2 ** i)}] ms")
    check(t[-1] - t[0] <= 2 * 100 + 2 * slack, f"all tries within twice the cap: {gaps}")
    # no retry section: one request only
    d2 = daemon(s, [route("/p", [call("c", "/x?tag=sp0&status=503", backend="plain")])])
    r, _ = get(d2, "/p")
    eq(r.status, 502, "status without retries")
    eq(tag_log(s, "sp0")["count"], 1, "a backend without \"retry\" is tried once")


@rtest
def retry_succeeds_on_the_third_try():
    s = Stub()
    d = daemon(s, [route("/a", [call("c", "/x?tag=ff&fail_first=2&fail_status=503")]),
                   route("/rst", [call("c", "/x?tag=rs&fail_first=1&fail_mode=reset")]),
                   route("/cls", [call("c", "/x?tag=cl&fail_first=2&fail_mode=close")]),
                   route("/other", [call("c", "/x?tag=o&fail_first=2&fail_status=500")])])
    r, _ = get(d, "/a")
    eq(r.status, 200, f"status after two 503s ({r.raw[:300]!r})")
    lg = tag_log(s, "ff")
    eq([x["status"] for x in lg["requests"]], [503, 503, 200], "statuses the backend gave")
    r, _ = get(d, "/rst")
    eq(r.status, 200, "status after a reset before the response")
    eq(tag_log(s, "rs")["count"], 2, "tries after a reset")
    r, _ = get(d, "/cls")
    eq(r.status, 200, "status after two closes before the response")
    eq(tag_log(s, "cl")["count"], 3, "tries after two closes")
    # 500 is not in the default statuses [502, 503, 504]
    r, _ = get(d, "/other")
    eq((r.status, r.json()["error"].get("status")), (502, 500), "a status not listed is not retried")
    eq(tag_log(s, "o")["count"], 1, "tries of a status not listed")


@rtest
def retry_not_for_post_unless_configured():
    s = Stub()
    routes = [route("/p", [call("c", "/x?tag=P&status=503", method="POST", body={"a": 1})]),
              route("/q", [call("c", "/x?tag=Q&status=503", method="POST", body={"a": 1}, backend="np")]),
              route("/put", [call("c", "/x?tag=U&fail_first=1&echo=1", method="PUT", body={"a": 1})])]
    d = daemon(s, routes, backends={"np": tp.backend(s.url, retry=retry(retry_non_idempotent=True))})
    r, _ = get(d, "/p")
    eq(r.status, 502, "POST status")
    eq(tag_log(s, "P")["count"], 1, "a POST is not retried")
    r, _ = get(d, "/q")
    eq(r.status, 502, "POST status with retry_non_idempotent")
    eq(tag_log(s, "Q")["count"], 3, "a POST is retried with retry_non_idempotent")
    r, _ = get(d, "/put")
    eq(r.status, 200, f"PUT retried ({r.raw[:300]!r})")
    j = r.json()["c"]
    eq((j["method"], j["body"]), ("PUT", '{"a":1}'), "the retried PUT carries its body")
    eq(tag_log(s, "U")["count"], 2, "PUT tries")


@rtest
def retry_after_per_try_timeout():
    """per_try_timeout_ms 150: the first try (delayed 3 s) is given up, the
    second answers at once; the first try's connection is closed."""
    s = Stub()
    d = daemon(s, [route("/a", [call("c", "/x?tag=pt&delay_first=3000&abort_on_eof=1")])],
               retry=retry(per_try_timeout_ms=ms(150)))
    r, dt, sent_ms = get_timed(d, "/a")
    eq(r.status, 200, f"status ({r.raw[:300]!r})")
    check(dt < 1.5 * SLOW, f"answered after {dt:.2f}s, the slow try takes 3 s")
    lg = wait_log(s, "pt", lambda lg: lg["count"] == 2 and lg["requests"][0]["abandoned"], 2,
                  "two tries, the first abandoned")
    # Measured from the client's send, not from the first try's arrival: the
    # per-try timer starts when the try is handed to its connection, which
    # may still be connecting (its arrival comes later under load); the
    # call, and so the timer, cannot start before the request was sent.
    gap = lg["requests"][1]["ms"] - sent_ms
    check(gap >= 140 * SLOW, f"the second try came {gap:.0f} ms after the request was sent, before "
                             f"per_try_timeout_ms")


@rtest
def retry_never_outlives_the_deadline_or_the_call_timeout():
    """A backoff that would end after the route's deadline (or the call's
    timeout) is not slept: the answer comes by the deadline with the last
    failure (or a timeout)."""
    s = Stub()
    big = retry(attempts=5, backoff_base_ms=5000, backoff_cap_ms=5000)
    d = daemon(s, [route("/dl", [call("c", "/x?tag=dl&status=503&delay=20")], deadline_ms=ms(300)),
                   route("/to", [call("c", "/x?tag=to&status=503&delay=20", timeout_ms=ms(300))])], retry=big)
    for path, tag in (("/dl", "dl"), ("/to", "to")):
        for _ in range(3):
            r, dt = get(d, path)
            check(r.status in (502, 504) and error_code(r) in ("bad_status", "timeout"),
                  f"{path}: status {r.status} {r.body[:200]!r}")
            check(dt < 0.3 * SLOW + 0.5, f"{path}: answered after {dt:.2f}s with a 300 ms limit")
        check(tag_log(s, tag)["count"] <= 6, f"{path}: at most two tries per request")


@rtest
def retry_budget_caps_retries_when_everything_fails():
    """50 concurrent requests to a backend that fails everything after 300 ms:
    attempts 3 would make 150 requests. budget_percent 20 allows retries in
    flight up to 20 % of the 50 requests in flight, so the first failures get
    at most 10 retries and those at most 10 more: at most 70 in all."""
    s = Stub(threads=2)
    n = 50
    d = daemon(s, [route("/b", [call("c", "/x?tag=bud&status=503&delay=%d" % ms(300))], deadline_ms=ms(5000))],
               workers=2, retry=retry(backoff_base_ms=1, backoff_cap_ms=5, budget_percent=20, min_retries=1))
    statuses = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one():
        start.wait()
        r, _ = get(d, "/b")
        with lock:
            statuses.append(r.status)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    eq(statuses, [502] * n, "every request fails")
    count = tag_log(s, "bud")["count"]
    print(f"# budget: {count} backend requests for {n} requests with attempts 3")
    check(n < count <= n + 2 * n * 20 // 100, f"backend requests {count}: expected {n} + at most {2 * n // 5} retries")
    check(count < 2 * n, f"backend requests {count}: the budget did not cap the retries")
    check(d.wait_log("retry budget is spent"), "denied retries are logged")


@rtest
def retry_tries_are_seen_by_the_circuit_breaker():
    """Each try is one admission and one outcome for the breaker: with
    consecutive_failures 2, the second failed try opens the circuit and the
    third try is not sent (circuit_open)."""
    s = Stub()
    d = daemon(s, [route("/a", [call("c", "/x?tag=cb&status=503")])],
               retry=retry(attempts=3, backoff_base_ms=0, backoff_cap_ms=0),
               circuit_breaker={"consecutive_failures": 2, "failure_ratio": 0, "open_ms": 20000})
    r, _ = get(d, "/a")
    eq((r.status, error_code(r)), (503, "circuit_open"), f"the third try met the open circuit ({r.raw[:300]!r})")
    eq(tag_log(s, "cb")["count"], 2, "tries sent")


def reload_with(d, cfg):
    """Writes cfg (a dict) as d's configuration on d's port and waits for SIGHUP's reload."""
    d.reload(dict(cfg, listen=[f"127.0.0.1:{d.port}"]))


@rtest
def retry_budget_survives_a_reload_with_the_same_settings():
    """budget_percent 0 and min_retries 1: one retry in flight at a time. A
    retry of the old configuration still holds the slot after a reload with
    the same settings (the new request's retry is denied); with other
    settings the budget starts afresh (its retry goes out)."""
    s = Stub()
    slow = ms(1500)
    rs = retry(attempts=2, backoff_base_ms=0, backoff_cap_ms=0, budget_percent=0, min_retries=1)
    routes = [route("/slow", [call("c", "/x?tag={query.t}&fail_first=1&delay=%d" % slow)], deadline_ms=ms(10000)),
              route("/fast", [call("c", "/x?tag={query.t}&fail_first=1")])]
    d = daemon(s, routes, retry=rs)
    for i, (settings, want) in enumerate(((rs, (502, 1)), (dict(rs, attempts=3), (200, 2)))):
        out = []
        t = threading.Thread(target=lambda: out.append(get(d, f"/slow?t=slow{i}")[0].status))
        t.start()
        wait_log(s, f"slow{i}", lambda lg: lg["count"] == 2, 3 * slow / 1000.0, "the slow call's retry")
        reload_with(d, tp.config({"r": tp.backend(s.url, retry=settings), "plain": tp.backend(s.url)}, routes=routes))
        r, _ = get(d, f"/fast?t=fast{i}")
        lg = tag_log(s, f"slow{i}")
        check(lg["count"] == 2 and time.monotonic() * 1000 < lg["requests"][1]["ms"] + slow - 100,
              "the slow retry was still in flight (the machine is too slow for this test)")
        eq((r.status, tag_log(s, f"fast{i}")["count"]), want,
           "the new request's retry " + ("denied: the slot is still held" if i == 0 else "sent: a fresh budget"))
        t.join(10 * SLOW)
        eq(out, [200], "the slow call succeeded on its retry")
    check(d.wait_log("the retry budget is spent"), "the denied retry is logged")


# --- aggregate calls: hedging ------------------------------------------------------------

@rtest
def hedge_wins_and_the_slow_try_is_closed():
    s = Stub()
    d = daemon(s, [route("/h", [call("c", "/x?tag=h1&delay_first=1000&abort_on_eof=1", hedge_after_ms=ms(50))])])
    r, dt, sent_ms = get_timed(d, "/h")
    eq(r.status, 200, f"status ({r.raw[:300]!r})")
    check(dt < 0.3 * SLOW, f"answered after {dt:.2f}s: the hedge did not win")
    check('c;dur=' in (r.header("Server-Timing") or "") and 'desc="hedge"' in r.header("Server-Timing"),
          f"Server-Timing names the hedge: {r.header('Server-Timing')}")
    lg = wait_log(s, "h1", lambda lg: lg["count"] == 2 and lg["requests"][0]["abandoned"], 1,
                  "two requests, the first one's connection closed")
    # From the client's send (see retry_after_per_try_timeout): the hedge
    # timer starts when the first try is handed to a connection that may
    # still be connecting, so the first try's arrival is no reference.
    gap = lg["requests"][1]["ms"] - sent_ms
    check(gap >= 45 * SLOW, f"the hedge came {gap:.0f} ms after the request was sent, before hedge_after_ms")
    check(lg["requests"][0]["conn"] != lg["requests"][1]["conn"], "the hedge went on another connection")
    st, _ = s.wait_stats(lambda st: st["open_connections"] == 1, 2, "only the winner's (pooled) connection open")


@rtest
def hedge_not_sent_when_the_answer_is_fast():
    s = Stub()
    d = daemon(s, [route("/h", [call("c", "/x?tag=h2&delay=10", hedge_after_ms=ms(150))])])
    for _ in range(3):
        r, _ = get(d, "/h")
        eq(r.status, 200, "status")
        check("hedge" not in (r.header("Server-Timing") or ""), f"no hedge in Server-Timing: {r.header('Server-Timing')}")
    time.sleep(0.3 * SLOW)
    eq(tag_log(s, "h2")["count"], 3, "one backend request per call: no hedge")


@rtest
def hedge_for_foreach_elements_and_failed_hedges():
    s = Stub()
    items = "body=%5B1%2C2%2C3%5D"  # [1,2,3]
    d = daemon(s, [route("/f", [call("list", "/l?" + items),
                                call("each", "/e/{item}?tag=fe{item}&delay_first=1000&abort_on_eof=1",
                                     foreach="list", hedge_after_ms=ms(50))]),
                   # the first try fails fast with a status not retried: the
                   # answer is that failure (a hedge only races a slow try)
                   route("/g", [call("c", "/x?tag=g1&delay_first=200&status=500", hedge_after_ms=ms(50))])])
    r, dt = get(d, "/f")
    eq(r.status, 200, f"status ({r.raw[:300]!r})")
    check(dt < 0.6 * SLOW, f"answered after {dt:.2f}s: the element hedges did not win")
    for k in (1, 2, 3):
        lg = wait_log(s, f"fe{k}", lambda lg: lg["count"] == 2 and lg["requests"][0]["abandoned"], 1,
                      f"element {k}: two requests, the first closed")
    r, _ = get(d, "/g")
    eq((r.status, r.json()["error"].get("status")), (502, 500), "a hedged call failing with a status")


@rtest
def hedge_goes_to_another_address():
    """A backend name with two addresses (hosts file): the hedge connects to
    the address the first try did not use."""
    s1 = Stub("127.0.0.1")
    s2 = Stub("127.0.0.2", port=s1.port)
    with TempDir() as t:
        hosts = t.write("hosts", "127.0.0.1 two.test\n127.0.0.2 two.test\n")
        res = {"hosts_file": hosts, "nameservers": [f"127.0.0.1:{tp.closed_port()}"]}
        d = daemon(s1, [route("/h", [call("c", "/x?tag=ha&delay=500&abort_on_eof=1", backend="two",
                                          hedge_after_ms=ms(50))])],
                   backends={"two": tp.backend(f"http://two.test:{s1.port}")}, resolver=res)
        r, _ = get(d, "/h")
        eq(r.status, 200, f"status ({r.raw[:300]!r})")
        eq((tag_log(s1, "ha")["count"], tag_log(s2, "ha")["count"]), (1, 1), "one try at each address")


# --- proxy routes ------------------------------------------------------------------------

def proxy_route(backend="r"):
    return [{"path": "/px/*", "proxy": {"backend": backend, "strip_prefix": "/px"}}]


@rtest
def proxy_retries_connect_failure_to_another_address():
    s = Stub("127.0.0.1")
    with TempDir() as t:
        hosts = t.write("hosts", "127.0.0.3 two.test\n127.0.0.1 two.test\n")
        res = {"hosts_file": hosts, "nameservers": [f"127.0.0.1:{tp.closed_port()}"]}
        url = f"http://two.test:{s.port}"
        d = daemon(s, proxy_route("two"), backends={"two": tp.backend(url, retry=retry())}, resolver=res)
        for i in range(3):
            r, _ = get(d, f"/px/x?tag=pc")
            eq(r.status, 200, f"request {i}: status ({r.raw[:300]!r})")
        check(d.wait_log("upstream_connect_failed") and d.wait_log("retry 1 of 2"),
              "a connect failure was retried (log)")
        d.stop()
        d = daemon(s, proxy_route("two"), backends={"two": tp.backend(url)}, resolver=res)
        codes = [get(d, "/px/x")[0].status for _ in range(2)]
        check(502 in codes, f"without \"retry\" a refused address fails the request: {codes}")


@rtest
def proxy_retries_statuses_before_anything_is_sent():
    s = Stub()
    d = daemon(s, proxy_route())
    r, _ = get(d, "/px/x?tag=ps&fail_first=2")
    eq(r.status, 200, f"status after two 503s ({r.raw[:300]!r})")
    eq(tag_log(s, "ps")["count"], 3, "tries")
    # a buffered PUT body is sent whole again
    r, _ = get(d, "/px/x?tag=pb&fail_first=1&echo=1", method="PUT", body=b"hello body",
               headers={"Content-Type": "text/plain"})
    eq(r.status, 200, f"PUT status ({r.raw[:300]!r})")
    eq(r.json()["body"], "hello body", "the retried PUT's body")
    eq(tag_log(s, "pb")["count"], 2, "PUT tries")
    # POST: not retried; all tries failing: the last answer is passed on
    r, _ = get(d, "/px/x?tag=pp&fail_first=5", method="POST", body=b"x")
    eq(r.status, 503, "POST status")
    eq(tag_log(s, "pp")["count"], 1, "POST tries")
    r, _ = get(d, "/px/x?tag=pa&status=503")
    eq(r.status, 503, "the last 503 is passed on")
    eq(tag_log(s, "pa")["count"], 3, "tries of a request that always fails")


if __name__ == "__main__":
    sys.exit(main())
