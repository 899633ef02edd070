# parse_wrk.awk - turn the text output of `wrk --latency` into shell assignments.
#
#   awk -f parse_wrk.awk wrk.out
#
# prints, one per line (values are plain numbers, safe to eval):
#   W_REQUESTS=<total requests completed>
#   W_ELAPSED=<seconds the measurement lasted>
#   W_RPS=<requests/s as printed by wrk>
#   W_P50_MS=<50th percentile latency in ms>   (empty if absent)
#   W_P99_MS=<99th percentile latency in ms>   (empty if absent)
#   W_SOCK_ERRORS=<connect+read+write+timeout socket errors>
#   W_NON2XX=<"Non-2xx or 3xx responses" count>
#
# wrk prints durations with a unit suffix: us, ms, s, m, h.

function to_ms(v,    n, u) {
    n = v; sub(/[a-z]+$/, "", n)
    u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") return n / 1000
    if (u == "ms") return n + 0
    if (u == "s")  return n * 1000
    if (u == "m")  return n * 60000
    if (u == "h")  return n * 3600000
    return ""
}

function to_s(v) { v = to_ms(v); return v == "" ? "" : v / 1000 }

BEGIN { req = ""; elapsed = ""; rps = ""; p50 = ""; p99 = ""; sock = 0; non2xx = 0; in_dist = 0 }

/Latency Distribution/ { in_dist = 1; next }
in_dist && $1 == "50%" { p50 = to_ms($2) }
in_dist && $1 == "99%" { p99 = to_ms($2) }
in_dist && $1 !~ /%$/  { in_dist = 0 }

# "  123456 requests in 10.00s, 18.43MB read"
$2 == "requests" && $3 == "in" { req = $1; e = $4; sub(/,$/, "", e); elapsed = to_s(e) }

# "  Socket errors: connect 0, read 0, write 0, timeout 0"
/Socket errors:/ {
    for (i = 1; i <= NF; i++) {
        if ($i == "connect" || $i == "read" || $i == "write" || $i == "timeout") {
            x = $(i + 1); sub(/,$/, "", x); sock += x
        }
    }
}

# "  Non-2xx or 3xx responses: 12"
/Non-2xx or 3xx responses:/ { non2xx = $NF }

$1 == "Requests/sec:" { rps = $2 }

END {
    printf "W_REQUESTS=%s\n", req
    printf "W_ELAPSED=%s\n", elapsed
    printf "W_RPS=%s\n", rps
    printf "W_P50_MS=%s\n", (p50 == "" ? "" : sprintf("%.3f", p50))
    printf "W_P99_MS=%s\n", (p99 == "" ? "" : sprintf("%.3f", p99))
    printf "W_SOCK_ERRORS=%d\n", sock
    printf "W_NON2XX=%d\n", non2xx
}
