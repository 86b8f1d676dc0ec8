"""Test setup: offline, CPU, project root importable, numbered scripts loadable as modules."""
import importlib.util
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
    path = ROOT / name
    spec = importlib.util.spec_from_file_location(path.stem.lstrip("0123456789_"), path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory with stage 01's tiny output (built once per test session)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import run_stage
    run = tmp_path_factory.mktemp("tiny_run")
    run_stage("01_build_sft_data.py", "--preset", "tiny", "--run_dir", run)
    return run
