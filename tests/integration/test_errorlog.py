#!/usr/bin/env python3
"""Integration tests of the error log: the rate limit of repeated lines and
the log writer that keeps workers from ever waiting on stderr. The real
daemon in front of the stub backend, raw HTTP.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_errorlog.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, check, eq, main, req  # noqa: E402

# test_proxy holds the Stub and Client helpers; importing it registers its
# tests, so the registry is put back afterwards.
_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ltest = tp.ptest  # stubs and clients made by the test are closed when it ends
Stub = tp.Stub
Client = tp.Client

BURST = 10  # GW_LOG_RL_BURST: lines of one call site written per second
SUMMARY_RE = re.compile(r'\.\.\. and (\d+) more like this in the last second: "(.*)"$')
LINE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} \[(\w+)\] (\w+): (.*)$")


def foreach_config(stub, items):
    """/fe: call "src" answers an array of items; call "fe" runs once per
    element against backend "one", which has one connection and no queue:
    every element but the one holding the connection fails at once."""
    body = urllib.parse.quote(json.dumps({"items": list(range(items))}, separators=(",", ":")), safe="")
    return tp.config(
        {"src": tp.backend(stub.url),
         "one": tp.backend(stub.url, max_connections=1, max_pending=0)},
        routes=[{"path": "/fe", "methods": ["GET"], "errors": True,
                 "calls": [{"name": "src", "backend": "src", "path": "/src?body=" + body},
                           {"name": "fe", "backend": "one", "path": "/fe/{item}?delay=5",
                            "foreach": "src.items", "foreach_concurrency": items}]}])


def load(d, clients, seconds, max_requests=5000):
    """clients threads, each sends requests on its own keep-alive connection
    for seconds (at most max_requests each); returns the failed foreach
    elements counted from the answers."""
    failed = [0] * clients
    problems = []

    def client(i):
        try:
            with Client(d, timeout=20) as c:
                end = time.monotonic() + seconds
                for _ in range(max_requests):
                    if time.monotonic() > end:
                        break
                    r = c.request(req("GET", "/fe"))
                    check(r.status == 200, f"status {r.status}: {r.raw[:300]!r}")
                    errs = r.json().get("_errors", {})
                    if "fe" in errs:
                        eq(errs["fe"]["code"], "unavailable", f"the elements' failure code in {errs}")
                        failed[i] += len(errs["fe"]["failed"])
        except Exception as e:  # reported in the test's thread
            problems.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120 * SLOW)
    check(not problems, f"clients failed: {problems[:3]}")
    return sum(failed)


def site_lines(log, marker, fmt_marker):
    """(written, summaries): the lines of one call site (containing marker)
    and the summaries of the lines it dropped (their format contains fmt_marker)."""
    written, summaries = [], []
    for line in log.splitlines():
        m = LINE_RE.match(line)
        if not m:
            continue
        s = SUMMARY_RE.search(m.group(3))
        if s:
            if fmt_marker in s.group(2):
                summaries.append((m.group(1), int(s.group(1))))
        elif marker in m.group(3):
            written.append(line)
    return written, summaries


@ltest
@gwtest.exclusive  # four clients at full speed: alone, as the wrk tests
def repeated_lines_are_rate_limited_and_summarised():
    s = Stub()
    items = 100
    d = Daemon(foreach_config(s, items), workers=2)
    t0 = time.monotonic()
    failed = load(d, clients=4, seconds=2.5)
    seconds = time.monotonic() - t0
    check(failed >= 1000, f"only {failed} failed elements: the test does not load")
    marker = "max_connections reached while starting call fe"
    fmt_marker = "while starting call %s"
    # A burst that stops is summarised without a further line of its kind:
    # the log writer ends the window (every 100 ms) once its second is over.
    deadline = time.monotonic() + 3 * SLOW
    while True:
        written, summaries = site_lines(d.log(), marker, fmt_marker)
        if len(written) + sum(n for _, n in summaries) == failed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    eq(len(written) + sum(n for _, n in summaries), failed,
       f"lines written ({len(written)}) plus lines summarised ({[n for _, n in summaries]}) while running, "
       f"vs. failed elements in the answers")
    eq(d.stop(), 0, "exit status")
    log = d.log()
    written, summaries = site_lines(log, marker, fmt_marker)
    print(f"# {failed} failed elements in {seconds:.1f} s: {len(written)} lines written, "
          f"{len(summaries)} summaries of {sum(n for _, n in summaries)} dropped; the log has "
          f"{len(log.splitlines())} lines, {len(log)} bytes")
    check(written, "the first occurrence is in the log")
    check(all(lvl == "error" for lvl, _ in summaries), f"summary levels {set(l for l, _ in summaries)}")
    eq(len(written) + sum(n for _, n in summaries), failed, "lines written plus lines summarised after the stop")
    # The bound: BURST lines and one summary per call site per second (plus
    # the second the load straddles at each end).
    windows = int(seconds) + 2
    check(len(written) <= BURST * windows, f"{len(written)} lines written in {seconds:.1f} s (at most {BURST}/s)")
    check(len(summaries) <= windows, f"{len(summaries)} summaries in {seconds:.1f} s")
    check(len(log.splitlines()) <= 100 + (BURST + 1) * windows * 4,
          f"the error log has {len(log.splitlines())} lines for {failed} failures")
    # Every window that dropped lines first wrote BURST of them, in the same second.
    per_second = {}
    for line in written:
        per_second[line[:19]] = per_second.get(line[:19], 0) + 1
    check(max(per_second.values()) <= BURST, f"lines per second: {per_second}")


@ltest
def workers_never_wait_on_stderr():
    """stderr is a pipe nobody reads (full): the workers go on answering and
    logging; only the log writer thread waits, and when the pipe is read
    again every line that fitted in the buffers comes out."""
    s = Stub()
    d = Daemon(tp.config({"b": s.url}), workers=2, start=False)  # its config and port; started here
    d.port, d.admin_port = gwtest.free_port(), gwtest.free_port()
    with open(d.conf_path, "w") as f:
        f.write(d._render(d.port))
    r, w = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: a page, filled by a few dozen lines
    except OSError:
        pass
    proc = subprocess.Popen([gwtest.GATHERD, "-c", d.conf_path, "-w", "2"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=w, close_fds=True,
                            preexec_fn=gwtest._die_with_parent)
    os.close(w)
    out = b""
    try:
        deadline = time.monotonic() + 10 * SLOW
        while b"started" not in out:
            check(time.monotonic() < deadline and proc.poll() is None, f"gatherd did not start: {out[-2000:]!r}")
            if select.select([r], [], [], 0.1)[0]:
                out += os.read(r, 65536)
        # Fill the pipe through a file description of our own (non-blocking
        # there only: the daemon's stderr stays blocking).
        wfd = os.open(f"/proc/{proc.pid}/fd/2", os.O_WRONLY | os.O_NONBLOCK)
        junk = 0
        try:
            while True:
                junk += os.write(wfd, b"#" * 512)
        except BlockingIOError:
            pass
        os.close(wfd)
        check(junk > 0, "the pipe took nothing")
        # Every connection logs a line at notice level (a bad request, 400);
        # new connections reach both workers.
        t0 = time.monotonic()
        for k in range(60):
            with Client(d, timeout=5) as c:
                c.send(b"BAD\r\n\r\n")
                resp = c.read_response()
                eq(resp.status, 400, f"bad request {k}")
            with Client(d, timeout=5) as c:
                resp = c.request(req("GET", "/legacy/x"))
                eq(resp.status, 200, f"request {k} while stderr is full")
        dt = time.monotonic() - t0
        check(dt < 30 * SLOW, f"120 requests took {dt:.1f} s")
    finally:
        # Read the pipe again: the writer thread can finish and the daemon stop.
        done = threading.Event()

        def drain():
            nonlocal out
            while not done.is_set():
                if select.select([r], [], [], 0.1)[0]:
                    chunk = os.read(r, 65536)
                    if not chunk:
                        break
                    out += chunk

        t = threading.Thread(target=drain)
        t.start()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15 * SLOW)
        except subprocess.TimeoutExpired:
            gwtest.kill_and_reap(proc, 5)
            rc = None
        done.set()
        t.join()
        os.close(r)
    text = out.decode(errors="replace")
    eq(rc, 0, f"exit status after SIGTERM; stderr tail:\n{text[-2000:]}")
    rep = gwtest.sanitizer_report(text)
    check(rep is None, f"sanitizer report:\n{rep}")
    bad = len(re.findall(r"\] w\d: client 127\.0\.0\.1:\d+: 400 ", text))
    dropped = sum(int(n) for n in re.findall(r'and (\d+) more like this in the last second: "client %s: %d %s', text))
    print(f"# {bad} '400' lines written, {dropped} summarised")
    eq(bad + dropped, 60, "400 lines written or summarised")
    check("stopped" in text, "the last line reached stderr")


if __name__ == "__main__":
    sys.exit(main())
