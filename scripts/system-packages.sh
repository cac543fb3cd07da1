#!/usr/bin/env bash
# Install the Debian packages that tests and benches drive for real (prometheus; nginx, the
# round-robin baseline of `p2pkv bench serve`), where this process can: as root, or with
# passwordless sudo, on a system with apt-get. Where it cannot, it says why and exits 0: the
# tests that need a package then skip with that reason, except under CI (CI=true,
# P2PKV_REQUIRE_E2E=1), where they fail.
# A package whose binary is already on PATH is skipped, so a second run costs nothing.
# Services are never started by the install (policy-rc.d denies it): the tests start their own
# processes on loopback with ports of their own.
# Env: P2PKV_SKIP_APT=1 skips this step.
set -euo pipefail

log() { echo "[system-packages] $*"; }

# package:binary pairs
PACKAGES=("prometheus:prometheus" "nginx-light:nginx")

if [[ "${P2PKV_SKIP_APT:-0}" == "1" ]]; then
    log "P2PKV_SKIP_APT=1: skipping"; exit 0
fi
missing=()
for entry in "${PACKAGES[@]}"; do
    command -v "${entry#*:}" >/dev/null 2>&1 || missing+=("${entry%%:*}")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    log "already installed: ${PACKAGES[*]%%:*}"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "no apt-get here: not installing ${missing[*]} (the tests that need them will skip)"
    exit 0
fi
if [[ "$(id -u)" == "0" ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    log "not root and no passwordless sudo: not installing ${missing[*]} (the tests that need" \
        "them will skip; install them with: apt-get install ${missing[*]})"
    exit 0
fi

POLICY=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    made_policy=1
fi
cleanup() { [[ $made_policy == 1 ]] && "${SUDO[@]}" rm -f "$POLICY"; return 0; }
trap cleanup EXIT

log "installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
for entry in "${PACKAGES[@]}"; do
    command -v "${entry#*:}" >/dev/null 2>&1 || { log "ERROR: ${entry%%:*} installed but" \
        "${entry#*:} is not on PATH"; exit 1; }
done
log "installed ${missing[*]}"
