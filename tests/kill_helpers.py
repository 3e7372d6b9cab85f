"""Shared by the resume tests: start a training command and SIGKILL it mid-fold."""

import os
import signal
import subprocess
import time

import psutil
import torch


def kill_mid_fold(command, run_dir, cwd, env, min_step=2, timeout_s=300):
    """Start `command`; once fold 0 has a checkpoint at step >= `min_step`, SIGKILL it and every process
    it started (torchrun starts its ranks in sessions of their own, so they are found as children).
    Returns the checkpoint's step."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoint = run_dir / "fold0" / "checkpoint.pt"
    deadline = time.time() + timeout_s

    def kill_all():
        family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    try:
        while time.time() < deadline and proc.poll() is None:
            if checkpoint.exists():
                try:
                    step = torch.load(checkpoint, weights_only=False)["state"]["step"]
                except Exception:  # noqa: BLE001 - being replaced right now; look again
                    step = 0
                if step >= min_step:
                    kill_all()
                    return step
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_all()
    raise AssertionError("the run finished (or timed out) before a mid-fold checkpoint could be killed")
