"""How much of a co-evolution target's value is the test set's sampling noise: a paired bootstrap over the
held-out test scenes of one finished run (its training is fixed; another seed's spread is the other noise).

  python bench/target_noise.py runs/tw_s0 [--rounds 2] [--draws 2000]

For each attacker round k, on its gate-passing held-out attacks (the scenes eval/summary.md counts), from the
per-scene answers 05 cached in eval/preds/: attacker k's take (defender k-1 clean minus attacked, on the same
scenes), the share defender k wins back, and for k > 1 defender k minus defender 1 on attacker 1's attacks.
Each printed with the 5th and 95th percentiles of its value over scenes drawn with replacement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def correct(run: Path, defender: int, file: str) -> dict:
    path = run / "eval" / "preds" / f"round_{defender}" / f"{file}.jsonl"
    return {r["index"]: r["correct"] for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def gated(run: Path, k: int) -> list[str]:
    """The ids of attacker k's held-out attacks that pass the gate it was trained with (as 05 counts them)."""
    from datasets import load_from_disk
    test = load_from_disk(str(run / "attacks" / f"round_{k}"))["test"].select_columns(["id", "ssim_local"])
    saved = run / "attacker" / f"round_{k}" / "args.json"    # 05's reading: 0.85 where a run did not save it
    tau = json.loads(saved.read_text()).get("tau", 0.85) if saved.exists() else 0.85
    return [i for i, s in zip(test["id"], test["ssim_local"]) if s >= tau]


def interval(stat, cols: dict, draws: int, rng) -> str:
    n = len(next(iter(cols.values())))
    value = stat({c: v.mean() for c, v in cols.items()})
    picks = rng.integers(0, n, size=(draws, n))
    boot = stat({c: v[picks].mean(1) for c, v in cols.items()})
    lo, hi = np.nanpercentile(boot, [5, 95])
    return f"{value:.1f} ({lo:.1f}, {hi:.1f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--draws", type=int, default=2000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{a.run}: value (5th, 95th percentile over {a.draws} resamplings of the test scenes)")
    for k in range(1, a.rounds + 1):
        ids = gated(a.run, k)
        clean, before, after = (correct(a.run, k - 1, "scenes_clean"), correct(a.run, k - 1, f"attacks_round_{k}"),
                                correct(a.run, k, f"attacks_round_{k}"))
        if not before:
            continue
        cols = dict(clean=np.array([clean[i] for i in ids], float), before=np.array([before[i] for i in ids], float))
        take = lambda m: 100 * (m["clean"] - m["before"])  # noqa: E731
        line = f"  attacker {k}: takes {interval(take, cols, a.draws, rng)} points on {len(ids)} scenes"
        if after:
            cols["after"] = np.array([after[i] for i in ids], float)
            back = lambda m: 100 * (m["after"] - m["before"]) / np.where(m["clean"] > m["before"], m["clean"] - m["before"], np.nan)  # noqa: E731
            line += f"; defender {k} wins back {interval(back, cols, a.draws, rng)}%"
        one, now = correct(a.run, 1, "attacks_round_1"), correct(a.run, k, "attacks_round_1")
        if k > 1 and now:
            ids1 = gated(a.run, 1)
            keep = dict(then=np.array([one[i] for i in ids1], float), now=np.array([now[i] for i in ids1], float))
            forgot = interval(lambda m: 100 * (m["now"] - m["then"]), keep, a.draws, rng)
            line += f"; defender {k} - defender 1 on attacker 1's: {forgot}"
        print(line)


if __name__ == "__main__":
    main()
