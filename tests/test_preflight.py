"""Fail before the hours (issue 22): what a run needs at its end is checked before the first fold, and a refused
run leaves no run folder behind. The wrong sample submission is rehearsed through the CLI; the other checks
(output folder, disk, time budget, kernels, adapters_from, the tokenizer) are called as start_run calls them."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

from mcvqa.runkit import preflight
from mcvqa.core.config import ConfigError, check_adapter_source, resolve_config
from mcvqa.core.hardware import choose_hardware
from mcvqa.core.modeling import ModelFolderError, load_processor
from mcvqa.demo.demo_data import generate_demo_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
T4 = {"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}
# The sizes plan_memory gives for Qwen2.5-VL-3B at 448x448 (test_memory.py derives them from its config).
PLAN_3B = {"lora_params": 29_933_568, "lm_matmul_params": 2_774_532_096, "tokens_per_sample": 416,
           "feature_bytes_per_image": 256 * 2048 * 2, "vision_matmul_params": 666_664_960, "patches_per_image": 1024,
           "gradient_checkpointing": "off"}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", n_train=24, n_test=8, image_size=64)


def _run_cli(data_dir, model_dir, run_dir, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
    return subprocess.run([sys.executable, "-m", "mcvqa", "run", "--profile", "demo", "demo=false", "folds=0",
                           "epochs=1", f"data_dir={data_dir}", f"model_name_or_path={model_dir}",
                           f"output_dir={run_dir}", *extra], cwd=ROOT, env=env, capture_output=True, text=True)


def test_a_wrong_sample_submission_stops_before_any_fold_and_leaves_no_run_folder(demo_data, tiny_model_dir, tmp_path):
    """Before: all folds trained, then exit 2 with no submission. Now: refused while the data is read."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    sample = pd.read_csv(data / "sample_submission.csv")
    sample.loc[2, "id"] = "not-a-test-id"
    sample.to_csv(data / "sample_submission.csv", index=False)
    run = tmp_path / "run"
    done = _run_cli(data, tiny_model_dir("qwen2_5_vl"), run)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sample_submission.csv: does not match test.csv" in done.stderr
    assert "line 4: id 'not-a-test-id'" in done.stderr and "Traceback" not in done.stderr
    assert "Loading weights" not in done.stderr + done.stdout and "[train]" not in done.stdout  # no model, no fold
    assert not run.exists()  # nothing half-written


def test_a_refused_setting_after_the_data_leaves_no_run_folder(demo_data, tiny_model_dir, tmp_path):
    """adapters_from is checked after the folds are made: still nothing is written (config.json and
    memory_plan.json were written before it)."""
    run = tmp_path / "run"
    done = _run_cli(demo_data, tiny_model_dir("qwen2_5_vl"), run, f"adapters_from={tmp_path / 'nothing'}")
    assert done.returncode == 2 and "adapters_from" in done.stderr
    assert not run.exists()


def _plan_cfg(tmp_path, *overrides):
    return resolve_config("kaggle_t4x2", [f"output_dir={tmp_path / 'run'}", "submission_path=", *overrides], env={},
                          verbose=False)


def test_a_read_only_output_folder_is_refused_with_the_fix(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"output_dir=.*cannot be written \(Read-only file system.*Fix: a writable"):
        preflight.check_output(_plan_cfg(tmp_path), PLAN_3B, 100, 1)
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        preflight.check_output(_plan_cfg(tmp_path, f"output_dir={file / 'run'}"), PLAN_3B, 100, 1)


def test_too_little_disk_for_the_adapters_and_features_is_refused(tmp_path, monkeypatch, capsys):
    cfg = _plan_cfg(tmp_path, "feature_cache_on_disk=true")
    adapter = 4 * PLAN_3B["lora_params"] / 2**30  # fp32 LoRA weights
    features = 1000 * PLAN_3B["feature_bytes_per_image"] / 2**30
    # 3 best adapters, 2 workers x (checkpoint of 4 copies + its atomic replacement), features, run files.
    needed = 3 * adapter + 2 * 2 * 4 * adapter + features + preflight.RUN_FILES_GIB
    free = {"gib": needed + 0.01}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, int(free["gib"] * 2**30)))
    assert preflight.check_output(cfg, PLAN_3B, 1000, 2) == pytest.approx(needed)
    assert "writable" in capsys.readouterr().out
    free["gib"] = needed - 0.01
    with pytest.raises(ConfigError, match=r"GiB free on its disk, the run needs about .*feature_cache_on_disk=false"):
        preflight.check_output(cfg, PLAN_3B, 1000, 2)
    assert not (tmp_path / "run").exists()


def test_the_time_budget_is_checked_against_a_first_estimate(capsys):
    hardware = choose_hardware([T4, T4], flash_attn_installed=False)
    cfg = resolve_config("kaggle_t4x2", ["epochs=2"], env={}, verbose=False)
    sizes = dict(n_train=3887, n_test=3887, n_images=7774, n_folds=3, workers=2)
    (low, high), (predict_low, _) = preflight.estimate_hours(cfg, hardware, PLAN_3B, **sizes)
    # By hand: 2 N T FLOPs per forward; per fold 2 epochs x (2,591 training samples x 2 forwards + 2 evals x 1,296
    # rows) and (1,296 + 3,887) rows x (1 + 3 x 40 / 416) views; 3 folds on 2 workers: 2 waves; 12-25 % of 65
    # TFLOP/s; the tower (fp32 on a T4: 65 / 8 TFLOP/s) 2 x its weights x 1,024 patches for each of 7,774 images.
    forward = 2 * 2_774_532_096 * 416
    fold = 2 * (3887 * 2 / 3 * 2 + 2 * 3887 / 3) + (3887 / 3 + 3887) * (1 + 3 * 40 / 416)
    tower = 7774 * 2 * 666_664_960 * 1024
    assert low == pytest.approx((2 * fold * forward / 65e12 + tower / (65e12 / 8)) / 0.25 / 3600)
    assert high == pytest.approx(low * 0.25 / 0.12)
    assert 1 < low < high < 11.5  # 3B on 2x T4 fits the Kaggle profile's budget
    preflight.check_time_budget(cfg, hardware, PLAN_3B, **sizes)
    assert "[time] first estimate" in capsys.readouterr().out
    short = resolve_config("kaggle_t4x2", ["epochs=2", f"time_budget_hours={low / 2:.2f}"], env={}, verbose=False)
    preflight.check_time_budget(short, hardware, PLAN_3B, **sizes)
    assert "warning: even the low estimate" in capsys.readouterr().out
    hopeless = resolve_config("kaggle_t4x2", [f"time_budget_hours={predict_low / 2:.3f}"], env={}, verbose=False)
    with pytest.raises(ConfigError, match="cannot hold even one fold's predictions"):
        preflight.check_time_budget(hopeless, hardware, PLAN_3B, **sizes)
    assert preflight.estimate_hours(cfg, choose_hardware([]), PLAN_3B, **sizes) is None  # no GPU: no estimate
    # An A100 is not an A10 (whose name it contains): 312 against 125 TFLOP/s.
    a100 = choose_hardware([{"name": "NVIDIA A100-SXM4-40GB", "capability": (8, 0), "memory_gib": 40.0}] * 2,
                           flash_attn_installed=False)
    (low_a100, _), _ = preflight.estimate_hours(cfg, a100, PLAN_3B, **sizes)
    assert low_a100 == pytest.approx((2 * fold * forward + tower) / 312e12 / 0.25 / 3600)


def test_flash_attention_forced_without_flash_attn_is_refused(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else object())
    with pytest.raises(ConfigError, match="flash_attention_2 but flash_attn is not installed"):
        preflight.check_kernels(resolve_config("local_gpu", ["attn_implementation=flash_attention_2"], env={},
                                               verbose=False))


def _earlier_run(folder, epochs=1, folds=(0, 1, 2)):
    folder.mkdir()
    cfg = resolve_config("demo", [f"epochs={epochs}"], env={}, verbose=False)
    import dataclasses

    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    frame = pd.DataFrame({"id": ["q1", "q2", "q3"], "fold": [0, 1, 2]})
    frame.to_csv(folder / "folds.csv", index=False)
    for fold in folds:
        (folder / f"fold{fold}").mkdir()
        (folder / f"fold{fold}" / "best_adapter.pt").write_bytes(b"")
    return frame


def test_adapters_from_a_zero_shot_run_or_one_without_the_folds_says_so(tmp_path):
    frame = _earlier_run(tmp_path / "zero_shot", epochs=0, folds=())
    cfg = resolve_config("demo", [f"adapters_from={tmp_path / 'zero_shot'}"], env={}, verbose=False)
    with pytest.raises(ConfigError, match=r"was a zero-shot run \(epochs=0\): it trained no adapters"):
        check_adapter_source(cfg, frame, [0, 1, 2])
    frame = _earlier_run(tmp_path / "partial", folds=(0, 2))
    cfg = resolve_config("demo", [f"adapters_from={tmp_path / 'partial'}"], env={}, verbose=False)
    with pytest.raises(ConfigError, match=r"has no fold1/best_adapter.pt .*Fix: folds=0,2 \(the folds it has\)"):
        check_adapter_source(cfg, frame, [0, 1, 2])
    check_adapter_source(cfg, frame, [0, 2])  # the folds it has: fine


def test_a_model_folder_whose_tokenizer_is_broken_is_refused(qwen_tokenizers_dir, tmp_path):
    """Qwen3.5 without tokenizer.json: transformers quietly builds a 33-token tokenizer (every word unknown)."""
    complete = qwen_tokenizers_dir / "Qwen3.5-0.8B"
    broken = tmp_path / "Qwen3.5-0.8B"
    shutil.copytree(complete, broken, ignore=shutil.ignore_patterns("tokenizer.json"))
    cfg = resolve_config("demo", [f"model_name_or_path={broken}"], env={}, verbose=False)
    with pytest.raises(ModelFolderError, match=r"its tokenizer has \d+ tokens but the model 248320 embedding rows.*"
                                               r"tokenizer.json"):
        load_processor(cfg)
    whole = resolve_config("demo", [f"model_name_or_path={complete}"], env={}, verbose=False)
    assert len(load_processor(whole).tokenizer) > 248_000
