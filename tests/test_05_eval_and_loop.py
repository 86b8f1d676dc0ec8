"""Stage 05 scorers on hand-computed cases, a tiny TSV end to end, and the whole tiny loop."""
import base64
import io
import json
import os
import subprocess
import time

import pytest
from conftest import ROOT, load_script
from helpers import env, run_stage
from PIL import Image

s05 = load_script("05_eval.py")


def P(pred, answer, **meta):
    return dict(pred=pred, answer=answer, correct=pred == answer, meta=meta)


def test_pope_yes_is_positive_per_split():
    preds = [P("Yes", "Yes", category="random"), P("Yes", "No", category="random"), P("No", "Yes", category="random"),
             P("No", "No", category="random"), P("Yes", "Yes", category="adversarial"), P(None, "Yes", category="adversarial")]
    s = s05.score_pope(preds)
    # random: tp 1, fp 1, fn 1 -> precision 0.5, recall 0.5, F1 0.5, acc 2/4
    assert s["random"] == pytest.approx(dict(acc=50.0, precision=50.0, recall=50.0, f1=50.0))
    # adversarial: tp 1, fn 1 (unparsed answer counts as "not yes") -> P 1, R 0.5, F1 2/3
    assert s["adversarial"]["precision"] == 100.0 and s["adversarial"]["recall"] == 50.0
    assert s["adversarial"]["f1"] == pytest.approx(200 / 3)
    assert s["overall"] == pytest.approx((50.0 + 200 / 3) / 2)


def test_hallusionbench_figure_and_question_grouping():
    m = dict(category="VS", set_id="0")
    preds = [P("Yes", "Yes", figure_id="0", question_id="0", **m), P("No", "No", figure_id="0", question_id="1", **m),
             P("Yes", "No", figure_id="1", question_id="0", **m), P("No", "No", figure_id="1", question_id="1", **m)]
    s = s05.score_hallusion(preds)
    assert s["aAcc"] == 75.0
    assert s["fAcc"] == 50.0     # figure 0 all right, figure 1 not
    assert s["qAcc"] == 50.0     # question 1 right on both figures, question 0 not
    assert s["overall"] == pytest.approx((75 + 50 + 50) / 3)


def test_hrbench_cycle_average_and_vstar_categories():
    preds = [P("A", "A", cycle_category="c0"), P("B", "A", cycle_category="c0"), P("A", "A", cycle_category="c1")]
    s = s05.score("hrbench4k", preds)
    assert s["per_cycle"] == {"c0": 50.0, "c1": 100.0} and s["overall"] == 75.0   # not 66.7 (item mean)
    v = s05.score("vstar", [P("A", "A", category="attribute"), P("B", "A", category="spatial"),
                            P("A", "A", category="spatial")])
    assert v["per_category"] == {"attribute": 100.0, "spatial": 50.0} and v["overall"] == pytest.approx(200 / 3)


def _b64(color):
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_tiny_tsv_end_to_end_and_rescoring(tmp_path):
    rows = ["index\timage\tquestion\tA\tB\tanswer\tcategory"]
    rows += [f"{i}\t{_b64((i * 40, 0, 0))}\tWhich side?\tleft\tright\t{'AB'[i % 2]}\tattribute" for i in range(5)]
    rows.append("9\tnot-base64!\tWhich side?\tleft\tright\tA\tspatial")
    (tmp_path / "vstar.tsv").write_text("\n".join(rows) + "\n")
    pope = ["index\timage\tquestion\tanswer\tcategory"] + \
        [f"{i}\t{_b64((0, i * 40, 0))}\tIs there a cat?\t{'yes' if i % 2 else 'no'}\trandom" for i in range(4)]
    (tmp_path / "pope.tsv").write_text("\n".join(pope) + "\n")
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    from datasets import Dataset
    Dataset.from_dict({"id": ["t0"], "image": [Image.new("RGB", (56, 56))], "question": ["Is it dark?"],
                       "options": [[]], "answer": ["Yes"], "targets": [[]], "split": ["test"]}).save_to_disk(
        str(run / "data" / "scenes"))
    args = ["--preset", "tiny", "--run_dir", run, "--round", "0", "--defender", "tiny",
            "--bench", f"vstar={tmp_path / 'vstar.tsv'}", f"pope={tmp_path / 'pope.tsv'}"]
    p = run_stage("05_eval.py", *args)
    assert "skipped 1 rows with unreadable images" in p.stdout
    res = json.loads((run / "eval" / "round_0.json").read_text())
    preds = [json.loads(x) for x in (run / "eval" / "preds" / "round_0" / "vstar.jsonl").read_text().splitlines()]
    assert len(preds) == 5
    assert res["benchmarks"]["vstar"]["overall"] == pytest.approx(100 * sum(p["correct"] for p in preds) / 5)
    assert "pope" in res["benchmarks"] and "random" in res["benchmarks"]["pope"]
    assert (run / "eval" / "summary.md").read_text().count("round 0") == 1
    # a re-run answers nothing new
    run_stage("05_eval.py", *args)
    assert len((run / "eval" / "preds" / "round_0" / "vstar.jsonl").read_text().splitlines()) == 5


@pytest.mark.slow
def test_tiny_loop_end_to_end_and_rerun_is_a_no_op(tmp_path):
    e = dict(env(), PRESET="tiny", ROUNDS="1", RUN_DIR=str(tmp_path / "loop"), PYTHON=os.sys.executable)
    p = subprocess.run(["bash", str(ROOT / "run_rounds.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "loop" / "eval" / "summary.md").read_text()
    assert "| round 0 |" in summary and "| round 1 |" in summary and "vs attacker 1" in summary
    for d in ["data/aot_sft", "attacker/sft", "attacker/round_1", "attacks/round_1", "defender/round_0",
              "defender/round_1", "eval/round_1.json", "eval/robustness.png"]:
        assert (tmp_path / "loop" / d).exists(), d
    t0 = time.time()
    p = subprocess.run(["bash", str(ROOT / "run_rounds.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and time.time() - t0 < 30
    assert "[0" not in p.stdout   # no stage ran again
