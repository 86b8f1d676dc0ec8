"""common.py: prompts, answer extraction, rewards, SSIM, tiny models, LoRA round trip."""

import json

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

import common
import editing
import rundir
import tiny_models
import world

s01 = load_script("01_build_sft_data.py")


# --------------------------------------------------------------------------- extraction and reward
# Cases written from the authors' scripts (scripts/reward/correct_first.py, eval/hallucination/*.py,
# eval/high_resolution/*.py): what each of their regexes returns.
@pytest.mark.parametrize("text,expected", [
    ("\\boxed{A}", ("A", True)),
    ("Let me think. The cup is left, so \\boxed{A}", ("A", True)),   # reasoning before the box
    ("\\boxed{b} first, then \\boxed{A}", ("A", True)),              # the first STRICT box wins
    ("\\boxed{B} and later \\boxed{A}", ("B", True)),                # the first box, not the last
    ("\\boxed{a}", ("A", False)),                                   # lowercase: fallback, no format bonus
    ("\\boxed (C)", ("C", False)),
    ("boxed[d]", ("D", False)),
    ("B", (None, False)),                                            # unboxed letter: nothing
    ("The answer is B.", (None, False)),
])
def test_correct_first_extraction(text, expected):
    assert common.correct_first(text) == expected


def test_accuracy_reward_values():
    mcq = ["left", "right"]
    assert common.accuracy_reward("\\boxed{A}", "A", mcq) == 1.0
    assert common.accuracy_reward("Reasoning first... \\boxed{A}", "A", mcq) == 1.0   # reasoning is fine
    assert common.accuracy_reward("\\boxed{a}", "A", mcq) == 0.8                      # loose box
    assert common.accuracy_reward("A", "A", mcq) == 0.0                               # unboxed: 0
    assert common.accuracy_reward("\\boxed{B}", "A", mcq) == 0.0
    # yes/no: our departure, the same two rules on Yes / No
    assert common.accuracy_reward("\\boxed{Yes}", "Yes", []) == 1.0
    assert common.accuracy_reward("\\boxed{yes}", "Yes", []) == 0.8
    assert common.accuracy_reward("yes", "Yes", []) == 0.0
    assert common.accuracy_reward("\\boxed{No}", "Yes", []) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a dog.", "Yes"),
    ("There is no dog, the final answer is: Yes", "Yes"),           # the final-answer phrase first
    ("No doubt... \\boxed{Yes}", "Yes"),                            # then the first box
    ("I see it. yes", "Yes"),                                       # then the first yes/no word
    ("Nothing to say", None),                                       # 'No' inside a word is no answer
    ("\\boxed{ No }", "No"),
    ("", None),
])
def test_extract_yes_no_official(text, expected):
    assert common.extract_yes_no(text) == expected


@pytest.mark.parametrize("text,hrbench,vstar", [
    ("\\boxed{b}", "B", "B"),
    ("$\\boxed{\\text{C}}$", "C", "C"),           # V*'s box regex reads \text{}; HR-Bench's last rule finds the C
    ("The final answer is: d", "D", "D"),
    ("A dog sits left. \\boxed{B}", "B", "B"),     # a box beats everything
    ("A dog sits on the left.", "A", "A"),         # HR-Bench: first capital A-D anywhere; V*: a leading letter
    ("It is (B).", "B", None),                     # V* wants the letter at the start
    ("(B) the right one", "B", "B"),
    ("It is on the right.", None, None),
])
def test_extract_option_hrbench_and_vstar(text, hrbench, vstar):
    assert common.extract_option_hrbench(text) == hrbench
    assert common.extract_option_vstar(text) == vstar


def test_prompts_official_wording():
    assert common.defender_prompt("Is it red?", []) == (
        "Please answer the following question with only 'Yes' or 'No'.\n\nIs it red?\n\n"
        "Answer with \\boxed{Yes} or \\boxed{No}.")
    pre = "Please answer the following multiple-choice question. Choose the best answer from the options provided.\n\n"
    post = "\n\nProvide your final answer in the format \\boxed{X}, where X is the letter of your choice."
    assert common.defender_prompt("Where?", ["left", "right"]) == pre + "Where?\nOptions:\nA. left\nB. right" + post
    assert common.defender_prompt("Where?", ["left", "right"], "vstar") == pre + "Where?\n(A) left\n(B) right" + post
    assert common.attack_instruction("Where?") == \
        "Add a plausible distractor object to mislead a model answering: Where?"
    # the message: the text, then the image
    _, proc = common.load_defender("tiny")
    ids = common.defender_inputs(proc, [Image.new("RGB", (56, 56))], ["Is it red?"], "cpu")["input_ids"][0].tolist()
    text = proc.tokenizer.decode(ids)
    assert text.index("Is it red?") < text.index("<|vision_start|>")


# --------------------------------------------------------------------------- SSIM
def test_ssim_identical_is_one():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert common.local_ssim(img, img, [[5, 5, 30, 30]]) == pytest.approx(1.0, abs=1e-12)
    assert common.local_ssim(img, img, []) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images_closed_form():
    # zero variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 100.0, 140.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x = torch.full((32, 32), a, dtype=torch.float64)
    y = torch.full((32, 32), b, dtype=torch.float64)
    assert common.local_ssim(x.numpy(), y.numpy(), [[0, 0, 16, 16]]) == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_direct_window_computation():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, (24, 24))
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    i, j = 12, 11   # interior pixel: the 11x11 window needs no padding
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    pa, pb = a[i - 5:i + 6, j - 5:j + 6], b[i - 5:i + 6, j - 5:j + 6]
    ma, mb = (w * pa).sum(), (w * pb).sum()
    va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
    cov = (w * pa * pb).sum() - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    direct = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    smap = common.ssim_map(torch.tensor(a), torch.tensor(b))
    assert smap[i, j].item() == pytest.approx(direct, rel=1e-9)
    # local SSIM = mean of the map inside the box, averaged over boxes
    boxes = [[2, 3, 10, 9], [14, 14, 24, 20]]
    expected = (smap[3:9, 2:10].mean() + smap[14:20, 14:24].mean()).item() / 2
    assert common.local_ssim(a, b, boxes) == pytest.approx(expected, rel=1e-12)


def test_attacker_reward_gate_and_failures():
    assert common.attacker_reward(0.9, 1.0) == pytest.approx(1.0)   # all k wrong
    assert common.attacker_reward(0.9, 0.5) == pytest.approx(0.25)  # half wrong, not all
    assert common.attacker_reward(0.9, 0.0) == 0.0
    assert common.attacker_reward(0.84, 1.0) == 0.0                 # gate closed
    assert common.attacker_reward(0.9, 0.75, tau=0.5, w_fraction=1.0, w_all=0.0) == pytest.approx(0.75)
    # the area gate (03's --max_area): an edit changing more of the image than max_area earns 0
    assert common.attacker_reward(0.9, 1.0, area=0.10, max_area=0.10) == pytest.approx(1.0)
    assert common.attacker_reward(0.9, 1.0, area=0.11, max_area=0.10) == 0.0
    assert common.attacker_reward(0.9, 1.0, area=0.9) == pytest.approx(1.0)   # off by default
    # the continuous area term (03's --area_scale): the reward x max(0, 1 - area / area_scale)
    assert common.attacker_reward(0.9, 0.5, area=0.1, area_scale=0.5) == pytest.approx(0.25 * 0.8)
    assert common.attacker_reward(0.9, 1.0, area=0.6, area_scale=0.5) == 0.0
    assert common.attacker_reward(0.8, 1.0, area=0.1, area_scale=0.5) == 0.0                # gate closed


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_trainable_only_and_previous_removed(tmp_path):
    """torch.distributed.checkpoint in one process: trainable weights + AdamW state + this rank's
    extras come back exactly; frozen weights are not written; only the newest checkpoint stays."""
    torch.manual_seed(0)

    def build():   # layer 0 frozen; layer 2 trainable but never used, so it never gets a gradient
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
        m[0].requires_grad_(False)
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    m, opt = build()
    for _ in range(3):
        m[1](m[0](torch.randn(5, 4))).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert rundir.load_checkpoint(tmp_path, m, opt) is None
    gen = torch.Generator().manual_seed(3)
    rundir.save_checkpoint(tmp_path, 2, m, opt, {"gen": gen.get_state(), "pos": [1, 2]})
    rundir.save_checkpoint(tmp_path, 3, m, opt, {"gen": gen.get_state(), "pos": [5, 6]})
    after_save = torch.rand(4)          # the global RNG (sampling without a generator) goes on from here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_000003"]
    torch.manual_seed(1)
    m2, opt2 = build()
    frozen = m2[0].weight.detach().clone()
    step, extra = rundir.load_checkpoint(tmp_path, m2, opt2)
    assert step == 3 and extra["pos"] == [5, 6] and torch.equal(extra["gen"], gen.get_state())
    assert torch.equal(torch.rand(4), after_save) and extra.keys() == {"gen", "pos"}
    assert torch.equal(m2[1].weight, m[1].weight) and torch.equal(m2[1].bias, m[1].bias)
    assert torch.equal(m2[0].weight, frozen)                     # not in the checkpoint: left as built
    assert m2[2].weight not in opt2.state                        # no state saved, none restored
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys() == {0, 1}
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert s2["param_groups"][0]["lr"] == 1e-3


# --------------------------------------------------------------------------- tiny models
def test_tiny_tokenizer_has_qwen_special_tokens():
    tok = tiny_models.build_tiny_tokenizer()
    for t in tiny_models.QWEN_SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == t
    assert len(tok.encode("Yes", add_special_tokens=False)) == 1
    assert len(tok.encode("No", add_special_tokens=False)) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_world_tokenizer_spells_the_stages_prompts_in_words():
    """The tiny world's tokenizer: the defender's MCQ prompt costs a word a token (113 tokens before the
    stages' wordings joined the corpus: 34 more, spelled in letters), and the edit pipeline's fixed drop of
    its template's first 64 tokens (prompt_template_encode_start_idx, set for Qwen's tokenizer: the system
    turn and "<|im_start|>user\n") ends where it is meant to: the kept embeddings start at the image."""
    from diffusers import QwenImageEditPipeline
    tok = tiny_models.build_tiny_tokenizer(extra_corpus=world.stage_wordings())
    question, options = "Is the red circle above or below the blue square?", ["above", "below"]
    text = tok.apply_chat_template([{"role": "user", "content": common.defender_prompt(question, options)}],
                                   tokenize=False, add_generation_prompt=True)
    pieces = tok.tokenize(text)
    assert len(pieces) == 79 and "Ġmultiple" in pieces and "assistant" in pieces
    pipe = editing.load_attacker("tiny")
    assert isinstance(pipe, QwenImageEditPipeline) and pipe.prompt_template_encode_start_idx == 64
    ids = tok(pipe.prompt_template_encode.format("Add a red triangle at the top left of the image."))["input_ids"]
    assert tok.convert_ids_to_tokens(ids[64:67]) == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    assert len(ids) - 64 == 3 + 12 + 5    # the image, a word a token, the turn's end


def test_tiny_world_tokenizer_gives_each_fixed_sentence_one_token():
    """The world's defender prompts: the system turn, the templates' fixed sentences and the world's three
    questions are one token each (a left/right prompt without its image: 30 tokens, 84 spelled a word a
    token); the option lines stay words; the edit template's 64-token drop is where it was."""
    questions = [q for q, _ in world.QUESTIONS.values()]
    sentences = world.fixed_sentences(questions)
    assert len(sentences) == 8 and sentences[1].startswith("Please answer the following multiple-choice")
    assert "Answer with \\boxed{Yes} or \\boxed{No}." in sentences      # the template's {{ }} unescaped
    tok = tiny_models.build_tiny_tokenizer(extra_corpus=world.stage_wordings(), sentences=sentences)
    for s in sentences:
        assert tok.tokenize(s) == [s]
    question, options = world.QUESTIONS["horizontal"]
    text = tok.apply_chat_template([{"role": "user", "content": common.defender_prompt(question, options)}],
                                   tokenize=False, add_generation_prompt=True)
    pieces = tok.tokenize(text)
    assert len(pieces) == 30 and question in pieces and "Ġleft" in pieces and "Ġright" in pieces
    assert tok.decode(tok(text)["input_ids"]) == text
    template = editing.load_attacker("tiny").prompt_template_encode
    ids = tok(template.format("Add a red triangle at the top left of the image."))["input_ids"]
    assert tok.convert_ids_to_tokens(ids[64:65]) == ["<|vision_start|>"] and len(ids) - 64 == 3 + 12 + 5


def test_tiny_defender_generates_and_is_deterministic():
    m1, proc = common.load_defender("tiny")
    m2, _ = common.load_defender("tiny")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert m1.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    head_dim = m1.config.text_config.hidden_size // m1.config.text_config.num_attention_heads
    assert sum(m1.config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    imgs = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (96, 64), (0, 0, 255))]
    out = common.defender_generate(m1, proc, imgs, ["Is it red?", "A longer question here?"],
                                   max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(o, str) and o for o in out)
    p = common.defender_p_yes(m1, proc, imgs, ["q?", "q?"])
    assert p.shape == (2,) and torch.all((p > 0) & (p < 1))


def test_defender_save_load_identical_logits(tmp_path):
    model, proc = common.load_defender("tiny")
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)  # not the tiny build's weights any more
    model.save_pretrained(tmp_path, safe_serialization=True)
    proc.save_pretrained(tmp_path)
    model2, proc2 = common.load_defender(str(tmp_path))
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    inp = common.defender_inputs(proc, [img], ["What is it?"], "cpu")
    inp2 = common.defender_inputs(proc2, [img], ["What is it?"], "cpu")
    assert torch.equal(inp["input_ids"], inp2["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, model2(**inp2).logits)


def test_tiny_edit_pipeline_produces_image():
    pipe = editing.load_attacker("tiny")
    img = Image.new("RGB", (64, 64), (120, 60, 30))
    # diffusers' own __call__ path (it resizes to 1 MP, so ask for a small output)
    out = pipe(image=img, prompt="add a cup", negative_prompt=" ", true_cfg_scale=2.0,
               num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == (64, 64)
    # our interface: condition kept at the edit resolution (no 1 MP resize)
    ctx = editing.encode_edit(pipe, [img], ["add a cup"], resolution=64)
    assert ctx.cond_latents.shape == (1, 16, 64) and ctx.img_shapes == [[(1, 4, 4), (1, 4, 4)]]
    # the condition at another size (the pipeline's 1 MP at paper scale): its own img_shapes entry
    ctx2 = editing.encode_edit(pipe, [Image.new("RGB", (96, 64))], ["add a cup"], resolution=64, cond_resolution=128)
    assert (ctx2.width, ctx2.height) == (80, 48) and ctx2.target_len == 15            # output: snap_size, /16
    assert ctx2.img_shapes == [[(1, 3, 5), (1, 6, 10)]] and ctx2.cond_latents.shape == (1, 60, 64)  # cond: /32
    sig = editing.sigma_schedule(pipe.scheduler, 4, 16)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and sig[-2] == pytest.approx(0.02)
    v = editing.predict_velocity(pipe.transformer, torch.randn(1, 16, 64), sig[:1], ctx, 4.0)
    assert v.shape == (1, 16, 64) and torch.isfinite(v).all()
    x = editing.decode_latents(pipe, torch.randn(1, 16, 64), 64, 64)
    assert x.shape == (1, 3, 64, 64)


def test_single_frame_vae_is_the_causal_conv3d_on_one_frame(monkeypatch):
    from diffusers import AutoencoderKLQwenImage
    calls = []
    conv3d = torch.nn.Conv3d._conv_forward
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda self, *a: calls.append(1) or conv3d(self, *a))
    with common.seeded(3):
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
        x = torch.rand(2, 3, 1, 32, 48) * 2 - 1
        video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
        lat = torch.randn(2, 16, 1, 4, 6)
    with torch.no_grad():
        z, rec = vae.encode(x).latent_dist.mode(), vae.decode(lat).sample
        zv = vae.encode(video).latent_dist.mode()
        n3d = len(calls)
        editing.single_frame_vae(vae)
        z2, rec2 = vae.encode(x).latent_dist.mode(), vae.decode(lat).sample
        assert n3d > 0 and len(calls) == n3d                  # one frame: no conv3d left
        zv2 = vae.encode(video).latent_dist.mode()
        assert len(calls) > n3d
        inner = vae.decoder.conv_in.forward
        editing.single_frame_vae(vae)                          # a second call wraps nothing again
        assert vae.decoder.conv_in.forward is inner and torch.equal(vae.decode(lat).sample, rec2)
    assert z.abs().mean() > 0.01 and rec.abs().mean() > 0.01
    torch.testing.assert_close(z2, z, rtol=0, atol=1e-5)      # the kernel's last time slice, as conv2d
    torch.testing.assert_close(rec2, rec, rtol=0, atol=1e-5)
    torch.testing.assert_close(zv2, zv, rtol=0, atol=1e-5)    # 5 frames: the first alone, then cached chunks of 4


def test_attacker_lora_roundtrip_and_effect(tmp_path):
    img = Image.new("RGB", (64, 64), (120, 60, 30))
    pipe = editing.load_attacker("tiny")
    params = editing.add_attacker_lora(pipe, rank=4, alpha=8)
    assert params and all(p.requires_grad for p in params)
    ctx = editing.encode_edit(pipe, [img], ["add a cup"], resolution=64)
    x, s = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    base = editing.predict_velocity(pipe.transformer, x, s, ctx, 1.0)  # B = 0: LoRA is a no-op
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    trained = editing.predict_velocity(pipe.transformer, x, s, ctx, 1.0)
    assert (trained - base).abs().max() > 1e-3
    editing.save_attacker_lora(pipe, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    pipe2 = editing.load_attacker("tiny", lora=str(tmp_path))
    with torch.no_grad():
        assert torch.equal(editing.predict_velocity(pipe2.transformer, x, s, ctx, 1.0), trained)
    # scale alpha / r survives the round trip (r=4, alpha=8 -> 2.0)
    assert pipe2.transformer.peft_config["default"].lora_alpha == 8


# --------------------------------------------------------------------------- progress and trackers
def test_progress_bar_on_a_terminal_only(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    for _ in common.progress(range(3), desc="[test] steps"):
        pass
    assert "[test] steps" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()
    for env, stream in (({"CI": "true"}, Terminal()), ({}, io.StringIO())):   # CI, or not a terminal: no bar
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "stderr", stream)
        for _ in common.progress(range(3), desc="[test] steps"):
            pass
        assert stream.getvalue() == ""


def test_jsonl_logger_tensorboard_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = rundir.JsonlLogger(tmp_path / "logs" / "03_round_1.jsonl", True, "tensorboard")
    for i in (1, 2):
        log.log({"iter": i, "reward_mean": 0.5 * i, "note": "text is not a scalar"})
    log.image("gallery", Image.new("RGB", (24, 8), (200, 10, 10)), 2)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "logs" / "03_round_1.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in rows] == [0.5, 1.0]                  # the JSONL stays the source of truth
    ev = EventAccumulator(str(tmp_path / "logs" / "tb" / "03_round_1")).Reload()
    assert ev.Tags()["scalars"] == ["03_round_1/reward_mean"] and ev.Tags()["images"] == ["03_round_1/gallery"]
    assert [(e.step, e.value) for e in ev.Scalars("03_round_1/reward_mean")] == [(1, 0.5), (2, 1.0)]
    assert (ev.Images("03_round_1/gallery")[0].width, ev.Images("03_round_1/gallery")[0].height) == (24, 8)
    with pytest.raises(SystemExit, match="--report_to"):
        rundir.JsonlLogger(tmp_path / "x.jsonl", True, "mlflow")


def test_best_keeps_the_best_scoring_values_through_a_checkpoint():
    """03's --select best_val: the values offered with the highest score (ties: the earlier) come back, also
    from a checkpoint's state (what a resumed run restores)."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    best = rundir.Best([p])
    best.offer(0, 0.25)
    with torch.no_grad():
        p.add_(1.0)                  # [2, 3]
    best.offer(2, 0.5)
    with torch.no_grad():
        p.add_(1.0)                  # [3, 4]: a tie, not kept
    best.offer(4, 0.5)
    assert (best.step, best.score) == (2, 0.5)
    state = best.state()
    again = rundir.Best([p])
    again.load(state)
    with torch.no_grad():
        p.mul_(10)
    again.restore()
    assert p.tolist() == [2.0, 3.0] and (again.step, again.score) == (2, 0.5)
