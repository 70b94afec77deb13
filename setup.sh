#!/usr/bin/env bash
# One-command set-up for interplab on a fresh machine:  bash setup.sh
#
# - Creates a virtual environment in .venv (unless one is already active, e.g. conda or
#   your own venv, which is then used as is).
# - Installs a CPU build of torch (pytorch.org's CPU wheels: ~200 MB instead of the
#   multi-GB CUDA build an unpinned `pip install torch` picks on Linux). If torch is
#   already installed in a version the course supports, it is kept.
# - Installs interplab itself, editable, with JupyterLab and the test tools.
#
# Options: INTERPLAB_VENV=path (default .venv), INTERPLAB_TORCH_INDEX=url (default the
# CPU wheels; set to "" to take torch from your usual index, e.g. for a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
    PY=$(command -v python)
    echo "interplab setup: using the active environment ($PY)"
else
    VENV=${INTERPLAB_VENV:-.venv}
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "interplab setup: creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
fi

PIP=("$PY" -m pip --disable-pip-version-check)
TORCH_SPEC="torch==2.13.*"
TORCH_INDEX=${INTERPLAB_TORCH_INDEX-https://download.pytorch.org/whl/cpu}

if "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2, 4) <= v < (2, 15) else 1)' 2>/dev/null; then
    echo "interplab setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    echo "interplab setup: installing $TORCH_SPEC (CPU build)"
    if [[ -z "$TORCH_INDEX" ]] || ! "${PIP[@]}" install --retries 0 --timeout 20 --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC"; then
        "${PIP[@]}" install "$TORCH_SPEC"
    fi
fi

echo "interplab setup: installing interplab with its lab and test extras"
"${PIP[@]}" install -e ".[dev]"

echo
echo "interplab is installed. Next:"
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then
    echo "  $VENV/bin/interplab doctor     # check the installation"
    echo "  $VENV/bin/interplab lab        # open the course"
else
    echo "  interplab doctor     # check the installation"
    echo "  interplab lab        # open the course"
fi
