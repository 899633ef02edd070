#!/usr/bin/env python3
"""Integration tests of backends with several servers (README "Upstream
clusters"), on the request path: the real daemon in front of three stub
backends on loopback. Every stub answer carries X-Stub-Port (the port its
connection was accepted on), which a proxy route passes on; an aggregate
call with echo=1 gets back the Host it sent, which is its server's.

Covered: weighted round robin through an aggregate and a proxy route (and
the Host each server gets), least_request against a slow server, the hash
balance (a key stays on its server; a reload that removes one of three
servers moves about a third of the keys and no key between the two that
stay), the next-server retry without a "retry" section (wrk while one
server is killed and started again on its port: no failed request),
no_healthy_server for aggregate and proxy routes (by outlier ejection and
by active health checks), backups, and a
one-server backend given as "servers"; the wait queue over several servers
(a waiting call takes the first server that frees a connection; queue_full
and queue_timeout; a reload while calls wait).

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_balance.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import os
import sys
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, check, eq, main, req  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms
btest = tp.ptest  # stubs and clients made during a test are closed after it
Stub = tp.Stub
Client = tp.Client


def cluster(servers, **kw):
    """Backend "c": servers is a list of Stubs, URLs, or (Stub or URL, {"weight": .., "backup": ..})."""
    out = []
    for s in servers:
        opts = {}
        if isinstance(s, tuple):
            s, opts = s
        url = s if isinstance(s, str) else s.url
        out.append(dict({"url": url}, **opts) if opts else url)
    b = {"servers": out, "connect_timeout_ms": ms(1000), "timeout_ms": ms(5000)}
    b.update(kw)
    return b


def routes(agg_path="/x?echo=1", required=True):
    return [
        {"path": "/p/*", "proxy": {"backend": "c", "strip_prefix": "/p"}},
        {"path": "/agg", "methods": ["GET"], "deadline_ms": ms(5000),
         "calls": [{"name": "c", "backend": "c", "path": agg_path, "required": required}]},
    ]


def daemon(backend, workers=2, log_level="info"):
    return Daemon(tp.config({"c": backend}, routes=routes()), workers=workers, log_level=log_level)


def port_of_proxied(r):
    p = r.header("x-stub-port")
    check(p is not None, f"no X-Stub-Port in the answer: {r.raw[:300]!r}")
    return int(p)


def port_of_agg(r):
    host = r.json()["c"]["headers"]["host"]
    return int(host.rsplit(":", 1)[1])


def count_ports(d, path, n, port_of, headers=None, conns=4):
    """n GET requests to path on conns keep-alive connections at once:
    Counter of the server ports that answered (every answer must be 200)."""
    counts = Counter()
    errors = []
    lock = threading.Lock()

    def worker(k):
        try:
            with Client(d, timeout=20) as c:
                for _ in range(k):
                    r = c.request(req("GET", path, headers=headers))
                    if r.status != 200:
                        raise TestFailure(f"status {r.status}: {r.raw[:300]!r}")
                    p = port_of(r)
                    with lock:
                        counts[p] += 1
        except Exception as e:  # reported by the test
            errors.append(e)

    share = [n // conns + (1 if i < n % conns else 0) for i in range(conns)]
    ts = [threading.Thread(target=worker, args=(k,)) for k in share]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return counts


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


# --- round robin ----------------------------------------------------------------------------

# 3,000 requests in the normal build and distcheck (the smoke tier); the
# sanitizer build, whose concern is memory and races, sends 1,000
RR_REQUESTS = 1000 if gwtest._is_sanitized(gwtest.GATHERD) else 3000


@btest
def balance_round_robin_weights_3_1_1():
    """Weights 3:1:1 over 3,000 requests, through an aggregate route and a
    proxy route: each server's share within 3 % of 60/20/20, and each
    server is sent its own Host."""
    s = [Stub() for _ in range(3)]
    d = daemon(cluster([(s[0], {"weight": 3}), s[1], s[2]]))
    want = {s[0].port: 0.6, s[1].port: 0.2, s[2].port: 0.2}
    n = RR_REQUESTS
    for what, path, port_of in (("proxy", "/p/x", port_of_proxied), ("aggregate", "/agg", port_of_agg)):
        got = count_ports(d, path, n, port_of)
        eq(sum(got.values()), n, f"{what}: answers")
        eq(set(got), set(want), f"{what}: the servers that answered")
        for p, share in want.items():
            check(abs(got[p] / n - share) <= 0.03, f"{what}: server {p} got {got[p]} of {n}, want {share:.0%}: {dict(got)}")
    # the Host each server got is its own (the aggregate call echoes it)
    with Client(d) as c:
        for _ in range(5):
            r = c.request(req("GET", "/agg"))
            eq(r.json()["c"]["headers"]["host"], f"127.0.0.1:{port_of_agg(r)}", "Host of the server")


@btest
def balance_one_server_given_as_servers():
    """A backend of one server ("servers" with one URL) answers as one with
    "url": every request to it, with its Host."""
    s = Stub()
    d = daemon(cluster([s]))
    got = count_ports(d, "/p/x", 50, port_of_proxied, conns=1)
    eq(dict(got), {s.port: 50}, "servers that answered")
    got = count_ports(d, "/agg", 50, port_of_agg, conns=1)
    eq(dict(got), {s.port: 50}, "servers that answered the calls")


# --- least request --------------------------------------------------------------------------

@btest
def balance_least_request_avoids_a_slow_server():
    """least_request, one of three servers 150 ms slow (the stub's
    delay_port): 16 clients for ~2 s; the slow server gets clearly less than
    a third (round robin would give it one), and no request fails."""
    s = [Stub() for _ in range(3)]
    slow = s[2].port
    d = daemon(cluster(s, balance="least_request"))
    path = f"/p/x?delay=150&delay_port={slow}"
    counts = Counter()
    errors = []
    lock = threading.Lock()
    end = time.monotonic() + 2.0 * SLOW

    def client():
        try:
            with Client(d, timeout=20) as c:
                while time.monotonic() < end:
                    r = c.request(req("GET", path))
                    eq(r.status, 200, "status")
                    with lock:
                        counts[port_of_proxied(r)] += 1
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=client) for _ in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    total = sum(counts.values())
    print(f"# least_request: {dict(counts)} (slow {slow})")
    check(total >= 100, f"too few requests to judge: {dict(counts)}")
    check(counts[slow] / total < 0.15, f"the slow server got {counts[slow]} of {total}: {dict(counts)}")
    for p in (s[0].port, s[1].port):
        check(counts[p] / total > 0.3, f"fast server {p} got {counts[p]} of {total}: {dict(counts)}")


# --- hash -----------------------------------------------------------------------------------

@btest
def balance_hash_keeps_keys_and_a_reload_moves_a_third():
    """hash over {header.X-User}: a key goes to the same server every time
    (proxy and aggregate agree); a reload that removes one of three servers
    moves the keys of that server only: about a third, none between the
    two that stay; the two keep their pooled connections (no new one)."""
    s = [Stub() for _ in range(3)]
    b = cluster(s, balance="hash", hash_key="{header.X-User}")
    d = daemon(b, workers=1)
    keys = [f"user-{i}" for i in range(300)]

    def placement(port_of, path):
        out = {}
        with Client(d) as c:
            for k in keys:
                r = c.request(req("GET", path, headers={"X-User": k}))
                eq(r.status, 200, f"status for {k}")
                out[k] = port_of(r)
        return out

    first = placement(port_of_proxied, "/p/x")
    again = placement(port_of_proxied, "/p/x")
    eq(again, first, "every key on the same server the second time")
    via_agg = placement(port_of_agg, "/agg")
    eq(via_agg, first, "aggregate calls place the keys as the proxy does")
    per = Counter(first.values())
    print(f"# hash placement: {dict(per)}")
    for st in s:
        check(per[st.port] >= 40, f"server {st.port} got {per[st.port]} of 300 keys: {dict(per)}")
    # without the header: round robin, every server gets some
    got = count_ports(d, "/p/x", 30, port_of_proxied, conns=1)
    eq(len(got), 3, f"no key: round robin over the three ({dict(got)})")
    # a reload without the third server
    gone = s[2].port
    cfg = tp.config({"c": cluster(s[:2], balance="hash", hash_key="{header.X-User}")}, routes=routes())
    cfg["listen"] = [f"127.0.0.1:{d.port}"]
    opened = [st.stats()["connections"] for st in s[:2]]
    d.reload(cfg)
    after = placement(port_of_proxied, "/p/x")
    # (each /stats asked is one more connection of its own)
    eq([st.stats()["connections"] - 1 for st in s[:2]], opened,
       "connections opened to the servers that stayed (their pools are kept)")
    moved = [k for k in keys if after[k] != first[k]]
    wrong = [k for k in moved if first[k] != gone]
    eq(wrong, [], "keys that moved between the two servers that stayed")
    check(all(after[k] != gone for k in keys), "no key on the removed server")
    share = len(moved) / len(keys)
    check(0.2 <= share <= 0.47, f"{len(moved)} of {len(keys)} keys moved; about a third expected")


# --- next-server retry ----------------------------------------------------------------------

WRK_SCRIPT = r"""
bad = 0
threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
  end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do
    b = b + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format("RESULT requests=%d bad=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
                         summary.requests, b, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@btest
@gwtest.exclusive
def balance_next_server_retry_while_a_server_restarts():
    """No "retry" section: while one of three servers is killed and started
    again on the same port, wrk (2 s, 3 connections, proxy then aggregate
    route) sees no failed request: a refused connect (or a reset pooled
    connection) goes to another server at once."""
    s = [Stub() for _ in range(3)]
    d = daemon(cluster(s))
    port = s[1].port
    for path in ("/p/x", "/agg"):
        state = {"killed": False, "back": False}
        victim = [s[1]]

        def during(t):
            if t > 0.4 and not state["killed"]:
                victim[0].stop()
                state["killed"] = True
            elif t > 1.2 and not state["back"]:
                victim[0] = Stub(port=port)
                state["back"] = True

        res = gwtest.run_wrk(f"http://127.0.0.1:{d.port}{path}", 2, 3, WRK_SCRIPT, during, poll=0.02)
        check(state["killed"] and state["back"], "the server was killed and started again during the run")
        check(res["requests"] > 100, f"too few requests: {res}")
        eq((res["bad"], res["connect"], res["read"], res["write"], res["timeout"]), (0, 0, 0, 0, 0),
           f"failed requests ({res})")
        s[1] = victim[0]
    check(d.wait_log(f"server 127.0.0.1:{port}: "), "log lines name the server")
    check(d.wait_log("trying another server"), "the next-server retry is logged")
    # the restarted server gets traffic again
    got = count_ports(d, "/p/x", 60, port_of_proxied, conns=1)
    check(got[port] > 0, f"the restarted server answers again: {dict(got)}")


@btest
def balance_next_server_retry_not_for_post():
    """A POST is not sent to another server after a refused connect: the
    request fails with the first server's error (nginx: non-idempotent)."""
    s = Stub()
    dead = tp.closed_port()
    d = daemon(cluster([f"http://127.0.0.1:{dead}", s]))
    codes = Counter()
    for _ in range(6):
        with Client(d) as c:
            r = c.request(req("POST", "/p/x", body=b"{}"))
        codes[r.status] += 1
    eq(sorted(codes), [200, 502], f"POSTs: half refused, half answered ({dict(codes)})")
    # GETs all go through
    got = count_ports(d, "/p/x", 20, port_of_proxied, conns=1)
    eq(dict(got), {s.port: 20}, "GETs: all answered by the live server")


# --- no_healthy_server ----------------------------------------------------------------------

@btest
def balance_no_healthy_server_when_all_are_ejected():
    """Every server refuses and outlier detection ejects each after one
    failure: the next request fails at once with no_healthy_server (503,
    Retry-After: 1 on a proxy route; 503 with the code for a required call)."""
    dead = [tp.closed_port() for _ in range(3)]
    b = cluster([f"http://127.0.0.1:{p}" for p in dead],
                outlier_detection={"consecutive_failures": 1, "eject_ms": ms(30000), "max_ejected_percent": 100})
    d = daemon(b, workers=1)
    with Client(d) as c:
        r = c.request(req("GET", "/p/x"))
    eq((r.status, error_code(r)), (502, "upstream_connect_failed"), f"first request ({r.raw[:300]!r})")
    with Client(d) as c:
        t0 = time.monotonic()
        r = c.request(req("GET", "/p/x"))
        dt = time.monotonic() - t0
    eq((r.status, error_code(r)), (503, "no_healthy_server"), f"proxy, all ejected ({r.raw[:300]!r})")
    eq(r.header("retry-after"), "1", "Retry-After")
    eq(r.json()["error"].get("backend"), "c", "the error names the backend")
    check(dt < 0.5 * SLOW, f"answered at once ({dt:.3f} s)")
    with Client(d) as c:
        r = c.request(req("GET", "/agg"))
    eq(r.status, 503, f"aggregate with a required call ({r.raw[:300]!r})")
    eq((r.json()["error"]["code"], r.json()["error"].get("call")), ("no_healthy_server", "c"), "error")
    check(d.wait_log("no_healthy_server"), "logged")


@btest
def balance_no_healthy_server_optional_call_falls_back():
    """An optional call to a backend with no usable server: 200, not
    completed, its fallback in place."""
    dead = [tp.closed_port() for _ in range(2)]
    b = cluster([f"http://127.0.0.1:{p}" for p in dead],
                outlier_detection={"consecutive_failures": 1, "eject_ms": ms(30000), "max_ejected_percent": 100})
    rs = [{"path": "/opt", "methods": ["GET"], "errors": True,
           "calls": [{"name": "c", "backend": "c", "path": "/x", "fallback": {"none": True}}]}]
    d = Daemon(tp.config({"c": b}, routes=rs), workers=1)
    with Client(d) as c:
        c.request(req("GET", "/opt"))  # ejects both
        r = c.request(req("GET", "/opt"))
    eq(r.status, 200, "status")
    eq(r.header("x-gateway-completed"), "false", "not completed")
    eq(r.json()["c"], {"none": True}, "the fallback")
    check("no_healthy_server" in r.raw.decode(errors="replace"), f"the code in _errors: {r.raw[:400]!r}")


@btest
def balance_health_checks_steer_traffic_and_no_healthy_server():
    """Active health checks: a server whose /healthz fails gets no traffic;
    all of them failing gives no_healthy_server (proxy and aggregate), and
    traffic comes back to a server once it is healthy again."""
    s = [Stub() for _ in range(2)]
    hc = {"path": "/healthz", "interval_ms": ms(100), "timeout_ms": ms(80), "healthy": 1, "unhealthy": 1}
    d = daemon(cluster(s, health_check=hc), workers=1)

    def wait_for(cond, what, timeout=5.0):
        deadline = time.monotonic() + timeout * SLOW
        while not cond():
            if time.monotonic() > deadline:
                raise TestFailure(f"{what} not reached:\n{d.log()[-2000:]}")
            time.sleep(0.02)

    s[1].get("/__health/503")
    wait_for(lambda: f"server {s[1].hostport} is unhealthy" in d.log(), "server 1 unhealthy")
    got = count_ports(d, "/p/x", 30, port_of_proxied, conns=1)
    eq(dict(got), {s[0].port: 30}, "traffic while server 1 is unhealthy")
    s[0].get("/__health/503")
    wait_for(lambda: f"server {s[0].hostport} is unhealthy" in d.log(), "server 0 unhealthy")
    with Client(d) as c:
        r = c.request(req("GET", "/p/x"))
        eq((r.status, error_code(r), r.header("retry-after")), (503, "no_healthy_server", "1"), "proxy")
        r = c.request(req("GET", "/agg"))
        eq((r.status, error_code(r)), (503, "no_healthy_server"), "required call")
    s[1].get("/__health/200")
    wait_for(lambda: f"server {s[1].hostport} is healthy again" in d.log(), "server 1 healthy again")
    got = count_ports(d, "/p/x", 30, port_of_proxied, conns=1)
    eq(dict(got), {s[1].port: 30}, "traffic once server 1 is healthy again")


# --- the wait queue over several servers -------------------------------------------------------

def _busy_server(stubs, before):
    """The stub whose in-flight count just went up: the server the request
    sent after before (their in_flight counts) landed on."""
    deadline = time.monotonic() + 5 * SLOW
    while time.monotonic() < deadline:
        now = [st.stats()["in_flight"] for st in stubs]
        up = [st for st, a, b in zip(stubs, before, now) if b > a]
        if up:
            return up[0], now
        time.sleep(0.02)
    raise TestFailure(f"no stub got the request (in flight {before})")


@btest
def balance_queued_call_takes_the_first_server_that_frees():
    """max_connections 1 on each of two servers, one worker: a 1.5 s
    request holds one server (S), a 300 ms one the other (F); two more
    requests must wait. Each is served by F as soon as F frees, in arrival
    order, long before S answers (a call waits in the queue of every usable
    server of its backend, not only of the one it picked first; round robin
    makes one of the two pick S first)."""
    s = [Stub() for _ in range(2)]
    d = daemon(cluster(s, max_connections=1, max_pending=4, queue_timeout_ms=ms(10000)), workers=1)
    inflight = [0, 0]
    slow = Client(d, timeout=20)
    slow.send(req("GET", f"/p/slow?delay={ms(1500)}"))
    S, inflight = _busy_server(s, inflight)
    fast = Client(d, timeout=20)
    fast.send(req("GET", f"/p/fast?delay={ms(300)}"))
    F, inflight = _busy_server(s, inflight)
    check(S is not F, "the second request went to the other server")
    done = []
    lock = threading.Lock()
    results = {}

    def one(name, c):
        r = c.read_response()
        with lock:
            done.append(name)
            results[name] = r

    queued = []
    for k in range(2):
        c = Client(d, timeout=20)
        c.send(req("GET", f"/p/q{k}?tag=q{k}"))
        queued.append(c)
        time.sleep(0.05)  # queued in this order
    ts = [threading.Thread(target=one, args=(n, c))
          for n, c in (("slow", slow), ("fast", fast), ("q0", queued[0]), ("q1", queued[1]))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for n, r in results.items():
        eq(r.status, 200, f"{n}: status ({r.raw[:300]!r})")
    eq(port_of_proxied(results["slow"]), S.port, "the slow request's server")
    eq(port_of_proxied(results["fast"]), F.port, "the fast request's server")
    eq([port_of_proxied(results[n]) for n in ("q0", "q1")], [F.port, F.port],
       f"the queued requests' servers (fast {F.port}, slow {S.port})")
    eq(done[-1], "slow", f"the last answer ({done})")
    eq((S.stats()["requests"], F.stats()["requests"]), (1, 3), "requests at the slow and the fast server")
    # served in the order they queued (the stub's arrival times: the answers
    # themselves are too close together for the reading threads to order)
    arrived = [F.get(f"/log?tag=q{k}").json()["requests"][0]["ms"] for k in range(2)]
    check(arrived[0] < arrived[1], f"q0 reached the fast server before q1 ({arrived})")


@btest
def balance_queue_full_and_timeout_with_several_servers():
    """max_connections 1, max_pending 1 on each of two servers: two calls
    wait (each charged to one server's max_pending, both waiting for
    either), a third is refused at once with queue_full; a waiter that no
    server frees in queue_timeout_ms fails with queue_timeout."""
    s = [Stub() for _ in range(2)]
    d = daemon(cluster(s, max_connections=1, max_pending=1, queue_timeout_ms=ms(400)), workers=1)
    holders = []
    for _ in range(2):
        c = Client(d, timeout=20)
        c.send(req("GET", f"/p/h?delay={ms(1500)}"))
        holders.append(c)
    s[0].wait_stats(lambda st: st["in_flight"] == 1, 3, "a holder at server 0")
    s[1].wait_stats(lambda st: st["in_flight"] == 1, 3, "a holder at server 1")
    waiters = []
    for _ in range(2):
        c = Client(d, timeout=20)
        c.send(req("GET", "/p/w"))
        waiters.append(c)
    time.sleep(0.05)
    with Client(d) as c:
        t0 = time.monotonic()
        r = c.request(req("GET", "/p/x"))
        dt = time.monotonic() - t0
    eq((r.status, error_code(r)), (503, "queue_full"), f"a third waiter ({r.raw[:300]!r})")
    check(dt < 0.25 * SLOW, f"queue_full answered after {dt:.3f}s")
    for k, c in enumerate(waiters):
        r = c.read_response()
        eq((r.status, error_code(r)), (503, "queue_timeout"), f"waiter {k} ({r.raw[:300]!r})")
    for k, c in enumerate(holders):
        eq(c.read_response().status, 200, f"holder {k}")
    got = count_ports(d, "/p/x", 10, port_of_proxied, conns=1)
    eq(sum(got.values()), 10, "requests afterwards")


@btest
def balance_reload_while_calls_wait():
    """Servers A and B (max_connections 1) both busy for 1.2 s, two calls
    waiting; a reload replaces A by C (B's pool is kept). The waiters
    belong to the old configuration: they are served by A or B, never by
    C, even though C frees first; a request of the new configuration that
    waits is served by C as soon as C frees."""
    a, b, c = Stub(), Stub(), Stub()
    kw = dict(max_connections=1, max_pending=4, queue_timeout_ms=ms(10000))
    d = daemon(cluster([a, b], **kw), workers=1)
    holders = []
    for _ in range(2):
        cl = Client(d, timeout=20)
        cl.send(req("GET", f"/p/h?delay={ms(1200)}"))
        holders.append(cl)
    a.wait_stats(lambda st: st["in_flight"] == 1, 3, "a holder at A")
    b.wait_stats(lambda st: st["in_flight"] == 1, 3, "a holder at B")
    old = []
    for k in range(2):
        cl = Client(d, timeout=20)
        cl.send(req("GET", f"/p/old{k}"))
        old.append(cl)
    time.sleep(0.05)
    cfg = tp.config({"c": cluster([b, c], **kw)}, routes=routes())
    cfg["listen"] = [f"127.0.0.1:{d.port}"]
    d.reload(cfg)
    new_busy = Client(d, timeout=20)
    new_busy.send(req("GET", f"/p/n?delay={ms(200)}"))  # B is full: C
    c.wait_stats(lambda st: st["in_flight"] == 1, 3, "a new request at C")
    new_waiter = Client(d, timeout=20)
    new_waiter.send(req("GET", "/p/nw"))  # B and C full: waits
    r = new_busy.read_response()
    eq((r.status, port_of_proxied(r)), (200, c.port), "the new configuration's request on C")
    r = new_waiter.read_response()
    eq((r.status, port_of_proxied(r)), (200, c.port), "the new configuration's waiter, served by C")
    for k, cl in enumerate(old):
        r = cl.read_response()
        eq(r.status, 200, f"old waiter {k} ({r.raw[:300]!r})")
        check(port_of_proxied(r) in (a.port, b.port),
              f"old waiter {k} served by {port_of_proxied(r)}, not by A {a.port} or B {b.port}")
    for k, cl in enumerate(holders):
        eq(cl.read_response().status, 200, f"holder {k}")
    got = count_ports(d, "/p/x", 20, port_of_proxied, conns=1)
    eq(set(got), {b.port, c.port}, "the new configuration's servers afterwards")
    check(d.wait_log("reloaded"), "reloaded")


# --- backups --------------------------------------------------------------------------------

@btest
def balance_backup_only_when_the_primaries_are_down():
    """Two primaries and a backup: the backup gets nothing while a primary
    is usable; with both primaries down (refused, then ejected), every
    request goes to the backup and none fails."""
    s = [Stub() for _ in range(3)]
    b = cluster([s[0], s[1], (s[2], {"backup": True})],
                outlier_detection={"consecutive_failures": 1, "eject_ms": ms(30000), "max_ejected_percent": 100})
    d = daemon(b, workers=1)
    got = count_ports(d, "/p/x", 60, port_of_proxied, conns=2)
    eq(got[s[2].port], 0, f"the backup while the primaries are up ({dict(got)})")
    eq(set(got), {s[0].port, s[1].port}, "both primaries answered")
    got = count_ports(d, "/agg", 20, port_of_agg, conns=1)
    eq(got[s[2].port], 0, f"the backup for calls ({dict(got)})")
    s[0].stop()
    s[1].stop()
    got = count_ports(d, "/p/x", 40, port_of_proxied, conns=1)
    eq(dict(got), {s[2].port: 40}, "every request on the backup once the primaries are down")
    got = count_ports(d, "/agg", 20, port_of_agg, conns=1)
    eq(dict(got), {s[2].port: 20}, "every call on the backup")


if __name__ == "__main__":
    sys.exit(main())
