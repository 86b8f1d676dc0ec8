"""Stage 05: score a defender round on the paper's benchmarks and on held-out attacks.

Reads:  defender/round_k/, benchmark TSVs (VLMEvalKit format, --bench NAME=PATH), data/scenes (test
        split), attacks/round_*/test
Writes: eval/preds/round_k/<bench>.jsonl (per item, so a re-run scores only what is missing),
        eval/round_k.json, eval/summary.md (every round so far, laid out like the paper's table),
        eval/robustness.png

  python 05_eval.py --preset tiny --run_dir runs/tiny --round 0
  python 05_eval.py --run_dir runs/aot --round 3 --trials 3 \
      --bench vstar=bench/VStarBench.tsv pope=bench/POPE.tsv hallusionbench=bench/HallusionBench.tsv
  torchrun --nproc_per_node 8 05_eval.py ...           # items sharded over ranks

Scoring, as each benchmark defines it (shared/PAPER_NOTES.md, "Evaluation"):
  vstar           accuracy, overall and per category (attribute / spatial)
  hrbench4k/8k    accuracy averaged over `cycle_category`
  pope            accuracy / precision / recall / F1 with "yes" as positive, per split (`category`)
  hallusionbench  aAcc per question; fAcc: all questions of a figure right; qAcc: a question right
                  on every figure (grouped by category, set_id, figure_id / question_id)
  anything else   MCQ letter accuracy or yes/no accuracy
Decoding: greedy; --trials N is the official strict multi-trial mode (correct only if all N
are), sampled at --trial_temperature (with temperature 0 all trials would be identical).
Robustness: on the run's test scenes, accuracy clean vs attacked by every attacker round so far,
and the attack success rate (share of clean-correct items the attack turns wrong).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import common

PRESETS = {"tiny": dict(max_new_tokens=8, paper_table=False)}

PAPER = {  # authors' table, Qwen2.5-VL-7B base -> Defender Iter. 3
    "base": dict(vstar=71.0, hrbench4k=64.1, hrbench8k=64.9, hallusionbench=67.5, pope=77.1, mmmu=20.7, mmstar=60.3,
                 realworldqa=67.7, blink=54.1, ai2d=81.0),
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
    defender: str | None = field(default=None, metadata={"help": "default defender/round_k ('base' = --model)"})
    model: str = field(default=common.DEFENDER_ID, metadata={"help": "base model id (for --defender base)"})
    bench: list[str] = field(default_factory=list, metadata={"help": "NAME=PATH.tsv ... (one flag, several values)"})
    trials: int = field(default=1, metadata={"help": "strict multi-trial count (official: 3)"})
    trial_temperature: float = field(default=1.0, metadata={"help": "sampling temperature when trials > 1"})
    max_new_tokens: int = field(default=1024, metadata={"help": "answer length"})
    batch_size: int = field(default=16, metadata={"help": "generation batch"})
    max_items: int = field(default=0, metadata={"help": "cap per benchmark (0 = all)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: bf16, fp32, auto (bf16 on GPU)"})
    paper_table: bool = field(default=True, metadata={"help": "print the paper's numbers beside ours"})


# ---------------------------------------------------------------------------------------------
# Benchmarks: loading and scoring
# ---------------------------------------------------------------------------------------------
def load_tsv(path: str, max_items: int = 0) -> list[dict]:
    """VLMEvalKit TSV -> items {index, image, question, options, answer, meta}."""
    import pandas as pd
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    for col in ("index", "image", "question", "answer"):
        if col not in df.columns:
            raise SystemExit(f"[05] {path}: missing column '{col}'")
    letters = [c for c in common.OPTION_LETTERS if c in df.columns]
    items, bad = [], 0
    for _, r in df.iterrows():
        try:
            image = Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")
        except (ValueError, OSError):
            bad += 1
            continue
        options = [r[c] for c in letters if r[c].strip()]
        answer = r["answer"].strip()
        answer = answer.capitalize() if not options else answer
        meta = {k: r[k] for k in df.columns if k not in ("image", "question", "answer", *letters)}
        items.append(dict(index=str(r["index"]), image=image, question=r["question"], options=options,
                          answer=answer, meta=meta))
        if max_items and len(items) >= max_items:
            break
    if bad:
        print(f"[05] {path}: skipped {bad} rows with unreadable images")
    return items


def acc(xs) -> float:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else float("nan")


def score_pope(preds):
    """Per split: accuracy, precision, recall, F1 with 'Yes' as the positive class."""
    out = {}
    by = defaultdict(list)
    for p in preds:
        by[p["meta"].get("category", "all")].append(p)
    for split, ps in sorted(by.items()):
        tp = sum(p["pred"] == "Yes" and p["answer"] == "Yes" for p in ps)
        fp = sum(p["pred"] == "Yes" and p["answer"] == "No" for p in ps)
        fn = sum(p["pred"] != "Yes" and p["answer"] == "Yes" for p in ps)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        out[split] = dict(acc=acc(p["correct"] for p in ps), precision=100 * prec, recall=100 * rec,
                          f1=100 * (2 * prec * rec / (prec + rec) if prec + rec else 0.0))
    out["overall"] = sum(v["f1"] for v in out.values()) / len(out)   # headline: mean F1 over splits
    return out


def score_hallusion(preds):
    """aAcc per question; fAcc all-correct per figure; qAcc all-correct per question across figures."""
    def key(p, *cols):
        return tuple(p["meta"].get(c, "") for c in cols)
    fig, que = defaultdict(list), defaultdict(list)
    for p in preds:
        fig[key(p, "category", "set_id", "figure_id")].append(p["correct"])
        que[key(p, "category", "set_id", "question_id")].append(p["correct"])
    a = acc(p["correct"] for p in preds)
    f = acc(all(v) for v in fig.values())
    q = acc(all(v) for v in que.values())
    return dict(aAcc=a, fAcc=f, qAcc=q, overall=(a + f + q) / 3)


def score_by(preds, col):
    groups = defaultdict(list)
    for p in preds:
        groups[p["meta"].get(col, "all")].append(p["correct"])
    per = {k: acc(v) for k, v in sorted(groups.items())}
    return per


def score(name: str, preds) -> dict:
    if name.startswith("pope"):
        return score_pope(preds)
    if name.startswith("hallusion"):
        return score_hallusion(preds)
    if name.startswith("hrbench"):
        per = score_by(preds, "cycle_category")
        return dict(per_cycle=per, overall=sum(per.values()) / len(per))
    if name.startswith("vstar"):
        return dict(per_category=score_by(preds, "category"), overall=acc(p["correct"] for p in preds))
    return dict(overall=acc(p["correct"] for p in preds))


# ---------------------------------------------------------------------------------------------
# Answering with per-item caching
# ---------------------------------------------------------------------------------------------
def answer_items(model, processor, items, args, pred_path: Path, ddp) -> list[dict]:
    """Answer every item not yet in pred_path (sharded over ranks); return all predictions."""
    import torch.distributed as dist
    done = {}
    if pred_path.exists():
        for line in pred_path.read_text().splitlines():
            p = json.loads(line)
            done[p["index"]] = p
    todo = [it for it in items if it["index"] not in done][ddp.rank::ddp.world]
    new = []
    for i in range(0, len(todo), args.batch_size):
        batch = todo[i:i + args.batch_size]
        prompts = [common.defender_prompt(it["question"], it["options"]) for it in batch]
        outs = []
        for t in range(args.trials):
            temp = 0.0 if t == 0 or args.trial_temperature == 0 else args.trial_temperature
            outs.append(common.defender_generate(model, processor, [it["image"] for it in batch], prompts,
                                                 args.max_new_tokens, temperature=temp, batch_size=args.batch_size))
        for j, it in enumerate(batch):
            texts = [o[j] for o in outs]
            preds = [common.extract_answer(x, it["options"]) for x in texts]
            new.append(dict(index=it["index"], outputs=texts, pred=preds[0], answer=it["answer"], meta=it["meta"],
                            correct=all(p == it["answer"] for p in preds)))
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
def robustness(model, processor, run: Path, args, ddp) -> dict:
    from datasets import load_from_disk
    out = {}
    scenes = load_from_disk(str(run / "data" / "scenes")).filter(lambda s: s == "test", input_columns="split")
    items = [dict(index=r["id"], image=r["image"], question=r["question"], options=r["options"], answer=r["answer"],
                  meta={}) for r in scenes]
    pdir = run / "eval" / "preds" / f"round_{args.round}"
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
        flipped = [not p["correct"] for p in preds if clean_ok.get(p["index"])]
        out[f"attacker_{d.name}"] = dict(acc=acc(p["correct"] for p in preds), attack_success=acc(flipped),
                                         n=len(preds))
    return out


# ---------------------------------------------------------------------------------------------
# Summary table and plot
# ---------------------------------------------------------------------------------------------
def write_summary(eval_dir: Path, paper_table: bool):
    rounds = sorted((json.loads(p.read_text()) for p in eval_dir.glob("round_*.json")), key=lambda r: r["round"])
    benches = [c for c in COLUMNS if any(c in r["benchmarks"] for r in rounds)]
    benches += sorted({b for r in rounds for b in r["benchmarks"]} - set(benches))
    attackers = sorted({k for r in rounds for k in r["robustness"] if k.startswith("attacker_")},
                       key=lambda k: int(k.rsplit("_", 1)[1]))
    head = ["defender"] + benches + (["Avg"] if benches else []) + ["clean (test scenes)"] + \
        [f"vs {a.replace('attacker_round_', 'attacker ')}" for a in attackers]
    lines = ["# AOT evaluation summary", "",
             "Benchmarks: headline metric (%). Robustness: accuracy on the run's held-out test scenes, clean and "
             "attacked by each attacker round (attack success rate in parentheses).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        vals = [r["benchmarks"][b]["overall"] if b in r["benchmarks"] else float("nan") for b in benches]
        main = [v for v in vals if not math.isnan(v)]
        cells = [f"round {r['round']}"] + [f"{v:.1f}" for v in vals] + ([f"{sum(main) / len(main):.1f}"] if benches else [])
        cells.append(f"{r['robustness'].get('clean_acc', float('nan')):.1f}")
        for a in attackers:
            x = r["robustness"].get(a)
            cells.append(f"{x['acc']:.1f} ({x['attack_success']:.1f})" if x else "")
        lines.append("| " + " | ".join(cells) + " |")
    if paper_table:
        lines += ["", "Paper (Qwen2.5-VL-7B, authors' table):", "",
                  "| model | " + " | ".join(COLUMNS) + " | Avg |", "|" + "---|" * (len(COLUMNS) + 2)]
        for name, row in PAPER.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in COLUMNS) +
                         f" | {sum(row.values()) / len(row):.1f} |")
    (eval_dir / "summary.md").write_text("\n".join(lines) + "\n")
    plot_robustness(rounds, attackers, eval_dir / "robustness.png")
    return "\n".join(lines)


def plot_robustness(rounds, attackers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["robustness"].get("clean_acc", float("nan")) for r in rounds], "o-", label="clean")
    for a in attackers:
        ax.plot(xs, [r["robustness"].get(a, {}).get("acc", float("nan")) for r in rounds], "s--",
                label=a.replace("attacker_round_", "attacks of attacker "))
    ax.set_xlabel("defender round")
    ax.set_ylabel("accuracy on test scenes (%)")
    ax.set_xticks(xs)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args):
    common.quiet()
    ddp = common.setup_distributed()
    run = Path(args.run_dir)
    eval_dir = run / "eval"
    path = args.defender or str(run / "defender" / f"round_{args.round}")
    path = args.model if path == "base" else path
    if path != common.TINY and not Path(path).exists() and "/" not in path:
        raise SystemExit(f"[05] no defender at {path}")
    t0 = time.time()
    model, processor = common.load_defender(path, ddp.device, dtype=common.resolve_dtype(args.dtype, ddp.device))
    result = dict(round=args.round, defender=path, benchmarks={}, robustness={})
    n_items = 0
    for spec in args.bench:
        if "=" not in spec:
            raise SystemExit(f"[05] --bench expects NAME=PATH, got {spec!r}")
        name, tsv = spec.split("=", 1)
        items = load_tsv(tsv, args.max_items)
        preds = answer_items(model, processor, items, args, eval_dir / "preds" / f"round_{args.round}" / f"{name}.jsonl",
                             ddp)
        n_items += len(preds)
        result["benchmarks"][name] = score(name, preds)
        common.print0(f"[05] {name}: {result['benchmarks'][name]['overall']:.1f} ({len(preds)} items)")
    result["robustness"] = robustness(model, processor, run, args, ddp)
    if ddp.master:
        eval_dir.mkdir(parents=True, exist_ok=True)
        tmp = eval_dir / f".round_{args.round}.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(eval_dir / f"round_{args.round}.json")
        table = write_summary(eval_dir, args.paper_table)
        print(f"[05] robustness: {json.dumps(result['robustness'])}")
        print(f"[05] wrote {eval_dir}/round_{args.round}.json and summary.md in {time.time() - t0:.0f}s "
              f"({n_items / max(time.time() - t0, 1e-9):.1f} benchmark items/s)\n{table}")
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse_args(Args, PRESETS))
