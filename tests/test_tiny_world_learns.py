"""The tiny world learns (round 1's targets): PRESET=tiny_world ROUNDS=1 end to end, then the co-evolution
measured on its held-out test scenes (05_eval.coevolution, the lines at the end of eval/summary.md).

Opt-in: a run from an empty directory takes tens of minutes on 2 cores (times: bench/tiny_world.md).
``AOT_LEARNING_TEST=1`` runs it in a temporary directory; ``AOT_LEARNING_TEST=DIR`` runs it in DIR, where finished
stages are skipped (a finished run is re-checked in seconds)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import env

import report

WHERE = os.environ.get("AOT_LEARNING_TEST", "")


@pytest.mark.skipif(not WHERE, reason="tens of minutes on 2 cores: AOT_LEARNING_TEST=1 (or a run directory) runs it")
def test_tiny_world_co_evolution_meets_its_targets(tmp_path):
    run = tmp_path / "world" if WHERE == "1" else Path(WHERE)
    e = dict(env(), PRESET="tiny_world", ROUNDS="1", RUN_DIR=str(run), PYTHON=os.sys.executable)
    e.pop("OMP_NUM_THREADS")          # every core (helpers.env pins 1 thread for the suite's small stages)
    p = subprocess.run(["bash", str(ROOT / "run_rounds.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=3 * 3600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rounds = [json.loads((run / "eval" / f"{n}.json").read_text()) for n in ("base", "round_0", "round_1")]
    c = report.coevolution(rounds)[0]      # attacker 1 (a ROUNDS=2 directory also has attacker 2 on defender 1)
    assert c["attacker"] == 1 and "recovered" in c, c
    assert c["clean_before"] >= 85.0, c                                       # 1. defender round 0, clean
    assert c["drop"] >= 25.0 and c["gate_pass"] >= 80.0, c                    # 2. attacker 1 vs defender 0, within the gate
    assert c["recovered"] >= 0.5 and c["clean_after"] >= c["clean_before"] - 5.0, c   # 3. defender round 1
    for gallery in ("data/gallery_01.png", "attacks/round_1/gallery.png", "models/editor_samples.png"):
        assert (run / gallery).stat().st_size > 10_000, gallery
