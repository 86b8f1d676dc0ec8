"""The paper-scale estimate (bench/paper_scale.py) at reduced sizes, and the memory budgets the
stages use at paper size (generation batches from a byte budget, micro-batches from a token budget)."""
import sys

import pytest
import torch
from conftest import ROOT, load_script
from PIL import Image

import common
import policy

sys.path.insert(0, str(ROOT / "bench"))
import paper_scale as ps  # noqa: E402


def test_saved_bytes_hand_computed():
    """Linear(4, 8) -> ReLU on a (3, 4) fp32 input: addmm keeps the input for the weight's gradient
    (3 x 4 x 4 = 48 bytes), ReLU its output (3 x 8 x 4 = 96); parameters are not activations."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    x = torch.randn(3, 4)
    saved, loss = ps.saved_bytes(model, lambda: model(x).sum(), {"all": model}, list(model.parameters()))
    assert saved == {"all": 48 + 96}
    loss.backward()


def test_live_bytes_hand_computed():
    """No grad: x @ W^T + b (3 x 8 fp32 = 96 bytes) then ReLU's output (96 more) while the first
    is alive: peak 192; the input and the weights are not counted."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval()
    reg = ps.Regions({"all": model})
    with torch.no_grad(), ps.LiveBytes(reg) as lb:
        y = model(torch.randn(3, 4))
    reg.remove()
    assert lb.peak["all"] == 192 and y.shape == (3, 8)


@pytest.fixture(scope="module")
def reduced():
    args = ps.Args(reduced=True, out="")
    P = ps.count_params(True)
    short, long = ps.measure_vl(True, 16), ps.measure_vl(True, 64)
    A = ps.measure_mmdit(True, 512)
    E = ps.measure_vae(True)
    return args, P, short, long, A, E


def test_activation_bytes_linear_in_tokens_and_checkpointing_lowers_them(reduced):
    args, P, short, long, A, E = reduced
    ls, ll = short["layer"], long["layer"]
    assert ll.tokens - ls.tokens == 48
    per_token = (ll.saved - ls.saved) / (ll.tokens - ls.tokens)
    assert ls.saved == pytest.approx(per_token * ls.tokens, rel=0.15)     # ~ proportional, not quadratic
    assert ll.saved_ckpt / ls.saved_ckpt == pytest.approx(ll.tokens / ls.tokens, rel=1e-6)   # hidden states only
    assert ll.flops_train > 2 * ll.flops_fwd > 0
    for layer, n in [(ll, P["vl_layers"]), (A, P["mmdit_layers"])]:
        assert 0 < layer.saved_ckpt < layer.saved
        assert n * layer.saved_ckpt + layer.saved < n * layer.saved        # what checkpointing keeps < without
    assert A.saved_ckpt == (A.tokens * 64 * 2)                              # (image + text tokens) x dim x bf16


def test_composition_peak_is_sum_of_parts_and_table(reduced, tmp_path):
    args, P, short, long, A, E = reduced
    stages = ps.compose(P, A, A, short, E, args, reduced=True)
    assert [s.name.split()[0] for s in stages] == ["01", "02", "03", "04", "05"]
    for s in stages:
        phase, total = s.peak()
        assert total == sum(s.phases[phase].values())
        assert all(total >= sum(v.values()) for v in s.phases.values())
        assert all(v >= 0 for p in s.phases.values() for v in p.values())
        assert s.flops > 0 and s.est_s >= s.bound_s > 0 and s.steps > 0
    s03 = stages[2].phases
    assert s03["update"]["transformer_shard"] == pytest.approx(2 * P["mmdit"] / args.world)
    assert s03["update"]["activations"] == pytest.approx(4 * 2 * (P["mmdit_layers"] * A.saved_ckpt + A.saved + A.live
                                                                  + A.other_saved))
    md = ps.table(stages, P, A, A, short, args, 1.0)
    rows = [line for line in md.splitlines() if line.startswith("| 0")]
    assert len(rows) == 5 and "ESTIMATE made on CPU" in md and "not measured on a GPU" in md


def test_memory_batches_hold_the_budget():
    model, proc = common.load_defender("tiny")
    ims = [Image.new("RGB", (56, 56))] * 7 + [Image.new("RGB", (112, 112))] * 2
    prompts = ["Is there a cat?"] * 9
    n, patches = common.prompt_length(proc, ims[0], prompts[0])
    real = common.defender_inputs(proc, ims[:1], prompts[:1], "cpu")["input_ids"].shape[1]
    assert abs(n - real) <= 8 and patches == 16
    tc, vc = model.config.text_config, model.config.vision_config
    kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2
    one = 2 * kv * (n + 10) + 12 * tc.intermediate_size * n + 12 * vc.intermediate_size * patches
    budget = 3 * one / 1e9       # three prompts of the small image: one prefill and 2 KV caches each
    calls = common.memory_batches(model, proc, ims, prompts, 10, budget, repeat=2)
    assert [c.stop - c.start for c in calls][:2] == [3, 3]
    assert calls[-1].stop == 9 and all(c.stop > c.start for c in calls)
    big = common.memory_batches(model, proc, ims, prompts, 10, budget, repeat=2)[-1]
    assert big.stop - big.start < 3                      # the larger images get a smaller call
    assert [c.stop - c.start for c in common.memory_batches(model, proc, ims, prompts, 10, 100.0, 4)] == [4, 4, 1]


def test_micro_batches_hold_the_token_budget():

    def sample(p, t, prompt=None):
        return dict(prompt_ids=torch.zeros(p) if prompt is None else prompt, completion=torch.zeros(t))
    samples = [sample(10, 5), sample(10, 20), sample(30, 10), sample(10, 5), sample(10, 5)]   # five prompts
    mbs = policy.micro_batches(samples, max_seqs=8, max_tokens=80)
    # a row each: 2 x (10 + 20) = 60 <= 80; + the third: 3 x (30 + 20) = 150 > 80 -> new batch, where
    # 2 x (30 + 10) = 80 fits and 3 x 40 = 120 does not
    assert [[len(r) for r in m] for m in mbs] == [[1, 1], [1, 1], [1]] and [s for m in mbs for r in m for s in r] == samples
    assert [len(m) for m in policy.micro_batches(samples, max_seqs=2, max_tokens=0)] == [2, 2, 1]
    assert [len(m) for m in policy.micro_batches([sample(100, 100)], max_seqs=8, max_tokens=10)] == [1]   # never empty
    # a group of 4 answers (one prompt tensor) and another of 2: one row per prompt while the budget holds,
    # rows x (P + answers per row x T): [4 answers] = 10 + 4 x 5 = 30 <= 40; + a row for the second prompt:
    # 2 x (10 + 4 x 5) = 60 > 40 -> new micro-batch
    a, b = torch.zeros(10), torch.zeros(10)
    group = [sample(0, 5, a) for _ in range(4)] + [sample(0, 5, b) for _ in range(2)]
    assert [[len(r) for r in m] for m in policy.micro_batches(group, max_seqs=8, max_tokens=40)] == [[4], [2]]
    assert [[len(r) for r in m] for m in policy.micro_batches(group, max_seqs=8, max_tokens=0)] == [[4, 2]]
    # a budget below the whole group splits it into rows that repeat the prompt: 10 + 2 x 5 = 20 fits in 20,
    # 10 + 3 x 5 = 25 and two rows 2 x (10 + 2 x 5) = 40 do not
    assert [[len(r) for r in m] for m in policy.micro_batches(group, max_seqs=8, max_tokens=20)] == [[2], [2], [2]]


def test_the_estimate_follows_the_stages_flags(reduced, monkeypatch):
    """compose reads each stage's Args: 03 without gradient checkpointing keeps every layer's activations
    (L x A.saved, where checkpointing keeps L x A.saved_ckpt plus one layer's A.saved for the recompute), and
    only 03's update phase changes."""
    args, P, short, long, A, E = reduced
    default = ps.compose(P, A, A, short, E, args, reduced=True)
    real = ps.stage_module

    def stage_module(file):
        mod = real(file)
        if file.startswith("03"):
            base = mod.Args

            class Args(base):
                def __init__(self, **kw):
                    super().__init__(**kw)
                    self.grad_ckpt = False
            mod.Args = Args
        return mod
    monkeypatch.setattr(ps, "stage_module", stage_module)
    off = ps.compose(P, A, A, short, E, args, reduced=True)
    grew = off[2].phases["update"]["activations"] - default[2].phases["update"]["activations"]
    micro = load_script("03_train_attacker.py").Args().micro_batch
    L = P["mmdit_layers"]
    assert grew == pytest.approx(micro * 2 * ((L - 1) * A.saved - L * A.saved_ckpt), rel=1e-6) and grew > 0
    assert [s.phases for i, s in enumerate(off) if i != 2] == [s.phases for i, s in enumerate(default) if i != 2]


def test_an_inference_only_measurement_matches_the_training_one_where_both_measure(reduced):
    """01's editor is measured without a backward: its working set, layer inputs and forward FLOPs are those of
    the full measurement, and nothing of the backward is reported."""
    A = reduced[4]
    fwd = ps.measure_mmdit(True, 512, train=False)
    assert (fwd.live, fwd.saved_ckpt, fwd.flops_fwd, fwd.other_live) == (A.live, A.saved_ckpt, A.flops_fwd, A.other_live)
    assert fwd.saved == 0 and fwd.flops_train == 0 and fwd.live > 0


def test_bf16_computed_in_fp32_measures_the_same_bytes_and_flops(reduced):
    """--bf16 fp32 (CPUs without native bf16): every layer's saved and live bytes and FLOPs equal the native bf16
    measurement's (the MMDiT block with its fp32 LoRA, the VL decoder layer, vision block and head, the VAE's
    convolutions); the results differ from native bf16 by rounding only."""
    args, P, short, long, A, E = reduced
    with ps.Bf16InFp32() as mode:
        A2, V2, E2 = ps.measure_mmdit(True, 512), ps.measure_vl(True, 16), ps.measure_vae(True)
    calls = mode.calls
    keys = ("tokens", "saved", "saved_ckpt", "live", "flops_fwd", "flops_train", "other_saved", "other_live",
            "other_flops_train")
    for mine, native in [(A2, A), (V2["layer"], short["layer"]), (V2["vision"], short["vision"])]:
        assert [getattr(mine, k) for k in keys] == [getattr(native, k) for k in keys], mine.name
    assert E2 == E
    a, b = torch.randn(8, 32, dtype=torch.bfloat16), torch.randn(32, 4, dtype=torch.bfloat16)
    with ps.Bf16InFp32() as mode:
        y = a @ b
    assert calls > 100 and mode.calls == 1     # matmuls and convolutions of every measured layer went through fp32
    assert y.dtype == torch.bfloat16 and torch.equal(y, (a.float() @ b.float()).bfloat16())
