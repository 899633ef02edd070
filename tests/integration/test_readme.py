#!/usr/bin/env python3
"""A newcomer following the README: the demo command and the nginx + wrk
recipe, run as written, each in a network namespace of its own so the fixed
ports they use (8080, 8000, 9101, 9180) are free and nothing on the host is
touched.

  - scripts/demo.sh builds, starts the demo backend and gatherd, and every
    `curl` line it prints answers as its comment says; the reload command it
    prints works; a second demo.sh while the ports are taken stops with the
    reason instead of showing another program's answers;
  - the README's "nginx in front, load-tested with wrk" block runs as written
    (with wrk shortened to 1 s): gatherd's answer through nginx, both wrk runs
    with no error and no non-2xx answer, everything stopped at the end.

These build and run the source tree's own binaries (build/demo, build/bin),
as a user would: they need root (network namespaces), a writable source tree
and nginx/wrk/curl; they run in one tier only (not under the sanitizers).

Run: GATHERD=... GW_SRCDIR=... python3 tests/integration/test_readme.py [NAME-SUBSTRING ...]
The last line of the output is "N passed, N failed".
"""

import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gwtest import GATHERD, NotInTier, Skip, check, contains, eq, exclusive, main, test, _is_sanitized  # noqa: E402

SRCDIR = os.environ.get("GW_SRCDIR") or os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def needs():
    if _is_sanitized(GATHERD):
        raise NotInTier("run once, in the build without sanitizers")
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        raise Skip("needs root, unshare and ip (a network namespace of its own)")
    if not os.access(SRCDIR, os.W_OK) or not os.path.isfile(os.path.join(SRCDIR, "scripts", "demo.sh")):
        raise NotInTier("needs the writable source tree (demo.sh builds in build/), not the release tarball's")
    for tool in ("curl", "nginx", "wrk"):
        if shutil.which(tool) is None:
            raise Skip(f"needs {tool}")


def in_netns(script, timeout):
    """Runs a bash script in a new network namespace (loopback up) from the
    source tree; its processes end with it (the script stops them by PID)."""
    r = subprocess.run(["unshare", "--net", "bash", "-c", "ip link set lo up\n" + script], cwd=SRCDIR,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


DEMO = r"""
set -u
wait_up() { for _ in $(seq 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; return 1; }
bash scripts/demo.sh >/tmp/demo.$$.out 2>&1 &
DEMO=$!
if ! wait_up http://127.0.0.1:8080/health; then echo "DEMO NOT UP"; cat /tmp/demo.$$.out; kill $DEMO; exit 1; fi
echo "=== printed"; cat /tmp/demo.$$.out
# every curl line the demo printed, run as printed (its comment is a shell comment)
grep -E '^  (curl|for i in 1 2 3 4 5 6 7;)' /tmp/demo.$$.out | while IFS= read -r line; do
    echo "=== run: $line"
    bash -c "$line" 2>&1 | tr -d '\r'
    echo "=== rc ${PIPESTATUS[0]}"
done
line="$(grep -E '^  build/bin/gatherd -s reload' /tmp/demo.$$.out | sed 's/#.*//')"
echo "=== reload: $line"
$line; echo "=== reload rc $?"
sleep 0.5
grep -c 'reloaded' /tmp/demo.$$.out | sed 's/^/=== reloaded lines /'
# the ports are taken now: a second demo stops with the reason
bash scripts/demo.sh >/tmp/demo2.$$.out 2>&1; echo "=== second demo rc $?"
cat /tmp/demo2.$$.out | sed 's/^/second: /'
kill "$(cat build/demo/gatherd.pid)"; wait $DEMO; echo "=== demo rc $?"
rm -f /tmp/demo.$$.out /tmp/demo2.$$.out
"""


@test
def demo_serves_what_it_prints():
    needs()
    rc, out = in_netns(DEMO, timeout=600)
    eq(rc, 0, "the demo script's run:\n" + out[-3000:])
    runs = re.findall(r"=== run: (.*?)\n(.*?)=== rc (\d+)", out, re.S)
    check(len(runs) >= 8, f"the curl lines the demo prints: {len(runs)}\n{out[-3000:]}")
    for cmd, text, code in runs:
        eq(code, "0", f"{cmd!r} exit status; output {text[-500:]!r}")
    by = {cmd.split("#")[0].strip(): text for cmd, text, _ in runs}

    def answer(fragment):
        hits = [t for c, t in by.items() if fragment in c]
        check(hits, f"no printed command with {fragment!r}: {list(by)}")
        return hits[0]

    dash = answer("curl -i http://127.0.0.1:8080/api/dashboard/42")
    contains(dash, "HTTP/1.1 200", "the dashboard")
    contains(dash, "X-Gateway-Completed: true", "the dashboard is complete")
    contains(dash, '"recommendations":[1,2,3]', "the dashboard's recommendations")
    slow = answer("-H 'X-Stub-Delay: 300' http://127.0.0.1:8080/api/dashboard/42")
    contains(slow, "X-Gateway-Completed: false", "slow recommendations degrade")
    contains(slow, '"code":"timeout"', "the reason in _errors")
    limited = answer("/api/limited")
    check(re.search(r"(200 ){5}429", limited) is not None, f"5 a minute, then 429: {limited!r}")
    contains(answer("curl -i -X POST http://127.0.0.1:8080/health"), "HTTP/1.1 405", "POST /health")
    contains(answer("curl -i http://127.0.0.1:8080/nowhere"), "HTTP/1.1 404", "/nowhere")
    contains(answer("curl -i http://127.0.0.1:9101/users/42"), "HTTP/1.1 200", "the demo backend")
    contains(answer("/metrics | grep gatherd_requests_total"), 'gatherd_requests_total{route="/api/dashboard/{id}"',
             "the metrics line")
    contains(out, "=== reload rc 0", "the printed reload command")
    check(re.search(r"=== reloaded lines [1-9]", out) is not None, "the reload is logged")
    contains(out, "=== second demo rc 1", "a second demo while the ports are taken")
    contains(out, "second: demo: 127.0.0.1:8080 is already in use", "the reason")
    contains(out, "=== demo rc 0", "the demo stops gracefully")


def readme_block(marker):
    text = open(os.path.join(SRCDIR, "README.md")).read()
    at = text.index(marker)
    start = text.index("```sh\n", at) + len("```sh\n")
    return text[start:text.index("```\n", start)]


@exclusive
@test
def readme_nginx_and_wrk_recipe_runs_as_written():
    needs()
    block = readme_block("In five minutes: nginx in front")
    contains(block, "wrk -t2 -c50 -d10s", "the block runs wrk for 10 s")
    script = "set -e\nbuild/bin/gatherd -t -c conf/gatherd.json\n" + block.replace("-d10s", "-d1s")
    if not os.access(os.path.join(SRCDIR, "build", "bin", "gatherd"), os.X_OK):
        raise Skip("build/bin/gatherd is made by the set-up commands (demo_serves_what_it_prints runs first)")
    rc, out = in_netns(script, timeout=120)
    eq(rc, 0, "the recipe's exit status:\n" + out[-3000:])
    contains(out, "HTTP/1.1 200 OK", "gatherd's answer through nginx")
    contains(out, "Server: nginx", "through nginx")
    contains(out, "X-Gateway-Completed: true", "a complete aggregate")
    rates = re.findall(r"Requests/sec:\s+([0-9.]+)", out)
    eq(len(rates), 2, "two wrk runs")
    check(all(float(x) > 0 for x in rates), f"requests/s {rates}")
    check("Non-2xx" not in out and "Socket errors" not in out, "no error in either wrk run:\n" + out[-2000:])
    contains(out, "stopping gracefully", "gatherd -s stop")


if __name__ == "__main__":
    sys.exit(main())
