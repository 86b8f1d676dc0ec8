"""Stages 02 + 03: the SDE step, log-prob recomputation, Flow-GRPO and SFT learning, stage runs."""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script
from datasets import load_from_disk
from helpers import assert_resumed_log, checkpoint_step, kill_when_exists, run_stage, same_safetensors, start_stage
from PIL import Image
from safetensors.torch import load_file

import editing

s02 = load_script("02_sft_attacker.py")
s03 = load_script("03_train_attacker.py")


def test_sde_step_noise0_is_scheduler_euler_step():
    pipe = editing.load_attacker("tiny")
    sigmas = editing.sigma_schedule(pipe.scheduler, 6, 16)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    for i in range(6):
        pipe.scheduler._step_index = i
        ref = pipe.scheduler.step(v, pipe.scheduler.timesteps[i], x, return_dict=False)[0]
        out, logp, mean = s03.sde_step(v, x, sigmas[i].item(), sigmas[i + 1].item(), 0.0, sigmas[1].item())
        assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(mean, ref, atol=1e-6)


def test_sde_step_logprob_is_gaussian_density():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, 4, generator=g)
    for s, s_next in [(1.0, 0.8), (0.5, 0.3)]:
        sigma_max = 0.8
        prev, logp, mean = s03.sde_step(v, x, s, s_next, 0.7, sigma_max, generator=g)
        dt = s_next - s
        std = 0.7 * math.sqrt(s / (1 - (sigma_max if s == 1 else s)))
        exp_mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        assert torch.allclose(mean, exp_mean, atol=1e-6)
        direct = torch.distributions.Normal(exp_mean, std * math.sqrt(-dt)).log_prob(prev).mean(dim=(1, 2))
        assert torch.allclose(logp, direct, atol=1e-5)
        # scoring a given sample gives the same number
        _, logp2, _ = s03.sde_step(v, x, s, s_next, 0.7, sigma_max, prev=prev)
        assert torch.allclose(logp2, logp)


def _args(**kw):
    base = dict(micro_batch=4, cfg=1.0, noise_level=1.0, clip_range=1e-4, kl_beta=0.0, grad_clip=1.0, sde_window=0,
                updates_per_iter=1)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_logprobs_match_rollout(dtype):
    """Also in bf16 (frozen transformer bf16, LoRA fp32): the update recomputes each log-prob from the
    rollout's own inputs with the same kernels, so the first ratio is 1 to 1e-5 (inside the 1e-4 clip)."""
    torch.manual_seed(0)
    pipe = editing.load_attacker("tiny", dtype=dtype)
    params = editing.add_attacker_lora(pipe, rank=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in params) and pipe.transformer.dtype == dtype
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    img = Image.new("RGB", (64, 64), (90, 120, 30))
    ctx = editing.encode_edit(pipe, [img, img], ["add a cup", "add a lamp"], 64).repeat(3)
    sig = editing.sigma_schedule(pipe.scheduler, 5, 16)
    steps = list(range(4))
    xs, logps, _ = s03.rollout(pipe, ctx, sig, steps, 1.0, 4.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for j in steps:
            v = editing.predict_velocity(pipe.transformer, xs[j], sig[j:j + 1], ctx, 4.0)
            _, lp, _ = s03.sde_step(v, xs[j], sig[j].item(), sig[j + 1].item(), 1.0, sig[1].item(), prev=xs[j + 1])
            assert torch.allclose(lp, logps[j], atol=1e-6, rtol=0)
    # and inside the update (micro-batched), the first on-policy ratio is 1 to 1e-5
    opt = torch.optim.AdamW(params, lr=0.0)
    st = s03.grpo_update(pipe, params, opt, ctx, sig, xs, logps, torch.randn(6), steps, _args(cfg=4.0, micro_batch=4))
    assert abs(st["ratio"] - 1) < 1e-5 and st["clip_frac"] == 0.0


def test_group_advantages_global_and_group_std():
    """flow_grpo's edit configs (global_std): reward - group mean, over the std of the whole batch (ddof 0)."""
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    sd = math.sqrt((1.0 + 4 * 0.25) / 8 - (3.0 / 8) ** 2)   # 0.3307: population std of all eight rewards
    a = s03.group_advantages(r, 4, clip=5.0)
    assert a[:4].tolist() == pytest.approx([-0.25 / (sd + 1e-4)] * 3 + [0.75 / (sd + 1e-4)], rel=1e-6)
    assert a[4:].tolist() == [0.0] * 4
    assert s03.group_advantages(r, 4, clip=1.0)[3].item() == pytest.approx(1.0)     # 2.27 clipped
    g = s03.group_advantages(r, 4, clip=5.0, std="group")                          # the group's own std
    assert g[:4].tolist() == pytest.approx([-0.25 / (math.sqrt(0.1875) + 1e-4)] * 3 + [0.75 / (math.sqrt(0.1875) + 1e-4)], rel=1e-6)
    # a group whose rewards differ by one sampled answer no longer gets the +-1.7 of a real success
    small = torch.tensor([0.0, 0.0, 0.0, 0.125, 0.0, 1.0, 1.0, 0.0])
    assert s03.group_advantages(small, 4, 5.0)[3] < 0.5 < s03.group_advantages(small, 4, 5.0, std="group")[3]


def test_condition_tokens_at_the_default_cond_resolution():
    """flow_grpo's trainer builds the condition at a 512 x 512 area: a 512-px scene's condition is 1,024
    tokens with 03's (and 02's) default, where the pipeline's 1 MP made it 4,096."""
    pipe = editing.load_attacker("tiny")
    img = Image.new("RGB", (512, 512), (90, 120, 30))
    for res, tokens in [(s03.Args().cond_resolution, 1024), (s02.Args().cond_resolution, 1024), (1024, 4096)]:
        ctx = editing.encode_edit(pipe, [img], ["add a cup"], 64, negative_prompt=None, cond_resolution=res)
        assert ctx.cond_latents.shape[1] == tokens and ctx.target_len == 16


def test_rewards_gate_on_local_ssim_and_on_changed_area(monkeypatch):
    """compute_rewards: the defender's failures count only where the target box kept its SSIM and, with
    --max_area, where the edit changed at most that share of the image; --area_scale scales them by
    1 - area / scale (choice 6)."""
    scene = dict(image=Image.new("RGB", (20, 20), (90, 90, 90)), targets=[dict(bbox=[0, 0, 6, 6])])
    small, large, target_hit = (scene["image"].copy() for _ in range(3))
    small.paste((250, 90, 90), (10, 10, 14, 14))      # 16 of 400 pixels: 4% of the image
    large.paste((250, 90, 90), (8, 0, 20, 20))        # 240 of 400: 60%
    target_hit.paste((250, 90, 90), (0, 0, 6, 6))     # the target box repainted: the SSIM gate closes
    monkeypatch.setattr(s03, "defender_failures", lambda *a: torch.ones(3))   # every answer wrong
    args = SimpleNamespace(reward="defender", tau=0.7, w_fraction=0.5, w_all=0.5, max_area=1.0, area_scale=0.0)
    r, ssim, wrong, area = s03.compute_rewards([scene] * 3, [small, large, target_hit], None, None, None, args)
    assert area.tolist() == pytest.approx([0.04, 0.60, 0.09]) and ssim[0] > 0.99 and ssim[2] < 0.7
    assert r.tolist() == [1.0, 1.0, 0.0]
    args.max_area = 0.10
    assert s03.compute_rewards([scene] * 3, [small, large, target_hit], None, None, None, args)[0].tolist() == [1.0, 0.0, 0.0]
    args.max_area, args.area_scale = 1.0, 0.5         # 1 - 0.04 / 0.5, 1 - 0.6 / 0.5 < 0, gate closed
    r = s03.compute_rewards([scene] * 3, [small, large, target_hit], None, None, None, args)[0]
    assert r.tolist() == pytest.approx([0.92, 0.0, 0.0])


def test_sde_window_starts_in_the_first_half():
    """flow_grpo's sde_window_range = (0, T // 2): with 10 steps and a window of 4 the start is 0 or 1."""
    import random
    rng = random.Random(0)
    for T, w, starts in [(10, 4, {0, 1}), (6, 2, {0, 1}), (10, 2, {0, 1, 2, 3})]:
        seen = {s03.sde_steps(_args(sde_window=w), T, rng)[0] for _ in range(200)}
        assert seen == starts, (T, w, seen)
        assert all(len(s03.sde_steps(_args(sde_window=w), T, rng)) == w for _ in range(20))
    assert s03.sde_steps(_args(sde_window=0), 6, rng) == [0, 1, 2, 3, 4]


def test_sde_kl_on_a_hand_case():
    """flow_grpo: |mean - mean_ref|^2 (per-element mean) / (2 std_dev_t^2), std_dev_t = noise sqrt(s / (1 - s))."""
    mean = torch.zeros(2, 3, 4)
    ref = torch.full((2, 3, 4), 0.1)
    ref[1] = 0.2
    std2 = (0.7 ** 2) * 0.6 / 0.4                      # s = 0.6, noise 0.7: std_dev_t^2 = 0.735
    kl = s03.sde_kl(mean, ref, 0.6, 0.7, 0.9)
    assert kl.tolist() == pytest.approx([0.01 / (2 * std2), 0.04 / (2 * std2)], rel=1e-5)


def test_scenes_are_drawn_without_replacement():
    import random
    rng = random.Random(0)
    for _ in range(50):
        picks = s03.draw_scenes(rng, 10, 8)
        assert len(picks) == 8 and len(set(picks)) == 8
    picks = s03.draw_scenes(rng, 3, 8)             # fewer scenes than asked: whole passes
    assert len(picks) == 8 and sorted(picks[:3]) == [0, 1, 2] and sorted(picks[3:6]) == [0, 1, 2]


def _update_setup(n=6):
    torch.manual_seed(0)
    pipe = editing.load_attacker("tiny")
    params = editing.add_attacker_lora(pipe, rank=4, alpha=8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    img = Image.new("RGB", (32, 32), (90, 120, 30))
    ctx = editing.encode_edit(pipe, [img], ["add a cup"], 32, negative_prompt=None).repeat(n)
    sig = editing.sigma_schedule(pipe.scheduler, 4, 4)
    xs, logps, _ = s03.rollout(pipe, ctx, sig, [0, 1, 2], 1.0, 1.0, torch.Generator().manual_seed(0))
    return pipe, params, ctx, sig, xs, logps


class _RecordingOpt:
    """Records the gradients at every step instead of stepping."""
    def __init__(self, params):
        self.params, self.steps = params, []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.steps.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params])


def test_partial_micro_batch_weighs_every_sample_equally():
    """6 samples in micro-batches of 4 (4 + 2) give the gradient of one micro-batch of 6."""
    pipe, params, ctx, sig, xs, logps = _update_setup()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.3, -1.0, 2.0])
    grads = []
    for mb in (6, 4):
        opt = _RecordingOpt(params)
        s03.grpo_update(pipe, params, opt, ctx, sig, xs, logps, adv, [0, 1, 2], _args(micro_batch=mb, grad_clip=1e9))
        grads.append(opt.steps[0])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)


def test_two_optimizer_steps_per_rollout_batch():
    """flow_grpo: two optimizer steps per epoch, each over half of its samples, every sample once."""
    import random
    pipe, params, ctx, sig, xs, logps = _update_setup()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.3, -1.0, 2.0])
    opt = _RecordingOpt(params)
    s03.grpo_updates(pipe, params, opt, ctx, sig, xs, logps, adv, [0, 1, 2],
                     _args(micro_batch=4, grad_clip=1e9, updates_per_iter=2), random.Random(0))
    assert len(opt.steps) == 2
    # the two half-batch gradients add up to twice the whole batch's (each half is a mean over 3 samples)
    full = _RecordingOpt(params)
    s03.grpo_update(pipe, params, full, ctx, sig, xs, logps, adv, [0, 1, 2], _args(micro_batch=6, grad_clip=1e9))
    for a, b, c in zip(opt.steps[0], opt.steps[1], full.steps[0]):
        assert torch.allclose(a + b, 2 * c, atol=1e-7, rtol=1e-4)


def test_flow_grpo_raises_brightness():
    """A verifiable reward (decoded brightness) rises under 100 Flow-GRPO steps. One thread: the trajectory
    depends on the kernels' rounding (AVX2 and AVX-512 differ; bench/tiny_world.md has the measurements)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _raise_brightness()
    finally:
        torch.set_num_threads(threads)


def _raise_brightness():
    torch.manual_seed(0)
    pipe = editing.load_attacker("tiny")
    params = editing.add_attacker_lora(pipe, rank=8, alpha=8)
    opt = torch.optim.AdamW(params, lr=1e-1, weight_decay=0.0)
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    ctx = editing.encode_edit(pipe, [img], ["make it brighter"], 32, negative_prompt=None).repeat(8)
    sig = editing.sigma_schedule(pipe.scheduler, 6, ctx.cond_latents.shape[1])
    steps, gen, history, spread = list(range(5)), torch.Generator().manual_seed(0), [], []
    args = _args(micro_batch=8)
    for _ in range(100):
        xs, logps, x = s03.rollout(pipe, ctx, sig, steps, 1.0, 1.0, gen)
        images = editing.decode_latents(pipe, x, 32, 32)
        r = ((images.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3))
        history.append(r.mean().item())
        spread.append(r.std().item())
        s03.grpo_update(pipe, params, opt, ctx, sig, xs, logps, s03.group_advantages(r, 8, 5.0), steps, args)
    start, end, std = sum(history[:10]) / 10, sum(history[-10:]) / 10, sum(spread[:10]) / 10
    # in units of the first groups' spread (a random tiny VAE decodes to a narrow brightness range, which the
    # CPU's kernels shift): seeds 0-4 rose by 4.1-5.3 of them (bench/tiny_world.md); 2 is half the least
    assert end - start > 2 * std > 0, (start, end, std, history)


def test_sft_loss_falls(tiny_run):
    torch.manual_seed(0)
    ds = load_from_disk(str(tiny_run / "data" / "aot_sft"))
    pipe = editing.load_attacker("tiny")
    params = editing.add_attacker_lora(pipe, rank=8, alpha=16)
    cache = s02.cache_rows(pipe, [ds[i] for i in range(4)], 64)
    g = torch.Generator().manual_seed(0)
    fixed = [(c, torch.rand(1, generator=g), torch.randn(c[1].shape, generator=g)) for c in cache for _ in range(4)]

    def eval_loss():
        with torch.no_grad():
            return sum(s02.sft_loss(pipe.transformer, c[0], c[1], s, e).item() for c, s, e in fixed) / len(fixed)

    before = eval_loss()
    opt = torch.optim.AdamW(params, lr=3e-3)
    for step in range(40):
        (ctx, x0), s, e = fixed[step % len(fixed)][0], torch.rand(1, generator=g), None
        e = torch.randn(x0.shape, generator=g)
        opt.zero_grad()
        s02.sft_loss(pipe.transformer, ctx, x0, s, e).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)


def _copy_run(tiny_run, dst):
    shutil.copytree(tiny_run / "data", dst / "data")
    return dst


@pytest.mark.slow
def test_stage02_python_torchrun_resume(tiny_run, tmp_path):
    flags = ["--preset", "tiny", "--max_steps", "30", "--save_every", "5"]
    run = _copy_run(tiny_run, tmp_path / "a")
    run_stage("02_sft_attacker.py", *flags, "--run_dir", run, "--report_to", "tensorboard")
    logs = [json.loads(x) for x in (run / "logs" / "02_sft.jsonl").read_text().splitlines()]
    assert len(logs) == 30 and all(math.isfinite(r["loss"]) for r in logs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(run / "logs" / "tb" / "02_sft")).Reload()
    assert {"02_sft/loss", "02_sft/grad_norm"} <= set(ev.Tags()["scalars"])
    assert [e.value for e in ev.Scalars("02_sft/loss")] == pytest.approx([r["loss"] for r in logs])
    # the saved LoRA loads into the pipeline and changes its output
    img = Image.new("RGB", (64, 64), (90, 120, 30))
    base = editing.load_attacker("tiny")
    tuned = editing.load_attacker("tiny", lora=str(run / "attacker" / "sft"))
    ctx = editing.encode_edit(base, [img], ["x"], 64)
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        d = (editing.predict_velocity(base.transformer, x, torch.tensor([0.5]), ctx, 1.0)
             - editing.predict_velocity(tuned.transformer, x, torch.tensor([0.5]), ctx, 1.0)).abs().max()
    assert d > 1e-4
    # torchrun, two ranks, in bf16 (the LoRA stays fp32)
    run2 = _copy_run(tiny_run, tmp_path / "b")
    run_stage("02_sft_attacker.py", "--preset", "tiny", "--dtype", "bf16", "--run_dir", run2, nproc=2)
    assert (run2 / "attacker" / "sft" / "pytorch_lora_weights.safetensors").is_file()
    # killed after a checkpoint and resumed: the same adapter, bit for bit, as the uninterrupted run
    run3 = _copy_run(tiny_run, tmp_path / "c")
    proc = start_stage("02_sft_attacker.py", *flags, "--run_dir", run3)
    assert kill_when_exists(proc, run3 / "attacker" / ".ckpt_sft" / "latest.json")
    assert not (run3 / "attacker" / "sft").exists(), "killed too late to test resume"
    at = checkpoint_step(run3 / "attacker" / ".ckpt_sft")
    run_stage("02_sft_attacker.py", *flags, "--run_dir", run3)
    assert_resumed_log(run3 / "logs" / "02_sft.jsonl", at)
    lora = "attacker/sft/pytorch_lora_weights.safetensors"
    assert same_safetensors(run / lora, run3 / lora) == []


@pytest.mark.slow
def test_stage03_python_torchrun_resume(tiny_run, boxed_defender, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "a")
    p = run_stage("03_train_attacker.py", "--preset", "tiny", "--run_dir", run, "--round", "1", "--defender",
                  boxed_defender, "--report_to", "tensorboard")
    assert "starting a fresh LoRA" in p.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(run / "logs" / "tb" / "03_round_1")).Reload()
    assert "03_round_1/reward_mean" in ev.Tags()["scalars"] and ev.Tags()["images"] == ["03_round_1/gallery"]
    logs = [json.loads(x) for x in (run / "logs" / "03_round_1.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and abs(logs[0]["ratio_mean"] - 1) < 1e-4
    assert {"reward_mean", "reward_std", "attack_success", "ssim_local", "clip_frac", "approx_kl", "rollout_s",
            "train_s", "peak_mem_gb"} <= set(logs[0]) and 0 < logs[0]["changed_area"] <= 1
    att = load_from_disk(str(run / "attacks" / "round_1"))
    scenes = load_from_disk(str(run / "data" / "scenes"))
    # questions about an absent object (no target box) are counted and not attacked (03's choice 5)
    absent = sum(1 for t in scenes["targets"] if not t)
    assert absent > 0 and f"{absent} of {len(scenes)} scenes have no target boxes" in p.stdout
    assert len(att["test"]) == sum(1 for s, t in zip(scenes["split"], scenes["targets"]) if s == "test" and t)
    assert all(att["test"]["targets"]) and all(att["train"]["targets"])
    assert all(a >= 0.3 for a in att["train"]["ssim_local"])
    assert (run / "attacks" / "round_1" / "gallery.png").is_file()
    # the curriculum alone, from the finished adapter, two attacks per train scene: the held-out attacks
    # and the first draws are the single-sample run's (the defender's sampled verdicts too: the curriculum
    # reseeds them), the second draws other edits of the same scenes
    shutil.copytree(run / "attacker", tmp_path / "m" / "attacker")
    _copy_run(tiny_run, tmp_path / "m")
    run_stage("03_train_attacker.py", "--preset", "tiny", "--run_dir", tmp_path / "m", "--round", "1",
              "--defender", boxed_defender, "--curriculum_samples", "2")
    many = load_from_disk(str(tmp_path / "m" / "attacks" / "round_1"))

    def pixels(rows):
        return [im.tobytes() for im in rows["attacked_image"]]
    assert pixels(many["test"]) == pixels(att["test"]) and many["test"]["ssim_local"] == att["test"]["ssim_local"]
    verdicts = att["test"]["defender_wrong_fraction"]
    assert len(set(verdicts)) > 1 and many["test"]["defender_wrong_fraction"] == verdicts
    n = len(att["train"])
    first, second = many["train"].select(range(n)), many["train"].select(range(n, len(many["train"])))
    assert pixels(first) == pixels(att["train"]) and len(second) > 0
    assert first["defender_wrong_fraction"] == att["train"]["defender_wrong_fraction"]
    assert set(second["id"]) <= {i for i, s in zip(scenes["id"], scenes["split"]) if s == "train"}
    again = {i: b for i, b in zip(first["id"], pixels(first))}
    assert all(b != again[i] for i, b in zip(second["id"], pixels(second)) if i in again)
    run2 = _copy_run(tiny_run, tmp_path / "b")
    p = run_stage("03_train_attacker.py", "--preset", "tiny", "--run_dir", run2, "--round", "1", "--defender", "tiny",
                  "--dtype", "bf16", nproc=2)
    assert "FSDP2 over 2 ranks: transformer + LoRA, text encoder, defender sharded" in p.stdout
    att2 = load_from_disk(str(run2 / "attacks" / "round_1"))
    assert len(att2["test"]) == len(att["test"]) and len(att2["train"]) + len(att2["test"]) <= len(scenes) - absent
    logs2 = [json.loads(x) for x in (run2 / "logs" / "03_round_1.jsonl").read_text().splitlines()]
    assert len(logs2) == 4 and abs(logs2[0]["ratio_mean"] - 1) < 1e-4   # bf16 base, fp32 LoRA, sharded
    lora2 = load_file(str(run2 / "attacker" / "round_1" / "pytorch_lora_weights.safetensors"))
    assert lora2 and all(v.dtype == torch.float32 for v in lora2.values())
    run3 = _copy_run(tiny_run, tmp_path / "c")
    args = ["--preset", "tiny", "--run_dir", run3, "--round", "1", "--defender", "tiny", "--train_iters", "400"]
    proc = start_stage("03_train_attacker.py", *args)
    assert kill_when_exists(proc, run3 / "attacker" / ".ckpt_round_1" / "latest.json")
    at = checkpoint_step(run3 / "attacker" / ".ckpt_round_1")
    run_stage("03_train_attacker.py", *args[:-2], "--train_iters", "6")
    assert_resumed_log(run3 / "logs" / "03_round_1.jsonl", at, key="iter")
    assert (run3 / "attacks" / "round_1").exists()


def test_stage03_fsdp2_two_processes_kill_resume_is_bit_identical(tiny_run, boxed_defender, tmp_path):
    """torchrun --nproc_per_node 2, bf16: the sharded transformer + LoRA, text encoder and defender;
    a DCP checkpoint (LoRA and AdamW shards, each rank's RNG: the defender samples its answers from the
    global one), SIGKILL of the process tree, resume: same final LoRA, same curriculum. The KL is on: its
    reference values (the round's start, snapshotted before the restore) are swapped into the shards."""
    flags = ["--preset", "tiny", "--round", "1", "--defender", boxed_defender, "--dtype", "bf16", "--train_iters",
             "6", "--save_every", "2", "--lr", "3e-2", "--kl_beta", "0.1",
             "--val_fraction", "0.5", "--val_every", "2", "--select", "best_val"]
    whole, killed = _copy_run(tiny_run, tmp_path / "whole"), _copy_run(tiny_run, tmp_path / "killed")
    run_stage("03_train_attacker.py", *flags, "--run_dir", whole, nproc=2)
    proc = start_stage("03_train_attacker.py", *flags, "--run_dir", killed, nproc=2)
    assert kill_when_exists(proc, killed / "attacker" / ".ckpt_round_1" / "latest.json")
    ckpt = json.loads((killed / "attacker" / ".ckpt_round_1" / "latest.json").read_text())
    assert ckpt["step"] < 6
    run_stage("03_train_attacker.py", *flags, "--run_dir", killed, nproc=2)
    assert_resumed_log(killed / "logs" / "03_round_1.jsonl", ckpt["step"], key="iter")
    a = killed / "attacker" / "round_1" / "pytorch_lora_weights.safetensors"
    b = whole / "attacker" / "round_1" / "pytorch_lora_weights.safetensors"
    assert same_safetensors(a, b) == []
    first = load_file(str(b))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in first.items())   # it trained
    log = [json.loads(x) for x in (whole / "logs" / "03_round_1.jsonl").read_text().splitlines()]
    assert len({r["reward_mean"] for r in log if "reward_mean" in r}) > 1               # the defender's verdicts moved the rewards
    kls = [r["kl_ref"] for r in log if "kl_ref" in r]
    assert 0 < kls[0] < max(kls[1:])      # the KL to the round's start grows with the drift (iteration 1's first update: 0)
    # validation before training and every 2 iterations; the adapter kept is the best-scoring one (ties: the earlier),
    # the same after the kill (its values travel in the checkpoint)
    vals = {r["iter"]: r["val_score"] for r in log if "val_score" in r}
    assert sorted(vals) == [0, 2, 4, 6] and len(set(vals.values())) > 1
    assert all(0 <= r["val_area"] <= 1 for r in log if "val_score" in r)
    sel = json.loads((whole / "attacker" / "round_1" / "args.json").read_text())["selected"]
    assert sel["iter"] == max(vals, key=lambda i: (vals[i], -i)) and sel["val_score"] == vals[sel["iter"]]
    assert json.loads((killed / "attacker" / "round_1" / "args.json").read_text())["selected"] == sel
    x, y = (load_from_disk(str(r / "attacks" / "round_1")) for r in (killed, whole))
    for split in ("train", "test"):
        assert x[split]["defender_wrong_fraction"] == y[split]["defender_wrong_fraction"]
        assert [im.tobytes() for im in x[split]["attacked_image"]] == [im.tobytes() for im in y[split]["attacked_image"]]


def test_kl_reference_is_the_rounds_starting_adapter():
    """--kl_ref init (default): the KL is to the values the LoRA had when the round started, swapped in for
    the reference forward and put back (0 while the policy is still there, the hand formula after it moves);
    --kl_ref base (ref None): the LoRA-disabled model, > 0 from the start for a trained adapter."""
    pipe, params, ctx, sig, xs, logps = _update_setup(n=2)
    ref = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.0)
    args = _args(kl_beta=1.0, micro_batch=2)
    at_start = s03.grpo_update(pipe, params, opt, ctx, sig, xs, logps, torch.zeros(2), [0], args, ref=ref)
    assert at_start["kl"] == 0.0
    base = s03.grpo_update(pipe, params, opt, ctx, sig, xs, logps, torch.zeros(2), [0], args, ref=None)
    assert base["kl"] > 0.0
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    moved = [p.detach().clone() for p in params]
    st = s03.grpo_update(pipe, params, opt, ctx, sig, xs, logps, torch.zeros(2), [0], args, ref=ref)
    assert all(torch.equal(p, m) for p, m in zip(params, moved))   # the policy's values are back
    s, s_next, smax = sig[0].item(), sig[1].item(), sig[1].item()

    def step_mean():
        v = editing.predict_velocity(pipe.transformer, xs[0], sig[0:1], ctx, 1.0)
        return s03.sde_step(v, xs[0], s, s_next, 1.0, smax, prev=xs[1])[2]
    with torch.no_grad():
        mean = step_mean()
        with editing.lora_values(pipe.transformer, params, ref):
            mean_ref = step_mean()
    assert st["kl"] == pytest.approx(s03.sde_kl(mean, mean_ref, s, 1.0, smax).mean().item(), rel=1e-5) and st["kl"] > 0
