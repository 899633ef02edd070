#!/bin/bash
# Integration tests of the cache and coalescing of aggregate calls (an automake TESTS entry), against
# the real daemon and the stub backend. Environment: GATHERD, GW_STUB
# (defaults: next to this script in the build tree), GW_SRCDIR.
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# default: the build this script is in, else the one the set-up commands link (build/bin)
[ -n "${GATHERD:-}" ] || { GATHERD="$here/../../src/gatherd"; [ -x "$GATHERD" ] || GATHERD="$here/../../build/bin/gatherd"; }
[ -n "${GW_STUB:-}" ] || { GW_STUB="$here/../../tests/stub/gw_stub"; [ -x "$GW_STUB" ] || GW_STUB="$here/../../build/bin/gw_stub"; }
export GATHERD GW_STUB PYTHONDONTWRITEBYTECODE=1
# Tests coordinate with those of other runners themselves (gwtest.py: a shared lock per
# test, an exclusive one for load tests), so make check -jN is safe.
exec python3 "$here/test_cache.py" "$@"
