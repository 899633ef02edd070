#!/usr/bin/env python3
"""Integration tests of gatherd as a service: sd_notify over $NOTIFY_SOCKET (a
Python AF_UNIX datagram socket plays systemd), deploy/systemd/gatherd.service
(systemd-analyze verify), and deploy/nginx/gatherd.conf run by a real nginx
in front of two gatherd instances on loopback, under wrk load while one of
them stops.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_nginx.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed"; the exit code is 1 when
anything failed.
"""

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import GATHERD, SLOW, Conn, Daemon, Skip, TestFailure, check, contains, eq, main, req  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ntest = tp.ptest
ms = tp.ms
Stub = tp.Stub

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.environ.get("GW_SRCDIR") or os.path.normpath(os.path.join(HERE, "..", ".."))
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
WRK = shutil.which("wrk")


def jbody(obj):
    return "body=" + urllib.parse.quote(json.dumps(obj, separators=(",", ":")), safe="")


# --- sd_notify ------------------------------------------------------------------------------

class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, by path or abstract."""

    def __init__(self, abstract=False):
        self.dir = tempfile.mkdtemp(prefix="gwnotify-")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"gwtest-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self.env = os.path.join(self.dir, "notify")
            self.sock.bind(self.env)
        tp._resources.append(self)

    def recv(self, timeout=5.0):
        self.sock.settimeout(timeout * SLOW)
        try:
            return self.sock.recv(4096).decode()
        except socket.timeout:
            raise TestFailure(f"no notification within {timeout}s")

    def nothing(self, wait=0.3):
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(4096).decode()
        except socket.timeout:
            return None

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def notify_daemon(stub, env):
    """gatherd started with NOTIFY_SOCKET=env (only its environment)."""
    cfg = {"routes": [{"path": "/v", "respond": {"body": {"v": 1}}}],
           "shutdown_timeout_ms": ms(2000)}
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = env
    try:
        return Daemon(cfg, workers=2)
    finally:
        if old is None:
            del os.environ["NOTIFY_SOCKET"]
        else:
            os.environ["NOTIFY_SOCKET"] = old


def check_notify_cycle(abstract):
    ns = NotifySocket(abstract=abstract)
    d = notify_daemon(None, ns.env)
    # READY only once the listeners accept: Daemon.start() returned after a
    # connect succeeded, and the datagram must already be there or follow.
    eq(ns.recv(), f"READY=1\nMAINPID={d.pid}", "start-up notification")
    with Conn("127.0.0.1", d.port) as c:
        eq(c.request(req("GET", "/v")).status, 200, "serving after READY")
    # a reload that succeeds: RELOADING with a CLOCK_MONOTONIC stamp, then READY
    before = time.monotonic_ns() // 1000
    d.send_signal(signal.SIGHUP)
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", ns.recv())
    check(m is not None, "RELOADING=1 with MONOTONIC_USEC")
    after = time.monotonic_ns() // 1000
    check(before <= int(m.group(1)) <= after, f"MONOTONIC_USEC {m.group(1)} within [{before}, {after}]")
    eq(ns.recv(), "READY=1", "after a reload")
    check(d.wait_log("reloaded"), "the reload was applied")
    # a reload that fails: READY all the same (the old configuration runs on)
    good = open(d.conf_path).read()
    d.write_config('{"listen": ["127.0.0.1:%d"], "nonsense": 1}' % d.port)
    d.send_signal(signal.SIGHUP)
    check(ns.recv().startswith("RELOADING=1\n"), "RELOADING=1 for a failing reload")
    eq(ns.recv(), "READY=1", "after a failed reload")
    check(d.wait_log("reload failed"), "the failed reload is logged")  # the log writer flushes every 100 ms
    d.write_config(good)
    eq(ns.nothing(), None, "nothing else while running")
    d.send_signal(signal.SIGTERM)
    eq(ns.recv(), "STOPPING=1", "at SIGTERM")
    eq(d.wait(10 * SLOW), 0, "exit status")
    eq(ns.nothing(), None, "nothing after STOPPING")


@ntest
def sd_notify_ready_reloading_stopping_on_a_path_socket():
    check_notify_cycle(abstract=False)


@ntest
def sd_notify_on_an_abstract_socket():
    check_notify_cycle(abstract=True)


@ntest
def sd_notify_malformed_socket_is_a_warning():
    d = notify_daemon(None, "relative/path")
    check(d.wait_log("readiness notifications are off"), "a warning names the problem")
    with Conn("127.0.0.1", d.port) as c:
        eq(c.request(req("GET", "/v")).status, 200, "serving anyway")
    ns = NotifySocket()
    os.unlink(ns.env)  # a socket nobody listens on: sending fails, the daemon runs on
    d2 = notify_daemon(None, ns.env)
    check(d2.wait_log("cannot notify the service manager"), "a failed send is logged")
    with Conn("127.0.0.1", d2.port) as c:
        eq(c.request(req("GET", "/v")).status, 200, "serving anyway")


@ntest
def systemd_unit_verifies():
    unit = os.path.join(SRCDIR, "deploy", "systemd", "gatherd.service")
    text = open(unit).read()
    for want in ("Type=notify", "ExecStart=/usr/sbin/gatherd -c /etc/gatherd/gatherd.json",
                 "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"):
        contains(text, want, "gatherd.service")
    m = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    check(m and int(m.group(1)) * 1000 > 10000, "TimeoutStopSec above the default shutdown_timeout_ms")
    sa = shutil.which("systemd-analyze")
    if sa is None:
        raise Skip("systemd-analyze is not installed; the unit's text was checked only")
    with gwtest.TempDir() as t:
        # verify wants the binaries to exist: point it at the one under test
        p = t.write("gatherd.service", text.replace("/usr/sbin/gatherd", os.path.abspath(GATHERD)))
        r = subprocess.run([sa, "verify", p], capture_output=True, text=True, timeout=30)
        out = (r.stdout + r.stderr).strip()
        if out:
            print("# systemd-analyze verify: " + out.replace("\n", "\n# "))
        eq(r.returncode, 0, f"systemd-analyze verify ({out})")
        check("gatherd.service:" not in out, f"no complaint about the unit ({out})")


# --- nginx in front of two gatherd ------------------------------------------------------------

class Nginx:
    """A real nginx, run by the test with deploy/nginx/gatherd.conf adapted to
    test ports and a prefix in a temp dir."""

    def __init__(self, ports):
        if NGINX is None:
            raise Skip("nginx is not installed (scripts/install-deps.sh installs nginx-light)")
        self.dir = tempfile.mkdtemp(prefix="gwnginx-")
        os.chmod(self.dir, 0o755)
        self.port = gwtest.free_port()
        site = open(os.path.join(SRCDIR, "deploy", "nginx", "gatherd.conf")).read()
        lines = []
        for line in site.splitlines():
            if "# test: server1" in line:
                line = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{ports[0]}", line)
            elif "# test: server2" in line:
                line = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{ports[1]}", line)
            elif "# test: listen" in line:
                line = f"    listen 127.0.0.1:{self.port};"
            lines.append(line)
        site = "\n".join(lines)
        check(site.count(f"127.0.0.1:{ports[0]}") == 1 and site.count(f"127.0.0.1:{ports[1]}") == 1
              and f"listen 127.0.0.1:{self.port};" in site, "gatherd.conf has its '# test:' markers")
        d = self.dir
        user = ""
        if os.geteuid() == 0:  # workers run as the test user, not nobody
            pw = pwd.getpwuid(os.geteuid())
            user = f"user {pw.pw_name};\n"
        conf = (f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n"
                f"error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
                f"http {{\n    access_log {d}/access.log;\n"
                f"    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n"
                f"    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
                f"{site}\n}}\n")
        self.conf = os.path.join(d, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        tp._resources.append(self)
        self.log_path = os.path.join(d, "stderr.log")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([NGINX, "-p", d + "/", "-e", f"{d}/error.log", "-c", self.conf],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, close_fds=True,
                                         preexec_fn=gwtest._die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestFailure(f"nginx exited with {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TestFailure(f"nginx did not listen within 10 s: {self.log()}")

    def log(self):
        out = ""
        for n in ("stderr.log", "error.log"):
            try:
                out += open(os.path.join(self.dir, n), errors="replace").read()
            except OSError:
                pass
        return out

    def close(self):
        # SIGQUIT: nginx's graceful stop; its workers are its children, gone with the master
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                gwtest.kill_and_reap(self.proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)


def gatherd_config(name, stub, extra_routes=(), log=None):
    """Instance `name`: /agg aggregates two calls that name it; /echo shows
    what a call sent to the backend. log: its "log" section."""
    cfg = {
        "trusted_proxies": ["127.0.0.1/32"],
        "shutdown_timeout_ms": ms(3000),
        "backends": {"s": tp.backend(stub.url)},
        "routes": [
            {"path": "/agg", "methods": ["GET"], "deadline_ms": ms(5000),
             "calls": [{"name": "a", "backend": "s", "path": "/a?" + jbody({"i": name})},
                       {"name": "b", "backend": "s", "path": "/b?" + jbody({"i": name})}]},
            {"path": "/echo", "methods": ["GET"],
             "calls": [{"name": "e", "backend": "s", "path": "/e?echo=1", "forward_headers": ["X-Real-IP"]}]},
        ] + list(extra_routes),
    }
    if log:
        cfg["log"] = log
    return cfg


def setup(stub, extra_routes=(), logdir=None):
    """Two gatherd (A, B) behind nginx; with logdir, each writes its access
    log to logdir/access-A.log, logdir/access-B.log."""
    ds = [Daemon(gatherd_config(n, stub, extra_routes,
                                {"access_log": os.path.join(logdir, f"access-{n}.log")} if logdir else None),
                 workers=2) for n in ("A", "B")]
    return ds, Nginx([ds[0].port, ds[1].port])


class From(Conn):
    """A client connection from a chosen loopback source address."""

    def __init__(self, src, port, timeout=5.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout * SLOW)
        self.sock.bind((src, 0))
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout * SLOW
        self.buf = b""
        self.eof = False


def get(port, path, src="127.0.0.1", headers=None):
    with From(src, port) as c:
        return c.request(req("GET", path, headers=headers))


@ntest
def nginx_requests_get_aggregated_answers_from_both_instances():
    stub = Stub(threads=2)
    ds, ngx = setup(stub)
    seen = set()
    for _ in range(8):
        r = get(ngx.port, "/agg")
        eq(r.status, 200, f"status ({r.body[:300]!r})")
        j = r.json()
        eq(j["a"]["i"], j["b"]["i"], "both calls from one instance")
        seen.add(j["a"]["i"])
        check(r.header("X-Request-Id") is not None, "X-Request-Id in the answer")
    eq(seen, {"A", "B"}, "instances that answered")


@ntest
def nginx_passes_the_real_client_address():
    """The client connects from 127.0.0.2; nginx (127.0.0.1, trusted) says so,
    to the backends and in gatherd's access log."""
    with gwtest.TempDir() as t:
        check_real_client(t.path)


def check_real_client(logdir):
    stub = Stub()
    ds, ngx = setup(stub, logdir=logdir)
    for _ in range(2):  # one per instance
        r = get(ngx.port, "/echo", src="127.0.0.2", headers={"X-Request-Id": "client-id-1"})
        eq(r.status, 200, f"status ({r.body[:300]!r})")
        h = r.json()["e"]["headers"]
        # nginx's $proxy_add_x_forwarded_for, then gatherd adds its peer (nginx)
        eq(h.get("x-forwarded-for"), "127.0.0.2, 127.0.0.1", "X-Forwarded-For at the backend")
        eq(h.get("x-real-ip"), "127.0.0.2", "X-Real-IP at the backend")
        eq(h.get("x-request-id"), "client-id-1", "the client's X-Request-Id passes through")
        eq(r.header("X-Request-Id"), "client-id-1", "X-Request-Id in the answer")
    r = get(ngx.port, "/echo", src="127.0.0.2")
    check(re.fullmatch(r"[0-9a-f]{32}", r.json()["e"]["headers"].get("x-request-id", "")),
          "nginx's $request_id without a client id")
    # a spoofed X-Forwarded-For / X-Real-IP from the client: kept to the left of the
    # chain as nginx does, never taken as the client
    r = get(ngx.port, "/echo", src="127.0.0.2", headers={"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6"})
    h = r.json()["e"]["headers"]
    eq(h.get("x-forwarded-for"), "6.6.6.6, 127.0.0.2, 127.0.0.1", "X-Forwarded-For with a client's spoof")
    eq(h.get("x-real-ip"), "127.0.0.2", "X-Real-IP is nginx's, not the client's")
    # gatherd's access log names the real client, never nginx nor the spoof
    lines = []
    deadline = time.monotonic() + 5 * SLOW
    while time.monotonic() < deadline:
        lines = []
        for n in ("A", "B"):
            try:
                lines += [l for l in open(os.path.join(logdir, f"access-{n}.log")) if "GET /echo" in l]
            except OSError:
                pass
        if len(lines) >= 4:
            break
        time.sleep(0.05)
    eq(len(lines), 4, "access lines of the /echo requests")
    for line in lines:
        eq(line.split(" ", 1)[0], "127.0.0.2", f"client address in gatherd's access log ({line.strip()})")


@ntest
def nginx_client_rate_limits_key_on_the_real_client():
    """A per-client limit of 1 per minute on each instance: a client behind
    nginx has its own bucket (not nginx's), and a spoofed X-Forwarded-For
    does not get it a new one."""
    stub = Stub()
    rl = {"path": "/rl", "respond": {"body": {"ok": 1}},
          "rate_limit": {"rate": 1, "period_ms": 60000, "burst": 1, "key": "client"}}
    ds, ngx = setup(stub, extra_routes=[rl])
    codes2 = [get(ngx.port, "/rl", src="127.0.0.2", headers={"X-Forwarded-For": f"6.6.6.{i}"}).status
              for i in range(4)]
    # one nginx worker: round robin alternates A, B, A, B
    eq(codes2, [200, 200, 429, 429], "127.0.0.2, spoofing X-Forwarded-For: one answer per instance")
    codes3 = [get(ngx.port, "/rl", src="127.0.0.3").status for _ in range(2)]
    eq(codes3, [200, 200], "127.0.0.3 has buckets of its own (not nginx's)")


WRK_SCRIPT = r"""
threads = {}
a = 0
b = 0
bad = 0
function setup(thread)
  table.insert(threads, thread)
end
function response(status, headers, body)
  local _, na = body:gsub('"i":"A"', '')
  local _, nb = body:gsub('"i":"B"', '')
  if na == 2 and nb == 0 then a = a + 1
  elseif nb == 2 and na == 0 then b = b + 1
  else bad = bad + 1 end
end
function done(summary, latency, requests)
  local ta, tb, tbad = 0, 0, 0
  for _, t in ipairs(threads) do
    ta = ta + t:get("a")
    tb = tb + t:get("b")
    tbad = tbad + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format("RESULT requests=%d a=%d b=%d bad=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
                         summary.requests, ta, tb, tbad, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@ntest
@gwtest.exclusive
def nginx_sigterm_one_instance_under_wrk_load_loses_nothing():
    """50 connections through nginx for 4 s; SIGTERM to instance A at 1.5 s.
    nginx retries what A refused or closed on B: wrk sees no error and no
    non-2xx; A exits 0 within its shutdown_timeout_ms and B serves on."""
    if WRK is None:
        raise TestFailure("wrk is not installed (scripts/install-deps.sh installs it)")
    stub = Stub(threads=2)
    ds, ngx = setup(stub)
    a = ds[0]
    state = {"sent": None}

    def during(elapsed):
        if elapsed >= 1.5 and state["sent"] is None:
            state["sent"] = time.monotonic()
            a.send_signal(signal.SIGTERM)

    res = gwtest.run_wrk(f"http://127.0.0.1:{ngx.port}/agg", 4, 50, WRK_SCRIPT, during, threads=2)
    eq(a.wait(10), 0, "instance A's exit status after SIGTERM")
    contains(a.log(), "stopped", "instance A's log")
    for k in ("connect", "read", "write", "status", "timeout", "bad"):
        eq(res[k], 0, f"wrk {k} errors")
    check(res["requests"] > 500, f"wrk made requests ({res['requests']})")
    check(res["a"] > 0 and res["b"] > 0, f"both instances answered before the stop ({res['a']}, {res['b']})")
    for _ in range(4):
        r = get(ngx.port, "/agg")
        eq(r.status, 200, "through nginx after the stop")
        eq(r.json()["a"]["i"], "B", "instance B answers")
    check("no live upstreams" not in ngx.log(), "nginx always had an upstream")


if __name__ == "__main__":
    sys.exit(main())
