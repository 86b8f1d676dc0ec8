"""The tiny world's local-SSIM gate (03's --tau) calibrated on the world's own editor, on this CPU.

  python bench/world_gate.py --models runs/tiny_world/models
  python bench/world_gate.py --models DIR --taus 0.6 0.7 0.8 --scenes 96

An edit of a scene is never exact here: the world's VAE and editor blur what they keep, so the paper's
0.85 would reject most edits, and the gate has to sit below what an untouched target scores. This measures
where: held-out scenes (seed 5, those with target boxes) in three versions, each edited with "Keep the
image unchanged." (8 Euler steps, CFG 4: 03's held-out attacks' sampler) and scored by common.local_ssim
against the original scene on its target boxes:
  untouched   the scene itself: the most an attack that leaves the targets alone can pass;
  recoloured  its first target redrawn in green (its shape and box kept);
  erased      its first target painted over with the scene's own background.
A gate is worth its name where "untouched" mostly passes and the other two mostly fail. The table is the
share passing each tau (%), and the mean local SSIM of each version. ``--reference`` picks what an edit is
compared with: ``scene`` (03's gate: the scene as drawn), ``vae`` (the scene through the world's VAE, encode
and decode: what any edit's blur starts from) or ``keep`` (the editor's own "keep" edit of the scene, from
other noise than the versions' edits).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import editing  # noqa: E402
import world  # noqa: E402

VERSIONS = ("untouched", "recoloured", "erased")


@dataclass
class Args:
    models: str = field(default="runs/tiny_world/models", metadata={"help": "the world's models (tiny_world.py --out)"})
    scenes: int = field(default=96, metadata={"help": "held-out scenes drawn (those without targets are left out)"})
    taus: list[float] = field(default_factory=lambda: [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85],
                              metadata={"help": "gates to report"})
    reference: str = field(default="scene", metadata={"help": "compare edits with: scene, vae or keep (module docstring)"})


def versions(index: int, seed: int = 5) -> tuple[dict, list]:
    """(scene, [untouched, recoloured, erased] images) of world scene (index, seed), which has targets."""
    from PIL import Image, ImageDraw

    from seeds import COLORS, draw_shape
    s = world.scene(index, seed)
    t = s["targets"][0]
    box = [int(v) for v in t["bbox"]]
    recoloured = s["image"].copy()
    draw_shape(ImageDraw.Draw(recoloured), t["name"].split()[1], box, COLORS["green"])
    erased = np.asarray(s["image"]).copy()                          # the scene's own background, noise and all
    background = world.background(s["image"].width, seed * 1_000_003 + index)
    x1, y1, x2, y2 = box
    erased[y1:y2, x1:x2] = background[y1:y2, x1:x2]
    return s, [s["image"], recoloured, Image.fromarray(erased)]


def gate_table(items: list[tuple[dict, list]], edit, taus, references=None) -> dict:
    """``edit(images) -> images`` applied to each version of every item, compared with ``references`` (default:
    each item's scene); -> {"ssim": {version: mean local SSIM}, "passed": {tau: {version: % of items at or above
    tau}}, "n": items}."""
    ssim, references = {}, references or [s["image"] for s, _ in items]
    for k, name in enumerate(VERSIONS):
        outs = edit([v[k] for _, v in items])
        ssim[name] = np.array([common.local_ssim(ref, o, [t["bbox"] for t in s["targets"]])
                               for (s, _), ref, o in zip(items, references, outs)])
    return dict(n=len(items), ssim={n: round(float(v.mean()), 3) for n, v in ssim.items()},
                passed={tau: {n: round(100 * float((v >= tau).mean()), 1) for n, v in ssim.items()} for tau in taus})


def vae_round_trip(pipe, images):
    """The images through the editor's VAE (encode, decode) at the world's size."""
    x = editing.images_to_tensor(images, world.SIZE, world.SIZE)
    return editing.tensor_to_images(editing.decode_latents(pipe, editing.encode_images(pipe, x), world.SIZE, world.SIZE))


def main(a: Args):
    pipe = editing.load_attacker(str(Path(a.models) / "editor"))

    def keep(images, seed=0):                           # 03's held-out sampler, 16 scenes a call
        out = []
        for i in range(0, len(images), 16):
            part = images[i:i + 16]
            out += world.edit_images(pipe, part, [world.KEEP] * len(part), steps=8, cfg=4.0, seed=seed + i)
        return out
    items = [versions(i) for i in range(a.scenes) if world.scene(i, 5)["targets"]]
    scenes = [s["image"] for s, _ in items]
    references = {"scene": lambda: scenes, "keep": lambda: keep(scenes, seed=10_000),
                  "vae": lambda: vae_round_trip(pipe, scenes)}
    if a.reference not in references:
        raise SystemExit(f"--reference {a.reference!r}: one of {', '.join(references)}")
    r = gate_table(items, keep, a.taus, references[a.reference]())
    print(f"{r['n']} held-out scenes with targets, the world's editor ({a.models}), 'keep', 8 Euler steps, CFG 4, "
          f"compared with the {a.reference}")
    print("| tau | " + " | ".join(f"{n} pass (%)" for n in VERSIONS) + " |")
    print("|---|" + "---|" * len(VERSIONS))
    for tau, p in r["passed"].items():
        print(f"| {tau} | " + " | ".join(f"{p[n]:.1f}" for n in VERSIONS) + " |")
    print("mean local SSIM: " + ", ".join(f"{n} {v:.3f}" for n, v in r["ssim"].items()))


if __name__ == "__main__":
    import rundir
    common.quiet()
    main(rundir.parse_args(Args, {}))
