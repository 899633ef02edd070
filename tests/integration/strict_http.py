"""strict_http - a strict HTTP/1.1 request parser (RFC 9112) and a raw-socket
backend built on it, for gatherd's request-side tests (Python 3 stdlib only).

parse_request(buf, pos, client) parses one request starting at buf[pos]:
  - returns (Msg, end) for a complete request,
  - raises Incomplete when more bytes are needed,
  - raises Bad(reason) for anything ambiguous or invalid: both Content-Length
    and Transfer-Encoding, two Content-Lengths (even equal), a length that is
    not 1*DIGIT or does not fit 63 bits, a Transfer-Encoding that is not
    exactly "chunked" (or any in HTTP/1.0), bad chunk syntax (every line
    ends in CRLF, data followed by CRLF, sizes are hex), obsolete line
    folding, a bare LF or a CR without LF anywhere outside data, control
    characters in names or values, a name that is not a token (a space
    before the colon), a missing (HTTP/1.1), repeated or invalid Host, a
    target that is neither origin-form nor absolute-form with a valid
    authority, an Expect other than 100-continue.
client=True is the model of what a client may send gatherd (leading empty
lines are ignored, HTTP/1.0 is allowed); client=False is what gatherd must
send a backend (HTTP/1.1 only, nothing before the request line).

StrictBackend listens on a free loopback port and parses every byte it
receives with parse_request(client=False). Each complete request is
recorded (Record) and answered 200 with "X-Backend-Seq: N" (N: the record's
index) and a small JSON body; "delay=MS" in the query delays the answer.
Anything Bad is recorded as a violation and the connection closed; a
connection that ends inside a request leaves an incomplete Record.
"""

import json
import re
import select
import socket
import threading
import time

TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
HEXDIG = frozenset(b"0123456789abcdefABCDEF")
UNRESERVED_SUB = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=")
INT63 = 2 ** 63 - 1


class Bad(Exception):
    pass


class Incomplete(Exception):
    pass


class Msg:
    def __init__(self):
        self.method = b""
        self.target = b""
        self.version = b""
        self.headers = []  # [(name, value)] as bytes, value without OWS
        self.body = b""  # decoded
        self.framing = "none"  # none | length | chunked
        self.keep_alive = True
        self.head_end = 0  # offset just after the empty line
        self.trailers = []

    def header_all(self, name):
        n = name.lower().encode() if isinstance(name, str) else name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def path(self):
        """The target without an absolute-form scheme and authority."""
        t = self.target
        m = re.match(rb"(?i)^https?://[^/?#]*", t)
        if m:
            t = t[m.end():] or b"/"
        return t

    def __repr__(self):
        return f"<Msg {self.method!r} {self.target!r} {self.framing} body={len(self.body)}>"


def host_valid(h):
    """host[:port]: reg-name (unreserved, sub-delims, %XX; not empty), IPv4,
    or [IPv6]; port 1-5 digits up to 65535 (gatherd's rule, RFC 3986)."""
    i = 0
    if h.startswith(b"["):
        j = h.find(b"]")
        if j < 2:
            return False
        try:
            socket.inet_pton(socket.AF_INET6, h[1:j].decode("ascii"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        i = j + 1
    else:
        while i < len(h) and h[i:i + 1] != b":":
            c = h[i]
            if c == 0x25:
                if i + 2 < len(h) and h[i + 1] in HEXDIG and h[i + 2] in HEXDIG:
                    i += 3
                    continue
                return False
            if c not in UNRESERVED_SUB:
                return False
            i += 1
        if i == 0:
            return False
    if i == len(h):
        return True
    port = h[i + 1:]
    return h[i:i + 1] == b":" and 1 <= len(port) <= 5 and port.isdigit() and int(port) <= 65535


def _line(buf, i):
    """Index of the CR ending the line that starts at i (strict CRLF)."""
    n = len(buf)
    j = i
    while j < n:
        b = buf[j]
        if b == 0x0A:
            raise Bad("bare LF")
        if b == 0x0D:
            if j + 1 >= n:
                raise Incomplete()
            if buf[j + 1] != 0x0A:
                raise Bad("CR not followed by LF")
            return j
        j += 1
    raise Incomplete()


def _field_value_ok(v):
    return all(c == 0x09 or 0x20 <= c <= 0x7E or c >= 0x80 for c in v)


def _fields(buf, i, what):
    """Header (or trailer) lines from i to the empty line: ([(name, value)], end)."""
    out = []
    while True:
        e = _line(buf, i)
        if e == i:
            return out, e + 2
        line = buf[i:e]
        if line[:1] in (b" ", b"\t"):
            raise Bad(f"obsolete line folding in {what}")
        c = line.find(b":")
        if c <= 0:
            raise Bad(f"{what} line without a name")
        name = line[:c]
        if any(ch not in TCHAR for ch in name):
            raise Bad(f"{what} name {name!r} is not a token")
        value = line[c + 1:].strip(b" \t")
        if not _field_value_ok(value):
            raise Bad(f"control character in {what} value {value!r}")
        out.append((name, value))
        i = e + 2


def _tokens(v):
    return [t.strip(b" \t").lower() for t in v.split(b",") if t.strip(b" \t")]


def parse_request(buf, pos=0, client=True):
    """One request from buf[pos:]: (Msg, end); raises Incomplete or Bad."""
    i = pos
    if client:
        while buf[i:i + 2] == b"\r\n":
            i += 2
    m = Msg()
    e = _line(buf, i)
    parts = buf[i:e].split(b" ")
    if len(parts) != 3 or not all(parts):
        raise Bad(f"request line {buf[i:e][:80]!r}")
    m.method, m.target, m.version = parts
    if any(c not in TCHAR for c in m.method):
        raise Bad("method is not a token")
    if any(c <= 0x20 or c == 0x7F for c in m.target):
        raise Bad("control character or space in the target")
    if m.version not in ((b"HTTP/1.1", b"HTTP/1.0") if client else (b"HTTP/1.1",)):
        raise Bad(f"version {m.version!r}")
    m.headers, i = _fields(buf, e + 2, "header")
    m.head_end = i
    hosts = m.header_all("host")
    if len(hosts) > 1 or (m.version == b"HTTP/1.1" and not hosts):
        raise Bad("no Host or more than one")
    if hosts and not host_valid(hosts[0]):
        raise Bad(f"invalid Host {hosts[0]!r}")
    t = m.target
    am = re.match(rb"(?i)^https?://([^/?#]*)", t)
    if am:
        if not host_valid(am.group(1)):
            raise Bad("invalid authority in the target")
    elif not t.startswith(b"/"):
        raise Bad("target is neither origin-form nor absolute-form")
    exp = m.header_all("expect")
    if exp and (len(exp) > 1 or exp[0].lower() != b"100-continue"):
        raise Bad("Expect other than 100-continue")
    conn = [tok for v in m.header_all("connection") for tok in _tokens(v)]
    m.keep_alive = b"close" not in conn and (m.version == b"HTTP/1.1" or b"keep-alive" in conn)
    te = m.header_all("transfer-encoding")
    cl = m.header_all("content-length")
    if te:
        if m.version != b"HTTP/1.1" or len(te) > 1 or te[0].lower() != b"chunked" or cl:
            raise Bad("Transfer-Encoding other than one chunked in HTTP/1.1 without Content-Length")
        m.framing = "chunked"
        return _chunked(buf, i, m)
    if cl:
        if len(cl) > 1 or not re.fullmatch(rb"[0-9]+", cl[0]) or int(cl[0]) > INT63:
            raise Bad(f"Content-Length {cl!r}")
        n = int(cl[0])
        m.framing = "length"
        if len(buf) - i < n:
            raise Incomplete()
        m.body = bytes(buf[i:i + n])
        return m, i + n
    return m, i


def _chunked(buf, i, m):
    body = []
    while True:
        e = _line(buf, i)
        line = buf[i:e]
        sc = line.find(b";")
        size, ext = (line, b"") if sc < 0 else (line[:sc], line[sc + 1:])
        if not size or any(c not in HEXDIG for c in size):
            raise Bad(f"chunk size {line[:40]!r}")
        if sc >= 0 and not _field_value_ok(ext):
            raise Bad("control character in a chunk extension")
        n = int(size, 16)
        i = e + 2
        if n == 0:
            m.trailers, end = _fields(buf, i, "trailer")
            m.body = b"".join(body)
            return m, end
        if len(buf) - i < n + 2:
            if len(buf) - i >= n and buf[i + n:i + n + 1] not in (b"\r", b""):
                raise Bad("chunk data not followed by CRLF")
            raise Incomplete()
        if buf[i + n:i + n + 2] != b"\r\n":
            raise Bad("chunk data not followed by CRLF")
        body.append(bytes(buf[i:i + n]))
        i += n + 2


def parse_stream(buf, client=True):
    """Every request in buf, in order, as a client connection would carry
    them to a server that stops at the first bad or incomplete one and after
    one that closes: (msgs, stop, reason) with stop one of "end", "close",
    "incomplete", "bad"."""
    msgs = []
    pos = 0
    while True:
        rest = buf[pos:]
        if not rest or (client and rest == b"\r\n" * (len(rest) // 2)):
            return msgs, "end", ""
        try:
            m, pos = parse_request(buf, pos, client)
        except Incomplete:
            return msgs, "incomplete", ""
        except Bad as e:
            return msgs, "bad", str(e)
        msgs.append(m)
        if not m.keep_alive:
            return msgs, "close", ""


# --- the backend -----------------------------------------------------------------------

class Record:
    """What the backend got: a whole request (complete=True) or the start
    of one whose connection ended (complete=False; msg None when not even
    its head was whole)."""

    def __init__(self, seq, conn, t_head, msg, complete, raw):
        self.seq = seq
        self.conn = conn
        self.t_head = t_head
        self.msg = msg
        self.complete = complete
        self.raw = raw

    def __repr__(self):
        return f"<Record {self.seq} conn {self.conn} {'complete' if self.complete else 'INCOMPLETE'} {self.msg!r}>"


class StrictBackend:
    """A threaded raw-socket backend on 127.0.0.1 (see the module doc)."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.lock = threading.Lock()
        self.records = []
        self.violations = []  # (time, conn, reason, raw bytes of the connection)
        self.nconns = 0
        self.open_conns = 0
        self.last_io = time.monotonic()  # the last accept, read or EOF
        self.busy = 0  # connections handling what they read
        self.closed = False
        self._socks = set()
        self._threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self):
        while not self.closed:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            self.last_io = time.monotonic()
            with self.lock:
                self.nconns += 1
                self.open_conns += 1
                cid = self.nconns
                self._socks.add(s)
            t = threading.Thread(target=self._serve, args=(s, cid), daemon=True)
            t.start()

    def _record(self, conn, t_head, msg, complete, raw):
        with self.lock:
            r = Record(len(self.records), conn, t_head, msg, complete, raw)
            self.records.append(r)
            return r

    def _serve(self, s, cid):
        buf = b""
        pos = 0
        t_head = None
        head_msg = None
        raw_all = b""
        busy = False
        s.settimeout(60)
        try:
            while True:
                try:
                    data = s.recv(65536)
                except (OSError, socket.timeout):
                    data = b""
                with self.lock:
                    self.busy += 1
                    busy = True
                self.last_io = time.monotonic()
                if not data:
                    if pos < len(buf):
                        self._record(cid, t_head or time.monotonic(), head_msg, False, buf[pos:])
                    return
                raw_all += data
                buf += data
                while pos < len(buf):
                    if t_head is None:
                        t_head = time.monotonic()
                    try:
                        m, end = parse_request(buf, pos, client=False)
                    except Incomplete:
                        if head_msg is None:
                            head_msg = _head_only(buf, pos)
                        break
                    except Bad as e:
                        with self.lock:
                            self.violations.append((time.monotonic(), cid, str(e), bytes(buf[pos:pos + 2000])))
                        return
                    r = self._record(cid, t_head, m, True, buf[pos:end])
                    pos = end
                    t_head = None
                    head_msg = None
                    if not self._answer(s, r):
                        return
                    if not m.keep_alive:
                        return
                if pos > 1 << 20:
                    buf = buf[pos:]
                    pos = 0
                with self.lock:
                    self.busy -= 1
                    busy = False
        finally:
            with self.lock:
                self.open_conns -= 1
                self._socks.discard(s)
                if busy:
                    self.busy -= 1
            try:
                s.close()
            except OSError:
                pass

    def _answer(self, s, r):
        m = r.msg
        q = m.path().partition(b"?")[2]
        delay = re.search(rb"(?:^|&)delay=(\d+)", q)
        if delay:
            time.sleep(int(delay.group(1)) / 1000.0)
        body = json.dumps({"seq": r.seq, "method": m.method.decode("latin-1"), "len": len(m.body)}).encode()
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Backend-Seq: %d\r\n"
                b"Content-Length: %d\r\n\r\n" % (r.seq, len(body)))
        try:
            s.sendall(head + (b"" if m.method == b"HEAD" else body))
        except OSError:
            return False
        return True

    def snapshot(self):
        with self.lock:
            return list(self.records), list(self.violations)

    def settle(self, timeout=5.0):
        """Waits until every byte (and EOF) that reached the backend's
        sockets was read and recorded. True when it was within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                socks = list(self._socks)
                busy = self.busy
            try:
                ready = select.select(socks, [], [], 0)[0] if socks else []
            except (OSError, ValueError):
                ready = socks  # one was closed meanwhile: look again
            if not ready and busy == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)

    def wait_records(self, n, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.records) >= n:
                    return True
            time.sleep(0.005)
        return False

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _head_only(buf, pos):
    """The head of an incomplete request, when it is whole (for attribution)."""
    try:
        m = Msg()
        e = _line(buf, pos)
        parts = buf[pos:e].split(b" ")
        if len(parts) == 3:
            m.method, m.target, m.version = parts
            m.headers, m.head_end = _fields(buf, e + 2, "header")
            return m
    except (Bad, Incomplete):
        pass
    return None


# --- responses as a client reads them ---------------------------------------------------

class Resp:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        n = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return None

    def __repr__(self):
        return f"<Resp {self.status} {self.body[:120]!r}>"


def parse_responses(data, methods):
    """The responses in data (a client connection's whole input), 1xx
    skipped; methods: the request methods in order (HEAD has no body).
    Returns (responses, leftover bytes)."""
    out = []
    i = 0
    k = 0
    while i < len(data):
        e = data.find(b"\r\n\r\n", i)
        if e < 0:
            return out, data[i:]
        lines = data[i:e].split(b"\r\n")
        st = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0])
        if not st:
            return out, data[i:]
        status = int(st.group(1))
        headers = []
        for ln in lines[1:]:
            a, _, b = ln.partition(b":")
            headers.append((a.strip(), b.strip()))
        i = e + 4
        if 100 <= status < 200:
            continue
        r = Resp(status, headers, b"")
        method = methods[k] if k < len(methods) else b"GET"
        k += 1
        cl = r.header("content-length")
        te = r.header("transfer-encoding")
        if method == b"HEAD" or status in (204, 304):
            pass
        elif te and b"chunked" in te.lower():
            body = b""
            while True:
                le = data.find(b"\r\n", i)
                if le < 0:
                    return out, data[i:]
                n = int(data[i:le].split(b";")[0], 16)
                i = le + 2
                if n == 0:
                    te2 = data.find(b"\r\n\r\n", i - 2)
                    i = te2 + 4 if te2 >= 0 else len(data)
                    break
                body += data[i:i + n]
                i += n + 2
            r.body = body
        elif cl is not None:
            n = int(cl)
            r.body = data[i:i + n]
            i += n
        else:
            r.body = data[i:]
            i = len(data)
        out.append(r)
    return out, b""
