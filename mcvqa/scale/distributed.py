"""## Several GPUs for one fold: data parallelism under `torchrun` / `accelerate launch` (command line)

Started by `torchrun --nproc_per_node=N -m mcvqa run ...` (or `accelerate launch -m mcvqa run ...`,
which sets the same WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), every process
(rank) loads the 4-bit model on its own GPU (`cuda:LOCAL_RANK`) and joins one process group (NCCL on
GPUs, gloo on a CPU). The folds then run one after the other, each across all ranks: every optimizer
step's samples are cut into one contiguous slice per rank, each rank weights its loss by its share of
the step's samples, and the LoRA gradients are summed over the ranks, so every rank holds exactly the
gradient one process would compute for the whole step (the effective batch stays
`micro_batch_size * grad_accum_steps`, summed over the ranks). Validation and test predictions are
split the same way (one contiguous row shard per rank, gathered back in order). Only rank 0 writes
files; what other ranks need from disk (a checkpoint, the best adapter) rank 0 reads and sends them.

`init_distributed` (the command line calls it) installs a `DdpGroup` as the process group every stage
talks to (machinery/process.py); in one process (the notebook, `python -m mcvqa run`) none of this runs and
that group is `SingleProcess`. This module is not in the notebook.
"""

import datetime
import os

import torch
import torch.distributed as dist

from ..core.collate import slice_rows
from ..machinery.process import SingleProcess, contiguous_shards, use_process_group

DDP_TIMEOUT_MINUTES = 60  # how long a rank waits for the others (e.g. while rank 0 builds the demo model)


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed():
    """Join the process group described by torchrun's environment and install it for every stage; a
    no-op in one process. Returns True when this call created the group (end it with `finish_distributed`)."""
    if dist.is_available() and dist.is_initialized():  # joined by the caller (e.g. accelerate): use it as it is
        if dist.get_world_size() > 1:
            use_process_group(DdpGroup())
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=DDP_TIMEOUT_MINUTES))
    group = use_process_group(DdpGroup())
    if group.is_main():
        print(f"[ddp] {group.world_size} ranks ({backend}): each optimizer step's samples are split across them")
    return True


def finish_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    use_process_group(SingleProcess())


class DdpGroup:
    """The process group of a torchrun launch: machinery/process.py's SingleProcess methods, for N ranks.
    Installed by `init_distributed` only once torch.distributed is initialised with 2+ ranks."""

    @property
    def world_size(self):
        return dist.get_world_size()

    def is_main(self):
        """Rank 0: the one rank that writes files and prints the run's results."""
        return dist.get_rank() == 0

    def from_main(self, fn):
        """`fn()` run on rank 0 only (a file read, say), its result sent to every rank (picklable; tensors
        on the CPU)."""
        box = [fn() if self.is_main() else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        dist.barrier()

    def local_device(self, hardware):
        """Where this rank's model goes: its own GPU (None, the default device, on a CPU)."""
        return f"cuda:{torch.cuda.current_device()}" if hardware.device == "cuda" else None

    def broadcast_params(self, params):
        """Rank 0's values of `params` on every rank (the LoRA weights start identical everywhere)."""
        for param in params:
            dist.broadcast(param.data, src=0)

    def rank_bounds(self, n_items):
        """This rank's contiguous [start, stop) of n items: sizes differ by at most one; empty when n < ranks."""
        return contiguous_shards(n_items, self.world_size)[dist.get_rank()]

    def rank_slice(self, batch):
        """This rank's contiguous share of one optimizer step's collated samples."""
        return slice_rows(batch, *self.rank_bounds(batch["input_ids"].shape[0]))

    def all_reduce_grads(self, params, losses):
        """Sum the gradients of `params` and the (share-weighted) losses over all ranks; returns the summed losses.

        Each rank weighted its loss by its share of the step's samples, so the sums are exactly the
        single-process gradient and mean loss of the whole step (up to the order of the additions). A rank
        with no samples in a short last step, or a non-finite loss, adds zeros (NaN then reaches every rank:
        all skip the step). Why not torch's DistributedDataParallel: the scorer calls the inner language
        model directly (scoring.answer_hidden_states), past DDP's forward, which DDP needs to arm its
        gradient hooks; an empty rank could not join DDP's reducer; DDP would also broadcast all 4-bit
        base weights at start for nothing (every rank loads the same). Only the LoRA weights train, so one
        flat all-reduce per optimizer step is all the communication there is."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads):
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            param.grad = grad
            offset += grad.numel()
        total = torch.tensor(list(losses), dtype=torch.float64, device=flat.device)
        dist.all_reduce(total)
        return tuple(total.tolist())

    def map_shards(self, frame, fn):
        """`fn` on this rank's contiguous row shard of `frame`; every shard's result, in row order, on every
        rank (empty shards give nothing)."""
        start, stop = self.rank_bounds(len(frame))
        part = fn(frame.iloc[start:stop].reset_index(drop=True)) if stop > start else None
        parts = [None] * self.world_size
        dist.all_gather_object(parts, part)
        return [p for p in parts if p is not None]
