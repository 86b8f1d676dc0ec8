"""Shared pieces of the AOT reference scripts, and nothing else.

1. Model loading: the defender MLLM (Qwen2.5-VL); hub ids, local paths, or ``tiny`` (tiny_models.py:
   a small offline version). The attacker (Qwen-Image-Edit) loads, encodes and predicts in editing.py.
2. The defender's model interface (batched generation within a memory budget): every stage calls
   it, so it lives here once. torchrun and FSDP2 are parallel.py.
4. Prompts (the authors' eval wording, the attacker's adversarial instruction).
5. Rewards: answer extraction and the DAPO reward as the authors' scripts compute them, DAPO's
   soft overlong penalty, local SSIM and the attacker reward.
6. A progress bar. The run directory's I/O (checkpoints, logs, atomic outputs, arguments) is rundir.py.
"""

from __future__ import annotations

import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TINY = "tiny"
DEFENDER_ID = "Qwen/Qwen2.5-VL-7B-Instruct"

@contextmanager
def seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------
# 1b. Loading
# ---------------------------------------------------------------------------------------------
def quiet():
    """Silence progress bars and load-time chatter of datasets / transformers / diffusers."""
    import datasets
    import diffusers
    import transformers
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def load_stage(path: str):
    """Import a stage script (e.g. "03_train_attacker.py", a name Python's import cannot spell; relative
    to the repository) as the module "train_attacker": for the benches and tests that call its functions."""
    import importlib.util
    path = Path(__file__).resolve().parent / path
    spec = importlib.util.spec_from_file_location(path.stem.lstrip("0123456789_"), path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name: str, device) -> torch.dtype:
    """``--dtype``: 'bf16' | 'fp32' | 'auto' (bf16 on GPU, fp32 on CPU). This is the dtype of frozen
    models and of compute; trainable weights are fp32 whatever it is (verl, EasyR1, flow_grpo)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


@contextmanager
def named_model(role: str, name_or_path: str):
    """A model that cannot be loaded (offline and not cached, a wrong id or path) ends the stage with the
    library's own message and one line saying which stage needed which model."""
    try:
        yield
    except (OSError, ValueError) as e:
        stage = Path(sys.argv[0]).name or "python"
        offline = " (HF_HUB_OFFLINE is set: only local paths and the hub cache are read)" \
            if os.environ.get("HF_HUB_OFFLINE") else ""
        raise SystemExit(f"{type(e).__name__}: {e}\n[{stage}] could not load the {role} model "
                         f"{name_or_path!r}{offline}") from None


def load_defender(name_or_path: str = DEFENDER_ID, device="cpu", dtype=torch.float32,
                  min_pixels: int | None = None, max_pixels: int | None = None):
    """-> (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor). ``tiny`` builds offline."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    if name_or_path == TINY:   # the same weights in every process: a fixed seed
        from tiny_models import build_tiny_defender
        with seeded(0):
            model, _ = build_tiny_defender()
    else:
        with named_model("defender (Qwen2.5-VL)", name_or_path):
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                name_or_path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    with named_model("defender's processor", name_or_path):
        processor = load_processor(name_or_path)
    processor.tokenizer.padding_side = "left"  # batched generation
    ip = processor.image_processor
    if min_pixels or max_pixels:
        ip.size = {"shortest_edge": min_pixels or ip.size["shortest_edge"],
                   "longest_edge": max_pixels or ip.size["longest_edge"]}
    return model.to(device=device, dtype=dtype).eval(), processor


def load_processor(name_or_path: str = DEFENDER_ID):
    """The defender's processor as saved with the model (its own pixel limits)."""
    from transformers import AutoProcessor
    if name_or_path == TINY:
        from tiny_models import tiny_vl_processor
        return tiny_vl_processor()
    return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=False)


def lora_parameters(module) -> list[torch.nn.Parameter]:
    """The adapter's weights, made trainable and fp32 whatever the frozen base's dtype (flow_grpo
    keeps its LoRA in fp32 too: an AdamW step at lr 1e-4 is below bf16's resolution for most
    weights). peft runs the adapter branch in the adapter's dtype and casts back to the base's."""
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


# ---------------------------------------------------------------------------------------------
# 2. The defender's model interface (used by stages 01, 03, 04, 05)
# ---------------------------------------------------------------------------------------------
def as_images(image) -> list[Image.Image]:
    """An item's images: one PIL image, or a list of them (multi-image benchmark rows)."""
    return list(image) if isinstance(image, (list, tuple)) else [image]


def defender_inputs(processor, images: list, prompts: list[str], device, assistant_prefix: str = "",
                    layout: str = "text_first"):
    """Left-padded chat inputs, one user turn each. ``images[i]`` is one PIL image or a list of them.
    layout 'text_first': the text, then the image(s) (the authors' eval layout); 'images_first': every
    image in order, then the text (VLMEvalKit's Qwen2-VL prompts, multi-image rows included)."""
    texts, flat = [], []
    for im, p in zip(images, prompts):
        ims = as_images(im)
        content = [{"type": "image"} for _ in ims]
        content = ([{"type": "text", "text": p}] + content) if layout == "text_first" else (content + [
            {"type": "text", "text": p}])
        msgs = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                     + assistant_prefix)
        flat += [x.convert("RGB") for x in ims]
    inputs = processor(text=texts, images=flat, padding=True, return_tensors="pt")
    return inputs.to(device)


def prompt_length(processor, image, text: str) -> tuple[int, int]:
    """(tokens, vision patches) of one chat prompt from the image sizes and the processor's pixel
    limits (smart_resize), without running the processor: ~32 template tokens + text + images."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    ip = processor.image_processor
    f = ip.patch_size * ip.merge_size
    n_img = 0
    for im in as_images(image):
        h, w = smart_resize(im.height, im.width, factor=f, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])
        n_img += (h // f) * (w // f)
    return 32 + len(processor.tokenizer(text)["input_ids"]) + n_img, n_img * ip.merge_size**2


def memory_batches(model, processor, images, prompts, max_new_tokens: int, memory_gb: float,
                   max_batch: int = 0, repeat: int = 1) -> list[slice]:
    """Consecutive slices of the prompts for generate calls (each prompt sampled ``repeat`` times
    from its one prefill, as 04's sample_groups) whose memory stays within memory_gb: per prompt,
    ``repeat`` KV caches of prompt + max_new_tokens (from the config) and the prefill's working set
    of one layer, ~6 x intermediate x 2 bytes per token (text) or patch (vision), as measured on
    real-size layers by bench/paper_scale.py; every prompt padded to the call's longest.
    max_batch caps the prompts per call (0 = none)."""
    tc, vc = model.config.text_config, model.config.vision_config
    kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2
    budget, out, start, worst = memory_gb * 1e9, [], 0, 0.0
    for i, (im, p) in enumerate(zip(images, prompts)):
        n, patches = prompt_length(processor, im, p)
        one = repeat * kv * (n + max_new_tokens) + 12 * tc.intermediate_size * n + 12 * vc.intermediate_size * patches
        need = max(worst, one)
        full = (i - start + 1) * need > budget or (max_batch and i - start >= max_batch)
        if full and i > start:
            out.append(slice(start, i))
            start, need = i, one
        worst = need
    return out + ([slice(start, len(prompts))] if start < len(prompts) else [])


@torch.no_grad()
def defender_generate(model, processor, images, prompts, max_new_tokens=64, temperature=0.0,
                      top_p=1.0, batch_size=16, desc: str | None = None, memory_gb: float = 0.0,
                      layout: str = "text_first") -> list[str]:
    """Batched answers (greedy when temperature == 0); a progress bar when ``desc`` is given.
    memory_gb > 0: as many prompts per call (up to batch_size) as that memory holds (memory_batches).
    ``images[i]``: a PIL image or a list of them; ``layout``: see defender_inputs."""
    out = []
    batches = memory_batches(model, processor, images, prompts, max_new_tokens, memory_gb, batch_size) \
        if memory_gb > 0 else [slice(i, i + batch_size) for i in range(0, len(prompts), batch_size)]
    for b in progress(batches, desc=desc or "", disable=desc is None):
        inputs = defender_inputs(processor, images[b], prompts[b], model.device, layout=layout)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
                  pad_token_id=processor.tokenizer.pad_token_id)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        seq = model.generate(**inputs, **kw)
        out += processor.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def defender_p_yes(model, processor, images, questions, batch_size=16) -> torch.Tensor:
    """P(Yes) / (P(Yes) + P(No)) at the first answer position: one forward, always defined."""
    tok = processor.tokenizer
    yes, no = tok.encode("Yes", add_special_tokens=False)[0], tok.encode("No", add_special_tokens=False)[0]
    out = []
    for i in range(0, len(questions), batch_size):
        inputs = defender_inputs(processor, images[i:i + batch_size],
                                        [yes_no_prompt(q) for q in questions[i:i + batch_size]], model.device)
        logits = model(**inputs).logits[:, -1].float()  # left padding: last position is the answer's
        out.append(torch.softmax(logits[:, [yes, no]], dim=-1)[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# 4. Prompts
# ---------------------------------------------------------------------------------------------
OPTION_LETTERS = "ABCDEFGH"
ATTACK_INSTRUCTION = "Add a plausible distractor object to mislead a model answering: {question}"


# The authors' eval/config/prompts.toml: yes/no and MCQ wordings; {question} is the question block.
YES_NO_TEMPLATE = ("Please answer the following question with only 'Yes' or 'No'.\n\n{question}\n\n"
                   "Answer with \\boxed{{Yes}} or \\boxed{{No}}.")
MCQ_TEMPLATE = ("Please answer the following multiple-choice question. Choose the best answer from the options "
                "provided.\n\n{question}\n\nProvide your final answer in the format \\boxed{{X}}, where X is the "
                "letter of your choice.")


def yes_no_prompt(question: str) -> str:
    return YES_NO_TEMPLATE.format(question=question)


def mcq_prompt(question: str, options: list[str], layout: str = "hrbench") -> str:
    """The MCQ block as the official scripts lay it out: HR-Bench "Options:\nA. x" (also every other
    MCQ, our scenes included), V* "(A) x"."""
    if layout == "vstar":
        block = question + "\n" + "\n".join(f"({OPTION_LETTERS[i]}) {o}" for i, o in enumerate(options))
    else:
        block = f"{question}\nOptions:\n" + "\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options))
    return MCQ_TEMPLATE.format(question=block)


def defender_prompt(question: str, options: list[str], layout: str = "hrbench") -> str:
    """Official eval wording: yes/no when there are no options, else the MCQ block. Training uses
    the same wording (the official training data is not released)."""
    return mcq_prompt(question, options, layout) if options else yes_no_prompt(question)


def attack_instruction(question: str) -> str:
    return ATTACK_INSTRUCTION.format(question=question)


def implant_instruction(obj: str, bbox, width: int, height: int) -> str:
    """Stage 01's implantation instruction (and the tiny world editor's training wording)."""
    return f"Add a {obj} at the {place_name(bbox, width, height)} of the image."


def place_name(bbox, width: int, height: int) -> str:
    """The ninth of the image a box's centre falls in: 'top left', 'top', ..., 'center', ..., 'bottom right'."""
    col = min(2, int(3 * (bbox[0] + bbox[2]) / 2 / width))
    row = min(2, int(3 * (bbox[1] + bbox[3]) / 2 / height))
    name = f"{['top', '', 'bottom'][row]} {['left', '', 'right'][col]}".strip()
    return name or "center"


# ---------------------------------------------------------------------------------------------
# 5. Rewards and answer extraction (one function per official behaviour)
# ---------------------------------------------------------------------------------------------
_FINAL = r"(?:final answer|the final answer is|the answer is)\s*:?\s*"


def extract_yes_no(text: str) -> str | None:
    """eval/hallucination/{pope,hallusionbench}.py: a final-answer phrase, then the first box, then the
    first yes/no word anywhere. "Yes" / "No" or None."""
    for pattern in (_FINAL + r"\b(Yes|No)\b", r"\\?boxed\s*[\{\(]\s*\b(Yes|No)\b\s*[\}\)]", r"\b(Yes|No)\b"):
        m = re.search(pattern, text.strip(), re.IGNORECASE)
        if m:
            return m.group(1).capitalize()
    return None


def extract_option_hrbench(text: str, letters: str = "ABCD") -> str | None:
    """eval/high_resolution/hrbench{4k,8k}.py: the first box, then a final-answer phrase, then the first
    capital option letter anywhere in the text (so a leading article "A" counts, as there)."""
    m = (re.search(rf"\\?boxed\s*[\{{\(]\s*([{letters}])\s*[\}}\)]", text, re.IGNORECASE)
         or re.search(_FINAL + rf"([{letters}])", text, re.IGNORECASE))
    if m:
        return m.group(1).upper()
    m = re.search(f"[{letters}]", text)
    return m.group(0) if m else None


def extract_option_vstar(text: str) -> str | None:
    """eval/high_resolution/vstarbench.py: a box (also $\\boxed{\\text{B}}$), then a final-answer phrase,
    then a letter A-E at the very start ("(B) ...")."""
    m = (re.search(r"\$?\s*\\?boxed\s*[\{\(]\s*(?:\\text\{)?\s*([A-Z])\s*\}?\s*[\}\)]\s*\$?", text, re.IGNORECASE)
         or re.search(_FINAL + r"([A-Z])", text, re.IGNORECASE))
    if m:
        return m.group(1).upper()
    m = re.match(r"\s*\(?([A-E])\)?", text)
    return m.group(1) if m else None


def extract_answer(text: str, options: list[str] | None = None, style: str = "hrbench") -> str | None:
    """The defender's answer to one of our scenes or a benchmark item: the official yes/no rule
    without options; with options V*'s rule (style 'vstar') or HR-Bench's over the item's letters."""
    if not options:
        return extract_yes_no(text)
    if style == "vstar":
        return extract_option_vstar(text)
    return extract_option_hrbench(text, OPTION_LETTERS[:len(options)])


def correct_first(text: str, yes_no: bool = False) -> tuple[str | None, bool]:
    """scripts/reward/correct_first.py: the FIRST \\boxed{<capital letter>} anywhere -> (letter, True);
    else a looser box (any case, \\boxed (X), \\boxed[X], "boxed{x}") -> (LETTER, False); else (None,
    False). yes_no: the same two rules on Yes / No (the official reward reads letters only)."""
    strict, loose = (r"\\boxed\{(Yes|No)\}", r"(yes|no)") if yes_no else (r"\\boxed\{([A-Z])\}", r"([A-Z])")
    m = re.search(strict, text)
    if m:
        return m.group(1), True
    m = re.search(r"\\?boxed\s*[\{\(\[]\s*" + loose + r"\s*[\}\)\]]", text, re.IGNORECASE)
    if m:
        return (m.group(1).capitalize() if yes_no else m.group(1).upper()), False
    return None, False


def accuracy_reward(text: str, answer: str, options: list[str] | None = None) -> float:
    """The official DAPO reward: 0.8 if the extracted answer is right, + 0.2 if it was a strict
    \\boxed{X}; 0 for anything else, an unboxed answer included."""
    pred, strict = correct_first(text, yes_no=not options)
    if pred is None or pred != str(answer).strip():
        return 0.0
    return 1.0 if strict else 0.8


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()   # the 2D window is its outer product, applied as rows then columns


def _to_gray(image) -> torch.Tensor:
    """PIL or (3, H, W) / (H, W, 3) uint8-range array -> (H, W) float64 luma in [0, 255]."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float64))
    t = torch.as_tensor(np.asarray(image), dtype=torch.float64)
    if t.ndim == 3:
        t = t.permute(1, 2, 0) if t.shape[0] == 3 else t
        t = t @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    return t


def ssim_map(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5,
             data_range: float = 255.0) -> torch.Tensor:
    """SSIM map (Wang et al. 2004; Gaussian window, K1=0.01, K2=0.03), 'same' size via reflect pad. The
    window is separable, applied as rows then columns: the same map to ~1e-13, ~5x faster than one 11 x 11
    float64 convolution (112 px on 2 cores: ~2 ms an image against ~9, measured; batching was slower)."""
    g, pad = _gaussian_1d(size, sigma).to(a), size // 2
    x = torch.stack([a, b])[:, None]  # (2, 1, H, W)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if min(a.shape) > pad else "replicate")
    m = F.conv2d(F.conv2d(torch.cat([x, x * x, x[:1] * x[1:]]), g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))[:, 0]
    mu_a, mu_b, sq_a, sq_b, xy = m
    var_a, var_b = sq_a - mu_a**2, sq_b - mu_b**2
    cov = xy - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def local_ssim(original, edited, boxes: list[list[float]]) -> float:
    """Mean SSIM over the target boxes (grayscale, 11x11 Gaussian window, sigma 1.5).

    The map is computed on the whole image and averaged inside each box, then over boxes;
    with no boxes the whole image counts. ``edited`` is resized to ``original`` if needed."""
    if isinstance(edited, Image.Image) and isinstance(original, Image.Image) and edited.size != original.size:
        edited = edited.resize(original.size, Image.BICUBIC)
    a, b = _to_gray(original), _to_gray(edited)
    if a.shape != b.shape:
        raise ValueError(f"local_ssim: image shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    smap = ssim_map(a, b)
    h, w = smap.shape
    if not boxes:
        return float(smap.mean())
    vals = []
    for x1, y1, x2, y2 in boxes:
        x1, y1 = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
        x2, y2 = min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2)))
        if x2 > x1 and y2 > y1:
            vals.append(smap[y1:y2, x1:x2].mean())
    return float(torch.stack(vals).mean()) if vals else float(smap.mean())


def changed_area(original, edited, threshold: int = 60) -> float:
    """The share of the image an edit changed: pixels whose summed |RGB| difference exceeds threshold."""
    a = np.asarray(original.convert("RGB"), dtype=np.int32)
    b = np.asarray(edited.convert("RGB").resize(original.size), dtype=np.int32)
    return float((np.abs(a - b).sum(-1) > threshold).mean())


def attacker_reward(ssim_local: float, wrong_fraction: float, tau: float = 0.85, w_fraction: float = 0.5,
                    w_all: float = 0.5, area: float = 0.0, max_area: float = 1.0, area_scale: float = 0.0) -> float:
    """SSIM gate x defender failures: ok * (w_fraction * wrong_fraction + w_all * all_k_wrong); with
    max_area < 1 an edit must also change at most that share of the image (changed_area) to count; with
    area_scale > 0 the reward is also scaled by max(0, 1 - area / area_scale): of two edits that fool the
    defender alike, the one that changes less of the image earns more."""
    weight = float(ssim_local >= tau and area <= max_area)
    if area_scale > 0:
        weight *= max(0.0, 1.0 - area / area_scale)
    return weight * (w_fraction * wrong_fraction + w_all * float(wrong_fraction >= 1.0))


# ---------------------------------------------------------------------------------------------
# 6. Progress bars (the run directory's I/O is in rundir.py)
# ---------------------------------------------------------------------------------------------
def progress(iterable=None, total: int | None = None, desc: str = "", lines: bool = False, **kw):
    """A tqdm bar with rate and ETA on rank 0, on a terminal only (not in CI logs or pipes). With
    lines=True, where there is no bar (a log, a pipe) rank 0 prints a line at the start, every ~10 s and
    at the end instead: for long phases that print nothing else."""
    import sys

    from tqdm.auto import tqdm
    master = int(os.environ.get("RANK", 0)) == 0
    no_tty = not sys.stderr.isatty() or bool(os.environ.get("CI"))
    if lines and master and no_tty and not kw.get("disable"):
        return _progress_lines(iterable, total, desc)
    off = kw.pop("disable", False) or not master or no_tty
    return tqdm(iterable, total=total, desc=desc, disable=off, dynamic_ncols=True, **kw)


def _progress_lines(iterable, total, desc, every: float = 10.0):
    import time
    total = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else "?"
    t0 = last = time.time()
    print(f"{desc}: 0/{total}", flush=True)
    n = 0
    for x in iterable:
        yield x
        n += 1
        if time.time() - last >= every:
            last = time.time()
            print(f"{desc}: {n}/{total} ({last - t0:.0f} s)", flush=True)
    print(f"{desc}: {n}/{total} in {time.time() - t0:.0f} s", flush=True)
