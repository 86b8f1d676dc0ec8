"""Stage 05 scorers on hand-computed cases, a tiny TSV end to end, and the whole tiny loop."""
import base64
import io
import json
import math
import os
import subprocess
import time

import pytest
from conftest import ROOT, load_script
from datasets import load_from_disk
from helpers import env, run_stage
from PIL import Image

import benchmarks
import census
import common
import report

s05 = load_script("05_eval.py")


def P(pred, answer, index="0", **meta):
    return dict(index=index, pred=pred, answer=answer, correct=pred == answer, meta=meta)


def test_pope_official_strict_accuracy_last_trial_and_split_categories():
    """Cases from eval/hallucination/pope.py: the headline is strict accuracy over the rows; P/R/F1 use
    each row's last trial; only the per-category rows split "random,popular"."""
    preds = [P("Yes", "Yes", category="random,popular"), P("Yes", "No", category="random"),
             P("No", "Yes", category="random"), P("No", "No", category="adversarial"),
             dict(P("Yes", "Yes", category="adversarial"), correct=False)]   # trial 1 right, trial 2 wrong... kept as last
    s = s05.score_pope(preds)
    assert s["overall"] == s["accuracy"] == pytest.approx(100 * 2 / 5)       # 5 rows, not 6 exploded ones
    # last-trial predictions: tp 2, fp 1, fn 1 -> P 2/3, R 2/3
    assert s["precision"] == pytest.approx(200 / 3) and s["recall"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(200 / 3)
    assert set(s["per_category"]) == {"random", "popular", "adversarial"}
    assert s["per_category"]["popular"]["accuracy"] == 100.0
    assert s["per_category"]["random"]["accuracy"] == pytest.approx(100 / 3)


def test_hallusionbench_ids_from_the_index_string():
    """eval/hallucination/hallusionbench.py: set / figure / question ids are fields 3, 4, 5 of the index;
    groups are keyed by l2-category; the headline is aAcc."""
    assert s05.hallusion_ids("VS_chart_0_1_2_3") == ("1", "2", "3")
    assert s05.hallusion_ids("short_index") == ("unknown", "unknown", "unknown")
    m = {"category": "VS", "l2-category": "chart"}
    preds = [P("Yes", "Yes", "VS_chart_x_0_0_0", **m), P("No", "No", "VS_chart_x_0_0_1", **m),
             P("Yes", "No", "VS_chart_x_0_1_0", **m), P("No", "No", "VS_chart_x_0_1_1", **m),
             P("No", "No", "VS_map_x_0_0_0", **{"category": "VS", "l2-category": "map"})]   # another l2: own groups
    s = s05.score_hallusion(preds)
    assert s["aAcc"] == s["overall"] == 80.0
    assert s["fAcc"] == pytest.approx(100 * 2 / 3)    # chart fig 0 right, chart fig 1 wrong, map fig 0 right
    assert s["qAcc"] == pytest.approx(100 * 2 / 3)    # chart q 0 wrong (fig 1), chart q 1 right, map q 0 right
    assert s["vlmevalkit_mean"] == pytest.approx((80 + 200 / 3 + 200 / 3) / 3)


def test_hrbench_official_overall_and_vstar_categories():
    preds = [P("A", "A", cycle_category="c0", category="single"), P("B", "A", cycle_category="c0", category="single"),
             P("A", "A", cycle_category="c1", category="cross")]
    s = s05.score("hrbench4k", preds)
    assert s["overall"] == pytest.approx(200 / 3)                 # official: correct / total
    assert s["vlmevalkit_cycle_avg"] == 75.0                      # VLMEvalKit: mean over cycles
    assert s["per_category"] == {"cross": 100.0, "single": 50.0}
    v = s05.score("vstar", [P("A", "A", category="attribute"), P("B", "A", category="spatial"),
                            P("A", "A", category="spatial")])
    assert v["per_category"] == {"attribute": 100.0, "spatial": 50.0} and v["overall"] == pytest.approx(200 / 3)


def test_curves_from_the_logs(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "02_sft.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 1 / i}) for i in (1, 2, 3)))
    for k in (1, 2):
        (logs / f"03_round_{k}.jsonl").write_text("\n".join(json.dumps({"iter": i, "reward_mean": 0.1 * i})
                                                             for i in (1, 2)))
    (logs / "04_round_0.jsonl").write_text(json.dumps({"step": 1, "gen_reward": 0.2, "entropy": None}))
    drawn = report.plot_curves(logs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert drawn["02_sft:loss"] == 3 and drawn["03_round:reward_mean"] == 4 and drawn["04_round:gen_reward"] == 1
    assert drawn["04_round:entropy"] == 0 and drawn["03_round:ssim_local"] == 0   # None and absent: not drawn


def test_summary_reads_all_attacks_from_the_defender_attacked(tmp_path):
    """'on all N, the defender it attacked scores': attacker k's row in defender k-1's results, also when the base
    defender (round -1, listed first) was scored on the same attacks."""
    for rnd, acc_all in ((-1, 40.0), (0, 62.5), (1, 80.0)):
        x = dict(acc=50.0, attack_success=10.0, n=8, ssim_local=0.8, ssim_pass=80.0, tau=0.7,
                 all=dict(acc=acc_all, attack_success=5.0, n=10))
        (tmp_path / f"r{rnd}.json").write_text(json.dumps(dict(round=rnd, benchmarks={},
                                                              robustness=dict(clean_acc=90.0, attacker_round_1=x))))
    assert "on all 10, the defender it attacked scores 62.5 (5.0 attack success)" in report.write_summary(tmp_path, False)


def test_coevolution_drop_and_recovery_hand_computed(tmp_path):
    def res(rnd, clean, **attacks):
        rob = dict(clean_acc=clean, **{f"attacker_round_{k[1:]}": dict(acc=v[0], attack_success=0.0, n=10, ssim_local=0.7,
                                                                         ssim_pass=90.0, tau=0.55, **v[1])
                                       for k, v in attacks.items()})
        (tmp_path / f"{'base' if rnd < 0 else f'round_{rnd}'}.json").write_text(
            json.dumps(dict(round=rnd, benchmarks={}, robustness=rob)))
    res(-1, 98.0)
    res(0, 96.0, a1=(50.0, {}))          # attacker 1 takes 46 points from defender 0 (an older file: no clean_acc
    #                                      of its own, every test scene was attacked)
    # defender 1 wins back 23 of them (50%); attacker 2 attacked the scenes with target boxes only, 90.0 right
    # clean there (94.0 on every scene): it takes 30 points; not yet scored on defender 2
    res(1, 94.0, a1=(73.0, {}), a2=(60.0, dict(clean_acc=90.0)))
    rounds = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert "By right answer" not in report.write_summary(tmp_path, False)   # older results: no per-answer scores
    # the per-answer scores of the same rounds, from the predictions 05 saves (acc_by_answer): attacker 1 tips
    # defender 0 to "A" (A: 4 of 4 right, B: 1 of 6), defender 1 answers B where it should (B: 5 of 6)
    preds0 = [dict(answer="A", correct=True)] * 4 + [dict(answer="B", correct=i == 0) for i in range(6)]
    preds1 = [dict(answer="A", correct=i < 3) for i in range(4)] + [dict(answer="B", correct=i < 5) for i in range(6)]
    assert s05.acc_by_answer(preds0) == {"A": 100.0, "B": pytest.approx(100 / 6)}
    for r, preds, clean in ((rounds[1], preds0, {"A": 90.0, "B": 100.0}), (rounds[2], preds1, {"A": 80.0, "B": 100.0})):
        r["robustness"]["attacker_round_1"]["by_answer"] = s05.acc_by_answer(preds)
        r["robustness"]["clean_by_answer"] = clean
        (tmp_path / f"round_{r['round']}.json").write_text(json.dumps(r))
    c = report.coevolution(rounds)
    assert [x["attacker"] for x in c] == [1, 2]
    assert c[0]["drop"] == 46.0 and c[0]["recovered"] == pytest.approx(0.5) and c[0]["clean_after"] == 94.0
    assert c[0]["gate_pass"] == 90.0
    assert c[1] == dict(attacker=2, clean_before=94.0, clean_items_before=90.0, n=10, attacked_before=60.0, drop=30.0,
                        gate_pass=90.0)   # no defender 2 yet
    summary = report.write_summary(tmp_path, False)
    assert ("Round 1: attacker 1 takes 46.0 points from defender 0, the model it was trained to fool (96.0 clean, "
            "50.0 attacked, on the 10 attacked test scenes); defender 1 wins back 23.0 of them (50%: 73.0 attacked) at "
            "94.0 clean on every test scene (-2.0).") in summary
    assert ("Round 2: attacker 2 takes 30.0 points from defender 1, the model it was trained to fool (90.0 clean, 60.0 "
            "attacked, on the 10 attacked test scenes).") in summary
    assert ("By right answer, defender 0 -> 1: attacked A 100.0 -> 75.0, B 16.7 -> 83.3; clean A 90.0 -> 80.0, "
            "B 100.0 -> 100.0.") in summary
    assert c[0]["by_answer_after"] == {"A": 75.0, "B": pytest.approx(500 / 6)} and "by_answer_before" not in c[1]


def test_target_noise_interval_on_hand_cases():
    """bench/target_noise.py: the value is the statistic of the means (a take of 50 points, by hand); a paired
    difference the same on every scene leaves every resampling the same (a zero-width interval)."""
    import sys

    import numpy as np
    sys.path.insert(0, str(ROOT / "bench"))
    import target_noise
    take = lambda m: 100 * (m["clean"] - m["before"])  # noqa: E731
    rng = np.random.default_rng(0)
    text = target_noise.interval(take, dict(clean=np.array([1.0, 1, 1, 0]), before=np.array([0.0, 1, 0, 0])), 500, rng)
    value, lo, hi = (float(x.strip("(),")) for x in text.split())
    assert value == 50.0 and 0.0 <= lo < 50.0 < hi <= 100.0
    assert target_noise.interval(take, dict(clean=np.ones(5), before=np.zeros(5)), 100, rng) == "100.0 (100.0, 100.0)"


def test_coevolution_line_when_the_attacker_took_nothing(tmp_path):
    """No drop (the random tiny preset): the share won back is undefined, and the summary says so."""
    for rnd, acc in ((0, 80.0), (1, 85.0)):
        rob = dict(clean_acc=80.0, attacker_round_1=dict(acc=acc, attack_success=0.0, n=3, clean_acc=80.0))
        (tmp_path / f"round_{rnd}.json").write_text(json.dumps(dict(round=rnd, benchmarks={}, robustness=rob)))
    assert ("attacker 1 takes 0.0 points from defender 0, the model it was trained to fool (80.0 clean, 80.0 attacked, "
            "on the 3 attacked test scenes); defender 1 wins back 5.0 of them (no drop to win back: 85.0 attacked)"
            ) in report.write_summary(tmp_path, False)


def _b64(color):
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_tiny_tsv_end_to_end_back_references_trials_and_rescoring(tmp_path):
    """VLMEvalKit-format TSVs: repeated images stored as a back-reference to another row's index are
    resolved; unusable rows are named; strict multi-trial stops at the first wrong trial; the headline
    numbers are the official ones recomputed from the saved predictions."""
    rows = ["index\timage\tquestion\tA\tB\tanswer\tcategory"]
    rows += [f"{i}\t{_b64((i * 40, 0, 0))}\tWhich side?\tleft\tright\t{'AB'[i % 2]}\tattribute" for i in range(5)]
    rows.append("5\t2\tWhich side is it?\tleft\tright\tA\tspatial")          # back-reference to row 2's image
    rows.append("6\t77\tWhich side?\tleft\tright\tA\tspatial")               # refers to a row that is not there
    rows.append("9\t" + "!" * 80 + "\tWhich side?\tleft\tright\tA\tspatial")  # not base64
    (tmp_path / "vstar.tsv").write_text("\n".join(rows) + "\n")
    pope = ["index\timage\tquestion\tanswer\tcategory"] + \
        [f"{i}\t{_b64((0, i * 40, 0))}\tIs there a cat?\t{'yes' if i % 2 else 'no'}\trandom,popular" for i in range(4)]
    (tmp_path / "pope.tsv").write_text("\n".join(pope) + "\n")
    items, skipped = benchmarks.load_tsv(str(tmp_path / "vstar.tsv"))
    assert [it["index"] for it in items] == ["0", "1", "2", "3", "4", "5"]
    assert items[5]["image"].getpixel((0, 0)) == items[2]["image"].getpixel((0, 0)) == (80, 0, 0)
    assert set(skipped) == {"6", "9"} and "'77'" in skipped["6"] and "unreadable" in skipped["9"]
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    from datasets import Dataset
    Dataset.from_dict({"id": ["t0"], "image": [Image.new("RGB", (56, 56))], "question": ["Is it dark?"],
                       "options": [[]], "answer": ["Yes"], "targets": [[]], "split": ["test"]}).save_to_disk(
        str(run / "data" / "scenes"))
    args = ["--preset", "tiny", "--run_dir", run, "--round", "0", "--defender", "tiny", "--trials", "3", "--dtype", "bf16",
            "--trial_temperature", "1.0", "--bench", f"vstar={tmp_path / 'vstar.tsv'}", f"pope={tmp_path / 'pope.tsv'}"]
    p = run_stage("05_eval.py", *args)
    assert "skipped 2 rows" in p.stdout
    res = json.loads((run / "eval" / "round_0.json").read_text())
    assert set(res["skipped"]["vstar"]) == {"6", "9"}
    for bench, n in (("vstar", 6), ("pope", 4)):
        preds = [json.loads(x) for x in (run / "eval" / "preds" / "round_0" / f"{bench}.jsonl").read_text().splitlines()]
        assert len(preds) == n
        for pr in preds:   # strict: the next trial only after a right one; correct iff all 3 are
            oks = [t["correct"] for t in pr["trials"]]
            assert all(oks[:-1]) and (len(oks) == 3 or not oks[-1])   # fewer than 3 only after a wrong one
            assert pr["correct"] == (len(oks) == 3 and all(oks)) and pr["pred"] == pr["trials"][-1]["pred"]
        assert res["benchmarks"][bench]["overall"] == pytest.approx(100 * sum(pr["correct"] for pr in preds) / n)
    assert set(res["benchmarks"]["pope"]["per_category"]) == {"random", "popular"}
    assert (run / "eval" / "summary.md").read_text().count("clean warm-up (round 0)") == 1
    # a re-run answers nothing new
    run_stage("05_eval.py", *args)
    assert len((run / "eval" / "preds" / "round_0" / "vstar.jsonl").read_text().splitlines()) == 6


def test_sampled_trials_do_not_depend_on_what_ran_before(tmp_path, monkeypatch):
    """--trial_temperature > 0 samples trials 2..N from the global RNG: seeded per file, trial and rank,
    so a file's answers are the same whatever the process drew before it (another benchmark, a resume)."""
    from types import SimpleNamespace

    import torch

    import common
    model, proc = common.load_defender("tiny")
    monkeypatch.setattr(s05, "judge", lambda text, it, style: (text, True))   # every trial right: all 3 run
    items = [dict(index=str(i), image=Image.new("RGB", (56, 56), (i * 60, 0, 0)), question="Which side?",
                  options=["left", "right"], answer="A", meta={}) for i in range(4)]
    args = SimpleNamespace(trials=3, trial_temperature=1.0, max_new_tokens=6, batch_size=4, gen_memory_gb=1.0)
    ddp = SimpleNamespace(rank=0, world=1, master=True)

    def outputs(path):
        return [[t["output"] for t in p["trials"]] for p in s05.answer_items(model, proc, items, args, path, ddp, key="k")]
    torch.manual_seed(1)
    first = outputs(tmp_path / "a" / "vstar.jsonl")
    torch.rand(1000)                                    # the process drew other numbers before this file
    again = outputs(tmp_path / "b" / "vstar.jsonl")
    other = outputs(tmp_path / "c" / "pope.jsonl")      # another file samples on its own stream
    assert first == again
    assert [o[0] for o in first] == [o[0] for o in other] and [o[1:] for o in first] != [o[1:] for o in other]
    assert all(len(o) == 3 for o in first) and len({o[1] for o in first}) > 1


def test_cached_answers_are_reused_only_for_the_same_defender_items_and_settings(tmp_path, monkeypatch):
    """answer_items keeps a file's answers while its .key matches; a retrained defender (its files rewritten),
    other items or other decoding settings give another key, and every item is answered again."""
    import os
    from types import SimpleNamespace
    asked = []

    def generate(model, processor, images, prompts, max_new_tokens, **kw):
        asked.extend([len(images)] if images else [])
        return ["A"] * len(images)
    monkeypatch.setattr(s05.common, "defender_generate", generate)
    items = [dict(index=str(i), image=None, question="Which side?", options=["left", "right"], answer="A", meta={})
             for i in range(3)]
    args = SimpleNamespace(trials=1, trial_temperature=0.0, max_new_tokens=6, batch_size=4, gen_memory_gb=1.0)
    ddp = SimpleNamespace(rank=0, world=1, master=True)
    weights, tsv = tmp_path / "defender" / "model.safetensors", tmp_path / "bench.tsv"
    weights.parent.mkdir()
    weights.write_bytes(b"one")
    tsv.write_text("index\tquestion\n")
    (tmp_path / "defender" / "cache-1.arrow").write_bytes(b"x")   # a datasets cache file: not part of the print

    def key(a=args):
        return s05.cache_key(dict(files=s05.fingerprint(tmp_path / "defender"), dtype="float32"), s05.fingerprint(tsv),
                             a, "hrbench")
    path = tmp_path / "preds" / "bench.jsonl"
    s05.answer_items(None, None, items, args, path, ddp, key=key())
    (tmp_path / "defender" / "cache-2.arrow").write_bytes(b"y")
    preds = s05.answer_items(None, None, items, args, path, ddp, key=key())
    assert asked == [3] and len(preds) == 3 and all(p["correct"] for p in preds)      # all three from the cache
    st = weights.stat()
    weights.write_bytes(b"two")                                   # the defender retrained: same size, new time
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    s05.answer_items(None, None, items, args, path, ddp, key=key())
    three = SimpleNamespace(**{**vars(args), "trials": 3})
    s05.answer_items(None, None, items, three, path, ddp, key=key(three))              # other decoding settings
    s05.answer_items(None, None, items[:2], three, path, ddp, key=key(three))          # the same: cached
    assert asked == [3, 3, 3, 3, 3] and len(path.read_text().splitlines()) == 3   # 3 trials of 3 items, then none
    assert s05.fingerprint("Qwen/Qwen2.5-VL-7B-Instruct") == ["Qwen/Qwen2.5-VL-7B-Instruct"]


def test_cache_under_two_processes_reuses_all_and_a_changed_key_answers_all(tmp_path):
    """torchrun, 2 ranks: a re-run answers nothing (the file is unchanged); a .key that no longer matches makes
    both ranks answer every scene again (rank 0 decides; each scene once in the file)."""
    from datasets import Dataset
    run = tmp_path / "run"
    Dataset.from_dict({"id": [f"t{i}" for i in range(6)], "image": [Image.new("RGB", (56, 56), (40 * i, 0, 0)) for i in range(6)],
                       "question": ["Which side?"] * 6, "options": [["left", "right"]] * 6, "answer": ["A", "B"] * 3,
                       "targets": [[]] * 6, "split": ["test"] * 6}).save_to_disk(str(run / "data" / "scenes"))
    args = ["--preset", "tiny", "--run_dir", run, "--round", "0", "--defender", "tiny"]
    preds = run / "eval" / "preds" / "round_0" / "scenes_clean.jsonl"
    run_stage("05_eval.py", *args, nproc=2)
    first = preds.read_text()
    p = run_stage("05_eval.py", *args, nproc=2)
    assert preds.read_text() == first and "answered again" not in p.stdout
    preds.with_suffix(".key").write_text("another defender\n")
    p = run_stage("05_eval.py", *args, nproc=2)
    again = [json.loads(x) for x in preds.read_text().splitlines()]
    assert "answered again" in p.stdout and sorted(x["index"] for x in again) == [f"t{i}" for i in range(6)]
    assert preds.with_suffix(".key").read_text().strip() != "another defender"


@pytest.mark.slow
def test_tiny_loop_end_to_end_and_rerun_is_a_no_op(tmp_path):
    e = dict(env(), PRESET="tiny", ROUNDS="1", RUN_DIR=str(tmp_path / "loop"), PYTHON=os.sys.executable)
    p = subprocess.run(["bash", str(ROOT / "run_rounds.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "loop" / "eval" / "summary.md").read_text()
    assert "| base |" in summary and "| clean warm-up (round 0) |" in summary and "| Iter. 1 |" in summary
    assert "vs attacker 1" in summary
    assert "== stage times:" in p.stdout and "04 defender round 1: " in p.stdout and "eval/curves.png" in p.stdout
    # the cell that measures attacker 1: defender 0, the model it attacked, on attacker 1's held-out attacks
    warmup = next(x for x in summary.splitlines() if x.startswith("| clean warm-up (round 0) |"))
    assert warmup.rstrip(" |").split("|")[-1].strip() != ""
    r0 = json.loads((tmp_path / "loop" / "eval" / "round_0.json").read_text())
    n_test = len(load_from_disk(str(tmp_path / "loop" / "attacks" / "round_1"))["test"])
    assert r0["robustness"]["attacker_round_1"]["all"]["n"] == n_test
    # the held-out attacks' local SSIM and the share passing attacker 1's own gate (the tiny preset's tau 0.3)
    ssim = load_from_disk(str(tmp_path / "loop" / "attacks" / "round_1"))["test"]["ssim_local"]
    x = r0["robustness"]["attacker_round_1"]
    assert x["tau"] == 0.3 and abs(x["ssim_pass"] - 100 * sum(s >= 0.3 for s in ssim) / len(ssim)) < 1e-9
    assert x["n"] == sum(s >= 0.3 for s in ssim) and 0 <= x["changed_area"]["median"] <= 1
    assert abs(x["ssim_local"] - sum(ssim) / len(ssim)) < 1e-6
    assert f"Attacker 1: {n_test} held-out attacks" in summary
    # the census: every held-out attack labelled by 03, its shares (05) summing to 100 over the test split's labels
    r1 = json.loads((tmp_path / "loop" / "eval" / "round_1.json").read_text())["robustness"]
    labels = load_from_disk(str(tmp_path / "loop" / "attacks" / "round_1"))["test"]["strategy"]
    st = r1["attacker_round_1"]["strategies"]
    assert set(labels) <= set(census.STRATEGIES) and {k: v["n"] for k, v in st.items()} == \
        {k: labels.count(k) for k in set(labels)}
    assert abs(sum(v["share"] for v in st.values()) - 100) < 1e-9
    sft = json.loads((tmp_path / "loop" / "eval" / "census" / "aot_sft.json").read_text())
    assert sum(v["n"] for v in sft.values()) == len(load_from_disk(str(tmp_path / "loop" / "data" / "aot_sft")))
    assert r1["aot_sft_strategies"] == sft and "| strategy | AOT-SFT | attacker 1 |" in summary
    for d in ["data/aot_sft", "attacker/sft", "attacker/round_1", "attacks/round_1", "defender/round_0",
              "defender/round_1", "eval/base.json", "eval/round_1.json", "eval/robustness.png", "eval/curves.png",
              "eval/strategies_round_1.png"]:
        assert (tmp_path / "loop" / d).exists(), d
    t0 = time.time()
    p = subprocess.run(["bash", str(ROOT / "run_rounds.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and time.time() - t0 < 30
    assert "[0" not in p.stdout   # no stage ran again


def _vstar_rows(n=4):
    return ["index\timage\tquestion\tA\tB\tanswer\tcategory"] + \
        [f"{i}\t{_b64((i * 40, 0, 0))}\tWhich side?\tleft\tright\t{'AB'[i % 2]}\tattribute" for i in range(n)]


def test_unscorable_rows_are_skipped_and_named(tmp_path):
    rows = _vstar_rows(2) + [f"7\t{_b64((1, 1, 1))}\tWhich side?\tleft\tright\tE\tattribute",   # E: no such option
                             f"8\t{_b64((1, 1, 1))}\t\tleft\tright\t\tattribute"]               # empty question + answer
    (tmp_path / "v.tsv").write_text("\n".join(rows) + "\n")
    items, skipped = benchmarks.load_tsv(str(tmp_path / "v.tsv"))
    assert [it["index"] for it in items] == ["0", "1"]
    assert skipped == {"7": "answer 'E' is not among the options (A, B)", "8": "empty question"}


def test_bad_benchmark_files_stop_05_before_the_model_loads(tmp_path):
    """Each unreadable file is named in one line; the defender path does not even exist, so any model load
    would have failed first with another message."""
    good = tmp_path / "good.tsv"
    good.write_text("\n".join(_vstar_rows()) + "\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "binary.tsv").write_bytes(b"index\timage\tquestion\tanswer\n" + bytes([0xff, 0xfe, 0x00, 0x81]) * 10)
    (tmp_path / "comma.tsv").write_text("index,image,question,answer\n0,x,q,A\n")
    (tmp_path / "nocol.tsv").write_text("index\timage\tquestion\n0\tx\tq\n")
    bad = {"empty": "empty file", "binary": "not UTF-8 text", "comma": "not tab-separated",
           "nocol": "missing column(s) answer", "gone": "no such file"}
    specs = [f"good={good}"] + [f"{k}={tmp_path / (k + '.tsv')}" for k in bad]
    p = run_stage("05_eval.py", "--run_dir", tmp_path / "run", "--defender", str(tmp_path / "no_model"),
                  "--bench", *specs, check=False, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("[05]")]
    assert len(lines) == len(bad), p.stderr
    for (k, why), line in zip(bad.items(), lines):
        assert f"{k}={tmp_path / (k + '.tsv')}: {why}" in line, line
    assert "no_model" not in p.stderr


@pytest.mark.slow
def test_benchmarks_only_scoring_and_a_later_failure_keeps_earlier_results(tmp_path):
    """No run at all: 05 scores the benchmark, says there is nothing to score robustness on, writes the JSON and
    the summary. A second benchmark that breaks mid-file (a row with extra fields) stops 05 with one line; the
    first benchmark's result is already on disk."""
    (tmp_path / "vstar.tsv").write_text("\n".join(_vstar_rows()) + "\n")
    run = tmp_path / "scores"
    p = run_stage("05_eval.py", "--preset", "tiny", "--run_dir", run, "--defender", "tiny", "--name", "my_model",
                  "--bench", f"vstar={tmp_path / 'vstar.tsv'}")
    assert "no held-out scenes or attacks" in p.stdout and "Traceback" not in p.stderr
    res = json.loads((run / "eval" / "my_model.json").read_text())
    assert res["robustness"] == {} and res["round"] is None and set(res["benchmarks"]) == {"vstar"}
    summary = (run / "eval" / "summary.md").read_text()
    row = next(x for x in summary.splitlines() if x.startswith("| my_model |"))
    assert f"{res['benchmarks']['vstar']['overall']:.1f}" in row
    broken = _vstar_rows() + ["9\tx\tWhich side?\tleft\tright\tA\tattribute\textra\tfields"]
    (tmp_path / "pope.tsv").write_text("\n".join(broken) + "\n")
    run2 = tmp_path / "scores2"
    p = run_stage("05_eval.py", "--preset", "tiny", "--run_dir", run2, "--defender", "tiny", "--name", "m",
                  "--bench", f"vstar={tmp_path / 'vstar.tsv'}", f"pope={tmp_path / 'pope.tsv'}", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "pope.tsv: cannot be read as a TSV" in p.stderr
    first = json.loads((run2 / "eval" / "scores" / "m" / "vstar.json").read_text())
    assert first["result"]["overall"] == res["benchmarks"]["vstar"]["overall"]
    assert not (run2 / "eval" / "m.json").exists()


def test_changed_area_and_gate_passing_attack_scores():
    scene = Image.new("RGB", (10, 10), (100, 100, 100))
    attacked = scene.copy()
    attacked.paste((100, 100, 161), (0, 0, 5, 2))     # 10 pixels changed by 61 in sum: counted
    attacked.paste((120, 120, 119), (0, 5, 10, 6))    # 10 pixels changed by 20 + 20 + 19 = 59: not counted
    assert common.changed_area(scene, attacked) == pytest.approx(0.10)
    assert s05.quartiles([0.1, 0.2, 0.3, 0.4, 0.5])["median"] == pytest.approx(0.3)
    clean_ok = {"a": True, "b": True, "c": False, "d": True}
    preds = [dict(index="a", correct=False, answer="A"), dict(index="b", correct=True, answer="B"),
             dict(index="c", correct=False, answer="A"), dict(index="d", correct=False, answer="B")]
    every = s05.attack_scores(preds, clean_ok)
    assert every["acc"] == 25.0 and every["attack_success"] == pytest.approx(200 / 3) and every["clean_acc"] == 75.0
    passing = s05.attack_scores([p for p in preds if p["index"] in {"a", "b"}], clean_ok)   # c, d fail the gate
    assert passing["acc"] == 50.0 and passing["attack_success"] == 50.0 and passing["n"] == 2


def test_targets_hand_computed(tmp_path):
    """report.targets on a made-up two-round run: each target against its bar (the learning test's verdicts)."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "logs").mkdir()

    def res(name, rnd, clean, **attacks):
        rob = dict(clean_acc=clean, **{f"attacker_round_{k[1:]}": dict(acc=acc, clean_acc=clean, n=10, ssim_pass=gate,
                                                                        changed_area=dict(median=area))
                                       for k, (acc, gate, area) in attacks.items()})
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(dict(round=rnd, robustness=rob)))
    res("base", None, 90.0)
    res("round_0", 0, 90.0, a1=(60.0, 86.0, 0.08))       # attacker 1 takes 30 points
    res("round_1", 1, 88.0, a1=(76.0, 86.0, 0.08), a2=(70.0, 84.0, 0.12))   # wins back 16 of 30; attacker 2 takes 18
    res("round_2", 2, 84.0, a1=(70.0, 86.0, 0.08), a2=(78.0, 84.0, 0.12))   # wins back 8 of 18; forgets 6 points
    for k, (first, last) in {1: (0.2, 0.35), 2: (0.3, 0.32)}.items():
        rows = [dict(iter=i, reward_mean=first if i < 8 else last, attack_success=0.5 if k == 2 and i >= 8 else 0.3)
                for i in range(16)]
        (tmp_path / "logs" / f"03_round_{k}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = {what: (pytest.approx(value), met) for what, value, _, met in report.targets(tmp_path, rounds=2)}
    assert got == {
        "defender 0 clean": (90.0, True),
        "attacker 1 takes (points)": (30.0, True), "defender 1 wins back (%)": (100 * 16 / 30, True),
        "defender 1 clean vs round 0": (-2.0, True),
        "attacker 1 median changed area (%)": (8.0, True), "attacker 1 held-out attacks within the gate (%)": (86.0, True),
        "attacker 1 RL: reward, last 8 - first 8 iterations": (0.15, True),
        "attacker 1 RL: attack success, last 8 - first 8 (points)": (0.0, True),
        "attacker 2 takes (points)": (18.0, True), "defender 2 wins back (%)": (100 * 8 / 18, False),
        "defender 2 clean vs round 0": (-6.0, False),
        "attacker 2 median changed area (%)": (12.0, False), "attacker 2 held-out attacks within the gate (%)": (84.0, False),
        "attacker 2 RL: reward, last 8 - first 8 iterations": (0.02, True),        # success rose 20 points
        "attacker 2 RL: attack success, last 8 - first 8 (points)": (20.0, True),
        "defender 2 vs defender 1 on attacker 1's attacks": (-6.0, False)}
    (tmp_path / "eval" / "round_2.json").unlink()           # a run stopped before defender 2: what it has, the rest NaN
    stopped = {what: (value, met) for what, value, _, met in report.targets(tmp_path, rounds=2)}
    assert stopped["attacker 2 takes (points)"] == (pytest.approx(18.0), True)
    assert stopped["attacker 2 median changed area (%)"] == (pytest.approx(12.0), False)
    for what in ("defender 2 wins back (%)", "defender 2 clean vs round 0", "defender 2 vs defender 1 on attacker 1's attacks"):
        assert math.isnan(stopped[what][0]) and stopped[what][1] is False
    (tmp_path / "eval" / "round_0.json").unlink()
    with pytest.raises(FileNotFoundError, match="defender 0 is not scored"):
        report.targets(tmp_path, rounds=2)
