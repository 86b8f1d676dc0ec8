"""Stage 01: synthetic seeds, proposal validation, the P(Yes) checks, the funnel, resume, bad rows."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import load_script
from datasets import load_from_disk
from helpers import kill_when_exists, run_stage, start_stage
from PIL import Image, ImageDraw

import parallel
import seeds

s01 = load_script("01_build_sft_data.py")
ARGS = SimpleNamespace(max_iou=0.0, max_cover=0.0, min_composition=0.5, max_duplication=0.5, min_realism=0.5)


def test_synthetic_boxes_match_drawn_shapes_and_answers_are_right():
    for i in range(40):
        item = seeds.synthetic_item(i, 96, 0.2, seed=3)
        arr = np.asarray(item["image"])
        names = [t["name"] for t in item["targets"]]
        for t in item["targets"]:
            color = seeds.COLORS[t["name"].split()[0]]
            ys, xs = np.nonzero(np.all(arr == np.array(color, dtype=np.uint8), axis=-1))
            x1, y1, x2, y2 = t["bbox"]
            assert xs.min() == x1 and ys.min() == y1                # drawn pixels start at the box corner
            assert x2 - 2 <= xs.max() + 1 <= x2 and y2 - 2 <= ys.max() + 1 <= y2
        if item["options"]:
            (ax, ay), (bx, by) = [(np.mean(t["bbox"][0::2]), np.mean(t["bbox"][1::2])) for t in item["targets"]]
            first = ax < bx if item["options"] == ["left", "right"] else ay < by
            assert item["answer"] == ("A" if first else "B")
            assert names[0] in item["question"] and names[1] in item["question"]
        else:
            asked = item["question"].removeprefix("Is there a ").removesuffix(" in the image?")
            color = np.array(seeds.COLORS[asked.split()[0]], dtype=np.uint8)
            present = asked in names
            assert item["answer"] == ("Yes" if present else "No")
            if not present:   # the colour may belong to another shape, but not this one
                assert item["targets"] == []
            else:
                assert np.all(arr == color, axis=-1).any()
    splits = [seeds.synthetic_item(i, 32, 0.2, 0)["split"] for i in range(200)]
    assert 0.1 < splits.count("test") / 200 < 0.3


def test_proposal_validation():
    targets = [{"name": "red cup", "bbox": [10, 10, 30, 30]}]
    q = "Is the red cup left of the lamp?"
    ok = {"object": "small wooden clock", "bbox": [40, 40, 60, 60]}
    assert s01.validate_proposal(ok, targets, q, (100, 100), ARGS) is None
    assert s01.validate_proposal({**ok, "bbox": [90, 90, 110, 99]}, targets, q, (100, 100), ARGS) == "outside"
    assert s01.validate_proposal({**ok, "bbox": [25, 25, 45, 45]}, targets, q, (100, 100), ARGS) == "overlap"
    inside = {**ok, "bbox": [12, 12, 20, 20]}  # fully inside the target: IoU 0.16 but covers 16%
    assert s01.validate_proposal(inside, targets, q, (100, 100), SimpleNamespace(**{**vars(ARGS), "max_iou": 0.5})) \
        == "overlap"
    loose = SimpleNamespace(**{**vars(ARGS), "max_iou": 0.5, "max_cover": 0.5})
    assert s01.validate_proposal(inside, targets, q, (100, 100), loose) is None
    assert s01.validate_proposal({**ok, "object": "blue mug"}, targets, q, (100, 100), ARGS) == "category"  # synonym
    assert s01.validate_proposal({**ok, "object": "desk lamp"}, targets, q, (100, 100), ARGS) == "category"  # asked
    assert s01.box_overlap([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx((50 / 150, 0.5))


def test_parse_proposals_messy():
    assert s01.parse_proposals('Sure! [{"object": "clock", "bbox": [1, 2, 3, 4]}] hope it helps') == \
        [{"object": "clock", "bbox": [1.0, 2.0, 3.0, 4.0]}]
    assert s01.parse_proposals('{"object": "vase", "bbox": [0, 0, 5, 5]}') == [{"object": "vase", "bbox": [0, 0, 5, 5]}]
    assert s01.parse_proposals('[{"object": "clock", "bbox": [1, 2]}]') is None
    assert s01.parse_proposals("a clock at the top") is None


def test_check_decisions_from_p_yes():
    d = s01.check_decisions([0.7, 0.4, 0.9], [[0.1, 0.2], [0.1], [0.2, 0.6]], [0.6, 0.9, 0.9], ARGS)
    assert d == [{"composition": True, "duplication": True, "realism": True},
                 {"composition": False, "duplication": True, "realism": True},
                 {"composition": True, "duplication": False, "realism": True}]


def _funnel(run):
    return json.loads((run / "data" / "funnel.json").read_text())


def test_stage01_tiny_outputs_schema_and_funnel(tiny_run):
    data = tiny_run / "data"
    scenes, sft = load_from_disk(str(data / "scenes")), load_from_disk(str(data / "aot_sft"))
    f = _funnel(tiny_run)["counts"]
    assert len(scenes) == f["scenes"] > 0 and len(sft) == f["effective"] > 0
    chain = ["seed_rows", "extended", "passed_composition", "passed_duplication", "passed_realism",
             "scenes_with_valid_proposal", "implanted", "effective"]
    assert all(f[a] >= f[b] for a, b in zip(chain, chain[1:]))
    assert f["proposals_checked"] == f["implanted"] + f["rejected_outside"] + \
        f["rejected_overlap"] + f["rejected_category"]
    assert f["implanted"] == f["scenes_with_valid_proposal"] and f["effective_implants"] == f["effective"]
    row = sft[0]
    assert set(row) >= {"id", "image", "question", "options", "answer", "targets", "split", "edited_image",
                        "instruction", "distractor", "defender_answer_clean", "defender_answer_edited"}
    assert isinstance(row["image"], Image.Image) and row["image"].size == row["edited_image"].size
    assert row["instruction"] == f"Add a plausible distractor object to mislead a model answering: {row['question']}"
    assert set(sft["split"]) == {"train"} and {"train", "test"} >= set(scenes["split"])
    # pixels outside the distractor box are the scene's own
    a, b = np.asarray(row["image"], dtype=int), np.asarray(row["edited_image"], dtype=int)
    x1, y1, x2, y2 = [int(v) for v in row["distractor"]["bbox"]]
    outside = np.ones(a.shape[:2], bool)
    outside[max(0, y1 - 1):y2 + 2, max(0, x1 - 1):x2 + 2] = False
    assert np.array_equal(a[outside], b[outside])
    assert (data / "gallery_01.png").is_file()


def test_stage01_several_implants_keep_one_triple_per_scene(tmp_path):
    run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path, "--num_proposals", "6",
              "--implants_per_scene", "3")
    f = _funnel(tmp_path)["counts"]
    assert f["scenes_with_valid_proposal"] < f["implanted"] <= 3 * f["scenes_with_valid_proposal"]
    assert f["proposals_checked"] == f["implanted"] + f["rejected_outside"] + f["rejected_overlap"] + \
        f["rejected_category"]
    ids = load_from_disk(str(tmp_path / "data" / "aot_sft"))["id"]
    assert len(ids) == len(set(ids)) == f["effective"] <= f["effective_implants"]
    assert f["effective_implants"] > f["effective"]          # some scene was fooled by more than one implant
    bad = run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path / "bad", "--num_proposals", "2",
                    "--implants_per_scene", "3", check=False)
    assert bad.returncode != 0 and "--implants_per_scene 3: needs 1 <= it <= --num_proposals (2)" in bad.stderr


def test_stage01_extra_test_items_leave_the_rest_as_it_was(tiny_run, tmp_path):
    """--num_test_extra: a larger held-out set whose train side (scenes, AOT-SFT) is the run without it, bit for bit."""
    run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path, "--num_test_extra", "8")
    old = [load_from_disk(str(tiny_run / "data" / d)) for d in ("scenes", "aot_sft")]
    new = [load_from_disk(str(tmp_path / "data" / d)) for d in ("scenes", "aot_sft")]
    assert len(new[0]) == len(old[0]) + 8 and new[0]["id"][-8:] == [f"syn{i:06d}" for i in range(32, 40)]
    assert set(new[0]["split"][-8:]) == {"test"} and new[0]["split"][:-8] == old[0]["split"]
    for a, b in zip(old, new):
        for col in ("image", "edited_image") if "edited_image" in a.column_names else ("image",):
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[col], b[col]))
    assert new[1]["id"] == old[1]["id"] and _funnel(tmp_path)["counts"]["seed_rows"] == 40


@pytest.mark.slow
def test_stage01_torchrun_same_rows(tiny_run, tmp_path):
    run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path, nproc=2)
    one, two = _funnel(tiny_run)["counts"], _funnel(tmp_path)["counts"]
    assert one == two
    a = load_from_disk(str(tiny_run / "data" / "aot_sft"))
    b = load_from_disk(str(tmp_path / "data" / "aot_sft"))
    assert a["id"] == b["id"]


@pytest.mark.slow
def test_stage01_resumes_after_kill(tiny_run, tmp_path):
    proc = start_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path, "--chunk_size", "4")
    assert kill_when_exists(proc, tmp_path / "data" / ".tmp_01_chunks" / "chunk_00001")
    assert not (tmp_path / "data" / "aot_sft").exists(), "killed too late to test resume"
    p = run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path, "--chunk_size", "4")
    assert "resuming" in p.stdout
    ids = load_from_disk(str(tmp_path / "data" / "aot_sft"))["id"]
    assert len(ids) == len(set(ids))
    scenes = load_from_disk(str(tmp_path / "data" / "scenes"))["id"]
    assert sorted(scenes) == [f"syn{i:06d}" for i in range(32)]          # no gaps, no duplicates
    assert ids == load_from_disk(str(tiny_run / "data" / "aot_sft"))["id"]  # same as an uninterrupted run


def test_stage01_bad_seed_rows_are_named(tmp_path):
    seed_dir = tmp_path / "seeds"
    seed_dir.mkdir()
    for i in range(3):
        seeds.synthetic_item(i, 48, 0.0, 0)["image"].save(seed_dir / f"{i}.png")
    good = {"image": "0.png", "question": "Is the red square left or right of the blue circle?",
            "options": ["left", "right"], "answer": "A", "targets": [{"name": "red square", "bbox": [2, 2, 12, 12]}]}
    lines = [json.dumps({**good, "id": "ok1"}), json.dumps({**good, "id": "ok2", "image": "1.png"}),
             json.dumps({k: v for k, v in good.items() if k != "answer"}),
             json.dumps({**good, "image": "missing.png"}),
             json.dumps({**good, "targets": [{"name": "x", "bbox": [40, 40, 60, 60]}]})]
    raw = ("\n".join(lines) + "\n").encode() + b'{"question": "caf\xe9"}\n'
    (seed_dir / "seeds.jsonl").write_bytes(raw)
    run = tmp_path / "run"
    run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", run, "--seed_data", seed_dir / "seeds.jsonl",
              "--min_box_frac", "0.05", "--max_box_frac", "0.1", "--num_proposals", "8")
    report = _funnel(run)
    skipped = report["skipped_seed_rows"]
    assert report["num_skipped_seed_rows"] == 4 and report["counts"]["seed_rows"] == 2
    assert any("line 3" in s and "'answer'" in s for s in skipped)
    assert any("line 4" in s and "missing.png" in s for s in skipped)
    assert any("line 5" in s and "outside" in s for s in skipped)
    assert any("line 6" in s and "UTF-8" in s for s in skipped)
    assert sorted(load_from_disk(str(run / "data" / "scenes"))["id"]) == ["ok1", "ok2"]


def test_stage01_all_rows_bad_fails_clearly(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"question": "q"}\n')
    p = run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path / "run",
                  "--seed_data", tmp_path / "s.jsonl", check=False)
    assert p.returncode != 0 and "no usable seed rows" in p.stderr + p.stdout


# --------------------------------------------------------------------------- COCO-format seeds
def _coco_fixture(root):
    """Four images with known boxes: unique objects far apart, a duplicate category, a crowd box, a
    small object, a box outside its image, an unknown category id, and an image file that is missing."""
    (root / "images").mkdir(parents=True)
    cats = [{"id": 1, "name": "cup"}, {"id": 2, "name": "bottle"}, {"id": 3, "name": "clock"},
            {"id": 4, "name": "boat"}, {"id": 5, "name": "bicycle"}]
    boxes = {   # image id -> [(annotation id, category, [x, y, w, h], iscrowd)]; images are 120 x 90
        1: [(11, 1, [5, 10, 30, 30], 0), (12, 2, [80, 50, 30, 30], 0), (13, 3, [60, 5, 3, 3], 0)],
        2: [(21, 1, [5, 5, 20, 20], 0), (22, 1, [90, 60, 20, 20], 0), (23, 2, [40, 30, 25, 25], 0),
            (24, 4, [0, 0, 120, 90], 1)],
        3: [(31, 4, [10, 40, 40, 30], 0), (32, 5, [70, 5, 40, 30], 0), (33, 2, [100, 70, 40, 40], 0),
            (34, 99, [1, 1, 5, 5], 0)],
        4: [(41, 3, [50, 50, 40, 30], 0)],
        5: [(51, 1, [10, 10, 30, 30], 0), (52, 5, [70, 50, 40, 30], 0)],
    }
    images = []
    for img_id, anns in boxes.items():
        images.append({"id": img_id, "file_name": f"{img_id}.png", "width": 120, "height": 90})
        if img_id == 4:
            continue   # listed, but the file is missing
        im = Image.new("RGB", (120, 90), (120, 120, 120))
        d = ImageDraw.Draw(im)
        for _, cat, (x, y, w, h), crowd in anns:
            if not crowd:
                d.rectangle([x, y, x + w - 1, y + h - 1], fill=(40 * cat, 200 - 30 * cat, 90))
        im.save(root / "images" / f"{img_id}.png")
    annotations = [{"id": i, "image_id": img, "category_id": c, "bbox": b, "iscrowd": cr, "area": b[2] * b[3]}
                   for img, anns in boxes.items() for i, c, b, cr in anns]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return f"coco:{root / 'ann.json'}:{root / 'images'}", boxes, {c["id"]: c["name"] for c in cats}


def test_coco_seed_questions_follow_the_geometry(tmp_path):
    spec, boxes, cats = _coco_fixture(tmp_path)
    args = SimpleNamespace(coco_min_area=0.02, coco_min_gap=0.05, coco_per_image=4, num_seed_rows=0, seed=0,
                           test_fraction=0.5)
    rows, skipped, rejected = seeds.read_coco(spec, args)
    assert skipped == ["annotation 34: unknown category id 99",
                       "annotation 33: box [100, 70, 40, 40] outside its 120x90 image",
                       "image 4 (4.png): FileNotFoundError"]
    assert rejected["crowd box"] == 1 and rejected["category not unique in its image"] == 2
    assert rejected["object too small"] == 1                      # the 3x3 clock: 0.08% of the image
    present = {i: {cats[c] for _, c, _, _ in anns if c in cats} for i, anns in boxes.items()}   # crowd, bad boxes too
    unique = {1: {"cup", "bottle"}, 2: {"bottle"}, 3: {"boat", "bicycle"}, 5: {"cup", "bicycle"}}   # usable objects
    for r in rows:
        img_id = int(r["id"][4:].split("_")[0])
        if r["options"]:
            a, b = r["targets"]
            assert {a["name"], b["name"]} <= unique[img_id]
            assert r["question"].index(a["name"]) < r["question"].index(b["name"])      # a is named first
            axis = 0 if r["options"] == ["left", "right"] else 1
            assert (r["answer"] == "A") == (a["bbox"][axis + 2] <= b["bbox"][axis])      # a entirely left of / above b
        else:
            name = r["question"][len("Is there a "):-len(" in the image?")]
            assert (r["answer"] == "Yes") == (name in present[img_id])   # image 2's crowd 'boat' is never absent
            if r["answer"] == "Yes":
                assert name in unique[img_id] and [t["name"] for t in r["targets"]] == [name]
            else:
                assert r["targets"] == []
    letters = [r["answer"] for r in rows if r["options"]]
    yes_no = [r["answer"] for r in rows if not r["options"]]
    assert letters and yes_no and abs(letters.count("A") - letters.count("B")) <= 1
    assert abs(yes_no.count("Yes") - yes_no.count("No")) <= 1
    splits = {}
    for r in rows:   # one split per image, the same on every run
        splits.setdefault(r["id"].split("_")[0], set()).add(r["split"])
    assert all(len(v) == 1 for v in splits.values())
    assert [(r["id"], r["split"], r["answer"]) for r in seeds.read_coco(spec, args)[0]] == \
        [(r["id"], r["split"], r["answer"]) for r in rows]
    capped, _, rej = seeds.read_coco(spec, SimpleNamespace(**{**vars(args), "coco_per_image": 1, "num_seed_rows": 2}))
    assert len(capped) == 2 and rej["over the total cap"] == 2 and rej["over the per-image cap"] > 0


def test_coco_bad_annotation_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    args = SimpleNamespace(coco_min_area=0.0, coco_min_gap=0.0, coco_per_image=4, num_seed_rows=0, seed=0,
                           test_fraction=0.2)
    for spec in (f"coco:{tmp_path / 'bad.json'}:{tmp_path}", f"coco:{tmp_path / 'none.json'}:{tmp_path}"):
        with pytest.raises(SystemExit, match="COCO-format"):
            seeds.read_coco(spec, args)


@pytest.mark.slow
def test_stage01_tiny_from_coco(tmp_path):
    spec, _, _ = _coco_fixture(tmp_path / "coco")
    run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path / "run", "--seed_data", spec,
              "--coco_min_area", "0.02", "--coco_min_gap", "0.05", "--dtype", "bf16")   # judge, target, editor in bf16
    funnel = json.loads((tmp_path / "run" / "data" / "funnel.json").read_text())
    assert funnel["num_skipped_seed_rows"] == 3 and funnel["seed_candidates_rejected"]["crowd box"] == 1
    scenes = load_from_disk(str(tmp_path / "run" / "data" / "scenes"))
    assert funnel["counts"]["seed_rows"] > 0 and all(i.startswith("coco") for i in scenes["id"])


def test_a_chunk_samples_the_same_whatever_ran_before_it(monkeypatch):
    """A chunk's sampled proposer retries draw from the global RNG, which process_chunk seeds from the
    chunk's index: the same draws in an uninterrupted run, after a resume and on any rank."""
    import torch

    import common
    import editing
    draws = []

    def proposals(model, processor, scenes, args, counts):       # the MLLM proposer's sampling, stood in for
        draws.append(torch.rand(3))
        return [None] * len(scenes)
    monkeypatch.setattr(s01, "mllm_proposals", proposals)
    args = s01.Args(**{**s01.PRESETS["tiny"], "proposer": "mllm"})
    judge, proc = common.load_defender("tiny")
    models = (judge, proc, judge, proc, editing.load_attacker("tiny"), parallel.OneOnDevice(torch.device("cpu"), False))
    rows = [seeds.synthetic_item(i, args.synthetic_size, 0.0, 0) for i in range(4)]
    for chunk, before in ((1, 0), (1, 5), (2, 0)):
        torch.manual_seed(before)          # what ran before this chunk (other chunks, a killed process)
        s01.process_chunk(rows, chunk, models, args)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
