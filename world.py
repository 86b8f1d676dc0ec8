"""The tiny world (PRESET=tiny_world): its scenes and edits, drawn exactly by a generator, and the checks of
an editor on them.

Every scene is a 112 x 112 canvas with a colour-ramp background (red grows to the right, green downwards:
Qwen2.5-VL has rotary positions only, and a tiny randomly initialised tower learns "where" far faster when
the pixels carry it) and two objects: a red circle and a blue square (the targets, inside the central 2/3
that stage 01 extends outwards). The questions are fixed: left/right and above/below of the red circle and
the blue square (options "left", "right" or "above", "below", in a random order per scene, as benchmarks have
them, so that no letter is a direction; ``option_order="fixed"``: A = left / above, the earlier worlds'), and
whether there is a red circle.
On such scenes "the red thing" is the circle: a defender trained on them never has to tell shapes apart, the
weakness AOT's attacker is there to find (a red triangle) and its defender training to repair. tiny_world.py
trains the world's models on these scenes and pairs; stage 01 takes its seed rows from ``seed_item``.
Measurements: bench/tiny_world.md.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import common
import editing
from seeds import COLORS, SHAPES, draw_shape

# ---------------------------------------------------------------------------------------------
# Scenes: stage 01's seeds for PRESET=tiny_world, and what the world's models learn from
# ---------------------------------------------------------------------------------------------
SIZE = 112
QUESTIONS = {
    "horizontal": ("Is the red circle to the left or to the right of the blue square?", ["left", "right"]),
    "vertical": ("Is the red circle above or below the blue square?", ["above", "below"]),
    "exists": ("Is there a red circle in the image?", []),
}


def background(size: int, noise_seed: int):
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = np.stack([50 + 150 * xx, 50 + 150 * yy, 110 + 0 * xx], -1)
    bg = bg + np.random.default_rng(noise_seed).normal(0, 2, (size, size, 3))
    return np.clip(bg, 0, 255).astype(np.uint8)


def free_box(rng, side, lo, hi, boxes, gap=3):
    """A side x side box inside [lo, hi) that keeps ``gap`` pixels from every box in ``boxes``."""
    for _ in range(200):
        x1, y1 = rng.randrange(lo, hi - side), rng.randrange(lo, hi - side)
        b = [x1, y1, x1 + side, y1 + side]
        if all(b[2] + gap <= o[0] or o[2] + gap <= b[0] or b[3] + gap <= o[1] or o[3] + gap <= b[1] for o in boxes):
            return b
    return None


def scene(index: int, seed: int = 0, size: int = SIZE, kind: str | None = None, option_order: str = "random") -> dict:
    """One scene of the world: {image, question, options, answer, targets, objects, kind}; the same
    (index, seed) always draws the same scene. Targets sit in the central 2/3 of the canvas, at least
    a fifth of the canvas apart along the asked axis, so every answer is unambiguous. ``option_order``:
    "random" (the shipped world's) or "fixed" (A = left / above); drawn last, so the images are the same."""
    if option_order not in ("fixed", "random"):
        raise ValueError(f"option_order {option_order!r}: 'fixed' or 'random'")
    rng = random.Random(seed * 1_000_003 + index)
    kind = kind or rng.choice(list(QUESTIONS))
    lo, hi = size // 6, size - size // 6
    while True:
        sides = [int(size * rng.uniform(0.15, 0.2)) for _ in range(2)]
        circle = free_box(rng, sides[0], lo, hi, [])
        square = free_box(rng, sides[1], lo, hi, [circle])
        if square is None:
            continue
        axis = 1 if kind == "vertical" else 0
        if kind == "exists" or abs((circle[axis] + circle[axis + 2]) - (square[axis] + square[axis + 2])) / 2 >= size / 5:
            break
    objects = [("red circle", circle), ("blue square", square)]
    if kind == "exists" and rng.random() < 0.5:
        objects = objects[1:]                                   # the answer is No
    img = Image.fromarray(background(size, seed * 1_000_003 + index))
    draw = ImageDraw.Draw(img)
    for name, box in objects:
        color, shape = name.split()
        draw_shape(draw, shape, box, COLORS[color])
    question, options = QUESTIONS[kind]
    named = dict(objects)
    targets = [{"name": n, "bbox": [float(v) for v in named[n]]} for n in ("red circle", "blue square") if n in named]
    if kind == "exists":
        answer = "Yes" if "red circle" in named else "No"
        targets = targets[:1] if answer == "Yes" else []
    else:
        first = circle[axis] < square[axis]                     # the circle is left of / above the square
        if rng.random() < 0.5 and option_order == "random":   # drawn in both orders: the scenes stay the same
            options, first = options[::-1], not first
        answer = "A" if first else "B"
    return dict(image=img, question=question, options=options, answer=answer, targets=targets,
                objects=[{"name": n, "bbox": b} for n, b in objects], kind=kind)


def seed_item(index: int, test_fraction: float, seed: int, option_order: str = "random") -> dict:
    """A seed row for stage 01 (seeds.py's row format): the scene's central 2/3, which 01's scene
    extension grows back to a full canvas (pad 0.25 per side)."""
    s = scene(index, seed, option_order=option_order)
    m = SIZE // 6
    image = s["image"].crop((m, m, SIZE - m, SIZE - m))
    targets = [{"name": t["name"], "bbox": [t["bbox"][0] - m, t["bbox"][1] - m, t["bbox"][2] - m, t["bbox"][3] - m]}
               for t in s["targets"]]
    # the split's own stream: an integer seed equal to the scene's (seed 0: both are `index`) made the split
    # decide the question kind too (the first draw of the same generator): every test scene was left/right
    split = "test" if random.Random(f"split {seed} {index}").random() < test_fraction else "train"
    return dict(id=f"world{index:06d}", image=image, question=s["question"], options=s["options"],
                answer=s["answer"], targets=targets, split=split)


def stage_wordings() -> list[str]:
    """The wordings the stages send, from their sources (the chat roles, the defender's templates, the
    editor's instructions with every colour, shape and place), for the world's tokenizer: a BPE that
    had not seen "multiple-choice" or "assistant" spelled them in letters, so the world's defender spent
    a quarter of its compute on spelling. (The random ``tiny`` models keep the plain corpus: the unit
    tests' calibrations rest on their weights.)"""
    places = [common.place_name([c, r, c + 1, r + 1], 3, 3) for r in range(3) for c in range(3)]   # the ninths
    return [
        "<|im_start|>system\n <|im_start|>user\n <|im_start|>assistant\n",
        common.MCQ_TEMPLATE, common.YES_NO_TEMPLATE, "Keep the image unchanged.",
        " ".join(f"Add a {c} {s} at the {p} of the image." for c in COLORS for s in SHAPES for p in places),
    ]


def fixed_sentences(questions=()) -> list[str]:
    """The sentences every defender prompt repeats word for word (the system turn, the two templates' fixed
    sentences) and ``questions``: the world's tokenizer gives each one token, as a real tokenizer would
    give a frequent word, so its prompts cost what carries information."""
    fixed = [p.replace("{{", "{").replace("}}", "}") for t in (common.MCQ_TEMPLATE, common.YES_NO_TEMPLATE)
             for p in t.split("\n\n") if "{question}" not in p]
    return ["You are a helpful assistant.", *fixed, *questions]


def oracle_distractor(scene: dict, seed: int, side_frac: float = 0.25) -> tuple:
    """(image, name, box): the scene with the distractor the world's shortcut predicts to be the most
    misleading, drawn exactly, never touching an object: a red triangle, for left/right and above/below on
    the far side of the blue square from the red circle ("the red thing" now straddles the square), for
    existence anywhere. The defender's accuracy on these (world.json "defender_oracle_acc") is a reference
    for what an attacker that adds one such shape could reach; stage 03 has to find it."""
    rng = random.Random(seed)
    side, taken = int(SIZE * side_frac), [o["bbox"] for o in scene["objects"]]
    named = {o["name"]: o["bbox"] for o in scene["objects"]}
    ax = 0 if scene["kind"] == "horizontal" else 1

    def mid(b):                                        # centre along the asked axis
        return (b[ax] + b[ax + 2]) / 2
    box = None
    for _ in range(50):
        box = free_box(rng, side, 0, SIZE, taken)
        if box is None or scene["kind"] == "exists":
            break
        if (mid(box) - mid(named["blue square"])) * (mid(named["red circle"]) - mid(named["blue square"])) < 0:
            break
    image = scene["image"].copy()
    if box is not None:
        draw_shape(ImageDraw.Draw(image), "triangle", box, COLORS["red"])
    return image, "red triangle", box


CRAFTED = ("none", "perturbation", "addition", "removal", "replacement", "hybrid")
HYBRIDS = [("addition", "removal"), ("addition", "replacement"), ("addition", "perturbation"),
           ("removal", "perturbation"), ("replacement", "perturbation")]


def crafted_pair(index: int, kind: str, seed: int = 0) -> dict:
    """An attack of a known strategy, drawn exactly (census.py's test): a world scene with one more object (a
    shape of another colour), then ``kind``: add a shape on the background, erase the extra object (the
    background back), recolour and reshape it, add uniform noise of +-16 per channel everywhere, two of these
    (hybrid), or nothing but +-2 noise (none). -> {scene, attacked, boxes (the targets), edits: [(kind, box)]}."""
    rng = random.Random(f"crafted {seed} {index} {kind}")
    s = scene(index, seed)
    noise_seed = seed * 1_000_003 + index
    taken = [o["bbox"] for o in s["objects"]]
    side = int(SIZE * rng.uniform(0.18, 0.24))
    extra = free_box(rng, side, 0, SIZE, taken, gap=8)
    taken.append(extra)
    others = [c for c in COLORS if c not in ("red", "blue")]
    color = rng.choice(others)
    before = s["image"].copy()
    draw_shape(ImageDraw.Draw(before), rng.choice(SHAPES), extra, COLORS[color])
    after, edits = np.asarray(before).astype(np.int32), []
    for part in (rng.choice(HYBRIDS) if kind == "hybrid" else [] if kind == "none" else [kind]):
        box = extra
        if part in ("removal", "replacement"):
            x1, y1, x2, y2 = extra
            after[y1:y2, x1:x2] = background(SIZE, noise_seed)[y1:y2, x1:x2]
        if part in ("addition", "replacement"):
            box = free_box(rng, side, 0, SIZE, taken, gap=8) if part == "addition" else extra
            taken.append(box)
            image = Image.fromarray(after.astype(np.uint8))
            draw_shape(ImageDraw.Draw(image), rng.choice(SHAPES), box,
                       COLORS[rng.choice([c for c in others if c != color])])
            after = np.asarray(image).astype(np.int32)
        if part == "perturbation":
            after = after + np.random.default_rng(noise_seed).integers(-16, 17, after.shape)
            box = [0, 0, SIZE, SIZE]
        edits.append((part, box))
    if kind == "none":
        after = after + np.random.default_rng(noise_seed).integers(-2, 3, after.shape)
    return dict(scene=before, attacked=Image.fromarray(np.clip(after, 0, 255).astype(np.uint8)),
                boxes=[t["bbox"] for t in s["targets"]], edits=edits)


# ---------------------------------------------------------------------------------------------
# Edits: the pairs the world's editor learns from, and the checks of what it draws
# ---------------------------------------------------------------------------------------------
KEEP = "Keep the image unchanged."
EXTEND = "Extend the scene naturally beyond its borders."   # stage 01's outpainting instruction


def edit_pair(index: int, seed: int = 3) -> tuple:
    """(condition image, instruction, target image): keep the scene, add a named coloured shape in
    a named ninth of the image, or extend the central 2/3 of a scene (padded as stage 01 pads it,
    edge colours blurred) back to the whole scene."""
    rng = random.Random(seed * 1_000_003 + index)
    s = scene(index, seed)
    image = s["image"]
    task = rng.choices(["keep", "add", "extend"], weights=[1, 3, 1])[0]
    if task == "keep":
        return image, KEEP, image
    if task == "extend":
        m = SIZE // 6
        crop = image.crop((m, m, SIZE - m, SIZE - m))
        canvas = crop.resize((SIZE, SIZE), Image.BILINEAR).filter(ImageFilter.GaussianBlur(max(2, SIZE // 32)))
        canvas.paste(crop, (m, m))
        return canvas, EXTEND, image
    taken = [o["bbox"] for o in s["objects"]]
    third = SIZE // 3
    for _ in range(20):
        r, c = rng.randrange(3), rng.randrange(3)
        side = int(SIZE * rng.uniform(0.18, 0.26))
        x1 = c * third + rng.randrange(0, max(1, third - side + 1))
        y1 = r * third + rng.randrange(0, max(1, third - side + 1))
        box = [x1, y1, x1 + side, y1 + side]
        if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in taken):
            break
    else:
        return image, KEEP, image
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    target = image.copy()
    draw_shape(ImageDraw.Draw(target), shape, box, COLORS[color])
    assert common.place_name(box, SIZE, SIZE) == common.place_name(
        [c * third + 1, r * third + 1, c * third + 2, r * third + 2], SIZE, SIZE)
    return image, common.implant_instruction(f"{color} {shape}", box, SIZE, SIZE), target


def add_hit(condition, target, output, min_diff: int = 30) -> bool | None:
    """Did the editor add what it was asked to? On the pixels where the exact target differs from the
    condition (summed |RGB| > ``min_diff``: the drawn shape), the output is closer to the target than to
    the unedited condition (mean |RGB|). None when the pair adds nothing."""
    c, t, o = (np.asarray(im.convert("RGB"), dtype=np.float32) for im in (condition, target, output))
    drawn = np.abs(t - c).sum(-1) > min_diff
    if not drawn.any():
        return None
    return bool(np.abs(o[drawn] - t[drawn]).mean() < np.abs(o[drawn] - c[drawn]).mean())


def change_elsewhere(condition, target, output, margin: int = 8) -> float:
    """Mean |output - condition| (0-255, over RGB) away from what the target changes: outside its changed
    pixels dilated by ``margin``. For 'keep' (nothing changes) it is the editor's copy error, the floor;
    an 'add' above that floor also paints where it was not asked to."""
    c, t, o = (np.asarray(im.convert("RGB"), dtype=np.float32) for im in (condition, target, output))
    drawn = Image.fromarray(((np.abs(t - c).sum(-1) > 30) * 255).astype(np.uint8))
    away = np.asarray(drawn.filter(ImageFilter.MaxFilter(2 * margin + 1))) == 0
    return float(np.abs(o - c)[away].mean()) if away.any() else 0.0


def edit_images(pipe, images, instructions, steps: int = 8, cfg: float = 4.0, seed: int = 0):
    """Plain Euler sampling of the flow (the stages' sigma schedule and true CFG): the editor's check."""
    with torch.no_grad():
        ctx = editing.encode_edit(pipe, images, instructions, SIZE)
        sigmas = editing.sigma_schedule(pipe.scheduler, steps, ctx.target_len)
        x = torch.randn(len(images), ctx.target_len, 64, generator=torch.Generator().manual_seed(seed))
        for i in range(steps):
            v = editing.predict_velocity(pipe.transformer, x, sigmas[i].view(1), ctx, cfg)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return editing.tensor_to_images(editing.decode_latents(pipe, x, SIZE, SIZE))


def editor_report(pipe, n: int = 48, steps: int = 8, cfg: float = 4.0, pair_seed: int = 6) -> tuple[dict, list]:
    """The editor's samples (8 Euler steps, CFG 4) on held-out pairs: PSNR against the exact target per
    instruction kind; for 'add' also against the unedited scene (lower: something was added) and the hit
    rate (add_hit: the named shape appears where the target has it)."""
    pairs = [edit_pair(i, seed=pair_seed) for i in range(n)]
    outs = []
    for i in range(0, n, 16):
        part = pairs[i:i + 16]
        outs += edit_images(pipe, [p[0] for p in part], [p[1] for p in part], steps=steps, cfg=cfg, seed=i)
    def psnr(a, b):
        x, y = (editing.images_to_tensor([im], SIZE, SIZE) for im in (a, b))
        return (10 * torch.log10(4 / (x - y).pow(2).mean())).item()
    report = {}
    for kind in ("keep", "add", "extend"):
        idx = [i for i, p in enumerate(pairs) if {KEEP: "keep", EXTEND: "extend"}.get(p[1], "add") == kind]
        if idx:
            report[f"editor_psnr_{kind}"] = round(sum(psnr(outs[i], pairs[i][2]) for i in idx) / len(idx), 2)
        if kind == "add" and idx:
            report["editor_psnr_add_vs_unedited"] = round(sum(psnr(outs[i], pairs[i][0]) for i in idx) / len(idx), 2)
            hits = [h for h in (add_hit(pairs[i][0], pairs[i][2], outs[i]) for i in idx) if h is not None]
            report["editor_add_hit"] = round(sum(hits) / max(1, len(hits)), 3)
            report["editor_add_change_elsewhere"] = round(sum(change_elsewhere(*pairs[i][::2], outs[i]) for i in idx)
                                                          / len(idx), 2)
        if kind == "keep" and idx:
            report["editor_keep_change"] = round(sum(change_elsewhere(*pairs[i][::2], outs[i]) for i in idx) / len(idx), 2)
    return report, [(p[0], o) for p, o in zip(pairs, outs)]
