"""A Kaggle session that dies mid-fold loses nothing: SIGKILL the CLI while fold 0 trains, run it
again, and the result equals an uninterrupted run (same adapter weights, same predictions)."""

import os
import pathlib
import subprocess
import sys

import pandas as pd
import torch
from kill_helpers import kill_mid_fold

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(tmp, run_dir):
    overrides = ["demo_warmup_rows=200", "demo_warmup_epochs=1", "max_train_rows=90", "epochs=2",
                 "folds=0", "tta_option_views=2", "evals_per_epoch=2", "checkpoint_every_steps=1",
                 f"data_dir={tmp / 'demo'}", f"model_name_or_path={tmp / 'tiny'}", f"output_dir={run_dir}"]
    return [sys.executable, "-m", "mcvqa", "run", "--profile", "demo", *overrides]


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")} | {"PYTHONUNBUFFERED": "1"}


def _run(tmp, run_dir):
    done = subprocess.run(_command(tmp, run_dir), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sigkill_mid_fold_then_rerun_equals_an_uninterrupted_run(tmp_path):
    _run(tmp_path, tmp_path / "straight")  # also builds the demo data and tiny model, shared below
    killed_at = kill_mid_fold(_command(tmp_path, tmp_path / "killed"), tmp_path / "killed", ROOT, _env())
    fold = tmp_path / "killed" / "fold0"
    assert not (fold / "DONE.json").exists() and not (fold / "test_probs.csv").exists()
    log = _run(tmp_path, tmp_path / "killed")
    assert "[train] fold 0: resumed at epoch" in log, log[-2000:]
    print(f"killed after checkpoint step {killed_at}; resumed")

    straight = torch.load(tmp_path / "straight" / "fold0" / "best_adapter.pt")
    resumed = torch.load(fold / "best_adapter.pt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    for name in ("fold0/test_probs.csv", "fold0/oof_probs.csv", "fold0/history.csv", "submission.csv"):
        a = pd.read_csv(tmp_path / "straight" / name)
        b = pd.read_csv(tmp_path / "killed" / name)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
