"""Stage 05: score a defender on the paper's benchmarks and on held-out attacks.

Reads:  defender/round_k/ (or the base model: --defender base), benchmark TSVs (VLMEvalKit format,
        --bench NAME=PATH), data/scenes (test split), attacks/round_*/test
Writes: eval/preds/<name>/<bench>.jsonl (per item, every trial, so a re-run scores only what is missing),
        eval/<name>.json (name: round_k or base), eval/summary.md (every defender so far beside the
        paper's table), eval/robustness.png, eval/curves.png (the training curves in logs/*.jsonl)

  python 05_eval.py --preset tiny --run_dir runs/tiny --round 0
  python 05_eval.py --run_dir runs/aot --defender base --bench vstar=bench/VStarBench.tsv   # the untouched base
  python 05_eval.py --run_dir runs/aot --round 3 \
      --bench vstar=bench/VStarBench.tsv pope=bench/POPE.tsv hallusionbench=bench/HallusionBench.tsv
  torchrun --nproc_per_node 8 05_eval.py ...           # items sharded over ranks

As the authors' eval scripts (eval/; docs/paper_notes.md, "Stage 05") compute it:
  prompts         eval/config/prompts.toml: yes/no and MCQ wordings, text before the image; options as
                  "Options:\nA. x" (HR-Bench and every other MCQ) or "(A) x" (V*)
  extraction      yes/no: final-answer phrase, first box, first yes/no word (POPE, HallusionBench and
                  every yes/no item); HR-Bench's and V*'s own letter rules (common.extract_*)
  decoding        strict multi-trial: up to 3 greedy answers of up to 4096 tokens, stopping at the first
                  wrong one; correct only if every trial is (--trial_temperature > 0 samples trials 2..N)
  vstar, hrbench  correct / total over all rows (+ per category; HR-Bench: VLMEvalKit's cycle average too)
  pope            strict accuracy over the rows; precision / recall / F1 ('Yes' positive) from the last
                  trial; per category with comma-joined categories split
  hallusionbench  aAcc; fAcc / qAcc grouped by l2-category + set / figure / question id from the index
                  string (VLMEvalKit's headline, the mean of the three, is reported beside it)
  mmmu, mmstar,   no official script: as VLMEvalKit prompts and scores Qwen2-VL models without a judge,
  realworldqa,    in its version of the paper's time (before commit a67ace5, 2026-06-17, which added an
  blink, ai2d     "answer is X" fallback): vlmeval/vlm/qwen2_vl/prompt.py, vlmeval/utils/matching_util.py.
                  The TSV is read with pandas' defaults (an option "None", "NA", "N/A", "null" or "nan" is
                  missing; a numeric option column with gaps reads as floats, "5.0"); every image of the
                  row first, in its order (MMMU's "<image k>" stay in the text), then "Hint / Question /
                  Options / Please select the correct answer from the options above."; the answer is the
                  one option letter among its last four tokens, else the one option text it contains;
                  every question without options (MMMU's open ones, "Yes" / "No" references too) is
                  matched as MMMU_preproc makes it multiple-choice (A = the reference answer, B = "Other
                  Answers"); headline overall accuracy, + per category and l2-category
  anything else   MCQ or yes/no accuracy with the official rules above
Rows VLMEvalKit stores as a back-reference to another row's image are resolved, multi-image rows (a
JSON list of base64 images) keep every image; any row that cannot be scored (an unreadable image, an
empty question or answer, an answer letter not among the options) is named with its reason in
eval/<name>.json. Every --bench file is checked before the model loads; a benchmark's result is written
to eval/scores/<name>/<bench>.json as soon as it is scored.
Robustness: on the run's test scenes, accuracy clean vs attacked by every attacker round so far, and the
attack success rate (share of clean-correct items the attack turns wrong). An attacker edits only the test
scenes with target boxes (03's choice 6): its drop is measured against the clean accuracy on those scenes.
The headline counts the attacks that pass the attacker's own local-SSIM gate (one that fails it may have
changed the targets, and so the right answer); every attack is scored beside it ('all'), with the share
of the image each attack changed (summed |RGB| difference > 60; median and quartiles per attacker).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import common
import parallel
import rundir

PRESETS = {"tiny": dict(model="tiny", max_new_tokens=8, trials=1, paper_table=False),
           "tiny_world": dict(model="{run_dir}/models/defender", max_new_tokens=8, trials=1, paper_table=False)}

PAPER = {  # authors' table, Qwen2.5-VL-7B base -> clean-data DAPO (ablation) -> Defender Iter. 1..3
    "base": dict(vstar=71.0, hrbench4k=64.1, hrbench8k=64.9, hallusionbench=67.5, pope=77.1, mmmu=20.7, mmstar=60.3,
                 realworldqa=67.7, blink=54.1, ai2d=81.0),
    "clean-data DAPO": dict(vstar=74.8, hrbench4k=71.8, hrbench8k=70.6, hallusionbench=67.9, pope=79.8, mmmu=21.3,
                            mmstar=60.9, realworldqa=69.3, blink=54.5, ai2d=80.7),
    "Iter. 1": dict(vstar=75.6, hrbench4k=71.4, hrbench8k=69.4, hallusionbench=67.8, pope=80.1, mmmu=20.0,
                    mmstar=61.3, realworldqa=69.3, blink=54.5, ai2d=81.1),
    "Iter. 2": dict(vstar=77.3, hrbench4k=72.0, hrbench8k=69.9, hallusionbench=68.2, pope=80.3, mmmu=23.3,
                    mmstar=61.4, realworldqa=69.3, blink=54.8, ai2d=81.2),
    "Iter. 3": dict(vstar=80.2, hrbench4k=72.4, hrbench8k=71.5, hallusionbench=69.2, pope=80.0, mmmu=25.3,
                    mmstar=61.5, realworldqa=70.1, blink=55.9, ai2d=81.3),
}
COLUMNS = ["vstar", "hrbench4k", "hrbench8k", "hallusionbench", "pope", "mmmu", "mmstar", "realworldqa", "blink",
           "ai2d"]


@dataclass
class Args:
    run_dir: str = field(default="runs/aot", metadata={"help": "run directory"})
    preset: str | None = field(default=None, metadata={"help": "'tiny': short answers"})
    round: int = field(default=0, metadata={"help": "defender round to score"})
    defender: str | None = field(default=None, metadata={"help": "default defender/round_k; 'base' scores --model "
                                                                   "(written as eval/base.json); or any hub id / path"})
    name: str | None = field(default=None, metadata={"help": "write eval/<name>.json (default: base or round_k)"})
    model: str = field(default=common.DEFENDER_ID, metadata={"help": "base model id (for --defender base)"})
    bench: list[str] = field(default_factory=list, metadata={"help": "NAME=PATH.tsv ... (one flag, several values)"})
    trials: int = field(default=3, metadata={"help": "strict multi-trial count (official: 3)"})
    trial_temperature: float = field(default=0.0, metadata={"help": "temperature of trials 2..N (official: 0)"})
    max_new_tokens: int = field(default=4096, metadata={"help": "answer length (official: 4096)"})
    batch_size: int = field(default=16, metadata={"help": "max prompts per generate call"})
    gen_memory_gb: float = field(default=40.0, metadata={"help": "KV cache + prefill budget of a generate call "
                                                                 "(GB): large images get smaller batches"})
    max_items: int = field(default=0, metadata={"help": "cap per benchmark (0 = all)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: bf16, fp32, auto (bf16 on GPU)"})
    paper_table: bool = field(default=True, metadata={"help": "print the paper's numbers beside ours"})
    check_inputs: bool = field(default=False, metadata={"help": "only check the --bench files, then exit"})


# ---------------------------------------------------------------------------------------------
# Benchmarks: loading and scoring
# ---------------------------------------------------------------------------------------------
def decode_row_images(raw: str, stored: dict) -> list[Image.Image]:
    """A TSV `image` cell -> its images: one base64 string, a JSON list of them (multi-image rows, in
    VLMEvalKit's order), or a back-reference (<= 64 characters) to another row's cell. Raises ValueError
    with the reason."""
    parts = [raw]
    if raw.lstrip().startswith("["):
        try:
            parts = json.loads(raw)
        except ValueError:
            raise ValueError("image cell starts with '[' but is not a JSON list of base64 strings") from None
        if not parts or not all(isinstance(x, str) for x in parts):
            raise ValueError("image cell is an empty or non-string JSON list")
    images = []
    for k, part in enumerate(parts):
        data = part if len(part) > 64 else stored.get(part)
        if data is None or data.lstrip().startswith("["):
            raise ValueError(f"image {k + 1} refers to index {part!r}, which holds no single image")
        try:
            images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        except (ValueError, OSError) as e:
            raise ValueError(f"unreadable image {k + 1} of {len(parts)} ({type(e).__name__})") from None
    return images


REQUIRED_COLUMNS = ("index", "image", "question", "answer")


def check_bench_file(path: str) -> str | None:
    """Why a benchmark TSV cannot be read (None if it can): missing, empty, not UTF-8 text, not
    tab-separated, or missing a required column. Cheap: the header, then the bytes streamed once."""
    import codecs
    p = Path(path)
    if not p.is_file():
        return "no such file"
    if p.stat().st_size == 0:
        return "empty file"
    decoder, header = codecs.getincrementaldecoder("utf-8")(), ""
    with p.open("rb") as f:
        while chunk := f.read(1 << 24):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return f"not UTF-8 text ({e.reason} at byte {f.tell() - len(chunk) + e.start})"
            if "\n" not in header:
                header += text[:1 << 16]
    first = header.split("\n", 1)[0].rstrip("\r")
    if "\t" not in first:
        return "not tab-separated (its first line has no tab)"
    missing = [c for c in REQUIRED_COLUMNS if c not in first.split("\t")]
    return f"missing column(s) {', '.join(missing)} (header: {first[:120]!r})" if missing else None


def check_benches(specs: list[str]) -> list[tuple[str, str]]:
    """--bench NAME=PATH ... -> [(name, path)], after checking every file: all problems are printed,
    one line each, and 05 stops before any model is loaded."""
    out, problems = [], []
    for spec in specs:
        if "=" not in spec:
            problems.append(f"--bench expects NAME=PATH, got {spec!r}")
            continue
        name, path = spec.split("=", 1)
        if (why := check_bench_file(path)) is not None:
            problems.append(f"{name}={path}: {why}")
        out.append((name, path))
    if problems:
        raise SystemExit("\n".join(f"[05] {x}" for x in problems))
    return out


def read_tsv(path: str, **kw):
    import pandas as pd
    try:
        return pd.read_csv(path, sep="\t", **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"[05] {path}: cannot be read as a TSV ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def option_cells(path: str, df, letters: list[str], vlmevalkit: bool) -> list[list[str]]:
    """Each row's option cells A.. ('' = no option). The authors' scripts read their TSVs as text
    (keep_default_na=False); VLMEvalKit reads them with pandas' defaults, so there an option "None",
    "NA", "N/A", "null" or "nan" is missing and a numeric column with gaps reads as floats ("5.0")."""
    if not vlmevalkit or not letters:
        return [[r[c] for c in letters] for _, r in df.iterrows()]
    raw = read_tsv(path, usecols=letters)
    return [["" if v != v else str(v) for v in (r[c] for c in letters)] for _, r in raw.iterrows()]


def load_tsv(path: str, max_items: int = 0, vlmevalkit: bool = False) -> tuple[list[dict], dict]:
    """VLMEvalKit TSV -> (items {index, image, question, options, letters, answer, kind, meta}, {skipped
    index: reason}). `image` is one PIL image, or a list of them for multi-image rows (BLINK, MMMU). An
    `image` of at most 64 characters is a back-reference to the row with that index (VLMEvalKit stores
    a repeated image once). kind: 'mcq' (options), 'yes_no' (no options, a yes/no answer) or 'open'
    (no options: MMMU's open questions; with vlmevalkit, every row without options). Rows that cannot
    be scored (an empty question or answer, an answer letter that is not among the options) are skipped
    with their reason."""
    if (why := check_bench_file(path)) is not None:
        raise SystemExit(f"[05] {path}: {why}")
    df = read_tsv(path, dtype=str, keep_default_na=False)
    letters = [c for c in common.OPTION_LETTERS if c in df.columns]
    cells = option_cells(path, df, letters, vlmevalkit)
    stored = {r["index"]: r["image"] for _, r in df.iterrows() if len(r["image"]) > 64}
    items, skipped = [], {}
    for (_, r), row_options in zip(df.iterrows(), cells):
        present = [c for c, o in zip(letters, row_options) if o.strip()]
        answer = r["answer"].strip()
        if not r["question"].strip() or not answer:
            skipped[r["index"]] = "empty question" if not r["question"].strip() else "empty answer"
            continue
        if present and answer.upper() not in present:
            skipped[r["index"]] = f"answer {answer!r} is not among the options ({', '.join(present)})"
            continue
        cell = r["image"]
        raw = cell if len(cell) > 64 or cell.lstrip().startswith("[") else stored.get(cell)
        if raw is None:
            skipped[r["index"]] = f"image refers to index {cell!r}, which holds no image"
            continue
        try:
            images = decode_row_images(raw, stored)
        except ValueError as e:
            skipped[r["index"]] = str(e)
            continue
        refs = [int(k) for k in re.findall(r"<image (\d+)>", r["question"])]
        if refs and max(refs) > len(images):
            skipped[r["index"]] = f"question refers to <image {max(refs)}>, the row has {len(images)} image(s)"
            continue
        if not vlmevalkit and present != list(common.OPTION_LETTERS[:len(present)]):
            skipped[r["index"]] = f"options are not consecutive letters ({', '.join(present)})"
            continue
        options = [o for o in row_options if o.strip()]
        kind = "mcq" if options else "yes_no" if answer.lower() in ("yes", "no") and not vlmevalkit else "open"
        answer = answer.upper() if kind == "mcq" else answer.capitalize() if kind == "yes_no" else answer
        meta = {k: r[k] for k in df.columns if k not in ("image", "question", "answer", *letters)}
        items.append(dict(index=str(r["index"]), image=images[0] if len(images) == 1 else images,
                          question=r["question"], options=options, letters=present, answer=answer, kind=kind,
                          meta=meta))
        if max_items and len(items) >= max_items:
            break
    if skipped:
        print(f"[05] {path}: skipped {len(skipped)} rows: " + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]))
    return items, skipped


# The five benchmarks without an official script are prompted and scored as VLMEvalKit does for
# Qwen2-VL models (vlmeval/vlm/qwen2_vl/prompt.py, vlmeval/utils/matching_util.py), with no judge model.
VLMEVALKIT_BENCHMARKS = ("mmmu", "mmstar", "realworldqa", "blink", "ai2d")
MCQ_EN, MCQ_CN = "Please select the correct answer from the options above.", "请直接回答选项字母。"


def vlmevalkit_prompt(question: str, options: list[str], hint: str = "", letters=None) -> str:
    """Qwen2VLPromptMixin's MCQ / MMMU text (the images come first in the message; MMMU's "<image k>"
    stay in the text, all images in the row's order): Hint, Question, Options under their own letters
    (a missing option leaves a gap), the instruction."""
    prompt = (f"Hint: {hint}\n" if hint else "") + f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {o}\n" for k, o in zip(letters or common.OPTION_LETTERS, options))
        prompt += MCQ_CN if re.search("[\u4e00-\u9fff]", prompt) else MCQ_EN
    return prompt.rstrip()


def can_infer_option(answer: str, choices: dict) -> str | None:
    """VLMEvalKit: the one option letter among the answer's tokens (punctuation split off), and only
    if it is one of the last four tokens (index > len - 5); 'Z' for a refusal."""
    refusals = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
    if any(x in answer for x in refusals):
        return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    found = [c for c in choices if c in splits]
    if len(found) == 1 and splits.index(found[0]) > len(splits) - 5:
        return found[0]
    if not found and "Z" in splits:
        return "Z"
    return None


def can_infer_text(answer: str, choices: dict) -> str | None:
    """VLMEvalKit: the one option whose text occurs in the (not too long) answer, case-insensitive."""
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def vlmevalkit_choices(item: dict) -> tuple[dict, str]:
    """(choices, ground-truth letter). MMMU's open questions as VLMEvalKit's MMMU_preproc makes them
    multiple-choice for matching: A = the reference answer, B = 'Other Answers', truth A."""
    if not item["options"]:   # every option-less row, a "Yes" / "No" reference too
        return {"A": item["answer"], "B": "Other Answers"}, "A"
    return dict(zip(item.get("letters") or common.OPTION_LETTERS, item["options"])), item["answer"]


def vlmevalkit_extract(text: str, item: dict) -> str | None:
    choices, _ = vlmevalkit_choices(item)
    return can_infer_option(text, choices) or can_infer_text(text, choices)


def style_of(name: str) -> str:
    """Which prompt layout and extraction a benchmark gets: an official script's (V*, HR-Bench's for
    the others) or VLMEvalKit's for the five the authors released no script for."""
    if name.startswith("vstar"):
        return "vstar"
    return "vlmevalkit" if name.startswith(VLMEVALKIT_BENCHMARKS) else "hrbench"


def item_prompt(it: dict, style: str) -> str:
    if style == "vlmevalkit":
        return vlmevalkit_prompt(it["question"], it["options"], it["meta"].get("hint", ""), it.get("letters"))
    return common.defender_prompt(it["question"], it["options"], style)


def judge(text: str, it: dict, style: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for one answer: VLMEvalKit's matching for its benchmarks and for open
    questions anywhere, the official scripts' extraction otherwise."""
    kind = it.get("kind") or ("mcq" if it["options"] else "yes_no")   # our scenes carry no kind
    if style == "vlmevalkit" or kind == "open":
        pred = vlmevalkit_extract(text, it)
        return pred, pred == vlmevalkit_choices(it)[1]
    pred = common.extract_answer(text, it["options"], style)
    return pred, pred == it["answer"]


def acc(xs) -> float:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else float("nan")


def prf(preds) -> dict:
    """Precision / recall / F1 (%) with 'Yes' as positive, from each item's last trial (official)."""
    tp = sum(p["pred"] == "Yes" and p["answer"] == "Yes" for p in preds)
    fp = sum(p["pred"] == "Yes" and p["answer"] != "Yes" for p in preds)
    fn = sum(p["pred"] != "Yes" and p["answer"] == "Yes" for p in preds)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return dict(accuracy=acc(p["correct"] for p in preds), precision=100 * prec, recall=100 * rec,
                f1=100 * (2 * prec * rec / (prec + rec) if prec + rec else 0.0))


def score_pope(preds):
    """eval/hallucination/pope.py: headline = strict accuracy over the rows; P/R/F1 from the last trial;
    only the per-category rows split comma-joined categories."""
    by = defaultdict(list)
    for p in preds:
        for c in str(p["meta"].get("category", "")).split(","):
            if c.strip():
                by[c.strip()].append(p)
    overall = prf(preds)
    return dict(overall=overall["accuracy"], **overall, per_category={k: prf(v) for k, v in sorted(by.items())})


def hallusion_ids(index: str) -> tuple[str, str, str]:
    """(set_id, figure_id, question_id): fields 3, 4, 5 of the `_`-separated index, as the official script."""
    parts = str(index).split("_")
    return tuple(parts[i] if len(parts) > i else "unknown" for i in (3, 4, 5))


def hallusion_metrics(preds) -> dict:
    fig, que = defaultdict(list), defaultdict(list)
    for p in preds:
        set_id, figure_id, question_id = hallusion_ids(p["index"])
        l2 = p["meta"].get("l2-category", "")
        fig[(l2, set_id, figure_id)].append(p["correct"])
        que[(l2, set_id, question_id)].append(p["correct"])
    return dict(aAcc=acc(p["correct"] for p in preds), fAcc=acc(all(v) for v in fig.values()),
                qAcc=acc(all(v) for v in que.values()))


def score_hallusion(preds):
    """eval/hallucination/hallusionbench.py: headline aAcc; fAcc / qAcc group by l2-category + set id +
    figure id / question id, taken from the index string. VLMEvalKit's headline (mean of the three) too."""
    m = hallusion_metrics(preds)
    splits = {}
    for col in ("category", "l2-category"):
        for v in sorted({p["meta"].get(col, "") for p in preds}):
            splits[f"{col}={v}"] = hallusion_metrics([p for p in preds if p["meta"].get(col, "") == v])
    return dict(overall=m["aAcc"], **m, vlmevalkit_mean=(m["aAcc"] + m["fAcc"] + m["qAcc"]) / 3, per_split=splits)


def score_by(preds, col):
    groups = defaultdict(list)
    for p in preds:
        groups[p["meta"].get(col, "all")].append(p["correct"])
    return {k: acc(v) for k, v in sorted(groups.items())}


def score(name: str, preds) -> dict:
    if name.startswith("pope"):
        return score_pope(preds)
    if name.startswith("hallusion"):
        return score_hallusion(preds)
    out = dict(overall=acc(p["correct"] for p in preds), per_category=score_by(preds, "category"))
    if any("l2-category" in p["meta"] for p in preds):   # VLMEvalKit's report_acc (MMStar, ...)
        out["per_l2_category"] = score_by(preds, "l2-category")
    if name.startswith("hrbench") and any("cycle_category" in p["meta"] for p in preds):
        per = score_by(preds, "cycle_category")   # VLMEvalKit's headline: the mean over cycles
        out["vlmevalkit_cycle_avg"] = sum(per.values()) / len(per)
    return out


# ---------------------------------------------------------------------------------------------
# Answering: strict multi-trial, per-item caching
# ---------------------------------------------------------------------------------------------
def answer_items(model, processor, items, args, pred_path: Path, ddp, style: str = "hrbench") -> list[dict]:
    """Answer every item not yet in pred_path (sharded over ranks); return all predictions.
    Strict multi-trial (the official eval): up to --trials answers, the next one only while all so far
    are right; correct = every trial right. `pred` is the last trial's answer."""
    import torch
    import torch.distributed as dist
    done = {}
    if pred_path.exists():
        for line in pred_path.read_text().splitlines():
            p = json.loads(line)
            if "trials" in p:   # older caches without per-trial records are answered again
                done[p["index"]] = p
    todo = [it for it in items if it["index"] not in done][ddp.rank::ddp.world]
    trials = {it["index"]: [] for it in todo}
    alive = list(todo)
    for t in range(args.trials):
        temp = args.trial_temperature if t > 0 else 0.0
        if temp > 0:   # sampled trials draw from the global RNG: seed it per file, trial and rank, so that the
            # answers do not depend on what this process ran before (other benchmarks, the attacks' files)
            torch.manual_seed(zlib.crc32(f"{pred_path.name}/{t}/{ddp.rank}".encode()))
        outs = common.defender_generate(model, processor, [it["image"] for it in alive],
                                        [item_prompt(it, style) for it in alive], args.max_new_tokens,
                                        temperature=temp, batch_size=args.batch_size, memory_gb=args.gen_memory_gb,
                                        layout="images_first" if style == "vlmevalkit" else "text_first",
                                        desc=f"[05] {pred_path.stem} trial {t + 1}/{args.trials}")
        for it, text in zip(alive, outs):
            pred, correct = judge(text, it, style)
            trials[it["index"]].append(dict(output=text, pred=pred, correct=correct))
        alive = [it for it in alive if trials[it["index"]][-1]["correct"]]
    new = [dict(index=it["index"], trials=trials[it["index"]], pred=trials[it["index"]][-1]["pred"],
                answer=it["answer"], meta=it["meta"], correct=all(x["correct"] for x in trials[it["index"]]))
           for it in todo]
    gathered = [None] * ddp.world
    if dist.is_initialized():
        dist.all_gather_object(gathered, new)
    else:
        gathered = [new]
    if ddp.master and any(gathered):
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        with pred_path.open("a") as f:
            for part in gathered:
                for p in part:
                    f.write(json.dumps(p) + "\n")
    for part in gathered:
        for p in part:
            done[p["index"]] = p
    return [done[it["index"]] for it in items if it["index"] in done]


# ---------------------------------------------------------------------------------------------
# Robustness on held-out attacks
# ---------------------------------------------------------------------------------------------
def robustness(model, processor, run: Path, args, ddp, name: str) -> dict:
    from datasets import load_from_disk
    out = {}
    scenes = load_from_disk(str(run / "data" / "scenes")).filter(lambda s: s == "test", input_columns="split")
    items = [dict(index=r["id"], image=r["image"], question=r["question"], options=r["options"], answer=r["answer"],
                  meta={}) for r in scenes]
    pdir = run / "eval" / "preds" / name
    clean = answer_items(model, processor, items, args, pdir / "scenes_clean.jsonl", ddp)
    out["clean_acc"] = acc(p["correct"] for p in clean)
    clean_ok = {p["index"]: p["correct"] for p in clean}
    for d in sorted((run / "attacks").glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        if not (d / "dataset_dict.json").exists():
            continue
        test = load_from_disk(str(d))["test"]
        att = [dict(index=r["id"], image=r["attacked_image"], question=r["question"], options=r["options"],
                    answer=r["answer"], meta={}) for r in test]
        preds = answer_items(model, processor, att, args, pdir / f"attacks_{d.name}.jsonl", ddp)
        saved = run / "attacker" / d.name / "args.json"   # the gate the attacker was trained with
        tau = json.loads(saved.read_text()).get("tau", 0.85) if saved.exists() else 0.85
        valid = {r["id"] for r in test if r["ssim_local"] >= tau}
        areas = [changed_area(r["image"], r["attacked_image"]) for r in test]
        out[f"attacker_{d.name}"] = dict(attack_scores([p for p in preds if p["index"] in valid], clean_ok),
                                         all=attack_scores(preds, clean_ok), tau=tau,
                                         ssim_local=sum(test["ssim_local"]) / max(1, len(test)),
                                         ssim_pass=acc(s >= tau for s in test["ssim_local"]),
                                         changed_area=quartiles(areas))
    out["clean_by_answer"] = acc_by_answer(clean)
    return out


def attack_scores(preds, clean_ok: dict) -> dict:
    """On these attacked items: accuracy, attack success (the share of clean-correct items turned wrong),
    the clean accuracy on the same scenes (an attacker edits only scenes with target boxes) and per right
    answer. The headline counts the attacks that pass the attacker's local-SSIM gate (an attack that fails
    it may have changed the targets, and so the right answer); 'all' counts every one."""
    return dict(acc=acc(p["correct"] for p in preds), attack_success=acc(not p["correct"] for p in preds
                                                                          if clean_ok.get(p["index"])),
                clean_acc=acc(clean_ok[p["index"]] for p in preds if p["index"] in clean_ok), n=len(preds),
                by_answer=acc_by_answer(preds))


def changed_area(scene, attacked, threshold: int = 60) -> float:
    """The share of the image an attack changed: pixels whose summed |RGB| difference exceeds threshold."""
    import numpy as np
    a = np.asarray(scene.convert("RGB"), dtype=np.int32)
    b = np.asarray(attacked.convert("RGB").resize(scene.size), dtype=np.int32)
    return float((np.abs(a - b).sum(-1) > threshold).mean())


def quartiles(xs: list[float]) -> dict:
    import numpy as np
    if not xs:
        return dict(p25=float("nan"), median=float("nan"), p75=float("nan"))
    p25, p50, p75 = np.percentile(xs, [25, 50, 75]).tolist()
    return dict(p25=p25, median=p50, p75=p75)


def acc_by_answer(preds) -> dict:
    """Accuracy per right answer ("A", "B", "Yes", ...). A defender that answers one letter whatever it
    sees scores that letter's share: an attack that only tips it towards one answer shows as a drop on
    the others, and a defender that only learns the opposite tip wins back there and loses elsewhere."""
    by = {}
    for p in preds:
        by.setdefault(p["answer"], []).append(p["correct"])
    return {a: acc(v) for a, v in sorted(by.items())}


# ---------------------------------------------------------------------------------------------
# Summary table and plot
# ---------------------------------------------------------------------------------------------
def row_label(r) -> str:
    """The paper's row names: the untouched base, the clean warm-up (its clean-data ablation), Iter. k."""
    if r.get("round") is None:   # a defender scored on its own (--name)
        return r["name"]
    return "base" if r["round"] < 0 else "clean warm-up (round 0)" if r["round"] == 0 else f"Iter. {r['round']}"


PAPER_ROW = {"base": "base", "clean warm-up (round 0)": "clean-data DAPO"}


def write_summary(eval_dir: Path, paper_table: bool):
    """Every scored defender, in the paper's row order; with --paper_table each row is followed by the
    paper's row of the same name."""
    rounds = sorted((json.loads(p.read_text()) for p in eval_dir.glob("*.json")),
                    key=lambda r: (r.get("round") is None, r.get("round") or 0, r.get("name", "")))
    benches = [c for c in COLUMNS if any(c in r["benchmarks"] for r in rounds)]
    benches += sorted({b for r in rounds for b in r["benchmarks"]} - set(benches))
    attackers = sorted({k for r in rounds for k in r["robustness"] if k.startswith("attacker_")},
                       key=lambda k: int(k.rsplit("_", 1)[1]))
    head = ["defender"] + benches + (["Avg"] if benches else []) + ["clean (test scenes)"] + \
        [f"vs {a.replace('attacker_round_', 'attacker ')}" for a in attackers]
    lines = ["# AOT evaluation summary", "",
             "Benchmarks: the official headline metric (%; POPE strict accuracy, HallusionBench aAcc, HR-Bench and V* "
             "correct / total). Robustness: accuracy on the run's held-out test scenes, clean and attacked by each "
             "attacker round (attack success rate in parentheses).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        vals = [r["benchmarks"][b]["overall"] if b in r["benchmarks"] else float("nan") for b in benches]
        main = [v for v in vals if not math.isnan(v)]
        cells = [row_label(r)] + [f"{v:.1f}" for v in vals] + ([f"{sum(main) / len(main):.1f}"] if benches else [])
        clean = r["robustness"].get("clean_acc")
        cells.append("" if clean is None else f"{clean:.1f}")
        for a in attackers:
            x = r["robustness"].get(a)
            cells.append(f"{x['acc']:.1f} ({x['attack_success']:.1f})" if x else "")
        lines.append("| " + " | ".join(cells) + " |")
        paper = PAPER.get(PAPER_ROW.get(row_label(r), row_label(r)))
        if paper_table and paper and benches:
            pv = [paper.get(b, float("nan")) for b in benches]
            known = [v for v in pv if not math.isnan(v)]
            lines.append(f"| *paper: {PAPER_ROW.get(row_label(r), row_label(r))}* | " +
                         " | ".join("" if math.isnan(v) else f"*{v:.1f}*" for v in pv) +
                         f" | *{sum(known) / len(known):.1f}* |" + " |" * (1 + len(attackers)))
    for a in attackers:   # the held-out attacks themselves (the same rows for every defender)
        x = next((r["robustness"][a] for r in rounds if "ssim_pass" in r["robustness"].get(a, {})), None)
        if x:
            n_all = x.get("all", x)["n"]
            line = (f"\n{a.replace('attacker_round_', 'Attacker ')}: {n_all} held-out attacks, local SSIM on the "
                    f"targets {x['ssim_local']:.3f} on average, {x['ssim_pass']:.1f}% pass the gate (>= {x['tau']})")
            if "all" in x:
                line += (f": the table counts those {x['n']}; on all {n_all}, the defender it attacked scores "
                         f"{x['all']['acc']:.1f} ({x['all']['attack_success']:.1f} attack success)")
            if "changed_area" in x:
                q = x["changed_area"]
                line += (f"; changed area (pixels whose summed |RGB| difference exceeds 60) median "
                         f"{100 * q['median']:.1f}% of the image (p25 {100 * q['p25']:.1f}%, p75 {100 * q['p75']:.1f}%)")
            lines.append(line + ".")
    for c in coevolution(rounds):
        k = c["attacker"]
        line = (f"\nRound {k}: attacker {k} takes {c['drop']:.1f} points from defender {k - 1}, the model it was trained "
                f"to fool ({c['clean_items_before']:.1f} clean, {c['attacked_before']:.1f} attacked, on the "
                f"{c['n']} attacked test scenes)")
        if "recovered" in c:
            share = "no drop to win back" if math.isnan(c["recovered"]) else f"{100 * c['recovered']:.0f}%"
            line += (f"; defender {k} wins back {c['attacked_after'] - c['attacked_before']:.1f} of them "
                     f"({share}: {c['attacked_after']:.1f} attacked) at "
                     f"{c['clean_after']:.1f} clean on every test scene ({c['clean_after'] - c['clean_before']:+.1f})")
        lines.append(line + ".")
        if "by_answer_after" in c:   # is it seeing, or a tip towards other answers? (acc_by_answer)
            line = f"\nBy right answer, defender {k - 1} -> {k}: attacked {_arrows(c['by_answer_before'], c['by_answer_after'])}"
            if "clean_by_answer_after" in c:
                line += f"; clean {_arrows(c['clean_by_answer_before'], c['clean_by_answer_after'])}"
            lines.append(line + ".")
    (eval_dir / "summary.md").write_text("\n".join(lines) + "\n")
    plot_robustness(rounds, attackers, eval_dir / "robustness.png")
    return "\n".join(lines)


def _arrows(before: dict, after: dict) -> str:
    return ", ".join(f"{a} {v:.1f} -> {after.get(a, float('nan')):.1f}" for a, v in before.items())


def coevolution(rounds) -> list[dict]:
    """What each co-evolution round did, on the held-out test scenes: attacker k against defender k-1, the model
    it was trained to fool (clean_before on every test scene; clean_items_before on the attacked ones,
    attacked_before, drop = the difference of these two; gate_pass: % of its attacks
    passing its local-SSIM gate), then defender k, trained on its curriculum, on the same attacks (attacked_after,
    clean_after, recovered = the share of the drop won back; by_answer_before / _after: the attacked accuracy per
    right answer, clean_by_answer_before / _after the same clean, where scored). One dict per attacker round
    scored on defender k-1; the "after" keys only once defender k is scored."""
    by = {r["round"]: r["robustness"] for r in rounds if r.get("round") is not None}
    out = []
    for k in sorted({int(a.rsplit("_", 1)[1]) for r in by.values() for a in r if a.startswith("attacker_")}):
        a, before, after = f"attacker_round_{k}", by.get(k - 1, {}), by.get(k, {})
        if a not in before or "clean_acc" not in before:
            continue
        same = before[a].get("clean_acc", before["clean_acc"])   # older eval/*.json: every scene was attacked
        c = dict(attacker=k, clean_before=before["clean_acc"], clean_items_before=same, n=before[a].get("n"),
                 attacked_before=before[a]["acc"], drop=same - before[a]["acc"],
                 gate_pass=before[a].get("ssim_pass", float("nan")))
        if a in after and "clean_acc" in after:
            c.update(attacked_after=after[a]["acc"], clean_after=after["clean_acc"],
                     recovered=(after[a]["acc"] - c["attacked_before"]) / c["drop"] if c["drop"] > 0 else float("nan"))
            if "by_answer" in before[a] and "by_answer" in after[a]:
                c.update(by_answer_before=before[a]["by_answer"], by_answer_after=after[a]["by_answer"])
            if "clean_by_answer" in before and "clean_by_answer" in after:
                c.update(clean_by_answer_before=before["clean_by_answer"], clean_by_answer_after=after["clean_by_answer"])
        out.append(c)
    return out


CURVES = [("02_sft", "loss"), ("03_round", "reward_mean"), ("03_round", "attack_success"), ("03_round", "ssim_local"),
          ("03_round", "ratio_mean"), ("04_round", "gen_reward"), ("04_round", "gen_accuracy"),
          ("04_round", "kept_group_frac"), ("04_round", "gen_response_len"), ("04_round", "entropy"),
          ("04_round", "val_attack_acc"), ("04_round", "val_clean_acc")]


def plot_curves(logs: Path, path: Path) -> dict:
    """eval/curves.png: the training curves of logs/*.jsonl, one panel per metric, one line per round.
    Returns {panel: number of points drawn}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 6, figsize=(20, 6))
    drawn = {}
    for ax, (stage, key) in zip(axes.flat, CURVES):
        n = 0
        for f in sorted(logs.glob(f"{stage}*.jsonl")):
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            pts = [(r.get("step", r.get("iter")), r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), ".-", label=f.stem.replace(f"{stage}_", "round ") if stage.endswith("round") else f.stem)
                n += len(pts)
        ax.set_title(f"{stage.split('_')[0]}: {key}", fontsize=9)
        ax.set_xlabel("step" if stage != "03_round" else "iteration", fontsize=8)
        if n:
            ax.legend(fontsize=6)
        drawn[f"{stage}:{key}"] = n
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_robustness(rounds, attackers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rounds = [r for r in rounds if r.get("round") is not None]   # the run's rounds, not defenders scored alone
    if not rounds:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["robustness"].get("clean_acc", float("nan")) for r in rounds], "o-", label="clean")
    for a in attackers:
        ax.plot(xs, [r["robustness"].get(a, {}).get("acc", float("nan")) for r in rounds], "s--",
                label=a.replace("attacker_round_", "attacks of attacker "))
    ax.set_xlabel("defender round")
    ax.set_ylabel("accuracy on test scenes (%)")
    ax.set_xticks(xs, ["base" if x < 0 else str(x) for x in xs])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args):
    common.quiet()
    benches = check_benches(args.bench)   # every file, before a model is loaded
    if args.check_inputs:
        print(f"[05] {len(benches)} benchmark file(s) readable")
        return
    ddp = parallel.setup_distributed()
    run = Path(args.run_dir)
    eval_dir = run / "eval"
    base = args.defender == "base"
    name = args.name or ("base" if base else f"round_{args.round}")
    path = args.model if base else args.defender or str(run / "defender" / f"round_{args.round}")
    if path != common.TINY and not Path(path).exists() and "/" not in path:
        raise SystemExit(f"[05] no defender at {path}")
    t0 = time.time()
    # the processor saved with the model: a trained defender keeps the base model's pixel limits (04)
    model, processor = common.load_defender(path, ddp.device, dtype=common.resolve_dtype(args.dtype, ddp.device))
    result = dict(name=name, round=-1 if base else None if args.name else args.round, defender=path,
                  benchmarks={}, skipped={}, robustness={})
    n_items = 0
    for bench, tsv in benches:
        style = style_of(bench)
        items, skipped = load_tsv(tsv, args.max_items, vlmevalkit=style == "vlmevalkit")
        preds = answer_items(model, processor, items, args, eval_dir / "preds" / name / f"{bench}.jsonl", ddp, style)
        n_items += len(preds)
        result["benchmarks"][bench] = score(bench, preds)
        result["skipped"][bench] = skipped
        if ddp.master:   # kept even if a later benchmark fails
            rundir.write_json_atomic(eval_dir / "scores" / name / f"{bench}.json",
                                     dict(result=result["benchmarks"][bench], skipped=skipped, file=tsv))
        parallel.print0(f"[05] {bench}: {result['benchmarks'][bench]['overall']:.1f} ({len(preds)} items scored, "
                        f"{len(skipped)} skipped)")
    if (run / "data" / "scenes").exists():
        result["robustness"] = robustness(model, processor, run, args, ddp, name)
    else:
        parallel.print0(f"[05] {run / 'data' / 'scenes'} does not exist: no held-out scenes or attacks, robustness "
                        f"not scored")
    if ddp.master:
        rundir.write_json_atomic(eval_dir / f"{name}.json", result)
        table = write_summary(eval_dir, args.paper_table)
        plot_curves(run / "logs", eval_dir / "curves.png")
        print(f"[05] robustness: {json.dumps(result['robustness'])}")
        print(f"[05] wrote {eval_dir}/{name}.json and summary.md in {time.time() - t0:.0f}s "
              f"({n_items / max(time.time() - t0, 1e-9):.1f} benchmark items/s)\n{table}")
    parallel.cleanup_distributed()


if __name__ == "__main__":
    main(rundir.parse_args(Args, PRESETS))
