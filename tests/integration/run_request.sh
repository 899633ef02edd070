#!/bin/bash
# Integration tests of the client (request) side (an automake TESTS entry):
# lengths, hosts, half-closed clients, the request body memory budget,
# against the real daemon and the strict backend of strict_http.py.
# Environment: GATHERD (default: next to this script in the build tree),
# GW_SRCDIR. Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# default: the build this script is in, else the one the set-up commands link (build/bin)
[ -n "${GATHERD:-}" ] || { GATHERD="$here/../../src/gatherd"; [ -x "$GATHERD" ] || GATHERD="$here/../../build/bin/gatherd"; }
export GATHERD PYTHONDONTWRITEBYTECODE=1
# Tests coordinate with those of other runners themselves (gwtest.py: a shared lock per
# test, an exclusive one for load tests), so make check -jN is safe.
exec python3 "$here/test_request.py" "$@"
