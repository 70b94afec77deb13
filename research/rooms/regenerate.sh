#!/usr/bin/env bash
# Rebuild every artifact that depends on the bundled TinyWorld model, in dependency order.
# Run from the repository root with the course's venv active, on 2 otherwise idle cores.
# Times are from session 3 (2 free cores) or session 2 (shared cores), as noted.
set -euo pipefail

# 1. The model itself (about 55 min): writes tinyworld-model/ with evaluation.json.
python -m interplab.tinyworld.train --threads 2 --out tinyworld-model
rm -rf utils/interplab/weights/tinyworld/*
cp tinyworld-model/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,training.json,train_log.jsonl,evaluation.json,SHA256SUMS} \
   utils/interplab/weights/tinyworld/
interplab doctor --no-hub                      # every bundled file verifies

# 2. Chapter 02: tuned-lens translators (about 1 min).
python -m interplab.solutions.ch02_lenses

# 3. Chapter 03: the three shipped SAEs, then the sweep (a few minutes).
python -m interplab.solutions.ch03_saes
python -m interplab.solutions.ch03_saes --sweep
python -m interplab.solutions.ch03_saes --evaluate   # figures for the chapter's "What we found"

# 4. Chapter 04: transcoders, skip transcoders and SAE baselines for every MLP (about 35 min).
python -m interplab.solutions.ch04_transcoders
python -m interplab.solutions.ch04_transcoders --evaluate

# 5. Figures: evaluation for MODEL_CARD.md, then the benchmark report (full: about 6 min).
interplab evaluate
interplab bench                                # full run; rewrites BENCHMARKS.md and benchmarks.json

# 6. By hand: every chapter's "What we found" numbers (run each notebook), MODEL_CARD.md,
#    README figures, then the clean-clone CI run (`CI=true bash .ci/run`).
