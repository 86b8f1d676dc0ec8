"""Running stages as a new user would: subprocesses, offline, CPU."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script, *args, nproc=1):
    """`python script args` or `torchrun --nproc_per_node N script args`."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), str(ROOT / script), *map(str, args)]
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run_stage(script, *args, nproc=1, timeout=300, check=True):
    """Run a stage to completion; returns CompletedProcess."""
    cmd = command(script, *args, nproc=nproc)
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def start_stage(script, *args, nproc=1):
    """Start a stage, its output to a temporary file (a pipe nobody reads would fill up and block it)."""
    import tempfile
    return subprocess.Popen(command(script, *args, nproc=nproc), cwd=ROOT, env=env(), stdout=tempfile.TemporaryFile(),
                            stderr=subprocess.STDOUT)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_when_exists(proc, path: Path, timeout: float = 180):
    """SIGKILL every process of the stage (a crash, as of a node) as soon as ``path`` appears;
    returns whether it appeared."""
    t0 = time.time()
    while not path.exists() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return path.exists()


def same_safetensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (bitwise) between two safetensors files; [] if identical."""
    from safetensors.torch import load_file
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return [k for k in x if not (x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and bool((x[k] == y[k]).all()))]


def checkpoint_step(ckpt_dir: Path) -> int:
    import json
    return json.loads((Path(ckpt_dir) / "latest.json").read_text())["step"]


def assert_resumed_log(path: Path, at: int, key: str = "step", first: int = 1):
    """A resumed stage's log: every step once, in order (the killed run's rows past its checkpoint dropped),
    and the first row after the checkpoint marked ``resumed_from``."""
    import json
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    numbers = [r[key] for r in rows]
    assert numbers == list(range(numbers[0], numbers[0] + len(rows))), numbers
    assert [(r[key], r["resumed_from"]) for r in rows if "resumed_from" in r] == [(at + first, at)], rows
