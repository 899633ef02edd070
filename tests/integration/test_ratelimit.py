#!/usr/bin/env python3
"""Integration tests of rate limits, trusted proxies (the real client
address, X-Forwarded-For / X-Real-IP) and max_inflight (README "Rate limits,
real client address and load shedding"): the real daemon in front of the stub
backend, raw HTTP on both sides, loopback only.

Clients from an address other than 127.0.0.1 bind 127.0.0.2 (all of
127.0.0.0/8 is loopback on Linux), so one daemon sees a trusted and an
untrusted peer.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_ratelimit.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import json
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, check, eq, main, req  # noqa: E402

# test_proxy holds the Stub and Client helpers; importing it registers its
# tests, so the registry is put back afterwards.
_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms
rtest = tp.ptest
Stub = tp.Stub
Client = tp.Client


class FromClient(Client):
    """A client whose socket is bound to source address src (127.0.0.2)."""

    def __init__(self, d, src, timeout=10.0):  # noqa: super().__init__ would connect from 127.0.0.1
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((src, 0))
        self.sock.settimeout(timeout * SLOW)
        self.sock.connect((d.host, d.port))
        self.timeout = timeout * SLOW
        self.buf = b""
        self.eof = False
        tp._resources.append(self)


def get(path, headers=None):
    return req("GET", path, headers=headers)


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        raise TestFailure(f"not a JSON error answer: {r.raw[:300]!r}")


def cfg(stub, routes, **top):
    c = tp.config({"s": tp.backend(stub.url)}, routes=routes)
    c.update(top)
    return c


def echo_routes(extra=()):
    return [
        {"path": "/p/*", "proxy": {"backend": "s", "strip_prefix": "/p"}},
        {"path": "/a", "methods": ["GET"], "calls": [{"name": "e", "backend": "s", "path": "/e?echo=1"}]},
        {"path": "/local", "respond": {"body": {"ok": True}}},
    ] + list(extra)


def xff_at_backend(c, path, headers):
    """X-Forwarded-For the stub saw for a proxied (echo=1) and an aggregate call."""
    r = c.request(get(path + "?echo=1", headers))
    eq(r.status, 200, f"proxy status ({r.raw[:300]!r})")
    via_proxy = r.json()["headers"].get("x-forwarded-for")
    r = c.request(get("/a", headers))
    eq(r.status, 200, f"aggregate status ({r.raw[:300]!r})")
    via_agg = r.json()["e"]["headers"].get("x-forwarded-for")
    return via_proxy, via_agg


# --- trusted proxies ------------------------------------------------------------------

@rtest
def xff_untrusted_peer_is_replaced():
    """A peer that is no trusted proxy: its X-Forwarded-For is not believed,
    the backend gets the peer's address alone (proxy route and aggregate call)."""
    s = Stub()
    d = Daemon(cfg(s, echo_routes(), trusted_proxies=["10.0.0.0/8", "::1/128"]), workers=1)
    with Client(d) as c:
        p, a = xff_at_backend(c, "/p/x", [("X-Forwarded-For", "203.0.113.9, 10.1.1.1")])
        eq(p, "127.0.0.1", "X-Forwarded-For via a proxy route")
        eq(a, "127.0.0.1", "X-Forwarded-For via an aggregate call")
        p, a = xff_at_backend(c, "/p/x", [])
        eq((p, a), ("127.0.0.1", "127.0.0.1"), "X-Forwarded-For without a client one")


@rtest
def xff_trusted_peer_is_extended():
    """Behind a trusted proxy the list is extended (nginx's
    $proxy_add_x_forwarded_for); several fields are one list; an untrusted
    peer of the same daemon still gets its list replaced."""
    s = Stub()
    d = Daemon(cfg(s, echo_routes(), trusted_proxies=["127.0.0.1/32"]), workers=1)
    with Client(d) as c:
        p, a = xff_at_backend(c, "/p/x", [("X-Forwarded-For", "203.0.113.9, 10.1.1.1")])
        eq(p, "203.0.113.9, 10.1.1.1, 127.0.0.1", "proxy route")
        eq(a, "203.0.113.9, 10.1.1.1, 127.0.0.1", "aggregate call")
        p, a = xff_at_backend(c, "/p/x", [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")])
        eq(p, "1.1.1.1, 2.2.2.2, 127.0.0.1", "two fields, proxy route")
        eq(a, "1.1.1.1, 2.2.2.2, 127.0.0.1", "two fields, aggregate call")
    with FromClient(d, "127.0.0.2") as c:
        p, a = xff_at_backend(c, "/p/x", [("X-Forwarded-For", "203.0.113.9")])
        eq((p, a), ("127.0.0.2", "127.0.0.2"), "an untrusted peer of the same daemon")


def client_keyed(rate_key="client", **top):
    """A daemon with /k: 1 request per minute per key, burst 1."""
    s = Stub()
    routes = [{"path": "/k", "respond": {"body": {"ok": True}},
               "rate_limit": {"rate": 1, "period_ms": 60000, "burst": 1, "key": rate_key}}]
    return Daemon(cfg(s, routes, **top), workers=2)


def status(c, path, headers=None):
    r = c.request(get(path, headers))
    check(r.status in (200, 429), f"unexpected answer {r.raw[:300]!r}")
    return r.status


@rtest
def rate_key_client_behind_trusted_proxies():
    """key "client" uses the real client address: the right-most
    X-Forwarded-For entry that is not a trusted proxy, malformed entries
    skipped; an untrusted peer is keyed by its own address whatever it sends."""
    d = client_keyed(trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"])
    with Client(d) as c:
        xff = lambda v: [("X-Forwarded-For", v)]  # noqa: E731
        eq(status(c, "/k", xff("203.0.113.9, 10.1.1.1")), 200, "first request of 203.0.113.9")
        eq(status(c, "/k", xff("203.0.113.9")), 429, "second request of 203.0.113.9")
        eq(status(c, "/k", xff("198.51.100.1, 203.0.113.9, 10.2.2.2, 10.3.3.3")), 429,
           "203.0.113.9 again, behind two trusted hops (left entries are not believed)")
        eq(status(c, "/k", xff("203.0.113.9, not-an-ip, 10.2.2.2")), 429,
           "203.0.113.9 with a malformed entry between")
        eq(status(c, "/k", xff("203.0.113.10")), 200, "another client")
        eq(status(c, "/k", [("X-Forwarded-For", "203.0.113.11"), ("X-Forwarded-For", "10.9.9.9")]), 200,
           "a third client, list in two fields")
        eq(status(c, "/k", xff("[2001:db8::7]:4711")), 200, "an IPv6 client")
        eq(status(c, "/k", xff("2001:db8::7")), 429, "the same IPv6 client without brackets and port")
        eq(status(c, "/k", xff("10.1.1.1, 10.2.2.2")), 200, "every entry trusted: the left-most one")
        eq(status(c, "/k", xff("10.1.1.1")), 429, "the same left-most one")
        eq(status(c, "/k"), 200, "no header: the peer itself")
        eq(status(c, "/k", xff("garbage")), 429, "only malformed entries: the peer")
    with FromClient(d, "127.0.0.2") as c:
        eq(status(c, "/k", [("X-Forwarded-For", "192.0.2.1")]), 200, "untrusted peer")
        eq(status(c, "/k", [("X-Forwarded-For", "192.0.2.2")]), 429, "untrusted peer, another header: same key")


@rtest
def rate_key_client_x_real_ip():
    """real_ip_header X-Real-IP: the client is its value (from a trusted
    peer), X-Forwarded-For is then not used for the key but still extended."""
    d = client_keyed(trusted_proxies=["127.0.0.1/32"], real_ip_header="X-Real-IP")
    with Client(d) as c:
        eq(status(c, "/k", [("X-Real-IP", "198.51.100.7"), ("X-Forwarded-For", "1.2.3.4")]), 200, "first")
        eq(status(c, "/k", [("X-Real-IP", " 198.51.100.7 "), ("X-Forwarded-For", "5.6.7.8")]), 429, "same X-Real-IP")
        eq(status(c, "/k", [("X-Real-IP", "198.51.100.8")]), 200, "another X-Real-IP")
        eq(status(c, "/k", [("X-Forwarded-For", "198.51.100.9")]), 200, "no X-Real-IP: the peer")
        eq(status(c, "/k", [("X-Real-IP", "bogus")]), 429, "a malformed X-Real-IP: the peer")
    with FromClient(d, "127.0.0.2") as c:
        eq(status(c, "/k", [("X-Real-IP", "198.51.100.20")]), 200, "untrusted peer")
        eq(status(c, "/k", [("X-Real-IP", "198.51.100.21")]), 429, "untrusted peer: X-Real-IP ignored")


@rtest
def rate_key_header():
    """key "header:X-Api-Key": one bucket per value; requests without the
    header share the empty key."""
    d = client_keyed(rate_key="header:X-Api-Key")
    with Client(d) as c:
        eq(status(c, "/k", [("X-Api-Key", "alpha")]), 200, "alpha")
        eq(status(c, "/k", [("x-api-key", "alpha")]), 429, "alpha again (header name case-insensitive)")
        eq(status(c, "/k", [("X-Api-Key", "beta")]), 200, "beta")
        eq(status(c, "/k", [("X-Api-Key", "b" * 3000)]), 200, "a long key")
        eq(status(c, "/k", [("X-Api-Key", "b" * 3000)]), 429, "the same long key")
        eq(status(c, "/k", [("X-Api-Key", "b" * 2999 + "c")]), 200, "a long key differing at its end")
        eq(status(c, "/k"), 200, "no header")
        eq(status(c, "/k", [("X-Other", "x")]), 429, "no header again: the shared empty key")


# --- the bucket -----------------------------------------------------------------------

@rtest
def rate_429_headers():
    """Admitted answers carry RateLimit-Limit/-Remaining/-Reset; the excess
    gets 429 rate_limited with Retry-After (whole seconds, >= 1); the
    connection stays usable. Proxy and aggregate routes are limited before
    any backend is contacted."""
    s = Stub()
    rl = {"rate": 2, "period_ms": 10000}
    routes = [{"path": "/r", "respond": {"body": {"ok": True}}, "rate_limit": rl},
              {"path": "/p/*", "proxy": {"backend": "s", "strip_prefix": "/p"},
               "rate_limit": {"rate": 1, "period_ms": 60000}},
              {"path": "/a", "calls": [{"name": "e", "backend": "s", "path": "/e?echo=1"}],
               "rate_limit": {"rate": 1, "period_ms": 60000}},
              {"path": "/free", "respond": {"body": {"ok": True}}}]
    d = Daemon(cfg(s, routes), workers=2)
    with Client(d) as c:
        r = c.request(get("/r"))
        eq(r.status, 200, "first")
        eq(r.header("RateLimit-Limit"), "2", "RateLimit-Limit")
        eq(r.header("RateLimit-Remaining"), "1", "RateLimit-Remaining after the first")
        eq(r.header("RateLimit-Reset"), "5", "RateLimit-Reset (seconds until full: one token = 5 s)")
        r = c.request(get("/r"))
        eq((r.status, r.header("RateLimit-Remaining"), r.header("RateLimit-Reset")), (200, "0", "10"), "second")
        r = c.request(get("/r"))
        eq(r.status, 429, "third")
        eq(error_code(r), "rate_limited", "error code")
        eq(r.header("Content-Type"), "application/json", "Content-Type")
        ra = int(r.header("Retry-After") or "0")
        check(4 <= ra <= 5, f"Retry-After {ra} (about 5 s until one token)")
        eq(r.header("RateLimit-Limit"), "2", "RateLimit-Limit of a 429")
        eq(r.header("RateLimit-Remaining"), "0", "RateLimit-Remaining of a 429")
        eq(r.header("RateLimit-Reset"), str(ra), "RateLimit-Reset of a 429 (seconds until one token)")
        check((r.header("Connection") or "").lower() != "close", "a 429 keeps the connection")
        r = c.request(get("/free"))
        eq((r.status, r.header("RateLimit-Limit")), (200, None), "a route without a limit, same connection")
        before = s.stats()["requests"]
        eq(c.request(get("/p/x")).status, 200, "proxy route, first")
        r = c.request(get("/p/x"))
        eq((r.status, error_code(r)), (429, "rate_limited"), "proxy route, second")
        eq(c.request(get("/a")).status, 200, "aggregate route, first")
        eq(c.request(get("/a")).status, 429, "aggregate route, second")
        eq(s.stats()["requests"] - before, 2, "requests that reached the backend")
        # a streamed proxy body over the limit: refused before the body is read, then closed
        r = c.request(req("POST", "/p/up", body=b"x" * 10))
        eq(r.status, 429, "streamed POST over the limit")
        eq((r.header("Connection") or "").lower(), "close", "its unread body closes the connection")


@rtest
@gwtest.exclusive  # six clients at full speed, and a count a starved worker would skew: alone
def rate_exact_over_a_window():
    """rate 20 per 1000 ms, burst 20, 2 workers, 6 client connections sending
    as fast as they can for about 2 s: the number admitted is burst +
    rate * elapsed, within 2 (one bucket for the whole process). The burst
    is a second's worth: a worker starved for a moment (ThreadSanitizer on a
    busy machine) finds the tokens of that moment still there, where a
    burst of 5 lost those beyond 250 ms and the count came out short."""
    s = Stub()
    burst = 20
    routes = [{"path": "/x", "respond": {"body": {"ok": True}},
               "rate_limit": {"rate": 20, "period_ms": 1000, "burst": burst}}]
    d = Daemon(cfg(s, routes), workers=2)
    conns = [Client(d) for _ in range(6)]
    counts = {200: 0, 429: 0, "other": 0}
    lock = threading.Lock()
    start = threading.Event()
    window = 2.0
    errors = []

    def run(c):
        start.wait()
        try:
            while time.monotonic() < t_end:
                r = c.request(get("/x"))
                with lock:
                    counts[r.status if r.status in (200, 429) else "other"] += 1
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    t_end = t0 + window
    start.set()
    for t in threads:
        t.join(30 * SLOW)
    elapsed = time.monotonic() - t0
    check(not errors, f"client errors: {errors[:3]}")
    eq(counts["other"], 0, "answers other than 200 and 429")
    want = burst + 20 * elapsed
    print(f"# {counts[200]} admitted, {counts[429]} refused in {elapsed:.3f}s; expected {want:.1f}")
    check(counts[429] > 10 * counts[200], f"the clients did not press hard enough: {counts}")
    check(abs(counts[200] - want) <= 2, f"admitted {counts[200]}, expected {want:.1f} +/- 2")


@rtest
def rate_max_keys():
    """max_keys bounds the buckets: a new key in a full table takes the place
    of a bucket that is full again, else it is counted against the shared
    overflow bucket; an active client's bucket is never reset."""
    s = Stub()
    slow = {"rate": 1, "period_ms": 60000, "burst": 1, "key": "header:K", "max_keys": 2}
    fast = {"rate": 1, "period_ms": ms(400), "burst": 1, "key": "header:K", "max_keys": 1}
    routes = [{"path": "/slow", "respond": {"body": {}}, "rate_limit": slow},
              {"path": "/fast", "respond": {"body": {}}, "rate_limit": fast}]
    d = Daemon(cfg(s, routes), workers=2)
    k = lambda v: [("K", v)]  # noqa: E731
    with Client(d) as c:
        eq(status(c, "/slow", k("a")), 200, "a")
        eq(status(c, "/slow", k("b")), 200, "b (the table is full now)")
        eq(status(c, "/slow", k("c")), 200, "c: no room and nothing to evict: the overflow bucket")
        eq(status(c, "/slow", k("d")), 429, "d: the overflow bucket is empty")
        eq(status(c, "/slow", k("a")), 429, "a kept its (empty) bucket")
        eq(status(c, "/slow", k("b")), 429, "b kept its (empty) bucket")
        eq(status(c, "/fast", k("a")), 200, "fast: a")
        time.sleep(1.0 * SLOW)  # a's bucket is full again
        eq(status(c, "/fast", k("b")), 200, "fast: b takes a's place")
        eq(status(c, "/fast", k("b")), 429, "fast: b's own bucket, now empty")
        eq(status(c, "/fast", k("c")), 200, "fast: c, no full bucket to evict: overflow")
        eq(status(c, "/fast", k("d")), 429, "fast: d, overflow empty")


@rtest
def rate_limit_survives_reload():
    """SIGHUP: a route whose rate_limit settings did not change keeps its
    bucket (a reload neither refills nor empties it); a changed one starts full."""
    s = Stub()

    def conf(period_m):
        return cfg(s, [{"path": "/k", "respond": {"body": {}}, "rate_limit": {"rate": 1, "period_ms": 60000}},
                       {"path": "/m", "respond": {"body": {}}, "rate_limit": {"rate": 1, "period_ms": period_m}}])
    d = Daemon(conf(60000), workers=2)
    with Client(d) as c:
        eq([status(c, p) for p in ("/k", "/k", "/m", "/m")], [200, 429, 200, 429], "before the reload")
    c1 = conf(50000)
    c1["listen"] = [f"127.0.0.1:{d.port}"]
    d.reload(c1)
    with Client(d) as c:
        eq(status(c, "/k"), 429, "/k after the reload: the same (empty) bucket")
        eq(status(c, "/m"), 200, "/m after the reload: other settings, a new bucket")


# --- max_inflight ---------------------------------------------------------------------

def inflight_daemon(n, stub, **http):
    routes = [
        {"path": "/p/*", "proxy": {"backend": "s", "strip_prefix": "/p"}},
        {"path": "/a", "calls": [{"name": "slow", "backend": "s", "path": "/slow?delay={query.d}&abort_on_eof=1"}]},
        {"path": "/local", "respond": {"body": {"ok": True}}},
    ]
    c = cfg(stub, routes, max_inflight=n)
    if http:
        c["http"] = http
    return Daemon(c, workers=2)


def expect_exactly(d, s, n, what):
    """n slow requests are admitted (all reach the stub), the next one gets
    503 overloaded at once, and the n complete."""
    delay = ms(1500)
    conns = [Client(d) for _ in range(n)]
    for c in conns:
        c.send(get(f"/p/slow?delay={delay}"))
    s.wait_stats(lambda st: st["in_flight"] >= n, 10, f"{n} slow requests at the stub ({what})")
    with Client(d) as extra:
        t0 = time.monotonic()
        r = extra.request(get("/local"))
        dt = time.monotonic() - t0
        eq(r.status, 503, f"request {n + 1} ({what}): {r.raw[:200]!r}")
        eq(error_code(r), "overloaded", "error code")
        eq(r.header("Retry-After"), "1", "Retry-After")
        check(dt < delay / 1000 / 2, f"the 503 took {dt:.3f}s (the admitted requests take {delay} ms)")
        check((r.header("Connection") or "").lower() != "close", "a 503 keeps the connection")
        for c in conns:
            r = c.read_response()
            eq(r.status, 200, f"an admitted request ({what})")
        eq(extra.request(get("/local")).status, 200, f"the refused connection, once the load is gone ({what})")


@rtest
def inflight_admits_exactly_n():
    """max_inflight 3: three slow requests are admitted, a fourth gets 503
    overloaded at once, the three complete, and the refused connection is
    served afterwards."""
    s = Stub(threads=2)
    d = inflight_daemon(3, s)
    expect_exactly(d, s, 3, "fresh")
    expect_exactly(d, s, 3, "again")


def rst_close(c):
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()


@rtest
def inflight_no_leak_when_clients_die():
    """Requests that end every way but a normal answer give their unit back
    exactly once: clients gone during a proxy request, an aggregate call or a
    streamed upload, a request body that times out (408), a refused request;
    afterwards the limit still admits exactly N."""
    s = Stub(threads=2)
    n = 3
    d = inflight_daemon(n, s, client_body_timeout_ms=ms(300))
    slow = ms(20000)
    for cycle in range(4):
        victims = []
        c = Client(d)
        c.send(get(f"/p/slow?delay={slow}&abort_on_eof=1"))
        victims.append(c)
        c = Client(d)
        c.send(get(f"/a?d={slow}"))
        victims.append(c)
        c = Client(d)
        c.send(b"POST /p/up?abort_on_eof=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"u" * 1000)
        victims.append(c)
        s.wait_stats(lambda st: st["in_flight"] >= n, 10, f"cycle {cycle}: {n} requests at the stub")
        # refused while full: these must not take (or give back) a unit
        for _ in range(5):
            with Client(d) as x:
                eq(x.request(get("/p/y")).status, 503, f"cycle {cycle}: refused while full")
        for i, c in enumerate(victims):
            if (i + cycle) % 2:
                rst_close(c)
            else:
                c.close()
        s.wait_stats(lambda st: st["in_flight"] == 0, 10, f"cycle {cycle}: cancelled upstream requests")
        # a body that stops coming: 408 after client_body_timeout_ms
        with Client(d) as c:
            c.send(b"POST /p/up2?abort_on_eof=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"u" * 10)
            r = c.read_response()
            eq(r.status, 408, f"cycle {cycle}: a stalled upload ({r.raw[:200]!r})")
        s.wait_stats(lambda st: st["in_flight"] == 0, 10, f"cycle {cycle}: stalled upload cancelled")
    expect_exactly(d, s, n, "after the clients died")


if __name__ == "__main__":
    if not os.access(tp.GW_STUB, os.X_OK):
        print(f"FAIL - setup: GW_STUB={tp.GW_STUB} is not an executable file")
        print("0 passed, 1 failed")
        sys.exit(1)
    sys.exit(main())
