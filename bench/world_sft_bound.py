"""What a round's curriculum can teach, without RL: supervised fine-tuning of defender k-1 on attacker k's train
attacks (+ as many clean train scenes), scored like 05 (greedy) on attacker k's held-out attacks and on the
clean test scenes. Stage 04 (DAPO) on the same curriculum is then measured against this bound. With --groups N,
first what DAPO has to learn from: N train attacks drawn at random, 16 answers each at temperature 1 from the
defender, counted all right / mixed / all wrong per right answer (only mixed groups have an advantage).

  python bench/world_sft_bound.py --run_dir runs/tiny_world --round 2
  python bench/world_sft_bound.py --run_dir DIR --round 1 --steps 300 --lr 5e-4
  python bench/world_sft_bound.py --run_dir DIR --round 2 --defender DIR/defender/round_0 --groups 300 --steps 0

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
    defender: str | None = field(default=None, metadata={"help": "start from here (default defender/round_{k-1})"})
    groups: int = field(default=0, metadata={"help": "first count DAPO's groups on this many train attacks (0: no)"})


def rows(ds, image_key):
    return [dict(image=r[image_key], question=r["question"], options=r["options"], answer=r["answer"]) for r in ds]


def group_counts(model, processor, items, size: int = 16) -> dict:
    """Per right answer: [all right, mixed, all wrong] of ``size`` answers sampled at temperature 1 (04's rollout)."""
    outs = common.defender_generate(model, processor, [s["image"] for s in items for _ in range(size)],
                                    [common.defender_prompt(s["question"], s["options"]) for s in items
                                     for _ in range(size)], max_new_tokens=8, temperature=1.0, batch_size=128)
    counts = {}
    for j, s in enumerate(items):
        right = sum(common.extract_answer(o, s["options"]) == s["answer"] for o in outs[j * size:(j + 1) * size])
        counts.setdefault(s["answer"], [0, 0, 0])[0 if right == size else 2 if right == 0 else 1] += 1
    return counts


def main(a: Args):
    import torch
    from datasets import load_from_disk
    run, k = Path(a.run_dir), a.round
    torch.manual_seed(a.seed)
    start = a.defender or str(run / "defender" / f"round_{k - 1}")
    model, processor = common.load_defender(start, "cpu", dtype=torch.float32)
    attacks = load_from_disk(str(run / "attacks" / f"round_{k}"))
    scenes = load_from_disk(str(run / "data" / "scenes"))
    train = rows(attacks["train"], "attacked_image")
    if a.groups:
        drawn = [train[i] for i in random.Random(a.seed).sample(range(len(train)), min(a.groups, len(train)))]
        print(f"[sft bound] {start} on {len(drawn)} of attacker {k}'s train attacks, 16 answers each: per right "
              f"answer [all right, mixed, all wrong] {group_counts(model, processor, drawn)}", flush=True)
    rng = random.Random(a.seed)
    clean = rows([r for r in scenes if r["split"] == "train"], "image")
    pool = train + rng.sample(clean, min(len(clean), len(train)))
    rng.shuffle(pool)
    batches = [tiny_world.world_defender_inputs(processor, pool[i:i + a.batch])
               for i in range(0, len(pool) - a.batch + 1, a.batch)]
    held_out = rows(attacks["test"], "attacked_image")
    clean_test = rows([r for r in scenes if r["split"] == "test"], "image")

    def report(when):
        print(f"[sft bound] {when}: attacker {k}'s held-out attacks {tiny_world.world_accuracy(model, processor, held_out)}, "
              f"clean test scenes {tiny_world.world_accuracy(model, processor, clean_test)}", flush=True)
    report(start)
    if not a.steps:
        return

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
