#!/bin/bash
# Integration tests of large backend answers: the thread pool, the loop-stall
# probe and the response memory budget (an automake TESTS entry), against the
# real daemon and the stub backend. Environment: GATHERD, GW_STUB (defaults:
# next to this script in the build tree), GW_SRCDIR.
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GATHERD:=$here/../../src/gatherd}"
: "${GW_STUB:=$here/../../tests/stub/gw_stub}"
export GATHERD GW_STUB PYTHONDONTWRITEBYTECODE=1
# These tests keep both CPUs busy parsing 8 MB answers and bound the daemon's
# stalls: they take the lock alone, like run_reload.sh's load tests, so that
# they neither starve nor are starved by the tests running in parallel.
exec flock -x "${TMPDIR:-/tmp}/gatherd-integration-$(id -u).lock" python3 "$here/test_stall.py" "$@"
