"""The run directory, the only way stages talk: what a stage writes there and how.

- checkpoints of a long stage (torch.distributed.checkpoint: each rank its shard, + its RNG and data
  position), resumed bit-identically;
- logs/<stage>.jsonl (rank 0), optionally mirrored to TensorBoard or wandb, and image galleries;
- atomic outputs: a stage writes into a temporary sibling and renames it when complete;
- the arguments: a dataclass per script (HfArgumentParser), presets, args.json beside every output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from parallel import barrier, print0


def global_rng_state() -> dict:
    """This process's global torch RNG states: the CPU one, and the current GPU's when CUDA is in use.
    Sampling that takes no generator draws from them (transformers' generate, dropout), so a
    checkpoint keeps them beside the stage's own generators."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, extra: dict, rank: int = 0):
    """One step-numbered checkpoint, written by every rank (torch.distributed.checkpoint):
    the trainable weights and the optimizer, each rank its own shard under FSDP2 (replicated LoRA
    weights are written once), plus this rank's ``extra`` (its generators and data positions) and
    global RNG states (tensors in a safetensors file, the rest as JSON in its metadata).
    ``latest.json`` names it once complete; the previous checkpoint is then deleted. Resume needs
    the same world size."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    ckpt_dir = Path(ckpt_dir)
    name = f"step_{step:06d}"
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir / name), no_dist=not dist.is_initialized())
    extra = {**extra, **global_rng_state()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(ckpt_dir / name / f"rank_{rank}.safetensors"), metadata={"json": json.dumps(rest)})
    barrier()
    if rank == 0:
        previous = json.loads((ckpt_dir / "latest.json").read_text())["name"] if (ckpt_dir / "latest.json").exists() else None
        (ckpt_dir / "latest.json.tmp").write_text(json.dumps({"name": name, "step": step}))
        (ckpt_dir / "latest.json.tmp").replace(ckpt_dir / "latest.json")
        if previous and previous != name:
            shutil.rmtree(ckpt_dir / previous, ignore_errors=True)
    barrier()


def load_checkpoint(ckpt_dir: str | Path, model, optimizer, rank: int = 0) -> tuple[int, dict] | None:
    """Restore what ``save_checkpoint`` wrote into ``model`` and ``optimizer`` (in place, re-sharded
    by DCP) and this process's global RNG states; returns (step, this rank's extra), or None when
    there is no checkpoint."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "latest.json").exists():
        return None
    latest = json.loads((ckpt_dir / "latest.json").read_text())
    path = ckpt_dir / latest["name"]
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in model_sd if f"model.{k}" not in saved]
    if missing:
        raise SystemExit(f"{path} lacks trained weights {missing[:3]}: not a checkpoint of this model / these flags")
    # partial: AdamW keeps no state for weights that never got a gradient (e.g. the last MMDiT block's
    # text stream), while get_state_dict above made one for every weight
    dcp.load(state, checkpoint_id=str(path), planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
             no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen weights: not saved
    for fqn, p in model.named_parameters():  # no state saved -> none restored (AdamW's step count starts at 0)
        if p in optimizer.state and f"optim.state.{fqn}.step" not in saved:
            del optimizer.state[p]
    rank_file = path / f"rank_{rank}.safetensors"
    if not rank_file.exists():
        raise SystemExit(f"{rank_file} is missing: resume with the world size that wrote {path}")
    with safe_open(str(rank_file), "pt") as f:
        extra = json.loads(f.metadata()["json"])
        extra.update({k: f.get_tensor(k) for k in f.keys()})
    if "torch_rng" not in extra:
        raise SystemExit(f"{rank_file} holds no RNG state (an older checkpoint): delete {ckpt_dir} to start over")
    torch.set_rng_state(extra.pop("torch_rng"))
    cuda_rng = extra.pop("cuda_rng", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return latest["step"], extra


class Best:
    """The trainable values with the best validation score so far (each rank its own FSDP2 shards), kept in
    memory and, through ``state`` and ``load``, in the checkpoints (a resumed run selects the same ones);
    ties keep the earlier."""

    def __init__(self, params, tag: str = ""):
        self.params, self.tag, self.values, self.step, self.score = params, tag, None, None, None

    def offer(self, step: int, score: float) -> float:
        if self.score is None or score > self.score:
            self.values, self.step, self.score = [p.detach().clone() for p in self.params], step, score
        print0(f"{self.tag}validation at {step}: {score:.3f} (best {self.score:.3f} at {self.step})")
        return score

    def state(self) -> dict:
        local = [v.to_local() if hasattr(v, "to_local") else v for v in self.values or []]
        return dict(best_step=self.step, best_score=self.score, **{f"best_{i}": v for i, v in enumerate(local)})

    def load(self, extra: dict):
        self.step, self.score = extra.get("best_step"), extra.get("best_score")
        if self.step is not None:
            self.values = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for i, v in enumerate(self.values):
                    (v.to_local() if hasattr(v, "to_local") else v).copy_(extra[f"best_{i}"])

    def restore(self):
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)


REPORT_TO = ("none", "tensorboard", "wandb")


class JsonlLogger:
    """One JSON object per step under runs/<name>/logs/<stage>.jsonl (rank 0 only): the source of truth.
    With report_to 'tensorboard' (event files under logs/tb/<stage>) or 'wandb' (offline unless
    WANDB_MODE says otherwise) the same scalars, and images, go to that tracker too; each is imported
    only when asked for, as transformers' and TRL's --report_to."""

    def __init__(self, path: str | Path, enabled: bool = True, report_to: str = "none", config=None):
        self.path, self.enabled, self.tb, self.wandb, self.resumed_from = Path(path), enabled, None, None, None
        if report_to not in REPORT_TO:
            raise SystemExit(f"--report_to must be one of {', '.join(REPORT_TO)}; got {report_to!r}")
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(self.path.parent / "tb" / self.path.stem))
            elif report_to == "wandb":
                import wandb
                os.environ.setdefault("WANDB_MODE", "offline")
                self.wandb = wandb.init(project="aot", name=f"{self.path.parent.parent.name}/{self.path.stem}",
                                        dir=str(self.path.parent), config=config, reinit=True)
        except ImportError as e:
            raise SystemExit(f"--report_to {report_to} needs `pip install {report_to}` ({e})") from e

    def resume(self, keep, at: int):
        """A stage resumed at step ``at``: drop the rows it will log again (those ``keep(row)`` rejects: a killed
        run logged past its last checkpoint), and mark the next row with ``resumed_from``."""
        self.resumed_from = at
        if self.enabled and self.path.exists():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows if keep(r)))

    def log(self, row: dict):
        if not self.enabled:
            return
        if self.resumed_from is not None:
            row, self.resumed_from = dict(row, resumed_from=self.resumed_from), None
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = row.get("step", row.get("iter", 0))
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "iter", "resumed_from")}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{self.path.stem}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{self.path.stem}/{k}": v for k, v in scalars.items()}, step=step)

    def image(self, tag: str, image: Image.Image, step: int = 0):
        """A gallery (PIL) to the tracker; the PNG on disk is what the stages write regardless."""
        if self.tb is not None:
            self.tb.add_image(f"{self.path.stem}/{tag}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({f"{self.path.stem}/{tag}": wandb.Image(image)}, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_gallery(pairs, path: str | Path, cell: int = 192):
    """A PNG with one row per (before, after) pair: before | after | difference map (01, 03)."""
    if not pairs:
        return
    sheet = Image.new("RGB", (3 * cell, cell * len(pairs)), "white")
    for r, (a, b) in enumerate(pairs):
        d = np.abs(np.asarray(a.convert("RGB"), dtype=np.float32)
                   - np.asarray(b.convert("RGB").resize(a.size), dtype=np.float32)).mean(-1)
        d = (255 * d / max(d.max(), 1e-6)).astype(np.uint8)
        for c, im in enumerate([a, b, Image.fromarray(np.stack([d, d // 3, 255 - d], -1))]):
            sheet.paste(im.convert("RGB").resize((cell, cell)), (c * cell, r * cell))
    sheet.save(path)


def tmp_dir_for(final: str | Path) -> Path:
    """The temporary sibling a stage writes into before renaming it to ``final``."""
    final = Path(final)
    return final.parent / f".tmp_{final.name}"


def commit_dir(tmp: str | Path, final: str | Path):
    """Atomically move a finished output into place (replacing an older one)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_text_atomic(path: str | Path, text: str):
    """Write a file whole or not at all (a temporary sibling, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2))


def save_args(args, out_dir: str | Path, **extra):
    """args.json: the arguments that made an output, + ``extra`` (e.g. which step a best_val selection kept)."""
    from dataclasses import asdict
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "args.json").write_text(json.dumps(dict(asdict(args), **extra), indent=2, default=str))


def parse_args(args_cls, presets: dict, argv=None):
    """HfArgumentParser over a dataclass; ``--preset NAME`` applies overrides, explicit flags win."""
    import sys

    from transformers import HfArgumentParser
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(args_cls).parse_args_into_dataclasses(args=argv)
    preset = getattr(args, "preset", None)
    if preset:
        if preset not in presets:
            raise SystemExit(f"unknown --preset {preset!r}; choose from {sorted(presets)}")
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for k, v in presets[preset].items():
            if k not in given:   # a preset may name paths inside the run directory: "{run_dir}/models/..."
                setattr(args, k, v.format(run_dir=args.run_dir) if isinstance(v, str) else v)
    return args


def held_out_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """``fraction`` of the distinct ids (at least one when fraction > 0), drawn with ``seed``: a validation split."""
    import random
    distinct = sorted(set(ids))
    n = max(1, round(len(distinct) * fraction)) if fraction > 0 else 0
    return set(random.Random(seed).sample(distinct, min(n, len(distinct))))


def features(kind: str):
    """The data contracts on disk (docs: the run directory): seed / scenes rows, + AOT-SFT's or attacks' columns."""
    from datasets import Features, List, Value
    from datasets import Image as DImage
    box = {"name": Value("string"), "bbox": List(Value("float32"))}
    f = {"id": Value("string"), "image": DImage(), "question": Value("string"),
         "options": List(Value("string")), "answer": Value("string"), "targets": List(box),
         "split": Value("string")}
    if kind == "aot_sft":
        f.update(edited_image=DImage(), instruction=Value("string"), distractor=box,
                 defender_answer_clean=Value("string"), defender_answer_edited=Value("string"))
    if kind == "attacks":
        f.update(attacked_image=DImage(), instruction=Value("string"), ssim_local=Value("float32"),
                 defender_wrong_fraction=Value("float32"), strategy=Value("string"))
    return Features(f)


def save_rows(rows, kind, path):
    from datasets import Dataset
    keys = list(features(kind))
    Dataset.from_dict({k: [r[k] for r in rows] for k in keys}, features=features(kind)).save_to_disk(str(path))


def gather_rows(rows: list[dict], kind: str, shard_dir: str | Path, ddp):
    """Every rank's rows as one Dataset of ``features(kind)`` on rank 0, in rank order (None on the
    others), through per-rank shards on disk: images do not travel through the collectives. The result
    reads the shards, so the caller removes ``shard_dir`` once it has saved what it needs."""
    from datasets import concatenate_datasets, load_from_disk
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    save_rows(rows, kind, shard_dir / f"rank_{ddp.rank}")
    barrier()
    if not ddp.master:
        return None
    return concatenate_datasets([load_from_disk(str(shard_dir / f"rank_{r}")) for r in range(ddp.world)])


def save_attacks(rows, tau: float, out: str | Path):
    """attacks/round_k, atomically (docs: the run directory): train = the train split's attacks within the
    local-SSIM gate (the others may have changed the true answer), test = every test attack; a gallery of
    the first four. -> (train, test, train attacks dropped by the gate)."""
    from datasets import DatasetDict
    train = rows.filter(lambda s, a: s == "train" and a >= tau, input_columns=["split", "ssim_local"])
    test = rows.filter(lambda s: s == "test", input_columns="split")
    tmp = tmp_dir_for(out)
    DatasetDict(train=train, test=test).save_to_disk(str(tmp))
    save_gallery([(r["image"], r["attacked_image"]) for r in rows.select(range(min(4, len(rows))))], tmp / "gallery.png")
    commit_dir(tmp, out)
    return train, test, sum(s == "train" for s in rows["split"]) - len(train)
