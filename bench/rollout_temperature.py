"""What 04's dynamic sampling can keep at each rollout temperature: a defender answers prompts of a round's pool
(04's load_prompt_pool: the round's train attacks + clean scenes, the validation tenth held out) n times each,
and the groups are counted all right / all wrong / kept (dynamic_filter: mixed accuracy rewards), attacked and
clean apart. A share kept of s costs the refill about 1 / s mini-batches per rollout batch.

  python bench/rollout_temperature.py --run_dir runs/tiny_world --round 2
  python bench/rollout_temperature.py --run_dir DIR --round 2 --defender DIR/defender/round_1 --temps 1.0 1.5 2.0

It needs a run directory with attacks/round_k and data/scenes; the defender defaults to defender/round_{k-1}
(the one round k starts from) and 04's settings are its tiny_world preset's. Measured: bench/tiny_world.md.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import policy  # noqa: E402
import rundir  # noqa: E402

s04 = common.load_stage("04_train_defender.py")


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny_world", metadata={"help": "run directory"})
    round: int = field(default=2, metadata={"help": "the round whose pool is sampled (>= 1)"})
    defender: str | None = field(default=None, metadata={"help": "default defender/round_{k-1}"})
    temps: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0], metadata={"help": "rollout temperatures"})
    prompts: int = field(default=640, metadata={"help": "prompts drawn from the pool"})
    seed: int = field(default=0, metadata={"help": "draw of the prompts and of the answers"})


def main(a: Args):
    common.quiet()
    run = Path(a.run_dir)
    args = rundir.parse_args(s04.Args, s04.PRESETS, ["--preset", "tiny_world", "--run_dir", a.run_dir,
                                                     "--round", str(a.round), "--seed", str(a.seed)])
    pool, _ = s04.load_prompt_pool(args, run)
    pool = random.Random(a.seed).sample(pool, min(a.prompts, len(pool)))
    model, processor = common.load_defender(a.defender or str(run / "defender" / f"round_{a.round - 1}"),
                                            min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model.eval()
    attacked = [p["source"] == "attack" for p in pool]
    print(f"{len(pool)} prompts ({sum(attacked)} attacked) x {args.group_size} answers")
    print("| temperature | right answers | all right | all wrong | groups kept (attacked, clean) |\n|---|---|---|---|---|")
    for t in a.temps:
        args.temperature = t
        samples = []
        with common.seeded(a.seed):
            for i in range(0, len(pool), args.rollout_batch):
                samples += policy.rollout(model, processor, pool[i:i + args.rollout_batch], args)
        s04.score(samples, args)
        reward = torch.tensor([s["accuracy"] for s in samples]).view(-1, args.group_size)
        right = (reward > 0).float().mean(1)
        kept = s04.dynamic_filter(reward, args.dyn_low, args.dyn_high).float()
        att = torch.tensor(attacked)
        print(f"| {t} | {100 * (reward > 0).float().mean():.1f}% | {100 * (right == 1).float().mean():.1f}% | "
              f"{100 * (right == 0).float().mean():.1f}% | {100 * kept.mean():.1f}% ({100 * kept[att].mean():.1f}%, "
              f"{100 * kept[~att].mean():.1f}%) |", flush=True)


if __name__ == "__main__":
    main(rundir.parse_args(Args, {}))
