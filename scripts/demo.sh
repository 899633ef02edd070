#!/bin/bash
# Sets everything up and runs gatherd on the default configuration
# (conf/gatherd.json) with the demo backends (tests/stub/gw_stub on
# 127.0.0.1:9101), in the foreground. Ctrl-C stops both.
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
cd "$SRC"
bash scripts/install-deps.sh
# Out-of-tree build in build/demo, so the source tree stays clean for the
# test suite's own builds.
B="$SRC/build/demo"
if [ -f "$SRC/config.status" ]; then
    B="$SRC" # already configured in the tree: use that build
else
    [ -f configure ] || autoreconf -fi >/dev/null 2>&1
    mkdir -p "$B"
    [ -f "$B/Makefile" ] || (cd "$B" && "$SRC/configure" -q)
fi
make -C "$B" -j"$(nproc)" src/gatherd tests/stub/gw_stub >/dev/null
"$B/src/gatherd" -t -c conf/gatherd.json
"$B/tests/stub/gw_stub" -q -l 127.0.0.1:9101 &
STUB=$!
trap 'kill "$STUB" 2>/dev/null || true' EXIT
cat <<MSG

gatherd is starting on http://127.0.0.1:8080 (demo backend on http://127.0.0.1:9101). Try:
  curl -i http://127.0.0.1:8080/api/dashboard/42     # 4 backend calls: fan-out, dependent call, foreach
  curl -i -H 'X-Stub-Delay: 300' http://127.0.0.1:8080/api/dashboard/42
                         # recommendations times out (100 ms): 200, X-Gateway-Completed: false, _errors
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code} %{time_total}s\n' \
      -H 'X-Stub-Delay: 300' http://127.0.0.1:8080/api/dashboard/42; done; \
      curl -s http://127.0.0.1:8080/api/dashboard/42 | grep -o '"_errors".*'
                         # after 5 timeouts the recs circuit opens: circuit_open at once for 2 s
  kill -HUP \$(pgrep -n gatherd)    # reload conf/gatherd.json (or: gatherd -s reload with a pid_file)
  curl -i http://127.0.0.1:8080/
  curl -i http://127.0.0.1:8080/health
  curl -i http://127.0.0.1:8080/api/hello
  curl -i http://127.0.0.1:8080/api/users/42
  curl -i -X POST http://127.0.0.1:8080/health      # 405 with Allow
  curl -i http://127.0.0.1:8080/nowhere              # 404 JSON error
  curl -i http://127.0.0.1:9101/users/42             # the demo backend itself
Admin listener (127.0.0.1:9180):
  open http://127.0.0.1:9180/status in a browser     # live page: routes, backends, breakers, latency
  curl -s http://127.0.0.1:9180/metrics | grep gatherd_requests_total
  curl -i http://127.0.0.1:9180/readyz               # 503 while a graceful stop drains
Ctrl-C stops gracefully.

MSG
"$B/src/gatherd" -c conf/gatherd.json
