#!/bin/bash
# The framing oracle (an automake TESTS entry): valid and hostile client
# requests through a proxy route, every byte the backend gets parsed by a
# strict RFC 9112 parser (test_framing.py). Environment: GATHERD (default:
# next to this script in the build tree), GW_SRCDIR, GW_FUZZ_SEED,
# GW_FUZZ_CASES. Extra arguments select tests by name substring.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GATHERD:=$here/../../src/gatherd}"
export GATHERD PYTHONDONTWRITEBYTECODE=1
# Shared with the other integration tests; run_reload.sh's load tests take it alone.
exec flock -s "${TMPDIR:-/tmp}/gatherd-integration-$(id -u).lock" python3 "$here/test_framing.py" "$@"
