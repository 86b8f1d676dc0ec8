"""The tiny world (PRESET=tiny_world): a defender, VAE and editor of the ``tiny`` architectures (tiny_models.py)
trained on scenes the generator draws exactly (world_scene below, also stage 01's seed rows), saved as ordinary
model directories that the stages load by path.

  python tiny_world.py --out runs/tiny_world/models                           # build it (tens of minutes on 2 cores)
  python tiny_world.py --out runs/tiny_world/models --install models/tiny_world   # the shipped one (run_rounds.sh)
  python tiny_world.py --out runs/new/models --ship_to models/tiny_world       # build, then ship it (with a manifest)

The repository ships one built world (models/tiny_world, every file's sha256 in its manifest.json), so that a
run's numbers do not depend on the CPU that built the models: the build is deterministic on one CPU, not
across CPUs (AVX-512 and AVX2 kernels round differently, and small models amplify it); the defender and the
editor train on in top-ups while they fall short of a validation bar. Times, worlds, CPUs: bench/tiny_world.md.
The VAE starts as an exact 8x mean pool (``thumbnail_init``: 28.0 dB untrained, 28.4 dB after 200 steps, where
default-initialised training stalled at 16-18 dB) but its blur caps the local SSIM of untouched targets at
~0.66, so the world's attacker gate (03 preset) sits at 0.55, not the paper's 0.85.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import common
import editing
from common import seeded
from seeds import COLORS, SHAPES, draw_shape
from tiny_models import QWEN_IMAGE_SCHEDULER, tiny_vl_config, tiny_vl_processor

# ---------------------------------------------------------------------------------------------
# The world's scenes (stage 01's seeds for PRESET=tiny_world; the models below train on them)
# ---------------------------------------------------------------------------------------------
# Every scene is a 112 x 112 canvas with a colour-ramp background (red grows to the right, green
# downwards: Qwen2.5-VL has rotary positions only, and a tiny randomly initialised tower learns
# "where" far faster when the pixels carry it) and two objects: a red circle and a blue square (the
# targets, inside the central 2/3 that stage 01 extends outwards). The questions are fixed:
# left/right and above/below of the red circle and the blue square, and whether there is a red
# circle. On such scenes "the red thing" is the circle: a defender trained on them never has to tell
# shapes apart, the weakness AOT's attacker is there to find (a red triangle) and its defender
# training to repair. Measured (400 defender steps, 192 held-out scenes, a red triangle of 28 px
# drawn beyond the square or, for existence, anywhere): without other objects 97.9% clean, 58.9%
# attacked; with 0-2 triangles of other colours in every scene 92.7% clean, 73.4% attacked.
WORLD_SIZE = 112
WORLD_QUESTIONS = {
    "horizontal": ("Is the red circle to the left or to the right of the blue square?", ["left", "right"]),
    "vertical": ("Is the red circle above or below the blue square?", ["above", "below"]),
    "exists": ("Is there a red circle in the image?", []),
}


def world_background(size: int, noise_seed: int):
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = np.stack([50 + 150 * xx, 50 + 150 * yy, 110 + 0 * xx], -1)
    bg = bg + np.random.default_rng(noise_seed).normal(0, 2, (size, size, 3))
    return np.clip(bg, 0, 255).astype(np.uint8)


def free_box(rng, side, lo, hi, boxes, gap=3):
    """A side x side box inside [lo, hi) that keeps ``gap`` pixels from every box in ``boxes``."""
    for _ in range(200):
        x1, y1 = rng.randrange(lo, hi - side), rng.randrange(lo, hi - side)
        b = [x1, y1, x1 + side, y1 + side]
        if all(b[2] + gap <= o[0] or o[2] + gap <= b[0] or b[3] + gap <= o[1] or o[3] + gap <= b[1] for o in boxes):
            return b
    return None


def world_scene(index: int, seed: int = 0, size: int = WORLD_SIZE, kind: str | None = None) -> dict:
    """One scene of the world: {image, question, options, answer, targets, objects, kind}; the same
    (index, seed) always draws the same scene. Targets sit in the central 2/3 of the canvas, at least
    a fifth of the canvas apart along the asked axis, so every answer is unambiguous."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = kind or rng.choice(list(WORLD_QUESTIONS))
    lo, hi = size // 6, size - size // 6
    while True:
        sides = [int(size * rng.uniform(0.15, 0.2)) for _ in range(2)]
        circle = free_box(rng, sides[0], lo, hi, [])
        square = free_box(rng, sides[1], lo, hi, [circle])
        if square is None:
            continue
        axis = 1 if kind == "vertical" else 0
        if kind == "exists" or abs((circle[axis] + circle[axis + 2]) - (square[axis] + square[axis + 2])) / 2 >= size / 5:
            break
    objects = [("red circle", circle), ("blue square", square)]
    if kind == "exists" and rng.random() < 0.5:
        objects = objects[1:]                                   # the answer is No
    img = Image.fromarray(world_background(size, seed * 1_000_003 + index))
    draw = ImageDraw.Draw(img)
    for name, box in objects:
        color, shape = name.split()
        draw_shape(draw, shape, box, COLORS[color])
    question, options = WORLD_QUESTIONS[kind]
    named = dict(objects)
    targets = [{"name": n, "bbox": [float(v) for v in named[n]]} for n in ("red circle", "blue square") if n in named]
    if kind == "exists":
        answer = "Yes" if "red circle" in named else "No"
        targets = targets[:1] if answer == "Yes" else []
    else:
        answer = "A" if circle[axis] < square[axis] else "B"
    return dict(image=img, question=question, options=options, answer=answer, targets=targets,
                objects=[{"name": n, "bbox": b} for n, b in objects], kind=kind)


def world_seed_item(index: int, test_fraction: float, seed: int) -> dict:
    """A seed row for stage 01 (seeds.py's row format): the scene's central 2/3, which 01's scene
    extension grows back to a full canvas (pad 0.25 per side)."""
    s = world_scene(index, seed)
    m = WORLD_SIZE // 6
    image = s["image"].crop((m, m, WORLD_SIZE - m, WORLD_SIZE - m))
    targets = [{"name": t["name"], "bbox": [t["bbox"][0] - m, t["bbox"][1] - m, t["bbox"][2] - m, t["bbox"][3] - m]}
               for t in s["targets"]]
    # the split's own stream: an integer seed equal to the scene's (seed 0: both are `index`) made the split
    # decide the question kind too (the first draw of the same generator): every test scene was left/right
    split = "test" if random.Random(f"split {seed} {index}").random() < test_fraction else "train"
    return dict(id=f"world{index:06d}", image=image, question=s["question"], options=s["options"],
                answer=s["answer"], targets=targets, split=split)


def stage_wordings() -> list[str]:
    """The wordings the stages send, from their sources (the chat roles, the defender's templates, the
    editor's instructions with every colour, shape and place), for the world's tokenizer: a BPE that
    had not seen "multiple-choice" or "assistant" spelled them in letters, so the world's defender spent
    a quarter of its compute on spelling. (The random ``tiny`` models keep the plain corpus: the unit
    tests' calibrations rest on their weights.)"""
    places = [common.place_name([c, r, c + 1, r + 1], 3, 3) for r in range(3) for c in range(3)]   # the ninths
    return [
        "<|im_start|>system\n <|im_start|>user\n <|im_start|>assistant\n",
        common.MCQ_TEMPLATE, common.YES_NO_TEMPLATE, "Keep the image unchanged.",
        " ".join(f"Add a {c} {s} at the {p} of the image." for c in COLORS for s in SHAPES for p in places),
    ]


def fixed_sentences(questions=()) -> list[str]:
    """The sentences every defender prompt repeats word for word (the system turn, the two templates' fixed
    sentences) and ``questions``: the world's tokenizer gives each one token, as a real tokenizer would
    give a frequent word, so its prompts cost what carries information."""
    fixed = [p.replace("{{", "{").replace("}}", "}") for t in (common.MCQ_TEMPLATE, common.YES_NO_TEMPLATE)
             for p in t.split("\n\n") if "{question}" not in p]
    return ["You are a helpful assistant.", *fixed, *questions]




# ---------------------------------------------------------------------------------------------
# Training loops shared by the three models (the scenes they learn from: world_scene)
# ---------------------------------------------------------------------------------------------
def _fit(part: str, params, loss_at, steps: int, lr: float, warm: int, betas=(0.9, 0.999), log=print,
         log_every: int = 50):
    """The three world models' training loop: AdamW (no weight decay), linear warm-up over ``warm`` steps
    then cosine decay to 0, gradient clipping at 1.0; ``loss_at(step)`` returns the step's loss."""
    import math

    import torch
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(dict(part=part, step=step + 1, loss=round(loss.item(), 5), s=round(time.time() - t0, 1)))


def _top_ups(part: str, params, loss_for, check, bar: float, max_more: int, steps: int, lr: float, warm: int, log,
             **fit) -> list:
    """While ``check()`` < ``bar`` (0: never checked), at most ``max_more`` times: ``steps`` more steps on
    ``loss_for(k)``, the k-th top-up's loss (k = 1, 2, ...), each with its own warm-up and cosine. -> the checks."""
    params, values = list(params), [check()] if bar > 0 else []
    while values and values[-1] < bar and len(values) <= max_more:
        log(dict(part=part, check=values[-1], more=f"{steps} steps: below {bar}"))
        _fit(f"{part}_more", params, loss_for(len(values)), steps, lr, warm, (0.9, 0.98), log, **fit)
        values.append(check())
    return values


# ---------------------------------------------------------------------------------------------
# The world's defender: a 1.7M-parameter Qwen2.5-VL, supervised on the world's questions
# ---------------------------------------------------------------------------------------------
def world_defender_inputs(processor, scenes: list[dict]):
    """Teacher-forcing batch in the stages' exact chat format (common.defender_prompt): the prompt,
    then the answer "\\boxed{X}<|im_end|>"; labels only on the answer tokens. -> (inputs, labels)."""
    import torch

    tok = processor.tokenizer
    inputs = common.defender_inputs(processor, [s["image"] for s in scenes],
                                    [common.defender_prompt(s["question"], s["options"]) for s in scenes], "cpu")
    def completion(answer):
        return tok(f"\\boxed{{{answer}}}<|im_end|>")["input_ids"]
    answers = [completion(s["answer"]) for s in scenes]
    n, p, t = len(scenes), inputs["input_ids"].shape[1], max(map(len, answers))
    ids = torch.full((n, p + t), tok.pad_token_id)
    labels = torch.full((n, p + t), -100)
    attn = torch.zeros(n, p + t, dtype=torch.long)
    mm = torch.zeros(n, p + t, dtype=torch.long)
    ids[:, :p], attn[:, :p], mm[:, :p] = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    for i, a in enumerate(answers):
        ids[i, p:p + len(a)] = labels[i, p:p + len(a)] = torch.tensor(a)
        attn[i, p:p + len(a)] = 1
    return dict(input_ids=ids, attention_mask=attn, mm_token_type_ids=mm, pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"]), labels


def world_accuracy(model, processor, scenes: list[dict], images=None) -> float:
    """% of ``scenes`` (image, question, options, answer; ``images`` in place of theirs if given) the defender
    answers right, greedy as 05 scores it; the model's train / eval mode is restored."""
    was = model.training
    model.eval()
    answers = common.defender_generate(model, processor, images or [s["image"] for s in scenes],
                                       [common.defender_prompt(s["question"], s["options"]) for s in scenes],
                                       max_new_tokens=8, batch_size=64)
    model.train(was)
    return round(100 * sum(common.extract_answer(a, s["options"]) == s["answer"]
                           for a, s in zip(answers, scenes)) / len(scenes), 1)


def train_world_defender(steps: int = 400, batch: int = 32, lr: float = 2e-3, n_train: int = 2048,
                         n_test: int = 192, min_val_acc: float = 90.0, max_more: int = 3,
                         more_steps: int = 200, more_lr: float = 1e-3, log=print):
    """SFT of a fresh tiny Qwen2.5-VL on world scenes (seed 1: never a stage's seed scenes), token-mean
    cross-entropy on the answer "\\boxed{X}<|im_end|>". Then, while it answers fewer than ``min_val_acc`` %
    of 96 validation scenes (seed 8; the reported test scenes are seed 2), up to ``max_more`` more runs of
    ``more_steps`` (warm-up + cosine at ``more_lr``). Why the top-up, measured: the same 400 steps answered
    97.9% of held-out scenes on one CPU and 75.0% on another (its loss still falling; floating point decides
    where it stands), and 200 more steps at 1e-3 took that one to 93.8%. Hard labels, not label smoothing
    (tried: fragile greedy answers, round 1 won back 8 of 27.8 points; bench/tiny_world.md)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    pixels = WORLD_SIZE * WORLD_SIZE
    processor = tiny_vl_processor(min_pixels=pixels, max_pixels=pixels, extra_corpus=stage_wordings(),
                                  sentences=fixed_sentences([q for q, _ in WORLD_QUESTIONS.values()]))
    processor.tokenizer.padding_side = "left"   # as common.load_defender: batched generation
    config = tiny_vl_config(processor.tokenizer, hidden=128, layers=4, vision_hidden=96, vision_heads=4,
                             rope_theta=1e4)
    with seeded(10):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    train = [world_scene(i, seed=1) for i in range(n_train)]
    test = [world_scene(i, seed=2) for i in range(n_test)]
    batches = [world_defender_inputs(processor, train[i:i + batch]) for i in range(0, n_train, batch)]

    def loss_from(done):                            # after ``done`` steps: the next batch follows on
        def loss_at(step):
            x, y = batches[(done + step) % len(batches)]
            logits = model(**x).logits[:, :-1].float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
        return loss_at

    def accuracy(scenes, images=None):
        return world_accuracy(model, processor, scenes, images)
    model.train()
    _fit("defender", model.parameters(), loss_from(0), steps, lr, max(1, steps // 8), (0.9, 0.98), log)
    val = [world_scene(i, seed=8) for i in range(96)]
    val_acc = _top_ups("defender", model.parameters(), lambda k: loss_from(steps + (k - 1) * more_steps),
                       lambda: accuracy(val), min_val_acc, max_more, more_steps, more_lr, max(1, more_steps // 8), log)
    done = steps + max(0, len(val_acc) - 1) * more_steps
    model.eval()
    return model, processor, dict(
        defender_test_acc=accuracy(test),
        defender_oracle_acc=accuracy(test, [oracle_distractor(s, i)[0] for i, s in enumerate(test)]),
        defender_params=sum(p.numel() for p in model.parameters()), defender_steps=done, defender_val_acc=val_acc)


def oracle_distractor(scene: dict, seed: int, side_frac: float = 0.25) -> tuple:
    """(image, name, box): the scene with the distractor the world's shortcut predicts to be the most
    misleading, drawn exactly, never touching an object: a red triangle, for left/right and above/below on
    the far side of the blue square from the red circle ("the red thing" now straddles the square), for
    existence anywhere. The defender's accuracy on these (world.json "defender_oracle_acc") is a reference
    for what an attacker that adds one such shape could reach; stage 03 has to find it. (Measured on the
    world's defender, 192 scenes, 28 px: a red triangle there 58.9%, a blue one beyond the circle 85.9%.)"""
    import random

    from PIL import ImageDraw

    rng = random.Random(seed)
    side, taken = int(WORLD_SIZE * side_frac), [o["bbox"] for o in scene["objects"]]
    named = {o["name"]: o["bbox"] for o in scene["objects"]}
    ax = 0 if scene["kind"] == "horizontal" else 1

    def mid(b):                                        # centre along the asked axis
        return (b[ax] + b[ax + 2]) / 2
    box = None
    for _ in range(50):
        box = free_box(rng, side, 0, WORLD_SIZE, taken)
        if box is None or scene["kind"] == "exists":
            break
        if (mid(box) - mid(named["blue square"])) * (mid(named["red circle"]) - mid(named["blue square"])) < 0:
            break
    image = scene["image"].copy()
    if box is not None:
        draw_shape(ImageDraw.Draw(image), "triangle", box, COLORS["red"])
    return image, "red triangle", box


# ---------------------------------------------------------------------------------------------
# The world's editor: a Qwen-Image VAE and MMDiT trained on pairs the generator draws exactly
# ---------------------------------------------------------------------------------------------
KEEP = "Keep the image unchanged."
EXTEND = "Extend the scene naturally beyond its borders."   # stage 01's outpainting instruction


def world_edit_pair(index: int, seed: int = 3) -> tuple:
    """(condition image, instruction, target image): keep the scene, add a named coloured shape in
    a named ninth of the image, or extend the central 2/3 of a scene (padded as stage 01 pads it,
    edge colours blurred) back to the whole scene."""
    import random

    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed * 1_000_003 + index)
    s = world_scene(index, seed)
    scene = s["image"]
    task = rng.choices(["keep", "add", "extend"], weights=[1, 3, 1])[0]
    if task == "keep":
        return scene, KEEP, scene
    if task == "extend":
        m = WORLD_SIZE // 6
        crop = scene.crop((m, m, WORLD_SIZE - m, WORLD_SIZE - m))
        canvas = crop.resize((WORLD_SIZE, WORLD_SIZE), Image.BILINEAR).filter(ImageFilter.GaussianBlur(max(2, WORLD_SIZE // 32)))
        canvas.paste(crop, (m, m))
        return canvas, EXTEND, scene
    taken = [o["bbox"] for o in s["objects"]]
    third = WORLD_SIZE // 3
    for _ in range(20):
        r, c = rng.randrange(3), rng.randrange(3)
        side = int(WORLD_SIZE * rng.uniform(0.18, 0.26))
        x1 = c * third + rng.randrange(0, max(1, third - side + 1))
        y1 = r * third + rng.randrange(0, max(1, third - side + 1))
        box = [x1, y1, x1 + side, y1 + side]
        if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in taken):
            break
    else:
        return scene, KEEP, scene
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    target = scene.copy()
    draw_shape(ImageDraw.Draw(target), shape, box, COLORS[color])
    assert common.place_name(box, WORLD_SIZE, WORLD_SIZE) == common.place_name(
        [c * third + 1, r * third + 1, c * third + 2, r * third + 2], WORLD_SIZE, WORLD_SIZE)
    return scene, common.implant_instruction(f"{color} {shape}", box, WORLD_SIZE, WORLD_SIZE), target


def thumbnail_init(vae, k: float = 20.0, s: float = 0.02):
    """Initialise a Qwen-Image VAE (any size) so that it is, before any training, an exact 8x average
    pool (encoder: the latent's channels 0-2 are the mean RGB of each 8 x 8 block) and a smooth
    upsampling (decoder: nearest 2x then a [1, 2, 1] / 4 filter per level); everything else starts at zero.

    Why: from PyTorch's default initialisation this VAE stays at 16-18 dB (each image's mean colour) for
    300-600 steps: its residual branches and mid-block attention add O(1) position-blind terms that drown
    the skip path. Here those branches start at zero, the skip path carries (R, G, B, k) on four channels,
    and the heads' RMS norm is linearised: with a constant channel k >> |RGB| it divides by ~k, the gain
    ``k / sqrt(C) * s`` puts the colours at ~s, where SiLU(u) ~ u / 2, and the output conv multiplies by
    2 / s. Result: 27.0 dB on held-out world scenes with no training (8x pool + bilinear: 27.4 dB)."""
    import math

    import torch
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as q

    def eye(conv, n, gain=1.0):                     # conv_out[c] = gain * conv_in[c] (centre tap), c < n
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(n):
            conv.weight[c, c, -1, conv.weight.shape[3] // 2, conv.weight.shape[4] // 2] = gain
    smooth = torch.tensor([1.0, 2.0, 1.0]) / 4
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, q.QwenImageResidualBlock):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
                if isinstance(m.conv_shortcut, q.QwenImageCausalConv3d):
                    eye(m.conv_shortcut, 4)
            elif isinstance(m, q.QwenImageAttentionBlock):
                m.proj.weight.zero_()
                m.proj.bias.zero_()
            elif isinstance(m, q.QwenImageResample) and m.mode != "none":
                conv = m.resample[-1]
                conv.weight.zero_()
                conv.bias.zero_()
                for c in range(4):
                    if m.mode.startswith("down"):
                        conv.weight[c, c, :2, :2] = 0.25       # 2x2 mean (the pad is on the far side)
                    else:
                        conv.weight[c, c] = smooth[:, None] * smooth[None, :]
        enc_out, dec_in = vae.encoder.conv_out.weight.clone(), vae.decoder.conv_in.weight.clone()
        for part in (vae.encoder, vae.decoder):
            eye(part.conv_in, 3)
            part.conv_in.bias[3] = k
            part.norm_out.gamma[:3] = k / math.sqrt(part.norm_out.gamma.shape[0]) * s
            eye(part.conv_out, 3, 2 / s)
        # latent channels 3.. keep their random encoder rows (else they are 0 for ever, their std 0 and the
        # pipeline's latent normalisation divides by it); the decoder reads them only into its residual
        # branches' channels (4..), so the thumbnail path stays exact until training uses them
        z = vae.config.z_dim
        vae.encoder.conv_out.weight[3:z] = enc_out[3:z]
        vae.decoder.conv_in.weight[4:, 3:] = dec_in[4:, 3:]
        eye(vae.quant_conv, vae.quant_conv.weight.shape[0])
        eye(vae.post_quant_conv, vae.post_quant_conv.weight.shape[0])
    return vae


def train_world_vae(steps: int = 200, batch: int = 16, crop: int = 32, lr: float = 1e-4, n_train: int = 512,
                    n_test: int = 64, log=print):
    """A Qwen-Image VAE (8x down, 16 latent channels) started from ``thumbnail_init`` and fine-tuned to
    reconstruct world scenes and their edits (MSE on random crops, through the decoder without the final
    clamp; latents = the posterior's mode, which is what editing.encode_images uses); then its latent
    mean/std are written to its config (the pipeline's normalisation).
    Returns (vae, info): PSNR on held-out scenes before and after fine-tuning, and the local SSIM of the
    reconstruction on held-out scenes' target boxes (the ceiling of any attack's SSIM in this world)."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    with seeded(11):
        vae = thumbnail_init(AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                                    temperal_downsample=[False, True, True]))
    pictures = lambda n, seed: editing.images_to_tensor(   # noqa: E731  (scenes and edit targets, alternating)
        [world_edit_pair(i, seed)[i % 2 * 2] for i in range(n)], WORLD_SIZE, WORLD_SIZE)
    train, test = pictures(n_train, 4), pictures(n_test, 5)

    def reconstruct(x):
        with torch.no_grad():
            return torch.cat([vae.decode(vae.encode(c.unsqueeze(2)).latent_dist.mode()).sample[:, :, 0]
                              for c in x.split(32)])

    def psnr():
        return round((10 * torch.log10(4 / (reconstruct(test) - test).pow(2).mean((1, 2, 3)))).mean().item(), 2)

    info = {"vae_psnr_init": psnr()}

    def loss_at(step):
        g = torch.Generator().manual_seed(step)   # random crop x crop windows: the VAE is convolutional
        idx = torch.randint(0, len(train), (batch,), generator=g)
        i, j = (int(v) * 8 for v in torch.randint(0, (WORLD_SIZE - crop) // 8 + 1, (2,), generator=g))
        x = train[idx, :, i:i + crop, j:j + crop].unsqueeze(2)
        z = vae.encode(x).latent_dist.mode()      # a plain autoencoder: the pipelines only ever use the mode
        vae.clear_cache()
        rec = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0])   # decode() minus its clamp
        vae.clear_cache()
        return torch.nn.functional.mse_loss(rec, x)
    vae.train()
    _fit("vae", vae.parameters(), loss_at, steps, lr, 20, log=log)
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(c.unsqueeze(2)).latent_dist.mode() for c in train[:256].split(32)])
        vae.register_to_config(latents_mean=z.mean((0, 2, 3, 4)).tolist(), latents_std=z.std((0, 2, 3, 4)).tolist())
    info["vae_psnr"] = psnr()
    scenes = [world_scene(i, 5) for i in range(n_test)]
    recs = editing.tensor_to_images(reconstruct(editing.images_to_tensor([s["image"] for s in scenes], WORLD_SIZE, WORLD_SIZE)))
    ssim = [common.local_ssim(s["image"], r, [t["bbox"] for t in s["targets"]]) for s, r in zip(scenes, recs) if s["targets"]]
    info["vae_target_ssim"] = round(sum(ssim) / len(ssim), 3)
    return vae, info


def world_pipeline(text_encoder, processor, vae, layers: int = 2, heads: int = 4):
    """A QwenImageEditPipeline around the world's VAE and defender (its text encoder) and a fresh MMDiT of
    2 layers 128 wide (deeper or narrower ones learned worse: bench/tiny_world.md)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageTransformer2DModel
    with seeded(12):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=32,
            num_attention_heads=heads, joint_attention_dim=text_encoder.config.text_config.hidden_size,
            axes_dims_rope=(8, 12, 12))
    return QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                                 text_encoder=text_encoder, tokenizer=processor.tokenizer, processor=processor,
                                 transformer=transformer)


def encode_pairs(pipe, pairs, chunk: int = 32, drop_prompt: float = 0.0, seed: int = 0):
    """Cache what training needs once: per chunk of pairs, the EditContext (prompt embeddings from the
    frozen text encoder, condition latents) and the target latents. With ``drop_prompt`` a share of
    instructions becomes the empty prompt " " (the negative prompt of true CFG), as classifier-free
    guidance training does."""
    import random

    import torch

    rng = random.Random(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), chunk):
            part = pairs[i:i + chunk]
            instr = [" " if rng.random() < drop_prompt else p[1] for p in part]
            ctx = editing.encode_edit(pipe, [p[0] for p in part], instr, WORLD_SIZE, negative_prompt=None)
            x0 = editing.encode_images(pipe, editing.images_to_tensor([p[2] for p in part], WORLD_SIZE, WORLD_SIZE))
            out.append((ctx, x0.float()))
    return out


def noise_levels(n: int, power: float, generator):
    """n flow-matching noise levels s = 1 - (1 - u)^power, u ~ U(0, 1): P(s <= x) = 1 - (1 - x)^(1 / power),
    mean power / (power + 1); power 1 is uniform (u itself, bit for bit), power > 1 leans towards pure noise."""
    import torch
    u = torch.rand(n, generator=generator)
    return u if power == 1 else 1 - (1 - u) ** power


def world_edit(pipe, images, instructions, steps: int = 8, cfg: float = 4.0, seed: int = 0):
    """Plain Euler sampling of the flow (the stages' sigma schedule and true CFG): the editor's check."""
    import torch

    with torch.no_grad():
        ctx = editing.encode_edit(pipe, images, instructions, WORLD_SIZE)
        sigmas = editing.sigma_schedule(pipe.scheduler, steps, ctx.target_len)
        x = torch.randn(len(images), ctx.target_len, 64, generator=torch.Generator().manual_seed(seed))
        for i in range(steps):
            v = editing.predict_velocity(pipe.transformer, x, sigmas[i].view(1), ctx, cfg)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return editing.tensor_to_images(editing.decode_latents(pipe, x, WORLD_SIZE, WORLD_SIZE))


def train_world_editor(pipe, steps: int = 0, add_steps: int = 5000, batch: int = 16, lr: float = 1e-3,
                       add_lr: float = 1e-3, edit_weight: float = 3.0, noise_power: float = 1.0, n_train: int = 2048,
                       min_add_hit: float = 0.0, max_more: int = 1, more_steps: int = 2000, more_lr: float = 1e-3,
                       val_pairs: int = 96, log=print):
    """Flow matching on world pairs: x_s = (1 - s) x0 + s eps, s = 1 - (1 - u)^noise_power with u ~ U(0, 1)
    (1: uniform; 2: mean 2/3, the high noise levels where the layout and so an added shape is decided come
    more often), loss |v - (eps - x0)|^2
    (stage 02's objective, on the whole transformer instead of a LoRA), 10% empty prompts for CFG, with the
    loss on the tokens the edit changes (|x0 - condition| > 0.05, mean over the token's 64 latent values: the
    drawn shape, the extended border) weighted 1 + edit_weight for ``add_steps`` steps; ``steps`` > 0 trains
    that many plain steps first, each phase its own warm-up and cosine. Then, while it adds the asked shape
    in fewer than ``min_add_hit`` of ``val_pairs`` pairs (seed 10; editor_report's are seed 6), up to
    ``max_more`` weighted top-ups of ``more_steps`` at ``more_lr``; a top-up starts the pairs over with its own
    noise generator, so it continues a saved editor exactly as in the build. -> the validation hit rates.

    Why: plain flow matching copies the scene but never adds (the shape is ~2 of 49 tokens), so the edited
    tokens are weighted; the top-up because the same steps land elsewhere on another CPU (bench/tiny_world.md)."""
    import torch

    tr = pipe.transformer
    tr.requires_grad_(True)
    data = encode_pairs(pipe, [world_edit_pair(i) for i in range(n_train)], chunk=batch, drop_prompt=0.1)
    gen = torch.Generator().manual_seed(13)

    def loss_fn(weight):
        def loss_at(step):
            ctx, x0 = data[step % len(data)]
            s = noise_levels(x0.shape[0], noise_power, gen)
            eps = torch.randn(x0.shape, generator=gen)
            xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps
            err = (editing.predict_velocity(tr, xs, s, ctx, 1.0) - (eps - x0)).pow(2).mean(-1)    # (B, L)
            w = 1 + weight * ((x0 - ctx.cond_latents.float()).abs().mean(-1) > 0.05).float()
            return (err * w).sum() / w.sum()
        return loss_at
    tr.train()
    if steps:
        _fit("editor", tr.parameters(), loss_fn(0.0), steps, lr, max(1, steps // 20), (0.9, 0.98), log, log_every=100)
    if add_steps:
        _fit("editor_add", tr.parameters(), loss_fn(edit_weight), add_steps, add_lr, max(1, add_steps // 20),
             (0.9, 0.98), log, log_every=100)

    def check():                                    # the share of validation adds that hit, in eval mode
        tr.eval()
        hit = editor_report(pipe, n=val_pairs, pair_seed=10)[0].get("editor_add_hit", 0.0)
        tr.train()
        return hit

    def more(k):                                    # top-up k: the pairs from the first, its own noise
        nonlocal gen
        gen = torch.Generator().manual_seed(13 + k)
        return loss_fn(edit_weight)
    hits = _top_ups("editor", tr.parameters(), more, check, min_add_hit, max_more, more_steps, more_lr,
                    max(1, more_steps // 20), log, log_every=100)
    tr.eval().requires_grad_(False)
    return hits


# ---------------------------------------------------------------------------------------------
# Build, check and save the world's models (run_rounds.sh runs this first for PRESET=tiny_world)
# ---------------------------------------------------------------------------------------------
@dataclass
class Args:
    out: str = field(default="runs/tiny_world/models", metadata={"help": "writes defender/, editor/, world.json"})
    defender_steps: int = field(default=400, metadata={"help": "defender SFT steps (batch 32)"})
    defender_lr: float = field(default=2e-3, metadata={"help": "defender SFT peak learning rate"})
    defender_scenes: int = field(default=2048, metadata={"help": "defender training scenes"})
    defender_min_acc: float = field(default=90.0, metadata={"help": "train the defender on (200 steps at a time, at "
                                                                    "most --defender_max_more times) while it answers "
                                                                    "fewer %% of 96 validation scenes (0 = never)"})
    defender_max_more: int = field(default=3, metadata={"help": "at most this many 200-step top-ups"})
    vae_steps: int = field(default=200, metadata={"help": "VAE fine-tuning steps after thumbnail_init (batch 16, 32 px crops)"})
    vae_images: int = field(default=512, metadata={"help": "VAE training images"})
    editor_steps: int = field(default=0, metadata={"help": "editor (MMDiT) flow-matching steps, plain (batch 16; "
                                                             "0 = only the weighted phase)"})
    editor_lr: float = field(default=1e-3, metadata={"help": "editor peak learning rate, plain phase"})
    editor_add_steps: int = field(default=5000, metadata={"help": "editor steps with the edited tokens weighted"})
    editor_add_lr: float = field(default=1e-3, metadata={"help": "editor peak learning rate, weighted phase"})
    editor_edit_weight: float = field(default=3.0, metadata={"help": "extra loss weight of the edited tokens"})
    editor_noise_power: float = field(default=1.0, metadata={"help": "editor noise levels s = 1 - (1 - u)^p, u ~ U(0, 1) "
                                                                     "(1 = uniform; 2 draws high noise more often)"})
    editor_pairs: int = field(default=2048, metadata={"help": "editor training pairs"})
    editor_min_hit: float = field(default=0.7, metadata={"help": "train the editor on (2,000 weighted steps at 1e-3 at "
                                                                 "a time, at most --editor_max_more times) while it adds "
                                                                 "the asked shape in fewer of 96 validation pairs (0 = never)"})
    editor_max_more: int = field(default=1, metadata={"help": "at most this many editor top-ups"})
    check_items: int = field(default=48, metadata={"help": "held-out scenes / pairs in the checks (world.json)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    install: str = field(default="", metadata={"help": "install this shipped (manifest.json) or built world into "
                                                        "--out instead of building one"})
    ship_to: str = field(default="", metadata={"help": "then copy the world in --out here with its manifest "
                                                        "(models/tiny_world: the world run_rounds.sh installs)"})


def add_hit(condition, target, output, min_diff: int = 30) -> bool | None:
    """Did the editor add what it was asked to? On the pixels where the exact target differs from the
    condition (summed |RGB| > ``min_diff``: the drawn shape), the output is closer to the target than to
    the unedited condition (mean |RGB|). None when the pair adds nothing."""
    import numpy as np
    c, t, o = (np.asarray(im.convert("RGB"), dtype=np.float32) for im in (condition, target, output))
    drawn = np.abs(t - c).sum(-1) > min_diff
    if not drawn.any():
        return None
    return bool(np.abs(o[drawn] - t[drawn]).mean() < np.abs(o[drawn] - c[drawn]).mean())


def change_elsewhere(condition, target, output, margin: int = 8) -> float:
    """Mean |output - condition| (0-255, over RGB) away from what the target changes: outside its changed
    pixels dilated by ``margin``. For 'keep' (nothing changes) it is the editor's copy error, the floor;
    an 'add' above that floor also paints where it was not asked to."""
    import numpy as np
    from PIL import Image, ImageFilter
    c, t, o = (np.asarray(im.convert("RGB"), dtype=np.float32) for im in (condition, target, output))
    drawn = Image.fromarray(((np.abs(t - c).sum(-1) > 30) * 255).astype(np.uint8))
    away = np.asarray(drawn.filter(ImageFilter.MaxFilter(2 * margin + 1))) == 0
    return float(np.abs(o - c)[away].mean()) if away.any() else 0.0


def editor_report(pipe, n: int = 48, steps: int = 8, cfg: float = 4.0, pair_seed: int = 6) -> tuple[dict, list]:
    """The editor's samples (8 Euler steps, CFG 4) on held-out pairs: PSNR against the exact target per
    instruction kind; for 'add' also against the unedited scene (lower: something was added) and the hit
    rate (add_hit: the named shape appears where the target has it)."""
    import torch

    pairs = [world_edit_pair(i, seed=pair_seed) for i in range(n)]
    outs = []
    for i in range(0, n, 16):
        part = pairs[i:i + 16]
        outs += world_edit(pipe, [p[0] for p in part], [p[1] for p in part], steps=steps, cfg=cfg, seed=i)
    def psnr(a, b):
        x, y = (editing.images_to_tensor([im], WORLD_SIZE, WORLD_SIZE) for im in (a, b))
        return (10 * torch.log10(4 / (x - y).pow(2).mean())).item()
    report = {}
    for kind in ("keep", "add", "extend"):
        idx = [i for i, p in enumerate(pairs) if {KEEP: "keep", EXTEND: "extend"}.get(p[1], "add") == kind]
        if idx:
            report[f"editor_psnr_{kind}"] = round(sum(psnr(outs[i], pairs[i][2]) for i in idx) / len(idx), 2)
        if kind == "add" and idx:
            report["editor_psnr_add_vs_unedited"] = round(sum(psnr(outs[i], pairs[i][0]) for i in idx) / len(idx), 2)
            hits = [h for h in (add_hit(pairs[i][0], pairs[i][2], outs[i]) for i in idx) if h is not None]
            report["editor_add_hit"] = round(sum(hits) / max(1, len(hits)), 3)
            report["editor_add_change_elsewhere"] = round(sum(change_elsewhere(*pairs[i][::2], outs[i]) for i in idx)
                                                          / len(idx), 2)
        if kind == "keep" and idx:
            report["editor_keep_change"] = round(sum(change_elsewhere(*pairs[i][::2], outs[i]) for i in idx) / len(idx), 2)
    return report, [(p[0], o) for p, o in zip(pairs, outs)]


def build(args: Args) -> Path:
    """Train the three models unless ``out`` holds them; -> out. Times: the module docstring."""
    import torch

    import rundir
    out = Path(args.out)
    if (out / "world.json").exists():
        print(f"[world] {out} exists: models built earlier ({out / 'world.json'})")
        return out
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = rundir.tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log_file = (tmp / "build_log.jsonl").open("w")

    def log(d):
        print(f"[world] {d}", flush=True)
        log_file.write(json.dumps(d) + "\n")
    t0 = time.time()
    defender, processor, info = train_world_defender(steps=args.defender_steps, lr=args.defender_lr,
                                                     min_val_acc=args.defender_min_acc, max_more=args.defender_max_more,
                                                     n_train=args.defender_scenes, n_test=args.check_items, log=log)
    info["defender_s"] = round(time.time() - t0)
    defender.save_pretrained(tmp / "defender", safe_serialization=True)
    processor.save_pretrained(tmp / "defender")
    t1 = time.time()
    vae, vae_info = train_world_vae(steps=args.vae_steps, n_train=args.vae_images, n_test=args.check_items, log=log)
    info.update(vae_info)
    info["vae_s"] = round(time.time() - t1)
    t2 = time.time()
    pipe = world_pipeline(defender, processor, vae)
    info["editor_val_add_hit"] = train_world_editor(
        pipe, steps=args.editor_steps, add_steps=args.editor_add_steps, lr=args.editor_lr, add_lr=args.editor_add_lr,
        edit_weight=args.editor_edit_weight, noise_power=args.editor_noise_power, n_train=args.editor_pairs,
        min_add_hit=args.editor_min_hit, max_more=args.editor_max_more, log=log)
    info["editor_s"] = round(time.time() - t2)
    report, samples = editor_report(pipe, n=args.check_items)
    info.update(report)
    pipe.save_pretrained(tmp / "editor", safe_serialization=True)
    rundir.save_gallery(samples[:8], tmp / "editor_samples.png")
    info.update(total_s=round(time.time() - t0), args=vars(args))
    (tmp / "world.json").write_text(json.dumps(info, indent=2))
    log(info)
    log_file.close()
    rundir.commit_dir(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# The shipped world: the models built once, committed with a manifest, installed into a run
# ---------------------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parent / "models" / "tiny_world"
# the editor's text encoder is the defender: its weights are stored once, under defender/
SAME_FILE = {"editor/text_encoder/model.safetensors": "defender/model.safetensors"}
NOT_SHIPPED = ("editor_samples.png",)


def sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ship(src: str | Path, dst: str | Path = SHIPPED) -> Path:
    """A built world (``--out`` of a build) -> ``dst`` with manifest.json (every file's sha256), the
    editor's text encoder stored once (it is the defender), the sample gallery left out."""
    import rundir
    src, dst = Path(src), Path(dst)
    if not (src / "world.json").exists():
        raise SystemExit(f"[world] {src} holds no built world (no world.json)")
    for copy, original in SAME_FILE.items():
        if sha256(src / copy) != sha256(src / original):
            raise SystemExit(f"[world] {src / copy} differs from {src / original}: cannot store it once")
    tmp = rundir.tmp_dir_for(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    files = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        if rel in SAME_FILE or rel in NOT_SHIPPED:
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, tmp / rel)
        files[rel] = sha256(f)
    info = json.loads((tmp / "world.json").read_text())
    info["args"].pop("out", None)   # a path of the machine that built it
    (tmp / "world.json").write_text(json.dumps(info, indent=2))
    files["world.json"] = sha256(tmp / "world.json")
    (tmp / "manifest.json").write_text(json.dumps(dict(files=files, same_file=SAME_FILE), indent=2))
    rundir.commit_dir(tmp, dst)
    return dst


def install(src: str | Path, out: str | Path) -> Path:
    """A shipped world (checked against its manifest) or a built one -> ``out``, the run's models/."""
    import rundir
    src, out = Path(src), Path(out)
    if (out / "world.json").exists():
        print(f"[world] {out} exists: installed earlier")
        return out
    manifest = src / "manifest.json"
    if not manifest.exists() and not (src / "world.json").exists():
        raise SystemExit(f"[world] {src} is neither a shipped world (manifest.json) nor a built one (world.json)")
    tmp = rundir.tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    if manifest.exists():
        m = json.loads(manifest.read_text())
        bad = [rel for rel, digest in m["files"].items() if not (src / rel).is_file() or sha256(src / rel) != digest]
        if bad:
            raise SystemExit(f"[world] {src}: {len(bad)} file(s) missing or not as in manifest.json: {', '.join(bad[:3])} "
                             f"(git lfs or a partial checkout? rebuild with WORLD=build)")
        for rel in m["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        for copy, original in m["same_file"].items():
            shutil.copy2(tmp / original, tmp / copy)
    else:
        shutil.copytree(src, tmp)
    rundir.commit_dir(tmp, out)
    print(f"[world] installed {src} -> {out}")
    return out


if __name__ == "__main__":
    import common
    import rundir
    common.quiet()
    args = rundir.parse_args(Args, {})
    if args.install:
        install(args.install, args.out)
    else:
        build(args)
    if args.ship_to:
        print(f"[world] shipped {args.out} -> {ship(args.out, args.ship_to)}")
