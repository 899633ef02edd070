#!/usr/bin/env python3
"""Integration tests of gatherd's proxy routes: the real daemon in front of
the stub backend (tests/stub/gw_stub), raw HTTP bytes on both sides.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_proxy.py [NAME-SUBSTRING ...]
GATHERD defaults to ../../src/gatherd and GW_STUB to ../../tests/stub/gw_stub,
both relative to this file. The last line of the output is
"N passed, N failed"; the exit code is 1 when anything failed.
"""

import atexit
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gwtest import (DATE_RE, HEX32_RE, SLOW, Conn, ConnectionClosed, Daemon, Response,  # noqa: E402
                    TempDir, TestFailure, check, contains, eq, ipv6_loopback_available, main, req, run_cli,
                    sanitizer_report, test)
import gwtest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GW_STUB = os.environ.get("GW_STUB") or os.path.normpath(os.path.join(HERE, "..", "..", "tests", "stub", "gw_stub"))


def ms(n):
    """A config timeout in ms, scaled for sanitizer builds."""
    return int(n * SLOW)


# --- per-test resources: stubs, blackholes, client sockets --------------------------

_resources = []   # closed when the current test ends (whatever way it ends)
_all_stubs = []   # killed at exit, whatever happens


@atexit.register
def _kill_stubs():
    for s in _all_stubs:
        s._kill()
        shutil.rmtree(s.dir, ignore_errors=True)


def ptest(fn):
    """@test, plus: every Stub/Blackhole/Client made during the test is closed after it."""
    @functools.wraps(fn)
    def run():
        try:
            fn()
        finally:
            while _resources:
                r = _resources.pop()
                try:
                    r.close()
                except Exception as e:  # pragma: no cover - cleanup must go on
                    gwtest._note_problem(f"cleanup of {r!r} failed: {e!r}")
    return test(run)


class Stub:
    """tests/stub/gw_stub on a free loopback port (-p PORTFILE, port 0), or on
    port when given."""

    def __init__(self, host="127.0.0.1", threads=None, port=0):
        if not os.access(GW_STUB, os.X_OK):
            raise TestFailure(f"GW_STUB={GW_STUB} is not an executable file (build it: make tests/stub/gw_stub)")
        self.dir = tempfile.mkdtemp(prefix="gwstub-")
        self.portfile = os.path.join(self.dir, "port")
        self.log_path = os.path.join(self.dir, "stderr.log")
        self.host = host
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        cmd = [GW_STUB, "-q", "-l", listen, "-p", self.portfile]
        if threads:
            cmd += ["-t", str(threads)]
        self.nstats = 0
        self.port = None
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                                         close_fds=True, preexec_fn=gwtest._die_with_parent)
        self.pid = self.proc.pid
        _all_stubs.append(self)
        _resources.append(self)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(self.portfile):
                with open(self.portfile) as f:
                    text = f.read().split()
                if text:
                    self.port = int(text[0])
                    return
            if self.proc.poll() is not None:
                raise TestFailure(f"gw_stub exited with {self.proc.returncode} at start-up: {self.log()}")
            time.sleep(0.01)
        raise TestFailure("gw_stub wrote no port file within 10 s")

    @property
    def url(self):
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    @property
    def hostport(self):
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def get(self, path):
        """A request straight to the stub (not through gatherd)."""
        with Conn(self.host, self.port) as c:
            return c.request(req("GET", path, headers={"Connection": "close"}))

    def stats(self):
        """/stats of the stub, minus the connection and the requests of the
        /stats calls themselves: open_connections counts only gatherd's."""
        self.nstats += 1
        j = self.get("/stats").json()
        j["open_connections"] -= 1
        j["requests"] -= self.nstats
        return j

    def wait_stats(self, cond, timeout, what):
        """Polls /stats until cond(stats) holds; returns (stats, seconds)."""
        t0 = time.monotonic()
        deadline = t0 + timeout * SLOW
        while True:
            s = self.stats()
            if cond(s):
                return s, time.monotonic() - t0
            if time.monotonic() > deadline:
                raise TestFailure(f"stub: {what} not reached within {timeout}s (stats {s})")
            time.sleep(0.02)

    def _kill(self):
        gwtest.kill_and_reap(self.proc, timeout=5)

    def stop(self):
        """SIGTERM to this stub's own pid; SIGKILL after 5 s."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
        rep = sanitizer_report(self.log())
        if rep:
            print("# sanitizer report from gw_stub:\n" + "\n".join("#   " + l for l in rep.splitlines()))
            gwtest._note_problem(f"sanitizer report in gw_stub stderr (pid {self.pid})")

    def close(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self):
        return f"<Stub pid {self.pid} port {self.port}>"


def closed_port():
    """A loopback port nobody listens on (bound, then closed)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class Blackhole:
    """A listener that never answers.

    accepting=True: listen(64), never accept() nor read: the kernel completes
    the handshake, so a connect succeeds and the request is swallowed (a
    response timeout). accepting=False: listen(0) with its one-slot accept
    queue filled by a connection of our own, so further SYNs are dropped and
    a connect hangs (a connect timeout)."""

    def __init__(self, accepting=True):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        _resources.append(self)
        if accepting:
            self.sock.listen(64)
            return
        self.sock.listen(0)
        for _ in range(8):
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.setblocking(False)
            try:
                f.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(f)
            time.sleep(0.05)
            if f.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and not self._connected(f):
                return  # this one hangs: the queue is full
        raise TestFailure("could not fill the accept queue of the blackhole listener")

    @staticmethod
    def _connected(s):
        try:
            s.getpeername()
            return True
        except OSError:
            return False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        for f in self.fillers:
            f.close()
        self.sock.close()


# --- a client that can also read long or broken responses ----------------------------

class Client(Conn):
    """gwtest.Conn plus: read only the head, count a big body without
    keeping it, read raw bytes until the server closes."""

    def __init__(self, d, timeout=10.0):
        super().__init__(d.host, d.port, timeout)
        _resources.append(self)

    def read_head(self):
        if not self.buf and not self._fill():
            raise ConnectionClosed("connection closed before a response")
        raw = []
        status_line = self._read_line()
        raw.append(status_line)
        m = re.match(rb"^(HTTP/\d\.\d) (\d{3}) ?(.*)$", status_line)
        if not m:
            raise TestFailure(f"bad status line {status_line!r}")
        headers = []
        while True:
            line = self._read_line()
            raw.append(line)
            if line == b"":
                break
            if b":" not in line:
                raise TestFailure(f"bad header line {line!r}")
            k, v = line.split(b":", 1)
            headers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
        return Response(m.group(1).decode(), int(m.group(2)), m.group(3).decode("latin-1"), headers, b"",
                        b"\r\n".join(raw) + b"\r\n")

    def recv_some(self, timeout=None):
        """The next bytes (buffered first); b"" on EOF or reset."""
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        if self.eof:
            return b""
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        return data

    def count_body(self, n, deadline_s=60.0, on_data=None):
        """Reads up to n body bytes without keeping them; returns (count,
        x_count) where x_count is the number of b"x" bytes among them.
        Stops early on EOF."""
        got = xs = 0
        deadline = time.monotonic() + deadline_s * SLOW
        while got < n:
            if time.monotonic() > deadline:
                raise TestFailure(f"body not complete within {deadline_s}s: {got} of {n} bytes")
            data = self.recv_some()
            if not data:
                break
            if got + len(data) > n:
                self.buf = data[n - got:]
                data = data[:n - got]
            got += len(data)
            xs += data.count(b"x")
            if on_data:
                on_data(got)
        return got, xs

    def read_raw_until_close(self, timeout=5.0):
        """All bytes until EOF/reset (buffered ones first); TestFailure on timeout."""
        return self.read_all_until_close(timeout)


def dechunk(raw):
    """Decodes a chunked body from raw bytes: (body, complete). complete is
    True only when the last chunk (size 0) and the final CRLF are there."""
    body = b""
    i = 0
    while True:
        j = raw.find(b"\r\n", i)
        if j < 0:
            return body, False
        try:
            size = int(raw[i:j].split(b";")[0], 16)
        except ValueError:
            raise TestFailure(f"bad chunk size line {raw[i:j][:40]!r}")
        i = j + 2
        if size == 0:
            # trailers, then an empty line
            while True:
                j = raw.find(b"\r\n", i)
                if j < 0:
                    return body, False
                if j == i:
                    return body, True
                i = j + 2
        if len(raw) < i + size + 2:
            return body + raw[i:i + size], False
        body += raw[i:i + size]
        if raw[i + size:i + size + 2] != b"\r\n":
            raise TestFailure("chunk not followed by CRLF")
        i += size + 2


# --- configuration ---------------------------------------------------------------------

def backend(url, **opts):
    b = {"url": url, "connect_timeout_ms": ms(1000), "timeout_ms": ms(10000)}
    b.update(opts)
    return b


def proxy_routes(name="b"):
    return [
        {"path": "/legacy", "proxy": {"backend": name, "strip_prefix": "/legacy"}},
        {"path": "/legacy/*", "proxy": {"backend": name, "strip_prefix": "/legacy"}},
        {"path": "/deep/api/v1/*", "proxy": {"backend": name, "strip_prefix": "/deep/api"}},
        {"path": "/keep/*", "proxy": {"backend": name, "preserve_host": True}},
        {"path": "/raw/*", "proxy": {"backend": name}},
        {"path": "/local", "respond": {"body": {"local": True}}},
    ]


def config(backends, routes=None, http=None, **top):
    """backends: {name: url string or backend dict}."""
    bs = {k: (backend(v) if isinstance(v, str) else v) for k, v in backends.items()}
    cfg = {"listen": ["127.0.0.1:PORT"], "backends": bs,
           "routes": routes if routes is not None else proxy_routes()}
    if http:
        cfg["http"] = http
    cfg.update(top)
    return cfg


def proxy_daemon(target, workers=1, routes=None, http=None, **opts):
    """gatherd with backend "b" at target (a Stub, Blackhole or URL string)."""
    url = target if isinstance(target, str) else target.url
    return Daemon(config({"b": backend(url, **opts)}, routes=routes, http=http), workers=workers)


def get(path="/legacy/x", **kw):
    return req("GET", path, **kw)


def q(**params):
    """A query string of stub controls (values percent-encoded)."""
    parts = []
    for k, v in params.items():
        for one in (v if isinstance(v, list) else [v]):
            parts.append(f"{k}={urllib.parse.quote(str(one), safe='')}")
    return "&".join(parts)


def echo(c, path="/legacy/x", method="GET", **kw):
    """Sends a request with echo=1 (added to the query); returns (response, echo JSON)."""
    sep = "&" if "?" in path else "?"
    r = c.request(req(method, path + sep + "echo=1", **kw))
    eq(r.status, 200, f"status of {method} {path} (response {r.raw[:400]!r})")
    return r, r.json()


def standard_headers(r):
    eq(r.version, "HTTP/1.1", "HTTP version")
    dates = r.header_all("Date")
    eq(len(dates), 1, f"number of Date headers ({dates!r})")
    check(DATE_RE.match(dates[0]), f"Date header: {dates[0]!r}")
    eq(r.header_all("Server"), ["gatherd"], "Server headers")
    check(r.header("X-Request-Id"), "X-Request-Id header missing")


def expect_upstream_error(r, status, code, backend_name="b"):
    """A proxy error: status, JSON {"error": {"code", "backend", ...}}."""
    eq(r.status, status, f"status (response {r.raw[:500]!r})")
    contains(r.header("Content-Type") or "", "application/json", "Content-Type")
    j = r.json()
    check(isinstance(j, dict) and isinstance(j.get("error"), dict), f"error body shape: {r.body!r}")
    eq(j["error"].get("code"), code, f"error.code in {r.body!r}")
    eq(j["error"].get("backend"), backend_name, f"error.backend in {r.body!r}")
    rid = r.header("X-Request-Id")
    check(rid, "X-Request-Id header missing")
    if "request_id" in j["error"]:
        eq(j["error"]["request_id"], rid, "error.request_id vs X-Request-Id")
    eq(r.header_all("Server"), ["gatherd"], "Server header of the error")
    return j


def timed_request(c, raw, method=None):
    t0 = time.monotonic()
    r = c.request(raw, method)
    return r, time.monotonic() - t0


def memory_daemon(target, routes=None, **opts):
    """proxy_daemon with one worker for memory measurements. ASan keeps freed
    blocks in a quarantine (256 MB by default): a sanitizer build gets a
    small one so that resident memory shows what the daemon really holds."""
    old_asan = os.environ.get("ASAN_OPTIONS")
    if gwtest._is_sanitized(gwtest.GATHERD):
        os.environ["ASAN_OPTIONS"] = ((old_asan + ":") if old_asan else "") + \
            "quarantine_size_mb=8:thread_local_quarantine_size_kb=256"
    try:
        return proxy_daemon(target, workers=1, routes=routes, **opts)
    finally:
        if old_asan is None:
            os.environ.pop("ASAN_OPTIONS", None)
        else:
            os.environ["ASAN_OPTIONS"] = old_asan


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise TestFailure(f"no {field} in /proc/{pid}/status")


# --- configuration -------------------------------------------------------------------

def _config_error(cfg):
    with TempDir() as t:
        p = t.write("gatherd.json", cfg)
        rc, out, err = run_cli(["-t", "-c", p])
        eq(rc, 1, f"exit code of -t (stderr {err!r})")
        contains(err, "test failed", "stderr")
        return err


def _config_ok(cfg):
    with TempDir() as t:
        p = t.write("gatherd.json", cfg)
        rc, out, err = run_cli(["-t", "-c", p])
        eq(rc, 0, f"exit code of -t for {json.dumps(cfg)[:300]} (stderr {err!r})")
        contains(err, "test is successful", "stderr")


@ptest
def config_proxy_valid():
    _config_ok({"listen": ["127.0.0.1:8080"],
                "backends": {"users": {"url": "http://127.0.0.1:9101", "connect_timeout_ms": 1000,
                                       "timeout_ms": 30000, "max_connections": 256, "max_idle": 64,
                                       "idle_timeout_ms": 30000},
                             "v6": {"url": "http://[::1]:9102"},
                             "port80": {"url": "http://10.0.0.1"}},
                "routes": [{"path": "/legacy/*",
                            "proxy": {"backend": "users", "strip_prefix": "/legacy", "preserve_host": False}},
                           {"path": "/v6/*", "proxy": {"backend": "v6"}},
                           {"path": "/p80", "proxy": {"backend": "port80", "preserve_host": True}}]})


@ptest
def config_proxy_errors():
    base = {"listen": ["127.0.0.1:8080"], "backends": {"b": {"url": "http://127.0.0.1:9101"}}}
    err = _config_error(dict(base, routes=[{"path": "/x/*", "proxy": {"backend": "x"}}]))
    contains(err, 'routes[0].proxy.backend: unknown backend "x"', "stderr for an unknown backend")
    # a route names a backend while none are configured at all
    err = _config_error({"listen": ["127.0.0.1:8080"], "routes": [{"path": "/x", "proxy": {"backend": "b"}}]})
    contains(err, "routes[0].proxy.backend", "stderr for a backend without any backends")
    for bad in ["127.0.0.1:9101", "ftp://127.0.0.1:21", "http://bad_name-.internal:80", "http://backend..internal",
                "http://", "http://127.0.0.1:99999", "http://300.1.1.1:80", "://127.0.0.1:80", ""]:
        err = _config_error({"listen": ["127.0.0.1:8080"], "backends": {"users": {"url": bad}},
                             "routes": [{"path": "/x/*", "proxy": {"backend": "users"}}]})
        contains(err, "backends.users.url", f"stderr for url {bad!r}")
    err = _config_error({"listen": ["127.0.0.1:8080"], "backends": {"users": {"url": "http://-backend.internal:80"}}})
    contains(err, "bad host name", "stderr for a malformed host name (test_dns.py tests host names)")
    # strict keys
    err = _config_error({"listen": ["127.0.0.1:8080"],
                         "backends": {"users": {"url": "http://127.0.0.1:9101", "timeout": 5}}})
    contains(err, "timeout", "stderr for an unknown backend key")
    err = _config_error(dict(base, routes=[{"path": "/x/*", "proxy": {"backend": "b", "strip": "/x"}}]))
    contains(err, "strip", "stderr for an unknown proxy key")
    err = _config_error({"listen": ["127.0.0.1:8080"], "backends": {"users": {}}})
    contains(err, "url", "stderr for a backend without url")


# --- the request: method, target, body ---------------------------------------------------

@ptest
def proxy_long_target_reaches_the_backend_whole():
    """A target near http.max_url_bytes whose bytes are all re-encoded (each
    "%C3%A9" is decoded by normalization and encoded again) reaches the
    backend whole; a fixed 9000-byte buffer once made it empty."""
    s = Stub()
    d = proxy_daemon(s, http={"max_url_bytes": 65536})
    seg = "%C3%A9" * 2000  # 12 000 bytes, 4 000 decoded, 12 000 again
    path = "/legacy/" + "/".join([seg] * 4) + "/"
    with Client(d) as c:
        r, j = echo(c, path + "?q=" + "x" * 5000)
        eq(j["path"], "/" + "/".join([seg] * 4) + "/", "the whole path at the backend")
        eq(j["query"], "q=" + "x" * 5000 + "&echo=1", "the whole query at the backend")


@ptest
def proxy_get_basic_with_strip_prefix():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r, j = echo(c, "/legacy/users/42?x=1&y=%20z")
        eq(j["method"], "GET", "method at the backend")
        eq(j["path"], "/users/42", "path at the backend")
        eq(j["query"], "x=1&y=%20z&echo=1", "query at the backend")
        standard_headers(r)
        contains(r.header("Content-Type") or "", "application/json", "Content-Type from the backend")
        # a built-in stub path, body passed through byte for byte
        r = c.request(get("/legacy/users/42"))
        eq(r.status, 200, "status")
        eq(r.body, b'{"id":42,"name":"User 42","email":"user42@example.com","tier":"gold"}', "body")
        eq(r.header("Content-Length"), str(len(r.body)), "Content-Length")
        # a local route next to the proxy routes still answers locally
        r = c.request(get("/local"))
        eq((r.status, r.body), (200, b'{"local":true}'), "local route")
        # a path outside the proxy prefix is not proxied
        r = c.request(get("/legacyfoo/x"))
        eq(r.status, 404, f"status of /legacyfoo/x ({r.raw[:200]!r})")


@ptest
def proxy_methods_passed():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        for m in ["GET", "DELETE", "OPTIONS", "PATCH", "PUT", "POST"]:
            body = b"x" if m in ("PUT", "POST", "PATCH") else b""
            r, j = echo(c, "/legacy/m", method=m, body=body)
            eq(j["method"], m, "method at the backend")
            eq(j["path"], "/m", "path at the backend")
            eq(j["body"], body.decode(), f"body of {m}")


@ptest
def proxy_post_body_content_length():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r, j = echo(c, "/legacy/p", method="POST", body=b"hello")
        eq(j["body"], "hello", "body at the backend")
        eq(j["body_length"], 5, "body_length")
        eq(j["headers"].get("content-length"), "5", "Content-Length at the backend")
        check("transfer-encoding" not in j["headers"], f"Transfer-Encoding at the backend: {j['headers']}")
        # a bigger body (300 KB), then an empty POST
        big = (b"0123456789abcdef" * 19200)
        r, j = echo(c, "/legacy/big", method="POST", body=big)
        eq(j["body_length"], len(big), "body_length of the big body")
        eq(j["headers"].get("content-length"), str(len(big)), "Content-Length of the big body")
        check(j["body"] == big.decode(), "big body differs at the backend")
        r, j = echo(c, "/legacy/empty", method="POST", headers={"Content-Length": "0"})
        eq(j["body_length"], 0, "body_length of an empty POST")
        cl = j["headers"].get("content-length")
        check(cl in (None, "0"), f"Content-Length of an empty POST at the backend: {cl!r}")


@ptest
def proxy_post_chunked_body_streams_chunked():
    # A chunked request body is streamed, so it goes upstream chunked (as
    # nginx does with proxy_request_buffering off); extensions and trailers
    # are not passed on.
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        raw = (b"POST /legacy/chunky?echo=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
        r = c.request(raw)
        eq(r.status, 200, f"status ({r.raw[:300]!r})")
        j = r.json()
        eq(j["body"], "hello world", "body at the backend")
        eq(j["headers"].get("transfer-encoding"), "chunked", "Transfer-Encoding at the backend")
        check("content-length" not in j["headers"], f"Content-Length at the backend: {j['headers']}")
        check("x-trailer" not in j["headers"], f"trailer at the backend: {j['headers']}")
        # and the connection goes on
        r, j = echo(c, "/legacy/after")
        eq(j["path"], "/after", "path of the next request")


@ptest
def proxy_request_trailers_not_merged_into_headers():
    """RFC 9110 6.5.1: trailer fields must not be merged into the header
    section. Merged, they let a client smuggle X-Forwarded-For or
    Authorization past a front proxy that checks headers only."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        raw = (b"POST /legacy/tr?echo=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\nX-Trailer: t\r\nX-Forwarded-For: 6.6.6.6\r\nAuthorization: Bearer x\r\n\r\n")
        r = c.request(raw)
        eq(r.status, 200, f"status ({r.raw[:300]!r})")
        h = r.json()["headers"]
        eq(h.get("x-forwarded-for"), "127.0.0.1", "X-Forwarded-For (a trailer must not feed it)")
        check("authorization" not in h and "x-trailer" not in h, f"trailer fields sent as headers: {h}")


@ptest
def proxy_head_has_no_body_and_no_desync():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r = c.request(req("HEAD", "/legacy/h?size=1000"))
        eq(r.status, 200, f"status ({r.raw[:300]!r})")
        eq(r.header("Content-Length"), "1000", "Content-Length of HEAD (the backend's)")
        eq(r.body, b"", "HEAD body")
        # the next response on the same client connection starts right away:
        # a leaked body (or chunk framing) would show up as a bad status line
        r, j = echo(c, "/legacy/after-head")
        eq(j["path"], "/after-head", "path after HEAD")
        first_id = j["connection_id"]
        # HEAD of a chunked response: gatherd must not wait for a body
        t0 = time.monotonic()
        r = c.request(req("HEAD", "/legacy/h2?size=5000&chunked=1"))
        eq(r.status, 200, "status of HEAD of a chunked response")
        check(time.monotonic() - t0 < 2, "HEAD of a chunked response took too long (waited for a body?)")
        r, j = echo(c, "/legacy/after-head2")
        eq(j["path"], "/after-head2", "path after the second HEAD")
        eq(j["connection_id"], first_id, "the upstream connection was reused after HEAD")


# --- headers -------------------------------------------------------------------------

HOP_REQ = ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection",
           "proxy-authenticate", "proxy-authorization"]


@ptest
def proxy_request_headers_forwarded():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        hdrs = [("X-Custom", "a"), ("Connection", "keep-alive, X-Hop-Named"), ("X-Hop-Named", "secret"),
                ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X-T"), ("Upgrade", "websocket"),
                ("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("Proxy-Authenticate", "Basic"),
                ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil"),
                ("Via", "1.0 fred"), ("X-Request-Id", "rid-123"), ("Accept", "application/json"),
                ("Cookie", "a=1; b=2")]
        r, j = echo(c, "/legacy/h", headers=hdrs, host="front.example:8080")
        h = j["headers"]
        for name in HOP_REQ + ["x-hop-named"]:
            if name == "connection" and name in h:
                # gatherd may say keep-alive itself, but nothing of the client's list
                check(h[name].lower() == "keep-alive", f"Connection at the backend: {h[name]!r}")
                continue
            check(name not in h, f"hop-by-hop header {name!r} reached the backend: {h.get(name)!r}")
        eq(h.get("x-custom"), "a", "X-Custom")
        eq(h.get("accept"), "application/json", "Accept")
        eq(h.get("cookie"), "a=1; b=2", "Cookie")
        eq(h.get("host"), s.hostport, "Host (the backend's host:port)")
        # the client is no trusted proxy: its X-Forwarded-For is replaced, not extended
        eq(h.get("x-forwarded-for"), "127.0.0.1", "X-Forwarded-For of an untrusted client")
        eq(h.get("x-forwarded-proto"), "http", "X-Forwarded-Proto")
        eq(h.get("x-forwarded-host"), "front.example:8080", "X-Forwarded-Host")
        eq(h.get("via"), "1.0 fred, 1.1 gatherd", "Via")
        eq(h.get("x-request-id"), "rid-123", "X-Request-Id at the backend")
        eq(r.header("X-Request-Id"), "rid-123", "X-Request-Id of the response")
        # the client asked for keep-alive: the connection stays
        r, j = echo(c, "/legacy/plain")
        h = j["headers"]
        eq(h.get("x-forwarded-for"), "127.0.0.1", "X-Forwarded-For without a client one")
        eq(h.get("via"), "1.1 gatherd", "Via without a client one")
        eq(h.get("x-forwarded-host"), "t", "X-Forwarded-Host")
        rid = r.header("X-Request-Id")
        check(rid and HEX32_RE.match(rid), f"generated X-Request-Id {rid!r}")
        eq(h.get("x-request-id"), rid, "generated X-Request-Id at the backend vs response")
        # an insane client id is replaced, the same way on both sides
        r, j = echo(c, "/legacy/insane", headers=[("X-Request-Id", "a b;c")])
        rid = r.header("X-Request-Id")
        check(rid != "a b;c" and HEX32_RE.match(rid or ""), f"insane id handling: {rid!r}")
        eq(j["headers"].get("x-request-id"), rid, "replaced X-Request-Id at the backend")


@ptest
def proxy_repeated_forwarding_headers_are_combined():
    """Two X-Forwarded-For (or Via) fields are one comma-joined list (RFC
    9110 5.3): gatherd must append to all of it, not to the first field only
    (X-Forwarded-For is extended only when the peer is a trusted proxy)."""
    s = Stub()
    d = Daemon(config({"b": backend(s.url)}, trusted_proxies=["127.0.0.1/32"]), workers=1)
    with Client(d) as c:
        r, j = echo(c, "/legacy/xff", headers=[("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2"),
                                              ("Via", "1.0 a"), ("Via", "1.1 b")])
        eq(j["headers"].get("x-forwarded-for"), "10.0.0.1, 10.0.0.2, 127.0.0.1", "X-Forwarded-For")
        eq(j["headers"].get("via"), "1.0 a, 1.1 b, 1.1 gatherd", "Via")


@ptest
def proxy_repeated_connection_headers_all_honoured():
    """Connection may come as several fields (one list, RFC 9110 5.3): a
    header named in any of them is hop-by-hop, in both directions."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r, j = echo(c, "/legacy/conn2", headers=[("Connection", "keep-alive"), ("Connection", "X-Hop2"),
                                                 ("X-Hop2", "secret"), ("X-Keep", "1")])
        h = j["headers"]
        check("x-hop2" not in h, f"a header named in the second Connection field reached the backend: {h}")
        eq(h.get("x-keep"), "1", "X-Keep")
        r = c.request(get("/legacy/conn2r?" + q(header=["Connection:X-A", "Connection:X-B", "X-A:1", "X-B:1",
                                                        "X-Keep:1"], body="ok")))
        eq(r.status, 200, "status")
        eq(r.header("X-Keep"), "1", "X-Keep in the response")
        eq((r.header_all("X-A"), r.header_all("X-B")), ([], []),
           f"headers named in the backend's Connection fields passed on: {r.raw[:400]!r}")


@ptest
def proxy_host_rewritten_or_preserved():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r, j = echo(c, "/legacy/host", host="api.example.com")
        eq(j["headers"].get("host"), s.hostport, "Host with preserve_host false")
        eq(j["headers"].get("x-forwarded-host"), "api.example.com", "X-Forwarded-Host")
        r, j = echo(c, "/keep/host", host="api.example.com")
        eq(j["headers"].get("host"), "api.example.com", "Host with preserve_host true")
        eq(j["path"], "/keep/host", "path without strip_prefix")
        # absolute-form target: routed by its path
        r = c.request(b"GET http://api.example.com/raw/abs?echo=1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        eq(r.status, 200, f"status of an absolute-form request ({r.raw[:200]!r})")
        eq(r.json()["path"], "/raw/abs", "path of an absolute-form request")
        eq(r.json()["headers"].get("host"), s.hostport, "Host of an absolute-form request")


@ptest
def proxy_response_headers_filtered():
    s = Stub()
    d = proxy_daemon(s)
    old_date = "Mon, 01 Jan 2001 00:00:00 GMT"
    extra = ["X-Backend:yes", "Keep-Alive:timeout=5, max=100", "Connection:X-Hop-Resp", "X-Hop-Resp:1",
             "Proxy-Authenticate:Basic realm=x", "Proxy-Connection:keep-alive", "Trailer:X-Foo",
             "Upgrade:h2c", "TE:trailers", "Date:" + old_date, "Server:evil/1.0", "Cache-Control:no-store",
             "Set-Cookie:a=1", "Set-Cookie:b=2"]
    with Client(d) as c:
        r = c.request(get("/legacy/resp?" + q(header=extra, body="hi")))
        eq(r.status, 200, f"status ({r.raw[:400]!r})")
        eq(r.body, b"hi", "body")
        eq(r.header("X-Backend"), "yes", "X-Backend")
        eq(r.header("Cache-Control"), "no-store", "Cache-Control")
        eq(r.header_all("Set-Cookie"), ["a=1", "b=2"], "Set-Cookie (repeated, in order)")
        for name in ["Keep-Alive", "X-Hop-Resp", "Proxy-Authenticate", "Proxy-Connection", "Trailer", "Upgrade",
                     "TE"]:
            eq(r.header_all(name), [], f"hop-by-hop response header {name}")
        conn = [v.lower() for v in r.header_all("Connection")]
        check(all("x-hop-resp" not in v for v in conn), f"backend's Connection leaked: {conn}")
        check(all(v == "keep-alive" for v in conn), f"Connection of the response: {conn}")
        standard_headers(r)
        check(r.header("Date") != old_date, "the backend's Date was passed on")
        # the backend closes its connection after this response (Connection:
        # close is hop-by-hop): the client connection stays open all the same
        r = c.request(get("/legacy/ka?keepalive=0"))
        eq(r.status, 200, "status of a response with the backend's Connection: close")
        check(all(v.lower() != "close" for v in r.header_all("Connection")),
              f"backend's Connection: close leaked: {r.header_all('Connection')}")
        r, j = echo(c, "/legacy/after")
        eq(j["path"], "/after", "the client connection is still usable")
        eq(j["connection_requests"], 1, "a connection the backend closed is not reused")


@ptest
def proxy_status_codes_passed():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        for st in [201, 301, 400, 404, 418, 500, 502, 503, 504]:
            r = c.request(get(f"/legacy/st?status={st}&body=from-backend-{st}"))
            eq(r.status, st, f"status {st} passed on ({r.raw[:200]!r})")
            eq(r.body, f"from-backend-{st}".encode(), f"body of {st} is the backend's")
            standard_headers(r)
        for st in [204, 304]:
            r = c.request(get(f"/legacy/st?status={st}"))
            eq(r.status, st, f"status {st}")
            eq(r.header_all("Transfer-Encoding"), [], f"Transfer-Encoding on {st}")
            # no body bytes: the next response parses
            r2, j = echo(c, f"/legacy/after-{st}")
            eq(j["path"], f"/after-{st}", f"request after {st}")


# --- response bodies -------------------------------------------------------------------

@ptest
def proxy_large_response_streamed_exact():
    s = Stub()
    d = proxy_daemon(s, timeout_ms=ms(120000))
    n = 20000000
    with Client(d, timeout=30) as c:
        c.send(get(f"/legacy/big?size={n}"))
        r = c.read_head()
        eq(r.status, 200, "status")
        eq(r.header("Content-Length"), str(n), "Content-Length passed on")
        first = c.recv_some()
        check(first.startswith(b'{"data":"'), f"body start {first[:20]!r}")
        c.buf = first
        got, xs = c.count_body(n)
        eq(got, n, "body bytes")
        eq(xs, n - 11, "padding bytes")
        # the connection is still in sync
        r, j = echo(c, "/legacy/after-big")
        eq(j["path"], "/after-big", "request after the big body")


@ptest
def proxy_chunked_backend_response_arrives_chunked():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r = c.request(get("/legacy/ch?size=100000&chunked=1&chunk=1000"))
        eq(r.status, 200, "status")
        eq((r.header("Transfer-Encoding") or "").lower(), "chunked", "Transfer-Encoding to an HTTP/1.1 client")
        eq(r.header("Content-Length"), None, "Content-Length with chunked")
        eq(len(r.body), 100000, "body length")
        check(r.body.startswith(b'{"data":"') and r.body.endswith(b'"}') and r.body.count(b"x") == 100000 - 11,
              "body content")
        # a slow chunked body (pieces 30 ms apart)
        r = c.request(get("/legacy/ch2?size=3000&chunked=1&chunk=500&chunk_delay=30"))
        eq(len(r.body), 3000, "slow chunked body length")
        # a close-delimited backend body (no framing): chunked to the client
        # and the client connection stays open
        r = c.request(get("/legacy/unframed?size=50000&unframed=1"))
        eq(r.status, 200, "status of a close-delimited backend response")
        eq((r.header("Transfer-Encoding") or "").lower(), "chunked", "Transfer-Encoding for a close-delimited body")
        eq(len(r.body), 50000, "close-delimited body length")
        r, j = echo(c, "/legacy/after")
        eq(j["path"], "/after", "request after a close-delimited body")


@ptest
def proxy_chunked_backend_response_to_http10_client():
    """An HTTP/1.0 client cannot read chunked: the body is sent unframed and
    the connection closes after it."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        c.send(req("GET", "/legacy/ch10?size=20000&chunked=1", version="HTTP/1.0"))
        r = c.read_head()
        eq(r.status, 200, "status")
        eq(r.header_all("Transfer-Encoding"), [], "Transfer-Encoding to an HTTP/1.0 client")
        body = c.read_raw_until_close(5)
        cl = r.header("Content-Length")
        check(cl is None or int(cl) == 20000, f"Content-Length {cl!r}")
        eq(len(body), 20000, "body length")


# --- connections to the backend ----------------------------------------------------------

@ptest
def proxy_keepalive_reuses_backend_connection():
    s = Stub()
    d = proxy_daemon(s)
    ids, nreq = [], []
    with Client(d) as c:
        for i in range(6):
            r, j = echo(c, f"/legacy/ka{i}")
            ids.append(j["connection_id"])
            nreq.append(j["connection_requests"])
    for i in range(3):  # new client connections, same worker, same pool
        with Client(d) as c:
            r, j = echo(c, f"/legacy/kb{i}")
            ids.append(j["connection_id"])
            nreq.append(j["connection_requests"])
    eq(len(set(ids)), 1, f"backend connections used by 9 sequential requests (ids {ids})")
    eq(nreq, list(range(1, 10)), "connection_requests")
    # a client's Connection: close ends the client connection, not the backend's
    with Client(d) as c:
        r, j = echo(c, "/legacy/close", headers={"Connection": "close"})
        check("close" not in (j["headers"].get("connection") or "").lower(),
              f"the client's Connection: close reached the backend: {j['headers']}")
        eq((r.header("Connection") or "").lower(), "close", "Connection of the response")
        eq(c.read_raw_until_close(3), b"", "bytes after the last response")
    with Client(d) as c:
        r, j = echo(c, "/legacy/after-close")
        eq(j["connection_id"], ids[0], "the backend connection survives a client's Connection: close")


@ptest
def proxy_max_idle_zero_disables_pooling():
    s = Stub()
    d = proxy_daemon(s, max_idle=0)
    ids = []
    with Client(d) as c:
        for i in range(3):
            r, j = echo(c, f"/legacy/n{i}")
            ids.append(j["connection_id"])
            eq(j["connection_requests"], 1, "connection_requests with max_idle 0")
    eq(len(set(ids)), 3, f"connection ids {ids}")
    s.wait_stats(lambda st: st["open_connections"] == 0, 3, "no connection left open")


@ptest
def proxy_idle_timeout_closes_pooled_connection():
    s = Stub()
    d = proxy_daemon(s, idle_timeout_ms=ms(200))
    with Client(d) as c:
        r, j = echo(c, "/legacy/i1")
        check(s.stats()["open_connections"] == 1, "one pooled connection right after the request")
        st, dt = s.wait_stats(lambda st: st["open_connections"] == 0, 3, "the idle connection closed")
        r, j2 = echo(c, "/legacy/i2")
        check(j2["connection_id"] != j["connection_id"], "a connection closed for idleness was reused")


@ptest
def proxy_pool_keeps_every_connection_until_idle_timeout():
    """Default max_idle (max_connections): 80 requests at once leave 80
    connections, all of them pooled (none closed at release) and all reused
    by the next 80; idle_timeout_ms then closes every one of them."""
    s = Stub(threads=2)
    d = proxy_daemon(s, idle_timeout_ms=ms(1500))
    n = 80
    clients = [Client(d) for _ in range(n)]
    for rnd in range(2):
        for i, c in enumerate(clients):
            c.send(get(f"/legacy/r{rnd}/{i}?delay=300"))
        for c in clients:
            eq(c.read_response().status, 200, f"status in round {rnd}")
        st = s.stats()
        eq(st["open_connections"], n, f"connections kept after round {rnd} (stats {st})")
        if rnd == 0:
            first = st["connections"] - s.nstats
    eq(s.stats()["connections"] - s.nstats, first, "the second round made no new connection")
    s.wait_stats(lambda st: st["open_connections"] == 0, 3 + 3 * SLOW, "idle_timeout_ms closed every pooled connection")


@ptest
def proxy_stale_pooled_connection_detected():
    """The backend closes a pooled connection while it is idle: the next
    request (also a POST, which may not be retried) gets a fresh one."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        for method in ["GET", "POST"]:
            r, j1 = echo(c, "/legacy/stale1?close_idle_ms=50")
            time.sleep(0.3)
            r, j2 = echo(c, "/legacy/stale2", method=method, body=b"x" if method == "POST" else b"")
            check(j2["connection_id"] != j1["connection_id"], f"{method}: a closed connection was used again")
            eq(j2["connection_requests"], 1, f"{method}: connection_requests on the fresh connection")


@ptest
def proxy_extra_backend_bytes_never_answer_the_next_request():
    """Bytes the backend sends after a complete response (here a forged
    second response), at once or while the connection is idle: that
    connection must not serve another request, or the forged bytes would be
    taken for the next client's response (response queue poisoning)."""
    s = Stub()
    d = proxy_daemon(s)
    forged = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
    with Client(d) as c:
        for delay in [0, 100]:
            r, j1 = echo(c, "/legacy/first?" + q(trailing_bytes=forged, trailing_delay_ms=delay))
            if delay:
                time.sleep(0.3)
            r, j2 = echo(c, "/legacy/second")
            eq(j2["path"], "/second", f"delay {delay}: the next request got the backend's stray bytes")
            check(j2["connection_id"] != j1["connection_id"], f"delay {delay}: a poisoned connection was reused")


@ptest
def proxy_backend_interim_response():
    """A 1xx before the final response (103 Early Hints, an unasked 100):
    the client gets the final response in sync, whether or not the 1xx is
    passed on."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        for code in [100, 103]:
            c.send(get(f"/legacy/interim?interim={code}&body=final"))
            r = c.read_response()
            while 100 <= r.status < 200:
                r = c.read_response()
            eq(r.status, 200, f"interim {code}: final status")
            eq(r.body, b"final", f"interim {code}: final body")
            r, j = echo(c, "/legacy/after")
            eq(j["path"], "/after", f"interim {code}: the next request is in sync")


@ptest
def proxy_retry_once_on_reused_connection():
    """A reused connection that dies before any response byte (FIN or RST):
    idempotent methods are sent once more on a fresh connection."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        for method in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]:
            for how in ["close_if_reused", "reset_if_reused"]:
                r, j0 = echo(c, "/legacy/warm")
                r = c.request(req(method, f"/legacy/retry?{how}=1&echo=1", body=b"b" if method == "PUT" else b""))
                eq(r.status, 200, f"{method} with {how}: status ({r.raw[:300]!r})")
                if method != "HEAD":
                    j = r.json()
                    eq(j["method"], method, "method of the retry")
                    eq(j["connection_requests"], 1, f"{method} with {how}: retried on a fresh connection")
                    check(j["connection_id"] != j0["connection_id"], f"{method} with {how}: connection id")
                    if method == "PUT":
                        eq(j["body"], "b", "body of the retried PUT")


@ptest
def proxy_no_retry_for_post_and_only_one_retry():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        # POST on a reused connection that dies: not retried
        echo(c, "/legacy/warm")
        before = s.stats()["requests"]
        r = c.request(req("POST", "/legacy/post?close_if_reused=1", body=b"data"))
        expect_upstream_error(r, 502, "upstream_reset")
        eq(s.stats()["requests"] - before, 1, "backend requests for a failing POST (no retry)")
    with Client(d) as c:
        # GET that fails on the fresh connection too: exactly one retry, then 502
        echo(c, "/legacy/warm")
        before = s.stats()["requests"]
        r = c.request(get("/legacy/dead?close=before_headers"))
        expect_upstream_error(r, 502, "upstream_reset")
        eq(s.stats()["requests"] - before, 2, "backend requests for a GET failing twice (one retry)")
        # and gatherd still works
        r, j = echo(c, "/legacy/ok")


@ptest
def proxy_concurrent_clients_no_crosstalk():
    s = Stub(threads=2)
    d = proxy_daemon(s, workers=2)

    def client(k):
        problems = []
        with Conn(d.host, d.port, 10) as c:
            for i in range(25):
                path = f"/legacy/c{k}/r{i}"
                extra = "&delay=5" if i % 5 == 0 else ""
                r = c.request(get(f"{path}?echo=1{extra}", headers={"X-Who": f"{k}-{i}"}))
                j = r.json() if r.status == 200 else {}
                if r.status != 200 or j.get("path") != path[7:] or j["headers"].get("x-who") != f"{k}-{i}":
                    problems.append(f"client {k} req {i}: {r.status} {r.body[:120]!r}")
        return problems

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(client, range(8)))
    problems = [p for ps in results for p in ps]
    check(not problems, "; ".join(problems[:5]))
    st = s.stats()
    check(st["connections"] <= 2 * 8 + 4, f"backend connections for 200 requests from 8 clients: {st}")


@ptest
def proxy_pipelined_client_requests():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        c.send(get("/legacy/p1?echo=1&delay=100") + get("/legacy/p2?echo=1") + get("/legacy/p3?echo=1&size=5"))
        r1 = c.read_response()
        r2 = c.read_response()
        r3 = c.read_response()
        eq(r1.json()["path"], "/p1", "first response")
        eq(r2.json()["path"], "/p2", "second response")
        eq(r3.json()["path"], "/p3", "third response")


@ptest
def proxy_ipv6_backend():
    if not ipv6_loopback_available():
        # still exercise the config path, then stop
        _config_ok({"listen": ["127.0.0.1:8080"], "backends": {"b": {"url": "http://[::1]:9101"}},
                    "routes": [{"path": "/x/*", "proxy": {"backend": "b"}}]})
        return
    s = Stub(host="::1")
    d = proxy_daemon(s)
    with Client(d) as c:
        r, j = echo(c, "/legacy/v6")
        eq(j["path"], "/v6", "path")
        eq(j["headers"].get("host"), f"[::1]:{s.port}", "Host of an IPv6 backend")
    # an IPv6 client (a trusted proxy): its address in X-Forwarded-For
    cfg = config({"b": backend(s.url)}, trusted_proxies=["::1/128"])
    cfg["listen"] = ["[::1]:PORT"]
    d6 = Daemon(cfg, workers=1)
    with Client(d6) as c:
        r, j = echo(c, "/legacy/v6c", headers={"X-Forwarded-For": "10.1.1.1"})
        eq(j["headers"].get("x-forwarded-for"), "10.1.1.1, ::1", "X-Forwarded-For of an IPv6 client")


@ptest
def proxy_graceful_stop_with_request_in_flight():
    """SIGTERM while a proxied request waits for its backend and another
    connection sits in the pool: gatherd exits 0 (no crash, no sanitizer
    report); the client gets its answer or a clean close."""
    s = Stub()
    d = proxy_daemon(s, workers=2)
    with Client(d) as c:
        echo(c, "/legacy/pooled")
    c = Client(d)
    c.send(get("/legacy/slow?delay=400&echo=1"))
    s.wait_stats(lambda st: st["requests"] >= 2, 3, "the slow request at the backend")
    d.send_signal(signal.SIGTERM)
    try:
        r = c.read_response()
        check(r.status in (200, 502, 503, 504), f"status during stop: {r.status}")
    except ConnectionClosed:
        pass
    c.close()  # else gatherd's lingering close waits for us
    eq(d.wait(15 * SLOW), 0, "exit code after SIGTERM")


# --- errors -----------------------------------------------------------------------------

@ptest
def proxy_error_connect_refused():
    d = proxy_daemon(f"http://127.0.0.1:{closed_port()}")
    with Client(d) as c:
        r, dt = timed_request(c, get("/legacy/x"))
        expect_upstream_error(r, 502, "upstream_connect_failed")
        check(dt < 2 * SLOW, f"a refused connect took {dt:.2f}s")
        # the client connection survives a proxy error (or is closed cleanly)
        if (r.header("Connection") or "").lower() != "close":
            r = c.request(get("/local"))
            eq(r.status, 200, "local route after a proxy error")


@ptest
def proxy_error_upstream_reset():
    s = Stub()
    d = proxy_daemon(s)
    for how in ["close=before_headers", "reset=before_headers", "delay=100&close=before_headers"]:
        with Client(d) as c:
            r = c.request(get(f"/legacy/x?{how}"))
            expect_upstream_error(r, 502, "upstream_reset")
    # a head with Content-Length: 0 and then a close is a whole response, not an error
    with Client(d) as c:
        r = c.request(get("/legacy/x?close=after_headers&size=0"))
        eq(r.status, 200, "complete response with an empty body")


@ptest
def proxy_error_timeout():
    s = Stub()
    d = proxy_daemon(s, timeout_ms=ms(300))
    with Client(d) as c:
        r, dt = timed_request(c, get("/legacy/slow?delay=1000&echo=1"))
        expect_upstream_error(r, 504, "upstream_timeout")
        check(0.25 <= dt < 2 * SLOW, f"504 after {dt:.2f}s, want about 0.3s")
        # the timed-out connection is not reused (its late answer would be
        # taken for the next request's)
        if (r.header("Connection") or "").lower() != "close":
            r, j = echo(c, "/legacy/after")
        else:
            with Client(d) as c2:
                r, j = echo(c2, "/legacy/after")
        eq(j["path"], "/after", "path of the request after a timeout")
        eq(j["connection_requests"], 1, "a timed-out connection was reused")


@ptest
def proxy_error_timeout_blackhole():
    bh = Blackhole(accepting=True)
    d = proxy_daemon(bh, timeout_ms=ms(300))
    with Client(d) as c:
        r, dt = timed_request(c, get("/legacy/x"))
        expect_upstream_error(r, 504, "upstream_timeout")
        check(dt < 2 * SLOW, f"504 after {dt:.2f}s")


@ptest
def proxy_error_connect_timeout():
    bh = Blackhole(accepting=False)
    d = proxy_daemon(bh, connect_timeout_ms=ms(300), timeout_ms=ms(5000))
    with Client(d) as c:
        r, dt = timed_request(c, get("/legacy/x"))
        expect_upstream_error(r, 504, "upstream_timeout")
        check(0.25 <= dt < 2.5 * SLOW, f"504 after {dt:.2f}s: want connect_timeout_ms (0.3s), not timeout_ms (5s)")


@ptest
def proxy_error_timeout_covers_the_body():
    """timeout_ms is for the whole call: a body still trickling in when it
    expires is cut, and the client connection is closed."""
    s = Stub()
    d = proxy_daemon(s, timeout_ms=ms(500))
    with Client(d) as c:
        c.send(get("/legacy/trickle?size=100000&chunk=1000&chunk_delay=100"))
        r = c.read_head()
        eq(r.status, 200, "status (head came in time)")
        t0 = time.monotonic()
        rest = c.read_raw_until_close(5)
        dt = time.monotonic() - t0
        check(len(rest) < 100000, f"body complete ({len(rest)} bytes) although the call timed out")
        check(dt < 3 * SLOW, f"connection closed {dt:.2f}s after the head")


@ptest
def proxy_error_bad_response():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r = c.request(get("/legacy/x?garbage=1"))
        expect_upstream_error(r, 502, "upstream_bad_response")


@ptest
def proxy_error_conflicting_content_length():
    """A backend response with two different Content-Lengths is invalid
    (a response splitting vector): never passed on."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r = c.request(get("/legacy/x?size=20&header=Content-Length:5"))
        expect_upstream_error(r, 502, "upstream_bad_response")


@ptest
def proxy_oversized_backend_head_rejected():
    """A backend response head of 1 MB (or 16 MB) is not buffered whole:
    502 upstream_bad_response, memory stays small, and that connection is
    not reused (the rest of the head is still coming)."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r = c.request(get("/legacy/small?pad_header=2000"))
        eq(r.status, 200, "a 2 KB response header passes")
        eq(len(r.header("X-Pad") or ""), 2000, "X-Pad header")
        for n in [1000000, 16000000]:
            r, dt = timed_request(c, get(f"/legacy/huge-head?pad_header={n}"))
            expect_upstream_error(r, 502, "upstream_bad_response")
            if (r.header("Connection") or "").lower() == "close":
                c.close()
                c = Client(d)
            r, j = echo(c, "/legacy/after")
            eq(j["path"], "/after", "the request after an oversized head")
            eq(j["connection_requests"], 1, "the connection of the oversized head was reused")
    rss = rss_kb(d.pid)
    limit = 64 * 1024 * (2 if gwtest._is_sanitized(gwtest.GATHERD) else 1)
    check(rss < limit, f"gatherd VmRSS {rss} kB after oversized heads")


@ptest
def proxy_max_idle_limits_pooled_connections():
    s = Stub(threads=2)
    d = proxy_daemon(s, max_idle=1)
    clients = [Client(d) for _ in range(3)]
    for i, c in enumerate(clients):
        c.send(get(f"/legacy/slow{i}?delay=300"))
    s.wait_stats(lambda st: st["open_connections"] == 3, 3, "three connections in use")
    for c in clients:
        eq(c.read_response().status, 200, "status")
    st, _ = s.wait_stats(lambda st: st["open_connections"] <= 1, 3, "at most max_idle (1) connections kept")
    time.sleep(0.2)
    eq(s.stats()["open_connections"], 1, "idle connections kept with max_idle 1")


@ptest
def proxy_backend_chunked_with_content_length_not_passed_both():
    """A backend response with Transfer-Encoding: chunked and a
    Content-Length: either rejected (502) or passed with one framing only,
    and the body decoded by the chunked framing (RFC 9112 6.3)."""
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        r = c.request(get("/legacy/x?size=3000&chunked=1&header=Content-Length:5"))
        if r.status == 502:
            expect_upstream_error(r, 502, "upstream_bad_response")
            return
        eq(r.status, 200, "status")
        check(not (r.header_all("Content-Length") and r.header_all("Transfer-Encoding")),
              f"both framings passed to the client: {r.raw[:300]!r}")
        eq(len(r.body), 3000, "body length")
        r, j = echo(c, "/legacy/after")
        eq(j["path"], "/after", "the next request is in sync")


@ptest
def proxy_expect_100_continue():
    s = Stub()
    d = proxy_daemon(s)
    with Client(d) as c:
        c.send(b"POST /legacy/exp?echo=1 HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        r = c.read_response("POST")
        eq(r.status, 100, f"interim response ({r.raw[:200]!r})")
        c.send(b"hello")
        r = c.read_response("POST")
        eq(r.status, 200, f"final status ({r.raw[:200]!r})")
        j = r.json()
        eq(j["body"], "hello", "body at the backend")
        check("expect" not in j["headers"], f"Expect reached the backend: {j['headers']}")


@ptest
def proxy_error_max_connections():
    s = Stub()
    d = proxy_daemon(s, max_connections=1, max_pending=0)
    a = Client(d)
    a.send(get("/legacy/slow?delay=1500&echo=1"))
    s.wait_stats(lambda st: st["requests"] >= 1, 3, "the slow request at the backend")
    with Client(d) as b:
        r, dt = timed_request(b, get("/legacy/second"))
        expect_upstream_error(r, 503, "upstream_unavailable")
        check(dt < 1.0 * SLOW, f"503 took {dt:.2f}s (should not wait for a connection)")
    r = a.read_response()
    eq(r.status, 200, "the slow request")
    eq(r.json()["path"], "/slow", "path of the slow request")
    with Client(d) as b:
        r, j = echo(b, "/legacy/third")  # the connection is free again


# --- malformed backend responses (gw_resp) ---------------------------------------------

def raw_path(data, prefix="/legacy/raw", **more):
    """A path whose stub answer is data, byte for byte, then a FIN (raw=)."""
    if isinstance(data, str):
        data = data.encode("latin-1")
    extra = "".join(f"&{k}={v}" for k, v in more.items())
    return f"{prefix}?raw={urllib.parse.quote_from_bytes(data, safe='')}{extra}"


CHUNKED_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
CL_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"

# Responses no backend may send: each arrives in one piece, before anything
# could reach the client, so each must become a 502 JSON error.
MALFORMED = [
    ("bad chunk size in the first chunk", CHUNKED_HEAD + "zz\r\nhello\r\n0\r\n\r\n"),
    ("chunk size with a space", CHUNKED_HEAD + "5 \r\nhello\r\n0\r\n\r\n"),
    ("chunk size overflowing 64 bits", CHUNKED_HEAD + "10000000000000000\r\nhello\r\n0\r\n\r\n"),
    ("chunk size 2^64-1", CHUNKED_HEAD + "ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("chunk size 2^63", CHUNKED_HEAD + "8000000000000000\r\nhello\r\n0\r\n\r\n"),
    ("chunk extensions over 4 KiB", CHUNKED_HEAD + "5;x=" + "a" * 5000 + "\r\nhello\r\n0\r\n\r\n"),
    ("many chunk extensions over 4 KiB", CHUNKED_HEAD + "5" + ";ab" * 1400 + "\r\nhello\r\n0\r\n\r\n"),
    ("chunk data not followed by CRLF", CHUNKED_HEAD + "5\r\nhelloXX0\r\n\r\n"),
    ("CR without LF in a chunk size line", CHUNKED_HEAD + "5\rXhello\r\n0\r\n\r\n"),
    ("CR without LF in the last chunk line", CHUNKED_HEAD + "5\r\nhello\r\n0\rX-Trailer: 1\r\n\r\n"),
    ("bad status line", "HTTP/1.1 2x0 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("not HTTP", "SSH-2.0-OpenSSH_9.0\r\n\r\n"),
    ("status 000", "HTTP/1.1 000 Zero\r\nContent-Length: 5\r\n\r\nhello"),
    ("status 099", "HTTP/1.1 099 Low\r\nContent-Length: 5\r\n\r\nhello"),
    ("status 600", "HTTP/1.1 600 High\r\nContent-Length: 5\r\n\r\nhello"),
    ("status 999", "HTTP/1.1 999 High\r\nContent-Length: 5\r\n\r\nhello"),
    ("status -1", "HTTP/1.1 -1 Neg\r\nContent-Length: 5\r\n\r\nhello"),
    ("four-digit status", "HTTP/1.1 0200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("four-digit interim status", "HTTP/1.1 0100 Continue\r\n\r\n" + CL_HEAD + "hello"),
    ("two spaces before the status", "HTTP/1.1  200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("101 without an upgrade asked", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     "Connection: Upgrade\r\n\r\nhello"),
    ("bare 101", "HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("HTTP/2.0", "HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("HTTP/0.9", "HTTP/0.9 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("control character in the reason", "HTTP/1.1 200 O\x00K\r\nContent-Length: 5\r\n\r\nhello"),
    ("space in a header name", "HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 5\r\n\r\nhello"),
    ("space before the colon", "HTTP/1.1 200 OK\r\nX-A : x\r\nContent-Length: 5\r\n\r\nhello"),
    ("empty header name", "HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 5\r\n\r\nhello"),
    ("control character in a value", "HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 5\r\n\r\nhello"),
    ("bad Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello"),
    ("negative Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello"),
    ("Content-Length list", "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"),
    ("duplicate Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    ("Content-Length 2^64-1", "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\nhello"),
    ("Content-Length 2^63", "HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\nhello"),
    ("Content-Length over 64 bits", "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nhello"),
    ("Content-Length and chunked", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   "5\r\nhello\r\n0\r\n\r\n"),
    ("chunked and Content-Length", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                                   "5\r\nhello\r\n0\r\n\r\n"),
    ("Transfer-Encoding gzip", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello"),
    ("Transfer-Encoding gzip, chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                        "5\r\nhello\r\n0\r\n\r\n"),
    ("Transfer-Encoding twice", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
                                "\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("empty Transfer-Encoding", "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nContent-Length: 5\r\n\r\nhello"),
    ("Transfer-Encoding chunked;q=1", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked;q=1\r\n\r\nhello"),
    ("bare LF line ends", "HTTP/1.1 200 OK\nContent-Length: 5\n\nhello"),
    ("bare LF after the status line", "HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\nhello"),
    ("bare LF ending the head", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\nhello"),
    ("CR without LF hiding a field", "HTTP/1.1 200 OK\rContent-Length: 5\r\n\r\nhello"),
    ("obsolete line folding", "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello"),
    ("empty line before the status line", "\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("bare LF in the trailers", CHUNKED_HEAD + "5\r\nhello\r\n0\r\nX-T: 1\n\r\n"),
    ("folded trailer", CHUNKED_HEAD + "5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"),
    ("bad trailer name", CHUNKED_HEAD + "5\r\nhello\r\n0\r\nX T: 1\r\n\r\n"),
    ("33 interim responses", "HTTP/1.1 102 Processing\r\n\r\n" * 33 + CL_HEAD + "hello"),
    ("201 header fields", "HTTP/1.1 200 OK\r\n" + "".join(f"X-F{i}: v\r\n" for i in range(201)) + CL_HEAD[17:]
                          + "hello"),
    ("truncated head", "HTTP/1.1 200 OK\r\nContent-Len"),
    ("truncated status line", "HTTP/1.1 20"),
]


@ptest
def proxy_malformed_backend_response_is_a_502():
    """Every way a backend response can be malformed before its head could
    reach the client gives 502 upstream_bad_response as JSON (never an empty
    reply, never a passed-on head), and the client connection keeps serving."""
    s = Stub()
    d = proxy_daemon(s)
    problems = []
    with Client(d) as c:
        for name, data in MALFORMED:
            try:
                r = c.request(get(raw_path(data)))
                expect_upstream_error(r, 502, "upstream_bad_response")
                if (r.header("Connection") or "").lower() == "close":
                    c.close()
                    c = Client(d)
            except (TestFailure, ConnectionClosed, OSError) as e:
                problems.append(f"{name}: {e}")
                c.close()
                c = Client(d)
        r, j = echo(c, "/legacy/after")
    check(not problems, f"{len(problems)} of {len(MALFORMED)} malformed responses not answered 502:\n  "
          + "\n  ".join(problems))


# Unusual but valid responses: passed on with their status and exact body.
UNUSUAL = [
    # (llhttp 8 refuses a token value followed by a further extension: "5;a=b;c")
    ("small chunk extensions", CHUNKED_HEAD + "5;a;b=\"x;y\";c=d\r\nhello\r\n0;last\r\n\r\n", 200, b"hello"),
    ("chunk size with leading zeros", CHUNKED_HEAD + "0005\r\nhello\r\n0\r\n\r\n", 200, b"hello"),
    ("trailers", CHUNKED_HEAD + "5\r\nhello\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n", 200, b"hello"),
    ("no reason phrase", "HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello"),
    ("reason with obs-text and a tab", "HTTP/1.1 200 \xe9t\xe9\tok\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello"),
    ("HTTP/1.0 close-delimited", "HTTP/1.0 200 OK\r\n\r\nhello", 200, b"hello"),
    ("HTTP/1.1 close-delimited", "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello", 200, b"hello"),
    ("Transfer-Encoding Chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     200, b"hello"),
    ("100 with a Content-Length", "HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\n" + CL_HEAD + "hello",
     200, b"hello"),
    ("102 and 103 first", "HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
     + CL_HEAD + "hello", 200, b"hello"),
    # an interim response that is not keep-alive used to swallow the final one (found by test_backend_fuzz)
    ("HTTP/1.0 interim response", "HTTP/1.0 103 Early Hints\r\n\r\n" + CL_HEAD + "hello", 200, b"hello"),
    ("interim with Connection: close", "HTTP/1.1 102 P\r\nConnection: close\r\n\r\n" + CL_HEAD + "hello", 200,
     b"hello"),
    ("32 interim responses", "HTTP/1.1 102 Processing\r\n\r\n" * 32 + CL_HEAD + "hello", 200, b"hello"),
    ("status 599", "HTTP/1.1 599 Odd\r\nContent-Length: 5\r\n\r\nhello", 599, b"hello"),
    ("status 299", "HTTP/1.1 299 Odd\r\nContent-Length: 5\r\n\r\nhello", 299, b"hello"),
    ("4 KiB of chunk extensions", CHUNKED_HEAD + "5;x=" + "a" * 4091 + "\r\nhello\r\n0\r\n\r\n", 200, b"hello"),
    ("binary body", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n\x00\r\n\xff\x01", 200, b"\x00\r\n\xff\x01"),
]


@ptest
def proxy_unusual_valid_backend_responses_pass():
    s = Stub()
    d = proxy_daemon(s)
    problems = []
    for name, data, status, body in UNUSUAL:
        try:
            with Client(d) as c:
                r = c.request(get(raw_path(data)))
                eq(r.status, status, f"{name}: status ({r.raw[:300]!r})")
                eq(r.body, body, f"{name}: body")
        except (TestFailure, ConnectionClosed, OSError) as e:
            problems.append(f"{name}: {e}")
    check(not problems, f"{len(problems)} of {len(UNUSUAL)} valid responses not passed on:\n  " + "\n  ".join(problems))


@ptest
def proxy_bodyless_statuses_ignore_their_framing():
    """204, 304 and interim responses have no body whatever their head says
    (a 304 carries the Content-Length of the representation): answered at
    once, and the backend connection stays in sync for the next request."""
    s = Stub()
    d = proxy_daemon(s, timeout_ms=ms(3000))
    cases = [
        ("304 with a Content-Length", "HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"x\"\r\n", 304),
        ("304 chunked", "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n", 304),
        ("204 with a Content-Length", "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n", 204),
        ("204 chunked", "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n", 204),
    ]
    # the stub closes after its raw answer: "Connection: close" keeps gatherd from pooling it
    cases = [(name, head + "Connection: close\r\n\r\n", status) for name, head, status in cases]
    with Client(d) as c:
        for name, head, status in cases:
            # the stub's FIN comes only after a long pause: no close may end the body
            r, dt = timed_request(c, get(raw_path(head + "X" * 8, chunk=len(head), chunk_delay=ms(4000))))
            eq(r.status, status, f"{name}: status ({r.raw[:300]!r})")
            eq(r.body, b"", f"{name}: body")
            check(dt < 2 * SLOW, f"{name}: answered after {dt:.2f}s")
            if status == 304:  # the representation's length when the backend gave it, else none
                eq(r.header("Content-Length"), "1234" if "1234" in head else None, f"{name}: Content-Length")
            eq((r.header("Connection") or "").lower(), "", f"{name}: the client connection is kept")
        r, j = echo(c, "/legacy/after")


@ptest
def proxy_malformed_after_the_head_was_sent_closes():
    """When the head already reached the client, a malformed rest closes the
    connection: a chunked body never gets its last chunk, a Content-Length
    body stays short."""
    s = Stub()
    d = proxy_daemon(s, http={"max_url_bytes": 65536, "max_header_bytes": 65536})
    good = "5\r\nhello\r\n"
    cases = [
        ("bad chunk size", CHUNKED_HEAD, good + "zz\r\nworld\r\n0\r\n\r\n"),
        ("chunk size 2^64-1", CHUNKED_HEAD, good + "ffffffffffffffff\r\nworld"),
        ("chunk extensions over 4 KiB", CHUNKED_HEAD, good + "5;" + "e" * 4100 + "\r\nworld\r\n0\r\n\r\n"),
        ("bad trailer", CHUNKED_HEAD, good + "0\r\nX T: 1\r\n\r\n"),
        ("no last chunk", CHUNKED_HEAD, good),
        ("short Content-Length body", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "hello"),
    ]
    for name, head, rest in cases:
        with Client(d) as c:
            # two pieces 300 ms apart: the head (padded to the length of the rest), then the rest
            pad = max(0, len(rest) - len(head))
            head = head[:-2] + "X-Pad: " + "p" * pad + "\r\n\r\n"
            c.send(get(raw_path(head + rest, chunk=len(head), chunk_delay=ms(300))))
            r = c.read_head()
            eq(r.status, 200, f"{name}: status")
            tail = c.read_raw_until_close(5)
            if r.header("Content-Length") is not None:
                eq(r.header("Content-Length"), "10", f"{name}: Content-Length")
                check(len(tail) < 10, f"{name}: a complete-looking body {tail!r}")
            else:
                eq((r.header("Transfer-Encoding") or "").lower(), "chunked", f"{name}: framing")
                body, complete = dechunk(tail)
                check(not complete, f"{name}: the cut body ended with a last chunk: {tail[:200]!r}")
    with Client(d) as c:
        r, j = echo(c, "/legacy/ok")


# --- a backend failing in the middle of a body -----------------------------------------

@ptest
def proxy_mid_body_failure_closes_client_connection():
    s = Stub()
    d = proxy_daemon(s)
    for how in ["close=mid_body", "reset=mid_body", "truncate=10", "close=after_headers"]:
        with Client(d) as c:
            c.send(get(f"/legacy/cut?size=100000&{how}"))
            r = c.read_head()
            eq(r.status, 200, f"{how}: status")
            cl = r.header("Content-Length")
            rest = c.read_raw_until_close(5)
            if cl is not None:
                eq(cl, "100000", f"{how}: Content-Length")
                check(len(rest) < 100000, f"{how}: got {len(rest)} bytes, a complete-looking body")
            else:
                eq((r.header("Transfer-Encoding") or "").lower(), "chunked", f"{how}: framing")
                body, complete = dechunk(rest)
                check(not complete, f"{how}: chunked body ended with its last chunk ({len(body)} bytes)")
    for how in ["close=mid_body", "reset=mid_body", "truncate=5000"]:
        with Client(d) as c:
            c.send(get(f"/legacy/cutch?size=100000&chunked=1&chunk=1000&{how}"))
            r = c.read_head()
            eq(r.status, 200, f"chunked {how}: status")
            rest = c.read_raw_until_close(5)
            if (r.header("Transfer-Encoding") or "").lower() == "chunked":
                body, complete = dechunk(rest)
                check(not complete, f"chunked {how}: body ended with its last chunk ({len(body)} bytes)")
                check(len(body) < 100000, f"chunked {how}: whole body arrived")
            else:
                check(False, f"chunked {how}: a cut chunked body without chunked framing: {r.raw[:300]!r}")
    # gatherd keeps serving
    with Client(d) as c:
        r, j = echo(c, "/legacy/ok")


# --- cancellation --------------------------------------------------------------------

@ptest
def proxy_client_disconnect_cancels_upstream():
    s = Stub()
    d = proxy_daemon(s, timeout_ms=ms(20000))
    # waiting for the head
    c = Client(d)
    c.send(get("/legacy/slow?delay=4000&abort_on_eof=1"))
    s.wait_stats(lambda st: st["requests"] >= 1, 3, "the slow request at the backend")
    eq(s.stats()["open_connections"], 1, "backend connections while the request is in flight")
    c.close()
    st, dt = s.wait_stats(lambda st: st["open_connections"] == 0, 3, "the upstream connection closed")
    check(dt < 2.5, f"upstream closed {dt:.2f}s after the client left (the backend answers at 4 s)")
    # in the middle of a big body
    c = Client(d)
    c.send(get("/legacy/big?size=500000000"))
    r = c.read_head()
    eq(r.status, 200, "status")
    got, _ = c.count_body(200000)
    s.wait_stats(lambda st: st["open_connections"] == 1, 3, "one upstream connection")
    c.close()
    st, dt = s.wait_stats(lambda st: st["open_connections"] == 0, 5, "the upstream connection closed (mid-body)")
    # the next request uses a new connection and works
    with Client(d) as c2:
        r, j = echo(c2, "/legacy/after")
        eq(j["connection_requests"], 1, "a cancelled connection was pooled")


@ptest
def proxy_memory_bounded_with_slow_client():
    """200 MB through gatherd to a client that reads 64 KB at a time with
    1 ms pauses: gatherd's resident memory stays far below the body size."""
    s = Stub()
    sanitized = gwtest._is_sanitized(gwtest.GATHERD)
    d = memory_daemon(s, timeout_ms=ms(300000))
    n = 200 * 1000 * 1000
    peak = [0]
    time.sleep(0.2)
    base = rss_kb(d.pid)
    # 64 MB in all; a sanitizer build starts bigger (shadow memory), so there
    # it is 64 MB above the start
    limit_kb = 64 * 1024 + (base if sanitized else 0)
    with Client(d, timeout=30) as c:
        c.send(get(f"/legacy/huge?size={n}"))
        r = c.read_head()
        eq(r.status, 200, "status")
        eq(r.header("Content-Length"), str(n), "Content-Length")
        slow_until = time.monotonic() + 20 * SLOW
        got = 0
        i = 0
        while got < n:
            data = c.recv_some()
            if not data:
                break
            got += len(data)
            i += 1
            if i % 16 == 0:
                peak[0] = max(peak[0], rss_kb(d.pid))
                check(peak[0] < limit_kb, f"gatherd VmRSS {peak[0]} kB after {got} bytes (limit {limit_kb} kB)")
            if time.monotonic() < slow_until:
                time.sleep(0.001)
            elif time.monotonic() > slow_until + 60 * SLOW:
                raise TestFailure(f"body not complete after 80 s: {got} of {n} bytes")
        eq(got, n, "body bytes")
        hwm = rss_kb(d.pid, "VmHWM")
        check(hwm < limit_kb, f"gatherd VmHWM {hwm} kB (limit {limit_kb} kB, start {base} kB)")
        print(f"# memory: start {base} kB, peak sampled VmRSS {peak[0]} kB, VmHWM {hwm} kB")


# --- paths ----------------------------------------------------------------------------

def _upper_escapes(path):
    """%2f and %2F are the same escape: compare with upper-case hex digits."""
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), path)


@ptest
def proxy_path_encoding_and_strip_prefix_edges():
    s = Stub()
    d = proxy_daemon(s)
    cases = [
        ("/legacy/a%2Fb/c", "/a%2Fb/c"),
        ("/legacy/a%2fb", "/a%2Fb"),
        ("/legacy", "/"),
        ("/legacy/", "/"),
        ("/legacy/a%20b", "/a%20b"),
        ("/legacy//x/./y/../z", "/x/z"),
        ("/legacy/x/%2e%2e/q", "/q"),
        ("/legacy/../legacy/q", "/q"),
        ("/legacy/a/", "/a/"),
        ("/legacy/%41bc", "/Abc"),
        ("/legacy/a%3Fb", "/a%3Fb"),
        ("/legacy/a%23b", "/a%23b"),
        ("/legacy/a%25b", "/a%25b"),
        ("/legacy/caf%C3%A9", "/caf%C3%A9"),
        ("/raw/x/y", "/raw/x/y"),
        ("/deep/api/v1/items", "/v1/items"),
    ]
    problems = []
    with Client(d) as c:
        for path, want in cases:
            r = c.request(get(path + "?echo=1"))
            if r.status != 200:
                problems.append(f"{path}: status {r.status} {r.body[:100]!r}")
                continue
            gotp = r.json()["path"]
            if _upper_escapes(gotp) != want:
                problems.append(f"{path}: backend path {gotp!r}, want {want!r}")
        # the query string goes through untouched
        for qs in ["a=%2F&b=c+d&&e", "x=%zz", "q=/../x", "s=%20%2520", "k"]:
            r = c.request(get(f"/legacy/qs?{qs}&echo=1"))
            gq = r.json()["query"] if r.status == 200 else None
            if gq != qs + "&echo=1":
                problems.append(f"query {qs!r}: backend got {gq!r}")
        # a path escaping the prefix is not proxied there
        r = c.request(get("/legacy/../local"))
        if (r.status, r.body) != (200, b'{"local":true}'):
            problems.append(f"/legacy/../local: {r.status} {r.body[:80]!r}")
    check(not problems, "; ".join(problems))


# ------------------------------------------------------------------ TLS to backends

_PKI = {}


def pki():
    """A CA, a server certificate for 127.0.0.1 and backend.test, and a client
    certificate, made once with the openssl CLI."""
    if _PKI:
        return _PKI
    d = tempfile.mkdtemp(prefix="gwtest-pki-")
    atexit.register(shutil.rmtree, d, True)

    def run(*args):
        subprocess.run(["openssl"] + list(args), cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=gatherd test CA")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:backend.test\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=backend.test")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "san.ext")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=gatherd-client")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "client.pem", "-days", "2")
    _PKI.update({k: os.path.join(d, k) for k in ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"]})
    return _PKI


class TlsBackend:
    """An HTTPS/1.1 keep-alive backend in a thread. Each answer is JSON: the
    SNI it saw, the client certificate's CN, whether the TLS session was
    resumed, and the path."""

    def __init__(self, require_client_cert=False, max_tls12=False):
        import ssl
        import threading
        p = pki()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if max_tls12:
            self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(p["server.pem"], p["server.key"])
        if require_client_cert:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(p["ca.pem"])
        self.local = threading.local()  # the handshake runs in the serving thread
        self.ctx.sni_callback = lambda sslobj, name, ctx: setattr(self.local, "sni", name)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = "https://127.0.0.1:%d" % self.port
        self.handshakes = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        import threading
        while not self.stopping:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        import ssl
        self.local.sni = None
        raw.settimeout(10)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        if not hasattr(self.local, "sni"):
            self.local.sni = None
        cert = conn.getpeercert()
        cn = None
        if cert:
            cn = dict(x[0] for x in cert.get("subject", ()))["commonName"]
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = conn.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                path = head.split(b" ")[1].decode()
                body = json.dumps({"path": path, "sni": getattr(self.local, "sni", None), "client_cn": cn,
                                   "resumed": conn.session_reused}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopping = True
        self.sock.close()


def tls_daemon(tb, tls=None, **opts):
    b = backend(tb.url, **opts)
    if tls is not None:
        b["tls"] = tls
    return Daemon(config({"b": b}), workers=1)


@test
def proxy_tls_verified_with_ca_file():
    tb = TlsBackend()
    try:
        d = tls_daemon(tb, {"ca_file": pki()["ca.pem"]})
        with d.connect() as c:
            r = c.request(get("/legacy/hello"))
            eq(r.status, 200, "status over TLS")
            eq(r.json()["path"], "/hello", "path seen by the TLS backend")
            eq(r.json()["sni"], None, "no SNI for an IP address")
        eq(d.stop(), 0, "exit code")
    finally:
        tb.stop()


@test
def proxy_tls_fails_without_the_ca():
    tb = TlsBackend()
    try:
        d = tls_daemon(tb)  # the system store does not know the test CA
        with d.connect() as c:
            r = c.request(get("/legacy/hello"))
            eq(r.status, 502, "status")
            eq(r.json()["error"]["code"], "upstream_tls_failed", "error code")
        check(d.wait_log("certificate verify failed"), "log")
        eq(d.stop(), 0, "exit code")
    finally:
        tb.stop()


@test
def proxy_tls_server_name_sni_and_name_check():
    tb = TlsBackend()
    try:
        d = tls_daemon(tb, {"ca_file": pki()["ca.pem"], "server_name": "backend.test"})
        with d.connect() as c:
            r = c.request(get("/legacy/x"))
            eq(r.status, 200, "status with the right server_name")
            eq(r.json()["sni"], "backend.test", "SNI sent")
        d.stop()
        d = tls_daemon(tb, {"ca_file": pki()["ca.pem"], "server_name": "wrong.test"})
        with d.connect() as c:
            r = c.request(get("/legacy/x"))
            eq((r.status, r.json()["error"]["code"]), (502, "upstream_tls_failed"), "wrong server_name")
        check(d.wait_log("certificate verify failed"), "log")
        eq(d.stop(), 0, "exit code")
    finally:
        tb.stop()


@test
def proxy_tls_verify_false_is_an_explicit_logged_opt_out():
    tb = TlsBackend()
    try:
        d = tls_daemon(tb, {"verify": False})
        with d.connect() as c:
            eq(c.request(get("/legacy/x")).status, 200, "status without verification")
        check(d.wait_log("TLS certificate verification is OFF"), "start-up warning")
        eq(d.stop(), 0, "exit code")
    finally:
        tb.stop()


@test
def proxy_tls_client_certificate():
    tb = TlsBackend(require_client_cert=True)
    try:
        p = pki()
        d = tls_daemon(tb, {"ca_file": p["ca.pem"]})
        with d.connect() as c:
            eq(c.request(get("/legacy/x")).status, 502, "status without a client certificate")
        d.stop()
        d = tls_daemon(tb, {"ca_file": p["ca.pem"], "cert_file": p["client.pem"], "key_file": p["client.key"]})
        with d.connect() as c:
            r = c.request(get("/legacy/x"))
            eq(r.status, 200, "status with a client certificate")
            eq(r.json()["client_cn"], "gatherd-client", "client certificate seen by the backend")
        eq(d.stop(), 0, "exit code")
    finally:
        tb.stop()


@test
def proxy_tls_keepalive_and_session_resumption():
    tb = TlsBackend()
    try:
        d = tls_daemon(tb, {"ca_file": pki()["ca.pem"]})
        with d.connect() as c:
            for i in range(5):
                eq(c.request(get("/legacy/k%d" % i)).status, 200, "status")
        eq(tb.handshakes, 1, "TLS handshakes for 5 requests on a pooled connection")
        d.stop()
    finally:
        tb.stop()
    # No pooling: every request needs a new connection, which resumes the
    # session. A TLS 1.2 backend: this Python test server does not resume
    # TLS 1.3 sessions even for `openssl s_client -reconnect`.
    tb = TlsBackend(max_tls12=True)
    try:
        d = tls_daemon(tb, {"ca_file": pki()["ca.pem"]}, max_idle=0)
        resumed = []
        with d.connect() as c:
            for i in range(3):
                r = c.request(get("/legacy/r%d" % i))
                eq(r.status, 200, "status")
                resumed.append(r.json()["resumed"])
        eq(resumed[0], False, "first handshake is a full one")
        check(any(resumed[1:]), "a later connection resumed the TLS session: %r" % resumed)
        eq(d.stop(), 0, "exit code")
    finally:
        tb.stop()



# ------------------------------------------------------------------ streamed request bodies

class SinkBackend:
    """An HTTP/1.1 backend in a thread that reads request bodies as a stream
    (Content-Length or chunked) without keeping them, and answers
    {"received": N, "chunked": bool, "sha": hex}. wait_s: seconds it waits
    before reading a body (backpressure); early: it answers 401 right after
    the head, without reading the body, and closes."""

    def __init__(self, wait_s=0.0, early=False):
        import threading
        self.wait_s = wait_s
        self.early = early
        self.requests = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.stopping = False
        _resources.append(self)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        import hashlib
        conn.settimeout(60)
        buf = b""

        def fill():
            nonlocal buf
            d = conn.recv(1 << 20)
            if not d:
                raise EOFError
            buf += d

        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    fill()
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests += 1
                lines = head.decode("latin-1").split("\r\n")
                hdrs = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    hdrs[k.strip().lower()] = v.strip()
                if self.early:
                    body = b'{"error":"no"}'
                    conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                    time.sleep(0.5)
                    return
                if self.wait_s:
                    time.sleep(self.wait_s)
                h = hashlib.sha256()
                n = 0
                chunked = hdrs.get("transfer-encoding", "").lower() == "chunked"
                if chunked:
                    while True:
                        while b"\r\n" not in buf:
                            fill()
                        line, buf = buf.split(b"\r\n", 1)
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                                fill()
                            buf = buf[2:] if buf.startswith(b"\r\n") else buf.split(b"\r\n\r\n", 1)[1]
                            break
                        while len(buf) < size + 2:
                            fill()
                        h.update(buf[:size])
                        n += size
                        buf = buf[size + 2:]
                else:
                    left = int(hdrs.get("content-length", "0"))
                    while left > 0:
                        if not buf:
                            fill()
                        take = buf[:left]
                        h.update(take)
                        n += len(take)
                        left -= len(take)
                        buf = buf[len(take):]
                body = json.dumps({"received": n, "chunked": chunked, "sha": h.hexdigest()}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            conn.close()

    def close(self):
        self.stopping = True
        self.sock.close()


def upload_routes(limit=None):
    p = {"backend": "b", "strip_prefix": "/up"}
    if limit is not None:
        p["max_body_bytes"] = limit
    return [{"path": "/up/*", "proxy": p}]


def send_all_bounded(c, data, seconds):
    """Sends data on a blocking client socket within a deadline; returns the bytes sent."""
    c.sock.settimeout(seconds)
    sent = 0
    try:
        while sent < len(data):
            sent += c.sock.send(data[sent:sent + (1 << 20)])
    except socket.timeout:
        pass
    return sent


@ptest
def proxy_upload_streams_with_bounded_memory():
    """A 64 MiB upload (Content-Length) and an 8 MiB chunked one through a
    route without a body limit: the backend gets every byte, gatherd's
    memory does not grow with the body."""
    import hashlib
    sink = SinkBackend()
    d = memory_daemon(sink, routes=upload_routes(0), timeout_ms=ms(120000))
    time.sleep(0.2)
    base = rss_kb(d.pid)
    n = 64 << 20
    block = bytes(range(256)) * 4096  # 1 MiB
    with Client(d, timeout=60) as c:
        c.send(b"PUT /up/file HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % n)
        for _ in range(n // len(block)):
            c.send(block)
        r = c.read_response()
        eq(r.status, 200, f"status ({r.raw[:300]!r})")
        j = r.json()
        eq(j["received"], n, "bytes at the backend")
        want = hashlib.sha256()
        for _ in range(n // len(block)):
            want.update(block)
        eq(j["sha"], want.hexdigest(), "body digest at the backend")
        eq(j["chunked"], False, "sent with Content-Length")
        # chunked, with odd chunk sizes
        c.send(b"POST /up/chunks HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        total = 0
        want = hashlib.sha256()
        for i in range(64):
            piece = block[: 131072 + i * 7]
            c.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
            want.update(piece)
            total += len(piece)
        c.send(b"0\r\n\r\n")
        r = c.read_response()
        eq(r.status, 200, f"chunked status ({r.raw[:300]!r})")
        j = r.json()
        eq((j["received"], j["chunked"], j["sha"]), (total, True, want.hexdigest()), "chunked upload at the backend")
    growth = rss_kb(d.pid, "VmHWM") - base
    limit = 16 * 1024 * (4 if gwtest._is_sanitized(gwtest.GATHERD) else 1)
    check(growth < limit, f"gatherd VmHWM grew {growth} kB for a 64 MiB upload (limit {limit} kB)")
    print(f"# upload memory: start {base} kB, VmHWM growth {growth} kB")


@ptest
def proxy_upload_backpressure_from_a_slow_backend():
    """A backend that reads nothing for 2 s: gatherd stops reading the
    client (the client's send blocks) instead of buffering the body."""
    sink = SinkBackend(wait_s=2.0)
    d = memory_daemon(sink, routes=upload_routes(0), timeout_ms=ms(60000))
    time.sleep(0.2)
    base = rss_kb(d.pid)
    n = 48 << 20
    data = b"z" * n
    with Client(d, timeout=60) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        c.send(b"POST /up/slow HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % n)
        sent = send_all_bounded(c, data, 1.0)
        check(sent < 16 << 20, f"the client could push {sent} bytes while the backend read nothing")
        grown = rss_kb(d.pid) - base
        check(grown < 8 * 1024 * (4 if gwtest._is_sanitized(gwtest.GATHERD) else 1),
              f"gatherd grew {grown} kB while holding back the body")
        sent += send_all_bounded(c, data[sent:], 60)
        eq(sent, n, "the whole body went out once the backend read")
        r = c.read_response()
        eq(r.status, 200, f"status ({r.raw[:300]!r})")
        eq(r.json()["received"], n, "bytes at the backend")
    print(f"# held back: {sent} bytes in all, RSS growth while paused {grown} kB")


@ptest
def proxy_upload_limits_and_expect_continue():
    s = Stub()
    d = proxy_daemon(s, routes=upload_routes(1000) + [{"path": "/dflt/*", "proxy": {"backend": "b"}}],
                     http={"max_body_bytes": 2000})
    before = s.stats()["requests"]
    with Client(d) as c:
        # a declared length over the route's limit: 413 before any backend contact, no 100 Continue
        r = c.request(b"POST /up/x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n")
        eq(r.status, 413, f"status ({r.raw[:200]!r})")
        eq(r.json()["error"]["code"], "body_too_large", "error code")
    eq(s.stats()["requests"], before, "backend requests for a rejected body")
    with Client(d) as c:
        # within the limit with Expect: 100 Continue, then the answer
        c.send(b"POST /up/x?echo=1 HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        r = c.read_response()
        eq(r.status, 100, "interim status")
        c.send(b"hello")
        r = c.read_response()
        eq(r.status, 200, f"status ({r.raw[:200]!r})")
        eq(r.json()["body"], "hello", "body at the backend")
        # the route without its own limit uses http.max_body_bytes
        r = c.request(b"POST /dflt/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2001\r\n\r\n")
        eq(r.status, 413, "status over http.max_body_bytes")
    with Client(d) as c:
        # a chunked body that grows past the limit while it streams
        c.send(b"POST /up/y HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        c.send(b"200\r\n" + b"a" * 512 + b"\r\n")
        c.send(b"200\r\n" + b"a" * 512 + b"\r\n")
        try:
            r = c.read_response()
            eq(r.status, 413, f"status of a chunked body over the limit ({r.raw[:200]!r})")
        except ConnectionClosed:
            pass  # the backend may have answered first: then the connection is closed
        c.read_raw_until_close(5)  # TestFailure when the connection stays open
    with Client(d) as c:
        r, j = echo(c, "/up/after")
        eq(j["path"], "/after", "gatherd still serves")


@ptest
def proxy_backend_answers_before_the_body_ends():
    """A backend that answers 401 after the head without reading the body:
    the client gets the 401 and, since the rest of its body was never read,
    Connection: close."""
    sink = SinkBackend(early=True)
    d = proxy_daemon(sink, routes=upload_routes(0))
    with Client(d) as c:
        n = 8 << 20
        c.send(b"PUT /up/x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % n)
        send_all_bounded(c, b"q" * n, 3)
        r = c.read_response()
        eq(r.status, 401, f"status ({r.raw[:200]!r})")
        eq((r.header("Connection") or "").lower(), "close", "Connection header")
    with Client(d) as c:
        eq(c.request(get("/up/again")).status, 401, "gatherd still serves")


if __name__ == "__main__":
    if not os.access(GW_STUB, os.X_OK):
        print(f"# warning: GW_STUB={GW_STUB} is not executable; build it with make tests/stub/gw_stub")
    sys.exit(main())
