"""What an attack did to the image: the paper's attack strategies (its Figure 5), counted.

An attack is compared with its scene outside the target boxes (the objects asked about, which the SSIM gate
guards). Its strongly changed pixels split into connected regions, each labelled
  addition      an object where the scene had background,
  removal       background where the scene had an object,
  replacement   an object still there, changed (colour, shape, kind);
a change of low amplitude spread over the image is a perturbation. One kind of change -> that kind; more
than one -> hybrid; nothing above the thresholds -> none.

Whether a region holds an object is read from the pixels (``geometry``): a plane (a linear colour ramp, the
tiny world's background) is fitted to the ring around the region, and the region holds an object when enough
of its pixels depart from that plane. Photographs have no such background: there each region is shown to an
MLLM (stage 01's judge: before and after crops side by side, ``JUDGE_PROMPT``) and its one-word answer is
parsed; an answer that names no kind is counted under ``unparsed`` and the region left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

STRATEGIES = ("none", "perturbation", "addition", "removal", "replacement", "hybrid", "unjudged")
REGION_KINDS = ("addition", "removal", "replacement", "perturbation")
JUDGE_PROMPT = ("The left half shows part of a picture before an edit, the right half the same part after it. "
                "What did the edit do? Answer with one word: addition (a new object appears), removal (an object "
                "disappears), replacement (an object changes colour, shape or kind), or perturbation (no object "
                "appears, disappears or changes).")


@dataclass
class Thresholds:
    strong: float = 60.0          # summed |RGB| (0-765) above which a pixel changed (05's changed area: the same)
    min_area: float = 0.004       # a region smaller than this share of the image is the editor's noise
    diffuse: float = 15.0         # median summed |RGB| change off the targets and regions above this: perturbation
    object_residual: float = 60.0  # summed |RGB| departure from the fitted background: an object's pixel
    object_share: float = 0.3     # a region holds an object when this share of its pixels are an object's


def rgb(image: Image.Image, size=None) -> np.ndarray:
    image = image.convert("RGB")
    return np.asarray(image.resize(size) if size and image.size != size else image, dtype=np.float32)


def grow(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square."""
    out = mask.copy()
    for _ in range(r):
        p = np.pad(out, 1)
        out = np.logical_or.reduce([p[i:i + mask.shape[0], j:j + mask.shape[1]] for i in range(3) for j in range(3)])
    return out


def shrink(mask: np.ndarray, r: int = 1) -> np.ndarray:
    return ~grow(~mask, r)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels 1..n, 0 outside), n. Each pixel takes the largest
    label among its neighbours until nothing changes (as many sweeps as the longest region is long)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        new = np.maximum.reduce([p[i:i + h, j:j + w] for i in range(3) for j in range(3)]) * mask
        if (new == labels).all():
            break
        labels = new
    ids = np.unique(labels[labels > 0])
    remap = np.zeros(labels.max() + 1, dtype=np.int64)
    remap[ids] = np.arange(1, len(ids) + 1)
    return remap[labels], len(ids)


def box_mask(shape, boxes, margin: int = 2) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for b in boxes:
        x1, y1, x2, y2 = (int(round(v)) for v in b)
        m[max(0, y1 - margin):y2 + margin, max(0, x1 - margin):x2 + margin] = True
    return m


def holds_object(image: np.ndarray, region: np.ndarray, th: Thresholds, ring: int = 4) -> bool:
    """Do enough of the region's pixels depart from the plane fitted (per channel, least squares, refitted
    once without the ring's own outliers) to the ring of ``ring`` pixels around it?"""
    around = grow(region, ring) & ~region
    ys, xs = np.nonzero(around)
    if len(ys) < 3:
        return False
    design = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float32)
    values = image[ys, xs]
    keep = np.ones(len(ys), dtype=bool)
    for _ in range(2):
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        keep = np.abs(design @ coef - values).sum(-1) < th.object_residual
        if keep.sum() < 3:
            return False
    ry, rx = np.nonzero(region)
    pred = np.stack([rx, ry, np.ones_like(rx)], 1).astype(np.float32) @ coef
    return float((np.abs(image[ry, rx] - pred).sum(-1) > th.object_residual).mean()) >= th.object_share


def changed_regions(scene: np.ndarray, attacked: np.ndarray, boxes, th: Thresholds) -> tuple[list, np.ndarray]:
    """-> ([region masks], the summed |RGB| difference). Changed pixels off the targets, opened (thin edges the
    editor blurs are not a change) and grouped within 2 px (the pieces of one changed shape are one region)."""
    diff = np.abs(attacked - scene).sum(-1)
    changed = grow(shrink((diff > th.strong) & ~box_mask(diff.shape, boxes)))
    labels, n = components(grow(changed, 2))
    regions = [grow(changed & (labels == k), 1) for k in range(1, n + 1)]
    return [r for r in regions if (changed & r).sum() >= th.min_area * diff.size], diff


def side_by_side(scene: Image.Image, attacked: Image.Image, region: np.ndarray, size: int = 224) -> Image.Image:
    """The region's bounding box (padded by half its size, at least 16 px) before | after, each ``size`` high."""
    ys, xs = np.nonzero(region)
    pad = max(16, (xs.max() - xs.min()) // 2, (ys.max() - ys.min()) // 2)
    box = (max(0, xs.min() - pad), max(0, ys.min() - pad), min(scene.width, xs.max() + pad + 1),
           min(scene.height, ys.max() + pad + 1))
    w = max(1, round(size * (box[2] - box[0]) / (box[3] - box[1])))
    canvas = Image.new("RGB", (2 * w + 8, size), (255, 255, 255))
    for k, im in enumerate((scene, attacked.resize(scene.size))):
        canvas.paste(im.convert("RGB").crop(box).resize((w, size)), (k * (w + 8), 0))
    return canvas


def parse_kind(answer: str) -> str | None:
    m = re.search(r"\b(addition|removal|replacement|perturbation)\b", answer.lower())
    return m.group(1) if m else None


def strategy_of(kinds: list[str]) -> str:
    kinds = sorted(set(kinds))
    return "none" if not kinds else kinds[0] if len(kinds) == 1 else "hybrid"


def census(pairs, th: Thresholds | None = None, judge=None) -> list[dict]:
    """``pairs``: [(scene, attacked, target boxes)] -> per pair {strategy, regions: [kinds], diffuse: the median
    change off the targets and regions, unparsed: judge answers that named no kind}. ``judge``: None (the pixels
    decide, see the module docstring) or f([dict(image, prompt, pair, bbox)]) -> [answer], one call for every
    region of every pair."""
    th = th or Thresholds()
    found, out, arrays = [], [], []
    for i, (scene, attacked, boxes) in enumerate(pairs):
        a = rgb(scene)
        b = rgb(attacked, scene.size)
        arrays.append((a, b) if judge is None else None)
        regions, diff = changed_regions(a, b, boxes, th)
        off = ~box_mask(diff.shape, boxes) & ~grow(np.logical_or.reduce(regions + [np.zeros_like(diff, bool)]), 2)
        diffuse = float(np.median(diff[off])) if off.any() else 0.0
        out.append(dict(regions=[], diffuse=round(diffuse, 1), unparsed=0, perturbed=diffuse > th.diffuse))
        found += [(i, r) for r in regions]
    if judge is None:
        for i, r in found:
            a, b = arrays[i]
            had, has = holds_object(a, r, th), holds_object(b, r, th)
            out[i]["regions"].append("addition" if has and not had else "removal" if had and not has
                                     else "replacement" if had else "perturbation")
    else:   # called even with nothing to ask: under torchrun every rank generates in lock-step
        asks = []
        for i, r in found:
            ys, xs = np.nonzero(r)
            asks.append(dict(image=side_by_side(pairs[i][0], pairs[i][1], r), prompt=JUDGE_PROMPT, pair=i,
                             bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]))
        for (i, _), answer in zip(found, judge(asks)):
            kind = parse_kind(answer)
            if kind is None:
                out[i]["unparsed"] += 1
            else:
                out[i]["regions"].append(kind)
    for o in out:
        o["strategy"] = strategy_of(o["regions"] + ["perturbation"] * o.pop("perturbed"))
        if o["strategy"] == "none" and o["unparsed"]:
            o["strategy"] = "unjudged"
    return out


def mllm_judge(model, processor, batch_size: int = 8):
    """A judge for ``census`` from a defender-like MLLM (greedy, a few tokens). Under torchrun (a sharded model
    generates in lock-step) every rank pads its questions to the most any rank asks."""
    import torch

    import common
    import parallel

    def judge(asks):
        n = int(parallel.all_reduce(torch.tensor(float(len(asks))), op="max").item())
        if n == 0:
            return []
        mine = len(asks)
        asks = list(asks) + [dict(image=Image.new("RGB", (448, 224), "white"), prompt=JUDGE_PROMPT)] * (n - mine)
        answers = common.defender_generate(model, processor, [a["image"] for a in asks], [a["prompt"] for a in asks],
                                           max_new_tokens=8, batch_size=batch_size)
        return answers[:mine]
    return judge


def strategies(rows, edited: str, how: str = "pixels", model=None, processor=None) -> list[str]:
    """Each row's strategy: its scene ("image") against its ``edited`` image, on its "targets" boxes; ``how``:
    'pixels' decide, or 'judge' (``model``, a Qwen2.5-VL, is asked about every changed region)."""
    judge = mllm_judge(model, processor) if how == "judge" else None
    pairs = [(r["image"], r[edited], [t["bbox"] for t in r["targets"]]) for r in rows]
    return [f["strategy"] for f in census(pairs, judge=judge)]
