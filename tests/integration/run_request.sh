#!/bin/bash
# Integration tests of the client (request) side (an automake TESTS entry):
# lengths, hosts, half-closed clients, the request body memory budget,
# against the real daemon and the strict backend of strict_http.py.
# Environment: GATHERD (default: next to this script in the build tree),
# GW_SRCDIR. Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GATHERD:=$here/../../src/gatherd}"
export GATHERD PYTHONDONTWRITEBYTECODE=1
# Shared with the other integration tests; run_reload.sh's load tests take it alone.
exec flock -s "${TMPDIR:-/tmp}/gatherd-integration-$(id -u).lock" python3 "$here/test_request.py" "$@"
