#!/usr/bin/env python3
"""Integration tests of the daemon behaviour (README "Running as a daemon"):
-d (background, exit status after start-up), the pid file, "user"/"group"
(privilege drop after binding, as root only), and the RLIMIT_NOFILE raise
and its warning. The real daemon on loopback.

The test runner makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), so
a daemon that -d detached is re-parented to it: its exit status is then
collected and checked like any other (a graceful stop must exit 0).

Run: GATHERD=/path/to/gatherd python3 tests/integration/test_daemon.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import atexit
import ctypes
import gzip
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import (GATHERD, SLOW, Conn, Skip, TempDir, TestFailure, check, contains, eq,  # noqa: E402
                    free_port, main, req, run_cli, sanitizer_report, test)

NOBODY = 65534
_detached = []  # pids of daemons that -d started: killed at exit whatever happens


def _subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "PR_SET_CHILD_SUBREAPER")


_subreaper()


@atexit.register
def _kill_detached():
    for pid in _detached:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


def is_root():
    return os.geteuid() == 0


def proc_status(pid):
    """/proc/PID/status as {field: value}."""
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def nofile_soft(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise TestFailure("no Max open files line")


class Detached:
    """gatherd -d started in its own directory (relative paths in the
    configuration are relative to it, as the daemon keeps its cwd).
    stdout and stderr of the whole run go to out.log there."""

    def __init__(self, cfg, args=(), rlimit=None, preexec_user=None, log_level=None, prepare=None):
        self.tmp = TempDir().__enter__()
        self.dir = self.tmp.path
        os.chmod(self.dir, 0o755)
        if prepare:
            prepare(self.dir)
        self.port = free_port()
        self.admin_port = free_port()
        cfg = dict(cfg)
        cfg.setdefault("listen", ["127.0.0.1:PORT"])
        cfg["listen"] = [a.replace("PORT", str(self.port)) for a in cfg["listen"]]
        cfg.setdefault("admin", {"listen": f"127.0.0.1:{self.admin_port}"})
        cfg.setdefault("pid_file", "gatherd.pid")
        cfg.setdefault("routes", [{"path": "/hello", "respond": {"body": {"hello": "world"}}}])
        self.port = int(cfg["listen"][0].rsplit(":", 1)[1])
        self.cfg = cfg
        self.conf = self.tmp.write("gatherd.json", cfg)
        self.out = os.path.join(self.dir, "out.log")
        self.pid = None
        self.status = None
        cmd = [GATHERD, "-d", "-c", "gatherd.json", "-w", "2"] + list(args)
        if log_level:
            cmd += ["-l", log_level]

        def preexec():
            if rlimit:
                resource.setrlimit(resource.RLIMIT_NOFILE, rlimit)
            if preexec_user is not None:
                os.setgroups([])
                os.setgid(preexec_user)
                os.setuid(preexec_user)

        with open(self.out, "wb") as out:
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 preexec_fn=preexec)
            self.parent_pid = p.pid
            try:
                self.rc = p.wait(timeout=15 * SLOW)
            except subprocess.TimeoutExpired:
                gwtest.kill_and_reap(p, 10)
                raise TestFailure("gatherd -d: the parent did not exit within 15 s")
            self.elapsed = time.monotonic() - t0
        pid_path = os.path.join(self.dir, cfg["pid_file"])
        if self.rc == 0:
            with open(pid_path) as f:
                self.pid = int(f.read().strip())
            _detached.append(self.pid)

    def path(self, rel):
        return os.path.join(self.dir, rel)

    def read(self, rel):
        try:
            with open(self.path(rel), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log(self):
        return self.read("out.log")

    def get(self, path, port=None):
        with Conn("127.0.0.1", port or self.port) as c:
            return c.request(req("GET", path))

    def wait_exit(self, why, timeout=15):
        """Reaps the daemon (our child now) once it exits; its exit status."""
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = status
                _detached.remove(self.pid)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        raise TestFailure(f"gatherd -d (pid {self.pid}) did not exit within {timeout}s of {why}")

    def stop(self, timeout=15):
        """SIGTERM, then the exit status."""
        os.kill(self.pid, signal.SIGTERM)
        return self.wait_exit("SIGTERM", timeout)

    def close(self):
        try:
            if self.pid is not None and self.pid in _detached:
                eq(self.stop(), 0, "exit status of the graceful stop")
            rep = sanitizer_report(self.log() + self.read("error.log") + self.read("logs/error.log"))
            check(rep is None, f"sanitizer report:\n{rep}")
        finally:
            self.tmp.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_for(cond, what, timeout=5.0):
    deadline = time.monotonic() + timeout * SLOW
    while not cond():
        if time.monotonic() > deadline:
            raise TestFailure("timed out waiting for " + what)
        time.sleep(0.02)


def stat_fields(pid):
    """(ppid, session id, tty_nr) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[3]), int(rest[4])


# --- -d ------------------------------------------------------------------------

@test
def test_detach_runs_in_background():
    with Detached({}) as d:
        eq(d.rc, 0, "exit status of gatherd -d:\n" + d.log())
        check(d.pid != d.parent_pid, "the pid file names the daemon, not the parent that exited")
        ppid, sid, tty = stat_fields(d.pid)
        eq(ppid, os.getpid(), "the daemon's parent (re-parented to the subreaper: the starter is gone)")
        eq(sid, d.pid, "the daemon leads its own session")
        eq(tty, 0, "no controlling terminal")
        for fd in (0, 1):
            eq(os.readlink(f"/proc/{d.pid}/fd/{fd}"), "/dev/null", f"fd {fd} of the daemon")
        eq(os.readlink(f"/proc/{d.pid}/cwd"), os.path.realpath(d.dir), "the daemon keeps its working directory")
        # the parent exits only once the daemon is ready: no retry needed
        r = d.get("/hello")
        eq(r.status, 200, "request right after gatherd -d returned")
        eq(r.json(), {"hello": "world"})
        eq(d.get("/healthz", d.admin_port).status, 200, "admin /healthz")
        contains(d.log(), "started", "start-up line on the stderr the daemon kept (no error_log file)")
        eq(d.stop(), 0, "exit status after SIGTERM")
        check(not os.path.exists(d.path("gatherd.pid")), "the pid file is removed at exit")


@test
def test_detach_signals_via_pid_file():
    """gatherd -s reload / stop find the detached daemon through its pid file."""
    with Detached({}) as d:
        eq(d.rc, 0, "gatherd -d:\n" + d.log())
        rc, _, err = run_cli(["-c", d.conf, "-s", "reload"], cwd=d.dir)
        eq(rc, 0, "gatherd -s reload: " + err)
        wait_for(lambda: "reloaded" in d.log(), "\"reloaded\" in the log after -s reload")
        rc, _, err = run_cli(["-c", d.conf, "-s", "stop"], cwd=d.dir)
        eq(rc, 0, "gatherd -s stop: " + err)
        eq(d.wait_exit("-s stop"), 0, "exit status after -s stop")


@test
def test_detach_failure_exits_1_with_reason():
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        with Detached({"listen": [f"127.0.0.1:{port}"]}) as d:
            eq(d.rc, 1, "exit status of gatherd -d on a port in use")
            contains(d.log(), "Address already in use", "the reason, on the starter's stderr")
            check(not os.path.exists(d.path("gatherd.pid")), "no pid file after a failed start")
            # the daemon child is gone too: nothing re-parented to us is left
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                eq(pid, 0, "a child still running")
            except ChildProcessError:
                pass  # no children at all
        with Detached({"listen": [f"127.0.0.1:{port}"], "log": {"error_log": "error.log"}}) as d:
            eq(d.rc, 1, "exit status of gatherd -d on a port in use (error_log file)")
            contains(d.log(), "the reason is in error.log", "the starter is told where to look")
            contains(d.read("error.log"), "Address already in use", "error.log")
    finally:
        blocker.close()


@test
def test_detach_with_error_log_file_closes_stderr():
    with Detached({"log": {"error_log": "error.log", "access_log": "access.log"}}) as d:
        eq(d.rc, 0, "gatherd -d:\n" + d.log())
        eq(os.readlink(f"/proc/{d.pid}/fd/2"), "/dev/null", "stderr of the daemon (the error log is a file)")
        eq(d.get("/hello").status, 200)
        eq(d.stop(), 0)
        contains(d.read("error.log"), "started")
        contains(d.read("access.log"), '"GET /hello HTTP/1.1" 200', "access.log")
        eq(d.log().strip(), "", "nothing on the starter's stdout/stderr")


# --- user / group ----------------------------------------------------------------

def privileged_port(exclude=None):
    """A free 127.0.0.1 port below 1024 (binding it needs root)."""
    for p in list(range(1000, 1024)) + list(range(900, 1000)):
        if p == exclude:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise Skip("no free port below 1024")


@test
def test_user_group_drop_after_binding():
    if not is_root():
        raise Skip("needs root")
    port = privileged_port()

    def prepare(path):
        os.makedirs(os.path.join(path, "logs"))
        os.makedirs(os.path.join(path, "run"))
        os.chown(os.path.join(path, "run"), NOBODY, NOBODY)  # where "user" may remove its pid file

    cfg = {"listen": [f"127.0.0.1:{port}"], "user": "nobody", "group": "nogroup", "pid_file": "run/gatherd.pid",
           "log": {"error_log": "logs/error.log", "access_log": "logs/access.log"}}
    with Detached(cfg, prepare=prepare) as d:
        eq(d.rc, 0, "gatherd -d as root with user nobody:\n" + d.log() + d.read("logs/error.log"))
        st = proc_status(d.pid)
        eq(st["Uid"].split(), [str(NOBODY)] * 4, "Uid (real, effective, saved, fs)")
        eq(st["Gid"].split(), [str(NOBODY)] * 4, "Gid")
        eq(st["Groups"].split(), [str(NOBODY)], "supplementary groups")
        eq(st["CapEff"], "0000000000000000", "effective capabilities after the drop")
        for task in os.listdir(f"/proc/{d.pid}/task"):  # every thread switched, not just main
            eq(proc_status(f"{d.pid}/task/{task}")["Uid"].split()[1], str(NOBODY), f"euid of thread {task}")
        eq(d.get("/hello").status, 200, "the port below 1024, bound before the drop")
        for rel in ("logs/error.log", "logs/access.log"):
            s = os.stat(d.path(rel))
            eq((s.st_uid, s.st_gid), (NOBODY, NOBODY), f"owner of {rel}")
        wait_for(lambda: "running as user nobody (uid 65534, gid 65534)" in d.read("logs/error.log"),
                 "the privilege drop line in the error log")
        # logrotate's way: move the file, create the new one for the user, SIGUSR1
        wait_for(lambda: "GET /hello" in d.read("logs/access.log"), "the first access line")
        acc = d.path("logs/access.log")
        os.rename(acc, acc + ".1")
        os.close(os.open(acc, os.O_CREAT | os.O_WRONLY, 0o640))
        os.chown(acc, NOBODY, NOBODY)
        os.kill(d.pid, signal.SIGUSR1)
        wait_for(lambda: "log files reopened" in d.read("logs/error.log"), "the reopen")
        eq(d.get("/hello?after").status, 200)
        wait_for(lambda: "/hello?after" in d.read("logs/access.log"), "the line in the new access.log")
        check("/hello?after" not in d.read("logs/access.log.1"), "the moved file got no new line")
        check("cannot open" not in d.read("logs/error.log"), "reopen errors: " + d.read("logs/error.log"))
        # moved without a new file: the user cannot create one in root's directory; the old one is kept
        os.rename(acc, acc + ".2")
        os.kill(d.pid, signal.SIGUSR1)
        wait_for(lambda: "log files NOT all reopened" in d.read("logs/error.log"), "the partial reopen warning")
        contains(d.read("logs/error.log"), "cannot open log file logs/access.log: Permission denied; "
                                           "still writing to the previous one")
        eq(d.get("/hello?kept").status, 200)
        wait_for(lambda: "/hello?kept" in d.read("logs/access.log.2"), "the line in the file still open")
        # a reload cannot bind a new port below 1024 any more: refused, the old configuration runs on
        other = privileged_port(exclude=port)
        cfg2 = dict(d.cfg, listen=[f"127.0.0.1:{port}", f"127.0.0.1:{other}"])
        d.tmp.write("gatherd.json", cfg2)
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "reload failed" in d.read("logs/error.log"), "the refused reload")
        contains(d.read("logs/error.log"), f"cannot listen on 127.0.0.1:{other}: Permission denied")
        eq(d.get("/hello").status, 200, "still serving after the refused reload")
        eq(d.stop(), 0, "exit status")
        check(not os.path.exists(d.path("run/gatherd.pid")),
              "the pid file is removed by the unprivileged daemon (its directory belongs to it)")
        check("sanitizer" not in d.read("logs/error.log"))


@test
def test_user_numeric_id():
    """A bare uid (containers): no passwd entry needed, the group is the same number."""
    if not is_root():
        raise Skip("needs root")
    with Detached({"user": "54321"}) as d:
        eq(d.rc, 0, "gatherd -d:\n" + d.log())
        st = proc_status(d.pid)
        eq(st["Uid"].split()[1], "54321", "euid")
        eq(st["Gid"].split()[1], "54321", "egid")
        eq(st["Groups"].split(), ["54321"], "groups")
        eq(d.get("/hello").status, 200)
        contains(d.log(), "running as user 54321")
        # a reload cannot switch accounts: applied otherwise, with a warning
        d.tmp.write("gatherd.json", dict(d.cfg, user="54322"))
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.log(), "the reload")
        contains(d.log(), '"user"/"group" changed; the process keeps its account until a restart')
        eq(proc_status(d.pid)["Uid"].split()[1], "54321", "euid after the reload")
        eq(d.stop(), 0)
        # the pid file's directory is root's: the daemon says it could not remove it
        contains(d.log(), "cannot remove the pid file gatherd.pid: Permission denied")


@test
def test_user_not_root_warns_and_runs():
    if not is_root():
        raise Skip("needs root (to start the daemon as nobody)")
    with Detached({"user": "daemon"}, preexec_user=NOBODY, prepare=lambda p: os.chown(p, NOBODY, NOBODY)) as d:
        eq(d.rc, 0, "gatherd -d as nobody:\n" + d.log())
        contains(d.log(), '"user": "daemon" ignored: not started as root, running as uid 65534')
        eq(d.get("/hello").status, 200)


@test
def test_user_group_config_errors():
    with TempDir() as t:
        base = {"listen": ["127.0.0.1:1"], "routes": [{"path": "/", "respond": {"body": {}}}]}
        for extra, msg in (({"user": "no-such-user-gw"}, 'user: no such user "no-such-user-gw"'),
                           ({"user": "nobody", "group": "no-such-group-gw"}, 'group: no such group "no-such-group-gw"'),
                           ({"group": "nogroup"}, 'group: needs "user" as well'),
                           ({"user": ""}, "user: must be a name"),
                           ({"user": 65534}, "user: must be a name")):
            path = t.write("c.json", dict(base, **extra))
            rc, _, err = run_cli(["-t", "-c", path])
            eq(rc, 1, f"gatherd -t with {extra}")
            contains(err, msg, f"gatherd -t with {extra}")
        rc, _, err = run_cli(["-t", "-c", t.write("c.json", dict(base, user="nobody", group="nogroup"))])
        eq(rc, 0, "gatherd -t with user nobody, group nogroup: " + err)


# --- RLIMIT_NOFILE ------------------------------------------------------------------

NEEDY = {"max_connections": 2000, "backends": {"b": {"url": "http://127.0.0.1:9", "max_connections": 100}}}


@test
def test_nofile_raised_to_need():
    with Detached(NEEDY, rlimit=(256, 4096), log_level="info") as d:
        eq(d.rc, 0, "gatherd -d:\n" + d.log())
        soft = nofile_soft(d.pid)
        # need = 2000 clients + 100 x 2 workers + listeners and margin: above 2200, within the hard 4096
        check(2200 <= soft <= 4096, f"soft RLIMIT_NOFILE {soft}")
        m = re.search(r"open files limit raised from 256 to (\d+)", d.log())
        check(m is not None, "the raise is logged: " + d.log())
        eq(int(m.group(1)), soft, "the logged limit")
        check("open files limit is" not in d.log(), "no warning when the limit could be raised")


@test
def test_nofile_enough_is_left_alone():
    with Detached({"max_connections": 100}, rlimit=(1000, 4096), log_level="info") as d:
        eq(d.rc, 0, "gatherd -d:\n" + d.log())
        eq(nofile_soft(d.pid), 1000, "soft RLIMIT_NOFILE when it already suffices")
        check("open files limit" not in d.log(), "nothing logged")


@test
def test_nofile_hard_limit_warns():
    with Detached(NEEDY, rlimit=(256, 512)) as d:
        eq(d.rc, 0, "gatherd -d:\n" + d.log())
        soft = nofile_soft(d.pid)
        if soft >= 2200:
            # root with CAP_SYS_RESOURCE raised the hard limit itself: no warning is due
            check("open files limit is" not in d.log(), "warning despite a sufficient limit")
            return
        eq(soft, 512, "soft limit raised to the hard one")
        m = re.search(r"\[warn\].*open files limit is 512 \(hard limit 512\) but this configuration can use "
                      r"(\d+) descriptors", d.log())
        check(m is not None, "the warning: " + d.log())
        check(int(m.group(1)) >= 2200, "the need it names")
        contains(d.log(), "LimitNOFILE=", "the remedy")
        eq(d.get("/hello").status, 200, "the daemon runs on")


# --- logrotate -------------------------------------------------------------------------

SRCDIR = os.environ.get("GW_SRCDIR") or os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
LOGROTATE = shutil.which("logrotate") or ("/usr/sbin/logrotate" if os.access("/usr/sbin/logrotate", os.X_OK) else None)


def access_ids(text):
    return [int(m) for m in re.findall(r"GET /hello\?n=(\d+) ", text)]


@test
def test_logrotate_deploy_config_loses_no_line():
    """deploy/logrotate/gatherd, run by the real logrotate (paths moved to a
    temp dir) while a client sends numbered requests: every request is in
    exactly one file, the rotated file holds the earlier ones, and the second
    rotation compresses the first."""
    if LOGROTATE is None:
        raise Skip("logrotate is not installed (scripts/install-deps.sh installs it)")
    conf = open(os.path.join(SRCDIR, "deploy", "logrotate", "gatherd")).read()
    contains(conf, "/var/log/gatherd/*.log {")
    contains(conf, "/run/gatherd/gatherd.pid")

    def prepare(path):
        os.makedirs(os.path.join(path, "logs"))

    cfg = {"pid_file": "gatherd.pid", "log": {"error_log": "logs/error.log", "access_log": "logs/access.log"}}
    with Detached(cfg, prepare=prepare, args=["-w", "1"]) as d:  # one worker: lines in request order
        eq(d.rc, 0, "gatherd -d:\n" + d.log())
        logs = d.path("logs")
        rot = conf.replace("/var/log/gatherd", logs).replace("/run/gatherd/gatherd.pid", d.path("gatherd.pid"))
        rot_path = d.path("logrotate.conf")
        with open(rot_path, "w") as f:
            f.write(rot)
        os.chmod(rot_path, 0o644)
        sent = []
        stop = threading.Event()
        errors = []

        def client():
            n = 0
            try:
                with Conn("127.0.0.1", d.port) as c:
                    while not stop.is_set() and n < 20000:
                        r = c.request(req("GET", f"/hello?n={n}"))
                        if r.status != 200:
                            errors.append(r.status)
                        sent.append(n)
                        n += 1
            except Exception as e:  # the check below reports it
                errors.append(repr(e))

        def rotate():
            r = subprocess.run([LOGROTATE, "-f", "-s", d.path("logrotate.state"), rot_path],
                               capture_output=True, text=True, timeout=30)
            eq(r.returncode, 0, "logrotate: " + r.stdout + r.stderr)

        t = threading.Thread(target=client)
        t.start()
        try:
            wait_for(lambda: len(sent) > 200 and access_ids(d.read("logs/access.log")),
                     "requests before the first rotation, on disk")
            rotate()
            wait_for(lambda: "log files reopened" in d.read("logs/error.log"), "the reopen after logrotate")
            first_rot = len(sent)
            wait_for(lambda: len(sent) > first_rot + 200, "requests after the first rotation")
        finally:
            stop.set()
            t.join(30)
        eq(errors, [], "client errors")
        old, new = access_ids(d.read("logs/access.log.1")), access_ids(d.read("logs/access.log"))
        wait_for(lambda: len(access_ids(d.read("logs/access.log.1"))) + len(access_ids(d.read("logs/access.log")))
                 >= len(sent), "every access line on disk")
        old, new = access_ids(d.read("logs/access.log.1")), access_ids(d.read("logs/access.log"))
        check(old and new, f"lines on both sides of the rotation ({len(old)} old, {len(new)} new)")
        eq(sorted(old + new), list(range(len(sent))), "every request exactly once across the two files")
        check(max(old) < min(new), f"the rotated file holds the earlier requests (old up to {max(old)}, "
                                   f"new from {min(new)})")
        print(f"# logrotate: {len(old)} lines in access.log.1, {len(new)} in access.log, none lost or doubled")
        # the second rotation compresses the first (delaycompress) and starts access.log.1 anew
        rotate()
        wait_for(lambda: "log files reopened" in d.read("logs/error.log"), "the second reopen")  # a new file again
        with gzip.open(d.path("logs/access.log.2.gz"), "rt") as f:
            eq(access_ids(f.read()), old, "access.log.2.gz holds the first rotated file")
        eq(d.get("/hello?n=last").status, 200)
        wait_for(lambda: "n=last" in d.read("logs/access.log"), "a line in the newest access.log")
        eq(d.stop(), 0)
        # stopped: logrotate's postrotate must not fail on a missing pid file
        eq(os.path.exists(d.path("gatherd.pid")), False, "pid file removed")
        rotate()


if __name__ == "__main__":
    sys.exit(main())
