#!/usr/bin/env python3
"""Integration tests of configuration reload (SIGHUP, gatherd -s) and of the
graceful stop under load: the real daemon, the stub backend and real wrk,
all on loopback.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_reload.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed"; the exit code is 1 when
anything failed.
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
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import GATHERD, SLOW, Conn, ConnectionClosed, Daemon, TestFailure, check, contains, eq, main, req  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms
rtest = tp.ptest
Stub = tp.Stub

WRK = shutil.which("wrk")


def jbody(obj):
    return "body=" + urllib.parse.quote(json.dumps(obj, separators=(",", ":")), safe="")


def config(port, version, stub, extra_listen=(), backend_opts=None, delay_ms=0):
    """Version `version` of a configuration: a respond route /v, an aggregate
    route /agg whose two calls both carry the version, on one stub backend."""
    b = tp.backend(stub.url, **(backend_opts or {}))
    q = f"&delay={delay_ms}" if delay_ms else ""
    return {
        "listen": [f"127.0.0.1:{port}"] + list(extra_listen),
        "backends": {"s": b},
        "routes": [
            {"path": "/v", "respond": {"body": {"v": version}}},
            {"path": "/agg", "methods": ["GET"], "deadline_ms": ms(5000),
             "calls": [{"name": "a", "backend": "s", "path": "/a?" + jbody({"v": version}) + q},
                       {"name": "b", "backend": "s", "path": "/b?" + jbody({"v": version}) + q}]},
        ],
    }


def get(d, path, port=None):
    with Conn("127.0.0.1", port or d.port) as c:
        return c.request(req("GET", path))


def start(stub, version="A", workers=2, **kw):
    d = Daemon({"listen": ["127.0.0.1:PORT"]}, workers=workers, start=False)
    d.start()
    d.reload(config(d.port, version, stub, **kw))
    return d


# --- reload ------------------------------------------------------------------------------

@rtest
def reload_applies_to_new_requests_and_idle_connections():
    stub = Stub()
    d = start(stub, "A")
    eq(get(d, "/v").json(), {"v": "A"}, "before")
    with Conn("127.0.0.1", d.port) as idle:
        eq(idle.request(req("GET", "/v")).json(), {"v": "A"}, "keep-alive, before")
        d.reload(config(d.port, "B", stub))
        eq(get(d, "/v").json(), {"v": "B"}, "new connection, after")
        r = idle.request(req("GET", "/agg"))
        eq(r.status, 200, "keep-alive connection, after")
        eq(r.json(), {"a": {"v": "B"}, "b": {"v": "B"}}, "keep-alive connection, after")


@rtest
def reload_invalid_configuration_keeps_the_running_one():
    stub = Stub()
    d = start(stub, "A")
    d.reload('{"listen": ["127.0.0.1:%d"], "routes": [ {"path": "/v", }' % d.port, expect="reload failed")
    check(d.wait_log("still running the previous configuration"), "log")
    check(re.search(r"gatherd\.json:1", d.log()), "the error names the file and line")
    eq(get(d, "/v").json(), {"v": "A"}, "after a syntax error")
    bad = config(d.port, "B", stub)
    bad["routes"][1]["calls"][0]["backend"] = "nope"
    d.reload(bad, expect="reload failed")
    check(d.wait_log('unknown backend "nope"'), "log")
    eq(get(d, "/agg").json(), {"a": {"v": "A"}, "b": {"v": "A"}}, "after an invalid backend")
    d.reload(config(d.port, "C", stub))
    eq(get(d, "/v").json(), {"v": "C"}, "a valid one after the invalid ones")


@rtest
def reload_lets_requests_in_flight_finish_on_their_configuration():
    stub = Stub()
    d = start(stub, "A", delay_ms=ms(600))
    with Conn("127.0.0.1", d.port, timeout=10) as c:
        c.send(req("GET", "/agg"))
        time.sleep(0.15 * SLOW)
        d.reload(config(d.port, "B", stub, delay_ms=ms(600)))
        t0 = time.monotonic()
        eq(get(d, "/v").json(), {"v": "B"}, "a new request meanwhile")
        check(time.monotonic() - t0 < 0.4 * SLOW, "a new request does not wait for the old one")
        r = c.read_response()
        eq(r.status, 200, "in flight")
        eq(r.json(), {"a": {"v": "A"}, "b": {"v": "A"}}, "the request in flight saw one configuration")
        r = c.request(req("GET", "/agg"))
        eq(r.json(), {"a": {"v": "B"}, "b": {"v": "B"}}, "the same connection's next request")


@rtest
def reload_keeps_the_pools_of_unchanged_backends():
    stub = Stub()
    d = start(stub, "A", workers=1)
    eq(get(d, "/agg").status, 200, "warm-up")
    s0 = stub.stats()
    d.reload(config(d.port, "B", stub))
    eq(get(d, "/agg").json(), {"a": {"v": "B"}, "b": {"v": "B"}}, "after reload")
    s1 = stub.stats()
    # + 1: the /stats request's own connection
    eq(s1["connections"], s0["connections"] + 1, "connections opened to an unchanged backend (pooled ones reused)")
    # A changed connection setting: a new pool; the old one's idle connections close.
    d.reload(config(d.port, "C", stub, backend_opts={"connect_timeout_ms": ms(1500)}))
    eq(get(d, "/agg").json(), {"a": {"v": "C"}, "b": {"v": "C"}}, "after the backend changed")
    s2 = stub.stats()
    check(s2["connections"] > s1["connections"], f"a changed backend gets new connections ({s1} -> {s2})")
    stub.wait_stats(lambda s: s["open_connections"] <= s2["connections"] - s1["connections"] - 1, 3,
                    "the old pool's idle connections closed")


@rtest
def reload_opens_and_closes_listen_addresses():
    stub = Stub()
    d = start(stub, "A")
    p2 = gwtest.free_port()
    d.reload(config(d.port, "B", stub, extra_listen=[f"127.0.0.1:{p2}"]))
    eq(get(d, "/v", port=p2).json(), {"v": "B"}, "added address")
    eq(get(d, "/v").json(), {"v": "B"}, "kept address")
    cfg = config(p2, "C", stub)
    d.reload(cfg)
    eq(get(d, "/v", port=p2).json(), {"v": "C"}, "kept address")
    deadline = time.monotonic() + 3 * SLOW
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", d.port), timeout=1)
            s.close()
        except ConnectionRefusedError:
            break
        if time.monotonic() > deadline:
            raise TestFailure("the removed address still accepts connections")
        time.sleep(0.02)


@rtest
def reload_with_an_address_in_use_is_rejected():
    stub = Stub()
    d = start(stub, "A")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        p2 = busy.getsockname()[1]
        d.reload(config(d.port, "B", stub, extra_listen=[f"127.0.0.1:{p2}"]), expect="reload failed")
        check(d.wait_log(f"127.0.0.1:{p2}"), "the error names the address")
        eq(get(d, "/v").json(), {"v": "A"}, "the running configuration stays")
    finally:
        busy.close()


@rtest
def signal_option_and_pid_file():
    stub = Stub()
    tmp = tempfile.mkdtemp(prefix="gwpid-")
    try:
        pid_path = os.path.join(tmp, "gatherd.pid")
        d = Daemon({"listen": ["127.0.0.1:PORT"]}, workers=1, args=["--pid", pid_path], start=False)
        d.start()
        # The listeners take connections (d.start() returns) before the pid
        # file is written: wait for it (slow under ThreadSanitizer).
        deadline = time.monotonic() + 5 * SLOW
        while not os.path.exists(pid_path):
            check(time.monotonic() < deadline and d.running(), f"no pid file; log:\n{d.log()[-1500:]}")
            time.sleep(0.01)
        with open(pid_path) as f:
            eq(f.read().strip(), str(d.pid), "pid file")
        d.write_config(config(d.port, "B", stub))
        r = subprocess.run([GATHERD, "-s", "reload", "--pid", pid_path], capture_output=True, text=True, timeout=10)
        eq(r.returncode, 0, f"-s reload ({r.stderr})")
        check(d.wait_log("reloaded"), "-s reload was applied")
        eq(get(d, "/v").json(), {"v": "B"}, "after -s reload")
        # pid_file from the configuration, found with -c
        cfg = config(d.port, "C", stub)
        cfg["pid_file"] = pid_path
        d.write_config(cfg)
        r = subprocess.run([GATHERD, "-s", "reload", "-c", d.conf_path], capture_output=True, text=True, timeout=10)
        eq(r.returncode, 0, f"-s reload -c ({r.stderr})")
        deadline = time.monotonic() + 5 * SLOW
        while get(d, "/v").json() != {"v": "C"}:
            check(time.monotonic() < deadline, "-s reload -c took effect")
            time.sleep(0.02)
        r = subprocess.run([GATHERD, "-s", "bogus", "--pid", pid_path], capture_output=True, text=True, timeout=10)
        eq(r.returncode, 1, "-s bogus")
        contains(r.stderr, "reload, stop or quit", "-s bogus message")
        d.sent_signal = signal.SIGTERM  # what -s stop sends: the exit is expected
        r = subprocess.run([GATHERD, "-s", "stop", "--pid", pid_path], capture_output=True, text=True, timeout=10)
        eq(r.returncode, 0, f"-s stop ({r.stderr})")
        d.wait(10)
        eq(d.exit_code, 0, "exit status after -s stop")
        check(not os.path.exists(pid_path), "the pid file is removed at exit")
        r = subprocess.run([GATHERD, "-s", "reload", "--pid", pid_path], capture_output=True, text=True, timeout=10)
        eq(r.returncode, 1, "-s reload without a daemon")
        contains(r.stderr, "cannot read the pid file", "message without a daemon")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@rtest
def reload_warns_when_workers_change():
    """The number of worker threads is fixed at start: a reload that asks for
    another says so in the log and keeps running with the old number."""
    stub = Stub()
    tmp = tempfile.mkdtemp(prefix="gwwk-")
    proc = None
    try:
        port = gwtest.free_port()
        path = os.path.join(tmp, "gatherd.json")
        cfg = config(port, "A", stub)
        cfg["workers"] = 1
        cfg["admin"] = {"listen": []}  # not the default port, which another test may hold
        with open(path, "w") as f:
            json.dump(cfg, f)
        log = open(os.path.join(tmp, "stderr.log"), "wb")
        proc = subprocess.Popen([GATHERD, "-c", path], stdout=subprocess.DEVNULL, stderr=log,
                                preexec_fn=gwtest._die_with_parent)
        deadline = time.monotonic() + 5 * SLOW
        while True:
            try:
                eq(get(None, "/v", port=port).json(), {"v": "A"}, "before")
                break
            except OSError:
                check(time.monotonic() < deadline, "gatherd answers")
                time.sleep(0.02)
        cfg = config(port, "B", stub)
        cfg["workers"] = 2
        cfg["admin"] = {"listen": []}
        with open(path + ".tmp", "w") as f:
            json.dump(cfg, f)
        os.rename(path + ".tmp", path)
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5 * SLOW
        text = ""
        while "reloaded" not in text:
            check(time.monotonic() < deadline, "reloaded")
            time.sleep(0.02)
            with open(os.path.join(tmp, "stderr.log")) as f:
                text = f.read()
        contains(text, '"workers" asks for 2 threads; 1 keep running until a restart', "log")
        eq(get(None, "/v", port=port).json(), {"v": "B"}, "after")
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
            eq(proc.returncode, 0, "exit status")
        shutil.rmtree(tmp, ignore_errors=True)


# --- a reload switches every worker or none --------------------------------------------------

def config_named(port, version, stub, resolver):
    """config() whose /agg call "a" goes to a backend named by host name
    (localhost, from the hosts file): the reload that brings it sets up the
    workers' resolvers."""
    cfg = config(port, version, stub)
    cfg["backends"]["n"] = tp.backend(f"http://localhost:{stub.port}")
    cfg["routes"][1]["calls"][0]["backend"] = "n"
    cfg["resolver"] = resolver
    return cfg


def versions_on_every_worker(d, conns=20, rounds=5):
    """The versions /agg answers on new connections, until both workers
    answered: each connection then sends a malformed request, whose 400 is
    logged by the worker that owns the connection (SO_REUSEPORT spreads
    them; those lines are rate-limited, so a round that shows one worker
    only is followed by another a second later)."""
    seen, workers = set(), set()
    for _ in range(rounds):
        before = len(d.log())
        for _ in range(conns):
            with Conn("127.0.0.1", d.port) as c:
                r = c.request(req("GET", "/agg"))
                eq(r.status, 200, f"/agg: {r.raw[:300]!r}")
                j = r.json()
                seen.add((j["a"]["v"], j["b"]["v"]))
                c.send(b"BAD\r\n\r\n")
                eq(c.read_response().status, 400, "the malformed request")
        time.sleep(0.25)  # the log writer flushes every 100 ms
        workers |= set(re.findall(r"\] (w\d+): client 127\.0\.0\.1:\d+: 400 ", d.log()[before:]))
        if len(workers) == 2:
            return seen
        time.sleep(1)  # a new second of the rate limit
    raise TestFailure(f"the requests reached workers {workers} only")


def reloads_failed(d):
    with Conn("127.0.0.1", d.admin_port) as c:
        return c.request(req("GET", "/status")).json()["reloads"]["failed"]


@rtest
def reload_with_a_resolver_no_worker_can_set_up_fails_as_a_whole():
    """No worker can open the sockets of the new resolver's nameservers
    (EMFILE): the reload fails, with the reason, on every worker; none
    switches; the failure is counted. With the limit back, the same file
    loads on every worker."""
    stub = Stub()
    d = start(stub, "A")
    resolver = {"nameservers": ["127.0.0.1:9", "127.0.0.2:9", "127.0.0.3:9"]}
    eq(versions_on_every_worker(d), {("A", "A")}, "before")
    time.sleep(0.2)  # the clients' connections are closed on the daemon's side
    import resource
    soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
    used = {int(f) for f in os.listdir(f"/proc/{d.pid}/fd")}
    free = [n for n in range(max(used) + 3) if n not in used]
    # one free descriptor (for reading the file); three nameservers need three
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (free[1], hard))
    try:
        d.reload(config_named(d.port, "B", stub, resolver), expect="reload failed")
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
    check(d.wait_log("Too many open files"), f"the reason is logged:\n{d.log()[-1500:]}")
    m = re.search(r"reload failed, still running the previous configuration: worker \d: resolver: cannot use "
                  r"nameserver 127\.0\.0\.\d: Too many open files", d.log())
    check(m, f"the reason names the worker and the nameserver:\n{d.log()[-1500:]}")
    eq(reloads_failed(d), 1, "reloads failed (/status)")
    eq(versions_on_every_worker(d), {("A", "A")}, "after the failed reload, on every worker")
    d.reload(config_named(d.port, "B", stub, resolver))
    eq(versions_on_every_worker(d), {("B", "B")}, "after the reload with the limit back, on every worker")
    eq(reloads_failed(d), 1, "reloads failed")


@rtest
def reload_with_an_unreadable_hosts_file_fails_as_a_whole():
    """The hosts file is read once, on the main thread; one that cannot be
    read (a directory passes the configuration's check) fails the reload,
    and every worker keeps the running configuration."""
    stub = Stub()
    d = start(stub, "A")
    hosts_dir = tempfile.mkdtemp(prefix="gwhosts-")
    try:
        resolver = {"nameservers": ["127.0.0.1:9"], "hosts_file": hosts_dir}
        d.reload(config_named(d.port, "B", stub, resolver), expect="reload failed")
        check(d.wait_log(f"resolver: cannot read the hosts file {hosts_dir}: Is a directory"),
              f"the reason:\n{d.log()[-1500:]}")
        eq(versions_on_every_worker(d), {("A", "A")}, "after the failed reload, on every worker")
        eq(reloads_failed(d), 1, "reloads failed (/status)")
        resolver["hosts_file"] = True
        d.reload(config_named(d.port, "B", stub, resolver))
        eq(versions_on_every_worker(d), {("B", "B")}, "after a good one, on every worker")
    finally:
        shutil.rmtree(hosts_dir, ignore_errors=True)


# --- under load ------------------------------------------------------------------------------

WRK_SCRIPT = r"""
threads = {}
mixed = 0
bad = 0
function setup(thread)
  table.insert(threads, thread)
end
function response(status, headers, body)
  local _, a = body:gsub('"v":"A"', '')
  local _, b = body:gsub('"v":"B"', '')
  if a > 0 and b > 0 then
    mixed = mixed + 1
  elseif a + b ~= 2 then
    bad = bad + 1
  end
end
function done(summary, latency, requests)
  local m, b = 0, 0
  for _, t in ipairs(threads) do
    m = m + t:get("mixed")
    b = b + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format("RESULT requests=%d mixed=%d bad=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
                         summary.requests, m, b, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@rtest
@gwtest.exclusive
def reload_every_second_under_wrk_load_loses_nothing():
    """200 connections for 8 s, a reload every half second between two
    configurations: no failed request, no non-2xx answer, and no answer mixing
    the two configurations."""
    stub = Stub(threads=2)
    d = start(stub, "A", workers=2)
    seconds = 8
    state = {"next": 0.5, "n": 0}

    def during(elapsed):
        if elapsed >= state["next"] and elapsed < seconds - 0.5:
            state["n"] += 1
            d.write_config(config(d.port, "B" if state["n"] % 2 else "A", stub))
            d.send_signal(signal.SIGHUP)
            state["next"] += 0.5

    res = gwtest.run_wrk(f"http://127.0.0.1:{d.port}/agg", seconds, 200, WRK_SCRIPT, during, threads=2)
    eq(res["mixed"], 0, "answers mixing two configurations")
    eq(res["bad"], 0, "answers without the two calls")
    for k in ("connect", "read", "write", "status", "timeout"):
        eq(res[k], 0, f"wrk {k} errors")
    check(res["requests"] > 1000, f"wrk made requests ({res['requests']})")
    n = d.log().count("reloaded")
    check(n >= state["n"], f"every reload was applied ({n} of {state['n']} + 1)")
    check("reload failed" not in d.log(), "no reload failed")
    eq(get(d, "/v").status, 200, "still serving")


@rtest
@gwtest.exclusive
def graceful_stop_under_wrk_load():
    """SIGTERM while wrk runs: every accepted request is answered in full (no
    read error, timeout or non-2xx in wrk: a connection closed or reset with a
    request unanswered is a read error); the daemon exits within
    shutdown_timeout_ms. Once it is gone wrk's reconnects are refused, which
    wrk counts as write errors: those requests were never accepted."""
    stub = Stub(threads=2)
    d = Daemon({"listen": ["127.0.0.1:PORT"]}, workers=2, start=False)
    d.start()
    cfg = config(d.port, "A", stub, delay_ms=ms(20))
    cfg["shutdown_timeout_ms"] = ms(3000)
    d.reload(cfg)
    state = {"sent": None, "exited": None, "before": None}

    def during(elapsed):
        if elapsed >= 1.0 and state["sent"] is None:
            state["sent"] = time.monotonic()
            d.send_signal(signal.SIGTERM)
        if state["sent"] and state["exited"] is None and d.proc.poll() is not None:
            state["exited"] = time.monotonic()

    res = gwtest.run_wrk(f"http://127.0.0.1:{d.port}/agg", 3, 200, WRK_SCRIPT, during, threads=2)
    d.wait(10)
    eq(d.exit_code, 0, "exit status")
    contains(d.log(), "stopped", "log")
    check(state["exited"] is not None, "gatherd exited while wrk ran")
    took = state["exited"] - state["sent"]
    print(f"# exited {took * 1000:.0f} ms after SIGTERM")
    check(took < 3.0 + 1.0 * SLOW, f"exit within shutdown_timeout_ms (3000 ms; took {took * 1000:.0f} ms)")
    for k in ("read", "status", "timeout", "mixed", "bad"):
        eq(res[k], 0, f"wrk {k} errors")
    # the load was real: more answers than a request per connection would give
    # (a loaded TSan run made exactly 200 in the second before the stop)
    check(res["requests"] >= 200, f"wrk made requests ({res['requests']})")


CLOSE_SCRIPT = r"""
wrk.headers["Connection"] = "close"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
                         summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@rtest
@gwtest.exclusive
def graceful_stop_never_resets_a_connection_it_completed():
    """SIGTERM while wrk opens a new connection for every request (hundreds
    of handshakes in flight at the stop): a connection the kernel completed
    is served, never reset when the listener closes (a reset after the
    client's connect succeeded is a wrk read error); new handshakes are
    refused, which wrk counts as write errors. Three stops, two workers."""
    if WRK is None:
        raise TestFailure("wrk is not installed (scripts/install-deps.sh installs it)")
    for rnd in range(3):
        d = Daemon({"listen": ["127.0.0.1:PORT"], "shutdown_timeout_ms": ms(3000),
                    "routes": [{"path": "/v", "respond": {"body": {"v": rnd}}}]}, workers=2)
        tmp = tempfile.mkdtemp(prefix="gwwrk-")
        try:
            script = os.path.join(tmp, "close.lua")
            with open(script, "w") as f:
                f.write(CLOSE_SCRIPT)
            p = subprocess.Popen([WRK, "-t2", "-c200", "-d2s", "--timeout", "5s", "-s", script,
                                  f"http://127.0.0.1:{d.port}/v"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, preexec_fn=gwtest._die_with_parent)
            try:
                time.sleep(0.6)
                d.send_signal(signal.SIGTERM)
                out = p.communicate(timeout=40)[0]
            finally:
                if p.poll() is None:
                    gwtest.kill_and_reap(p, 5)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        d.wait(10)
        eq(d.exit_code, 0, "exit status")
        m = re.search(r"RESULT (.*)", out)
        check(m is not None, f"wrk printed a result: {out}")
        print(f"# stop {rnd + 1}: {m.group(1)}")
        res = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
        check(res["requests"] > 50, f"wrk made requests before the stop ({res['requests']})")
        for k in ("read", "status", "timeout"):
            eq(res[k], 0, f"stop {rnd + 1}: wrk {k} errors")


@rtest
def graceful_stop_answers_with_connection_close():
    """A request in flight at SIGTERM gets its whole answer with Connection:
    close; an idle keep-alive connection may send one more request and gets
    Connection: close too."""
    stub = Stub()
    d = Daemon({"listen": ["127.0.0.1:PORT"]}, workers=1, start=False)
    d.start()
    d.reload(config(d.port, "A", stub, delay_ms=ms(500)))
    with Conn("127.0.0.1", d.port, timeout=10) as busy, Conn("127.0.0.1", d.port, timeout=10) as idle:
        eq(idle.request(req("GET", "/v")).status, 200, "idle connection's first request")
        busy.send(req("GET", "/agg"))
        time.sleep(0.1 * SLOW)
        d.send_signal(signal.SIGTERM)
        time.sleep(0.1 * SLOW)
        r = idle.request(req("GET", "/v"))
        eq(r.status, 200, "idle connection's request after SIGTERM")
        eq((r.header("Connection") or "").lower(), "close", "its Connection header")
        r = busy.read_response()
        eq(r.status, 200, "request in flight")
        eq(r.json(), {"a": {"v": "A"}, "b": {"v": "A"}}, "request in flight")
        eq((r.header("Connection") or "").lower(), "close", "its Connection header")
    d.wait(10)
    eq(d.exit_code, 0, "exit status")


if __name__ == "__main__":
    sys.exit(main())
