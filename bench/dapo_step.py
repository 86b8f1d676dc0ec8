"""Stage 04's DAPO step at the tiny world's shapes, timed on this CPU: rollout, old log-probs + update.

  python bench/dapo_step.py --defender runs/tiny_world/models/defender
  python bench/dapo_step.py --defender DIR --script /tmp/04_at_another_commit.py   # the same step, another 04

One process, fp32, 04's tiny_world preset (32 prompts x 16 answers, updates of 8 prompts, micro-batches
of --micro_batch answers). The prompts are held-out world scenes and the rewards a fixed mix (every group
has right and wrong answers, so every sample is trained on), so two versions of 04 do the same work.
Seconds on this CPU, not a GPU measurement.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import policy  # noqa: E402
import world  # noqa: E402


@dataclass
class Args:
    defender: str = field(default="runs/tiny_world/models/defender", metadata={"help": "the world's defender"})
    script: str = field(default=str(ROOT / "04_train_defender.py"), metadata={"help": "stage 04 to time"})
    micro_batch: int = field(default=0, metadata={"help": "answers per micro-batch (0 = the preset's)"})
    steps: int = field(default=3, metadata={"help": "timed steps (after one untimed)"})


def main(a: Args):
    s04 = common.load_stage(a.script)
    preset = s04.PRESETS["tiny_world"]
    args = SimpleNamespace(**vars(s04.Args()))
    args.__dict__.update({k: v for k, v in preset.items() if k != "model"}, gen_batch=0, dtype="fp32")
    args.micro_batch = a.micro_batch or args.micro_batch
    ddp = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    model, proc, params = policy.setup_model(args, ddp, a.defender)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    prompts = [dict(image=s["image"], question=s["question"], options=s["options"], answer=s["answer"])
               for s in (world.scene(i, seed=7) for i in range(32))]
    times = []
    for step in range(a.steps + 1):
        t0 = time.time()
        model.eval()
        samples = policy.rollout(model, proc, prompts, args)
        t1 = time.time()
        for i, s in enumerate(samples):
            s["reward"], s["accuracy"], s["overlong"] = float(i % 3 == 0), float(i % 3 == 0), 0.0
        groups = [samples[i:i + args.group_size] for i in range(0, len(samples), args.group_size)]
        model.train()
        st = s04.train_on_groups(model, params, opt, groups, args, ddp)
        times.append((t1 - t0, time.time() - t1))
        print(f"step {step}: rollout {t1 - t0:.2f} s, old log-probs + {st['updates']} updates {time.time() - t1:.2f} s"
              f"{' (untimed)' if step == 0 else ''}", flush=True)
    roll, train = (sum(t[i] for t in times[1:]) / a.steps for i in (0, 1))
    print(f"{Path(a.script).name}, micro-batch {args.micro_batch}: rollout {roll:.2f} s, old log-probs + updates "
          f"{train:.2f} s, step {roll + train:.2f} s (mean of {a.steps}; {len(samples)} answers, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    from transformers import HfArgumentParser
    common.quiet()
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
