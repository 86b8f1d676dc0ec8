"""What a round's curriculum can teach, without RL: supervised fine-tuning of defender k-1 on attacker k's train
attacks (+ as many clean train scenes), scored like 05 (greedy) on attacker k's held-out attacks and on the
clean test scenes. Stage 04 (DAPO) on the same curriculum is then measured against this bound.

  python bench/world_sft_bound.py --run_dir runs/tiny_world --round 2
  python bench/world_sft_bound.py --run_dir DIR --round 1 --steps 300 --lr 5e-4

It needs a run directory with defender/round_{k-1}, attacks/round_k and data/scenes (run_rounds.sh's), and
the world's defender (its loss is tiny_world.py's: token-mean cross-entropy on "\\boxed{X}<|im_end|>",
AdamW with warm-up and cosine). Measured on the tiny world: bench/tiny_world.md.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import tiny_world  # noqa: E402


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny_world", metadata={"help": "a run directory (run_rounds.sh's)"})
    round: int = field(default=2, metadata={"help": "k: defender k-1 fine-tuned on attacker k's curriculum"})
    steps: int = field(default=300, metadata={"help": "SFT steps"})
    batch: int = field(default=32, metadata={"help": "prompts per step"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    seed: int = field(default=0, metadata={"help": "random seed (clean scenes drawn, order)"})


def rows(ds, image_key):
    return [dict(image=r[image_key], question=r["question"], options=r["options"], answer=r["answer"]) for r in ds]


def accuracy(model, processor, items) -> float:
    was = model.training
    model.eval()
    outs = common.defender_generate(model, processor, [s["image"] for s in items],
                                    [common.defender_prompt(s["question"], s["options"]) for s in items],
                                    max_new_tokens=8, batch_size=64)
    model.train(was)
    return round(100 * sum(common.extract_answer(o, s["options"]) == s["answer"] for o, s in zip(outs, items))
                 / len(items), 1)


def main(a: Args):
    import torch
    from datasets import load_from_disk
    run, k = Path(a.run_dir), a.round
    torch.manual_seed(a.seed)
    model, processor = common.load_defender(str(run / "defender" / f"round_{k - 1}"), "cpu", dtype=torch.float32)
    attacks = load_from_disk(str(run / "attacks" / f"round_{k}"))
    scenes = load_from_disk(str(run / "data" / "scenes"))
    train = rows(attacks["train"], "attacked_image")
    rng = random.Random(a.seed)
    clean = rows([r for r in scenes if r["split"] == "train"], "image")
    pool = train + rng.sample(clean, min(len(clean), len(train)))
    rng.shuffle(pool)
    batches = [tiny_world.world_defender_inputs(processor, pool[i:i + a.batch])
               for i in range(0, len(pool) - a.batch + 1, a.batch)]
    held_out = rows(attacks["test"], "attacked_image")
    clean_test = rows([r for r in scenes if r["split"] == "test"], "image")

    def report(when):
        print(f"[sft bound] {when}: attacker {k}'s held-out attacks {accuracy(model, processor, held_out)}, "
              f"clean test scenes {accuracy(model, processor, clean_test)}", flush=True)
    report(f"defender {k - 1}")

    def loss_at(step):
        x, y = batches[step % len(batches)]
        logits = model(**x).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
    model.train()
    tiny_world._fit("sft_bound", model.parameters(), loss_at, a.steps, a.lr, max(1, a.steps // 10), (0.9, 0.98),
                    log=print, log_every=100)
    report(f"after {a.steps} SFT steps at {a.lr} on {len(train)} attacks + {len(pool) - len(train)} clean scenes")


if __name__ == "__main__":
    import rundir
    common.quiet()
    main(rundir.parse_args(Args, {}))
