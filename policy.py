"""The defender as a DAPO policy on GPUs, the machinery 04_train_defender.py calls (each piece once):
  sample_groups / rollout   n answers per prompt, the prompt prefilled once and its KV cache copied n times
                            (the prefix caching vLLM gives verl / EasyR1), log-probs kept per token
  pack / token_logprobs     a group's answers behind one copy of its prompt (a 4D mask keeps them apart), the
                            log-probs of each [prompt | answer] alone, logits only at the completion positions
  micro_batches             rows within --micro_batch sequences and --micro_tokens padded tokens
  balance_groups            every rank trains on its share of the kept groups (dynamic sampling under torchrun)
  setup_model / save_final  fp32 master weights with bf16 compute (FSDP2 under torchrun, autocast in one process)
None of it changes what the algorithm computes (tested against the plain forms); it makes it fit and run fast.
Memory at paper size (bench/paper_scale.py): a generate call holds as many sequences as
--gen_memory_gb allows (KV cache + prefill working set, from the model config; --gen_batch caps the
prompts), the sampler's log-probs are kept per token, not as (B, T, vocab) logits; training
micro-batches hold at most --micro_tokens padded tokens (verl's ppo_max_token_len_per_gpu; a row then
holds fewer of a group's answers, one at the longest) and only the completion positions get logits;
gradient checkpointing is on by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

import common
import parallel
import rundir


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling's support: zero every token outside the smallest set whose mass reaches
    top_p (the most likely token always stays), as generate's TopPLogitsWarper."""
    if top_p >= 1.0:
        return probs
    p, idx = probs.sort(-1, descending=True)
    drop = p.cumsum(-1) - p >= top_p         # the mass before this token already reaches top_p
    return probs.scatter(-1, idx, p.masked_fill(drop, 0.0))


@torch.no_grad()
def sample_groups(model, inputs: dict, n: int, args, eos: torch.Tensor, pad_id: int):
    """n answers per prompt, each prompt prefilled once: its KV cache is copied n times and the
    copies decoded together (the prefix caching vLLM gives verl / EasyR1 for their n samples).
    generate() would prefill n copies of the prompt, image included: 70% of 04's rollout time in
    the tiny world. Sampling is generate(do_sample, temperature, top_p, top_k=0) with the media
    tokens suppressed; the log-prob of each sampled token under logits / T is kept (B x T floats,
    not the (B, T, vocab) logits). Positions are Qwen2.5-VL's 3D RoPE ones, from get_rope_index for
    the prompt and +1 per decoded token after its largest, so the training forward on [prompt | answer]
    recomputes the same log-probs (tested, left padding included). Returns (B*n, T) ids (pad after
    EOS) and their log-probs."""
    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0: GRPO / DAPO sample their groups")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=mask)
    out = model(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1].repeat_interleave(n, 0)
    cache.batch_repeat_interleave(n)
    mask = mask.repeat_interleave(n, 0)
    after = pos.amax(dim=(0, 2)).repeat_interleave(n, 0) + 1     # each answer's first position: its prompt's last + 1
    B = mask.shape[0]
    suppress = media_token_ids(model)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    toks, logps = [], []
    for t in range(args.max_new_tokens):
        scores = logits.float()
        scores[:, suppress] = -float("inf")
        logp = torch.log_softmax(scores / args.temperature, -1)
        tok = torch.multinomial(top_p_filter(logp.exp(), args.top_p), 1)[:, 0]
        tok = tok.masked_fill(done, pad_id)
        toks.append(tok)
        logps.append(logp.gather(-1, tok[:, None])[:, 0])
        done |= torch.isin(tok, eos)
        if bool(done.all()) or t + 1 == args.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        step_pos = (after + t).view(1, B, 1).expand(3, B, 1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return torch.stack(toks, 1), torch.stack(logps, 1)


@torch.no_grad()
def rollout(model, processor, prompts: list[dict], args) -> list[dict]:
    """One sample per (prompt, answer): unpadded prompt ids / image tensors, completion ids up to
    and including EOS, the sampler's log-probs, the decoded text."""
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    eos_t = torch.tensor(sorted(eos), device=model.device)
    samples = []
    calls = common.memory_batches(model, processor, [p["image"] for p in prompts],
                                  [common.defender_prompt(p["question"], p["options"]) for p in prompts],
                                  args.max_new_tokens, args.gen_memory_gb, args.gen_batch, repeat=args.group_size)
    for call in common.progress(calls, desc="[04] rollout", leave=False):
        inputs = common.defender_inputs(processor, [p["image"] for p in prompts[call]],
                                        [common.defender_prompt(p["question"], p["options"]) for p in prompts[call]],
                                        model.device)
        with parallel.gathered_for_generation(model), compute_dtype(model):
            comp, logp = sample_groups(model, inputs, args.group_size, args, eos_t, tok.pad_token_id)
        for b, shared in enumerate(prompt_parts(inputs, prompts[call])):
            for r in range(b * args.group_size, (b + 1) * args.group_size):
                ids = comp[r].tolist()
                end = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
                samples.append(dict(shared, completion=comp[r, :end].cpu(), rollout_logp=logp[r, :end].cpu(),
                                    truncated=end == len(ids) and ids[-1] not in eos,
                                    text=tok.decode(ids[:end], skip_special_tokens=True)))
    return samples


def prompt_parts(inputs: dict, prompts: list[dict]) -> list[dict]:
    """Each prompt of a padded batch on its own, unpadded, on the CPU: what ``pack`` puts before its answers."""
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    offsets = [0] + list(torch.tensor(patches).cumsum(0).tolist())
    parts = []
    for b, p in enumerate(prompts):
        keep = inputs["attention_mask"][b].bool()
        parts.append(dict(prompt=p, prompt_ids=inputs["input_ids"][b][keep].cpu(),
                          mm_types=inputs["mm_token_type_ids"][b][keep].cpu(),
                          pixel_values=inputs["pixel_values"][offsets[b]:offsets[b + 1]].cpu(),
                          grid=inputs["image_grid_thw"][b:b + 1].cpu()))
    return parts


def media_token_ids(model) -> list[int]:
    """<|image_pad|> / <|video_pad|>: never sampled (the model would look for image features)."""
    return [model.config.image_token_id, model.config.video_token_id]


class Packed(NamedTuple):
    batch: dict               # the model's inputs, with a 4D attention mask
    prompt_mask: torch.Tensor  # (R, P): the real prompt tokens (left padding excluded)
    P: int                    # prompt positions
    k: int                    # answer slots per row
    T: int                    # positions per slot (the longest completion)
    slots: torch.Tensor       # sample i sits in slot slots[i] (row * k + j)


def pack(rows: list[list[dict]], pad_id: int, device) -> Packed:
    """A micro-batch of rows (``micro_batches``), each one copy of a prompt and k of its answers:
    [pad.. prompt | answer 1 ..pad | ... | answer k ..pad], slots of the longest completion T. An answer
    sees the prompt and itself only, at the positions it was sampled at, so its log-probs are those of
    [prompt | answer] alone (tested); the tiny world's 136-token prompts with 16 answers of ~5 tokens cost
    10x fewer tokens."""
    P = max(len(r[0]["prompt_ids"]) for r in rows)
    T = max(len(s["completion"]) for r in rows for s in r)
    k = max(len(r) for r in rows)
    R, L = len(rows), P + k * T
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    real = torch.zeros(R, L, dtype=torch.bool)
    mm = torch.zeros(R, L, dtype=torch.int)
    slots = []
    for r, row in enumerate(rows):
        n = len(row[0]["prompt_ids"])
        ids[r, P - n:P], mm[r, P - n:P], real[r, P - n:P] = row[0]["prompt_ids"], row[0]["mm_types"], True
        for j, s in enumerate(row):
            a, m = P + j * T, len(s["completion"])
            ids[r, a:a + m], real[r, a:a + m] = s["completion"], True
            slots.append(r * k + j)
    seg = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, k + 1).repeat_interleave(T)])   # 0 = prompt
    pos = torch.arange(L)
    see = (pos[None, :] <= pos[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))    # (L, L)
    mask = (real[:, None, :] & see[None]) | torch.eye(L, dtype=torch.bool)[None]   # a pad query sees itself: no NaN
    batch = dict(input_ids=ids, attention_mask=mask[:, None], mm_token_type_ids=mm,
                 pixel_values=torch.cat([r[0]["pixel_values"] for r in rows]),
                 image_grid_thw=torch.cat([r[0]["grid"] for r in rows]))
    return Packed({k_: v.to(device) for k_, v in batch.items()}, real[:, :P].long().to(device), P, k, T,
                  torch.tensor(slots))


def token_logprobs(model, packed, temperature, with_entropy=False):
    """Log-probs (N, T) of the N completions of a ``pack``ed micro-batch (logits / temperature), in the
    micro-batch's order, and optionally their per-token entropies."""
    batch, prompt_mask, P, k, T, slots = packed
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise SystemExit(f"[04] packed groups need a 4D attention mask: sdpa or eager attention, not {impl}")
    mask = batch["attention_mask"]
    if impl == "eager":                     # additive, as eager attention adds it to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    R = batch["input_ids"].shape[0]
    pos, _ = model.model.get_rope_index(batch["input_ids"][:, :P], batch["mm_token_type_ids"][:, :P],
                                        image_grid_thw=batch["image_grid_thw"], attention_mask=prompt_mask)
    t = torch.arange(T, device=pos.device)  # every slot continues from its prompt's largest position, as sampled
    after = (pos.amax(dim=(0, 2))[:, None] + 1 + t).repeat(1, k)                   # (R, k T)
    pos = torch.cat([pos, after[None].expand(3, R, k * T)], 2)
    # the logits that predict slot j's tokens: the prompt's last position, then the slot's own
    keep = torch.cat([torch.full((k, 1), P - 1), P + torch.arange(k)[:, None] * T + torch.arange(T - 1)], 1)
    with compute_dtype(model):
        logits = model(**dict(batch, attention_mask=mask), position_ids=pos, use_cache=False,
                       logits_to_keep=keep.flatten().to(pos.device)).logits.float() / temperature
    logits = logits.view(R * k, T, -1)[slots.to(logits.device)]
    logits[..., media_token_ids(model)] = -float("inf")  # as suppressed at sampling time
    targets = batch["input_ids"][:, P:].reshape(R * k, T)[slots.to(logits.device)]
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    ent = torch.special.entr(logp_all.exp()).sum(-1).detach() if with_entropy else None  # 0 where p = 0
    return logp, ent


def balance_groups(kept: list, per_rank: int) -> list:
    """Each rank's kept groups -> per_rank groups on every rank while the ranks together hold enough:
    a rank keeps up to per_rank of its own, the surplus of the others fills the ranks short of their
    share (in rank order), the rest is cut. With too few in all, the short ranks share what surplus there is."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return kept[:per_rank]
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    counts = [None] * world
    torch.distributed.all_gather_object(counts, len(kept))
    short = [max(0, per_rank - c) for c in counts]
    if sum(short) == 0 or sum(max(0, c - per_rank) for c in counts) == 0:
        return kept[:per_rank]
    surplus = [None] * world
    torch.distributed.all_gather_object(surplus, [[_portable(s) for s in g] for g in kept[per_rank:]])
    pool = [g for r in range(world) for g in surplus[r]]
    start = sum(short[:rank])
    return kept[:per_rank] + pool[start:start + short[rank]]


def _portable(sample: dict) -> dict:
    """A sample that can travel to another rank: its tensors on the CPU."""
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


def global_max(n: int) -> int:
    """The largest n over the ranks (ranks run as many forwards as the busiest one)."""
    return int(parallel.all_reduce(torch.tensor(float(n)), op="max").item())


def micro_batches(samples: list[dict], max_seqs: int, max_tokens: int) -> list[list[list[dict]]]:
    """Consecutive samples as micro-batches of rows (``pack``): a row holds answers to one prompt (the
    samples of a rollout group share its prompt tensors); a micro-batch at most max_seqs answers and, when
    max_tokens > 0, at most max_tokens padded tokens: rows x (longest prompt + answers per row x longest
    completion), verl's ppo_max_token_len_per_gpu. Never empty: a sample over the budget goes alone."""
    def fits(rows):
        P = max(len(r[0]["prompt_ids"]) for r in rows)
        T = max(len(s["completion"]) for r in rows for s in r)
        return sum(map(len, rows)) <= max_seqs and not (max_tokens and len(rows) * (P + max(map(len, rows)) * T) > max_tokens)
    out, cur = [], []
    for s in samples:
        if cur and cur[-1][0]["prompt_ids"] is s["prompt_ids"] and fits(cur[:-1] + [cur[-1] + [s]]):
            cur[-1].append(s)
        elif cur and fits(cur + [[s]]):
            cur.append([s])
        else:
            out += [cur] if cur else []
            cur = [[s]]
    return out + ([cur] if cur else [])


def setup_model(args, ddp, init):
    """Full-parameter: fp32 master weights (the update at lr 1e-6 is below bf16's resolution), bf16
    compute: FSDP2 with MixedPrecisionPolicy(bf16, reduce fp32) under torchrun, on GPU and on CPU
    alike (verl / EasyR1's setting), torch.autocast in one process (accelerate / TRL's).
    LoRA: the frozen base in --dtype, the adapter in fp32."""
    dtype = common.resolve_dtype(args.dtype, ddp.device)
    full = args.lora_rank == 0
    model, processor = common.load_defender(init, ddp.device, dtype=torch.float32 if full else dtype,
                                            min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if not full:
        from peft import LoraConfig, get_peft_model
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules=targets))
        common.lora_parameters(model)
    else:
        model.requires_grad_(True)
        if not args.train_vision:
            model.model.visual.requires_grad_(False)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if full and ddp.world > 1:   # fp32 shards (the optimizer's), bf16 gathered for compute
        parallel.shard_vl(model, processor.tokenizer.pad_token_id, param_dtype=dtype)
    elif full and dtype != torch.float32:
        model._autocast_dtype = dtype
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, processor, params


def precision_summary(model, args, ddp) -> str:
    dt = {torch.bfloat16: "bf16", torch.float32: "fp32"}[common.resolve_dtype(args.dtype, ddp.device)]
    if args.lora_rank > 0:
        return f"LoRA r{args.lora_rank}: fp32 adapter on a frozen {dt} base"
    if parallel.is_fsdp(model):
        return f"FSDP2 over {ddp.world} ranks, MixedPrecisionPolicy({dt} params, fp32 reduce), fp32 master weights"
    return f"one process, fp32 master weights, {'torch.autocast(bf16)' if dt == 'bf16' else 'fp32 compute'}"


def compute_dtype(model):
    """bf16 autocast around the forward of a one-process fp32 model; FSDP2 casts by itself."""
    from contextlib import nullcontext
    dt = getattr(model, "_autocast_dtype", None)
    return torch.autocast(model.device.type, dtype=dt) if dt else nullcontext()


def save_final(model, out: Path, ddp, args, init: str, selected: dict | None = None):
    """A save_pretrained directory in fp32 (a round's total change is often below bf16's resolution),
    with the processor of the model it started from: training's pixel limits (--min/max_pixels) are not
    saved, so every round is evaluated with the base model's limits, as the authors evaluate. args.json
    records which step it is (``selected``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ddp.master:
        tmp = rundir.tmp_dir_for(out)
        if args.lora_rank > 0:   # a copy: training may go on after a best-so-far save
            import copy
            copy.deepcopy(model).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        common.load_processor(init).save_pretrained(tmp)
        rundir.save_args(args, tmp, selected=selected)
        rundir.commit_dir(tmp, out)
    parallel.barrier()


# ---------------------------------------------------------------------------------------------
# A step's log row (summed over ranks), and a probe of the defender's answer prior
# ---------------------------------------------------------------------------------------------
def step_row(step: int, groups: list, g: dict, st: dict, step_s: float, ddp) -> dict:
    """One log row, summed over ranks. gen_*: every answer generated this step; reward, accuracy, response_len,
    clip_frac, ratio_mean, entropy: the kept (trained) ones only, None when none was kept. kept_by: kept groups
    by source and right answer ("attack/B"); adv_by_answer: the advantage summed over the kept answers that
    chose each option (where the update pushes the answer prior: a letter's total > 0 makes it likelier)."""
    samples = [s for grp in groups for s in grp]
    t = parallel.sum_dict(dict(
        reward=sum(s["reward"] for s in samples), correct=sum(s["accuracy"] > 0 for s in samples), n=len(samples),
        groups=len(groups), seen=g["groups_seen"], length=sum(len(s["completion"]) for s in samples),
        gen_tokens=g["gen_tokens"], tokens=st["tokens"], clip=st["clip_frac"], ratio=st["ratio_sum"],
        entropy=st["entropy_sum"], overlong=sum(s["overlong"] for s in samples), gen_samples=g["gen_samples"],
        gen_correct=g["gen_correct"], gen_reward=g["gen_reward"]))
    kept_by, adv_by = {}, {}
    for grp in groups:
        p = grp[0]["prompt"]
        key = f"{p.get('source', 'clean')}/{p['answer']}"
        kept_by[key] = kept_by.get(key, 0) + 1
        for s in grp:
            chosen = common.extract_answer(s["text"], p["options"]) or "none"
            adv_by[chosen] = adv_by.get(chosen, 0.0) + s.get("adv", 0.0)
    n, tok, n_gen = t["n"], t["tokens"], max(t["gen_samples"], 1)

    def kept(x, d):
        return x / d if d > 0 else None
    return dict(step=step, gen_samples=int(t["gen_samples"]), gen_reward=t["gen_reward"] / n_gen,
                gen_accuracy=t["gen_correct"] / n_gen, gen_response_len=t["gen_tokens"] / n_gen,
                kept_group_frac=t["groups"] / max(t["seen"], 1), kept_samples=int(n), reward=kept(t["reward"], n),
                accuracy=kept(t["correct"], n), response_len=kept(t["length"], n), overlong=kept(t["overlong"], n),
                clip_frac=kept(t["clip"], tok), ratio_mean=kept(t["ratio"], tok), entropy=kept(t["entropy"], tok),
                grad_norm=st["grad_norm"], tries=g["tries"], gen_tok_per_s=t["gen_tokens"] / max(g["gen_s"], 1e-9),
                train_tok_per_s=tok / max(st["train_s"], 1e-9), step_s=step_s,
                peak_mem_gb=parallel.peak_memory_gb(ddp.device), kept_by=parallel.merge_counts(kept_by),
                adv_by_answer={k: round(v, 4) for k, v in parallel.merge_counts(adv_by).items()})


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)   # None: nothing was kept this step


def print_step(step, steps, row, g):
    parallel.print0(f"[04] step {step}/{steps} generated: reward {row['gen_reward']:.3f} acc "
                    f"{row['gen_accuracy']:.3f} len {row['gen_response_len']:.1f} | kept {row['kept_group_frac']:.2f} "
                    f"({g['tries']} tries): reward {fmt(row['reward'], '.3f')} acc {fmt(row['accuracy'], '.3f')} len "
                    f"{fmt(row['response_len'], '.1f')} clip {fmt(row['clip_frac'], '.3f')} "
                    f"ent {fmt(row['entropy'], '.3f')} | gen {row['gen_tok_per_s']:.0f} tok/s "
                    f"train {row['train_tok_per_s']:.0f} tok/s {row['step_s']:.1f}s mem {row['peak_mem_gb']:.1f}GB")
    if "val_score" in row:
        parallel.print0(f"[04] step {step} validation: attacked {fmt(row['val_attack_acc'], '.1f')} clean "
                        f"{fmt(row['val_clean_acc'], '.1f')}")
    if "answer_margin" in row:
        parallel.print0(f"[04] step {step} answer prior: log P(B) - log P(A) {row['answer_margin']:+.3f}")


@torch.no_grad()
def answer_margin(model, processor, prompts: list[dict], args, first: str = "A", second: str = "B") -> float:
    """Mean log P("\\boxed{second}") - log P("\\boxed{first}") (each with its end token, teacher-forced at
    temperature 1) over ``prompts``, this rank's share of a fixed probe set (equal shares: the ranks' forwards
    run in lock-step). A prior that drifts towards one letter whatever the scene shows here."""
    tok = processor.tokenizer
    completions = [torch.tensor(tok(f"\\boxed{{{x}}}<|im_end|>")["input_ids"]) for x in (first, second)]
    inputs = common.defender_inputs(processor, [p["image"] for p in prompts],
                                    [common.defender_prompt(p["question"], p["options"]) for p in prompts], "cpu")
    samples = [dict(part, completion=c) for part in prompt_parts(inputs, prompts) for c in completions]
    mbs = micro_batches(samples, args.micro_batch, args.micro_tokens)
    pad = model.generation_config.pad_token_id or 0
    sums = []
    model.eval()
    for j in range(global_max(len(mbs))):          # a rank with fewer micro-batches repeats its last one
        mb = mbs[min(j, len(mbs) - 1)]
        lp = token_logprobs(model, pack(mb, pad, model.device), 1.0)[0]
        if j < len(mbs):
            sums += [lp[b, :len(s["completion"])].sum().item() for b, s in enumerate(s for row in mb for s in row)]
    model.train()
    d = torch.tensor(sums).view(len(prompts), 2)
    total = parallel.all_reduce(torch.tensor([float((d[:, 1] - d[:, 0]).sum()), float(len(prompts))]))
    return float(total[0] / total[1])
