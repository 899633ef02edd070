#!/bin/bash
# Integration tests of configuration reload and graceful stop under load (an automake TESTS entry), against
# the real daemon and the stub backend. Environment: GATHERD, GW_STUB
# (defaults: next to this script in the build tree), GW_SRCDIR.
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GATHERD:=$here/../../src/gatherd}"
: "${GW_STUB:=$here/../../tests/stub/gw_stub}"
export GATHERD GW_STUB PYTHONDONTWRITEBYTECODE=1
# The load tests (wrk at full speed) take the lock alone, so that they do not
# starve timing-sensitive tests running in parallel under make -j; the others share it.
exec flock -x "${TMPDIR:-/tmp}/gatherd-integration-$(id -u).lock" python3 "$here/test_reload.py" "$@"
