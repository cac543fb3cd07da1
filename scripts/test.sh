#!/usr/bin/env bash
# Run the p2pkv test suite: sets up the environment first (idempotent, seconds once done),
# then runs pytest, end-to-end tests on real vLLM (CPU) included. Extra args go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${P2PKV_VENV:-$REPO/.venv}"
"$REPO/scripts/setup.sh"
cd "$REPO"
exec "$VENV/bin/python" -m pytest -ra "$@"
