"""Stage 05: score a defender on the paper's benchmarks and on held-out attacks.

Reads:  defender/round_k/ (or the base model: --defender base), benchmark TSVs (VLMEvalKit format,
        --bench NAME=PATH), data/scenes (test split), attacks/round_*/test
Writes: eval/preds/<name>/<bench>.jsonl (per item, every trial, so a re-run scores only what is missing; kept
        only while <bench>.key matches the defender's files, the items' files and the decoding settings),
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
scenes with target boxes (03's choice 5): its drop is measured against the clean accuracy on those scenes.
The headline counts the attacks that pass the attacker's own local-SSIM gate (one that fails it may have
changed the targets, and so the right answer); every attack is scored beside it ('all'), with the share
of the image each attack changed (summed |RGB| difference > 60; median and quartiles per attacker).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import benchmarks
import census
import common
import parallel
import report
import rundir

PRESETS = {"tiny": dict(model="tiny", max_new_tokens=8, trials=1, paper_table=False, census="pixels"),
           "tiny_world": dict(model="{run_dir}/models/defender", max_new_tokens=8, trials=1, paper_table=False,
                              census="pixels")}


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
    census: str = field(default="judge", metadata={"help": "AOT-SFT's strategies (census.py) by the 'pixels' or "
                                                           "by asking the 'judge' (the first defender scored)",
                                                   "choices": ["pixels", "judge"]})


# ---------------------------------------------------------------------------------------------
# Benchmarks: loading and scoring
# ---------------------------------------------------------------------------------------------


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
def fingerprint(*paths) -> list:
    """(name, size, mtime_ns) of every file under each path; a path not on disk (a hub id, "tiny") by its name;
    the cache-*.arrow files that datasets' .filter() / .map() add to a dataset's directory are left out.
    Retraining a defender or an attacker round rewrites its files, so answers cached for the old ones are not
    reused; a run copied with its times kept (cp -p, rsync -a) keeps its answers."""
    out = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("cache-")) if p.is_dir() \
            else [p] if p.is_file() else []
        out += [[str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                for f in files] or [str(p)]
    return out


def cache_key(defender: dict, items: list, args, style: str) -> str:
    """What a file of cached answers was made from: the defender (its files' fingerprint and compute dtype),
    the items' files, the prompt style and the decoding settings."""
    made_from = dict(defender=defender, items=items, style=style, trials=args.trials,
                     trial_temperature=args.trial_temperature, max_new_tokens=args.max_new_tokens)
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()


def answer_items(model, processor, items, args, pred_path: Path, ddp, style: str = "hrbench", *, key: str) -> list[dict]:
    """Answer every item not yet in pred_path (sharded over ranks); return all predictions. Cached answers
    count only if pred_path's .key file holds ``key`` (cache_key); otherwise every item is answered again.
    Strict multi-trial (the official eval): up to --trials answers, the next one only while all so far
    are right; correct = every trial right. `pred` is the last trial's answer."""
    import torch
    import torch.distributed as dist
    done = {}
    key_path = pred_path.with_suffix(".key")
    fresh = pred_path.exists() and key_path.exists() and key_path.read_text().strip() == key
    if dist.is_initialized():   # rank 0 decides for all: a node's own copy of the defender has its own file times
        box = [fresh]
        dist.broadcast_object_list(box, src=0)
        fresh = box[0]
    if pred_path.exists() and not fresh:
        parallel.print0(f"[05] {pred_path}: answers of another defender, other items or other decoding settings "
                        f"(or older than {key_path.name} files): answered again")
    if fresh:
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
    if ddp.master and (any(gathered) or not fresh):
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        if not fresh:   # the key first: a crash mid-write leaves answers the key vouches for, never stale ones
            pred_path.unlink(missing_ok=True)
            key_path.write_text(key + "\n")
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
def robustness(model, processor, run: Path, args, ddp, name: str, defender: dict) -> dict:
    from datasets import load_from_disk
    out = {}
    scenes = load_from_disk(str(run / "data" / "scenes")).filter(lambda s: s == "test", input_columns="split")
    items = [dict(index=r["id"], image=r["image"], question=r["question"], options=r["options"], answer=r["answer"],
                  meta={}) for r in scenes]
    pdir = run / "eval" / "preds" / name
    clean = answer_items(model, processor, items, args, pdir / "scenes_clean.jsonl", ddp,
                         key=cache_key(defender, fingerprint(run / "data" / "scenes"), args, "hrbench"))
    out["clean_acc"] = acc(p["correct"] for p in clean)
    clean_ok = {p["index"]: p["correct"] for p in clean}
    for d in sorted((run / "attacks").glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        if not (d / "dataset_dict.json").exists():
            continue
        test = load_from_disk(str(d))["test"]
        att = [dict(index=r["id"], image=r["attacked_image"], question=r["question"], options=r["options"],
                    answer=r["answer"], meta={}) for r in test]
        preds = answer_items(model, processor, att, args, pdir / f"attacks_{d.name}.jsonl", ddp,
                             key=cache_key(defender, fingerprint(d / "test"), args, "hrbench"))
        saved = run / "attacker" / d.name / "args.json"   # the gate the attacker was trained with
        tau = json.loads(saved.read_text()).get("tau", 0.85) if saved.exists() else 0.85
        valid = {r["id"] for r in test if r["ssim_local"] >= tau}
        areas = [common.changed_area(r["image"], r["attacked_image"]) for r in test]
        out[f"attacker_{d.name}"] = dict(attack_scores([p for p in preds if p["index"] in valid], clean_ok),
                                         all=attack_scores(preds, clean_ok), tau=tau,
                                         ssim_local=sum(test["ssim_local"]) / max(1, len(test)),
                                         ssim_pass=acc(s >= tau for s in test["ssim_local"]),
                                         changed_area=quartiles(areas))
        if "strategy" in test.column_names:
            out[f"attacker_{d.name}"]["strategies"] = strategies(test, preds, clean_ok)
            if ddp.master and not (run / "eval" / f"strategies_{d.name}.png").exists():
                report.strategy_gallery(test, run / "eval" / f"strategies_{d.name}.png")
    out["clean_by_answer"] = acc_by_answer(clean)
    if (run / "data" / "aot_sft").exists():
        out["aot_sft_strategies"] = aot_sft_census(model, processor, run, args, ddp)
    return out


def strategies(test, preds, clean_ok: dict) -> dict:
    """Per attack strategy (census.py; the column 03 wrote): its share of the held-out attacks, the share that
    fooled the defender it was trained against (03's sampled wrong fraction >= 0.5) and, against this
    defender, the attack success (clean-correct turned wrong), gate or not."""
    wrong = {p["index"]: not p["correct"] for p in preds}
    cols = list(zip(test["id"], test["defender_wrong_fraction"], test["strategy"]))
    out = {}
    for s in sorted({k for _, _, k in cols}):
        rows = [(i, w) for i, w, k in cols if k == s]
        out[s] = dict(n=len(rows), share=100 * len(rows) / len(test), fooled_attacked=acc(w >= 0.5 for _, w in rows),
                      attack_success=acc(wrong[i] for i, _ in rows if clean_ok.get(i)))
    return out


def aot_sft_census(model, processor, run: Path, args, ddp) -> dict:
    """AOT-SFT's strategies (01's effective implants: the paper says additions only), once per run."""
    from datasets import load_from_disk
    path = run / "eval" / "census" / "aot_sft.json"   # not eval/*.json: those are scored defenders
    if path.exists():
        return json.loads(path.read_text())
    sft = load_from_disk(str(run / "data" / "aot_sft"))
    kinds = census.strategies(sft, "edited_image", args.census, model, processor)
    out = {s: dict(n=kinds.count(s), share=100 * kinds.count(s) / len(kinds)) for s in sorted(set(kinds))}
    if ddp.master:
        rundir.write_json_atomic(path, out)
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


def main(args: Args):
    common.quiet()
    benches = benchmarks.check_benches(args.bench)   # every file, before a model is loaded
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
    dtype = common.resolve_dtype(args.dtype, ddp.device)
    model, processor = common.load_defender(path, ddp.device, dtype=dtype)
    defender = dict(files=fingerprint(path), dtype=str(dtype))   # what the cached answers (answer_items) came from
    result = dict(name=name, round=-1 if base else None if args.name else args.round, defender=path,
                  benchmarks={}, skipped={}, robustness={})
    n_items = 0
    for bench, tsv in benches:
        style = style_of(bench)
        items, skipped = benchmarks.load_tsv(tsv, args.max_items, vlmevalkit=style == "vlmevalkit")
        preds = answer_items(model, processor, items, args, eval_dir / "preds" / name / f"{bench}.jsonl", ddp, style,
                             key=cache_key(defender, fingerprint(tsv), args, style))
        n_items += len(preds)
        result["benchmarks"][bench] = score(bench, preds)
        result["skipped"][bench] = skipped
        if ddp.master:   # kept even if a later benchmark fails
            rundir.write_json_atomic(eval_dir / "scores" / name / f"{bench}.json",
                                     dict(result=result["benchmarks"][bench], skipped=skipped, file=tsv))
        parallel.print0(f"[05] {bench}: {result['benchmarks'][bench]['overall']:.1f} ({len(preds)} items scored, "
                        f"{len(skipped)} skipped)")
    if (run / "data" / "scenes").exists():
        result["robustness"] = robustness(model, processor, run, args, ddp, name, defender)
    else:
        parallel.print0(f"[05] {run / 'data' / 'scenes'} does not exist: no held-out scenes or attacks, robustness "
                        f"not scored")
    if ddp.master:
        rundir.write_json_atomic(eval_dir / f"{name}.json", result)
        table = report.write_summary(eval_dir, args.paper_table)
        report.plot_curves(run / "logs", eval_dir / "curves.png")
        print(f"[05] robustness: {json.dumps(result['robustness'])}")
        print(f"[05] wrote {eval_dir}/{name}.json and summary.md in {time.time() - t0:.0f}s "
              f"({n_items / max(time.time() - t0, 1e-9):.1f} benchmark items/s)\n{table}")
    parallel.cleanup_distributed()


if __name__ == "__main__":
    main(rundir.parse_args(Args, PRESETS))
