"""Where 04's updates push the defender's answer prior, read from a run's logs and scores.

  python bench/dapo_letters.py runs/tiny_world --round 2 [--base runs/other]

Per 04 round: the letter probe (``answer_margin``: mean log P(B) - log P(A) of the boxed answers on 64 fixed
clean scenes, logged every --probe_every steps), the kept groups by source and right answer summed over the
steps, the advantage summed over the kept answers per chosen option, and, when 05 scored the round, the
accuracy on the round's held-out attacks per right answer. ``--base`` names the run whose defender k-1
scores give the "before" (the run itself by default).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def summary(run: Path, k: int, base: Path) -> dict:
    rows = [json.loads(x) for x in (run / "logs" / f"04_round_{k}.jsonl").read_text().splitlines()]
    kept, adv = Counter(), Counter()
    for r in rows:
        kept.update(r.get("kept_by") or {})
        adv.update(r.get("adv_by_answer") or {})
    out = dict(steps=max(r["step"] for r in rows), margin=[(r["step"], round(r["answer_margin"], 2)) for r in rows
                                                             if r.get("answer_margin") is not None],
               kept=dict(sorted(kept.items())), adv={a: round(v, 1) for a, v in sorted(adv.items())},
               groups_per_step=round(sum(kept.values()) / max(1, sum(1 for r in rows if r["step"] > 0)), 1))
    after, before = run / "eval" / f"round_{k}.json", base / "eval" / f"round_{k - 1}.json"
    if after.exists() and before.exists():
        a = json.loads(after.read_text())["robustness"]
        b = json.loads(before.read_text())["robustness"]
        x, y = a[f"attacker_round_{k}"], b[f"attacker_round_{k}"]
        drop = y["clean_acc"] - y["acc"]
        out.update(clean=round(a["clean_acc"], 1), attacked_before=round(y["acc"], 1), attacked_after=round(x["acc"], 1),
                   recovered=round((x["acc"] - y["acc"]) / drop, 3) if drop > 0 else None,
                   by_answer_before=y["by_answer"], by_answer_after=x["by_answer"])
        if f"attacker_round_{k - 1}" in a:
            out["previous_attacker"] = round(a[f"attacker_round_{k - 1}"]["acc"], 1)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--base", default=None)
    a = p.parse_args()
    for key, value in summary(Path(a.run), a.round, Path(a.base or a.run)).items():
        print(f"{key}: {json.dumps(value)}")
