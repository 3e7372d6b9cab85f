import datetime
import json
import re

import matplotlib

matplotlib.use("Agg")  # tests must not need a display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.calibration import calibration_curve

import mcvqa.runkit.reporting as reporting
from mcvqa.runkit.reporting import (
    expected_calibration_error,
    make_run_plots,
    plot_confusion_matrix,
    plot_reliability_diagram,
    plot_training_curves,
)
from mcvqa.snapshot import snapshot_experiment

LETTERS = list("abcd")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TODAY = datetime.date(2025, 3, 7)
FOLD_ACC = [0.7811, 0.8022, 0.7933]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _write_run(run_dir, n=90, seed=0):
    """A fake 3-fold run folder in the formats the trainer writes."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    rows = []
    for fold in range(3):
        for step in range(1, 31):
            rows.append(dict(fold=fold, step=step, epoch=step / 15, kind="train",
                             loss=2.0 * np.exp(-step / 10) + 0.1 * rng.random(), lr=2e-4, accuracy=np.nan))
            if step % 10 == 0:
                rows.append(dict(fold=fold, step=step, epoch=step / 15, kind="eval",
                                 loss=0.6 + 0.1 * rng.random(), lr=np.nan, accuracy=0.5 + step / 100))
    pd.DataFrame(rows).to_csv(run_dir / "history.csv", index=False)
    answers = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), answers] += 2.0  # mostly right, not always
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    oof = pd.DataFrame(probs, columns=["p_a", "p_b", "p_c", "p_d"])
    oof.insert(0, "id", [f"TRAIN_{i:03d}" for i in range(n)])
    oof["fold"] = np.arange(n) % 3
    oof["answer"] = [LETTERS[i] for i in answers]
    oof.to_csv(run_dir / "oof_probs.csv", index=False)
    metrics = dict(cv_accuracy=0.7922, fold_accuracy=FOLD_ACC, runtime_s=3723.4,
                   hardware={"gpu": "NVIDIA H200", "n_gpus": 1}, profile="full",
                   ablation={"single fold": 0.77, "3-fold ensemble": 0.79, "ensemble + option TTA": 0.8})
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    config = dict(model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", n_folds=3, epochs=2, learning_rate=2e-4,
                  lora_r=16, max_pixels=401408, tta_option_views=4)
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def _assert_png(path):
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 5_000
    with Image.open(path) as im:
        im.verify()


def test_make_run_plots_writes_every_png(tmp_path):
    run = _write_run(tmp_path / "run")
    paths = make_run_plots(run)
    assert set(paths) == {"answer_distribution", "training_curves", "confusion_matrix", "reliability"}
    for path in paths.values():
        assert path.parent == run / "plots"
        _assert_png(path)
    assert plt.get_fignums() == []  # nothing left open to pile up in a notebook


def test_make_run_plots_skips_missing_files(tmp_path):
    run = _write_run(tmp_path / "run")
    (run / "oof_probs.csv").unlink()
    assert set(make_run_plots(run)) == {"training_curves"}
    train_df = pd.DataFrame({"answer": list("aabcdd")})
    assert set(make_run_plots(run, train_df=train_df)) == {"training_curves", "answer_distribution"}


def _history(vocab_loss):
    """Two folds of train steps and evaluations as training.py writes them (letter_loss: the 4-way log-loss)."""
    rows = []
    for fold in range(2):
        for step in range(1, 9):
            letters = 1.4 - 0.05 * step
            rows.append(dict(fold=fold, step=step, epoch=0, kind="train", loss=letters + 8.0 if vocab_loss else letters,
                             letter_loss=letters, lr=1e-4, accuracy=np.nan))
            if step % 4 == 0:
                rows.append(dict(fold=fold, step=step, epoch=0, kind="eval", loss=1.3, letter_loss=1.3, lr=np.nan,
                                 accuracy=0.4))
    return pd.DataFrame(rows)


def _curves(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 2]  # not the chance line


def test_training_curves_put_only_comparable_losses_on_one_axis(tmp_path):
    """loss_over=vocab trains a full-vocabulary cross-entropy (~9) while evaluation reports the 4-way log-loss
    (~1.4): one axis made both unreadable. The 4-way losses share an axis; the trained loss gets its own."""
    fig = plot_training_curves(_history(vocab_loss=True), tmp_path / "curves.png")
    four_way, trained, accuracy = fig.axes
    assert max(max(line.get_ydata()) for line in _curves(four_way)) < 2  # train and eval, both 4-way
    assert {line.get_label() for line in four_way.get_lines()} >= {"fold 0 train", "fold 0 eval", "chance (ln 4)"}
    assert min(min(line.get_ydata()) for line in _curves(trained)) > 8
    assert "full vocabulary" in trained.get_title() and accuracy.get_title() == "Eval accuracy"
    # loss_over=letters: the trained loss is the 4-way one, no third panel.
    assert len(plot_training_curves(_history(vocab_loss=False), tmp_path / "letters.png").axes) == 2


def _bars(ax):
    """Per bar group (legend label): heights and the count labels on the bars."""
    labels = [t.get_text() for t in ax.texts]
    groups, k = {}, 0
    for container in ax.containers:
        n = len(container.patches)
        groups[container.get_label()] = ([round(p.get_height(), 6) for p in container.patches], labels[k:k + n])
        k += n
    return groups


def test_the_test_predictions_letters_are_plotted_beside_the_train_answers_and_reported(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "run")
    predicted = ["a"] * 10 + ["b"] * 25 + ["d"] * 5  # skewed to b, no c at all
    probs = np.full((len(predicted), 4), 0.1)
    probs[np.arange(len(predicted)), [LETTERS.index(x) for x in predicted]] = 0.7
    test = pd.DataFrame(probs, columns=["p_a", "p_b", "p_c", "p_d"])
    test.insert(0, "id", [f"TEST_{i:03d}" for i in range(len(predicted))])
    test.to_csv(run / "test_probs_ensemble.csv", index=False)
    closed = []  # (make_run_plots closes each figure it drew: keep them to read their bars)
    monkeypatch.setattr(reporting.plt, "close", closed.append)
    paths = make_run_plots(run)
    _assert_png(paths["prediction_distribution"])
    fig = closed[list(paths).index("prediction_distribution")]
    answers = pd.read_csv(run / "oof_probs.csv")["answer"].value_counts().reindex(LETTERS, fill_value=0)
    bars = _bars(fig.axes[0])
    assert bars["test predictions (n=40)"] == ([0.25, 0.625, 0.0, 0.125], ["10", "25", "0", "5"])
    assert bars["train answers (n=90)"] == ([round(c / 90, 6) for c in answers], [str(c) for c in answers])
    exp = snapshot_experiment(run, "p", experiments_dir=tmp_path / "experiments", report_path=tmp_path / "REPORT.md",
                              today=TODAY)
    assert "](plots/prediction_distribution.png)" in (exp / "REPORT.md").read_text()
    (run / "test_probs_ensemble.csv").unlink()  # the submission's letters serve as well
    pd.DataFrame({"id": test["id"], "answer": ["c"] * 40}).to_csv(run / "submission.csv", index=False)
    paths = make_run_plots(run)
    assert _bars(closed[-len(paths) + list(paths).index("prediction_distribution")].axes[0])[
        "test predictions (n=40)"] == ([0.0, 0.0, 1.0, 0.0], ["0", "0", "40", "0"])


def test_ece_zero_when_confident_and_correct():
    probs = np.tile([0.0, 1.0, 0.0, 0.0], (20, 1))
    assert expected_calibration_error(probs, ["b"] * 20) == pytest.approx(0.0)
    assert expected_calibration_error(probs, [1] * 20) == pytest.approx(0.0)


def test_ece_hand_computed():
    probs = np.array([[0.85, 0.05, 0.05, 0.05],   # conf .85, correct
                      [0.85, 0.05, 0.05, 0.05],   # conf .85, wrong
                      [0.20, 0.65, 0.10, 0.05],   # conf .65, correct
                      [0.45, 0.25, 0.20, 0.10]])  # conf .45, wrong
    y = ["a", "b", "b", "c"]
    # bin .8-.9: 2/4 * |0.5 - 0.85|; bin .6-.7: 1/4 * |1 - 0.65|; bin .4-.5: 1/4 * |0 - 0.45|
    expected = 0.5 * 0.35 + 0.25 * 0.35 + 0.25 * 0.45
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(expected)
    # One bin: |mean accuracy - mean confidence|.
    assert expected_calibration_error(probs, y, n_bins=1) == pytest.approx(abs(0.5 - 0.7))


def test_ece_bins_agree_with_sklearn_calibration_curve(tmp_path):
    run = _write_run(tmp_path / "run", n=300)
    oof = pd.read_csv(run / "oof_probs.csv")
    probs = oof[["p_a", "p_b", "p_c", "p_d"]].to_numpy()
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == oof["answer"].map(LETTERS.index).to_numpy()
    acc, mean_conf = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], conf), minlength=10)
    counts = counts[counts > 0]
    expected = np.sum(counts / counts.sum() * np.abs(acc - mean_conf))
    assert expected_calibration_error(probs, oof["answer"]) == pytest.approx(expected)


def test_reliability_title_shows_ece(tmp_path):
    probs = np.tile([0.0, 1.0, 0.0, 0.0], (10, 1))
    fig = plot_reliability_diagram(probs, ["b"] * 10, tmp_path / "rel.png")
    assert "ECE = 0.0000" in fig.axes[0].get_title()
    _assert_png(tmp_path / "rel.png")


def test_confusion_matrix_title_accuracy(tmp_path):
    y_true = list("aabbccdd")
    y_pred = list("abbbccda")  # 6 of 8 right
    fig = plot_confusion_matrix(y_true, y_pred, tmp_path / "cm.png")
    assert "accuracy 0.7500" in fig.axes[0].get_title()
    # Integer indices are accepted as well as letters.
    fig = plot_confusion_matrix([0, 1, 2, 3], ["a", "b", "c", "a"], tmp_path / "cm2.png")
    assert "accuracy 0.7500" in fig.axes[0].get_title()
    _assert_png(tmp_path / "cm.png")


def _table_rows(report):
    return [line for line in report.read_text().splitlines() if re.match(r"\|\s*\d{4}-\d{2}-\d{2}", line)]


def test_snapshot_creates_folder_report_and_scoreboard_rows(tmp_path):
    run = _write_run(tmp_path / "runs" / "r1")
    make_run_plots(run)
    notebook = tmp_path / "out.ipynb"
    notebook.write_text("{}")
    exp_root, scoreboard = tmp_path / "experiments", tmp_path / "REPORT.md"
    exp = snapshot_experiment(run, "qwen 7b/r16!", experiments_dir=exp_root, report_path=scoreboard,
                              notebook_path=notebook, today=TODAY)
    assert exp == exp_root / "250307_qwen_7b_r16"
    for name in ("config.json", "metrics.json", "history.csv", "oof_probs.csv", "out.ipynb",
                 "plots/confusion_matrix.png", "REPORT.md"):
        assert (exp / name).exists(), name
    report = (exp / "REPORT.md").read_text()
    for text in ("0.7922", *(f"{a:.4f}" for a in FOLD_ACC), "Qwen/Qwen2.5-VL-7B-Instruct", "Public LB: (fill in)",
                 "ensemble + option TTA", "1h 02m 03s", "NVIDIA H200", "](plots/reliability.png)", "| lora_r | 16 |", "| lr | 0.0002 |"):
        assert text in report, text
    rows = _table_rows(scoreboard)
    assert len(rows) == 1
    assert "[250307_qwen_7b_r16](experiments/250307_qwen_7b_r16/)" in rows[0]
    assert "0.7922" in rows[0]

    snapshot_experiment(run, "second", experiments_dir=exp_root, report_path=scoreboard, today=TODAY)
    assert len(_table_rows(scoreboard)) == 2
    assert scoreboard.read_text().startswith("# Experiment scoreboard")


def test_a_run_without_a_model_name_is_n_a_on_the_scoreboard(tmp_path):
    run = _write_run(tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"n_folds": 3}))
    snapshot_experiment(run, "x", experiments_dir=tmp_path / "experiments", report_path=tmp_path / "REPORT.md",
                        today=TODAY)
    assert _table_rows(tmp_path / "REPORT.md")[0].split("|")[3].strip() == "n/a"  # (not "a", the tail of "n/a")


def test_snapshot_never_overwrites(tmp_path):
    run = _write_run(tmp_path / "run")
    kwargs = dict(experiments_dir=tmp_path / "experiments", report_path=tmp_path / "REPORT.md", today=TODAY)
    exp = snapshot_experiment(run, "dup", **kwargs)
    (exp / "REPORT.md").write_text("hand edits")
    with pytest.raises(FileExistsError):
        snapshot_experiment(run, "dup", **kwargs)
    assert (exp / "REPORT.md").read_text() == "hand edits"
    assert len(_table_rows(tmp_path / "REPORT.md")) == 1


def test_scoreboard_rows_go_into_existing_table(tmp_path):
    scoreboard = tmp_path / "REPORT.md"
    scoreboard.write_text("# Experiment scoreboard\n\nintro\n\n| date | experiment | model | CV acc | Public LB | notes |\n"
                          "|---|---|---|---|---|---|\n\nSome notes below the table.\n")
    run = _write_run(tmp_path / "run")
    snapshot_experiment(run, "x", experiments_dir=tmp_path / "experiments", report_path=scoreboard, today=TODAY)
    lines = scoreboard.read_text().splitlines()
    assert lines[-1] == "Some notes below the table."
    assert lines[lines.index("|---|---|---|---|---|---|") + 1].startswith("| 2025-03-07 |")


def test_snapshot_command_line(tmp_path):
    """`python -m mcvqa snapshot` (the command README and REPORT.md tell users to run), from the repo root."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    run = _write_run(tmp_path / "runs" / "r1")
    make_run_plots(run)
    (tmp_path / "REPORT.md").write_text("# Experiment scoreboard\n\n| date | experiment | model | CV acc | Public LB | notes |\n"
                                        "|---|---|---|---|---|---|\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "mcvqa", "snapshot", "--run", "runs/r1", "--name", "cli try"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    exp = tmp_path / "experiments" / f"{datetime.date.today():%y%m%d}_cli_try"
    assert done.stdout.strip().endswith(str(pathlib.Path("experiments") / exp.name))
    assert (exp / "plots" / "confusion_matrix.png").exists() and (exp / "metrics.json").exists()
    assert "0.7922" in (exp / "REPORT.md").read_text()
    rows = _table_rows(tmp_path / "REPORT.md")
    assert len(rows) == 1 and f"[{exp.name}](experiments/{exp.name}/)" in rows[0]
    again = subprocess.run([sys.executable, "-m", "mcvqa", "snapshot", "--run", "runs/r1", "--name", "cli try"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "FileExistsError" in again.stderr  # never overwrites a snapshot
