"""Can the world's defender learn the spatial questions with their two options in a random order per scene?

The earlier worlds asked them in a fixed order ("A. left / B. right", "A. above / B. below"), so a letter was
also a direction: a defender trained against attacks on one side could buy them back by moving its letter prior.
(The shipped world now draws the order in world.scene; this script keeps its own draw, with which its table in
bench/tiny_world.md was measured, and the question rewording of --wording.)
With the order random, the right letter is the XOR of the direction (in the image) and the order (in the
prompt), which gives a first-order gradient to neither. This trains the world's defender (tiny_world's
architecture, tokenizer and data) for --fixed_steps on the fixed order, then --random_steps on random order,
in chunks (200 steps; --chunk for the random order's; each its own warm-up and cosine), and prints the
validation accuracy per question kind (96 scenes of seed 8, random order) after every chunk. Results: bench/tiny_world.md.

  python bench/world_option_order.py --fixed_steps 0 --random_steps 3000        # from scratch
  python bench/world_option_order.py --fixed_steps 400 --random_steps 1200      # fixed order first
  python bench/world_option_order.py --fixed_steps 400 --random_steps 1200 --wording   # + the question's wording
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tiny_world  # noqa: E402
import world  # noqa: E402

# --wording: the question names the options in their order, each wording one token of the world's tokenizer
SWAPPED = {"horizontal": "Is the red circle to the right or to the left of the blue square?",
           "vertical": "Is the red circle below or above the blue square?"}


def scene(i: int, seed: int, random_order: bool, wording: bool) -> dict:
    s = world.scene(i, seed, option_order="fixed")
    if random_order and s["kind"] != "exists" and random.Random(f"order {seed} {i}").random() < 0.5:
        s = dict(s, options=s["options"][::-1], answer="AB"["BA".index(s["answer"])])
        if wording:
            s["question"] = SWAPPED[s["kind"]]
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixed_steps", type=int, default=0)
    ap.add_argument("--random_steps", type=int, default=3000)
    ap.add_argument("--wording", action="store_true")
    ap.add_argument("--random_lr", type=float, default=1e-3, help="peak lr of the random-order chunks")
    ap.add_argument("--chunk", type=int, default=200, help="steps per chunk (each its own warm-up and cosine)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    questions = [q for q, _ in world.QUESTIONS.values()] + (list(SWAPPED.values()) if a.wording else [])
    model, processor = tiny_world.fresh_world_defender(questions)
    val = [scene(i, 8, True, a.wording) for i in range(192)]
    model.train()
    done = 0
    for random_order, steps, lr in ((False, a.fixed_steps, 2e-3), (True, a.random_steps, a.random_lr)):
        train = [scene(i, 1, random_order, a.wording) for i in range(2048)]
        batches = [tiny_world.world_defender_inputs(processor, train[i:i + 32]) for i in range(0, 2048, 32)]
        for start in range(0, steps, a.chunk if random_order else 200):
            def loss_at(step, start=start, batches=batches):
                x, y = batches[(start + step) % len(batches)]
                logits = model(**x).logits[:, :-1].float()
                return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
            n = a.chunk if random_order else 200
            tiny_world._fit("defender", model.parameters(), loss_at, n, lr, max(1, n // 8), (0.9, 0.98), log=lambda d: None)
            done += n
            acc = {k: tiny_world.world_accuracy(model, processor, [s for s in val if s["kind"] == k])
                   for k in ("horizontal", "vertical", "exists")}
            print(dict(step=done, order="random" if random_order else "fixed", **acc), flush=True)


if __name__ == "__main__":
    main()
