# shellcheck shell=bash
# lib.sh - helpers for tests/bench/run.sh (sourced, not executed).
#
# Everything here is loopback-only and bounded: every wait loop has a fixed
# maximum number of iterations and every wrk run is wrapped in `timeout`.
#
# Globals used (set by run.sh): BENCH_DIR, TMP, CLK_TCK, BENCH_THREADS,
# BENCH_DURATION, BENCH_WARMUP, BENCH_CONNS, BENCH_WORKERS, GW_PID.

# ---------------------------------------------------------------- messages

log() { printf '[bench] %s\n' "$*" >&2; }

die() {
    printf '[bench] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- numbers

# dur_seconds 10s|2m|1h|15 -> whole seconds (wrk accepts the same forms)
dur_seconds() {
    local v=$1 n u
    [[ $v =~ ^([0-9]+)([smh]?)$ ]] || return 1
    n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
    case $u in
    m) n=$((n * 60)) ;;
    h) n=$((n * 3600)) ;;
    esac
    printf '%s\n' "$n"
}

# ratio A B -> A/B with 3 decimals, "" when B is 0 or either is empty
ratio() {
    [[ -n $1 && -n $2 ]] || { echo ""; return; }
    awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print ""; else printf "%.3f\n", a / b }'
}

# json_num V -> V, or null when V is empty
json_num() { if [[ -n $1 ]]; then printf '%s' "$1"; else printf 'null'; fi; }

# json_str S -> "S" with \ and " escaped (enough for the strings we emit)
json_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

# ---------------------------------------------------------------- ports

# port_in_use PORT -> 0 when some TCP socket (v4 or v6) has PORT as local port
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" 'FNR > 1 { split($2, a, ":"); if (":" a[2] == h) { found = 1; exit } }
                      END { exit found ? 0 : 1 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# free_port [AVOID...] -> a TCP port on which nothing is bound; bounded retries
free_port() {
    local try p avoid
    for ((try = 0; try < 200; try++)); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        for avoid in "$@"; do [[ $p == "$avoid" ]] && continue 2; done
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    return 1
}

# ---------------------------------------------------------------- processes

STARTED_PIDS=()  # every PID this script started; cleanup stops exactly these

# start_bg LOGFILE CMD... -> starts CMD in the background, sets BG_PID
start_bg() {
    local logf=$1
    shift
    "$@" >"$logf" 2>&1 </dev/null &
    BG_PID=$!
    STARTED_PIDS+=("$BG_PID")
}

# forget_pid PID -> drops PID from STARTED_PIDS once it has been stopped and
# reaped, so that cleanup never signals a PID the system may have reused
forget_pid() {
    local p
    local -a keep=()
    for p in "${STARTED_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    STARTED_PIDS=("${keep[@]}")
}

# stop_started PID -> stop_pid, then forget_pid (for servers and helpers that a
# scenario starts and stops itself)
stop_started() {
    stop_pid "$1"
    forget_pid "$1"
}

# running PID -> 0 while PID exists and is not a zombie (kill -0 succeeds on an
# exited child that was not reaped yet)
running() {
    local s
    { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z ]]
}

# stop_pid PID -> TERM, wait up to 5 s, then KILL; only ever called on our PIDs
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "PID $pid did not stop within 5 s after TERM; sending KILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}

# wait_http NAME PID URL EXPECT_SERVER_HEADER -> waits (max 10 s) until URL answers 200,
# checks that the answer comes from the expected server, fails if PID died.
wait_http() {
    local name=$1 pid=$2 url=$3 server=$4 i code
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { log "$name (PID $pid) exited during start-up"; return 1; }
        code=$(curl -s -o "$TMP/$name.probe.body" -D "$TMP/$name.probe.head" -w '%{http_code}' \
            --max-time 1 "$url" 2>/dev/null) || code=000
        if [[ $code == 200 ]]; then
            if ! grep -qi "^server: *$server" "$TMP/$name.probe.head"; then
                log "$url answered, but not from $server (port taken by someone else?)"
                return 1
            fi
            return 0
        fi
        sleep 0.1
    done
    log "$name did not answer 200 on $url within 10 s (last status $code)"
    return 1
}

# proc_ticks PID -> utime+stime (fields 14 and 15 of /proc/PID/stat) in clock
# ticks. For a multi-threaded process the thread-group leader's stat already
# sums all of its threads.
proc_ticks() {
    local s
    { read -r s <"/proc/$1/stat"; } 2>/dev/null || { echo 0; return; }
    s=${s##*) }        # drop "pid (comm) ": comm may contain spaces and ')'
    # shellcheck disable=SC2086
    set -- $s          # now $1 is field 3 (state), so field N is $((N-2))
    echo $((${12} + ${13}))
}

# children_of PID -> PIDs whose parent (field 4 of /proc/X/stat) is PID
children_of() {
    local parent=$1 f s
    for f in /proc/[0-9]*/stat; do
        { read -r s <"$f"; } 2>/dev/null || continue
        s=${s##*) }
        # shellcheck disable=SC2086
        set -- $s
        [[ ${2:-} == "$parent" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
}

# rss_kib PID... -> sum of VmRSS (resident memory, KiB) over the PIDs; a PID
# that is gone counts 0
rss_kib() {
    local sum=0 p k v u
    for p in "$@"; do
        {
            while read -r k v u; do
                [[ $k == VmRSS: ]] && { sum=$((sum + v)); break; }
            done <"/proc/$p/status"
        } 2>/dev/null
    done
    echo "$sum"
}

# fd_count PID -> open file descriptors of PID (entries of /proc/PID/fd)
fd_count() {
    local -a ents=()
    ents=(/proc/"$1"/fd/*)
    [[ -e ${ents[0]} ]] || { echo 0; return; }
    echo "${#ents[@]}"
}

# sample_rss WATCH_PID OUTFILE MAX_SECONDS INTERVAL_MS PID...
#   While WATCH_PID runs (at most MAX_SECONDS), appends one line
#   "<seconds since start> <sum of VmRSS KiB of the PIDs>" to OUTFILE every
#   INTERVAL_MS. The first sample is taken at once.
sample_rss() {
    local watch=$1 out=$2 max=$3 ms=$4 i n t0 us iv
    shift 4
    n=$((max * 1000 / ms + 1))
    printf -v iv '%d.%03d' $((ms / 1000)) $((ms % 1000))
    t0=${EPOCHREALTIME//[.,]/}  # microseconds
    : >"$out"
    for ((i = 0; i < n; i++)); do
        running "$watch" || break
        us=$((${EPOCHREALTIME//[.,]/} - t0))
        printf '%d.%03d %s\n' $((us / 1000000)) $((us % 1000000 / 1000)) "$(rss_kib "$@")" >>"$out"
        sleep "$iv"
    done
}

# ticks_of_pids PID... -> sum of proc_ticks over the PIDs
ticks_of_pids() {
    local sum=0 p
    for p in "$@"; do sum=$((sum + $(proc_ticks "$p"))); done
    echo "$sum"
}

# children_cpu_s -> user+system CPU seconds of this shell's reaped children
# (descendants included), from bash `times` (second line). It must run in the
# main shell, not in $(...): call `times >"$TMP/times.out"` first, then this.
children_cpu_s() {
    awk 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, "m"); sub(/s$/, "", a[2]); t += a[1] * 60 + a[2] }
        printf "%.3f\n", t
    }' "$TMP/times.out"
}

# ---------------------------------------------------------------- wrk

# run_wrk URL CONNS DURATION OUTFILE -> runs wrk once, bounded by timeout
run_wrk() {
    local url=$1 conns=$2 dur=$3 out=$4 secs
    secs=$(dur_seconds "$dur") || die "bad duration '$dur'"
    # --foreground: wrk stays in our process group, so Ctrl-C reaches it
    timeout --foreground -k 5 $((secs + 30)) \
        wrk -t"$BENCH_THREADS" -c"$conns" -d"$dur" --timeout 2s --latency "$url" >"$out" 2>&1
}

# measure LABEL URL CONNS PIDS_FN PREFIX [BACKEND_PIDS_FN]
#   warm-up run (BENCH_WARMUP, discarded), then the measured run (BENCH_DURATION).
#   PIDS_FN prints the PIDs whose CPU time is charged to the server.
#   BACKEND_PIDS_FN (optional) prints the PIDs of the backends behind it, whose
#   CPU during the measured run is reported separately (charged to nobody).
#   Sets PREFIX_{RPS,REQ,ELAPSED,P50,P99,ERR,SOCK,NON2XX,CPU,UTIL,RPC,WRKCPU,BCPU}.
measure() {
    local label=$1 url=$2 conns=$3 pids_fn=$4 pfx=$5 bpids_fn=${6:-} tag
    local t0 t1 c0 c1 b0=0 b1=0 bcpu="" cpu wcpu util rpc err W_REQUESTS W_ELAPSED W_RPS W_P50_MS W_P99_MS W_SOCK_ERRORS W_NON2XX
    tag="$label.c$conns.$SCEN_NAME"

    log "$SCEN_NAME: $label, $conns connections: warm-up $BENCH_WARMUP"
    run_wrk "$url" "$conns" "$BENCH_WARMUP" "$TMP/$tag.warmup.out" ||
        { cat "$TMP/$tag.warmup.out" >&2; die "wrk warm-up against $label failed"; }
    server_alive "$label"

    log "$SCEN_NAME: $label, $conns connections: measuring $BENCH_DURATION"
    # server CPU: ticks of its PIDs before/after; wrk CPU: this shell's
    # reaped-children CPU right around run_wrk (so the $(...) helpers here are
    # not charged to wrk)
    # shellcheck disable=SC2046
    [[ -n $bpids_fn ]] && b0=$(ticks_of_pids $($bpids_fn))
    # shellcheck disable=SC2046
    t0=$(ticks_of_pids $($pids_fn))
    times >"$TMP/times.out"
    c0=$(children_cpu_s)
    run_wrk "$url" "$conns" "$BENCH_DURATION" "$TMP/$tag.out"
    local rc=$?
    times >"$TMP/times.out"
    # shellcheck disable=SC2046
    t1=$(ticks_of_pids $($pids_fn))
    # shellcheck disable=SC2046
    [[ -n $bpids_fn ]] && b1=$(ticks_of_pids $($bpids_fn))
    c1=$(children_cpu_s)
    cp "$TMP/$tag.out" "$RESULTS_DIR/wrk-$tag.txt" 2>/dev/null || true

    eval "$(awk -f "$BENCH_DIR/parse_wrk.awk" "$TMP/$tag.out")"
    if [[ $rc -ne 0 || -z $W_REQUESTS || $W_REQUESTS -eq 0 ]]; then
        cat "$TMP/$tag.out" >&2
        die "wrk against $label ($url) failed (exit $rc, ${W_REQUESTS:-no} requests)"
    fi
    server_alive "$label"

    cpu=$(awk -v a="$t0" -v b="$t1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f\n", (b - a) / h }')
    wcpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f\n", b - a }')
    util=$(awk -v c="$cpu" -v e="$W_ELAPSED" 'BEGIN { if (e > 0) printf "%.1f\n", 100 * c / e }')
    rpc=$(awk -v r="$W_REQUESTS" -v c="$cpu" 'BEGIN { if (c > 0) printf "%.0f\n", r / c }')
    err=$((W_SOCK_ERRORS + W_NON2XX))
    [[ -n $bpids_fn ]] && bcpu=$(awk -v a="$b0" -v b="$b1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f\n", (b - a) / h }')

    printf -v "${pfx}_RPS" '%s' "$W_RPS"
    printf -v "${pfx}_REQ" '%s' "$W_REQUESTS"
    printf -v "${pfx}_ELAPSED" '%s' "$W_ELAPSED"
    printf -v "${pfx}_P50" '%s' "$W_P50_MS"
    printf -v "${pfx}_P99" '%s' "$W_P99_MS"
    printf -v "${pfx}_SOCK" '%s' "$W_SOCK_ERRORS"
    printf -v "${pfx}_NON2XX" '%s' "$W_NON2XX"
    printf -v "${pfx}_ERR" '%s' "$err"
    printf -v "${pfx}_CPU" '%s' "$cpu"
    printf -v "${pfx}_UTIL" '%s' "$util"
    printf -v "${pfx}_RPC" '%s' "$rpc"
    printf -v "${pfx}_WRKCPU" '%s' "$wcpu"
    printf -v "${pfx}_BCPU" '%s' "$bcpu"
}

# ---------------------------------------------------------------- reporting

SCENARIO_JSON=()   # one JSON object per (scenario, connections)
SUMMARY_LINES=()   # one text line per (scenario, connections)
RPS_RATIOS=()      # gatherd/reference requests/s, for the geometric mean
RPC_RATIOS=()      # gatherd/reference requests per CPU-second
TOTAL_ERRORS=0

row() { # LABEL PREFIX
    local l=$1 p=$2 v
    local -a f=()
    for v in RPS P50 P99 ERR CPU UTIL RPC WRKCPU; do
        local n="${p}_$v"
        f+=("${!n:-?}")
    done
    printf '  %-9s %11s %9s %9s %8s %8s %6s%% %11s %9s\n' "$l" "${f[@]}"
}

json_side() { # NAME PREFIX
    local p=$2 k
    local -A v=()
    for k in RPS REQ ELAPSED P50 P99 SOCK NON2XX ERR CPU UTIL RPC WRKCPU BCPU; do
        local n="${p}_$k"
        v[$k]=${!n:-}
    done
    printf '{"name": %s, "requests_per_s": %s, "requests": %s, "elapsed_s": %s, ' \
        "$(json_str "$1")" "$(json_num "${v[RPS]}")" "$(json_num "${v[REQ]}")" "$(json_num "${v[ELAPSED]}")"
    printf '"latency_p50_ms": %s, "latency_p99_ms": %s, "errors": %s, "socket_errors": %s, "non_2xx_3xx": %s, ' \
        "$(json_num "${v[P50]}")" "$(json_num "${v[P99]}")" "$(json_num "${v[ERR]}")" \
        "$(json_num "${v[SOCK]}")" "$(json_num "${v[NON2XX]}")"
    printf '"server_cpu_s": %s, "server_cpu_percent": %s, "requests_per_cpu_s": %s, "wrk_cpu_s": %s, "backend_cpu_s": %s}' \
        "$(json_num "${v[CPU]}")" "$(json_num "${v[UTIL]}")" "$(json_num "${v[RPC]}")" "$(json_num "${v[WRKCPU]}")" \
        "$(json_num "${v[BCPU]}")"
}

# bench_pair NAME GATEWAY_URL REF_URL [REF_LABEL [REF_PIDS_FN]]
#   Runs, for every connection count in BENCH_CONNS, wrk against the gateway
#   and then against the reference server (default: nginx), prints a table and
#   the gatherd/reference ratios, and records JSON + a summary line.
#   Later scenarios call this with other URLs (e.g. a proxy route vs nginx
#   proxy_pass, or an aggregation route vs a Python asyncio aggregator with
#   REF_LABEL=asyncio REF_PIDS_FN=asyncio_pids).
# G_* and R_* are set by measure (printf -v)
# shellcheck disable=SC2153
bench_pair() {
    local name=$1 gw_url=$2 ref_url=$3 ref_label=${4:-nginx} ref_pids_fn=${5:-nginx_pids}
    local conns r_rps r_rpc
    SCEN_NAME=$name
    for conns in $BENCH_CONNS; do
        measure gatherd "$gw_url" "$conns" gatherd_pids G
        measure "$ref_label" "$ref_url" "$conns" "$ref_pids_fn" R

        r_rps=$(ratio "$G_RPS" "$R_RPS")
        r_rpc=$(ratio "$G_RPC" "$R_RPC")
        [[ -n $r_rps ]] && RPS_RATIOS+=("$r_rps")
        [[ -n $r_rpc ]] && RPC_RATIOS+=("$r_rpc")
        TOTAL_ERRORS=$((TOTAL_ERRORS + G_ERR + R_ERR))

        printf '\n== %s: %s connections, %s, wrk -t%s, %s worker(s) ==\n' \
            "$name" "$conns" "$BENCH_DURATION" "$BENCH_THREADS" "$BENCH_WORKERS"
        printf '   gatherd: %s\n   %-7s: %s\n' "$gw_url" "$ref_label" "$ref_url"
        printf '  %-9s %11s %9s %9s %8s %8s %7s %11s %9s\n' \
            server 'req/s' 'p50 ms' 'p99 ms' errors 'CPU s' 'CPU' 'req/CPU-s' 'wrk CPU s'
        row gatherd G
        row "$ref_label" R
        printf '  ratio gatherd/%s: requests/s %sx, requests per CPU-second %sx\n' \
            "$ref_label" "${r_rps:-?}" "${r_rpc:-?}"

        SUMMARY_LINES+=("$(printf '%-12s c=%-5s gatherd %9s req/s %9s req/CPU-s | %s %9s req/s %9s req/CPU-s | ratio %6sx req/s %6sx req/CPU-s' \
            "$name" "$conns" "$G_RPS" "$G_RPC" "$ref_label" "$R_RPS" "$R_RPC" "${r_rps:-?}" "${r_rpc:-?}")")
        SCENARIO_JSON+=("$(printf '{"name": %s, "connections": %s, "duration": %s, "wrk_threads": %s, "gateway_url": %s, "reference_url": %s, "gateway": %s, "reference": %s, "ratio": {"requests_per_s": %s, "requests_per_cpu_s": %s}}' \
            "$(json_str "$name")" "$conns" "$(json_str "$BENCH_DURATION")" "$BENCH_THREADS" \
            "$(json_str "$gw_url")" "$(json_str "$ref_url")" \
            "$(json_side gatherd G)" "$(json_side "$ref_label" R)" \
            "$(json_num "$r_rps")" "$(json_num "$r_rpc")")")
    done
}

# geomean X... -> geometric mean with 3 decimals ("" for no values)
geomean() {
    [[ $# -gt 0 ]] || { echo ""; return; }
    printf '%s\n' "$@" | awk '$1 > 0 { s += log($1); n++ } END { if (n) printf "%.3f\n", exp(s / n) }'
}
