#!/usr/bin/env python3
"""Integration tests of backend host names: the real daemon resolving them
with evdns against tests/integration/dnsstub.py (a DNS server on loopback
that the test controls), in front of the stub backend.

Every configuration here names its nameservers (the dnsstub), so no test
ever asks the machine's own resolver.

Run: GATHERD=/path/to/gatherd GW_STUB=/path/to/gw_stub \
         python3 tests/integration/test_dns.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import (SLOW, Daemon, TempDir, TestFailure, check, contains, eq, ipv6_loopback_available, main,  # noqa: E402
                    run_cli)
from dnsstub import DnsStub  # noqa: E402

# The proxy tests' stub launcher, backend helpers and TLS backend, without
# their tests: importing test_proxy registers them, so the registry is put
# back as it was.
_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

ms = tp.ms
get = tp.get


def dtest(fn):
    """A test whose DnsStubs, stubs and clients are closed when it ends."""
    return tp.ptest(fn)


def dns_stub():
    d = DnsStub()
    tp._resources.append(d)
    return d


def stub_at(host, port):
    """gw_stub on host:port exactly (two stubs on one port at 127.0.0.1 and
    127.0.0.2 stand for one name's two addresses)."""
    return tp.Stub(host, port=port)


def two_stubs():
    """Stubs on 127.0.0.1:P and 127.0.0.2:P (both loopback on Linux)."""
    for _ in range(5):
        s1 = tp.Stub("127.0.0.1")
        try:
            s2 = stub_at("127.0.0.2", s1.port)
            return s1, s2
        except TestFailure:
            s1.close()
    raise TestFailure("could not start two stubs on one port")


def stubs_on_one_port(n):
    """n stubs on 127.0.0.1:P, 127.0.0.2:P, ... (all loopback on Linux): one
    name's n addresses."""
    for _ in range(5):
        first = tp.Stub("127.0.0.1")
        out = [first]
        try:
            for k in range(2, n + 1):
                out.append(stub_at(f"127.0.0.{k}", first.port))
            return out
        except TestFailure:
            for s in out:
                s.close()
    raise TestFailure(f"could not start {n} stubs on one port")


def resolver(dns, **opts):
    r = {"nameservers": [dns.addr]}
    r.update(opts)
    return r


def dns_daemon(url, dns, workers=1, res=None, **opts):
    """gatherd with backend "b" at url (a host name), resolving through dns."""
    cfg = tp.config({"b": tp.backend(url, **opts)}, resolver=res if res is not None else resolver(dns))
    return Daemon(cfg, workers=workers)


def error_code(r):
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


def one_request(d, path="/legacy/x"):
    """One request on a new client connection."""
    with d.connect() as c:
        return c.request(get(path))


# ------------------------------------------------------------------ basics

@dtest
def dns_proxy_to_a_host_name():
    dns = dns_stub()
    s = tp.Stub()
    dns.set("api.test", a=["127.0.0.1"])
    d = dns_daemon(f"http://api.test:{s.port}", dns)
    with d.connect() as c:
        r, echo = tp.echo(c)
        eq(r.status, 200, "status through a host-name backend")
        eq(echo["headers"].get("host") or echo["headers"].get("Host"), f"api.test:{s.port}", "Host sent upstream")
        r = c.request(get("/legacy/y"))
        eq(r.status, 200, "second request")
    check(dns.count("api.test", "A") >= 1 and dns.count("api.test", "AAAA") >= 1,
          f"A and AAAA were asked: {dns.counts}")


@dtest
def dns_all_addresses_are_used_in_turn():
    s1, s2 = two_stubs()
    dns = dns_stub()
    dns.set("pair.test", a=["127.0.0.1", "127.0.0.2"])
    # max_idle 0: every request makes a new connection, so each picks an address
    d = dns_daemon(f"http://pair.test:{s1.port}", dns, max_idle=0)
    statuses = [one_request(d).status for _ in range(10)]
    eq(statuses, [200] * 10, "statuses")
    n1, n2 = s1.stats()["requests"], s2.stats()["requests"]
    eq(n1 + n2, 10, "requests seen by the two stubs")
    check(n1 >= 4 and n2 >= 4, f"both addresses are used in turn: 127.0.0.1 got {n1}, 127.0.0.2 got {n2}")


@dtest
def dns_ttl_is_honoured_and_a_changed_answer_is_picked_up():
    s1, s2 = two_stubs()
    dns = dns_stub()
    dns.set("ttl.test", a=["127.0.0.1"], ttl=2)
    d = dns_daemon(f"http://ttl.test:{s1.port}", dns, max_idle=0,
                   res=resolver(dns, min_ttl_ms=1000, max_ttl_ms=60000))
    t0 = time.monotonic()
    for _ in range(15):
        eq(one_request(d).status, 200, "status while the TTL is valid")
    elapsed = time.monotonic() - t0
    if elapsed < 1.8:
        eq(dns.count("ttl.test"), 2, "questions (one A, one AAAA) for 15 new connections within the TTL")
    else:
        check(dns.count("ttl.test") <= 2 * (1 + int(elapsed / 2)), f"questions: {dns.count('ttl.test')}")
    eq(s2.stats()["requests"], 0, "the second address is not in the answer yet")
    dns.set("ttl.test", a=["127.0.0.2"], ttl=2)
    time.sleep(2.3)
    # The first request after expiry starts the refresh and still uses the old
    # address; the new one is used as soon as the answer is in.
    deadline = time.monotonic() + 5 * SLOW
    while s2.stats()["requests"] == 0:
        if time.monotonic() > deadline:
            raise TestFailure(f"the changed answer was not used; log:\n{d.log()[-2000:]}")
        eq(one_request(d).status, 200, "status across the refresh")
        time.sleep(0.02)
    before = s1.stats()["requests"]
    for _ in range(5):
        eq(one_request(d).status, 200, "status after the refresh")
    eq(s1.stats()["requests"], before, "no request goes to the old address after the refresh")
    check(dns.count("ttl.test") <= 6, f"questions after one refresh: {dns.count('ttl.test')}")


@dtest
def dns_min_ttl_clamps_a_zero_ttl():
    s = tp.Stub()
    dns = dns_stub()
    dns.set("zero.test", a=["127.0.0.1"], ttl=0)
    d = dns_daemon(f"http://zero.test:{s.port}", dns, max_idle=0, res=resolver(dns, min_ttl_ms=3000))
    t0 = time.monotonic()
    for _ in range(10):
        eq(one_request(d).status, 200, "status")
    if time.monotonic() - t0 < 2.5:
        eq(dns.count("zero.test"), 2, "questions with TTL 0 raised to min_ttl_ms")


@dtest
def dns_aaaa_answers_are_used():
    if not ipv6_loopback_available():
        raise gwtest.Skip("no IPv6 loopback")
    s = tp.Stub("::1")
    dns = dns_stub()
    dns.set("six.test", aaaa=["::1"])
    d = dns_daemon(f"http://six.test:{s.port}", dns)
    r = one_request(d)
    eq(r.status, 200, f"status through an AAAA-only name ({r.body[:200]!r})")


# ------------------------------------------------------------------ spreading requests over the addresses

def spread_routes():
    return [{"path": "/legacy/*", "proxy": {"backend": "b", "strip_prefix": "/legacy"}},
            {"path": "/agg", "methods": ["GET"], "calls": [{"name": "c", "backend": "b", "path": "/x"}]}]


def sequential(d, path, n):
    """n requests one after the other on one keep-alive client connection
    (so reusing the most recent idle connection would pick one address)."""
    with tp.Client(d) as c:
        for _ in range(n):
            r = c.request(get(path))
            eq(r.status, 200, f"status of {path} ({r.raw[:300]!r})")


def served(stubs):
    return [s.stats()["requests"] for s in stubs]


def check_shares(got, want, n, what):
    """got: requests per stub out of n; want: the expected fractions. Each
    within 3 % of n of its share."""
    for i, (g, f) in enumerate(zip(got, want)):
        check(abs(g - f * n) <= 0.03 * n,
              f"{what}: 127.0.0.{i + 1} got {g} of {n}, want {f * n:.0f} (all: {got})")


@dtest
def dns_requests_spread_evenly_over_the_addresses_of_a_name():
    """One keep-alive client, 300 requests through a proxy route, then 300
    through an aggregate route: each of the name's three addresses gets a
    third, over one connection each (not a connection per request)."""
    s = stubs_on_one_port(3)
    dns = dns_stub()
    dns.set("three.test", a=["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    cfg = tp.config({"b": tp.backend(f"http://three.test:{s[0].port}")}, routes=spread_routes(),
                    resolver=resolver(dns))
    d = Daemon(cfg, workers=2)
    for what, path in (("proxy", "/legacy/x"), ("aggregate", "/agg")):
        before = served(s)
        sequential(d, path, 300)
        got = [a - b for a, b in zip(served(s), before)]
        check_shares(got, [1 / 3] * 3, 300, what)
    conns = sum(x.stats()["connections"] - x.nstats for x in s)  # without those of /stats
    check(conns <= 6, f"pooled connections are reused: {conns} connections for 600 requests (one per address and worker)")


@dtest
def dns_an_address_dropped_by_a_new_answer_gets_nothing_more():
    """After the answer changes from three addresses to two (TTL expiry),
    the dropped address gets no request and its idle connection is closed;
    the two left share the requests."""
    s = stubs_on_one_port(3)
    dns = dns_stub()
    dns.set("drop.test", a=["127.0.0.1", "127.0.0.2", "127.0.0.3"], ttl=2)
    cfg = tp.config({"b": tp.backend(f"http://drop.test:{s[0].port}")}, routes=spread_routes(),
                    resolver=resolver(dns, min_ttl_ms=1000, max_ttl_ms=60000))
    d = Daemon(cfg, workers=1)
    sequential(d, "/legacy/x", 150)
    got = served(s)
    check_shares(got, [1 / 3] * 3, 150, "before the change")
    eq(s[2].stats()["open_connections"], 1, "127.0.0.3 has an idle connection from gatherd")
    dns.set("drop.test", a=["127.0.0.1", "127.0.0.2"], ttl=2)
    time.sleep(2.3)
    # the first request after expiry starts the refresh and may still go to
    # 127.0.0.3; the idle connection there closes when the answer is in
    deadline = time.monotonic() + 5 * SLOW
    with tp.Client(d) as c:
        while s[2].stats()["open_connections"] > 0:
            if time.monotonic() > deadline:
                raise TestFailure(f"the idle connection to 127.0.0.3 stays open; log:\n{d.log()[-2000:]}")
            eq(c.request(get()).status, 200, "status across the refresh")
            time.sleep(0.02)
    before = served(s)
    sequential(d, "/legacy/x", 150)
    sequential(d, "/agg", 150)
    got = [a - b for a, b in zip(served(s), before)]
    eq(got[2], 0, f"requests to the dropped address after the new answer (all: {got})")
    check_shares(got, [1 / 2, 1 / 2, 0], 300, "after the change")
    eq(s[2].stats()["open_connections"], 0, "no connection to 127.0.0.3")


@dtest
def dns_a_weight_is_split_among_the_addresses_of_its_name():
    """A name of two addresses with weight 2 beside an IP address of weight
    1: a third of the requests each."""
    s = stubs_on_one_port(3)
    dns = dns_stub()
    dns.set("pair.test", a=["127.0.0.1", "127.0.0.2"])
    b = tp.backend(None)
    del b["url"]
    b["servers"] = [{"url": f"http://pair.test:{s[0].port}", "weight": 2}, s[2].url]
    d = Daemon(tp.config({"b": b}, routes=spread_routes(), resolver=resolver(dns)), workers=2)
    for what, path in (("proxy", "/legacy/x"), ("aggregate", "/agg")):
        before = served(s)
        sequential(d, path, 300)
        got = [a - b for a, b in zip(served(s), before)]
        check_shares(got, [1 / 3] * 3, 300, what)


# ------------------------------------------------------------------ failures

@dtest
def dns_nxdomain_is_502_upstream_resolve_failed_and_cached():
    dns = dns_stub()
    dns.set("gone.test", mode="nxdomain")
    d = dns_daemon("http://gone.test:80", dns, res=resolver(dns, min_ttl_ms=5000))
    r = one_request(d)
    eq(r.status, 502, "status for a name that does not exist")
    eq(error_code(r), "upstream_resolve_failed", "error code")
    eq(r.json()["error"].get("backend"), "b", "backend in the error")
    check(d.wait_log("upstream_resolve_failed"), "log line")
    log = d.log()
    contains(log, "backend b", "the log names the backend")
    contains(log, "gone.test", "the log names the host name")
    contains(log, "NXDOMAIN", "the log gives the DNS error")
    asked = dns.count("gone.test")
    for _ in range(5):
        r = one_request(d)
        eq((r.status, error_code(r)), (502, "upstream_resolve_failed"), "later requests")
    eq(dns.count("gone.test"), asked, "no new question while the failure is cached (min_ttl_ms)")


@dtest
def dns_servfail_and_refused_are_502():
    dns = dns_stub()
    dns.set("sf.test", mode="servfail")
    dns.set("rf.test", mode="refused")
    cfg = tp.config({"sf": tp.backend("http://sf.test:80"), "rf": tp.backend("http://rf.test:80")},
                    routes=[{"path": "/sf/*", "proxy": {"backend": "sf"}},
                            {"path": "/rf/*", "proxy": {"backend": "rf"}}],
                    resolver=resolver(dns, timeout_ms=ms(300), attempts=1))
    d = Daemon(cfg, workers=1)
    for path, name in [("/sf/x", "sf.test"), ("/rf/x", "rf.test")]:
        t0 = time.monotonic()
        r = one_request(d, path)
        eq((r.status, error_code(r)), (502, "upstream_resolve_failed"), f"{name}: answer")
        check(time.monotonic() - t0 < 5 * SLOW, f"{name}: answered in {time.monotonic() - t0:.1f}s")
        check(dns.count(name) >= 1, f"{name} was asked")


@dtest
def dns_silent_server_ends_by_the_backend_timeout():
    dns = dns_stub()
    dns.set("mute.test", mode="silent")
    d = dns_daemon("http://mute.test:80", dns, timeout_ms=ms(600),
                   res=resolver(dns, timeout_ms=10000, attempts=2))
    t0 = time.monotonic()
    r = one_request(d)
    dt = time.monotonic() - t0
    eq((r.status, error_code(r)), (504, "upstream_timeout"), "status while DNS never answers")
    check(dt < 4 * SLOW, f"ended by the backend's timeout_ms, not the resolver's 20 s: {dt:.1f}s")


@dtest
def dns_silent_server_ends_by_the_resolver_timeout():
    dns = dns_stub()
    dns.set("mute.test", mode="silent")
    d = dns_daemon("http://mute.test:80", dns, timeout_ms=ms(20000),
                   res=resolver(dns, timeout_ms=ms(300), attempts=2))
    t0 = time.monotonic()
    r = one_request(d)
    dt = time.monotonic() - t0
    eq((r.status, error_code(r)), (502, "upstream_resolve_failed"), "status when the resolver gives up")
    check(dt < 10 * SLOW, f"ended by timeout_ms x attempts: {dt:.1f}s")
    check(d.wait_log("timed out"), "the log says the query timed out")
    check(dns.count("mute.test", "A") >= 2, f"attempts: {dns.counts}")


@dtest
def dns_stale_addresses_serve_while_the_server_fails():
    s = tp.Stub()
    dns = dns_stub()
    dns.set("stale.test", a=["127.0.0.1"], ttl=1)
    d = dns_daemon(f"http://stale.test:{s.port}", dns, max_idle=0,
                   res=resolver(dns, timeout_ms=ms(200), attempts=1, min_ttl_ms=1000))
    eq(one_request(d).status, 200, "first request")
    dns.set("stale.test", mode="servfail")
    time.sleep(1.2)
    for _ in range(3):
        eq(one_request(d).status, 200, "while the nameserver fails, the last answer keeps serving")
    check(d.wait_log("keeping the last addresses"), "the failed refresh is logged")
    # an authoritative NXDOMAIN ends the old answer
    dns.set("stale.test", mode="nxdomain")
    deadline = time.monotonic() + 5 * SLOW
    while True:
        r = one_request(d)
        if r.status == 502:
            eq(error_code(r), "upstream_resolve_failed", "after NXDOMAIN")
            break
        if time.monotonic() > deadline:
            raise TestFailure("NXDOMAIN did not end the old addresses")
        time.sleep(0.1)


@dtest
def dns_connect_refused_after_resolving_is_502_connect_failed():
    dns = dns_stub()
    dns.set("closed.test", a=["127.0.0.1"])
    d = dns_daemon(f"http://closed.test:{tp.closed_port()}", dns)
    t0 = time.monotonic()
    r = one_request(d)  # waits for DNS, then the connect is refused
    eq((r.status, error_code(r)), (502, "upstream_connect_failed"), "status")
    check(time.monotonic() - t0 < 3 * SLOW, "answered at once, not by a timeout")
    r = one_request(d)  # the address is known now: the immediate path
    eq((r.status, error_code(r)), (502, "upstream_connect_failed"), "status with a cached answer")


@dtest
def dns_an_address_that_refuses_is_avoided():
    s = tp.Stub("127.0.0.1")
    dns = dns_stub()
    dns.set("half.test", a=["127.0.0.2", "127.0.0.1"])  # nothing listens on 127.0.0.2
    d = dns_daemon(f"http://half.test:{s.port}", dns, max_idle=0)
    statuses = [one_request(d).status for _ in range(10)]
    check(statuses.count(502) <= 1, f"one failure, then the refusing address is skipped: {statuses}")
    eq(s.stats()["requests"], statuses.count(200), "requests at the good address")


# ------------------------------------------------------------------ waiting requests

@dtest
def dns_client_gone_while_waiting_for_dns():
    s = tp.Stub()
    dns = dns_stub()
    dns.set("slow.test", a=["127.0.0.1"], delay=1.0 * SLOW)
    d = dns_daemon(f"http://slow.test:{s.port}", dns, workers=1)
    # several clients ask and leave before the answer comes
    clients = []
    for _ in range(5):
        c = d.connect()
        c.send(get())
        clients.append(c)
    time.sleep(0.2)
    for c in clients:
        c.close()
    time.sleep(1.3 * SLOW)  # the answer arrives with nobody waiting
    r = one_request(d)
    eq(r.status, 200, "the answer that arrived late serves the next request")
    eq(s.stats()["requests"], 1, "requests of gone clients never reached the backend")
    check(d.running(), "daemon still running")


@dtest
def dns_many_requests_wait_for_one_answer():
    s = tp.Stub()
    dns = dns_stub()
    dns.set("burst.test", a=["127.0.0.1"], delay=0.5)
    d = dns_daemon(f"http://burst.test:{s.port}", dns, workers=1)
    clients = []
    for _ in range(8):
        c = tp.Client(d)
        c.send(get())
        clients.append(c)
    for c in clients:
        eq(c.read_response().status, 200, "each waiting request is answered")
    eq(dns.count("burst.test", "A"), 1, "one question for all the waiting requests")


@dtest
def dns_stop_with_a_query_in_flight():
    dns = dns_stub()
    dns.set("mute.test", mode="silent")
    cfg = tp.config({"b": tp.backend("http://mute.test:80", timeout_ms=ms(30000))},
                    resolver=resolver(dns, timeout_ms=10000), shutdown_timeout_ms=ms(300))
    d = Daemon(cfg, workers=2)
    clients = []
    for _ in range(4):
        c = d.connect()
        c.send(get())
        clients.append(c)
    time.sleep(0.3)
    code = d.stop()
    eq(code, 0, "exit code of a graceful stop with DNS queries in flight")
    for c in clients:
        c.close()


# ------------------------------------------------------------------ hosts file

@dtest
def dns_localhost_comes_from_the_hosts_file():
    s = tp.Stub()
    dns = dns_stub()
    with open("/etc/hosts") as f:
        hosts = f.read()
    if not any(l.split()[:1] == ["127.0.0.1"] and "localhost" in l.split()[1:] for l in hosts.splitlines()):
        raise gwtest.Skip("/etc/hosts has no 127.0.0.1 localhost line")
    d = dns_daemon(f"http://localhost:{s.port}", dns)
    for _ in range(3):
        r = one_request(d)
        eq(r.status, 200, f"status through localhost ({r.body[:200]!r})")
    eq(dns.count("localhost"), 0, "no DNS question for a hosts-file name")


@dtest
def dns_custom_hosts_file_and_opting_out():
    s = tp.Stub("127.0.0.2")
    dns = dns_stub()
    dns.set("custom.test", a=["127.0.0.1"])  # what DNS would say: nothing listens there on that port
    with TempDir() as t:
        hosts = t.write("hosts", "# test hosts\n127.0.0.2   custom.test  alias.test # comment\n::1 v6only.test\n")
        d = dns_daemon(f"http://CUSTOM.test.:{s.port}", dns, res=resolver(dns, hosts_file=hosts))
        eq(one_request(d).status, 200, "a name of the hosts file (any case, final dot)")
        eq(dns.count("custom.test"), 0, "no DNS question")
        d.stop()
        # hosts_file false: DNS decides (and its answer has nothing listening)
        d = dns_daemon(f"http://custom.test:{s.port}", dns, res=resolver(dns, hosts_file=False))
        r = one_request(d)
        eq((r.status, error_code(r)), (502, "upstream_connect_failed"), "with hosts_file false, DNS answers")
        check(dns.count("custom.test") >= 1, "DNS was asked")


# ------------------------------------------------------------------ TLS

@dtest
def dns_https_backend_by_name_uses_the_name_for_sni_and_verification():
    tb = tp.TlsBackend()
    try:
        dns = dns_stub()
        dns.set("backend.test", a=["127.0.0.1"])
        b = tp.backend(f"https://backend.test:{tb.port}")
        b["tls"] = {"ca_file": tp.pki()["ca.pem"]}
        d = Daemon(tp.config({"b": b}, resolver=resolver(dns)), workers=1)
        r = one_request(d)
        eq(r.status, 200, f"status over TLS to a name ({r.body[:300]!r}; log {d.log()[-1500:]})")
        eq(r.json()["sni"], "backend.test", "SNI is the URL's host name")
        d.stop()
        # a name the certificate does not carry fails verification
        dns.set("other.test", a=["127.0.0.1"])
        b = tp.backend(f"https://other.test:{tb.port}")
        b["tls"] = {"ca_file": tp.pki()["ca.pem"]}
        d = Daemon(tp.config({"b": b}, resolver=resolver(dns)), workers=1)
        r = one_request(d)
        eq((r.status, error_code(r)), (502, "upstream_tls_failed"), "a name the certificate does not carry")
    finally:
        tb.stop()


# ------------------------------------------------------------------ configuration

def _check_t(cfg):
    with TempDir() as t:
        p = t.write("gatherd.json", cfg)
        return run_cli(["-t", "-c", p])


@dtest
def dns_config_check_resolves_nothing():
    dns = dns_stub()
    cfg = tp.config({"b": "http://api.test:8080", "c": "https://other.test"},
                    resolver=resolver(dns, timeout_ms=500, attempts=3, min_ttl_ms=10, max_ttl_ms=1000,
                                      hosts_file=True))
    cfg["listen"] = ["127.0.0.1:8080"]
    rc, out, err = _check_t(cfg)
    eq(rc, 0, f"-t of a valid config with host names (stderr {err!r})")
    time.sleep(0.2)
    eq(dns.count("api.test") + dns.count("other.test"), 0, "gatherd -t sends no DNS question")


@dtest
def dns_config_errors():
    base = {"listen": ["127.0.0.1:8080"], "backends": {"b": {"url": "http://api.test:80"}}}
    cases = [
        ({"resolver": {"nameserver": ["127.0.0.1"]}}, 'resolver.nameserver: unknown key "nameserver"'),
        ({"resolver": {"nameservers": ["ns.example"]}}, "resolver.nameservers[0]: bad nameserver address"),
        ({"resolver": {"nameservers": []}}, "resolver.nameservers: must be an array"),
        ({"resolver": {"nameservers": "127.0.0.1"}}, "resolver.nameservers: must be an array"),
        ({"resolver": {"timeout_ms": 0}}, "resolver.timeout_ms: must be between"),
        ({"resolver": {"attempts": 0}}, "resolver.attempts: must be between 1 and 10"),
        ({"resolver": {"min_ttl_ms": 5000, "max_ttl_ms": 1000}}, "must not be above max_ttl_ms"),
        ({"resolver": {"hosts_file": "/nonexistent/hosts"}}, "resolver.hosts_file: cannot read \"/nonexistent/hosts\""),
        ({"resolver": {"hosts_file": 1}}, "resolver.hosts_file: must be true, false or the path"),
        ({"resolver": []}, "resolver: must be an object"),
    ]
    for extra, want in cases:
        cfg = dict(base)
        cfg.update(extra)
        rc, out, err = _check_t(cfg)
        eq(rc, 1, f"exit code for {extra}")
        contains(err, want, f"stderr for {extra}")
        check(":" in err.split(" ")[1] if len(err.split(" ")) > 1 else False, f"file:line in {err!r}")
    for url, want in [("http://-api.test:80", "bad host name"), ("http://api-.test", "bad host name"),
                      ("http://a..test", "bad host name"), ("http://a_b$.test", "bad host name"),
                      ("http://" + "a" * 64 + ".test", "bad host name"), ("http://10.0.0.300:80", "bad IPv4 address"),
                      ("http://api.test:0", "bad address"), ("http://api.test:http", "bad address"),
                      ("http://user@api.test", "credentials"), ("http://api.123", "bad host name")]:
        rc, out, err = _check_t({"listen": ["127.0.0.1:8080"], "backends": {"b": {"url": url}}})
        eq(rc, 1, f"exit code for url {url!r}")
        contains(err, "backends.b.url: " + want, f"stderr for url {url!r}")
    rc, out, err = _check_t({"listen": ["127.0.0.1:8080"],
                             "backends": {"b": {"url": "http://api.test", "max_response_bytes": 0}}})
    eq(rc, 1, "exit code for max_response_bytes 0")
    contains(err, "backends.b.max_response_bytes: must be between 1 and", "stderr for max_response_bytes 0")
    rc, out, err = _check_t({"listen": ["127.0.0.1:8080"],
                             "backends": {"b": {"url": "http://svc_1.internal.", "max_response_bytes": 1024}}})
    eq(rc, 0, f"a name with '_' and a final dot, and max_response_bytes (stderr {err!r})")


if __name__ == "__main__":
    sys.exit(main())
