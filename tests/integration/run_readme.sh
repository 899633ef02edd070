#!/bin/bash
# A newcomer following the README (an automake TESTS entry): the demo script
# and the nginx + wrk recipe, run as written in network namespaces of their
# own. Environment: GATHERD (only to tell a sanitizer build), GW_SRCDIR.
# Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GATHERD:=$here/../../src/gatherd}"
export GATHERD PYTHONDONTWRITEBYTECODE=1
# Shared lock: its ports are in namespaces of its own.
exec flock -s "${TMPDIR:-/tmp}/gatherd-integration-$(id -u).lock" python3 "$here/test_readme.py" "$@"
