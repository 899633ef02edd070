#!/usr/bin/env python3
"""Integration tests of gatherd's aggregate routes (README "Aggregate routes"):
the real daemon in front of the stub backend (tests/stub/gw_stub), raw HTTP on
both sides. The stub's echo=1 answer tells what each call sent and, with
received_ms (CLOCK_MONOTONIC, the clock of Python's time.monotonic()), when it
reached the backend; its /stats tells how many requests were in flight at once
and whether gatherd closed a cancelled call's connection (abort_on_eof=1).

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_agg.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed"; the exit code is 1 when
anything failed.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, check, contains, eq, main, req  # noqa: E402

# test_proxy holds the Stub, Client and resource helpers; importing it
# registers its tests, so the registry is put back afterwards.
_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms
atest = tp.ptest     # a test whose stubs and clients are closed when it ends
Stub = tp.Stub
Client = tp.Client

CODE_STATUS = {"timeout": 504, "unavailable": 503, "connect_failed": 502, "bad_status": 502, "bad_json": 502,
               "too_large": 502, "truncated": 502, "bad_response": 502, "missing_target": 502,
               "missing_value": 502, "invalid_value": 502, "dependency_failed": 502, "too_many_items": 502}


# --- building configurations ------------------------------------------------------------

def pq(value):
    """Percent-encodes every byte but the unreserved ones (what the README
    promises for template values in a path)."""
    return urllib.parse.quote(value, safe="")


def jbody(obj):
    """A stub body= control giving obj as the JSON answer (percent-encoded, so
    the call's path template holds no brace or quote)."""
    return "body=" + pq(json.dumps(obj, separators=(",", ":")))


def call(name, path, backend="s", **kw):
    c = {"name": name, "backend": backend, "path": path}
    c.update(kw)
    return c


def route(path, calls, methods=("GET",), **kw):
    r = {"path": path, "methods": list(methods), "calls": calls}
    r.update(kw)
    return r


def agg_daemon(routes, stub, stub2=None, workers=1, backends=None, http=None):
    """gatherd with backends s (stub), s2 (stub2, for cancellation checks),
    small (stub, max_response_bytes 100), one (stub, max_connections 1, no queue) and
    dead (a closed port), plus backends; one worker by default so that pools
    and max_connections are predictable."""
    bs = {"s": tp.backend(stub.url),
          "small": tp.backend(stub.url, max_response_bytes=100),
          "one": tp.backend(stub.url, max_connections=1, max_pending=0),
          "dead": tp.backend(f"http://127.0.0.1:{tp.closed_port()}")}
    if stub2 is not None:
        bs["s2"] = tp.backend(stub2.url)
    bs.update(backends or {})
    return Daemon(tp.config(bs, routes=routes, http=http), workers=workers)


def now_ms():
    return time.monotonic() * 1000.0


def get(d, path, headers=None, method="GET", body=b"", timeout=10.0):
    """One request on a new connection: (response, seconds)."""
    with Client(d, timeout=timeout) as c:
        t0 = time.monotonic()
        r = c.request(req(method, path, headers=headers, body=body))
        return r, time.monotonic() - t0


def ok_json(r, completed=True, what=""):
    """A 200 aggregate answer: checks the status, Content-Type and
    X-Gateway-Completed; returns the document."""
    eq(r.status, 200, f"{what} status (response {r.raw[:600]!r})")
    contains(r.header("Content-Type") or "", "application/json", f"{what} Content-Type")
    eq(r.header("X-Gateway-Completed"), "true" if completed else "false", f"{what} X-Gateway-Completed")
    j = r.json()
    check(isinstance(j, dict), f"{what} answer is not an object: {r.body[:300]!r}")
    return j


# codes where the backend never gave a status (none to report)
NO_STATUS = ("timeout", "unavailable", "connect_failed", "bad_response", "missing_value", "invalid_value",
             "dependency_failed", "too_many_items")


def check_status_field(e, code, backend_status, what):
    """status: the backend's when it answered (bad_status), absent when it
    never answered; for a 2xx answer that failed later (bad_json, too_large,
    truncated, missing_target) the README leaves it open: absent or 2xx."""
    if backend_status is not None:
        eq(e.get("status"), backend_status, f"{what} status in {e}")
    elif code in NO_STATUS:
        check("status" not in e, f"{what} status without a backend answer: {e}")
    elif "status" in e:
        check(isinstance(e["status"], int) and 200 <= e["status"] < 300, f"{what} status: {e}")


def error_json(r, status, code, call_name, backend_status=None, what=""):
    """A failed request: status, {"error": {"code", "call", "status"?, "request_id"}}."""
    eq(r.status, status, f"{what} status (response {r.raw[:600]!r})")
    contains(r.header("Content-Type") or "", "application/json", f"{what} Content-Type")
    j = r.json()
    check(isinstance(j, dict) and isinstance(j.get("error"), dict), f"{what} error body shape: {r.body[:300]!r}")
    e = j["error"]
    eq(e.get("code"), code, f"{what} error.code in {r.body[:300]!r}")
    eq(e.get("call"), call_name, f"{what} error.call in {r.body[:300]!r}")
    check_status_field(e, code, backend_status, f"{what} error")
    rid = r.header("X-Request-Id")
    check(rid, f"{what} X-Request-Id header missing")
    eq(e.get("request_id"), rid, f"{what} error.request_id vs X-Request-Id")
    check(r.header("X-Gateway-Completed") != "true", f"{what} X-Gateway-Completed: true on an error")
    return e


def server_timing(r):
    """Server-Timing as {name: (dur, {param: value})}; every entry has dur."""
    raw = r.header("Server-Timing")
    check(raw, f"Server-Timing missing (response {r.raw[:400]!r})")
    out = {}
    for part in raw.split(","):
        items = [p.strip() for p in part.strip().split(";")]
        name, params = items[0], {}
        check(re.match(r"^[A-Za-z0-9_-]+$", name), f"Server-Timing entry name {name!r} in {raw!r}")
        for p in items[1:]:
            k, _, v = p.partition("=")
            params[k.strip()] = v.strip()
        check("dur" in params, f"Server-Timing entry {name!r} without dur: {raw!r}")
        try:
            dur = float(params["dur"])
        except ValueError:
            raise TestFailure(f"Server-Timing dur of {name!r} is not a number: {raw!r}")
        check(dur >= 0, f"negative dur in {raw!r}")
        check(name not in out, f"Server-Timing entry {name!r} twice: {raw!r}")
        out[name] = (dur, params)
    return out


def norm_pct(s):
    """Upper-cases the hex digits of %XX escapes (either case is valid)."""
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), s)


# --- concurrency and ordering ----------------------------------------------------------------

@atest
def agg_independent_calls_run_concurrently():
    s = Stub()
    d = agg_daemon([route("/c3", [call("a", "/one?delay=300&echo=1"), call("b", "/two?delay=300&echo=1"),
                                  call("c", "/three?delay=300&echo=1")])], s)
    for attempt in range(2):
        r, dt = get(d, "/c3")
        j = ok_json(r)
        eq(list(j.keys()), ["a", "b", "c"], "keys in the order the calls are listed")
        eq([j[k]["path"] for k in "abc"], ["/one", "/two", "/three"], "paths the calls sent")
        check(dt >= 0.29, f"answered in {dt:.3f}s, before the 300 ms calls could finish")
        check(dt < 0.75, f"three 300 ms calls took {dt:.3f}s: not concurrent")
        rec = [j[k]["received_ms"] for k in "abc"]
        check(max(rec) - min(rec) < 100, f"calls reached the backend {max(rec) - min(rec):.1f} ms apart: {rec}")


@atest
def agg_dependent_call_starts_when_its_dependency_finishes():
    """c needs a (100 ms); b (400 ms) is independent: c starts right after a,
    not after b (no waves), and the answer comes when b is done."""
    s = Stub()
    d = agg_daemon([route("/dep", [call("a", "/a?delay=100&echo=1"),
                                   call("b", "/b?delay=400&echo=1"),
                                   call("c", "/c/{a.method}/{a.connection_id}?echo=1")])], s)
    for attempt in range(2):
        t0 = now_ms()
        r, dt = get(d, "/dep")
        j = ok_json(r)
        ra, rb, rc = (j[k]["received_ms"] for k in "abc")
        eq(j["c"]["path"], f"/c/GET/{j['a']['connection_id']}", "c's path rendered from a's answer")
        check(abs(ra - rb) < 100, f"a and b started {abs(ra - rb):.1f} ms apart")
        check(ra - t0 < 150, f"a reached the backend {ra - t0:.1f} ms after the client sent")
        check(rc - ra >= 99, f"c reached the backend {rc - ra:.1f} ms after a: before a's 100 ms answer")
        check(rc - ra < 250, f"c reached the backend {rc - ra:.1f} ms after a: it waited for b (400 ms)")
        check(rc < rb + 400, f"c started at {rc - rb:.1f} ms after b, after b had finished")
        check(0.39 <= dt < 0.7, f"answer after {dt:.3f}s (b takes 400 ms)")


@atest
def agg_after_orders_calls_without_templates():
    s = Stub()
    d = agg_daemon([route("/after", [call("c", "/c?echo=1", after=["b"]),
                                     call("a", "/a?delay=150&echo=1"),
                                     call("b", "/b?delay=100&echo=1", after=["a"]),
                                     call("x", "/x?echo=1")])], s)
    r, dt = get(d, "/after")
    j = ok_json(r)
    eq(list(j.keys()), ["c", "a", "b", "x"], "keys in the order the calls are listed")
    ra, rb, rc, rx = (j[k]["received_ms"] for k in "abcx")
    check(rb - ra >= 149, f"b reached the backend {rb - ra:.1f} ms after a (after: a, 150 ms)")
    check(rc - rb >= 99, f"c reached the backend {rc - rb:.1f} ms after b (after: b, 100 ms)")
    check(abs(rx - ra) < 100, f"x (no dependency) started {rx - ra:.1f} ms from a")
    check(dt >= 0.249, f"answer after {dt:.3f}s, before the chain could finish")


# --- foreach ------------------------------------------------------------------------------------

@atest
def agg_foreach_keeps_element_order():
    s = Stub()
    items = [{"i": 0, "d": 300}, {"i": 1, "d": 200}, {"i": 2, "d": 100}, {"i": 3, "d": 0}]
    d = agg_daemon([
        route("/fe", [call("src", "/src?" + jbody({"items": items})),
                      call("fe", "/fe/{item.i}?delay={item.d}&echo=1", foreach="src.items")]),
        route("/fe-root", [call("src", "/src?" + jbody([5, 6, 7])),
                           call("fe", "/p/{item}?echo=1", foreach="src")]),
        route("/fe-empty", [call("src", "/src?" + jbody({"items": []})),
                            call("fe", "/p/{item}?echo=1", foreach="src.items")]),
    ], s)
    r, dt = get(d, "/fe")
    j = ok_json(r)
    eq(j["src"], {"items": items}, "the source call's answer")
    check(isinstance(j["fe"], list), f"foreach result is not an array: {j['fe']!r}")
    eq([e["path"] for e in j["fe"]], ["/fe/0", "/fe/1", "/fe/2", "/fe/3"], "foreach results in element order")
    eq([e["query"] for e in j["fe"]], [f"delay={x['d']}&echo=1" for x in items], "queries of the elements")
    rec = [e["received_ms"] for e in j["fe"]]
    check(max(rec) - min(rec) < 100, f"elements reached the backend {max(rec) - min(rec):.1f} ms apart: {rec}")
    check(dt < 0.6, f"foreach of 300/200/100/0 ms took {dt:.3f}s: not concurrent")
    r, dt = get(d, "/fe-root")
    j = ok_json(r, what="/fe-root")
    eq([e["path"] for e in j["fe"]], ["/p/5", "/p/6", "/p/7"], "foreach over a root array")
    r, dt = get(d, "/fe-empty")
    j = ok_json(r, what="/fe-empty")
    eq(j.get("fe"), [], "foreach over an empty array")


@atest
def agg_foreach_concurrency_limit():
    s = Stub()
    items = list(range(10))
    d = agg_daemon([
        route("/fc3", [call("src", "/src?" + jbody(items)),
                       call("fe", "/fe/{item}?delay=150", foreach="src", foreach_concurrency=3)]),
        route("/fc-default", [call("src", "/src?" + jbody(items)),
                              call("fe", "/fe/{item}?delay=150", foreach="src")]),
        route("/fc1", [call("src", "/src?" + jbody([0, 1, 2])),
                       call("fe", "/fe/{item}?delay=100&echo=1", foreach="src", foreach_concurrency=1)]),
    ], s)
    s.get("/stats?reset=1")
    r, dt = get(d, "/fc3")
    j = ok_json(r)
    eq(j["fe"], [{"ok": True, "path": f"/fe/{i}"} for i in items], "foreach results")
    st = s.stats()
    eq(st["max_in_flight"], 3, f"elements in flight at once with foreach_concurrency 3 (stats {st})")
    check(dt >= 0.59, f"10 elements, 3 at a time, 150 ms each took {dt:.3f}s: fewer than 4 rounds")
    check(dt < 1.2, f"10 elements, 3 at a time, 150 ms each took {dt:.3f}s")
    s.get("/stats?reset=1")
    r, dt = get(d, "/fc-default")
    ok_json(r, what="/fc-default")
    st = s.stats()
    eq(st["max_in_flight"], 8, f"elements in flight at once by default (8) (stats {st})")
    check(0.29 <= dt < 0.8, f"10 elements, 8 at a time, 150 ms each took {dt:.3f}s (2 rounds)")
    r, dt = get(d, "/fc1")
    j = ok_json(r, what="/fc1")
    rec = [e["received_ms"] for e in j["fe"]]
    check(rec[1] - rec[0] >= 99 and rec[2] - rec[1] >= 99, f"foreach_concurrency 1 overlapped: {rec}")


@atest
def agg_foreach_element_failures():
    s = Stub()
    items = [{"s": 200, "n": 0}, {"s": 500, "n": 1}, {"s": 200, "n": 2}, {"s": 503, "n": 3}]
    src = call("src", "/src?" + jbody({"items": items}))
    d = agg_daemon([
        route("/fef", [src, call("fe", "/fe/{item.n}?status={item.s}", foreach="src.items")], errors=True),
        route("/fef-fb", [src, call("fe", "/fe/{item.n}?status={item.s}", foreach="src.items",
                                    fallback={"fb": True})], errors=True),
        route("/fef-req", [call("src", "/src?" + jbody([{"s": 200, "n": 0}, {"s": 500, "n": 1}])),
                           call("fe", "/fe/{item.n}?status={item.s}", foreach="src", required=True)]),
        route("/fef-nosrc", [call("src", "/src?status=500"),
                             call("fe", "/fe/{item}", foreach="src.items")], errors=True),
        route("/fef-absent", [call("src", "/src?" + jbody({"other": 1})),
                              call("fe", "/fe/{item}", foreach="src.items")], errors=True),
    ], s)
    r, _ = get(d, "/fef")
    j = ok_json(r, completed=False)
    eq(j["fe"], [{"ok": True, "path": "/fe/0"}, None, {"ok": True, "path": "/fe/2"}, None],
       "failed elements are null without a fallback")
    check("fe" in j.get("_errors", {}), f"_errors of a foreach call with failed elements: {j.get('_errors')}")
    eq(j["_errors"]["fe"].get("failed"), [1, 3], "_errors.fe.failed")
    check("src" not in j["_errors"], f"_errors names a call that succeeded: {j['_errors']}")
    r, _ = get(d, "/fef-fb")
    j = ok_json(r, completed=False, what="/fef-fb")
    eq(j["fe"], [{"ok": True, "path": "/fe/0"}, {"fb": True}, {"ok": True, "path": "/fe/2"}, {"fb": True}],
       "failed elements get the fallback")
    r, _ = get(d, "/fef-req")
    error_json(r, 502, "bad_status", "fe", backend_status=500, what="required foreach")
    # a foreach call that cannot run at all: its key is left out
    r, _ = get(d, "/fef-nosrc")
    j = ok_json(r, completed=False, what="/fef-nosrc")
    check("src" not in j, f"failed source without fallback is present: {j}")
    eq(j["_errors"]["src"]["code"], "bad_status", "_errors.src.code")
    eq(j["_errors"]["fe"]["code"], "dependency_failed", "_errors.fe.code when the source failed")
    r, _ = get(d, "/fef-absent")
    j = ok_json(r, completed=False, what="/fef-absent")
    check("fe" not in j, f"foreach over an absent array has a key: {j}")
    check("fe" in j.get("_errors", {}), f"foreach over an absent array not in _errors: {j}")


# --- failure codes -----------------------------------------------------------------------------

# (case, call path, call backend, extra call keys, code, backend status or None, preceding calls)
FAILURES = [
    ("status500", "/x?status=500", "s", {}, "bad_status", 500, []),
    ("status404", "/x?status=404", "s", {}, "bad_status", 404, []),
    ("status302", "/x?status=302&header=Location:/y", "s", {}, "bad_status", 302, []),
    ("badjson", "/x?bad_json=1", "s", {}, "bad_json", None, []),
    ("html", "/x?body=%3Chtml%3E&header=Content-Type:text/html", "s", {}, "bad_json", None, []),
    ("toolarge", "/x?size=1000", "small", {}, "too_large", None, []),
    ("toolarge_chunked", "/x?size=1000&chunked=1", "small", {}, "too_large", None, []),
    ("truncate", "/x?size=100&truncate=10", "s", {}, "truncated", None, []),
    ("midbody", "/x?size=100&close=mid_body", "s", {}, "truncated", None, []),
    ("reset_after_headers", "/x?size=100&reset=after_headers", "s", {}, "truncated", None, []),
    ("chunked_cut", "/x?size=1000&chunked=1&chunk=100&truncate=300", "s", {}, "truncated", None, []),
    ("timeout", "/x?delay=3000", "s", {"timeout_ms": 200}, "timeout", None, []),
    ("connect", "/x", "dead", {}, "connect_failed", None, []),
    ("garbage", "/x?garbage=1", "s", {}, "bad_response", None, []),
    ("target", "/users/3", "s", {"target": "nothere.at_all"}, "missing_target", None, []),
    ("target_index", "/orders?user=3", "s", {"target": "items[5]"}, "missing_target", None, []),
    ("missing", "/x/{a.nope}", "s", {}, "missing_value", None, [call("a", "/users/1")]),
    ("null", "/x/{a.v}", "s", {}, "missing_value", None, [call("a", "/a?" + jbody({"v": None}))]),
    ("object", "/x/{a.v}", "s", {}, "invalid_value", None, [call("a", "/a?" + jbody({"v": {"k": 1}}))]),
    ("array", "/x?q={a.v}", "s", {}, "invalid_value", None, [call("a", "/a?" + jbody({"v": [1]}))]),
    ("empty", "/x/{a.v}", "s", {}, "invalid_value", None, [call("a", "/a?" + jbody({"v": ""}))]),
    ("dot", "/x/{a.v}", "s", {}, "invalid_value", None, [call("a", "/a?" + jbody({"v": "."}))]),
    ("dotdot", "/x/{a.v}/y", "s", {}, "invalid_value", None, [call("a", "/a?" + jbody({"v": ".."}))]),
    ("header_crlf", "/x", "s", {"headers": {"X-V": "{a.v}"}}, "invalid_value", None,
     [call("a", "/a?" + jbody({"v": "a\r\nX-Injected: 1"}))]),
    ("dependency", "/x/{a.id}", "s", {}, "dependency_failed", None, [call("a", "/users/1?status=500")]),
    ("items", "/x/{item}", "s", {"foreach": "a", "foreach_max": 2}, "too_many_items", None,
     [call("a", "/a?" + jbody([1, 2, 3]))]),
]


@atest
def agg_failure_codes_optional_and_required():
    """Each code of the README's table that the stub can produce: an optional
    call gets 200 with X-Gateway-Completed: false, the key left out and
    _errors naming the code; a required one gets the table's status and the
    error body."""
    check_failure_cases(FAILURES)


def check_failure_cases(cases):
    """Each case (name, call path, backend, call keys, code, backend status,
    calls before) as an optional call (200, X-Gateway-Completed: false, the
    key left out, _errors naming the code) and as a required one (the
    table's status and the error body)."""
    s = Stub()
    routes = []
    for case, path, backend, extra, code, bstatus, pre in cases:
        for mode in ("opt", "req"):
            f = call("f", path, backend=backend, **extra)
            if mode == "req":
                f["required"] = True
            routes.append(route(f"/f/{case}/{mode}", pre + [call("ok", "/users/5"), f],
                                errors=True, deadline_ms=ms(3000)))
    d = agg_daemon(routes, s)
    problems = []
    for case, path, backend, extra, code, bstatus, pre in cases:
        try:
            r, dt = get(d, f"/f/{case}/opt")
            j = ok_json(r, completed=False, what=case)
            eq(j.get("ok"), {"id": 5, "name": "User 5", "email": "user5@example.com", "tier": "gold"},
               f"{case}: the call that succeeded")
            check("f" not in j, f"{case}: a failed call without fallback has a key: {j.get('f')!r}")
            errs = j.get("_errors")
            check(isinstance(errs, dict) and "f" in errs, f"{case}: _errors: {errs!r}")
            e = errs["f"]
            eq(e.get("code"), code, f"{case}: _errors.f.code")
            check_status_field(e, code, bstatus, f"{case}: _errors.f")
            check(isinstance(e.get("ms"), (int, float)) and e["ms"] >= 0, f"{case}: _errors.f.ms: {e}")
            check("ok" not in errs, f"{case}: _errors names a call that succeeded: {errs}")
            if code == "timeout":
                check(0.19 <= dt < 0.2 + 0.6 * SLOW, f"{case}: a 200 ms timeout answered after {dt:.3f}s")
            r, dt = get(d, f"/f/{case}/req")
            error_json(r, CODE_STATUS[code], code, "f", backend_status=bstatus, what=f"{case} required")
        except TestFailure as ex:
            problems.append(str(ex))
    check(not problems, f"{len(problems)} of {len(cases)} cases failed:\n  " + "\n  ".join(problems))


def raw(data, **more):
    """A call path whose stub answer is data, byte for byte, then a FIN."""
    return tp.raw_path(data, prefix="/raw", **more)


CH = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

# Malformed answers (gw_resp): bad_response, with no status reported; sizes
# over max_response_bytes: too_large (2xx) or bad_status (the status is the
# answer); a 304 never waits for a body.
RESP_FAILURES = [
    ("status600", raw("HTTP/1.1 600 High\r\nContent-Length: 2\r\n\r\n{}"), "s", {}, "bad_response", None, []),
    ("status999", raw("HTTP/1.1 999 High\r\nContent-Length: 2\r\n\r\n{}"), "s", {}, "bad_response", None, []),
    ("status000", raw("HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\n{}"), "s", {}, "bad_response", None, []),
    ("status099", raw("HTTP/1.1 099 Low\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"), "s", {},
     "bad_response", None, []),
    ("status101", raw("HTTP/1.1 101 Switching\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"), "s", {},
     "bad_response", None, []),
    ("http2", raw("HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"), "s", {}, "bad_response", None, []),
    ("badchunk", raw(CH + "zz\r\n{}\r\n0\r\n\r\n"), "s", {}, "bad_response", None, []),
    ("chunkext", raw(CH + "2;x=" + "e" * 5000 + "\r\n{}\r\n0\r\n\r\n"), "s", {}, "bad_response", None, []),
    ("chunk_crlf", raw(CH + "2\r\n{}XX0\r\n\r\n"), "s", {}, "bad_response", None, []),
    ("chunk_line_cr", raw(CH + "2\r\n{}\r\n0\rX-T: 1\r\n\r\n"), "s", {}, "bad_response", None, []),
    ("te_gzip", raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}"), "s", {}, "bad_response", None, []),
    ("te_list", raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"), "s", {},
     "bad_response", None, []),
    ("cl_te", raw("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
     "s", {}, "bad_response", None, []),
    ("dup_cl", raw("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}"), "s", {}, "bad_response",
     None, []),
    ("lf_only", raw("HTTP/1.1 200 OK\nContent-Length: 2\n\n{}"), "s", {}, "bad_response", None, []),
    ("cr_alone", raw("HTTP/1.1 200 OK\rContent-Length: 2\r\n\r\n{}"), "s", {}, "bad_response", None, []),
    ("ctl_value", raw("HTTP/1.1 200 OK\r\nX-A: \x01\r\nContent-Length: 2\r\n\r\n{}"), "s", {}, "bad_response", None,
     []),
    ("trunc_head", raw("HTTP/1.1 200 OK\r\nContent-Len"), "s", {}, "truncated", None, []),
    ("chunk_max", raw(CH + "ffffffffffffffff\r\n{}"), "s", {}, "too_large", None, []),
    ("chunk_over", raw(CH + "65\r\n" + "x" * 101 + "\r\n0\r\n\r\n"), "small", {}, "too_large", None, []),
    ("cl_max", raw("HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n{}"), "s", {}, "bad_response",
     None, []),
    ("err_cl_over", raw("HTTP/1.1 404 Not Found\r\nContent-Length: 1000\r\n\r\n"), "small", {}, "bad_status", 404, []),
    ("err_chunk_over", raw("HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"), "small", {},
     "bad_status", 503, []),
    ("not_modified", raw("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"), "s", {}, "bad_status", 304, []),
]


@atest
def agg_malformed_and_oversized_backend_answers():
    check_failure_cases(RESP_FAILURES)


@atest
def agg_sizes_over_the_limit_fail_before_the_body():
    """A Content-Length or chunk size over max_response_bytes ends the call
    when it is read, whatever the status, without waiting for the body the
    backend holds back."""
    s = Stub()
    hold = ms(5000)
    heads = [("cl", "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", "too_large"),
             ("chunk", CH + "3e8\r\n", "too_large"),
             ("chunk_max", CH + "ffffffffffffffff\r\n", "too_large"),
             ("err_cl", "HTTP/1.1 500 Oops\r\nContent-Length: 1000\r\n\r\n", "bad_status"),
             ("err_chunk", "HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n", "bad_status")]
    calls = [call(n, raw(h + "x" * 1000, chunk=len(h), chunk_delay=hold), backend="small") for n, h, _ in heads]
    d = agg_daemon([route("/over", calls, errors=True, deadline_ms=ms(10000))], s)
    r, dt = get(d, "/over")
    j = ok_json(r, completed=False)
    for n, _, code in heads:
        eq(j["_errors"].get(n, {}).get("code"), code, f"{n}: code ({j['_errors']})")
    check(dt < hold / 2000.0, f"answered after {dt:.2f}s: a call waited for the body")


@atest
def agg_no_content_answers_ignore_their_framing():
    """A 204 is null whatever its head says; its stray bytes never become an
    answer; interim heads are skipped whatever they say."""
    s = Stub()
    d = agg_daemon([route("/nc", [
        call("cl", raw("HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n{\"a\":1}")),
        call("chunked", raw("HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"a\":1}\r\n0\r\n\r\n")),
        call("interim", raw("HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\n"
                            "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"b\":2}")),
        # an interim response that is not keep-alive used to swallow the final one
        call("interim10", raw("HTTP/1.0 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n{\"c\":3}")),
    ], errors=True)], s)
    r, _ = get(d, "/nc")
    j = ok_json(r)
    eq(j, {"cl": None, "chunked": None, "interim": {"b": 2}, "interim10": {"c": 3}}, "answers")


@atest
def agg_unavailable_when_backend_connections_are_used_up():
    s = Stub()
    d = agg_daemon([route("/hold", [call("h", "/h?delay=800", backend="one")]),
                    route("/need", [call("n", "/n", backend="one", required=True)]),
                    route("/want", [call("n", "/n", backend="one"), call("ok", "/users/1")], errors=True)], s)
    holder = Client(d)
    holder.send(req("GET", "/hold"))
    s.wait_stats(lambda st: st["in_flight"] == 1, 2, "the holding call reached the backend")
    r, dt = get(d, "/need")
    error_json(r, 503, "unavailable", "n", what="required call on a full backend")
    check(dt < 0.5, f"unavailable answered after {dt:.3f}s (it must not wait for a connection)")
    r, dt = get(d, "/want")
    j = ok_json(r, completed=False, what="optional call on a full backend")
    eq(j["_errors"]["n"]["code"], "unavailable", "_errors.n.code")
    r = holder.read_response()
    ok_json(r, what="the holding request")
    # the connection is free again
    r, dt = get(d, "/need")
    j = ok_json(r, what="after the holder finished")
    eq(j["n"], {"ok": True, "path": "/n"}, "the call once the backend has room")


# --- statuses, fallbacks, _errors --------------------------------------------------------------

@atest
def agg_required_failure_answers_at_once_and_cancels_the_rest():
    s, s2 = Stub(), Stub()
    d = agg_daemon([route("/rq", [call("slow", "/slow?delay=3000&abort_on_eof=1", backend="s2"),
                                  call("bad", "/bad?delay=100&status=500", required=True),
                                  call("fine", "/users/2")]),
                    route("/rq-timeout", [call("slow", "/slow?delay=3000&abort_on_eof=1", backend="s2",
                                               timeout_ms=ms(200), required=True)])], s, s2)
    r, dt = get(d, "/rq")
    error_json(r, 502, "bad_status", "bad", backend_status=500)
    check(dt < 0.1 + 0.5 * SLOW, f"required failure answered after {dt:.3f}s, not at once (slow call: 3 s)")
    st, t = s2.wait_stats(lambda st: st["open_connections"] == 0 and st["in_flight"] == 0, 1.0,
                          "the cancelled call's connection closed")
    timing = server_timing(r)
    check("bad" in timing and "total" in timing, f"Server-Timing of an error answer: {r.header('Server-Timing')}")
    r, dt = get(d, "/rq-timeout")
    error_json(r, 504, "timeout", "slow")
    check(dt < 0.2 + 0.6 * SLOW, f"a 200 ms timeout answered after {dt:.3f}s")
    s2.wait_stats(lambda st: st["open_connections"] == 0, 1.0, "the timed-out call's connection closed")


@atest
def agg_fallback_values_and_errors_report():
    s = Stub()
    fails = [call("fo", "/x?status=500", fallback={"a": 1}),
             call("fa", "/x?status=500", fallback=[]),
             call("fn", "/x?status=500", fallback=None),
             call("fs", "/x?status=500", fallback="none"),
             call("fz", "/x?status=500", fallback=0),
             call("gone", "/x?status=500"),
             call("ok", "/users/9")]
    d = agg_daemon([route("/fb", fails), route("/fb-e", fails, errors=True),
                    route("/good", [call("a", "/users/1"), call("b", "/x?status=204"),
                                    call("c", "/x?status=201&" + jbody([1, 2]))], errors=True)], s)
    r, _ = get(d, "/fb")
    j = ok_json(r, completed=False)
    eq(j, {"fo": {"a": 1}, "fa": [], "fn": None, "fs": "none", "fz": 0,
           "ok": {"id": 9, "name": "User 9", "email": "user9@example.com", "tier": "gold"}},
       "fallbacks in place, a failed call without one left out, no _errors by default")
    eq(list(j.keys()), ["fo", "fa", "fn", "fs", "fz", "ok"], "key order")
    r, _ = get(d, "/fb-e")
    j = ok_json(r, completed=False, what="errors: true")
    errs = j.get("_errors")
    check(isinstance(errs, dict), f"_errors with errors: true: {j}")
    eq(sorted(errs.keys()), sorted(["fo", "fa", "fn", "fs", "fz", "gone"]), "calls in _errors")
    for k, e in errs.items():
        eq(e.get("code"), "bad_status", f"_errors.{k}.code")
        eq(e.get("status"), 500, f"_errors.{k}.status")
        check(isinstance(e.get("ms"), (int, float)) and e["ms"] >= 0, f"_errors.{k}.ms: {e}")
    eq(j["fo"], {"a": 1}, "fallback with errors: true")
    check("gone" not in j, "a failed call without fallback has a key with errors: true")
    r, _ = get(d, "/good")
    j = ok_json(r, completed=True, what="everything succeeded")
    check("_errors" not in j, f"_errors when every call succeeded: {j}")
    eq(j["b"], None, "a 204 answer is null")
    eq(j["c"], [1, 2], "a 201 answer")


@atest
def agg_fallback_never_replaces_an_answer():
    """A call with a fallback that succeeds gives its answer, whichever way
    the answer is handled: copied unparsed (nothing reads or shapes it, the
    README's "recs"), parsed because a template reads it, or shaped."""
    s = Stub()
    text = '{"items": [1, 2.50, 3], "user": 7}'
    answer = json.loads(text)
    q = "/r?body=" + pq(text)
    fb = {"items": []}
    d = agg_daemon([route("/raw", [call("recs", q, fallback=fb)]),
                    route("/read", [call("recs", q, fallback=fb), call("next", "/users/{recs.user}")]),
                    route("/shaped", [call("recs", q, fallback=fb, deny=["user"])]),
                    route("/merged", [call("recs", q, fallback=fb)], merge="merge")], s)
    for path, want in (("/raw", {"recs": {"items": [1, 2.5, 3], "user": 7}}),
                       ("/read", {"recs": answer, "next": {"id": 7, "name": "User 7", "email": "user7@example.com",
                                                           "tier": "gold"}}),
                       ("/shaped", {"recs": {"items": [1, 2.5, 3]}}),
                       ("/merged", answer)):
        r, _ = get(d, path)
        eq(ok_json(r, completed=True, what=path), want, f"{path}: the answer, not the fallback")
    r, _ = get(d, "/raw")
    contains(r.body.decode(), "2.50", "an unparsed answer keeps its number text")


@atest
def agg_fallback_for_an_answer_without_its_target():
    """missing_target is a failure like the others: the fallback takes the
    call's place (it was left out)."""
    s = Stub()
    d = agg_daemon([route("/t", [call("u", "/users/1", target="nope", fallback={"none": True}),
                                 call("v", "/users/2", target="nope", fallback=None),
                                 call("w", "/users/3", target="nope")], errors=True)], s)
    r, _ = get(d, "/t")
    j = ok_json(r, completed=False)
    eq(j, {"u": {"none": True}, "v": None,
           "_errors": {k: {"code": "missing_target", "status": 200, "ms": j["_errors"][k]["ms"]} for k in "uvw"}},
       "fallbacks in place of answers without their target")


# --- deadline and cancellation ------------------------------------------------------------------

def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@atest
def agg_deadline_cancels_running_and_pending_calls():
    s, s2 = Stub(), Stub()
    d = agg_daemon([
        route("/dl", [call("slow", "/slow?delay=5000&abort_on_eof=1", backend="s2"),
                      call("after_slow", "/p/{slow.id}"),
                      call("fast", "/users/3")], deadline_ms=ms(300), errors=True),
        route("/dl-req", [call("slow", "/slow?delay=5000&abort_on_eof=1", backend="s2", required=True),
                          call("fast", "/users/3")], deadline_ms=ms(300)),
    ], s, s2)
    r, dt = get(d, "/dl")
    j = ok_json(r, completed=False)
    check(0.29 <= dt < 0.3 + 0.5 * SLOW, f"deadline 300 ms answered after {dt:.3f}s")
    eq(j.get("fast"), {"id": 3, "name": "User 3", "email": "user3@example.com", "tier": "gold"}, "fast call")
    check("slow" not in j and "after_slow" not in j, f"cancelled calls have keys: {j}")
    eq(j["_errors"]["slow"]["code"], "timeout", "_errors.slow.code (running at the deadline)")
    eq(j["_errors"]["after_slow"]["code"], "timeout", "_errors.after_slow.code (not started at the deadline)")
    st, t = s2.wait_stats(lambda st: st["open_connections"] == 0 and st["in_flight"] == 0, 1.0,
                          "the cancelled call's upstream connection closed")
    eq(st["requests"], 1, "requests the backend got")
    r, dt = get(d, "/dl-req")
    error_json(r, 504, "timeout", "slow")
    check(dt < 0.3 + 0.5 * SLOW, f"deadline 300 ms answered after {dt:.3f}s")
    s2.wait_stats(lambda st: st["open_connections"] == 0, 1.0, "the cancelled call's connection closed")


@atest
def agg_deadline_under_load_leaks_no_descriptors():
    """1000 requests whose call outlives a 120 ms deadline, 50 client
    connections at a time: every cancelled upstream connection is closed."""
    s, s2 = Stub(), Stub()
    d = agg_daemon([route("/dl", [call("slow", "/slow?delay=10000&abort_on_eof=1", backend="s2"),
                                  call("fast", "/static")], deadline_ms=120)], s, s2)
    # warm up (pool to s, first allocations), then the baseline with no client
    for _ in range(3):
        r, _ = get(d, "/dl")
        ok_json(r, completed=False, what="warm-up")
    s2.wait_stats(lambda st: st["open_connections"] == 0, 2, "warm-up connections closed")
    time.sleep(0.1)
    base = fd_count(d.pid)
    pooled_before = s.stats()["open_connections"]  # gatherd's idle connections to s (the fast call)
    s2_before = s2.stats()["connections"]
    nstats_before = s2.nstats  # each /stats request is a connection of its own
    nclients, per_client = 50, 20
    results = []
    errors = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 40 * SLOW

    def client():
        got = []
        try:
            with gwtest.Conn(d.host, d.port, timeout=10) as c:
                for _ in range(per_client):
                    if time.monotonic() > stop_at:
                        break
                    r = c.request(req("GET", "/dl"))
                    got.append((r.status, r.header("X-Gateway-Completed")))
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(repr(e))
        with lock:
            results.extend(got)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(nclients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.monotonic() + 5))
    elapsed = time.monotonic() - t0
    check(not any(t.is_alive() for t in threads), "client threads still running after the time limit")
    check(not errors, f"{len(errors)} client errors, first: {errors[:3]}")
    eq(len(results), nclients * per_client, f"answers within the time limit ({elapsed:.1f}s)")
    bad = [x for x in results if x != (200, "false")]
    check(not bad, f"{len(bad)} answers were not 200 with X-Gateway-Completed: false: {bad[:5]}")
    st, t = s2.wait_stats(lambda st: st["open_connections"] == 0 and st["in_flight"] == 0, 3,
                          "every cancelled upstream connection closed")
    conns = st["connections"] - s2_before - (s2.nstats - nstats_before)
    check(conns <= nclients * per_client, f"{conns} backend connections for {nclients * per_client} calls")
    # the fast calls' connections to s stay pooled (up to max_connections): they are
    # expected descriptors; everything else must be back to the baseline
    deadline = time.monotonic() + 3 * SLOW
    while True:
        pooled = s.stats()["open_connections"] - pooled_before
        after = fd_count(d.pid)
        if after <= base + pooled + 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(f"# {len(results)} requests in {elapsed:.2f}s; gatherd fds {base} before, {after} after; "
          f"backend connections {conns}; {pooled} more pooled connections to s")
    check(after <= base + pooled + 2,
          f"gatherd holds {after} descriptors after the load, {base} before ({pooled} more pooled to s)")


@atest
def agg_client_disconnect_cancels_calls():
    s, s2 = Stub(), Stub()
    d = agg_daemon([route("/gone", [call("slow", "/slow?delay=5000&abort_on_eof=1", backend="s2"),
                                    call("slow2", "/slow2?delay=5000&abort_on_eof=1", backend="s2"),
                                    call("next", "/n/{slow.id}", backend="s2")], deadline_ms=20000),
                    route("/gone-fe", [call("src", "/src?" + jbody(list(range(6)))),
                                       call("fe", "/fe/{item}?delay=5000&abort_on_eof=1", backend="s2",
                                            foreach="src", foreach_concurrency=2)], deadline_ms=20000),
                    route("/ok", [call("a", "/users/1")])], s, s2)
    for attempt in range(3):
        c = Client(d)
        c.send(req("GET", "/gone"))
        s2.wait_stats(lambda st: st["in_flight"] == 2, 2, "both calls reached the backend")
        t0 = time.monotonic()
        c.close()
        st, t = s2.wait_stats(lambda st: st["open_connections"] == 0 and st["in_flight"] == 0, 1.0,
                              "the calls of a gone client cancelled")
        check(t < 1.0 * SLOW, f"calls cancelled {t:.2f}s after the client left")
        eq(st["requests"], 2 * (attempt + 1), "requests at the backend (the dependent call never started)")
    # a foreach call with elements running and elements not started yet
    c = Client(d)
    c.send(req("GET", "/gone-fe"))
    s2.wait_stats(lambda st: st["in_flight"] == 2, 2, "two elements reached the backend")
    c.close()
    st, t = s2.wait_stats(lambda st: st["open_connections"] == 0 and st["in_flight"] == 0, 1.0,
                          "the elements of a gone client cancelled")
    eq(st["requests"], 8, "requests at the backend (no element started after the client left)")
    # the daemon goes on serving
    r, _ = get(d, "/ok")
    eq(ok_json(r, what="after the cancellations")["a"]["id"], 1, "a request after the cancellations")


# --- templates -------------------------------------------------------------------------------------

EVIL = ["a/b", "x?y=1", "p&q=2", "f#frag", "cr\r\nX-Injected: 1", "sp ace", "pct%2F", "semi;c", "+plus",
        "uni\u00e9", "..a", "a..", "~-._"]


@atest
def agg_template_values_are_encoded():
    s = Stub()
    src = call("src", "/src?" + jbody({"v": EVIL}))
    d = agg_daemon([
        route("/inj/{p}", [call("pp", "/e/{p}?echo=1"),
                           call("qq", "/e/q?echo=1&v={query.v}&w={p}"),
                           call("hh", "/e/h?echo=1", headers={"X-P": "{query.h}"})]),
        route("/injc/{n}", [src,
                            call("cc", "/e/{src.v[0]}/{src.v[1]}/{src.v[2]}/{src.v[3]}?echo=1&w={src.v[4]}"),
                            call("ce", "/e/{item}?echo=1&w={item}", foreach="src.v")]),
    ], s)
    for v in EVIL:
        path = "/inj/" + pq(v) + "?v=" + pq(v) + "&h=ok"
        r, _ = get(d, path)
        j = ok_json(r, what=f"value {v!r}")
        e = j["pp"]
        seg = e["path"][len("/e/"):]
        check(e["path"].startswith("/e/"), f"{v!r}: path {e['path']!r}")
        check(re.fullmatch(r"([A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})+", seg),
              f"{v!r} from a path parameter: not one encoded segment: {e['path']!r}")
        eq(norm_pct(seg), pq(v), f"{v!r} from a path parameter: segment")
        eq(urllib.parse.unquote(seg), v, f"{v!r}: segment decoded")
        eq(e["query"], "echo=1", f"{v!r}: query of the path-parameter call")
        e = j["qq"]
        eq(e["path"], "/e/q", f"{v!r}: path of the query call")
        eq(norm_pct(e["query"]), "echo=1&v=" + pq(v) + "&w=" + pq(v), f"{v!r}: query value and path param in a query")
        for one in (j["pp"], j["qq"], j["hh"]):
            check("x-injected" not in one["headers"], f"{v!r}: a header was injected: {one['headers']}")
        eq(j["hh"]["headers"].get("x-p"), "ok", "header from a query parameter")
    # values from an earlier call's answer
    r, _ = get(d, "/injc/1")
    j = ok_json(r, what="values from a call's answer")
    e = j["cc"]
    segs = e["path"].split("/")
    eq(len(segs), 6, f"segments of {e['path']!r}")
    eq([norm_pct(x) for x in segs[2:]], [pq(x) for x in EVIL[:4]], "segments from the answer")
    eq(norm_pct(e["query"]), "echo=1&w=" + pq(EVIL[4]), "query from the answer (CR LF encoded)")
    check("x-injected" not in e["headers"], f"a header was injected: {e['headers']}")
    eq(len(j["ce"]), len(EVIL), "foreach over the evil values")
    for v, one in zip(EVIL, j["ce"]):
        eq(norm_pct(one["path"]), "/e/" + pq(v), f"foreach item {v!r} in the path")
        eq(norm_pct(one["query"]), "echo=1&w=" + pq(v), f"foreach item {v!r} in the query")
        check("x-injected" not in one["headers"], f"{v!r}: a header was injected")


@atest
def agg_template_values_that_cannot_be_used():
    s = Stub()
    d = agg_daemon([
        route("/bad", [call("pp", "/e/{query.v}?echo=1"), call("ok", "/users/1")], errors=True),
        route("/badh", [call("hh", "/e?echo=1", headers={"X-V": "{query.v}"}), call("ok", "/users/1")],
              errors=True),
    ], s)
    for v, code in ((".", "invalid_value"), ("..", "invalid_value"), ("", "invalid_value")):
        r, _ = get(d, "/bad?v=" + pq(v))
        j = ok_json(r, completed=False, what=f"path value {v!r}")
        check("pp" not in j, f"path value {v!r}: the call ran: {j.get('pp')}")
        eq(j["_errors"]["pp"]["code"], code, f"path value {v!r}: code")
    r, _ = get(d, "/bad")
    j = ok_json(r, completed=False, what="absent query parameter")
    eq(j["_errors"]["pp"]["code"], "missing_value", "absent query parameter: code")
    for v in ("a\r\nX-Injected: 1", "tab\there", "nul\x01"):
        r, _ = get(d, "/badh?v=" + pq(v))
        j = ok_json(r, completed=False, what=f"header value {v!r}")
        check("hh" not in j, f"header value {v!r}: the call ran: {j.get('hh')}")
        eq(j["_errors"]["hh"]["code"], "invalid_value", f"header value {v!r}: code")
    st = s.stats()
    # only the ok calls reached the backend
    eq(st["requests"], 7, f"requests at the backend (only the calls that could be sent): {st}")


@atest
def agg_template_sources_and_number_types():
    s = Stub()
    d = agg_daemon([route("/src/{id}", [
        call("a", "/a?" + jbody({"n": 12345678901234, "f": 1.5, "t": True, "s": "str", "neg": -7,
                                 "items": [{"id": 11}, {"id": 22}]})),
        call("e", "/e/{id}/{a.n}/{a.f}/{a.t}/{a.s}/{a.neg}/{a.items[1].id}?echo=1&q={query.q}&h={header.X-Thing}"
                  "&lit=%7B%7D&two=1"),
    ])], s)
    r, _ = get(d, "/src/abc%20d?q=x%20y&q=second", headers={"X-Thing": "hv", "x-thing": "other"})
    j = ok_json(r)
    e = j["e"]
    eq(e["path"], "/e/abc%20d/12345678901234/1.5/true/str/-7/22", "values as text in the path")
    eq(norm_pct(e["query"]), "echo=1&q=x%20y&h=hv&lit=%7B%7D&two=1", "query: first query parameter and header")
    r, _ = get(d, "/src/a+b?q=c+d%2Be", headers={"X-Thing": "h"})
    e = ok_json(r, what="plus signs")["e"]
    eq(e["path"], "/e/a%2Bb/12345678901234/1.5/true/str/-7/22", "a + in a path parameter is a plus")
    eq(norm_pct(e["query"]), "echo=1&q=c%20d%2Be&h=h&lit=%7B%7D&two=1", "a + in a query parameter is a space")


# --- shaping and merging --------------------------------------------------------------------------

@atest
def agg_shaping_target_allow_deny_rename():
    s = Stub()
    nested = {"a": {"b": 1, "c": 2}, "d": 3, "items": [{"id": 1, "secret": "s", "x": 1}, {"id": 2}],
              "internal": {"k": 1}}
    d = agg_daemon([route("/shape", [
        call("user", "/users/7", allow=["id", "name"]),
        call("user2", "/users/7", deny=["email", "tier"], rename={"name": "full_name"}),
        call("order", "/orders?user=7", target="items[1]"),
        call("items", "/orders?user=7", target="items"),
        call("combo", "/orders?user=7", target="items[0]", allow=["id", "qty"], rename={"qty": "quantity"}),
        call("deep", "/n?" + jbody(nested), allow=["a.b", "d"]),
        call("denied", "/n?" + jbody(nested), deny=["internal", "items[0].secret", "a.c"]),
        call("arr", "/arr?" + jbody([1, 2, 3])),
        call("num", "/num?" + jbody(42)),
        call("str", "/str?" + jbody("text")),
        call("grouped", "/users/8", group="custom", allow=["id"]),
        call("raw", "/c/{user.email}/{user2.tier}?echo=1"),
    ])], s)
    r, _ = get(d, "/shape")
    j = ok_json(r)
    eq(j["user"], {"id": 7, "name": "User 7"}, "allow")
    eq(j["user2"], {"id": 7, "full_name": "User 7"}, "deny and rename")
    eq(j["order"], {"id": 102, "product_id": 9, "qty": 2}, "target items[1]")
    eq(j["items"], [{"id": 101, "product_id": 7, "qty": 1}, {"id": 102, "product_id": 9, "qty": 2}], "target items")
    eq(j["combo"], {"id": 101, "quantity": 1}, "target, allow, rename in that order")
    eq(j["deep"], {"a": {"b": 1}, "d": 3}, "allow of nested paths")
    eq(j["denied"], {"a": {"b": 1}, "d": 3, "items": [{"id": 1, "x": 1}, {"id": 2}]}, "deny of nested paths")
    eq(j["arr"], [1, 2, 3], "an array answer under its group key")
    eq(j["num"], 42, "a number answer under its group key")
    eq(j["str"], "text", "a string answer under its group key")
    check("grouped" not in j, "a call with group is under its name")
    eq(j["custom"], {"id": 8}, "group key")
    eq(j["raw"]["path"], "/c/user7%40example.com/gold", "templates see the answer before shaping")
    eq(list(j.keys()), ["user", "user2", "order", "items", "combo", "deep", "denied", "arr", "num", "str",
                        "custom", "raw"], "keys in the order the calls are listed")


@atest
def agg_merge_is_deterministic():
    s = Stub()

    def calls(first_delay, second_delay):
        return [call("first", f"/a?delay={first_delay}&" + jbody({"k": "first", "a": 1, "shared": {"x": 1}})),
                call("second", f"/b?delay={second_delay}&" + jbody({"k": "second", "b": 2, "shared": {"y": 2}})),
                call("arr", "/c?" + jbody([1, 2]), group="list"),
                call("third", "/d?" + jbody({"c": 3}), rename={"c": "k"}, required=True)]

    d = agg_daemon([route("/m-slow-first", calls(200, 0), merge="merge"),
                    route("/m-slow-second", calls(0, 200), merge="merge"),
                    route("/m-fail", [call("first", "/a?" + jbody({"k": "first"})),
                                      call("second", "/b?status=500", fallback={"k": "fallback", "f": 1})],
                          merge="merge")], s)
    want = {"k": 3, "a": 1, "b": 2, "shared": {"y": 2}, "list": [1, 2]}
    for i in range(3):
        for path in ("/m-slow-first", "/m-slow-second"):
            r, _ = get(d, path)
            j = ok_json(r, what=path)
            eq(j, want, f"{path} (round {i}): later-listed calls win whatever finished first")
    r, _ = get(d, "/m-fail")
    j = ok_json(r, completed=False, what="merge with a fallback")
    eq(j, {"k": "fallback", "f": 1}, "merge with an object fallback")


# --- what each call sends ----------------------------------------------------------------------

@atest
def agg_request_headers_and_server_timing():
    s = Stub()
    d = agg_daemon([
        route("/h/{id}", [
            call("plain", "/e/plain?echo=1"),
            call("fwd", "/e/fwd?echo=1", forward_headers=["Accept-Language", "Authorization"]),
            call("tpl", "/e/tpl?echo=1", headers={"X-User": "{id}", "X-Lang": "{query.lang}",
                                                  "X-Trace": "t-{header.X-Trace}-{plain.method}",
                                                  "Accept": "application/vnd.test+json"}),
        ]),
    ], s)
    hdrs = [("X-Request-Id", "req-abc.123"), ("Accept-Language", "de-CH"), ("Authorization", "Bearer tok"),
            ("Cookie", "sid=1"), ("X-Trace", "tr9"), ("X-Forwarded-For", "10.1.2.3"), ("Accept", "text/html")]
    r, _ = get(d, "/h/77?lang=fr", headers=hdrs)
    j = ok_json(r)
    eq(r.header("X-Request-Id"), "req-abc.123", "X-Request-Id of the answer")
    for k in ("plain", "fwd", "tpl"):
        h = j[k]["headers"]
        eq(h.get("x-request-id"), "req-abc.123", f"{k}: X-Request-Id sent to the backend")
        eq(h.get("host"), s.hostport, f"{k}: Host")
        eq(h.get("via"), "1.1 gatherd", f"{k}: Via")
        # 127.0.0.1 is no trusted proxy here: the client's X-Forwarded-For is replaced
        eq(h.get("x-forwarded-for"), "127.0.0.1", f"{k}: X-Forwarded-For")
        eq(h.get("x-forwarded-proto"), "http", f"{k}: X-Forwarded-Proto")
        check("cookie" not in h, f"{k}: a client header nobody listed reached the backend: {h}")
        eq(j[k]["method"], "GET", f"{k}: method")
        eq(j[k]["body_length"], 0, f"{k}: body")
    h = j["plain"]["headers"]
    eq(h.get("accept"), "application/json", "plain: Accept")
    check("accept-language" not in h and "authorization" not in h and "x-trace" not in h,
          f"plain: client headers reached the backend: {h}")
    h = j["fwd"]["headers"]
    eq(h.get("accept-language"), "de-CH", "fwd: Accept-Language forwarded")
    eq(h.get("authorization"), "Bearer tok", "fwd: Authorization forwarded")
    check("x-trace" not in h, f"fwd: unlisted header forwarded: {h}")
    h = j["tpl"]["headers"]
    eq(h.get("x-user"), "77", "tpl: header from a path parameter")
    eq(h.get("x-lang"), "fr", "tpl: header from a query parameter")
    eq(h.get("x-trace"), "t-tr9-GET", "tpl: header from a client header and a call's answer")
    eq(h.get("accept"), "application/vnd.test+json", "tpl: Accept replaced (one value)")
    check(j["tpl"]["received_ms"] >= j["plain"]["received_ms"], "tpl waited for plain (its template names it)")
    timing = server_timing(r)
    eq(sorted(timing.keys()), sorted(["plain", "fwd", "tpl", "total"]), f"Server-Timing entries: {timing}")
    check(timing["total"][0] >= max(v[0] for k, v in timing.items() if k != "total") - 0.5,
          f"total shorter than a call: {r.header('Server-Timing')}")
    # a client without X-Request-Id: gatherd's own id reaches the backends
    r, _ = get(d, "/h/1?lang=x", headers={"X-Trace": "t2"})
    j = ok_json(r, what="no X-Request-Id")
    rid = r.header("X-Request-Id")
    check(rid and gwtest.HEX32_RE.match(rid), f"generated X-Request-Id {rid!r}")
    eq({j[k]["headers"].get("x-request-id") for k in ("plain", "fwd", "tpl")}, {rid}, "generated id sent upstream")


@atest
def agg_server_timing_names_failed_calls():
    s = Stub()
    d = agg_daemon([route("/st", [call("a", "/users/1"), call("slow", "/x?delay=2000", timeout_ms=ms(100)),
                                  call("bad", "/x?status=500")])], s)
    r, _ = get(d, "/st")
    ok_json(r, completed=False)
    timing = server_timing(r)
    eq(sorted(timing.keys()), ["a", "bad", "slow", "total"], f"Server-Timing entries: {r.header('Server-Timing')}")
    eq(timing["slow"][1].get("desc"), '"timeout"', "desc of the timed-out call")
    check(timing["slow"][0] >= 90, f"dur of a 100 ms timeout: {timing['slow'][0]}")


@atest
def agg_json_body_template_and_forwarded_body():
    s = Stub()
    body_tpl = {"id": "{a.id}", "name": "{a.name}", "text": "user {a.id}!", "all": "{a}", "lit": 5,
                "nested": {"x": ["{a.tier}", "{query.q}", "{id}"]}, "braces": "{{a.id}}", "flag": "{b.t}"}
    d = agg_daemon([
        route("/post/{id}", [call("a", "/users/7"),
                             call("b", "/b?" + jbody({"t": True})),
                             call("p", "/e/p?echo=1", method="POST", body=body_tpl)]),
        route("/ct", [call("c", "/e/c?echo=1", method="PATCH", body={"x": 1},
                           headers={"Content-Type": "application/merge-patch+json"})]),
        route("/fwd", [call("f1", "/e/f1?echo=1", method="PUT", body="forward"),
                       call("f2", "/e/f2?echo=1", method="POST", body="forward"),
                       call("g", "/e/g?echo=1")], methods=["POST"]),
    ], s)
    r, _ = get(d, "/post/x1?q=qq")
    j = ok_json(r)
    e = j["p"]
    eq(e["method"], "POST", "method")
    eq(e["headers"].get("content-type"), "application/json", "Content-Type of a JSON body")
    eq(e["headers"].get("content-length"), str(e["body_length"]), "Content-Length of the body")
    sent = json.loads(e["body"])
    user = {"id": 7, "name": "User 7", "email": "user7@example.com", "tier": "gold"}
    eq(sent, {"id": 7, "name": "User 7", "text": "user 7!", "all": user, "lit": 5,
              "nested": {"x": ["gold", "qq", "x1"]}, "braces": "{a.id}", "flag": True},
       "rendered JSON body (a lone placeholder keeps its JSON type)")
    r, _ = get(d, "/ct")
    e = ok_json(r, what="Content-Type replaced")["c"]
    eq(e["method"], "PATCH", "method")
    eq(e["headers"].get("content-type"), "application/merge-patch+json", "Content-Type replaced (one value)")
    eq(json.loads(e["body"]), {"x": 1}, "body")
    payload = b'{"hello": [1, 2, "\xc3\xa9"]}'
    r, _ = get(d, "/fwd", method="POST", body=payload, headers={"Content-Type": "application/x-test"})
    j = ok_json(r, what="forwarded body")
    for k, m in (("f1", "PUT"), ("f2", "POST")):
        eq(j[k]["method"], m, f"{k}: method")
        eq(j[k]["body"].encode(), payload, f"{k}: the client's body")
        eq(j[k]["headers"].get("content-type"), "application/x-test", f"{k}: the client's Content-Type")
    eq(j["g"]["body_length"], 0, "a call without body sends none")
    check("content-type" not in j["g"]["headers"], f"a call without body has a Content-Type: {j['g']['headers']}")


@atest
def agg_head_of_get_route():
    s = Stub()
    d = agg_daemon([route("/hd", [call("a", "/users/4"), call("b", "/orders?user=4", target="items")]),
                    route("/hd-err", [call("a", "/x?status=500", required=True)])], s)
    with Client(d) as c:
        g = c.request(req("GET", "/hd"))
        ok_json(g)
        h = c.request(req("HEAD", "/hd"))
        eq(h.status, 200, f"HEAD status ({h.raw[:300]!r})")
        eq(h.body, b"", "HEAD body")
        eq(h.header("Content-Length"), str(len(g.body)), "HEAD Content-Length (the GET answer's)")
        eq(h.header("X-Gateway-Completed"), "true", "HEAD X-Gateway-Completed")
        check(h.header("Server-Timing"), "HEAD Server-Timing")
        # the connection is still in sync: a leaked body would break this
        g2 = c.request(req("GET", "/hd"))
        eq(g2.body, g.body, "GET after HEAD")
        ge = c.request(req("GET", "/hd-err"))
        error_json(ge, 502, "bad_status", "a", backend_status=500, what="GET of a failing route")
        he = c.request(req("HEAD", "/hd-err"))
        eq(he.status, 502, f"HEAD of a failing route ({he.raw[:300]!r})")
        eq(he.body, b"", "HEAD body of an error")
        eq(he.header("Content-Length"), str(len(ge.body)), "HEAD Content-Length of an error")
        check(he.header("Server-Timing"), "HEAD Server-Timing of an error")
        g3 = c.request(req("GET", "/hd"))
        eq(g3.status, 200, "GET after the HEAD of an error")
    st = s.stats()
    eq(st["requests"], 10, "backend requests: 2 calls for GET, HEAD, GET and GET; 1 for GET and HEAD of the error")


@atest
def agg_retry_on_stale_pooled_connection():
    s = Stub()
    d = agg_daemon([route("/rt", [call("a", "/r?close_if_reused=1&echo=1", required=True)]),
                    route("/warm", [call("a", "/w?echo=1")])], s)
    r, _ = get(d, "/warm")
    first = ok_json(r)["a"]["connection_id"]
    r, _ = get(d, "/rt")
    j = ok_json(r, what="retried call")
    check(j["a"]["connection_id"] != first, "the call did not go over a new connection after the stale one")
    eq(j["a"]["connection_requests"], 1, "the retry's connection is new")


@atest
def agg_no_retry_for_non_idempotent_calls():
    """A POST on a pooled connection the backend closed is not sent again."""
    s = Stub()
    d = agg_daemon([route("/warm", [call("a", "/w?echo=1")]),
                    route("/post", [call("p", "/p?close_if_reused=1&echo=1", method="POST", body={"x": 1})],
                          errors=True)], s)
    ok_json(get(d, "/warm")[0])
    r, _ = get(d, "/post")
    j = ok_json(r, completed=False, what="POST on a stale connection")
    eq(j["_errors"]["p"]["code"], "truncated", "code of a POST whose connection was closed")
    eq(s.stats()["requests"], 2, "requests at the backend (no second POST)")


@atest
def agg_backend_framings_and_limits():
    s = Stub()
    d = agg_daemon([route("/fr", [
        call("chunked", "/c?chunked=1&chunk=7&" + jbody({"a": [1, 2, 3], "s": "x" * 50})),
        call("interim", "/i?interim=103&" + jbody({"i": 1})),
        call("paced", "/p?size=3000&chunk=500&chunk_delay=20", target="data"),
        call("exact", "/e?size=100", backend="small", target="data"),
        call("over", "/o?size=101", backend="small"),
        call("over_chunked", "/o?size=101&chunked=1&chunk=10", backend="small"),
        call("err_big", "/x?status=500&size=5000", backend="small"),
    ], errors=True)], s)
    r, _ = get(d, "/fr")
    j = ok_json(r, completed=False)
    eq(j.get("chunked"), {"a": [1, 2, 3], "s": "x" * 50}, "chunked answer")
    eq(j.get("interim"), {"i": 1}, "answer after a 103 interim response")
    eq(j.get("paced"), "x" * (3000 - 11), "slowly sent answer")
    eq(j.get("exact"), "x" * (100 - 11), "answer of exactly max_response_bytes")
    eq(sorted(j["_errors"].keys()), ["err_big", "over", "over_chunked"], f"failed calls: {j['_errors']}")
    eq(j["_errors"]["over"]["code"], "too_large", "max_response_bytes + 1 (Content-Length)")
    eq(j["_errors"]["over_chunked"]["code"], "too_large", "max_response_bytes + 1 (chunked)")
    eq(j["_errors"]["err_big"]["code"], "bad_status", "a big error answer is a bad_status")
    eq(j["_errors"]["err_big"].get("status"), 500, "status of the big error answer")


@atest
def agg_backend_timeout_default_and_connect_timeout():
    """A call without timeout_ms uses its backend's; a connect that hangs
    ends with the call's timeout too."""
    s = Stub()
    hole = tp.Blackhole(accepting=False)
    swallow = tp.Blackhole(accepting=True)
    d = agg_daemon([route("/bt", [call("slow", "/x?delay=3000", backend="quick"),
                                  call("hang", "/x", backend="hole"),
                                  call("swallowed", "/x", backend="swallow"),
                                  call("ok", "/users/1")], errors=True),
                    route("/bt-req", [call("slow", "/x?delay=3000", backend="quick", required=True)])],
                   s, backends={"quick": tp.backend(s.url, timeout_ms=ms(200)),
                                "hole": tp.backend(hole.url, connect_timeout_ms=ms(200), timeout_ms=ms(5000)),
                                "swallow": tp.backend(f"http://127.0.0.1:{swallow.port}", timeout_ms=ms(250))})
    r, dt = get(d, "/bt")
    j = ok_json(r, completed=False)
    eq(j["_errors"]["slow"]["code"], "timeout", "the backend's timeout_ms")
    eq(j["_errors"]["swallowed"]["code"], "timeout", "a backend that never answers")
    check(j["_errors"]["hang"]["code"] in ("timeout", "connect_failed"),
          f"a connect that hangs: {j['_errors']['hang']}")
    check(dt < 0.25 * SLOW + 0.5, f"answered after {dt:.3f}s (timeouts of 200-250 ms)")
    r, dt = get(d, "/bt-req")
    error_json(r, 504, "timeout", "slow")


@atest
def agg_deadline_during_foreach_keeps_finished_elements():
    s, s2 = Stub(), Stub()
    items = [{"n": 0, "d": 0}, {"n": 1, "d": 5000}, {"n": 2, "d": 0}, {"n": 3, "d": 5000}]
    d = agg_daemon([route("/fd", [call("src", "/src?" + jbody(items)),
                                  call("fe", "/fe/{item.n}?delay={item.d}&abort_on_eof=1", backend="s2",
                                       foreach="src", fallback="FB")],
                          deadline_ms=ms(300), errors=True)], s, s2)
    r, dt = get(d, "/fd")
    j = ok_json(r, completed=False)
    eq(j.get("fe"), [{"ok": True, "path": "/fe/0"}, "FB", {"ok": True, "path": "/fe/2"}, "FB"],
       "finished elements kept, the others get the fallback")
    eq(j["_errors"]["fe"]["code"], "timeout", "_errors.fe.code")
    eq(j["_errors"]["fe"].get("failed"), [1, 3], "_errors.fe.failed")
    s2.wait_stats(lambda st: st["open_connections"] <= 2 and st["in_flight"] == 0, 1.0,
                  "the cancelled elements' connections closed")


@atest
def agg_foreach_limits_and_results_as_template_source():
    s = Stub()
    d = agg_daemon([
        route("/fm/{n}", [call("src", "/src?size=0"),
                          call("list", "/l?" + jbody(list(range(100)))),
                          call("fe", "/fe/{item}", foreach="list"),
                          call("first", "/f/{fe[0].path}/{fe[99].ok}?echo=1")]),
        route("/fm101", [call("list", "/l?" + jbody(list(range(101)))),
                         call("fe", "/fe/{item}", foreach="list")], errors=True),
        route("/fm3", [call("list", "/l?" + jbody(list(range(4)))),
                       call("fe", "/fe/{item}", foreach="list", foreach_max=3)], errors=True),
    ], s)
    r, _ = get(d, "/fm/1")
    eq(r.status, 200, f"status ({r.raw[:300]!r})")
    j = r.json()
    eq(len(j["fe"]), 100, "100 elements (the default foreach_max)")
    eq(j["fe"][57], {"ok": True, "path": "/fe/57"}, "element 57")
    eq(j["first"]["path"], "/f/%2Ffe%2F0/true", "a template reading a foreach call's answers")
    for path in ("/fm101", "/fm3"):
        r, _ = get(d, path)
        j = ok_json(r, completed=False, what=path)
        check("fe" not in j, f"{path}: a foreach call over too many items has a key: {j}")
        eq(j["_errors"]["fe"]["code"], "too_many_items", f"{path}: code")


@atest
def agg_sixty_four_calls():
    s = Stub()
    calls = [call(f"c{i}", f"/users/{i}", allow=["id"]) for i in range(64)]
    d = agg_daemon([route("/many", calls)], s)
    r, _ = get(d, "/many")
    j = ok_json(r)
    eq(list(j.keys()), [f"c{i}" for i in range(64)], "64 calls in order")
    eq([j[f"c{i}"]["id"] for i in range(64)], list(range(64)), "64 answers")


@atest
def agg_answers_json_values_as_sent():
    """Strings, Unicode, escapes, big and real numbers survive parsing and
    serialization, and reach templates as their JSON digits."""
    s = Stub()
    raw = (r'{"s":"caf\u00e9 \"q\" \\ \/ \n","u":"\ud83d\ude00","n":12345678901234,'
           r'"r":0.1,"e":1e300,"neg":-0.0,"t":true,"z":null,"emptyo":{},"emptya":[]}')
    d = agg_daemon([route("/vals", [call("v", "/v?body=" + pq(raw)),
                                    call("e", "/e/{v.r}/{v.n}?echo=1&e={v.e}")])], s)
    r, _ = get(d, "/vals")
    j = ok_json(r)
    eq(j["v"], json.loads(raw), "values of the answer")
    eq(j["e"]["path"], "/e/0.1/12345678901234", "numbers in a path")


@atest
def agg_pipelined_and_http10_clients():
    s = Stub()
    d = agg_daemon([route("/pa/{n}", [call("a", "/a/{n}?delay=100&echo=1"), call("b", "/users/{n}")])], s)
    with Client(d) as c:
        c.send(req("GET", "/pa/1") + req("GET", "/pa/2") + req("HEAD", "/pa/3") + req("GET", "/pa/4"))
        got = []
        for n in (1, 2, 3, 4):
            r = c.read_response("HEAD" if n == 3 else "GET")
            eq(r.status, 200, f"pipelined request {n} ({r.raw[:300]!r})")
            if n != 3:
                got.append(r.json()["b"]["id"])
        eq(got, [1, 2, 4], "pipelined answers in request order")
    with Client(d) as c:
        r = c.request(req("GET", "/pa/5", version="HTTP/1.0", host=None))
        eq(r.status, 200, f"HTTP/1.0 status ({r.raw[:300]!r})")
        check(r.header("Content-Length") is not None, "HTTP/1.0 answer without Content-Length")
        eq(r.json()["b"]["id"], 5, "HTTP/1.0 answer")


@atest
def agg_graceful_stop_finishes_aggregates_in_flight():
    s = Stub()
    d = agg_daemon([route("/gs", [call("a", "/a?delay=400"), call("b", "/users/1")])], s)
    c = Client(d)
    c.send(req("GET", "/gs"))
    s.wait_stats(lambda st: st["in_flight"] == 1, 2, "the slow call reached the backend")
    d.send_signal(signal.SIGTERM)
    r = c.read_response()
    j = ok_json(r, what="answer during a graceful stop")
    eq(j["a"], {"ok": True, "path": "/a"}, "the slow call's answer")
    eq((r.header("Connection") or "").lower(), "close", "Connection of an answer during a stop")
    c.close()
    eq(d.wait(10 * SLOW), 0, "exit code of the graceful stop")


@atest
def agg_large_answers():
    """Three 500 KB answers make a 1.5 MB aggregate, twice on one connection
    (buffers grown past their reuse limit are dropped, not kept)."""
    s = Stub()
    d = agg_daemon([route("/big", [call(k, f"/{k}?size=500000", target="data") for k in "abc"]),
                    route("/small", [call("a", "/users/1", allow=["id"])])], s)
    with Client(d) as c:
        for _ in range(2):
            r = c.request(req("GET", "/big"))
            j = ok_json(r)
            eq([len(j[k]) for k in "abc"], [500000 - 11] * 3, "answer sizes")
            check(set(j["a"]) == {"x"}, "answer content")
            r = c.request(req("GET", "/small"))
            eq(ok_json(r, what="small after big"), {"a": {"id": 1}}, "a small answer after a big one")

@atest
def agg_backend_close_delimited_answer():
    """A 200 whose body ends with the connection (no Content-Length, not
    chunked) is a complete answer, not a truncated one."""
    s = Stub()
    d = agg_daemon([route("/cd", [call("u", "/u?unframed=1&" + jbody({"u": True}))], errors=True)], s)
    r, _ = get(d, "/cd")
    j = ok_json(r)
    eq(j.get("u"), {"u": True}, "close-delimited answer")


@atest
def agg_answers_any_json_value():
    """README: a call succeeds with a 2xx JSON body (any JSON value, \u0000
    in strings included); integers beyond 64 bits are documented as
    bad_json (jansson holds int64)."""
    s = Stub()
    d = agg_daemon([route("/big", [call("v", "/v?body=" + pq('{"x":123456789012345678901234}'))], errors=True),
                    route("/nul", [call("v", "/v?body=" + pq(r'{"x":"a\u0000b"}'))], errors=True),
                    route("/scalar", [call("v", "/v?body=" + pq('"text"')), call("n", "/n?body=" + pq('-7'))])], s)
    r, _ = get(d, "/nul")
    eq(ok_json(r, what="/nul").get("v"), {"x": "a\u0000b"}, "a NUL inside a string")
    r, _ = get(d, "/scalar")
    eq(ok_json(r, what="/scalar"), {"v": "text", "n": -7}, "scalar answers under their group")
    r, _ = get(d, "/big")
    eq(r.status, 200, "/big status")
    eq(r.header("X-Gateway-Completed"), "false", "/big is degraded")
    eq(r.json()["_errors"]["v"]["code"], "bad_json", "an integer beyond 64 bits")


@atest
def agg_template_numbers_keep_their_digits():
    """README: an integer keeps its digits; a decimal becomes the shortest
    text of the same double (jansson keeps no original text)."""
    s = Stub()
    d = agg_daemon([route("/digits", [call("v", "/v?body=" + pq('{"f":1.50,"e":1E3,"g":2.0,"h":-0.25e-3}')),
                                      call("e", "/e/{v.f}/{v.e}/{v.g}/{v.h}?echo=1")])], s)
    r, _ = get(d, "/digits")
    j = ok_json(r)
    eq(j["e"]["path"], "/e/1.5/1000/2/-0.00025", "numbers in a path")
    eq(j["v"], {"f": 1.5, "e": 1000.0, "g": 2.0, "h": -0.00025}, "numbers in the answer")
    check(b'"f":1.5,' in r.body and b'"e":1000.0' in r.body, f"reals keep a short, real form: {r.body!r}")


@atest
def agg_calls_send_only_documented_headers():
    """README "What each call sends": Host, Accept, X-Request-Id,
    X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Via, the call's headers and
    forward_headers; "a backend never sees a client header nobody listed"."""
    s = Stub()
    d = agg_daemon([route("/only", [call("a", "/e?echo=1")])], s)
    r, _ = get(d, "/only", headers={"X-Secret": "1", "Cookie": "c=1", "User-Agent": "ua", "Referer": "r"},)
    j = ok_json(r)
    eq(sorted(j["a"]["headers"].keys()),
       sorted(["host", "accept", "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"]),
       f"headers a GET call sends ({j['a']['headers']})")


@atest
def agg_backend_connections_are_pooled_safely():
    s = Stub()
    forged = "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"forged\":1}\n"
    d = agg_daemon([route("/p/{n}", [call("a", "/p/{n}?echo=1")]),
                    route("/noka", [call("a", "/k?keepalive=0&echo=1")]),
                    route("/trail", [call("a", "/t?echo=1&trailing_delay_ms=30&trailing_bytes=" + pq(forged))])], s)
    ids = []
    for n in range(4):
        r, _ = get(d, f"/p/{n}")
        ids.append(ok_json(r)["a"]["connection_id"])
    eq(len(set(ids)), 1, f"sequential calls share one pooled connection ({ids})")
    r, _ = get(d, "/noka")
    k = ok_json(r, what="Connection: close answer")["a"]["connection_id"]
    eq(k, ids[0], "the pooled connection is used")
    r, _ = get(d, "/p/9")
    j = ok_json(r, what="after a Connection: close answer")
    check(j["a"]["connection_id"] != k, "a connection the backend closed was used again")
    r, _ = get(d, "/trail")
    t = ok_json(r, what="trailing bytes")["a"]["connection_id"]
    time.sleep(0.15)  # the forged bytes arrive while the connection is idle in the pool
    for n in range(3):
        r, _ = get(d, f"/p/{n}")
        j = ok_json(r, what="after unsolicited bytes")
        eq(j["a"].get("path"), f"/p/{n}", "the answer after unsolicited bytes (not the forged one)")
        check(j["a"]["connection_id"] != t, "a connection that sent unsolicited bytes was reused")


@atest
def agg_required_foreach_element_failure_cancels_the_others():
    s, s2 = Stub(), Stub()
    items = [{"n": 0, "d": 3000, "s": 200}, {"n": 1, "d": 100, "s": 500}, {"n": 2, "d": 3000, "s": 200}]
    d = agg_daemon([route("/rf", [call("src", "/src?" + jbody(items)),
                                  call("fe", "/fe/{item.n}?delay={item.d}&status={item.s}&abort_on_eof=1",
                                       backend="s2", foreach="src", required=True)])], s, s2)
    s2_conns = s2.stats()["connections"]
    r, dt = get(d, "/rf")
    error_json(r, 502, "bad_status", "fe", backend_status=500, what="required foreach")
    check(dt < 0.1 + 0.5 * SLOW, f"answered after {dt:.3f}s, not at once (other elements: 3 s)")
    # the failed element's connection had a whole answer and may stay pooled
    st, _ = s2.wait_stats(lambda st: st["open_connections"] <= 1 and st["in_flight"] == 0, 1.0,
                          "the other elements' connections closed")
    eq(st["requests"], 3, "elements sent")


@atest
def agg_demo_config_dashboard():
    """conf/gatherd.json, the README's first command, on the stub: the
    dashboard fans out, chains, runs a foreach, and degrades when the
    recommendations backend is slow (X-Stub-Delay is forwarded to it only)."""
    srcdir = os.environ.get("GW_SRCDIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    with open(os.path.join(srcdir, "conf", "gatherd.json")) as f:
        cfg = json.load(f)
    s = Stub()
    for b in cfg["backends"].values():
        b["url"] = s.url
    cfg["listen"] = ["127.0.0.1:PORT"]
    cfg.pop("include", None)
    d = Daemon(cfg, workers=1)
    r, _ = get(d, "/api/dashboard/42")
    j = ok_json(r, what="demo dashboard")
    eq(j["customer"], {"id": 42, "name": "User 42", "tier": "gold"}, "customer, allow-listed")
    eq([o["product_id"] for o in j["orders"]], [7, 9], "orders, targeted")
    eq(j["products"], [{"name": "Product 7", "price": 9.99}, {"name": "Product 9", "price": 9.99}],
       "one product per order, in order")
    eq(j["recommendations"], [1, 2, 3], "recommendations")
    r, _ = get(d, "/api/dashboard/42", headers={"X-Stub-Delay": "300"})
    j = ok_json(r, completed=False, what="slow recommendations")
    eq(j["recommendations"], [], "the fallback")
    eq(j["_errors"]["recommendations"]["code"], "timeout", "why it is missing")
    eq(j["customer"]["id"], 42, "the rest is there")


@atest
def agg_unread_answers_pass_through_as_written():
    """An answer nothing reads or reshapes is checked and copied as the
    backend wrote it (trimmed); the same answer read by a template is parsed
    and written compactly. Both refuse what jansson refuses."""
    s = Stub()
    body = ' {"f": 1.50,\n "s": "\\u00e9"} '
    d = agg_daemon([route("/raw", [call("v", "/v?body=" + pq(body))]),
                    route("/parsed", [call("v", "/v?body=" + pq(body)), call("e", "/e/{v.f}?echo=1", target="path")]),
                    route("/bad", [call("v", "/v?body=" + pq('{"a":1} x'))], errors=True),
                    route("/badnum", [call("v", "/v?body=" + pq('[1e400]'))], errors=True)], s)
    r, _ = get(d, "/raw")
    ok_json(r, what="/raw")
    eq(r.body, b'{"v":{"f": 1.50,\n "s": "\\u00e9"}}', "the answer's own text")
    r, _ = get(d, "/parsed")
    ok_json(r, what="/parsed")
    eq(r.body, b'{"v":{"f":1.5,"s":"\xc3\xa9"},"e":"/e/1.5"}', "a parsed answer, compact")
    for path in ("/bad", "/badnum"):
        r, _ = get(d, path)
        eq(r.status, 200, f"{path} status")
        eq(r.json()["_errors"]["v"]["code"], "bad_json", f"{path}: refused")


@atest
@gwtest.exclusive
def agg_default_pool_keeps_connections_under_wrk_load():
    """A backend with no pool keys at all (the defaults a new user gets), 50
    wrk clients for 2 s on a route of 3 calls to it: up to 150 calls at once
    on the one worker, fewer than max_connections (256). Every connection is
    kept for the next call (idle up to max_connections, reaped by
    idle_timeout_ms), so the stub accepts about 150 connections, not one per
    call or so (thousands when released connections beyond a small idle cap
    are closed)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise TestFailure("wrk is not installed (scripts/install-deps.sh installs it)")
    s = Stub()
    calls = [call("user", "/users/1", backend="p"), call("orders", "/orders?user=1", backend="p"),
             call("recs", "/recommendations", backend="p")]
    d = Daemon(tp.config({"p": {"url": s.url}}, routes=[route("/three", calls)]), workers=1)
    r, _ = get(d, "/three")
    ok_json(r, what="the 3-call route")
    before, nstats_before = s.stats()["connections"], s.nstats
    cmd = [wrk, "-t1", "-c50", "-d2s", "--timeout", "5s", f"http://127.0.0.1:{d.port}/three"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=gwtest._die_with_parent)
    try:
        out, _ = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        gwtest.kill_and_reap(p, 5)
        raise TestFailure("wrk did not end within 30 s")
    m = re.search(r"(\d+) requests in", out)
    check(m and p.returncode == 0, f"wrk failed (exit {p.returncode}): {out}")
    requests = int(m.group(1))
    check("Non-2xx" not in out and "Socket errors" not in out, f"wrk saw errors: {out}")
    conns = s.stats()["connections"] - before - (s.nstats - nstats_before)
    print(f"# {requests} requests ({3 * requests} calls) in 2 s; the stub accepted {conns} connections")
    check(requests >= 100, f"wrk made only {requests} requests: {out}")
    check(conns <= 150 + 30, f"{conns} backend connections for {3 * requests} calls, at most 150 at once:"
          " connections below max_connections were closed and made again")

# --- conditions ("when") and enrichment ("into") ---------------------------------------------

def tag_count(s, tag):
    """How many requests the stub logged under tag (a call's path holds tag=NAME)."""
    return s.get("/log?tag=" + tag).json()["count"]


CUSTOMER = {"id": 7, "tier": "gold", "age": 42, "vip": True, "score": 2.5, "none": None,
            "address": {"city": "Paris", "zip": None}, "tags": ["a", "b"]}


def cond_call(name, when, **kw):
    """A call that answers its own name, tagged so the stub counts it."""
    return call(name, f"/c?tag=w-{name}&" + jbody({"name": name}), when=when, **kw)


@atest
def agg_when_conditions_decide_which_calls_are_sent():
    """Each form of condition, values with their JSON types (a query value is
    a string), absent values, and what a skipped call leaves: no key (or its
    skip_value), no request, Server-Timing desc="skipped", not a failure."""
    s = Stub()
    s.get("/log?reset=1")
    cust = call("customer", "/u?" + jbody(CUSTOMER))
    conds = [
        ("gold", {"value": "{customer.tier}", "in": ["gold", "platinum"]}, True),
        ("silver", {"value": "{customer.tier}", "equals": "silver"}, False),
        ("include", {"value": "{query.include}", "equals": "orders"}, True),
        ("qnum", {"value": "{query.n}", "equals": 5}, False),           # a query value is a string
        ("qstr", {"value": "{query.n}", "equals": "5"}, True),
        ("agereal", {"value": "{customer.age}", "equals": 42.0}, True),  # numbers by value
        ("agestr", {"value": "{customer.age}", "in": ["42", True]}, False),
        ("vipone", {"value": "{customer.vip}", "equals": 1}, False),     # a boolean is no number
        ("viptrue", {"value": "{customer.vip}", "equals": True}, True),
        ("score", {"value": "{customer.score}", "in": [1, 2.5]}, True),
        ("city", {"exists": "{customer.address.city}"}, True),
        ("zip", {"exists": "{customer.address.zip}"}, False),            # null does not exist
        ("nozip", {"not": {"exists": "{customer.address.nope}"}}, True),  # absent
        ("nullval", {"value": "{customer.none}", "equals": None}, True),  # a null that is there equals null
        ("absentnull", {"value": "{customer.nope}", "equals": None}, False),
        ("obj", {"value": "{customer.address}", "equals": {"zip": None, "city": "Paris"}}, True),
        ("arr", {"value": "{customer.tags}", "equals": ["b", "a"]}, False),
        ("text", {"value": "{customer.tier}-{query.n}", "equals": "gold-5"}, True),
        ("textnull", {"exists": "{customer.tier}-{customer.none}"}, False),
        ("hdr", {"value": "{header.X-Flag}", "in": ["on"]}, True),
        ("param", {"value": "{id}", "equals": "9"}, True),
        ("all", {"all": [{"exists": "{customer.id}"}, {"not": {"value": "{customer.tier}", "equals": "x"}}]}, True),
        ("any", {"any": [{"value": "{customer.tier}", "equals": "x"}, {"exists": "{customer.nope}"}]}, False),
    ]
    calls = [cust] + [cond_call(n, w) for n, w, _ in conds]
    calls.append(cond_call("skipv", {"value": "{customer.tier}", "equals": "x"}, skip_value={"skipped": True}))
    calls.append(cond_call("skipnull", {"value": "{customer.tier}", "equals": "x"}, skip_value=None))
    calls.append(cond_call("req", {"value": "{customer.tier}", "equals": "x"}, required=True))
    d = agg_daemon([route("/w/{id}", calls, errors=True)], s)
    r, _ = get(d, "/w/9?include=orders&n=5", headers={"X-Flag": "on"})
    j = ok_json(r, completed=True, what="conditions")
    want = {"customer": CUSTOMER}
    for n, _, holds in conds:
        if holds:
            want[n] = {"name": n}
    want["skipv"] = {"skipped": True}
    want["skipnull"] = None
    eq(j, want, "sent calls answer, skipped ones are left out or hold skip_value; no _errors")
    eq(list(j), list(want), "key order: the calls' order")
    timing = server_timing(r)
    for n, _, holds in conds + [("skipv", None, False), ("skipnull", None, False), ("req", None, False)]:
        eq(timing[n][1].get("desc"), None if holds else '"skipped"', f"Server-Timing desc of {n}")
        if not holds:
            eq(timing[n][0], 0.0, f"Server-Timing dur of skipped {n}")
        eq(tag_count(s, "w-" + n), 1 if holds else 0, f"requests the stub got for {n}")
    # the same route without the query and header: those conditions no longer hold
    r, _ = get(d, "/w/9")
    j = ok_json(r, completed=True, what="no query")
    for n in ("include", "qstr", "text", "hdr"):
        check(n not in j, f"{n} sent without its query parameter or header: {j}")


@atest
def agg_when_skips_dependents_and_fails_on_failed_dependencies():
    """A call whose template, after or foreach names a skipped call is skipped
    (with its own skip_value); one that names it only in its condition sees
    it absent; a condition naming a failed call fails with dependency_failed."""
    s = Stub()
    s.get("/log?reset=1")
    calls = [
        call("gate", "/g?tag=d-gate&" + jbody({"id": 1, "list": [1, 2]}), when={"value": "{query.go}", "equals": "1"}),
        call("tpl", "/t/{gate.id}?tag=d-tpl", skip_value="tpl-skipped"),
        call("aft", "/a?tag=d-aft", after=["gate"]),
        call("fe", "/f/{item}?tag=d-fe", foreach="gate.list"),
        call("chain", "/c/{tpl.path}?tag=d-chain"),              # skipped through tpl
        call("else", "/e?tag=d-else", when={"not": {"exists": "{gate}"}}),
        call("cond", "/k?tag=d-cond", when={"value": "{gate.id}", "equals": 1}),
        call("bad", "/b?status=503&tag=d-bad", fallback="bad-fb"),
        call("onbad", "/o?tag=d-onbad", when={"exists": "{bad.x}"}, fallback="onbad-fb"),
    ]
    d = agg_daemon([route("/dep", calls, errors=True),
                    route("/dep-req", [call("bad", "/b?status=503"),
                                       call("onbad", "/o", when={"exists": "{bad.x}"}, required=True)])], s)
    r, _ = get(d, "/dep")
    j = ok_json(r, completed=False, what="gate skipped")
    eq({k: v for k, v in j.items() if k != "_errors"},
       {"tpl": "tpl-skipped", "else": {"ok": True, "path": "/e"}, "bad": "bad-fb", "onbad": "onbad-fb"},
       "dependents of a skipped call skipped, else sent, failures with fallbacks")
    eq(sorted(j["_errors"]), ["bad", "onbad"], "only failures in _errors")
    eq(j["_errors"]["onbad"]["code"], "dependency_failed", "a condition naming a failed call")
    timing = server_timing(r)
    for n in ("gate", "tpl", "aft", "fe", "chain", "cond"):
        eq(timing[n][1].get("desc"), '"skipped"', f"{n} skipped")
        eq(tag_count(s, "d-" + n), 0, f"{n} sent nothing")
    eq(tag_count(s, "d-onbad"), 0, "a call whose condition names a failed call is not sent")
    r, _ = get(d, "/dep?go=1")
    j = ok_json(r, completed=False, what="gate sent")
    eq(j["tpl"], {"ok": True, "path": "/t/1"}, "tpl sent")
    eq(j["aft"], {"ok": True, "path": "/a"}, "aft sent")
    eq(j["fe"], [{"ok": True, "path": "/f/1"}, {"ok": True, "path": "/f/2"}], "fe sent")
    eq(j["cond"], {"ok": True, "path": "/k"}, "cond sent")
    check("else" not in j, f"else sent although gate answered: {j}")
    r, _ = get(d, "/dep-req")
    error_json(r, 502, "dependency_failed", "onbad", what="a required call whose condition names a failed call")


@atest
def agg_when_skipped_required_call_and_merge_mode():
    """A skipped required call is no failure; in merge mode an object
    skip_value is merged, another value goes under the group."""
    s = Stub()
    calls = [call("a", "/a?" + jbody({"x": 1, "shared": "a"})),
             call("req", "/r", required=True, when={"value": "{a.x}", "equals": 2}),
             call("obj", "/o", when={"value": "{a.x}", "equals": 2}, skip_value={"shared": "skip", "y": 2}),
             call("num", "/n", when={"value": "{a.x}", "equals": 2}, skip_value=0, group="numkey")]
    d = agg_daemon([route("/mm", calls, merge="merge", errors=True), route("/mg", calls, errors=True)], s)
    r, _ = get(d, "/mm")
    eq(ok_json(r, completed=True, what="merge"), {"x": 1, "shared": "skip", "y": 2, "numkey": 0}, "merge mode")
    r, _ = get(d, "/mg")
    eq(ok_json(r, completed=True, what="group"),
       {"a": {"x": 1, "shared": "a"}, "obj": {"shared": "skip", "y": 2}, "numkey": 0}, "group mode")


@atest
def agg_when_per_foreach_element():
    """A condition naming {item} is decided per element: skipped elements are
    not sent and leave the array (or hold skip_value); failed indexes are
    positions in the source array. One not naming {item} decides the call."""
    s = Stub()
    s.get("/log?reset=1")
    items = [{"k": "p", "n": 0}, {"k": "x", "n": 1}, {"k": "p", "n": 2, "st": 503}, {"k": "x", "n": 3},
             {"k": "p", "n": 4}]
    src = call("src", "/s?" + jbody({"items": items}))
    fe = "/fe/{item.n}?tag=fe-%s&status=200"
    d = agg_daemon([
        route("/filter", [src, call("fe", "/fe/{item.n}?tag=fe-filter",
                                    foreach="src.items", when={"value": "{item.k}", "equals": "p"})]),
        route("/slots", [src, call("fe", "/fe/{item.n}?tag=fe-slots", foreach="src.items", skip_value="S",
                                   when={"value": "{item.k}", "equals": "p"})]),
        route("/failed", [src, call("fe", "/fe/{item.n}?tag=fe-failed&status={item.st}", foreach="src.items",
                                    when={"exists": "{item.st}"}, fallback="FB")], errors=True),
        route("/none", [src, call("fe", "/fe/{item.n}?tag=fe-none", foreach="src.items",
                                  when={"value": "{item.k}", "equals": "z"})]),
        route("/whole", [src, call("fe", "/fe/{item.n}?tag=fe-whole", foreach="src.items", skip_value=[],
                                   when={"value": "{query.fe}", "equals": "1"})]),
        route("/mixed", [src, call("fe", "/fe/{item.n}?tag=fe-mixed", foreach="src.items",
                                   when={"all": [{"value": "{query.fe}", "equals": "1"},
                                                 {"value": "{item.n}", "in": [3, 4]}]})]),
        route("/reader", [src, call("fe", "/fe/{item.n}", foreach="src.items",
                                    when={"value": "{item.k}", "equals": "x"}),
                          call("r", "/r/{fe[1].path}/{fe[3].path}?echo=1", target="path"),
                          call("r0", "/r0/{fe[0].path}", fallback="absent")], errors=True),
    ], s)
    r, _ = get(d, "/filter")
    j = ok_json(r, what="/filter")
    eq(j["fe"], [{"ok": True, "path": f"/fe/{n}"} for n in (0, 2, 4)], "skipped elements leave the array")
    eq(server_timing(r)["fe"][1].get("desc"), None, "a call with skipped elements is not skipped")
    eq(tag_count(s, "fe-filter"), 3, "only the elements whose condition holds are sent")
    r, _ = get(d, "/slots")
    j = ok_json(r, what="/slots")
    eq(j["fe"], [{"ok": True, "path": "/fe/0"}, "S", {"ok": True, "path": "/fe/2"}, "S",
                 {"ok": True, "path": "/fe/4"}], "skip_value in the skipped elements' slots")
    r, _ = get(d, "/failed")
    j = ok_json(r, completed=False, what="/failed")
    eq(j["fe"], ["FB"], "one element sent, failed: its fallback")
    eq(j["_errors"]["fe"]["failed"], [2], "failed: the element's position in the source array")
    r, _ = get(d, "/none")
    j = ok_json(r, what="/none")
    eq(j["fe"], [], "every element skipped: an empty array")
    eq(tag_count(s, "fe-none"), 0, "nothing sent")
    r, _ = get(d, "/whole")
    j = ok_json(r, what="/whole")
    eq(j["fe"], [], "the whole call skipped: skip_value")
    eq(server_timing(r)["fe"][1].get("desc"), '"skipped"', "the whole call skipped")
    r, _ = get(d, "/whole?fe=1")
    eq(len(ok_json(r, what="/whole?fe=1")["fe"]), 5, "the whole call sent")
    r, _ = get(d, "/mixed?fe=1")
    eq(ok_json(r, what="/mixed")["fe"], [{"ok": True, "path": "/fe/3"}, {"ok": True, "path": "/fe/4"}],
       "a condition naming {item} and the query, per element")
    r, _ = get(d, "/reader")
    j = ok_json(r, completed=False, what="/reader")
    eq(j["r"], "/r/%2Ffe%2F1/%2Ffe%2F3", "templates read a foreach call's answers by source position")
    eq(j["r0"], "absent", "a skipped element's answer is null for templates")
    eq(j["_errors"]["r0"]["code"], "missing_value", "null: missing_value")


@atest
def agg_into_puts_results_into_the_source():
    s = Stub()
    orders = {"user": 7, "items": [{"id": 101, "pid": 1, "st": 200}, {"id": 102, "pid": 2, "st": 503},
                                   {"id": 103, "pid": 3, "st": 200, "kind": "gift"}, {"id": 104, "pid": 4, "st": 200}]}
    src = call("orders", "/o?" + jbody(orders), target="items")
    d = agg_daemon([
        route("/into", [src, call("product", "/products/{item.pid}?status=200", foreach="orders.items",
                                  into="product", allow=["name"])], errors=True),
        route("/into-fail", [
            call("orders", "/o?" + jbody(orders), deny=["user"]),
            call("product", "/x/{item.pid}?status={item.st}", foreach="orders.items", into="product",
                 target="path", fallback={"unavailable": True}),
            call("stock", "/x/{item.pid}?status={item.st}", foreach="orders.items", into="stock",
                 target="path")], errors=True),
        route("/into-when", [src,
                             call("gift", "/g/{item.id}", foreach="orders.items", into="wrap", target="path",
                                  when={"value": "{item.kind}", "equals": "gift"}, skip_value=False),
                             call("never", "/n/{item.id}", foreach="orders.items", into="never",
                                  when={"value": "{query.all}", "equals": "1"}, skip_value="no")]),
        route("/into-merge", [call("orders", "/o?" + jbody(orders), deny=["items[1]"]),
                              call("product", "/x/{item.pid}", foreach="orders.items", into="p", target="path"),
                              call("other", "/y?" + jbody({"user": "other"}))], merge="merge"),
        route("/into-notobj", [call("list", "/l?" + jbody([{"a": 1}, 5, "s", {"a": 2}])),
                               call("fe", "/x/{item.a}", foreach="list", into="r", target="path",
                                    fallback="FB")], errors=True),
        route("/into-notobj-req", [call("list", "/l?" + jbody([{"a": 1}, 5])),
                                   call("fe", "/x/{item.a}", foreach="list", into="r", required=True)]),
        route("/into-srcfail", [call("orders", "/o?status=500", fallback={"f": 1}),
                                call("product", "/x/{item.pid}", foreach="orders.items", into="p")], errors=True),
        route("/into-deny", [call("orders", "/o?" + jbody(orders), target="items", deny=["[0].product"]),
                             call("product", "/x/{item.pid}", foreach="orders.items", into="product",
                                  target="path")]),
        route("/into-tpl", [call("orders", "/o?" + jbody(orders)),
                            call("product", "/x/{item.pid}", foreach="orders.items", into="product", target="path"),
                            call("t", "/t/{product[0].path}?echo=1", target="path"),
                            call("u", "/u/{orders.items[0].product}", fallback="no-product")], errors=True),
    ], s)
    r, _ = get(d, "/into")
    j = ok_json(r, what="/into")
    want = [dict(o, product={"name": f"Product {o['pid']}"}) for o in orders["items"]]
    eq(j, {"orders": want}, "each result inside its element; the call has no key of its own")
    timing = server_timing(r)
    check("product" in timing, f"the into call is in Server-Timing: {timing}")
    r, _ = get(d, "/into-fail")
    j = ok_json(r, completed=False, what="/into-fail")
    items = [dict(o) for o in orders["items"]]
    for o in items:
        o["product"] = f"/x/{o['pid']}"
        o["stock"] = f"/x/{o['pid']}"
    items[1]["product"] = {"unavailable": True}
    del items[1]["stock"]
    eq(j["orders"], {"items": items}, "a failed element: fallback, or no key; two calls enrich one array")
    eq(j["_errors"]["product"]["failed"], [1], "product failed element")
    eq(j["_errors"]["stock"]["failed"], [1], "stock failed element")
    check("product" not in j and "stock" not in j, f"into calls have no key: {j}")
    r, _ = get(d, "/into-when")
    j = ok_json(r, what="/into-when")
    items = [dict(o, wrap=False, never="no") for o in orders["items"]]
    items[2]["wrap"] = "/g/103"
    eq(j, {"orders": items}, "skipped elements get skip_value; a whole skipped call puts skip_value everywhere")
    r, _ = get(d, "/into-merge")
    j = ok_json(r, what="/into-merge")
    items = [dict(o, p=f"/x/{o['pid']}") for o in orders["items"]]
    del items[1]
    eq(j, {"user": "other", "items": items}, "merge mode: the enriched source merged, its shaping after")
    r, _ = get(d, "/into-notobj")
    j = ok_json(r, completed=False, what="/into-notobj")
    eq(j["list"], [{"a": 1, "r": "/x/1"}, 5, "s", {"a": 2, "r": "/x/2"}],
       "elements that are not objects stay as they are")
    eq(j["_errors"]["fe"]["code"], "invalid_value", "an element that is not an object: invalid_value")
    eq(j["_errors"]["fe"]["failed"], [1, 2], "their indexes in failed")
    r, _ = get(d, "/into-notobj-req")
    error_json(r, 502, "invalid_value", "fe", what="a required into call over an element that is not an object")
    r, _ = get(d, "/into-srcfail")
    j = ok_json(r, completed=False, what="/into-srcfail")
    eq(j["orders"], {"f": 1}, "a failed source keeps its fallback, not enriched")
    eq(j["_errors"]["product"]["code"], "dependency_failed", "the into call")
    r, _ = get(d, "/into-deny")
    j = ok_json(r, what="/into-deny")
    eq(j["orders"][0], orders["items"][0], "the source's deny sees the enriched answer")
    eq(j["orders"][1]["product"], "/x/2", "other elements keep their key")
    r, _ = get(d, "/into-tpl")
    j = ok_json(r, completed=False, what="/into-tpl")
    eq(j["t"], "/t/%2Fx%2F1", "templates read the into call's own answers")
    eq(j["u"], "no-product", "templates see the source's answer as sent, without the products")


@atest
def agg_into_aggregate_built_on_the_thread_pool():
    """With 100 KB of parsed answers the aggregate is built (enrichment
    included) and freed on the thread pool (README "Large answers")."""
    s = Stub()
    items = [{"n": i, "k": "p" if i % 2 == 0 else "x", "st": 200 if i % 3 else 503} for i in range(12)]
    d = agg_daemon([route("/big", [
        call("src", "/s?" + jbody({"items": items}), target="items"),
        call("fe", "/x/{item.n}?status={item.st}", foreach="src.items", into="r", target="path",
             when={"value": "{item.k}", "equals": "p"}, fallback="FB", skip_value=None),
        call("big", "/b?size=100000", deny=["nope"]),
    ], errors=True)], s)
    want = []
    for it in items:
        e = dict(it)
        e["r"] = None if it["k"] == "x" else ("FB" if it["st"] == 503 else f"/x/{it['n']}")
        want.append(e)
    for attempt in range(3):
        r, _ = get(d, "/big")
        j = ok_json(r, completed=False, what="/big")
        eq(j["src"], want, "the enriched source")
        eq(len(j["big"]["data"]), 100000 - 11, "the large answer")
        eq(j["_errors"]["fe"]["failed"], [0, 6], "failed elements")


@atest
def agg_when_reload_adds_and_removes_conditions():
    s = Stub()
    s.get("/log?reset=1")
    plain = route("/r", [call("a", "/a?" + jbody({"tier": "gold"})), call("b", "/b?tag=rl-b")])
    d = agg_daemon([plain], s)
    r, _ = get(d, "/r")
    eq(sorted(ok_json(r)), ["a", "b"], "before the reload")
    cfg = json.loads(json.dumps(d.config))
    cfg["listen"] = [f"127.0.0.1:{d.port}"]
    with_when = route("/r", [call("a", "/a?" + jbody({"tier": "gold"})),
                             call("b", "/b?tag=rl-b", when={"value": "{a.tier}", "equals": "silver"},
                                  skip_value="skipped")])
    cfg["routes"] = [with_when]
    d.reload(cfg)
    r, _ = get(d, "/r")
    j = ok_json(r, what="after the reload")
    eq(j["b"], "skipped", "the condition of the new configuration")
    eq(server_timing(r)["b"][1].get("desc"), '"skipped"', "Server-Timing after the reload")
    bad = route("/r", [call("a", "/a"), call("b", "/b", when={"value": "{a.tier}", "gt": 1})])
    cfg["routes"] = [bad]
    d.reload(cfg, expect="reload failed")
    contains(d.log(), 'unknown operator "gt"', "the reload's error")
    r, _ = get(d, "/r")
    eq(ok_json(r, what="after a refused reload")["b"], "skipped", "the old configuration still serves")
    eq(tag_count(s, "rl-b"), 1, "b was sent only before the condition came")



# --- batched calls ("batch") ------------------------------------------------------------------

ORDERS = {"items": [{"id": 101, "pid": 7}, {"id": 102, "pid": 9}, {"id": 103, "pid": 7}, {"id": 104, "pid": "12"},
                    {"id": 105, "pid": 3}, {"id": 106, "pid": 4}, {"id": 107, "pid": 12}]}


def product(v, asked):
    return {"id": v, "name": f"item {v}", "asked": asked}


@atest
def agg_batch_chunks_run_concurrently_in_first_seen_order():
    s = Stub()
    s.get("/log?reset=1")
    b = {"from": "orders.items[*].pid", "param": "ids", "max": 2, "into": "product"}
    d = agg_daemon([
        route("/b", [call("orders", "/o?" + jbody(ORDERS)),
                     call("products", "/p?batch=ids&delay=200&tag=bt-chunks", batch=b)], errors=True),
        route("/b-one", [call("orders", "/o?" + jbody(ORDERS)),
                         call("products", "/p?batch=ids&tag=bt-one", batch=dict(b, max=100, into="p"),
                              allow=["name"])]),
    ], s)
    r, dt = get(d, "/b")
    j = ok_json(r)
    # 7, 9, "12" and 12 (one value: compared by text), 3, 4: five unique values, two per request
    chunks = ["7,9", "12,3", "4"]
    want = [dict(ORDERS["items"][0], product=product(7, chunks[0])),
            dict(ORDERS["items"][1], product=product(9, chunks[0])),
            dict(ORDERS["items"][2], product=product(7, chunks[0])),
            dict(ORDERS["items"][3], product=product(12, chunks[1])),
            dict(ORDERS["items"][4], product=product(3, chunks[1])),
            dict(ORDERS["items"][5], product=product(4, chunks[2])),
            dict(ORDERS["items"][6], product=product(12, chunks[1]))]
    eq(j, {"orders": {"items": want}}, "results under into, by the text of the value")
    log = s.get("/log?tag=bt-chunks").json()
    eq(log["count"], 3, "5 unique values, max 2: three requests")
    arrived = [e["ms"] for e in log["requests"]]
    check(max(arrived) - min(arrived) < 150, f"the three requests were not sent together: {arrived}")
    check(dt < 0.39, f"three requests of 200 ms took {dt:.3f}s: not concurrent")
    timing = server_timing(r)
    check("products" in timing and "desc" not in timing["products"][1], f"one entry per call: {timing}")
    r, _ = get(d, "/b-one")
    j = ok_json(r, what="/b-one")
    eq([e["p"] for e in j["orders"]["items"]],
       [{"name": "item 7"}, {"name": "item 9"}, {"name": "item 7"}, {"name": "item 12"}, {"name": "item 3"},
        {"name": "item 4"}, {"name": "item 12"}], "allow on each matched element")
    eq(tag_count(s, "bt-one"), 1, "one request for every value")


@atest
def agg_batch_missing_failed_chunk_and_values_that_cannot_be_sent():
    s = Stub()
    items = {"items": [{"pid": 1}, {"pid": 2}, {"pid": 3}, {"pid": None}, {"x": 1}, {"pid": True}, 5,
                       {"pid": {"a": 1}}, {"pid": 4}, {"pid": ""}, {"pid": 2.0}]}
    b = {"from": "orders.items[*].pid", "param": "ids", "max": 2, "into": "p"}
    d = agg_daemon([
        # value 2 is unknown to the backend; the chunk of 3 and 4 fails
        route("/m", [call("orders", "/o?" + jbody(items)),
                     call("products", "/p?batch=ids&batch_omit=2&batch_fail=4", batch=b, fallback="fb")],
              errors=True),
        route("/m-req", [call("orders", "/o?" + jbody(items)),
                         call("products", "/p?batch=ids&batch_omit=2", batch=b, required=True)]),
        route("/m-list", [call("orders", "/o?" + jbody({"items": [{"pid": 1}, {"pid": 2}, {"pid": 1}]})),
                          call("products", "/p?batch=ids&batch_omit=2",
                               batch={"from": "orders.items[*].pid", "param": "ids"}, target="[0]")],
              errors=True),
    ], s)
    r, _ = get(d, "/m")
    j = ok_json(r, completed=False)
    got = [e.get("p") if isinstance(e, dict) else e for e in j["orders"]["items"]]
    eq(got, [product(1, "1,2"), "fb", "fb", "fb", "fb", "fb", 5, "fb", "fb", "fb", "fb"], "results and fallbacks")
    e = j["_errors"]["products"]
    e.pop("ms")
    e["failed"].sort()
    eq(e, {"code": "missing_value", "failed": [2, 3, 4, 5, 6, 7, 8, 9], "missing": [1, 10]},
       "_errors: elements not sent or whose chunk failed in failed, the unmatched in missing")
    r, _ = get(d, "/m-req")
    error_json(r, 502, "missing_value", "products", what="/m-req")
    r, _ = get(d, "/m-list")
    j = ok_json(r, completed=False, what="/m-list")
    eq(j["products"], [None, None, None], "target [0] is not an array: every chunk fails")
    eq(j["_errors"]["products"]["code"], "invalid_value", "an answer that is not an array")


@atest
def agg_batch_without_into_merge_modes_and_encoding():
    s = Stub()
    items = [{"k": "a b"}, {"k": "x&y"}, {"k": "a b"}, {"k": 1.5}, {"k": "zz"}]
    b = {"from": "src[*].k", "param": "names", "separator": ";"}
    d = agg_daemon([
        route("/g", [call("src", "/s?" + jbody(items)),
                     call("vals", "/v?batch=names&batch_sep=%3B&batch_omit=zz", batch=b, fallback="none")]),
        route("/mm", [call("src", "/s?" + jbody({"list": [{"k": 1}, {"k": 2}]}), target="list"),
                      call("vals", "/v?batch=k", batch={"from": "src.list[*].k", "param": "k", "into": "v"},
                           allow=["name"]),
                      call("other", "/o?" + jbody({"list": "other", "more": 1}))], merge="merge"),
        route("/dup", [call("src", "/s?" + jbody([{"k": 1}, {"k": 2}])),
                       call("vals", "/v?batch=k&batch_dup=1&batch_reverse=1",
                            batch={"from": "src[*].k", "param": "k"}, target="", deny=["asked"])]),
    ], s)
    r, _ = get(d, "/g")
    j = ok_json(r, completed=False)
    asked = "a b;x&y;1.5;zz"  # the values as the stub decoded them: "a%20b;x%26y;1.5;zz" was sent
    eq(j["vals"], [product("a b", asked), product("x&y", asked), product("a b", asked), product("1.5", asked),
                   "none"], "without into: one slot per element, in element order, fallback where missing")
    r, _ = get(d, "/mm")
    j = ok_json(r, what="/mm")
    eq(j, {"src": [{"k": 1, "v": {"name": "item 1"}}, {"k": 2, "v": {"name": "item 2"}}], "list": "other",
           "more": 1}, "merge mode: the enriched source (an array) under its group, objects merged")
    r, _ = get(d, "/dup")
    j = ok_json(r, what="/dup")
    eq(j["vals"], [{"id": 1, "name": "item 1"}, {"id": 2, "name": "item 2"}],
       "matched by id, not position; the first of duplicates wins")


@atest
def agg_batch_reload_changes_chunks():
    s = Stub()
    s.get("/log?reset=1")
    src = call("src", "/s?" + jbody([{"k": n} for n in range(5)]))
    d = agg_daemon([route("/r", [src, call("v", "/v?batch=ids&tag=brl-1",
                                           batch={"from": "src[*].k", "param": "ids", "max": 5, "into": "x"})])], s)
    r, _ = get(d, "/r")
    eq([e["x"]["asked"] for e in ok_json(r)["src"]], ["0,1,2,3,4"] * 5, "before the reload")
    cfg = json.loads(json.dumps(d.config))
    cfg["listen"] = [f"127.0.0.1:{d.port}"]
    cfg["routes"] = [route("/r", [src, call("v", "/v?batch=ids&tag=brl-2",
                                            batch={"from": "src[*].k", "param": "ids", "max": 3, "into": "x"})])]
    d.reload(cfg)
    r, _ = get(d, "/r")
    eq([e["x"]["asked"] for e in ok_json(r, what="after")["src"]], ["0,1,2"] * 3 + ["3,4"] * 2, "after the reload")
    eq(tag_count(s, "brl-2"), 2, "two requests after the reload")
    cfg["routes"] = [route("/r", [src, call("v", "/v", batch={"from": "src[*].k", "param": "ids", "max": 1001})])]
    d.reload(cfg, expect="reload failed")
    contains(d.log(), "routes[0].calls[1].batch.max: must be between 1 and 1000", "the reload's error")
    r, _ = get(d, "/r")
    eq(tag_count(s, "brl-2"), 4, "the old configuration still serves")


if __name__ == "__main__":
    sys.exit(main())
