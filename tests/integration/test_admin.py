#!/usr/bin/env python3
"""Integration tests of the admin listener (/healthz, /readyz, /metrics,
/status and its HTML page): the real daemon, the stub backend, and Debian's
headless Chromium for the page, all on loopback.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_admin.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed"; the exit code is 1 when
anything failed. The status page screenshot goes to $GW_ARTIFACTS (default:
the current directory) as status-page.png; its path is printed.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Conn, Daemon, Skip, TestFailure, check, contains, eq, main, req, run_cli  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms
atest = tp.ptest
Stub = tp.Stub

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# --- helpers -------------------------------------------------------------------

def admin_get(d, path, method="GET", headers=None):
    with Conn("127.0.0.1", d.admin_port) as c:
        return c.request(req(method, path, headers=headers, host="admin"), method=method)


def get(d, path, method="GET"):
    """One request on a connection of its own (so connections are countable)."""
    with Conn(d.host, d.port) as c:
        return c.request(req(method, path), method=method)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.e+]+|\+Inf|NaN)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_prometheus(text):
    """Parses the text exposition format strictly: every sample belongs to a
    family declared by # TYPE before it, families are not interleaved, no
    series appears twice, histogram buckets are cumulative and end with
    +Inf equal to _count. Returns {(name, frozenset(labels.items())): value}
    and the types."""
    types, samples, seen_families, current = {}, {}, [], None
    check(text.endswith("\n"), "the exposition ends with a newline")
    for n, line in enumerate(text.split("\n")[:-1], 1):
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            check(typ in ("counter", "gauge", "histogram", "summary", "untyped"), f"line {n}: type {typ}")
            check(name not in types, f"line {n}: family {name} declared twice")
            types[name] = typ
            current = name
            seen_families.append(name)
            continue
        check(not line.startswith("#") and line.strip() != "", f"line {n}: unexpected line {line!r}")
        m = _SAMPLE.match(line)
        check(m is not None, f"line {n}: not a sample: {line!r}")
        name, labels_text = m.group(1), m.group(3) or ""
        family = name
        if current and types.get(current) == "histogram" and name in (current + "_bucket", current + "_sum",
                                                                       current + "_count"):
            family = current
        check(family == current, f"line {n}: sample {name} outside its family (current {current})")
        labels, pos = {}, 0
        while pos < len(labels_text):
            lm = _LABEL.match(labels_text, pos)
            check(lm is not None, f"line {n}: bad labels {labels_text!r}")
            labels[lm.group(1)] = lm.group(2)
            pos = lm.end()
        key = (name, frozenset(labels.items()))
        check(key not in samples, f"line {n}: series {line!r} twice")
        samples[key] = float(m.group(4))
    # histograms: cumulative buckets, +Inf == _count
    for fam, typ in types.items():
        if typ != "histogram":
            continue
        series = {}
        for (name, labels), v in samples.items():
            if name == fam + "_bucket":
                rest = frozenset((k, x) for k, x in labels if k != "le")
                le = dict(labels)["le"]
                series.setdefault(rest, []).append((float("inf") if le == "+Inf" else float(le), v))
        for rest, buckets in series.items():
            buckets.sort()
            vals = [v for _, v in buckets]
            check(vals == sorted(vals), f"{fam}{dict(rest)}: buckets not cumulative: {vals}")
            check(buckets[-1][0] == float("inf"), f"{fam}{dict(rest)}: no +Inf bucket")
            eq(buckets[-1][1], samples[(fam + "_count", rest)], f"{fam}{dict(rest)} +Inf vs _count")
    return samples, types


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def scrape(d):
    r = admin_get(d, "/metrics")
    eq(r.status, 200, "/metrics status")
    contains(r.header("Content-Type"), "text/plain; version=0.0.4", "/metrics content type")
    return parse_prometheus(r.body.decode())[0]


def mix_config(stub):
    return {
        "backends": {
            "api": tp.backend(stub.url, timeout_ms=ms(2000)),
            "slow": tp.backend(stub.url, timeout_ms=ms(150)),
            "px": tp.backend(stub.url),
            "dead": tp.backend("http://127.0.0.1:1", connect_timeout_ms=ms(500),
                               circuit_breaker={"consecutive_failures": 2, "open_ms": 60000}),
        },
        "routes": [
            {"path": "/r", "respond": {"body": {"ok": True}}},
            {"path": "/agg", "calls": [{"name": "u", "backend": "api", "path": "/users/7"}]},
            {"path": "/degraded", "calls": [
                {"name": "u", "backend": "api", "path": "/users/7"},
                {"name": "s", "backend": "slow", "path": "/users/8?delay=1000", "fallback": None}]},
            {"path": "/p/*", "proxy": {"backend": "px", "strip_prefix": "/p"}},
            {"path": "/down", "calls": [{"name": "d", "backend": "dead", "path": "/x", "fallback": None}]},
            {"path": "/limited", "respond": {"body": {}}, "rate_limit": {"rate": 1, "period_ms": 600000, "burst": 2}},
            {"path": "/hold", "calls": [{"name": "u", "backend": "api", "path": "/users/7?delay=1500"}]},
            {"path": "/getonly", "methods": ["GET"], "respond": {"body": {}}},
        ],
    }


# --- tests ---------------------------------------------------------------------

@atest
def health_and_readiness_answer():
    d = Daemon({"routes": [{"path": "/r", "respond": {"body": {}}}]})
    r = admin_get(d, "/healthz")
    eq((r.status, r.body), (200, b"ok\n"), "/healthz")
    r = admin_get(d, "/readyz")
    eq((r.status, r.body), (200, b"ready\n"), "/readyz")
    eq(admin_get(d, "/readyz", method="HEAD").status, 200, "HEAD /readyz")
    r = admin_get(d, "/metrics", method="POST")
    eq(r.status, 405, "POST /metrics")
    eq(r.header("Allow"), "GET, HEAD", "Allow")
    eq(admin_get(d, "/nothing").status, 404, "unknown admin path")
    check(d.wait_log(f"admin listener on 127.0.0.1:{d.admin_port}"), "the admin address is logged")
    # the admin port serves no routes, the main port no admin paths
    eq(get(d, "/healthz").status, 404, "/healthz on the main port")
    eq(admin_get(d, "/r").status, 404, "a route on the admin port")


@atest
def metrics_count_exactly_what_was_sent():
    stub = Stub()
    d = Daemon(mix_config(stub), workers=2)
    # the Daemon's own start-up probes: the worker that accepted the last one
    # may count it a moment after the probe's answer, so wait until it settles
    accepted_before, deadline = None, time.monotonic() + 5
    while time.monotonic() < deadline:
        n = metric(scrape(d), "gatherd_connections_accepted_total")
        if n == accepted_before:
            break
        accepted_before = n
        time.sleep(0.2)
    sent = {"/r": 7, "/nope": 3, "/agg": 4, "/degraded": 2, "/p/users/1": 5, "/p/users/2?status=503": 1,
            "/down": 3, "/limited": 5}
    statuses = {}
    for path, n in sent.items():
        for _ in range(n):
            r = get(d, path)
            statuses.setdefault(path, []).append(r.status)
    for _ in range(2):  # a 405 belongs to the route of its path, not to "(unmatched)"
        eq(get(d, "/getonly", method="DELETE").status, 405, "DELETE /getonly")
    eq(statuses["/limited"], [200, 200, 429, 429, 429], "rate limited answers")
    eq(set(statuses["/degraded"]), {200}, "degraded answers")
    eq(set(statuses["/p/users/2?status=503"]), {503}, "proxied 503")
    s = scrape(d)
    total_requests = sum(sent.values()) + 2

    def req_count(route, code):
        return metric(s, "gatherd_requests_total", route=route, code=code)

    eq(req_count("/r", "2xx"), 7, "/r 2xx")
    eq(req_count("(unmatched)", "4xx"), 3, "unmatched 4xx")
    eq(req_count("/getonly", "4xx"), 2, "405s of /getonly")
    eq(req_count("/agg", "2xx"), 4, "/agg 2xx")
    eq(req_count("/degraded", "2xx"), 2, "/degraded 2xx")
    eq(req_count("/p/*", "2xx"), 5, "/p/* 2xx")
    eq(req_count("/p/*", "5xx"), 1, "/p/* 5xx")
    eq(req_count("/down", "2xx"), 3, "/down 2xx (fallback)")
    eq(req_count("/limited", "2xx"), 2, "/limited 2xx")
    eq(req_count("/limited", "4xx"), 3, "/limited 4xx")
    eq(metric(s, "gatherd_rate_limited_total", route="/limited"), 3, "rate limited")
    all_requests = sum(v for (n, _), v in s.items() if n == "gatherd_requests_total")
    eq(all_requests, total_requests, "every request counted once")
    eq(metric(s, "gatherd_request_duration_seconds_count", route="/r"), 7, "/r latency count")
    eq(metric(s, "gatherd_connections_accepted_total") - accepted_before, total_requests, "one connection per request")

    def calls(backend, outcome):
        return metric(s, "gatherd_backend_calls_total", backend=backend, outcome=outcome)

    eq(calls("api", "ok"), 4 + 2, "api ok (/agg and /degraded)")
    eq(calls("slow", "timeout"), 2, "slow timeouts")
    eq(calls("px", "ok"), 5, "proxied ok")
    eq(calls("px", "bad_status"), 1, "proxied 503")
    # two connect failures open the breaker; the third call finds it open
    eq(calls("dead", "connect_failed"), 2, "dead connect_failed")
    eq(calls("dead", "circuit_open"), 1, "dead circuit_open")
    eq(metric(s, "gatherd_breaker_state", backend="dead"), 1, "breaker open")
    eq(metric(s, "gatherd_breaker_trips_total", backend="dead"), 1, "breaker trips")
    eq(metric(s, "gatherd_backend_call_duration_seconds_count", backend="px"), 6, "px latency count")
    # the slow calls took their timeout (150 ms, times GW_SLOW): none in the buckets below 100 ms
    eq(metric(s, "gatherd_backend_call_duration_seconds_bucket", backend="slow", le="0.1"), 0, "slow under 100 ms")
    eq(metric(s, "gatherd_backend_call_duration_seconds_bucket", backend="slow", le="2.5"), 2, "slow under 2.5 s")
    opened = metric(s, "gatherd_upstream_connections_opened_total", backend="api")
    check(1 <= opened <= 6, f"api connections opened: {opened}")
    eq(metric(s, "gatherd_upstream_connections", backend="api", state="active"), 0, "api active after the mix")
    idle = metric(s, "gatherd_upstream_connections", backend="api", state="idle")
    check(1 <= idle <= opened, f"api idle connections: {idle} of {opened} opened")
    eq(metric(s, "gatherd_requests_in_flight"), 0, "in flight after the mix")
    eq(metric(s, "gatherd_workers"), 2, "workers")
    eq(metric(s, "gatherd_ready"), 1, "ready")
    check(any(n == "gatherd_build_info" for n, _ in s), "build info")
    # the Prometheus clients' standard process_* metrics, against /proc
    with open(f"/proc/{d.pid}/limits") as f:
        soft = next(int(l.split()[3]) for l in f if l.startswith("Max open files"))
    eq(metric(s, "process_max_fds"), soft, "process_max_fds = the soft RLIMIT_NOFILE")
    fds = len(os.listdir(f"/proc/{d.pid}/fd"))
    check(abs(metric(s, "process_open_fds") - fds) <= 3, f"process_open_fds {metric(s, 'process_open_fds')} "
                                                          f"vs {fds} in /proc (the scrape's own socket aside)")
    with open(f"/proc/{d.pid}/status") as f:
        rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    check(rss / 2 <= metric(s, "process_resident_memory_bytes") <= rss * 2,
          f"process_resident_memory_bytes {metric(s, 'process_resident_memory_bytes')} vs VmRSS {rss}")
    check(metric(s, "process_virtual_memory_bytes") >= metric(s, "process_resident_memory_bytes"), "virtual >= rss")
    check(0 < metric(s, "process_cpu_seconds_total") < 600, "process_cpu_seconds_total")
    check(time.time() - 600 < metric(s, "process_start_time_seconds") <= time.time(), "process_start_time_seconds")

    # a request held by a slow backend is in flight, and its connection is active
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", get(d, "/hold")))
    t.start()
    deadline = time.monotonic() + 3 * SLOW
    while time.monotonic() < deadline:
        s = scrape(d)
        # the request counts as in flight once parsed; its upstream connection
        # turns active a moment later, once checked out of the pool
        if (metric(s, "gatherd_requests_in_flight") == 1
                and metric(s, "gatherd_upstream_connections", backend="api", state="active") == 1):
            break
        time.sleep(0.05)
    eq(metric(s, "gatherd_requests_in_flight"), 1, "in flight while held")
    eq(metric(s, "gatherd_upstream_connections", backend="api", state="active"), 1, "api active while held")
    t.join(10)
    eq(done["r"].status, 200, "held request")
    eq(metric(scrape(d), "gatherd_requests_in_flight"), 0, "in flight after")

    # reloads and their result
    cfg = mix_config(stub)
    cfg["listen"] = [f"127.0.0.1:{d.port}"]
    d.reload(cfg)
    d.reload('{"listen": ["127.0.0.1:%d"], "routes": [' % d.port, expect="reload failed")
    s = scrape(d)
    eq(metric(s, "gatherd_reloads_total", result="ok"), 1, "reloads ok")
    eq(metric(s, "gatherd_reloads_total", result="failed"), 1, "reloads failed")
    eq(metric(s, "gatherd_last_reload_successful"), 0, "last reload failed")
    # a reload keeps the counters of what it keeps
    eq(metric(s, "gatherd_requests_total", route="/r", code="2xx"), 7, "/r after reloads")


# Each failure an aggregate call can meet at the backend, the code the answer
# reports (README "Answers") and the outcome /metrics counts it as (README
# "Admin listener"): backend name -> (code, backend options, call options,
# stub query, outcome).
FAILURE_OUTCOMES = {
    "bad_json": ("bad_json", {}, {}, "bad_json=1", "invalid"),                 # checked unparsed
    "bad_json_parsed": ("bad_json", {}, {"allow": ["a"]}, "bad_json=1", "invalid"),  # parsed, shaped
    "too_large": ("too_large", {"max_response_bytes": 20}, {}, "size=100", "invalid"),
    "missing_target": ("missing_target", {}, {"target": "nope"}, "", "invalid"),
    "bad_status": ("bad_status", {}, {}, "status=503", "bad_status"),
    "bad_status_4xx": ("bad_status", {}, {}, "status=404", "bad_status"),
    "truncated": ("truncated", {}, {}, "size=100&truncate=10", "reset"),
    "bad_response": ("bad_response", {}, {}, "garbage=1", "reset"),
    "timeout": ("timeout", {"timeout_ms": ms(150)}, {}, "delay=%d" % ms(1500), "timeout"),
    "dead": ("connect_failed", {"url": "http://127.0.0.1:1"}, {}, "", "connect_failed"),
}
OUTCOMES = ("ok", "bad_status", "timeout", "connect_failed", "reset", "invalid", "circuit_open", "queue_full",
            "queue_timeout", "unavailable", "cancelled")


@atest
def metrics_count_each_failure_code_as_its_outcome():
    """Every call that reached its backend and failed is counted under the
    outcome its code belongs to, with one latency observation."""
    stub = Stub()
    backends, routes = {}, []
    for name, (_, bopts, copts, query, _) in FAILURE_OUTCOMES.items():
        backends[name] = tp.backend(stub.url)
        backends[name].update(bopts)
        call = {"name": "c", "backend": name, "path": "/x?" + query, "fallback": None}
        call.update(copts)
        routes.append({"path": "/" + name, "errors": True, "calls": [call]})
    d = Daemon({"backends": backends, "routes": routes})
    for name, (code, *_) in FAILURE_OUTCOMES.items():
        r = get(d, "/" + name)
        eq(r.status, 200, f"/{name}")
        eq(r.json()["_errors"]["c"]["code"], code, f"/{name}: the call's code")
    s = scrape(d)
    for name, (*_, outcome) in FAILURE_OUTCOMES.items():
        got = {o: metric(s, "gatherd_backend_calls_total", backend=name, outcome=o) for o in OUTCOMES}
        eq({o: v for o, v in got.items() if v}, {outcome: 1}, f"backend {name}: outcomes")
        eq(metric(s, "gatherd_backend_call_duration_seconds_count", backend=name), 1, f"backend {name}: latency count")


SRCDIR = os.environ.get("GW_SRCDIR") or os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


@atest
def metrics_families_are_documented_in_the_readme():
    """Every family /metrics declares is named in the README's admin section
    (its metrics table lists them without the gatherd_ prefix; process_*
    in the text below it), and every name the table lists is declared."""
    with open(os.path.join(SRCDIR, "README.md")) as f:
        readme = f.read()
    start = readme.index("## Admin listener")
    section = readme[start:readme.index("\n## ", start + 1)]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    table = set()
    for line in section.split("\n"):
        cells = line.split("|")
        if line.startswith("| `") and len(cells) > 3 and re.search(r"counter|gauge|histogram", cells[2]):
            # the first cell's names, not those of a note in parentheses
            table.update(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", cells[1])))
    stub = Stub()
    d = Daemon(mix_config(stub), workers=1)
    _, types = parse_prometheus(admin_get(d, "/metrics").body.decode())
    declared = set()
    for fam in types:
        name = fam[len("gatherd_"):] if fam.startswith("gatherd_") else fam
        declared.add(name)
        check(name in documented, f"metric {fam} is not documented in README's admin section")
    missing = sorted(table - declared)
    eq(missing, [], "metrics the README's table names but /metrics does not declare")
    check(any(n.startswith("upstream_server_") for n in declared), "the per-server families are declared")


@atest
def status_p95_is_interpolated_in_its_bucket():
    """/status's recent p95 is interpolated inside its histogram bucket, as
    Prometheus' histogram_quantile() does, not the bucket's upper bound
    (which read 100 ms next to a mean of 12 ms). The model computes it from
    the route's histogram in /metrics: every request of this daemon is in
    the last ten seconds."""
    stub = Stub()
    d = Daemon(mix_config(stub), workers=2)
    for _ in range(40):
        get(d, "/agg")
    time.sleep(1.2 * SLOW)  # one more snapshot for the recent figures
    agg = admin_get(d, "/status").json()["routes"][1]
    eq(agg["path"], "/agg", "route")
    samples = scrape(d)
    cum = sorted((float("inf") if dict(l)["le"] == "+Inf" else float(dict(l)["le"]), v)
                 for (n, l), v in samples.items()
                 if n == "gatherd_request_duration_seconds_bucket" and dict(l).get("route") == "/agg")
    total = cum[-1][1]
    eq(total, 40, "/agg requests")
    want = (int(total) * 95 + 99) // 100
    lo, below = 0.0, 0.0
    for le, c in cum:
        if c >= want:
            p95 = (lo if le == float("inf") else lo + (le - lo) * (want - below) / (c - below)) * 1000
            break
        lo, below = le, c
    # /status prints reals with 6 significant digits (41.6667 for 41.666...)
    check(abs(agg["recent"]["p95_ms"] - p95) <= 1e-5 * max(1.0, p95), f"/agg p95 {agg['recent']['p95_ms']} ms, model {p95} ms")


@atest
def status_json_describes_routes_and_backends():
    stub = Stub()
    d = Daemon(mix_config(stub), workers=2)
    for _ in range(3):
        get(d, "/agg")
    for _ in range(2):
        get(d, "/down")
    time.sleep(1.2 * SLOW)  # one more snapshot for the recent figures
    r = admin_get(d, "/status")
    eq(r.status, 200, "/status")
    eq(r.header("Content-Type"), "application/json", "content type")
    st = r.json()
    eq(st["workers"], 2, "workers")
    eq(st["ready"], True, "ready")
    eq(st["pid"], d.pid, "pid")
    check(st["uptime_seconds"] > 0, "uptime")
    eq([x["path"] for x in st["routes"]], [x["path"] for x in mix_config(stub)["routes"]], "routes in order")
    agg = st["routes"][1]
    eq((agg["kind"], agg["requests"], agg["status"]["2xx"]), ("aggregate", 3, 3), "/agg counts")
    eq(agg["calls"][0]["backend"], "api", "/agg call backend")
    check(agg["recent"]["per_second"] > 0, f"/agg recent rate: {agg['recent']}")
    backends = {b["name"]: b for b in st["backends"]}
    eq(set(backends), {"api", "slow", "px", "dead"}, "backends")
    api = backends["api"]
    eq(api["url"], stub.url, "api url")
    eq(api["outcomes"]["ok"], 3, "api ok")
    eq(api["health"], "up", "api health")
    eq(api["pool"]["active"], 0, "api active")
    check(api["pool"]["idle"] >= 1, "api idle")
    eq(api["breaker"], None, "api has no breaker")
    dead = backends["dead"]
    eq(dead["breaker"]["state"], "open", "dead breaker")
    eq(dead["health"], "down", "dead health")
    eq(backends["px"]["health"], "idle", "px: no recent calls")
    # ?format=html and a browser's Accept get the page; ?format=json wins
    for path, headers, want in (("/status?format=html", None, "text/html"),
                                ("/status", {"Accept": "text/html,application/xhtml+xml"}, "text/html"),
                                ("/status?format=json", {"Accept": "text/html"}, "application/json")):
        r = admin_get(d, path, headers=headers)
        contains(r.header("Content-Type"), want, f"{path} {headers}")


@atest
def readiness_turns_503_while_draining():
    stub = Stub()
    cfg = mix_config(stub)
    cfg["shutdown_timeout_ms"] = ms(10000)
    d = Daemon(cfg, workers=1)
    eq(admin_get(d, "/readyz").status, 200, "ready before")
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", get(d, "/hold")))
    t.start()
    deadline = time.monotonic() + 3 * SLOW
    while stub.stats()["in_flight"] < 1:
        check(time.monotonic() < deadline, "the held call reached the stub")
        time.sleep(0.02)
    d.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2 * SLOW
    r = admin_get(d, "/readyz")
    while r.status != 503 and time.monotonic() < deadline:
        time.sleep(0.02)
        r = admin_get(d, "/readyz")
    eq((r.status, r.body), (503, b"draining\n"), "/readyz while draining")
    eq(admin_get(d, "/healthz").status, 200, "/healthz while draining: still alive")
    s = scrape(d)
    eq(metric(s, "gatherd_ready"), 0, "gatherd_ready while draining")
    eq(admin_get(d, "/status").json()["draining"], True, "/status draining")
    t.join(10)
    eq(done["r"].status, 200, "the request in flight finished")
    eq(d.wait(10), 0, "exit status")


@atest
def admin_listener_settings():
    # an address in use stops the start with the reason
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with gwtest.TempDir() as t:
            p = t.write("g.json", {"listen": [f"127.0.0.1:{gwtest.free_port()}"],
                                   "admin": {"listen": f"127.0.0.1:{port}"}})
            proc = subprocess.run([gwtest.GATHERD, "-c", p], capture_output=True, text=True, timeout=15)
            eq(proc.returncode, 1, "exit status with the admin port taken")
            contains(proc.stderr, f"admin listener: cannot listen on 127.0.0.1:{port}", "reason")
    finally:
        busy.close()
    # an empty list turns it off
    d = Daemon({"admin": {"listen": []}, "routes": [{"path": "/r", "respond": {"body": {}}}]})
    eq(get(d, "/r").status, 200, "serves without an admin listener")
    check("admin listener on" not in d.log(), "no admin listener")
    d.stop()
    # the configuration is checked
    with gwtest.TempDir() as t:
        for admin, want in (({"listen": "127.0.0.1:8080"}, 'address "127.0.0.1:8080" is also in "listen"'),
                            ({"port": 1}, 'unknown key "port"'),
                            ({"listen": "nowhere"}, "bad address"),
                            ("on", "must be an object")):
            p = t.write("g.json", {"listen": ["127.0.0.1:8080"], "admin": admin})
            rc, _, err = run_cli(["-t", "-c", p])
            eq(rc, 1, f"-t with admin {admin}")
            contains(err, want, f"-t with admin {admin}")
        p = t.write("g.json", {"listen": ["127.0.0.1:8080"], "admin": {"listen": ["127.0.0.1:9999", "[::1]:9999"]}})
        eq(run_cli(["-t", "-c", p])[0], 0, "two admin addresses")


@atest
def status_page_renders_and_refreshes_in_chromium():
    # the page, not the daemon's memory, is under test: once, in the normal build
    if gwtest._is_sanitized(gwtest.GATHERD):
        raise gwtest.NotInTier("run once, in the normal build (a browser is heavy under a sanitized load)")
    if CHROMIUM is None:
        raise Skip("chromium is not installed (scripts/install-deps.sh installs it)")
    stub = Stub()
    d = Daemon(mix_config(stub), workers=2)
    for _ in range(3):
        get(d, "/agg")
        get(d, "/p/users/1")
    get(d, "/down")
    get(d, "/down")
    url = f"http://127.0.0.1:{d.admin_port}/status?format=html"
    profile = tempfile.mkdtemp(prefix="gwchrome-")
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "--hide-scrollbars"]
    try:
        # 7 s of virtual time: the page loads and refreshes itself every 2 s
        p = subprocess.run(base + ["--virtual-time-budget=7000", "--dump-dom", url], capture_output=True,
                           text=True, timeout=90)
        dom = p.stdout
        check("<table" in dom, f"chromium printed the page's DOM (rc {p.returncode}): {p.stderr[-1500:]}")
        m = re.search(r'data-refreshes="(\d+)"', dom)
        check(m is not None, "the page's script rendered the status")
        check(int(m.group(1)) >= 2, f"the page refreshed itself: {m.group(1)} renders in 7 s")
        for name in ("api", "slow", "px", "dead", "/agg", "/p/*", "/degraded"):
            contains(dom, f">{name}<", f"{name} on the page")
        contains(dom, 'class="badge open"', "the open breaker is shown")
        contains(dom, 'class="badge down"', "the dead backend is down")
        contains(dom, '<div id="err"></div>', "the page reached /status (no error shown)")
        check("<polyline" in dom, "latency sparklines")
        out_dir = os.environ.get("GW_ARTIFACTS") or os.getcwd()
        shot = os.path.join(out_dir, "status-page.png")
        if os.path.exists(shot):
            os.unlink(shot)
        p = subprocess.run(base + ["--virtual-time-budget=3000", "--window-size=1280,720", f"--screenshot={shot}",
                                   url], capture_output=True, text=True, timeout=90)
        check(os.path.exists(shot), f"chromium wrote the screenshot: {p.stderr[-1500:]}")
        with open(shot, "rb") as f:
            png = f.read()
        eq(png[:8], b"\x89PNG\r\n\x1a\n", "screenshot is a PNG")
        check(len(png) > 20000, f"screenshot has content ({len(png)} bytes)")
        print(f"# status page screenshot: {os.path.abspath(shot)} ({len(png)} bytes)", flush=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
