"""Test setup: offline, CPU, project root importable, numbered scripts loadable as modules."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_script(name: str):
    """Import e.g. '03_train_attacker.py' (a name Python's import cannot spell) as a module."""
    import common
    return common.load_stage(name)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory with stage 01's tiny output (built once per test session)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import run_stage
    run = tmp_path_factory.mktemp("tiny_run")
    run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", run)
    return run


@pytest.fixture(scope="session")
def boxed_defender(tmp_path_factory):
    """The tiny defender after 40 SFT steps on official-format answers with a random choice
    (\\boxed{A} / \\boxed{B}, \\boxed{Yes} / \\boxed{No}), saved as a model directory. The random tiny
    defender never writes a box, so the official reward gives it 0 everywhere and DAPO no signal;
    this one is right about half the time, so groups have rewards that differ."""
    import random

    import torch
    from PIL import Image

    import common
    torch.manual_seed(0)
    rng = random.Random(0)
    model, proc = common.load_defender("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = 0.0
        for _ in range(8):
            yes_no = rng.random() < 0.5
            prompt = common.defender_prompt("Is the red circle left of the blue square?" if yes_no else
                                            "Where is the red circle?", [] if yes_no else ["left", "right"])
            target = "\\boxed{" + rng.choice(["Yes", "No"] if yes_no else ["A", "B"]) + "}<|im_end|>"
            image = Image.new("RGB", (56, 56), tuple(rng.randrange(256) for _ in range(3)))
            inputs = common.defender_inputs(proc, [image], [prompt], "cpu", assistant_prefix=target)
            n = len(proc.tokenizer.encode(target, add_special_tokens=False))
            logits = model(**inputs).logits[0, -n - 1:-1].float()
            loss = loss + torch.nn.functional.cross_entropy(logits, inputs["input_ids"][0, -n:]) / 8
        loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("boxed_defender")
    model.save_pretrained(path, safe_serialization=True)
    proc.save_pretrained(path)
    return path
