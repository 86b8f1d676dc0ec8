"""Generation under FSDP2: all-gather every layer for every decoded token, or once per generate call.

  torchrun --nproc_per_node 2 bench/fsdp_generate.py                 # CPU over gloo, ~90 s
  torchrun --nproc_per_node 2 bench/fsdp_generate.py --layers 16 --new_tokens 128

Stage 04 samples its rollouts from the FSDP2-sharded defender. Left to FSDP, every forward of
generate() (one per decoded token) all-gathers every decoder layer and frees it again, and ranks
must decode in lock-step (synced_gpus) for the collectives to match. 04 instead gathers every layer
once (parallel.gathered_for_generation), decodes with no collective at all, and reshards.
This script runs both on a random mid-size Qwen2.5-VL (sizes below) with 04's own setup_model
(fp32 master weights, MixedPrecisionPolicy(bf16, fp32)) and prints tokens/s and all-gather counts.
It is a CPU measurement over gloo, not a GPU number: on GPUs over NVLink the gathers are far cheaper
per byte, but their count (layers x tokens) and the lock-step decoding stay.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import parallel  # noqa: E402
import policy  # noqa: E402


@dataclass
class Args:
    hidden: int = field(default=512, metadata={"help": "text hidden size"})
    layers: int = field(default=8, metadata={"help": "decoder layers"})
    new_tokens: int = field(default=64, metadata={"help": "tokens decoded per sequence"})
    batch: int = field(default=8, metadata={"help": "sequences per generate call"})
    repeats: int = field(default=3, metadata={"help": "timed generate calls per mode"})


def build_model_dir(args, path: Path):
    """A random Qwen2.5-VL of the requested size with the tiny tokenizer, saved as a model directory."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, processor = common.load_defender("tiny")
    cfg = model.config
    cfg.text_config.update(dict(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                num_key_value_heads=2, head_dim=64, layer_types=["full_attention"] * args.layers,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [8, 12, 12]}))
    cfg.vision_config.update(dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                                  out_hidden_size=args.hidden, fullatt_block_indexes=[3]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        big = Qwen2_5_VLForConditionalGeneration(cfg)
    big.generation_config.pad_token_id = cfg.text_config.pad_token_id
    big.generation_config.eos_token_id = cfg.text_config.eos_token_id
    big.save_pretrained(path)
    processor.save_pretrained(path)


def count_all_gathers():
    """Count FSDP2 all-gathers by wrapping its parameter-group unshard (when it really gathers)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    counter = {"n": 0}
    orig = FSDPParamGroup.unshard

    def unshard(self, async_op=False):
        if not self.is_unsharded and self._all_gather_result is None:
            counter["n"] += 1
        return orig(self, async_op)

    FSDPParamGroup.unshard = unshard
    return counter


def main(args: Args):
    from PIL import Image
    common.quiet()
    ddp = parallel.setup_distributed()
    if ddp.world < 2:
        raise SystemExit("run under torchrun --nproc_per_node 2 (or more): this measures FSDP2")
    obj = [tempfile.mkdtemp(prefix="aot_bench_")] if ddp.master else [None]
    torch.distributed.broadcast_object_list(obj)
    path = Path(obj[0])
    if ddp.master:
        build_model_dir(args, path)
    parallel.barrier()
    margs = SimpleNamespace(dtype="bf16", lora_rank=0, train_vision=True, grad_ckpt=False,
                            min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    model, processor, params = policy.setup_model(margs, ddp, str(path))
    model.eval()
    n_params = sum(p.numel() for p in params)
    images = [Image.new("RGB", (56, 56), (40 * i % 255, 90, 160)) for i in range(args.batch)]
    inputs = common.defender_inputs(processor, images, ["Describe the scene."] * args.batch, ddp.device)
    kw = dict(do_sample=True, top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              pad_token_id=processor.tokenizer.pad_token_id)
    gathers = count_all_gathers()
    results = {}
    for mode in ("per_token", "once", "per_token", "once"):   # interleaved; the second pass is timed
        torch.manual_seed(ddp.rank)
        gathers["n"] = 0
        t0 = time.time()
        with torch.no_grad():
            for _ in range(args.repeats):
                if mode == "once":
                    with parallel.gathered_for_generation(model):
                        model.generate(**inputs, **kw)
                else:   # FSDP's own schedule; the root stays gathered (generate runs the vision tower first)
                    model.unshard()
                    model.generate(**inputs, **kw, synced_gpus=True)
                    model.reshard()
        parallel.barrier()
        results[mode] = (time.time() - t0, gathers["n"] / args.repeats)
    tokens = args.repeats * args.batch * args.new_tokens
    parallel.print0(f"[bench] CPU, gloo, {ddp.world} ranks, bf16 compute: Qwen2.5-VL {args.layers} layers x hidden "
                    f"{args.hidden} + 4 vision blocks ({n_params / 1e6:.0f}M params), {args.batch} sequences x "
                    f"{args.new_tokens} new tokens per call")
    for mode, (secs, n) in results.items():
        parallel.print0(f"[bench] {mode:>9}: {tokens / secs:7.1f} tokens/s per rank, {n:6.0f} all-gathers per generate call")
    parallel.print0(f"[bench] gather-once speed-up: {results['per_token'][0] / results['once'][0]:.2f}x")
    if ddp.master:
        import shutil
        shutil.rmtree(path, ignore_errors=True)
    parallel.cleanup_distributed()


if __name__ == "__main__":
    from transformers import HfArgumentParser
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
