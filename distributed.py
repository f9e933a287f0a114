"""DDP's collectives, in one place. An NCCL process group serves CUDA tensors only (gloo serves any), so every
collective goes through Comm, which makes its own tensors on the run's device and refuses a tensor from
anywhere else: a CPU tensor in a CUDA run fails on the first call, on the CPU too, instead of at the end of a
GPU run.

    comm = Comm(device, world)
    comm.any(not finite)          # one rank's verdict is every rank's
    comm.all_reduce(flat_grads)   # in place
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank may wait in a collective before the run is ended (NCCL's own default is 10 min). With every rank
# validating its share of the images, what one rank does alone is writing checkpoints and pictures.
TIMEOUT = timedelta(minutes=30)


def init(want):
    """-> (device, rank, world) of this process, from torchrun's RANK/WORLD_SIZE/LOCAL_RANK; with more than one
    process, the process group is started: NCCL on cuda:LOCAL_RANK, gloo on the CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and want.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        want = f"cuda:{local}"
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device(want))  # bound to its GPU
    elif world > 1:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return torch.device(want), rank, world


def same_device(t, device):
    """A tensor on `device`; device "cuda" (no index) means the current CUDA device."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return t.device.type == device.type and (t.device.index or 0) == (index or 0)


class Comm:
    """The collectives of one run on `device` among `world` processes; with world == 1 each returns its input."""

    def __init__(self, device, world):
        self.device, self.world = torch.device(device), world

    def _check(self, t):
        if not same_device(t, self.device):
            raise RuntimeError(f"a collective on a {t.device} tensor in a run on {self.device}: tensors that "
                               "cross ranks must be made on the run's device")
        return t

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        """t (any shape, on the run's device) <- its sum (or op) over the ranks, in place; -> t."""
        if self.world > 1:
            dist.all_reduce(self._check(t), op=op)
        return t

    def broadcast(self, t, src=0):
        """t <- rank src's t, in place; -> t."""
        if self.world > 1:
            dist.broadcast(self._check(t), src)
        return t

    def any(self, flag):
        """flag: a bool or a 0-d bool tensor -> True on every rank when it is true on any rank (one sync)."""
        if self.world == 1:
            return bool(flag)
        t = torch.as_tensor(flag, device=self.device).reshape(1).float()  # made here, on the run's device
        return bool(self.all_reduce(t, dist.ReduceOp.MAX).item())

    def max(self, x):
        """-> the largest of the ranks' floats x."""
        if self.world == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        return self.all_reduce(t, dist.ReduceOp.MAX).item()

    def gather_objects(self, obj):
        """-> [every rank's obj] in rank order (picklable objects: meters, dicts, arrays)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)  # NCCL: through the current CUDA device, which init() set
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()
