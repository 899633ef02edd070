#!/bin/bash
# Sets everything up and runs gatherd on the default configuration
# (conf/gatherd.json) with the demo backends (tests/stub/gw_stub on
# 127.0.0.1:9101), in the foreground. Ctrl-C stops both.
#
# The binaries are built out of tree in build/demo and linked from
# build/bin (gatherd, gw_stub), which the README's commands use.
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
cd "$SRC"
bash scripts/install-deps.sh
B="$SRC/build/demo"
if [ -f "$SRC/config.status" ]; then
    B="$SRC" # already configured in the tree: use that build
else
    [ -f configure ] || autoreconf -fi >/dev/null 2>&1
    mkdir -p "$B"
    [ -f "$B/Makefile" ] || (cd "$B" && "$SRC/configure" -q)
fi
make -C "$B" -j"$(nproc)" src/gatherd tests/stub/gw_stub >/dev/null
mkdir -p "$SRC/build/bin"
ln -sfn "$B/src/gatherd" "$SRC/build/bin/gatherd"
ln -sfn "$B/tests/stub/gw_stub" "$SRC/build/bin/gw_stub"
"$B/src/gatherd" -t -c conf/gatherd.json

# The demo's addresses must be free: answers from whatever else holds one
# would be mistaken for gatherd's.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 8080 9101 9180; do
    if port_taken "$port"; then
        echo "demo: 127.0.0.1:$port is already in use; the demo needs 8080 (gatherd), 9101 (demo backend)" >&2
        echo "      and 9180 (admin). What holds it: $(ss -Hltnp "sport = :$port" 2>/dev/null | head -n1 | awk '{print $NF}')" >&2
        echo "      Stop it (or change the ports in conf/gatherd.json) and run this again." >&2
        exit 1
    fi
done

"$B/tests/stub/gw_stub" -q -l 127.0.0.1:9101 &
STUB=$!
trap 'kill "$STUB" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    port_taken 9101 && break
    kill -0 "$STUB" 2>/dev/null || { echo "demo: the demo backend did not start (see above)" >&2; exit 1; }
    sleep 0.1
done
port_taken 9101 || { echo "demo: the demo backend is not listening on 127.0.0.1:9101 after 5 s" >&2; exit 1; }

PID="$SRC/build/demo/gatherd.pid"
cat <<MSG

gatherd is starting on http://127.0.0.1:8080 (demo backend on http://127.0.0.1:9101). Try:
  curl -i http://127.0.0.1:8080/api/dashboard/42     # 4 backend calls: fan-out, dependent call, foreach
  curl -i -H 'X-Stub-Delay: 300' http://127.0.0.1:8080/api/dashboard/42
                         # recommendations times out (100 ms): 200, X-Gateway-Completed: false, _errors
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code} %{time_total}s\n' \\
      -H 'X-Stub-Delay: 300' http://127.0.0.1:8080/api/dashboard/42; done; \\
      curl -s http://127.0.0.1:8080/api/dashboard/42 | grep -o '"_errors".*'
                         # after 5 timeouts the recs circuit opens: circuit_open at once for 2 s
  for i in 1 2 3 4 5 6 7; do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8080/api/limited; done; echo
                         # 5 a minute per client, then 429 rate_limited
  build/bin/gatherd -s reload --pid $PID    # reload conf/gatherd.json
  curl -i http://127.0.0.1:8080/
  curl -i http://127.0.0.1:8080/health
  curl -i http://127.0.0.1:8080/api/hello
  curl -i -X POST http://127.0.0.1:8080/health      # 405 with Allow
  curl -i http://127.0.0.1:8080/nowhere              # 404 JSON error
  curl -i http://127.0.0.1:9101/users/42             # the demo backend itself
  wrk -t2 -c50 -d10s http://127.0.0.1:8080/api/dashboard/42   # load test (see README: Benchmarks)
Admin listener (127.0.0.1:9180):
  open http://127.0.0.1:9180/status in a browser     # live page: routes, backends, breakers, latency
  curl -s http://127.0.0.1:9180/metrics | grep gatherd_requests_total
  curl -i http://127.0.0.1:9180/readyz               # 503 while a graceful stop drains
Ctrl-C stops gracefully.

MSG
"$B/src/gatherd" -c conf/gatherd.json --pid "$PID"
