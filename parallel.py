"""torchrun and FSDP2, in one place: rank / world / device from torchrun's environment, rank-0 printing,
collectives that are the identity in one process, FSDP2 sharding of the large models, the one
all-gather per generate call that lets ranks decode without collectives, and 01's model offloading. Every stage runs as
``python script.py`` (one process) or under ``torchrun``; nothing here changes what one process computes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """rank / world / device from torchrun's environment; one process when not under torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum, mean or max across ranks (identity in one process); returns a new tensor."""
    x = x.detach().clone()
    if dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        y = x.to(dev)
        dist.all_reduce(y, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        x = y.to(x.device)
        if op == "mean":
            x /= dist.get_world_size()
    return x


def sum_dict(d: dict) -> dict:
    """{name: number} summed over ranks, one all-reduce (every rank passes the same names)."""
    keys = sorted(d)
    total = all_reduce(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)).tolist()
    return dict(zip(keys, total))


def merge_counts(d: dict) -> dict:
    """{name: number} summed over ranks where the names differ between ranks (all_gather_object)."""
    parts = [d]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, d)
    out = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def all_reduce_grads(params):
    """Average gradients across ranks with one flat all-reduce (DDP's result, minus overlap)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(g).clone()
        i += g.numel()


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard(model, blocks, param_dtype=None):
    """FSDP2 (verl / EasyR1 / flow_grpo's sharding): fully_shard each block, then the root; each rank
    keeps 1/world of every weight and gathers a block only while it runs. param_dtype None keeps
    every weight's own dtype (a frozen bf16 base and its fp32 LoRA compute as in one process);
    gradients are reduce-scattered in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def shard_vl(model, pad_id: int, param_dtype=None):
    """A Qwen2.5-VL (defender or the editor's text encoder) sharded per vision block and decoder
    layer. The root is initialised by one tiny forward (generate() runs the vision tower before the
    root's forward otherwise), then resharded (the root keeps its weights gathered after a forward)."""
    shard(model, list(model.model.visual.blocks) + list(model.model.language_model.layers), param_dtype)
    with torch.no_grad():
        model(input_ids=torch.tensor([[pad_id]], device=model.device), use_cache=False)
    model.reshard()
    return model


@contextmanager
def gathered_for_generation(model):
    """FSDP2: all-gather every layer once, generate with no collective at all, reshard after.
    Per-layer all-gathers for every decoded token (synced_gpus) would cost tokens x layers
    collectives (bench/fsdp_generate.py); the price is one full bf16 copy of the weights per rank
    while generating, as verl / EasyR1 hold one in vLLM. Every rank must enter it together."""
    if not is_fsdp(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's defaults: root False


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


class OneOnDevice:
    """--offload: of the frozen MLLMs that take turns (the editor's text encoder, the judge, the
    target), only the one in use is on the GPU; the others wait in CPU memory (~16.6 GB each way
    over PCIe, ~1 s per swap at paper size, a few swaps per chunk). A no-op on the CPU."""

    def __init__(self, device, enabled: bool):
        self.device, self.current = device, None
        self.enabled = enabled and torch.device(device).type != "cpu"

    def use(self, module):
        if self.enabled and module is not self.current:
            if self.current is not None:
                self.current.to("cpu")
            module.to(self.device)
            self.current = module
        return module
