#!/usr/bin/env bash
# AOT end to end: build AOT-SFT, cold-start the attacker, warm up the defender, then co-evolve.
#
#   PRESET=tiny bash run_rounds.sh                 # whole loop offline on CPU (minutes)
#   PRESET=paper NPROC=8 bash run_rounds.sh        # the paper's setting on 8 GPUs
#   PRESET=paper NPROC=8 bash run_rounds.sh --nnodes 2 --node_rank 0 --master_addr HOST   # extra torchrun args
#
# Env: PRESET (tiny|paper), ROUNDS (3, the paper's iterations), RUN_DIR (runs/$PRESET), NPROC (1),
#      SEED_DATA (synthetic or a seed JSONL), BENCH ("name=path.tsv name=path.tsv" for stage 05),
#      DTYPE (bf16|fp32; default: each stage's auto, bf16 on GPU and fp32 on CPU; trained weights are fp32).
# Every stage skips work whose output directory is complete, so re-running continues after a failure.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET:-tiny}
ROUNDS=${ROUNDS:-3}
RUN_DIR=${RUN_DIR:-runs/$PRESET}
NPROC=${NPROC:-1}
SEED_DATA=${SEED_DATA:-synthetic}
BENCH=${BENCH:-}
PY=${PYTHON:-python}
if [ "$PRESET" = "tiny" ]; then export HF_HUB_OFFLINE=1; P=(--preset tiny); else P=(); fi
if [ -n "${DTYPE:-}" ]; then P+=(--dtype "$DTYPE"); fi
BENCH_ARGS=(); if [ -n "$BENCH" ]; then BENCH_ARGS=(--bench $BENCH); fi

run() {  # one stage: plain python for one process, torchrun otherwise (extra args passed through)
  if [ "$NPROC" -gt 1 ] || [ -n "$EXTRA" ]; then
    $PY -m torch.distributed.run --nproc_per_node "$NPROC" ${EXTRA:-} "$@"
  else
    $PY "$@"
  fi
}
EXTRA="$*"
done_() { [ -e "$1" ]; }   # a stage's output exists (outputs are renamed into place only when complete)

echo "== AOT: preset $PRESET, $ROUNDS rounds, run dir $RUN_DIR, $NPROC process(es), dtype ${DTYPE:-auto}"

# 1. AOT-SFT: extended scenes + effective distractors
done_ "$RUN_DIR/data/aot_sft" || run 01_build_sft_data.py "${P[@]}" --run_dir "$RUN_DIR" --seed_data "$SEED_DATA"
# 2. attacker cold start
done_ "$RUN_DIR/attacker/sft" || run 02_sft_attacker.py "${P[@]}" --run_dir "$RUN_DIR"
# 3. the untouched base defender, then its warm-up: DAPO on clean scenes (round 0), and their evaluation
done_ "$RUN_DIR/eval/base.json" || run 05_eval.py "${P[@]}" --run_dir "$RUN_DIR" --defender base "${BENCH_ARGS[@]}"
done_ "$RUN_DIR/defender/round_0" || run 04_train_defender.py "${P[@]}" --run_dir "$RUN_DIR" --round 0
done_ "$RUN_DIR/eval/round_0.json" || run 05_eval.py "${P[@]}" --run_dir "$RUN_DIR" --round 0 "${BENCH_ARGS[@]}"

# 4. co-evolution: attacker k attacks defender k-1; defender k trains on attacker k's curriculum
for k in $(seq 1 "$ROUNDS"); do
  echo "== round $k"
  done_ "$RUN_DIR/attacks/round_$k" || run 03_train_attacker.py "${P[@]}" --run_dir "$RUN_DIR" --round "$k"
  done_ "$RUN_DIR/defender/round_$k" || run 04_train_defender.py "${P[@]}" --run_dir "$RUN_DIR" --round "$k"
  done_ "$RUN_DIR/eval/round_$k.json" || run 05_eval.py "${P[@]}" --run_dir "$RUN_DIR" --round "$k" "${BENCH_ARGS[@]}"
done

echo "== done: $RUN_DIR/eval/summary.md"
cat "$RUN_DIR/eval/summary.md"
