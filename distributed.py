"""DDP's collectives, in one place. An NCCL process group serves CUDA tensors only (gloo serves any), so every
collective goes through Comm, which makes its own tensors on the run's device and refuses a tensor from
anywhere else: a CPU tensor in a CUDA run fails on the first call, on the CPU too, instead of at the end of a
GPU run.

    comm = Comm(device, world)
    comm.any(not finite)          # one rank's verdict is every rank's
    comm.all_reduce(flat_grads)   # in place
    comm.all_reduce_grads(model)  # after backward: the replicas' gradients summed, BN statistics averaged
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
    group = {"timeout": TIMEOUT}
    if world > 1 and "TORCHELASTIC_RESTART_COUNT" in os.environ:  # under torchrun
        group.update(store=attempt_store(rank, world), rank=rank, world_size=world)
    if world > 1 and want.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        want = f"cuda:{local}"
        dist.init_process_group("nccl", device_id=torch.device(want), **group)  # bound to its GPU
    elif world > 1:
        dist.init_process_group("gloo", **group)
    return torch.device(want), rank, world


def attempt_store(rank, world):
    """torchrun's key-value store (MASTER_ADDR:MASTER_PORT, served by its agent), its keys under this start's own
    prefix. When torchrun restarts the workers (--max-restarts), the restarted group would otherwise read the
    addresses the first start left there and connect to processes that are gone (pytorch/pytorch#167288; measured
    in docs/benchmarks.md, "a torchrun restart's process group")."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 serves it, as env:// does
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=TIMEOUT)
    return dist.PrefixStore(f"nanocamtl/start{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def float_buffers(model):
    """The floating buffers: BatchNorm running means and variances (its int counters matter only with
    momentum=None, which YOLOv8 never uses)."""
    return [b for b in model.buffers() if b.is_floating_point()]


def set_float_buffers(model, flat):
    """float_buffers(model) <- the flat (n,) tensor torch.cat of them once gave."""
    bufs = float_buffers(model)
    for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
        b.copy_(v.view_as(b))


def same_device(t, device):
    """A tensor on `device`; device "cuda" (no index) means the current CUDA device."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return t.device.type == device.type and (t.device.index or 0) == (index or 0)


class Comm:
    """The collectives of one run on `device` among `world` processes; with world == 1 each returns its input."""

    def __init__(self, device, world):
        self.device, self.world = torch.device(device), world
        self.rank = dist.get_rank() if dist.is_initialized() else 0

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

    def broadcast_object(self, obj, src=0):
        """-> rank src's obj (a picklable object) on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce_grads(self, model):
        """Sum every trainable parameter's gradient over the ranks in one flat buffer, and average the floating
        buffers (BatchNorm statistics), so the replicas stay identical. A parameter without a gradient sends zeros
        and keeps none: the optimizer then skips it, exactly as in one process (no weight decay, no momentum)."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        self.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            if p.grad is not None:
                p.grad.copy_(g.view_as(p))
        stats = self.all_reduce(torch.cat([b.flatten() for b in float_buffers(model)]))
        set_float_buffers(model, stats / self.world)

    def replica_difference(self, model):
        """-> the largest difference of any weight to rank 0's, over the ranks (0.0: the replicas are identical)."""
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])  # (n,)
        ref = self.broadcast(flat.clone(), 0)
        diff = self.max((flat - ref).abs().max().item())
        self.barrier()
        return diff
