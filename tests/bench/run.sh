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
#   BENCH_SCENARIOS  scenario functions to run (default "respond proxy idle stream fanout cluster")
#   BENCH_RESULTS    results directory (default <this dir>/results)
#   BENCH_KEEP_TMP   1: keep the temporary directory (configs, logs, wrk output)
#   BENCH_IDLE_CONNS      idle: keep-alive connections held (default 10000)
#   BENCH_STREAM_BYTES    stream: bytes per transfer (default 1073741824 = 1 GiB)
#   BENCH_STREAM_TIMEOUT  stream: curl --max-time per transfer, seconds (default 120)
#   BENCH_SAMPLE_MS       stream: RSS sampling interval in ms (default 50)
#   BENCH_FANOUT_BACKEND  fanout: "nginx" (static nginx, default) or "stub"
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
BENCH_SCENARIOS=${BENCH_SCENARIOS:-respond proxy idle stream fanout cluster}
RESULTS_DIR=${BENCH_RESULTS:-$BENCH_DIR/results}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}
BENCH_IDLE_CONNS=${BENCH_IDLE_CONNS:-10000}
BENCH_STREAM_BYTES=${BENCH_STREAM_BYTES:-1073741824}
BENCH_STREAM_TIMEOUT=${BENCH_STREAM_TIMEOUT:-120}
BENCH_SAMPLE_MS=${BENCH_SAMPLE_MS:-50}
BENCH_FANOUT_BACKEND=${BENCH_FANOUT_BACKEND:-nginx}

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$BENCH_DIR/lib.sh"

BODY='{"hello":"world","n":1}'
TMP=""
GW_PID=""
NGX_PID=""
STUB_PID=""
STUB_PORT=""
GW_PORT=""
NGX_PORT=""
PYTHON=""          # any python3: idle_clients.py, answer checks
AIOHTTP_PYTHON=""  # a python3 that imports aiohttp (fanout peer)
NGX_MODDIR=/usr/lib/nginx/modules

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
    [[ $BENCH_IDLE_CONNS =~ ^[0-9]+$ ]] && ((BENCH_IDLE_CONNS >= 1 && BENCH_IDLE_CONNS <= 60000)) ||
        die "BENCH_IDLE_CONNS must be an integer 1..60000 (got '$BENCH_IDLE_CONNS')"
    [[ $BENCH_STREAM_BYTES =~ ^[0-9]+$ ]] && ((BENCH_STREAM_BYTES >= 1 && BENCH_STREAM_BYTES <= 1 << 40)) ||
        die "BENCH_STREAM_BYTES must be an integer 1..2^40 (got '$BENCH_STREAM_BYTES')"
    [[ $BENCH_STREAM_TIMEOUT =~ ^[0-9]+$ ]] && ((BENCH_STREAM_TIMEOUT >= 1 && BENCH_STREAM_TIMEOUT <= 3600)) ||
        die "BENCH_STREAM_TIMEOUT must be an integer 1..3600 (got '$BENCH_STREAM_TIMEOUT')"
    [[ $BENCH_SAMPLE_MS =~ ^[0-9]+$ ]] && ((BENCH_SAMPLE_MS >= 10 && BENCH_SAMPLE_MS <= 1000)) ||
        die "BENCH_SAMPLE_MS must be an integer 10..1000 (got '$BENCH_SAMPLE_MS')"
    [[ $BENCH_FANOUT_BACKEND == nginx || $BENCH_FANOUT_BACKEND == stub ]] ||
        die "BENCH_FANOUT_BACKEND must be nginx or stub (got '$BENCH_FANOUT_BACKEND')"
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
    if scenario_selected idle || scenario_selected fanout || scenario_selected cluster; then
        command -v python3 >/dev/null 2>&1 || need+=(python3)
    fi
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

# find_aiohttp_python -> sets AIOHTTP_PYTHON to a python3 that imports aiohttp
# (Debian's python3-aiohttp is for /usr/bin/python3, which may not be the first
# python3 on PATH)
find_aiohttp_python() {
    local py
    AIOHTTP_PYTHON=""
    for py in "$(command -v python3 2>/dev/null)" /usr/bin/python3; do
        [[ -n $py && -x $py ]] || continue
        if "$py" -c 'import aiohttp' >/dev/null 2>&1; then
            AIOHTTP_PYTHON=$py
            return 0
        fi
    done
    return 1
}

# The peers of the fanout and cluster scenarios (nginx's Lua module with cjson;
# aiohttp for fanout) are installed when missing and possible; without them
# those peers are reported as "not measured" instead of failing the run.
ensure_fanout_tools() {
    local need=()
    [[ -f $NGX_MODDIR/ngx_http_lua_module.so ]] || need+=(libnginx-mod-http-lua)
    if command -v dpkg-query >/dev/null 2>&1; then
        dpkg-query -W -f='${Status}' lua-cjson 2>/dev/null | grep -q 'install ok installed' || need+=(lua-cjson)
    fi
    if scenario_selected fanout; then find_aiohttp_python || need+=(python3-aiohttp); fi
    ((${#need[@]} == 0)) && return 0
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "fanout: missing ${need[*]} (as root: apt-get install -y ${need[*]}); those peers will not be measured"
        return 0
    fi
    log "installing ${need[*]} (fanout peers)"
    apt_install "${need[@]}" || { tail -n 20 "$TMP/apt.log" >&2; log "could not install ${need[*]}; those peers will not be measured"; }
    find_aiohttp_python
    return 0
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
    *)
        # servers of the newer scenarios (register_server)
        [[ -n ${SRV_PID[$label]:-} ]] || return 0
        pid=${SRV_PID[$label]} log=${SRV_LOG[$label]}
        ;;
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
  "admin": {"listen": []},
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

# ---------------------------------------------------------------- instances of the newer scenarios
# idle, stream and fanout start servers of their own (fresh memory baselines,
# configurations of their own) with start_bg, and stop them with stop_started
# when they are done; cleanup stops whatever is left.

declare -A SRV_PID=() SRV_LOG=()

# register_server LABEL PID LOG -> server_alive LABEL watches PID and shows LOG
register_server() {
    SRV_PID[$1]=$2
    SRV_LOG[$1]=$3
}

scenario_selected() { [[ " $BENCH_SCENARIOS " == *" $1 "* ]]; }

# gatherd_rejects CONF -> 0 when `gatherd -t` rejects CONF; the first error
# line (without the temp dir) is then in GW_REJECT
gatherd_rejects() {
    local out
    if out=$("$GATHERD" -t -c "$1" 2>&1); then
        GW_REJECT=""
        return 1
    fi
    GW_REJECT=$(printf '%s\n' "$out" | grep -v 'test failed' | head -n 1)
    GW_REJECT=${GW_REJECT#gatherd: }
    GW_REJECT=${GW_REJECT#"$TMP"/}
    return 0
}

# launch_gatherd NAME CONF PROBE_URL -> checks CONF with gatherd -t, starts
# gatherd on it and waits until PROBE_URL answers 200 from gatherd; sets INST_PID
launch_gatherd() {
    local name=$1 conf=$2 url=$3
    "$GATHERD" -t -c "$conf" >"$TMP/$name-t.log" 2>&1 ||
        { cat "$TMP/$name-t.log" >&2; die "gatherd rejected the $name configuration ($conf)"; }
    start_bg "$TMP/$name.log" "$GATHERD" -c "$conf"
    INST_PID=$BG_PID
    register_server "$name" "$INST_PID" "$TMP/$name.log"
    wait_http "$name" "$INST_PID" "$url" gatherd ||
        { tail -n 30 "$TMP/$name.log" >&2; die "$name (gatherd) failed to start"; }
    log "$name: gatherd PID $INST_PID"
}

# nginx_prefix NAME -> creates and prints a private nginx prefix under TMP
nginx_prefix() {
    local p=$TMP/$1
    mkdir -p "$p/tmp/body" "$p/tmp/proxy" || die "cannot create $p"
    printf '%s\n' "$p"
}

# nginx_conf_head PREFIX WORKERS WORKER_CONNECTIONS [MODULE.so...] -> prints the
# top of an nginx.conf for a private foreground instance (own pid file, error
# log, temp paths); the caller appends the http block
nginx_conf_head() {
    local p=$1 w=$2 wc=$3 m
    shift 3
    for m in "$@"; do printf 'load_module %s;\n' "$m"; done
    cat <<EOF
# private instance of tests/bench/run.sh - foreground, own prefix
daemon off;
master_process on;
worker_processes $w;
worker_rlimit_nofile $((wc * 2 + 64));
pid $p/nginx.pid;
error_log $p/error.log warn;

events {
    worker_connections $wc;
}
EOF
}

# nginx_rejects PREFIX -> 0 when nginx -t rejects PREFIX/nginx.conf; the reason
# is then in NGX_REJECT
nginx_rejects() {
    local p=$1 out
    if out=$("$NGINX" -t -q -p "$p" -e "$p/error.log" -c "$p/nginx.conf" 2>&1); then
        NGX_REJECT=""
        return 1
    fi
    NGX_REJECT=$(printf '%s\n' "$out" | grep -m 1 -E 'emerg|error|failed' || printf '%s\n' "$out" | head -n 1)
    NGX_REJECT=${NGX_REJECT//"$TMP"\//}
    return 0
}

# launch_nginx NAME PREFIX PROBE_URL -> checks and starts nginx on PREFIX/nginx.conf,
# waits until PROBE_URL answers 200 from nginx; sets INST_PID (the master)
launch_nginx() {
    local name=$1 p=$2 url=$3
    nginx_rejects "$p" && die "nginx rejected the $name configuration: $NGX_REJECT"
    start_bg "$TMP/$name.log" "$NGINX" -p "$p" -e "$p/error.log" -c "$p/nginx.conf"
    INST_PID=$BG_PID
    register_server "$name" "$INST_PID" "$p/error.log"
    wait_http "$name" "$INST_PID" "$url" nginx ||
        { tail -n 30 "$p/error.log" "$TMP/$name.log" >&2; die "$name (nginx) failed to start"; }
    log "$name: nginx master PID $INST_PID (workers: $(children_of "$INST_PID" | tr '\n' ' ' | sed 's/ $//'))"
}

# xr RATIO -> "1.234x", or "n/a" when there is no ratio
xr() { if [[ -n $1 ]]; then printf '%sx' "$1"; else printf 'n/a'; fi; }

# fmt_mib KIB -> KiB as MiB with one decimal
fmt_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# ---------------------------------------------------------------- scenario idle
# RSS per idle keep-alive client connection: BENCH_IDLE_CONNS connections, each
# after one request and its answer, held by idle_clients.py.

IDLE_PORT=""
idle_gw_pids() { echo "$IDLE_GW_PID"; }
idle_ngx_workers() { children_of "$IDLE_NGX_PID"; }

# idle_measure LABEL PFX PORT PID... -> with the server on PORT started and idle,
# samples the summed VmRSS of the PIDs, opens the connections, samples again
# while they are held, lets them go, samples once more. Sets
# PFX_{BEFORE,HELD,AFTER,GROWTH,PERCONN,FDS,SETUP,CLOSED,STATUS}
idle_measure() {
    local label=$1 pfx=$2 port=$3
    shift 3
    local ready=$TMP/idle-$label.ready out=$TMP/idle-$label.out cpid i line
    local before held="" after growth="" perconn="" fds="" status=ok
    # shellcheck disable=SC2034  # IDLE_OPEN: set by the eval of the client's summary
    local IDLE_OPEN="" IDLE_SETUP_S="" IDLE_CLOSED_DURING_HOLD="" IDLE_ERRORS=""
    sleep 0.5
    before=$(rss_kib "$@")
    log "idle: $label: opening $BENCH_IDLE_CONNS connections (RSS before: $before KiB)"
    rm -f "$ready"
    # the client holds at most 120 s and gives up setting up after 120 s
    start_bg "$out" "$PYTHON" "$BENCH_DIR/idle_clients.py" 127.0.0.1 "$port" "$BENCH_IDLE_CONNS" /bench \
        "$ready" --hold 120 --setup 120
    cpid=$BG_PID
    for ((i = 0; i < 1300; i++)); do
        [[ -s $ready ]] && break
        running "$cpid" || break
        sleep 0.1
    done
    if [[ -s $ready ]]; then
        sleep 1 # let the server settle
        server_alive "$label"
        held=$(rss_kib "$@")
        fds=0
        for i in "$@"; do fds=$((fds + $(fd_count "$i"))); done
        log "idle: $label: $BENCH_IDLE_CONNS connections held, RSS $held KiB, $fds descriptors"
    else
        status="not measured: the client did not get $BENCH_IDLE_CONNS idle connections ($(grep -m 1 'idle_clients:' "$out" | sed 's/^idle_clients: //'))"
    fi
    stop_started "$cpid"
    line=$(grep -Eo 'IDLE_OPEN=[0-9]+ IDLE_SETUP_S=[0-9.]+ IDLE_CLOSED_DURING_HOLD=[0-9]+ IDLE_ERRORS=[0-9]+' "$out" | tail -n 1)
    [[ -n $line ]] && eval "$line"
    sleep 1 # the server notices the closes
    server_alive "$label"
    after=$(rss_kib "$@")
    if [[ $status == ok ]]; then
        growth=$((held - before))
        perconn=$((growth * 1024 / BENCH_IDLE_CONNS))
        [[ ${IDLE_CLOSED_DURING_HOLD:-0} -gt 0 || ${IDLE_ERRORS:-0} -gt 0 ]] &&
            status="warning: $IDLE_CLOSED_DURING_HOLD connections closed by the server while held, $IDLE_ERRORS errors"
    fi
    printf -v "${pfx}_BEFORE" '%s' "$before"
    printf -v "${pfx}_HELD" '%s' "$held"
    printf -v "${pfx}_AFTER" '%s' "$after"
    printf -v "${pfx}_GROWTH" '%s' "$growth"
    printf -v "${pfx}_PERCONN" '%s' "$perconn"
    printf -v "${pfx}_FDS" '%s' "$fds"
    printf -v "${pfx}_SETUP" '%s' "$IDLE_SETUP_S"
    printf -v "${pfx}_CLOSED" '%s' "$IDLE_CLOSED_DURING_HOLD"
    printf -v "${pfx}_STATUS" '%s' "$status"
}

idle_row() { # LABEL PFX
    local p=$2 v
    local -a cols=()
    for v in BEFORE HELD AFTER GROWTH PERCONN FDS SETUP CLOSED; do
        local n="${p}_$v"
        cols+=("${!n:-?}")
    done
    printf '  %-16s %10s %10s %10s %10s %10s %9s %8s %8s\n' "$1" "${cols[@]}"
    local s="${p}_STATUS"
    [[ ${!s} == ok ]] || printf '  %-16s %s\n' '' "${!s}"
}

idle_json() { # NAME RSS_OF PFX
    local p=$3 k
    local -A v=()
    for k in BEFORE HELD AFTER GROWTH PERCONN FDS SETUP CLOSED STATUS; do
        local n="${p}_$k"
        v[$k]=${!n:-}
    done
    printf '{"name": %s, "rss_of": %s, "rss_before_kib": %s, "rss_held_kib": %s, "rss_after_close_kib": %s, ' \
        "$(json_str "$1")" "$(json_str "$2")" "$(json_num "${v[BEFORE]}")" "$(json_num "${v[HELD]}")" "$(json_num "${v[AFTER]}")"
    printf '"growth_kib": %s, "bytes_per_connection": %s, "fds_held": %s, "setup_s": %s, "closed_during_hold": %s, "status": %s}' \
        "$(json_num "${v[GROWTH]}")" "$(json_num "${v[PERCONN]}")" "$(json_num "${v[FDS]}")" \
        "$(json_num "${v[SETUP]}")" "$(json_num "${v[CLOSED]}")" "$(json_str "${v[STATUS]}")"
}

# idle_nginx_conf PREFIX PORT WORKER_CONNECTIONS -> nginx.conf of the idle reference
idle_nginx_conf() {
    local p=$1 port=$2
    {
        nginx_conf_head "$p" "$BENCH_WORKERS" "$3"
        cat <<EOF

http {
    access_log off;
    keepalive_requests 10000;
    keepalive_timeout 300s;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;

    server {
        listen 127.0.0.1:$port;
        location = /bench {
            default_type application/json;
            return 200 '$BODY';
        }
    }
}
EOF
    } >"$p/nginx.conf"
}

# G_* and R_* are set by idle_measure (printf -v)
# shellcheck disable=SC2153
scenario_idle() {
    local n=$BENCH_IDLE_CONNS need lim p r goal
    SCEN_NAME=idle
    need=$((n + 512))
    lim=$(ulimit -n)
    printf '\n== idle: %s idle keep-alive client connections, %s worker(s) ==\n' "$n" "$BENCH_WORKERS"
    if [[ $lim != unlimited ]] && ((lim < need)); then
        printf '  not measured: the open files limit is %s, %s are needed (ulimit -n)\n' "$lim" "$need"
        SUMMARY_LINES+=("$(printf '%-12s n=%-5s not measured (ulimit -n %s < %s)' idle "$n" "$lim" "$need")")
        SCENARIO_JSON+=("$(printf '{"name": "idle", "connections": %s, "status": %s}' "$n" \
            "$(json_str "not measured: ulimit -n $lim < $need")")")
        return 0
    fi

    # gatherd: room for the connections, keep-alive far longer than the hold
    IDLE_PORT=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT") || die "no free port found"
    cat >"$TMP/idle-gatherd.json" <<EOF
{
  "listen": ["127.0.0.1:$IDLE_PORT"],
  "admin": {"listen": []},
  "workers": $BENCH_WORKERS,
  "max_connections": $((n + 1000)),
  "http": {"keepalive_timeout_ms": 300000, "max_keepalive_requests": 10000},
  "routes": [
    {"path": "/bench", "methods": ["GET"], "respond": {"status": 200, "body": {"hello": "world", "n": 1}}}
  ]
}
EOF
    launch_gatherd idle-gatherd "$TMP/idle-gatherd.json" "http://127.0.0.1:$IDLE_PORT/bench"
    IDLE_GW_PID=$INST_PID
    idle_measure idle-gatherd G "$IDLE_PORT" "$IDLE_GW_PID"
    stop_started "$IDLE_GW_PID"

    # nginx: the same answer; worker_connections with room for the connections
    IDLE_PORT=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT") || die "no free port found"
    p=$(nginx_prefix idle-nginx)
    idle_nginx_conf "$p" "$IDLE_PORT" $((n + 1024))
    launch_nginx idle-nginx "$p" "http://127.0.0.1:$IDLE_PORT/bench"
    IDLE_NGX_PID=$INST_PID
    # shellcheck disable=SC2046
    idle_measure idle-nginx R "$IDLE_PORT" $(idle_ngx_workers)
    stop_started "$IDLE_NGX_PID"

    # nginx allocates its connection table (worker_connections slots) at start,
    # so part of its per-connection memory is in its baseline: the same nginx
    # with 1024 slots shows how much
    local small slots_kib="" slot_b="" allin="" r_allin=""
    IDLE_PORT=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT") || die "no free port found"
    p=$(nginx_prefix idle-nginx-1024)
    idle_nginx_conf "$p" "$IDLE_PORT" 1024
    launch_nginx idle-nginx-1024 "$p" "http://127.0.0.1:$IDLE_PORT/bench"
    IDLE_NGX_PID=$INST_PID
    sleep 0.5
    # shellcheck disable=SC2046
    small=$(rss_kib $(idle_ngx_workers))
    stop_started "$IDLE_NGX_PID"
    if [[ -n $R_PERCONN ]]; then
        slots_kib=$((R_BEFORE - small))
        slot_b=$((slots_kib * 1024 / n))
        allin=$((R_PERCONN + slot_b))
        r_allin=$(ratio "$G_PERCONN" "$allin")
    fi

    r=$(ratio "$G_PERCONN" "$R_PERCONN")
    goal="not measured"
    if [[ -n $G_PERCONN ]]; then
        if ((G_PERCONN < 4096)); then goal="met"; else goal="MISSED"; fi
    fi
    printf '   RSS = VmRSS from /proc (gatherd: the process; nginx: its workers summed), KiB\n'
    printf '  %-16s %10s %10s %10s %10s %10s %9s %8s %8s\n' server 'RSS before' 'RSS held' 'RSS after' \
        'growth' 'B/conn' 'fds held' 'setup s' 'closed'
    idle_row gatherd G
    idle_row 'nginx (workers)' R
    printf '  ratio gatherd/nginx bytes per connection: %s (lower is better)\n' "$(xr "$r")"
    printf '  nginx baseline with %s worker_connections vs 1024: +%s KiB = %s bytes per slot, allocated at start;\n' \
        $((n + 1024)) "${slots_kib:-?}" "${slot_b:-?}"
    printf '  counting them, nginx uses %s bytes per connection; ratio gatherd/that: %s\n' "${allin:-?}" "$(xr "$r_allin")"
    printf '  goal: gatherd under 4096 bytes per idle connection: %s (%s bytes)\n' "$goal" "${G_PERCONN:-?}"

    SUMMARY_LINES+=("$(printf '%-12s n=%-5s gatherd %s B/conn (RSS +%s KiB) | nginx %s B/conn (RSS +%s KiB; %s with its connection table) | ratio %s (%s) | goal < 4096 B: %s' \
        idle "$n" "${G_PERCONN:-?}" "${G_GROWTH:-?}" "${R_PERCONN:-?}" "${R_GROWTH:-?}" "${allin:-?}" "$(xr "$r")" "$(xr "$r_allin")" "$goal")")
    SCENARIO_JSON+=("$(printf '{"name": "idle", "connections": %s, "workers": %s, "gateway": %s, "reference": %s, "reference_connection_table": {"worker_connections": %s, "rss_kib_over_1024_slots": %s, "bytes_per_slot": %s, "bytes_per_connection_with_table": %s}, "ratio": {"bytes_per_connection": %s, "bytes_per_connection_with_table": %s}, "goal_bytes_per_connection": 4096, "goal": %s}' \
        "$n" "$BENCH_WORKERS" "$(idle_json gatherd process G)" "$(idle_json nginx workers R)" \
        $((n + 1024)) "$(json_num "$slots_kib")" "$(json_num "$slot_b")" "$(json_num "$allin")" \
        "$(json_num "$r")" "$(json_num "$r_allin")" "$(json_str "$goal")")")
}

# ---------------------------------------------------------------- scenario stream
# Memory while BENCH_STREAM_BYTES (1 GiB) stream through a proxy route, in both
# directions, gatherd vs nginx (proxy_buffering / proxy_request_buffering off),
# each transfer on a freshly started server; the stub is the backend.

STREAM_ROWS=()
STREAM_JSON=()

# stream_transfer KIND URL PFX PID... -> one transfer with curl (KIND: download,
# upload = Content-Length body, upload-chunked) while the summed VmRSS of the
# PIDs is sampled every BENCH_SAMPLE_MS. Sets PFX_{CODE,BYTES,RATE,SECS,BASE,
# PEAK,END,GROWTH,SAMPLES,CPU,OK,WHY}
stream_transfer() {
    local kind=$1 url=$2 pfx=$3
    shift 3
    local n=$BENCH_STREAM_BYTES out=$TMP/stream-$pfx.curl body=$TMP/stream-$pfx.body
    local samples=$TMP/stream-$pfx.rss cpid rc t0 t1 base peak end nsamp code bytes rate secs cpu ok=1 why=""
    local -a w=()
    : >"$body"
    base=$(rss_kib "$@")
    t0=$(ticks_of_pids "$@")
    case $kind in
    download)
        curl -sS --noproxy '*' -o /dev/null --max-time "$BENCH_STREAM_TIMEOUT" \
            -w '%{http_code} %{size_download} %{speed_download} %{time_total}\n' "$url" >"$out" 2>&1 &
        ;;
    upload)
        head -c "$n" /dev/zero | curl -sS --noproxy '*' -o "$body" --max-time "$BENCH_STREAM_TIMEOUT" \
            -T - -X POST -H "Content-Length: $n" -H 'Transfer-Encoding:' \
            -w '%{http_code} %{size_upload} %{speed_upload} %{time_total}\n' "$url" >"$out" 2>&1 &
        ;;
    upload-chunked)
        head -c "$n" /dev/zero | curl -sS --noproxy '*' -o "$body" --max-time "$BENCH_STREAM_TIMEOUT" \
            -T - -X POST \
            -w '%{http_code} %{size_upload} %{speed_upload} %{time_total}\n' "$url" >"$out" 2>&1 &
        ;;
    esac
    cpid=$!
    STARTED_PIDS+=("$cpid")
    sample_rss "$cpid" "$samples" $((BENCH_STREAM_TIMEOUT + 5)) "$BENCH_SAMPLE_MS" "$@"
    wait "$cpid"
    rc=$?
    forget_pid "$cpid"
    t1=$(ticks_of_pids "$@")
    end=$(rss_kib "$@")
    peak=$(awk -v b="$base" 'BEGIN { m = b } $2 > m { m = $2 } END { print m }' "$samples")
    nsamp=$(wc -l <"$samples")
    read -r -a w < <(grep -E '^[0-9]{3} ' "$out" | tail -n 1)
    code=${w[0]:-000} bytes=${w[1]:-0}
    secs=$(awk -v t="${w[3]:-0}" 'BEGIN { printf "%.2f", t }')
    rate=$(awk -v r="${w[2]:-0}" 'BEGIN { printf "%.1f", r / 1048576 }')
    cpu=$(awk -v a="$t0" -v b="$t1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / h }')
    if [[ $rc -ne 0 ]]; then
        ok=0 why="curl exit $rc: $(grep -m 1 'curl:' "$out" | sed 's/^curl: //')"
    elif [[ $code != 200 ]]; then
        ok=0 why="HTTP $code $(head -c 200 "$body")"
    elif [[ $kind == download && $bytes != "$n" ]]; then
        ok=0 why="got $bytes of $n bytes"
    elif [[ $kind != download && $(cat "$body") != "{\"received\":$n}" ]]; then
        ok=0 why="the backend answered $(head -c 200 "$body"), not {\"received\":$n}"
    fi
    printf -v "${pfx}_CODE" '%s' "$code"
    printf -v "${pfx}_BYTES" '%s' "$bytes"
    printf -v "${pfx}_RATE" '%s' "$rate"
    printf -v "${pfx}_SECS" '%s' "$secs"
    printf -v "${pfx}_BASE" '%s' "$base"
    printf -v "${pfx}_PEAK" '%s' "$peak"
    printf -v "${pfx}_END" '%s' "$end"
    printf -v "${pfx}_GROWTH" '%s' "$((peak - base))"
    printf -v "${pfx}_SAMPLES" '%s' "$nsamp"
    printf -v "${pfx}_CPU" '%s' "$cpu"
    printf -v "${pfx}_OK" '%s' "$ok"
    printf -v "${pfx}_WHY" '%s' "$why"
}

# stream_record KIND SERVER PFX|"" [NOTE] -> a table row and a JSON object;
# with an empty PFX the transfer was not measured and NOTE says why
stream_record() {
    local kind=$1 server=$2 p=$3 note=${4:-} k
    local -A v=()
    if [[ -z $p ]]; then
        STREAM_ROWS+=("$(printf '  %-15s %-8s %s' "$kind" "$server" "$note")")
        STREAM_JSON+=("$(printf '{"transfer": %s, "server": %s, "status": %s}' \
            "$(json_str "$kind")" "$(json_str "$server")" "$(json_str "$note")")")
        return 0
    fi
    for k in CODE BYTES RATE SECS BASE PEAK END GROWTH SAMPLES CPU OK WHY; do
        local n="${p}_$k"
        v[$k]=${!n:-}
    done
    local status=ok
    [[ ${v[OK]} == 1 ]] || status="${note:-failed}: ${v[WHY]}"
    if [[ $server == direct ]]; then
        STREAM_ROWS+=("$(printf '  %-15s %-8s %6s %9s %8s %9s %9s %9s %9s %7s %7s' "$kind" "$server" "${v[CODE]}" \
            "${v[RATE]}" "${v[SECS]}" - - - - - -)")
    else
        STREAM_ROWS+=("$(printf '  %-15s %-8s %6s %9s %8s %9s %9s %9s %9s %7s %7s' "$kind" "$server" "${v[CODE]}" \
            "${v[RATE]}" "${v[SECS]}" "$(fmt_mib "${v[BASE]}")" "$(fmt_mib "${v[PEAK]}")" \
            "$(fmt_mib "${v[GROWTH]}")" "$(fmt_mib "${v[END]}")" "${v[CPU]}" "${v[SAMPLES]}")")
    fi
    [[ $status == ok ]] || STREAM_ROWS+=("$(printf '  %-15s %-8s %s' '' '' "$status")")
    STREAM_JSON+=("$(printf '{"transfer": %s, "server": %s, "status": %s, "http_code": %s, "bytes": %s, "rate_mib_s": %s, "time_s": %s, "rss_base_kib": %s, "rss_peak_kib": %s, "rss_growth_kib": %s, "rss_end_kib": %s, "server_cpu_s": %s, "samples": %s}' \
        "$(json_str "$kind")" "$(json_str "$server")" "$(json_str "$status")" "$(json_num "${v[CODE]}")" \
        "$(json_num "${v[BYTES]}")" "$(json_num "${v[RATE]}")" "$(json_num "${v[SECS]}")" \
        "$(json_num "$([[ $server == direct ]] || echo "${v[BASE]}")")" \
        "$(json_num "$([[ $server == direct ]] || echo "${v[PEAK]}")")" \
        "$(json_num "$([[ $server == direct ]] || echo "${v[GROWTH]}")")" \
        "$(json_num "$([[ $server == direct ]] || echo "${v[END]}")")" \
        "$(json_num "$([[ $server == direct ]] || echo "${v[CPU]}")")" "$(json_num "${v[SAMPLES]}")")")
}

# stream_gatherd KIND -> one transfer through a fresh gatherd
stream_gatherd() {
    local kind=$1 port conf route prefix path pfx=SG_${1//-/_}
    port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT") || die "no free port found"
    conf=$TMP/stream-gatherd-$kind.json
    if [[ $kind == download ]]; then
        route='{"path": "/stream/*", "proxy": {"backend": "stub", "strip_prefix": "/stream"}}'
        prefix=/stream path="/?size=$BENCH_STREAM_BYTES"
    else
        # max_body_bytes on the proxy object: 0 = no limit (streamed request bodies)
        route='{"path": "/upload/*", "proxy": {"backend": "stub", "strip_prefix": "/upload", "max_body_bytes": 0}}'
        prefix=/upload path="/sink?sink=1"
    fi
    cat >"$conf" <<EOF
{
  "listen": ["127.0.0.1:$port"],
  "admin": {"listen": []},
  "workers": $BENCH_WORKERS,
  "backends": {"stub": {"url": "http://127.0.0.1:$STUB_PORT", "timeout_ms": 600000}},
  "routes": [
    $route
  ]
}
EOF
    if gatherd_rejects "$conf"; then
        log "stream: $kind through gatherd: not measured (gatherd -t: $GW_REJECT)"
        stream_record "$kind" gatherd "" "not measured (gatherd -t: $GW_REJECT)"
        STREAM_GW_NOTE[$kind]="not measured (gatherd -t: $GW_REJECT)"
        return 0
    fi
    launch_gatherd "stream-gatherd-$kind" "$conf" "http://127.0.0.1:$port$prefix/static"
    local gpid=$INST_PID
    log "stream: $kind of $BENCH_STREAM_BYTES bytes through gatherd"
    stream_transfer "$kind" "http://127.0.0.1:$port$prefix$path" "$pfx" "$gpid"
    server_alive "stream-gatherd-$kind"
    stop_started "$gpid"
    local okv="${pfx}_OK" whyv="${pfx}_WHY" growv="${pfx}_GROWTH" ratev="${pfx}_RATE"
    if [[ ${!okv} == 1 ]]; then
        stream_record "$kind" gatherd "$pfx"
        STREAM_GW_NOTE[$kind]="+$(fmt_mib "${!growv}") MiB, ${!ratev} MiB/s"
        STREAM_GW_GROWTH[$kind]=${!growv}
    elif [[ $kind != download ]]; then
        # an upload the current build refuses (413, ...) is not a failure of the run
        stream_record "$kind" gatherd "" "not measured (${!whyv})"
        STREAM_GW_NOTE[$kind]="not measured (${!whyv})"
        log "stream: $kind through gatherd: not measured (${!whyv})"
    else
        stream_record "$kind" gatherd "$pfx" "FAILED"
        STREAM_GW_NOTE[$kind]="FAILED (${!whyv})"
        TOTAL_ERRORS=$((TOTAL_ERRORS + 1))
    fi
}

# stream_nginx KIND -> one transfer through a fresh nginx (unbuffered proxy_pass)
stream_nginx() {
    local kind=$1 port p path pfx=SN_${1//-/_} mpid
    port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT") || die "no free port found"
    p=$(nginx_prefix "stream-nginx-$kind")
    {
        nginx_conf_head "$p" "$BENCH_WORKERS" 1024
        cat <<EOF

http {
    access_log off;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;
    client_max_body_size 0;           # no limit, as max_body_bytes 0

    upstream stub {
        server 127.0.0.1:$STUB_PORT;
        keepalive 16;
    }

    server {
        listen 127.0.0.1:$port;
        location /stream/ {
            proxy_pass http://stub/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # pass the response on as it arrives
            proxy_read_timeout 600s;
        }
        location /upload/ {
            proxy_pass http://stub/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;  # stream the request body to the backend
            proxy_buffering off;
            proxy_send_timeout 600s;
            proxy_read_timeout 600s;
        }
    }
}
EOF
    } >"$p/nginx.conf"
    if [[ $kind == download ]]; then path="/stream/?size=$BENCH_STREAM_BYTES"; else path="/upload/sink?sink=1"; fi
    launch_nginx "stream-nginx-$kind" "$p" "http://127.0.0.1:$port/stream/static"
    mpid=$INST_PID
    log "stream: $kind of $BENCH_STREAM_BYTES bytes through nginx"
    # shellcheck disable=SC2046
    stream_transfer "$kind" "http://127.0.0.1:$port$path" "$pfx" $(children_of "$mpid")
    server_alive "stream-nginx-$kind"
    stop_started "$mpid"
    local okv="${pfx}_OK" growv="${pfx}_GROWTH" ratev="${pfx}_RATE" whyv="${pfx}_WHY"
    if [[ ${!okv} == 1 ]]; then
        stream_record "$kind" nginx "$pfx"
        STREAM_NGX_NOTE[$kind]="+$(fmt_mib "${!growv}") MiB, ${!ratev} MiB/s"
    else
        stream_record "$kind" nginx "$pfx" "FAILED"
        STREAM_NGX_NOTE[$kind]="FAILED (${!whyv})"
        TOTAL_ERRORS=$((TOTAL_ERRORS + 1))
    fi
}

# stream_direct KIND -> the same transfer straight to the stub (the ceiling)
stream_direct() {
    local kind=$1 path pfx=SD_${1//-/_}
    if [[ $kind == download ]]; then path="/?size=$BENCH_STREAM_BYTES"; else path="/sink?sink=1"; fi
    log "stream: $kind of $BENCH_STREAM_BYTES bytes straight to the stub"
    stream_transfer "$kind" "http://127.0.0.1:$STUB_PORT$path" "$pfx"
    local okv="${pfx}_OK"
    if [[ ${!okv} == 1 ]]; then stream_record "$kind" direct "$pfx"; else stream_record "$kind" direct "$pfx" "FAILED"; fi
}

scenario_stream() {
    local kind goal="not measured" g
    local -A STREAM_GW_NOTE=() STREAM_NGX_NOTE=() STREAM_GW_GROWTH=()
    SCEN_NAME=stream
    STREAM_ROWS=()
    STREAM_JSON=()
    for kind in download upload upload-chunked; do
        stream_direct "$kind"
        stream_gatherd "$kind"
        stream_nginx "$kind"
    done

    g=${STREAM_GW_GROWTH[download]:-}
    if [[ -n $g ]]; then
        if ((g < 16384)); then goal="met"; else goal="MISSED"; fi
    fi
    printf '\n== stream: %s bytes through a proxy route to the stub, %s worker(s), RSS every %s ms ==\n' \
        "$BENCH_STREAM_BYTES" "$BENCH_WORKERS" "$BENCH_SAMPLE_MS"
    printf '   upload = Content-Length body, upload-chunked = chunked body; direct = curl <-> stub, no proxy\n'
    printf '   RSS (MiB) = VmRSS from /proc (gatherd: the process; nginx: its workers summed);\n'
    printf '   growth = peak - base; CPU s = the server'"'"'s CPU during the transfer\n'
    printf '  %-15s %-8s %6s %9s %8s %9s %9s %9s %9s %7s %7s\n' transfer server status 'MiB/s' 'time s' \
        'RSS base' 'RSS peak' 'growth' 'RSS end' 'CPU s' samples
    printf '%s\n' "${STREAM_ROWS[@]}"
    printf '  goal: gatherd RSS growth under 16 MiB while downloading: %s' "$goal"
    [[ -n $g ]] && printf ' (%s MiB)' "$(fmt_mib "$g")"
    printf '\n'
    for kind in upload upload-chunked; do
        g=${STREAM_GW_GROWTH[$kind]:-}
        if [[ -n $g ]]; then
            printf '  %s: gatherd RSS growth %s MiB\n' "$kind" "$(fmt_mib "$g")"
        else
            printf '  %s: %s\n' "$kind" "${STREAM_GW_NOTE[$kind]:-not measured}"
        fi
    done

    for kind in download upload upload-chunked; do
        SUMMARY_LINES+=("$(printf '%-12s %-15s gatherd %s | nginx %s' stream "$kind" \
            "${STREAM_GW_NOTE[$kind]:-?}" "${STREAM_NGX_NOTE[$kind]:-?}")")
    done
    SCENARIO_JSON+=("$(printf '{"name": "stream", "bytes": %s, "workers": %s, "sample_ms": %s, "goal_download_growth_mib": 16, "goal": %s, "transfers": [%s]}' \
        "$BENCH_STREAM_BYTES" "$BENCH_WORKERS" "$BENCH_SAMPLE_MS" "$(json_str "$goal")" \
        "$(IFS=,; printf '%s' "${STREAM_JSON[*]}")")")
}

# ---------------------------------------------------------------- scenario fanout
# One client request -> three small JSON calls made concurrently -> one merged
# document {"user": ..., "orders": ..., "recs": ...}. gatherd's aggregate route
# against two peers on the same backends: nginx + Lua (capture_multi) and a
# Python aiohttp aggregator (asyncio.gather).

FB_PORT="" FB_PID="" FB_DESC="" FG_PID="" FL_PID="" FP_PID=""
FG_NOTE="" FL_NOTE="" FP_NOTE=""

fanout_backend_pids() {
    if [[ $BENCH_FANOUT_BACKEND == stub ]]; then
        echo "$STUB_PID"
    else
        echo "$FB_PID"
        children_of "$FB_PID"
    fi
}
fanout_gw_pids() { echo "$FG_PID"; }
fanout_lua_pids() {
    echo "$FL_PID"
    children_of "$FL_PID"
}
fanout_py_pids() { echo "$FP_PID"; }

# fanout_check URL [BACKEND_BASE] -> 0 when URL answers 200 with exactly the
# merge of the three backend answers (of BACKEND_BASE, default the fanout
# backend); otherwise the reason is in FANOUT_WHY
fanout_check() {
    FANOUT_WHY=$("$PYTHON" - "${2:-http://127.0.0.1:$FB_PORT}" "$1" 2>&1 <<'EOF'
import json, sys, urllib.request
base, url = sys.argv[1], sys.argv[2]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def get(u):
    with opener.open(u, timeout=5) as r:
        return json.load(r)
try:
    want = {"user": get(base + "/users/1"), "orders": get(base + "/orders?user=1"),
            "recs": get(base + "/recommendations")}
    got = get(url)
except Exception as e:  # any failure is the answer
    sys.exit("%s: %s" % (url, e))
if got != want:
    sys.exit("%s answered %s, not %s" % (url, json.dumps(got)[:300], json.dumps(want)[:300]))
EOF
    )
}

# fanout_locations -> the backends' three location blocks: the stub's answers
# to the same requests, byte for byte
fanout_locations() {
    cat <<'EOF'
        location = /users/1 {
            return 200 '{"id":1,"name":"User 1","email":"user1@example.com","tier":"gold"}';
        }
        location = /orders {
            return 200 '{"user":1,"items":[{"id":101,"product_id":7,"qty":1},{"id":102,"product_id":9,"qty":2}]}';
        }
        location = /recommendations {
            return 200 '{"user":null,"items":[1,2,3]}';
        }
EOF
}

fanout_start_backend() {
    local p
    if [[ $BENCH_FANOUT_BACKEND == stub ]]; then
        FB_PORT=$STUB_PORT FB_PID=$STUB_PID
        FB_DESC="gw_stub, 1 thread: built-in /users/1, /orders?user=1, /recommendations"
        return 0
    fi
    FB_PORT=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT") || die "no free port found"
    p=$(nginx_prefix fanout-backend)
    {
        nginx_conf_head "$p" 1 4096
        cat <<EOF

http {
    access_log off;
    keepalive_requests 1000000;   # the aggregators' pools are never closed on
    keepalive_timeout 75s;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;
    default_type application/json;

    server {
        listen 127.0.0.1:$FB_PORT;
$(fanout_locations)
    }
}
EOF
    } >"$p/nginx.conf"
    launch_nginx fanout-backend "$p" "http://127.0.0.1:$FB_PORT/users/1"
    FB_PID=$INST_PID
    FB_DESC="nginx, 1 worker, three locations with return 200 (in memory, access_log off)"
}

fanout_start_gatherd() {
    local port conf
    FG_PID="" FG_NOTE=""
    port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT" "$FB_PORT") || die "no free port found"
    conf=$TMP/fanout-gatherd.json
    cat >"$conf" <<EOF
{
  "listen": ["127.0.0.1:$port"],
  "admin": {"listen": []},
  "workers": $BENCH_WORKERS,
  "http": {"max_keepalive_requests": 10000},
  "backends": {"b": {"url": "http://127.0.0.1:$FB_PORT", "max_connections": 1024, "max_idle": 1024}},
  "routes": [
    {"path": "/bench/fanout", "methods": ["GET"], "calls": [{"name": "user", "backend": "b", "path": "/users/1"}, {"name": "orders", "backend": "b", "path": "/orders?user=1"}, {"name": "recs", "backend": "b", "path": "/recommendations"}]}
  ]
}
EOF
    FANOUT_GW_URL="http://127.0.0.1:$port/bench/fanout"
    if gatherd_rejects "$conf"; then
        FG_NOTE="gatherd: aggregate routes not supported by this build"
        printf '  %s\n    (gatherd -t: %s)\n' "$FG_NOTE" "$GW_REJECT"
        return 0
    fi
    launch_gatherd fanout-gatherd "$conf" "$FANOUT_GW_URL"
    FG_PID=$INST_PID
    if ! fanout_check "$FANOUT_GW_URL"; then
        FG_NOTE="wrong answer: $FANOUT_WHY"
        TOTAL_ERRORS=$((TOTAL_ERRORS + 1))
        printf '  gatherd: %s\n' "$FG_NOTE"
        stop_started "$FG_PID"
        FG_PID=""
    fi
}

# lua_fanout_conf PREFIX PORT PATH KEEPALIVE BACKEND_PORT... -> an nginx.conf for
# the nginx + Lua aggregator: PATH runs ngx.location.capture_multi over three
# internal locations that proxy to `upstream backend` (one `server` per
# BACKEND_PORT, round robin, `keepalive KEEPALIVE` idle connections per worker),
# decodes the three answers with cjson and sends {"user","orders","recs"}
lua_fanout_conf() {
    local p=$1 port=$2 path=$3 keepalive=$4 m=$NGX_MODDIR bp
    shift 4
    nginx_conf_head "$p" "$BENCH_WORKERS" 4096 "$m/ndk_http_module.so" "$m/ngx_http_lua_module.so"
    cat <<EOF

http {
    access_log off;
    keepalive_requests 10000;
    keepalive_timeout 75s;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;
    init_by_lua_block { cjson = require "cjson" }

    upstream backend {
$(for bp in "$@"; do printf '        server 127.0.0.1:%s;\n' "$bp"; done)
        keepalive $keepalive;            # idle upstream connections kept per worker
    }

    server {
        listen 127.0.0.1:$port;

        location = $path {
            default_type application/json;
            content_by_lua_block {
                local user, orders, recs = ngx.location.capture_multi({
                    { "/_fanout/user" }, { "/_fanout/orders" }, { "/_fanout/recs" } })
                if user.status ~= 200 or orders.status ~= 200 or recs.status ~= 200 then
                    ngx.status = 502
                    ngx.print('{"error":{"code":"backend_failed"}}')
                    return
                end
                local body = cjson.encode({ user = cjson.decode(user.body),
                                            orders = cjson.decode(orders.body),
                                            recs = cjson.decode(recs.body) })
                ngx.header.content_length = #body
                ngx.print(body)
            }
        }
        location = /_fanout/user {
            internal;
            proxy_pass http://backend/users/1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        location = /_fanout/orders {
            internal;
            proxy_pass http://backend/orders?user=1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        location = /_fanout/recs {
            internal;
            proxy_pass http://backend/recommendations;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

fanout_start_lua() {
    local p port m=$NGX_MODDIR
    FL_PID="" FL_NOTE=""
    if [[ ! -f $m/ngx_http_lua_module.so || ! -f $m/ndk_http_module.so ]]; then
        FL_NOTE="not measured (no ngx_http_lua_module.so in $m; apt-get install libnginx-mod-http-lua lua-cjson)"
        printf '  nginx-lua: %s\n' "$FL_NOTE"
        return 0
    fi
    port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT" "$FB_PORT") || die "no free port found"
    p=$(nginx_prefix fanout-nginx-lua)
    lua_fanout_conf "$p" "$port" /bench/fanout 1024 "$FB_PORT" >"$p/nginx.conf"
    if nginx_rejects "$p"; then
        FL_NOTE="not measured (nginx -t: $NGX_REJECT)"
        printf '  nginx-lua: %s\n' "$FL_NOTE"
        return 0
    fi
    FANOUT_LUA_URL="http://127.0.0.1:$port/bench/fanout"
    launch_nginx fanout-nginx-lua "$p" "$FANOUT_LUA_URL"
    FL_PID=$INST_PID
    if ! fanout_check "$FANOUT_LUA_URL"; then
        FL_NOTE="not measured (wrong answer: $FANOUT_WHY)"
        printf '  nginx-lua: %s\n' "$FL_NOTE"
        stop_started "$FL_PID"
        FL_PID=""
    fi
}

fanout_start_py() {
    local port max nconns
    FP_PID="" FP_NOTE=""
    if [[ -z $AIOHTTP_PYTHON ]]; then
        FP_NOTE="not measured (no python3 with aiohttp; apt-get install python3-aiohttp)"
        printf '  aiohttp: %s\n' "$FP_NOTE"
        return 0
    fi
    port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT" "$FB_PORT") || die "no free port found"
    nconns=$(wc -w <<<"$BENCH_CONNS")
    # it stops by itself after the whole scenario could have run, plus 5 minutes
    max=$((nconns * 3 * ($(dur_seconds "$BENCH_DURATION") + $(dur_seconds "$BENCH_WARMUP") + 40) + 300))
    start_bg "$TMP/fanout-aiohttp.log" "$AIOHTTP_PYTHON" "$BENCH_DIR/fanout_aiohttp.py" \
        "http://127.0.0.1:$FB_PORT" "$port" --max-seconds "$max" --pool 1024
    FP_PID=$BG_PID
    register_server fanout-aiohttp "$FP_PID" "$TMP/fanout-aiohttp.log"
    wait_http fanout-aiohttp "$FP_PID" "http://127.0.0.1:$port/health" Python ||
        { tail -n 30 "$TMP/fanout-aiohttp.log" >&2; die "the aiohttp aggregator failed to start"; }
    log "fanout-aiohttp: PID $FP_PID ($AIOHTTP_PYTHON)"
    FANOUT_PY_URL="http://127.0.0.1:$port/bench/fanout"
    if ! fanout_check "$FANOUT_PY_URL"; then
        FP_NOTE="not measured (wrong answer: $FANOUT_WHY)"
        printf '  aiohttp: %s\n' "$FP_NOTE"
        stop_started "$FP_PID"
        FP_PID=""
    fi
}

fanout_row() { # LABEL PREFIX
    local l=$1 p=$2 v
    local -a cols=()
    for v in RPS P50 P99 ERR CPU UTIL RPC WRKCPU BCPU; do
        local n="${p}_$v"
        cols+=("${!n:-?}")
    done
    printf '  %-10s %10s %8s %8s %7s %7s %6s%% %10s %9s %10s\n' "$l" "${cols[@]}"
}

# fanout_peer_json NAME PREFIX MEASURED NOTE -> json_side, or {"name", "status"}
fanout_peer_json() {
    if [[ $3 == 1 ]]; then json_side "$1" "$2"; else printf '{"name": %s, "status": %s}' "$(json_str "$1")" "$(json_str "$4")"; fi
}

# G_*, L_* and P_* are set by measure (printf -v)
# shellcheck disable=SC2153
scenario_fanout() {
    local conns hg hl hp r_gl_rps r_gl_rpc r_gp_rps r_gp_rpc r_lp_rps r_lp_rpc gline
    SCEN_NAME=fanout
    FANOUT_GW_URL="" FANOUT_LUA_URL="" FANOUT_PY_URL=""
    printf '\n== fanout: GET /bench/fanout = 3 concurrent JSON calls merged into {"user","orders","recs"} ==\n'
    fanout_start_backend
    printf '   backends: %s on 127.0.0.1:%s\n' "$FB_DESC" "$FB_PORT"
    fanout_start_gatherd
    fanout_start_lua
    fanout_start_py

    for conns in $BENCH_CONNS; do
        hg=0 hl=0 hp=0
        if [[ -n $FG_PID ]]; then
            measure fanout-gatherd "$FANOUT_GW_URL" "$conns" fanout_gw_pids G fanout_backend_pids
            hg=1
            TOTAL_ERRORS=$((TOTAL_ERRORS + G_ERR))
        fi
        if [[ -n $FL_PID ]]; then
            measure fanout-nginx-lua "$FANOUT_LUA_URL" "$conns" fanout_lua_pids L fanout_backend_pids
            hl=1
            TOTAL_ERRORS=$((TOTAL_ERRORS + L_ERR))
        fi
        if [[ -n $FP_PID ]]; then
            measure fanout-aiohttp "$FANOUT_PY_URL" "$conns" fanout_py_pids P fanout_backend_pids
            hp=1
            TOTAL_ERRORS=$((TOTAL_ERRORS + P_ERR))
        fi
        r_gl_rps="" r_gl_rpc="" r_gp_rps="" r_gp_rpc="" r_lp_rps="" r_lp_rpc=""
        if ((hg && hl)); then r_gl_rps=$(ratio "$G_RPS" "$L_RPS") r_gl_rpc=$(ratio "$G_RPC" "$L_RPC"); fi
        if ((hg && hp)); then r_gp_rps=$(ratio "$G_RPS" "$P_RPS") r_gp_rpc=$(ratio "$G_RPC" "$P_RPC"); fi
        if ((hl && hp)); then r_lp_rps=$(ratio "$L_RPS" "$P_RPS") r_lp_rpc=$(ratio "$L_RPC" "$P_RPC"); fi

        printf '\n== fanout: %s connections, %s, wrk -t%s, %s worker(s) ==\n' \
            "$conns" "$BENCH_DURATION" "$BENCH_THREADS" "$BENCH_WORKERS"
        printf '   gatherd:   %s\n   nginx-lua: %s\n   aiohttp:   %s\n' "${FANOUT_GW_URL:--}" \
            "${FANOUT_LUA_URL:--}" "${FANOUT_PY_URL:--}"
        printf '   CPU s = the aggregator'"'"'s own processes (gatherd: the daemon; nginx-lua: master + workers;\n'
        printf '   aiohttp: the python process); backend CPU s = the backends'"'"', charged to nobody\n'
        printf '  %-10s %10s %8s %8s %7s %7s %7s %10s %9s %10s\n' \
            server 'req/s' 'p50 ms' 'p99 ms' errors 'CPU s' 'CPU' 'req/CPU-s' 'wrk CPU s' 'backend s'
        if ((hg)); then fanout_row gatherd G; else printf '  %-10s %s\n' gatherd "not measured: ${FG_NOTE#gatherd: }"; fi
        if ((hl)); then fanout_row nginx-lua L; else printf '  %-10s %s\n' nginx-lua "${FL_NOTE}"; fi
        if ((hp)); then fanout_row aiohttp P; else printf '  %-10s %s\n' aiohttp "${FP_NOTE}"; fi
        printf '  ratio gatherd/nginx-lua: requests/s %s, requests per CPU-second %s\n' "$(xr "$r_gl_rps")" "$(xr "$r_gl_rpc")"
        printf '  ratio gatherd/aiohttp:   requests/s %s, requests per CPU-second %s\n' "$(xr "$r_gp_rps")" "$(xr "$r_gp_rpc")"
        printf '  (peers: nginx-lua/aiohttp requests/s %s, requests per CPU-second %s)\n' "$(xr "$r_lp_rps")" "$(xr "$r_lp_rpc")"

        if ((hg)); then
            gline=$(printf 'gatherd %7s req/s %7s req/CPU-s' "$G_RPS" "$G_RPC")
        else
            gline="gatherd not measured (${FG_NOTE#gatherd: })"
        fi
        SUMMARY_LINES+=("$(printf '%-12s c=%-5s %s | nginx-lua %s req/s %s req/CPU-s | aiohttp %s req/s %s req/CPU-s | gatherd/nginx-lua %s, gatherd/aiohttp %s req/CPU-s' \
            fanout "$conns" "$gline" "$( ((hl)) && echo "$L_RPS" || echo -)" "$( ((hl)) && echo "$L_RPC" || echo -)" \
            "$( ((hp)) && echo "$P_RPS" || echo -)" "$( ((hp)) && echo "$P_RPC" || echo -)" \
            "$(xr "$r_gl_rpc")" "$(xr "$r_gp_rpc")")")
        SCENARIO_JSON+=("$(printf '{"name": "fanout", "connections": %s, "duration": %s, "wrk_threads": %s, "workers": %s, "backend": %s, "gateway_url": %s, "gateway": %s, "gateway_status": %s, "peers": [%s, %s], "ratio": {"gatherd_nginx_lua": {"requests_per_s": %s, "requests_per_cpu_s": %s}, "gatherd_aiohttp": {"requests_per_s": %s, "requests_per_cpu_s": %s}, "nginx_lua_aiohttp": {"requests_per_s": %s, "requests_per_cpu_s": %s}}}' \
            "$conns" "$(json_str "$BENCH_DURATION")" "$BENCH_THREADS" "$BENCH_WORKERS" "$(json_str "$FB_DESC")" \
            "$(json_str "$FANOUT_GW_URL")" "$( ((hg)) && json_side gatherd G || printf null)" \
            "$(json_str "$( ((hg)) && echo measured || echo "$FG_NOTE")")" \
            "$(fanout_peer_json nginx-lua L "$hl" "$FL_NOTE")" "$(fanout_peer_json aiohttp P "$hp" "$FP_NOTE")" \
            "$(json_num "$r_gl_rps")" "$(json_num "$r_gl_rpc")" "$(json_num "$r_gp_rps")" "$(json_num "$r_gp_rpc")" \
            "$(json_num "$r_lp_rps")" "$(json_num "$r_lp_rpc")")")
    done

    [[ -n $FG_PID ]] && stop_started "$FG_PID"
    [[ -n $FL_PID ]] && stop_started "$FL_PID"
    [[ -n $FP_PID ]] && stop_started "$FP_PID"
    [[ $BENCH_FANOUT_BACKEND == nginx && -n $FB_PID ]] && stop_started "$FB_PID"
    FG_PID="" FL_PID="" FP_PID=""
    return 0
}

# ---------------------------------------------------------------- scenario cluster
# The fanout's three calls, to one backend of three servers, with gatherd's
# default backend settings (the backend has "servers" and nothing else) against
# nginx + Lua with the equivalent upstream block: what a user gets without
# tuning. Goal: at least 2x nginx + Lua's requests per CPU-second, and a lower
# p99.

CLUSTER_KEEPALIVE=1024  # nginx-lua's `keepalive`: the idle connections its load can use (3 x connections)
CB_PORTS=() CB_PID="" CG_PID="" CL_PID="" CG_NOTE="" CL_NOTE=""
CLUSTER_GW_URL="" CLUSTER_LUA_URL=""

cluster_backend_pids() {
    echo "$CB_PID"
    children_of "$CB_PID"
}
cluster_gw_pids() { echo "$CG_PID"; }
cluster_lua_pids() {
    echo "$CL_PID"
    children_of "$CL_PID"
}

# The three servers: one nginx worker listening on three ports, each answering
# what the fanout backend answers (so every server gives the same merge).
cluster_start_backends() {
    local p i port
    CB_PORTS=()
    for ((i = 0; i < 3; i++)); do
        port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT" "${CB_PORTS[@]}") || die "no free port found"
        CB_PORTS+=("$port")
    done
    p=$(nginx_prefix cluster-backends)
    {
        nginx_conf_head "$p" 1 4096
        cat <<EOF

http {
    access_log off;
    keepalive_requests 1000000;   # the aggregators' pools are never closed on
    keepalive_timeout 75s;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;
    default_type application/json;

    server {
$(for i in "${CB_PORTS[@]}"; do printf '        listen 127.0.0.1:%s;\n' "$i"; done)
$(fanout_locations)
    }
}
EOF
    } >"$p/nginx.conf"
    launch_nginx cluster-backends "$p" "http://127.0.0.1:${CB_PORTS[0]}/users/1"
    CB_PID=$INST_PID
}

cluster_start_gatherd() {
    local port conf servers
    CG_PID="" CG_NOTE=""
    port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT" "${CB_PORTS[@]}") || die "no free port found"
    servers=$(printf '"http://127.0.0.1:%s", ' "${CB_PORTS[@]}")
    conf=$TMP/cluster-gatherd.json
    cat >"$conf" <<EOF
{
  "listen": ["127.0.0.1:$port"],
  "admin": {"listen": []},
  "workers": $BENCH_WORKERS,
  "http": {"max_keepalive_requests": 10000},
  "backends": {"c": {"servers": [${servers%, }]}},
  "routes": [
    {"path": "/bench/cluster", "methods": ["GET"], "calls": [{"name": "user", "backend": "c", "path": "/users/1"}, {"name": "orders", "backend": "c", "path": "/orders?user=1"}, {"name": "recs", "backend": "c", "path": "/recommendations"}]}
  ]
}
EOF
    CLUSTER_GW_URL="http://127.0.0.1:$port/bench/cluster"
    if gatherd_rejects "$conf"; then
        CG_NOTE="not measured (gatherd -t: $GW_REJECT)"
        printf '  gatherd: %s\n' "$CG_NOTE"
        return 0
    fi
    launch_gatherd cluster-gatherd "$conf" "$CLUSTER_GW_URL"
    CG_PID=$INST_PID
    if ! fanout_check "$CLUSTER_GW_URL" "http://127.0.0.1:${CB_PORTS[0]}"; then
        CG_NOTE="wrong answer: $FANOUT_WHY"
        TOTAL_ERRORS=$((TOTAL_ERRORS + 1))
        printf '  gatherd: %s\n' "$CG_NOTE"
        stop_started "$CG_PID"
        CG_PID=""
    fi
}

cluster_start_lua() {
    local p port m=$NGX_MODDIR
    CL_PID="" CL_NOTE=""
    if [[ ! -f $m/ngx_http_lua_module.so || ! -f $m/ndk_http_module.so ]]; then
        CL_NOTE="not measured (no ngx_http_lua_module.so in $m; apt-get install libnginx-mod-http-lua lua-cjson)"
        printf '  nginx-lua: %s\n' "$CL_NOTE"
        return 0
    fi
    port=$(free_port "$GW_PORT" "$NGX_PORT" "$STUB_PORT" "${CB_PORTS[@]}") || die "no free port found"
    p=$(nginx_prefix cluster-nginx-lua)
    lua_fanout_conf "$p" "$port" /bench/cluster "$CLUSTER_KEEPALIVE" "${CB_PORTS[@]}" >"$p/nginx.conf"
    if nginx_rejects "$p"; then
        CL_NOTE="not measured (nginx -t: $NGX_REJECT)"
        printf '  nginx-lua: %s\n' "$CL_NOTE"
        return 0
    fi
    CLUSTER_LUA_URL="http://127.0.0.1:$port/bench/cluster"
    launch_nginx cluster-nginx-lua "$p" "$CLUSTER_LUA_URL"
    CL_PID=$INST_PID
    if ! fanout_check "$CLUSTER_LUA_URL" "http://127.0.0.1:${CB_PORTS[0]}"; then
        CL_NOTE="not measured (wrong answer: $FANOUT_WHY)"
        printf '  nginx-lua: %s\n' "$CL_NOTE"
        stop_started "$CL_PID"
        CL_PID=""
    fi
}

# G_* and L_* are set by measure (printf -v)
# shellcheck disable=SC2153
scenario_cluster() {
    local conns hg hl r_rps r_rpc r_p99 goal gline
    SCEN_NAME=cluster
    CLUSTER_GW_URL="" CLUSTER_LUA_URL=""
    printf '\n== cluster: GET /bench/cluster = 3 concurrent JSON calls to one backend of 3 servers, default settings ==\n'
    cluster_start_backends
    printf '   servers: 127.0.0.1:%s (one nginx worker, static answers)\n' "$(printf '%s, ' "${CB_PORTS[@]}" | sed 's/, $//')"
    printf '   gatherd: backend {"servers": [3 URLs]}, no other key; nginx-lua: upstream of the 3 servers, keepalive %s\n' \
        "$CLUSTER_KEEPALIVE"
    cluster_start_gatherd
    cluster_start_lua

    for conns in $BENCH_CONNS; do
        hg=0 hl=0
        if [[ -n $CG_PID ]]; then
            measure cluster-gatherd "$CLUSTER_GW_URL" "$conns" cluster_gw_pids G cluster_backend_pids
            hg=1
            TOTAL_ERRORS=$((TOTAL_ERRORS + G_ERR))
        fi
        if [[ -n $CL_PID ]]; then
            measure cluster-nginx-lua "$CLUSTER_LUA_URL" "$conns" cluster_lua_pids L cluster_backend_pids
            hl=1
            TOTAL_ERRORS=$((TOTAL_ERRORS + L_ERR))
        fi
        r_rps="" r_rpc="" r_p99="" goal="not measured"
        if ((hg && hl)); then
            r_rps=$(ratio "$G_RPS" "$L_RPS") r_rpc=$(ratio "$G_RPC" "$L_RPC") r_p99=$(ratio "$G_P99" "$L_P99")
            goal=MISSED
            if [[ -n $r_rpc && -n $r_p99 ]] && awk -v r="$r_rpc" -v q="$r_p99" 'BEGIN { exit !(r >= 2 && q < 1) }'; then
                goal=met
            fi
        fi

        printf '\n== cluster: %s connections, %s, wrk -t%s, %s worker(s) ==\n' \
            "$conns" "$BENCH_DURATION" "$BENCH_THREADS" "$BENCH_WORKERS"
        printf '   gatherd:   %s\n   nginx-lua: %s\n' "${CLUSTER_GW_URL:--}" "${CLUSTER_LUA_URL:--}"
        printf '   CPU s = the aggregator'"'"'s own processes (gatherd: the daemon; nginx-lua: master + workers);\n'
        printf '   backend CPU s = the three servers'"'"', charged to nobody\n'
        printf '  %-10s %10s %8s %8s %7s %7s %7s %10s %9s %10s\n' \
            server 'req/s' 'p50 ms' 'p99 ms' errors 'CPU s' 'CPU' 'req/CPU-s' 'wrk CPU s' 'backend s'
        if ((hg)); then fanout_row gatherd G; else printf '  %-10s %s\n' gatherd "$CG_NOTE"; fi
        if ((hl)); then fanout_row nginx-lua L; else printf '  %-10s %s\n' nginx-lua "$CL_NOTE"; fi
        printf '  ratio gatherd/nginx-lua: requests per CPU-second %s, p99 %s, requests/s %s\n' \
            "$(xr "$r_rpc")" "$(xr "$r_p99")" "$(xr "$r_rps")"
        printf '  goal (requests per CPU-second >= 2x, p99 below nginx-lua'"'"'s): %s\n' "$goal"

        if ((hg)); then
            gline=$(printf 'gatherd %7s req/s %7s req/CPU-s p99 %s ms' "$G_RPS" "$G_RPC" "$G_P99")
        else
            gline="gatherd $CG_NOTE"
        fi
        SUMMARY_LINES+=("$(printf '%-12s c=%-5s %s | nginx-lua %s req/s %s req/CPU-s p99 %s ms | gatherd/nginx-lua %s req/CPU-s, p99 %s (goal %s)' \
            cluster "$conns" "$gline" "$( ((hl)) && echo "$L_RPS" || echo -)" "$( ((hl)) && echo "$L_RPC" || echo -)" \
            "$( ((hl)) && echo "$L_P99" || echo -)" "$(xr "$r_rpc")" "$(xr "$r_p99")" "$goal")")
        SCENARIO_JSON+=("$(printf '{"name": "cluster", "connections": %s, "duration": %s, "wrk_threads": %s, "workers": %s, "servers": [%s], "nginx_keepalive": %s, "gateway_url": %s, "gateway": %s, "gateway_status": %s, "peers": [%s], "ratio": {"gatherd_nginx_lua": {"requests_per_s": %s, "requests_per_cpu_s": %s, "latency_p99": %s}}, "goal": {"requests_per_cpu_s_ratio_min": 2, "latency_p99_ratio_below": 1, "status": %s}}' \
            "$conns" "$(json_str "$BENCH_DURATION")" "$BENCH_THREADS" "$BENCH_WORKERS" \
            "$(printf '%s\n' "${CB_PORTS[@]}" | sed 's/.*/"127.0.0.1:&"/' | paste -sd, - | sed 's/,/, /g')" \
            "$CLUSTER_KEEPALIVE" "$(json_str "$CLUSTER_GW_URL")" "$( ((hg)) && json_side gatherd G || printf null)" \
            "$(json_str "$( ((hg)) && echo measured || echo "$CG_NOTE")")" \
            "$(fanout_peer_json nginx-lua L "$hl" "$CL_NOTE")" \
            "$(json_num "$r_rps")" "$(json_num "$r_rpc")" "$(json_num "$r_p99")" "$(json_str "$goal")")")
    done

    [[ -n $CG_PID ]] && stop_started "$CG_PID"
    [[ -n $CL_PID ]] && stop_started "$CL_PID"
    [[ -n $CB_PID ]] && stop_started "$CB_PID"
    CG_PID="" CL_PID="" CB_PID=""
    return 0
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
        printf '  "versions": {"gatherd": %s, "nginx": %s, "wrk": %s, "python": %s, "aiohttp": %s},\n' \
            "$(json_str "$GW_VERSION")" "$(json_str "$NGX_VERSION")" "$(json_str "$WRK_VERSION")" \
            "$(json_str "$PY_VERSION")" "$(json_str "$AIOHTTP_VERSION")"
        printf '  "params": {"workers": %s, "connections": [%s], "duration": %s, "warmup": %s, "wrk_threads": %s, "idle_connections": %s, "stream_bytes": %s, "sample_ms": %s, "fanout_backend": %s, "scenarios": [%s]},\n' \
            "$BENCH_WORKERS" "$(printf '%s\n' $BENCH_CONNS | paste -sd, -)" "$(json_str "$BENCH_DURATION")" \
            "$(json_str "$BENCH_WARMUP")" "$BENCH_THREADS" "$BENCH_IDLE_CONNS" "$BENCH_STREAM_BYTES" \
            "$BENCH_SAMPLE_MS" "$(json_str "$BENCH_FANOUT_BACKEND")" \
            "$(for s in $BENCH_SCENARIOS; do json_str "$s"; printf ' '; done | sed 's/" "/", "/g; s/ $//')"
        printf '  "notes": ["nginx runs with access_log off because gatherd has no access log yet", "server CPU = utime+stime from /proc (nginx: master + workers) during the measured run only", "errors = wrk socket errors + non-2xx/3xx responses", "summary geomeans cover the scenarios that compare gatherd with plain nginx on the same work (respond, proxy)", "RSS = VmRSS from /proc/PID/status (nginx: workers summed)"],\n'
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
    local moddir
    moddir=$("$NGINX" -V 2>&1 | sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p')
    [[ -n $moddir ]] && NGX_MODDIR=$moddir
    if scenario_selected fanout || scenario_selected cluster; then ensure_fanout_tools; fi
    PYTHON=$(command -v python3 2>/dev/null || true)
    PY_VERSION="" AIOHTTP_VERSION=""
    [[ -n $PYTHON ]] && PY_VERSION=$("$PYTHON" -V 2>&1)
    if find_aiohttp_python; then
        AIOHTTP_VERSION=$("$AIOHTTP_PYTHON" -c 'import aiohttp, sys; print(aiohttp.__version__, "on Python", sys.version.split()[0])' 2>&1)
    fi
    # idle holds BENCH_IDLE_CONNS connections: the client and each server need a
    # descriptor per connection (children inherit the limit)
    local hard
    hard=$(ulimit -Hn)
    if [[ $hard == unlimited ]] || ((hard > 65536)); then hard=65536; fi
    (($(ulimit -n) < hard)) && ulimit -n "$hard"

    mkdir -p "$RESULTS_DIR" || die "cannot create $RESULTS_DIR"
    [[ -f $RESULTS_DIR/.gitignore ]] || printf '*.json\n*.txt\n' >"$RESULTS_DIR/.gitignore"
    rm -f "$RESULTS_DIR"/wrk-*.txt

    GW_VERSION=$("$GATHERD" -V 2>&1 | head -n 1)
    NGX_VERSION=$("$NGINX" -v 2>&1 | head -n 1)
    WRK_VERSION=$(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }')

    start_stub
    start_gatherd
    start_nginx

    local s total=0 per nconns
    per=$(($(dur_seconds "$BENCH_DURATION") + $(dur_seconds "$BENCH_WARMUP")))
    nconns=$(wc -w <<<"$BENCH_CONNS")
    for s in $BENCH_SCENARIOS; do
        case $s in
        idle) total=$((total + 15)) ;;    # two servers: set up, hold, release
        stream) total=$((total + 20)) ;;  # nine transfers of BENCH_STREAM_BYTES at ~0.5-2 GB/s
        fanout) total=$((total + nconns * 3 * per)) ;;
        *) total=$((total + nconns * 2 * per)) ;;
        esac
    done
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
    local g1 g2
    g1=$(geomean "${RPS_RATIOS[@]}")
    g2=$(geomean "${RPC_RATIOS[@]}")
    printf '  geometric mean of gatherd/nginx ratios (respond, proxy): requests/s %s, requests per CPU-second %s\n' \
        "$(xr "$g1")" "$(xr "$g2")"
    printf '  errors (all servers, all scenarios): %s\n' "$TOTAL_ERRORS"
    printf '  requests per CPU-second is the figure to compare: on this %s-CPU machine wrk competes\n' "$(nproc)"
    printf '  with the server for CPU, so requests/s also measures how much CPU wrk left over.\n'

    write_json
    return 0
}

main "$@"
