#!/bin/bash
# The whole test suite, as CI runs it (.ci/run) and as the README tells a
# newcomer to run it on a fresh Debian 12 machine. After the Debian packages
# (scripts/install-deps.sh) and autoreconf, five tiers (README "Tests"):
#   asan       ASan + UBSan build: unit tests and every integration test
#   tsan       ThreadSanitizer build: make check-tsan (the integration tests
#              where several workers and threads share state)
#   normal     normal build with -Werror: unit tests, the normal tier of the
#              integration tests (GW_CHECK_TIER=normal: the smoke tests and those
#              measured best without sanitizers) and the deploy and README tests
#   fuzz       the libFuzzer drivers of tests/fuzz, FUZZ_SECONDS (5) each
#   distcheck  the release tarball builds with -Werror and passes unit + smoke
# They run side by side, in three lanes: asan; tsan; normal (its tests
# beside fuzz, then distcheck). The builds take the CPU, one at a time (ASan
# first: its tests are the longest), each while the tests of the lanes before
# it run; the integration tests mostly wait on timers and sockets, so the
# lanes fill both cores, and the big files of the ASan tier run in shards
# (GW_TEST_JOBS). Load tests run alone across all lanes (gwtest.py's locks).
# Every test program ends with "N passed, N failed" (", N skipped" appended
# when it skipped tests); the last line of this script is the sum over all
# of them, in the same form. Exit status is non-zero on any failure.
set -uo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${GW_BUILD_DIR:-$SRC/build}"
JOBS="$(nproc 2>/dev/null || echo 2)"
ASAN_JOBS="${GW_ASAN_JOBS:-3}"      # test files at once: they mostly wait
ASAN_SHARDS="${GW_ASAN_SHARDS:-3}"  # processes per big test file (gwtest.py's GW_TEST_JOBS)
TSAN_JOBS="${GW_TSAN_JOBS:-3}"
passed=0
failed=0
skipped=0
log() { echo "== $*"; }

# Adds a summary line "N passed, N failed[, N skipped]" to the totals;
# false when $1 is not one.
add_summary() {
    [[ "$1" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed(,\ ([0-9]+)\ skipped)?$ ]] || return 1
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
    skipped=$((skipped + ${BASH_REMATCH[4]:-0}))
}

# The last summary line of file $1 (empty when there is none).
summary_of() {
    grep -E '^[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$' "$1" | tail -n1
}

# The final line: "N passed, N failed", plus ", N skipped" when any were.
total_line() {
    if [ "$skipped" -gt 0 ]; then
        echo "$passed passed, $failed failed, $skipped skipped"
    else
        echo "$passed passed, $failed failed"
    fi
}

bash "$SRC/scripts/install-deps.sh" || { echo "install-deps failed"; echo "0 passed, 1 failed"; exit 1; }

if [ -f "$SRC/config.status" ]; then
    echo "note: the source tree was configured in place; running 'make distclean' there so out-of-tree builds work"
    make -C "$SRC" distclean >/dev/null 2>&1 || true
fi
(cd "$SRC" && autoreconf -fi >/dev/null 2>&1) || { echo "autoreconf failed"; echo "0 passed, 1 failed"; exit 1; }
rm -rf "$BUILD" && mkdir -p "$BUILD"
T0=$(date +%s)

# --- the lanes: each writes its output under $BUILD, the report comes after -----------------

# build NAME CONFIGURE-FLAGS...: configure and make in $BUILD/NAME; status
# in $BUILD/NAME.build ("ok" or the reason).
build() {
    local name="$1"; shift
    local dir="$BUILD/$name"
    mkdir -p "$dir"
    if ! (cd "$dir" && "$SRC/configure" -q "$@" >configure.out 2>&1); then
        { echo "configure $*:"; cat "$dir/configure.out"; } >"$BUILD/$name.build"; return 1
    fi
    if ! make -C "$dir" -j"$JOBS" >"$dir/make.out" 2>&1; then
        { echo "make:"; grep -E 'error|warning' "$dir/make.out" | head -40; } >"$BUILD/$name.build"; return 1
    fi
    echo ok >"$BUILD/$name.build"
}

# check NAME TARGET [VAR=VALUE...]: make TARGET in $BUILD/NAME; exit status
# in $BUILD/NAME.rc.
check() {
    local name="$1" target="$2"; shift 2
    make -C "$BUILD/$name" "$@" "$target" >"$BUILD/$name/check.out" 2>&1
    echo $? >"$BUILD/$name.rc"
}

# Seconds since the start, into $BUILD/LANE.times as "what seconds".
mark() { echo "$2 $(($(date +%s) - T0))" >>"$BUILD/$1.times"; }

# Waits until the build NAME has ended (ok or not): one build at a time.
after_build() {
    while [ ! -s "$BUILD/$1.build" ]; do sleep 0.5; done
}

lane_asan() {
    mark asan start
    build asan --enable-werror --enable-sanitizers CFLAGS="-O1 -g" && mark asan built &&
        GW_TEST_JOBS="$ASAN_SHARDS" check asan check -j"$ASAN_JOBS"
    mark asan end
}

lane_tsan() {
    after_build asan
    mark tsan start
    build tsan --enable-werror --enable-tsan CFLAGS="-O1 -g" && mark tsan built &&
        check tsan check-tsan -j"$TSAN_JOBS"
    mark tsan end
}

lane_normal() {
    after_build tsan
    mark normal start
    local smoke=
    if build normal --enable-werror; then
        mark normal built
        # the binaries the README's commands use after this command (as after scripts/demo.sh)
        mkdir -p "$SRC/build/bin" && ln -sfn "$BUILD/normal/src/gatherd" "$SRC/build/bin/gatherd" &&
            ln -sfn "$BUILD/normal/tests/stub/gw_stub" "$SRC/build/bin/gw_stub"
        # beside fuzz and distcheck: the deploy tests mostly wait on the network
        { GW_CHECK_TIER=normal check normal check -j"$JOBS"; mark normal end; } &
        smoke=$!
    else
        mark normal end
    fi
    mark fuzz start
    FUZZ_OUT="$BUILD/fuzz" && mkdir -p "$FUZZ_OUT"
    FUZZ_SECONDS="${FUZZ_SECONDS:-5}" FUZZ_OUT="$FUZZ_OUT" GW_SRCDIR="$SRC" bash "$SRC/tests/fuzz/run.sh" \
        >"$BUILD/fuzz.out" 2>&1
    mark fuzz end
    if [ "${GW_SKIP_DISTCHECK:-0}" != 1 ] && [ -f "$BUILD/normal/Makefile" ]; then
        mark distcheck start
        GW_CHECK_TIER=smoke make -C "$BUILD/normal" -j"$JOBS" distcheck DISTCHECK_CONFIGURE_FLAGS=--enable-werror \
            >"$BUILD/distcheck.out" 2>&1
        echo $? >"$BUILD/distcheck.rc"
        mark distcheck end
    fi
    [ -z "$smoke" ] || wait "$smoke"
}

log "tiers asan, tsan, normal + fuzz + distcheck, side by side (outputs in $BUILD)"
lane_asan &
lane_tsan &
lane_normal &
wait

# --- the report ---------------------------------------------------------------------------

# Adds the counts of every test log under $1; a log without a summary line
# (a crash, a timeout) counts as one failure.
count_logs() {
    local dir="$1" f line
    for f in $(find "$dir/tests" -name '*.log' ! -name 'test-suite.log' | sort); do
        line="$(summary_of "$f")"
        if [ -z "$line" ] || ! add_summary "$line"; then
            echo "   $f: no summary line (crashed?)"
            failed=$((failed + 1))
            continue
        fi
        echo "   ${f#$dir/}: $line"
    done
}

# Seconds of lane $1 between marks $2 and $3 ("?" when one is missing).
span() {
    local a b
    a="$(awk -v k="$2" '$1 == k { print $2 }' "$BUILD/$1.times" 2>/dev/null | tail -n1)"
    b="$(awk -v k="$3" '$1 == k { print $2 }' "$BUILD/$1.times" 2>/dev/null | tail -n1)"
    if [ -n "$a" ] && [ -n "$b" ]; then echo $((b - a)); else echo "?"; fi
}

# report NAME WHAT: the counts of a make-check tier.
report() {
    local name="$1" what="$2" dir="$BUILD/$1" before=$failed
    log "$name: $what (build $(span "$name" start built) s, tests $(span "$name" built end) s)"
    if [ "$(cat "$BUILD/$name.build" 2>/dev/null)" != ok ]; then
        sed 's/^/   /' "$BUILD/$name.build" 2>/dev/null; failed=$((failed + 1)); return
    fi
    count_logs "$dir"
    local rc
    rc="$(cat "$BUILD/$name.rc" 2>/dev/null || echo 1)"
    if [ "$rc" -ne 0 ] && [ "$failed" -eq "$before" ]; then
        echo "   make check failed in $name build without a failing test:"; tail -n 30 "$dir/check.out"
        failed=$((failed + 1))
    fi
    if [ "$rc" -ne 0 ]; then
        echo "   make check failed in $name build; failing logs:"
        for f in $(grep -l -E ':test-result: (FAIL|ERROR)' "$dir"/tests/*/*.trs 2>/dev/null); do
            echo "---- ${f%.trs}.log"; grep -v '^ok - ' "${f%.trs}.log" | tail -n 60
        done
    fi
}

report asan "unit tests and every integration test under ASan + UBSan"
report tsan "the multi-worker integration tests under ThreadSanitizer (make check-tsan)"
report normal "unit tests, the normal tier and the deploy and README tests (GW_CHECK_TIER=normal)"

log "fuzz drivers (${FUZZ_SECONDS:-5} s each; $(span fuzz start end) s)"
grep -E '^(ok|FAIL) - ' "$BUILD/fuzz.out" 2>/dev/null | sed 's/^/   /'
line="$(summary_of "$BUILD/fuzz.out" 2>/dev/null)"
before=$failed
if [ -z "$line" ] || ! add_summary "$line"; then
    tail -n 20 "$BUILD/fuzz.out" 2>/dev/null; failed=$((failed + 1))
elif [ "$failed" -ne "$before" ]; then
    grep -v '^ok' "$BUILD/fuzz.out" | tail -n 40
fi

if [ "${GW_SKIP_DISTCHECK:-0}" != 1 ]; then
    log "make distcheck: unit tests and the smoke tier from the release tarball ($(span distcheck start end) s)"
    if [ "$(cat "$BUILD/distcheck.rc" 2>/dev/null || echo 1)" -eq 0 ]; then
        echo "   distcheck: ok"; passed=$((passed + 1))
    else
        tail -n 40 "$BUILD/distcheck.out" 2>/dev/null; echo "   distcheck: FAILED"; failed=$((failed + 1))
    fi
fi

log "wall time $(($(date +%s) - T0)) s after autoreconf"
total_line
[ "$failed" -eq 0 ]
