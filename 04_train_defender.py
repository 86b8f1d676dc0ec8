"""Stage 04: train the defender with DAPO on the attacker's curriculum (+ clean scenes).

Round 0 starts from the base model and trains on clean scenes only (the official warm-up; with
the same budget it is the paper's "clean data" ablation). Round k >= 1 starts from defender k-1
and trains on attacks/round_k/ (train split) mixed with clean scenes (--clean_ratio).

Reads:  data/scenes/, attacks/round_k/ (k >= 1), defender/round_{k-1}/ (k >= 1)
Writes: defender/round_k/ (save_pretrained, safetensors, + processor + args.json), logs/04_round_k.jsonl

  python 04_train_defender.py --preset tiny --run_dir runs/tiny --round 0          # CPU
  python 04_train_defender.py --run_dir runs/aot --round 1                          # 1 GPU
  torchrun --nproc_per_node 8 04_train_defender.py --run_dir runs/aot --round 1     # FSDP2, 8 GPUs
  torchrun --nnodes 2 --node_rank $R --master_addr $A --nproc_per_node 8 04_train_defender.py ...

DAPO, every piece in this file, as the authors' EasyR1 fork runs it (docs/paper_notes.md, "Stage 04"):
  rollout   groups of n answers per prompt, left-padded batched sampling (T = 1, top_p = 1); each
            prompt prefilled once and its n answers decoded from copies of its KV cache
  reward    the authors' correct_first: the first \\boxed{X}, 0.8 if right + 0.2 if strictly boxed, else 0
            (common.accuracy_reward); DAPO's soft overlong penalty is a flag, off as in their configs
  dynamic   keep groups whose mean reward is in (0.01, 0.99); each try generates a whole mini-rollout
  sampling  batch (the authors' mini_rollout_batch_size per round), until the rollout batch is full
            (max_try_make_batch -1); the surplus beyond it is cut, and every rank trains on its full share
  loss      PPO clip-higher (0.2 / 0.28) with dual-clip (3.0) for negative advantages, the log-ratio
            clamped to +-20 before exp; token-mean over every completion token of the global batch
            (exact under micro-batching and across ranks), no KL by default
  update    AdamW on updates of --global_batch prompts; a step whose gradient norm is not finite is skipped
Departures / our choices:
  1. rollout batch, epochs and mini-rollout batch per round as the authors' run scripts (ROUND_SCHEDULE;
     round 0 draws --warmup_samples 900 clean prompts), updates of 128 prompts; steps = floor(pool /
     rollout batch) x epochs, as EasyR1's drop_last data loader;
  2. with --max_tries > 0 spent and the batch still short, the step trains on the groups it has (EasyR1 stops);
  3. validation: --val_fraction of the round's scenes held out of training (their attacks and the same
     scenes clean; the authors hold out a separate attack split), every --val_every steps and before
     training, with greedy answers as 05 scores (the authors sample one at T 0.6, top_p 0.95);
     --select best_val makes the best-scoring step the round's defender (the authors continue from
     named intermediate checkpoints, how chosen unstated), --select last (default) the last step;
  4. old log-probs are recomputed with a no-grad forward before the updates (verl's way), not taken
     from the sampler; --old_logp rollout uses the sampler's instead;
  5. yes/no scenes are scored by the same two rules on \\boxed{Yes} / \\boxed{No} (the official reward
     reads option letters only, so it scores every yes/no item 0);
  6. precision and sharding (verl / EasyR1): fp32 master weights and AdamW state, --dtype compute (bf16 on
     GPU): FSDP2 with MixedPrecisionPolicy(param bf16, reduce fp32) under torchrun, on GPU or CPU alike,
     torch.autocast in one process; checkpoints by torch.distributed.checkpoint (same world size to resume);
  7. rollouts under FSDP2 all-gather the weights once per generate call, so ranks decode independently
     (EasyR1 syncs them into vLLM instead); memory at paper size: policy.py, bench/paper_scale.py;
  8. the old-log-prob and update forwards pack each group's answers behind one copy of its prompt
     (policy.pack: exact, tested; verl / EasyR1 run every [prompt | answer] whole; sdpa or eager attention);
  9. --balance_answers (off; not the authors'): each kept group's advantages rescaled so that every right
     answer ("A", "B", ...) carries the same advantage mass in a step (balance_answers).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
import parallel
import policy
import rundir

PRESETS = {
    "tiny": dict(model="tiny", rollout_batch=8, global_batch=4, group_size=4, micro_batch=8,
                 max_new_tokens=8, overlong_cache=0, epochs=1, max_steps=3, lr=1e-5, save_every=1,
                 min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, max_tries=2),
    # groups of 16 sampled at T 1.5 (the world's defender is far sharper than a 7B MLLM: at T 1 ~1% of its round-2 groups
    # are mixed, and the refill reads the pool for minutes a step), updates of 8 prompts, lr 1e-4, one pass, micro-batches
    # of an update; refills as the authors (max_tries -1), DAPO's overlong penalty on 3 of 8 tokens (bench/tiny_world.md)
    "tiny_world": dict(model="{run_dir}/models/defender", rollout_batch=32, global_batch=8, group_size=16, micro_batch=128,
                       max_new_tokens=8, overlong_cache=3, epochs=1, lr=1e-4, save_every=4, temperature=1.5,
                       min_pixels=112 * 112, max_pixels=112 * 112, max_tries=-1, grad_ckpt=False, probe_every=4),
}


# The authors' run scripts (scripts/run_{base,iter0,iter1,iter2}.sh + configs): rollout batch, epochs and
# mini-rollout batch of each round; round 0 is their warm-up on ~900 clean samples, rounds 1-3 their
# iterations 0-2.
ROUND_SCHEDULE = {0: (512, 100, 288), 1: (128, 50, 152), 2: (128, 50, 152), 3: (512, 15, 400)}


@dataclass
class Args:
    run_dir: str = field(default="runs/aot", metadata={"help": "run directory"})
    preset: str | None = field(default=None, metadata={"help": "'tiny': small offline models and data"})
    round: int = field(default=0, metadata={"help": "defender round k (0 = clean warm-up)"})
    model: str = field(default=common.DEFENDER_ID, metadata={"help": "base model for round 0"})
    init: str | None = field(default=None, metadata={"help": "start from here (default defender/round_{k-1})"})
    curriculum: str | None = field(default=None, metadata={"help": "default attacks/round_k"})
    clean_ratio: float = field(default=0.5, metadata={"help": "share of clean prompts in rounds >= 1"})
    epochs: float = field(default=0, metadata={"help": "passes over the prompt pool (0 = the authors' value for "
                                                          "this round, ROUND_SCHEDULE)"})
    max_steps: int = field(default=0, metadata={"help": "cap on rollout steps (0 = from epochs)"})
    rollout_batch: int = field(default=0, metadata={"help": "prompts per rollout step, all ranks (0 = the authors' "
                                                             "value for this round)"})
    warmup_samples: int = field(default=900, metadata={"help": "round 0: clean prompts drawn (0 = all; official ~900)"})
    global_batch: int = field(default=128, metadata={"help": "prompts per optimizer update (all ranks)"})
    group_size: int = field(default=5, metadata={"help": "answers per prompt (n)"})
    micro_batch: int = field(default=8, metadata={"help": "max sequences per forward/backward"})
    micro_tokens: int = field(default=8192, metadata={"help": "max padded tokens per forward/backward (0 = no "
                                                                "limit; verl's ppo_max_token_len_per_gpu)"})
    gen_batch: int = field(default=0, metadata={"help": "max prompts per generate call (0 = as many as "
                                                         "--gen_memory_gb holds)"})
    gen_memory_gb: float = field(default=32.0, metadata={"help": "KV cache + prefill budget of a generate call (GB)"})
    temperature: float = field(default=1.0, metadata={"help": "rollout temperature"})
    top_p: float = field(default=1.0, metadata={"help": "rollout top_p"})
    max_new_tokens: int = field(default=4096, metadata={"help": "max response length (official: 4096)"})
    overlong_cache: int = field(default=0, metadata={"help": "DAPO's soft overlong buffer; 0 = off (official)"})
    mask_truncated: bool = field(default=False, metadata={"help": "drop truncated answers from the loss"})
    dyn_low: float = field(default=0.01, metadata={"help": "keep groups with mean reward > this"})
    dyn_high: float = field(default=0.99, metadata={"help": "... and < this"})
    balance_answers: bool = field(default=False, metadata={"help": "rescale advantages so every right answer carries "
                                                                   "the same mass in a step (departure 9)"})
    max_tries: int = field(default=-1, metadata={"help": "generation rounds per step to fill the batch (-1 = until "
                                                            "full, official max_try_make_batch)"})
    mini_rollout_batch: int = field(default=0, metadata={"help": "prompts generated per try, all ranks (0 = the "
                                                                  "authors' value for this round; EasyR1's "
                                                                  "mini_rollout_batch_size)"})
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip epsilon (low)"})
    clip_high: float = field(default=0.28, metadata={"help": "PPO clip epsilon (high), DAPO clip-higher"})
    clip_dual: float = field(default=3.0, metadata={"help": "dual-clip bound for negative advantages (EasyR1's "
                                                            "clip_ratio_dual; 0 = off)"})
    kl_coef: float = field(default=0.0, metadata={"help": "k3 KL to the initial model (0 = off)"})
    old_logp: str = field(default="recompute", metadata={"help": "'recompute' or 'rollout'"})
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    lora_rank: int = field(default=0, metadata={"help": "0 = full-parameter training, else LoRA rank"})
    train_vision: bool = field(default=True, metadata={"help": "train the vision tower too"})
    grad_ckpt: bool = field(default=True, metadata={"help": "gradient checkpointing (--grad_ckpt false: off)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: bf16, fp32, auto (bf16 on GPU); trained "
                                                          "weights and optimizer state are always fp32"})
    min_pixels: int = field(default=262144, metadata={"help": "image min pixels (processor)"})
    max_pixels: int = field(default=4194304, metadata={"help": "image max pixels (processor)"})
    report_to: str = field(default="none", metadata={"help": "also log to: none, tensorboard, wandb (JSONL always)"})
    save_every: int = field(default=20, metadata={"help": "checkpoint every N steps"})
    val_every: int = field(default=4, metadata={"help": "greedy accuracy on the held-out validation split every N "
                                                        "steps, logged (the authors' config_iter2: 4; 0 = off)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the round's scenes held out for validation"})
    select: str = field(default="last", metadata={"help": "which step becomes defender/round_k: 'last' or "
                                                          "'best_val' (the best validation score)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    probe_every: int = field(default=0, metadata={"help": "every N steps (and before training) log answer_margin: "
                                                          "mean log P(B) - log P(A) on 64 fixed clean two-option "
                                                          "scenes, the defender's letter prior (0 = off)"})


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def load_prompt_pool(args, run: Path) -> tuple[list[dict], list[dict]]:
    """(training pool, validation set). Round 0: clean train scenes; round k: the curriculum mixed with
    clean scenes. With validation on (--val_every or --select best_val), --val_fraction of the round's
    scenes are held out of training: round k's attacks on them and the same scenes clean, round 0's clean
    scenes (the authors validate on a held-out split of the round's attacks; never 05's test split)."""
    from datasets import load_from_disk
    scenes = load_from_disk(str(run / "data" / "scenes")).filter(lambda s: s == "train", input_columns="split")
    clean = [dict(id=r["id"], image=r["image"], question=r["question"], options=r["options"], answer=r["answer"],
                  source="clean") for r in scenes]
    held = validating(args)
    if args.round == 0:
        if args.warmup_samples and len(clean) > args.warmup_samples:
            clean = random.Random(args.seed).sample(clean, args.warmup_samples)
        val_ids = rundir.held_out_ids([p["id"] for p in clean], args.val_fraction, args.seed + 1) if held else set()
        return [p for p in clean if p["id"] not in val_ids], [p for p in clean if p["id"] in val_ids]
    path = Path(args.curriculum or run / "attacks" / f"round_{args.round}")
    if not path.exists():
        raise SystemExit(f"[04] round {args.round} needs the curriculum {path} (run 03 --round {args.round})")
    attacks = load_from_disk(str(path))["train"]
    adv = [dict(id=r["id"], image=r["attacked_image"], question=r["question"], options=r["options"],
                answer=r["answer"], source="attack") for r in attacks]
    val_ids = rundir.held_out_ids([p["id"] for p in adv], args.val_fraction, args.seed + 1) if held else set()
    val = [p for p in adv if p["id"] in val_ids] + [p for p in clean if p["id"] in val_ids]
    adv, clean = [p for p in adv if p["id"] not in val_ids], [p for p in clean if p["id"] not in val_ids]
    return adv + clean_share(clean, len(adv), args.clean_ratio, random.Random(args.seed)), val


def probe_scenes(run: Path, n: int = 64) -> list[dict]:
    """The letter probe's scenes: the first n clean two-option train scenes by id, the same for every seed."""
    from datasets import load_from_disk
    scenes = load_from_disk(str(run / "data" / "scenes"))
    ids = scenes["id"]
    picked = sorted((i for i, s, o in zip(range(len(ids)), scenes["split"], scenes["options"]) if s == "train"
                     and len(o) == 2), key=ids.__getitem__)[:n]
    rows = scenes.select(picked)
    return [dict(image=r["image"], question=r["question"], options=r["options"], answer=r["answer"]) for r in rows]


def validating(args) -> bool:
    return args.val_every > 0 or args.select == "best_val"


def clean_share(clean: list, n_attacks: int, ratio: float, rng: random.Random) -> list:
    """The clean prompts that make them --clean_ratio of the pool: drawn without repetition while the
    clean scenes last, then whole shuffled passes over them (a small clean set is repeated, not
    silently left short of the ratio)."""
    want = int(round(n_attacks * ratio / max(1e-9, 1 - ratio)))
    out = []
    while len(out) < want and clean:
        out += rng.sample(clean, min(want - len(out), len(clean)))
    return out


def step_count(args, n_prompts: int) -> int:
    """EasyR1's: a drop_last loader of rollout-batch prompts, for --epochs passes (--max_steps overrides)."""
    return args.max_steps or max(1, int(n_prompts // args.rollout_batch * args.epochs))


class PromptStream:
    """Endless shuffled passes over this rank's share of the pool; position is checkpointable."""

    def __init__(self, pool, rank, world, seed):
        self.items, self.seed, self.epoch, self.pos = pool[rank::world], seed + rank, 0, 0
        if not self.items:
            raise SystemExit("[04] this rank has no prompts: more ranks than prompts")
        self._order()

    def _order(self):
        self.order = list(range(len(self.items)))
        random.Random(self.seed * 1000 + self.epoch).shuffle(self.order)

    def take(self, n):
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order()
            out.append(self.items[self.order[self.pos]])
            self.pos += 1
        return out


def overlong_penalty(length: int, max_len: int, cache: int) -> float:
    """DAPO soft overlong punishment: 0 up to max_len - cache, linear to -1 at max_len, -1 past it."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return ((max_len - cache) - length) / cache
    return -1.0


# ---------------------------------------------------------------------------------------------
# DAPO: reward, group advantage, dynamic sampling, clipped loss, one update
# ---------------------------------------------------------------------------------------------
def score(samples, args):
    for s in samples:
        p = s["prompt"]
        s["accuracy"] = common.accuracy_reward(s["text"], p["answer"], p["options"])
        s["overlong"] = (overlong_penalty(len(s["completion"]), args.max_new_tokens, args.overlong_cache)
                         if args.overlong_cache > 0 else 0.0)
        s["reward"] = s["accuracy"] + s["overlong"]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(G, n) rewards -> (G, n) advantages normalised within each group (GRPO / DAPO)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def balance_answers(adv: torch.Tensor, answers: list[str]) -> torch.Tensor:
    """(G, n) advantages of G kept groups with right answers ``answers`` -> rescaled per group so that, among
    the answers of one format (option letters; Yes / No), each answer's groups carry the same total mass (the
    sum of their positive advantages, over all ranks): the mean of that format's answers in this step. A kept
    group pushes its right answer up and the wrong ones down by that mass: with more kept groups of one right
    letter the letter prior moves, whatever the images show; balanced, it does not."""
    mine = {}
    for a, m in zip(answers, adv.clamp(min=0).sum(1).tolist()):
        mine[a] = mine.get(a, 0.0) + m
    total = parallel.merge_counts(mine)

    def form(a):
        return "yes/no" if a in ("Yes", "No") else "letters"
    target = {f: sum(v for a, v in total.items() if form(a) == f) / sum(form(a) == f for a in total)
              for f in {form(a) for a in total}}
    scale = [target[form(a)] / total[a] if total[a] > 0 else 1.0 for a in answers]
    return adv * torch.tensor(scale, dtype=adv.dtype)[:, None]


def dynamic_filter(rewards: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(G, n) -> (G,) bool: groups whose mean accuracy lies strictly inside (low, high)."""
    m = rewards.mean(1)
    return (m > low) & (m < high)


def dapo_loss(logp, old_logp, adv, mask, clip_low, clip_high, num_tokens, ref_logp=None, kl_coef=0.0,
              clip_dual=3.0):
    """Sum over this micro-batch's tokens of the clipped objective, divided by ``num_tokens`` (the
    completion tokens of the whole global batch): summing micro-batch losses gives the token-mean.
    As EasyR1's actor: the log-ratio is clamped to +-20 before exp, and tokens with a negative advantage
    are dual-clipped (their loss is at most -A * clip_dual, arXiv 1912.09729; 0 = off).
    logp, old_logp, mask: (B, T); adv: (B,)."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    a = adv[:, None]
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if clip_dual > 0:
        pg = torch.where(a < 0, torch.minimum(pg, -a * clip_dual), pg)
    if kl_coef > 0 and ref_logp is not None:  # k3 estimator
        d = ref_logp - logp
        pg = pg + kl_coef * (torch.exp(d) - d - 1)
    loss = (pg * mask).sum() / num_tokens
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) & (a < 0)) | ((ratio > 1 + clip_high) & (a > 0))
        if clip_dual > 0:
            clipped |= (ratio > clip_dual) & (a < 0)
        stats = dict(clip_frac=(clipped.float() * mask).sum().item(), ratio_sum=(ratio * mask).sum().item(),
                     tokens=mask.sum().item())
    return loss, stats


def collect_groups(model, processor, stream, per_rank, args):
    """Dynamic sampling, as EasyR1's _make_batch_data: every try generates a mini-rollout batch
    (--mini_rollout_batch prompts over all ranks) and keeps its informative groups, until the ranks
    together hold the rollout batch (per_rank x world) or --max_tries tries are spent. The kept groups
    are then shared out so that every rank trains on per_rank of them (``balance_groups``); the surplus
    beyond the rollout batch is cut. Every rank generates in every try (collectives stay in step under
    FSDP). Also returns one group to use as zero-weight filler."""
    kept, tries, seen, gen_tokens, t0, filler = [], 0, 0, 0, time.time(), None
    gen = dict(samples=0, correct=0, reward=0.0)   # everything generated, kept or not
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    need = per_rank * world
    per_try = max(1, math.ceil((args.mini_rollout_batch or need) / world))
    while args.max_tries < 0 or tries < args.max_tries:
        if parallel.all_reduce(torch.tensor(float(len(kept)))).item() >= need:
            break
        tries += 1
        samples = policy.rollout(model, processor, stream.take(per_try), args)
        score(samples, args)
        gen_tokens += sum(len(s["completion"]) for s in samples)
        gen["samples"] += len(samples)
        gen["correct"] += sum(s["accuracy"] > 0 for s in samples)
        gen["reward"] += sum(s["reward"] for s in samples)
        groups = [samples[i:i + args.group_size] for i in range(0, len(samples), args.group_size)]
        filler = filler or groups[0]
        acc = torch.tensor([[s["accuracy"] for s in g] for g in groups])
        keep = dynamic_filter(acc, args.dyn_low, args.dyn_high)
        seen += len(groups)
        kept += [g for g, k in zip(groups, keep.tolist()) if k]
    return policy.balance_groups(kept, per_rank), dict(tries=tries, groups_seen=seen, gen_tokens=gen_tokens,
                                                gen_s=time.time() - t0, filler=filler, gen_samples=gen["samples"],
                                                gen_correct=gen["correct"], gen_reward=gen["reward"])


def train_on_groups(model, params, opt, groups, args, ddp, ref_model=None, filler=None):
    """Advantages, (re)computed old log-probs, then updates of `global_batch` prompts each.
    Ranks run the same number of forwards: a rank with fewer samples runs zero-weight filler
    micro-batches, so FSDP's and the gradient all-reduce's collectives always match."""
    if parallel.all_reduce(torch.tensor(float(len(groups)))).item() == 0:
        parallel.print0("[04] no informative group on any rank: no update this step")
        return dict(updates=0, tokens=0.0, clip_frac=0.0, ratio_sum=0.0, entropy_sum=0.0, grad_norm=0.0, train_s=0.0)
    pad = model.generation_config.pad_token_id or 0
    device = ddp.device
    samples = [s for g in groups for s in g]
    adv = group_advantages(torch.tensor([[s["reward"] for s in g] for g in groups])) if groups else torch.zeros(0, 0)
    if args.balance_answers:   # a collective: every rank calls it, with groups or without
        adv = balance_answers(adv, [g[0]["prompt"]["answer"] for g in groups])
    for s, a in zip(samples, adv.flatten().tolist()):
        s["adv"] = a
    fill = [[dict(s, adv=0.0, old_logp=s["rollout_logp"], ref_logp=None) for s in row]
            for row in policy.micro_batches(filler or samples, args.micro_batch, args.micro_tokens)[0]]
    per_update = max(1, args.global_batch * args.group_size // ddp.world)  # sequences per rank per update
    chunks = [policy.micro_batches(samples[u:u + per_update], args.micro_batch, args.micro_tokens)
              for u in range(0, len(samples), per_update)]
    mbs = [mb for c in chunks for mb in c]
    with torch.no_grad():  # old (and reference) log-probs, same micro-batches as training
        for j in range(policy.global_max(len(mbs))):
            packed = policy.pack(mbs[j] if j < len(mbs) else fill, pad, device)
            old = policy.token_logprobs(model, packed, args.temperature)[0] if args.old_logp == "recompute" else None
            ref = policy.token_logprobs(ref_model, packed, args.temperature)[0] if ref_model is not None else None
            if j >= len(mbs):
                continue
            for b, s in enumerate(s for row in mbs[j] for s in row):
                n = len(s["completion"])
                s["old_logp"] = old[b, :n].cpu() if old is not None else s["rollout_logp"]
                s["ref_logp"] = ref[b, :n].cpu() if ref is not None else None
    stats = dict(clip_frac=0.0, ratio_sum=0.0, tokens=0.0, entropy_sum=0.0, updates=0, grad_norm=0.0)
    t0 = time.time()
    for u in range(policy.global_max(len(chunks))):
        chunk_mbs = chunks[u] if u < len(chunks) else []
        num_tokens = parallel.all_reduce(torch.tensor(float(sum(
            0 if args.mask_truncated and s["truncated"] else len(s["completion"])
            for mb in chunk_mbs for row in mb for s in row)))).item()
        opt.zero_grad(set_to_none=True)
        for i in range(policy.global_max(len(chunk_mbs))):
            real = i < len(chunk_mbs)
            packed = policy.pack(chunk_mbs[i] if real else fill, pad, device)
            mb = [s for row in (chunk_mbs[i] if real else fill) for s in row]
            T = packed.T
            cmask = torch.zeros(len(mb), T, device=device)
            old = torch.zeros_like(cmask)
            ref = torch.zeros_like(cmask) if args.kl_coef > 0 else None
            for b, s in enumerate(mb):
                n = len(s["completion"])
                cmask[b, :n] = 0.0 if (args.mask_truncated and s["truncated"]) or not real else 1.0  # filler: zero gradient
                old[b, :n] = s["old_logp"]
                if ref is not None and s.get("ref_logp") is not None:
                    ref[b, :n] = s["ref_logp"]
            a = torch.tensor([s["adv"] for s in mb], device=device)
            logp, ent = policy.token_logprobs(model, packed, args.temperature, with_entropy=True)
            # world * (sum / global tokens): gradients are averaged across ranks afterwards
            loss, st = dapo_loss(logp, old, a, cmask, args.clip_low, args.clip_high,
                                 max(num_tokens, 1.0) / ddp.world, ref, args.kl_coef, args.clip_dual)
            loss.backward()
            for k in ("clip_frac", "ratio_sum", "tokens"):
                stats[k] += st[k]
            stats["entropy_sum"] += (ent * cmask).sum().item()
        if not parallel.is_fsdp(model):  # FSDP2 reduce-scatters the gradients in backward (in fp32)
            parallel.all_reduce_grads(params)
        stats["grad_norm"] += clipped_step(opt, params, args.grad_clip)
        stats["updates"] += 1
    stats["train_s"] = time.time() - t0
    return stats


def clipped_step(opt, params, max_norm: float) -> float:
    """Clip the gradient norm, then step, unless the norm is not finite (EasyR1: the step is skipped,
    the weights stay as they are). Returns the norm before clipping."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    if math.isfinite(gnorm):
        opt.step()
    else:
        parallel.print0(f"[04] gradient norm {gnorm}: optimizer step skipped")
    return gnorm


# ---------------------------------------------------------------------------------------------
# Validation, and the stage's main flow
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(model, processor, val: list[dict], args, ddp) -> dict:
    """Greedy accuracy (05's first trial) on the held-out attacks and clean scenes, over all ranks;
    val_score is their mean (round 0: the clean accuracy)."""
    mine = val[ddp.rank::ddp.world]
    model.eval()
    with parallel.gathered_for_generation(model), policy.compute_dtype(model):
        texts = common.defender_generate(model, processor, [p["image"] for p in mine],
                                         [common.defender_prompt(p["question"], p["options"]) for p in mine],
                                         args.max_new_tokens, batch_size=args.gen_batch or 16,
                                         memory_gb=args.gen_memory_gb)
    model.train()
    right = [common.extract_answer(t, p["options"]) == p["answer"] for t, p in zip(texts, mine)]
    c = parallel.sum_dict({f"{k}_{src}": sum(r if k == "right" else 1 for r, p in zip(right, mine) if p["source"] == src)
                           for k in ("right", "n") for src in ("attack", "clean")})
    row = dict(val_attack_acc=100 * c["right_attack"] / c["n_attack"] if c["n_attack"] else None,
               val_clean_acc=100 * c["right_clean"] / c["n_clean"] if c["n_clean"] else None)
    parts = [v for v in row.values() if v is not None]
    return dict(row, val_score=sum(parts) / len(parts) if parts else None)


def round_schedule(args):
    """--rollout_batch / --epochs / --mini_rollout_batch at 0: the authors' values for this round."""
    rollout_batch, epochs, mini = ROUND_SCHEDULE[min(args.round, max(ROUND_SCHEDULE))]
    if not args.rollout_batch:   # the authors' mini-rollout batch goes with their rollout batch
        args.mini_rollout_batch = args.mini_rollout_batch or mini
    args.rollout_batch, args.epochs = args.rollout_batch or rollout_batch, args.epochs or epochs
    args.mini_rollout_batch = args.mini_rollout_batch or args.rollout_batch


def main(args: Args):
    common.quiet()
    ddp = parallel.setup_distributed()
    run = Path(args.run_dir)
    out, best_dir = run / "defender" / f"round_{args.round}", run / "defender" / f".best_round_{args.round}"
    if out.exists():
        parallel.print0(f"[04] {out} exists: nothing to do")
        return
    if args.select not in ("last", "best_val"):
        raise SystemExit(f"[04] --select must be 'last' or 'best_val', not {args.select!r}")
    torch.manual_seed(args.seed + ddp.rank)
    random.seed(args.seed + ddp.rank)
    init = args.init or (args.model if args.round == 0 else str(run / "defender" / f"round_{args.round - 1}"))
    if args.round > 0 and not args.init and not Path(init).exists():
        raise SystemExit(f"[04] round {args.round} starts from {init}, which does not exist (run round {args.round - 1})")
    round_schedule(args)
    model, processor, params = policy.setup_model(args, ddp, init)
    ref_model = common.load_defender(init, ddp.device, common.resolve_dtype(args.dtype, ddp.device))[0] \
        if args.kl_coef > 0 else None
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    pool, val = load_prompt_pool(args, run)
    stream = PromptStream(pool, ddp.rank, ddp.world, args.seed)
    probe = probe_scenes(run) if args.probe_every else []
    probe = probe[:len(probe) // ddp.world * ddp.world][ddp.rank::ddp.world]   # equal shares: lock-step forwards
    per_rank, steps = max(1, args.rollout_batch // ddp.world), step_count(args, len(pool))
    ckpt_dir = run / "defender" / f".ckpt_round_{args.round}"
    logger = rundir.JsonlLogger(run / "logs" / f"04_round_{args.round}.jsonl", ddp.master, args.report_to, vars(args))
    start, best = 0, dict(step=None, val_score=None)   # best: the best validated step so far (--select best_val)
    if resumed := rundir.load_checkpoint(ckpt_dir, model, opt, ddp.rank):   # model, optimizer, RNG, data position
        start, extra = resumed
        stream.epoch, stream.pos = extra["stream"]
        stream._order()
        best = extra.get("best", best)
        logger.resume(lambda row: row["step"] <= start, start)
        parallel.print0(f"[04] resumed from {ckpt_dir} at step {start}")
    elif val or probe:   # before training, as the authors' val_before_train
        logger.log(dict(step=0, **(validate(model, processor, val, args, ddp) if val else {}),
                        **(dict(answer_margin=policy.answer_margin(model, processor, probe, args)) if probe else {})))
    parallel.print0(f"[04] round {args.round}: init {init}, {len(pool)} prompts "
                    f"({sum(p['source'] == 'attack' for p in pool)} attacked), {len(val)} held out for validation, "
                    f"{steps} steps x {args.rollout_batch} prompts x {args.group_size} answers, updates of "
                    f"{args.global_batch} prompts, world {ddp.world}, {sum(p.numel() for p in params) / 1e6:.1f}M "
                    f"trainable params; {policy.precision_summary(model, args, ddp)}")

    for step in common.progress(range(start, steps), initial=start, total=steps, desc="[04] steps"):
        t0 = time.time()
        model.eval()
        groups, g = collect_groups(model, processor, stream, per_rank, args)
        model.train()
        st = train_on_groups(model, params, opt, groups, args, ddp, ref_model, g["filler"])
        row = policy.step_row(step + 1, groups, g, st, time.time() - t0, ddp)
        if val and (step + 1 == steps or args.val_every and (step + 1) % args.val_every == 0):
            row.update(validate(model, processor, val, args, ddp))
            if args.select == "best_val" and (best["val_score"] is None or row["val_score"] > best["val_score"]):
                best = dict(step=step + 1, val_score=row["val_score"])
                policy.save_final(model, best_dir, ddp, args, init, selected=dict(select="best_val", **best, of_steps=steps))
        if probe and (step + 1) % args.probe_every == 0:
            row["answer_margin"] = policy.answer_margin(model, processor, probe, args)
        logger.log(row)
        policy.print_step(step + 1, steps, row, g)
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            rundir.save_checkpoint(ckpt_dir, step + 1, model, opt, dict(stream=[stream.epoch, stream.pos], best=best),
                                   ddp.rank)
    if args.select == "best_val" and best["step"] is not None and best_dir.exists():
        if ddp.master:
            rundir.commit_dir(best_dir, out)
        parallel.barrier()
    else:
        policy.save_final(model, out, ddp, args, init, selected=dict(select="last", step=steps, of_steps=steps))
    logger.close()
    if ddp.master:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(best_dir, ignore_errors=True)
        print(f"[04] wrote {out}: step {best['step'] or steps if args.select == 'best_val' else steps} of {steps} "
              f"(--select {args.select})")
    parallel.cleanup_distributed()


if __name__ == "__main__":
    main(rundir.parse_args(Args, PRESETS))
