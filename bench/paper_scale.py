"""Paper scale on paper: memory and compute of every stage at the paper's sizes, ESTIMATED on CPU.

  python bench/paper_scale.py                     # ~10 min on one core (2 with native bf16) -> bench/paper_scale.md
  python bench/paper_scale.py --reduced           # small widths and token counts (the test, seconds)

No GPU is available to this project. This script builds ONE real-size layer of each model from the
real configs (a Qwen-Image MMDiT block: diffusers' defaults = Qwen-Image's config; a Qwen2.5-VL-7B
decoder layer and vision block; the Qwen-Image VAE), runs it in bf16 on the CPU at each stage's real
token counts, and measures
  saved    the bytes autograd keeps for backward inside that layer (saved-tensor hooks; parameters
           excluded), without and with gradient checkpointing (then: the layer's inputs, which
           torch.utils.checkpoint holds),
  live     the peak of live intermediate tensors of a no-grad forward (inference, rollouts),
  flops    torch.utils.flop_counter, forward and forward + backward,
  seconds  on this CPU (only to show the measurement ran; not a GPU number).
It then composes, per stage and per GPU (8 GPUs, the paper preset's flags): parameters, gradients,
optimizer state, frozen models resident, FSDP2 shards and gathered layers, activations (per layer x
layers), generation KV cache (from the config) -> peak memory of each phase; FLOPs per step -> the
lower bound in seconds on an H100 (989 TFLOP/s dense bf16) and an estimate at a stated MFU.
Everything it writes is an estimate made on CPU, not a GPU measurement.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import editing  # noqa: E402

GB = 1e9
H100_BF16_FLOPS = 989e12    # dense bf16, SXM
H100_HBM_BYTES_S = 3.35e12


@dataclass
class Args:
    out: str = field(default="bench/paper_scale.md", metadata={"help": "markdown table written here"})
    reduced: bool = field(default=False, metadata={"help": "small widths / token counts (tests)"})
    world: int = field(default=8, metadata={"help": "GPUs (one node)"})
    gpu_gb: float = field(default=80.0, metadata={"help": "memory per GPU"})
    mfu: float = field(default=0.35, metadata={"help": "model-FLOPs utilisation assumed for the estimate"})
    response_tokens: int = field(default=512, metadata={"help": "ASSUMED mean DAPO response length (tokens)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = default)"})
    bf16: str = field(default="auto", metadata={"help": "bf16 matmuls: 'native', 'fp32' (computed in fp32, rounded to "
                                                         "bf16: the same bytes and FLOPs), 'auto' (fp32 where the CPU "
                                                         "has no native bf16)"})


# ---------------------------------------------------------------------------------------------
# 1. Measuring one layer: saved bytes, live bytes, FLOPs, time
# ---------------------------------------------------------------------------------------------
class Regions:
    """Attributes what happens inside given modules to their names (forward hooks), the rest to 'other'."""

    def __init__(self, modules: dict):
        self.current, self.handles = "other", []
        for name, m in modules.items():
            self.handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: self._enter(n)))
            self.handles.append(m.register_forward_hook(lambda _m, _a, _o: self._exit()))
        self.stack = []

    def _enter(self, name):
        self.stack.append(self.current)
        self.current = name

    def _exit(self):
        self.current = self.stack.pop() if self.stack else "other"

    def remove(self):
        for h in self.handles:
            h.remove()


def saved_bytes(model, run, regions: dict, params) -> dict[str, int]:
    """Bytes autograd saves for backward during run() (forward only), per region; each storage once,
    parameters excluded (they are counted as weights)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen, out = set(), {}
    reg = Regions(regions)

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in param_ptrs and key not in seen and st.nbytes() > 0:
            seen.add(key)
            out[reg.current] = out.get(reg.current, 0) + st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run()
    finally:
        reg.remove()
    return out, loss


def input_bytes(regions: dict, out: dict) -> list:
    """Pre-hooks recording the bytes of each region's per-layer inputs (hidden_states, and
    encoder_hidden_states for the MMDiT): what a checkpointed layer keeps. Returns the handles."""
    def hook(_m, args, kwargs, n):
        ts = [args[0]] if args and isinstance(args[0], torch.Tensor) else []
        ts += [kwargs[k] for k in ("hidden_states", "encoder_hidden_states") if isinstance(kwargs.get(k), torch.Tensor)]
        out.setdefault(n, sum(t.numel() * t.element_size() for t in ts))
    return [m.register_forward_pre_hook(lambda m_, a, k, n=name: hook(m_, a, k, n), with_kwargs=True)
            for name, m in regions.items()]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensors created by ops (weights and inputs excluded): the working set of a
    no-grad forward, as a caching allocator without fragmentation would see it. Per region, above
    what was live when the region was entered."""

    def __init__(self, regions: Regions):
        super().__init__()
        self.regions, self.refs, self.live, self.peak, self.base, self.last = regions, {}, 0, {}, {}, None

    def _release(self, key):
        ref = self.refs.get(key)
        if ref is not None:
            ref[0] -= 1
            if ref[0] == 0:
                self.live -= ref[1]
                del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.live
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self.refs:             # a view of (or in-place on) a tracked tensor: keeps it alive
                    self.refs[key][0] += 1
                elif key in inputs:              # a view of a weight or an input: not an allocation
                    continue
                else:
                    self.refs[key] = [1, st.nbytes()]
                    self.live += st.nbytes()
                weakref.finalize(t, self._release, key)
        r = self.regions.current
        if r != self.last:   # entering a region: what is live already belongs to its caller
            self.base[r], self.last = before, r
        self.peak[r] = max(self.peak.get(r, 0), self.live - self.base[r])
        return out


class Bf16InFp32(TorchDispatchMode):
    """bf16 matmuls and convolutions computed in fp32, their results rounded to bf16. On a CPU without native
    bf16 (AVX2 only: a bf16 matmul there runs ~150x slower than fp32) the measurement would take hours.
    Every tensor the measured code sees keeps its bf16 dtype and shape, so saved and live bytes and FLOPs are
    those of native bf16 (tested at reduced size); only the seconds differ. Entered before (below) the
    measuring modes, which then see the bf16 op, not its fp32 insides."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default,
           torch.ops.aten.convolution_backward.default}

    def __init__(self):
        super().__init__()
        self.calls = 0           # ops computed in fp32

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        floats = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if func not in self.OPS or not floats or any(t.dtype != torch.bfloat16 for t in floats):
            return func(*args, **kwargs)
        self.calls += 1
        up = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t,
                      (args, kwargs))
        out = func(*up[0], **up[1])
        return tree_map(lambda t: t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                        out)


def native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? From /proc/cpuinfo; False where it is absent."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def region_flops(fc, model, regions: dict) -> dict[str, int]:
    """FLOPs per region from a finished FlopCounterMode, 'total' for everything."""
    counts = fc.get_flop_counts()
    fqn = {id(m): n for n, m in model.named_modules()}
    out = {"total": sum(counts.get("Global", {}).values())}
    for name, m in regions.items():
        out[name] = sum(counts.get(f"{type(model).__name__}.{fqn[id(m)]}", {}).values())
    return out


@dataclass
class Layer:
    """One measured layer at one token count, per sample (micro-batch 1)."""
    name: str
    tokens: int
    saved: int = 0          # bytes kept for backward, no checkpointing
    saved_ckpt: int = 0     # bytes kept for backward with checkpointing (the layer's inputs)
    live: int = 0           # peak working set of a no-grad forward inside the layer
    flops_fwd: int = 0
    flops_train: int = 0    # forward + backward
    seconds_train: float = 0.0
    other_saved: int = 0    # outside the measured layers (embeddings, head, loss), bytes
    other_live: int = 0
    other_flops_train: int = 0


def measure(model, make_loss, regions: dict, params, tokens: int = 0, train: bool = True) -> dict[str, Layer]:
    """One no-grad forward (live working set, forward FLOPs, layer inputs) and, with ``train``, one forward +
    backward (saved bytes, FLOPs, time) of ``make_loss()`` -> a Layer per region."""
    from torch.utils.flop_counter import FlopCounterMode
    res = {n: Layer(name=n, tokens=tokens) for n in regions}
    ins = {}
    handles = input_bytes(regions, ins)
    reg = Regions(regions)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc, LiveBytes(reg) as lb:
            make_loss()
    finally:
        reg.remove()
        for h in handles:
            h.remove()
    fwd = region_flops(fc, model, regions)
    if not train:   # inference only (01's editor): no backward to measure
        for n, r in res.items():
            r.saved_ckpt, r.live, r.flops_fwd = ins.get(n, 0), lb.peak.get(n, 0), fwd[n]
        next(iter(res.values())).other_live = lb.peak.get("other", 0)
        return res
    t0 = time.time()
    with FlopCounterMode(display=False) as fc:
        saved, loss = saved_bytes(model, make_loss, regions, params)
        loss.backward()
    seconds = time.time() - t0
    train = region_flops(fc, model, regions)
    for n, r in res.items():
        r.saved, r.saved_ckpt, r.live = saved.get(n, 0), ins.get(n, 0), lb.peak.get(n, 0)
        r.flops_fwd, r.flops_train, r.seconds_train = fwd[n], train[n], seconds
    first = next(iter(res.values()))
    first.other_saved, first.other_live = saved.get("other", 0), lb.peak.get("other", 0)
    first.other_flops_train = train["total"] - sum(train[n] for n in regions)
    model.zero_grad(set_to_none=True)
    return res


# ---------------------------------------------------------------------------------------------
# 2. The real-size layers (or reduced ones for the test), their inputs, their token counts
# ---------------------------------------------------------------------------------------------
def vl_config(reduced: bool, layers: int = 1, depth: int = 1):
    """Qwen2.5-VL-7B-Instruct's config (hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate
    18944, vocab 152064; vision depth 32, hidden 1280) with `layers` / `depth` of them."""
    from transformers import Qwen2_5_VLConfig
    if reduced:
        text = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=1024, mrope_section=[2, 3, 3])
        vision = dict(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    else:
        text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                    vocab_size=152064, mrope_section=[16, 24, 24])
        vision = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
    sec = text.pop("mrope_section")
    text.update(num_hidden_layers=layers, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sec})
    vision.update(depth=depth, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31] if depth == 32 else [0])
    v = text["vocab_size"]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=v - 3, video_token_id=v - 4,
                            vision_start_token_id=v - 2, vision_end_token_id=v - 1)


def mmdit_config(reduced: bool, layers: int = 1) -> dict:
    """Qwen-Image's transformer (diffusers' defaults: 60 blocks, 24 heads x 128, text dim 3584)."""
    if reduced:
        return dict(num_layers=layers, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                    axes_dims_rope=(8, 12, 12))
    return dict(num_layers=layers)


def count_params(reduced: bool) -> dict:
    """Parameter counts of the full models, built on the meta device from the same configs."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        mmdit = QwenImageTransformer2DModel(**mmdit_config(reduced, layers=2 if reduced else 60))
        vl = Qwen2_5_VLForConditionalGeneration(vl_config(reduced, layers=2 if reduced else 28,
                                                          depth=2 if reduced else 32))
        vae = AutoencoderKLQwenImage(**(dict(base_dim=8, z_dim=16) if reduced else {}))
    r = 8 if reduced else 64
    lora = sum(r * (m.in_features + m.out_features) for n, m in mmdit.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in editing.ATTACKER_LORA_TARGETS))
    tc = vl.config.text_config
    return dict(mmdit=sum(p.numel() for p in mmdit.parameters()), mmdit_layers=mmdit.config.num_layers,
                mmdit_block=sum(p.numel() for p in mmdit.transformer_blocks[0].parameters()),
                lora=lora, vl=sum(p.numel() for p in vl.parameters()), vl_layers=tc.num_hidden_layers,
                vl_layer=sum(p.numel() for p in vl.model.language_model.layers[0].parameters()),
                vision_depth=vl.config.vision_config.depth, vae=sum(p.numel() for p in vae.parameters()),
                kv_bytes_per_token=2 * tc.num_hidden_layers * tc.num_key_value_heads
                * (tc.hidden_size // tc.num_attention_heads) * 2,
                hidden=tc.hidden_size, vocab=tc.vocab_size)


def attacker_tokens(reduced: bool, cond_resolution: int = 512) -> dict:
    """One edit at the paper preset: output 512^2 -> 1,024 target tokens; the condition at
    calculate_dimensions(cond_resolution^2) -> (cond / 16)^2 tokens (512: 1,024, as flow_grpo's trainer
    and 02 / 03; 1024: 4,096, the pipeline's own, as 01); the text encoder sees the same condition image:
    (smart_resize to a multiple of 28 / 28)^2 image tokens (512: 324; 1024: 1,369) + ~48 instruction and
    template tokens after the pipeline drops its first 64."""
    if reduced:
        return dict(target=(8, 8), cond=(8, 8), text=32)
    side = cond_resolution // 16
    vl_side = round(cond_resolution / 28)
    return dict(target=(32, 32), cond=(side, side), text=vl_side * vl_side + 48)


def measure_mmdit(reduced: bool, cond_resolution: int, train: bool = True) -> Layer:
    """One MMDiT block with the r64 LoRA of 02/03 (fp32 adapter, bf16 base) at one sample's tokens; without
    ``train`` the inference measurements only (01 never trains the editor)."""
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig
    tok = attacker_tokens(reduced, cond_resolution)
    with common.seeded(0):
        model = QwenImageTransformer2DModel(**mmdit_config(reduced)).to(torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8 if reduced else 64, lora_alpha=16 if reduced else 128,
                                 init_lora_weights="gaussian", target_modules=editing.ATTACKER_LORA_TARGETS))
    params = common.lora_parameters(model)
    (th, tw), (ch, cw) = tok["target"], tok["cond"]
    n_img = th * tw + ch * cw
    x = torch.randn(1, n_img, 64, dtype=torch.bfloat16)
    enc = torch.randn(1, tok["text"], model.config.joint_attention_dim, dtype=torch.bfloat16)
    mask = torch.ones(1, tok["text"], dtype=torch.long)
    shapes = [[(1, th, tw), (1, ch, cw)]]

    def loss():
        v = model(hidden_states=x, timestep=torch.tensor([0.5], dtype=torch.bfloat16), encoder_hidden_states=enc,
                  encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0][:, :th * tw]
        return v.float().pow(2).mean()

    res = measure(model, loss, {"block": model.transformer_blocks[0]}, params, tokens=n_img + tok["text"], train=train)
    return res["block"]


def vl_sample(config, image_hw: tuple[int, int], text: int, response: int):
    """input_ids / pixel_values of one prompt (text, image, text) + response, as 04 feeds them."""
    gh, gw = image_hw[0] // 14, image_hw[1] // 14
    n_img = gh * gw // 4
    v = config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    pre, post = text // 2, text - text // 2
    ids = torch.cat([torch.randint(0, v - 8, (pre,), generator=g), torch.tensor([config.vision_start_token_id]),
                     torch.full((n_img,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                     torch.randint(0, v - 8, (post + response,), generator=g)])[None]
    mm = (ids == config.image_token_id).long()
    pix = torch.randn(gh * gw, 3 * 2 * 14 * 14, generator=g).to(torch.bfloat16)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, pixel_values=pix,
                image_grid_thw=torch.tensor([[1, gh, gw]])), ids.shape[1] - response


def defender_tokens(reduced: bool, response: int) -> dict:
    """Stage 04 at the paper preset: a 512^2 scene, resized to 532^2 by min_pixels 262,144 (1,444
    patches -> 361 tokens), ~96 text tokens (chat template, MCQ preamble, question, options), and
    `response` completion tokens."""
    if reduced:
        return dict(image=(56, 56), text=16, response=response)
    return dict(image=(532, 532), text=96, response=response)


def measure_vl(reduced: bool, response: int) -> dict[str, Layer]:
    """One decoder layer and one vision block of the full-parameter defender (bf16 compute), with 04's
    token log-prob head (logits of the completion positions only, fp32 log-softmax, entropy)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    cfg = vl_config(reduced)
    with common.seeded(0):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    params = list(model.parameters())
    tok = defender_tokens(reduced, response)
    batch, P = vl_sample(cfg, tok["image"], tok["text"], tok["response"])
    T = tok["response"]

    def loss():
        logits = model(**batch, use_cache=False, logits_to_keep=T + 1).logits[:, :T].float()
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, batch["input_ids"][:, P:P + T, None])[..., 0]
        torch.special.entr(logp_all.exp()).sum(-1).detach()
        return -logp.mean()

    regions = {"layer": model.model.language_model.layers[0], "vision": model.model.visual.blocks[0]}
    return measure(model, loss, regions, params, tokens=batch["input_ids"].shape[1])


def measure_vae(reduced: bool) -> dict:
    """The Qwen-Image VAE, no grad: working set of encode and decode of one image (512^2 full, 64^2
    reduced), per pixel, and FLOPs per pixel."""
    from diffusers import AutoencoderKLQwenImage
    from torch.utils.flop_counter import FlopCounterMode
    with common.seeded(0):
        vae = AutoencoderKLQwenImage(**(dict(base_dim=8, z_dim=16) if reduced else {})).to(torch.bfloat16).eval()
    editing.single_frame_vae(vae)   # as editing.load_attacker runs it in the stages
    side = 64 if reduced else 512
    img = torch.randn(1, 3, 1, side, side, dtype=torch.bfloat16)
    out = {}
    for name, fn in [("encode", lambda: vae.encode(img).latent_dist.mode()),
                     ("decode", lambda: vae.decode(torch.randn(1, vae.config.z_dim, 1, side // 8, side // 8,
                                                               dtype=torch.bfloat16)).sample)]:
        reg = Regions({})
        with torch.no_grad(), FlopCounterMode(display=False) as fc, LiveBytes(reg) as lb:
            fn()
        out[name] = dict(live_per_px=lb.peak.get("other", 0) / side**2,
                         flops_per_px=sum(fc.get_flop_counts().get("Global", {}).values()) / side**2)
    return out


# ---------------------------------------------------------------------------------------------
# 3. Composing every stage, per GPU, at the paper preset's flags (read from the stages' Args)
# ---------------------------------------------------------------------------------------------
def stage_module(file: str):
    return common.load_stage(file)


# ASSUMED workload sizes where the paper and the code leave them open (stated in the table's notes)
ASSUMED = dict(sft_rows=1000, scenes=2000, pool_round=1600, implant_share=0.8)
# 05: items (VLMEvalKit TSVs) and ASSUMED typical image tokens per item under the base processor's
# pixel limits (12.8 MP max): V*, HR-Bench 4K / 8K high resolution, the others ~VGA to 1080p
BENCHMARKS = {"vstar": (191, 4500), "hrbench4k": (800, 10580), "hrbench8k": (800, 16384), "pope": (5127, 391),
              "hallusionbench": (951, 1000), "mmmu": (1050, 600), "mmstar": (1500, 500), "realworldqa": (765, 2600),
              "blink": (1901, 1200), "ai2d": (3088, 600)}


@dataclass
class Stage:
    name: str
    work: str                    # per-GPU batch of one step
    phases: dict                 # phase -> {part: bytes}
    flops: float                 # per GPU per step
    bound_s: float               # roofline lower bound per step (compute or HBM bandwidth)
    est_s: float                 # at --mfu (compute) and half the HBM bandwidth (decode)
    steps: float                 # steps per GPU in the paper preset's whole run (3 rounds)
    notes: str = ""

    def peak(self) -> tuple[str, float]:
        name = max(self.phases, key=lambda p: sum(self.phases[p].values()))
        return name, sum(self.phases[name].values())


def measured_response(args: Args) -> int:
    return 16 if args.reduced else args.response_tokens


def compose(P: dict, A01: Layer, A: Layer, V: dict, E: dict, args: Args, reduced: bool) -> list[Stage]:
    """A01: the MMDiT block at 01's condition size (the pipeline's 1 MP); A: at 02 / 03's (512^2)."""
    W, peak, bw = args.world, H100_BF16_FLOPS, H100_HBM_BYTES_S
    s01, s02, s03 = (stage_module(f).Args() for f in ("01_build_sft_data.py", "02_sft_attacker.py",
                                                      "03_train_attacker.py"))
    m04 = stage_module("04_train_defender.py")
    s04, s05 = m04.Args(), stage_module("05_eval.py").Args()
    kv = P["kv_bytes_per_token"]
    cfg = vl_config(reduced)
    I_t, I_v = cfg.text_config.intermediate_size, cfg.vision_config.intermediate_size
    L_T, L_V, D_V = P["mmdit_layers"], P["vl_layers"], P["vision_depth"]
    T_bf16, VL_bf16, vae = 2 * P["mmdit"], 2 * P["vl"], 2 * P["vae"]
    lora_state = 16 * P["lora"]                      # fp32 weight + grad + AdamW m, v
    block_bf16 = 2 * P["mmdit_block"]
    # the attacker, per sequence (micro-batch 1) at the paper's tokens (A.tokens)
    act_ckpt = L_T * A.saved_ckpt + A.saved + A.live + A.other_saved
    act_full = L_T * A.saved + A.live + A.other_saved
    work_nograd = A.live + A.other_live
    f_fwd = L_T * A.flops_fwd
    f_train = L_T * (A.flops_train + A.flops_fwd) + A.other_flops_train   # + the recompute under checkpointing
    # the defender, per token / patch, measured at one typical sequence
    lay, vis = V["layer"], V["vision"]
    tok = defender_tokens(reduced, measured_response(args))
    R = tok["response"]
    Pp = lay.tokens - R
    n_patch = (tok["image"][0] // 14) * (tok["image"][1] // 14)
    per = lambda x, n: x / n   # noqa: E731
    head_saved, head_live = per(lay.other_saved, R), per(lay.other_live, R)

    def prefill_work(n_tokens, n_patches):   # 04/05 memory_batches' rule (12 x intermediate bytes)
        return 12 * I_t * n_tokens + 12 * I_v * n_patches

    def gen_flops(n_seq, tokens):            # ~2 FLOPs per parameter per token
        return 2 * P["vl"] * n_seq * tokens
    stages = []

    # 01: inference; --offload keeps one MLLM (editor text encoder or judge) on the GPU at a time
    B = s01.batch_size
    cond_px = (attacker_tokens(reduced, s01.cond_resolution)["cond"][0] * 16) ** 2
    work_nograd01, f_fwd01 = A01.live + A01.other_live, L_T * A01.flops_fwd
    judge_seq = Pp + s01.max_new_tokens
    phases = {"edit": dict(transformer=T_bf16, vae=vae, text_encoder=VL_bf16, activations=B * work_nograd01),
              "vae encode": dict(transformer=T_bf16, vae=vae, text_encoder=VL_bf16,
                                 activations=min(B, editing.VAE_CHUNK) * cond_px * E["encode"]["live_per_px"]),
              "judge": dict(transformer=T_bf16, vae=vae, judge=VL_bf16,
                            kv_and_prefill=B * (kv * judge_seq + prefill_work(Pp, n_patch)))}
    edits = s01.outpaint_steps + ASSUMED["implant_share"] * s01.inpaint_steps
    fl = B * (edits * 2 * f_fwd01 + 6 * gen_flops(1, judge_seq))
    dec = B * 6 * s01.max_new_tokens / B * VL_bf16 / bw   # judge decoding, bandwidth bound per call
    stages.append(Stage("01 build AOT-SFT", f"{B} seed rows (outpaint + implant, {s01.outpaint_steps} steps, CFG)",
                        phases, fl, fl / peak + dec, fl / (peak * args.mfu) + 2 * dec,
                        s01.num_synthetic / (B * W), "--offload on; no LoRA in 01 (measured block has one: +2%)"))

    # 02: LoRA SFT, one row per forward, --grad_accum rows per step; text encoder freed after caching
    ga = s02.grad_accum
    tok23 = attacker_tokens(reduced, s03.cond_resolution)
    cond_px = (tok23["cond"][0] * 16) ** 2
    te_work = tok23["text"] * lay.live / lay.tokens + (cond_px // 196) * vis.live / n_patch if not reduced else 0
    phases = {"cache prompts": dict(transformer=T_bf16, vae=vae, text_encoder=VL_bf16, activations=te_work),
              "train": dict(transformer=T_bf16, vae=vae, lora_fp32_adamw=lora_state,
                            activations=act_ckpt if s02.grad_ckpt else act_full)}
    fl = ga * f_train
    steps02 = math.ceil(s02.epochs * ASSUMED["sft_rows"] / (ga * W))
    stages.append(Stage("02 SFT attacker", f"{ga} rows x 1 sequence (grad. accumulation)", phases, fl, fl / peak,
                        fl / (peak * args.mfu), steps02, "AOT-SFT size assumed"))

    # 03: Flow-GRPO under FSDP2 (transformer + LoRA, text encoder, defender sharded over W)
    E3 = s03.scenes_per_step * s03.group_size
    sharded = dict(transformer_shard=T_bf16 / W, lora_shard=lora_state / W, gathered_blocks=2 * block_bf16,
                   text_encoder_shard=VL_bf16 / W, defender_shard=VL_bf16 / W, vae=vae)
    out_px = (tok23["target"][0] * 16) ** 2
    def_seq = Pp + s03.defender_max_new_tokens
    dbatch = min(64, E3 * s03.defender_k)
    phases = {"rollout": dict(sharded, activations=E3 * work_nograd),
              "vae decode": dict(sharded, activations=min(E3, editing.VAE_CHUNK) * out_px * E["decode"]["live_per_px"]),
              "reward": dict(sharded, defender_gathered=VL_bf16,
                             kv_and_prefill=dbatch * (kv * def_seq + prefill_work(Pp, n_patch))),
              "update": dict(sharded, activations=s03.micro_batch * 2 * (act_ckpt if s03.grad_ckpt else act_full))}
    n_train = s03.num_steps - 1
    fl_gen = gen_flops(E3 * s03.defender_k, def_seq)
    fl = s03.num_steps * 2 * E3 * f_fwd + n_train * 2 * E3 * f_train + E3 * out_px * E["decode"]["flops_per_px"] \
        + fl_gen
    dec = math.ceil(E3 * s03.defender_k / dbatch) * s03.defender_max_new_tokens * VL_bf16 / bw
    cur = ASSUMED["scenes"] / W * (s03.eval_steps * 2 * f_fwd) / s03.train_iters   # curriculum, per iteration
    stages.append(Stage("03 Flow-GRPO attacker", f"{s03.scenes_per_step} scenes x G={s03.group_size} = {E3} edits, "
                        f"{s03.num_steps} steps, CFG, micro-batch {s03.micro_batch}, {s03.updates_per_iter} "
                        f"optimizer steps", phases, fl + cur,
                        (fl + cur) / peak + dec, (fl + cur) / (peak * args.mfu) + 2 * dec, 3 * s03.train_iters,
                        f"curriculum ({ASSUMED['scenes']} scenes x {s03.eval_steps} ODE steps) spread over the "
                        f"iterations; {((fl + cur) / (peak * args.mfu) + 2 * dec) / E3:.0f} GPU-s per trained edit"))

    # 04: DAPO under FSDP2, fp32 master weights; generation within --gen_memory_gb, updates within --micro_tokens
    n = s04.group_size
    states = dict(fp32_weights_grads_adamw=16 * P["vl"] / W, gathered_layers=2 * 2 * P["vl_layer"])
    worst = s04.max_new_tokens
    # sample_groups: one prefill per prompt, n KV caches (memory_batches' rule)
    per_prompt = n * kv * (Pp + worst) + prefill_work(Pp, n_patch)
    call_prompts = max(1, int(s04.gen_memory_gb * 1e9 // per_prompt))
    m_seqs = max(1, min(s04.micro_batch, s04.micro_tokens // (Pp + worst))) if s04.micro_tokens else s04.micro_batch
    m_tok, m_comp = m_seqs * (Pp + worst), m_seqs * worst
    act = m_tok * (L_V * lay.saved_ckpt + lay.saved + lay.live) / lay.tokens + m_comp * (head_saved + head_live) \
        + m_seqs * n_patch * (D_V * vis.saved_ckpt + vis.saved + vis.live) / n_patch
    # generation per sequence: the prompt (its tokens and the vision tower) is prefilled once per group of n
    text_fwd = L_V * lay.flops_fwd + lay.other_flops_train / 3
    gen_seq = text_fwd * (Pp / n + R) / lay.tokens + D_V * vis.flops_fwd / n
    # old log-probs and update (04's pack): a row holds one copy of a prompt and as many of its group's answers
    # as --micro_tokens allows at the typical longest answer of a micro-batch (~2R); the decoder layers' work
    # is taken as linear in tokens (attention's quadratic part left out), the vision tower's per row
    k = max(1, min(n, (s04.micro_tokens - Pp) // (2 * R))) if s04.micro_tokens else n
    share = (Pp / k + R) / lay.tokens
    packed_fwd_seq = L_V * lay.flops_fwd * share + D_V * vis.flops_fwd / k + lay.other_flops_train / 3
    packed_train_seq = L_V * (lay.flops_train + lay.flops_fwd) * share + D_V * (vis.flops_train + vis.flops_fwd) / k \
        + lay.other_flops_train
    phases = {"rollout": dict(states, weights_gathered_bf16=VL_bf16, kv_and_prefill=call_prompts * per_prompt),
              "update": dict(states, activations=act)}
    rows = []
    for rnd, (rb, epochs, _) in m04.ROUND_SCHEDULE.items():
        seqs = rb * n / W
        typ_call = max(1, int(s04.gen_memory_gb * 1e9 // (n * kv * (Pp + 2 * R) + prefill_work(Pp, n_patch)))) * n
        calls = math.ceil(seqs / typ_call)
        # each call decodes to its longest answer (~2R), reading the weights and its sequences' KV every token
        dec = 2 * R * (calls * VL_bf16 + seqs * kv * (Pp + R)) / bw
        fl = seqs * (gen_seq + packed_fwd_seq + packed_train_seq)          # generation, old log-probs, update
        pool = s04.warmup_samples if rnd == 0 else ASSUMED["pool_round"]
        rows.append((rnd, rb, seqs, fl, fl / peak + dec, fl / (peak * args.mfu) + 2 * dec, (pool // rb) * epochs))
    rnd, rb, seqs, fl, bound, est, _ = rows[0]
    steps04 = sum(r[-1] for r in rows)
    hours04 = sum(r[5] * r[6] for r in rows) * W / 3600
    tok_s = seqs * lay.tokens / est
    stages.append(Stage("04 DAPO defender", f"rollout {rb} prompts x {n} / {W} GPUs = {seqs:.0f} sequences, "
                        f"micro-batches <= {s04.micro_tokens} tokens", phases, fl, bound, est, steps04,
                        f"row: round 0 step; hours: every round's schedule; updates pack {k} answers behind each "
                        f"prompt copy; {tok_s:.0f} tokens/s/GPU at "
                        f"{lay.tokens} tokens per sequence; memory at max-length answers ({worst} tokens)"))
    stages[-1].hours = hours04

    # 05: inference, bf16; generate calls within --gen_memory_gb (HR-Bench 8K: 16,384 image tokens)
    big = BENCHMARKS["hrbench8k"][1] if not reduced else 64
    per_item = kv * (big + 96 + s05.max_new_tokens) + prefill_work(big + 96, 4 * big)
    k = max(1, min(s05.batch_size, int(s05.gen_memory_gb * 1e9 // per_item)))
    phases = {"generate (HR-Bench 8K)": dict(weights_bf16=VL_bf16, kv_and_prefill=k * per_item)}
    answer = 256
    items = sum(v[0] for v in BENCHMARKS.values())
    fl = sum(c * s05.trials * gen_flops(1, t + 96 + answer) for c, t in BENCHMARKS.values()) / W
    dec = items * s05.trials / W / s05.batch_size * answer * VL_bf16 / bw
    stages.append(Stage("05 eval (10 benchmarks)", f"{items} items x <= {s05.trials} trials / {W} GPUs, "
                        f"<= {s05.batch_size} per call", phases, fl, fl / peak + dec, fl / (peak * args.mfu) + 2 * dec,
                        5, f"steps = defenders scored (base, rounds 0-3); ASSUMED {answer}-token answers, typical image "
                        "tokens per benchmark"))
    return stages


# ---------------------------------------------------------------------------------------------
# 4. The table
# ---------------------------------------------------------------------------------------------
def table(stages: list[Stage], P: dict, A01: Layer, A: Layer, V: dict, args: Args, seconds: float,
          matmuls: str = "native bf16") -> str:
    g = lambda b: f"{b / GB:.1f}"   # noqa: E731
    lines = ["<!-- written by bench/paper_scale.py: an ESTIMATE made on CPU, not a GPU measurement -->",
             f"Estimated on CPU (bench/paper_scale.py, {seconds:.0f} s on this machine), not measured on a GPU. "
             f"{args.world} x 80 GB GPUs; H100 roofline {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16, "
             f"{H100_HBM_BYTES_S / 1e12:.2f} TB/s; estimate at {args.mfu:.0%} MFU (decode at half the bandwidth).",
             "",
             "| stage | per-GPU work per step | peak GB / GPU (phase) | parts of the peak (GB) | TFLOP / step / GPU "
             "| s / step: bound / est. | steps | GPU-hours (est.) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        phase, total = s.peak()
        parts = ", ".join(f"{k} {g(v)}" for k, v in s.phases[phase].items())
        hours = getattr(s, "hours", s.est_s * s.steps * args.world / 3600)
        flag = "" if total <= args.gpu_gb * GB else " **over**"
        lines.append(f"| {s.name} | {s.work} | {g(total)}{flag} ({phase}) | {parts} | {s.flops / 1e12:,.0f} | "
                     f"{s.bound_s:.1f} / {s.est_s:.1f} | {s.steps:,.0f} | {hours:,.1f} |")
    lines += [""] + [f"- {s.name}: {s.notes}" for s in stages if s.notes]
    lines += ["", "Other phases (GB): " + "; ".join(
        f"{s.name.split()[0]}: " + ", ".join(f"{p} {g(sum(v.values()))}" for p, v in s.phases.items())
        for s in stages), "",
        f"Measured layers (bf16, CPU, micro-batch 1; matmuls and convolutions {matmuls}): "
        f"MMDiT block {P['mmdit_block'] / 1e6:.0f}M params + r64 LoRA at {A.tokens} tokens (02, 03: the condition "
        f"at 512^2): saves {A.saved / 2**20:.0f} MiB for backward ({A.saved_ckpt / 2**20:.0f} MiB checkpointed), "
        f"working set {A.live / 2**20:.0f} MiB, {A.flops_train / 1e12:.2f} TFLOP fwd+bwd ({A.seconds_train:.0f} s); "
        f"at {A01.tokens} tokens (01: the pipeline's 1 MP condition) working set {A01.live / 2**20:.0f} MiB, "
        f"{A01.flops_fwd / 1e12:.2f} TFLOP fwd; "
        f"Qwen2.5-VL decoder layer at {V['layer'].tokens} tokens: {V['layer'].saved / 2**20:.0f} MiB "
        f"({V['layer'].saved_ckpt / 2**20:.1f} checkpointed), LM head + log-softmax {V['layer'].other_saved / 2**20:.0f}"
        f" MiB; vision block: {V['vision'].saved / 2**20:.0f} MiB. Parameters: transformer {P['mmdit'] / 1e9:.2f}B, "
        f"Qwen2.5-VL {P['vl'] / 1e9:.2f}B, LoRA {P['lora'] / 1e6:.0f}M, VAE {P['vae'] / 1e6:.0f}M; KV cache "
        f"{P['kv_bytes_per_token'] / 1e3:.1f} KB/token.",
        f"Assumed: {ASSUMED}, DAPO mean response {args.response_tokens} tokens (a generate call runs to ~2x that), "
        "benchmark sizes and image tokens in BENCHMARKS."]
    return "\n".join(lines) + "\n"


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    emulate = args.bf16 == "fp32" or (args.bf16 == "auto" and not native_bf16())
    with Bf16InFp32() if emulate else contextlib.nullcontext():
        stages, md = measure_and_compose(args, t0, "fp32, rounded to bf16" if emulate else "native bf16")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    print(md)
    return stages


def measure_and_compose(args: Args, t0: float, matmuls: str):
    P = count_params(args.reduced)
    V = measure_vl(args.reduced, measured_response(args))
    E = measure_vae(args.reduced)
    r01 = stage_module("01_build_sft_data.py").Args().cond_resolution
    r03 = stage_module("03_train_attacker.py").Args().cond_resolution
    A = measure_mmdit(args.reduced, r03)
    A01 = A if r01 == r03 or args.reduced else measure_mmdit(args.reduced, r01, train=False)
    stages = compose(P, A01, A, V, E, args, args.reduced)
    return stages, table(stages, P, A01, A, V, args, time.time() - t0, matmuls)


if __name__ == "__main__":
    from transformers import HfArgumentParser
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
