#!/usr/bin/env python3
"""Integration tests of what keeps a worker's loop responsive and its memory
bounded with large backend answers (README "Large answers"): answers parsed,
checked, built and freed on the thread pool ("thread_pool"), the loop-stall
probe in /metrics, and the response memory budget
("memory.response_body_bytes") with its memory_budget failures.

The stub's keys=N control serves {"k0":0,"k1":1,...}: with N = 480000, an
object of 7.9 MB that jansson takes about half a second to parse (longer
under ASan) and that becomes a tree of about 62 MB.

Timings are not asserted to the millisecond: the daemon's own stall metric
(how long its loop ran in one stretch, waits for a CPU left out) is held to
a bound far from both sides (the loop that parsed on the worker stalled
for 500 ms and more per answer), and a probe's latency to a loose one, so
a loaded machine running ASan does not fail them.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_stall.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed"; the exit code is 1 when
anything failed. `test_stall.py --probe HOST PORT STOPFILE` is the probe
process the first test starts.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, TempDir, check, contains, eq, main, req, run_cli  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
import test_admin as ta  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms


# The tests that bound a stall run alone among the integration tests of every
# runner (gwtest.exclusive), neither starving nor starved; the others (budget,
# queue, cancellation, stop, metrics) share the machine like any test.
TIMED = {"stall_big_answers_keep_the_loop_free", "stall_large_aggregates_built_and_freed_off_the_loop",
         "stall_foreach_of_many_elements"}


def atest(fn):
    if fn.__name__ in TIMED:
        # bounds of time belong to the normal build (gwtest.SMOKE); the
        # sanitizers check the same paths in the other tests here
        timed = fn

        @functools.wraps(timed)
        def fn():
            if SANITIZED:
                raise gwtest.NotInTier("a stall bound, measured in the normal build")
            timed()
        return gwtest.exclusive(tp.ptest(fn))
    return tp.ptest(fn)


Stub = tp.Stub

SANITIZED = gwtest._is_sanitized(gwtest.GATHERD)
# 7.9 MB; under the sanitizers (whose tests here are about paths, races and
# leaks, not time: the stall bounds run in the normal build) a quarter of it,
# still far past the thread pool's threshold: ThreadSanitizer took 90 s to
# parse the full one 12 times
KEYS = 120000 if SANITIZED else 480000
BIG = f"/big?keys={KEYS}"
# The daemon's own longest loop stall, in seconds. Measured on a 2-core VM
# shared with other jobs: 8-40 ms with -O2 and 60-110 ms under ASan (many
# 32 KiB reads in one turn of the loop, ASan's allocator); a loop that
# parses an answer itself stalls 0.5 s (-O2) to 1.5 s (ASan) per answer.
STALL_MAX_S = 0.1 * SLOW
# The probe's worst latency to a fixed answer on the same worker: loose,
# since it counts the probe's own waits for a CPU (8 s and more before).
PROBE_MAX_S = 1.0 * SLOW

_big_text = None


def big_text():
    """The stub's keys=KEYS body."""
    global _big_text
    if _big_text is None:
        _big_text = ("{" + ",".join(f'"k{i}":{i}' for i in range(KEYS)) + "}").encode()
    return _big_text


def stall_daemon(stub, routes, workers=1, budget=2 << 30, pool=None, log_level=None, backends=None, **top):
    """gatherd with backend s (the stub; answers up to 16 MiB, calls of up
    to two minutes: parsing waits its turn on the pool) and the given
    response budget and thread pool. ASan gets a small quarantine, so its
    recycling does not pass for the daemon's own work."""
    bs = {"s": tp.backend(stub.url, timeout_ms=120000, max_response_bytes=16 << 20)}
    bs.update(backends or {})
    cfg = tp.config(bs, routes=routes, memory={"response_body_bytes": budget},
                    thread_pool=pool or {"threads": 2}, **top)
    old = os.environ.get("ASAN_OPTIONS")
    if SANITIZED:
        os.environ["ASAN_OPTIONS"] = ((old + ":") if old else "") + \
            "quarantine_size_mb=8:thread_local_quarantine_size_kb=256"
    try:
        return Daemon(cfg, workers=workers, log_level=log_level)
    finally:
        if old is None:
            os.environ.pop("ASAN_OPTIONS", None)
        else:
            os.environ["ASAN_OPTIONS"] = old


def call(name, path, backend="s", **kw):
    c = {"name": name, "backend": backend, "path": path}
    c.update(kw)
    return c


def route(path, calls, **kw):
    r = {"path": path, "methods": ["GET"], "calls": calls, "deadline_ms": 120000}
    r.update(kw)
    return r


FIXED = {"path": "/fixed", "respond": {"body": {"ok": True}}}


def scrape(d):
    return ta.scrape(d)


def gauge(samples, name, **labels):
    v = ta.metric(samples, name, **labels)
    check(v is not None, f"/metrics has no {name}{labels or ''}")
    return v


def wait_budget_free(d, timeout=20.0):
    """Polls /metrics until the response budget holds nothing and the pool
    is idle; returns the samples."""
    deadline = time.monotonic() + timeout * SLOW
    while True:
        s = scrape(d)
        used = gauge(s, "gatherd_memory_budget_bytes", budget="responses", kind="used")
        idle = gauge(s, "gatherd_thread_pool_queue_depth") == 0 and gauge(s, "gatherd_thread_pool_busy") == 0
        if used == 0 and idle:
            return s
        if time.monotonic() > deadline:
            raise TestFailure(f"the response budget still holds {used:.0f} bytes (pool idle: {idle}) "
                              f"{timeout}s after the last request")
        time.sleep(0.05)


def fire(d, paths, timeout=180.0, method="GET"):
    """One request per path, all at once, each on its own connection:
    [(path, response or the exception)] in the order of paths."""
    out = [None] * len(paths)

    def one(i, p):
        try:
            with tp.Client(d, timeout=timeout * SLOW) as c:
                out[i] = (p, c.request(req(method, p), method=method))
        except Exception as e:  # noqa: BLE001 - reported by the caller
            out[i] = (p, e)

    ts = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(paths)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def status_of(r):
    return r.status if not isinstance(r, Exception) else repr(r)


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:  # noqa: BLE001
        return None


# --- the probe process --------------------------------------------------------

def probe_main(host, port, stopfile):
    """GET /fixed on one keep-alive connection every 10 ms until stopfile
    exists; prints {"n", "max", "p50", "errors"} (seconds). A process of its
    own, so the test's threads reading answers do not delay it."""
    lat, errors, s = [], 0, None
    while not os.path.exists(stopfile):
        t0 = time.monotonic()
        try:
            if s is None:
                s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall(b"GET /fixed HTTP/1.1\r\nHost: p\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b'{"ok":true}'):
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError("closed")
                data += chunk
            lat.append(time.monotonic() - t0)
        except OSError:
            errors += 1
            if s is not None:
                s.close()
            s = None
        time.sleep(0.01)
    lat.sort()
    print(json.dumps({"n": len(lat), "max": lat[-1] if lat else None, "p50": lat[len(lat) // 2] if lat else None,
                      "errors": errors}))


class Probe:
    def __init__(self, d):
        self.stopfile = os.path.join(tempfile.mkdtemp(prefix="gwprobe-"), "stop")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--probe", d.host, str(d.port),
                                      self.stopfile], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     preexec_fn=gwtest._die_with_parent)

    def stop(self):
        open(self.stopfile, "w").close()
        out, _ = self.proc.communicate(timeout=60)
        os.unlink(self.stopfile)
        os.rmdir(os.path.dirname(self.stopfile))
        return json.loads(out)

    def close(self):
        if self.proc.poll() is None:
            gwtest.kill_and_reap(self.proc, 10)


# --- tests ----------------------------------------------------------------------

@atest
def stall_big_answers_keep_the_loop_free():
    """20 answers of 7.9 MB at once on one worker, half parsed (allow) and
    half passed through (checked): every answer is right, the worker's
    longest stall stays under STALL_MAX_S and a probe on the same worker
    is answered within PROBE_MAX_S; afterwards the budget is back to 0."""
    stub = Stub()
    last = f"k{KEYS - 1}"
    d = stall_daemon(stub, [route("/parsed", [call("a", BIG, allow=["k1", last])]),
                            route("/raw", [call("a", BIG)]), FIXED])
    eq(fire(d, ["/fixed"])[0][1].status, 200, "warm-up")
    probe = Probe(d)
    try:
        t0 = time.monotonic()
        res = fire(d, ["/parsed", "/raw"] * 10)
        took = time.monotonic() - t0
        p = probe.stop()
    finally:
        probe.close()
    want_raw = b'{"a":' + big_text() + b"}"
    for path, r in res:
        check(not isinstance(r, Exception), f"{path}: {r!r}")
        eq(r.status, 200, f"{path} status ({r.body[:300]!r})")
        eq(r.header("X-Gateway-Completed"), "true", f"{path} X-Gateway-Completed")
        if path == "/parsed":
            eq(r.json(), {"a": {"k1": 1, last: KEYS - 1}}, "the parsed and shaped answer")
        else:
            check(r.body == want_raw, f"/raw: {len(r.body)} bytes, not the backend's answer as written "
                                      f"({len(want_raw)} bytes)")
    s = scrape(d)
    stall = ta.metric(s, "gatherd_worker_loop_stall_max_seconds", worker="0")
    lag = ta.metric(s, "gatherd_worker_loop_lag_max_seconds", worker="0")
    print(f"# 20 answers in {took:.2f}s: worker stall max "
          f"{'none' if stall is None else '%.1f ms' % (stall * 1000)}, lag max "
          f"{'none' if lag is None else '%.1f ms' % (lag * 1000)}; probe: {p['n']} answers, "
          f"max {p['max'] * 1000:.1f} ms, p50 {p['p50'] * 1000:.1f} ms")
    check(stall is not None, "/metrics has no gatherd_worker_loop_stall_max_seconds")
    check(stall < STALL_MAX_S, f"the worker's loop stalled {stall * 1000:.0f} ms (bound {STALL_MAX_S * 1000:.0f})")
    check(p["max"] < PROBE_MAX_S, f"a probe waited {p['max'] * 1000:.0f} ms for a fixed answer "
                                  f"(bound {PROBE_MAX_S * 1000:.0f})")
    s = wait_budget_free(d)
    jobs = gauge(s, "gatherd_thread_pool_jobs_total")
    check(jobs >= 20, f"the pool ran {jobs} jobs: the answers were not handed to it")
    eq(p["errors"], 0, "probe errors")
    check(p["n"] >= 5, f"only {p['n']} probe answers")
    eq(gauge(s, "gatherd_memory_budget_refused_total", budget="responses"), 0, "budget refusals")


@atest
def stall_large_aggregates_built_and_freed_off_the_loop():
    """A deny that copies the whole object, merge mode, and a HEAD: the
    aggregate is built on the pool and handed to the connection whole."""
    stub = Stub()
    d = stall_daemon(stub, [route("/deny", [call("a", BIG, deny=["k1"])]),
                            route("/merge", [call("a", BIG), call("b", "/x?body=%7B%22extra%22%3Atrue%7D")],
                                  merge="merge"), FIXED])
    res = fire(d, ["/deny", "/merge", "/deny", "/merge"])
    inner = big_text()[1:-1]
    want_deny = b'{"a":{' + inner.replace(b'"k1":1,', b"", 1) + b"}}"
    want_merge = b"{" + inner + b',"extra":true}'
    for path, r in res:
        check(not isinstance(r, Exception), f"{path}: {r!r}")
        eq(r.status, 200, f"{path} status ({r.body[:200]!r})")
        want = want_deny if path == "/deny" else want_merge
        check(r.body == want, f"{path}: {len(r.body)} bytes, want {len(want)}; starts {r.body[:60]!r}")
        eq(r.header("Content-Length"), str(len(want)), f"{path} Content-Length")
    h = fire(d, ["/deny"], method="HEAD")[0][1]
    eq((h.status, h.body, h.header("Content-Length")), (200, b"", str(len(want_deny))), "HEAD /deny")
    s = wait_budget_free(d)
    stall = gauge(s, "gatherd_worker_loop_stall_max_seconds", worker="0")
    print(f"# deny/merge of 7.9 MB: worker stall max {stall * 1000:.1f} ms")
    check(stall < STALL_MAX_S, f"the worker's loop stalled {stall * 1000:.0f} ms (bound {STALL_MAX_S * 1000:.0f})")


@atest
def stall_foreach_of_many_elements():
    """300 foreach elements of 1000 bytes each, all at once: started 64 per
    turn of the loop, parsed on the loop one by one, their 300 KB aggregate
    built and freed on the pool, in order; no long stall."""
    stub = Stub()
    ids = json.dumps({"ids": list(range(300))}, separators=(",", ":"))
    d = stall_daemon(stub, [route("/each", [
        call("src", "/src?body=" + urllib.parse.quote(ids, safe="")),
        call("each", "/e/{item}?size=1000", foreach="src.ids", foreach_max=300, foreach_concurrency=300)]), FIXED])
    r = fire(d, ["/each"])[0][1]
    eq(r.status, 200, f"status ({r.body[:200]!r})")
    j = r.json()
    eq(j["src"], {"ids": list(range(300))}, "the source call")
    eq(j["each"], [{"data": "x" * 989}] * 300, "the 300 elements, in order")
    s = wait_budget_free(d)
    check(gauge(s, "gatherd_thread_pool_jobs_total") >= 2, "the aggregate was built and freed on the pool")
    stall = gauge(s, "gatherd_worker_loop_stall_max_seconds", worker="0")
    check(stall < STALL_MAX_S, f"the worker's loop stalled {stall * 1000:.0f} ms (bound {STALL_MAX_S * 1000:.0f})")


@atest
def stall_budget_refuses_answers_past_it():
    """memory.response_body_bytes of 96 MiB (scaled with KEYS) holds one 7.9 MB body and its
    62 MB tree, not two: of 12 answers at once some fail with 503
    memory_budget, the rest are right; the log says why, once a second at
    most; the budget is back to 0 after, and resident memory stayed within
    the budget (without ASan, whose allocator keeps its own)."""
    stub = Stub()
    budget = (96 << 20) * KEYS // 480000
    last = f"k{KEYS - 1}"
    # one pool thread: answers are parsed one after another, so the one that
    # finds the others' bodies given back always fits (two could both fail)
    d = stall_daemon(stub, [route("/req", [call("a", BIG, allow=[last], required=True)]), FIXED], budget=budget,
                     pool={"threads": 1})
    fire(d, ["/fixed"])
    base_kb = tp.rss_kb(d.pid)
    t0 = time.monotonic()
    res = fire(d, ["/req"] * 12)
    took = time.monotonic() - t0
    ok = refused = 0
    for path, r in res:
        check(not isinstance(r, Exception), f"{path}: {r!r}")
        if r.status == 200:
            eq(r.json(), {"a": {last: KEYS - 1}}, "an answer that fit")
            ok += 1
        else:
            eq((r.status, error_code(r)), (503, "memory_budget"), f"a refused answer ({r.body[:300]!r})")
            eq(r.header("Retry-After"), "1", "Retry-After of memory_budget")
            refused += 1
    check(ok >= 1 and refused >= 1, f"{ok} answered, {refused} refused: want some of each")
    s = wait_budget_free(d)
    eq(gauge(s, "gatherd_memory_budget_bytes", budget="responses", kind="limit"), budget, "the budget's limit")
    check(gauge(s, "gatherd_memory_budget_refused_total", budget="responses") >= refused,
          "memory_budget_refused_total counts the refusals")
    lines = [l for l in d.log().splitlines() if "memory budget: the answer of backend s for call a" in l]
    check(lines, "no log line says why answers were refused")
    contains(lines[0], f"memory.response_body_bytes ({budget} bytes", "the log line names the budget")
    check(len(lines) <= took + 2, f"{len(lines)} memory budget lines in {took:.1f}s: not rate-limited")
    hwm_kb = tp.rss_kb(d.pid, "VmHWM")
    grew = (hwm_kb - base_kb) << 10
    print(f"# 12 answers, budget {budget >> 20} MiB: {ok} answered, {refused} refused; resident memory grew {grew >> 20} MiB "
          f"at most")
    if not SANITIZED:
        check(grew < budget + (48 << 20), f"resident memory grew by {grew >> 20} MiB with a 96 MiB budget")


@atest
def stall_budget_refuses_at_the_first_byte_and_on_the_loop():
    """A 1 MiB budget: a 7.9 MB answer with a Content-Length is refused
    before its body is buffered, a chunked one when its buffer would pass
    the budget, a 15 KB answer whose tree would pass it (parsed on the
    loop: 5000 empty objects take 1.5 MB) while it is parsed; a small answer still passes, and each
    refusal gives back what it took."""
    stub = Stub()
    empties = "[" + ",".join(["{}"] * 5000) + "]"
    d = stall_daemon(stub, [route("/cl", [call("a", BIG, allow=["k1"], required=True)]),
                            route("/chunked", [call("a", BIG + "&chunked=1", allow=["k1"], required=True)]),
                            route("/tree", [call("a", "/t?body=" + urllib.parse.quote(empties), target="[0]",
                                                 required=True)]),
                            route("/small", [call("a", "/users/7", required=True)]), FIXED], budget=1 << 20)
    for path in ("/cl", "/chunked", "/tree"):
        r = fire(d, [path])[0][1]
        eq((r.status, error_code(r)), (503, "memory_budget"), f"{path} ({r.body[:300]!r})")
        eq(gauge(scrape(d), "gatherd_memory_budget_bytes", budget="responses", kind="used"), 0,
           f"budget used after {path}")
    r = fire(d, ["/small"])[0][1]
    eq(r.status, 200, f"/small ({r.body[:300]!r})")
    eq(r.json()["a"]["id"], 7, "/small answer")
    wait_budget_free(d)


@atest
def stall_budget_back_to_zero_on_every_path():
    """Answers that end every way while their body is buffered or parsed
    (truncated and retried, reset, timed out mid-body, too large, invalid
    on the pool, a hedge winning, chunked and parsed on the pool, served
    twice over a kept connection): each gives back exactly what it took,
    so the budget holds 0 after, with nothing refused."""
    stub = Stub()
    bad = urllib.parse.quote("[1," * 7000)  # 21 KB, unterminated: parsed (and refused) on the pool
    cfg_routes = [
        route("/trunc", [call("a", "/t?size=200000&truncate=100000", backend="r", allow=["data"])]),
        route("/reset", [call("a", "/r?size=200000&reset=mid_body", allow=["data"])]),
        route("/slow", [call("a", "/s?size=200000&chunk=10000&chunk_delay=100", allow=["data"], timeout_ms=250)]),
        route("/big", [call("a", "/b?size=300000", backend="small", allow=["data"])]),
        route("/bad", [call("a", "/j?body=" + bad, target="[0]")]),
        route("/hedge", [call("a", "/h?tag=hedge&delay_first=400&size=100000", allow=["data"],
                              hedge_after_ms=50)]),
        route("/chunked", [call("a", "/c?size=300000&chunked=1&chunk=7000", allow=["data"])]),
        route("/small", [call("a", "/k?size=5000", allow=["data"]), call("b", "/k?size=5000", allow=["data"])]),
        FIXED]
    for r in cfg_routes:
        if "calls" in r:
            r["errors"] = True
    d = stall_daemon(stub, cfg_routes,
                     backends={"r": tp.backend(stub.url, retry={"attempts": 3, "backoff_base_ms": 1,
                                                                "backoff_cap_ms": 5}),
                               "small": tp.backend(stub.url, max_response_bytes=250000)})
    want = {"/trunc": "truncated", "/reset": "truncated", "/slow": "timeout", "/big": "too_large", "/bad": "bad_json",
            "/hedge": None, "/chunked": None, "/small": None}
    for _ in range(2):
        for path, r in fire(d, list(want)):
            check(not isinstance(r, Exception), f"{path}: {r!r}")
            eq(r.status, 200, f"{path} status ({r.body[:200]!r})")
            j = r.json()
            code = want[path]
            if code is None:
                check("_errors" not in j and len(j["a"]["data"]) > 4000, f"{path}: {r.body[:200]!r}")
            else:
                eq(j.get("_errors", {}).get("a", {}).get("code"), code, f"{path} failure code ({r.body[:200]!r})")
    s = wait_budget_free(d)
    eq(gauge(s, "gatherd_memory_budget_refused_total", budget="responses"), 0, "budget refusals")


@atest
def stall_parser_queue_full():
    """One pool thread and a queue of one: of 12 answers to parse at once
    some are refused with 503 queue_full (Retry-After: 1), counted in
    thread_pool_rejected_total; the others are right."""
    stub = Stub()
    last = f"k{KEYS - 1}"
    d = stall_daemon(stub, [route("/req", [call("a", BIG, allow=[last], required=True)]), FIXED],
                     pool={"threads": 1, "max_queue": 1})
    res = fire(d, ["/req"] * 12)
    ok = full = 0
    for path, r in res:
        check(not isinstance(r, Exception), f"{path}: {r!r}")
        if r.status == 200:
            eq(r.json(), {"a": {last: KEYS - 1}}, "an answer parsed")
            ok += 1
        else:
            eq((r.status, error_code(r)), (503, "queue_full"), f"a refused answer ({r.body[:300]!r})")
            eq(r.header("Retry-After"), "1", "Retry-After of queue_full")
            full += 1
    check(ok >= 1 and full >= 1, f"{ok} parsed, {full} refused: want some of each")
    s = wait_budget_free(d)
    eq(gauge(s, "gatherd_thread_pool_rejected_total"), full, "thread_pool_rejected_total")
    eq(gauge(s, "gatherd_thread_pool_threads"), 1, "thread_pool_threads")
    check(d.wait_log("thread pool: thread_pool.max_queue (1) answers wait to be parsed"), "the log says why")


@atest
def stall_requests_end_while_their_answers_are_parsed():
    """Deadlines and clients that leave at 30 moments spread over the
    arrival and the parse of 7.9 MB answers (on the pool, or checked): the
    parse jobs are abandoned and come back to be freed; ASan sees no use
    after free, the budget and the pool are back to idle, the worker serves
    on."""
    stub = Stub()
    routes = [FIXED]
    deadlines = [25, 50, 100, 150, 200, 300, 400, 600, 800, 1200]
    for ms_ in deadlines:
        routes.append(route(f"/p{ms_}", [call("a", BIG, allow=["k1"])], deadline_ms=ms_))
        routes.append(route(f"/r{ms_}", [call("a", BIG)], deadline_ms=ms_))
    routes.append(route("/p", [call("a", BIG, allow=["k1"])]))
    d = stall_daemon(stub, routes)
    paths = [f"/p{x}" for x in deadlines] + [f"/r{x}" for x in deadlines]
    for path, r in fire(d, paths):
        check(not isinstance(r, Exception), f"{path}: {r!r}")
        check(r.status == 200 or (r.status, error_code(r)) == (504, "timeout"), f"{path}: {r.status} {r.body[:200]!r}")
    # clients that leave: each closes its connection after a delay
    def leave(delay):
        with tp.Client(d, timeout=30) as c:
            c.send(req("GET", "/p"))
            time.sleep(delay)
    ts = [threading.Thread(target=leave, args=(x / 1000.0 * SLOW,)) for x in deadlines]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wait_budget_free(d, timeout=60)
    r = fire(d, ["/fixed"])[0][1]
    eq(r.status, 200, "the worker serves on")


@atest
def stall_stop_and_reload_while_parsing():
    """A reload while answers are parsed: they finish on their
    configuration. A graceful stop while they are parsed: they are
    answered, then the daemon exits 0. An immediate stop (SIGQUIT) while
    they are parsed: the jobs are waited for and freed, no leak."""
    stub = Stub()
    last = f"k{KEYS - 1}"
    routes = [route("/p", [call("a", BIG, allow=[last])]), FIXED]
    for how in ("reload", "term", "quit"):
        d = stall_daemon(stub, routes, shutdown_timeout_ms=600000)  # the stop waits for the answers
        box = {}
        t = threading.Thread(target=lambda: box.update(res=fire(d, ["/p"] * 4)))
        t.start()
        deadline = time.monotonic() + 30 * SLOW
        while gauge(scrape(d), "gatherd_thread_pool_busy") < 1:
            check(time.monotonic() < deadline, "no answer reached the pool")
            time.sleep(0.01)
        if how == "reload":
            cfg = json.loads(open(d.conf_path).read())
            cfg["thread_pool"] = {"threads": 3, "max_queue": 7}
            cfg["routes"][0]["calls"][0]["allow"] = ["k2"]
            d.reload(cfg)
            check(d.wait_log('"thread_pool" asks for 3 threads; 2 keep running until a restart'),
                  "the reload says the pool keeps its threads")
        elif how == "term":
            d.send_signal(signal.SIGTERM)
        else:
            d.send_signal(signal.SIGQUIT)
        t.join(180 * SLOW)
        check(not t.is_alive(), f"{how}: the requests did not end")
        for path, r in box["res"]:
            if how == "quit":
                check(isinstance(r, Exception) or r.status in (200, 503), f"{how}: {r!r}")
                continue
            check(not isinstance(r, Exception), f"{how}: {r!r}")
            eq(r.status, 200, f"{how}: status ({r.body[:200]!r})")
            eq(r.json(), {"a": {last: KEYS - 1}}, f"{how}: the answer, shaped as configured when it began")
        if how == "reload":
            eq(fire(d, ["/p"])[0][1].json(), {"a": {"k2": 2}}, "after the reload")
            wait_budget_free(d)
            d.stop()
        else:
            code = d.wait(60 * SLOW)
            check(code is not None, f"{how}: the daemon did not exit")
            if how == "term":
                eq(code, 0, "graceful stop exit code")
        d.close()


@atest
def stall_metrics_exposed():
    """The families /metrics adds for stalls, the pool and the budget, per
    worker where they are per worker, with the configured values."""
    stub = Stub()
    d = stall_daemon(stub, [FIXED], workers=2, budget=123456789, pool={"threads": 3, "max_queue": 9})
    time.sleep(0.2)
    s = scrape(d)
    for w in ("0", "1"):
        check(gauge(s, "gatherd_worker_loop_stall_max_seconds", worker=w) >= 0, "stall max")
        check(gauge(s, "gatherd_worker_loop_lag_max_seconds", worker=w) >= 0, "lag max")
    check(gauge(s, "gatherd_worker_loop_stall_seconds_count") > 0, "the probe runs")
    eq(gauge(s, "gatherd_thread_pool_threads"), 3, "threads")
    eq(gauge(s, "gatherd_memory_budget_bytes", budget="responses", kind="limit"), 123456789, "limit")
    eq(gauge(s, "gatherd_memory_budget_bytes", budget="responses", kind="used"), 0, "used")


@gwtest.test
def stall_thread_pool_config():
    """thread_pool keys: ranges, types and unknown keys are errors with the
    JSON path; the defaults load."""
    base = {"listen": ["127.0.0.1:8080"], "routes": [FIXED]}
    bad = [({"threads": 0}, "thread_pool.threads: must be between 1 and 64"),
           ({"threads": 65}, "thread_pool.threads: must be between 1 and 64"),
           ({"max_queue": 0}, "thread_pool.max_queue: must be between 1 and 1000000"),
           ({"threads": "2"}, "thread_pool.threads: must be an integer"),
           ({"thread": 2}, 'unknown key "thread" in "thread_pool"'),
           ([], "thread_pool: must be an object")]
    for tpconf, msg in bad:
        with TempDir() as t:
            rc, _, err = run_cli(["-t", "-c", t.write("g.json", dict(base, thread_pool=tpconf))])
            eq(rc, 1, f"exit code for {tpconf!r}")
            contains(err, msg, f"stderr for {tpconf!r}")
    for tpconf in ({}, {"threads": 1, "max_queue": 1}, {"threads": 64, "max_queue": 1000000}):
        with TempDir() as t:
            rc, _, err = run_cli(["-t", "-c", t.write("g.json", dict(base, thread_pool=tpconf))])
            eq(rc, 0, f"exit code for {tpconf!r} ({err!r})")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--probe":
        probe_main(*sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
