"""Does 03's RL learn within a round? The round's starting adapter and its trained one attack the same scenes
from the same noise (the ODE sampler at --eval_steps, as 03's curriculum), judged by the same defender with the
same sampled answers: the change is the RL's, not the scenes'.

  python bench/attacker_learns.py runs/tiny_world --round 1 [--preset tiny_world] [--scenes 128]

03's training reward is no such measure: each iteration draws other scenes, and their difficulty moves its mean
(bench/tiny_world.md: with lr 0 it fell by 0.12 over 48 iterations). Prints, per adapter and split (the first
--scenes train scenes; 05's test scenes), the reward (03's formula), the attack success (reward > 0), the
defender's wrong fraction, the local-SSIM gate pass and the median changed area.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import rundir  # noqa: E402


def score(rows, args) -> dict:
    """03's reward (its gates too) and the attacks' figures, as 05 measures them."""
    area = [common.changed_area(x["image"], x["attacked_image"]) for x in rows]
    r = np.array([common.attacker_reward(x["ssim_local"], x["defender_wrong_fraction"], args.tau, args.w_fraction,
                                         args.w_all, c, args.max_area, args.area_scale) for x, c in zip(rows, area)])
    return dict(n=len(rows), reward=r.mean(), success=100 * (r > 0).mean(),
                wrong=np.mean([x["defender_wrong_fraction"] for x in rows]),
                gate=100 * np.mean([x["ssim_local"] >= args.tau for x in rows]), area=100 * np.median(area))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--preset", default="tiny_world")
    ap.add_argument("--scenes", type=int, default=128, help="train scenes (the first, in order)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s03 = common.load_stage("03_train_attacker.py")
    args = rundir.parse_args(s03.Args, s03.PRESETS, ["--preset", a.preset, "--run_dir", str(a.run),
                                                     "--round", str(a.round), "--seed", str(a.seed),
                                                     "--curriculum_samples", "1"])
    ddp = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"), master=True)
    common.quiet()
    scenes_ds, train = s03.load_scenes(a.run, args)
    test = [s for s in scenes_ds if s["split"] == "test"]
    start = a.run / "attacker" / ("sft" if a.round == 1 else f"round_{a.round - 1}")
    print("| adapter | scenes | reward | attack success (%) | wrong fraction | gate pass (%) | changed area, median (%) |")
    print("|---|---|---|---|---|---|---|")
    for name, src in ((start.name, start), (f"round_{a.round}", a.run / "attacker" / f"round_{a.round}")):
        pipe, _, defender, processor = s03.setup_models(args, ddp, a.run, str(src))
        pipe.transformer.eval()
        for split, scenes in (("train", train[:a.scenes]), ("test", test)):
            torch.manual_seed(a.seed * 1000 + 13)      # the same defender draws for both adapters
            rows = s03.attack_scenes(pipe, scenes, defender, processor, args, a.seed * 1000 + 13, scenes[0])
            x = score(rows, args)
            print(f"| {name} | {split} ({x['n']}) | {x['reward']:.3f} | {x['success']:.1f} | {x['wrong']:.3f} | "
                  f"{x['gate']:.1f} | {x['area']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
