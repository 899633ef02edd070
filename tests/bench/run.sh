#!/usr/bin/env bash
# tests/bench/run.sh - benchmark gatherd against nginx on loopback.
#
#   bash tests/bench/run.sh            (or: make bench)
#
# Environment (all optional):
#   GATHERD          gatherd binary        (default: <this dir>/../../src/gatherd)
#   GW_SRCDIR        source root           (default: <this dir>/../..)
#   BENCH_WORKERS    gatherd workers and nginx worker_processes (default 1)
#   BENCH_CONNS      wrk connection counts, one scenario each (default "50 200")
#   BENCH_DURATION   measured wrk run per server and scenario (default 10s)
#   BENCH_WARMUP     discarded wrk run before each measurement (default 2s)
#   BENCH_THREADS    wrk threads (default 1)
#   BENCH_SCENARIOS  scenario functions to run (default "respond proxy")
#   BENCH_RESULTS    results directory (default <this dir>/results)
#   BENCH_KEEP_TMP   1: keep the temporary directory (configs, logs, wrk output)
#
# See tests/bench/README.md for what is measured and how to read it.

set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GW_SRCDIR=${GW_SRCDIR:-$BENCH_DIR/../..}
GATHERD=${GATHERD:-$BENCH_DIR/../../src/gatherd}
GW_STUB=${GW_STUB:-$BENCH_DIR/../../tests/stub/gw_stub}
BENCH_WORKERS=${BENCH_WORKERS:-1}
BENCH_CONNS=${BENCH_CONNS:-50 200}
BENCH_DURATION=${BENCH_DURATION:-10s}
BENCH_WARMUP=${BENCH_WARMUP:-2s}
BENCH_THREADS=${BENCH_THREADS:-1}
BENCH_SCENARIOS=${BENCH_SCENARIOS:-respond proxy}
RESULTS_DIR=${BENCH_RESULTS:-$BENCH_DIR/results}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$BENCH_DIR/lib.sh"

BODY='{"hello":"world","n":1}'
TMP=""
GW_PID=""
NGX_PID=""

# ---------------------------------------------------------------- checks

# "A && B || die" is intended: die when either test fails
# shellcheck disable=SC2015
check_params() {
    [[ $BENCH_WORKERS =~ ^[0-9]+$ ]] && ((BENCH_WORKERS >= 1 && BENCH_WORKERS <= 64)) ||
        die "BENCH_WORKERS must be an integer 1..64 (got '$BENCH_WORKERS')"
    [[ $BENCH_THREADS =~ ^[0-9]+$ ]] && ((BENCH_THREADS >= 1 && BENCH_THREADS <= 64)) ||
        die "BENCH_THREADS must be an integer 1..64 (got '$BENCH_THREADS')"
    local c
    [[ -n ${BENCH_CONNS// /} ]] || die "BENCH_CONNS is empty"
    for c in $BENCH_CONNS; do
        [[ $c =~ ^[0-9]+$ ]] && ((c >= BENCH_THREADS && c <= 10000)) ||
            die "BENCH_CONNS entries must be integers between BENCH_THREADS and 10000 (got '$c')"
    done
    local s
    s=$(dur_seconds "$BENCH_DURATION") && ((s >= 1 && s <= 3600)) ||
        die "BENCH_DURATION must look like 10s, 1m (1 s .. 1 h; got '$BENCH_DURATION')"
    s=$(dur_seconds "$BENCH_WARMUP") && ((s >= 1 && s <= 600)) ||
        die "BENCH_WARMUP must look like 2s (1 s .. 10 m; got '$BENCH_WARMUP')"
    local f
    for f in $BENCH_SCENARIOS; do
        declare -F "scenario_$f" >/dev/null || die "unknown scenario '$f' (no function scenario_$f)"
    done
    [[ -x $GATHERD ]] || die "gatherd binary not found or not executable: $GATHERD (build with: make -j2)"
}

find_nginx() {
    NGINX=$(command -v nginx 2>/dev/null || true)
    [[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
    [[ -n $NGINX ]]
}

# apt_install PKG... -> install non-interactively; apt-get update only on failure
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$@" >"$TMP/apt.log" 2>&1 && return 0
    log "apt-get install $* failed; running apt-get update and retrying"
    apt-get update -q >>"$TMP/apt.log" 2>&1
    apt-get install -y -q "$@" >>"$TMP/apt.log" 2>&1
}

ensure_tools() {
    local need=()
    command -v wrk >/dev/null 2>&1 || need+=(wrk)
    find_nginx || need+=(nginx-light)
    command -v curl >/dev/null 2>&1 || need+=(curl)
    command -v timeout >/dev/null 2>&1 || need+=(coreutils)
    ((${#need[@]} == 0)) && return 0

    [[ $(id -u) == 0 ]] || die "missing ${need[*]}; install as root: apt-get install -y ${need[*]}"
    command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]}"
    if ! apt_install "${need[@]}"; then
        # nginx-light is not in every release: fall back to the full package
        local i
        for i in "${!need[@]}"; do [[ ${need[$i]} == nginx-light ]] && need[i]=nginx; done
        apt_install "${need[@]}" || { tail -n 20 "$TMP/apt.log" >&2; die "could not install ${need[*]}"; }
    fi
    command -v wrk >/dev/null 2>&1 || die "wrk still missing after install"
    find_nginx || die "nginx still missing after install"
}

# ---------------------------------------------------------------- servers

gatherd_pids() { echo "$GW_PID"; }

# nginx master + its workers (children of the master)
nginx_pids() {
    echo "$NGX_PID"
    children_of "$NGX_PID"
}

server_alive() {
    local label=$1 pid log
    case $label in
    gatherd) pid=$GW_PID log=$TMP/gatherd.log ;;
    nginx) pid=$NGX_PID log=$TMP/nginx/error.log ;;
    *) return 0 ;;
    esac
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null
        local rc=$?
        log "$label (PID $pid) is gone (exit status $rc); last lines of $log:"
        tail -n 30 "$log" >&2 2>/dev/null
        die "$label died during the benchmark"
    fi
}

# The backend of the proxy scenario: the stub's /static ({"hello":"world"}),
# shared by gatherd and nginx, one thread. Its CPU is counted for neither.
start_stub() {
    [[ -x $GW_STUB ]] || die "stub backend not found at $GW_STUB (make tests/stub/gw_stub)"
    STUB_PORT=$(free_port) || die "no free port found"
    start_bg "$TMP/stub.log" "$GW_STUB" -q -l "127.0.0.1:$STUB_PORT"
    STUB_PID=$BG_PID
    local i
    for ((i = 0; i < 100; i++)); do
        curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$STUB_PORT/static" && break
        kill -0 "$STUB_PID" 2>/dev/null || die "the stub backend exited during start-up"
        sleep 0.1
    done
    log "stub backend PID $STUB_PID on 127.0.0.1:$STUB_PORT"
}

start_gatherd() {
    GW_PORT=$(free_port "$STUB_PORT") || die "no free port found"
    cat >"$TMP/gatherd.json" <<EOF
{
  "listen": ["127.0.0.1:$GW_PORT"],
  "workers": $BENCH_WORKERS,
  "http": {"max_keepalive_requests": 10000},
  "backends": {"stub": {"url": "http://127.0.0.1:$STUB_PORT", "max_idle": 256}},
  "routes": [
    {"path": "/bench", "methods": ["GET"], "respond": {"status": 200, "body": {"hello": "world", "n": 1}}},
    {"path": "/proxy/*", "proxy": {"backend": "stub", "strip_prefix": "/proxy"}}
  ]
}
EOF
    "$GATHERD" -t -c "$TMP/gatherd.json" >"$TMP/gatherd-t.log" 2>&1 ||
        { cat "$TMP/gatherd-t.log" >&2; die "gatherd rejected the benchmark configuration"; }
    start_bg "$TMP/gatherd.log" "$GATHERD" -c "$TMP/gatherd.json"
    GW_PID=$BG_PID
    wait_http gatherd "$GW_PID" "http://127.0.0.1:$GW_PORT/bench" gatherd ||
        { tail -n 30 "$TMP/gatherd.log" >&2; die "gatherd failed to start"; }
    [[ $(cat "$TMP/gatherd.probe.body") == "$BODY" ]] ||
        die "gatherd answered an unexpected body: $(cat "$TMP/gatherd.probe.body")"
    log "gatherd PID $GW_PID on 127.0.0.1:$GW_PORT, $BENCH_WORKERS worker(s)"
}

start_nginx() {
    local p=$TMP/nginx
    mkdir -p "$p/conf" "$p/logs" "$p/tmp/body" "$p/tmp/proxy"
    NGX_PORT=$(free_port "$GW_PORT") || die "no free port found"
    cat >"$p/conf/nginx.conf" <<EOF
# reference server for tests/bench/run.sh - foreground, private prefix
daemon off;
master_process on;
worker_processes $BENCH_WORKERS;
pid $p/nginx.pid;
error_log $p/error.log warn;

events {
    worker_connections 4096;
}

http {
    access_log off;          # gatherd has no access log yet
    keepalive_requests 10000;
    keepalive_timeout 75s;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;

    upstream stub {
        server 127.0.0.1:$STUB_PORT;
        keepalive 256;
    }

    server {
        listen 127.0.0.1:$NGX_PORT;
        location /proxy/ {
            proxy_pass http://stub/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }
        location = /bench {
            default_type application/json;
            return 200 '$BODY';
        }
    }
}
EOF
    "$NGINX" -t -q -p "$p" -e "$p/error.log" -c "$p/conf/nginx.conf" >"$TMP/nginx-t.log" 2>&1 ||
        { cat "$TMP/nginx-t.log" >&2; die "nginx rejected the reference configuration"; }
    start_bg "$TMP/nginx.log" "$NGINX" -p "$p" -e "$p/error.log" -c "$p/conf/nginx.conf"
    NGX_PID=$BG_PID
    wait_http nginx "$NGX_PID" "http://127.0.0.1:$NGX_PORT/bench" nginx ||
        { tail -n 30 "$p/error.log" "$TMP/nginx.log" >&2; die "nginx failed to start"; }
    [[ $(cat "$TMP/nginx.probe.body") == "$BODY" ]] ||
        die "nginx answered an unexpected body: $(cat "$TMP/nginx.probe.body")"
    # shellcheck disable=SC2046
    log "nginx master PID $NGX_PID (workers: $(children_of "$NGX_PID" | tr '\n' ' ' | sed 's/ $//')) on 127.0.0.1:$NGX_PORT"
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${STARTED_PIDS[@]}"; do stop_pid "$pid"; done
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $BENCH_KEEP_TMP == 1 || $rc -ne 0 ]]; then
            log "temporary files (configs, logs, wrk output) kept in $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}

# ---------------------------------------------------------------- scenarios
# Each scenario is a function scenario_NAME that calls bench_pair; list the
# NAMEs in BENCH_SCENARIOS. Future ones (proxy route vs nginx proxy_pass,
# aggregation vs a Python asyncio aggregator) start their extra backends here
# (with start_bg, so cleanup stops them) and call bench_pair with their URLs.

scenario_respond() {
    bench_pair respond "http://127.0.0.1:$GW_PORT/bench" "http://127.0.0.1:$NGX_PORT/bench"
}

# gatherd proxy route vs nginx proxy_pass, both keeping connections to the
# same stub backend alive.
scenario_proxy() {
    bench_pair proxy "http://127.0.0.1:$GW_PORT/proxy/static" "http://127.0.0.1:$NGX_PORT/proxy/static"
}

# ---------------------------------------------------------------- output

# BENCH_CONNS is a validated list of integers, split on purpose
# shellcheck disable=SC2086
write_json() {
    local f=$RESULTS_DIR/latest.json i
    {
        printf '{\n'
        printf '  "generated_utc": %s,\n' "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
        printf '  "host": {"cpus": %s, "clk_tck": %s, "kernel": %s},\n' \
            "$(nproc)" "$CLK_TCK" "$(json_str "$(uname -r)")"
        printf '  "versions": {"gatherd": %s, "nginx": %s, "wrk": %s},\n' \
            "$(json_str "$GW_VERSION")" "$(json_str "$NGX_VERSION")" "$(json_str "$WRK_VERSION")"
        printf '  "params": {"workers": %s, "connections": [%s], "duration": %s, "warmup": %s, "wrk_threads": %s, "scenarios": [%s]},\n' \
            "$BENCH_WORKERS" "$(printf '%s\n' $BENCH_CONNS | paste -sd, -)" "$(json_str "$BENCH_DURATION")" \
            "$(json_str "$BENCH_WARMUP")" "$BENCH_THREADS" \
            "$(for s in $BENCH_SCENARIOS; do json_str "$s"; printf ' '; done | sed 's/" "/", "/g; s/ $//')"
        printf '  "notes": ["nginx runs with access_log off because gatherd has no access log yet", "server CPU = utime+stime from /proc (nginx: master + workers) during the measured run only", "errors = wrk socket errors + non-2xx/3xx responses"],\n'
        printf '  "scenarios": [\n'
        for i in "${!SCENARIO_JSON[@]}"; do
            printf '    %s%s\n' "${SCENARIO_JSON[$i]}" "$([[ $i -lt $((${#SCENARIO_JSON[@]} - 1)) ]] && echo ,)"
        done
        printf '  ],\n'
        printf '  "summary": {"geomean_ratio_requests_per_s": %s, "geomean_ratio_requests_per_cpu_s": %s, "total_errors": %s}\n' \
            "$(json_num "$(geomean "${RPS_RATIOS[@]}")")" "$(json_num "$(geomean "${RPC_RATIOS[@]}")")" "$TOTAL_ERRORS"
        printf '}\n'
    } >"$f.tmp" && mv "$f.tmp" "$f"
    log "results written to $f"
}

# ---------------------------------------------------------------- main

main() {
    check_params
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/gatherd-bench.XXXXXX") || die "mktemp failed"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    ensure_tools
    CLK_TCK=$(getconf CLK_TCK) || die "getconf CLK_TCK failed"

    mkdir -p "$RESULTS_DIR" || die "cannot create $RESULTS_DIR"
    [[ -f $RESULTS_DIR/.gitignore ]] || printf '*.json\n*.txt\n' >"$RESULTS_DIR/.gitignore"
    rm -f "$RESULTS_DIR"/wrk-*.txt

    GW_VERSION=$("$GATHERD" -V 2>&1 | head -n 1)
    NGX_VERSION=$("$NGINX" -v 2>&1 | head -n 1)
    WRK_VERSION=$(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }')

    start_stub
    start_gatherd
    start_nginx

    local s total
    total=$(( $(wc -w <<<"$BENCH_CONNS") * $(wc -w <<<"$BENCH_SCENARIOS") * 2 *
        ($(dur_seconds "$BENCH_DURATION") + $(dur_seconds "$BENCH_WARMUP")) ))
    printf '\ngatherd benchmark (loopback 127.0.0.1, %s CPUs shared by wrk and the server)\n' "$(nproc)"
    printf '  gatherd: %s (%s)\n' "$GW_VERSION" "$GATHERD"
    printf '  nginx:   %s\n' "$NGX_VERSION"
    printf '  wrk:     %s, -t%s, warm-up %s then %s per server and scenario (about %ss of load)\n' \
        "$WRK_VERSION" "$BENCH_THREADS" "$BENCH_WARMUP" "$BENCH_DURATION" "$total"
    printf '  workers: %s (gatherd "workers", nginx worker_processes)\n' "$BENCH_WORKERS"
    printf '  note:    nginx runs with access_log off, because gatherd has no access log yet\n'
    printf '  columns: CPU s = server utime+stime during the run (nginx: master+workers);\n'
    printf '           CPU = CPU s / elapsed; req/CPU-s = requests / CPU s;\n'
    printf '           errors = socket errors + non-2xx/3xx responses; wrk CPU s = load generator CPU\n'

    for s in $BENCH_SCENARIOS; do "scenario_$s"; done

    printf '\n== summary ==\n'
    printf '  %s\n' "${SUMMARY_LINES[@]}"
    printf '  geometric mean of gatherd/nginx ratios: requests/s %sx, requests per CPU-second %sx\n' \
        "$(geomean "${RPS_RATIOS[@]}")" "$(geomean "${RPC_RATIOS[@]}")"
    printf '  errors (all servers, all scenarios): %s\n' "$TOTAL_ERRORS"
    printf '  requests per CPU-second is the figure to compare: on this %s-CPU machine wrk competes\n' "$(nproc)"
    printf '  with the server for CPU, so requests/s also measures how much CPU wrk left over.\n'

    write_json
    return 0
}

main "$@"
