#!/usr/bin/env python3
"""dnsstub - a small authoritative DNS server for tests (Python 3 stdlib only).

It answers A and AAAA questions over UDP from a table the test controls and
changes at run time, and counts the questions it got per name:

    dns = DnsStub()                      # 127.0.0.1, a free port, its own thread
    dns.set("api.test", a=["127.0.0.1", "127.0.0.2"], ttl=1)
    dns.set("gone.test", mode="nxdomain")   # or "servfail", "refused", "silent"
    dns.set("slow.test", a=["127.0.0.1"], delay=1.5)   # answer late
    ... resolver.nameservers = [dns.addr] in the gatherd config ...
    dns.count("api.test")                # A + AAAA questions so far
    dns.close()

Names not in the table get NXDOMAIN. Names compare without case and without a
final dot, and the question is echoed byte for byte (evdns randomizes the case
of the names it asks, "0x20", and checks the echo). A name with addresses of
one family only answers the other family with NOERROR and no records (NODATA).

Run as a script for manual use: python3 dnsstub.py [-l ADDR] [-p PORT]
NAME=IP[,IP...] ... (TTL 60 s) and it serves until interrupted.
"""

import ipaddress
import socket
import struct
import threading
import time

QTYPE_A = 1
QTYPE_AAAA = 28
RCODE = {"noerror": 0, "servfail": 2, "nxdomain": 3, "refused": 5}


def _norm(name):
    return name.lower().rstrip(".")


class DnsStub:
    def __init__(self, host="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.table = {}
        self.counts = {}       # name -> {"A": n, "AAAA": n}
        self.timers = []
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def addr(self):
        """The "IP:PORT" string for resolver.nameservers."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def set(self, name, a=(), aaaa=(), ttl=60, mode="answer", delay=0.0):
        """Defines (or redefines) name. mode: answer, nxdomain, servfail, refused or silent."""
        if mode not in ("answer", "silent") and mode not in RCODE:
            raise ValueError(f"unknown mode {mode!r}")
        with self.lock:
            self.table[_norm(name)] = {"a": list(a), "aaaa": list(aaaa), "ttl": int(ttl), "mode": mode,
                                       "delay": float(delay)}

    def remove(self, name):
        with self.lock:
            self.table.pop(_norm(name), None)

    def count(self, name, qtype=None):
        """Questions received for name (of one type "A"/"AAAA", or all)."""
        with self.lock:
            c = self.counts.get(_norm(name), {})
            return c.get(qtype, 0) if qtype else sum(c.values())

    def reset_counts(self):
        with self.lock:
            self.counts.clear()

    def close(self):
        self.closed = True
        with self.lock:
            for t in self.timers:
                t.cancel()
        try:
            self.sock.close()
        except OSError:
            pass

    # --- the server ---------------------------------------------------------------

    def _serve(self):
        while not self.closed:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                self._handle(data, peer)
            except Exception:  # a malformed question is dropped, the server goes on
                continue

    @staticmethod
    def _parse_question(data):
        """(id, flags, qname, qtype, end of the question) of a query."""
        qid, flags, qdcount = struct.unpack("!HHH", data[:6])
        if qdcount != 1:
            raise ValueError("one question expected")
        i = 12
        labels = []
        while True:
            n = data[i]
            if n == 0:
                i += 1
                break
            if n & 0xC0:
                raise ValueError("compression in a question")
            labels.append(data[i + 1:i + 1 + n].decode("ascii"))
            i += 1 + n
        qtype, qclass = struct.unpack("!HH", data[i:i + 4])
        return qid, flags, ".".join(labels), qtype, i + 4

    def _handle(self, data, peer):
        qid, flags, qname, qtype, qend = self._parse_question(data)
        name = _norm(qname)
        tname = {QTYPE_A: "A", QTYPE_AAAA: "AAAA"}.get(qtype, str(qtype))
        with self.lock:
            c = self.counts.setdefault(name, {})
            c[tname] = c.get(tname, 0) + 1
            entry = self.table.get(name)
            entry = dict(entry) if entry else None
        question = data[12:qend]  # echoed as sent: evdns checks the case of each letter
        rcode = RCODE["nxdomain"]
        answers = []
        ttl = 60
        if entry is not None:
            if entry["mode"] == "silent":
                return
            ttl = entry["ttl"]
            if entry["mode"] == "answer":
                rcode = 0
                if qtype == QTYPE_A:
                    answers = [(QTYPE_A, ipaddress.IPv4Address(x).packed) for x in entry["a"]]
                elif qtype == QTYPE_AAAA:
                    answers = [(QTYPE_AAAA, ipaddress.IPv6Address(x).packed) for x in entry["aaaa"]]
            else:
                rcode = RCODE[entry["mode"]]
        # QR, the query's opcode and RD, AA, RA, rcode
        rflags = 0x8000 | (flags & 0x7900) | 0x0400 | 0x0080 | rcode
        out = struct.pack("!HHHHHH", qid, rflags, 1, len(answers), 0, 0) + question
        for atype, rdata in answers:
            out += struct.pack("!HHHIH", 0xC00C, atype, 1, ttl, len(rdata)) + rdata
        delay = entry["delay"] if entry else 0.0
        if delay > 0:
            t = threading.Timer(delay, self._send, (out, peer))
            t.daemon = True
            with self.lock:
                self.timers.append(t)
            t.start()
        else:
            self._send(out, peer)

    def _send(self, out, peer):
        try:
            self.sock.sendto(out, peer)
        except OSError:
            pass


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="a tiny test DNS server")
    ap.add_argument("-l", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("-p", type=int, default=0, help="UDP port (default: a free one)")
    ap.add_argument("names", nargs="*", help="NAME=IP[,IP...]")
    args = ap.parse_args()
    stub = DnsStub(args.l, args.p)
    for spec in args.names:
        n, _, ips = spec.partition("=")
        ips = [x for x in ips.split(",") if x]
        stub.set(n, a=[x for x in ips if ":" not in x], aaaa=[x for x in ips if ":" in x])
    print(f"dnsstub listening on {stub.addr}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.close()
