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
passed=0 failed=0
build_ll() {
    for f in llhttp api http; do
        clang -c -g -O1 -fsanitize=address,undefined -w -I"$LLINC" "$LLSRC/$f.c" -o "$OUT/ll_$f.o" || return 1
    done
}
# Every daemon source but main(), compiled once (in parallel) into an archive
# the drivers link against: each takes what it uses, and a new source file
# needs no change here.
build_lib() {
    mkdir -p "$OUT/obj" && rm -f "$OUT/obj"/*.o "$OUT/libgw.a"
    ls "$SRC"/src/gw_*.c | grep -v '/gw_main\.c$' |
        FZ_CFLAGS="${CFLAGS/-fsanitize=fuzzer,/-fsanitize=fuzzer-no-link,}" \
        xargs -P "$(nproc 2>/dev/null || echo 2)" -I{} sh -c \
            'clang -c $FZ_CFLAGS "$1" -o "$2/obj/$(basename "$1" .c).o"' _ {} "$OUT" || return 1
    ar rcs "$OUT/libgw.a" "$OUT"/obj/*.o
}
run() {
    local name="$1"; shift
    if ! clang $CFLAGS "$SRC/tests/fuzz/$name.c" "$OUT/libgw.a" "$OUT"/ll_*.o $LIBS -o "$OUT/$name" 2>"$OUT/$name.build"; then
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
if ! build_lib 2>"$OUT/libgw.build"; then
    cat "$OUT/libgw.build"; echo "FAIL - the daemon's sources (build)"; echo "0 passed, 1 failed"; exit 1
fi
for name in fuzz_request fuzz_config fuzz_template fuzz_json fuzz_response; do
    run "$name"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
