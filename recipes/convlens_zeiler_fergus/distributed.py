"""Multi-GPU and multi-node training through ``torchrun`` + DistributedDataParallel.

    torchrun --standalone --nproc_per_node=8 -m convlens_zeiler_fergus --data /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m convlens_zeiler_fergus --data /data/imagenet --experiment zfnet

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`setup` reads them, picks NCCL on CUDA (rank ``LOCAL_RANK``'s GPU) and
gloo on the CPU, and joins the process group. Without them it is a single process and every
collective below is the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from convlens.errors import ConvlensError

__all__ = ["DistEnv", "setup", "teardown"]


@dataclass
class DistEnv:
    """This process's place in the job. ``enabled`` is False for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    enabled: bool = False
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def chunk(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of ``n`` items (ranks differ by ≤ 1)."""
        per = -(-n // self.world_size)
        lo = min(n, self.rank * per)
        return lo, min(n, lo + per)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank (decisions taken together: checkpoints, stopping)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        tdist.broadcast(t, src=0)
        return bool(t.item())

    def any_flag(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def gather_tensors(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all ranks), on rank order."""
        if not self.enabled:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(out, t.contiguous())
        return out

    def gather_rows(self, rows: torch.Tensor, n_total: int) -> torch.Tensor:
        """Concatenate every rank's :meth:`chunk` of a ``[n_i, ...]`` tensor into ``[n_total,
        ...]`` (on every rank)."""
        if not self.enabled:
            return rows
        per = -(-n_total // self.world_size)
        padded = rows.new_zeros((per, *rows.shape[1:]))
        padded[: len(rows)] = rows
        parts = self.gather_tensors(padded)
        return torch.cat(parts)[:n_total]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ConvlensError(f"environment variable {name}={value!r} is not an integer") from None


def setup(
    device: torch.device, init_method: str | None = None, timeout_minutes: float = 30.0
) -> tuple[DistEnv, torch.device]:
    """Join the ``torchrun`` job described by the environment (or run alone). Returns the
    :class:`DistEnv` and the device this rank trains on."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv(), device
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ConvlensError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistEnv(rank, world, local_rank, local_world, True, backend), device


def teardown(env: DistEnv) -> None:
    if env.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
