#!/bin/bash
# Integration tests of gatherd (an automake TESTS entry).
# Environment: GATHERD (the binary; default: ../../src/gatherd next to this
# script), GW_SRCDIR (source tree root), ASAN_OPTIONS/UBSAN_OPTIONS (passed on).
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# default: the build this script is in, else the one the set-up commands link (build/bin)
[ -n "${GATHERD:-}" ] || { GATHERD="$here/../../src/gatherd"; [ -x "$GATHERD" ] || GATHERD="$here/../../build/bin/gatherd"; }
export GATHERD
export PYTHONDONTWRITEBYTECODE=1
# Tests coordinate with those of other runners themselves (gwtest.py: a shared lock per
# test, an exclusive one for load tests), so make check -jN is safe.
exec python3 "$here/test_http.py" "$@"
