"""Several GPUs, tested on a CPU: which folds run where, worker output, failures, sharded inference.

A CPU box has no second GPU, but the orchestration is the same: worker processes get a slot each
(`CUDA_VISIBLE_DEVICES` of "gpu k"), run pickled jobs and send back results. Jobs here are mostly
builtins (os.getenv, time.sleep, print), so a worker starts in a few milliseconds; the sharded
inference test runs the real tiny 4-bit model in two CPU worker processes.
"""

import dataclasses
import operator
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mcvqa.core.hardware import choose_hardware
from mcvqa.core.inference import predict_views
from mcvqa.core.modeling import trainable_state
from mcvqa.core.training import FoldContext
from mcvqa.notebook import module_sources
from mcvqa.core.inference import gather_views
from mcvqa.scale.parallel import (WorkerError, WorkerJob, WorkerOutput, WorkerSlot, parallel_workers, run_folds,
                                  run_in_workers, worker_slots)
from mcvqa.scale.sharded import predict_views_sharded, shard_bounds

from conftest import demo_config

T4 = {"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}


def _gpus(n):
    return choose_hardware([T4] * n, flash_attn_installed=False)


def _slots(*devices):
    return [WorkerSlot(f"gpu {k}", {"CUDA_VISIBLE_DEVICES": d}) for k, d in enumerate(devices)]


def test_shard_bounds_are_contiguous_near_equal_and_cover_every_row():
    for n_rows in range(0, 12):
        for n_shards in range(1, 5):
            bounds = shard_bounds(n_rows, n_shards)
            if n_rows == 0:
                assert bounds == [(0, 0)]
                continue
            assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
            sizes = [b - a for a, b in bounds]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert len(bounds) == min(n_shards, n_rows)


def test_gather_views_puts_shards_back_in_row_order():
    rng = np.random.default_rng(0)
    full = {(1.0, s): rng.random((11, 4)) for s in range(3)}
    parts = [{k: v[a:b] for k, v in full.items()} for a, b in shard_bounds(11, 3)]
    gathered = gather_views(parts)
    assert list(gathered) == list(full)
    for key in full:
        np.testing.assert_array_equal(gathered[key], full[key])


def test_worker_output_lines_are_prefixed_and_progress_bar_redraws_thinned():
    now = [0.0]
    output = WorkerOutput("gpu 1", progress_every_s=10, clock=lambda: now[0])
    assert output.feed("loading\n\x1b[Aepoch 1:  10%|#  | 1/10\repoch 1:  20%|## | 2/10\r") == [
        "[gpu 1] loading", "[gpu 1] epoch 1:  10%|#  | 1/10"]  # the second redraw came too soon
    now[0] = 10.5
    assert output.feed("epoch 1:  90%|###| 9/10\r     \r[train] fold 1 step 9: val accuracy 0.5\r\ndone\n") == [
        "[gpu 1] epoch 1:  90%|###| 9/10", "[gpu 1] [train] fold 1 step 9: val accuracy 0.5", "[gpu 1] done"]


def test_parallel_workers_auto_uses_every_gpu_and_falls_back_to_the_loop(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = demo_config()
    assert cfg.parallel_folds == "auto"
    assert parallel_workers(cfg, choose_hardware([], flash_attn_installed=False), 3) == 0  # CPU
    assert parallel_workers(cfg, _gpus(1), 3) == 0  # one GPU: today's loop
    assert parallel_workers(cfg, _gpus(2), 3) == 2  # 3 folds on 2 GPUs: the third queues
    assert parallel_workers(cfg, _gpus(4), 3) == 3  # no idle worker for a fold that does not exist
    assert parallel_workers(cfg, _gpus(2), 1) == 0  # one fold: nothing to run beside it
    assert parallel_workers(dataclasses.replace(cfg, parallel_folds="off"), _gpus(2), 3) == 0
    assert parallel_workers(dataclasses.replace(cfg, parallel_folds="8"), _gpus(2), 3) == 2
    assert parallel_workers(dataclasses.replace(cfg, parallel_folds="2"), choose_hardware([]), 3) == 2  # CPU processes
    with pytest.raises(ValueError, match="parallel_folds"):
        parallel_workers(dataclasses.replace(cfg, parallel_folds="many"), _gpus(2), 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        parallel_workers(cfg, _gpus(2), 3)


def test_worker_slots_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    slots = worker_slots(_gpus(2), 2)
    assert [s.label for s in slots] == ["gpu 0", "gpu 1"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in worker_slots(_gpus(2), 2)] == ["0", "1"]
    cpu = worker_slots(choose_hardware([]), 2)
    assert [s.label for s in cpu] == ["cpu 0", "cpu 1"] and cpu[0].env["CUDA_VISIBLE_DEVICES"] == ""


def test_folds_queue_on_the_first_free_gpu_and_results_keep_job_order(tmp_path):
    lines = []
    jobs = [WorkerJob("fold 0", time.sleep, (1.5,)),  # holds gpu 0
            WorkerJob("fold 1", os.getenv, ("CUDA_VISIBLE_DEVICES",)),  # gpu 1, done at once
            WorkerJob("fold 2", os.getenv, ("CUDA_VISIBLE_DEVICES",))]  # queued: must take gpu 1
    results = run_in_workers(jobs, _slots("6", "7"), tmp_path / "logs", echo=lines.append)
    assert results == [None, "7", "7"]
    started = [line for line in lines if " started on " in line]
    assert [line.split(" (log")[0] for line in started] == [
        "[parallel] fold 0 started on gpu 0", "[parallel] fold 1 started on gpu 1", "[parallel] fold 2 started on gpu 1"]
    # fold 2 started only once fold 1 had finished: never more workers than GPUs.
    assert lines.index("[parallel] fold 1 finished on gpu 1") < lines.index(started[2])
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["fold_0.log", "fold_1.log", "fold_2.log"]


def test_worker_output_reaches_the_caller_prefixed_with_its_gpu(tmp_path):
    lines = []
    run_in_workers([WorkerJob("fold 0", print, ("hello from fold 0",)),
                    WorkerJob("fold 1", print, ("step 1/2\rstep 2/2\nbye",))], _slots("0", "1"), tmp_path, echo=lines.append)
    assert "[gpu 0] hello from fold 0" in lines
    assert lines.index("[gpu 1] step 1/2") < lines.index("[gpu 1] step 2/2") < lines.index("[gpu 1] bye")
    assert (tmp_path / "fold_1.log").read_bytes() == b"step 1/2\rstep 2/2\nbye\n"


def test_run_folds_runs_in_workers_or_in_this_process(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fold_args = {0: ("fold zero",), 1: ("fold one",)}
    run_folds(print, fold_args, demo_config(parallel_folds="2"), choose_hardware([]), tmp_path)
    out = capsys.readouterr().out
    assert "[cpu 0] fold zero" in out and "[cpu 1] fold one" in out
    run_folds(print, fold_args, demo_config(), choose_hardware([]), tmp_path)  # auto on a CPU: the loop
    out = capsys.readouterr().out
    assert "fold zero\nfold one\n" in out and "[cpu" not in out


def test_failing_worker_raises_naming_fold_and_gpu(tmp_path):
    lines = []
    jobs = [WorkerJob("fold 0", time.sleep, (1.5,)), WorkerJob("fold 1", operator.truediv, (1, 0)),
            WorkerJob("fold 2", time.sleep, (0,))]
    with pytest.raises(WorkerError) as caught:
        run_in_workers(jobs, _slots("0", "1"), tmp_path, echo=lines.append)
    message = str(caught.value)
    assert "fold 1 failed on gpu 1 (worker exit code 1)" in message
    assert "ZeroDivisionError" in message  # the worker's own traceback, not just "it failed"
    assert "not started: fold 2" in message  # no new folds after a failure ...
    assert "[parallel] fold 0 finished on gpu 0" in lines  # ... but the running one finished its work
    assert (tmp_path / "fold_1.pkl").exists() and "python -m mcvqa worker" in message
    with pytest.raises(WorkerError, match=r"fold 3 failed on gpu 0 \(worker exit code 3\)"):
        run_in_workers([WorkerJob("fold 3", os._exit, (3,))], _slots("0"), tmp_path, echo=lines.append)


@pytest.mark.usefixtures("torch_single_thread")
def test_sharded_predictions_equal_single_process(tmp_path, tiny_model, tiny_processor, tiny_fmt, tiny_cfg, hardware):
    rows = []
    for i in range(7):
        Image.new("RGB", (56 + 8 * i, 64), (30 * i, 200 - 20 * i, 90)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"q{i}", "image_path": str(tmp_path / f"{i}.png"), "question": "그림 속 도형은 무슨 색입니까?",
                     "a": "빨간색", "b": "파란색", "c": "초록색" if i % 2 else "노란색 도형", "d": "보라색", "answer": "a"})
    frame = pd.DataFrame(rows)
    cfg = tiny_cfg("qwen2_5_vl", tta_option_views=2, num_workers=0, infer_batch_size=4)
    model = tiny_model("qwen2_5_vl")
    single = predict_views(FoldContext(tiny_processor("qwen2_5_vl"), tiny_fmt("qwen2_5_vl"), cfg, hardware),
                           model, frame)
    torch.save(trainable_state(model), tmp_path / "adapter.pt")
    sharded = predict_views_sharded(frame, cfg, hardware, tmp_path / "adapter.pt",
                                    slots=worker_slots(hardware, 2), log_dir=tmp_path / "logs", desc="test")
    assert list(sharded) == list(single)
    for key in single:
        assert sharded[key].shape == (7, 4)
        np.testing.assert_allclose(sharded[key], single[key], rtol=0, atol=1e-6)
        assert (sharded[key].argmax(1) == single[key].argmax(1)).all()


def test_notebook_cell_sends_its_functions_by_value(tmp_path):
    """In the notebook the code lives in __main__ and no mcvqa package exists: the job must travel by value."""
    pytest.importorskip("cloudpickle")
    script = module_sources("machinery.process")[1] + "\n\n\n" + module_sources("scale.parallel")[1] + (
        "\n\n\ndef job(x):\n"
        "    import importlib.util\n"
        "    return x * 2, importlib.util.find_spec('mcvqa') is None\n\n\n"
        "print(run_in_workers([WorkerJob('fold 0', job, (21,))], [WorkerSlot('gpu 0', {})], 'logs'))\n")
    (tmp_path / "notebook_like.py").write_text(script, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run([sys.executable, "notebook_like.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[(42, True)]" in done.stdout  # ran in a worker that could not import mcvqa


def test_a_kept_job_reruns_alone_from_the_command_line(tmp_path):
    """The re-run hint of a failed worker (`python -m mcvqa worker PAYLOAD`) runs the job and saves its result."""
    import pickle
    import subprocess
    import sys

    result_path = tmp_path / "out" / "job.result"
    payload = tmp_path / "job.pkl"
    payload.write_bytes(pickle.dumps((divmod, (17, 5), str(result_path))))
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "mcvqa", "worker", str(payload)], cwd=root, check=True)
    assert pickle.loads(result_path.read_bytes()) == (3, 2)
