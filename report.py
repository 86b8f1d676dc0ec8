"""05_eval.py's report: eval/summary.md (every scored defender beside the paper's rows, the co-evolution
lines), eval/robustness.png and eval/curves.png (the training curves of logs/*.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import census

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
            cells.append("" if not x else f"{x['acc']:.1f} ({x['attack_success']:.1f})" if x.get("n", 1) else
                         "- (none passes the gate)")
        lines.append("| " + " | ".join(cells) + " |")
        paper = PAPER.get(PAPER_ROW.get(row_label(r), row_label(r)))
        if paper_table and paper and benches:
            pv = [paper.get(b, float("nan")) for b in benches]
            known = [v for v in pv if not math.isnan(v)]
            lines.append(f"| *paper: {PAPER_ROW.get(row_label(r), row_label(r))}* | " +
                         " | ".join("" if math.isnan(v) else f"*{v:.1f}*" for v in pv) +
                         f" | *{sum(known) / len(known):.1f}* |" + " |" * (1 + len(attackers)))
    for a in attackers:   # the held-out attacks themselves (the same rows for every defender), and the defender they attacked
        scored = [r for r in rounds if "ssim_pass" in r["robustness"].get(a, {})]
        k = int(a.rsplit("_", 1)[1])
        x = next((r["robustness"][a] for r in sorted(scored, key=lambda r: r.get("round") != k - 1)), None)
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
        if c["n"] == 0:
            lines.append(f"\nRound {k}: none of attacker {k}'s held-out attacks passes its local-SSIM gate: "
                         f"nothing to measure.")
            continue
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
    lines += strategy_table(rounds, attackers)
    (eval_dir / "summary.md").write_text("\n".join(lines) + "\n")
    plot_robustness(rounds, attackers, eval_dir / "robustness.png")
    return "\n".join(lines)


def strategy_table(rounds, attackers) -> list[str]:
    """What the attacks do (census.py), AOT-SFT and every attacker round: the share of each strategy and, per
    attacker, in parentheses: the share that fooled the defender it was trained against / the attack success
    against the newest defender scored."""
    last = next((r for r in reversed(rounds) if r.get("round") is not None
                 and any("strategies" in r["robustness"].get(a, {}) for a in attackers)), None)
    if last is None:
        return []
    newest = last["robustness"]
    sets = ([("AOT-SFT", newest["aot_sft_strategies"])] if "aot_sft_strategies" in newest else []) + \
        [(a.replace("attacker_round_", "attacker "), newest[a]["strategies"]) for a in attackers
         if "strategies" in newest.get(a, {})]
    kinds = [k for k in census.STRATEGIES if any(k in s for _, s in sets)]
    lines = ["", "Attack strategies (census.py): % of each set's attacks (held-out ones for an attacker); in "
             "parentheses, % of them that fooled the defender the attacker trained against / % attack success "
             f"against the newest defender scored ({row_label(last)}).", "",
             "| strategy | " + " | ".join(n for n, _ in sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for k in kinds:
        cells = []
        for n, s in sets:
            x = s.get(k)
            cells.append("0" if not x else f"{x['share']:.1f}" if n == "AOT-SFT" else
                         f"{x['share']:.1f} ({x['fooled_attacked']:.0f} / {x['attack_success']:.0f})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def strategy_gallery(test, path: Path, per: int = 2):
    """eval/strategies_round_k.png: up to ``per`` held-out attacks of each strategy (scene | attack | difference),
    in census.STRATEGIES order."""
    import rundir
    kinds = test["strategy"]
    picked = [i for k in census.STRATEGIES for i in [i for i, s in enumerate(kinds) if s == k][:per]]
    rundir.save_gallery([(test[i]["image"], test[i]["attacked_image"]) for i in picked], path)


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


def targets(run: Path, rounds: int = 2) -> list[tuple[str, float, str, bool]]:
    """The co-evolution's targets on a finished run of ``rounds`` rounds (the tiny world's learning test and
    bench/coevolution.py): (what, measured, bar, met). The robustness cells are the gate-passing held-out
    attacks, as in eval/summary.md; 03's reward from its log, the mean of the first and the last 8 iterations.
    What the run has not reached (a defender not trained, a round not run) is NaN and not met."""
    files = [run / "eval" / f"{n}.json" for n in ["base"] + [f"round_{k}" for k in range(rounds + 1)]]
    scored = [json.loads(f.read_text()) for f in files if f.exists()]
    if not any(r.get("round") == 0 for r in scored):
        raise FileNotFoundError(f"{run}/eval/round_0.json: defender 0 is not scored (05_eval.py --round 0)")
    nan = float("nan")
    co = {c["attacker"]: c for c in coevolution(scored)}
    by = {r["round"]: r["robustness"] for r in scored if r.get("round") is not None}
    clean0 = by[0]["clean_acc"]
    out = [("defender 0 clean", clean0, ">= 85", clean0 >= 85)]
    for k in range(1, rounds + 1):
        c = dict(dict(drop=nan, recovered=nan, clean_after=nan), **co.get(k, {}))
        out += [(f"attacker {k} takes (points)", c["drop"], ">= 25" if k == 1 else ">= 15", c["drop"] >= (25 if k == 1 else 15)),
                (f"defender {k} wins back (%)", 100 * c["recovered"], ">= 50", c["recovered"] >= 0.5),
                (f"defender {k} clean vs round 0", c["clean_after"] - clean0, ">= -5", c["clean_after"] >= clean0 - 5)]
        # the attacks' own figures (the same in every defender's file): from defender k-1's, which scored them
        a = by.get(k - 1, {}).get(f"attacker_round_{k}", dict(changed_area=dict(median=nan), ssim_pass=nan))
        out += [(f"attacker {k} median changed area (%)", 100 * a["changed_area"]["median"], "<= 10",
                 a["changed_area"]["median"] <= 0.10),
                (f"attacker {k} held-out attacks within the gate (%)", a["ssim_pass"], ">= 85", a["ssim_pass"] >= 85)]
        log = run / "logs" / f"03_round_{k}.jsonl"
        rows = [json.loads(x) for x in log.read_text().splitlines() if '"reward_mean"' in x] if log.exists() else []
        first, last = rows[:8], rows[-8:]
        mean = lambda rs, key: sum(r[key] for r in rs) / len(rs) if rs else nan  # noqa: E731
        rise, success = (mean(last, "reward_mean") - mean(first, "reward_mean"),
                         100 * (mean(last, "attack_success") - mean(first, "attack_success")))
        met = rise >= 0.1 or success >= 10
        out += [(f"attacker {k} RL: reward, last 8 - first 8 iterations", rise, ">= 0.1 (or the next >= 10)", met),
                (f"attacker {k} RL: attack success, last 8 - first 8 (points)", success, ">= 10 (or the last >= 0.1)",
                 met)]
        if k > 1:    # defender k on attacker 1's attacks, against defender 1: no forgetting
            then = by.get(1, {}).get("attacker_round_1", {}).get("acc", nan)
            now = by.get(k, {}).get("attacker_round_1", {}).get("acc", nan)
            out.append((f"defender {k} vs defender 1 on attacker 1's attacks", now - then, ">= -5", now >= then - 5))
    return out


CURVES = [("02_sft", "loss"), ("03_round", "reward_mean"), ("03_round", "attack_success"), ("03_round", "ssim_local"),
          ("03_round", "ratio_mean"), ("03_round", "val_score"), ("04_round", "gen_reward"), ("04_round", "gen_accuracy"),
          ("04_round", "kept_group_frac"), ("04_round", "gen_response_len"), ("04_round", "entropy"),
          ("04_round", "val_attack_acc"), ("04_round", "val_clean_acc")]


def plot_curves(logs: Path, path: Path) -> dict:
    """eval/curves.png: the training curves of logs/*.jsonl, one panel per metric, one line per round.
    Returns {panel: number of points drawn}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = -(-len(CURVES) // 2)
    fig, axes = plt.subplots(2, cols, figsize=(20 * cols / 6, 6))
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
