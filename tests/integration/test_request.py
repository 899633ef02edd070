#!/usr/bin/env python3
"""Integration tests of gatherd's client (request) side behind the strict
backend of strict_http.py: lengths that cannot be represented, the request's
host as backends see it, clients that half-close, and the memory budget of
request bodies (memory.request_body_bytes) with the daemon's resident
memory measured from /proc.

Run: GATHERD=/path/to/gatherd python3 tests/integration/test_request.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import functools
import json
import os
import re
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Conn, ConnectionClosed, Daemon, TestFailure, check, eq, main, req, test  # noqa: E402
from strict_http import StrictBackend, parse_responses  # noqa: E402

SANITIZED = gwtest._is_sanitized(gwtest.GATHERD)
MIB = 1 << 20

_backends = []


def rtest(fn):
    """@test, plus: the strict backends made during the test are closed after it,
    and any framing violation one of them saw fails the test."""
    @functools.wraps(fn)
    def run():
        try:
            fn()
            for b in _backends:
                _, viol = b.snapshot()
                check(not viol, f"the backend saw invalid framing: {viol[:3]!r}")
        finally:
            while _backends:
                _backends.pop().close()
    return test(run)


def backend():
    b = StrictBackend()
    _backends.append(b)
    return b


def config(b, routes, **top):
    cfg = {"listen": ["127.0.0.1:PORT"],
           "backends": {"b": {"url": b.url, "timeout_ms": int(10000 * SLOW)}},
           "routes": routes}
    cfg.update(top)
    return cfg


ROUTES = [
    {"path": "/fixed", "respond": {"body": {"fixed": True}}},
    {"path": "/agg", "methods": ["GET", "POST"], "calls": [{"name": "a", "backend": "b", "path": "/a?delay={query.delay}"}],
     "deadline_ms": 10000},
    {"path": "/fwd", "methods": ["POST"], "calls": [{"name": "a", "backend": "b", "method": "POST", "path": "/fwd",
                                                      "body": "forward"}], "deadline_ms": 10000},
    {"path": "/fwdslow", "methods": ["POST"], "deadline_ms": 60000,
     "calls": [{"name": "a", "backend": "b", "method": "POST", "path": "/fwd?delay=20000", "body": "forward",
                "timeout_ms": 60000}]},
    {"path": "/p/*", "proxy": {"backend": "b"}},
    {"path": "/open/*", "proxy": {"backend": "b", "max_body_bytes": 0}},
    {"path": "/ph/*", "proxy": {"backend": "b", "preserve_host": True}},
]


def metrics(d):
    with Conn("127.0.0.1", d.admin_port) as a:
        r = a.request(req("GET", "/metrics", headers={"Connection": "close"}))
    out = {}
    for line in r.body.decode().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def budget(d):
    """(used, limit, refused) of the request body budget, from /metrics."""
    m = metrics(d)
    return (m['gatherd_memory_budget_bytes{budget="request_bodies",kind="used"}'],
            m['gatherd_memory_budget_bytes{budget="request_bodies",kind="limit"}'],
            m['gatherd_memory_budget_refused_total{budget="request_bodies"}'])


def wait_budget_used(d, want, timeout=5.0):
    deadline = time.monotonic() + timeout * SLOW
    while True:
        used = budget(d)[0]
        if used == want:
            return
        if time.monotonic() > deadline:
            raise TestFailure(f"request body budget in use: {used:.0f}, expected {want}")
        time.sleep(0.02)


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise TestFailure("no VmRSS in /proc status")


def no_budget_errors(d):
    check("given back but only" not in d.log(), "a budget was given back more than it held:\n" + d.log()[-2000:])


def read_all(c, timeout=10.0):
    """Everything until the server closes."""
    return c.read_all_until_close(timeout)


# --- lengths gatherd cannot represent -----------------------------------------------------

@rtest
def content_length_past_63_bits_never_reaches_a_backend():
    """A Content-Length from 2^63 to 2^64-1 used to turn negative: the body
    limit was skipped and a proxy route sent "Content-Length: -9223372036854775808"
    upstream with the client's bytes after it, which a lenient backend runs
    as a second request. Now 400, and the backend sees nothing."""
    b = backend()
    d = Daemon(config(b, ROUTES))
    smuggled = b"GET /p/smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    for route in ("/p/x", "/open/x"):  # the route's limit, and none at all
        for cl in (2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1, 2**64, 10**25):
            with d.connect() as c:
                c.send(b"POST " + route.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % cl + smuggled)
                data = read_all(c)
            rs, _ = parse_responses(data, [b"POST"])
            eq([r.status for r in rs], [400], f"{route} Content-Length {cl}: answers {data[:300]!r}")
    time.sleep(0.2)
    recs, _ = b.snapshot()
    eq(recs, [], "requests the backend saw")
    # a length that fits is forwarded as gatherd framed it, with exactly its bytes
    with d.connect() as c:
        c.send(req("POST", "/open/y", body=b"z" * 1000) + smuggled)
        c.shut_wr()
        rs, _ = parse_responses(read_all(c), [b"POST", b"GET"])
    eq([r.status for r in rs], [200, 200], "statuses")
    recs, _ = b.snapshot()
    eq([(r.msg.method, r.msg.target, r.msg.body) for r in recs],
       [(b"POST", b"/open/y", b"z" * 1000), (b"GET", b"/p/smuggled", b"")], "what the backend saw")
    eq(recs[0].msg.header_all("content-length"), [b"1000"], "Content-Length upstream")


@rtest
def request_host_forwarded_only_when_valid():
    """X-Forwarded-Host (and Host with preserve_host) carry the request's
    host: the Host header, or the authority of an absolute-form target,
    which wins (RFC 9112 3.2.2); either one is checked first."""
    b = backend()
    d = Daemon(config(b, ROUTES))
    with d.connect() as c:
        c.send(req("GET", "/p/1", host="api.example:8443") + req("GET", "http://abs.example/p/2", host="other")
               + req("GET", "/ph/3", host="[::1]:80") + req("GET", "HTTP://ABS.example:81/ph/4", host="x"))
        rs = [c.read_response() for _ in range(4)]
    eq([r.status for r in rs], [200] * 4, "statuses")
    recs, _ = b.snapshot()
    eq([r.msg.header_all("x-forwarded-host") for r in recs],
       [[b"api.example:8443"], [b"abs.example"], [b"[::1]:80"], [b"ABS.example:81"]], "X-Forwarded-Host")
    eq(recs[2].msg.header_all("host"), [b"[::1]:80"], "Host with preserve_host")
    eq(recs[3].msg.header_all("host"), [b"ABS.example:81"], "Host with preserve_host (absolute-form)")
    n = len(recs)
    for bad in (b"Host: a b\r\n", b"Host: evil.com/../x\r\n", b"Host: u@h\r\n", b"Host: h:99999\r\n",
                b"Host:\r\n", b"Host: a\r\nHost: a\r\n", b""):
        with d.connect() as c:
            c.send(b"GET /p/bad HTTP/1.1\r\n" + bad + b"\r\n")
            rs, _ = parse_responses(read_all(c), [b"GET"])
        eq([r.status for r in rs], [400], f"answer to {bad!r}")
    with d.connect() as c:
        c.send(b"GET http://u@h/p/bad HTTP/1.1\r\nHost: h\r\n\r\n")
        rs, _ = parse_responses(read_all(c), [b"GET"])
    eq([r.status for r in rs], [400], "absolute-form with userinfo")
    time.sleep(0.2)
    eq(len(b.snapshot()[0]), n, "requests with a bad host reached the backend")


# --- half-closed clients -------------------------------------------------------------------

@rtest
def half_close_after_request_is_answered_by_every_route_kind():
    """A client that sends its request and shuts down its write side gets
    the answer, then the connection closes: fixed, aggregate and proxy
    routes alike, also while the backend takes its time, also for pipelined
    requests (aggregate and proxy answers used to be dropped)."""
    b = backend()
    d = Daemon(config(b, ROUTES))
    delay = int(300 * SLOW)
    cases = [("fixed", [req("GET", "/fixed")]),
             ("aggregate", [req("GET", f"/agg?delay={delay}")]),
             ("proxy", [req("GET", f"/p/x?delay={delay}")]),
             ("proxy POST", [req("POST", f"/p/x?delay={delay}", body=b"hello")]),
             ("aggregate forwarding a body", [req("POST", "/fwd", body=b'{"k":1}')]),
             ("pipelined", [req("GET", f"/p/1?delay={delay}"), req("GET", f"/agg?delay={delay}"),
                            req("GET", "/fixed"), req("POST", "/p/2", body=b"x" * 5000)]),
             ("HTTP/1.0", [req("GET", f"/p/x?delay={delay}", version="HTTP/1.0", headers={"Connection": "keep-alive"})])]
    for name, reqs in cases:
        with d.connect() as c:
            c.send(b"".join(reqs))
            c.shut_wr()
            data = read_all(c, 10)
        methods = [r.split(b" ", 1)[0] for r in reqs]
        rs, rest = parse_responses(data, methods)
        eq([r.status for r in rs], [200] * len(reqs), f"{name}: answers ({data[:400]!r})")
        eq(rest, b"", f"{name}: bytes after the answers")
        for r, m in zip(rs, methods):
            if m != b"HEAD" and r.header("x-backend-seq") is None:
                check(b"fixed" in r.body or b'"a"' in r.body, f"{name}: answer {r!r}")
    no_budget_errors(d)


@rtest
def client_gone_still_cancels_after_half_close_support():
    """A client that closes its socket (not only its write side) while a
    request is in flight is still told from a half-close: the interim
    100 Continue gatherd sends an HTTP/1.1 client is answered by a reset,
    and the request ends at once instead of when the backend answers."""
    b = backend()
    d = Daemon(config(b, ROUTES))
    slow = int(4000 * SLOW)
    for path in (f"/p/x?delay={slow}", f"/agg?delay={slow}"):
        c = d.connect()
        c.send(req("GET", path))
        check(b.wait_records(len(b.snapshot()[0]) + 1, 3 * SLOW), f"{path}: the request reached the backend")
        t0 = time.monotonic()
        c.close()
        deadline = t0 + 2.0 * SLOW
        while metrics(d)["gatherd_requests_in_flight"] != 0:
            check(time.monotonic() < deadline, f"{path}: the request of a client that closed is still in flight")
            time.sleep(0.02)
        check(time.monotonic() - t0 < slow / 1000.0 / 2, f"{path}: cancelled only after {time.monotonic() - t0:.2f}s")


# --- the memory budget of request bodies -------------------------------------------------------

def asan_quarantine_small():
    """Under ASan freed memory waits in a 256 MiB quarantine before reuse,
    which would hide whether buffers are freed: a smaller one for these
    daemons (use-after-free is still caught within it)."""
    if SANITIZED:
        os.environ["ASAN_OPTIONS"] = (os.environ.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=8").lstrip(":")


def open_many(d, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=30 * SLOW)
        socks.append(s)
    return socks


def send_all_threads(socks, data_of, nthreads=16):
    """Sends data_of(i) on every socket, from a few threads."""
    errs = []

    def work(k):
        for i in range(k, len(socks), nthreads):
            try:
                socks[i].sendall(data_of(i))
            except OSError as e:
                errs.append(e)

    ths = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(120)
    return errs


def wait_readable(socks, want, timeout):
    """The sockets that have something to read (or EOF) once want of them
    do (or timeout passed), plus a short grace for any beyond want."""
    import select
    deadline = time.monotonic() + timeout
    ready = set()
    grace_end = None
    while True:
        now = time.monotonic()
        if now > deadline or (grace_end is not None and now > grace_end):
            return ready
        r, _, _ = select.select([s for s in socks if s not in ready], [], [], 0.05)
        ready.update(r)
        if len(ready) >= want and grace_end is None:
            grace_end = time.monotonic() + 0.3 * SLOW


def read_status(s, timeout):
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return int(m.group(1)) if m else None, data


@rtest
def unused_bodies_are_read_and_dropped():
    """A route that does not use the body (a fixed answer, an aggregate
    route with no call forwarding it, a 404) reads and drops it: 200
    connections each sending 1 MiB leave the daemon's resident memory and
    the budget where they were (they used to hold it all, and keep it)."""
    asan_quarantine_small()
    b = backend()
    d = Daemon(config(b, ROUTES, http={"max_body_bytes": 2 * MIB}, memory={"request_body_bytes": 4 * MIB}),
               workers=2)
    n = 200
    with d.connect() as c:  # warm up: the pool, the first allocations
        eq(c.request(req("GET", "/agg?delay=0")).status, 200, "warm-up")
    base = rss_bytes(d.pid)
    socks = open_many(d, n)
    targets = ["/fixed", "/agg?delay=0", "/nowhere"]
    body = b"b" * MIB
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes(d.pid))
            time.sleep(0.01)

    th = threading.Thread(target=sample)
    th.start()
    try:
        errs = send_all_threads(socks, lambda i: b"POST " + targets[i % 3].encode() + b" HTTP/1.1\r\nHost: t\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(body) + body)
        check(not errs, f"send errors: {errs[:3]}")
        statuses = [read_status(s, 30 * SLOW)[0] for s in socks]
    finally:
        stop.set()
        th.join()
        for s in socks:
            s.close()
    want = {"/fixed": 200, "/agg?delay=0": 200, "/nowhere": 404}
    eq(statuses, [want[targets[i % 3]] for i in range(n)], "statuses")
    grown = peak[0] - base
    print(f"# {n} x 1 MiB bodies: resident memory {base / MIB:.1f} MiB before, peak {peak[0] / MIB:.1f} MiB")
    check(grown < 64 * MIB, f"resident memory grew by {grown / MIB:.0f} MiB for bodies nobody uses")
    used, limit, refused = budget(d)
    eq((used, limit, refused), (0, 4 * MIB, 0), "budget (used, limit, refused)")


@rtest
def body_budget_bounds_memory_and_returns_to_zero():
    """Bodies an aggregate route forwards are held in memory, within
    memory.request_body_bytes: a declared length is taken when the head is
    read, so past the budget a client gets 503 body_budget_exhausted at
    once (no 100 Continue, no body read); chunked bodies are taken as they
    arrive. When the requests end (answered, reset, cancelled, across a
    reload) the budget is back at 0 and resident memory stays within a
    bound derived from the budget."""
    asan_quarantine_small()
    b = backend()
    lim = 16 * MIB
    cfg = config(b, ROUTES, http={"max_body_bytes": 2 * MIB}, memory={"request_body_bytes": lim})
    d = Daemon(cfg, workers=2)
    with d.connect() as c:
        eq(c.request(req("POST", "/fwd", body=b"{}")).status, 200, "warm-up")
    base = rss_bytes(d.pid)
    n, size = 64, MIB
    socks = open_many(d, n)
    head = b"POST /fwd HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
    # every head with half a body: the budget fills up, the rest is refused at once
    errs = send_all_threads(socks, lambda i: head + b"x" * (size // 2))
    check(not errs, f"send errors: {errs[:3]}")
    held = lim // size
    readable = wait_readable(socks, n - held, 15 * SLOW)
    refused_socks = [s for s in socks if s in readable]
    waiting = [s for s in socks if s not in readable]
    for s in refused_socks:
        st, data = read_status(s, 5 * SLOW)
        eq(st, 503, f"status of a refused body ({data[:200]!r})")
        check(b"body_budget_exhausted" in data, f"error code in {data[:300]!r}")
        check(b"Retry-After: 1\r\n" in data, "Retry-After on the 503")
    used, limit, refused = budget(d)
    eq((len(refused_socks), len(waiting)), (n - held, held), "(refused, held) connections")
    eq((used, limit, refused), (held * size, lim, n - held), "budget (used, limit, refused) while held")
    rss_held = rss_bytes(d.pid)
    # a reload while the bodies are held; then half of them finish, a quarter reset, a quarter close mid-body
    cfg2 = dict(cfg, listen=[f"127.0.0.1:{d.port}"])
    d.reload(cfg2)
    finish, reset = waiting[: held // 2], waiting[held // 2: 3 * held // 4]
    errs = send_all_threads(finish, lambda i: b"y" * (size // 2), nthreads=4)
    check(not errs, f"send errors: {errs[:3]}")
    for s in finish:
        eq(read_status(s, 30 * SLOW)[0], 200, "status of a held body sent whole")
    for s in reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    for s in waiting[3 * held // 4:]:
        s.close()
    wait_budget_used(d, 0)
    for s in socks:
        s.close()
    nfwd = len(b.snapshot()[0])
    # whole bodies held by aggregate calls whose clients go away: cancelled,
    # given back, and the memory with them
    rss_before_gone = rss_bytes(d.pid)
    gone = open_many(d, held)
    errs = send_all_threads(gone, lambda i: req("POST", "/fwdslow", body=b"g" * MIB), nthreads=4)
    check(not errs, f"send errors: {errs[:3]}")
    deadline = time.monotonic() + 10 * SLOW
    while budget(d)[0] < lim or len(b.snapshot()[0]) < nfwd + held:
        check(time.monotonic() < deadline, "the bodies are not all held and forwarded")
        time.sleep(0.02)
    rss_gone_held = rss_bytes(d.pid)
    for s in gone:
        s.close()
    wait_budget_used(d, 0)
    time.sleep(0.2)
    rss_gone_after = rss_bytes(d.pid)
    print(f"# {held} whole bodies held by slow calls: {rss_before_gone / MIB:.1f} MiB before, "
          f"{rss_gone_held / MIB:.1f} MiB held, {rss_gone_after / MIB:.1f} MiB after their clients left")
    check(rss_gone_held - rss_before_gone <= 2 * lim + 16 * MIB,
          "more than twice the budget resident for the bodies it holds")
    if not SANITIZED:  # ASan's allocator keeps what it freed
        check(rss_gone_after - rss_before_gone <= lim // 4,
              f"memory not given back when the requests ended: {rss_gone_after / MIB:.1f} MiB")
    # chunked bodies are taken as they arrive: past the budget, 503 mid-body
    with d.connect() as c:
        c.send(b"POST /fwd HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (MIB // 2) + b"c" * (MIB // 2) + b"\r\n"
        others = open_many(d, lim // size - 1)  # they hold all but 1 MiB
        send_all_threads(others, lambda i: head + b"o", nthreads=4)
        try:
            deadline = time.monotonic() + 5 * SLOW
            while budget(d)[0] < lim - MIB:
                check(time.monotonic() < deadline, "the second body never took its share")
                time.sleep(0.02)
            try:
                for _ in range(4):
                    c.send(chunk)
            except OSError:
                pass
            st, data = read_status(c.sock, 10 * SLOW)
            eq(st, 503, f"chunked body past the budget ({data[:200]!r})")
        finally:
            for o in others:
                o.close()
    wait_budget_used(d, 0)
    rss_after = rss_bytes(d.pid)
    print(f"# resident memory: {base / MIB:.1f} MiB at start, {rss_held / MIB:.1f} MiB with {held} MiB held, "
          f"{rss_after / MIB:.1f} MiB after")
    bound = base + 3 * lim + 48 * MIB
    check(rss_held <= bound and rss_after <= bound,
          f"resident memory over {bound / MIB:.0f} MiB (budget {lim / MIB:.0f} MiB)")
    no_budget_errors(d)
    # the daemon still serves bodies
    with d.connect() as c:
        r = c.request(req("POST", "/fwd", body=b'{"after":1}', headers={"Content-Type": "application/json"}))
        eq(r.status, 200, "a body after all that")
    recs, _ = b.snapshot()
    check(any(r.msg.body == b'{"after":1}' for r in recs if r.complete), "the last body reached the backend")


@rtest
def proxy_retry_copy_counts_in_the_budget():
    """A proxy route keeps up to 64 KiB of a streamed body for a retry on a
    fresh connection: that copy is request body held in memory, taken from
    memory.request_body_bytes and given back when the request ends; without
    room in the budget the request goes on, only without the copy."""
    b = backend()
    slow = int(1500 * SLOW)
    for lim, held in ((MIB, 10000), (1000, 0)):
        d = Daemon(config(b, ROUTES, memory={"request_body_bytes": lim}))
        with d.connect() as c:
            c.send(req("POST", f"/p/x?delay={slow}", body=b"r" * 10000))
            check(b.wait_records(len(b.snapshot()[0]) + 1, 5 * SLOW), "the request reached the backend")
            eq(budget(d)[0], held, f"budget in use while the request is in flight (limit {lim})")
            r = c.read_response()
            eq(r.status, 200, "status")
        wait_budget_used(d, 0)
        no_budget_errors(d)
        d.stop()


if __name__ == "__main__":
    sys.exit(main())
