"""Stage 01: build AOT-SFT (scene extension + adversarial distractor implantation).

Reads seed VQA items with target boxes and writes, under the run directory:
  data/seed/       the synthetic seeds (only with --seed_data synthetic)
  data/scenes/     extended scenes that passed the three MLLM checks (the pool stages 03-05 attack)
  data/aot_sft/    (scene, adversarial instruction, scene + effective distractor) triples, train split
  data/funnel.json every decision counted (seed -> extended -> checks -> proposals -> effective),
                   skipped seed rows named;  data/gallery_01.png: scene | implanted | difference

  python 01_build_sft_data.py --preset tiny --run_dir runs/tiny            # CPU, synthetic seeds
  python 01_build_sft_data.py --run_dir runs/aot --seed_data seeds.jsonl   # paper models, 1 GPU
  python 01_build_sft_data.py --run_dir runs/aot --seed_data coco:coco/annotations/instances_train2017.json:coco/train2017
  torchrun --nproc_per_node 8 01_build_sft_data.py --run_dir runs/aot --seed_data seeds.jsonl

Seeds: --seed_data synthetic (coloured shapes), coco:ANNOTATIONS.json:IMAGE_DIR (COCO-format instances: the paper's kind
of spatial and existence questions derived from the boxes), or a JSONL (seeds.py; the formats: docs/seeds.md).

Mechanism (docs/paper_notes.md, "Stage 01"):
  1. scene extension: pad the canvas by --pad_ratio per side, outpaint the border with the editor (masked flow
     sampling: outside the mask the latents are re-noised from the original at every step, as diffusers' inpaint
     pipelines do), paste the original pixels back, then three judge checks asked as yes/no questions and decided
     from P(Yes) at the answer position: composition, duplication (one question per target category), realism;
  2. distractor proposal (MLLM JSON or random), validated: inside the image, no overlap with a
     target box (IoU and cover), not a target category or synonym, not named in the question;
  3. implantation: masked edit inside the distractor box, the instruction naming the object and the
     ninth of the image it goes in ("Add a clock at the top left of the image.");
  4. effectiveness: the target MLLM answers before and after; kept only if right before
     (--require_correct_before) and wrong after.

Our choices where the paper is silent:
  1. the three checks' wording and P(Yes) thresholds (flags); the original pixels are pasted back,
     so composition only has to judge coherence, not preservation;
  2. the extended scene is stored at the edit resolution (--resolution), boxes rescaled, so every
     later edit and SSIM compares images of one size;
  3. AOT-SFT is built from train-split scenes only: test scenes stay unseen by the attacker; --num_test_extra adds
     test-only items after the others (a larger held-out set: the train side stays as it was, bit for bit);
  4. one distractor per scene in AOT-SFT: of the first --implants_per_scene valid proposals (default 1;
     up to --num_proposals are checked), each implanted on its own, the first that fools the target.
Memory (bench/paper_scale.py): the editor and the judge do not fit one 80 GB GPU together; with --offload
(default) the MLLMs that take turns wait in CPU memory, the one in use on the GPU (parallel.OneOnDevice).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter

import common
import editing
import parallel
import rundir
import seeds
import world

PRESETS = {
    "tiny": dict(judge="tiny", target="tiny", editor="tiny", num_synthetic=32, synthetic_size=48,
                 resolution=64, cond_resolution=0, outpaint_steps=4, inpaint_steps=4, chunk_size=8, proposer="random",
                 require_correct_before=False, max_duplication=0.6, max_new_tokens=8),
    # tiny_world.py's models and scenes; its judge knows the world's questions only: the checks cannot fail
    "tiny_world": dict(judge="{run_dir}/models/defender", target="{run_dir}/models/defender",
                       editor="{run_dir}/models/editor", seed_data="tiny_world",
                       # 500 more test scenes: a take's 90% interval +-4 points, not +-10 (bench/tiny_world.md)
                       num_synthetic=600, num_test_extra=500, resolution=112, cond_resolution=0, outpaint_steps=8, inpaint_steps=8,
                       chunk_size=100, batch_size=50, proposer="random", min_box_frac=0.18, max_box_frac=0.26,
                       distractors="red triangle,blue triangle,orange triangle,purple triangle",
                       # up to four implants per scene: one keeps too few effective distractors (bench/tiny_world.md)
                       num_proposals=8, implants_per_scene=4,
                       min_composition=0.0, max_duplication=1.0, min_realism=0.0, max_new_tokens=8),
}


@dataclass
class Args:
    run_dir: str = field(default="runs/aot", metadata={"help": "run directory (outputs go under data/)"})
    preset: str | None = field(default=None, metadata={"help": "'tiny': small offline models and data"})
    seed_data: str = field(default="synthetic", metadata={"help": "'synthetic', 'tiny_world' (_fixed), a seed JSONL, or "
                                                                   "coco:ANNOTATIONS.json:IMAGE_DIR (docs/seeds.md)"})
    coco_min_area: float = field(default=0.01, metadata={"help": "COCO: min object box area, as a share of the image"})
    coco_min_gap: float = field(default=0.02, metadata={"help": "COCO: min gap of two boxes on the asked axis, share of the side"})
    coco_per_image: int = field(default=4, metadata={"help": "COCO: max questions per image"})
    num_seed_rows: int = field(default=0, metadata={"help": "COCO: max seed rows in all (0 = no cap)"})
    num_synthetic: int = field(default=2000, metadata={"help": "synthetic / tiny_world seed items"})
    num_test_extra: int = field(default=0, metadata={"help": "synthetic / tiny_world: more items after those, all test ones"})
    check_inputs: bool = field(default=False, metadata={"help": "only check that --seed_data can be read, then exit"})
    synthetic_size: int = field(default=512, metadata={"help": "synthetic image side (pixels)"})
    test_fraction: float = field(default=0.2, metadata={"help": "synthetic items in the test split"})
    judge: str = field(default=common.DEFENDER_ID, metadata={"help": "MLLM for checks and proposals"})
    target: str = field(default=common.DEFENDER_ID, metadata={"help": "MLLM whose failure = effective"})
    editor: str = field(default=editing.ATTACKER_ID, metadata={"help": "Qwen-Image-Edit (hub id/path)"})
    pad_ratio: float = field(default=0.25, metadata={"help": "canvas padding per side (x width/height)"})
    resolution: int = field(default=512, metadata={"help": "edit resolution (sqrt of pixel area)"})
    cond_resolution: int = field(default=1024, metadata={"help": "condition image (VAE latents + the image the text "
                                                                   "encoder sees) at ~this^2 pixels, as the pipeline; 0 = "
                                                                   "at --resolution"})
    outpaint_steps: int = field(default=30, metadata={"help": "sampling steps for outpainting"})
    inpaint_steps: int = field(default=30, metadata={"help": "sampling steps for implantation"})
    cfg: float = field(default=4.0, metadata={"help": "true CFG scale of the editor"})
    min_composition: float = field(default=0.5, metadata={"help": "P(Yes) >= this passes composition"})
    max_duplication: float = field(default=0.5, metadata={"help": "P(Yes: duplicate) <= this passes"})
    min_realism: float = field(default=0.5, metadata={"help": "P(Yes) >= this passes realism"})
    proposer: str = field(default="mllm", metadata={"help": "'mllm' (JSON proposals) or 'random'"})
    num_proposals: int = field(default=3, metadata={"help": "proposals checked per scene"})
    implants_per_scene: int = field(default=1, metadata={"help": "valid proposals implanted per scene (each its own "
                                                                "edit); the first that fools the target is kept"})
    proposal_retries: int = field(default=3, metadata={"help": "MLLM retries on unparseable answers"})
    max_iou: float = field(default=0.0, metadata={"help": "max IoU of a distractor with a target box"})
    max_cover: float = field(default=0.0, metadata={"help": "max share of a target box it may cover"})
    min_box_frac: float = field(default=0.12, metadata={"help": "random proposer: min box side / image"})
    max_box_frac: float = field(default=0.3, metadata={"help": "random proposer: max box side / image"})
    distractors: str = field(default="", metadata={"help": "random proposer: comma-separated object names "
                                                            "(default: everyday objects, DISTRACTOR_CATEGORIES)"})
    require_correct_before: bool = field(default=True, metadata={"help": "keep only if right before"})
    max_new_tokens: int = field(default=128, metadata={"help": "target/proposer answer length"})
    chunk_size: int = field(default=64, metadata={"help": "rows per resumable chunk"})
    batch_size: int = field(default=8, metadata={"help": "model batch size"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: bf16, fp32, auto (bf16 on GPU)"})
    offload: bool = field(default=True, metadata={"help": "GPU: keep only the MLLM in use (editor text encoder, "
                                                           "judge, target) on the GPU, the others in CPU memory"})
    gallery_rows: int = field(default=4, metadata={"help": "rows in data/gallery_01.png"})


def extend_canvas(image: Image.Image, targets, pad_ratio: float, resolution: int):
    """Pad (edge colours, blurred) -> canvas, border mask, boxes in canvas coords, all resized to the edit size."""
    w, h = image.size
    px, py = int(round(w * pad_ratio)), int(round(h * pad_ratio))
    cw, ch = w + 2 * px, h + 2 * py
    canvas = image.resize((cw, ch), Image.BILINEAR).filter(ImageFilter.GaussianBlur(max(2, cw // 32)))
    canvas.paste(image, (px, py))
    mask = Image.new("L", (cw, ch), 255)
    mask.paste(0, (px, py, px + w, py + h))
    ew, eh = editing.snap_size(canvas, resolution)
    sx, sy = ew / cw, eh / ch
    boxes = [{"name": t["name"], "bbox": [(t["bbox"][0] + px) * sx, (t["bbox"][1] + py) * sy,
                                          (t["bbox"][2] + px) * sx, (t["bbox"][3] + py) * sy]} for t in targets]
    return canvas.resize((ew, eh), Image.BICUBIC), mask.resize((ew, eh), Image.NEAREST), boxes


# ---------------------------------------------------------------------------------------------
# The three checks, proposals and their validation
# ---------------------------------------------------------------------------------------------
CHECKS = {
    "composition": "Does this image show one coherent scene in which this question can still be answered: \"{question}\"?",
    "duplication": "Is there more than one {name} in this image?",
    "realism": "Does this image look like a single natural photograph rather than a collage or an edit?",
}


@torch.no_grad()
def check_decisions(p_comp, p_dup_per_row, p_real, args) -> list[dict]:
    """Per row: pass/fail of each check from P(Yes) (duplication: every target must pass)."""
    return [{"composition": pc >= args.min_composition,
             "duplication": all(p <= args.max_duplication for p in pd),
             "realism": pr >= args.min_realism} for pc, pd, pr in zip(p_comp, p_dup_per_row, p_real)]


SYNONYMS = [{"cell phone", "phone", "cellphone", "mobile phone", "smartphone", "mobile"},
            {"cup", "mug"}, {"bottle", "flask"}, {"sofa", "couch"}, {"tv", "television", "monitor", "screen"},
            {"person", "man", "woman", "people", "boy", "girl", "child"}, {"car", "vehicle", "automobile"},
            {"bike", "bicycle"}, {"laptop", "computer", "notebook"}, {"dog", "puppy"}, {"cat", "kitten"},
            {"square", "box", "cube"}, {"circle", "ball", "disc", "disk"}, {"triangle", "pyramid"}]
DISTRACTOR_CATEGORIES = ["clock", "cup", "lamp", "book", "vase", "plant", "chair", "bottle", "cell phone",
                         "ball", "box", "hat", "shoe", "apple", "bowl", "toy car", "candle", "bag"]


def _concepts(name: str) -> set[str]:
    """Words and multi-word names of an object, closed under the synonym table."""
    name = name.lower().strip()
    words = set(name.replace("-", " ").split()) | {name}
    out = set(words)
    for group in SYNONYMS:
        if group & words:
            out |= group
    return out


def box_overlap(a, b) -> tuple[float, float]:
    """(IoU, share of b covered by a)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / max(area_a + area_b - inter, 1e-9), inter / max(area_b, 1e-9)


def validate_proposal(prop: dict, targets: list[dict], question: str, size, args) -> str | None:
    """None if valid, else the reason ('outside', 'overlap', 'category')."""
    w, h = size
    x1, y1, x2, y2 = prop["bbox"]
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h) or (x2 - x1) < 4 or (y2 - y1) < 4:
        return "outside"
    for t in targets:
        iou, cover = box_overlap(prop["bbox"], t["bbox"])
        if iou > args.max_iou or cover > args.max_cover:
            return "overlap"
    head = prop["object"].lower().split()[-1] if prop["object"].split() else ""
    concepts = _concepts(prop["object"])
    target_concepts = set().union(*[_concepts(t["name"].split()[-1]) for t in targets]) if targets else set()
    question_words = set(question.lower().replace("?", " ").replace(",", " ").split())
    if not head or concepts & target_concepts or _concepts(head) & question_words:
        return "category"
    return None


def random_proposals(size, n, rng: random.Random, args) -> list[dict]:
    w, h = size
    out = []
    for _ in range(n):
        side = rng.uniform(args.min_box_frac, args.max_box_frac) * min(w, h)
        x1, y1 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        names = [n.strip() for n in args.distractors.split(",") if n.strip()] or DISTRACTOR_CATEGORIES
        out.append({"object": rng.choice(names), "bbox": [x1, y1, x1 + side, y1 + side]})
    return out


PROPOSE = ("The image is {w}x{h} pixels. Propose {n} small everyday objects that could plausibly be in "
           "this scene and could mislead someone answering: \"{question}\". Do not propose {avoid}. "
           "Answer only with JSON: [{{\"object\": \"small wooden clock\", \"bbox\": [x1, y1, x2, y2]}}, ...] "
           "in pixel coordinates.")


def parse_proposals(text: str) -> list[dict] | None:
    """JSON list of {object, bbox[4]} found in the answer; None when nothing parses."""
    start, end = text.find("["), text.rfind("]")
    for cand in ([text[start:end + 1]] if 0 <= start < end else []) + [text]:
        try:
            data = json.loads(cand)
        except json.JSONDecodeError:
            continue
        data = data if isinstance(data, list) else [data]
        props = [{"object": str(d["object"]), "bbox": [float(v) for v in d["bbox"]]} for d in data
                 if isinstance(d, dict) and isinstance(d.get("object"), str)
                 and isinstance(d.get("bbox"), list) and len(d["bbox"]) == 4
                 and all(isinstance(v, (int, float)) for v in d["bbox"])]
        if props:
            return props
    return None


def mllm_proposals(model, processor, scenes, args, counts) -> list[list[dict] | None]:
    """Ask the judge for JSON proposals; retry unparseable ones (sampling) a bounded number of times."""
    result: list[list[dict] | None] = [None] * len(scenes)
    todo = list(range(len(scenes)))
    for attempt in range(1 + args.proposal_retries):
        if not todo:
            break
        prompts = [PROPOSE.format(w=scenes[i]["image"].width, h=scenes[i]["image"].height, n=args.num_proposals,
                                  question=scenes[i]["question"],
                                  avoid=", ".join(t["name"] for t in scenes[i]["targets"]) or "anything asked about")
                   for i in todo]
        answers = common.defender_generate(model, processor, [scenes[i]["image"] for i in todo], prompts,
                                           max_new_tokens=args.max_new_tokens,
                                           temperature=0.0 if attempt == 0 else 0.7, batch_size=args.batch_size)
        still = []
        for i, text in zip(todo, answers):
            props = parse_proposals(text)
            if props is None:
                counts["proposal_unparseable_answers"] += 1
                still.append(i)
            else:
                result[i] = props
        todo = still
    return result


# ---------------------------------------------------------------------------------------------
# One chunk: everything for a fixed slice of the seed rows
# ---------------------------------------------------------------------------------------------
def new_counts() -> dict:
    keys = ["seed_rows", "extended", "passed_composition", "passed_duplication", "passed_realism",
            "scenes", "proposal_unparseable_answers", "proposal_scenes_skipped_unparseable",
            "proposals_checked", "rejected_outside", "rejected_overlap", "rejected_category",
            "scenes_with_valid_proposal", "implanted", "correct_before", "wrong_after", "effective_implants",
            "effective"]
    return {k: 0 for k in keys}


def process_chunk(rows, chunk_idx, models, args):
    """The paper's two stages on a chunk of seed rows: scene extension (outpaint, three checks), then
    adversarial implantation (propose, validate, inpaint, keep the effective). -> (scenes, AOT-SFT rows, counts)."""
    judge, judge_proc, target, target_proc, editor, swap = models
    counts = new_counts()
    counts["seed_rows"] = len(rows)
    gen = torch.Generator().manual_seed(args.seed * 7919 + chunk_idx)
    rng = random.Random(args.seed * 7919 + chunk_idx)
    torch.manual_seed(args.seed * 7919 + chunk_idx)   # the proposer's sampled retries: a chunk's own, as on resume
    canvases = [extend_canvas(r["image"], r["targets"], args.pad_ratio, args.resolution) for r in rows]
    extended = outpaint(canvases, editor, swap, gen, args, counts)
    scenes = check_scenes(rows, canvases, extended, judge, judge_proc, swap, args, counts)
    chosen = propose_distractors([s for s in scenes if s["split"] == "train"], judge, judge_proc, swap, rng, args, counts)
    implanted = implant(chosen, editor, swap, gen, args, counts)
    return scenes, keep_effective(implanted, target, target_proc, swap, args, counts), counts


def outpaint(canvases, editor, swap, gen, args, counts) -> list:
    """1. Scene extension: outpaint each padded canvas's border (batched by size: one latent shape)."""
    extended = [None] * len(canvases)
    by_size: dict = {}
    for i, (canvas, _, _) in enumerate(canvases):
        by_size.setdefault(canvas.size, []).append(i)
    swap.use(editor.text_encoder)
    for idx in by_size.values():
        for j in range(0, len(idx), args.batch_size):
            b = idx[j:j + args.batch_size]
            outs = editing.masked_edit(editor, [canvases[i][0] for i in b],
                               ["Extend the scene naturally beyond its borders."] * len(b),
                               [canvases[i][1] for i in b], args.outpaint_steps, args.cfg, gen, args.resolution,
                               args.cond_resolution)
            for i, o in zip(b, outs):
                extended[i] = o
    counts["extended"] = len(canvases)
    return extended


def check_scenes(rows, canvases, extended, judge, judge_proc, swap, args, counts) -> list[dict]:
    """2. The three MLLM checks (P(Yes) from one forward each): composition, duplication per target, realism."""
    swap.use(judge)
    p_comp = common.defender_p_yes(judge, judge_proc, extended, [CHECKS["composition"].format(question=r["question"])
                                                          for r in rows], args.batch_size).tolist()
    dup_q = [(i, CHECKS["duplication"].format(name=t["name"])) for i, (_, _, boxes) in enumerate(canvases)
             for t in boxes]
    p_dup_flat = common.defender_p_yes(judge, judge_proc, [extended[i] for i, _ in dup_q], [q for _, q in dup_q],
                                args.batch_size).tolist()
    p_dup = [[p for (i, _), p in zip(dup_q, p_dup_flat) if i == k] for k in range(len(rows))]
    p_real = common.defender_p_yes(judge, judge_proc, extended, [CHECKS["realism"]] * len(rows), args.batch_size).tolist()
    scenes = []
    for r, (_, _, boxes), img, d in zip(rows, canvases, extended, check_decisions(p_comp, p_dup, p_real, args)):
        counts["passed_composition"] += d["composition"]
        counts["passed_duplication"] += d["composition"] and d["duplication"]
        if d["composition"] and d["duplication"] and d["realism"]:
            counts["passed_realism"] += 1
            scenes.append({**r, "image": img, "targets": boxes})
    counts["scenes"] = len(scenes)
    return scenes


def propose_distractors(train, judge, judge_proc, swap, rng, args, counts) -> list[tuple]:
    """3. Distractor proposals for the train scenes (only they feed AOT-SFT), validated: up to
    --implants_per_scene valid (scene, proposal) pairs per scene."""
    if args.proposer == "mllm":
        swap.use(judge)
        proposals = mllm_proposals(judge, judge_proc, train, args, counts)
    else:
        proposals = [random_proposals(s["image"].size, args.num_proposals, rng, args) for s in train]
    chosen = []
    for s, props in zip(train, proposals):
        if props is None:
            counts["proposal_scenes_skipped_unparseable"] += 1
            continue
        valid = []
        for p in props[:args.num_proposals]:
            counts["proposals_checked"] += 1
            reason = validate_proposal(p, s["targets"], s["question"], s["image"].size, args)
            if reason:
                counts[f"rejected_{reason}"] += 1
                continue
            valid.append((s, p))
            if len(valid) == args.implants_per_scene:
                break
        chosen += valid
        counts["scenes_with_valid_proposal"] += bool(valid)
    return chosen


def implant(chosen, editor, swap, gen, args, counts) -> list[tuple]:
    """4. Implantation: a masked edit inside each distractor's box. -> (scene, proposal, implanted image)."""
    implanted = []
    if chosen:
        swap.use(editor.text_encoder)
    for j in range(0, len(chosen), args.batch_size):
        by = {}
        for s, p in chosen[j:j + args.batch_size]:
            by.setdefault(s["image"].size, []).append((s, p))
        for group in by.values():
            masks = []
            for s, p in group:
                mk = Image.new("L", s["image"].size, 0)
                ImageDraw.Draw(mk).rectangle([int(v) for v in p["bbox"]], fill=255)
                masks.append(mk)
            outs = editing.masked_edit(editor, [s["image"] for s, _ in group],
                               [common.implant_instruction(p["object"], p["bbox"], *s["image"].size) for s, p in group],
                               masks, args.inpaint_steps, args.cfg, gen, args.resolution, args.cond_resolution)
            implanted += [(s, p, o) for (s, p), o in zip(group, outs)]
    counts["implanted"] = len(implanted)
    return implanted


def keep_effective(implanted, target, target_proc, swap, args, counts) -> list[dict]:
    """5. Effectiveness: the target answers the scene and the implanted scene; an implant is effective when
    the second answer is wrong (and, with --require_correct_before, the first right). One row per scene."""
    if not implanted:
        return []
    swap.use(target)
    prompts = [common.defender_prompt(s["question"], s["options"]) for s, _, _ in implanted]
    before = common.defender_generate(target, target_proc, [s["image"] for s, _, _ in implanted], prompts,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    after = common.defender_generate(target, target_proc, [o for _, _, o in implanted], prompts,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    sft, kept = [], set()
    for (s, p, o), a0, a1 in zip(implanted, before, after):
        right0 = common.extract_answer(a0, s["options"]) == s["answer"]
        wrong1 = common.extract_answer(a1, s["options"]) != s["answer"]
        counts["correct_before"] += right0
        counts["wrong_after"] += wrong1
        if wrong1 and (right0 or not args.require_correct_before):
            counts["effective_implants"] += 1
            if s["id"] in kept:                         # one triple per scene: its first effective implant
                continue
            kept.add(s["id"])
            counts["effective"] += 1
            sft.append({**s, "edited_image": o, "instruction": common.attack_instruction(s["question"]),
                        "distractor": {"name": p["object"], "bbox": p["bbox"]},
                        "defender_answer_clean": a0, "defender_answer_edited": a1})
    return sft


# ---------------------------------------------------------------------------------------------
def read_seeds(args, ddp, data: Path):
    """-> (seed rows, skipped items by name, rejected question candidates by reason). Every rank reads them
    identically; rank 0 writes data/seed for generated seeds."""
    if args.seed_data in ("synthetic", "tiny_world", "tiny_world_fixed"):      # the last: A = left / above
        order, n = "fixed" if args.seed_data.endswith("_fixed") else "random", args.num_synthetic
        rows = [seeds.synthetic_item(i, args.synthetic_size, f, args.seed) if args.seed_data == "synthetic"
                else world.seed_item(i, f, args.seed, order) for i, f in common.progress(
                [(i, args.test_fraction if i < n else 1.0) for i in range(n + args.num_test_extra)],
                desc=f"[01] {args.seed_data} seeds", lines=True)]
        skipped, rejected = [], {}
        if ddp.master and not (data / "seed").exists():
            rundir.save_rows(rows, "seed", rundir.tmp_dir_for(data / "seed"))
            rundir.commit_dir(rundir.tmp_dir_for(data / "seed"), data / "seed")
    elif args.seed_data.startswith("coco:"):
        rows, skipped, rejected = seeds.read_coco(args.seed_data, args)
        parallel.print0(f"[01] COCO: {len(rows)} questions; candidates rejected: {rejected or 'none'}")
        for s in skipped:
            parallel.print0(f"[01] skipped: {s}")
    else:
        (rows, skipped), rejected = seeds.read_seed_jsonl(Path(args.seed_data)), {}
        for s in skipped:
            parallel.print0(f"[01] skipped seed row: {s}")
    if not rows:
        raise SystemExit(f"[01] no usable seed rows in {args.seed_data} ({len(skipped)} skipped): nothing to build")
    return rows, skipped, rejected


def load_models(args, ddp):
    """The judge, the target (the same model unless named apart) and the editor; with --offload the MLLMs
    start in CPU memory and take turns on the GPU."""
    dtype = common.resolve_dtype(args.dtype, ddp.device)
    swap = parallel.OneOnDevice(ddp.device, args.offload)
    parked = "cpu" if swap.enabled else ddp.device
    judge, judge_proc = common.load_defender(args.judge, parked, dtype=dtype)
    target, target_proc = (judge, judge_proc) if args.target == args.judge else \
        common.load_defender(args.target, parked, dtype=dtype)
    editor = editing.load_attacker(args.editor, device=ddp.device, dtype=dtype)
    if swap.enabled:
        editor.text_encoder.to("cpu")
    return judge, judge_proc, target, target_proc, editor, swap


def merge_chunks(work: Path, data: Path, n_chunks: int, skipped, rejected, args) -> dict:
    """Rank 0: the chunks in order -> data/scenes, data/aot_sft, data/funnel.json, data/gallery_01.png."""
    from datasets import concatenate_datasets, load_from_disk
    total = new_counts()
    parts = {"scenes": [], "aot_sft": []}
    for c in range(n_chunks):
        d = work / f"chunk_{c:05d}"
        counts = json.loads((d / "counts.json").read_text())
        for k, v in counts.items():
            total[k] += v
        for kind, n in (("scenes", counts["scenes"]), ("aot_sft", counts["effective"])):
            if n:   # a saved 0-row dataset does not load back (datasets' empty Arrow table)
                parts[kind].append(load_from_disk(str(d / kind)))
    for kind, dsets in parts.items():
        if not dsets:
            raise SystemExit(f"[01] {kind} is empty: see the funnel {total}")
        ds = concatenate_datasets(dsets)
        assert len(set(ds["id"])) == len(ds), f"duplicate ids in {kind}"
        ds.save_to_disk(str(rundir.tmp_dir_for(data / kind)))
    funnel = {"counts": total, "skipped_seed_rows": skipped, "num_skipped_seed_rows": len(skipped),
              "seed_candidates_rejected": rejected, "args": {k: v for k, v in vars(args).items()}}
    (data / "funnel.json").write_text(json.dumps(funnel, indent=2))
    sft = load_from_disk(str(rundir.tmp_dir_for(data / "aot_sft")))
    rundir.save_gallery([(r["image"], r["edited_image"]) for r in sft.select(range(min(args.gallery_rows, len(sft))))],
                        data / "gallery_01.png")
    for kind in ("scenes", "aot_sft"):
        rundir.commit_dir(rundir.tmp_dir_for(data / kind), data / kind)
    shutil.rmtree(work, ignore_errors=True)
    return total


def main(args: Args):
    if (why := seeds.check_seed_source(args.seed_data)) is not None:
        raise SystemExit(f"[01] --seed_data {args.seed_data}: {why}")
    if args.check_inputs:
        print(f"[01] --seed_data {args.seed_data}: readable")
        return
    if not 1 <= args.implants_per_scene <= args.num_proposals:
        raise SystemExit(f"[01] --implants_per_scene {args.implants_per_scene}: needs 1 <= it <= --num_proposals "
                         f"({args.num_proposals})")
    common.quiet()
    ddp = parallel.setup_distributed()
    data = Path(args.run_dir) / "data"
    work = data / ".tmp_01_chunks"
    if (data / "scenes").exists() and (data / "aot_sft").exists():
        parallel.print0(f"[01] {data}/scenes and aot_sft exist: nothing to do")
        return
    t0 = time.time()
    rows, skipped, rejected = read_seeds(args, ddp, data)
    n_chunks = math.ceil(len(rows) / args.chunk_size)
    mine = [c for c in range(n_chunks) if c % ddp.world == ddp.rank]
    done = [c for c in mine if (work / f"chunk_{c:05d}" / "counts.json").exists()]
    parallel.print0(f"[01] {len(rows)} seed rows ({len(skipped)} skipped) -> {n_chunks} chunks of {args.chunk_size} "
                    f"over {ddp.world} rank(s); judge={args.judge} target={args.target} editor={args.editor}")
    if done:
        print(f"[01] rank {ddp.rank}: resuming, {len(done)}/{len(mine)} chunk(s) already done", flush=True)
    todo = [c for c in mine if c not in done]
    models = load_models(args, ddp) if todo else None
    for c in common.progress(todo, desc=f"[01] rank {ddp.rank} chunks"):
        tc = time.time()
        scenes, sft, counts = process_chunk(rows[c * args.chunk_size:(c + 1) * args.chunk_size], c, models, args)
        tmp = work / f".tmp_chunk_{c:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rundir.save_rows(scenes, "scenes", tmp / "scenes")
        rundir.save_rows(sft, "aot_sft", tmp / "aot_sft")
        (tmp / "counts.json").write_text(json.dumps(counts))
        rundir.commit_dir(tmp, work / f"chunk_{c:05d}")  # a chunk is done only once renamed
        print(f"[01] rank {ddp.rank} chunk {c + 1}/{n_chunks}: {counts['scenes']} scenes, "
              f"{counts['effective']} effective ({len(sft) / max(1, time.time() - tc):.2f} rows/s)", flush=True)
    parallel.barrier()
    if ddp.master:
        total = merge_chunks(work, data, n_chunks, skipped, rejected, args)
        print("[01] funnel: " + " -> ".join(f"{k} {total[k]}" for k in
              ["seed_rows", "extended", "passed_composition", "passed_duplication", "passed_realism",
               "scenes_with_valid_proposal", "implanted", "effective"]) + f" | skipped seed rows {len(skipped)}")
        print(f"[01] wrote {data}/scenes ({total['scenes']}), aot_sft ({total['effective']}) in "
              f"{time.time() - t0:.0f}s, peak mem {parallel.peak_memory_gb(ddp.device):.2f} GB")
    parallel.cleanup_distributed()


if __name__ == "__main__":
    main(rundir.parse_args(Args, PRESETS))
