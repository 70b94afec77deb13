#!/usr/bin/env bash
# Set-up only, for those who want it as a separate step:  bash setup.sh   (the same as ./course setup)
#
# `./course lab` and `./course test` run the same set-up on their own when it is needed, so most people
# never call this. It creates a virtual environment in .venv (unless a virtualenv or a conda environment
# other than conda's base is active: then that one is used), installs a CPU build of torch (~200 MB
# instead of the multi-GB CUDA build an unpinned `pip install torch` picks on Linux; an installed torch
# 2.4 to 2.14 is kept) and interplab itself, editable, with JupyterLab and the test tools. Run again, it
# checks the environment and repairs it only if something is missing or pyproject.toml changed.
#
# Options: --force (run the install steps even if the environment looks fine); INTERPLAB_VENV=path
# (default .venv), INTERPLAB_TORCH_INDEX=url (default the CPU wheels; "" takes torch from your usual
# index, e.g. for a CUDA build), PYTHON=python3.11 (the Python that creates the environment).
# The logic lives in ./course (plain Python, no dependencies).
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" course setup "$@"
