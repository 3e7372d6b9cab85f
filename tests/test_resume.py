"""A Kaggle session that dies mid-fold loses nothing: SIGKILL the CLI while fold 0 trains, run it
again, and the result equals an uninterrupted run (same adapter weights, same predictions)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pandas as pd
import torch

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


def _kill_mid_fold(tmp, run_dir, min_step=2):
    """Start a run and SIGKILL its whole process group once fold 0 has a checkpoint past `min_step`."""
    proc = subprocess.Popen(_command(tmp, run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = run_dir / "fold0" / "checkpoint.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if checkpoint.exists():
                try:
                    step = torch.load(checkpoint, weights_only=False)["state"]["step"]
                except Exception:  # noqa: BLE001 - being replaced right now; look again
                    step = 0
                if step >= min_step:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return step
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raise AssertionError("the run finished (or timed out) before a mid-fold checkpoint could be killed")


def test_sigkill_mid_fold_then_rerun_equals_an_uninterrupted_run(tmp_path):
    _run(tmp_path, tmp_path / "straight")  # also builds the demo data and tiny model, shared below
    killed_at = _kill_mid_fold(tmp_path, tmp_path / "killed")
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
