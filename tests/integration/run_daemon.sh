#!/bin/bash
# Integration tests of the daemon behaviour (-d, the pid file, "user"/"group", logrotate,
# RLIMIT_NOFILE) (an automake TESTS entry), against the real daemon.
# Environment: GATHERD (default: next to this script in the build tree), GW_SRCDIR.
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# default: the build this script is in, else the one the set-up commands link (build/bin)
[ -n "${GATHERD:-}" ] || { GATHERD="$here/../../src/gatherd"; [ -x "$GATHERD" ] || GATHERD="$here/../../build/bin/gatherd"; }
export GATHERD PYTHONDONTWRITEBYTECODE=1
# Shared lock: no load test here.
# Tests coordinate with those of other runners themselves (gwtest.py: a shared lock per
# test, an exclusive one for load tests), so make check -jN is safe.
exec python3 "$here/test_daemon.py" "$@"
