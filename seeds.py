"""Seed VQA items for stage 01, from four sources in one row format:
  {id, image (PIL), question, options ([] for yes/no), answer ("A".. or "Yes"/"No"),
   targets [{name, bbox [x1, y1, x2, y2] in pixels}], split ("train"/"test")}

1. synthetic_item: coloured shapes with exact boxes, a spatial MCQ or an existence yes/no (the tiny preset);
2. world_seed_item: the tiny world's scenes (world_scene; PRESET=tiny_world, whose models tiny_world.py
   trains on the same scenes), cropped to their centre for 01's scene extension;
3. read_coco: COCO-format instance annotations -> the paper's kind of spatial / existence questions;
4. read_seed_jsonl: hand-written rows (README, "Seed JSONL").
Each reader returns the rows and names every item it skipped, with the reason.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import common

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
          "yellow": (240, 220, 20), "purple": (150, 40, 190), "orange": (250, 130, 10)}
SHAPES = ["circle", "square", "triangle"]


def draw_shape(draw, shape, box, color):
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=color)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=color)


def synthetic_item(i: int, size: int, test_fraction: float, seed: int) -> dict:
    """Coloured shapes on a textured grey background; a spatial MCQ or an existence yes/no."""
    rng = random.Random(seed * 1_000_003 + i)
    nrng = np.random.default_rng(seed * 1_000_003 + i)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 90 + 60 * (rng.random() * xx + rng.random() * yy) + nrng.normal(0, 6, (size, size))
    bg = np.clip(np.stack([base, base * 0.97, base * 0.94], -1), 40, 200).astype(np.uint8)
    img = Image.fromarray(bg).filter(ImageFilter.GaussianBlur(0.6))
    draw = ImageDraw.Draw(img)
    kinds = [(c, rng.choice(SHAPES)) for c in rng.sample(list(COLORS), 3)]  # one shape per colour
    objects = []
    for color, shape in kinds[:rng.choice([2, 3])]:
        side = int(size * rng.uniform(0.15, 0.25))
        for _ in range(100):  # rejection-sample a box that overlaps no other shape
            x1, y1 = rng.randrange(0, size - side), rng.randrange(0, size - side)
            box = [x1, y1, x1 + side, y1 + side]
            if all(box[2] <= o["bbox"][0] or o["bbox"][2] <= box[0] or box[3] <= o["bbox"][1]
                   or o["bbox"][3] <= box[1] for o in objects):
                break
        else:  # no free spot: the scene keeps the shapes placed so far
            continue
        draw_shape(draw, shape, box, COLORS[color])
        objects.append({"name": f"{color} {shape}", "bbox": [float(v) for v in box]})
    split = "test" if rng.random() < test_fraction else "train"
    a, b = objects[0], objects[1]
    (ax, ay), (bx, by) = [((o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2) for o in (a, b)]
    kind = rng.choice(["horizontal", "vertical", "exists"])
    if kind == "exists":
        present = {o["name"] for o in objects}
        absent = rng.choice([f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present])
        ask = rng.choice([a["name"], absent])
        return dict(id=f"syn{i:06d}", image=img, question=f"Is there a {ask} in the image?", options=[],
                    answer="Yes" if ask == a["name"] else "No",
                    targets=[a] if ask == a["name"] else [], split=split)
    if kind == "horizontal":
        q, opts, first = f"Is the {a['name']} to the left or to the right of the {b['name']}?", ["left", "right"], ax < bx
    else:
        q, opts, first = f"Is the {a['name']} above or below the {b['name']}?", ["above", "below"], ay < by
    return dict(id=f"syn{i:06d}", image=img, question=q, options=opts, answer="A" if first else "B",
                targets=[a, b], split=split)


# ---------------------------------------------------------------------------------------------
# The tiny world's scenes (PRESET=tiny_world; tiny_world.py trains its models on them)
# ---------------------------------------------------------------------------------------------
# Every scene is a 112 x 112 canvas with a colour-ramp background (red grows to the right, green
# downwards: Qwen2.5-VL has rotary positions only, and a tiny randomly initialised tower learns
# "where" far faster when the pixels carry it) and two objects: a red circle and a blue square (the
# targets, inside the central 2/3 that stage 01 extends outwards). The questions are fixed:
# left/right and above/below of the red circle and the blue square, and whether there is a red
# circle. On such scenes "the red thing" is the circle: a defender trained on them never has to tell
# shapes apart, the weakness AOT's attacker is there to find (a red triangle) and its defender
# training to repair. Measured (400 defender steps, 192 held-out scenes, a red triangle of 28 px
# drawn beyond the square or, for existence, anywhere): without other objects 97.9% clean, 58.9%
# attacked; with 0-2 triangles of other colours in every scene 92.7% clean, 73.4% attacked.
WORLD_SIZE = 112
WORLD_QUESTIONS = {
    "horizontal": ("Is the red circle to the left or to the right of the blue square?", ["left", "right"]),
    "vertical": ("Is the red circle above or below the blue square?", ["above", "below"]),
    "exists": ("Is there a red circle in the image?", []),
}


def world_background(size: int, noise_seed: int):
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


def world_scene(index: int, seed: int = 0, size: int = WORLD_SIZE, kind: str | None = None) -> dict:
    """One scene of the world: {image, question, options, answer, targets, objects, kind}; the same
    (index, seed) always draws the same scene. Targets sit in the central 2/3 of the canvas, at least
    a fifth of the canvas apart along the asked axis, so every answer is unambiguous."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = kind or rng.choice(list(WORLD_QUESTIONS))
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
    img = Image.fromarray(world_background(size, seed * 1_000_003 + index))
    draw = ImageDraw.Draw(img)
    for name, box in objects:
        color, shape = name.split()
        draw_shape(draw, shape, box, COLORS[color])
    question, options = WORLD_QUESTIONS[kind]
    named = dict(objects)
    targets = [{"name": n, "bbox": [float(v) for v in named[n]]} for n in ("red circle", "blue square") if n in named]
    if kind == "exists":
        answer = "Yes" if "red circle" in named else "No"
        targets = targets[:1] if answer == "Yes" else []
    else:
        answer = "A" if circle[axis] < square[axis] else "B"
    return dict(image=img, question=question, options=options, answer=answer, targets=targets,
                objects=[{"name": n, "bbox": b} for n, b in objects], kind=kind)


def world_seed_item(index: int, test_fraction: float, seed: int) -> dict:
    """A seed row for stage 01 (seeds.py's row format): the scene's central 2/3, which 01's scene
    extension grows back to a full canvas (pad 0.25 per side)."""
    s = world_scene(index, seed)
    m = WORLD_SIZE // 6
    image = s["image"].crop((m, m, WORLD_SIZE - m, WORLD_SIZE - m))
    targets = [{"name": t["name"], "bbox": [t["bbox"][0] - m, t["bbox"][1] - m, t["bbox"][2] - m, t["bbox"][3] - m]}
               for t in s["targets"]]
    # the split's own stream: an integer seed equal to the scene's (seed 0: both are `index`) made the split
    # decide the question kind too (the first draw of the same generator): every test scene was left/right
    split = "test" if random.Random(f"split {seed} {index}").random() < test_fraction else "train"
    return dict(id=f"world{index:06d}", image=image, question=s["question"], options=s["options"],
                answer=s["answer"], targets=targets, split=split)


def check_seed_source(spec: str) -> str | None:
    """Why --seed_data cannot be read (None if it can), cheaply and before any model loads: a COCO
    annotation file that is missing or not COCO-format JSON, an image directory that is missing, a seed
    JSONL that is missing or holds no JSON row. Rows and images are still checked one by one later."""
    if spec in ("synthetic", "tiny_world"):
        return None
    if spec.startswith("coco:"):
        _, ann, image_dir = (spec.split(":", 2) + ["", ""])[:3]
        if not ann or not image_dir:
            return "expected coco:ANNOTATIONS.json:IMAGE_DIR"
        if not Path(ann).is_file():
            return f"no COCO annotation file {ann}"
        try:
            data = json.loads(Path(ann).read_text())
            missing = [k for k in ("images", "annotations", "categories") if k not in data]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            return f"{ann} is not JSON ({type(e).__name__})"
        if missing:
            return f"{ann} is not COCO-format instances (no {', '.join(missing)})"
        return None if Path(image_dir).is_dir() else f"no image directory {image_dir}"
    path = Path(spec)
    if not path.is_file():
        return f"no seed file {spec} (expected synthetic, coco:ANNOTATIONS.json:IMAGE_DIR or a seed JSONL)"
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    return f"{spec}: its first row is not JSON ({type(e).__name__})"
                return None if isinstance(row, dict) else f"{spec}: its first row is not a JSON object"
    return f"{spec} holds no row"


def read_coco(spec: str, args) -> tuple[list[dict], list[str], dict]:
    """--seed_data coco:ANNOTATIONS.json:IMAGE_DIR -> (seed rows, skipped items by name, rejected question
    candidates by reason). The paper's kind of question, derived from COCO-format instances:
      spatial  "Is the A to the left or to the right of the B?" / "above or below": two objects whose
               categories occur once in the image (so the question has one answer), each at least
               --coco_min_area of the image, apart by at least --coco_min_gap of the image along the axis;
               which object is named first alternates so that answers A and B are balanced;
      exists   "Is there a C in the image?": alternately a present unique category (target: its box) and
               one absent from the image (no target); crowd boxes count as present, never as targets.
    At most --coco_per_image questions per image and --num_seed_rows in all (0 = no cap); the split is
    decided per image from its id (same image, same split, on every run)."""
    from collections import Counter
    from itertools import combinations
    _, ann_path, image_dir = (spec.split(":", 2) + ["", ""])[:3]
    try:
        data = json.loads(Path(ann_path).read_text())
        images, annotations = data["images"], data["annotations"]
        categories = {c["id"]: c["name"] for c in data["categories"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"[01] {spec!r}: not a readable COCO-format annotation file ({type(e).__name__}: {e}); "
                         "expected coco:ANNOTATIONS.json:IMAGE_DIR") from e
    skipped, rejected, by_image = [], Counter(), {}
    for a in annotations:
        if a.get("category_id") not in categories:
            skipped.append(f"annotation {a.get('id')}: unknown category id {a.get('category_id')}")
            continue
        by_image.setdefault(a["image_id"], []).append(a)
    rows, balance = [], Counter()
    for info in common.progress(sorted(images, key=lambda m: m["id"]), desc="[01] COCO images", lines=True):
        try:
            with Image.open(Path(image_dir) / info["file_name"]) as im:
                image = im.convert("RGB")
        except (OSError, KeyError) as e:
            skipped.append(f"image {info.get('id')} ({info.get('file_name')}): {type(e).__name__}")
            continue
        W, H = image.size
        objects, present = [], set()
        for a in by_image.get(info["id"], []):
            x, y, w, h = (float(v) for v in a["bbox"])
            name = categories[a["category_id"]]
            present.add(name)   # even a bad box says the object is there: never asked as absent
            if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
                skipped.append(f"annotation {a.get('id')}: box {a['bbox']} outside its {W}x{H} image")
                continue
            if a.get("iscrowd"):
                rejected["crowd box"] += 1
                continue
            objects.append(dict(name=name, bbox=[x, y, x + w, y + h]))
        count = Counter(o["name"] for o in objects)
        usable = []
        for o in objects:
            if count[o["name"]] > 1:
                rejected["category not unique in its image"] += 1
            elif (o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]) < args.coco_min_area * W * H:
                rejected["object too small"] += 1
            else:
                usable.append(o)
        rng = random.Random(args.seed * 1_000_003 + int(info["id"]))
        split = "test" if rng.random() < args.test_fraction else "train"
        candidates = []
        for a, b in combinations(usable, 2):
            for axis, size, opts in ((0, W, ["left", "right"]), (1, H, ["above", "below"])):
                gap = max(b["bbox"][axis] - a["bbox"][axis + 2], a["bbox"][axis] - b["bbox"][axis + 2])
                if gap < args.coco_min_gap * size:
                    rejected["pair too close along the asked axis"] += 1
                else:
                    candidates.append(("spatial", a, b, axis, opts))
        absent = sorted(set(categories.values()) - present)
        candidates += [("exists", o) for o in usable]
        rng.shuffle(candidates)
        if len(candidates) > args.coco_per_image:
            rejected["over the per-image cap"] += len(candidates) - args.coco_per_image
        for k, c in enumerate(candidates[:args.coco_per_image]):
            if c[0] == "spatial":
                _, a, b, axis, opts = c
                first_is_a = a["bbox"][axis] < b["bbox"][axis]          # a is left of / above b
                if (balance["A"] > balance["B"]) == first_is_a:         # name the pair so the rarer letter is right
                    a, b, first_is_a = b, a, not first_is_a
                answer = "A" if first_is_a else "B"
                q = (f"Is the {a['name']} to the left or to the right of the {b['name']}?" if axis == 0 else
                     f"Is the {a['name']} above or below the {b['name']}?")
                row = dict(question=q, options=opts, answer=answer, targets=[a, b])
            else:
                ask_present = balance["Yes"] <= balance["No"] or not absent
                name = c[1]["name"] if ask_present else rng.choice(absent)
                answer = "Yes" if ask_present else "No"
                row = dict(question=f"Is there a {name} in the image?", options=[], answer=answer,
                           targets=[c[1]] if ask_present else [])
            balance[row["answer"]] += 1
            rows.append(dict(id=f"coco{info['id']}_{k}", image=image, split=split, **row))
    if args.num_seed_rows and len(rows) > args.num_seed_rows:
        rejected["over the total cap"] += len(rows) - args.num_seed_rows
        rows = rows[:args.num_seed_rows]
    return rows, skipped, dict(rejected)


def read_seed_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """Valid rows and the names of skipped ones (line number + reason)."""
    rows, skipped = [], []
    raws = path.read_bytes().splitlines()
    for n, raw in common.progress(enumerate(raws, start=1), total=len(raws), desc="[01] seed rows", lines=True):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw.decode("utf-8"))
            for key in ("image", "question", "answer", "targets"):
                if key not in item:
                    raise ValueError(f"missing field '{key}'")
            options = list(item.get("options") or [])
            answer = str(item["answer"]).strip()
            valid = common.OPTION_LETTERS[:len(options)] if options else ("Yes", "No")
            if answer not in valid:
                raise ValueError(f"answer {answer!r} not in {list(valid)}")
            with Image.open(path.parent / item["image"]) as im:
                image = im.convert("RGB")
            targets = []
            for t in item["targets"]:
                x1, y1, x2, y2 = (float(v) for v in t["bbox"])
                if not (0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height):
                    raise ValueError(f"box {t['bbox']} outside the {image.width}x{image.height} image")
                targets.append({"name": str(t["name"]), "bbox": [x1, y1, x2, y2]})
            rows.append(dict(id=str(item.get("id", f"line{n}")), image=image, question=str(item["question"]),
                             options=[str(o) for o in options], answer=answer, targets=targets,
                             split=str(item.get("split", "train"))))
        except UnicodeDecodeError:
            skipped.append(f"line {n}: not UTF-8 text")
        except (OSError, ValueError, KeyError, TypeError) as e:
            skipped.append(f"line {n}: {type(e).__name__}: {e}")
    return rows, skipped
