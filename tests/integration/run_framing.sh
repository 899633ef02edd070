#!/bin/bash
# The framing oracle (an automake TESTS entry): valid and hostile client
# requests through a proxy route, every byte the backend gets parsed by a
# strict RFC 9112 parser (test_framing.py). Environment: GATHERD (default:
# next to this script in the build tree), GW_SRCDIR, GW_FUZZ_SEED,
# GW_FUZZ_CASES. Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# default: the build this script is in, else the one the set-up commands link (build/bin)
[ -n "${GATHERD:-}" ] || { GATHERD="$here/../../src/gatherd"; [ -x "$GATHERD" ] || GATHERD="$here/../../build/bin/gatherd"; }
export GATHERD PYTHONDONTWRITEBYTECODE=1
# Tests coordinate with those of other runners themselves (gwtest.py: a shared lock per
# test, an exclusive one for load tests), so make check -jN is safe.
exec python3 "$here/test_framing.py" "$@"
