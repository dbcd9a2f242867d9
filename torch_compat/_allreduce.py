"""The statistics' reduction over torch.distributed ranks (Lightning DDP), as a jaxnorm reducer."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.distributed as dist

# The tensors of the last few collectives. A gloo worker thread destroys each finished
# collective's work, and with it the work's references to the tensors; were that the last
# reference to a tensor Python had already dropped, the worker would need the GIL to free
# it. In torch 2.1 (the floor) the main thread holds the GIL while it joins those threads in
# `destroy_process_group`, so a collective right before it hung both for ever. Held here,
# the tensors are released by the main thread instead, collectives later.
_RECENT: deque[torch.Tensor] = deque(maxlen=16)


def ddp_active() -> bool:
    """Whether a torch.distributed process group is up (Lightning's DDP strategies)."""
    return dist.is_available() and dist.is_initialized()


def epoch_reducer():
    """The reducer an adapter gives its hook at each validation epoch: ``allreduce_stats``
    under DDP, else none. Chosen per epoch: the process group may come up after setup."""
    return allreduce_stats if ddp_active() else None


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and a "cpu:gloo,cuda:nccl" pair) takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_stats(
    mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``jaxnorm.Reducer`` over the default process group: MIN, MAX and SUM.

    Every rank calls it at validation epoch end (through the hook) and gets the global
    statistics and non-finite count back.

    Args:
      mins: float32 ``[image, pixel]`` minima of this rank.
      maxs: float32 ``[image, pixel]`` maxima of this rank.
      counts: int64 ``[n_values, n_nonfinite]`` of this rank.
    """
    device = _collective_device()
    reduced = []
    for values, dtype, op in (
        (mins, torch.float32, dist.ReduceOp.MIN),
        (maxs, torch.float32, dist.ReduceOp.MAX),
        (counts, torch.int64, dist.ReduceOp.SUM),
    ):
        t = torch.as_tensor(np.asarray(values), dtype=dtype).to(device)
        dist.all_reduce(t, op=op)
        _RECENT.append(t)
        reduced.append(t.cpu().numpy())
    return reduced[0], reduced[1], reduced[2]


def broadcast_from_rank0(values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every rank of the default process group (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=0)
    _RECENT.append(t)
    return t.cpu().tolist()
