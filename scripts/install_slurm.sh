#!/usr/bin/env bash
# Install Debian's Slurm and munge (slurm-wlm, munge; iproute2 for `ip netns`) for tests/test_slurm_vllm.py, which makes
# a real two-node Slurm cluster in network namespaces (tests/slurm_cluster.py). Called by
# scripts/setup.sh; safe to run on its own. Does nothing (and says why) where the packages are
# already there, where it is not root, or where there is no apt-get: the test then skips with
# that reason, and fails instead under CI=true P2PKV_REQUIRE_E2E=1. P2PKV_SKIP_APT=1 skips it.
# Never fails the caller: a failed apt-get is reported, and the test reports the rest.
set -uo pipefail

log() { echo "[install_slurm] $*"; }

need=()
for tool in slurmctld slurmd sbatch munged ip; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if (( ${#need[@]} == 0 )); then
    log "slurm-wlm and munge already installed ($(slurmd -V 2>/dev/null))"
    exit 0
fi
if [[ "${P2PKV_SKIP_APT:-0}" == "1" ]]; then
    log "P2PKV_SKIP_APT=1: not installing slurm-wlm munge (missing: ${need[*]})"
    exit 0
fi
if [[ "$(id -u)" != "0" ]]; then
    log "not root: not installing slurm-wlm munge (missing: ${need[*]}); the Slurm test skips"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "no apt-get: not installing slurm-wlm munge (missing: ${need[*]}); the Slurm test skips"
    exit 0
fi
log "installing slurm-wlm munge (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
if apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge iproute2; then
    log "installed: $(slurmd -V 2>/dev/null)"
else
    log "WARNING: apt-get install slurm-wlm munge failed; the Slurm test will say what is missing"
fi
exit 0
