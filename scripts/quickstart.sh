#!/usr/bin/env bash
# The main job, from a fresh clone: install, train a Swahili+Hausa tokenizer, tokenize the corpus,
# pretrain a small model, report val bits per byte against a unigram baseline, and sample from it.
# Under 15 minutes on a 2-core CPU; with a CUDA GPU it trains the 39M preset instead.
#   bash scripts/quickstart.sh                  (data from ../shared/data, or LILLM_DATA_DIR)
#   STEPS=2000 PRESET=small bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh   # outside a virtual environment: make and use .venv

echo "== 1/5 install"
$PY -m pip install -q -e .

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  PRESET=${PRESET:-lillm-39m}; STEPS=${STEPS:-3000}; SEQ=${SEQ:-512}; BATCH_TOKENS=${BATCH_TOKENS:-131072}
  MICRO=${MICRO:-32}; EXTRA=(--compile)
else
  PRESET=${PRESET:-small}; STEPS=${STEPS:-300}; SEQ=${SEQ:-128}; BATCH_TOKENS=${BATCH_TOKENS:-8192}
  MICRO=${MICRO:-16}; EXTRA=()
fi
OUT=${OUT:-out}
DATA_ARGS=()
[ -n "${LILLM_DATA_DIR:-}" ] && DATA_ARGS=(--data-dir "$LILLM_DATA_DIR")

echo "== 2/5 tokenizer (byte-level BPE, 8,192 tokens, Swahili + Hausa)"
$PY train_tokenizer.py --langs swa hau --vocab-size 8192 --out "$OUT/tokenizer/tokenizer.json" --overwrite "${DATA_ARGS[@]}"

echo "== 3/5 token bins"
$PY data/prepare_pretrain.py --tokenizer "$OUT/tokenizer/tokenizer.json" --langs swa hau --out "$OUT/data" \
  --overwrite --workers 2 "${DATA_ARGS[@]}"

echo "== 4/5 pretrain preset $PRESET for $STEPS steps"
$PY pretrain.py --data "$OUT/data" --out "$OUT/pretrain" --overwrite --preset "$PRESET" --max-steps "$STEPS" \
  --seq-len "$SEQ" --global-batch-tokens "$BATCH_TOKENS" --micro-batch "$MICRO" --lr 2e-3 --warmup-steps 50 \
  --eval-every $((STEPS / 4)) --save-every $((STEPS / 2)) --eval-batches 40 "${EXTRA[@]}" | tee "$OUT/pretrain.summary"

CKPT=$(ls -d "$OUT"/pretrain/step_* | sort | tail -n 1)
echo "== 5/5 samples from $CKPT"
$PY inference.py "$CKPT" --prompt "Rais wa Tanzania" --prompt "Watoto wa shule" --prompt "Gwamnatin tarayya" \
  --prompt "A jihar Kano" --max-new-tokens 40 --temperature 0.8 --top-k 50

echo
echo "val bits per byte (model vs unigram baseline):"
tail -n 2 "$OUT/pretrain.summary" | head -n 1
echo "checkpoint: $CKPT   loss plot: $OUT/pretrain/loss.png   log: $OUT/pretrain/log.jsonl"
