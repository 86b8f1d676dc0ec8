#!/bin/bash
# Score a finished tiny-world run again on another test set without training again (bench/tiny_world.md,
# "A five times larger test set"): copy RUN to OUT with SCENES as its data/scenes (an 01 build whose train rows
# are RUN's, e.g. `01_build_sft_data.py --num_test_extra 500` at RUN's seed), let 03 rewrite each round's attacks
# from the saved adapter (its curriculum step: one sample per scene gives the same held-out attacks), then 05
# scores every defender.
#
#   bash bench/rescore.sh RUN SCENES OUT [ROUNDS=2] [SEED=0]
#   bash bench/rescore.sh runs/s0 runs/s0_more_tests/data/scenes runs/s0_rescored 2 0
set -euo pipefail
RUN=$1 SCENES=$2 OUT=$3 ROUNDS=${4:-2} SEED=${5:-0}
cd "$(dirname "$0")/.."
[ -e "$OUT" ] && { echo "$OUT exists: choose a new directory" >&2; exit 1; }
mkdir -p "$OUT/data"
cp -rp "$RUN/models" "$RUN/attacker" "$RUN/defender" "$RUN/logs" "$OUT/"
cp -rp "$RUN/data/aot_sft" "$RUN/data/funnel.json" "$OUT/data/" && cp -rp "$SCENES" "$OUT/data/scenes"
P=(--preset tiny_world --run_dir "$OUT")
for k in $(seq 1 "$ROUNDS"); do
  python 03_train_attacker.py "${P[@]}" --seed "$SEED" --round "$k" --curriculum_samples 1
  python 05_eval.py "${P[@]}" --round $((k - 1))
done
python 05_eval.py "${P[@]}" --round "$ROUNDS"
python bench/coevolution.py "$OUT" --rounds "$ROUNDS"
