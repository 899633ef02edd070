#!/usr/bin/env python3
"""Tests of the container and Kubernetes files (README "Deployment"):
Dockerfile, .dockerignore, deploy/docker/gatherd.json and deploy/k8s/.

There is no container engine on the test machines, so the image itself is
not built here. What is checked instead, against the real files and the
real daemon:
  - the Dockerfile's structure (stages, non-root numeric USER, EXPOSE,
    STOPSIGNAL, COPY sources that exist);
  - the runtime stage installs exactly the Debian packages that hold the
    libraries `ldd gatherd` names (plus what debian:12-slim already has);
  - the build stage's recipe (configure, make, make install DESTDIR) run on
    the build context the .dockerignore leaves, and `gatherd -t` on what it
    installed (normal build only, from a git tree);
  - the runtime stage emulated in a fresh Debian 12 root file system made by
    mmdebstrap: its packages, COPY destinations, RUN, USER, ENTRYPOINT and
    CMD, EXPOSEd ports, on a read-only root (as root, normal build only);
  - the container configuration passes `-t` and a real gatherd runs it;
  - the manifests agree with each other, the Dockerfile and the
    configuration (labels, ports, probes, grace period, security context,
    mount path), `kubectl kustomize` renders them when kubectl is present;
  - the ConfigMap's configuration drains as Kubernetes expects: /readyz turns
    503 on SIGTERM while a slow request still completes, then exit 0.

Run: GATHERD=... GW_STUB=... GW_SRCDIR=... python3 tests/integration/test_deploy.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gwtest  # noqa: E402
from gwtest import (GATHERD, SLOW, Conn, Daemon, NotInTier, Skip, TestFailure, check, contains, eq, main, req,  # noqa: E402
                    run_cli)

_saved_tests = list(gwtest._TESTS)
import test_proxy as tp  # noqa: E402
gwtest._TESTS[:] = _saved_tests

dtest = tp.ptest
Stub = tp.Stub

SRCDIR = os.environ.get("GW_SRCDIR") or os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
K8S = os.path.join(SRCDIR, "deploy", "k8s")
SANITIZED = gwtest._is_sanitized(GATHERD)
# Packages every debian:12-slim image has (Essential: yes, or needed by apt itself),
# so the runtime stage need not install them: libc6 (libc, libm, libpthread, ld.so),
# libgcc-s1 and libstdc++6 (apt depends on them), zlib1g, libzstd1, liblzma5.
SLIM_BASE = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libzstd1", "liblzma5"}

try:
    import yaml
except ImportError:  # scripts/install-deps.sh installs python3-yaml
    yaml = None


# --- the Dockerfile -----------------------------------------------------------------------

def dockerfile():
    """[(stage name, base image, [(instruction, argument text)])], joining
    continuation lines and dropping comments."""
    text = open(os.path.join(SRCDIR, "Dockerfile")).read()
    text = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    stages = []
    for line in text.splitlines():
        if not line.strip():
            continue
        instr, _, arg = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", arg.strip(), re.I)
            check(m is not None, f"FROM line: {arg}")
            stages.append((m.group(2), m.group(1), []))
        else:
            check(stages, f"{instr} before FROM")
            stages[-1][2].append((instr, " ".join(arg.split())))
    return stages


def instrs(stage, name):
    return [a for i, a in stage[2] if i == name]


def apt_packages(stage):
    """The packages of the stage's apt-get install lines."""
    pkgs = []
    for run in instrs(stage, "RUN"):
        for part in run.split("&&"):
            words = part.split()
            if "apt-get" in words and "install" in words:
                pkgs += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return pkgs


def json_array(arg):
    v = json.loads(arg)
    check(isinstance(v, list) and all(isinstance(x, str) for x in v), f"exec form expected: {arg}")
    return v


@dtest
def dockerfile_stages_user_ports_signal():
    stages = dockerfile()
    print("# no container engine here: the image is not built; its parts are checked one by one")
    eq([(n, img) for n, img, _ in stages], [("build", "debian:12"), ("runtime", "debian:12-slim")],
       "stages (name, base image)")
    rt = stages[-1]
    users = instrs(rt, "USER")
    eq(len(users), 1, "one USER in the runtime stage")
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[0])
    check(m is not None, f"USER is numeric (runAsNonRoot can verify it): {users[0]}")
    check(int(m.group(1)) != 0 and (m.group(2) is None or int(m.group(2)) != 0), "USER is not root")
    exposed = {p.split("/")[0] for e in instrs(rt, "EXPOSE") for p in e.split()}
    eq(exposed, {"8080", "9180"}, "EXPOSE")
    eq(instrs(rt, "STOPSIGNAL"), ["SIGTERM"], "STOPSIGNAL (gatherd's graceful stop)")
    entry = json_array(instrs(rt, "ENTRYPOINT")[0]) + json_array(instrs(rt, "CMD")[0])
    eq(entry[:2], ["/usr/sbin/gatherd", "-c"], "ENTRYPOINT + CMD")
    conf_in_image = entry[2]
    copies = {}
    for n, _, body in stages:
        for i, a in body:
            if i != "COPY":
                continue
            words = a.split()
            if any(w.startswith("--from=") for w in words):
                continue
            *srcs, dest = [w for w in words if not w.startswith("--")]
            for s in srcs:
                if s != ".":
                    check(os.path.exists(os.path.join(SRCDIR, s)), f"COPY source {s} exists in the repository")
                copies[dest] = s
    eq(copies.get(conf_in_image), "deploy/docker/gatherd.json", f"what is copied to {conf_in_image}")
    check(any(r.startswith('["/usr/sbin/gatherd", "-t"') for r in instrs(rt, "RUN")),
          "the runtime stage checks its configuration with gatherd -t")
    check(any("--from=build" in a and "/usr/sbin/gatherd" in a for a in instrs(rt, "COPY")),
          "the binary comes from the build stage")


@dtest
def dockerfile_runtime_packages_are_the_libraries_of_gatherd():
    """Every library ldd names comes from a package the runtime stage installs
    or debian:12-slim has; every package installed is needed."""
    if SANITIZED:  # it links more (no --as-needed effect): the image holds the normal build
        raise NotInTier("the image holds the normal build; its libraries are checked in that run")
    if shutil.which("ldd") is None or shutil.which("dpkg") is None:
        raise Skip("needs ldd and dpkg (Debian)")
    stages = dockerfile()
    runtime = set(apt_packages(stages[-1]))
    check("ca-certificates" in runtime, "ca-certificates (https:// backends) in the runtime stage")
    out = subprocess.run(["ldd", GATHERD], capture_output=True, text=True, check=True).stdout
    needed = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if not m:
            continue  # linux-vdso, the dynamic loader (libc6)
        path = os.path.realpath(m.group(2))
        r = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        if r.returncode != 0:  # usrmerge: dpkg knows the /lib path, ldd may print /usr/lib
            alt = path.replace("/usr/lib/", "/lib/", 1) if path.startswith("/usr/lib/") else "/usr" + path
            r = subprocess.run(["dpkg", "-S", alt], capture_output=True, text=True)
        eq(r.returncode, 0, f"dpkg -S {path} ({r.stderr.strip()})")
        pkg = r.stdout.split(":")[0]
        needed[m.group(1)] = pkg
    print("# libraries -> packages: " + ", ".join(f"{k} {v}" for k, v in sorted(needed.items())))
    missing = {lib: p for lib, p in needed.items() if p not in runtime and p not in SLIM_BASE}
    eq(missing, {}, "libraries whose package the runtime stage does not install")
    unused = runtime - set(needed.values()) - {"ca-certificates"}
    eq(unused, set(), "runtime packages no library of gatherd comes from")
    for p in runtime:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], capture_output=True, text=True)
        eq(r.returncode, 0, f"{p} is a Debian 12 package (installed here)")


def dockerignored(rel, patterns):
    """Whether the .dockerignore patterns exclude rel (a file path)."""
    parts = rel.split("/")
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        for i in range(1, len(parts) + 1):  # a pattern matching a parent directory excludes the file
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, p) or (p.startswith("**/") and
                                                  (fnmatch.fnmatchcase(prefix, p[3:]) or
                                                   fnmatch.fnmatchcase(parts[i - 1], p[3:]))):
                excluded = not neg
                break
    return excluded


@dtest
def dockerfile_build_recipe_runs_on_the_build_context():
    """The build stage's commands, on the files that reach the build context
    (tracked by git, not excluded by .dockerignore), then the runtime
    stage's gatherd -t on what make install put in DESTDIR."""
    if SANITIZED:
        raise NotInTier("run once, in the normal build")
    if not os.path.exists(os.path.join(SRCDIR, ".git")):
        raise NotInTier("run from a git checkout only (the build context is what git tracks), not again under distcheck")
    if shutil.which("git") is None:
        raise Skip("needs git (the build context is what git tracks)")
    stages = dockerfile()
    build = stages[0]
    eq(instrs(build, "WORKDIR"), ["/src"], "WORKDIR of the build stage")
    patterns = [l.strip() for l in open(os.path.join(SRCDIR, ".dockerignore")) if l.strip() and
                not l.startswith("#")]
    files = subprocess.run(["git", "-C", SRCDIR, "ls-files", "-z"], capture_output=True, check=True).stdout
    files = [f for f in files.decode().split("\0") if f]
    ctx = [f for f in files if not dockerignored(f, patterns)]
    check("configure.ac" in ctx and "Makefile.am" in ctx and "src/gw_main.c" in ctx, "sources in the context")
    check(not any(f.startswith(".git/") for f in ctx), ".git is not in the context")
    with gwtest.TempDir() as t:
        src, out = os.path.join(t.path, "src"), os.path.join(t.path, "out")
        for f in ctx:
            os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
            shutil.copy2(os.path.join(SRCDIR, f), os.path.join(src, f))
        runs = [r for r in instrs(build, "RUN") if "apt-get" not in r]
        eq(len(runs), 1, "one build RUN besides apt-get")
        script = runs[0].replace("DESTDIR=/out", "DESTDIR=" + shlex.quote(out)).replace(
            "/out/usr/sbin/gatherd", shlex.quote(out) + "/usr/sbin/gatherd")
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-ec", script], cwd=src, capture_output=True, text=True, timeout=900)
        eq(r.returncode, 0, f"the build stage's RUN failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        print(f"# build stage recipe: {time.monotonic() - t0:.0f} s; {r.stdout.strip().splitlines()[-2]}")
        binary = os.path.join(out, "usr", "sbin", "gatherd")
        check(os.access(binary, os.X_OK), "make install put gatherd in DESTDIR/usr/sbin (the COPY --from=build path)")
        r = subprocess.run([binary, "-t", "-c", os.path.join(SRCDIR, "deploy", "docker", "gatherd.json")],
                           capture_output=True, text=True, timeout=30)
        eq(r.returncode, 0, "the runtime stage's gatherd -t: " + r.stderr)
        # what make install put in sysconfdir is valid as installed (its include names conf.d/)
        installed = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f == "gatherd.json"]
        eq(len(installed), 1, "make install installs one gatherd.json")
        check(os.path.isfile(os.path.join(os.path.dirname(installed[0]), "conf.d", "demo.json")),
              "make install installs the conf.d/ that gatherd.json includes")
        r = subprocess.run([binary, "-t", "-c", installed[0]], capture_output=True, text=True, timeout=30)
        eq(r.returncode, 0, "gatherd -t on the installed gatherd.json: " + r.stderr)


PROBE = r"""
import socket, sys, time
def get(port, path):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path).encode())
    d = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        d += c
    return d.split(b"\r\n")[0].decode()
pid = int(sys.argv[1])
for _ in range(400):
    try:
        print("healthz", get(9180, "/healthz"))
        print("readyz", get(9180, "/readyz"))
        print("http", get(8080, "/no-such-route"))
        break
    except OSError:
        time.sleep(0.05)
for line in open("/proc/%d/status" % pid):
    if line.startswith(("Uid:", "Gid:")):
        print(line.strip())
"""

RUN_IN_NS = """
set -e
ip link set lo up
mount --bind "$ROOT" "$ROOT"
mount -o remount,ro,bind "$ROOT"
chroot --userspec="$USERSPEC" "$ROOT" "$@" &
pid=$!
"$PY" "$PROBE" "$pid"
if touch "$ROOT/written" 2>/dev/null; then echo "root writable"; fi
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
echo "exit $rc"
"""


# A made root file system is kept (as a tar) for this long, keyed by what it
# holds: the runs after the first unpack it in seconds instead of downloading
# and installing Debian again (about two minutes).
ROOTFS_CACHE_DAYS = 7


def debian_rootfs(root, pkgs):
    """A fresh Debian 12 root file system in root (variant apt, plus pkgs),
    from the cache when one with exactly these packages is recent enough.
    Returns where it came from, for the log."""
    cache = os.environ.get("GW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gatherd-tests")
    key = hashlib.sha256(("bookworm apt " + " ".join(sorted(pkgs))).encode()).hexdigest()[:16]
    tar = os.path.join(cache, f"rootfs-bookworm-{key}.tar")
    fresh = os.path.exists(tar) and time.time() - os.path.getmtime(tar) < ROOTFS_CACHE_DAYS * 86400
    if not fresh:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{tar}.{os.getpid()}.tmp.tar"
        r = subprocess.run(["mmdebstrap", "--variant=apt", "--mode=root", "--include=" + ",".join(pkgs),
                            "bookworm", tmp], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if re.search(r"Failed to fetch|Could not resolve|Temporary failure|Could not connect", r.stderr):
                raise Skip("the Debian mirror is unreachable: " + r.stderr.strip().splitlines()[-1])
            eq(r.returncode, 0, "mmdebstrap: " + r.stderr[-3000:])
        os.rename(tmp, tar)  # whole or not at all, for a runner in parallel
    os.makedirs(root)
    r = subprocess.run(["tar", "-xf", tar, "-C", root], capture_output=True, text=True, timeout=300)
    eq(r.returncode, 0, "unpacking the root file system: " + r.stderr[-2000:])
    return "the cache" if fresh else "mmdebstrap"


@dtest
def dockerfile_runtime_stage_in_a_debian_rootfs():
    """The runtime stage without a container engine: a fresh Debian 12 root
    file system (mmdebstrap, variant apt: essential packages + apt, what
    debian:12-slim holds) with exactly the stage's apt-get packages, the
    binary and the configuration where its COPY lines put them, its RUN
    gatherd -t, then ENTRYPOINT + CMD as its USER on a read-only root in a
    network namespace of its own, probed on the EXPOSEd ports."""
    if SANITIZED:
        raise NotInTier("run once, in the normal build (the image holds a normal build)")
    if not os.path.exists(os.path.join(SRCDIR, ".git")):
        raise NotInTier("run from a git checkout only (not again under distcheck)")
    if os.geteuid() != 0:
        raise Skip("needs root (chroot, mount and network namespaces)")
    for tool in ("mmdebstrap", "unshare", "chroot", "ip"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed (scripts/install-deps.sh installs mmdebstrap)")
    rt = dockerfile()[-1]
    pkgs = apt_packages(rt)
    copies = [a.split() for a in instrs(rt, "COPY")]
    (bin_copy,) = [c for c in copies if c[0] == "--from=build"]
    (conf_copy,) = [c for c in copies if not c[0].startswith("--")]
    entry = json_array(instrs(rt, "ENTRYPOINT")[0]) + json_array(instrs(rt, "CMD")[0])
    user = instrs(rt, "USER")[0]
    with gwtest.TempDir() as t:
        root = os.path.join(t.path, "rootfs")
        t0 = time.monotonic()
        origin = debian_rootfs(root, pkgs)
        print(f"# Debian 12 rootfs with {' '.join(pkgs)}: {time.monotonic() - t0:.0f} s (from {origin})")
        for src, dest in ((GATHERD, bin_copy[-1]), (os.path.join(SRCDIR, conf_copy[0]), conf_copy[1])):
            path = root + dest
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copy(src, path)
        for run in instrs(rt, "RUN"):
            if run.startswith("["):
                r = subprocess.run(["chroot", root] + json_array(run), capture_output=True, text=True, timeout=60)
                eq(r.returncode, 0, f"RUN {run} in the rootfs: {r.stderr}")
        probe = t.write("probe.py", PROBE)
        script = t.write("run.sh", RUN_IN_NS)
        env = dict(os.environ, ROOT=root, USERSPEC=user, PY=sys.executable, PROBE=probe)
        r = subprocess.run(["unshare", "--net", "--mount", "bash", script] + entry, capture_output=True,
                           text=True, timeout=60, env=env)
        out = r.stdout
        print("# " + out.strip().replace("\n", "\n# "))
        eq(r.returncode, 0, f"the container run: {r.stdout}\n{r.stderr[-3000:]}")
        contains(out, "healthz HTTP/1.1 200 OK", "admin /healthz on the EXPOSEd 9180")
        contains(out, "readyz HTTP/1.1 200 OK", "admin /readyz")
        contains(out, "http HTTP/1.1 404 Not Found", "the gateway on the EXPOSEd 8080")
        uid, _, gid = user.partition(":")
        check(re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", out, re.M), f"runs as uid {uid}: {out}")
        check(re.search(rf"^Gid:\s+{gid or uid}\s", out, re.M), f"runs as gid {gid}: {out}")
        check("root writable" not in out, "the root file system is read-only")
        contains(out, "exit 0", "exit status after SIGTERM")
        check("[emerg]" not in r.stderr and "[error]" not in r.stderr, "errors in the log: " + r.stderr)


# --- the container configuration ---------------------------------------------------------------

def for_test(cfg, stub=None):
    """cfg with the listeners on free loopback ports (gwtest.Daemon fills in
    PORT and APORT) and, with a stub, every backend pointed at it with a
    timeout that lets a deliberately slow request finish."""
    cfg = json.loads(json.dumps(cfg))
    cfg["listen"] = ["127.0.0.1:PORT"]
    cfg["admin"] = {"listen": "127.0.0.1:APORT"}
    if stub:
        for b in cfg["backends"].values():
            b["url"] = stub.url
            b["timeout_ms"] = 10000
    return cfg


def admin_get(d, path):
    with Conn("127.0.0.1", d.admin_port) as c:
        return c.request(req("GET", path, host="admin"))


@dtest
def container_config_checks_and_runs():
    path = os.path.join(SRCDIR, "deploy", "docker", "gatherd.json")
    rc, _, err = run_cli(["-t", "-c", path])
    eq(rc, 0, "gatherd -t deploy/docker/gatherd.json: " + err)
    cfg = json.load(open(path))
    eq(cfg["listen"], ["0.0.0.0:8080"], "listen (all interfaces of the container)")
    eq(cfg["admin"]["listen"], "0.0.0.0:9180", "admin listen (reachable by probes)")
    check(cfg.get("log", {}).get("error_log", "stderr") == "stderr", "error log on stderr (the container's log)")
    check("pid_file" not in cfg and "user" not in cfg, "no pid file, no user switch (read-only root, non-root)")
    d = Daemon(for_test(cfg))  # its backends' names do not resolve here; nothing calls them
    eq(admin_get(d, "/healthz").status, 200, "/healthz")
    eq(admin_get(d, "/readyz").status, 200, "/readyz")


# --- Kubernetes ------------------------------------------------------------------------------

def manifests():
    if yaml is None:
        raise Skip("python3-yaml is not installed (scripts/install-deps.sh installs it)")
    docs = {}
    for name in sorted(os.listdir(K8S)):
        if name.endswith(".yaml"):
            with open(os.path.join(K8S, name)) as f:
                for doc in yaml.safe_load_all(f):
                    if doc:
                        docs[doc["kind"]] = doc
    return docs


def configmap_config(docs):
    cm = docs["ConfigMap"]
    eq(list(cm["data"]), ["gatherd.json"], "ConfigMap keys")
    return json.loads(cm["data"]["gatherd.json"])


@dtest
def k8s_manifests_agree():
    docs = manifests()
    eq(sorted(docs), ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Kustomization", "Service"], "kinds")
    api = {k: v["apiVersion"] for k, v in docs.items()}
    eq(api, {"ConfigMap": "v1", "Deployment": "apps/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
             "Kustomization": "kustomize.config.k8s.io/v1beta1", "Service": "v1"}, "apiVersions")
    eq(sorted(docs["Kustomization"]["resources"]), sorted(n for n in os.listdir(K8S)
                                                          if n.endswith(".yaml") and n != "kustomization.yaml"),
       "kustomization resources = the manifests")
    cfg = configmap_config(docs)
    dep = docs["Deployment"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    check(sel.items() <= labels.items(), f"Deployment selector {sel} matches the pod labels {labels}")
    svc = docs["Service"]
    check(svc["spec"]["selector"].items() <= labels.items(), "Service selector matches the pod labels")
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listen_port = int(cfg["listen"][0].rsplit(":", 1)[1])
    admin_port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
    eq(ports, {"http": listen_port, "admin": admin_port}, "container ports = the ConfigMap's listen and admin")
    expose = {int(p) for e in instrs(dockerfile()[-1], "EXPOSE") for p in e.split()}
    eq(set(ports.values()), expose, "container ports = the Dockerfile's EXPOSE")
    for p in svc["spec"]["ports"]:
        check(p["targetPort"] in ports or p["targetPort"] in ports.values(), f"Service targetPort {p['targetPort']}")
    eq(svc["metadata"]["annotations"].get("prometheus.io/port"), str(admin_port), "Prometheus scrape port")
    eq(svc["metadata"]["annotations"].get("prometheus.io/path"), "/metrics", "Prometheus path")
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    eq((live["path"], ports.get(live["port"], live["port"])), ("/healthz", admin_port), "liveness probe")
    eq((ready["path"], ports.get(ready["port"], ready["port"])), ("/readyz", admin_port), "readiness probe")
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    eq(pre[0], "/bin/sleep", "preStop")
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    need = float(pre[1]) + cfg.get("shutdown_timeout_ms", 10000) / 1000
    check(grace >= need + 5, f"terminationGracePeriodSeconds {grace} >= preStop {pre[1]} s + "
                             f"shutdown_timeout_ms + 5 s margin ({need + 5})")
    psc, csc = pod["spec"]["securityContext"], c["securityContext"]
    check(psc["runAsNonRoot"] is True, "runAsNonRoot")
    user = instrs(dockerfile()[-1], "USER")[0].split(":")[0]
    eq(str(psc["runAsUser"]), user, "runAsUser = the Dockerfile's USER")
    eq((csc["readOnlyRootFilesystem"], csc["allowPrivilegeEscalation"], csc["capabilities"]["drop"]),
       (True, False, ["ALL"]), "container securityContext")
    check("pid_file" not in cfg and all(v == "stderr" for k, v in cfg.get("log", {}).items()
                                        if k in ("error_log", "access_log")),
          "nothing written to the read-only root: no pid file, logs on stderr")
    args = c.get("args", [])
    conf_path = args[args.index("-c") + 1] if "-c" in args else "/etc/gatherd/gatherd.json"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    eq(os.path.join(mount["mountPath"], "gatherd.json"), conf_path, "the ConfigMap is mounted where -c reads")
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
    eq(vol["configMap"]["name"], docs["ConfigMap"]["metadata"]["name"], "the volume's ConfigMap")
    workers = cfg.get("workers")
    check(isinstance(workers, int), "\"workers\" is fixed in the ConfigMap (auto would count the node's CPUs)")
    eq(str(c["resources"]["requests"]["cpu"]), str(workers), "CPU request = workers")
    hpa = docs["HorizontalPodAutoscaler"]
    eq((hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]),
       ("Deployment", dep["metadata"]["name"]), "HPA target")
    check(hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"], "replicas in HPA range")
    eq(dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "rollouts keep every pod until its successor is ready")


@dtest
def k8s_kustomize_renders():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise Skip("kubectl is not installed (not a Debian package); the manifests were checked with python3-yaml")
    r = subprocess.run([kubectl, "kustomize", K8S], capture_output=True, text=True, timeout=60)
    eq(r.returncode, 0, "kubectl kustomize: " + r.stderr)
    kinds = sorted(re.findall(r"^kind: (\S+)$", r.stdout, re.M))
    eq(kinds, ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"], "rendered objects")


@dtest
def k8s_configmap_config_drains_like_a_pod():
    """The ConfigMap's configuration on a real gatherd: /readyz 200, then on
    SIGTERM (what the kubelet sends after preStop) /readyz 503 while a slow
    request still completes with 200, and exit 0."""
    docs = manifests()
    cfg = configmap_config(docs)
    with gwtest.TempDir() as t:
        rc, _, err = run_cli(["-t", "-c", t.write("gatherd.json", cfg)])
        eq(rc, 0, "gatherd -t on the ConfigMap's gatherd.json: " + err)
    stub = Stub()
    d = Daemon(for_test(cfg, stub), workers=cfg["workers"])
    eq(admin_get(d, "/readyz").status, 200, "/readyz before the stop")
    result = {}

    def slow():
        try:
            with Conn("127.0.0.1", d.port, timeout=10) as c:
                result["r"] = c.request(req("GET", "/users/7?delay=%d" % int(1500 * SLOW)))
        except Exception as e:
            result["e"] = e

    th = threading.Thread(target=slow)
    th.start()
    time.sleep(0.3 * SLOW)  # the request is at the stub
    d.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 1.0 * SLOW
    status = None
    while time.monotonic() < deadline:
        try:
            status = admin_get(d, "/readyz").status
        except OSError:
            status = None
        if status == 503:
            break
        time.sleep(0.02)
    eq(status, 503, "/readyz soon after SIGTERM, while a request is in flight")
    check(th.is_alive(), "the slow request is still in flight when /readyz says 503")
    th.join(10 * SLOW)
    check("e" not in result, f"the slow request failed: {result.get('e')!r}")
    eq(result["r"].status, 200, "the request in flight completes")
    eq(d.wait(15 * SLOW), 0, "exit status after the drain")


if __name__ == "__main__":
    sys.exit(main())
