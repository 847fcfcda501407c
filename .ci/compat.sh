#!/usr/bin/env bash
# The oldest supported transformers (4.57.6, the last 4.x) in a second virtual environment:
#   1. build (or reuse) that venv: torch 2.13.0 first (its CPU wheel lies on local disk; a bare
#      `torch` requirement would pull a multi-GB CUDA build), then transformers 4.57.6 and the other
#      dependencies from the package registry, then codegpt itself with --no-deps;
#   2. run the model, remote-code and hub tests there (huggingface_hub is then 0.x, as 4.57 needs),
#      one of them loading as remote code a folder that the newest transformers (the main
#      environment) saved;
#   3. the other way round: a folder saved under 4.57.6 loads as remote code under the newest.
#
# Environment: MAIN_PYTHON (interpreter with the newest transformers; default .venv/bin/python or
# python3), COMPAT_VENV (default .venv-compat), COMPAT_TRANSFORMERS (default 4.57.6), COMPAT_TESTS
# (default: the model, remote-code and hub tests).
set -euo pipefail
cd "$(dirname "$0")/.."

COMPAT_VENV="${COMPAT_VENV:-.venv-compat}"
COMPAT_TRANSFORMERS="${COMPAT_TRANSFORMERS:-4.57.6}"
COMPAT_TESTS="${COMPAT_TESTS:-tests/test_modeling.py tests/test_remote_code.py tests/test_hub.py}"
if [[ -z "${MAIN_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then MAIN_PYTHON=.venv/bin/python; else MAIN_PYTHON=python3; fi
fi
# Everything below is offline and must not touch the user's Hugging Face cache or token.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export HF_HOME="$scratch/hf-home" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TRANSFORMERS_VERBOSITY=error PIP_DISABLE_PIP_VERSION_CHECK=1
# Tiny test models: intra-op threads only spin-wait on a shared machine.
export OMP_NUM_THREADS=1

# pip's notes on the local indexes, progress bars and load reports only clutter the log: a step's
# output is shown when it fails.
quiet() {
    if ! "$@" > "$scratch/step.log" 2>&1; then
        cat "$scratch/step.log"
        return 1
    fi
}

start=$SECONDS
requirements=(
    "transformers==${COMPAT_TRANSFORMERS}"
    "accelerate>=1.0" "safetensors>=0.4.3" "numpy>=1.24" "tqdm>=4.66" "pillow>=10" "pytest>=8"
)
stamp="torch==2.13.0 ${requirements[*]}"
py="$COMPAT_VENV/bin/python"
if [[ -x "$py" && "$(cat "$COMPAT_VENV/.codegpt-compat" 2>/dev/null)" == "$stamp" ]]; then
    echo "compat: reusing $COMPAT_VENV ($stamp)"
else
    echo "compat: building $COMPAT_VENV ($stamp)"
    rm -rf "$COMPAT_VENV"
    python3 -m venv "$COMPAT_VENV"
    quiet "$py" -m pip install torch==2.13.0
    quiet "$py" -m pip install "${requirements[@]}"
    echo "$stamp" > "$COMPAT_VENV/.codegpt-compat"
fi
# Editable: the tests and the package then come from this checkout.
quiet "$py" -m pip install --no-deps -e .
"$py" -c 'import torch, transformers, huggingface_hub as h; print(f"compat: torch {torch.__version__}, transformers {transformers.__version__}, huggingface_hub {h.__version__}")'
echo "compat: environment ready after $((SECONDS - start)) s"

# A folder saved by the newest transformers, loaded by the compat run's remote-code test.
quiet "$MAIN_PYTHON" tests/test_remote_code.py write "$scratch/from-newest"
# shellcheck disable=SC2086  # COMPAT_TESTS is a list of paths
CODEGPT_FOREIGN_UPLOAD="$scratch/from-newest" "$py" -m pytest -p no:cacheprovider $COMPAT_TESTS

# And the other way round.
quiet "$py" tests/test_remote_code.py write "$scratch/from-compat"
"$MAIN_PYTHON" tests/test_remote_code.py check "$scratch/from-compat"
echo "compat: done in $((SECONDS - start)) s"
