#!/bin/bash
# A newcomer following the README (an automake TESTS entry): the demo script
# and the nginx + wrk recipe, run as written in network namespaces of their
# own. Environment: GATHERD (only to tell a sanitizer build), GW_SRCDIR.
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# default: the build this script is in, else the one the set-up commands link (build/bin)
[ -n "${GATHERD:-}" ] || { GATHERD="$here/../../src/gatherd"; [ -x "$GATHERD" ] || GATHERD="$here/../../build/bin/gatherd"; }
export GATHERD PYTHONDONTWRITEBYTECODE=1
# Tests coordinate with those of other runners themselves (gwtest.py: a shared lock per
# test, an exclusive one for load tests), so make check -jN is safe.
exec python3 "$here/test_readme.py" "$@"
