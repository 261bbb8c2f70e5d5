#!/usr/bin/env bash
# One road, end to end, with the settings the README publishes, into a run folder you name.
#
#   bash scripts/recipe.sh --road scratch --out runs/scratch            # CPU or GPU, chosen by --device auto
#   bash scripts/recipe.sh --road shrink --out runs/shrink --device cuda
#   bash scripts/recipe.sh --road scratch --out /tmp/r --tiny            # seconds: every stage on a tiny model
#   bash scripts/recipe.sh --road shrink --out /tmp/r --dry-run          # print the commands, run nothing
#
# Roads:
#   scratch  tokenizer -> token bins -> pretrain -> SFT on translation -> SFT on every task -> evaluate
#   shrink   tokenizer -> token bins -> pretrain a larger teacher -> shrink it (importance-based width
#            pruning, influence-based layer choice, tying, distillation healing; scripts/shrink.py)
#            -> the same two SFT stages -> evaluate
# Settings by device: on a GPU, lillm-39m from scratch, or lillm-300m shrunk to the lillm-39m shape
# (about 40M parameters); on the CPU, small (3.1M), or small-teacher (8.0M) shrunk to about small's
# size. --tiny uses the tiny preset, a slice of the data and a few steps: it checks the plumbing,
# not the quality. Every setting can be overridden from the environment (the names in `settings`).
# The folder gets each stage's output, recipe.log (one JSON line per stage with its wall time) and,
# from scripts/evaluate.py, eval/eval_test.md (the challenge's score) and eval/submission_test.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh   # outside a virtual environment: make and use .venv (PYTHON=... chooses)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lillm importable from a clone, installed or not

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "recipe.sh: $*" >&2; exit 2; }

ROAD="" OUT="" DEVICE=auto TINY=0 DRY=0 DATA_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --road) ROAD=${2:-}; shift 2 ;;
    --out) OUT=${2:-}; shift 2 ;;
    --device) DEVICE=${2:-}; shift 2 ;;
    --data-dir) DATA_ARGS=(--data-dir "${2:-}"); shift 2 ;;
    --tiny) TINY=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
case "$ROAD" in scratch|shrink) ;; *) die "--road must be scratch or shrink (got '${ROAD}')" ;; esac
[ -n "$OUT" ] || die "--out RUN_FOLDER is required (a new or empty folder)"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ] && [ "$DRY" = 0 ]; then
  die "--out $OUT exists and is not empty; nothing is overwritten: choose a new folder"
fi
case "$DEVICE" in
  auto) if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
          DEVICE=cuda; else DEVICE=cpu; fi ;;
  cpu|cuda) ;;
  *) die "--device must be auto, cpu or cuda (got '$DEVICE')" ;;
esac
[ -n "${LILLM_DATA_DIR:-}" ] && [ ${#DATA_ARGS[@]} -eq 0 ] && DATA_ARGS=(--data-dir "$LILLM_DATA_DIR")

# ---- settings -------------------------------------------------------------------------------------
if [ "$TINY" = 1 ]; then
  : "${PRESET:=tiny}" "${TEACHER:=tiny}" "${VOCAB:=512}" "${TOK_DOCS:=200}" "${CORPORA:=afrisenti-swa-train mafand-hau-train}"
  : "${TOK_LANGS:=swa hau eng}" "${EVAL_ARGS:=--no-repeat-ngram 3 --length-ratio 2 --scoring batch-prior}"
  : "${PRETRAIN_ARGS:=--optimizer muon --schedule wsd}" "${SFT_ARGS:=--schedule wsd}"
  : "${STEPS:=4}" "${SEQ:=64}" "${BATCH_TOKENS:=512}" "${MICRO:=8}" "${LR:=2e-3}" "${WARMUP:=1}"
  : "${SFT_LIMIT:=12}" "${SFT_MT_STEPS:=2}" "${SFT_ALL_STEPS:=2}" "${SFT_BATCH:=4}" "${SFT_MICRO:=4}" "${SFT_LR:=1e-3}" "${SFT_WARMUP:=1}"
  : "${EVAL_LIMIT:=3}" "${MAX_NEW:=8}" "${EXTRA:=}"
  : "${SHRINK:=--d-model 32 --d-ff 88 --layers 1}" "${HEAL_STEPS:=2}" "${HEAL_DOCS:=40}" "${HEAL_BATCH:=8}"
elif [ "$DEVICE" = cuda ]; then
  : "${PRESET:=lillm-39m}" "${TEACHER:=lillm-300m}" "${VOCAB:=8192}" "${TOK_DOCS:=0}" "${CORPORA:=}"
  : "${TOK_LANGS:=swa hau eng}" "${EVAL_ARGS:=--no-repeat-ngram 3 --length-ratio 2 --scoring batch-prior}"
  : "${PRETRAIN_ARGS:=}" "${SFT_ARGS:=}"
  : "${STEPS:=600}" "${SEQ:=512}" "${BATCH_TOKENS:=131072}" "${MICRO:=32}" "${LR:=2e-3}" "${WARMUP:=100}"
  : "${SFT_LIMIT:=}" "${SFT_MT_STEPS:=300}" "${SFT_ALL_STEPS:=600}" "${SFT_BATCH:=64}" "${SFT_MICRO:=32}" "${SFT_LR:=3e-4}" "${SFT_WARMUP:=30}"
  : "${EVAL_LIMIT:=0}" "${MAX_NEW:=128}" "${EXTRA:=--compile}"
  : "${SHRINK:=--d-model 512 --d-ff 1408 --layers 12}" "${HEAL_STEPS:=500}" "${HEAL_DOCS:=}" "${HEAL_BATCH:=64}"
else
  # the measured CPU recipe (docs/QUALITY.md): English in the tokenizer (the translations' source side),
  # most of the minutes on translation SFT, warmup-stable-decay, Muon in pretraining, classification by
  # batch calibration, n-gram bans in decoding
  : "${PRESET:=small}" "${TEACHER:=small-teacher}" "${VOCAB:=8192}" "${TOK_DOCS:=0}" "${CORPORA:=}"
  : "${TOK_LANGS:=swa hau eng}" "${EVAL_ARGS:=--no-repeat-ngram 3 --length-ratio 2 --scoring batch-prior}"
  : "${PRETRAIN_ARGS:=--optimizer muon --schedule wsd}" "${SFT_ARGS:=--schedule wsd}"
  : "${STEPS:=400}" "${SEQ:=128}" "${BATCH_TOKENS:=8192}" "${MICRO:=16}" "${LR:=2e-3}" "${WARMUP:=50}"
  : "${SFT_LIMIT:=}" "${SFT_MT_STEPS:=700}" "${SFT_ALL_STEPS:=200}" "${SFT_BATCH:=16}" "${SFT_MICRO:=16}" "${SFT_LR:=1e-3}" "${SFT_WARMUP:=10}"
  : "${EVAL_LIMIT:=200}" "${MAX_NEW:=96}" "${EXTRA:=}"
  : "${SHRINK:=--d-model 192 --d-ff 512 --layers 4}" "${HEAL_STEPS:=100}" "${HEAL_DOCS:=2000}" "${HEAL_BATCH:=32}"
fi
read -r -a EXTRA_ARGS <<< "$EXTRA"
read -r -a TOK_LANG_LIST <<< "$TOK_LANGS"
read -r -a EVAL_ARG_LIST <<< "$EVAL_ARGS"
read -r -a PRETRAIN_ARG_LIST <<< "$PRETRAIN_ARGS"
read -r -a SFT_ARG_LIST <<< "$SFT_ARGS"
read -r -a SHRINK_ARGS <<< "$SHRINK"
read -r -a CORPORA_LIST <<< "$CORPORA"
TOK_ARGS=(); [ "$TOK_DOCS" != 0 ] && TOK_ARGS=(--max-docs "$TOK_DOCS")
BIN_ARGS=(--workers 2); [ ${#CORPORA_LIST[@]} -gt 0 ] && BIN_ARGS+=(--corpora "${CORPORA_LIST[@]}" --val-fraction 0.05)
SFT_DATA_ARGS=(); [ -n "$SFT_LIMIT" ] && SFT_DATA_ARGS=(--limit "$SFT_LIMIT")
HEAL_ARGS=(); [ -n "$HEAL_DOCS" ] && HEAL_ARGS=(--max-docs "$HEAL_DOCS")

# ---- running and timing each stage ----------------------------------------------------------------------
START=$(date +%s)
stage() {  # stage NAME COMMAND...: print it, run it (unless --dry-run), log its wall time as a JSON line
  local name=$1; shift
  echo "== $name"
  echo "+ $*"
  [ "$DRY" = 1 ] && return 0
  local t0; t0=$(date +%s)
  "$@"
  printf '{"stage": "%s", "seconds": %s, "road": "%s", "device": "%s", "tiny": %s}\n' \
    "$name" "$(( $(date +%s) - t0 ))" "$ROAD" "$DEVICE" "$TINY" >> "$OUT/recipe.log"
}
if [ "$DRY" = 0 ] && ! $PY -c "import lillm.train" 2>/dev/null; then
  echo "== installing lillm into $($PY -c 'import sys; print(sys.prefix)')"
  $PY -m pip install -q -e .
fi
[ "$DRY" = 1 ] || mkdir -p "$OUT"
echo "road $ROAD on $DEVICE$([ "$TINY" = 1 ] && echo ' (tiny)') into $OUT"

stage tokenizer $PY train_tokenizer.py --langs "${TOK_LANG_LIST[@]}" --vocab-size "$VOCAB" --out "$OUT/tokenizer/tokenizer.json" \
  "${TOK_ARGS[@]}" "${DATA_ARGS[@]}"
stage bins $PY data/prepare_pretrain.py --tokenizer "$OUT/tokenizer/tokenizer.json" --langs swa hau --out "$OUT/data" \
  "${BIN_ARGS[@]}" "${DATA_ARGS[@]}"
PRETRAIN=(--data "$OUT/data" --max-steps "$STEPS" --seq-len "$SEQ" --global-batch-tokens "$BATCH_TOKENS"
          --micro-batch "$MICRO" --lr "$LR" --warmup-steps "$WARMUP" --eval-every $(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))
          --save-every "$STEPS" --eval-batches 20 --device "$DEVICE" "${EXTRA_ARGS[@]}" "${PRETRAIN_ARG_LIST[@]}")
if [ "$ROAD" = scratch ]; then
  stage pretrain $PY pretrain.py --preset "$PRESET" --out "$OUT/pretrain" "${PRETRAIN[@]}"
  BASE="$OUT/pretrain"
else
  stage teacher $PY pretrain.py --preset "$TEACHER" --out "$OUT/teacher" "${PRETRAIN[@]}"
  stage shrink $PY scripts/shrink.py --source "$OUT/teacher" --out "$OUT/shrunk" --langs swa hau "${SHRINK_ARGS[@]}" \
    --layer-choice influence --importance activation --tie mean --distill --heal-steps "$HEAL_STEPS" \
    --seq-len "$SEQ" --batch "$HEAL_BATCH" --micro-batch "$MICRO" --lr "$LR" --warmup-steps "$WARMUP" \
    --device "$DEVICE" "${HEAL_ARGS[@]}" "${DATA_ARGS[@]}"
  BASE="$OUT/shrunk"
fi
stage sft-data $PY data/prepare_sft.py --out "$OUT/sft" --tasks translation sentiment nli news "${SFT_DATA_ARGS[@]}" \
  "${DATA_ARGS[@]}"
SFT=(--data "$OUT/sft" --batching pack --global-batch "$SFT_BATCH" --micro-batch "$SFT_MICRO" --lr "$SFT_LR"
     --warmup-steps "$SFT_WARMUP" --device "$DEVICE" "${EXTRA_ARGS[@]}" "${SFT_ARG_LIST[@]}")
stage sft-translation $PY sft_train.py --init-from "$BASE" --tasks translation --out "$OUT/sft_mt" \
  --max-steps "$SFT_MT_STEPS" --eval-every "$SFT_MT_STEPS" --save-every "$SFT_MT_STEPS" "${SFT[@]}"
stage sft-all $PY sft_train.py --init-from "$OUT/sft_mt" --out "$OUT/sft_all" \
  --max-steps "$SFT_ALL_STEPS" --eval-every "$SFT_ALL_STEPS" --save-every "$SFT_ALL_STEPS" "${SFT[@]}"
stage evaluate $PY scripts/evaluate.py --checkpoint "$OUT/sft_all" --data "$OUT/sft" --split test \
  --tasks translation sentiment nli --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW" --device "$DEVICE" \
  --out "$OUT/eval" "${EVAL_ARG_LIST[@]}"
[ "$DRY" = 1 ] && exit 0
echo "done in $(( $(date +%s) - START )) s: $OUT/eval/eval_test.md, $OUT/eval/submission_test.csv, $OUT/recipe.log"
