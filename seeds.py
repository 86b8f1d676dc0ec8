"""Seed VQA items for stage 01, from four sources in one row format:
  {id, image (PIL), question, options ([] for yes/no), answer ("A".. or "Yes"/"No"),
   targets [{name, bbox [x1, y1, x2, y2] in pixels}], split ("train"/"test")}

1. synthetic_item: coloured shapes with exact boxes, a spatial MCQ or an existence yes/no (the tiny preset);
2. the tiny world's scenes (world.seed_item; PRESET=tiny_world), in the same row format;
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


def check_seed_source(spec: str) -> str | None:
    """Why --seed_data cannot be read (None if it can), cheaply and before any model loads: a COCO
    annotation file that is missing or not COCO-format JSON, an image directory that is missing, a seed
    JSONL that is missing or holds no JSON row. Rows and images are still checked one by one later."""
    if spec in ("synthetic", "tiny_world", "tiny_world_fixed"):
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
