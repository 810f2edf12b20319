"""Distributed profiling with torch.distributed: shard samples, all-reduce float32 sums, rank 0 writes.

``torchrun --nproc_per_node N -m actpat profile ...`` and ``accelerate launch -m actpat profile ...``
both start N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment. ``Ranks.from_env()`` reads them (a single process when they
are absent) and ``init()`` joins the process group: ``nccl`` when the process uses a CUDA device,
``gloo`` otherwise (CPU, the tests here).

The metric is a mean over samples of per-sample terms, so each rank scores its own shard
(``shard``: samples ``rank, rank + N, ...``) into float32 sums, the sums and sample counts are
all-reduced (summed), and every rank ends with the single-process mean up to float32 rounding
of the summation order. Only the main rank writes files (``is_main``).

Other modules use the helpers directly: ``shard(items, ctx)``, ``all_reduce_(tensors, ctx)``,
``all_reduce_sums(dict, ctx)``, ``gather_objects(obj, ctx)``, ``is_main(ctx)``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, the number of processes, its local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Ranks":
        """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun, accelerate launch); default one process."""
        env = os.environ if env is None else env

        def first(names, default):
            return next((env[n] for n in names if n in env), default)

        try:  # torchrun / accelerate (GPU) names first, then MPI's (accelerate multi-CPU)
            world = int(first(("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), "1"))
            rank = int(first(("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"), "0"))
            local = int(first(("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
                              str(rank)))
        except ValueError:
            raise UserError("RANK / WORLD_SIZE / LOCAL_RANK must be integers; start the job with "
                            "torchrun or accelerate launch") from None
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"RANK={rank} does not fit WORLD_SIZE={world}; start the job with "
                            "torchrun or accelerate launch")
        return cls(rank, world, local)


SINGLE = Ranks()


def current() -> Ranks:
    """The context of an initialised process group, else the environment's, else one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())))
    return Ranks.from_env()


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(ctx: Ranks | None = None, device: torch.device | str = "cpu") -> Ranks:
    """Join the process group when the environment asks for several processes; idempotent."""
    ctx = ctx or Ranks.from_env()
    if not ctx.enabled:
        return ctx
    if not torch.distributed.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run a single process")
    if not torch.distributed.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserError(f"WORLD_SIZE={ctx.world_size} but {', '.join(missing)} not set; "
                            "start the job with torchrun or accelerate launch")
        torch.distributed.init_process_group(backend_for(device), rank=ctx.rank,
                                             world_size=ctx.world_size)
    return ctx


def local_device(requested: str, ctx: Ranks) -> str:
    """With several processes on CUDA, rank r uses cuda:<local rank> unless a device was pinned."""
    if ctx.enabled and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    return requested


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def launched(requested_device: str):
    """A command's process group for its lifetime: yields ``(ctx, device)``.

    Under torchrun / accelerate launch this joins the group (gloo on CPU, nccl on CUDA, rank r
    on ``cuda:<local rank>``) and leaves it at the end; a plain start yields one process.
    """
    from ..models.loading import resolve_device

    ctx = Ranks.from_env()
    device = local_device(requested_device, ctx)
    ctx = init(ctx, resolve_device(device))
    try:
        yield ctx, device
    finally:
        shutdown()


def is_main(ctx: Ranks | None = None) -> bool:
    return (ctx or current()).is_main


def shard(items: list, ctx: Ranks | None = None) -> list:
    """This rank's items: positions rank, rank + N, rank + 2N, ... (round robin, balanced)."""
    ctx = ctx or current()
    return list(items[ctx.rank::ctx.world_size])


def shard_positions(n: int, ctx: Ranks | None = None) -> list[int]:
    """The positions ``shard`` keeps out of ``n`` items, to put results back in order."""
    ctx = ctx or current()
    return list(range(ctx.rank, n, ctx.world_size))


def _comm_device(t: torch.Tensor) -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensors: list[torch.Tensor], ctx: Ranks | None = None) -> list[torch.Tensor]:
    """Sum each float32 tensor over all ranks, in place (float32 is kept; no-op on one process)."""
    ctx = ctx or current()
    if not ctx.enabled:
        return tensors
    for t in tensors:
        if t.dtype != torch.float32 and t.dtype != torch.float64 and t.dtype != torch.int64:
            raise TypeError(f"all_reduce_ expects float32/float64/int64 accumulators, got {t.dtype}")
        dev = _comm_device(t)
        buf = t if t.device == dev else t.to(dev)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
    return tensors


def all_reduce_sums(sums: dict[str, torch.Tensor], ctx: Ranks | None = None) -> dict:
    """All-reduce a name -> tensor dict (same keys on every rank, iterated in sorted order)."""
    ctx = ctx or current()
    if ctx.enabled:
        keys = sorted(sums)
        names = gather_objects(keys, ctx)
        if any(n != keys for n in names):
            raise RuntimeError("ranks hold different accumulator keys; cannot all-reduce")
        all_reduce_([sums[k] for k in keys], ctx)
    return sums


def all_reduce_number(value: float | int, ctx: Ranks | None = None):
    """Sum a Python number over ranks (counts, token totals)."""
    ctx = ctx or current()
    if not ctx.enabled:
        return value
    kind = torch.int64 if isinstance(value, int) else torch.float64
    t = torch.tensor([value], dtype=kind)
    all_reduce_([t], ctx)
    return t.item()


def gather_objects(obj, ctx: Ranks | None = None) -> list:
    """Every rank's picklable ``obj``, in rank order (a list of one on a single process)."""
    ctx = ctx or current()
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(ctx: Ranks | None = None) -> None:
    ctx = ctx or current()
    if ctx.enabled:
        torch.distributed.barrier()


def gather_in_order(mine: list, n: int, ctx: Ranks | None = None) -> list:
    """Reassemble per-item results computed on ``shard`` positions into the full ordered list.

    ``mine[k]`` is the result for item ``shard_positions(n, ctx)[k]``; every rank gets all
    ``n`` results in item order (for per-pair outputs: similarity, STS).
    """
    ctx = ctx or current()
    if not ctx.enabled:
        return list(mine)
    out = [None] * n
    for rank, part in enumerate(gather_objects(list(mine), ctx)):
        for pos, value in zip(range(rank, n, ctx.world_size), part):
            out[pos] = value
    return out


def active() -> Ranks:
    """The initialised process group's context, else a single process (library helpers that
    must not fail when the environment names ranks but nobody joined a group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return current()
    return SINGLE
