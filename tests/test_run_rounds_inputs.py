"""The paper path's first minutes: run_rounds.sh stops at once on a typo or a missing input, naming it; the
paper preset asks for real seeds; long phases print progress; a model that cannot be found names its stage."""
import json
import os
import subprocess
import time

import pytest
from helpers import ROOT, env, run_stage


def _rounds(tmp_path, **variables):
    e = dict(env(), RUN_DIR=str(tmp_path / "run"), PYTHON=os.sys.executable, **variables)
    t0 = time.time()
    p = subprocess.run(["bash", str(ROOT / "run_rounds.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=120)
    return p, time.time() - t0


def test_unknown_preset_stops_at_once_naming_the_presets(tmp_path):
    p, seconds = _rounds(tmp_path, PRESET="tiyn")
    assert p.returncode != 0 and seconds < 5
    assert "unknown PRESET=tiyn" in p.stderr and all(x in p.stderr for x in ("tiny_world", "tiny", "paper"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variables,message", [
    (dict(PRESET="paper"), "PRESET=paper needs SEED_DATA: coco:ANNOTATIONS.json:IMAGE_DIR"),
    (dict(PRESET="tiny", NPROC="two"), "NPROC=two: expected a positive number"),
    (dict(PRESET="tiny", SEED="-1"), "SEED=-1: expected a non-negative integer"),
])
def test_paper_preset_without_seeds_and_a_bad_nproc(tmp_path, variables, message):
    p, seconds = _rounds(tmp_path, **variables)
    assert p.returncode != 0 and seconds < 5 and message in p.stderr, p.stderr


def test_missing_inputs_are_named_in_one_line_before_any_model_loads(tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    cases = [(dict(PRESET="paper", SEED_DATA=str(tmp_path / "seeds.jsonl")), f"no seed file {tmp_path / 'seeds.jsonl'}"),
             (dict(PRESET="paper", SEED_DATA=f"coco:{tmp_path / 'nope.json'}:{tmp_path}"),
              f"no COCO annotation file {tmp_path / 'nope.json'}"),
             (dict(PRESET="paper", SEED_DATA=f"coco:{ann}:{tmp_path / 'images'}"), f"no image directory {tmp_path / 'images'}"),
             (dict(PRESET="tiny", BENCH=f"vstar={tmp_path / 'vstar.tsv'}"), f"vstar={tmp_path / 'vstar.tsv'}: no such file")]
    for variables, message in cases:
        p, seconds = _rounds(tmp_path, **variables)
        errors = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode != 0 and len(errors) == 1 and message in errors[0], (variables, p.stderr)
        assert "Traceback" not in p.stderr and seconds < 60
        assert not (tmp_path / "run" / "data").exists()   # no stage started


@pytest.mark.slow
def test_seed_generation_shows_progress_and_a_missing_model_names_its_stage(tmp_path):
    """Without a terminal, synthetic seed generation prints a line at its start and end; an editor that is not
    there fails with the library's message and one line naming the stage and the model."""
    p = run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", tmp_path / "run", "--num_synthetic", "6",
                  "--editor", "Qwen/Not-An-Editor", check=False)
    assert "[01] synthetic seeds: 0/6" in p.stdout and "[01] synthetic seeds: 6/6 in" in p.stdout
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("[01_build_sft_data.py] could not load the attacker (Qwen-Image-Edit) "
                                                 "model 'Qwen/Not-An-Editor' (HF_HUB_OFFLINE is set: only local paths "
                                                 "and the hub cache are read)")
