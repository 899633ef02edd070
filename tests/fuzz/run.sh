#!/bin/bash
# Builds the libFuzzer drivers with clang (ASan + UBSan) and runs each for
# FUZZ_SECONDS (default 20) from the seed corpus in tests/fuzz/corpus.
# Prints "N passed, N failed" (one per driver). Bounded in time; no network.
set -uo pipefail
SRC="${GW_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}"
OUT="${FUZZ_OUT:-$(mktemp -d)}"
SECS="${FUZZ_SECONDS:-20}"
LLSRC="${LLHTTP_SRCDIR:-/usr/share/llhttp}"
LLINC="${LLHTTP_INCDIR:-/usr/share/include/llhttp}"
CFLAGS="-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I$SRC/src -I$LLINC
        $(pkg-config --cflags libevent_core libevent_extra libevent_openssl jansson openssl) -D_GNU_SOURCE -DPACKAGE_VERSION=\"fuzz\""
LIBS="$(pkg-config --libs libevent_core libevent_extra libevent_openssl jansson openssl) -pthread"
COMMON="$SRC/src/gw_alloc.c $SRC/src/gw_log.c $SRC/src/gw_alog.c $SRC/src/gw_router.c $SRC/src/gw_budget.c"
passed=0 failed=0
build_ll() {
    for f in llhttp api http; do
        clang -c -g -O1 -fsanitize=address,undefined -w -I"$LLINC" "$LLSRC/$f.c" -o "$OUT/ll_$f.o" || return 1
    done
}
run() {
    local name="$1"; shift
    if ! clang $CFLAGS "$SRC/tests/fuzz/$name.c" "$@" "$OUT"/ll_*.o $LIBS -o "$OUT/$name" 2>"$OUT/$name.build"; then
        cat "$OUT/$name.build"; echo "FAIL - $name (build)"; failed=$((failed + 1)); return
    fi
    local corpus="$OUT/corpus-$name"
    mkdir -p "$corpus"
    cp "$SRC/tests/fuzz/corpus/${name#fuzz_}"/* "$corpus"/
    if (cd "$OUT" && ASAN_OPTIONS=detect_leaks=1 "./$name" -max_total_time="$SECS" -max_len=4096 -timeout=10 \
            -rss_limit_mb=2048 "$corpus" >"$OUT/$name.out" 2>&1); then
        echo "ok - $name ($(grep -o 'stat::number_of_executed_units: [0-9]*' "$OUT/$name.out" || tail -n1 "$OUT/$name.out" | cut -c1-80))"
        passed=$((passed + 1))
    else
        grep -A30 -E 'ERROR|runtime error|deadly' "$OUT/$name.out" | head -60
        echo "FAIL - $name (artifacts in $OUT)"; failed=$((failed + 1))
    fi
}
if ! command -v clang >/dev/null || ! build_ll; then
    echo "FAIL - clang or llhttp sources missing"; echo "0 passed, 1 failed"; exit 1
fi
run fuzz_request "$SRC/src/gw_http.c" $COMMON
run fuzz_config "$SRC/src/gw_config.c" "$SRC/src/gw_breaker.c" "$SRC/src/gw_ratelimit.c" "$SRC/src/gw_realip.c" "$SRC/src/gw_retry.c" "$SRC/src/gw_upstream.c" "$SRC/src/gw_dns.c" "$SRC/src/gw_template.c" "$SRC/src/gw_json.c" \
    "$SRC/src/gw_jpath.c" "$SRC/src/gw_http.c" $COMMON
run fuzz_template "$SRC/src/gw_template.c" "$SRC/src/gw_json.c" "$SRC/src/gw_jpath.c" "$SRC/src/gw_http.c" $COMMON
run fuzz_json "$SRC/src/gw_json.c" "$SRC/src/gw_template.c" "$SRC/src/gw_jpath.c" "$SRC/src/gw_http.c" $COMMON
# the response reader with the proxy's head filter: every daemon source but main()
run fuzz_response $(ls "$SRC"/src/gw_*.c | grep -v -e gw_main.c -e gw_alloc.c -e gw_log.c -e gw_alog.c -e gw_router.c) $COMMON
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
