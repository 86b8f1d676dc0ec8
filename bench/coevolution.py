"""The co-evolution's targets over several finished runs (e.g. the tiny world at three seeds), one column a run.

  python bench/coevolution.py runs/tw_s0 runs/tw_s1 runs/tw_s2 [--rounds 2]

The targets and how each is measured: report.targets (the tiny world's learning test asserts the same); a
run stopped early shows "not run" where it stopped.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    cols = [report.targets(r, a.rounds) for r in a.runs]
    print("| target | bar | " + " | ".join(r.name for r in a.runs) + " | met in |")
    print("|---|---|" + "---|" * (len(a.runs) + 1))
    for i, (what, _, bar, _) in enumerate(cols[0]):
        form = "{:+.3f}" if "RL: reward" in what else "{:.1f}"
        cells = ["not run" if math.isnan(c[i][1]) else form.format(c[i][1]) + ("" if c[i][3] else " ✗") for c in cols]
        print(f"| {what} | {bar} | " + " | ".join(cells) + f" | {sum(c[i][3] for c in cols)} / {len(cols)} |")


if __name__ == "__main__":
    main()
