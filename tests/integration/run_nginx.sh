#!/bin/bash
# Integration tests of running under systemd and behind nginx (an automake TESTS entry):
# sd_notify, the systemd unit, a real nginx in front of two gatherd. Environment: GATHERD, GW_STUB
# (defaults: next to this script in the build tree), GW_SRCDIR.
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GATHERD:=$here/../../src/gatherd}"
: "${GW_STUB:=$here/../../tests/stub/gw_stub}"
export GATHERD GW_STUB PYTHONDONTWRITEBYTECODE=1
# Taken alone, as run_reload.sh does: wrk at full speed through nginx would
# starve timing-sensitive tests running in parallel under make -j.
exec flock -x "${TMPDIR:-/tmp}/gatherd-integration-$(id -u).lock" python3 "$here/test_nginx.py" "$@"
