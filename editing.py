"""The attacker's model interface, Qwen-Image-Edit (used by stages 01, 02, 03 and tiny_world.py): the
prompt and condition encoding of QwenImageEditPipeline as one EditContext, one velocity prediction with
true CFG, the flow's sigma schedule, and images <-> VAE latents <-> packed tokens. Every stage that edits
calls these, so they live here once; so do loading the editor and its LoRA's I/O."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import TINY, lora_parameters, named_model, seeded


@dataclass
class EditContext:
    """Everything the transformer needs besides the noisy latents, for a batch of edits."""
    prompt_embeds: torch.Tensor        # (B, Lt, D)
    prompt_mask: torch.Tensor | None   # (B, Lt) or None when nothing is padded
    neg_embeds: torch.Tensor | None    # true-CFG negative prompt, same layout
    neg_mask: torch.Tensor | None
    cond_latents: torch.Tensor         # (B, Lc, 64) packed VAE latents of the scene
    img_shapes: list                   # per sample: [(1, h/16, w/16) target, (1, hc/16, wc/16) condition]
    height: int                        # of the output (target)
    width: int

    @property
    def target_len(self) -> int:
        """Tokens of the noisy target latents (the condition may have another size)."""
        return (self.height // 16) * (self.width // 16)

    def repeat(self, n: int) -> EditContext:
        """Each sample repeated n times in a row (a group of n edits of the same scene)."""
        def r(t):
            return None if t is None else t.repeat_interleave(n, dim=0)
        return EditContext(r(self.prompt_embeds), r(self.prompt_mask), r(self.neg_embeds),
                           r(self.neg_mask), r(self.cond_latents),
                           [s for s in self.img_shapes for _ in range(n)], self.height, self.width)

    def to(self, device) -> EditContext:
        def r(t):
            return None if t is None else t.to(device)
        return EditContext(r(self.prompt_embeds), r(self.prompt_mask), r(self.neg_embeds), r(self.neg_mask),
                           r(self.cond_latents), self.img_shapes, self.height, self.width)

    def select(self, idx: slice | list[int]) -> EditContext:
        """A slice or a list of rows of the batch (training micro-batches)."""
        rows = idx if isinstance(idx, slice) else torch.tensor(idx, dtype=torch.long)

        def r(t):
            return None if t is None else t[rows.to(t.device) if isinstance(rows, torch.Tensor) else rows]
        shapes = self.img_shapes[idx] if isinstance(idx, slice) else [self.img_shapes[i] for i in idx]
        return EditContext(r(self.prompt_embeds), r(self.prompt_mask), r(self.neg_embeds), r(self.neg_mask),
                           r(self.cond_latents), shapes, self.height, self.width)


def snap_size(image: Image.Image, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) with the image's aspect ratio, area ~ resolution^2, multiples of 16: the output size."""
    w, h = image.size
    scale = resolution / math.sqrt(w * h)
    return (max(multiple, round(w * scale / multiple) * multiple),
            max(multiple, round(h * scale / multiple) * multiple))


def images_to_tensor(images: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """PIL list -> (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((width, height), Image.BICUBIC)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL list."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _latent_stats(pipe, device, dtype):
    c = pipe.vae.config.z_dim
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, c, 1, 1, 1).to(device, dtype)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, c, 1, 1, 1).to(device, dtype)
    return mean, std


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) normalised VAE latents -> (B, h/2*w/2, C*4) transformer tokens."""
    b, c, _, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, L, C*4) -> (B, C, 1, H/8, W/8)."""
    b, _, c4 = x.shape
    h, w = height // 8, width // 8
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


def single_frame_vae(vae):
    """Run the Qwen-Image VAE's causal 3D convolutions as 2D ones on a single frame, which is all this
    project feeds it: a frame with no cache is padded with 2 zero frames in front, so only the kernel's last
    time slice meets data, and conv3d did 3x the work (the same function; float32 outputs agree to ~1e-5,
    measured: 2.4x faster decode, 2.1x encode of 112 px images on 2 cores). Video inputs and cached
    chunks take the original path."""
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    def forward_2d(conv):
        orig, pad = conv.forward, conv._padding           # (w, w, h, h, 2 * pt, 0): causal in time
        causal = conv.stride[0] == 1 and pad[4] == conv.kernel_size[0] - 1 and pad[5] == 0 and \
            conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"

        def forward(x, cache_x=None):
            if not (causal and cache_x is None and x.shape[2] == 1):
                return orig(x, cache_x)
            y = F.conv2d(F.pad(x[:, :, 0], pad[:4]), conv.weight[:, :, -1], conv.bias, conv.stride[1:])
            return y.unsqueeze(2)
        return forward
    for m in vae.modules():
        if isinstance(m, QwenImageCausalConv3d) and "forward" not in m.__dict__:   # once per module
            m.forward = forward_2d(m)
    return vae


VAE_CHUNK = 4   # images per VAE call: its working set is ~1.9 KB (encode) / 3.5 KB (decode) per pixel in bf16
# (and at 112 px on 2 cores 4 is also the fastest: 16 and 64 per call were 4-36% slower, measured)


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> packed, normalised latents (B, L, 64) (VAE mode, no sampling),
    VAE_CHUNK images at a time (bench/paper_scale.py: 8 conditions at 1 MP at once take 16 GB)."""
    vae = pipe.vae
    x = images.to(vae.device, vae.dtype).unsqueeze(2)  # (B, 3, 1, H, W)
    z = torch.cat([vae.encode(c).latent_dist.mode() for c in x.split(VAE_CHUNK)])
    mean, std = _latent_stats(pipe, z.device, z.dtype)
    return pack_latents((z - mean) / std)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latents -> (B, 3, H, W) images in [-1, 1], VAE_CHUNK images at a time."""
    vae = pipe.vae
    z = unpack_latents(latents.to(vae.dtype), height, width)
    mean, std = _latent_stats(pipe, z.device, z.dtype)
    return torch.cat([vae.decode(c * std + mean, return_dict=False)[0][:, :, 0] for c in z.split(VAE_CHUNK)])


@torch.no_grad()
def encode_edit(pipe, images: list[Image.Image], instructions: list[str], resolution: int,
                negative_prompt: str | None = " ", cond_resolution: int = 0) -> EditContext:
    """Prompt embeddings of (scene + instruction) and the scene's condition latents.

    The output is edited at ~resolution^2 pixels. The condition (VAE latents and the image the text
    encoder sees) is encoded at ~cond_resolution^2 pixels as QwenImageEditPipeline does
    (calculate_dimensions(1024 * 1024, ratio): the model's native setting), or at the output size
    when cond_resolution is 0. All images of one call share the first one's sizes (callers group)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    width, height = snap_size(images[0], resolution)
    cw, ch = calculate_dimensions(cond_resolution ** 2, images[0].width / images[0].height)[:2] \
        if cond_resolution else (width, height)
    cond_images = [im.convert("RGB").resize((cw, ch), Image.BICUBIC) for im in images]
    dev = pipe.transformer.device
    emb, mask = pipe.encode_prompt(prompt=instructions, image=cond_images, device=dev)
    neg_emb = neg_mask = None
    if negative_prompt is not None:
        neg_emb, neg_mask = pipe.encode_prompt(prompt=[negative_prompt] * len(images), image=cond_images, device=dev)
    shapes = [(1, height // 16, width // 16), (1, ch // 16, cw // 16)]
    return EditContext(emb.to(pipe.transformer.dtype), mask, None if neg_emb is None else
                       neg_emb.to(pipe.transformer.dtype), neg_mask,
                       encode_images(pipe, images_to_tensor(cond_images, cw, ch)),
                       [shapes for _ in images], height, width)


def predict_velocity(transformer, latents: torch.Tensor, sigma: torch.Tensor, ctx: EditContext,
                     cfg_scale: float) -> torch.Tensor:
    """v = eps - x0 for the noisy latents (B, L, 64) at noise level sigma (B,), true CFG with
    Qwen-Image's norm rescale. The condition latents ride along the sequence; the output is sliced
    back to the noisy part."""
    x = torch.cat([latents, ctx.cond_latents], dim=1).to(transformer.dtype)  # (B, L + Lc, 64)
    t = sigma.to(transformer.dtype).expand(latents.shape[0])
    n = latents.shape[1]
    v = transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx.prompt_embeds,
                    encoder_hidden_states_mask=ctx.prompt_mask, img_shapes=ctx.img_shapes,
                    return_dict=False)[0][:, :n]
    if cfg_scale > 1 and ctx.neg_embeds is not None:
        v_neg = transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx.neg_embeds,
                            encoder_hidden_states_mask=ctx.neg_mask, img_shapes=ctx.img_shapes,
                            return_dict=False)[0][:, :n]
        comb = v_neg + cfg_scale * (v - v_neg)
        v = comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    return v.float()


def sigma_schedule(scheduler, num_steps: int, seq_len: int) -> torch.Tensor:
    """The pipeline's sigma schedule (dynamic shift by sequence length), with the final 0."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift
    c = scheduler.config
    mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.float().cpu().clone()  # (num_steps + 1,)


@torch.no_grad()
def masked_edit(pipe, images, instructions, masks, steps, cfg, generator, resolution, cond_resolution=0):
    """Edit only where mask == 1 (PIL 'L' masks, image size). Flow-matching inpainting: after
    each Euler step the unmasked region is reset to the original latents noised to the next
    sigma, so the model fills the hole consistently with what surrounds it."""
    ctx = encode_edit(pipe, images, instructions, resolution, cond_resolution=cond_resolution)
    w, h = ctx.width, ctx.height
    x0 = encode_images(pipe, images_to_tensor(images, w, h)).float()   # (B, L, 64) original latents
    m = torch.stack([torch.from_numpy(np.asarray(mk.resize((w // 8, h // 8), Image.BILINEAR),
                                                 dtype=np.float32) / 255.0) for mk in masks])
    m = pack_latents((m > 0.01).float()[:, None, None].expand(-1, 16, 1, -1, -1).contiguous())
    sigmas = sigma_schedule(pipe.scheduler, steps, x0.shape[1])
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = noise.clone()
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = predict_velocity(pipe.transformer, x, s.view(1).to(x.device), ctx, cfg)
        x = x + (s_next - s) * v
        known = (1 - s_next) * x0 + s_next * noise
        x = m * x + (1 - m) * known
    out = tensor_to_images(decode_latents(pipe, x, h, w))
    results = []
    for orig, edited, mk in zip(images, out, masks):  # paste the original back outside the mask
        edited = edited.resize(orig.size, Image.BICUBIC)
        results.append(Image.composite(edited, orig.convert("RGB"), mk))
    return results


# ---------------------------------------------------------------------------------------------
# Loading the editor, and its LoRA
# ---------------------------------------------------------------------------------------------
ATTACKER_ID = "Qwen/Qwen-Image-Edit"

# LoRA targets of the Flow-GRPO Qwen-Image-Edit config (docs/paper_notes.md, "Stage 03").
ATTACKER_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
]


def load_attacker(name_or_path: str = ATTACKER_ID, lora: str | None = None, device="cpu",
                  dtype=torch.float32, trainable_lora: bool = False):
    """-> diffusers QwenImageEditPipeline (all weights frozen, in ``dtype``), with an optional saved LoRA."""
    from diffusers import QwenImageEditPipeline
    if name_or_path == TINY:   # the same weights in every process: fixed seeds
        from tiny_models import build_tiny_attacker, build_tiny_defender
        with seeded(0):
            text_encoder, processor = build_tiny_defender()
        with seeded(1):
            pipe = build_tiny_attacker(text_encoder, processor)
    else:
        with named_model("attacker (Qwen-Image-Edit)", name_or_path):
            pipe = QwenImageEditPipeline.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
    if pipe.transformer.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.eval()
    if lora:
        load_attacker_lora(pipe, lora, trainable=trainable_lora)
    single_frame_vae(pipe.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trainable_attacker(name_or_path: str, device, dtype, lora: str | None = None, rank: int = 64, alpha: int = 128,
                       seed: int = 0, grad_ckpt: bool = True):
    """-> (the editor, its trainable fp32 LoRA parameters): the adapter saved at ``lora``, or a fresh one
    (rank, alpha, seeded); gradient checkpointing on the transformer when ``grad_ckpt``."""
    pipe = load_attacker(name_or_path, device=device, dtype=dtype)
    params = load_attacker_lora(pipe, lora, trainable=True) if lora else add_attacker_lora(pipe, rank, alpha, seed=seed)
    if grad_ckpt:
        pipe.transformer.enable_gradient_checkpointing()
    return pipe, params


def add_attacker_lora(pipe, rank: int = 64, alpha: int = 128, targets=None, seed: int = 0):
    """Fresh LoRA on the transformer (B = 0, so the edit starts as the base model's)."""
    from peft import LoraConfig
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                     target_modules=targets or ATTACKER_LORA_TARGETS)
    with seeded(seed):
        pipe.transformer.add_adapter(cfg)
    return lora_parameters(pipe.transformer)


def save_attacker_lora(pipe, out_dir: str | Path, write: bool = True):
    """Write ``pytorch_lora_weights.safetensors`` readable by ``pipe.load_lora_weights(out_dir)``.
    Under FSDP2 every rank must call it (the shards are gathered); only ``write`` ranks write."""
    from diffusers import QwenImageEditPipeline
    from peft.utils import get_peft_model_state_dict
    tr = pipe.transformer
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu().contiguous()
             for k, v in get_peft_model_state_dict(tr).items()}
    if not write:
        return
    cfg = tr.peft_config["default"]
    meta = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
    QwenImageEditPipeline.save_lora_weights(out_dir, transformer_lora_layers=state,
                                            transformer_lora_adapter_metadata=meta,
                                            safe_serialization=True)


def load_attacker_lora(pipe, lora_dir: str | Path, trainable: bool = False):
    """Load a LoRA saved by ``save_attacker_lora`` (or any diffusers Qwen-Image LoRA), in fp32.

    diffusers builds the adapter in the base's dtype, so on a bf16 base the loaded values are
    rounded: the adapter is cast to fp32 and the file's exact values are copied in again."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    file = Path(lora_dir) / "pytorch_lora_weights.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"no pytorch_lora_weights.safetensors in {file.parent}")
    pipe.load_lora_weights(str(file.parent), adapter_name="default")
    params = lora_parameters(pipe.transformer)
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}
    result = set_peft_model_state_dict(pipe.transformer, state, adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"{file}: keys that match no LoRA layer: {result.unexpected_keys[:3]}")
    for p in params:
        p.requires_grad_(trainable)
    return params if trainable else []


@contextlib.contextmanager
def lora_values(transformer, params, values):
    """For the forwards inside: the LoRA holds ``values`` (e.g. the KL reference's), the current ones put back
    after; values None: the adapter disabled (the base model)."""
    if values is None:
        transformer.disable_adapters()
        try:
            yield
        finally:
            transformer.enable_adapters()
        return
    now = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:   # the policy's own values come back even if the forward raised
        with torch.no_grad():
            for p, v in zip(params, now):
                p.copy_(v)
