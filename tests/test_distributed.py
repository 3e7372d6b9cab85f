"""DDP on a CPU: `torchrun --nproc_per_node=2` (gloo) trains fold 0 split across two ranks, is killed
mid-fold, resumes from rank 0's checkpoint, and ends with the same adapter, history and predictions
as one process running the same config.

The two-rank run is not bit-identical to one process: each rank's forward sees half of a step's
samples (different matmul shapes) and the gradient is summed across ranks in another order, so the
weights differ by float32 rounding (~2e-6 here on weights up to 0.09). Tolerances, stated: adapter
weights atol 2e-5, probabilities atol 1e-6, losses rtol 1e-5, eval accuracies exact. A wrong
split or weighting is far outside them (checked by breaking the code on purpose): without the
gradient all-reduce the adapter differs by 5e-3, weighting the ranks equally instead of by samples
(the last step of each epoch is 5 + 6 samples) by 1e-3, every rank training on the whole step by 6e-4.
"""

import os
import pathlib
import subprocess
import sys

import pandas as pd
import pytest
import torch
from kill_helpers import kill_mid_fold

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEP = 16  # the demo profile's micro_batch_size * grad_accum_steps: one optimizer step's samples


def _mcvqa(tmp, run_dir, ranks=1):
    overrides = ["demo_warmup_rows=200", "demo_warmup_epochs=1", "max_train_rows=90", "epochs=2",
                 "folds=0", "tta_option_views=2", "evals_per_epoch=2", "checkpoint_every_steps=1",
                 f"data_dir={tmp / 'demo'}", f"model_name_or_path={tmp / 'tiny'}", f"output_dir={run_dir}"]
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [sys.executable, *launcher, "-m", "mcvqa", "run", "--profile", "demo", *overrides]


def _env():
    # One thread per process: two ranks on a 2-core box must not oversubscribe it.
    return ({k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
            | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def _run(command):
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def test_two_ranks_killed_and_resumed_equal_one_process(tmp_path):
    one = tmp_path / "one_process"
    _run(_mcvqa(tmp_path, one))  # also builds the demo data and tiny model, shared below
    train_rows = int((pd.read_csv(one / "folds.csv")["fold"] != 0).sum())
    assert train_rows % STEP % 2 == 1, "the last step of each epoch should split unevenly over two ranks"

    ddp = tmp_path / "two_ranks"
    killed_at = kill_mid_fold(_mcvqa(tmp_path, ddp, ranks=2), ddp, ROOT, _env())
    assert not (ddp / "fold0" / "DONE.json").exists()
    log = _run(_mcvqa(tmp_path, ddp, ranks=2))
    assert "[ddp] 2 ranks (gloo)" in log and "[train] fold 0: resumed at epoch" in log, log[-3000:]
    print(f"two ranks killed after checkpoint step {killed_at}, resumed")

    ref = torch.load(one / "fold0" / "best_adapter.pt")
    got = torch.load(ddp / "fold0" / "best_adapter.pt")
    assert ref.keys() == got.keys()
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    print(f"adapter: max |two ranks - one process| = {worst:.2e}")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=2e-5, msg=name)
    for name in ("fold0/test_probs.csv", "fold0/oof_probs.csv", "submission.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(ddp / name), pd.read_csv(one / name), check_exact=False,
                                      rtol=0, atol=1e-6, obj=name)
    ref_hist, got_hist = pd.read_csv(one / "fold0" / "history.csv"), pd.read_csv(ddp / "fold0" / "history.csv")
    pd.testing.assert_frame_equal(got_hist.drop(columns="loss"), ref_hist.drop(columns="loss"), obj="history")
    assert got_hist["loss"].tolist() == pytest.approx(ref_hist["loss"].tolist(), rel=1e-5)
