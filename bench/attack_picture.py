"""The README's picture: held-out attacks of a run's attacker round, as scene | attack | difference map.

Shows the first ``--n`` test attacks (in the dataset's order) that pass the attacker's own local-SSIM gate and
fooled the defender it trained against (03's sampled wrong fraction >= 0.5), among those whose changed area
(05's measure: pixels whose summed |RGB| difference exceeds 60) lies between the round's 25th and 75th
percentiles: typical attacks, not picked by eye. The map is the summed |RGB| difference, 0 (blue) to 384 (red).

    python bench/attack_picture.py runs/tiny_world docs/tiny_world_attacks.png [--round 1] [--n 2]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from target_noise import gated  # noqa: E402   (bench/: the gate as 05 reads it)

import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run"), ap.add_argument("out")
    ap.add_argument("--round", type=int, default=1), ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--size", type=int, default=192, help="pixels per panel")
    a = ap.parse_args()
    from datasets import load_from_disk
    run = Path(a.run)
    test = load_from_disk(str(run / "attacks" / f"round_{a.round}"))["test"]
    passing = set(gated(run, a.round))
    area = np.array([common.changed_area(r["image"], r["attacked_image"]) for r in test])
    lo, hi = np.percentile(area, [25, 75])
    rows = [r for r, ar in zip(test, area) if r["id"] in passing and r["defender_wrong_fraction"] >= 0.5 and lo <= ar <= hi]
    if len(rows) < a.n:
        raise SystemExit(f"only {len(rows)} typical, gate-passing, fooling attacks in {run}: fewer than --n {a.n}")
    jet, panels = colormaps["jet"], []
    for r in rows[:a.n]:
        x, y = (np.asarray(im.convert("RGB"), dtype=np.int32) for im in (r["image"], r["attacked_image"]))
        diff = np.abs(x - y).sum(-1) / 384.0
        heat = Image.fromarray((255 * jet(np.clip(diff, 0, 1))[..., :3]).astype(np.uint8))
        panels.append([im.convert("RGB").resize((a.size, a.size), Image.BICUBIC)
                       for im in (r["image"], r["attacked_image"], heat)])
    sheet = Image.new("RGB", (3 * a.size, a.n * a.size))
    for i, row in enumerate(panels):
        for j, im in enumerate(row):
            sheet.paste(im, (j * a.size, i * a.size))
    sheet.save(a.out)
    print(f"{a.out}: {a.n} of {len(rows)} typical attacks (area {100 * lo:.1f}-{100 * hi:.1f}%), ids "
          + ", ".join(str(r["id"]) for r in rows[:a.n]))


if __name__ == "__main__":
    main()
