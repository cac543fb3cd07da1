#!/usr/bin/env bash
# Install LMCache 0.5.6 into the p2pkv venv, only to compare against it in `p2pkv bench ttft`
# (configs lmcache and lmcache-shm). Never a p2pkv dependency. Its own dependencies are left
# out on purpose: a full install downgrades numpy and protobuf and pulls CuPy. Checks
# afterwards that torch, numpy and protobuf are the versions they were before.
# Env: P2PKV_VENV (default <repo>/.venv).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${P2PKV_VENV:-$REPO/.venv}/bin/python"
versions() { "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|numpy|protobuf) ' || true; }
before="$(versions)"
"$PY" -m pip install --no-deps lmcache==0.5.6
"$PY" -m pip install aiofile aiofiles caio sortedcontainers redis nvtx
after="$(versions)"
if [[ "$before" != "$after" ]]; then
    echo "install_lmcache: versions changed:"; echo "before: $before"; echo "after: $after"; exit 1
fi
echo "LMCache installed; run benches with LMCACHE_TRACK_USAGE=false (p2pkv bench ttft sets it)"
