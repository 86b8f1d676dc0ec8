"""Stage 03: train the attacker with Flow-GRPO against the frozen defender, write the curriculum.

Attacker round k starts from attacker k-1 (round 1: the SFT adapter) and attacks defender k-1.
Reads:  data/scenes/, attacker/sft/ or attacker/round_{k-1}/, defender/round_{k-1}/
Writes: attacker/round_k/ (LoRA safetensors + args.json), attacks/round_k/ (DatasetDict: train =
        the defender's curriculum, test = held-out attacks for 05; each attack's strategy: census.py),
        attacks/round_k/gallery.png, logs/03_round_k.jsonl

  python 03_train_attacker.py --preset tiny --run_dir runs/tiny --round 1
  python 03_train_attacker.py --run_dir runs/aot --round 1                          # 1 GPU (> 80 GB)
  torchrun --nproc_per_node 8 03_train_attacker.py --run_dir runs/aot --round 1     # FSDP2, 8 GPUs

Flow-GRPO, every piece in this file, as flow_grpo's Qwen-Image-Edit configs (counting_qwenimage_edit,
_fast) and trainer (scripts/train_qwenimage_edit_plus.py) do it (docs/paper_notes.md, "Stage 03"):
  rollout    a group of G edits per (scene, question) with the SDE sampler: each step is Gaussian, its log-prob recorded
             (per-element mean, float32); true CFG; output at --resolution, condition at --cond_resolution (512, as
             flow_grpo's trainer; the pipeline's own is 1024)
  scenes     each rollout batch holds distinct scenes across all ranks (DistributedKRepeatSampler)
  reward     the defender answers every edit k times (T = 1); local SSIM on the target boxes gates it:
             r = [ssim >= tau] * (0.5 * wrong_fraction + 0.5 * all_k_wrong)   (common.py)
  advantage  (r - mean_group) / (std of the batch's rewards on all ranks + 1e-4), clipped to [-5, 5]
             (per_prompt_stat_tracking + global_std; --adv_std group divides by the group's own std)
  update     log-probs recomputed on the trained steps with the rollout's sigmas; PPO clip (range 1e-4), optional KL
             to the reference (|mean diff|^2 / 2 std_dev_t^2); the samples shuffled into --updates_per_iter optimizer
             steps (2: flow_grpo accumulates over half an epoch), each (sample, step) term weighted equally; LoRA only
  fast       --sde_window w: SDE and training on w steps whose start is drawn in [0, T // 2 - w], ODE elsewhere
             (flow_grpo's fast edit config: w = 4, --noise_level 1.5)
  curriculum the final attacker edits the train scenes (curriculum) and the test scenes (eval)
Where this differs from flow_grpo:
  a. a rollout batch is --scenes_per_step scenes per rank (2: 16 scenes on 8 GPUs) and is one "epoch"; flow_grpo's
     edit configs sample 32 prompts per epoch. Raise --scenes_per_step to 4 on 8 GPUs to match;
  b. images keep their aspect ratio (snapped to multiples of 16 at ~resolution^2 pixels, the condition at
     ~cond_resolution^2); flow_grpo resizes every image to a resolution x resolution square;
  c. the KL's reference is the round's starting adapter (verl's initial actor; flow_grpo's fresh LoRA makes its LoRA-
     disabled model that start); --kl_ref base: the LoRA-disabled editor, before SFT.
Our choices where the paper is silent:
  1. the reward formula above (the paper gives its two parts, not how they combine);
  2. the curriculum uses the deterministic ODE sampler with --eval_steps and keeps train attacks whose local SSIM
     passes the gate (others could have changed the true answer); --curriculum_samples per train scene (own noises);
  3. --reward brightness swaps the defender for the decoded image's mean brightness: a verifiable reward for checking
     that the RL loop learns (the tests use it).
  4. precision and memory as flow_grpo (bench/paper_scale.py): frozen models in --dtype (bf16 on GPU), the LoRA, the
     SDE step and its log-probs in fp32 (the first ratio is 1 in bf16 too, tested to 1e-5); under torchrun the
     transformer with its LoRA, the text encoder and the defender are FSDP2-sharded, the defender gathered once per
     reward call; gradient checkpointing on; ranks run as many forwards (zero-weight fillers);
  5. scenes whose question has no target box ("Is there a dog?" -> No) are not attacked: with no box to protect, the
     edit could add the asked object and change the true answer (the tiny world's attacker did); --attack_targetless
     attacks them too, gated by the whole image's SSIM.
  6. not the paper's, off by default: --max_area a, an edit changing more than a share a of the image (pixels whose
     summed |RGB| difference exceeds 60, as 05 reports) earns 0; --area_scale s (tiny_world: 0.5), reward x max(0, 1 - area / s).
  7. --val_fraction f holds f of the train scenes out of the rollouts, to validate on before the first iteration and
     every --val_every: ODE edits (the same noises each time), the reward under the defender's greedy answer (05's
     reading); --select best_val keeps the best-scoring adapter (04 does so for the defender; flow_grpo keeps the last).
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import census
import common
import editing
import parallel
import rundir

PRESETS = {"tiny": dict(model="tiny", resolution=64, cond_resolution=0, num_steps=4, eval_steps=4, group_size=4, scenes_per_step=2,
                        train_iters=4, lora_rank=8, lora_alpha=16, lr=1e-3, defender_k=2,
                        defender_max_new_tokens=8, save_every=2, micro_batch=8, tau=0.3, census="pixels"),
           "tiny_world": dict(model="{run_dir}/models/editor", resolution=112, cond_resolution=0, num_steps=6, eval_steps=8,
                              group_size=8, scenes_per_step=8, train_iters=128, lr=3e-4, defender_k=2, area_scale=0.5,
                              defender_max_new_tokens=8, save_every=4, micro_batch=16, grad_ckpt=False,
                              # 128 iterations, the area term (choice 6), the best-validated adapter (7): bench/tiny_world.md
                              val_fraction=0.25, val_every=8, select="best_val", curriculum_samples=4, curriculum_batch=32,
                              # Flow-GRPO-Fast: SDE and training on a window of 2 steps, ODE elsewhere; the gate at 0.7:
                              # the world editor's "keep" passes 96% of scenes, an erased target ~32% (bench/world_gate.py)
                              sde_window=2, tau=0.7, census="pixels")}


@dataclass
class Args:
    run_dir: str = field(default="runs/aot", metadata={"help": "run directory"})
    preset: str | None = field(default=None, metadata={"help": "'tiny': small offline models"})
    round: int = field(default=1, metadata={"help": "attacker round k >= 1"})
    model: str = field(default=editing.ATTACKER_ID, metadata={"help": "Qwen-Image-Edit hub id or path"})
    init_lora: str | None = field(default=None, metadata={"help": "default attacker/round_{k-1} (k=1: sft)"})
    defender: str | None = field(default=None, metadata={"help": "default defender/round_{k-1}"})
    reward: str = field(default="defender", metadata={"help": "'defender' or 'brightness' (sanity check)"})
    resolution: int = field(default=512, metadata={"help": "edit resolution (sqrt of pixel area)"})
    cond_resolution: int = field(default=512, metadata={"help": "condition image at ~this^2 pixels (flow_grpo's "
                                                                  "trainer: 512; the pipeline: 1024; 0 = --resolution)"})
    num_steps: int = field(default=10, metadata={"help": "sampling steps in training rollouts"})
    eval_steps: int = field(default=50, metadata={"help": "sampling steps for the curriculum"})
    attack_targetless: bool = field(default=False, metadata={"help": "also attack scenes with no target box (choice 5)"})
    curriculum_samples: int = field(default=1, metadata={"help": "attacks per train scene in the curriculum (each "
                                                                 "from its own noise; held-out: 1 per scene)"})
    curriculum_batch: int = field(default=0, metadata={"help": "scenes per curriculum batch, rank (0: --scenes_per_step)"})
    noise_level: float = field(default=1.0, metadata={"help": "SDE noise level (0 = ODE)"})
    sde_window: int = field(default=0, metadata={"help": "Flow-GRPO-Fast: SDE + trained steps, a window in the first "
                                                         "half (0 = all but the last; flow_grpo: 4 at noise 1.5)"})
    cfg: float = field(default=4.0, metadata={"help": "true CFG scale"})
    group_size: int = field(default=16, metadata={"help": "edits per scene (G)"})
    scenes_per_step: int = field(default=2, metadata={"help": "scenes per rollout batch and rank"})
    train_iters: int = field(default=100, metadata={"help": "rollout + update iterations"})
    micro_batch: int = field(default=4, metadata={"help": "samples per training forward"})
    updates_per_iter: int = field(default=2, metadata={"help": "optimizer steps per rollout batch (flow_grpo: 2)"})
    adv_std: str = field(default="global", metadata={"help": "advantage denominator: the batch's reward std ('global', "
                                                             "flow_grpo's edit configs) or the group's",
                                                     "choices": ["global", "group"]})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range"})
    adv_clip: float = field(default=5.0, metadata={"help": "advantage clip"})
    kl_beta: float = field(default=0.0, metadata={"help": "KL weight (flow_grpo's, off in its edit configs)"})
    kl_ref: str = field(default="init", metadata={"help": "KL reference: the round's start | base", "choices": ["init", "base"]})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (when starting a fresh adapter)"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (when starting a fresh adapter)"})
    defender_k: int = field(default=4, metadata={"help": "defender answers per edit"})
    defender_temperature: float = field(default=1.0, metadata={"help": "defender sampling temperature"})
    defender_max_new_tokens: int = field(default=256, metadata={"help": "defender answer length"})
    tau: float = field(default=0.85, metadata={"help": "local-SSIM gate"})
    max_area: float = field(default=1.0, metadata={"help": "an edit changing more of the image earns 0 (choice 6; 1: off)"})
    area_scale: float = field(default=0.0, metadata={"help": "reward x max(0, 1 - area / this) (choice 6; 0 = off)"})
    w_fraction: float = field(default=0.5, metadata={"help": "reward weight of the wrong fraction"})
    w_all: float = field(default=0.5, metadata={"help": "reward weight of all-k-wrong"})
    grad_ckpt: bool = field(default=True, metadata={"help": "gradient checkpointing (--grad_ckpt false: off)"})
    dtype: str = field(default="auto", metadata={"help": "frozen models' dtype: bf16, fp32, auto (GPU: bf16); LoRA: fp32"})
    report_to: str = field(default="none", metadata={"help": "also log to: none, tensorboard, wandb (JSONL always)"})
    save_every: int = field(default=20, metadata={"help": "checkpoint every N iterations"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    val_fraction: float = field(default=0.0, metadata={"help": "train scenes held out to validate on (choice 7; 0: none)"})
    val_every: int = field(default=8, metadata={"help": "validate every N iterations (and before the first)"})
    select: str = field(default="last", metadata={"help": "the round's attacker (choice 7)", "choices": ["last", "best_val"]})
    census: str = field(default="judge", metadata={"help": "label each attack's strategy (census.py) by its 'pixels' (a "
                                                           "plain background) or by asking the defender ('judge')",
                                                   "choices": ["pixels", "judge"]})


# ---------------------------------------------------------------------------------------------
# Flow-GRPO: the SDE step, the rollout, the reward, the advantage, the clipped update
# ---------------------------------------------------------------------------------------------
def sde_std(s, noise_level, sigma_max):
    """flow_grpo's std_dev_t: noise_level * sqrt(s / (1 - s)), with sigmas[1] for s = 1."""
    return noise_level * math.sqrt(s / (1 - (sigma_max if s == 1 else s)))


def sde_step(v, x, s, s_next, noise_level, sigma_max, prev=None, generator=None):
    """One step of the flow-matching SDE (diffusers convention: v = eps - x0, dt = s_next - s < 0).
    Returns (x_next, log_prob per sample (mean over elements), mean). With prev given, scores it."""
    v, x = v.float(), x.float()
    dt = s_next - s
    std = sde_std(s, noise_level, sigma_max)
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * math.sqrt(-dt)
    if prev is None:
        noise = torch.randn(x.shape, generator=generator).to(x.device) if scale > 0 else 0.0
        prev = mean + scale * noise
    if scale == 0:
        return prev, torch.zeros(x.shape[0], device=x.device), mean
    logp = -((prev.detach() - mean) ** 2) / (2 * scale**2) - math.log(scale) - 0.5 * math.log(2 * math.pi)
    return prev, logp.mean(dim=tuple(range(1, logp.ndim))), mean


def sde_kl(mean, mean_ref, s, noise_level, sigma_max) -> torch.Tensor:
    """flow_grpo's KL between the policy's and the reference's step, per sample: the per-element mean of
    |mean - mean_ref|^2 / (2 std_dev_t^2), std_dev_t without the sqrt(-dt) of the step's own std."""
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * sde_std(s, noise_level, sigma_max) ** 2)


def sde_steps(args, T, rng: random.Random) -> list[int]:
    """Indices of the stochastic, trained steps: all but the last, or (Flow-GRPO-Fast) a window of
    --sde_window steps that starts in the first half, as flow_grpo's sde_window_range = (0, T // 2)."""
    steps = list(range(T - 1))
    if args.sde_window and args.sde_window < len(steps):
        start = rng.randint(0, max(0, T // 2 - args.sde_window))
        steps = steps[start:start + args.sde_window]
    return steps


def draw_scenes(rng: random.Random, n_scenes: int, k: int) -> list[int]:
    """k scene indices, distinct while the scenes last (flow_grpo's DistributedKRepeatSampler draws
    distinct prompts per batch); past n_scenes, further shuffled passes."""
    out = []
    while len(out) < k:
        out += rng.sample(range(n_scenes), min(n_scenes, k - len(out)))
    return out


@torch.no_grad()
def rollout(pipe, ctx, sigmas, train_steps, noise_level, cfg, generator):
    """Sample edits for every row of ctx. Returns latents (T+1, B, L, C), log-probs (T, B), final."""
    B, C = ctx.cond_latents.shape[0], ctx.cond_latents.shape[2]
    x = torch.randn((B, ctx.target_len, C), generator=generator).to(ctx.cond_latents.device)
    xs, logps = [x], []
    sigma_max = sigmas[1].item()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        v = editing.predict_velocity(pipe.transformer, x, sigmas[i:i + 1].to(x.device), ctx, cfg)
        x, logp, _ = sde_step(v, x, s, s_next, noise_level if i in train_steps else 0.0, sigma_max, generator=generator)
        xs.append(x)
        logps.append(logp)
    return torch.stack(xs), torch.stack(logps), x


def defender_failures(defender, processor, scenes, edits, args):
    """Wrong fraction over k sampled answers per edit. scenes[i] is the scene edited into edits[i]."""
    k = args.defender_k
    prompts = [common.defender_prompt(s["question"], s["options"]) for s in scenes for _ in range(k)]
    answers = common.defender_generate(defender, processor, [e for e in edits for _ in range(k)], prompts,
                                       max_new_tokens=args.defender_max_new_tokens,
                                       temperature=args.defender_temperature, batch_size=64)
    wrong = [common.extract_answer(a, s["options"]) != s["answer"]
             for a, s in zip(answers, [s for s in scenes for _ in range(k)])]
    return torch.tensor(wrong, dtype=torch.float32).view(-1, k).mean(1)


def compute_rewards(scenes, edits, images, defender, processor, args):
    """-> rewards (B,), local SSIM (B,), wrong fraction (B,), changed area (B,)."""
    if args.reward == "brightness":
        bright = ((images.float().clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3)).cpu()
        return bright, torch.ones_like(bright), torch.zeros_like(bright), torch.zeros_like(bright)
    ssim = torch.tensor([common.local_ssim(s["image"], e, [t["bbox"] for t in s["targets"]]) for s, e in zip(scenes, edits)])
    area = torch.tensor([common.changed_area(s["image"], e) for s, e in zip(scenes, edits)])
    with parallel.gathered_for_generation(defender):   # FSDP2: one all-gather, then no collective
        wrong = defender_failures(defender, processor, scenes, edits, args)
    r = torch.tensor([common.attacker_reward(a, b, args.tau, args.w_fraction, args.w_all, c, args.max_area, args.area_scale)
                      for a, b, c in zip(ssim.tolist(), wrong.tolist(), area.tolist())])
    return r, ssim, wrong, area


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float, std: str = "global") -> torch.Tensor:
    """(B*G,) -> (B*G,): each reward minus its group's mean, divided by the std (ddof 0) of every reward
    of this batch on all ranks (std="global", flow_grpo's edit configs: global_std) or of its own group
    (std="group", flow_grpo's default), + 1e-4; clipped. The global std keeps a group whose rewards differ
    by one sampled defender answer from getting the advantages of a real success."""
    r = rewards.view(-1, group_size).double()
    if std == "global":
        n, tot, sq = parallel.all_reduce(torch.tensor([r.numel(), r.sum(), (r ** 2).sum()], dtype=torch.float64)).tolist()
        sd = math.sqrt(max(sq / n - (tot / n) ** 2, 0.0))
    else:   # "group"
        sd = r.std(1, unbiased=False, keepdim=True)
    adv = (r - r.mean(1, keepdim=True)) / (sd + 1e-4)
    return adv.clamp(-clip, clip).flatten().float()


def grpo_update(pipe, params, opt, ctx, sigmas, xs, old_logps, adv, train_steps, args, idx=None, ref=None):
    """PPO-clip on every trained step of the samples ``idx`` (default: all); one optimizer step. Returns stats.
    Every (sample, step) term weighs the same, 1 / (samples of this update on all ranks x steps), also when the last
    micro-batch is partial or the ranks hold different counts. Every rank runs as many micro-batches (FSDP2's
    collectives must match): a rank with fewer samples repeats its first sample with weight 0."""
    tr = pipe.transformer
    idx = list(range(adv.shape[0])) if idx is None else list(idx)
    order = list(train_steps)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    n_all = parallel.all_reduce(torch.tensor(float(len(idx)))).item()
    weight = world / (max(n_all, 1.0) * len(order))   # gradients are then averaged over the ranks
    mine = math.ceil(len(idx) / args.micro_batch)
    n_mb = int(parallel.all_reduce(torch.tensor(float(mine)), op="max").item())
    sigma_max = sigmas[1].item()
    stats = dict(clip_frac=0.0, approx_kl=0.0, ratio=0.0, kl=0.0, n=0)
    opt.zero_grad(set_to_none=True)
    for j in order:
        s, s_next = sigmas[j].item(), sigmas[j + 1].item()
        for mb in range(n_mb):
            real = mb < mine
            sel = idx[mb * args.micro_batch:(mb + 1) * args.micro_batch] if real else [0]
            sub, x, x_next = ctx.select(sel), xs[j, sel], xs[j + 1, sel]
            if args.kl_beta > 0:   # the reference first: its LoRA swap must precede the graph that saves the LoRA
                with torch.no_grad(), editing.lora_values(tr, params, ref):
                    v_ref = editing.predict_velocity(tr, x, sigmas[j:j + 1].to(xs.device), sub, args.cfg)
                    _, _, mean_ref = sde_step(v_ref, x, s, s_next, args.noise_level, sigma_max, prev=x_next)
            v = editing.predict_velocity(tr, x, sigmas[j:j + 1].to(xs.device), sub, args.cfg)
            _, logp, mean = sde_step(v, x, s, s_next, args.noise_level, sigma_max, prev=x_next)
            ratio = torch.exp(logp - old_logps[j, sel])
            a = adv[sel].to(ratio.device)
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - args.clip_range, 1 + args.clip_range)).sum()
            if args.kl_beta > 0:
                kl = sde_kl(mean, mean_ref, s, args.noise_level, sigma_max)
                loss = loss + args.kl_beta * kl.sum()
                stats["kl"] += kl.mean().item() if real else 0.0
            (loss * (weight if real else 0.0)).backward()
            if real:
                with torch.no_grad():
                    stats["clip_frac"] += ((ratio - 1).abs() > args.clip_range).float().mean().item()
                    stats["approx_kl"] += (0.5 * (logp - old_logps[j, sel]) ** 2).mean().item()
                    stats["ratio"] += ratio.mean().item()
                    stats["n"] += 1
    if not parallel.is_fsdp(tr):   # FSDP2 reduce-scatters the LoRA gradients in backward (in fp32)
        parallel.all_reduce_grads(params)
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    stats["grad_norm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    opt.step()
    n = max(stats.pop("n"), 1)
    return {k: (v / n if k != "grad_norm" else v) for k, v in stats.items()}


def grpo_updates(pipe, params, opt, ctx, sigmas, xs, old_logps, adv, train_steps, args, shuffle, ref=None):
    """flow_grpo's updates per rollout batch: the samples, shuffled, split into --updates_per_iter parts, one optimizer
    step each (its edit configs accumulate over half an epoch's batches: two steps). -> the stats, averaged."""
    order = list(range(adv.shape[0]))
    shuffle.shuffle(order)
    U = args.updates_per_iter
    parts = [order[len(order) * u // U:len(order) * (u + 1) // U] for u in range(U)]
    stats = [grpo_update(pipe, params, opt, ctx, sigmas, xs, old_logps, adv, train_steps, args, part, ref) for part in parts]
    return {k: sum(st[k] for st in stats) / U for k in stats[0]}


def encode_scenes(pipe, scenes, args):
    return editing.encode_edit(pipe, [s["image"] for s in scenes],
                               [common.attack_instruction(s["question"]) for s in scenes], args.resolution,
                               negative_prompt=" " if args.cfg > 1 else None, cond_resolution=args.cond_resolution)


# ---------------------------------------------------------------------------------------------
# The curriculum: the trained attacker edits every scene once (ODE)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def attack_scenes(pipe, scenes, defender, processor, args, seed, filler, desc="[03] curriculum"):
    """Deterministic (ODE) attacks, rows for attacks/round_k: every scene once, every train scene --curriculum_samples
    times, each from its own noise (the first a single-sample run's: held-out attacks do not depend on n). Batched by
    output size; every rank runs as many batches as the busiest one (FSDP2), extra ones on ``filler`` (dropped)."""
    batches, per = [], args.curriculum_batch or args.scenes_per_step
    for j in range(args.curriculum_samples):
        part = scenes if j == 0 else [s for s in scenes if s["split"] == "train"]
        for i in range(0, len(part), per):
            by_size = {}
            for s in part[i:i + per]:
                by_size.setdefault(editing.snap_size(s["image"], args.resolution), []).append(s)
            batches += [(seed + i + 1_000_003 * j, group) for group in by_size.values()]
    n = int(parallel.all_reduce(torch.tensor(float(len(batches))), op="max").item())
    rows = []
    for b in common.progress(range(n), desc=desc):
        noise_seed, group = batches[b] if b < len(batches) else (seed, [filler])
        ctx = encode_scenes(pipe, group, args)
        sig = editing.sigma_schedule(pipe.scheduler, args.eval_steps, ctx.target_len)
        _, _, x = rollout(pipe, ctx, sig, [], 0.0, args.cfg, torch.Generator().manual_seed(noise_seed))
        images = editing.decode_latents(pipe, x, ctx.height, ctx.width)
        edits = [e.resize(s["image"].size) for e, s in zip(editing.tensor_to_images(images), group)]
        r, ssim, wrong, _ = compute_rewards(group, edits, images, defender, processor, args)
        rows += [{**s, "attacked_image": e, "instruction": common.attack_instruction(s["question"]), "ssim_local": a,
                  "defender_wrong_fraction": w, "reward": rr}
                 for s, e, a, w, rr in zip(group, edits, ssim.tolist(), wrong.tolist(), r.tolist()) if b < len(batches)]
    return rows


def write_curriculum(pipe, scenes_ds, defender, processor, args, ddp, run, out):
    shard_dir = run / "attacks" / f".tmp_shards_round_{args.round}"
    mine = [scenes_ds[i] for i in range(ddp.rank, len(scenes_ds), ddp.world)]
    rows = attack_scenes(pipe, mine, defender, processor, args, args.seed * 1000 + ddp.rank, scenes_ds[0])
    for r, kind in zip(rows, census.strategies(rows, "attacked_image", args.census, defender, processor)):
        r["strategy"] = kind
    allrows = rundir.gather_rows(rows, "attacks", shard_dir, ddp)
    if ddp.master:
        train, test, n_gate = rundir.save_attacks(allrows, args.tau, out)
        shutil.rmtree(shard_dir, ignore_errors=True)
        print(f"[03] curriculum {out}: {len(train)} train attacks ({n_gate} failed the SSIM gate, dropped), {len(test)} "
              f"test attacks, test wrong fraction {sum(test['defender_wrong_fraction']) / max(1, len(test)):.3f}")


@torch.no_grad()
def validate(pipe, val_scenes, defender, processor, args, ddp, best, it: int) -> dict:
    """val_score (offered to ``best``): the mean reward of ODE edits of the held-out scenes (the same noises each time)
    under the defender's greedy answer, as 05 reads an attack; val_area: their mean changed area."""
    greedy = dataclasses.replace(args, defender_k=1, defender_temperature=0.0, curriculum_samples=1)
    pipe.transformer.eval()
    rows = attack_scenes(pipe, val_scenes[ddp.rank::ddp.world], defender, processor, greedy, args.seed * 1000 + 500 + ddp.rank,
                         val_scenes[0], "[03] validation")
    t = parallel.sum_dict(dict(reward=sum(r["reward"] for r in rows), n=len(rows),
                               area=sum(common.changed_area(r["image"], r["attacked_image"]) for r in rows)))
    return dict(val_score=best.offer(it, t["reward"] / max(t["n"], 1)), val_area=t["area"] / max(t["n"], 1))


# ---------------------------------------------------------------------------------------------
def load_scenes(run: Path, args):
    """-> (every scene to attack, the train scenes to draw from, the train scenes held out to validate on: --val_fraction
    of them, drawn with the seed). Choice 5: a question about an absent object has no box."""
    from datasets import load_from_disk
    scenes_ds = load_from_disk(str(run / "data" / "scenes"))
    n_all = len(scenes_ds)
    if not args.attack_targetless:
        scenes_ds = scenes_ds.filter(lambda t: len(t) > 0, input_columns="targets")
        if n_all > len(scenes_ds):
            parallel.print0(f"[03] {n_all - len(scenes_ds)} of {n_all} scenes have no target boxes (a question about an "
                            "absent object): not attacked (--attack_targetless attacks them)")
    train_scenes = [scenes_ds[i] for i in range(len(scenes_ds)) if scenes_ds[i]["split"] == "train"]
    val_ids = rundir.held_out_ids([s["id"] for s in train_scenes], args.val_fraction, args.seed)
    val_scenes = [s for s in train_scenes if s["id"] in val_ids]
    train_scenes = [s for s in train_scenes if s["id"] not in val_ids]
    if not train_scenes:
        raise SystemExit(f"[03] no train scenes with target boxes left to train on in {run / 'data' / 'scenes'} "
                         f"({n_all} scenes, {len(val_ids)} held out for validation)")
    if args.select == "best_val" and not val_scenes:
        raise SystemExit("[03] --select best_val needs validation scenes (--val_fraction > 0)")
    return scenes_ds, train_scenes, val_scenes


def setup_models(args, ddp, run: Path, src: str):
    """The editor with its LoRA from ``src`` (fp32, trainable) and the frozen defender; under torchrun all
    three FSDP2-sharded as flow_grpo (1/world of the transformer with its LoRA, text encoder, defender)."""
    dtype, found = common.resolve_dtype(args.dtype, ddp.device), Path(src).exists()
    if not found and args.init_lora:
        raise SystemExit(f"[03] --init_lora {src} does not exist")
    if not found:
        parallel.print0(f"[03] no adapter at {src}: starting a fresh LoRA (r={args.lora_rank})")
    pipe, params = editing.trainable_attacker(args.model, ddp.device, dtype, src if found else None, args.lora_rank,
                                              args.lora_alpha, args.seed, args.grad_ckpt)
    defender = processor = None
    if args.reward == "defender":
        dpath = args.defender or str(run / "defender" / f"round_{args.round - 1}")
        if dpath != common.TINY and not Path(dpath).exists() and not args.defender:
            raise SystemExit(f"[03] round {args.round} attacks {dpath}, which does not exist (run 04 --round {args.round - 1})")
        defender, processor = common.load_defender(dpath, ddp.device, dtype=dtype)
    if ddp.world > 1:
        parallel.shard(pipe.transformer, pipe.transformer.transformer_blocks)
        parallel.shard_vl(pipe.text_encoder, pipe.tokenizer.pad_token_id)
        if defender is not None:
            parallel.shard_vl(defender, processor.tokenizer.pad_token_id)
        params = [p for p in pipe.transformer.parameters() if p.requires_grad]   # now DTensor shards
        parallel.print0(f"[03] FSDP2 over {ddp.world} ranks: transformer + LoRA, text encoder"
                        f"{', defender' if defender is not None else ''} sharded")
    return pipe, params, defender, processor


def iteration(it, pipe, params, opt, train_scenes, defender, processor, args, ddp, rng, gen, ref=None) -> dict:
    """One Flow-GRPO iteration: draw scenes, roll out G edits of each, reward, advantages, updates. -> log row."""
    t0 = time.time()
    picks = draw_scenes(rng, len(train_scenes), args.scenes_per_step * ddp.world)
    scenes = [train_scenes[i] for i in picks[ddp.rank * args.scenes_per_step:(ddp.rank + 1) * args.scenes_per_step]]
    size = editing.snap_size(scenes[0]["image"], args.resolution)   # a batch shares one latent shape
    scenes = [s for s in scenes if editing.snap_size(s["image"], args.resolution) == size]
    pipe.transformer.eval()
    ctx = encode_scenes(pipe, scenes, args).repeat(args.group_size)   # (B*G, ...)
    sigmas = editing.sigma_schedule(pipe.scheduler, args.num_steps, ctx.target_len)
    steps = sde_steps(args, args.num_steps, rng)
    xs, logps, x = rollout(pipe, ctx, sigmas, steps, args.noise_level, args.cfg, gen)
    images = editing.decode_latents(pipe, x, ctx.height, ctx.width)
    group_scenes = [s for s in scenes for _ in range(args.group_size)]
    edits = [e.resize(s["image"].size) for e, s in zip(editing.tensor_to_images(images), group_scenes)]
    t_roll = time.time() - t0
    rewards, ssim, wrong, area = compute_rewards(group_scenes, edits, images, defender, processor, args)
    adv = group_advantages(rewards, args.group_size, args.adv_clip, args.adv_std)
    t1 = time.time()
    pipe.transformer.train()
    shuffle = random.Random(args.seed * 1_000_003 + it * 1009 + ddp.rank)
    st = grpo_updates(pipe, params, opt, ctx, sigmas, xs, logps, adv, steps, args, shuffle, ref)
    return iteration_row(it + 1, rewards, ssim, wrong, area, st, t_roll, time.time() - t1, args, ddp)


def iteration_row(it, rewards, ssim, wrong, area, st, t_roll, t_train, args, ddp) -> dict:
    """The iteration's log row, summed over ranks."""
    zero_var = int((rewards.view(-1, args.group_size).std(1) == 0).sum())
    t = parallel.sum_dict(dict(reward=rewards.sum(), reward_sq=(rewards ** 2).sum(), n=len(rewards), success=(rewards > 0).sum(),
                               ssim=ssim.sum(), wrong=wrong.sum(), area=area.sum(), zero_var=zero_var,
                               **{k: st[k] for k in ("clip_frac", "approx_kl", "ratio", "kl")}))
    n, mean, w = t["n"], t["reward"] / t["n"], ddp.world
    return dict(iter=it, reward_mean=mean, reward_std=math.sqrt(max(t["reward_sq"] / n - mean**2, 0)),
                attack_success=t["success"] / n, ssim_local=t["ssim"] / n, wrong_fraction=t["wrong"] / n,
                changed_area=t["area"] / n, zero_var_groups=int(t["zero_var"]), clip_frac=t["clip_frac"] / w,
                approx_kl=t["approx_kl"] / w, ratio_mean=t["ratio"] / w, kl_ref=t["kl"] / w, grad_norm=st["grad_norm"],
                rollout_s=t_roll, train_s=t_train, edits_per_s=n / max(t_roll, 1e-9),
                peak_mem_gb=parallel.peak_memory_gb(ddp.device))


def save_attacker(pipe, best, args, ddp, out: Path, ckpt_dir: Path):
    """attacker/round_k: the last adapter, or (--select best_val) the best-validated one, named in args.json."""
    if args.select == "best_val":
        best.restore()
        parallel.print0(f"[03] --select best_val: the adapter of iteration {best.step} (validation {best.score:.3f})")
    tmp = rundir.tmp_dir_for(out)
    editing.save_attacker_lora(pipe, tmp, write=ddp.master)   # every rank: gathers FSDP2 shards
    if ddp.master:
        rundir.save_args(args, tmp, selected=dict(iter=best.step, val_score=best.score, of_iters=args.train_iters)
                         if args.select == "best_val" else None)
        rundir.commit_dir(tmp, out)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        print(f"[03] wrote {out}")


def main(args: Args):
    common.quiet()
    ddp = parallel.setup_distributed()
    run = Path(args.run_dir)
    out_lora, out_attacks = run / "attacker" / f"round_{args.round}", run / "attacks" / f"round_{args.round}"
    if out_lora.exists() and out_attacks.exists():
        parallel.print0(f"[03] {out_lora} and {out_attacks} exist: nothing to do")
        return
    scenes_ds, train_scenes, val_scenes = load_scenes(run, args)
    init = args.init_lora or str(run / "attacker" / ("sft" if args.round == 1 else f"round_{args.round - 1}"))
    done = out_lora.exists()   # training finished earlier: only the curriculum is missing, from the saved adapter
    pipe, params, defender, processor = setup_models(args, ddp, run, str(out_lora) if done else init)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ref = [p.detach().clone() for p in params] if args.kl_beta > 0 and args.kl_ref == "init" else None  # before resume
    torch.manual_seed(args.seed + ddp.rank)
    gen = torch.Generator().manual_seed(args.seed * 100 + ddp.rank)
    rng = random.Random(args.seed * 100)   # the same on every rank: disjoint scenes, one SDE window
    ckpt_dir, start = run / "attacker" / f".ckpt_round_{args.round}", args.train_iters if done else 0
    logger = rundir.JsonlLogger(run / "logs" / f"03_round_{args.round}.jsonl", ddp.master, args.report_to, vars(args))
    best = rundir.Best(params, "[03] ")   # --select best_val: the adapter with the best validation score so far
    if not done and (resumed := rundir.load_checkpoint(ckpt_dir, pipe.transformer, opt, ddp.rank)):
        start, extra = resumed
        gen.set_state(extra["gen"])
        rng.setstate((3, tuple(extra["rng"]), None))
        best.load(extra)
        logger.resume(lambda row: row["iter"] <= start, start)
        parallel.print0(f"[03] resumed at iteration {start}")
    parallel.print0(f"[03] round {args.round}: init {init}, {len(train_scenes)} train scenes (+{len(val_scenes)} to "
                    f"validate on), {args.train_iters} iters x {args.scenes_per_step} scenes x G={args.group_size} x "
                    f"{ddp.world} ranks, {args.num_steps} steps, noise {args.noise_level}, cfg {args.cfg}, reward "
                    f"{args.reward}, {sum(p.numel() for p in params) / 1e6:.2f}M LoRA")
    if start == 0 and val_scenes:   # the starting adapter is a candidate too
        logger.log(dict(iter=0, **validate(pipe, val_scenes, defender, processor, args, ddp, best, 0)))
    for it in common.progress(range(start, args.train_iters), initial=start, total=args.train_iters, desc="[03] iterations"):
        row = iteration(it, pipe, params, opt, train_scenes, defender, processor, args, ddp, rng, gen, ref)
        if val_scenes and ((it + 1) % args.val_every == 0 or it + 1 == args.train_iters):
            row.update(validate(pipe, val_scenes, defender, processor, args, ddp, best, it + 1))
        logger.log(row)
        parallel.print0(f"[03] iter {it + 1}/{args.train_iters} " + " ".join(f"{k} {row[k]:.3g}" for k in (
            "reward_mean", "reward_std", "attack_success", "ssim_local", "changed_area", "clip_frac", "approx_kl",
            "kl_ref", "ratio_mean", "rollout_s", "train_s", "peak_mem_gb", "val_score", "val_area") if k in row))
        if (it + 1) % args.save_every == 0 and it + 1 < args.train_iters:
            rundir.save_checkpoint(ckpt_dir, it + 1, pipe.transformer, opt,
                                   dict(gen=gen.get_state(), rng=list(rng.getstate()[1]), **best.state()), ddp.rank)

    if not done:
        save_attacker(pipe, best, args, ddp, out_lora, ckpt_dir)
    parallel.barrier()
    if not out_attacks.exists():
        pipe.transformer.eval()
        # the defender's sampled answers in the curriculum: the same whether training ran here, resumed or ran earlier
        torch.manual_seed(args.seed * 1000 + 7 + ddp.rank)
        if args.reward == "brightness":
            parallel.print0("[03] --reward brightness: the curriculum's rows carry no defender verdict (wrong fraction 0)")
        write_curriculum(pipe, scenes_ds, defender, processor, args, ddp, run, out_attacks)
    if ddp.master and (out_attacks / "gallery.png").exists():
        from PIL import Image
        logger.image("gallery", Image.open(out_attacks / "gallery.png"), args.train_iters)
    logger.close()
    parallel.cleanup_distributed()


if __name__ == "__main__":
    main(rundir.parse_args(Args, PRESETS))
