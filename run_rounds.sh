#!/usr/bin/env bash
# AOT end to end: build AOT-SFT, cold-start the attacker, warm up the defender, then co-evolve.
#
#   bash run_rounds.sh                             # the tiny world, 2 rounds: the paper's effect in miniature, offline on CPU
#   PRESET=tiny bash run_rounds.sh                 # plumbing only: random tiny models (~2 min)
#   PRESET=paper NPROC=8 SEED_DATA=seeds.jsonl bash run_rounds.sh   # the paper's setting on 8 GPUs (SEED_DATA required)
#   PRESET=paper NPROC=8 SEED_DATA=seeds.jsonl bash run_rounds.sh --nnodes 2 --node_rank 0 --master_addr HOST   # extra torchrun args
#
# Env: PRESET (tiny_world|tiny|paper; tiny_world), ROUNDS (2; paper: 3, its iterations), RUN_DIR (runs/$PRESET), NPROC (1),
#      WORLD (tiny_world's models: shipped, build, or a built world's directory),
#      SEED_DATA (synthetic, tiny_world(_fixed), coco:..., or a seed JSONL; default the preset's), BENCH ("name=path.tsv name=path.tsv" for stage 05),
#      SEED (0: the random seed of stages 01-04; runs at several seeds show what the method does, not one draw),
#      DTYPE (bf16|fp32; default: each stage's auto, bf16 on GPU and fp32 on CPU; trained weights are fp32),
#      REPORT_TO (tensorboard|wandb: also log 02, 03, 04 there; logs/*.jsonl always).
# Every stage skips work whose output directory is complete, so re-running continues after a failure.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET:-tiny_world}
if [ "$PRESET" = "paper" ]; then ROUNDS=${ROUNDS:-3}; else ROUNDS=${ROUNDS:-2}; fi   # the paper's 3 iterations
RUN_DIR=${RUN_DIR:-runs/$PRESET}
NPROC=${NPROC:-1}
SEED_DATA=${SEED_DATA:-}   # empty: the preset's (tiny_world: its scenes, tiny: synthetic); required for paper
BENCH=${BENCH:-}
PY=${PYTHON:-python}
fail() { echo "run_rounds.sh: $*" >&2; exit 2; }
case "$PRESET" in
  tiny|tiny_world) export HF_HUB_OFFLINE=1; P=(--preset "$PRESET") ;;
  paper) P=()
    [ -n "$SEED_DATA" ] || fail "PRESET=paper needs SEED_DATA: coco:ANNOTATIONS.json:IMAGE_DIR (the paper seeds AOT-SFT from real photos), a seed JSONL (README), or SEED_DATA=synthetic for coloured shapes (a plumbing check, not the paper)" ;;
  *) fail "unknown PRESET=$PRESET: choose tiny_world (the method on CPU), tiny (plumbing, random models) or paper" ;;
esac
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$NPROC: expected a positive number of processes per node"
[[ "$ROUNDS" =~ ^[0-9]+$ ]] || fail "ROUNDS=$ROUNDS: expected a number of rounds"
SEED=${SEED:-0}
[[ "$SEED" =~ ^[0-9]+$ ]] || fail "SEED=$SEED: expected a non-negative integer"
S=(--seed "$SEED")
if [ -n "${DTYPE:-}" ]; then P+=(--dtype "$DTYPE"); fi
T=(); if [ -n "${REPORT_TO:-}" ]; then T=(--report_to "$REPORT_TO"); fi   # trackers of the training stages
BENCH_ARGS=(); if [ -n "$BENCH" ]; then BENCH_ARGS=(--bench $BENCH); fi
SD=(); if [ -n "$SEED_DATA" ]; then SD=(--seed_data "$SEED_DATA"); fi

run() {  # one stage: plain python for one process, torchrun otherwise (extra args passed through)
  if [ "$NPROC" -gt 1 ] || [ -n "$EXTRA" ]; then
    $PY -m torch.distributed.run --nproc_per_node "$NPROC" ${EXTRA:-} "$@"
  else
    $PY "$@"
  fi
}
EXTRA="$*"
TIMES=()
stage() {  # stage LABEL OUTPUT SCRIPT ARGS...: run it unless OUTPUT exists (outputs are renamed into place when complete)
  local label=$1 out=$2; shift 2
  if [ -n "$out" ] && [ -e "$out" ]; then TIMES+=("$label: done earlier"); return; fi
  local t0=$SECONDS
  run "$@"
  TIMES+=("$label: $((SECONDS - t0)) s")
}

case "$PRESET" in
  tiny) MODELS="random tiny models (built offline)"; SEEDS=${SEED_DATA:-synthetic} ;;
  tiny_world) MODELS="the tiny world's trained models ($RUN_DIR/models)"; SEEDS=${SEED_DATA:-tiny_world} ;;
  paper) MODELS="defender Qwen/Qwen2.5-VL-7B-Instruct, attacker Qwen/Qwen-Image-Edit"; SEEDS=$SEED_DATA ;;
esac
echo "== AOT: preset $PRESET, $ROUNDS rounds, run dir $RUN_DIR, $NPROC process(es), dtype ${DTYPE:-auto}"
echo "   seeds: $SEEDS; models: $MODELS; benchmarks: ${BENCH:-none (robustness on the held-out test scenes only)}"
# cheap checks before any stage: the seed source and the benchmark files (one line per problem)
if [ ! -e "$RUN_DIR/data/aot_sft" ]; then $PY 01_build_sft_data.py "${P[@]}" "${S[@]}" --run_dir "$RUN_DIR" "${SD[@]}" --check_inputs >/dev/null; fi
if [ -n "$BENCH" ]; then $PY 05_eval.py --run_dir "$RUN_DIR" "${BENCH_ARGS[@]}" --check_inputs >/dev/null; fi

# 0. the tiny world's defender, VAE and editor: the shipped ones (models/tiny_world, checked against their
#    manifest), WORLD=build to train them here (tens of minutes), or WORLD=DIR for a world built elsewhere
if [ "$PRESET" = "tiny_world" ]; then
  case "${WORLD:-shipped}" in
    build) EXTRA="" NPROC=1 stage "00 tiny world models (built)" "$RUN_DIR/models/world.json" tiny_world.py --out "$RUN_DIR/models" ;;
    shipped) EXTRA="" NPROC=1 stage "00 tiny world models (shipped)" "$RUN_DIR/models/world.json" tiny_world.py --out "$RUN_DIR/models" --install models/tiny_world ;;
    *) EXTRA="" NPROC=1 stage "00 tiny world models ($WORLD)" "$RUN_DIR/models/world.json" tiny_world.py --out "$RUN_DIR/models" --install "$WORLD" ;;
  esac
fi
# 1. AOT-SFT: extended scenes + effective distractors
stage "01 AOT-SFT data" "$RUN_DIR/data/aot_sft" 01_build_sft_data.py "${P[@]}" "${S[@]}" --run_dir "$RUN_DIR" "${SD[@]}"
# 2. attacker cold start
stage "02 attacker SFT" "$RUN_DIR/attacker/sft" 02_sft_attacker.py "${P[@]}" "${S[@]}" "${T[@]}" --run_dir "$RUN_DIR"
# 3. the untouched base defender, then its warm-up: DAPO on clean scenes (round 0), and their evaluation
stage "05 eval base" "$RUN_DIR/eval/base.json" 05_eval.py "${P[@]}" --run_dir "$RUN_DIR" --defender base "${BENCH_ARGS[@]}"
stage "04 defender round 0" "$RUN_DIR/defender/round_0" 04_train_defender.py "${P[@]}" "${S[@]}" "${T[@]}" --run_dir "$RUN_DIR" --round 0
stage "05 eval round 0" "$RUN_DIR/eval/round_0.json" 05_eval.py "${P[@]}" --run_dir "$RUN_DIR" --round 0 "${BENCH_ARGS[@]}"

# 4. co-evolution: attacker k attacks defender k-1; defender k trains on attacker k's curriculum
for k in $(seq 1 "$ROUNDS"); do
  echo "== round $k"
  stage "03 attacker round $k" "$RUN_DIR/attacks/round_$k" 03_train_attacker.py "${P[@]}" "${S[@]}" "${T[@]}" --run_dir "$RUN_DIR" --round "$k"
  # what attacker k learned: defender k-1, the model it attacked, on its held-out attacks (05 caches
  # answers per item, so only the new attacked scenes are answered)
  grep -q "\"attacker_round_$k\"" "$RUN_DIR/eval/round_$((k - 1)).json" ||
    stage "05 eval round $((k - 1)) vs attacker $k" "" 05_eval.py "${P[@]}" --run_dir "$RUN_DIR" --round "$((k - 1))" "${BENCH_ARGS[@]}"
  stage "04 defender round $k" "$RUN_DIR/defender/round_$k" 04_train_defender.py "${P[@]}" "${S[@]}" "${T[@]}" --run_dir "$RUN_DIR" --round "$k"
  stage "05 eval round $k" "$RUN_DIR/eval/round_$k.json" 05_eval.py "${P[@]}" --run_dir "$RUN_DIR" --round "$k" "${BENCH_ARGS[@]}"
done

echo "== done: $RUN_DIR/eval/summary.md"
cat "$RUN_DIR/eval/summary.md"
echo "== look at: galleries $RUN_DIR/data/gallery_01.png $RUN_DIR/attacks/round_*/gallery.png"
echo "            curves $RUN_DIR/eval/curves.png, robustness $RUN_DIR/eval/robustness.png, logs $RUN_DIR/logs/*.jsonl"
echo "== stage times:"
printf '   %s\n' "${TIMES[@]}"
