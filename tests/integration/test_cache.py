#!/usr/bin/env python3
"""Integration tests of the cache and the coalescing of aggregate calls
(README "Caching and coalescing"): the real daemon in front of the stub
backend. What reached the backend is read from the stub's request log
(tag=NAME in the call's path, GET /log?tag=NAME), what gatherd did from its
answers (Server-Timing desc, Age, X-Gateway-Completed, _errors) and from
/metrics and /status.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_cache.py [NAME-SUBSTRING ...]
"""

import json
import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, check, contains, eq, main, req  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_agg as ta  # noqa: E402
gwtest._TESTS[:] = _saved_tests

tp = ta.tp
ms = tp.ms
ctest = tp.ptest
Stub = tp.Stub
get = ta.get


# --- helpers ----------------------------------------------------------------------------

def backend_count(stub, tag):
    """Requests the stub logged under tag (what reached the backend)."""
    return stub.get(f"/log?tag={tag}").json()["count"]


def cache_daemon(stub, calls, workers=1, cache=None, errors=True, backends=None, deadline_ms=None, path="/c/{id}",
                 extra_routes=None):
    r = ta.route(path, calls, errors=errors)
    if deadline_ms:
        r["deadline_ms"] = deadline_ms
    bs = {"s": tp.backend(stub.url)}
    bs.update(backends or {})
    top = {}
    if cache is not None:
        top["cache"] = cache
    return Daemon(tp.config(bs, routes=[r] + (extra_routes or []), **top), workers=workers)


def timing_desc(r, call="u"):
    """The desc of call's Server-Timing entry, or None."""
    st = r.header("Server-Timing") or ""
    m = re.search(re.escape(call) + r';dur=[0-9.]+(?:;desc="([^"]*)")?', st)
    check(m, f"no {call} in Server-Timing {st!r}")
    return m.group(1)


def metrics_text(d):
    with gwtest.Conn("127.0.0.1", d.admin_port) as c:
        return c.request(req("GET", "/metrics", host="admin")).body.decode()


def metric(d, name, text=None):
    text = text if text is not None else metrics_text(d)
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+]+)$", text, re.M)
    check(m, f"no {name} in /metrics")
    return float(m.group(1))


def status_calls(d, route="/c/{id}"):
    with gwtest.Conn("127.0.0.1", d.admin_port) as c:
        j = c.request(req("GET", "/status", host="admin", headers={"Accept": "application/json"})).json()
    for rt in j["routes"]:
        if rt["path"] == route:
            return {c["name"]: c for c in rt["calls"]}
    raise gwtest.TestFailure(f"no route {route} in /status")


def user_call(tag, name="u", delay=0, cache=None, **kw):
    path = "/users/{id}?tag=" + tag + (f"&delay={delay}" if delay else "")
    c = ta.call(name, path, **kw)
    if cache is not None:
        c["cache"] = cache
    return c


def parallel(d, paths, headers=None, timeout=30.0):
    """Sends every path at once, each on its own connection; returns the responses in order."""
    out = [None] * len(paths)
    errs = []
    socks = []
    for p in paths:  # connect everything first, so the requests really arrive together
        socks.append(tp.Client(d, timeout=timeout))
    go = threading.Event()

    def one(k):
        try:
            go.wait()
            out[k] = socks[k].request(req("GET", paths[k], headers=headers))
        except Exception as e:  # pragma: no cover - reported below
            errs.append(repr(e))

    ts = [threading.Thread(target=one, args=(k,)) for k in range(len(paths))]
    for t in ts:
        t.start()
    go.set()
    for t in ts:
        t.join(timeout * SLOW + 5)
    for s in socks:
        s.close()
    check(not errs, f"requests failed: {errs[:3]}")
    return out


# --- hits, misses, ttl --------------------------------------------------------------------

@ctest
def cache_hit_and_miss_counted_by_the_backend():
    s = Stub()
    d = cache_daemon(s, [user_call("hm", cache={"ttl_ms": ms(60000)})])
    r, _ = get(d, "/c/1")
    j = ta.ok_json(r)
    eq(j["u"]["id"], 1, "answer")
    eq(timing_desc(r), None, "first: a miss")
    eq(r.header("Age"), None, "no Age on an answer not from the cache")
    for k in range(5):
        r, _ = get(d, "/c/1")
        eq(ta.ok_json(r), j, f"hit {k}")
        eq(timing_desc(r), "cache-hit", "desc")
        check(r.header("Age") is not None and int(r.header("Age")) >= 0, "Age on a hit")
    eq(backend_count(s, "hm"), 1, "backend calls for 6 requests of one key")
    r, _ = get(d, "/c/2")
    eq(ta.ok_json(r)["u"]["id"], 2, "another id")
    eq(backend_count(s, "hm"), 2, "a different path is a different key")
    text = metrics_text(d)
    eq(metric(d, "gatherd_cache_hits_total", text), 5, "hits")
    eq(metric(d, "gatherd_cache_misses_total", text), 2, "misses")
    eq(metric(d, 'gatherd_cache_hits_total{route="/c/{id}",call="u"}', text), 5, "hits of the call")
    eq(metric(d, "gatherd_cache_entries", text), 2, "entries")
    check(metric(d, "gatherd_cache_bytes", text) > 0, "bytes")
    st = status_calls(d)["u"]["cache"]
    eq((st["hits"], st["misses"], st["entries"], st["stored"]), (5, 2, 2, 2), f"/status cache {st}")
    eq(st["settings"]["ttl_ms"], ms(60000), "settings in /status")


@ctest
def cache_ttl_expiry():
    s = Stub()
    ttl = ms(400)
    d = cache_daemon(s, [user_call("ttl", cache={"ttl_ms": ttl})])
    get(d, "/c/1")
    r, _ = get(d, "/c/1")
    eq(timing_desc(r), "cache-hit", "within the ttl")
    eq(backend_count(s, "ttl"), 1, "one backend call")
    time.sleep(ttl / 1000.0 + 0.1)
    r, _ = get(d, "/c/1")
    eq(timing_desc(r), None, "past the ttl: the backend again")
    eq(backend_count(s, "ttl"), 2, "backend calls after the ttl")
    r, _ = get(d, "/c/1")
    eq(timing_desc(r), "cache-hit", "stored again")


@ctest
def cache_control_no_store_private_and_max_age():
    s = Stub()
    cc = lambda v: "&header=" + tp.q(x="Cache-Control:" + v)[2:]  # noqa: E731
    calls = [
        ta.call("ns", "/users/{id}?tag=ns" + cc("no-store")),
        ta.call("pv", "/users/{id}?tag=pv" + cc("private, max-age=600")),
        ta.call("nc", "/users/{id}?tag=nc" + cc("no-cache")),
        ta.call("m1", "/users/{id}?tag=m1" + cc("public, max-age=1")),
        ta.call("sm", "/users/{id}?tag=sm" + cc("max-age=600, s-maxage=1")),
        ta.call("ig", "/users/{id}?tag=ig" + cc("max-age=1")),
        ta.call("m0", "/users/{id}?tag=m0" + cc("max-age=0")),
    ]
    for c in calls:
        c["cache"] = {"ttl_ms": 60000}
    calls[5]["cache"]["honor_cache_control"] = False
    d = cache_daemon(s, calls)
    for k in range(3):
        ta.ok_json(get(d, "/c/1")[0])
    got = {t: backend_count(s, t) for t in ("ns", "pv", "nc", "m1", "sm", "ig", "m0")}
    eq(got, {"ns": 3, "pv": 3, "nc": 3, "m1": 1, "sm": 1, "ig": 1, "m0": 3}, "backend calls of 3 requests")
    time.sleep(1.2)
    ta.ok_json(get(d, "/c/1")[0])
    got = {t: backend_count(s, t) for t in ("m1", "sm", "ig")}
    eq(got, {"m1": 2, "sm": 2, "ig": 1}, "max-age=1 / s-maxage=1 shorten the ttl, unless not honoured")


@ctest
def cache_key_isolates_clients_and_queries():
    s = Stub()
    calls = [ta.call("u", "/users/{id}?tag=ki&q={query.q}&echo=1", headers={"Authorization": "{header.Authorization}"},
                     cache={"ttl_ms": ms(60000)}),
             ta.call("f", "/users/{id}?tag=kf&echo=1", forward_headers=["Cookie"], cache={"ttl_ms": ms(60000)})]
    d = cache_daemon(s, calls)

    def ask(auth, q="1", cookie="c=1"):
        r, _ = get(d, f"/c/7?q={q}", headers={"Authorization": auth, "Cookie": cookie})
        return ta.ok_json(r)

    a1 = ask("Bearer alice")
    b1 = ask("Bearer bob")
    eq(a1["u"]["headers"].get("authorization"), "Bearer alice", "alice's call carries her token")
    eq(b1["u"]["headers"].get("authorization"), "Bearer bob", "bob never gets alice's answer")
    eq(backend_count(s, "ki"), 2, "two clients, two backend calls")
    a2 = ask("Bearer alice")
    eq(a2["u"]["headers"].get("authorization"), "Bearer alice", "alice's answer from the cache")
    eq(backend_count(s, "ki"), 2, "alice again: a hit")
    ask("Bearer alice", q="2")
    eq(backend_count(s, "ki"), 3, "a different query parameter is a different key")
    # forwarded headers: the Cookie is part of the key, whatever else differs
    eq(backend_count(s, "kf"), 1, "one cookie so far")
    r = ask("Bearer carol", cookie="c=2")
    eq(r["f"]["headers"].get("cookie"), "c=2", "the second cookie's own answer")
    eq(backend_count(s, "kf"), 2, "a different cookie is a different key")
    # gatherd's own headers (X-Request-Id, X-Forwarded-For) are not: the same request twice is a hit
    r1 = ask("Bearer alice")
    eq(r1["u"]["headers"].get("x-request-id"), a1["u"]["headers"].get("x-request-id"),
       "a hit is the stored answer (its request id is the first request's)")


# --- coalescing ------------------------------------------------------------------------------

def _coalesce_100(cache):
    s = Stub()
    c = user_call("co", delay=ms(600))
    if cache:
        c["cache"] = {"ttl_ms": ms(60000)}
    else:
        c["coalesce"] = True
    d = cache_daemon(s, [c], workers=2)
    rs = parallel(d, ["/c/3"] * 100)
    bodies = set()
    descs = {}
    for r in rs:
        bodies.add(json.dumps(ta.ok_json(r), sort_keys=True))
        k = timing_desc(r)
        descs[k] = descs.get(k, 0) + 1
    eq(len(bodies), 1, "every client got the same answer")
    eq(backend_count(s, "co"), 1, "backend calls for 100 identical requests in flight")
    eq(descs.get(None, 0), 1, f"one leader (Server-Timing descs {descs})")
    eq(descs.get("coalesced", 0) + descs.get("cache-hit", 0), 99, f"followers (descs {descs})")
    eq(metric(d, "gatherd_cache_coalesced_total") + metric(d, "gatherd_cache_hits_total"), 99, "coalesced + hits")
    return s, d


@ctest
def cache_coalesces_100_concurrent_requests_across_workers():
    s, d = _coalesce_100(cache=True)
    # the key is stored: a later request is a hit
    r, _ = get(d, "/c/3")
    eq(timing_desc(r), "cache-hit", "after the flight")
    eq(backend_count(s, "co"), 1, "still one backend call")


@ctest
def coalesce_without_cache():
    s, d = _coalesce_100(cache=False)
    # nothing is stored: the next request goes to the backend again
    r, _ = get(d, "/c/3")
    eq(timing_desc(r), None, "a new flight")
    eq(backend_count(s, "co"), 2, "coalesce alone stores nothing")
    eq(metric(d, "gatherd_cache_entries"), 0, "no entries")


@ctest
def coalesce_followers_leave_and_the_request_goes_on():
    """A follower whose client leaves is removed; one whose deadline passes
    fails with timeout; the shared request goes on and its answer is stored."""
    s = Stub()
    d = cache_daemon(s, [user_call("lv", delay=ms(800), cache={"ttl_ms": ms(60000)})], workers=2,
                     deadline_ms=ms(300))
    gone = [tp.Client(d) for _ in range(5)]
    for c in gone:
        c.send(req("GET", "/c/4"))
    time.sleep(0.1)
    for c in gone:
        c.close()
    r, _ = get(d, "/c/4")
    eq(ta.ok_json(r, completed=False)["_errors"]["u"]["code"], "timeout", "a follower past its deadline")
    r, _ = get(d, "/c/4")
    time.sleep(ms(800) / 1000.0)
    r, _ = get(d, "/c/4")
    eq(timing_desc(r), "cache-hit", "the shared request stored its answer although its clients left")
    eq(backend_count(s, "lv"), 1, "one backend call")


# --- stale answers ---------------------------------------------------------------------------

@ctest
def cache_stale_while_revalidate():
    s = Stub()
    ttl = ms(1000)
    d = cache_daemon(s, [user_call("swr", delay=ms(400),
                                   cache={"ttl_ms": ttl, "stale_while_revalidate_ms": ms(30000)})], workers=2)
    get(d, "/c/1")
    eq(backend_count(s, "swr"), 1, "first")
    time.sleep(ttl / 1000.0 + 0.1)
    rs = parallel(d, ["/c/1"] * 10)
    for r in rs:
        ta.ok_json(r)
        eq(timing_desc(r), "stale", "served stale")
        check(int(r.header("Age")) >= 0, "Age")
    for r in rs:
        check(float(re.search(r"total;dur=([0-9.]+)", r.header("Server-Timing")).group(1)) < ms(300),
              "stale answers are served at once, not after the backend's delay")
    deadline = time.monotonic() + 5 * SLOW
    while backend_count(s, "swr") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(ms(400) / 1000.0 + 0.15)  # the stub logs a request as it arrives; its answer is 400 ms later
    r, _ = get(d, "/c/1")
    eq(timing_desc(r), "cache-hit", "refreshed")
    eq(backend_count(s, "swr"), 2, "exactly one background refresh reached the backend")
    eq(metric(d, "gatherd_cache_refreshes_total"), 1, "refreshes")
    eq(metric(d, "gatherd_cache_stale_total"), 10, "stale served")


def _stale_if_error(breaker):
    s = Stub()
    ttl = ms(300)
    b = tp.backend(s.url)
    if breaker:
        b["circuit_breaker"] = {"consecutive_failures": 1, "open_ms": 60000}
    d = Daemon(tp.config({"s": b}, routes=[ta.route("/c/{id}", [
        user_call("sie", cache={"ttl_ms": ttl, "stale_if_error_ms": ms(60000)}),
        user_call("req", name="other", cache={"ttl_ms": ttl})], errors=True)]), workers=2)
    j0 = ta.ok_json(get(d, "/c/1")[0])
    s.close()
    time.sleep(ttl / 1000.0 + 0.1)
    codes = []
    for k in range(3):
        r, _ = get(d, "/c/1")
        j = ta.ok_json(r, completed=False, what=f"request {k}")
        eq(j["u"], j0["u"], "the old answer in place of the failure")
        e = j["_errors"]["u"]
        eq(e["code"], "stale", "_errors code")
        check(isinstance(e["age_ms"], int) and e["age_ms"] >= ttl, f"age_ms {e}")
        eq(timing_desc(r), "stale", "Server-Timing")
        check("other" not in j and j["_errors"]["other"]["code"] in ("connect_failed", "circuit_open"),
              "a call without stale_if_error fails as before")
        codes.append(j["_errors"]["other"]["code"])
        check(int(r.header("Age")) >= 0, "Age")
    eq(metric(d, "gatherd_cache_stale_if_error_total"), 3, "stale_if_error served")
    return d, codes


@ctest
def cache_stale_if_error_when_the_backend_is_down():
    _, codes = _stale_if_error(breaker=False)
    eq(set(codes), {"connect_failed"}, "the other call's failures")


@ctest
def cache_stale_if_error_when_the_breaker_is_open():
    d, codes = _stale_if_error(breaker=True)
    eq(codes[-1], "circuit_open", "the breaker is open by the last request")
    contains(metrics_text(d), 'gatherd_breaker_state{backend="s"} 1', "breaker open")


# --- backends of several servers ----------------------------------------------------------

def _servers(urls, **kw):
    """A backend of the servers at urls (Stubs or URLs)."""
    b = {"servers": [u if isinstance(u, str) else u.url for u in urls], "connect_timeout_ms": ms(1000),
         "timeout_ms": ms(5000)}
    b.update(kw)
    return b


def _host_of(j, call="u"):
    """The Host an echo=1 call's server got (its host:port): which server answered."""
    return j[call]["headers"]["host"]


@ctest
def cache_fetch_goes_to_the_next_server_when_one_refuses():
    """A cached call to a backend of two servers, one refusing connections:
    every fetch ends on the live server (the exchange's next-server retry),
    with that server's Host, and is stored; the hits that follow reach no
    server. Round robin sends about half of the first tries to the dead
    one: retried, never failed."""
    s = Stub()
    dead = f"http://127.0.0.1:{tp.closed_port()}"
    d = cache_daemon(s, [ta.call("u", "/users/{id}?echo=1&tag=nx", backend="c", cache={"ttl_ms": ms(60000)})],
                     backends={"c": _servers([dead, s])})
    ids = range(1, 9)
    for i in ids:
        r, _ = get(d, f"/c/{i}")
        j = ta.ok_json(r, what=f"id {i}")
        eq(_host_of(j), f"127.0.0.1:{s.port}", f"the live server answered id {i}, with its own Host")
        eq(j["u"]["path"], f"/users/{i}", "the path")
    eq(backend_count(s, "nx"), len(ids), "one fetch per id reached the live server")
    for i in ids:
        r, _ = get(d, f"/c/{i}")
        eq(timing_desc(r), "cache-hit", f"id {i} again: a hit")
        eq(_host_of(ta.ok_json(r)), f"127.0.0.1:{s.port}", "the stored answer")
    eq(backend_count(s, "nx"), len(ids), "the hits reached no server")
    text = metrics_text(d)
    check(metric(d, 'gatherd_backend_retries_total{backend="c"}', text) >= 1,
          "some fetches tried the dead server first and went on to the next")
    eq(metric(d, "gatherd_cache_misses_total", text), len(ids), "misses")


@ctest
def cache_fetch_of_a_hash_balanced_backend_goes_to_the_keys_server():
    """hash over {header.X-User}: a cached call's fetch goes to the server
    its key picks, as an uncached call of the same request does (the fetch
    carries the hash of the request that started it); both servers get
    keys, and a hit reaches neither."""
    s = [Stub() for _ in range(2)]
    b = _servers(s, balance="hash", hash_key="{header.X-User}")
    hdr = {"X-User": "{header.X-User}"}  # in the request, so in the cache key: one entry per user
    plain = ta.route("/n/{id}", [ta.call("u", "/users/{id}?echo=1&tag=hn", backend="c", headers=hdr)], errors=True)
    d = cache_daemon(s[0], [ta.call("u", "/users/{id}?echo=1&tag=hc", backend="c", headers=hdr,
                                    cache={"ttl_ms": ms(60000)})],
                     backends={"c": b}, workers=2, extra_routes=[plain])
    keys = [f"user-{i}" for i in range(40)]
    cached, uncached = {}, {}
    for k in keys:
        r, _ = get(d, "/c/1", headers={"X-User": k})
        cached[k] = _host_of(ta.ok_json(r, what=f"cached {k}"))
        r, _ = get(d, "/n/1", headers={"X-User": k})
        uncached[k] = _host_of(ta.ok_json(r, what=f"uncached {k}"))
    eq(cached, uncached, "each key's fetch went to the server an uncached call of it goes to")
    per = {h: sum(1 for v in cached.values() if v == h) for h in set(cached.values())}
    print(f"# hash placement of cached fetches: {per}")
    eq(len(per), 2, f"both servers got keys: {per}")
    n = backend_count(s[0], "hc") + backend_count(s[1], "hc")
    eq(n, len(keys), "one fetch per key")
    for k in keys[:10]:
        r, _ = get(d, "/c/1", headers={"X-User": k})
        eq(timing_desc(r), "cache-hit", f"{k} again: a hit")
        eq(_host_of(ta.ok_json(r)), cached[k], f"{k}: the stored answer")
    eq(backend_count(s[0], "hc") + backend_count(s[1], "hc"), len(keys), "the hits reached no server")


@ctest
def cache_no_healthy_server_goes_to_the_waiters_or_stale_if_error():
    """Both servers of the backend die and outlier detection ejects them:
    a key with an old answer gets it (stale_if_error), a key without one
    fails with no_healthy_server, at once (no try is sent)."""
    s = [Stub() for _ in range(2)]
    ttl = ms(300)
    b = _servers(s, outlier_detection={"consecutive_failures": 1, "eject_ms": ms(60000), "max_ejected_percent": 100})
    d = cache_daemon(s[0], [ta.call("u", "/users/{id}?tag=nh", backend="c",
                                    cache={"ttl_ms": ttl, "stale_if_error_ms": ms(60000)})],
                     backends={"c": b})
    j0 = ta.ok_json(get(d, "/c/1")[0])
    for st in s:
        st.close()
    time.sleep(ttl / 1000.0 + 0.1)
    r, _ = get(d, "/c/1")  # its fetch tries both servers, which ejects them
    j = ta.ok_json(r, completed=False, what="the stale key")
    eq(j["u"], j0["u"], "the old answer in place of the failure")
    eq(j["_errors"]["u"]["code"], "stale", "_errors")
    t0 = time.monotonic()
    r, _ = get(d, "/c/2")
    dt = time.monotonic() - t0
    eq(r.status, 200, f"an optional call: {r.raw[:300]!r}")
    eq(r.json()["_errors"]["u"]["code"], "no_healthy_server", "a key without an answer: the fetch's failure")
    check(dt < 0.5 * SLOW, f"answered at once ({dt:.3f} s)")
    r, _ = get(d, "/c/1")
    eq(ta.ok_json(r, completed=False, what="the stale key again")["_errors"]["u"]["code"], "stale",
       "no_healthy_server gives the old answer too")
    check(metric(d, "gatherd_cache_stale_if_error_total") >= 2, "stale_if_error served")


# --- memory, reload, configuration ---------------------------------------------------------

@ctest
def cache_memory_bound_under_unique_keys():
    s = Stub()
    max_bytes = 40000
    d = cache_daemon(s, [ta.call("u", "/users/{id}?tag=mb&size=2000", cache={"ttl_ms": 60000})],
                     cache={"max_bytes": max_bytes})
    peak = 0
    for k in range(60):
        ta.ok_json(get(d, f"/c/{k}")[0])
        if k % 5 == 4:
            b = metric(d, "gatherd_cache_bytes")
            peak = max(peak, b)
            check(b <= max_bytes, f"cache bytes {b} over max_bytes {max_bytes}")
    text = metrics_text(d)
    check(metric(d, "gatherd_cache_evictions_total", text) >= 40, "evictions counted")
    check(peak > max_bytes / 2, f"the cache was used (peak {peak})")
    # least recently used first: the newest key is still there, the oldest gone
    before = backend_count(s, "mb")
    r, _ = get(d, "/c/59")
    eq(timing_desc(r), "cache-hit", "the newest entry")
    r, _ = get(d, "/c/0")
    eq(timing_desc(r), None, "the oldest entry was evicted")
    eq(backend_count(s, "mb"), before + 1, "backend calls")
    # an answer larger than max_bytes / 8 is never stored
    d2 = cache_daemon(s, [ta.call("u", "/users/{id}?tag=big&size=6000", cache={"ttl_ms": 60000})],
                      cache={"max_bytes": max_bytes})
    get(d2, "/c/1")
    get(d2, "/c/1")
    eq(backend_count(s, "big"), 2, "an answer over max_bytes/8 is not stored")
    eq(metric(d2, "gatherd_cache_entries"), 0, "no entry")


@ctest
def cache_reload_keeps_unchanged_calls_and_drops_changed_ones():
    s = Stub()

    def cfg(ttl_b, port="PORT"):
        return tp.config({"s": tp.backend(s.url)}, routes=[ta.route("/c/{id}", [
            user_call("ra", name="a", cache={"ttl_ms": 60000}),
            user_call("rb", name="b", cache={"ttl_ms": ttl_b})])], listen=[f"127.0.0.1:{port}"])

    d = Daemon(cfg(60000), workers=2)
    ta.ok_json(get(d, "/c/1")[0])
    eq((backend_count(s, "ra"), backend_count(s, "rb")), (1, 1), "first")
    d.reload(cfg(50000, d.port))
    r, _ = get(d, "/c/1")
    ta.ok_json(r)
    eq(timing_desc(r, "a"), "cache-hit", "unchanged call: its entry kept")
    eq(timing_desc(r, "b"), None, "changed call: its entries dropped")
    eq((backend_count(s, "ra"), backend_count(s, "rb")), (1, 2), "after the reload")
    st = status_calls(d)
    eq(st["a"]["cache"]["hits"], 1, "the kept call's counters carry over")
    eq(st["b"]["cache"]["misses"], 1, "the changed call counts afresh")


@ctest
def cache_config_errors():
    cases = [
        ({"cache": {"ttl_ms": 0}}, "cache: ttl_ms: must be between 1"),
        ({"cache": {"bogus": 1}}, 'unknown key "bogus"'),
        ({"cache": 5}, "cache: must be an object"),
        ({"coalesce": "yes"}, "coalesce: must be true or false"),
        ({"method": "POST", "cache": {}}, "needs method GET"),
        ({"cache": {}, "coalesce": False}, "coalesce: cannot be false"),
        ({"body": "forward", "cache": {}}, "body"),
    ]
    for extra, want in cases:
        c = ta.call("u", "/users/{id}")
        c.update(extra)
        cfg = tp.config({"s": "http://127.0.0.1:1"}, routes=[ta.route("/c/{id}", [c])], listen=["127.0.0.1:1"])
        with gwtest.TempDir() as t:
            rc, out, err = gwtest.run_cli(["-t", "-c", t.write("g.json", cfg)])
        check(rc != 0, f"{extra}: accepted")
        contains(err + out, want, f"error for {extra}")
        contains(err + out, "routes[0].calls[0]", "the place")
    cfg = tp.config({"s": "http://127.0.0.1:1"}, routes=[], cache={"max_bytes": "x"}, listen=["127.0.0.1:1"])
    with gwtest.TempDir() as t:
        rc, out, err = gwtest.run_cli(["-t", "-c", t.write("g.json", cfg)])
    check(rc != 0, "cache.max_bytes must be a number")
    contains(err + out, "cache.max_bytes", "the place")


if __name__ == "__main__":
    sys.exit(main())
