"""The five benchmarks without an official script, as VLMEvalKit prompts and scores them for Qwen2-VL
models without a judge: multi-image rows (BLINK, MMMU), MMMU's open questions, the matching rules,
the headlines; on small TSVs in VLMEvalKit's layout."""
import base64
import io
import json

import pytest
from conftest import load_script
from helpers import run_stage
from PIL import Image

import benchmarks
import common

s05 = load_script("05_eval.py")


def _b64(color, size=(56, 56)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tsvs(tmp_path):
    two = json.dumps([_b64((255, 0, 0), (112, 56)), _b64((0, 0, 255), (56, 112))])
    blink = ["index\timage\tquestion\tA\tB\tanswer\tcategory",
             f"0\t{two}\tWhich image is brighter?\tthe first\tthe second\tA\tRelative_Reflectance",
             "1\t0\tWhich image is redder?\tthe first\tthe second\tA\tRelative_Reflectance",     # back-reference
             "2\t[not json\tWhich one?\tthe first\tthe second\tB\tRelative_Reflectance"]
    mmmu = ["index\timage\tquestion\tA\tB\tC\tanswer\tcategory\tquestion_type",
            f"m0\t{two}\tCompare <image 1> and <image 2>: which is wider?\twide\ttall\tsquare\tA\tArt\tmultiple-choice",
            f"m1\t{_b64((9, 9, 9))}\tHow many sides has the shape in <image 1>?\t\t\t\t4\tMath\topen",
            f"m2\t{_b64((9, 9, 9))}\tSee <image 2>.\tx\ty\t\tA\tMath\tmultiple-choice"]      # no image 2
    mmstar = ["index\timage\tquestion\tA\tB\tC\tD\tanswer\tcategory\tl2-category"]
    mmstar += [f"s{i}\t{_b64((i * 50, 0, 0))}\tWhat colour?\tred\tgreen\tblue\tblack\t{'ABCD'[i]}\t"
               f"{'coarse perception' if i < 2 else 'math'}\t{'l2a' if i % 2 else 'l2b'}" for i in range(4)]
    single = ["index\timage\tquestion\tA\tB\tanswer\tcategory"] + \
        [f"{i}\t{_b64((0, i * 60, 0))}\tIs it green?\tyes\tno\t{'AB'[i % 2]}\tx" for i in range(3)]
    paths = {}
    for name, rows in (("blink", blink), ("mmmu", mmmu), ("mmstar", mmstar), ("realworldqa", single),
                       ("ai2d", single)):
        paths[name] = tmp_path / f"{name}.tsv"
        paths[name].write_text("\n".join(rows) + "\n")
    return paths


def test_multi_image_rows_open_questions_and_skips(tmp_path):
    paths = _tsvs(tmp_path)
    items, skipped = benchmarks.load_tsv(str(paths["blink"]))
    assert [it["index"] for it in items] == ["0", "1"]
    for it in items:   # both images, in the row's order (the back-reference too)
        assert [im.size for im in it["image"]] == [(112, 56), (56, 112)]
        assert it["image"][0].getpixel((0, 0)) == (255, 0, 0) and it["kind"] == "mcq"
    assert skipped == {"2": "image cell starts with '[' but is not a JSON list of base64 strings"}
    items, skipped = benchmarks.load_tsv(str(paths["mmmu"]))
    assert [(it["index"], it["kind"], it["answer"]) for it in items] == [("m0", "mcq", "A"), ("m1", "open", "4")]
    assert skipped == {"m2": "question refers to <image 2>, the row has 1 image(s)"}


def test_messages_images_first_in_order_then_the_text(tmp_path):
    items, _ = benchmarks.load_tsv(str(_tsvs(tmp_path)["mmmu"]))
    _, proc = common.load_defender("tiny")
    prompt = s05.item_prompt(items[0], "vlmevalkit")
    assert prompt == ("Question: Compare <image 1> and <image 2>: which is wider?\nOptions:\nA. wide\nB. tall\n"
                      "C. square\nPlease select the correct answer from the options above.")
    assert s05.item_prompt(items[1], "vlmevalkit") == "Question: How many sides has the shape in <image 1>?"
    assert s05.vlmevalkit_prompt("q", ["a"], hint="h") == \
        "Hint: h\nQuestion: q\nOptions:\nA. a\nPlease select the correct answer from the options above."
    assert s05.vlmevalkit_prompt("图中是什么?", ["a"]).endswith("请直接回答选项字母。")
    inputs = common.defender_inputs(proc, [items[0]["image"], items[1]["image"]],
                                    [prompt, s05.item_prompt(items[1], "vlmevalkit")], "cpu", layout="images_first")
    text = proc.tokenizer.decode(inputs["input_ids"][0])
    assert text.count("<|vision_start|>") == 2 and text.rindex("<|vision_end|>") < text.index("Question:")
    # image grids in message order: 112x56 (w x h) then 56x112, then the second prompt's single image
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8], [1, 8, 4], [1, 4, 4]]
    assert inputs["pixel_values"].shape[0] == 32 + 32 + 16
    one = common.defender_inputs(proc, [items[1]["image"]], ["q"], "cpu")   # the authors' layout: text first
    t1 = proc.tokenizer.decode(one["input_ids"][0])
    assert t1.index("q") < t1.index("<|vision_start|>")
    n, patches = common.prompt_length(proc, items[0]["image"], prompt)
    assert patches == 64 and abs(n - inputs["attention_mask"][0].sum().item()) <= 8


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("The answer is (B).", "B"), ("Answer: B. the second", "B"),
    ("A or B", None),                                                     # two letters: no option
    ("B could be right, but looking again at both of the pictures it is the other", None),   # letter too early
    ("the second", "B"), ("The first one", "A"), ("Cannot determine the answer", "Z")])
def test_can_infer_vlmevalkit_rules(text, expected):
    item = dict(options=["the first", "the second"], answer="A", kind="mcq")
    assert s05.vlmevalkit_extract(text, item) == expected


def test_mmmu_open_questions_matched_as_vlmevalkit_preproc():
    item = dict(options=[], answer="4", kind="open")
    assert s05.judge("The shape has 4 sides", item, "vlmevalkit") == ("A", True)    # the reference text occurs
    assert s05.judge("It has 5 sides", item, "vlmevalkit") == (None, False)
    assert s05.judge("A", item, "vlmevalkit") == ("A", True)      # VLMEvalKit's letter rule applies too
    assert s05.vlmevalkit_choices(item) == ({"A": "4", "B": "Other Answers"}, "A")


def test_headline_overall_category_and_l2_category():
    preds = [dict(index=str(i), pred=None, answer="A", correct=c, meta={"category": cat, "l2-category": l2})
             for i, (c, cat, l2) in enumerate([(True, "c1", "l1"), (False, "c1", "l2"), (True, "c2", "l1"),
                                               (True, "c2", "l2")])]
    res = s05.score("mmstar", preds)
    assert res["overall"] == 75.0 and res["per_category"] == {"c1": 50.0, "c2": 100.0}
    assert res["per_l2_category"] == {"l1": 100.0, "l2": 50.0}
    assert s05.style_of("mmstar") == s05.style_of("blink") == s05.style_of("mmmu_dev_val") == "vlmevalkit"
    assert s05.style_of("pope") == "hrbench" and s05.style_of("vstar") == "vstar"


def test_05_scores_all_five_with_the_tiny_defender(tmp_path):
    paths = _tsvs(tmp_path)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    from datasets import Dataset
    Dataset.from_dict({"id": ["t0"], "image": [Image.new("RGB", (56, 56))], "question": ["Is it dark?"],
                       "options": [[]], "answer": ["Yes"], "targets": [[]], "split": ["test"]}).save_to_disk(
        str(run / "data" / "scenes"))
    run_stage("05_eval.py", "--preset", "tiny", "--run_dir", run, "--round", "0", "--defender", "tiny",
              "--bench", *[f"{k}={v}" for k, v in paths.items()])
    res = json.loads((run / "eval" / "round_0.json").read_text())
    expect = {"blink": (2, {"2"}), "mmmu": (2, {"m2"}), "mmstar": (4, set()), "realworldqa": (3, set()),
              "ai2d": (3, set())}
    for bench, (n, skip) in expect.items():
        preds = [json.loads(x) for x in (run / "eval" / "preds" / "round_0" / f"{bench}.jsonl").read_text().splitlines()]
        assert len(preds) == n and set(res["skipped"].get(bench, {})) == skip
        assert res["benchmarks"][bench]["overall"] == pytest.approx(100 * sum(p["correct"] for p in preds) / n)
        for p in preds:   # every answer went through VLMEvalKit's matching: a letter, 'Z' or nothing
            assert p["pred"] in (None, "Z", "A", "B", "C", "D")
    assert "per_l2_category" in res["benchmarks"]["mmstar"]


def test_pandas_defaults_for_vlmevalkit_options_text_for_the_official_scripts(tmp_path):
    """VLMEvalKit reads its TSVs with pandas' defaults: an option "None" / "NA" is missing (its letter stays
    a gap) and a numeric option column with gaps reads as floats; the authors' scripts read text."""
    rows = ["index\timage\tquestion\tA\tB\tC\tanswer",
            f"0\t{_b64((1, 2, 3))}\tWhich?\tNA\t5\tred\tC",
            f"1\t{_b64((1, 2, 3))}\tHow many?\tcat\t\tNone\tA"]
    path = tmp_path / "mmstar.tsv"
    path.write_text("\n".join(rows) + "\n")
    items, skipped = benchmarks.load_tsv(str(path), vlmevalkit=True)
    assert not skipped
    assert (items[0]["options"], items[0]["letters"]) == (["5.0", "red"], ["B", "C"])
    assert (items[1]["options"], items[1]["letters"]) == (["cat"], ["A"])
    assert s05.item_prompt(items[0], "vlmevalkit").splitlines()[2:4] == ["B. 5.0", "C. red"]
    assert s05.judge("C", items[0], "vlmevalkit") == ("C", True) and s05.judge("red", items[0], "vlmevalkit")[1]
    text, skipped = benchmarks.load_tsv(str(path))             # the official scripts' reading: text as it is
    assert text[0]["options"] == ["NA", "5", "red"] and len(text) == 1
    assert skipped == {"1": "options are not consecutive letters (A, C)"}   # B is empty: no letter to shift


def test_mmmu_yes_no_reference_goes_through_mmmu_preproc():
    """VLMEvalKit treats every open question as MMMU_preproc does, a "Yes" reference too: a bare "A" is
    the reference there, where a yes/no extractor would find no answer."""
    item = dict(options=[], answer="Yes", kind="open")
    assert s05.judge("A", item, "vlmevalkit") == ("A", True)
    assert s05.judge("Yes, it is.", item, "vlmevalkit") == ("A", True)
    assert s05.judge("No.", item, "vlmevalkit") == (None, False)
    assert s05.vlmevalkit_choices(item) == ({"A": "Yes", "B": "Other Answers"}, "A")


def test_last_four_tokens_rule():
    choices = {"A": "x", "B": "y"}
    assert s05.can_infer_option("so it must be A one two three four", choices) is None  # 5th from the end
    assert s05.can_infer_option("so it must be A one two three", choices) == "A"        # 4th from the end
