"""gwtest - a tiny harness for gatherd integration tests (Python 3 stdlib only).

Pieces:
  Daemon       starts $GATHERD on a free loopback port with a generated config,
               stops it, and checks its stderr for sanitizer reports.
  Conn         a raw client socket: send exact bytes, read exactly one HTTP
               response (Content-Length, chunked, or until close), detect EOF.
  run_cli      runs gatherd with arguments (for -t, -V, -h ...).
  test/main    a registry of test functions and a runner that prints
               "ok - name" / "FAIL - name: reason" / "ok - name # skip why"
               and, as the very last line, "N passed, N failed" (with
               ", N skipped" appended when a test was skipped).

Every Daemon started during a test is registered with the runner: when the
test ends, a daemon still running is stopped with SIGTERM; a non-zero exit
code from a graceful stop, or a sanitizer report in stderr, fails the test.

Tiers: GW_CHECK_TIER=smoke runs only the tests named in SMOKE, "normal" those
in NORMAL (both: and every test of the files in SMOKE_FILES), "tsan" those in
TSAN (make check-tsan); unset or "full", every test.

Shards: GW_TEST_JOBS=N runs a file's selected tests in up to N processes at
once (every Nth test each, at least SHARD_MIN tests per process), and adds
up their results; the tests of one file are independent of each other.

Runners on one machine coordinate through two lock files in $TMPDIR (make
check -jN runs several test files at once, and the suite runs tiers side by
side): every test holds a shared lock while it runs, a test marked
@exclusive (a load test: wrk at full speed) an exclusive one, so it runs
alone and never starves a timing-sensitive test. A waiting exclusive test
holds a gate that stops new tests from starting, so it is not starved either.
"""

import atexit
import copy
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
GATHERD = os.environ.get("GATHERD") or os.path.normpath(os.path.join(HERE, "..", "..", "src", "gatherd"))

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer",
                     "ThreadSanitizer", "ERROR: MemorySanitizer")



def _is_sanitized(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return b"__asan_init" in data or b"__ubsan_handle" in data or b"__tsan_init" in data
    except OSError:
        return False


# Timeouts scale up under sanitizers (ASan makes the daemon several times slower).
SLOW = float(os.environ.get("GW_SLOW") or (3.0 if _is_sanitized(GATHERD) else 1.0))


class TestFailure(AssertionError):
    pass


class Skip(Exception):
    """Raised by a test that cannot run here; counted as skipped, never as passed."""


class NotInTier(Exception):
    """Raised by a test that belongs to another tier of the suite (it runs
    once, in the normal build from a git checkout, and not again under the
    sanitizers or from the release tarball): deselected like the tests a
    smoke tier leaves out, so neither passed nor skipped here. A test that
    cannot run anywhere in this environment raises Skip instead."""


def run_wrk(url, seconds, conns, script, during=None, threads=1, poll=0.05):
    """wrk -t threads -c conns -d seconds (--timeout 5s) against url (loopback)
    with the Lua script text, which prints one "RESULT k=v ..." line at its
    end; during(elapsed) is called every poll seconds while wrk runs. Returns
    the RESULT numbers. Bounded: wrk is killed 30 s past its duration."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise TestFailure("wrk is not installed (scripts/install-deps.sh installs it)")
    tmp = tempfile.mkdtemp(prefix="gwwrk-")
    try:
        path = os.path.join(tmp, "check.lua")
        with open(path, "w") as f:
            f.write(script)
        cmd = [wrk, f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s", path, url]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=_die_with_parent)
        t0 = time.monotonic()
        try:
            while p.poll() is None:
                if during:
                    during(time.monotonic() - t0)
                time.sleep(poll)
                if time.monotonic() - t0 > seconds + 30:
                    raise TestFailure("wrk did not end")
            out = p.stdout.read()
        finally:
            if p.poll() is None:
                kill_and_reap(p, 5)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = re.search(r"RESULT (.*)", out)
    if not m:
        raise TestFailure(f"wrk printed no result: {out}")
    print(f"# wrk {url}: {m.group(1)}")
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def kill_and_reap(proc, timeout):
    """SIGKILL to a process this harness started (by its own PID), then wait for it."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def sanitizer_report(text):
    """Returns the part of text starting at the first sanitizer marker, or None."""
    first = None
    for m in SANITIZER_MARKERS:
        i = text.find(m)
        if i >= 0 and (first is None or i < first):
            first = i
    if first is None:
        return None
    start = text.rfind("\n", 0, max(0, first - 200))
    return text[start + 1 if start >= 0 else 0:][:6000]


# --- the test registry and runner ------------------------------------------

_TESTS = []
_current_daemons = []
_current_problems = []
_all_daemons = []


@atexit.register
def _kill_leftovers():
    """Whatever way the runner ends, no daemon it started survives it."""
    for d in _all_daemons:
        d._kill()
        d.remove_dir()


def _die_with_parent():
    """In the child before exec: SIGKILL when the test runner dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def test(fn):
    """Decorator: registers fn as a test (run in definition order)."""
    _TESTS.append(fn)
    return fn


def exclusive(fn):
    """Decorator (above or below the registering one): fn runs alone among the
    integration tests of every runner on this machine (see the module doc)."""
    fn.gw_exclusive = True
    return fn


# The smoke tier (GW_CHECK_TIER=smoke: distcheck; part of the normal tier, where
# the ASan build runs everything): a few tests per file that show the build
# works end to end. Test names are unique across the files.
SMOKE = {
    "cli_version", "config_test_valid", "shipped_configs_are_valid", "get_basic_headers_and_body",
    "keepalive_http11_reuses_connection", "pipelining_in_order", "graceful_stop_finishes_request_in_flight_body",
    "proxy_get_basic_with_strip_prefix", "proxy_post_chunked_body_streams_chunked",
    "agg_independent_calls_run_concurrently", "agg_failure_codes_optional_and_required",
    "reload_applies_to_new_requests_and_idle_connections", "test_detach_runs_in_background",
    "metrics_count_exactly_what_was_sent", "combined_lines_for_respond_proxy_and_aggregate",
    "workers_never_wait_on_stderr", "dns_proxy_to_a_host_name", "breaker_opens_after_consecutive_failures_and_fails_fast",
    "retry_succeeds_on_the_third_try", "rate_429_headers", "agg_fallback_never_replaces_an_answer",
    "balance_round_robin_weights_3_1_1",
}
# The normal tier (GW_CHECK_TIER=normal: the normal build) adds what is
# measured or drawn best without the sanitizers' weight (they run a share of
# it); distcheck runs the smoke tier alone.
NORMAL = SMOKE | {
    "stall_big_answers_keep_the_loop_free", "stall_large_aggregates_built_and_freed_off_the_loop",
    "stall_foreach_of_many_elements", "status_page_renders_and_refreshes_in_chromium",
    "aggoracle_plain_calls", "aggoracle_foreach_calls", "backend_answers_fuzzed_end_to_end",
    "framing_matrix_and_fuzz", "balance_next_server_retry_while_a_server_restarts",
    "balance_least_request_avoids_a_slow_server", "cluster_obs_status_page_shows_servers",
}
# The ThreadSanitizer tier (GW_CHECK_TIER=tsan: make check-tsan): the tests
# where state is shared between threads: workers (breakers, rate limits,
# retry budgets, metrics, the connection count and hand-offs), the main
# thread (reloads, stops, signals), the log writer and the thread pool. The
# ASan build runs all of them too.
TSAN = {
    # breakers and retry budgets, shared by the workers
    "breaker_state_is_shared_by_workers", "breaker_cycles_under_concurrent_workers",
    "breaker_state_survives_a_reload", "breaker_half_open_lets_probes_through_then_closes",
    "retry_budget_caps_retries_when_everything_fails", "retry_tries_are_seen_by_the_circuit_breaker",
    # per-server in-flight counts, outlier ejection and balancer rows, shared by the workers
    "balance_least_request_avoids_a_slow_server", "balance_no_healthy_server_when_all_are_ejected",
    "hedge_wins_and_the_slow_try_is_closed", "queue_serializes_then_fills", "queue_cancelled_waiter_leaves",
    # rate limits, shared by the workers
    "rate_exact_over_a_window", "rate_limit_survives_reload", "rate_max_keys",
    # reloads, stops and signals: the main thread and the workers
    "reload_every_second_under_wrk_load_loses_nothing", "reload_applies_to_new_requests_and_idle_connections",
    "reload_lets_requests_in_flight_finish_on_their_configuration",
    "reload_with_a_resolver_no_worker_can_set_up_fails_as_a_whole", "reload_opens_and_closes_listen_addresses",
    "reload_keeps_the_pools_of_unchanged_backends", "graceful_stop_under_wrk_load",
    "graceful_stop_never_resets_a_connection_it_completed", "graceful_stop_answers_with_connection_close",
    # metrics and status gathered from every worker
    "metrics_count_exactly_what_was_sent", "metrics_count_each_failure_code_as_its_outcome",
    "status_json_describes_routes_and_backends", "readiness_turns_503_while_draining",
    # per-server counters, gauges and health read by the admin thread
    "cluster_obs_requests_per_server_equal_what_each_stub_saw", "cluster_obs_in_flight_while_a_slow_request_runs",
    "cluster_obs_healthy_follows_active_checks", "cluster_obs_series_follow_servers_across_reloads",
    # the log writer thread
    "workers_never_wait_on_stderr", "repeated_lines_are_rate_limited_and_summarised",
    "no_line_lost_under_parallel_load", "sigusr1_reopens_files", "many_usr1_never_kill_the_daemon",
    "reload_turns_the_access_log_on_and_moves_it",
    # the thread pool
    "stall_requests_end_while_their_answers_are_parsed", "stall_stop_and_reload_while_parsing",
    "stall_parser_queue_full", "stall_budget_back_to_zero_on_every_path",
    # the cache: one table for every worker, waiters woken through their workers' ports
    "cache_coalesces_100_concurrent_requests_across_workers", "coalesce_without_cache",
    "coalesce_followers_leave_and_the_request_goes_on", "cache_stale_while_revalidate",
    "cache_stale_if_error_when_the_breaker_is_open", "cache_reload_keeps_unchanged_calls_and_drops_changed_ones",
    "cache_memory_bound_under_unique_keys",
    "cache_fetch_of_a_hash_balanced_backend_goes_to_the_keys_server",
}
# Files run whole in the smoke tier: the deploy and README tests need the normal build
# (the image holds it; the README builds its own) and skip themselves under sanitizers.
SMOKE_FILES = {"test_deploy.py", "test_readme.py"}


class _TestLock:
    """The shared/exclusive lock of one test, with the gate (module doc)."""

    def __init__(self):
        base = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"gatherd-tests-{os.getuid()}")
        self.gate = open(base + ".gate", "a")
        self.main = open(base + ".lock", "a")

    def acquire(self, excl):
        fcntl.flock(self.gate, fcntl.LOCK_EX)
        fcntl.flock(self.main, fcntl.LOCK_EX if excl else fcntl.LOCK_SH)
        if not excl:
            fcntl.flock(self.gate, fcntl.LOCK_UN)

    def release(self, excl):
        fcntl.flock(self.main, fcntl.LOCK_UN)
        if excl:
            fcntl.flock(self.gate, fcntl.LOCK_UN)


def _note_problem(msg):
    _current_problems.append(msg)


def _finish_daemons():
    """Stops what the test left running and collects sanitizer/exit problems."""
    while _current_daemons:
        d = _current_daemons.pop(0)
        try:
            d.close()
        except Exception as e:  # pragma: no cover - cleanup must go on
            _note_problem("cleanup of daemon pid %s failed: %r" % (d.pid, e))
        finally:
            d.remove_dir()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    selected = [t for t in _TESTS if not argv or any(a in t.__name__ for a in argv)]
    if not os.access(GATHERD, os.X_OK):
        print("FAIL - setup: GATHERD=%s is not an executable file" % GATHERD)
        print("0 passed, 1 failed")
        return 1
    print("# gatherd: %s" % GATHERD)
    tier = os.environ.get("GW_CHECK_TIER") or "full"
    if tier == "tsan" or (tier in ("smoke", "normal") and os.path.basename(sys.argv[0]) not in SMOKE_FILES):
        names = {"smoke": SMOKE, "normal": NORMAL, "tsan": TSAN}[tier]
        selected = [t for t in selected if t.__name__ in names]
        print(f"# tier {tier}: {len(selected)} of {len(_TESTS)} tests")
        if not selected:
            print("0 passed, 0 failed")
            return 77  # automake's SKIP: nothing of this file is in the tier
    elif tier not in ("smoke", "normal", "tsan", "full"):
        print(f"FAIL - setup: GW_CHECK_TIER={tier!r} is not smoke, normal, tsan or full")
        print("0 passed, 1 failed")
        return 1
    shard = os.environ.get("GW_SHARD")
    if shard:
        k, n = (int(x) for x in shard.split("/"))
        selected = selected[k::n]
    else:
        jobs = int(os.environ.get("GW_TEST_JOBS") or 1)
        n = min(jobs, len(selected) // SHARD_MIN)
        if n > 1:
            return _run_shards(n)
    lock = _TestLock()
    passed = failed = skipped = 0
    failures = []
    t_all = time.monotonic()
    for fn in selected:
        name = fn.__name__
        del _current_problems[:]
        excl = getattr(fn, "gw_exclusive", False)
        lock.acquire(excl)
        t0 = time.monotonic()
        reason = None
        skip = None
        elsewhere = None
        try:
            fn()
        except NotInTier as e:
            elsewhere = str(e)
        except Skip as e:
            skip = str(e)
        except AssertionError as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb)
                          if os.path.basename(f.filename) != "gwtest.py"), "")
            reason = (str(e) or "assertion failed") + (f" [{where}]" if where else "")
        except Exception as e:
            reason = "%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())
        try:
            _finish_daemons()
        except Exception as e:
            _note_problem("cleanup: %r" % e)
        if _current_problems:
            extra = "; ".join(_current_problems)
            reason = f"{reason}; {extra}" if reason else extra
        dt = time.monotonic() - t0
        lock.release(excl)
        if reason is None and elsewhere is not None:
            print(f"# {name}: not in this tier ({elsewhere})")
        elif reason is None:
            if skip is not None:
                skipped += 1
                print(f"ok - {name} # skip {skip}")
            else:
                passed += 1
                print(f"ok - {name} ({dt:.2f}s)")
        else:
            failed += 1
            failures.append(name)
            print(f"FAIL - {name}: {reason}")
        sys.stdout.flush()
    if failures:
        print("# failed: " + ", ".join(failures))
    print("# total time %.1fs" % (time.monotonic() - t_all))
    print(summary_line(passed, failed, skipped))
    sys.stdout.flush()
    if failed:
        return 1
    return 77 if skipped and not passed else 0  # 77: automake's SKIP, for a file that ran nothing


SHARD_MIN = 6


def _run_shards(n):
    """Runs this file in n processes (GW_SHARD=k/n), prints their output one
    after the other and the sum of their summary lines."""
    procs = [subprocess.Popen([sys.executable] + sys.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, GW_SHARD=f"{k}/{n}"), preexec_fn=_die_with_parent)
             for k in range(n)]
    total = [0, 0, 0]
    rc = 0
    for k, p in enumerate(procs):
        out = p.communicate()[0]
        lines = out.splitlines()
        m = re.match(r"^(\d+) passed, (\d+) failed(?:, (\d+) skipped)?$", lines[-1]) if lines else None
        print(f"# shard {k + 1} of {n}")
        print("\n".join(lines[:-1] if m else lines))
        if m is None:
            print(f"FAIL - shard {k + 1} of {n}: no summary line (exit status {p.returncode})")
            total[1] += 1
        else:
            total = [t + int(v or 0) for t, v in zip(total, m.groups())]
        if p.returncode not in (0, 77):
            rc = 1
    print(summary_line(*total))
    sys.stdout.flush()
    if rc or total[1]:
        return 1
    return 77 if total[2] and not total[0] else 0


def summary_line(passed, failed, skipped):
    """The runner's last line, which tests/run-suite.sh sums."""
    line = f"{passed} passed, {failed} failed"
    return line + f", {skipped} skipped" if skipped else line


# --- assertions -------------------------------------------------------------

def check(cond, msg="check failed"):
    if not cond:
        raise TestFailure(msg)


def eq(got, want, what="value"):
    if got != want:
        raise TestFailure(f"{what}: expected {want!r}, got {got!r}")


def contains(text, part, what="text"):
    if part not in text:
        raise TestFailure(f"{what}: expected to contain {part!r}; got {text[:1500]!r}")


# --- ports and the daemon -----------------------------------------------------

def free_port(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def ipv6_loopback_available():
    if not socket.has_ipv6:
        return False
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _split_listen(addr):
    """'127.0.0.1:80' -> ('127.0.0.1', 80); '[::1]:80' -> ('::1', 80); '80'/'*:80' -> ('127.0.0.1', 80)."""
    if addr.startswith("["):
        host, port = addr[1:].split("]:", 1)
        return host, int(port)
    if ":" in addr:
        host, port = addr.rsplit(":", 1)
        if host in ("*", ""):
            host = "127.0.0.1"
        return host, int(port)
    return "127.0.0.1", int(addr)


class Daemon:
    """gatherd running on a free loopback port.

    config: a dict (listen strings may contain "PORT"; without "listen",
    ["127.0.0.1:PORT"] is used) or text (with "@PORT@" placeholders).
    files: extra files for the config dir, {relative path: text or dict}.
    """

    def __init__(self, config, workers=2, args=(), files=None, start=True, log_level=None, nofile=None):
        self.config = config
        self.nofile = nofile  # RLIMIT_NOFILE for the daemon, to provoke EMFILE
        self.workers = workers
        self.args = list(args)
        self.files = files or {}
        self.log_level = log_level
        self.dir = tempfile.mkdtemp(prefix="gwtest-")
        self.conf_path = os.path.join(self.dir, "gatherd.json")
        self.log_path = os.path.join(self.dir, "stderr.log")
        self.proc = None
        self.pid = None
        self.port = None
        self.admin_port = None
        self.host = "127.0.0.1"
        self.exit_code = None
        self.sent_signal = None
        self._exit_checked = False
        self._checked = False
        _current_daemons.append(self)
        _all_daemons.append(self)
        for rel, content in self.files.items():
            p = os.path.join(self.dir, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                f.write(content if isinstance(content, str) else json.dumps(content, indent=2))
        if start:
            self.start()

    # config ------------------------------------------------------------
    def _with_admin(self, cfg):
        """Without an "admin" section, the admin listener gets a free port
        of its own (its default, 127.0.0.1:9180, would be shared by every
        daemon of the suite); "APORT" in an admin address is that port."""
        cfg = copy.deepcopy(cfg)
        admin = cfg.setdefault("admin", {"listen": "127.0.0.1:APORT"})
        if isinstance(admin, dict) and "listen" in admin:
            ls = admin["listen"]
            if isinstance(ls, str):
                admin["listen"] = ls.replace("APORT", str(self.admin_port))
            elif isinstance(ls, list):
                admin["listen"] = [a.replace("APORT", str(self.admin_port)) if isinstance(a, str) else a for a in ls]
        return cfg

    def _render(self, port):
        if isinstance(self.config, str):
            return self.config.replace("@PORT@", str(port)).replace("@APORT@", str(self.admin_port))
        cfg = self._with_admin(self.config)
        listen = cfg.get("listen", ["127.0.0.1:PORT"])
        if isinstance(listen, str):
            listen = [listen]
        cfg["listen"] = [a.replace("PORT", str(port)) for a in listen]
        return json.dumps(cfg, indent=2)

    def _first_addr(self, text):
        try:
            listen = json.loads(text)["listen"]
            if isinstance(listen, str):
                listen = [listen]
            return _split_listen(listen[0])
        except Exception:
            return "127.0.0.1", self.port

    # lifecycle ---------------------------------------------------------
    def start(self, timeout=10.0):
        last_log = ""
        for attempt in range(5):
            v6_only = False
            if isinstance(self.config, dict):
                ls = self.config.get("listen", ["127.0.0.1:PORT"])
                ls = [ls] if isinstance(ls, str) else ls
                v6_only = all(a.startswith("[") for a in ls)
            port = free_port("::1" if v6_only else "127.0.0.1")
            self.port = port
            self.admin_port = free_port()
            text = self._render(port)
            with open(self.conf_path, "w") as f:
                f.write(text)
            self.host, _ = self._first_addr(text)
            cmd = [GATHERD, "-c", self.conf_path, "-w", str(self.workers)] + self.args
            if self.log_level:
                cmd += ["-l", self.log_level]
            open(self.log_path, "w").close()
            logf = open(self.log_path, "ab")  # O_APPEND: every writer adds at the end
            nofile = self.nofile

            def preexec():
                _die_with_parent()
                if nofile:
                    import resource
                    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         close_fds=True, preexec_fn=preexec)
            logf.close()
            self.pid = self.proc.pid
            self.exit_code = None
            deadline = time.monotonic() + timeout * SLOW
            gateway_up = False  # one connection to it only: tests count them
            while time.monotonic() < deadline:
                rc = self.proc.poll()
                if rc is not None:
                    self.exit_code = rc
                    break
                try:
                    if not gateway_up:
                        s = socket.create_connection((self.host, port), timeout=0.5)
                        s.close()
                        gateway_up = True
                    # The listen backlog takes connections before the
                    # workers run; the admin listener is bound after it.
                    if f"127.0.0.1:{self.admin_port}" in text:
                        s = socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.5)
                        s.close()
                    return self
                except OSError:
                    time.sleep(0.02)
            last_log = self.log()
            if self.exit_code is None:
                self._kill()
                raise TestFailure(f"gatherd did not accept connections within {timeout}s; stderr:\n{last_log}")
            self._check_sanitizer()
            if ("cannot listen" in last_log or "Address already in use" in last_log) and attempt < 4:
                continue  # lost a race for the port: try another one
            raise TestFailure(f"gatherd exited with {self.exit_code} at start-up; stderr:\n{last_log}")
        raise TestFailure("could not start gatherd: " + last_log)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        """Sends sig (recorded: the exit is then expected)."""
        if self.running():
            self.sent_signal = sig
            os.kill(self.pid, sig)

    def wait(self, timeout):
        """Waits for the process to exit; returns its exit code or None on timeout."""
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._check_exit()
        return self.exit_code

    def _check_exit(self):
        """Once the process has exited: a graceful stop must exit 0, and an
        exit nobody asked for is a failure (a crash, an abort)."""
        if self._exit_checked or self.proc is None or self.proc.poll() is None:
            return
        self._exit_checked = True
        self.exit_code = self.proc.returncode
        tail = self.log()[-3000:]
        if self.sent_signal is None:
            _note_problem(f"gatherd (pid {self.pid}) exited on its own with {self.exit_code}; stderr tail:\n{tail}")
        elif self.sent_signal in (signal.SIGTERM, signal.SIGINT) and self.exit_code != 0:
            _note_problem(f"graceful stop (signal {int(self.sent_signal)}) exited with {self.exit_code}; "
                          f"stderr tail:\n{tail}")
        self._check_sanitizer()

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Sends sig, waits up to timeout s, returns the exit code (kills on timeout)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout * SLOW)
            except subprocess.TimeoutExpired:
                self._kill()
                self._check_sanitizer()
                raise TestFailure(f"gatherd (pid {self.pid}) did not exit within {timeout}s of signal {sig}; "
                                  f"stderr:\n{self.log()[-3000:]}")
        self._check_exit()
        self._check_sanitizer()
        return self.exit_code

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            if self.sent_signal is None:
                self.sent_signal = signal.SIGKILL
            kill_and_reap(self.proc, timeout=10)

    def _check_sanitizer(self):
        if self._checked:
            return
        rep = sanitizer_report(self.log())
        if rep:
            self._checked = True
            print(f"# sanitizer report from gatherd pid {self.pid}:\n" +
                  "\n".join("#   " + l for l in rep.splitlines()))
            _note_problem(f"sanitizer report in gatherd stderr (pid {self.pid})")

    def close(self):
        """Test-end cleanup: graceful stop if still running, else just the checks."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.stop(signal.SIGTERM, timeout=15)
            self._check_exit()
        finally:
            self._kill()
            self._check_sanitizer()

    def remove_dir(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_log(self, text, timeout=5.0):
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(0.02)
        return False

    def write_config(self, cfg):
        """Replaces the configuration file atomically (the daemon never reads
        half a file). cfg: a dict (written as JSON) or text."""
        tmp = self.conf_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(cfg if isinstance(cfg, str) else json.dumps(self._with_admin(cfg), indent=2))
        os.rename(tmp, self.conf_path)

    def reload(self, cfg, expect="reloaded", timeout=5.0):
        """Writes cfg, sends SIGHUP and waits until the log has one more line
        containing expect ("reloaded", or "reload failed" for a rejected one)."""
        n = self.log().count(expect)
        self.write_config(cfg)
        self.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout * SLOW
        while self.log().count(expect) <= n:
            if time.monotonic() > deadline:
                raise TestFailure(f"no new {expect!r} in the log after SIGHUP:\n{self.log()[-2000:]}")
            time.sleep(0.01)

    def connect(self, host=None, timeout=5.0):
        return Conn(host or self.host, self.port, timeout)

    def wait_not_accepting(self, timeout=5.0):
        """Polls until connecting is refused (the listeners are closed)."""
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            try:
                s = socket.create_connection((self.host, self.port), timeout=0.5)
                s.close()
            except OSError:
                return True
            time.sleep(0.02)
        return False


def run_cli(args, timeout=15, cwd=None):
    """Runs gatherd with args; returns (exit code, stdout, stderr). Sanitizer
    output in stderr is reported as a test problem."""
    p = subprocess.run([GATHERD] + list(args), stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout * SLOW, cwd=cwd)
    out = p.stdout.decode(errors="replace")
    err = p.stderr.decode(errors="replace")
    rep = sanitizer_report(err)
    if rep:
        print("# sanitizer report from gatherd %s:\n" % " ".join(args) +
              "\n".join("#   " + l for l in rep.splitlines()))
        _note_problem("sanitizer report from gatherd " + " ".join(args))
    return p.returncode, out, err


class TempDir:
    """A temp dir removed at exit of the with block; write(rel, content) -> path."""

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="gwtest-")
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)

    def write(self, rel, content):
        p = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content, indent=2))
        return p


# --- raw HTTP ------------------------------------------------------------------

class ConnectionClosed(Exception):
    pass


class Response:
    def __init__(self, version, status, reason, headers, body, raw):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (name, value) in order
        self.body = body
        self.raw = raw

    def header(self, name):
        """The value of a header that must appear at most once; None when absent."""
        vals = self.header_all(name)
        if len(vals) > 1:
            raise TestFailure(f"header {name} appears {len(vals)} times: {vals!r}")
        return vals[0] if vals else None

    def header_all(self, name):
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def json(self):
        try:
            return json.loads(self.body.decode())
        except Exception as e:
            raise TestFailure(f"body is not JSON ({e}): {self.body[:300]!r}")

    def __repr__(self):
        return f"<Response {self.status} {self.raw[:400]!r}>"


class Conn:
    """A client connection speaking raw bytes."""

    def __init__(self, host, port, timeout=5.0):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout * SLOW)
        self.sock.connect((host, port))
        self.timeout = timeout * SLOW
        self.buf = b""
        self.eof = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def shut_wr(self):
        self.sock.shutdown(socket.SHUT_WR)

    def _fill(self, timeout=None):
        """Reads more into buf; False on EOF/reset. Raises socket.timeout."""
        if self.eof:
            return False
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _read_line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            if not self._fill():
                raise ConnectionClosed("connection closed mid-line: %r" % self.buf[:200])

    def _read_exact(self, n):
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionClosed(f"connection closed with {len(self.buf)} of {n} body bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self, method="GET"):
        """Reads one response. method: the request's method (HEAD has no body)."""
        if not self.buf and not self._fill():
            raise ConnectionClosed("connection closed before a response")
        start = len(self.buf)
        raw_head = []
        status_line = self._read_line()
        raw_head.append(status_line)
        m = re.match(rb"^(HTTP/\d\.\d) (\d{3}) ?(.*)$", status_line)
        if not m:
            raise TestFailure(f"bad status line {status_line!r}")
        version, status, reason = m.group(1).decode(), int(m.group(2)), m.group(3).decode("latin-1")
        headers = []
        while True:
            line = self._read_line()
            raw_head.append(line)
            if line == b"":
                break
            if b":" not in line:
                raise TestFailure(f"bad header line {line!r}")
            k, v = line.split(b":", 1)
            headers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
        head = b"\r\n".join(raw_head) + b"\r\n"
        resp = Response(version, status, reason, headers, b"", head)
        if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
            return resp
        te = resp.header("Transfer-Encoding")
        cl = resp.header("Content-Length")
        if te is not None and "chunked" in te.lower():
            body = b""
            raw = b""
            while True:
                size_line = self._read_line()
                raw += size_line + b"\r\n"
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while True:
                        t = self._read_line()
                        raw += t + b"\r\n"
                        if t == b"":
                            break
                    break
                chunk = self._read_exact(size)
                body += chunk
                raw += chunk + self._read_exact(2)
            resp.body = body
            resp.raw += raw
        elif cl is not None:
            resp.body = self._read_exact(int(cl))
            resp.raw += resp.body
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
            resp.raw += resp.body
        return resp

    def request(self, data, method=None):
        """Sends data and reads one response."""
        if method is None:
            method = data.split(b" " if isinstance(data, bytes) else " ", 1)[0]
            method = method.decode() if isinstance(method, bytes) else method
        self.send(data)
        return self.read_response(method)

    def read_all_until_close(self, timeout=5.0):
        """Reads until EOF; returns the bytes. Raises TestFailure on timeout."""
        deadline = time.monotonic() + timeout * SLOW
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestFailure(f"connection not closed within {timeout}s (got {self.buf[:200]!r})")
            try:
                if not self._fill(timeout=left):
                    break
            except socket.timeout:
                continue
        data, self.buf = self.buf, b""
        return data

    def closed_within(self, timeout):
        """Seconds until the server closed (EOF or reset) with no further
        bytes; TestFailure if data arrives or nothing happens in time."""
        t0 = time.monotonic()
        data = self.read_all_until_close(timeout)
        if data:
            raise TestFailure(f"expected a silent close, got bytes {data[:300]!r}")
        return time.monotonic() - t0

    def still_open(self, wait):
        """True when nothing arrives and no EOF within wait seconds."""
        if self.buf or self.eof:
            return False
        try:
            return self._fill(timeout=wait) and False
        except socket.timeout:
            return True


def req(method="GET", path="/", headers=None, body=b"", version="HTTP/1.1", host="t"):
    """Builds request bytes; Host first (unless host is None), Content-Length
    added for a body unless given."""
    lines = [f"{method} {path} {version}"]
    hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if host is not None:
        lines.append(f"Host: {host}")
    if isinstance(body, str):
        body = body.encode()
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs):
        hdrs.append(("Content-Length", str(len(body))))
    lines += [f"{k}: {v}" for k, v in hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


DATE_RE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                     r"\d{4} \d\d:\d\d:\d\d GMT$")
HEX32_RE = re.compile(r"^[0-9a-fA-F]{32}$")
