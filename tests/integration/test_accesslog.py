#!/usr/bin/env python3
"""Integration tests of the access log and the error log file (README
"Logs"): the real daemon, the stub backend, raw HTTP; the tests read the
files the daemon's log writer thread fills (every 100 ms).

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_accesslog.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, check, contains, eq, main, req, run_cli  # noqa: E402

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

atest = tp.ptest
Stub = tp.Stub
Client = tp.Client

# CLIENT - - [time] "METHOD TARGET HTTP/1.x" STATUS BYTES "referer" "ua" rid=ID route=R t=MS up=MS fail=LIST
LINE_RE = re.compile(r'^(\S+) - - \[([^\]]+)\] "(\S+) (\S+) (HTTP/1\.\d)" (\d{3}) (\d+) "([^"]*)" "([^"]*)" '
                     r'rid=(\S+) route=(\S+) t=([\d.]+) up=(\S+) fail=(\S+)$')


def routes():
    return [
        {"path": "/r", "respond": {"status": 201, "body": {"hello": "world"}}},
        {"path": "/p/*", "proxy": {"backend": "s", "strip_prefix": "/p"}},
        {"path": "/agg", "calls": [
            {"name": "good", "backend": "s", "path": "/ok?body=%7B%22a%22%3A1%7D"},
            {"name": "broken", "backend": "s", "path": "/x?status=500"}]},
        {"path": "/aggreq", "calls": [
            {"name": "must", "backend": "s", "path": "/x?status=500", "required": True}]},
    ]


def log_daemon(tmp, stub, log, workers=2, **top):
    cfg = tp.config({"s": tp.backend(stub.url)}, routes=routes(), **top)
    cfg["log"] = log
    return Daemon(cfg, workers=workers)


def read_lines(path):
    try:
        with open(path, errors="replace") as f:
            return [l for l in f.read().split("\n") if l]
    except FileNotFoundError:
        return []


def wait_lines(path, n, timeout=5.0):
    """The lines of path once it has at least n (the writer flushes every 100 ms)."""
    deadline = time.monotonic() + timeout * SLOW
    while True:
        lines = read_lines(path)
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def get(d, path, headers=None):
    with Client(d) as c:
        return c.request(req("GET", path, headers=headers))


def parse(line):
    m = LINE_RE.match(line)
    if not m:
        raise TestFailure(f"access log line not in the combined format: {line!r}")
    keys = ("client", "time", "method", "target", "protocol", "status", "bytes", "referer", "user_agent",
            "request_id", "route", "total_ms", "upstream_ms", "failed")
    return dict(zip(keys, m.groups()))


def tmpdir():
    import tempfile
    return tempfile.mkdtemp(prefix="gwalog-")


@atest
def combined_lines_for_respond_proxy_and_aggregate():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    d = log_daemon(t, stub, {"access_log": path})
    r1 = get(d, "/r", headers={"User-Agent": 'agent "quoted"', "Referer": "http://ref/x"})
    eq(r1.status, 201, "respond status")
    r2 = get(d, "/p/hello?status=203&body=abcdef")
    eq(r2.status, 203, "proxy status")
    r3 = get(d, "/agg")
    eq(r3.status, 200, "aggregate status")
    r4 = get(d, "/aggreq")
    eq(r4.status, 502, "required call failed")
    r5 = get(d, "/nowhere")
    eq(r5.status, 404, "no route")
    lines = wait_lines(path, 5)
    eq(len(lines), 5, f"lines in {lines}")
    by = {parse(l)["target"]: parse(l) for l in lines}
    a = by["/r"]
    eq((a["client"], a["method"], a["protocol"], a["status"], a["bytes"], a["route"]),
       ("127.0.0.1", "GET", "HTTP/1.1", "201", str(len(r1.body)), "/r"), "respond line")
    eq(a["user_agent"], r'agent \x22quoted\x22', "user agent escaped")
    eq(a["referer"], "http://ref/x", "referer")
    eq(a["request_id"], r1.header("X-Request-Id"), "request id")
    eq((a["upstream_ms"], a["failed"]), ("-", "-"), "no upstream")
    p = by["/p/hello?status=203&body=abcdef"]
    eq((p["status"], p["bytes"], p["route"]), ("203", str(len(r2.body)), "/p/*"), "proxy line")
    check(re.match(r"^\d+\.\d{3}$", p["upstream_ms"]), f"proxy upstream time {p['upstream_ms']}")
    g = by["/agg"]
    eq((g["status"], g["bytes"], g["route"], g["failed"]), ("200", str(len(r3.body)), "/agg", "broken:bad_status"),
       "aggregate line")
    check(re.match(r"^\d+\.\d{3}$", g["upstream_ms"]), f"aggregate upstream time {g['upstream_ms']}")
    check(float(g["total_ms"]) >= float(g["upstream_ms"]), "total >= upstream")
    q = by["/aggreq"]
    eq((q["status"], q["failed"]), ("502", "must:bad_status"), "required-call line")
    n = by["/nowhere"]
    eq((n["status"], n["route"], n["upstream_ms"]), ("404", "-", "-"), "404 line")


@atest
def json_format_parses():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.json")
    d = log_daemon(t, stub, {"access_log": path, "access_format": "json"})
    r = get(d, "/agg", headers={"User-Agent": 'a"b\\c\xe9'})
    eq(r.status, 200, "status")
    get(d, "/r")
    lines = wait_lines(path, 2)
    eq(len(lines), 2, "lines")
    docs = [json.loads(l) for l in lines]
    g = [x for x in docs if x["target"] == "/agg"][0]
    eq((g["client"], g["method"], g["protocol"], g["status"], g["bytes"], g["route"]),
       ("127.0.0.1", "GET", "HTTP/1.1", 200, len(r.body), "/agg"), "aggregate fields")
    eq(g["user_agent"], 'a"b\\c\xe9', "user agent round-trips (bytes as \\u00XX)")
    eq(g["failed"], [{"call": "broken", "code": "bad_status"}], "failed calls")
    eq(g["request_id"], r.header("X-Request-Id"), "request id")
    check(isinstance(g["upstream_ms"], float) and isinstance(g["total_ms"], float), "times are numbers")
    check(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", g["time"]), f"time {g['time']}")
    long = "/r?" + "x%22" * 2000  # 8000 bytes, cut in the log, the line still JSON
    eq(get(d, long, headers={"User-Agent": "\xff" * 3000}).status, 201, "long target")
    lines = wait_lines(path, 3)
    doc = json.loads(lines[2])
    check(long.startswith(doc["target"]) and 900 < len(doc["target"]) <= 1024, f"target cut: {len(doc['target'])}")
    check(len(lines[2]) < 8192, "line bounded")
    rr = [x for x in docs if x["target"] == "/r"][0]
    eq((rr["status"], rr["upstream_ms"], rr["failed"]), (201, None, []), "respond fields")


@atest
def real_client_address_behind_trusted_proxy():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    d = log_daemon(t, stub, {"access_log": path}, trusted_proxies=["127.0.0.1/32"])
    get(d, "/r", headers={"X-Forwarded-For": "203.0.113.7"})
    lines = wait_lines(path, 1)
    eq(parse(lines[0])["client"], "203.0.113.7", "client from a trusted proxy")
    path2 = os.path.join(t, "access2.log")
    d2 = log_daemon(t, stub, {"access_log": path2})
    get(d2, "/r", headers={"X-Forwarded-For": "203.0.113.7"})
    lines = wait_lines(path2, 1)
    eq(parse(lines[0])["client"], "127.0.0.1", "an untrusted peer's X-Forwarded-For is ignored")


@atest
def sigusr1_reopens_files():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    epath = os.path.join(t, "error.log")
    d = log_daemon(t, stub, {"access_log": path, "error_log": epath})
    get(d, "/r")
    eq(len(wait_lines(path, 1)), 1, "first line")
    os.rename(path, path + ".1")
    os.rename(epath, epath + ".1")
    get(d, "/r?after-rename")  # still goes to the renamed file: it is still open
    eq(len(wait_lines(path + ".1", 2)), 2, "lines in the renamed file before USR1")
    d.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5 * SLOW
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    check(os.path.exists(path), "USR1 created a new access log")
    get(d, "/r?after-usr1")
    lines = wait_lines(path, 1)
    eq(len(lines), 1, "lines in the new file")
    eq(parse(lines[0])["target"], "/r?after-usr1", "the new line is in the new file")
    eq(len(read_lines(path + ".1")), 2, "the old file got nothing more")
    contains("\n".join(read_lines(epath + ".1")), "SIGUSR1: reopening the log files", "old error log")
    contains("\n".join(wait_lines(epath, 1)), "log files reopened", "new error log")


@atest
def many_usr1_never_kill_the_daemon():
    """The writer thread must not take signals: a USR1 delivered to it would
    end the process (it did, about one time in a few hundred)."""
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    d = log_daemon(t, stub, {"access_log": path, "error_log": os.path.join(t, "error.log")})
    # bash's kill builtin sends them fast enough that some arrive while the
    # main thread is not in sigtimedwait(), when any other thread may get them
    subprocess.run(["bash", "-c", f"for i in $(seq 1 2000); do kill -USR1 {d.pid} || exit; done"], timeout=60)
    time.sleep(0.3 * SLOW)
    check(d.running(), f"daemon alive after 2000 SIGUSR1 (exit {d.proc.poll()})")
    eq(get(d, "/r").status, 201, "still answering")


@atest
def reload_turns_the_access_log_on_and_moves_it():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    d = log_daemon(t, stub, {})
    get(d, "/r?before")

    def reload_with(log):
        cfg = tp.config({"s": tp.backend(stub.url)}, routes=routes(), listen=[f"127.0.0.1:{d.port}"])
        cfg["log"] = log
        d.reload(cfg)
        time.sleep(0.2 * SLOW)  # the writer moves to the new file in the pass that wrote "reloaded"
    reload_with({"access_log": path})
    get(d, "/r?after")
    lines = wait_lines(path, 1)
    eq([parse(l)["target"] for l in lines], ["/r?after"], "lines after the reload only")
    reload_with({"access_log": path + ".2", "access_format": "json"})
    get(d, "/r?moved")
    eq([json.loads(l)["target"] for l in wait_lines(path + ".2", 1)], ["/r?moved"], "moved, in JSON")
    eq(len(read_lines(path)), 1, "nothing more in the first file")


@atest
def error_log_to_file():
    stub = Stub()
    t = tmpdir()
    epath = os.path.join(t, "error.log")
    d = log_daemon(t, stub, {"error_log": epath, "level": "info"})
    lines = wait_lines(epath, 2)
    text = "\n".join(lines)
    contains(text, "[notice] main: gatherd", "start-up line in the file")
    check("started" not in d.log(), f"start-up line not on stderr: {d.log()}")
    d.stop()
    contains("\n".join(read_lines(epath)), "stopped", "the last line reaches the file at exit")


@atest
def level_from_config_and_command_line():
    stub = Stub()
    t = tmpdir()
    epath = os.path.join(t, "error.log")
    d = log_daemon(t, stub, {"error_log": epath, "level": "warn"})
    with Client(d) as c:  # a client that goes away with a request in flight: an info line
        c.send(req("GET", "/p/slow?delay=300"))
    time.sleep(0.5 * SLOW)
    d.stop()
    text = "\n".join(read_lines(epath))
    check("[notice]" not in text and "[info]" not in text, f"level warn hides notice and info: {text}")
    cfg = tp.config({"s": tp.backend(stub.url)}, routes=routes())
    cfg["log"] = {"error_log": epath + ".2", "level": "warn"}
    d2 = Daemon(cfg, workers=1, log_level="notice")  # -l notice wins over "level"
    d2.stop()
    contains("\n".join(read_lines(epath + ".2")), "[notice] main: gatherd", "-l overrides log.level")


@atest
def no_line_lost_under_parallel_load():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    d = log_daemon(t, stub, {"access_log": path}, workers=4)
    nclients, per = 20, 100
    errors = []

    def client(i):
        try:
            with Client(d) as c:
                for k in range(per):
                    r = c.request(req("GET", f"/r?c={i}&k={k}" if k % 2 else f"/p/x?c={i}&k={k}"))
                    if r.status not in (201, 200):
                        errors.append(r.status)
        except Exception as e:  # reported below
            errors.append(repr(e))
    th = [threading.Thread(target=client, args=(i,)) for i in range(nclients)]
    for x in th:
        x.start()
    for x in th:
        x.join(60 * SLOW)
    eq(errors, [], "client errors")
    lines = wait_lines(path, nclients * per, timeout=10)
    eq(len(lines), nclients * per, "access log lines")
    targets = {parse(l)["target"] for l in lines}
    eq(len(targets), nclients * per, "distinct requests logged")


@atest
def client_gone_mid_request_is_logged():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    d = log_daemon(t, stub, {"access_log": path})
    c = Client(d)
    c.send(req("GET", "/p/slow?delay=2000"))
    time.sleep(0.2 * SLOW)
    c.close()
    lines = wait_lines(path, 1)
    eq(len(lines), 1, "one line")
    a = parse(lines[0])
    eq((a["status"], a["route"]), ("499", "/p/*"), "client closed request")


@atest
def malformed_request_is_logged_without_a_request_line():
    stub = Stub()
    t = tmpdir()
    path = os.path.join(t, "access.log")
    d = log_daemon(t, stub, {"access_log": path}, trusted_proxies=["127.0.0.1/32"])
    with Client(d) as c:
        c.send(b"GET /r HTTP/1.1\r\nX-Forwarded-For: 203.0.113.9\r\nBad Header\r\n\r\n")
        r = c.read_response()
        eq(r.status, 400, "malformed header")
    lines = wait_lines(path, 1)
    eq(len(lines), 1, "one line")
    check(re.match(r'^127\.0\.0\.1 - - \[[^\]]+\] "-" 400 \d+ "-" "-" rid=\S+ route=- t=[\d.]+ up=- fail=-$', lines[0]),
          f"line of a malformed request: {lines[0]!r}")


@atest
def bad_log_config_is_an_error():
    t = tmpdir()
    for log, want in (({"acces_log": "x"}, 'log.acces_log: unknown key "acces_log"'),
                      ({"access_format": "xml"}, "log.access_format: must be"),
                      ({"level": "loud"}, "log.level: must be"),
                      ({"error_log": "off"}, "log.error_log: must be")):
        p = os.path.join(t, "bad.json")
        with open(p, "w") as f:
            json.dump({"listen": ["127.0.0.1:1"], "log": log}, f)
        rc, _, out = run_cli(["-t", "-c", p])
        check(rc == 1, f"{log}: -t exit code {rc}")
        contains(out, want, f"{log}: message")
    p = os.path.join(t, "unwritable.json")
    with open(p, "w") as f:
        json.dump({"listen": [f"127.0.0.1:{gwtest.free_port()}"], "log": {"access_log": "/nonexistent-dir/a.log"}}, f)
    rc, _, out = run_cli(["-c", p], timeout=10)
    check(rc == 1, f"an access log that cannot be opened stops the start: exit {rc}")
    contains(out, "cannot open log file /nonexistent-dir/a.log", "message")


if __name__ == "__main__":
    sys.exit(main())
