"""## One process: the null object every stage talks to

The training loop, the predictions and the pipeline ask the *process group* what to do at the few points
where several processes would differ (who writes files, which samples of a step are this process's, how
gradients are combined). In the notebook and `python -m mcvqa run` that is this one process, and every
answer is the trivial one. Under `torchrun` the command line installs a DDP group (scale/distributed.py)
with the same methods, so no stage needs an `if distributed:` branch (nanochat's `DummyWandb` habit).
"""


class SingleProcess:
    """The whole run in this process: it writes every file and holds every sample."""

    world_size = 1

    def is_main(self):
        return True

    def from_main(self, fn):
        """fn() here; under DDP rank 0's result is sent to every rank."""
        return fn()

    def barrier(self):
        pass

    def local_device(self, hardware):
        """Where the model goes: None, the default device (DDP: this rank's GPU)."""
        return None

    def broadcast_params(self, params):
        pass

    def rank_slice(self, batch):
        """This process's samples of one optimizer step's batch: all of them."""
        return batch

    def all_reduce_grads(self, params, losses):
        """The step's gradients and losses (a tuple) summed over processes: this one's, unchanged."""
        return losses

    def map_shards(self, frame, fn):
        """fn over this process's row shard of frame, every shard's result in row order: [fn(frame)]."""
        return [fn(frame)]


def contiguous_shards(n_items, n_shards):
    """[start, stop) of n_shards contiguous shards of n items, in order: sizes differ by at most one (some are
    empty when n_items < n_shards). The one sharding rule of DDP ranks and GPU workers."""
    return [(n_items * k // n_shards, n_items * (k + 1) // n_shards) for k in range(n_shards)]


_CURRENT = [SingleProcess()]


def process_group():
    """The group this process belongs to (SingleProcess unless a DDP launch installed another)."""
    return _CURRENT[0]


def use_process_group(group):
    """Install `group` for every stage of this process (scale/distributed.py under torchrun)."""
    _CURRENT[0] = group
    return group
