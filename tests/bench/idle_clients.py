#!/usr/bin/env python3
"""idle_clients.py - hold many idle HTTP/1.1 keep-alive connections (tests/bench, scenario idle).

    idle_clients.py HOST PORT COUNT PATH READY_FILE [--hold S] [--setup S] [--inflight N]

Opens COUNT TCP connections to HOST:PORT (loopback only), sends one
`GET PATH HTTP/1.1` on each and reads its whole answer (Content-Length
framed, status 200), so that every connection ends up as a real idle
keep-alive connection on the server. At most --inflight connections are
being set up at the same time, so the server's listen backlog never
overflows.

When all COUNT connections are idle it writes "ready COUNT SECONDS" to
READY_FILE (via a temporary name and a rename) and holds them. It exits by
itself after --hold seconds, or earlier on SIGTERM / SIGINT; the kernel
closes the sockets. Connections the server closes while they are held are
counted. Every wait is bounded: setup gives up after --setup seconds.

The last line on stdout is a summary of shell assignments:
    IDLE_OPEN=N IDLE_SETUP_S=S IDLE_CLOSED_DURING_HOLD=N IDLE_ERRORS=N
Exit status: 0 when all COUNT connections were set up, 1 otherwise, 2 on
bad arguments. Python 3 standard library only.
"""

import argparse
import errno
import os
import selectors
import signal
import socket
import sys
import time

ST_CONNECT, ST_SEND, ST_READ, ST_IDLE = range(4)
MAX_HEAD = 16384
MAX_BODY = 1 << 20


class Conn:
    __slots__ = ("sock", "state", "out", "buf", "need")

    def __init__(self, sock, request):
        self.sock = sock
        self.state = ST_CONNECT
        self.out = request
        self.buf = b""
        self.need = -1  # total bytes of the response once the head is parsed


def parse_response(c):
    """True when c.buf holds a whole 200 response; raises ValueError on garbage."""
    if c.need < 0:
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(c.buf) > MAX_HEAD:
                raise ValueError("response head too large")
            return False
        head = c.buf[:end].decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
            raise ValueError("unexpected status line %r" % head[0][:80])
        length = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and "close" in value.lower():
                raise ValueError("server answered Connection: close")
            elif name == "transfer-encoding":
                raise ValueError("chunked answers are not expected here")
        if length is None or length > MAX_BODY:
            raise ValueError("no usable Content-Length")
        c.need = end + 4 + length
    if len(c.buf) > c.need:
        raise ValueError("more bytes than the response")
    return len(c.buf) == c.need


def main():
    ap = argparse.ArgumentParser(description="hold idle keep-alive connections")
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("path")
    ap.add_argument("ready_file")
    ap.add_argument("--hold", type=float, default=30.0, help="seconds to hold once ready (max 600)")
    ap.add_argument("--setup", type=float, default=60.0, help="seconds allowed to set up (max 600)")
    ap.add_argument("--inflight", type=int, default=200, help="connections being set up at once")
    a = ap.parse_args()
    if not (1 <= a.count <= 100000 and 0 < a.hold <= 600 and 0 < a.setup <= 600 and 1 <= a.inflight <= 4096):
        ap.error("count 1..100000, hold and setup 0..600 s, inflight 1..4096")
    if a.host not in ("127.0.0.1", "::1", "localhost") and not a.host.startswith("127."):
        ap.error("loopback addresses only")

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    request = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: gatherd-bench-idle\r\n\r\n"
               % (a.path, a.host, a.port)).encode()
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    sel = selectors.DefaultSelector()
    conns = []
    started = idle = errors = 0
    first_error = ""
    t0 = time.monotonic()
    deadline = t0 + a.setup

    def fail(c, why):
        nonlocal errors, first_error
        errors += 1
        if not first_error:
            first_error = why
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        c.state = -1

    # setup: keep up to --inflight connections in progress until COUNT are idle
    while idle < a.count and not stop and time.monotonic() < deadline:
        while started < a.count and started - idle - errors < a.inflight:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setblocking(False)
            c = Conn(s, request)
            conns.append(c)
            started += 1
            rc = s.connect_ex((a.host, a.port))
            if rc not in (0, errno.EINPROGRESS):
                fail(c, "connect: " + os.strerror(rc))
                continue
            sel.register(s, selectors.EVENT_WRITE, c)
        if errors > 0:
            break
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            try:
                if c.state == ST_CONNECT:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        fail(c, "connect: " + os.strerror(err))
                        continue
                    c.state = ST_SEND
                if c.state == ST_SEND:
                    n = c.sock.send(c.out)
                    c.out = c.out[n:]
                    if not c.out:
                        c.state = ST_READ
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                if c.state == ST_READ:
                    data = c.sock.recv(65536)
                    if not data:
                        fail(c, "server closed before answering")
                        continue
                    c.buf += data
                    if parse_response(c):
                        c.state = ST_IDLE
                        c.buf = b""
                        idle += 1
                elif c.state == ST_IDLE:
                    # idle connections stay registered for reading: readable means closed
                    fail(c, "server closed an idle connection during setup")
            except (OSError, ValueError) as e:
                fail(c, str(e))
        if errors > 0:
            break

    setup_s = time.monotonic() - t0
    closed = 0
    if idle == a.count and errors == 0:
        tmp = "%s.tmp.%d" % (a.ready_file, os.getpid())
        with open(tmp, "w") as f:
            f.write("ready %d %.3f\n" % (idle, setup_s))
        os.rename(tmp, a.ready_file)
        print("idle_clients: %d idle keep-alive connections to %s:%d after %.2f s; holding up to %.0f s"
              % (idle, a.host, a.port, setup_s, a.hold), flush=True)
        hold_end = time.monotonic() + a.hold
        while not stop:
            left = hold_end - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                c = key.data
                try:
                    data = c.sock.recv(4096)
                except OSError:
                    data = b""
                sel.unregister(c.sock)
                c.sock.close()
                closed += 1
                if data:
                    errors += 1
                    first_error = first_error or "unexpected bytes on an idle connection"
    else:
        why = first_error or ("setup did not finish in %.0f s" % a.setup if not stop else "stopped")
        print("idle_clients: only %d of %d connections idle (%s)" % (idle, a.count, why), file=sys.stderr, flush=True)

    print("IDLE_OPEN=%d IDLE_SETUP_S=%.3f IDLE_CLOSED_DURING_HOLD=%d IDLE_ERRORS=%d"
          % (idle, setup_s, closed, errors), flush=True)
    for c in conns:
        if c.state != -1:
            c.sock.close()
    return 0 if idle == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
