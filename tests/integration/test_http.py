#!/usr/bin/env python3
"""Integration tests of gatherd: the real daemon on loopback, raw HTTP bytes.

Run: GATHERD=/path/to/gatherd python3 tests/integration/test_http.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed"; the exit code is 1 when
anything failed.
"""

import json
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gwtest import (DATE_RE, HEX32_RE, SLOW, Conn, ConnectionClosed, Daemon, Skip, TempDir,  # noqa: E402
                    TestFailure, check, contains, eq, ipv6_loopback_available, main, req, run_cli, test)

# --- shared configuration -------------------------------------------------------

ROUTES = [
    {"path": "/health", "methods": ["GET"], "respond": {"status": 200, "body": {"ok": True}}},
    {"path": "/echo", "methods": ["POST", "PUT"], "respond": {"status": 201, "body": {"created": True}}},
    {"path": "/a", "respond": {"body": {"r": "a"}}},
    {"path": "/b", "respond": {"body": {"r": "b"}}},
    {"path": "/c", "respond": {"body": {"r": "c"}}},
    {"path": "/any", "respond": {"body": {"any": True}}},
    {"path": "/empty", "methods": ["GET"], "respond": {"status": 204}},
    {"path": "/item", "methods": ["GET"], "respond": {"body": {"r": "get-item"}}},
    {"path": "/item", "methods": ["DELETE"], "respond": {"body": {"r": "delete-item"}}},
    {"path": "/users/me", "respond": {"body": {"r": "exact"}}},
    {"path": "/users/{id}", "respond": {"body": {"r": "param"}}},
    {"path": "/users/*", "respond": {"body": {"r": "wildcard"}}},
    {"path": "/public/*", "respond": {"body": {"r": "public"}}},
    {"path": "/admin", "respond": {"body": {"r": "admin"}}},
    {"path": "/files/{name}", "respond": {"body": {"r": "file"}}},
]


def config(http=None, **top):
    cfg = {"listen": ["127.0.0.1:PORT"], "routes": ROUTES}
    if http:
        cfg["http"] = http
    cfg.update(top)
    return cfg


def get(path="/health", **kw):
    return req("GET", path, **kw)


def expect_ok(r, body=None, status=200):
    eq(r.status, status, f"status (response {r.raw[:300]!r})")
    if body is not None:
        eq(r.body, body, "body")


def expect_error(r, status, code, close=True):
    """An error response: status, JSON body {"error":{code,message,request_id}}, Connection: close."""
    eq(r.status, status, f"status (response {r.raw[:400]!r})")
    eq(r.version, "HTTP/1.1", "version")
    j = r.json()
    check(isinstance(j, dict) and isinstance(j.get("error"), dict), f"error body shape: {r.body!r}")
    eq(j["error"].get("code"), code, "error.code")
    check(isinstance(j["error"].get("message"), str) and j["error"]["message"], f"error.message in {r.body!r}")
    check("request_id" in j["error"], f"error.request_id missing in {r.body!r}")
    contains(r.header("Content-Type") or "", "application/json", "Content-Type")
    if close:
        eq((r.header("Connection") or "").lower(), "close", "Connection header")
    return j


def expect_reject(d, raw, status=400, code="bad_request", json_body=True):
    """Sends raw on a fresh connection: exactly one error response with
    Connection: close, then the server closes without sending anything else.
    json_body=False checks status and Connection only (not the body)."""
    with d.connect() as c:
        try:
            c.send(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            r = c.read_response()
        except ConnectionClosed as e:
            raise TestFailure(f"expected {status}, connection closed without a response ({e}); sent {raw[:200]!r}")
        if json_body:
            expect_error(r, status, code)
        else:
            eq(r.status, status, f"status (response {r.raw[:400]!r})")
            eq((r.header("Connection") or "").lower(), "close", "Connection header")
        rest = c.read_all_until_close(3)
        eq(rest, b"", "bytes after the error response (the connection must close)")
    return r


def standard_headers(r):
    eq(r.version, "HTTP/1.1", "HTTP version")
    check(DATE_RE.match(r.header("Date") or ""), f"Date header: {r.header('Date')!r}")
    eq(r.header("Server"), "gatherd", "Server header")
    check(r.header("X-Request-Id"), "X-Request-Id header missing")


# --- command line and configuration ---------------------------------------------

@test
def cli_version():
    rc, out, err = run_cli(["-V"])
    eq(rc, 0, "exit code")
    eq(out.splitlines()[0] if out else "", "gatherd 0.1.0", "first line of -V")


@test
def cli_help():
    rc, out, err = run_cli(["-h"])
    eq(rc, 0, "exit code")
    contains(out, "Usage: gatherd", "-h output")
    for opt in ("-c FILE", "-t", "-w N", "-V", "-h"):
        contains(out, opt, "-h output")


@test
def cli_workers_option_overrides_config():
    # The daemon has one main thread plus one thread per worker: compare the
    # thread counts of -w 1 and -w 3 (sanitizer helper threads cancel out).
    def stable_thread_count(pid):
        # the listeners accept before every worker thread exists: wait until
        # the count has not changed for 0.3 s
        last, since, deadline = -1, time.monotonic(), time.monotonic() + 5 * SLOW
        while time.monotonic() < deadline:
            n = len(os.listdir(f"/proc/{pid}/task"))
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= 0.3:
                break
            time.sleep(0.02)
        return last

    counts = {}
    for n in (1, 3):
        d = Daemon(config(workers=2), workers=n)
        counts[n] = stable_thread_count(d.pid)
        with d.connect() as c:
            expect_ok(c.request(get()), b'{"ok":true}')
        eq(d.stop(), 0, "exit code")
    eq(counts[3] - counts[1], 2, f"extra threads with -w 3 vs -w 1 (counts {counts})")
    with TempDir() as t:
        p = t.write("g.json", config())
        rc, _, err = run_cli(["-t", "-c", p, "-w", "0"])
        eq(rc, 1, f"exit code of -w 0 (stderr {err!r})")


@test
def config_test_valid():
    with TempDir() as t:
        p = t.write("g.json", {"listen": ["127.0.0.1:8080", "[::1]:8080"], "workers": "auto",
                               "max_connections": 100, "shutdown_timeout_ms": 1000,
                               "http": {"client_header_timeout_ms": 1000, "client_body_timeout_ms": 1000,
                                        "keepalive_timeout_ms": 1000, "send_timeout_ms": 1000,
                                        "lingering_timeout_ms": 1000, "max_header_bytes": 4096, "max_headers": 10,
                                        "max_url_bytes": 1024, "max_body_bytes": 1000,
                                        "max_keepalive_requests": 10},
                               "routes": ROUTES})
        rc, out, err = run_cli(["-t", "-c", p])
        eq(rc, 0, f"exit code (stderr {err!r})")
        contains(err, "test is successful", "stderr")


def _config_error(text, files=None):
    """Writes text as the config (plus files), runs -t; returns (path, stderr). Expects exit 1."""
    with TempDir() as t:
        for rel, content in (files or {}).items():
            t.write(rel, content)
        p = t.write("gatherd.json", text)
        rc, out, err = run_cli(["-t", "-c", p])
        eq(rc, 1, f"exit code of -t (stderr {err!r})")
        contains(err, "test failed", "stderr")
        return p, err


@test
def shipped_configs_are_valid():
    """conf/gatherd.json and conf/examples/*.json of the source tree pass -t."""
    srcdir = os.environ.get("GW_SRCDIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    confs = [os.path.join(srcdir, "conf", "gatherd.json")]
    ex = os.path.join(srcdir, "conf", "examples")
    if os.path.isdir(ex):
        confs += sorted(os.path.join(ex, f) for f in os.listdir(ex) if f.endswith(".json"))
    check(os.path.exists(confs[0]), f"{confs[0]} not found (GW_SRCDIR={os.environ.get('GW_SRCDIR')!r})")
    for p in confs:
        rc, _, err = run_cli(["-t", "-c", p])
        eq(rc, 0, f"-t exit code for {p} (stderr {err!r})")
        contains(err, "test is successful", f"stderr for {p}")


@test
def config_unknown_key_names_line():
    text = '{\n  "listen": ["127.0.0.1:8080"],\n  "http": {\n    "keepalive_timeout_ms": 5,\n    "bogus_key": 1\n  }\n}\n'
    p, err = _config_error(text)
    contains(err, f"{p}:5:", "error location")
    contains(err, "bogus_key", "error text")
    contains(err, "unknown key", "error text")
    text = '{\n  "listen": ["127.0.0.1:8080"],\n\n  "lsiten": 1\n}\n'
    p, err = _config_error(text)
    contains(err, f"{p}:4:", "error location (top-level typo)")
    contains(err, "lsiten", "error text")
    text = '{"listen": ["127.0.0.1:8080"],\n "routes": [\n  {"path": "/a",\n   "respond": {"body": 1, "stauts": 200}}]}'
    p, err = _config_error(text)
    contains(err, f"{p}:4:", "error location (respond typo)")
    contains(err, "stauts", "error text")


@test
def config_status_out_of_range_message():
    text = '{"listen": ["127.0.0.1:8080"],\n "routes": [\n {"path": "/a",\n  "respond": {"status": 99}}]}'
    p, err = _config_error(text)
    contains(err, f"{p}:4: routes[0].respond.status: must be between 200 and 599, not 99", "error text")
    p, err = _config_error('{"listen": ["127.0.0.1:8080"], "routes": [{"path": "/a", "respond": {"status": 600}}]}')
    contains(err, "routes[0].respond.status", "error text")


@test
def config_syntax_error_line_col():
    text = '{\n  "listen": ["127.0.0.1:8080"],\n  "routes": [\n    {"path": "/a" "respond": {}}\n  ]\n}\n'
    p, err = _config_error(text)
    check(re.search(re.escape(p) + r":4:\d+: ", err), f"expected {p}:4:COL: in {err!r}")
    contains(err, "syntax error", "stderr")
    p, err = _config_error('{"listen": ["127.0.0.1:8080"],\n\n "workers": 2,}\n')
    check(re.search(re.escape(p) + r":3:\d+: ", err), f"expected {p}:3:COL: in {err!r}")


@test
def config_duplicate_route():
    routes = [{"path": "/dup", "methods": ["GET"], "respond": {}},
              {"path": "/x", "respond": {}},
              {"path": "/dup", "methods": ["POST", "GET"], "respond": {}}]
    p, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "routes": routes}, indent=1))
    contains(err, "duplicate route", "stderr")
    contains(err, "routes[2]", "stderr")
    # The same path with disjoint methods is fine.
    with TempDir() as t:
        p = t.write("g.json", {"listen": ["127.0.0.1:8080"],
                               "routes": [{"path": "/dup", "methods": ["GET"], "respond": {}},
                                          {"path": "/dup", "methods": ["POST"], "respond": {}}]})
        rc, _, err = run_cli(["-t", "-c", p])
        eq(rc, 0, f"exit code for disjoint methods (stderr {err!r})")


@test
def config_bad_listen_addresses():
    for bad in ["localhost:8080", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:80x",
                "::1:8080", "[::1]8080", "[::1]:", "[127.0.0.1]:8080", "300.1.1.1:80", "", "abc"]:
        p, err = _config_error(json.dumps({"listen": [bad]}))
        contains(err, "listen", f"stderr for {bad!r}")
    p, err = _config_error(json.dumps({"listen": []}))
    p, err = _config_error(json.dumps({"listen": [8080]}))
    p, err = _config_error(json.dumps({"routes": []}))
    contains(err, "listen", "stderr for a missing listen")
    with TempDir() as t:
        for good in ["127.0.0.1:8080", "[::1]:8080", "*:8080", "8080"]:
            p = t.write("g.json", {"listen": [good]})
            rc, _, err = run_cli(["-t", "-c", p])
            eq(rc, 0, f"exit code for {good!r} (stderr {err!r})")


@test
def config_include_conf_d():
    files = {"conf.d/one.json": {"routes": [{"path": "/from-one", "respond": {"body": {"r": "one"}}}]},
             "conf.d/two.json": {"routes": [{"path": "/from-two", "methods": ["GET"], "respond": {"body": {"r": "two"}}}]},
             "conf.d/ignored.txt": "not json"}
    cfg = {"listen": ["127.0.0.1:PORT"], "include": ["conf.d/*.json"],
           "routes": [{"path": "/main", "respond": {"body": {"r": "main"}}}]}
    d = Daemon(cfg, files=files)
    rc, _, err = run_cli(["-t", "-c", d.conf_path])
    eq(rc, 0, f"-t exit code (stderr {err!r})")
    contains(err, "test is successful", "stderr")
    with d.connect() as c:
        expect_ok(c.request(get("/from-one")), b'{"r":"one"}')
        expect_ok(c.request(get("/from-two")), b'{"r":"two"}')
        expect_ok(c.request(get("/main")), b'{"r":"main"}')
        expect_error(c.request(req("POST", "/from-two")), 405, "method_not_allowed", close=False)
    eq(d.stop(), 0, "exit code")


@test
def config_include_errors():
    # a literal file that does not exist
    p, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "include": ["conf.d/missing.json"]}))
    contains(err, "missing.json", "stderr")
    # an included file may only hold routes; its errors name that file
    p, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "include": ["conf.d/*.json"]}),
                           files={"conf.d/bad.json": {"listen": ["127.0.0.1:1"], "routes": []}})
    contains(err, "bad.json", "stderr")
    # a route in an included file that duplicates one of the main file
    p, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "include": ["conf.d/*.json"],
                                       "routes": [{"path": "/x", "respond": {}}]}),
                           files={"conf.d/dup.json": {"routes": [{"path": "/x", "respond": {}}]}})
    contains(err, "duplicate route", "stderr")
    # a pattern that matches nothing is fine
    with TempDir() as t:
        os.makedirs(os.path.join(t.path, "conf.d"))
        p = t.write("g.json", {"listen": ["127.0.0.1:8080"], "include": ["conf.d/*.json"]})
        rc, _, err = run_cli(["-t", "-c", p])
        eq(rc, 0, f"exit code for a glob matching nothing (stderr {err!r})")


@test
def config_rejects_reserved_headers_and_unsupported_kinds():
    for h in ["Content-Length", "connection", "Date", "Transfer-Encoding"]:
        _, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"],
                                           "routes": [{"path": "/a", "respond": {"headers": {h: "1"}}}]}))
        contains(err, h, "stderr")
    _, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"],
                                       "routes": [{"path": "/a", "proxy": {"upstream": "http://127.0.0.1:1"}}]}))
    contains(err, 'routes[0].proxy.upstream: unknown key "upstream"', "stderr for a proxy with an unknown key")
    _, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "routes": [{"path": "/a", "calls": []}]}))
    contains(err, "routes[0].calls: must be a non-empty array of calls", "stderr for an empty calls")
    _, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "routes": [{"path": "/a"}]}))
    _, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "workers": 0}))
    contains(err, "workers", "stderr")
    _, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "workers": 257}))
    _, err = _config_error(json.dumps({"listen": ["127.0.0.1:8080"], "http": {"max_body_bytes": "1"}}))


@test
def config_missing_file():
    rc, _, err = run_cli(["-t", "-c", "/nonexistent/gatherd-test.json"])
    eq(rc, 1, f"exit code (stderr {err!r})")
    contains(err, "/nonexistent/gatherd-test.json", "stderr")


@test
def startup_port_in_use_exits_1():
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with TempDir() as t:
            p = t.write("g.json", {"listen": [f"127.0.0.1:{port}"], "routes": ROUTES})
            t0 = time.monotonic()
            rc, out, err = run_cli(["-c", p, "-w", "2"], timeout=10)
            eq(rc, 1, f"exit code (stderr {err!r})")
            contains(err, "cannot listen on", "stderr")
            check(time.monotonic() - t0 < 10, "took too long to fail")
    finally:
        holder.close()
    # another gatherd (whose sockets use SO_REUSEPORT) must not silently share the port
    d = Daemon(config())
    with TempDir() as t:
        p = t.write("g.json", {"listen": [f"127.0.0.1:{d.port}"], "routes": ROUTES})
        rc, out, err = run_cli(["-c", p, "-w", "2"], timeout=10)
        eq(rc, 1, f"exit code of a second gatherd on the same port (stderr {err!r})")
        contains(err, "cannot listen on", "stderr")
    with d.connect() as c:
        expect_ok(c.request(get("/health")), b'{"ok":true}')


# --- basic requests -----------------------------------------------------------------

@test
def get_basic_headers_and_body():
    d = Daemon(config())
    with d.connect() as c:
        r = c.request(get("/health"))
        expect_ok(r, b'{"ok":true}')
        standard_headers(r)
        eq(r.reason, "OK", "reason phrase")
        eq(r.header("Content-Type"), "application/json", "Content-Type")
        eq(r.header("Content-Length"), "11", "Content-Length")
        check(HEX32_RE.match(r.header("X-Request-Id")), f"generated X-Request-Id {r.header('X-Request-Id')!r}")
        check(r.header("Transfer-Encoding") is None, "no Transfer-Encoding expected")
        check(r.header("Connection") is None or r.header("Connection").lower() != "close",
              "HTTP/1.1 response must not close by default")


@test
def head_has_get_headers_no_body():
    d = Daemon(config())
    with d.connect() as c:
        r = c.request(req("HEAD", "/health"))
        eq(r.status, 200, "status")
        standard_headers(r)
        eq(r.header("Content-Length"), "11", "HEAD Content-Length (same as GET)")
        eq(r.header("Content-Type"), "application/json", "Content-Type")
        # No body bytes: the next response must start right away on the same connection.
        r2 = c.request(get("/a"))
        expect_ok(r2, b'{"r":"a"}')
        r3 = c.request(req("HEAD", "/nope"))
        eq(r3.status, 404, "HEAD of an unknown path")
        check(int(r3.header("Content-Length")) > 0, "HEAD 404 Content-Length")
        expect_ok(c.request(get("/b")), b'{"r":"b"}')
        check(c.still_open(0.2) and not c.buf, "unexpected bytes after HEAD responses")


@test
def not_found_404():
    d = Daemon(config())
    with d.connect() as c:
        r = c.request(get("/nope", headers={"X-Request-Id": "rid-404"}))
        j = expect_error(r, 404, "not_found", close=False)
        standard_headers(r)
        eq(j["error"]["request_id"], "rid-404", "error.request_id")
        # not a parse error: the connection stays usable
        expect_ok(c.request(get("/health")), b'{"ok":true}')
        expect_error(c.request(get("/")), 404, "not_found", close=False)
        expect_error(c.request(get("/healthz")), 404, "not_found", close=False)
        expect_error(c.request(get("/health/x")), 404, "not_found", close=False)


@test
def method_not_allowed_405_with_allow():
    d = Daemon(config())
    with d.connect() as c:
        r = c.request(req("POST", "/health", body=b"x"))
        expect_error(r, 405, "method_not_allowed", close=False)
        allow = r.header("Allow")
        check(allow is not None, "Allow header missing")
        eq(sorted(a.strip() for a in allow.split(",")), ["GET", "HEAD"], "Allow methods")
        r = c.request(req("DELETE", "/health"))
        expect_error(r, 405, "method_not_allowed", close=False)
        r = c.request(get("/echo"))
        expect_error(r, 405, "method_not_allowed", close=False)
        eq(sorted(a.strip() for a in r.header("Allow").split(",")), ["POST", "PUT"], "Allow for /echo")
        r = c.request(req("HEAD", "/echo"))
        eq(r.status, 405, "HEAD on a POST/PUT route")
        # two routes on one path, different methods
        expect_ok(c.request(get("/item")), b'{"r":"get-item"}')
        expect_ok(c.request(req("DELETE", "/item")), b'{"r":"delete-item"}')
        r = c.request(req("PUT", "/item", body=b"{}"))
        expect_error(r, 405, "method_not_allowed", close=False)
        eq(sorted(a.strip() for a in r.header("Allow").split(",")), ["DELETE", "GET", "HEAD"], "Allow for /item")


@test
def post_with_body_and_any_method_route():
    d = Daemon(config())
    with d.connect() as c:
        r = c.request(req("POST", "/echo", headers={"Content-Type": "application/json"}, body=b'{"name":"x"}'))
        expect_ok(r, b'{"created":true}', status=201)
        eq(r.reason, "Created", "reason phrase")
        r = c.request(req("PUT", "/echo", body=b"y" * 5000))
        expect_ok(r, b'{"created":true}', status=201)
        for m in ("GET", "POST", "DELETE", "PATCH", "OPTIONS", "PUT"):
            expect_ok(c.request(req(m, "/any", body=b"1" if m in ("POST", "PUT", "PATCH") else b"")),
                      b'{"any":true}')
        r = c.request(req("HEAD", "/any"))
        eq((r.status, r.header("Content-Length")), (200, "12"), "HEAD /any")
        expect_ok(c.request(get("/health")), b'{"ok":true}')


@test
def respond_route_exact_bytes():
    body = {"ok": True, "n": [1, 2.5, "x", None], "s": "\u00e9\u4e2d", "o": {}}
    cfg = config(routes=[{"path": "/custom", "respond": {"status": 201,
                                                         "headers": {"X-A": "b", "Cache-Control": "no-store"},
                                                         "body": body}},
                         {"path": "/ctype", "respond": {"status": 202, "headers": {"Content-Type": "text/x-json"},
                                                        "body": {"k": 1}}},
                         {"path": "/teapot", "respond": {"status": 418, "body": [1, 2]}},
                         {"path": "/number", "respond": {"body": 42}},
                         {"path": "/nobody", "respond": {"status": 200}},
                         {"path": "/nocontent", "respond": {"status": 204}}])
    d = Daemon(cfg)
    want_body = '{"ok":true,"n":[1,2.5,"x",null],"s":"\u00e9\u4e2d","o":{}}'.encode("utf-8")
    with d.connect() as c:
        r = c.request(get("/custom", headers={"X-Request-Id": "fixed-id-1"}))
        head_lines = r.raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        eq(head_lines[0], b"HTTP/1.1 201 Created", "status line")
        got = sorted((k.lower(), v) for k, v in r.headers if k.lower() != "date")
        want = sorted([("server", "gatherd"), ("x-request-id", "fixed-id-1"), ("x-a", "b"),
                       ("cache-control", "no-store"), ("content-type", "application/json"),
                       ("content-length", str(len(want_body)))])
        eq(got, want, "header set")
        check(DATE_RE.match(r.header("Date") or ""), "Date")
        eq(r.body, want_body, "body bytes")
        r = c.request(get("/ctype"))
        eq(r.status, 202, "status")
        eq(r.header_all("Content-Type"), ["text/x-json"], "Content-Type set by the route, once")
        eq(r.body, b'{"k":1}', "body")
        r = c.request(get("/teapot"))
        eq((r.status, r.body), (418, b"[1,2]"), "418 route")
        r = c.request(get("/number"))
        eq((r.status, r.body, r.header("Content-Type")), (200, b"42", "application/json"), "number body")
        r = c.request(get("/nobody"))
        eq((r.status, r.header("Content-Length"), r.body), (200, "0", b""), "route without body")
        r = c.request(get("/nocontent"))
        eq(r.status, 204, "status")
        eq(r.header("Content-Length"), None, "204 must have no Content-Length")
        standard_headers(r)
        # nothing (no body) followed the 204 head
        expect_ok(c.request(get("/ctype")), b'{"k":1}', status=202)


@test
def respond_string_body_is_text():
    """A string respond.body is sent as it is, as text/plain; charset=utf-8,
    unless the route sets a Content-Type (README: Configuration reference);
    any other JSON value is sent compact as application/json."""
    d = Daemon(config(routes=[{"path": "/s", "respond": {"body": "hello \"w\""}},
                              {"path": "/s2", "respond": {"headers": {"Content-Type": "text/csv"}, "body": "a,b"}},
                              {"path": "/n", "respond": {"body": 42}}]))
    with d.connect() as c:
        r = c.request(get("/s"))
        eq((r.status, r.header("Content-Type"), r.body), (200, "text/plain; charset=utf-8", b'hello "w"'),
           "string body (status, Content-Type, bytes)")
        r = c.request(get("/s2"))
        eq((r.header_all("Content-Type"), r.body), (["text/csv"], b"a,b"), "string body with a route Content-Type")
        r = c.request(get("/n"))
        eq((r.header("Content-Type"), r.body), ("application/json", b"42"), "number body")


@test
def routing_precedence_exact_param_wildcard():
    d = Daemon(config())
    with d.connect() as c:
        for path, body in [("/users/me", b'{"r":"exact"}'), ("/users/42", b'{"r":"param"}'), ("/users/me/x", b'{"r":"wildcard"}'),
                           ("/users/42/x/y", b'{"r":"wildcard"}'), ("/users/me?x=1", b'{"r":"exact"}'),
                           ("/users/meme", b'{"r":"param"}'), ("/users/ME", b'{"r":"param"}'),
                           ("/users", b'{"r":"wildcard"}'), ("/public", b'{"r":"public"}')]:
            expect_ok(c.request(get(path)), body)
        expect_error(c.request(get("/user")), 404, "not_found", close=False)


@test
def routing_falls_back_to_less_specific_route_for_method():
    routes = [{"path": "/v/me", "methods": ["GET"], "respond": {"body": {"r": "exact"}}},
              {"path": "/v/{id}", "methods": ["POST"], "respond": {"body": {"r": "param"}}},
              {"path": "/v/*", "methods": ["DELETE"], "respond": {"body": {"r": "wildcard"}}}]
    d = Daemon(config(routes=routes))
    with d.connect() as c:
        expect_ok(c.request(get("/v/me")), b'{"r":"exact"}')
        expect_ok(c.request(req("POST", "/v/me", body=b"x")), b'{"r":"param"}')
        expect_ok(c.request(req("DELETE", "/v/me")), b'{"r":"wildcard"}')
        r = c.request(req("PUT", "/v/me", body=b"x"))
        expect_error(r, 405, "method_not_allowed", close=False)
        eq(sorted(a.strip() for a in r.header("Allow").split(",")), ["DELETE", "GET", "HEAD", "POST"], "Allow")


# --- X-Request-Id -------------------------------------------------------------------

@test
def request_id_echoed_when_sane():
    d = Daemon(config())
    with d.connect() as c:
        for rid in ["abc", "A", "0123-abcd_EF.gh:ij+kl/mn=", "x" * 63,
                    "550e8400-e29b-41d4-a716-446655440000"]:
            r = c.request(get("/health", headers={"X-Request-Id": rid}))
            expect_ok(r)
            eq(r.header("X-Request-Id"), rid, "echoed X-Request-Id")
        r = c.request(get("/nope", headers={"x-request-id": "lower-case-name"}))
        eq(r.header("X-Request-Id"), "lower-case-name", "echo with a lower-case header name")
        eq(r.json()["error"]["request_id"], "lower-case-name", "error.request_id")


@test
def request_id_regenerated_when_insane():
    d = Daemon(config())
    seen = set()
    with d.connect() as c:
        for rid in ["a b", "x" * 64, "y" * 200, "caf\u00e9", "a;b", "a,b", "<script>", '"q"', ""]:
            r = c.request(get("/health", headers=[("X-Request-Id", rid)]))
            expect_ok(r)
            got = r.header("X-Request-Id")
            check(got != rid.strip(), f"insane X-Request-Id {rid!r} was echoed")
            check(HEX32_RE.match(got or ""), f"regenerated id for {rid!r} is {got!r}, want 32 hex chars")
            seen.add(got)
        for _ in range(5):
            r = c.request(get("/health"))
            check(HEX32_RE.match(r.header("X-Request-Id") or ""), "generated id")
            seen.add(r.header("X-Request-Id"))
    eq(len(seen), 14, "generated ids must all differ")


@test
def error_body_request_id_matches_header():
    """The request_id in an error body is the response's X-Request-Id, also
    for errors detected while parsing the head."""
    d = Daemon(config(http={"client_header_timeout_ms": 300}))
    cases = [
        get("/nope"),
        req("POST", "/health", body=b"x"),
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Request-Id: parse-err\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: t\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-A: \x01\r\n\r\n",
    ]
    problems = []
    for raw in cases:
        with d.connect() as c:
            r = c.request(raw)
            hid = r.header("X-Request-Id")
            bid = r.json()["error"].get("request_id")
            if not hid or bid != hid:
                problems.append(f"sent {raw[:60]!r}: {r.status}, X-Request-Id {hid!r} but error.request_id {bid!r}")
    with d.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\nHo")
        r = c.read_response()
        eq(r.status, 408, "status")
        hid, bid = r.header("X-Request-Id"), r.json()["error"].get("request_id")
        if not hid or bid != hid:
            problems.append(f"header timeout: 408, X-Request-Id {hid!r} but error.request_id {bid!r}")
    check(not problems, "; ".join(problems))


# --- keep-alive and pipelining ------------------------------------------------------

@test
def keepalive_http11_reuses_connection():
    d = Daemon(config())
    with d.connect() as c:
        local = c.sock.getsockname()
        for i, path in enumerate(["/a", "/b", "/health"]):
            r = c.request(get(path, headers={"X-Request-Id": f"ka-{i}"}))
            eq(r.status, 200, f"status of request {i + 1}")
            eq(r.header("X-Request-Id"), f"ka-{i}", "request id")
            check((r.header("Connection") or "").lower() != "close", f"response {i + 1} has Connection: close")
        eq(c.sock.getsockname(), local, "same socket")
        check(c.still_open(0.3), "server closed a keep-alive connection")


@test
def http10_closes_by_default():
    d = Daemon(config())
    with d.connect() as c:
        r = c.request(b"GET /health HTTP/1.0\r\n\r\n")
        expect_ok(r, b'{"ok":true}')
        eq(r.version, "HTTP/1.1", "response version")
        check((r.header("Connection") or "").lower() != "keep-alive", "1.0 without keep-alive got keep-alive")
        eq(c.read_all_until_close(3), b"", "bytes after the response")
    with d.connect() as c:  # Host given, still 1.0
        expect_ok(c.request(b"GET /a HTTP/1.0\r\nHost: t\r\n\r\n"), b'{"r":"a"}')
        eq(c.read_all_until_close(3), b"", "bytes after the response")


@test
def http10_keepalive_when_asked():
    d = Daemon(config())
    with d.connect() as c:
        for path, body in [("/a", b'{"r":"a"}'), ("/b", b'{"r":"b"}'), ("/health", b'{"ok":true}')]:
            r = c.request(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            expect_ok(r, body)
            eq((r.header("Connection") or "").lower(), "keep-alive", "Connection header")
        r = c.request(b"GET /c HTTP/1.0\r\n\r\n")
        expect_ok(r, b'{"r":"c"}')
        eq(c.read_all_until_close(3), b"", "bytes after the last 1.0 response")


@test
def connection_close_honoured():
    d = Daemon(config())
    with d.connect() as c:
        expect_ok(c.request(get("/a")), b'{"r":"a"}')
        r = c.request(get("/b", headers={"Connection": "close"}))
        expect_ok(r, b'{"r":"b"}')
        eq((r.header("Connection") or "").lower(), "close", "Connection header")
        eq(c.read_all_until_close(3), b"", "bytes after Connection: close")
    with d.connect() as c:
        r = c.request(get("/nope", headers={"Connection": "close"}))
        eq(r.status, 404, "status")
        eq((r.header("Connection") or "").lower(), "close", "Connection header on 404")
        eq(c.read_all_until_close(3), b"", "bytes after Connection: close")


@test
def pipelining_in_order():
    d = Daemon(config())
    with d.connect() as c:
        c.send(get("/a", headers={"X-Request-Id": "p1"}) + get("/b", headers={"X-Request-Id": "p2"}) +
               get("/c", headers={"X-Request-Id": "p3"}))
        for rid, body in [("p1", b'{"r":"a"}'), ("p2", b'{"r":"b"}'), ("p3", b'{"r":"c"}')]:
            r = c.read_response()
            expect_ok(r, body)
            eq(r.header("X-Request-Id"), rid, "request id order")
        # mixed: a POST with a body, a HEAD, a 404, a GET
        c.send(req("POST", "/echo", body=b"hello world", headers={"X-Request-Id": "q1"}) +
               req("HEAD", "/health", headers={"X-Request-Id": "q2"}) +
               get("/missing", headers={"X-Request-Id": "q3"}) + get("/c", headers={"X-Request-Id": "q4"}))
        r = c.read_response()
        eq((r.status, r.header("X-Request-Id"), r.body), (201, "q1", b'{"created":true}'), "POST")
        r = c.read_response("HEAD")
        eq((r.status, r.header("X-Request-Id"), r.body), (200, "q2", b""), "HEAD")
        r = c.read_response()
        eq((r.status, r.header("X-Request-Id")), (404, "q3"), "404")
        r = c.read_response()
        eq((r.status, r.header("X-Request-Id"), r.body), (200, "q4", b'{"r":"c"}'), "GET")
        check(c.still_open(0.2), "connection closed after pipelined requests")


@test
def pipelining_byte_by_byte_and_many():
    d = Daemon(config())
    with d.connect() as c:
        data = get("/a") + get("/b")
        for i in range(len(data)):
            c.send(data[i:i + 1])
        expect_ok(c.read_response(), b'{"r":"a"}')
        expect_ok(c.read_response(), b'{"r":"b"}')
        n = 100
        c.send(b"".join(get(["/a", "/b", "/c"][i % 3], headers={"X-Request-Id": f"m{i}"}) for i in range(n)))
        for i in range(n):
            r = c.read_response()
            eq((r.status, r.header("X-Request-Id"), r.body), (200, f"m{i}", [b'{"r":"a"}', b'{"r":"b"}', b'{"r":"c"}'][i % 3]),
               f"pipelined response {i}")


@test
def pipelining_stops_at_connection_close():
    d = Daemon(config())
    with d.connect() as c:
        c.send(get("/a") + get("/b", headers={"Connection": "close"}) + get("/c"))
        expect_ok(c.read_response(), b'{"r":"a"}')
        r = c.read_response()
        expect_ok(r, b'{"r":"b"}')
        eq((r.header("Connection") or "").lower(), "close", "Connection header")
        eq(c.read_all_until_close(3), b"", "the request after Connection: close must not be answered")


@test
def pipelining_stops_at_bad_request():
    d = Daemon(config())
    with d.connect() as c:
        c.send(get("/a") + b"GET /b HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n" + get("/c"))
        expect_ok(c.read_response(), b'{"r":"a"}')
        expect_error(c.read_response(), 400, "bad_request")
        eq(c.read_all_until_close(3), b"", "nothing after the 400")


@test
def half_close_after_pipelined_requests_answers_all():
    """A client that sends its requests and then shuts down its write side
    still gets every answer, then the server closes."""
    d = Daemon(config())
    with d.connect() as c:
        c.send(get("/a") + get("/b") + get("/c"))
        c.shut_wr()
        for body in (b'{"r":"a"}', b'{"r":"b"}', b'{"r":"c"}'):
            expect_ok(c.read_response(), body)
        eq(c.read_all_until_close(3), b"", "bytes after the answers")


def _pipeline_concurrently(c, data, nresp, method="GET"):
    """Sends data from a thread while reading nresp responses; returns them."""
    err = []

    def sender():
        try:
            c.sock.sendall(data)
        except OSError as e:
            err.append(e)

    th = threading.Thread(target=sender)
    th.start()
    out = []
    try:
        for _ in range(nresp):
            out.append(c.read_response(method))
    finally:
        th.join(30)
    check(not err, f"sending failed: {err}")
    return out


@test
def pipelining_large_volume():
    """Many more pipelined requests than the daemon buffers at once (64 KiB of
    input, 256 KiB of output), with small and with large responses."""
    big = {"data": "x" * 100000}
    routes = ROUTES + [{"path": "/big", "respond": {"body": big}}]
    d = Daemon(config(routes=routes, http={"max_keepalive_requests": 100000}))
    big_bytes = json.dumps(big, separators=(",", ":")).encode()
    with d.connect(timeout=20) as c:
        n = 20000
        reqs = b"".join(get(["/a", "/b", "/c"][i % 3], headers={"X-Request-Id": f"v{i}"}) for i in range(n))
        resps = _pipeline_concurrently(c, reqs, n)
        for i, r in enumerate(resps):
            if (r.status, r.header("X-Request-Id"), r.body) != (200, f"v{i}", [b'{"r":"a"}', b'{"r":"b"}',
                                                                             b'{"r":"c"}'][i % 3]):
                raise TestFailure(f"response {i} of {n}: {r.raw[:200]!r}")
        n = 300
        resps = _pipeline_concurrently(c, b"".join(get("/big", headers={"X-Request-Id": f"g{i}"})
                                                   for i in range(n)), n)
        for i, r in enumerate(resps):
            if (r.status, r.header("X-Request-Id"), len(r.body)) != (200, f"g{i}", len(big_bytes)) or \
                    r.body != big_bytes:
                raise TestFailure(f"large response {i} of {n}: {r.raw[:200]!r} ({len(r.body)} body bytes)")
        r = c.request(req("HEAD", "/big"))
        eq((r.status, r.header("Content-Length")), (200, str(len(big_bytes))), "HEAD of a large body")
        expect_ok(c.request(get("/a")), b'{"r":"a"}')


@test
def send_timeout_closes_stalled_reader():
    """A client that stops reading a large response is disconnected after
    send_timeout_ms instead of holding the connection forever."""
    big = {"data": "y" * (8 << 20)}
    routes = ROUTES + [{"path": "/huge", "respond": {"body": big}}]
    d = Daemon(config(routes=routes, http={"send_timeout_ms": 300, "keepalive_timeout_ms": 60000}))
    total = len(json.dumps(big, separators=(",", ":")))
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10 * SLOW)
    try:
        s.connect(("127.0.0.1", d.port))
        s.sendall(get("/huge"))
        time.sleep(1.5)  # not reading: the daemon's socket buffer fills and its send timeout (300 ms) passes
        got = 0
        deadline = time.monotonic() + 10 * SLOW
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += len(chunk)
        check(got < total, f"the whole {total}-byte response arrived: no send timeout")
        check(time.monotonic() < deadline, "connection not closed")
    finally:
        s.close()
    with d.connect() as c:
        expect_ok(c.request(get("/a")), b'{"r":"a"}')


@test
def max_keepalive_requests():
    d = Daemon(config(http={"max_keepalive_requests": 3}))
    with d.connect() as c:
        for i in range(1, 4):
            r = c.request(get("/a"))
            expect_ok(r, b'{"r":"a"}')
            conn = (r.header("Connection") or "").lower()
            if i < 3:
                check(conn != "close", f"response {i} of 3 has Connection: close")
            else:
                eq(conn, "close", "Connection header of response 3")
        eq(c.read_all_until_close(3), b"", "bytes after the last allowed response")
    with d.connect() as c:  # pipelined: the 4th is not answered
        c.send(get("/a") * 4)
        for i in range(3):
            expect_ok(c.read_response(), b'{"r":"a"}')
        eq(c.read_all_until_close(3), b"", "a 4th pipelined request was answered")
    d2 = Daemon(config(http={"max_keepalive_requests": 1}))
    with d2.connect() as c:
        r = c.request(get("/a"))
        eq((r.header("Connection") or "").lower(), "close", "max_keepalive_requests 1")
        eq(c.read_all_until_close(3), b"", "bytes after the only response")


@test
def keepalive_timeout_closes_idle():
    d = Daemon(config(http={"keepalive_timeout_ms": 500, "client_header_timeout_ms": 10000}))
    with d.connect() as c:
        expect_ok(c.request(get("/a")), b'{"r":"a"}')
        dt = c.closed_within(3)
        check(dt >= 0.3, f"closed after {dt:.3f}s, before keepalive_timeout_ms (500)")
    # activity restarts nothing beyond a request: a second request within the timeout works
    with d.connect() as c:
        expect_ok(c.request(get("/a")), b'{"r":"a"}')
        time.sleep(0.2)
        expect_ok(c.request(get("/b")), b'{"r":"b"}')
        dt = c.closed_within(3)
        check(dt >= 0.3, f"closed after {dt:.3f}s")


# --- timeouts ---------------------------------------------------------------------------

@test
def header_timeout_408():
    d = Daemon(config(http={"client_header_timeout_ms": 400, "keepalive_timeout_ms": 10000}))
    with d.connect() as c:
        t0 = time.monotonic()
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Partial: ye")
        r = c.read_response()
        dt = time.monotonic() - t0
        expect_error(r, 408, "request_timeout")
        standard_headers(r)
        check(0.25 <= dt <= 3 * SLOW, f"408 after {dt:.3f}s for a 400 ms timeout")
        eq(c.read_all_until_close(3), b"", "bytes after the 408")
    # a slow-loris sending a byte at a time still times out (total, not idle, timeout)
    with d.connect() as c:
        t0 = time.monotonic()
        data = b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 1000
        got = None
        for i in range(len(data)):
            try:
                c.send(data[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                c.sock.settimeout(0.05)
                chunk = c.sock.recv(65536)
                if chunk:
                    c.buf += chunk
                    got = True
                    break
            except socket.timeout:
                pass
            if time.monotonic() - t0 > 4 * SLOW:
                break
        check(got, "no response to a slow-loris within 4 s (header timeout 400 ms)")
        expect_error(c.read_response(), 408, "request_timeout")


@test
def header_timeout_on_second_keepalive_request():
    d = Daemon(config(http={"client_header_timeout_ms": 400, "keepalive_timeout_ms": 10000}))
    with d.connect() as c:
        expect_ok(c.request(get("/a")), b'{"r":"a"}')
        c.send(b"GET /b HTTP/1.1\r\n")
        r = c.read_response()
        expect_error(r, 408, "request_timeout")
        eq(c.read_all_until_close(3), b"", "bytes after the 408")


@test
def body_timeout_408():
    d = Daemon(config(http={"client_body_timeout_ms": 400, "client_header_timeout_ms": 10000}))
    with d.connect() as c:
        t0 = time.monotonic()
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        r = c.read_response()
        dt = time.monotonic() - t0
        expect_error(r, 408, "request_timeout")
        check(0.25 <= dt <= 3 * SLOW, f"408 after {dt:.3f}s for a 400 ms timeout")
        eq(c.read_all_until_close(3), b"", "bytes after the 408")
    with d.connect() as c:  # chunked body stalls
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        expect_error(c.read_response(), 408, "request_timeout")
        eq(c.read_all_until_close(3), b"", "bytes after the 408")


@test
def idle_connection_closed_silently():
    d = Daemon(config(http={"client_header_timeout_ms": 400, "keepalive_timeout_ms": 10000}))
    with d.connect() as c:
        dt = c.closed_within(3)
        check(dt >= 0.25, f"idle connection closed after {dt:.3f}s, before the 400 ms header timeout")


# --- limits -----------------------------------------------------------------------------

@test
def body_too_large_413_content_length():
    d = Daemon(config(http={"max_body_bytes": 100}))
    with d.connect() as c:
        expect_ok(c.request(req("POST", "/echo", body=b"x" * 100)), status=201)
    # rejected from the head alone: the body is never sent
    r = expect_reject(d, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n", 413, "body_too_large")
    r = expect_reject(d, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n", 413,
                      "body_too_large")


@test
def content_length_whole_range():
    """Every Content-Length from 0 to past 2^64: up to the limit accepted,
    above it 413 before the body is read, past 2^63-1 400 (it cannot be
    held as a signed count), past 2^64-1 400 (llhttp)."""
    d = Daemon(config(http={"max_body_bytes": 100}))
    with d.connect() as c:
        for n in (0, 1, 99, 100):
            expect_ok(c.request(req("POST", "/echo", headers={"Content-Length": str(n)}, body=b"x" * n)),
                      status=201)
    for cl, status, code in [("101", 413, "body_too_large"), (str(2**31), 413, "body_too_large"),
                             (str(2**32 + 1), 413, "body_too_large"), (str(2**63 - 1), 413, "body_too_large"),
                             (str(2**63), 400, "bad_request"), (str(2**63 + 1), 400, "bad_request"),
                             (str(2**64 - 1), 400, "bad_request"), (str(2**64), 400, "bad_request"),
                             ("9" * 30, 400, "bad_request")]:
        r = expect_reject(d, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: " + cl.encode() + b"\r\n\r\n"
                             b"GET /admin HTTP/1.1\r\nHost: t\r\n\r\n", status, code)
        check(b"admin" not in r.body, f"Content-Length {cl}: {r.body!r}")


@test
def host_header_rules():
    """Valid Host values are served; every other one is 400, and the
    connection is closed."""
    d = Daemon(config())
    good = ["t", "example.com", "example.com.", "EXAMPLE.com:8080", "127.0.0.1", "127.0.0.1:1", "[::1]",
            "[::1]:65535", "a-b_c~d", "%41", "x:0"]
    with d.connect() as c:
        for h in good:
            r = c.request(get("/a", host=h))
            eq(r.status, 200, f"Host: {h}")
    bad = ["a b", "evil.com/../x", "a/b", "a\\b", "u@h", "h:", "h:65536", "h:1x", "[::1", "[x]", "::1", "a?b",
           "a#b", "%zz", "a\"b", "a<b>", "h:80:80"]
    for h in bad:
        expect_reject(d, b"GET /a HTTP/1.1\r\nHost: " + h.encode() + b"\r\n\r\n", 400, "bad_request")
    # absolute-form: its authority is checked the same way
    with d.connect() as c:
        expect_ok(c.request(get("http://[::1]:8080/a")), b'{"r":"a"}')
    expect_reject(d, get("http://h:99999/a"), 400, "bad_request")


@test
def body_too_large_413_chunked():
    d = Daemon(config(http={"max_body_bytes": 100}))
    with d.connect() as c:
        r = c.request(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"32\r\n" + b"x" * 50 + b"\r\n32\r\n" + b"y" * 50 + b"\r\n0\r\n\r\n")
        expect_ok(r, status=201)
    expect_reject(d, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"32\r\n" + b"x" * 50 + b"\r\n33\r\n" + b"y" * 51 + b"\r\n0\r\n\r\n", 413, "body_too_large")
    # one huge chunk declared, only part of it sent
    expect_reject(d, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"100000\r\n" + b"z" * 200, 413, "body_too_large")


@test
def uri_too_long_414():
    d = Daemon(config(http={"max_url_bytes": 64}))
    with d.connect() as c:
        path = "/users/" + "a" * 57  # 64 bytes
        eq(len(path), 64, "path length")
        expect_ok(c.request(get(path)), b'{"r":"param"}')
    expect_reject(d, get("/users/" + "a" * 58), 414, "uri_too_long")
    expect_reject(d, get("/a?" + "q" * 5000), 414, "uri_too_long")


@test
def headers_too_large_431_bytes():
    d = Daemon(config(http={"max_header_bytes": 512}))
    with d.connect() as c:
        expect_ok(c.request(get("/a", headers={"X-Small": "v" * 100})), b'{"r":"a"}')
    expect_reject(d, get("/a", headers={"X-Big": "v" * 600}), 431, "headers_too_large")
    expect_reject(d, get("/a", headers=[(f"X-H{i}", "v" * 40) for i in range(20)]), 431, "headers_too_large")


@test
def headers_too_many_431_count():
    d = Daemon(config(http={"max_headers": 5}))
    with d.connect() as c:  # Host + 4 = 5 headers
        expect_ok(c.request(get("/a", headers=[(f"X-H{i}", "v") for i in range(4)])), b'{"r":"a"}')
    expect_reject(d, get("/a", headers=[(f"X-H{i}", "v") for i in range(5)]), 431, "headers_too_large")
    expect_reject(d, get("/a", headers=[(f"X-H{i}", "v") for i in range(500)]), 431, "headers_too_large")


# --- request bodies -------------------------------------------------------------------

@test
def chunked_body_accepted():
    d = Daemon(config())
    with d.connect() as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\n" + get("/a"))
        expect_ok(c.read_response(), b'{"created":true}', status=201)
        expect_ok(c.read_response(), b'{"r":"a"}')  # framing: the pipelined request follows the chunked body
        # chunks split across writes
        c.send(b"PUT /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
        c.send(b"c\r\n")
        c.send(b"0\r\n")
        c.send(b"\r\n")
        expect_ok(c.read_response(), status=201)
        check(c.still_open(0.2), "connection closed after a chunked request")


@test
def transfer_codings_other_than_chunked_501():
    """gatherd decodes only chunked; "gzip, chunked" would reach a backend
    still gzipped but without its Transfer-Encoding (hop-by-hop): 501, as
    nginx answers. Names are case-insensitive."""
    d = Daemon(config())
    for te in ("gzip, chunked", "identity, chunked", "deflate,chunked", "x-custom, chunked"):
        expect_reject(d, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: " + te.encode() + b"\r\n\r\n"
                         b"3\r\nabc\r\n0\r\n\r\n" + get("/a"), 501, "not_implemented")
    with d.connect() as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n" + get("/a"))
        expect_ok(c.read_response(), b'{"created":true}', status=201)
        expect_ok(c.read_response(), b'{"r":"a"}')


@test
def chunked_body_with_extension_and_trailer():
    d = Daemon(config())
    with d.connect() as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;name=value\r\nhello\r\n0\r\nX-Trailer: yes\r\n\r\n" + get("/b"))
        expect_ok(c.read_response(), status=201)
        expect_ok(c.read_response(), b'{"r":"b"}')


@test
def expect_100_continue():
    d = Daemon(config(http={"client_body_timeout_ms": 5000}))
    with d.connect() as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        want = b"HTTP/1.1 100 Continue\r\n\r\n"
        while len(c.buf) < len(want):
            check(c._fill(timeout=3 * SLOW), "closed before 100 Continue")
        eq(c.buf[:len(want)], want, "interim response bytes")
        c.buf = c.buf[len(want):]
        eq(c.buf, b"", "nothing after 100 Continue before the body is sent")
        c.send(b"hello")
        r = c.read_response()
        expect_ok(r, b'{"created":true}', status=201)
        # chunked body with 100-continue
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n")
        r = c.read_response()
        eq(r.status, 100, "interim status for chunked")
        c.send(b"3\r\nabc\r\n0\r\n\r\n")
        expect_ok(c.read_response(), status=201)
        # no body: no interim response
        r = c.request(get("/a", headers={"Expect": "100-continue"}))
        expect_ok(r, b'{"r":"a"}')
        # HTTP/1.0 ignores Expect
        r = c.request(b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n"
                      b"Content-Length: 2\r\n\r\nhi")
        expect_ok(r, status=201)


@test
def expect_other_417():
    d = Daemon(config())
    r = expect_reject(d, b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: something\r\nContent-Length: 2\r\n\r\nhi",
                      417, "expectation_failed")
    expect_reject(d, get("/a", headers={"Expect": "100-continue-x"}), 417, "expectation_failed")


@test
def http2_version_505():
    d = Daemon(config())
    with d.connect() as c:
        r = c.request(b"GET /health HTTP/2.0\r\nHost: t\r\n\r\n")
        eq(r.status, 505, f"status ({r.raw[:200]!r})")
        eq(r.version, "HTTP/1.1", "response version")
        eq((r.header("Connection") or "").lower(), "close", "Connection header")
        eq(c.read_all_until_close(3), b"", "bytes after the 505")


@test
def absolute_form_target_routed_on_path():
    d = Daemon(config())
    with d.connect() as c:
        expect_ok(c.request(get("http://example.com/health")), b'{"ok":true}')
        expect_ok(c.request(get("http://example.com:8080/users/7?x=1")), b'{"r":"param"}')
        expect_ok(c.request(get("HTTP://EXAMPLE.COM/a")), b'{"r":"a"}')
        expect_error(c.request(get("http://example.com/nope")), 404, "not_found", close=False)


# --- strict parsing: request smuggling vectors ------------------------------------------

SMUGGLING = {
    "cl_and_te": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n",
    "te_and_cl": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                 b"0\r\n\r\n",
    "two_content_length_equal": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"
                                b"abc",
    "two_content_length_different": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                                    b"Content-Length: 5\r\n\r\nabcde",
    "content_length_list": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
    "content_length_negative": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
    "content_length_not_a_number": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
    "invalid_chunk_size": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
                          b"0\r\n\r\n",
    "chunk_size_overflow": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"fffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    "chunk_missing_crlf": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nabcX0\r\n\r\n",
    "obsolete_line_folding": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
    "obsolete_line_folding_tab": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: b\r\n\tc\r\n\r\n",
    "folded_transfer_encoding": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
                                b"0\r\n\r\n",
    "bare_lf_request_line": b"GET /a HTTP/1.1\nHost: t\r\n\r\n",
    "bare_lf_header_line": b"GET /a HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
    "bare_lf_end_of_head": b"GET /a HTTP/1.1\r\nHost: t\r\n\n",
    "bare_lf_everywhere": b"GET /a HTTP/1.1\nHost: t\n\n",
    "bare_cr_in_header": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: b\rc\r\n\r\n",
    "control_char_in_header_value": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n",
    "nul_in_header_value": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
    "del_in_header_value": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: a\x7fb\r\n\r\n",
    "escape_in_header_value": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: a\x1b[31mb\r\n\r\n",
    "space_in_header_name": b"GET /a HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n",
    "space_before_colon": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length : 3\r\n\r\nabc",
    "tab_before_colon": b"GET /a HTTP/1.1\r\nHost: t\r\nX-A\t: b\r\n\r\n",
    "empty_header_name": b"GET /a HTTP/1.1\r\nHost: t\r\n: b\r\n\r\n",
    "missing_host_http11": b"GET /a HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two_host_headers": b"GET /a HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n",
    "two_host_headers_http10": b"GET /a HTTP/1.0\r\nHost: t\r\nHost: u\r\n\r\n",
    "transfer_encoding_gzip": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "transfer_encoding_identity": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n"
                                  b"Content-Length: 3\r\n\r\nabc",
    "transfer_encoding_chunked_not_last": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n"
                                          b"\r\n0\r\n\r\n",
    "transfer_encoding_unknown_value": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n"
                                       b"0\r\n\r\n",
    "target_asterisk": b"GET * HTTP/1.1\r\nHost: t\r\n\r\n",
    "target_relative": b"GET a HTTP/1.1\r\nHost: t\r\n\r\n",
    "target_authority_like": b"GET example.com/a HTTP/1.1\r\nHost: t\r\n\r\n",
    "target_dotdot_above_root": b"GET /.. HTTP/1.1\r\nHost: t\r\n\r\n",
    # Content-Length past 2^63-1 used to turn negative and skip the body limit
    "content_length_2_63": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 9223372036854775808\r\n\r\n"
                           b"GET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
    "content_length_2_64_minus_1": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551615\r\n\r\n"
                                   b"GET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
    "content_length_2_64": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551616\r\n\r\n",
    "content_length_plus": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
    "content_length_hex": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 0x3\r\n\r\nabc",
    # chunk lines llhttp alone accepts (any byte after the CR; a bare LF at the end)
    "chunk_size_cr_without_lf": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"3\rXabc\r\n0\r\n\r\n",
    "chunk_ext_cr_without_lf": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"3;x\rXabc\r\n0\r\n\r\n",
    "chunk_data_cr_without_lf": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"3\r\nabc\rX0\r\n\r\n",
    "chunk_last_line_bare_lf": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"3\r\nabc\r\n0\r\n\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
    "chunk_trailer_folded": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3\r\nabc\r\n0\r\nX-T: a\r\n b\r\n\r\n",
    "chunk_size_too_many_zeros": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"0" * 40 + b"3\r\nabc\r\n0\r\n\r\n",
    "chunk_size_2_64": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"10000000000000000\r\nabc\r\n0\r\n\r\n",
    "transfer_encoding_empty": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n\r\n0\r\n\r\n",
    "transfer_encoding_http10": b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "tab_in_target": b"GET /a\tb HTTP/1.1\r\nHost: t\r\n\r\n",
    # Host is host[:port] (RFC 3986), else 400 as nginx answers
    "host_with_space": b"GET /a HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host_with_path": b"GET /a HTTP/1.1\r\nHost: evil.com/../x\r\n\r\n",
    "host_empty": b"GET /a HTTP/1.1\r\nHost:\r\n\r\n",
    "host_with_userinfo": b"GET /a HTTP/1.1\r\nHost: user@h\r\n\r\n",
    "host_bad_port": b"GET /a HTTP/1.1\r\nHost: h:65536\r\n\r\n",
    "host_http10_invalid": b"GET /a HTTP/1.0\r\nHost: a,b c\r\n\r\n",
    "absolute_form_bad_authority": b"GET http://a b/a HTTP/1.1\r\nHost: t\r\n\r\n",
    "absolute_form_userinfo": b"GET http://u@h/a HTTP/1.1\r\nHost: h\r\n\r\n",
    "absolute_form_empty_authority": b"GET http:///a HTTP/1.1\r\nHost: t\r\n\r\n",
}


def _make_smuggling_test(name, raw):
    def fn():
        d = Daemon(config())
        expect_reject(d, raw, 400, "bad_request")
        # the daemon is fine afterwards
        with d.connect() as c:
            expect_ok(c.request(get("/a")), b'{"r":"a"}')
    fn.__name__ = "reject_" + name
    return fn


for _name, _raw in SMUGGLING.items():
    test(_make_smuggling_test(_name, _raw))


@test
def smuggled_request_never_answered():
    """Whatever follows a rejected request on the same connection is ignored."""
    d = Daemon(config())
    attempts = [
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: t\r\nX: y\r\n Content-Length: 5\r\n\r\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
    ]
    for raw in attempts:
        with d.connect() as c:
            c.send(raw)
            r = c.read_response()
            eq(r.status, 400, f"status for {raw[:80]!r}")
            rest = c.read_all_until_close(3)
            check(b"admin" not in rest and rest == b"", f"smuggled request answered: {rest[:200]!r}")


@test
def lingering_close_delivers_error_response():
    """After a 400 the server shuts down writing first and drains input, so a
    client still sending gets the whole response rather than a reset."""
    d = Daemon(config(http={"lingering_timeout_ms": 2000}))
    with d.connect() as c:
        junk = b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: \x01\r\n\r\n" + b"x" * (512 * 1024)
        err = []

        def sender():
            try:
                c.sock.sendall(junk)
            except OSError as e:
                err.append(e)

        th = threading.Thread(target=sender)
        th.start()
        r = c.read_response()
        expect_error(r, 400, "bad_request")
        th.join(10)
        check(not th.is_alive(), "sender blocked: the server stopped reading")
        check(not err, f"sending after the error response failed ({err}): the server reset the connection "
                       "instead of draining it")
        try:
            c.shut_wr()
        except OSError as e:
            raise TestFailure(f"connection reset by the server after the response, no lingering close ({e})")
        # a clean FIN, not a reset
        c.sock.settimeout(5 * SLOW)
        try:
            rest = c.sock.recv(65536)
        except ConnectionResetError:
            raise TestFailure("connection reset after the response (no lingering close)")
        eq(c.buf + rest, b"", "bytes after the 400")


# --- path normalization -------------------------------------------------------------

@test
def path_normalization_routes_safely():
    d = Daemon(config())
    cases = [
        ("/public/x", b'{"r":"public"}'),
        ("/public/../admin", b'{"r":"admin"}'),
        ("/public/%2e%2e/admin", b'{"r":"admin"}'),
        ("/public/%2E%2E/admin", b'{"r":"admin"}'),
        ("/public/.%2e/admin", b'{"r":"admin"}'),
        ("/public/%2e./admin", b'{"r":"admin"}'),
        ("/public/x/../../admin", b'{"r":"admin"}'),
        ("//admin", b'{"r":"admin"}'),
        ("/./admin", b'{"r":"admin"}'),
        ("/admin/", b'{"r":"admin"}'),
        ("/admin/.", b'{"r":"admin"}'),
        ("///public//x", b'{"r":"public"}'),
        ("/%61dmin", b'{"r":"admin"}'),
        ("/admin?x=/public/y", b'{"r":"admin"}'),
        ("/public/a%2Fb", b'{"r":"public"}'),
        ("/public/..%2Fadmin", b'{"r":"public"}'),
        ("/files/a%2Fb", b'{"r":"file"}'),
        ("/files/a%2f..%2fb", b'{"r":"file"}'),
        ("/files/x/../y", b'{"r":"file"}'),
    ]
    problems = []
    with d.connect() as c:
        for path, body in cases:
            r = c.request(get(path))
            if (r.status, r.body) != (200, body):
                problems.append(f"{path}: {r.status} {r.body[:80]!r}, want 200 {body!r}")
        r = c.request(get("/files/a/b"))
        if r.status != 404:
            problems.append(f"/files/a/b: {r.status}, want 404 (two segments)")
    check(not problems, "; ".join(problems))
    for bad in ["/..", "/../admin", "/public/../..", "/public/%2e%2e/%2e%2e/admin", "/%2e%2e", "/a/./../../b"]:
        # (the JSON of this error body is checked by reject_target_dotdot_above_root)
        expect_reject(d, get(bad), 400, "bad_request", json_body=False)


# --- IPv6 ------------------------------------------------------------------------------

@test
def ipv6_listen():
    if not ipv6_loopback_available():
        raise Skip("::1 is not available here")
    d = Daemon(config(listen=["127.0.0.1:PORT", "[::1]:PORT"]))
    with d.connect(host="::1") as c:
        expect_ok(c.request(get("/health", host="[::1]")), b'{"ok":true}')
        expect_ok(c.request(get("/a", host="[::1]")), b'{"r":"a"}')
    with d.connect(host="127.0.0.1") as c:
        expect_ok(c.request(get("/health")), b'{"ok":true}')
    eq(d.stop(), 0, "exit code")
    # v6-only: the same port on 127.0.0.1 is not served by it. Another test
    # running in parallel may listen on that number on 127.0.0.1, so a
    # connect that succeeds only fails the test when this daemon answers
    # (a marker only its configuration has).
    marker = os.urandom(8).hex()
    d6 = Daemon(config(listen=["[::1]:PORT"],
                       routes=ROUTES + [{"path": "/marker", "respond": {"body": {"m": marker}}}]))
    with d6.connect(host="::1") as c:
        expect_ok(c.request(get("/health", host="[::1]")), b'{"ok":true}')
    try:
        c4 = Conn("127.0.0.1", d6.port, timeout=2)
    except OSError:
        return  # refused: nobody listens there
    with c4:
        try:
            r = c4.request(get("/marker"))
        except (OSError, ConnectionClosed):
            return
        check(marker.encode() not in r.body, "listen [::1] also accepted on 127.0.0.1")


# --- max_connections ---------------------------------------------------------------------

def _open_counted(d, attempts=100):
    """A connection that completed a request (so the daemon counts it); retries
    while a just-closed connection (the start-up probe) still holds a slot.
    First waits until the probe was accepted and is gone: a worker that
    accepts it late, at max_connections, closes the idle connection this
    returns to make room for it (as it should), and the test would go on
    with a dead connection (seen under load)."""
    deadline = time.monotonic() + 5 * SLOW
    while not getattr(d, "probe_gone", False):  # once per daemon, before the test holds any connection
        d.probe_gone = _metric(d, "gatherd_connections_accepted_total") >= 1 and _metric(d, "gatherd_connections") == 0
        if time.monotonic() > deadline:
            raise TestFailure("the start-up probe's connection was never accepted and closed")
        time.sleep(0.01)
    for _ in range(attempts):
        c = d.connect()
        r = c.request(get("/a"))
        if r.status == 200:
            return c
        c.close()
        eq(r.status, 503, "status")
        time.sleep(0.03)
    raise TestFailure("could not open a counted connection")


def _busy(c):
    """Makes c busy (not idle): a request head begun, not finished."""
    c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n")


@test
def max_connections_503():
    """At max_connections with no idle connection, a new client gets 503."""
    d = Daemon(config(max_connections=2))
    c1 = _open_counted(d)
    c2 = _open_counted(d)
    try:
        _busy(c1)
        _busy(c2)
        time.sleep(0.1 * SLOW)  # the heads are read: neither is idle
        with d.connect() as c3:
            r = c3.read_response()
            eq(r.status, 503, f"status ({r.raw[:300]!r})")
            j = r.json()
            eq(j.get("error", {}).get("code"), "too_many_connections", "error.code")
            eq((r.header("Connection") or "").lower(), "close", "Connection header")
            eq(c3.read_all_until_close(3), b"", "bytes after the 503")
        # the two counted connections still work
        c1.send(b"\r\n")
        c2.send(b"\r\n")
        expect_ok(c1.read_response(), b'{"r":"a"}')
        expect_ok(c2.read_response(), b'{"r":"a"}')
        # a freed slot is reusable
        c1.close()
        _busy(c2)
        deadline = time.monotonic() + 3 * SLOW
        while True:
            c4 = d.connect()
            r = c4.request(get("/a"))
            c4.close()
            if r.status == 200:
                break
            eq(r.status, 503, "status")
            check(time.monotonic() < deadline, "slot of a closed connection never freed")
            time.sleep(0.03)
    finally:
        c1.close()
        c2.close()


@test
def max_connections_503_follows_response_contract():
    """The 503 carries the headers every response has and the usual error body."""
    d = Daemon(config(max_connections=1))
    c1 = _open_counted(d)
    try:
        _busy(c1)
        time.sleep(0.1 * SLOW)
        with d.connect() as c2:
            r = c2.read_response()
            eq(r.status, 503, "status")
            problems = []
            if not DATE_RE.match(r.header("Date") or ""):
                problems.append("no Date header")
            if r.header("Server") != "gatherd":
                problems.append("no Server: gatherd header")
            if not r.header("X-Request-Id"):
                problems.append("no X-Request-Id header")
            err = r.json().get("error", {})
            if not err.get("message"):
                problems.append("no error.message")
            if "request_id" not in err:
                problems.append("no error.request_id")
            check(not problems, f"{', '.join(problems)} in {r.raw!r}")
    finally:
        c1.close()


def _metric(d, name):
    """The value of an unlabelled metric on the admin listener."""
    with Conn("127.0.0.1", d.admin_port) as a:
        r = a.request(req("GET", "/metrics", headers={"Connection": "close"}))
    for line in r.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise TestFailure(f"{name} not in /metrics")


def _served(c, path="/a"):
    """True when c still gets an answer; False when the server closed it."""
    try:
        r = c.request(get(path))
    except (ConnectionClosed, OSError):
        return False
    return r.status == 200


@test
def max_connections_closes_idle_keepalive_first():
    """At max_connections a new client does not wait 75 s for an idle
    keep-alive connection to time out: the oldest idle connection is closed
    for it (nginx's ngx_drain_connections), across workers; busy ones are
    never closed, and the count never passes the limit."""
    for workers in (1, 2):
        d = Daemon(config(max_connections=3), workers=workers)
        busy = _open_counted(d)
        _busy(busy)
        idle = [_open_counted(d), _open_counted(d)]  # idle[0] is the oldest
        time.sleep(0.1 * SLOW)
        with d.connect() as n1:
            expect_ok(n1.request(get("/b")), b'{"r":"b"}', 200)
            check(not _served(idle[0]), f"workers={workers}: the oldest idle connection was not the one closed")
            check(_served(idle[1]), f"workers={workers}: a newer idle connection was closed")
            eq(_metric(d, "gatherd_connections"), 3, f"workers={workers}: open connections")
            # now idle[1] (used just above) is newer than n1: n1 goes next
            with d.connect() as n2:
                expect_ok(n2.request(get("/c")), b'{"r":"c"}', 200)
                check(not _served(n1), f"workers={workers}: the oldest idle connection was not closed")
                check(_served(idle[1]), f"workers={workers}: a newer idle connection was closed")
                eq(_metric(d, "gatherd_connections"), 3, f"workers={workers}: open connections")
                # every connection busy: refused
                _busy(idle[1])
                _busy(n2)
                time.sleep(0.1 * SLOW)
                with d.connect() as n3:
                    r = n3.read_response()
                    eq(r.status, 503, f"workers={workers}: status when nothing is idle")
                busy.send(b"\r\n")
                expect_ok(busy.read_response(), b'{"r":"a"}')
        busy.close()
        idle[1].close()
        d.stop()
    # with 4 workers, connection after connection: always the one idle longest
    # goes, wherever it is (another worker takes the new connection for it)
    d = Daemon(config(max_connections=4), workers=4, log_level="debug")
    conns = [_open_counted(d) for _ in range(4)]  # oldest first
    try:
        for k in range(16):
            n = d.connect()
            expect_ok(n.request(get("/a")), b'{"r":"a"}')
            check(not _served(conns[0]), f"round {k}: the connection idle longest was not the one closed")
            conns[0].close()
            conns = conns[1:] + [n]
        eq(_metric(d, "gatherd_connections"), 4, "open connections")
        check(d.wait_log("took a connection another worker accepted"), "no connection went to another worker")
    finally:
        for c in conns:
            c.close()


# --- graceful stop ------------------------------------------------------------------------

def _begin_stop(d):
    """SIGTERM, then wait until the daemon stopped accepting (all listeners closed)."""
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    check(d.wait_log("stopping gracefully", 5), "no 'stopping gracefully' in the log")
    check(d.wait_not_accepting(5), "still accepting connections 5 s after SIGTERM")
    return t0


@test
def graceful_stop_finishes_request_in_flight_head():
    d = Daemon(config(shutdown_timeout_ms=10000, http={"client_header_timeout_ms": 10000}))
    with d.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Request-Id: inflight\r\n")
        time.sleep(0.3)  # ordering, not timing: let the daemon read the partial head before the signal
        t0 = _begin_stop(d)
        check(d.running(), "daemon exited with a request in flight")
        c.send(b"\r\n")
        r = c.read_response()
        expect_ok(r, b'{"ok":true}')
        eq(r.header("X-Request-Id"), "inflight", "request id")
        eq((r.header("Connection") or "").lower(), "close", "Connection header during shutdown")
        eq(c.read_all_until_close(3), b"", "bytes after the response")
    rc = d.wait(5 * SLOW)
    check(rc is not None, "daemon still running 5 s after its last connection closed")
    eq(rc, 0, "exit code")
    check(time.monotonic() - t0 < 8 * SLOW, "took the whole shutdown timeout")


@test
def graceful_stop_finishes_request_in_flight_body():
    d = Daemon(config(shutdown_timeout_ms=10000, http={"client_body_timeout_ms": 10000}))
    with d.connect() as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.3)  # ordering: the daemon has read the head and half the body
        _begin_stop(d)
        c.send(b"world")
        r = c.read_response()
        expect_ok(r, b'{"created":true}', status=201)
        eq((r.header("Connection") or "").lower(), "close", "Connection header during shutdown")
        eq(c.read_all_until_close(3), b"", "bytes after the response")
    eq(d.wait(5 * SLOW), 0, "exit code")


@test
def graceful_stop_closes_idle_keepalive_promptly():
    d = Daemon(config(shutdown_timeout_ms=10000, http={"keepalive_timeout_ms": 60000}))
    conns = [d.connect() for _ in range(5)]
    try:
        for c in conns:
            expect_ok(c.request(get("/a")), b'{"r":"a"}')
        t0 = time.monotonic()
        d.send_signal(signal.SIGTERM)
        for c in conns:
            c.closed_within(3)
        rc = d.wait(3 * SLOW)
        check(rc is not None, "daemon still running 3 s after SIGTERM with only idle connections")
        eq(rc, 0, "exit code")
        check(time.monotonic() - t0 < 5 * SLOW, "graceful stop took too long")
    finally:
        for c in conns:
            c.close()


@test
def graceful_stop_without_connections():
    d = Daemon(config(shutdown_timeout_ms=10000))
    with d.connect() as c:
        expect_ok(c.request(get("/a", headers={"Connection": "close"})), b'{"r":"a"}')
        c.read_all_until_close(3)
    t0 = time.monotonic()
    eq(d.stop(timeout=5), 0, "exit code")
    check(time.monotonic() - t0 < 3 * SLOW, "stop took %.1fs" % (time.monotonic() - t0))
    contains(d.log(), "stopped", "log")


@test
def shutdown_timeout_enforced():
    d = Daemon(config(shutdown_timeout_ms=500, http={"client_header_timeout_ms": 30000}))
    with d.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        time.sleep(0.3)  # ordering: the partial head has been read
        t0 = time.monotonic()
        d.send_signal(signal.SIGTERM)
        rc = d.wait(2.5 * SLOW)
        dt = time.monotonic() - t0
        check(rc is not None, "daemon still running 2.5 s after SIGTERM (shutdown_timeout_ms 500)")
        eq(rc, 0, "exit code")
        check(dt >= 0.4, f"exited after {dt:.3f}s: the in-flight request got no grace period")
        # the stuck connection is gone
        try:
            rest = c.read_all_until_close(3)
        except ConnectionResetError:
            rest = b""
        check(b"200 OK" not in rest, "the unfinished request was answered")


# --- load ---------------------------------------------------------------------------------

@test
def many_concurrent_connections():
    d = Daemon(config(http={"keepalive_timeout_ms": 30000}), workers=2)
    n, rounds = 200, 5
    barrier = threading.Barrier(n, timeout=20 * SLOW)
    errors = []

    def client(i):
        try:
            with d.connect(timeout=20) as c:
                barrier.wait()
                for k in range(rounds):
                    rid = f"c{i}-{k}"
                    path = ["/a", "/b", "/c"][(i + k) % 3]
                    r = c.request(get(path, headers={"X-Request-Id": rid}))
                    if r.status != 200 or r.header("X-Request-Id") != rid or r.body != ('{"r":"%s"}' % path[1]).encode():
                        errors.append(f"client {i} request {k}: {r.status} {r.raw[:200]!r}")
                        return
                    if (r.header("Connection") or "").lower() == "close":
                        errors.append(f"client {i} request {k}: Connection: close")
                        return
        except Exception as e:
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    check(not any(t.is_alive() for t in threads), "clients still running after 60 s")
    check(not errors, f"{len(errors)} client(s) failed; first: {errors[:3]}")
    with d.connect() as c:
        expect_ok(c.request(get("/health")), b'{"ok":true}')


# --- hostile input --------------------------------------------------------------------------

FUZZ_SEEDS = [
    b"GET /health HTTP/1.1\r\nHost: t\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\":[1,2,3]}",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2;x=y\r\nef\r\n0\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /public/%2e%2e/admin?x=1&y=%00 HTTP/1.1\r\nHost: t\r\nX-Request-Id: abc-123\r\n\r\n",
    b"GET http://h:1/users/42/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"HEAD /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"DELETE /item HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\nGET /a HTTP/1.1\r\nHost: t\r\n\r\n",
]
FUZZ_TOKENS = [b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b"%", b"%2e", b"/..", b"/", b"?", b"#",
               b"\xff", b"\x7f", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"Host: x\r\n",
               b"Content-Length: -1\r\n", b"Content-Length: 99999999999999999999\r\n", b"HTTP/2.0", b"HTTP/1.1",
               b"\r\n\r\n", b"0\r\n\r\n", b"ffffffff\r\n", b"Expect: 100-continue\r\n", b"{", b"*", b"\xc3\xa9",
               b"Connection: close\r\n", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"]
FUZZ_OK_STATUS = {200, 201, 204, 400, 404, 405, 408, 413, 414, 417, 431, 505}


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(data) + 1) if data else 0
        if op == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a token
            data[pos:pos] = rng.choice(FUZZ_TOKENS)
        elif op == 2 and data:  # delete a range
            del data[pos:pos + rng.randint(1, 16)]
        elif op == 3:  # duplicate a line
            lines = bytes(data).split(b"\r\n")
            if len(lines) > 2:
                k = rng.randrange(len(lines) - 1)
                lines.insert(k, lines[k])
                data = bytearray(b"\r\n".join(lines))
        elif op == 4:  # truncate
            data = data[:pos]
        elif op == 5:  # a long run
            data[pos:pos] = bytes([rng.choice(b"aA/%0 \t:")]) * rng.choice([100, 2000, 20000])
        elif op == 6:  # CRLF -> LF somewhere
            i = bytes(data).find(b"\r\n", pos)
            if i >= 0:
                del data[i]
        else:  # repeat the whole thing (pipelining)
            data = data * rng.randint(2, 3)
    return bytes(data)


def _fuzz_one(d, i, data, rng_split):
    try:
        c = d.connect(timeout=10)
    except OSError as e:
        return f"case {i}: connect failed: {e}"
    with c:
        try:
            cut = rng_split
            c.send(data[:cut])
            c.send(data[cut:])
            c.shut_wr()
        except OSError:
            pass  # the daemon rejected early and closed (EPIPE, ECONNRESET, ENOTCONN): fine
        try:
            out = c.read_all_until_close(10)
        except TestFailure as e:
            return f"case {i}: neither answered nor closed within 10 s: {e}; sent {data[:120]!r}"
        except OSError:
            return None
    if not out:
        return None
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", out)
    if not m:
        return f"case {i}: response does not start with a status line: {out[:120]!r}; sent {data[:120]!r}"
    status = int(m.group(1))
    if status == 100:
        j = out.find(b"\r\n\r\n")
        m = re.match(rb"HTTP/1\.1 (\d{3}) ", out[j + 4:])
        if not m:
            return None  # the client never sent the body; closed after 100 Continue
        status = int(m.group(1))
    if status not in FUZZ_OK_STATUS:
        return f"case {i}: unexpected status {status}: {out[:200]!r}; sent {data[:120]!r}"
    return None


@test
def hostile_input_fuzz():
    d = Daemon(config(http={"client_header_timeout_ms": 500, "client_body_timeout_ms": 500,
                            "max_body_bytes": 4096, "max_url_bytes": 1024, "max_header_bytes": 4096,
                            "max_headers": 30, "lingering_timeout_ms": 500}))
    rng = random.Random(20240611)
    cases = []
    for i in range(300):
        if i % 10 == 9:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        else:
            data = _mutate(rng, rng.choice(FUZZ_SEEDS))
        cases.append((i, data, rng.randint(0, len(data))))
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda a: _fuzz_one(d, *a), cases))
    problems = [r for r in results if r]
    check(d.running(), f"daemon died during fuzzing; stderr:\n{d.log()[-3000:]}")
    check(not problems, f"{len(problems)} problem(s); first: {problems[:3]}")
    with d.connect() as c:
        expect_ok(c.request(get("/health")), b'{"ok":true}')
    eq(d.stop(), 0, "exit code")


@test
def accept_backs_off_on_emfile_and_recovers():
    """With its descriptors exhausted, a worker pauses accepting (100 ms)
    instead of spinning on the readable listener, and serves again once
    descriptors are free."""
    d = Daemon(config(), workers=1, nofile=32)
    socks = []
    try:
        for _ in range(60):  # more than the daemon can accept
            s = socket.create_connection((d.host, d.port), timeout=5)
            socks.append(s)
        time.sleep(1.0)
    finally:
        for s in socks:
            s.close()
    pauses = d.log().count("Too many open files; pausing accepts")
    check(pauses >= 1, "no back-off logged: %r" % d.log()[-500:])
    # a spinning accept loop would log thousands of lines in a second
    check(pauses <= 30 * SLOW, "accept error logged %d times in ~1 s: not backing off" % pauses)
    deadline = time.monotonic() + 5
    while True:
        try:
            with d.connect() as c:
                r = c.request(get("/health"))
                eq(r.status, 200, "status after recovery")
                break
        except (OSError, ConnectionClosed):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    eq(d.stop(), 0, "exit code")


if __name__ == "__main__":
    sys.exit(main())
