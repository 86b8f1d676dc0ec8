"""The paper's own path, on CPU: bf16 compute with fp32 trainable weights, FSDP2 under torchrun
(gloo, the code path of 8 GPUs), torch.distributed.checkpoint and bit-identical resume."""
import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script
from helpers import assert_resumed_log, checkpoint_step, kill_when_exists, run_stage, same_safetensors, start_stage
from PIL import Image
from safetensors.torch import load_file

import common
import editing
import policy

s02 = load_script("02_sft_attacker.py")
s04 = load_script("04_train_defender.py")
ADAM_EPS = 1e-8   # a weight whose |grad| is below AdamW's eps moves by < lr * |g| / eps: "no gradient"


def moved_fraction(params, before) -> float:
    """Share of the weights with |grad| > eps that an optimizer step changed."""
    got = moved = 0
    for p, b in zip(params, before):
        if p.grad is None:
            continue
        m = p.grad.abs() > ADAM_EPS
        got += int(m.sum())
        moved += int(((p.detach() != b) & m).sum())
    assert got > 0
    return moved / got


# --------------------------------------------------------------------------- (c) LoRA stages
def test_lora_is_fp32_on_a_bf16_base_and_its_update_survives(tmp_path):
    """02 and 03 load the attacker in --dtype and train an fp32 adapter (flow_grpo's setting)."""
    torch.manual_seed(0)
    pipe = editing.load_attacker("tiny", dtype=torch.bfloat16)
    params = editing.add_attacker_lora(pipe, rank=4, alpha=8)              # 02, and 03 without an adapter
    base = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert pipe.transformer.dtype == torch.bfloat16                      # compute dtype seen by the stages
    with torch.no_grad():   # an adapter part-way through training (B = 0 would make any update visible)
        for p in params:
            p.normal_(0, 0.05)
    img = Image.new("RGB", (64, 64), (90, 120, 30))
    ctx = editing.encode_edit(pipe, [img], ["add a cup"], 64, negative_prompt=None)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 64, generator=g)
    loss = s02.sft_loss(pipe.transformer, ctx, x0, torch.tensor([0.5]), torch.randn(1, 16, 64, generator=g))
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in params if p.grad is not None)  # the last block's text
    assert sum(p.grad is not None for p in params) > len(params) / 2               # stream gets none
    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4).step()        # 02's lr: below bf16's resolution at 0.05
    assert moved_fraction(params, before) >= 0.99
    # 03 continues a saved adapter: loaded trainable, still fp32
    editing.save_attacker_lora(pipe, tmp_path)
    pipe2 = editing.load_attacker("tiny", dtype=torch.bfloat16)
    params2 = editing.load_attacker_lora(pipe2, tmp_path, trainable=True)
    assert len(params2) == len(params) and all(p.dtype == torch.float32 for p in params2)
    assert all(torch.equal(a, b) for a, b in zip(params2, params))


# --------------------------------------------------------------------------- (a), (b) defender in bf16
def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [dict(image=Image.new("RGB", (rng.choice([56, 84, 112]), 56), tuple(rng.randrange(256) for _ in range(3))),
                 question="Is the red circle left of the blue square?" + " really" * rng.randrange(4),
                 options=[] if i % 2 else ["left", "right"], answer="Yes" if i % 2 else "A") for i in range(n)]


def _args(dtype):
    return SimpleNamespace(dtype=dtype, lora_rank=0, train_vision=True, grad_ckpt=False, min_pixels=28 * 28 * 4,
                           max_pixels=28 * 28 * 16, group_size=4, gen_batch=8, gen_memory_gb=32.0, micro_tokens=0,
                           temperature=1.0, top_p=1.0, balance_answers=False,
                           max_new_tokens=6, micro_batch=8, overlong_cache=0, old_logp="recompute", clip_low=0.2,
                           clip_high=0.28, clip_dual=3.0, kl_coef=0.0, mask_truncated=False, global_batch=4, grad_clip=1.0)


def _sampler_vs_recomputed(model, proc, args):
    """Max |log-prob of the sampler - log-prob of a fresh forward| over every sampled token."""
    model.eval()
    samples = policy.rollout(model, proc, _prompts(4, seed=1), args)
    worst = 0.0
    for mb in policy.micro_batches(samples, 8, 0):
        with torch.no_grad():
            logp, _ = policy.token_logprobs(model, policy.pack(mb, 0, "cpu"), 1.0)
        for b, s in enumerate(s for row in mb for s in row):
            worst = max(worst, (logp[b, :len(s["completion"])] - s["rollout_logp"]).abs().max().item())
    return worst


def test_04_bf16_update_moves_fp32_master_weights_and_first_ratio_is_one():
    """(a) one AdamW step at the paper's lr 1e-6 moves >= 99% of the weights that got a gradient (with
    AdamW applied to bf16 weights, the old path, 2.4% moved: the step is below bf16's resolution);
    (b) the first on-policy ratio is 1 (old log-probs recomputed by the same bf16 forward: exact on
    CPU, tested to 1e-6); the sampler's own bf16 log-probs agree with a forward to 1e-2 per token
    (measured: max 1.0e-3, mean 8e-5; fp32: 5e-7)."""
    torch.manual_seed(0)
    ddp = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    args = _args("bf16")
    model, proc, params = policy.setup_model(args, ddp, "tiny")
    assert all(p.dtype == torch.float32 for p in params) and model._autocast_dtype == torch.bfloat16
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2)
    model.eval()
    samples = policy.rollout(model, proc, _prompts(4), args)
    for i, s in enumerate(samples):
        s["reward"] = float(i % 2)   # every group mixed: every sample has a non-zero advantage
    groups = [samples[i:i + args.group_size] for i in range(0, len(samples), args.group_size)]
    before = [p.detach().clone() for p in params]
    model.train()
    st = s04.train_on_groups(model, params, opt, groups, args, ddp)
    assert st["updates"] == 1 and st["tokens"] == sum(len(s["completion"]) for s in samples)
    assert abs(st["ratio_sum"] / st["tokens"] - 1) < 1e-6 and st["clip_frac"] == 0
    assert moved_fraction(params, before) >= 0.99
    drift = _sampler_vs_recomputed(model, proc, args)
    assert 1e-5 < drift < 1e-2, drift    # > 1e-5: the compute really was bf16 (fp32 gives ~5e-7)


# --------------------------------------------------------------------------- (d) FSDP2, 2 processes
@pytest.mark.slow
def test_04_fsdp2_bf16_two_processes_checkpoint_kill_resume_is_bit_identical(tiny_run, boxed_defender, tmp_path):
    """torchrun --nproc_per_node 2, bf16 under FSDP2 over gloo: rollouts, updates, a DCP checkpoint
    written shard by shard, SIGKILL, resume: the final weights equal an uninterrupted run's bit for bit.
    Starts from the boxed-answer tiny defender (conftest) so that rewards differ within groups, and keeps
    every group (--dyn_low -1) so that every step takes an optimizer step."""
    flags = ["--preset", "tiny", "--round", "0", "--dtype", "bf16", "--max_steps", "4", "--save_every", "1",
             "--dyn_low", "-1", "--lr", "1e-6", "--max_tries", "1", "--rollout_batch", "16", "--global_batch", "8",
             "--init", boxed_defender]
    runs = {}
    for name in ("whole", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(tiny_run / "data", runs[name] / "data")
    p = run_stage("04_train_defender.py", *flags, "--run_dir", runs["whole"], nproc=2)
    assert "FSDP2" in p.stdout and "MixedPrecisionPolicy(bf16" in p.stdout, p.stdout[-2000:]
    ckpt = runs["killed"] / "defender" / ".ckpt_round_0"
    proc = start_stage("04_train_defender.py", *flags, "--run_dir", runs["killed"], nproc=2)
    assert kill_when_exists(proc, ckpt / "latest.json")
    assert not (runs["killed"] / "defender" / "round_0").exists(), "killed too late to test resume"
    shard = ckpt / json.loads((ckpt / "latest.json").read_text())["name"]
    assert sorted(f.name for f in shard.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert (shard / "rank_0.safetensors").is_file() and (shard / "rank_1.safetensors").is_file()
    at = checkpoint_step(ckpt)
    run_stage("04_train_defender.py", *flags, "--run_dir", runs["killed"], nproc=2)
    assert_resumed_log(runs["killed"] / "logs" / "04_round_0.jsonl", at)
    final = {k: v / "defender" / "round_0" / "model.safetensors" for k, v in runs.items()}
    assert same_safetensors(final["whole"], final["killed"]) == []
    assert not ckpt.exists()   # checkpoints are removed once the output is complete
    # the defender is saved in fp32, and most weights moved from the initial ones at lr 1e-6
    assert all(t.dtype == torch.float32 for t in load_file(str(final["whole"])).values())
    ref = common.load_defender(str(boxed_defender))[0].state_dict()
    trained = common.load_defender(str(final["whole"].parent))[0].state_dict()
    moved = sum(int((trained[k] != ref[k]).sum()) for k in trained)
    assert moved / sum(t.numel() for t in trained.values()) > 0.5, moved
    logs = [json.loads(x) for x in (runs["killed"] / "logs" / "04_round_0.jsonl").read_text().splitlines()]
    whole = {r["step"]: r for r in
             (json.loads(x) for x in (runs["whole"] / "logs" / "04_round_0.jsonl").read_text().splitlines())}
    assert [r["step"] for r in logs if "reward" not in r] == [0]   # step 0: validation before training only
    for r in logs:   # the same numbers step for step, before and after the kill (timings aside)
        for k in ("reward", "accuracy", "response_len", "ratio_mean", "clip_frac", "entropy", "grad_norm",
                  "val_attack_acc", "val_clean_acc"):
            assert r.get(k) == whole[r["step"]].get(k), (r["step"], k)
