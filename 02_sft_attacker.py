"""Stage 02: cold-start the attacker by LoRA SFT of Qwen-Image-Edit on AOT-SFT.

Flow-matching loss on (condition = scene, instruction, target = scene with effective distractor):
x_s = (1 - s) x0 + s eps, the transformer predicts v = eps - x0 for the target latents, with the
scene's VAE latents concatenated after them along the sequence (img_shapes lists both) and the
prompt embedding of (scene image + adversarial instruction); the loss covers the target part only.

Reads:  data/aot_sft/            Writes: attacker/sft/ (pytorch_lora_weights.safetensors + args.json),
                                         logs/02_sft.jsonl
  python 02_sft_attacker.py --preset tiny --run_dir runs/tiny
  python 02_sft_attacker.py --run_dir runs/aot                              # 1 GPU
  torchrun --nproc_per_node 8 02_sft_attacker.py --run_dir runs/aot

Our choices where the paper is silent (docs/paper_notes.md, "Stage 02"):
  1. LoRA r=64, alpha=128 on the Flow-GRPO target modules (the RL stage continues this adapter);
  2. s ~ U(0, 1) by default (--timestep_sampling logit_normal as in SD3 is a flag);
  3. prompt embeddings and VAE latents are computed once per row and cached in CPU memory (encoders
     are frozen), then the text encoder is freed: at paper size (bench/paper_scale.py) the stage
     holds the bf16 transformer (40.9 GB) + the fp32 LoRA with its AdamW state (6.8 GB) + activations
     under gradient checkpointing (on by default);
  4. one row per forward, --grad_accum rows per optimizer step and rank; data-parallel by
     averaging LoRA gradients with one all-reduce;
  5. the condition at 03's --cond_resolution (512 as flow_grpo's trainer, not the pipeline's 1024), so the
     adapter is cold-started on the inputs it is then trained on;
  6. precision as flow_grpo: frozen transformer / encoders in --dtype (bf16 on GPU), the LoRA in fp32
     (peft computes the adapter branch in fp32), the loss in fp32.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import editing
import parallel
import rundir

PRESETS = {"tiny": dict(model="tiny", resolution=64, cond_resolution=0, lora_rank=8, lora_alpha=16, max_steps=20, lr=1e-3,
                        grad_accum=2, save_every=5),
           # 8 passes over AOT-SFT: fewer leave the cold start at the edge of adding anything (bench/tiny_world.md)
           "tiny_world": dict(model="{run_dir}/models/editor", resolution=112, cond_resolution=0, lora_rank=16, lora_alpha=32,
                              epochs=8, lr=1e-3, grad_accum=8, save_every=20, grad_ckpt=False)}


@dataclass
class Args:
    run_dir: str = field(default="runs/aot", metadata={"help": "run directory"})
    preset: str | None = field(default=None, metadata={"help": "'tiny': small offline models"})
    model: str = field(default=editing.ATTACKER_ID, metadata={"help": "Qwen-Image-Edit hub id or path"})
    data: str | None = field(default=None, metadata={"help": "default <run_dir>/data/aot_sft"})
    resolution: int = field(default=512, metadata={"help": "edit resolution (sqrt of pixel area)"})
    cond_resolution: int = field(default=512, metadata={"help": "condition image (VAE latents + the image the text "
                                                                  "encoder sees) at ~this^2 pixels: as 03 (flow_grpo's "
                                                                  "512); 1024 = the pipeline's; 0 = at --resolution"})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    epochs: float = field(default=2.0, metadata={"help": "passes over AOT-SFT (sets the step count)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0 = from epochs)"})
    grad_accum: int = field(default=4, metadata={"help": "rows per optimizer step and rank"})
    timestep_sampling: str = field(default="uniform", metadata={"help": "'uniform' or 'logit_normal'"})
    grad_ckpt: bool = field(default=True, metadata={"help": "gradient checkpointing in the transformer "
                                                           "(--grad_ckpt false: off)"})
    dtype: str = field(default="auto", metadata={"help": "frozen model / compute dtype: bf16, fp32, auto "
                                                          "(bf16 on GPU); the LoRA is always fp32"})
    report_to: str = field(default="none", metadata={"help": "also log to: none, tensorboard, wandb (JSONL always)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def cache_rows(pipe, rows, resolution, cond_resolution=0):
    """Per row, computed once and kept in CPU memory: prompt context (no CFG in SFT), condition
    latents, target latents x0. The text encoder is not needed afterwards."""
    cache = []
    for r in common.progress(rows, desc="[02] cache", leave=False):
        ctx = editing.encode_edit(pipe, [r["image"]], [r["instruction"]], resolution, negative_prompt=None,
                                  cond_resolution=cond_resolution)
        target = editing.images_to_tensor([r["edited_image"]], ctx.width, ctx.height)
        cache.append((ctx.to("cpu"), editing.encode_images(pipe, target).float().cpu()))
    return cache


def sample_sigma(n, mode, generator):
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    return torch.rand(n, generator=generator)


def sft_loss(transformer, ctx, x0, s, eps):
    """Flow-matching MSE on the target tokens: v(x_s) vs eps - x0."""
    x_s = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * eps          # (1, L, 64)
    v = editing.predict_velocity(transformer, x_s.to(x0.device), s.to(x0.device), ctx, cfg_scale=1.0)
    return F.mse_loss(v, eps - x0)


def main(args: Args):
    common.quiet()
    ddp = parallel.setup_distributed()
    run = Path(args.run_dir)
    out = run / "attacker" / "sft"
    if out.exists():
        parallel.print0(f"[02] {out} exists: nothing to do")
        return
    from datasets import load_from_disk
    data_path = Path(args.data or run / "data" / "aot_sft")
    if not data_path.exists():
        raise SystemExit(f"[02] no AOT-SFT data at {data_path} (run 01_build_sft_data.py)")
    ds = load_from_disk(str(data_path))
    if len(ds) == 0:
        raise SystemExit(f"[02] {data_path} is empty")
    rows = [ds[i] for i in range(ddp.rank, len(ds), ddp.world)] or [ds[ddp.rank % len(ds)]]
    torch.manual_seed(args.seed + ddp.rank)
    pipe, params = editing.trainable_attacker(args.model, ddp.device, common.resolve_dtype(args.dtype, ddp.device),
                                              None, args.lora_rank, args.lora_alpha, args.seed, args.grad_ckpt)
    pipe.transformer.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    t0 = time.time()
    cache = cache_rows(pipe, rows, args.resolution, args.cond_resolution)
    pipe.text_encoder = None   # 16.6 GB at paper size, unused from here on (bench/paper_scale.py)
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(ds) / (args.grad_accum * ddp.world)))
    parallel.print0(f"[02] {len(ds)} AOT-SFT rows ({len(rows)} on rank 0, cached in {time.time() - t0:.1f}s), "
                    f"{steps} steps x {args.grad_accum} rows x {ddp.world} ranks, LoRA r={args.lora_rank} "
                    f"({sum(p.numel() for p in params) / 1e6:.2f}M params), lr {args.lr}")
    gen = torch.Generator().manual_seed(args.seed * 100 + ddp.rank)
    rng = random.Random(args.seed * 100 + ddp.rank)
    ckpt_dir = run / "attacker" / ".ckpt_sft"
    logger = rundir.JsonlLogger(run / "logs" / "02_sft.jsonl", ddp.master, args.report_to, vars(args))
    start = 0
    resumed = rundir.load_checkpoint(ckpt_dir, pipe.transformer, opt, ddp.rank)
    if resumed:
        start, extra = resumed
        gen.set_state(extra["gen"])
        rng.setstate((3, tuple(extra["rng"]), None))
        logger.resume(lambda row: row["step"] <= start, start)
        parallel.print0(f"[02] resumed at step {start}")

    for step in common.progress(range(start, steps), initial=start, total=steps, desc="[02] steps"):
        ts = time.time()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.grad_accum):
            ctx, x0 = cache[rng.randrange(len(cache))]
            ctx, x0 = ctx.to(ddp.device), x0.to(ddp.device)
            s = sample_sigma(1, args.timestep_sampling, gen)
            eps = torch.randn(x0.shape, generator=gen).to(x0.device)
            loss = sft_loss(pipe.transformer, ctx, x0, s, eps)
            (loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
        parallel.all_reduce_grads(params)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        opt.step()
        loss_all = parallel.all_reduce(torch.tensor(total), op="mean").item()
        row = dict(step=step + 1, loss=loss_all, grad_norm=gnorm, step_s=time.time() - ts,
                   peak_mem_gb=parallel.peak_memory_gb(ddp.device))
        logger.log(row)
        parallel.print0(f"[02] step {step + 1}/{steps} loss {loss_all:.4f} grad {gnorm:.3f} {row['step_s']:.2f}s "
                        f"mem {row['peak_mem_gb']:.1f}GB")
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            rundir.save_checkpoint(ckpt_dir, step + 1, pipe.transformer, opt,
                                   dict(gen=gen.get_state(), rng=list(rng.getstate()[1])), ddp.rank)

    if ddp.master:
        tmp = rundir.tmp_dir_for(out)
        editing.save_attacker_lora(pipe, tmp)
        rundir.save_args(args, tmp)
        rundir.commit_dir(tmp, out)
        import shutil
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        print(f"[02] wrote {out} in {time.time() - t0:.0f}s")
    logger.close()
    parallel.cleanup_distributed()


if __name__ == "__main__":
    main(rundir.parse_args(Args, PRESETS))
