#!/usr/bin/env bash
# The laptop demo: a p2pkv directory and two vLLM CPU instances on loopback, a long-document
# QA on SmolLM2-135M, and a table of time-to-first-token (A cold, B remote hit, B local hit).
# Sets up the environment on the first run (several minutes), then takes about 2-3 minutes.
# Ctrl-C stops everything it started. Extra args go to `p2pkv demo` (see --help).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${P2PKV_VENV:-$REPO/.venv}"
"$REPO/scripts/setup.sh"
cd "$REPO"
exec "$VENV/bin/python" -m p2pkv demo "$@"
