#!/usr/bin/env bash
# Prefill/decode disaggregation on one machine (CPU, TCP): a p2pkv directory, a prefill and a
# decode vLLM instance behind `p2pkv router`, then one plain instance serving the same
# requests; prints TTFT and inter-token latency for both. xPyD: --prefill X --decode Y.
# Sets up the environment on the first run (several minutes), then takes about 5 minutes.
# Extra args go to `p2pkv bench disagg` (see --help).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${P2PKV_VENV:-$REPO/.venv}"
if [[ -z "${P2PKV_SKIP_SETUP:-}" ]]; then "$REPO/scripts/setup.sh"; fi
cd "$REPO"
exec "$VENV/bin/python" -m p2pkv bench disagg "$@"
