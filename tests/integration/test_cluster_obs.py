#!/usr/bin/env python3
"""Integration tests of the observability of upstream clusters (README
"Admin listener"): the gatherd_upstream_server_* families of /metrics, the
"servers" of each backend in /status and the page's Servers table, against
the real daemon and three stubs (tests/stub/gw_stub: X-Stub-Port on an
answer names the stub that gave it; /healthz answers what /__health/NNN
set, so one path through gatherd makes one server answer 503).

Exact counts: a server's requests_total must equal the requests its stub
saw (no health checks on those backends: a check is a request too), its
failures by code what the test provoked, its connections what the stub
counts open.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_cluster_obs.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Conn, Daemon, Skip, TestFailure, check, eq, main, req  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_admin as ta  # noqa: E402
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

otest = tp.ptest  # stubs made during a test are closed after it
Stub = tp.Stub
ms = tp.ms

SERVER_FAMILIES = {
    "gatherd_upstream_server_requests_total": "counter",
    "gatherd_upstream_server_failures_total": "counter",
    "gatherd_upstream_server_in_flight": "gauge",
    "gatherd_upstream_server_healthy": "gauge",
    "gatherd_upstream_server_ejected": "gauge",
    "gatherd_upstream_server_ejections_total": "counter",
    "gatherd_upstream_server_health_checks_total": "counter",
    "gatherd_upstream_server_weight": "gauge",
    "gatherd_upstream_server_backup": "gauge",
    "gatherd_upstream_server_connections": "gauge",
}


# --- helpers -------------------------------------------------------------------

def get(d, path):
    """One request on a connection of its own."""
    with Conn(d.host, d.port) as c:
        return c.request(req("GET", path))


def unescape(v):
    """A label value as the text format escapes it, back to the string."""
    return re.sub(r'\\(.)', lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def scrape(d):
    """/metrics parsed strictly (test_admin's parser), label values unescaped,
    and the types of its families."""
    r = ta.admin_get(d, "/metrics")
    eq(r.status, 200, "/metrics status")
    samples, types = ta.parse_prometheus(r.body.decode())
    out = {}
    for (name, labels), v in samples.items():
        out[(name, frozenset((k, unescape(x)) for k, x in labels))] = v
    return out, types


def m(s, name, **labels):
    return s.get((name, frozenset(labels.items())))


def server_series(s, name, backend, server):
    """{other labels: value} of one server's series of a family."""
    out = {}
    for (n, labels), v in s.items():
        d = dict(labels)
        if n == name and d.get("backend") == backend and d.get("server") == server:
            del d["backend"], d["server"]
            out[tuple(sorted(d.items()))] = v
    return out


def failures(s, backend, server):
    return {dict(k)["code"]: v for k, v in server_series(s, "gatherd_upstream_server_failures_total", backend,
                                                          server).items()}


def status_servers(d, backend):
    st = ta.admin_get(d, "/status").json()
    b = next((x for x in st["backends"] if x["name"] == backend), None)
    check(b is not None, f"backend {backend} in /status")
    return b, {x["label"]: x for x in b["servers"]}


def wait_for(cond, within_s, what):
    deadline = time.monotonic() + within_s * SLOW
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TestFailure(f"{what}: not within {within_s * SLOW:.1f} s")
        time.sleep(0.05)


def backend(servers, **opts):
    b = {"servers": servers, "connect_timeout_ms": ms(1000), "timeout_ms": ms(10000)}
    b.update(opts)
    return b


def check_status_matches_metrics(d, backend_name):
    """Every field of /status's servers against the same server's series,
    with nothing running (so the two reads see the same numbers)."""
    s, _ = scrape(d)
    b, servers = status_servers(d, backend_name)
    for label, x in servers.items():
        what = f"backend {backend_name} server {label}"
        eq(x["requests"], m(s, "gatherd_upstream_server_requests_total", backend=backend_name, server=label),
           f"{what}: requests")
        eq(x["failures"], failures(s, backend_name, label), f"{what}: failures")
        eq(x["in_flight"], m(s, "gatherd_upstream_server_in_flight", backend=backend_name, server=label),
           f"{what}: in_flight")
        eq(int(x["healthy"]), m(s, "gatherd_upstream_server_healthy", backend=backend_name, server=label),
           f"{what}: healthy")
        eq(int(x["ejected"]), m(s, "gatherd_upstream_server_ejected", backend=backend_name, server=label),
           f"{what}: ejected")
        eq(x["weight"], m(s, "gatherd_upstream_server_weight", backend=backend_name, server=label), f"{what}: weight")
        eq(int(x["backup"]), m(s, "gatherd_upstream_server_backup", backend=backend_name, server=label),
           f"{what}: backup")
        for state in ("open", "idle"):
            eq(x["connections"][state], m(s, "gatherd_upstream_server_connections", backend=backend_name,
                                          server=label, state=state), f"{what}: connections {state}")
    return s, b, servers


# --- tests ---------------------------------------------------------------------

@otest
def cluster_obs_requests_per_server_equal_what_each_stub_saw():
    """Proxied requests and aggregate calls over three servers (two workers):
    each server's requests_total is exactly its stub's count, nothing failed,
    /status says the same, and with nothing running every open connection
    is idle and the stub sees as many open."""
    stubs = [Stub(), Stub(), Stub()]
    by_port = {st.port: st for st in stubs}
    cfg = tp.config({"c": backend([stubs[0].url, {"url": stubs[1].url, "weight": 2}, stubs[2].url])},
                    routes=[{"path": "/p/*", "proxy": {"backend": "c", "strip_prefix": "/p"}},
                            {"path": "/agg", "calls": [{"name": "x", "backend": "c", "path": "/users/1"},
                                                       {"name": "y", "backend": "c", "path": "/users/2"}]}])
    d = Daemon(cfg, workers=2)
    answered = {}
    for i in range(24):
        r = get(d, f"/p/users/{i}")
        eq(r.status, 200, "proxied answer")
        port = int(r.header("X-Stub-Port"))
        check(port in by_port, f"X-Stub-Port {port} is one of the stubs")
        answered[port] = answered.get(port, 0) + 1
    for _ in range(10):
        eq(get(d, "/agg").status, 200, "aggregate answer")
    s, types = scrape(d)
    for fam, typ in SERVER_FAMILIES.items():
        eq(types.get(fam), typ, f"family {fam}")
    total = 0
    for st in stubs:
        saw = st.stats()["requests"]
        got = m(s, "gatherd_upstream_server_requests_total", backend="c", server=st.hostport)
        eq(got, saw, f"server {st.hostport}: requests_total vs what the stub saw")
        check(answered.get(st.port, 0) <= saw, f"server {st.hostport}: proxied answers it gave")
        eq(failures(s, "c", st.hostport), {}, f"server {st.hostport}: no failures")
        eq(m(s, "gatherd_upstream_server_in_flight", backend="c", server=st.hostport), 0, "in flight")
        eq(m(s, "gatherd_upstream_server_healthy", backend="c", server=st.hostport), 1, "healthy (no checks)")
        eq(m(s, "gatherd_upstream_server_ejected", backend="c", server=st.hostport), 0, "not ejected")
        eq(m(s, "gatherd_upstream_server_ejections_total", backend="c", server=st.hostport), 0, "no ejections")
        eq(server_series(s, "gatherd_upstream_server_health_checks_total", "c", st.hostport), {},
           "no health_checks_total series without health_check")
        eq(m(s, "gatherd_upstream_server_backup", backend="c", server=st.hostport), 0, "backup")
        total += saw
    eq(total, 24 + 2 * 10, "every try counted once")
    eq(m(s, "gatherd_upstream_server_weight", backend="c", server=stubs[1].hostport), 2, "weight")
    eq(m(s, "gatherd_upstream_server_weight", backend="c", server=stubs[0].hostport), 1, "default weight")
    # weights 1, 2, 1 under smooth round robin: every worker sends twice as
    # many to the second server (each worker's sequence is its own)
    check(m(s, "gatherd_upstream_server_requests_total", backend="c", server=stubs[1].hostport) >
          m(s, "gatherd_upstream_server_requests_total", backend="c", server=stubs[0].hostport),
          "the weight-2 server got more")

    # connections: nothing runs, so every open connection is idle, and the
    # stub counts as many open (a close reaches it a moment later: wait)
    def conns_settled():
        s2, _ = scrape(d)
        ok = True
        for st in stubs:
            o = m(s2, "gatherd_upstream_server_connections", backend="c", server=st.hostport, state="open")
            i = m(s2, "gatherd_upstream_server_connections", backend="c", server=st.hostport, state="idle")
            ok = ok and o == i and o == st.stats()["open_connections"] and o >= 1
        return ok
    wait_for(conns_settled, 3, "open == idle == the stub's open connections, for every server")
    s, b, servers = check_status_matches_metrics(d, "c")
    eq(b["balance"], "round_robin", "balance")
    eq([x["label"] for x in b["servers"]], [st.hostport for st in stubs], "servers in configuration order")
    eq([x["url"] for x in b["servers"]], [st.url for st in stubs], "server urls")
    eq(servers[stubs[0].hostport]["ejected_ms_left"], 0, "ejected_ms_left when not ejected")
    # the backend-wide gauge is the sum of its servers'
    eq(m(s, "gatherd_upstream_connections", backend="c", state="idle"),
       sum(m(s, "gatherd_upstream_server_connections", backend="c", server=st.hostport, state="idle")
           for st in stubs), "backend idle = sum of its servers' idle")


@otest
def cluster_obs_failures_by_code():
    """A server whose port is closed counts connect_failed for each try (each
    one then goes to another server); a server that answers 503 counts
    bad_status, once per answer the client got as 503; the good server
    counts only requests."""
    good, bad = Stub(), Stub()
    dead = tp.closed_port()
    bad.get("/__health/503")  # its /healthz answers 503 from now on
    cfg = tp.config({"f": backend([good.url, f"http://127.0.0.1:{dead}", bad.url])},
                    routes=[{"path": "/f/*", "proxy": {"backend": "f", "strip_prefix": "/f"}},
                            {"path": "/agg", "calls": [{"name": "h", "backend": "f", "path": "/healthz",
                                                        "fallback": None}]}])
    d = Daemon(cfg, workers=1)
    statuses = []
    for _ in range(9):
        statuses.append(get(d, "/f/healthz").status)
    check(set(statuses) <= {200, 503}, f"proxied answers: {statuses}")
    s, _ = scrape(d)
    dead_label = f"127.0.0.1:{dead}"
    n_dead = m(s, "gatherd_upstream_server_requests_total", backend="f", server=dead_label)
    check(n_dead >= 1, f"the closed port was tried ({n_dead})")
    eq(failures(s, "f", dead_label), {"connect_failed": n_dead}, "closed port: connect_failed per try")
    n_good = m(s, "gatherd_upstream_server_requests_total", backend="f", server=good.hostport)
    n_bad = m(s, "gatherd_upstream_server_requests_total", backend="f", server=bad.hostport)
    eq(n_good, good.stats()["requests"], "good server: what its stub saw")
    eq(n_bad, bad.stats()["requests"] - 1, "503 server: what its stub saw (besides the test's /__health)")
    eq(n_good + n_bad, 9, "each request ended on a server that answered (connect failures go to another)")
    eq(failures(s, "f", good.hostport), {}, "good server: no failures")
    eq(failures(s, "f", bad.hostport), {"bad_status": statuses.count(503)}, "503 server: bad_status per 503")
    eq(n_bad, statuses.count(503), "503 answers came from the 503 server")
    # aggregate calls name their codes the same way
    for _ in range(3):
        eq(get(d, "/agg").status, 200, "aggregate with a fallback")
    s, _ = scrape(d)
    eq(sum(failures(s, "f", bad.hostport).values()), m(s, "gatherd_upstream_server_requests_total", backend="f",
                                                       server=bad.hostport), "503 server: every try failed")
    eq(set(failures(s, "f", bad.hostport)), {"bad_status"}, "503 server: bad_status only")
    eq(set(failures(s, "f", dead_label)), {"connect_failed"}, "closed port: connect_failed only")
    check_status_matches_metrics(d, "f")


@otest
def cluster_obs_in_flight_while_a_slow_request_runs():
    stubs = [Stub(), Stub(), Stub()]
    cfg = tp.config({"c": backend([st.url for st in stubs])},
                    routes=[{"path": "/p/*", "proxy": {"backend": "c", "strip_prefix": "/p"}}])
    d = Daemon(cfg, workers=2)
    for _ in range(3):
        eq(get(d, "/p/users/1").status, 200, "warm-up")
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", get(d, "/p/users/9?delay=%d" % ms(1500))))
    t.start()
    try:
        def one_in_flight():
            s, _ = scrape(d)
            busy = [st for st in stubs
                    if m(s, "gatherd_upstream_server_in_flight", backend="c", server=st.hostport) == 1]
            others = [st for st in stubs
                      if m(s, "gatherd_upstream_server_in_flight", backend="c", server=st.hostport) == 0]
            return (s, busy[0]) if len(busy) == 1 and len(others) == 2 else None
        s, busy = wait_for(one_in_flight, 3, "one server with one try in flight")
        eq(busy.stats()["in_flight"], 1, f"the stub of {busy.hostport} holds the request")
        o = m(s, "gatherd_upstream_server_connections", backend="c", server=busy.hostport, state="open")
        i = m(s, "gatherd_upstream_server_connections", backend="c", server=busy.hostport, state="idle")
        eq(o - i, 1, f"{busy.hostport}: one connection in use")
        _, servers = status_servers(d, "c")
        eq(servers[busy.hostport]["in_flight"], 1, "/status in_flight")
    finally:
        t.join(10 * SLOW)
    eq(done["r"].status, 200, "the slow request")
    eq(int(done["r"].header("X-Stub-Port")), busy.port, "answered by the server that held it")
    s, _ = scrape(d)
    for st in stubs:
        eq(m(s, "gatherd_upstream_server_in_flight", backend="c", server=st.hostport), 0, "in flight after")


HC_INTERVAL = 200


@otest
def cluster_obs_healthy_follows_active_checks():
    a, b = Stub(), Stub()
    hc = {"path": "/healthz", "interval_ms": ms(HC_INTERVAL), "timeout_ms": ms(150), "healthy": 2, "unhealthy": 3}
    cfg = tp.config({"h": backend([a.url, b.url], health_check=hc)},
                    routes=[{"path": "/p/*", "proxy": {"backend": "h", "strip_prefix": "/p"}}])
    d = Daemon(cfg, workers=1)

    def checks(s, st, result):
        return m(s, "gatherd_upstream_server_health_checks_total", backend="h", server=st.hostport, result=result)
    wait_for(lambda: checks(scrape(d)[0], b, "ok") >= 1, 2, "a first passed check")
    b.get("/__health/503")
    unhealthy_s = (3 * 1.1 * HC_INTERVAL + 150) / 1000 + 1.0
    s = wait_for(lambda: (lambda s: s if m(s, "gatherd_upstream_server_healthy", backend="h",
                                           server=b.hostport) == 0 else None)(scrape(d)[0]),
                 unhealthy_s, "healthy 0 after failed checks")
    check(checks(s, b, "fail") >= 3, f"at least 3 failed checks counted ({checks(s, b, 'fail')})")
    eq(m(s, "gatherd_upstream_server_healthy", backend="h", server=a.hostport), 1, "the other stays healthy")
    eq(checks(s, a, "fail"), 0, "the other's checks all passed")
    _, servers = status_servers(d, "h")
    eq(servers[b.hostport]["healthy"], False, "/status healthy false")
    eq(servers[a.hostport]["healthy"], True, "/status healthy true")
    # requests go to the healthy server only
    n_a = m(s, "gatherd_upstream_server_requests_total", backend="h", server=a.hostport)
    for _ in range(4):
        r = get(d, "/p/users/1")
        eq((r.status, int(r.header("X-Stub-Port"))), (200, a.port), "answered by the healthy server")
    s, _ = scrape(d)
    eq(m(s, "gatherd_upstream_server_requests_total", backend="h", server=a.hostport), n_a + 4, "a got them")
    b.get("/__health/200")
    healthy_s = (2 * 1.1 * HC_INTERVAL + 150) / 1000 + 1.0
    wait_for(lambda: m(scrape(d)[0], "gatherd_upstream_server_healthy", backend="h", server=b.hostport) == 1,
             healthy_s, "healthy 1 again")


@otest
def cluster_obs_ejection_by_outlier_detection():
    good1, good2 = Stub(), Stub()
    dead = tp.closed_port()
    dead_label = f"127.0.0.1:{dead}"
    od = {"consecutive_failures": 2, "eject_ms": ms(30000), "max_eject_ms": ms(60000)}
    cfg = tp.config({"o": backend([good1.url, f"http://127.0.0.1:{dead}", good2.url], outlier_detection=od)},
                    routes=[{"path": "/p/*", "proxy": {"backend": "o", "strip_prefix": "/p"}}])
    d = Daemon(cfg, workers=1, log_level="info")
    for _ in range(9):
        eq(get(d, "/p/users/1").status, 200, "answers (connect failures go to another server)")
    s, _ = scrape(d)
    eq(m(s, "gatherd_upstream_server_ejected", backend="o", server=dead_label), 1, "ejected")
    eq(m(s, "gatherd_upstream_server_ejections_total", backend="o", server=dead_label), 1, "ejections_total")
    eq(failures(s, "o", dead_label), {"connect_failed": 2}, "two failures in a row, then out")
    eq(m(s, "gatherd_upstream_server_requests_total", backend="o", server=dead_label), 2, "no tries once ejected")
    for st in (good1, good2):
        eq(m(s, "gatherd_upstream_server_ejected", backend="o", server=st.hostport), 0, "the others are in")
        eq(m(s, "gatherd_upstream_server_healthy", backend="o", server=st.hostport), 1, "healthy")
    eq(m(s, "gatherd_upstream_server_healthy", backend="o", server=dead_label), 1,
       "healthy stays 1: no active checks, ejection is separate")
    check(d.wait_log(f"backend o server {dead_label} is ejected"), "the ejection is logged with the server")
    _, servers = check_status_matches_metrics(d, "o")[1:]
    x = servers[dead_label]
    eq(x["ejected"], True, "/status ejected")
    check(0 < x["ejected_ms_left"] <= ms(30000), f"/status ejected_ms_left {x['ejected_ms_left']}")


@otest
def cluster_obs_series_follow_servers_across_reloads():
    """A reload that reorders the servers and adds one keeps the kept
    servers' counters and connection gauges (their pools are kept, and the
    gauges are slotted by backend name and server label); the new server
    starts at 0; a reload that removes a server removes its series."""
    a, b, c = Stub(), Stub(), Stub()
    routes = [{"path": "/p/*", "proxy": {"backend": "c", "strip_prefix": "/p"}}]
    d = Daemon(tp.config({"c": backend([a.url, b.url])}, routes=routes), workers=1)
    for _ in range(6):
        eq(get(d, "/p/users/1").status, 200, "answer")
    s, _ = scrape(d)
    before = {st.hostport: m(s, "gatherd_upstream_server_requests_total", backend="c", server=st.hostport)
              for st in (a, b)}
    eq(sum(before.values()), 6, "requests before the reload")
    conns = {st.hostport: m(s, "gatherd_upstream_server_connections", backend="c", server=st.hostport,
                            state="open") for st in (a, b)}
    cfg = tp.config({"c": backend([b.url, c.url, a.url])}, routes=routes)
    cfg["listen"] = [f"127.0.0.1:{d.port}"]
    d.reload(cfg)
    s, _ = scrape(d)
    for st in (a, b):
        eq(m(s, "gatherd_upstream_server_requests_total", backend="c", server=st.hostport), before[st.hostport],
           f"{st.hostport}: requests kept")
        eq(m(s, "gatherd_upstream_server_connections", backend="c", server=st.hostport, state="open"),
           conns[st.hostport], f"{st.hostport}: its pooled connections kept")
        # the stub counts every connection it accepted, its /stats ones too
        eq(st.stats()["connections"] - st.nstats, conns[st.hostport], f"{st.hostport}: no new connection to it")
    eq(m(s, "gatherd_upstream_server_requests_total", backend="c", server=c.hostport), 0, "the new server at 0")
    eq(m(s, "gatherd_upstream_server_connections", backend="c", server=c.hostport, state="open"), 0,
       "the new server's connections")
    eq([x["label"] for x in status_servers(d, "c")[0]["servers"]], [b.hostport, c.hostport, a.hostport],
       "/status lists the servers in the new order")
    cfg = tp.config({"c": backend([c.url, a.url])}, routes=routes)
    cfg["listen"] = [f"127.0.0.1:{d.port}"]
    d.reload(cfg)
    s, _ = scrape(d)
    eq([l for (n, l) in s if n.startswith("gatherd_upstream_server_") and dict(l).get("server") == b.hostport], [],
       "the removed server has no series")
    eq(m(s, "gatherd_upstream_server_requests_total", backend="c", server=a.hostport), before[a.hostport],
       "the kept server's requests")


@otest
def cluster_obs_label_values_are_escaped():
    """A backend named with a quote, a backslash and a newline: every family
    labelled by backend (the per-server ones, the breaker, the retry budget,
    the calls) escapes it, so the strict parser reads the name back."""
    st = Stub()
    name = 'we"ird\\na\nme'
    bk = backend([st.url], circuit_breaker={"consecutive_failures": 5, "open_ms": 60000},
                 retry={"attempts": 2})
    cfg = tp.config({name: bk},
                    routes=[{"path": "/p/*", "proxy": {"backend": name, "strip_prefix": "/p"}}])
    d = Daemon(cfg, workers=1)
    eq(get(d, "/p/users/1").status, 200, "answer")
    s, _ = scrape(d)
    for fam in ("gatherd_upstream_server_requests_total", "gatherd_upstream_server_weight",
                "gatherd_upstream_server_connections"):
        check(any(n == fam and dict(l).get("backend") == name for n, l in s), f"{fam} with the name read back")
    eq(m(s, "gatherd_upstream_server_requests_total", backend=name, server=st.hostport), 1, "requests")
    eq(m(s, "gatherd_breaker_state", backend=name), 0, "breaker_state")
    eq(m(s, "gatherd_breaker_trips_total", backend=name), 0, "breaker_trips_total")
    eq(m(s, "gatherd_retry_budget_denied_total", backend=name), 0, "retry_budget_denied_total")
    eq(m(s, "gatherd_backend_calls_total", backend=name, outcome="ok"), 1, "backend_calls_total")
    b, _ = status_servers(d, name)
    eq(b["servers"][0]["requests"], 1, "/status of the oddly named backend")


@otest
def cluster_obs_status_page_shows_servers():
    # the page, not the daemon's memory, is under test: once, in the normal build
    if gwtest._is_sanitized(gwtest.GATHERD):
        raise gwtest.NotInTier("run once, in the normal build (a browser is heavy under a sanitized load)")
    if ta.CHROMIUM is None:
        raise Skip("chromium is not installed (scripts/install-deps.sh installs it)")
    a, b = Stub(), Stub()
    dead = tp.closed_port()
    hc = {"path": "/healthz", "interval_ms": ms(HC_INTERVAL), "timeout_ms": ms(150), "healthy": 2, "unhealthy": 2}
    cfg = tp.config({"c": backend([a.url, {"url": b.url, "backup": True}, f"http://127.0.0.1:{dead}"],
                                  health_check=hc)},
                    routes=[{"path": "/p/*", "proxy": {"backend": "c", "strip_prefix": "/p"}}])
    d = Daemon(cfg, workers=1)
    dead_label = f"127.0.0.1:{dead}"
    wait_for(lambda: m(scrape(d)[0], "gatherd_upstream_server_healthy", backend="c", server=dead_label) == 0, 3,
             "the closed port is unhealthy")
    for _ in range(3):
        get(d, "/p/users/1")
    url = f"http://127.0.0.1:{d.admin_port}/status?format=html"
    profile = tempfile.mkdtemp(prefix="gwchrome-")
    try:
        p = subprocess.run([ta.CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                            "--virtual-time-budget=3000", "--dump-dom", url],
                           capture_output=True, text=True, timeout=90)
        dom = p.stdout
        check('data-refreshes="' in dom, f"the page's script rendered the status: {p.stderr[-1500:]}")
        check('<div id="err"></div>' in dom, "the page reached /status (no error shown)")
        for label in (a.hostport, b.hostport, dead_label):
            check(f">{label}<" in dom, f"server {label} on the page")
        check('class="badge unhealthy"' in dom, "the unhealthy server is marked")
        check('class="badge healthy"' in dom, "healthy servers are marked")
        check('class="badge backup"' in dom, "the backup is marked")
        check("round_robin, 3 servers" in dom, "the backend's balance and server count")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
