#!/bin/bash
# Score a finished tiny-world run again on another test set without training again (bench/tiny_world.md,
# "A five times larger test set"): copy RUN to OUT with SCENES as its data/scenes (an 01 build whose train rows
# are RUN's, e.g. `01_build_sft_data.py --num_test_extra 500` at RUN's seed), let 03 rewrite each round's attacks
# from the saved adapter (its curriculum step: one sample per scene gives the same held-out attacks), then 05
# scores every defender, the base one too.
#
# The seed (03's curriculum noises) is the run's own, read from attacker/round_1/args.json.
#
#   bash bench/rescore.sh RUN SCENES OUT [ROUNDS=2]
#   bash bench/rescore.sh runs/s0 runs/s0_more_tests/data/scenes runs/s0_rescored 2
set -euo pipefail
RUN=$(realpath "$1") SCENES=$(realpath "$2") OUT=$(realpath -m "$3") ROUNDS=${4:-2}   # absolute: the stages run from the repository
SEED=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['seed'])" "$RUN/attacker/round_1/args.json")
cd "$(dirname "$0")/.."
[ -e "$OUT" ] && { echo "$OUT exists: choose a new directory" >&2; exit 1; }
mkdir -p "$OUT/data"
cp -rp "$RUN/models" "$RUN/attacker" "$RUN/defender" "$RUN/logs" "$OUT/"
cp -rp "$RUN/data/aot_sft" "$RUN/data/funnel.json" "$OUT/data/" && cp -rp "$SCENES" "$OUT/data/scenes"
P=(--preset tiny_world --run_dir "$OUT")
python 05_eval.py "${P[@]}" --defender base   # the untrained defender's row
for k in $(seq 1 "$ROUNDS"); do
  python 03_train_attacker.py "${P[@]}" --seed "$SEED" --round "$k" --curriculum_samples 1
  python 05_eval.py "${P[@]}" --round $((k - 1))
done
python 05_eval.py "${P[@]}" --round "$ROUNDS"
python bench/coevolution.py "$OUT" --rounds "$ROUNDS"
