"""## Sharded prediction: one test set split across GPU workers (command line and benchmarks only)

`predict_views_sharded` splits the rows into contiguous shards, one per GPU worker (parallel.py), and
puts the probabilities back together in the original order: the same result as one process.
"""

import torch

from ..core.inference import gather_views, predict_views
from ..core.modeling import load_model_for_training, load_processor, load_trainable_state
from ..core.prompts import make_prompt_format
from ..core.training import FoldContext
from ..machinery.process import contiguous_shards
from .parallel import WorkerJob, run_in_workers


def shard_bounds(n_rows, n_shards):
    """Contiguous [start, stop) row ranges of near-equal size (sizes differ by at most one, none empty)."""
    return [(a, b) for a, b in contiguous_shards(n_rows, max(1, min(n_shards, n_rows))) if b > a] or [(0, 0)]


def predict_shard(frame, cfg, hardware, adapter_path=None, desc="test"):
    """In a worker: the fold's model (4-bit base + LoRA, adapter weights from `adapter_path`) scores
    `frame` under every TTA view, exactly as `run_fold` does in one process."""
    model = load_model_for_training(cfg, hardware)
    if adapter_path:
        load_trainable_state(model, torch.load(adapter_path))
    processor = load_processor(cfg)
    fmt = make_prompt_format(processor, cfg)
    return predict_views(FoldContext(processor, fmt, cfg, hardware), model, frame, desc=desc)


def predict_views_sharded(frame, cfg, hardware, adapter_path, *, slots, log_dir, desc="test"):
    """`predict_views` over contiguous row shards, one worker per slot (GPU), gathered in the original
    row order: the same {(scale, shift): [N, 4]} as one process computes."""
    bounds = shard_bounds(len(frame), len(slots))
    jobs = [WorkerJob(f"{desc} rows {a}-{b - 1}", predict_shard,
                      (frame.iloc[a:b].reset_index(drop=True), cfg, hardware,
                       None if adapter_path is None else str(adapter_path), f"{desc} rows {a}-{b - 1}"))
            for a, b in bounds]
    return gather_views(run_in_workers(jobs, slots[:len(jobs)], log_dir))
