#!/bin/bash
# The whole test suite, as CI runs it (.ci/run) and as the README tells a
# newcomer to run it on a fresh Debian 12 machine:
#   1. install the Debian packages it needs (scripts/install-deps.sh)
#   2. normal build with -Werror: make check (unit + integration tests)
#   3. AddressSanitizer + UndefinedBehaviorSanitizer build: make check again
#   4. the fuzz drivers of tests/fuzz, a short bounded run each
#   5. make distcheck (the release tarball builds and passes its tests)
# Every test program ends with "N passed, N failed" (", N skipped" appended
# when it skipped tests); the last line of this script is the sum over all
# of them, in the same form. Exit status is non-zero on any failure.
set -uo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${GW_BUILD_DIR:-$SRC/build}"
JOBS="$(nproc 2>/dev/null || echo 2)"
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

# build NAME CONFIGURE-FLAGS...
build_and_check() {
    local name="$1"; shift
    local dir="$BUILD/$name"
    log "$name build: configure $*"
    rm -rf "$dir" && mkdir -p "$dir"
    if ! (cd "$dir" && "$SRC/configure" -q "$@" >configure.out 2>&1); then
        cat "$dir/configure.out"; failed=$((failed + 1)); return
    fi
    if ! make -C "$dir" -j"$JOBS" >"$dir/make.out" 2>&1; then
        grep -E 'error|warning' "$dir/make.out" | head -40; failed=$((failed + 1)); return
    fi
    log "$name build: make check"
    make -C "$dir" -j"$JOBS" check >"$dir/check.out" 2>&1
    local rc=$? before=$failed
    count_logs "$dir"
    if [ $rc -ne 0 ] && [ "$failed" -eq "$before" ]; then
        echo "   make check failed in $name build without a failing test:"; tail -n 30 "$dir/check.out"
        failed=$((failed + 1))
    fi
    if [ $rc -ne 0 ]; then
        echo "   make check failed in $name build; failing logs:"
        for f in $(grep -l -E ':test-result: (FAIL|ERROR)' "$dir"/tests/*/*.trs 2>/dev/null); do
            echo "---- ${f%.trs}.log"; grep -v '^ok - ' "${f%.trs}.log" | tail -n 60
        done
    fi
}

build_and_check normal --enable-werror
build_and_check asan --enable-werror --enable-sanitizers CFLAGS="-O1 -g"

log "fuzz drivers (${FUZZ_SECONDS:-20} s each)"
FUZZ_OUT="$BUILD/fuzz" && rm -rf "$FUZZ_OUT" && mkdir -p "$FUZZ_OUT"
FUZZ_OUT="$FUZZ_OUT" GW_SRCDIR="$SRC" bash "$SRC/tests/fuzz/run.sh" >"$BUILD/fuzz.out" 2>&1
grep -E '^(ok|FAIL) - ' "$BUILD/fuzz.out" | sed 's/^/   /'
line="$(summary_of "$BUILD/fuzz.out")"
before=$failed
if [ -z "$line" ] || ! add_summary "$line"; then
    tail -n 20 "$BUILD/fuzz.out"; failed=$((failed + 1))
elif [ "$failed" -ne "$before" ]; then
    grep -v '^ok' "$BUILD/fuzz.out" | tail -n 40
fi

if [ "${GW_SKIP_DISTCHECK:-0}" != 1 ]; then
    log "make distcheck"
    if make -C "$BUILD/normal" -j"$JOBS" distcheck DISTCHECK_CONFIGURE_FLAGS=--enable-werror >"$BUILD/distcheck.out" 2>&1; then
        echo "   distcheck: ok"; passed=$((passed + 1))
    else
        tail -n 40 "$BUILD/distcheck.out"; echo "   distcheck: FAILED"; failed=$((failed + 1))
    fi
fi

total_line
[ "$failed" -eq 0 ]
