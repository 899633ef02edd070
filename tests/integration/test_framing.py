#!/usr/bin/env python3
"""The framing oracle: what a backend behind a gatherd proxy route receives
must be exactly the requests gatherd accepted, with exactly the bodies the
client framed, and nothing else.

A strict raw-socket backend (strict_http.StrictBackend) parses every byte
gatherd sends it with a strict RFC 9112 parser and records each request.
Client byte streams come from a matrix of known cases, a seeded random
generator of valid and hostile requests (pipelines, keep-alive sequences,
Content-Length and chunked bodies with extensions and trailers, CL+TE, TE
variants, odd and huge lengths, chunk size overflow, bare LF and CR,
obs-fold, NUL and CR in headers, space before the colon, requests inside
bodies, absolute-form targets, bad Host, byte flips and truncation), and
the libFuzzer corpus of tests/fuzz/corpus/request. The same strict parser,
as a model of the client side (strict_http.parse_stream), decodes each
client stream into the requests it carries, up to the first one that is
invalid (ambiguous) or incomplete, or one that closes the connection.

Oracle, per case (one client connection; cases run one after another, so
what the backend records during a case belongs to it):
  - the backend saw no invalid framing, ever;
  - the whole requests it got are a prefix of the model's requests, in
    order: same method, same body bytes, same target where the target is
    plain; so nothing the model calls invalid, and no request hidden in a
    body, ever reaches it whole;
  - the client got, in order, exactly one backend answer per whole request
    the backend got, then at most one answer of gatherd's own (400 or more,
    after which nothing), then the connection closed;
  - a request the backend got only in part (its body streamed, then found
    bad) has no backend answer.

Seed: GW_FUZZ_SEED (default fixed, printed); count: GW_FUZZ_CASES.
Run: GATHERD=/path/to/gatherd python3 tests/integration/test_framing.py [NAME-SUBSTRING ...]
"""

import os
import random
import re
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import SLOW, Daemon, TestFailure, check, main, test  # noqa: E402
from strict_http import StrictBackend, parse_responses, parse_stream  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.environ.get("GW_SRCDIR") or os.path.normpath(os.path.join(HERE, "..", ".."))
SEED = int(os.environ.get("GW_FUZZ_SEED") or 20261204)
CASES = int(os.environ.get("GW_FUZZ_CASES") or 4000)
MAX_BODY = 65536
PLAIN_TARGET = re.compile(rb"^/[A-Za-z0-9/_-]*(\?[A-Za-z0-9=&_-]*)?$")


class Oracle:
    """One gatherd with a proxy route for everything, in front of the strict
    backend; run(raw) sends a client stream and checks the oracle."""

    def __init__(self):
        self.backend = StrictBackend()
        cfg = {"listen": ["127.0.0.1:PORT"],
               "http": {"max_body_bytes": MAX_BODY, "client_header_timeout_ms": int(5000 * SLOW),
                        "client_body_timeout_ms": int(5000 * SLOW)},
               "backends": {"b": {"url": self.backend.url, "timeout_ms": int(10000 * SLOW)}},
               "routes": [{"path": "/*", "proxy": {"backend": "b"}}]}
        self.d = Daemon(cfg, workers=2)
        self.stats = {"cases": 0, "forwarded": 0, "refused": 0, "partial": 0, "model_bad": 0,
                      "model_incomplete": 0, "refused_valid": 0}
        self.refused_valid = {}
        self.cases = []  # (name, start time, client bytes, bytes the client got)

    def close(self):
        self.backend.close()

    def exchange(self, raw, pieces=None, keepalive=False):
        """Sends raw (in pieces when given) on a new connection, shuts down
        the write side, and returns everything until the server closes.
        keepalive: requests are sent one by one, each after the previous
        answer (raw is then a list of requests)."""
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=10 * SLOW)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b""
        try:
            if keepalive:
                try:
                    for one in raw:
                        s.sendall(one)
                        data += _read_one_response(s, one)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            else:
                try:
                    for p in (pieces or [raw]):
                        s.sendall(p)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # refused and closed while sending: what arrived is checked
            deadline = time.monotonic() + 10 * SLOW
            while True:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                except socket.timeout:
                    raise TestFailure(f"gatherd did not close the connection within 10 s; got {data[:300]!r}")
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        return data

    def run(self, name, raw, pieces=None, keepalive=False):
        """One case: sends it and keeps what the client got; check() judges
        every case once the backend has recorded all."""
        self.backend.settle()
        stream = b"".join(raw) if keepalive else raw
        t_start = time.monotonic()
        data = self.exchange(raw, pieces, keepalive)
        self.cases.append((name, t_start, stream, data))

    def check(self):
        """The oracle over every case run so far: a list of failures."""
        time.sleep(0.1 * SLOW)
        self.backend.settle(5 * SLOW)
        recs, viol = self.backend.snapshot()
        failures = []
        if viol:
            failures.append(f"framing the strict backend refused: {viol[0][2]}: {viol[0][3][:300]!r}")
        # a record belongs to the case whose tag its target carries, else to
        # the last case that had started when its first byte was read
        by_tag = {}
        for k, (name, _, stream, _) in enumerate(self.cases):
            for t in set(re.findall(rb"/f/([0-9a-z]+)/", stream)):
                by_tag.setdefault(t, k)
        starts = [c[1] for c in self.cases]
        owned = [[] for _ in self.cases]
        for r in recs:
            k = None
            m = re.search(rb"/f/([0-9a-z]+)/", r.msg.target) if r.msg else None
            if m and m.group(1) in by_tag:
                k = by_tag[m.group(1)]
            else:
                k = max((i for i, t in enumerate(starts) if t <= r.t_head), default=0)
            owned[k].append(r)
        for k, (name, _, stream, data) in enumerate(self.cases):
            f = self._judge(name, stream, data, owned[k])
            if f:
                failures.append(f)
        return failures

    def _judge(self, name, stream, data, recs):
        model, stop, why = parse_stream(stream, client=True)
        self.stats["cases"] += 1
        self.stats["model_" + stop] = self.stats.get("model_" + stop, 0) + 1
        methods = [m.method for m in model] + [b"GET"]
        resps, rest = parse_responses(data, methods)
        backend_answers = [r for r in resps if r.header("x-backend-seq") is not None]
        whole = [r for r in recs if r.complete]
        part = [r for r in recs if not r.complete]
        problems = []
        if len(whole) > len(model):
            problems.append(f"the backend got {len(whole)} whole requests, the client sent {len(model)} valid "
                            f"ones (model stops: {stop} {why})")
        for i, r in enumerate(whole[:len(model)]):
            m = model[i]
            if r.msg.method != m.method:
                problems.append(f"request {i}: method {r.msg.method!r} at the backend, {m.method!r} sent")
            if r.msg.body != m.body:
                problems.append(f"request {i}: body of {len(r.msg.body)} bytes at the backend, {len(m.body)} sent "
                                f"({r.msg.body[:60]!r} vs {m.body[:60]!r})")
            if PLAIN_TARGET.match(m.path()) and b"//" not in m.path() and r.msg.target != m.path():
                problems.append(f"request {i}: target {r.msg.target!r} at the backend, {m.path()!r} sent")
        seqs = [int(r.header("x-backend-seq")) for r in backend_answers]
        if seqs != [r.seq for r in whole]:
            problems.append(f"backend answers at the client {seqs}, requests at the backend {[r.seq for r in whole]}")
        if resps[:len(backend_answers)] != backend_answers:
            problems.append("a gatherd answer came before a backend answer")
        own = resps[len(backend_answers):]
        if len(own) > 1 or any(r.status < 400 for r in own):
            problems.append(f"after the backend answers: {own!r} (at most one error of gatherd's own)")
        if rest:
            problems.append(f"bytes after the answers: {rest[:200]!r}")
        if len(part) > 1:
            problems.append(f"{len(part)} cut requests at the backend")
        if part and whole and part[0].seq < whole[-1].seq:
            problems.append("a cut request before a whole one")
        self.stats["forwarded"] += len(whole)
        self.stats["partial"] += len(part)
        if own:
            self.stats["refused"] += 1
            if len(whole) < len(model):
                self.stats["refused_valid"] += 1
                self.refused_valid.setdefault(own[0].status, name)
        if problems:
            return (f"case {name}: " + "; ".join(problems) + f"\n#   client bytes: {stream[:600]!r}"
                    + f"\n#   answers: {resps!r}\n#   backend: {recs!r}")
        return None


def _read_one_response(s, request):
    """Reads one whole response (1xx skipped) from a blocking socket."""
    buf = b""
    method = request.split(b" ", 1)[0]
    while True:
        resps, rest = parse_responses(buf, [method])
        if resps and not rest:
            return buf
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk


# --- building requests ---------------------------------------------------------------------

CRLF = b"\r\n"
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]


class Req:
    """A request as parts, so that mutations can aim at one of them."""

    def __init__(self, line, headers, body=b"", eol=CRLF):
        self.line = line          # [method, target, version]
        self.headers = headers    # [(name, value)]
        self.body = body          # framed bytes
        self.eol = eol

    def bytes(self):
        out = b" ".join(self.line) + self.eol
        for n, v in self.headers:
            out += n + b": " + v + self.eol
        return out + self.eol + self.body


def rand_body(rng, cid):
    n = rng.choice([0, 1, 5, 17, 200, 1000, 4000, rng.randrange(0, 20000)])
    kind = rng.random()
    if kind < 0.2:
        # a whole request inside the body: it must arrive as body bytes
        inner = b"GET /f/" + cid + b"/s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        return inner * rng.randrange(1, 4)
    if kind < 0.3:
        return b"0\r\n\r\n" + b"x" * rng.randrange(0, 50)
    return bytes(rng.randrange(256) for _ in range(min(n, 64))) * (n // 64 + 1)


def chunk_body(rng, body):
    """body as chunks: random sizes, some with an extension, hex in either case,
    sometimes leading zeros; a trailer sometimes."""
    out = b""
    i = 0
    while i < len(body):
        n = min(len(body) - i, rng.choice([1, 3, 16, 100, 1000, 5000, 70000]))
        size = b"%x" % n
        if rng.random() < 0.2:
            size = size.upper()
        if rng.random() < 0.1:
            size = b"000" + size
        ext = b""
        r = rng.random()
        if r < 0.1:
            ext = b";name=value"
        elif r < 0.15:
            ext = b';q="quoted value"'
        elif r < 0.18:
            ext = b";flag"
        out += size + ext + CRLF + body[i:i + n] + CRLF
        i += n
    out += b"0" + CRLF
    if rng.random() < 0.15:
        out += b"X-Trailer: t" + CRLF + b"X-Forwarded-For: 6.6.6.6" + CRLF
    return out + CRLF


def valid_request(rng, cid, k, last=False):
    method = rng.choice(METHODS)
    target = b"/f/" + cid + b"/%d" % k
    if rng.random() < 0.3:
        target += b"?a=%d&b=x-y_z" % rng.randrange(1000)
    version = b"HTTP/1.1" if rng.random() < 0.9 else b"HTTP/1.0"
    host = rng.choice([b"t", b"api.example", b"api.example:8080", b"127.0.0.1", b"[::1]:80", b"a-b.c_d~e"])
    if rng.random() < 0.08:
        target = b"http://" + host + target
    headers = [(b"Host", host)]
    for _ in range(rng.randrange(0, 4)):
        headers.append((rng.choice([b"X-A", b"Accept", b"X-Long", b"User-Agent", b"X-Empty"]),
                        rng.choice([b"v", b"a, b", b"x" * rng.randrange(0, 300), b"", b"caf\xc3\xa9"])))
    body = b""
    has_body = method in (b"POST", b"PUT", b"PATCH") or rng.random() < 0.1
    if has_body:
        data = rand_body(rng, cid)
        if version == b"HTTP/1.1" and rng.random() < 0.4:
            headers.append((b"Transfer-Encoding", rng.choice([b"chunked", b"chunked", b"Chunked"])))
            body = chunk_body(rng, data)
        else:
            headers.append((b"Content-Length", b"%d" % len(data)))
            body = data
        if rng.random() < 0.1 and version == b"HTTP/1.1":
            headers.append((b"Expect", b"100-continue"))
    rng.shuffle(headers)
    if version == b"HTTP/1.0" and not last:
        headers.append((b"Connection", b"keep-alive"))
    elif last and rng.random() < 0.3:
        headers.append((b"Connection", b"close"))
    return Req([method, target, version], headers, body)


def set_header(r, name, value, replace=True):
    n = name.lower()
    if replace:
        r.headers = [(k, v) for k, v in r.headers if k.lower() != n]
    r.headers.append((name, value))


def framed_request(rng, cid, k):
    """A request with a body and Content-Length framing (for length mutations)."""
    data = rand_body(rng, cid) or b"abc"
    return Req([b"POST", b"/f/" + cid + b"/%d" % k, b"HTTP/1.1"],
               [(b"Host", b"t"), (b"Content-Length", b"%d" % len(data))], data)


def chunked_request(rng, cid, k):
    data = rand_body(rng, cid) or b"abc"
    return Req([b"POST", b"/f/" + cid + b"/%d" % k, b"HTTP/1.1"],
               [(b"Host", b"t"), (b"Transfer-Encoding", b"chunked")], chunk_body(rng, data))


def m_cl_and_te(rng, r, cid, k):
    r = chunked_request(rng, cid, k) if rng.random() < 0.5 else framed_request(rng, cid, k)
    if any(n == b"Content-Length" for n, _ in r.headers):
        set_header(r, b"Transfer-Encoding", b"chunked", replace=False)
    else:
        set_header(r, b"Content-Length", b"%d" % rng.randrange(0, 10), replace=False)
    rng.shuffle(r.headers)
    return r


def m_te_variant(rng, r, cid, k):
    r = chunked_request(rng, cid, k)
    v = rng.choice([b"chunked, identity", b"identity, chunked", b"xchunked", b"chunked;q=1", b"chunke", b"gzip",
                    b"gzip, chunked", b"chunked, chunked", b" chunked", b"CHUNKED", b"chunked ", b"\tchunked",
                    b"chunked\x00", b"chunked\x0b", b"", b"identity"])
    set_header(r, b"Transfer-Encoding", v)
    if rng.random() < 0.3:
        set_header(r, b"Transfer-Encoding", b"chunked", replace=False)
    if rng.random() < 0.2:
        r.line[2] = b"HTTP/1.0"
    return r


def m_cl_variant(rng, r, cid, k):
    r = framed_request(rng, cid, k)
    n = len(r.body)
    v = rng.choice([b"%d" % n, b"0%d" % n, b"-%d" % n, b"+%d" % n, b"0x%x" % n, b"%d %d" % (n, n), b"%d,%d" % (n, n),
                    b"", b"%d.0" % n, b"9223372036854775807", b"9223372036854775808", b"18446744073709551615",
                    b"18446744073709551616", b"99999999999999999999999", b"%d" % (n + 1), b"%d" % max(0, n - 1),
                    b"%d" % (MAX_BODY + 1)])
    set_header(r, b"Content-Length", v)
    if rng.random() < 0.3:
        set_header(r, b"Content-Length", rng.choice([b"%d" % n, b"0", b"%d" % (n + 5)]), replace=False)
    return r


def m_chunk_syntax(rng, r, cid, k):
    data = rand_body(rng, cid) or b"hello"
    r = Req([b"POST", b"/f/" + cid + b"/%d" % k, b"HTTP/1.1"], [(b"Host", b"t"), (b"Transfer-Encoding", b"chunked")])
    n = len(data)
    size = b"%x" % n
    kind = rng.randrange(12)
    if kind == 0:
        body = b"1" + b"0" * 17 + CRLF + data + CRLF + b"0\r\n\r\n"          # past 2^64
    elif kind == 1:
        body = b"ffffffffffffffff" + CRLF + data + CRLF + b"0\r\n\r\n"       # 2^64-1
    elif kind == 2:
        body = b"%x" % (n + rng.choice([-1, 1])) + CRLF + data + CRLF + b"0\r\n\r\n"  # size mismatch
    elif kind == 3:
        body = size + b"\n" + data + b"\n0\n\n"                           # LF only
    elif kind == 4:
        body = size + b"\r" + data + b"\r0\r\r"                           # CR only
    elif kind == 5:
        body = size + CRLF + data + b"0\r\n\r\n"                          # no CRLF after data
    elif kind == 6:
        body = size + b";a\x01b" + CRLF + data + CRLF + b"0\r\n\r\n"      # control in an extension
    elif kind == 7:
        body = size + CRLF + data + CRLF + b"0\r\nX: a\r\n folded\r\n\r\n"  # obs-fold in a trailer
    elif kind == 8:
        body = size + CRLF + data + CRLF + b"0\r\nX: a\n\r\n"             # bare LF in a trailer
    elif kind == 9:
        body = size + CRLF + data + CRLF + b"0\r\n"                       # no last CRLF
    elif kind == 10:
        body = size + b"\rX" + data + CRLF + b"0\r\n\r\n"                 # CR then not LF
    else:
        body = b" " + size + CRLF + data + CRLF + b"0\r\n\r\n"            # space before the size
    r.body = body
    return r


def m_line_ends(rng, r, cid, k):
    kind = rng.randrange(4)
    if kind == 0:
        r.eol = b"\n"
    elif kind == 1:
        r.eol = b"\r"
    else:
        i = rng.randrange(len(r.headers) + 1)
        if i == len(r.headers):
            r.line[2] += b"\n"
        else:
            n, v = r.headers[i]
            r.headers[i] = (n, v + (b"\n" if kind == 2 else b"\r") + b"X-Next: 1")
    return r


def m_header_syntax(rng, r, cid, k):
    kind = rng.randrange(9)
    if kind == 0:
        r.headers.append((b"Content-Length ", b"0"))   # space before the colon
    elif kind == 1:
        r.headers.append((b"Transfer-Encoding\t", b"chunked"))
    elif kind == 2:
        r.headers.append((b"X A", b"1"))
    elif kind == 3:
        r.headers.append((b"X-N", b"a\x00b"))
    elif kind == 4:
        r.headers.append((b"X-C", b"a\rb"))
    elif kind == 5:
        r.headers.append((b"X-F", b"a\r\n Content-Length: 5"))  # obs-fold
    elif kind == 6:
        r.headers.append((b"", b"x"))
    elif kind == 7:
        r.headers.append((b"X-F", b"a\r\n\tTransfer-Encoding: chunked"))
    else:
        r.headers.insert(0, (b" X-Lead", b"1"))
    return r


def m_request_line(rng, r, cid, k):
    kind = rng.randrange(9)
    if kind == 0:
        r.line[0] += b" "
    elif kind == 1:
        r.line = [r.line[0] + b"\t" + r.line[1], r.line[2]]
    elif kind == 2:
        r.line[2] = b"http/1.1"
    elif kind == 3:
        r.line[2] = rng.choice([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"HTTP/1"])
    elif kind == 4:
        r.line.append(b"junk")
    elif kind == 5:
        r.line = r.line[:2]
    elif kind == 6:
        r.line[1] = rng.choice([b"*", b"f/x", b"example.com:80", b"/a b", b"/a\x7f", b"/a#frag"])
    elif kind == 7:
        r.line[0] = rng.choice([b"get", b"G ET", b"CONNECT", b"FOO", b"PRI"])
    else:
        r.line[1] = r.line[1] + b"/../../x"
    return r


def m_host(rng, r, cid, k):
    kind = rng.randrange(8)
    if kind == 0:
        set_header(r, b"Host", rng.choice([b"a b", b"evil.com/../x", b"u@h", b"h:99999", b"", b"h:", b"[::1",
                                           b"a\\b", b"%zz", b"h:80:80"]))
    elif kind == 1:
        set_header(r, b"Host", b"t", replace=False)
    elif kind == 2:
        r.headers = [(n, v) for n, v in r.headers if n.lower() != b"host"]
        r.line[2] = b"HTTP/1.1"
    elif kind == 3:
        r.line[1] = rng.choice([b"http://a b", b"http://u@h", b"http://", b"http://h:99999", b"https://[x]"]) + \
            b"/f/" + cid + b"/%d" % k
    elif kind == 4:
        r.line[1] = b"http://other.example:81/f/" + cid + b"/%d" % k
    else:
        set_header(r, b"Host", rng.choice([b"t", b"T.EXAMPLE.", b"[::1]", b"1.2.3.4:1", b"%41"]))
    return r


def m_smuggle_in_body(rng, r, cid, k):
    inner = b"GET /f/" + cid + b"/s HTTP/1.1\r\nHost: x\r\n\r\n"
    r = Req([b"POST", b"/f/" + cid + b"/%d" % k, b"HTTP/1.1"], [(b"Host", b"t")])
    kind = rng.randrange(4)
    if kind == 0:
        r.headers.append((b"Content-Length", b"%d" % len(inner)))
        r.body = inner
    elif kind == 1:
        r.headers.append((b"Transfer-Encoding", b"chunked"))
        r.body = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    elif kind == 2:
        r.headers += [(b"Content-Length", b"%d" % len(inner)), (b"Transfer-Encoding", b"chunked")]
        r.body = b"0\r\n\r\n" + inner
    else:
        r.headers += [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")]
        r.body = b"0\r\n\r\n" + inner
    return r


MUTATIONS = [m_cl_and_te, m_te_variant, m_cl_variant, m_chunk_syntax, m_line_ends, m_header_syntax,
             m_request_line, m_host, m_smuggle_in_body]


def byte_noise(rng, raw):
    raw = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        if not raw:
            break
        i = rng.randrange(len(raw))
        op = rng.randrange(3)
        if op == 0:
            raw[i] = rng.choice(b"\r\n \t:\x00;0f\x7f\xff")
        elif op == 1:
            raw.insert(i, rng.choice(b"\r\n \t:\x00;0f,"))
        else:
            del raw[i]
    return bytes(raw)


def gen_case(rng, n):
    """(name, raw, pieces, keepalive) of random case n."""
    cid = b"%08x" % rng.getrandbits(32)
    nreq = rng.choice([1, 1, 1, 2, 3, 5])
    reqs = [valid_request(rng, cid, k, last=(k == nreq - 1)) for k in range(nreq)]
    kind = rng.random()
    name = f"random {n}"
    if kind < 0.12:
        return name + " keep-alive", [r.bytes() for r in reqs if b"Expect" not in r.bytes()] or [reqs[0].bytes()], \
            None, True
    if kind < 0.72:
        k = rng.randrange(nreq)
        mut = rng.choice(MUTATIONS)
        reqs[k] = mut(rng, reqs[k], cid, k)
        name += " " + mut.__name__
    raw = b"".join(r.bytes() for r in reqs)
    if rng.random() < 0.12:
        raw = byte_noise(rng, raw)
        name += " noise"
    if rng.random() < 0.05:
        raw = raw[:rng.randrange(len(raw) + 1)]
        name += " cut"
    pieces = None
    if rng.random() < 0.15:
        cuts = sorted(rng.randrange(len(raw) + 1) for _ in range(rng.randrange(1, 6)))
        pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    return name, raw, pieces, False


MATRIX = {
    "get": b"GET /f/m/1 HTTP/1.1\r\nHost: t\r\n\r\n",
    "cl body": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    "pipelined": b"GET /f/m/1 HTTP/1.1\r\nHost: t\r\n\r\nPOST /f/m/2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                 b"GET /f/m/3 HTTP/1.1\r\nHost: t\r\n\r\n",
    "cl 2^63": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 9223372036854775808\r\n\r\n"
               b"GET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
    "cl 2^64-1": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551615\r\n\r\n"
                 b"GET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
    "cl+te": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"0\r\n\r\nGET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
    "te+cl": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n"
             b"0\r\n\r\nGET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
    "te chunked, identity": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te xchunked": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te gzip, chunked": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "two cl": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n"
              b"GET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
    "chunk bare cr": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\rXabc\r\n0\r\n\r\n",
    "chunk last bare lf": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\n"
                          b"GET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
    "chunk 2^64-1": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc",
    "obs-fold": b"GET /f/m/1 HTTP/1.1\r\nHost: t\r\nX: y\r\n Content-Length: 5\r\n\r\nGET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
    "space before colon": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello",
    "bad host": b"GET /f/m/1 HTTP/1.1\r\nHost: evil.com/../x\r\n\r\n",
    "absolute-form": b"GET http://a.example:81/f/m/1 HTTP/1.1\r\nHost: b\r\n\r\n",
    "smuggle in body": b"POST /f/m/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 37\r\n\r\n"
                       b"GET /f/m/s HTTP/1.1\r\nHost: t\r\n\r\n",
}


@test
def framing_matrix_and_fuzz():
    o = Oracle()
    t0 = time.monotonic()
    try:
        for i, (name, raw) in enumerate(MATRIX.items()):
            o.run("matrix " + name, raw.replace(b"/f/m/", b"/f/m%d/" % i))
        # the libFuzzer corpus of the request parser (its first byte is the driver's split point)
        cdir = os.path.join(SRCDIR, "tests", "fuzz", "corpus", "request")
        corpus = sorted(os.listdir(cdir)) if os.path.isdir(cdir) else []
        check(corpus, f"no corpus in {cdir}")
        seeds = []
        for fn in corpus:
            with open(os.path.join(cdir, fn), "rb") as fh:
                seeds.append(fh.read()[1:])
            o.run("corpus " + fn, seeds[-1])
        rng = random.Random(SEED)
        print(f"# seed {SEED} (GW_FUZZ_SEED), {CASES} cases (GW_FUZZ_CASES)")
        for n in range(CASES):
            name, raw, pieces, ka = gen_case(rng, n)
            o.run(name, raw, pieces, ka)
            if n % 40 == 0:  # the corpus, mutated
                o.run(f"corpus mutated {n}", byte_noise(rng, seeds[n // 40 % len(seeds)]))
        failures = o.check()
    finally:
        o.close()
    dt = time.monotonic() - t0
    st = o.stats
    print(f"# {st['cases']} cases in {dt:.1f}s: {st['forwarded']} requests forwarded whole, {st['partial']} cut, "
          f"{st['refused']} refused by gatherd ({st['refused_valid']} of them valid by the model: "
          f"{dict(sorted(o.refused_valid.items()))}); model: {st.get('model_end', 0)} ended, "
          f"{st.get('model_close', 0)} closed, {st.get('model_bad', 0)} bad, {st.get('model_incomplete', 0)} incomplete")
    check(not failures, f"{len(failures)} cases broke the oracle (seed {SEED}):\n" + "\n".join(failures[:5]))
    check(st["forwarded"] > CASES // 2 and st["refused"] > CASES // 10, "the generator lost its balance: " + repr(st))


if __name__ == "__main__":
    sys.exit(main())
