"""first_stage_data (issue 26, the 0.972 Gemma 4 single model's first stage): one adapter trained on a second
competition-format folder before the folds, resumable like a fold, and every fold starting from it."""

import os
import pathlib
import subprocess
import sys

import torch

from mcvqa.core.modeling import load_model_for_training, trainable_state
from mcvqa.core.training import FoldContext
from mcvqa.demo.demo_data import generate_demo_dataset
from mcvqa.pipeline import FIRST_STAGE, start_from_first_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_fold_starts_from_the_first_stages_adapter(tiny_cfg, hardware, tmp_path):
    model = load_model_for_training(tiny_cfg("qwen2_5_vl", quantization="none"), hardware)
    stage = {name: torch.randn_like(value) for name, value in trainable_state(model).items()}
    (tmp_path / FIRST_STAGE).mkdir()
    torch.save(stage, tmp_path / FIRST_STAGE / "best_adapter.pt")
    before = trainable_state(model)
    start_from_first_stage(FoldContext(None, None, None, hardware, fold=0, fold_dir=tmp_path / "fold0"), model)
    after = trainable_state(model)
    assert all(torch.equal(after[name], stage[name]) for name in stage)
    assert any(not torch.equal(before[name], stage[name]) for name in stage)


def test_the_first_stage_trains_once_and_the_folds_start_from_it(tmp_path):
    """Through the CLI: the first stage trains (its adapter saved, DONE.json), each fold says it starts from it, and a
    re-run into the same folder finds it trained; a missing folder is refused before anything is written."""
    generate_demo_dataset(tmp_path / "extra", n_train=40, n_test=4, image_size=64, seed=7)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
    args = [sys.executable, "-m", "mcvqa", "run", "--profile", "demo", "demo_warmup_rows=64", "demo_warmup_epochs=1",
            "epochs=1", "n_folds=2", "max_train_rows=40", f"data_dir={tmp_path / 'demo'}",
            f"output_dir={tmp_path / 'run'}", f"model_name_or_path={tmp_path / 'tiny'}"]
    done = subprocess.run(args + [f"first_stage_data={tmp_path / 'extra'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / FIRST_STAGE / "DONE.json").exists()
    assert (tmp_path / "run" / FIRST_STAGE / "best_adapter.pt").exists()
    assert "[first stage] training on 36 rows, validating on 4" in done.stdout
    for fold in (0, 1):
        assert f"[fold {fold}] starting from the first stage's adapter" in done.stdout
    again = subprocess.run(args + [f"first_stage_data={tmp_path / 'extra'}"], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0 and "[first stage] already trained" in again.stdout
    missing = subprocess.run(args[:-2] + [f"output_dir={tmp_path / 'other'}", f"model_name_or_path={tmp_path / 'tiny'}",
                                          f"first_stage_data={tmp_path / 'nothing'}"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and not (tmp_path / "other").exists()
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: config: first_stage_data={tmp_path / 'nothing'}: no train.csv there. Fix: a folder in the "
        "competition's layout (train.csv with id, path or image, question, a-d, answer; its images)")
