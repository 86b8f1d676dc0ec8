"""Stage 04 (DAPO): the loss against its formula, ratio = 1 on-policy, dynamic sampling, learning."""
import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script
from datasets import DatasetDict, load_from_disk
from helpers import assert_resumed_log, checkpoint_step, kill_when_exists, run_stage, same_safetensors, start_stage
from PIL import Image

import common
import policy

s04 = load_script("04_train_defender.py")


def direct_dapo(logp, old, adv, lengths, lo, hi, dual=3.0):
    """Token-mean over every token of the batch of min(r A, clip(r, 1-lo, 1+hi) A), negated; for A < 0
    the loss is at most -dual A (dual-clip)."""
    total, n = 0.0, 0
    for b, L in enumerate(lengths):
        for t in range(L):
            r = math.exp(logp[b][t] - old[b][t])
            a = adv[b]
            term = -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
            if a < 0 and dual > 0:
                term = min(term, -dual * a)
            total += term
            n += 1
    return total / n


import math  # noqa: E402


def test_dapo_loss_matches_direct_formula_and_accumulation():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 3]
    B, T = 4, 7
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.8   # ratios far outside both clip bounds
    logp[3, 1] = old[3, 1] + 1.5                        # ratio 4.5 with A = -2: past the dual clip
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0])
    mask = torch.zeros(B, T)
    for b, L in enumerate(lengths):
        mask[b, :L] = 1
    ratio = (logp - old).exp()
    assert ((ratio > 1.28) & (adv[:, None] > 0) & (mask > 0)).any()   # high clip is active
    assert ((ratio < 0.8) & (adv[:, None] < 0) & (mask > 0)).any()     # low clip is active
    assert ((ratio > 3.0) & (adv[:, None] < 0) & (mask > 0)).any()     # dual clip is active
    assert direct_dapo(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, 0.28) != pytest.approx(
        direct_dapo(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, 0.28, dual=0.0))
    expected = direct_dapo(logp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, 0.28)
    lp = logp.clone().requires_grad_(True)
    loss, stats = s04.dapo_loss(lp, old, adv, mask, 0.2, 0.28, num_tokens=sum(lengths))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    full_grad = lp.grad.clone()
    # two micro-batches of unequal token counts, each divided by the global token count
    lp2 = logp.clone().requires_grad_(True)
    for idx in ([0, 1], [2, 3]):
        l, _ = s04.dapo_loss(lp2[idx], old[idx], adv[idx], mask[idx], 0.2, 0.28, num_tokens=sum(lengths))
        l.backward()
    assert torch.allclose(lp2.grad, full_grad, atol=1e-7)
    # a per-sequence mean would weight the 2-token answer 3.5x more per token than the 7-token one
    assert stats["tokens"] == sum(lengths)
    assert 0 < stats["clip_frac"] < stats["tokens"]


def test_dual_clip_and_log_ratio_clamp_on_a_hand_case():
    """EasyR1: A = -1, ratio e^2 = 7.39 -> the PPO term 7.39 is dual-clipped to 3 (no gradient); ratio
    e^1 = 2.72 < 3 stays; a log-ratio of 50 is clamped to 20 before exp (finite loss, zero gradient)."""
    old = torch.zeros(1, 3)
    logp = torch.tensor([[2.0, 1.0, 50.0]], requires_grad=True)
    mask = torch.ones(1, 3)
    loss, st = s04.dapo_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.28, num_tokens=3)
    assert loss.item() == pytest.approx((3.0 + math.e + 3.0) / 3, rel=1e-6)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, math.e / 3, 0.0], rel=1e-6)
    assert st["clip_frac"] == 2
    off, _ = s04.dapo_loss(torch.tensor([[2.0, 1.0, 50.0]]), old, torch.tensor([-1.0]), mask, 0.2, 0.28, 3, clip_dual=0.0)
    assert off.item() == pytest.approx((math.exp(2) + math.e + math.exp(20)) / 3, rel=1e-5)


def test_non_finite_gradient_leaves_the_weights_untouched():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    (w * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    norm = s04.clipped_step(opt, [w], 1.0)
    assert not math.isfinite(norm) and w.tolist() == [1.0, 1.0, 1.0]
    opt.zero_grad()
    (w * 2).sum().backward()
    assert s04.clipped_step(opt, [w], 1.0) == pytest.approx(2 * math.sqrt(3)) and w[0].item() < 1.0


def test_group_advantages_and_dynamic_filter():
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.8, 0.0], [0.8, 0.8, 0.8, 0.0]])
    keep = s04.dynamic_filter(r, 0.01, 0.99)
    assert keep.tolist() == [False, False, True, True]
    a = s04.group_advantages(r)
    x = torch.tensor([1.0, 0.0, 0.8, 0.0])
    assert torch.allclose(a[2], (x - x.mean()) / (x.std() + 1e-6))
    assert torch.all(a[0] == 0)


def test_round_schedule_step_count_and_warmup_pool(tiny_run):
    """The authors' run scripts: warm-up 512 x 100 epochs on ~900 clean samples = 100 steps (run_base.sh),
    then iterations of 128 x 50, 128 x 50, 512 x 15 (run_iter{0,1,2}.sh)."""
    assert s04.step_count(SimpleNamespace(max_steps=0, rollout_batch=512, epochs=100), 900) == 100
    assert s04.step_count(SimpleNamespace(max_steps=0, rollout_batch=128, epochs=50), 1000) == 350   # 7 full batches
    assert s04.step_count(SimpleNamespace(max_steps=3, rollout_batch=128, epochs=50), 1000) == 3
    args = SimpleNamespace(round=0, warmup_samples=5, seed=0, val_every=0, select="last")
    pool, _ = s04.load_prompt_pool(args, tiny_run)
    assert len(pool) == 5 and [p["question"] for p in pool] == [p["question"] for p in s04.load_prompt_pool(args, tiny_run)[0]]
    assert len(s04.load_prompt_pool(SimpleNamespace(**{**vars(args), "warmup_samples": 0}), tiny_run)[0]) > 5


def test_validation_holds_out_whole_scenes_of_the_round(tmp_path):
    """Round k: --val_fraction of the curriculum's scene ids; their attacks and the same scenes clean are the
    validation set and are never trained on; the test split is not touched."""
    from datasets import Dataset
    ids = [f"s{i}" for i in range(10)]
    scenes = Dataset.from_dict({"id": ids + ["t0"], "image": [Image.new("RGB", (8, 8))] * 11,
                                "question": ["q"] * 11, "options": [["a", "b"]] * 11, "answer": ["A"] * 11,
                                "split": ["train"] * 10 + ["test"]})
    scenes.save_to_disk(str(tmp_path / "data" / "scenes"))
    att = Dataset.from_dict({"id": ids * 2, "attacked_image": [Image.new("RGB", (8, 8))] * 20, "question": ["q"] * 20,
                             "options": [["a", "b"]] * 20, "answer": ["A"] * 20})
    DatasetDict(train=att, test=att.select(range(2))).save_to_disk(str(tmp_path / "attacks" / "round_1"))
    args = SimpleNamespace(round=1, curriculum=None, clean_ratio=0.5, seed=0, val_every=4, select="last",
                           val_fraction=0.2, warmup_samples=0)
    pool, val = s04.load_prompt_pool(args, tmp_path)
    held = {p["id"] for p in val}
    assert len(held) == 2 and sorted(p["source"] for p in val) == ["attack"] * 4 + ["clean"] * 2
    assert not held & {p["id"] for p in pool} and "t0" not in {p["id"] for p in pool + val}
    assert sum(p["source"] == "attack" for p in pool) == 16
    off, none = s04.load_prompt_pool(SimpleNamespace(**{**vars(args), "val_every": 0}), tmp_path)
    assert none == [] and sum(p["source"] == "attack" for p in off) == 20


def test_clean_share_meets_the_ratio_by_repeating_a_small_clean_set():
    clean = list(range(10))
    few = s04.clean_share(clean, 6, 0.5, random.Random(0))                  # 6 of the 10, no repeat
    assert len(few) == 6 and len(set(few)) == 6
    assert few == random.Random(0).sample(clean, 6)                         # as the plain draw it replaces
    many = s04.clean_share(clean, 25, 0.5, random.Random(0))                # 25 wanted from 10 scenes
    assert len(many) == 25 and sorted(many[:20]) == sorted(clean * 2)       # two whole passes, then 5 more
    assert len(set(many[20:])) == 5
    assert len(s04.clean_share(clean, 30, 0.25, random.Random(0))) == 10    # 30 x 0.25 / 0.75
    assert s04.clean_share([], 30, 0.5, random.Random(0)) == [] and s04.clean_share(clean, 30, 0.0, random.Random(0)) == []


class FakeStream:
    def __init__(self):
        self.taken = 0

    def take(self, n):
        self.taken += n
        return [{"id": self.taken - n + i} for i in range(n)]


def test_collect_groups_refills_after_dropping(monkeypatch):
    """Prompts with even id get all-correct groups (dropped); odd ids mixed groups (kept)."""
    def fake_rollout(model, processor, prompts, args):
        out = []
        for p in prompts:
            for j in range(args.group_size):
                acc = 1.0 if p["id"] % 2 == 0 else float(j % 2)
                out.append({"prompt": p, "accuracy": acc, "completion": [1, 2], "fixed": acc})
        return out

    def fake_score(samples, args):
        for s in samples:
            s["reward"], s["overlong"] = s["fixed"], 0.0

    monkeypatch.setattr(policy, "rollout", fake_rollout)
    monkeypatch.setattr(s04, "score", fake_score)
    args = SimpleNamespace(group_size=4, dyn_low=0.01, dyn_high=0.99, max_tries=10, mini_rollout_batch=0)
    stream = FakeStream()
    kept, info = s04.collect_groups(None, None, stream, 6, args)
    assert len(kept) == 6 and all(g[0]["prompt"]["id"] % 2 == 1 for g in kept)
    assert info["tries"] == 2 and info["groups_seen"] == stream.taken == 12   # whole batches of 6 prompts
    assert info["gen_samples"] == 4 * stream.taken and info["gen_correct"] == sum(
        4 if i % 2 == 0 else 2 for i in range(stream.taken))   # even ids all right, odd ids half
    # bounded: with max_tries=1 it trains on what there is
    kept1, info1 = s04.collect_groups(None, None, FakeStream(), 6, SimpleNamespace(**{**vars(args), "max_tries": 1}))
    assert info1["tries"] == 1 and len(kept1) == 3   # 6 prompts, the 3 odd ones kept


def _collect_on_two_ranks(rank, port, out_dir):
    """Rank 0 keeps every group it generates, rank 1 one in four."""
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def fake_rollout(model, processor, prompts, args):
        return [{"prompt": dict(p, rank=rank), "completion": [1], "text": "",
                 "accuracy": float(j % 2) if rank == 0 or p["id"] % 4 == 1 else 1.0}
                for p in prompts for j in range(args.group_size)]

    def fake_score(samples, args):
        for x in samples:
            x["reward"], x["overlong"] = x["accuracy"], 0.0
    policy.rollout, s04.score = fake_rollout, fake_score
    args = SimpleNamespace(group_size=4, dyn_low=0.01, dyn_high=0.99, max_tries=-1, mini_rollout_batch=8)
    kept, info = s04.collect_groups(None, None, FakeStream(), 4, args)
    (out_dir / f"rank_{rank}.json").write_text(json.dumps(
        dict(kept=[[g[0]["prompt"]["rank"], g[0]["prompt"]["id"]] for g in kept], tries=info["tries"])))
    dist.destroy_process_group()


def test_dynamic_sampling_fills_every_rank_when_keep_rates_differ(tmp_path):
    """Two ranks: rank 1 keeps 1 group in 4. The step still trains on the whole rollout batch of 8: each
    rank holds 4 distinct groups (rank 1 gets rank 0's surplus); before, rank 1 trained on 2."""
    import torch.multiprocessing as mp
    from helpers import free_port
    mp.spawn(_collect_on_two_ranks, args=(free_port(), tmp_path), nprocs=2)
    out = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert [len(o["kept"]) for o in out] == [4, 4]
    assert out[0]["tries"] == out[1]["tries"] == 2                  # 5 kept after one try of 8 prompts, 10 after two
    everything = [tuple(g) for o in out for g in o["kept"]]
    assert len(set(everything)) == 8 and sum(r == 0 for r, _ in everything) == 6
    assert all(i % 4 == 1 for r, i in everything if r == 1)


def test_step_row_when_every_group_was_dropped():
    """Generated answers are logged even when dynamic sampling kept nothing; kept metrics are None."""
    g = dict(groups_seen=4, gen_tokens=48, gen_s=2.0, tries=2, gen_samples=16, gen_correct=4, gen_reward=3.2)
    st = dict(updates=0, tokens=0.0, clip_frac=0.0, ratio_sum=0.0, entropy_sum=0.0, grad_norm=0.0, train_s=0.0)
    row = policy.step_row(3, [], g, st, 2.5, SimpleNamespace(device=torch.device("cpu")))
    assert row["gen_samples"] == 16 and row["gen_accuracy"] == 0.25 and row["gen_reward"] == pytest.approx(0.2)
    assert row["gen_response_len"] == 3.0 and row["kept_group_frac"] == 0.0 and row["kept_samples"] == 0
    assert all(row[k] is None for k in ("reward", "accuracy", "response_len", "clip_frac", "ratio_mean", "entropy"))
    assert row["kept_by"] == {} and row["adv_by_answer"] == {}
    json.dumps(row)   # None -> null in the JSONL


def test_step_row_breaks_kept_groups_down_by_source_and_answer_and_sums_advantages_per_chosen_option():
    """Two kept groups: an attacked "B" scene answered A, B (advantages -1, +1) and a clean "A" scene answered
    A, A, "none" (+0.5, +0.5, -1): kept_by counts the groups, adv_by_answer sums the advantages per chosen
    letter (A: -1 + 0.5 + 0.5 = 0, B: +1, none: -1)."""
    mcq = dict(question="q", options=["left", "right"])

    def sample(prompt, text, adv):
        return dict(prompt=prompt, text=text, adv=adv, reward=0.0, accuracy=0.0, completion=[1, 2], overlong=0.0)
    attack, clean = dict(mcq, answer="B", source="attack"), dict(mcq, answer="A", source="clean")
    groups = [[sample(attack, "\\boxed{A}", -1.0), sample(attack, "\\boxed{B}", 1.0)],
              [sample(clean, "\\boxed{A}", 0.5), sample(clean, "\\boxed{A}", 0.5), sample(clean, "no idea", -1.0)]]
    g = dict(groups_seen=4, gen_tokens=10, gen_s=1.0, tries=1, gen_samples=5, gen_correct=2, gen_reward=2.0)
    st = dict(updates=1, tokens=10.0, clip_frac=0.0, ratio_sum=10.0, entropy_sum=1.0, grad_norm=0.1, train_s=1.0)
    row = policy.step_row(1, groups, g, st, 1.0, SimpleNamespace(device=torch.device("cpu")))
    assert row["kept_by"] == {"attack/B": 1, "clean/A": 1}
    assert row["adv_by_answer"] == {"A": 0.0, "B": 1.0, "none": -1.0}
    assert row["kept_samples"] == 5 and row["kept_group_frac"] == 0.5


def test_answer_margin_is_the_mean_log_prob_difference_of_the_two_boxed_answers():
    """policy.answer_margin against a plain forward of [prompt | "\\boxed{X}<|im_end|>"] per prompt and letter."""
    torch.manual_seed(0)
    model, proc = common.load_defender("tiny")
    prompts = [p for p in _prompts(8) if p["options"]]
    got = policy.answer_margin(model, proc, prompts, _tiny_args())
    want = []
    for p in prompts:
        lp = {}
        for x in ("A", "B"):
            inputs = common.defender_inputs(proc, [p["image"]], [common.defender_prompt(p["question"], p["options"])], "cpu")
            comp = torch.tensor(proc.tokenizer(f"\\boxed{{{x}}}<|im_end|>")["input_ids"])
            n = len(comp)
            ids = torch.cat([inputs["input_ids"][0], comp])[None]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                               mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"][0],
                                                            torch.zeros(n, dtype=torch.int)])[None],
                               image_grid_thw=inputs["image_grid_thw"]).logits[0, -n - 1:-1].float()
            logits[:, policy.media_token_ids(model)] = -float("inf")
            lp[x] = logits.log_softmax(-1).gather(-1, comp[:, None]).sum().item()
        want.append(lp["B"] - lp["A"])
    assert len(prompts) == 4 and abs(got - sum(want) / len(want)) < 1e-4 and abs(got) > 1e-3


def _tiny_args(**kw):
    base = dict(group_size=3, gen_batch=8, gen_memory_gb=32.0, micro_tokens=0, temperature=1.0, top_p=1.0,
                max_new_tokens=6, micro_batch=4,
                overlong_cache=0, old_logp="recompute", clip_low=0.2, clip_high=0.28, clip_dual=3.0, kl_coef=0.0,
                mask_truncated=False, balance_answers=False, global_batch=4, grad_clip=1.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [dict(image=Image.new("RGB", (rng.choice([56, 84, 112]), 56), tuple(rng.randrange(256) for _ in range(3))),
                 question="Is the red circle left of the blue square?" + " really" * rng.randrange(4),
                 options=[] if i % 2 else ["left", "right"], answer="Yes" if i % 2 else "A") for i in range(n)]


def test_packed_groups_give_each_answer_its_own_log_probs():
    """pack: one copy of a prompt, then k of its answers; each answer's log-probs equal (a) the sampler's
    (KV-cached decoding) and (b) a plain forward of [prompt | answer] alone, with left-padded prompts of
    four lengths, answers of different lengths, and rows of 1-3 answers (so nothing leaks between answers
    or rows); the first on-policy ratio is then 1."""
    torch.manual_seed(0)
    model, proc = common.load_defender("tiny")
    samples = policy.rollout(model, proc, _prompts(4), _tiny_args())
    for i, s in enumerate(samples):                   # answers of 2..6 tokens (a prefix keeps its log-probs)
        m = 2 + i % 5
        s["completion"], s["rollout_logp"] = s["completion"][:m], s["rollout_logp"][:m]
    assert len({len(s["prompt_ids"]) for s in samples}) == 4       # left padding really happens
    for max_seqs, shape in ((32, [[3, 3, 3, 3]]), (4, [[3, 1], [2, 2], [1, 3]]), (1, [[1]] * 12)):
        mbs = policy.micro_batches(samples, max_seqs, 0)
        assert [[len(r) for r in mb] for mb in mbs] == shape
        for mb in mbs:
            with torch.no_grad():
                logp, ent = policy.token_logprobs(model, policy.pack(mb, 0, "cpu"), 1.0, with_entropy=True)
            assert torch.isfinite(ent).all()   # media-token logits at -inf: entr(0) = 0, no nan
            for b, s in enumerate(s for row in mb for s in row):
                n = len(s["completion"])
                assert (ent[b, :n] > 0).all()
                assert torch.allclose(logp[b, :n], s["rollout_logp"], atol=1e-4), (logp[b, :n], s["rollout_logp"])
                ids = torch.cat([s["prompt_ids"], s["completion"]])[None]
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=s["pixel_values"],
                                   mm_token_type_ids=torch.cat([s["mm_types"], torch.zeros(n, dtype=torch.int)])[None],
                                   image_grid_thw=s["grid"]).logits[0, -n - 1:-1].float()
                logits[:, policy.media_token_ids(model)] = -float("inf")
                plain = logits.log_softmax(-1).gather(-1, s["completion"][:, None])[:, 0]
                assert torch.allclose(logp[b, :n], plain, atol=2e-6), (logp[b, :n] - plain).abs().max()
    model.set_attn_implementation("eager")         # the additive form of the same mask
    with torch.no_grad():
        eager = policy.token_logprobs(model, policy.pack(mbs[0], 0, "cpu"), 1.0)[0]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.allclose(eager, policy.token_logprobs(model, policy.pack(mbs[0], 0, "cpu"), 1.0)[0], atol=2e-6)


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.7, 0.1, 0.1, 0.1]])
    out = policy.top_p_filter(probs, 0.7)
    # row 0: 0.5, then 0.3 (0.5 before it < 0.7), not 0.15 (0.8 before it); row 1: 0.7 reaches 0.7 alone
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.0, 0.3], [0.7, 0.0, 0.0, 0.0]]))
    assert torch.equal(policy.top_p_filter(probs, 1.0), probs)


def test_group_answers_share_a_prefill_but_are_independent_draws():
    """sample_groups: n copies of one prompt's cache give n different answers, and the first token's
    frequencies over 4,000 draws follow the prefill's softmax (chi-square on the 8 likeliest tokens
    + the rest, 8 dof: p = 0.001 at 26.1)."""
    torch.manual_seed(0)
    model, proc = common.load_defender("tiny")
    p = _prompts(1)[0]
    inputs = common.defender_inputs(proc, [p["image"]], [common.defender_prompt(p["question"], p["options"])], "cpu")
    args = _tiny_args(max_new_tokens=1, temperature=1.0, top_p=1.0)
    eos = torch.tensor([proc.tokenizer.eos_token_id])
    ids, logp = policy.sample_groups(model, inputs, 4000, args, eos, proc.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
    logits[policy.media_token_ids(model)] = -float("inf")
    probs = logits.softmax(-1)
    assert torch.allclose(logp[:, 0], probs[ids[:, 0]].log(), atol=1e-5)
    top = probs.topk(8).indices
    seen = torch.stack([(ids[:, 0] == t).sum() for t in top]).float()
    expect = probs[top] * 4000
    seen, expect = torch.cat([seen, 4000 - seen.sum(0, keepdim=True)]), torch.cat([expect, 4000 - expect.sum(0, keepdim=True)])
    chi2 = ((seen - expect) ** 2 / expect).sum().item()
    assert chi2 < 26.1, (chi2, seen, expect)
    assert len(set(ids[:, 0].tolist())) > 100


def test_dapo_learns_a_token_reward():
    """Reward 1 when the first answer token is in the upper half of the vocabulary."""
    torch.manual_seed(0)
    model, proc = common.load_defender("tiny")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    args = _tiny_args(group_size=8, max_new_tokens=2, global_batch=4, micro_batch=32)
    half = len(proc.tokenizer) // 2
    ddp = SimpleNamespace(world=1, device=torch.device("cpu"))
    prompts = _prompts(4)
    history = []
    for _ in range(30):
        model.eval()
        samples = policy.rollout(model, proc, prompts, args)
        for s in samples:
            s["reward"] = float(s["completion"][0].item() >= half)
        history.append(sum(s["reward"] for s in samples) / len(samples))
        groups = [samples[i:i + args.group_size] for i in range(0, len(samples), args.group_size)]
        model.train()
        s04.train_on_groups(model, params, opt, groups, args, ddp)
    start, end = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert end > start + 0.3 and end > 0.85, history


@pytest.mark.slow
def test_stage04_round0_python_torchrun_and_resume(tiny_run, boxed_defender, tmp_path):
    """One process (fp32): a run, and a run killed after a checkpoint and resumed, end bit-identical, also in
    which validated step they select. From the boxed-answer tiny defender (conftest), every group kept
    (--dyn_low -1): every step trains."""
    import shutil
    flags = ["--preset", "tiny", "--round", "0", "--max_steps", "4", "--save_every", "1", "--dyn_low", "-1",
             "--rollout_batch", "16", "--global_batch", "8", "--max_tries", "1", "--max_pixels", str(28 * 28 * 8),
             "--init", boxed_defender, "--select", "best_val", "--val_every", "1", "--val_fraction", "0.25"]
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "data", run / "data")
    p = run_stage("04_train_defender.py", *flags, "--run_dir", run)
    assert "one process, fp32 master weights, fp32 compute" in p.stdout
    out = run / "defender" / "round_0"
    m, proc = common.load_defender(str(out))
    assert (out / "model.safetensors").is_file() and (out / "args.json").is_file()
    # trained at max_pixels 6272, saved with the base model's limits: evaluated as the base model is
    assert proc.image_processor.size == common.load_processor(str(boxed_defender)).image_processor.size
    assert proc.image_processor.size["longest_edge"] == 28 * 28 * 16
    logs = [json.loads(x) for x in (run / "logs" / "04_round_0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [0, 1, 2, 3, 4] and logs[0]["val_clean_acc"] is not None   # 0: before training
    val0, logs = logs[0], logs[1:]
    assert {"reward", "accuracy", "kept_group_frac", "clip_frac", "entropy", "gen_tok_per_s"} <= set(logs[0])
    # --select best_val: the first step with the best validation score (never step 0), recorded in args.json
    scores = [r["val_score"] for r in logs]
    selected = json.loads((out / "args.json").read_text())["selected"]
    assert selected["step"] == 1 + scores.index(max(scores)) and selected["val_score"] == max(scores)
    assert selected["of_steps"] == 4 and val0["val_score"] is not None
    assert all(math.isfinite(r["entropy"]) and r["entropy"] > 0 for r in logs)   # media tokens at -inf: no nan
    assert all(0 < r["gen_accuracy"] < 1 and r["clip_frac"] is not None for r in logs)   # a signal every step
    # torchrun, two ranks: FSDP2 in fp32 (the CPU default dtype)
    run2 = tmp_path / "run2"
    shutil.copytree(tiny_run / "data", run2 / "data")
    p = run_stage("04_train_defender.py", "--preset", "tiny", "--run_dir", run2, "--round", "0", nproc=2)
    assert "FSDP2 over 2 ranks, MixedPrecisionPolicy(fp32" in p.stdout
    assert (run2 / "defender" / "round_0" / "model.safetensors").is_file()
    # resume: kill after the first checkpoint, restart
    run3 = tmp_path / "run3"
    shutil.copytree(tiny_run / "data", run3 / "data")
    proc = start_stage("04_train_defender.py", *flags, "--run_dir", run3)
    assert kill_when_exists(proc, run3 / "defender" / ".ckpt_round_0" / "latest.json")
    assert not (run3 / "defender" / "round_0").exists(), "killed too late to test resume"
    at = checkpoint_step(run3 / "defender" / ".ckpt_round_0")
    run_stage("04_train_defender.py", *flags, "--run_dir", run3)
    assert_resumed_log(run3 / "logs" / "04_round_0.jsonl", at)
    steps = [json.loads(x)["step"] for x in (run3 / "logs" / "04_round_0.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]                                   # step 0: validation before training
    assert same_safetensors(out / "model.safetensors", run3 / "defender" / "round_0" / "model.safetensors") == []
    assert json.loads((run3 / "defender" / "round_0" / "args.json").read_text())["selected"] == selected
    assert not (run3 / "defender" / ".best_round_0").exists()


@pytest.mark.slow
def test_stage04_round1_reads_curriculum(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "data", run / "data")
    p = run_stage("04_train_defender.py", "--preset", "tiny", "--run_dir", run, "--round", "1", check=False)
    assert p.returncode != 0 and "defender/round_0" in p.stdout + p.stderr
    m, proc = common.load_defender("tiny")
    m.save_pretrained(run / "defender" / "round_0")
    proc.save_pretrained(run / "defender" / "round_0")
    scenes = load_from_disk(str(run / "data" / "scenes"))
    att = scenes.map(lambda r: {"attacked_image": r["image"]})
    DatasetDict(train=att.select(range(6)), test=att.select(range(6, 8))).save_to_disk(str(run / "attacks" / "round_1"))
    p = run_stage("04_train_defender.py", "--preset", "tiny", "--run_dir", run, "--round", "1")
    # one scene of the six held out for validation: its attack, and its clean version if it is a train scene
    assert re.search(r"\(5 attacked\), [12] held out for validation", p.stdout), p.stdout
    assert (run / "defender" / "round_1" / "model.safetensors").is_file()


def test_overlong_penalty_three_regimes():
    assert s04.overlong_penalty(100, max_len=512, cache=128) == 0.0
    assert s04.overlong_penalty(384, max_len=512, cache=128) == 0.0     # boundary
    assert s04.overlong_penalty(448, max_len=512, cache=128) == pytest.approx(-0.5)
    assert s04.overlong_penalty(512, max_len=512, cache=128) == pytest.approx(-1.0)
    assert s04.overlong_penalty(600, max_len=512, cache=128) == -1.0


def test_balance_answers_gives_every_right_answer_the_same_advantage_mass():
    """Two kept "A" groups and one "B" group: before, A's groups carry twice B's push (A's letter prior would
    rise); after, each answer's positive advantages sum to the mean of the two totals, each group scaled as a
    whole (its advantages keep their ratios and still sum to 0)."""
    adv = s04.group_advantages(torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0], [1.0, 1, 1, 0]]))
    mass = adv.clamp(min=0).sum(1)
    out = s04.balance_answers(adv, ["A", "A", "B"])
    new = out.clamp(min=0).sum(1)
    target = (mass[0] + mass[1] + mass[2]) / 2
    assert torch.allclose(new[0] + new[1], target) and torch.allclose(new[2], target)
    assert torch.allclose(out / adv, (out / adv)[:, :1].expand_as(adv)) and torch.allclose(out.sum(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(s04.balance_answers(adv, ["A", "B", "C"])[1], adv[1] * (mass.sum() / 3) / mass[1])
    # a yes/no group is balanced among yes/no answers only: alone, it keeps its advantages, and A / B stay balanced
    mixed = s04.balance_answers(adv, ["A", "B", "Yes"])
    assert torch.allclose(mixed[2], adv[2]) and torch.allclose(mixed[:2].clamp(min=0).sum(1), (mass[0] + mass[1]) / 2)
