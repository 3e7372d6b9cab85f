"""## Reports: the run's plots

These helpers turn a finished run folder (`history.csv`, `oof_probs.csv`, `test_probs_ensemble.csv`,
`metrics.json`, `config.json`) into plots: the answer-letter balance, the letters predicted on the test
set beside it, training curves per fold, the out-of-fold confusion matrix and a reliability diagram with
its expected calibration error (ECE).
`python -m mcvqa snapshot` (mcvqa/snapshot.py) then freezes a run into `experiments/`.
"""
import pathlib

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from ..core.data import OPTION_LETTERS, PROB_COLUMNS, letters_from_probs
from ..machinery.files import read_json

_REPORT_PLOT_NAMES = ("answer_distribution", "prediction_distribution", "training_curves", "confusion_matrix",
                      "reliability", "uncertainty_gate")


def _report_save(fig, out_path):
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    return fig


def _report_to_index(y, labels=OPTION_LETTERS):
    """Letters ('a'..'d') or integer indices -> int array, so callers may pass either."""
    y = np.asarray(y)
    if y.dtype.kind in "iuf":
        return y.astype(int)
    lookup = {str(label): i for i, label in enumerate(labels)}
    return np.array([lookup[str(v).strip().lower()] for v in y], dtype=int)


def plot_answer_distribution(train_df, out_path):
    """Bar chart of answer letter counts; a skewed prior would make accuracy look better than it is."""
    counts = train_df["answer"].astype(str).str.strip().str.lower().value_counts()
    counts = counts.reindex(OPTION_LETTERS, fill_value=0)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(list(counts.index), counts.to_numpy(), color="#4c72b0")
    ax.bar_label(bars, labels=[str(int(c)) for c in counts], padding=2)
    ax.set(xlabel="answer", ylabel="questions", title=f"Answer distribution (n={int(counts.sum())})")
    ax.margins(y=0.12)  # room for the count labels above the tallest bar
    return _report_save(fig, out_path)


def _letter_counts(letters):
    return pd.Series(letters).astype(str).str.strip().str.lower().value_counts().reindex(OPTION_LETTERS, fill_value=0)


def plot_prediction_distribution(test_letters, train_answers, out_path):
    """Letters predicted on the test set beside the train answers, as shares with the counts on the bars: predictions
    piled onto one letter (a position bias, a collapsed model) show here before the leaderboard does."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x, width = np.arange(len(OPTION_LETTERS)), 0.4
    groups = [("train answers", train_answers, "#8c8c8c"), ("test predictions", test_letters, "#4c72b0")]
    groups = [(name, _letter_counts(letters), colour) for name, letters, colour in groups if letters is not None]
    for k, (name, counts, colour) in enumerate(groups):
        offset = (k - (len(groups) - 1) / 2) * width
        bars = ax.bar(x + offset, counts / max(counts.sum(), 1), width=width, color=colour,
                      label=f"{name} (n={int(counts.sum())})")
        ax.bar_label(bars, labels=[str(int(c)) for c in counts], padding=2, fontsize=8)
    ax.axhline(0.25, color="grey", ls=":", lw=1, label="even (0.25)")
    ax.set_xticks(x, OPTION_LETTERS)
    ax.set(xlabel="letter", ylabel="share of rows", title="Predicted letters (test) vs answers (train)")
    ax.margins(y=0.15)  # room for the count labels above the tallest bar
    ax.legend(fontsize=8)
    return _report_save(fig, out_path)


def _test_letters(run_dir):
    """The run's predicted test letters: test_probs_ensemble.csv (always in the run folder), else submission.csv."""
    if (run_dir / "test_probs_ensemble.csv").exists():
        test = pd.read_csv(run_dir / "test_probs_ensemble.csv")
        return letters_from_probs(test[list(PROB_COLUMNS)].to_numpy(dtype=float))
    if (run_dir / "submission.csv").exists():
        return pd.read_csv(run_dir / "submission.csv", dtype=str)["answer"]
    return None


def plot_training_curves(history_df, out_path):
    """Per fold: the 4-way letter log-loss of training steps and of evaluations on one axis (comparable: the
    same quantity), the trained loss on its own axis where it is another one (loss_over=vocab: full-vocabulary
    cross-entropy, ~9 where the 4-way loss is ~1.4), and eval accuracy."""
    history_df = history_df.copy()
    if "letter_loss" not in history_df:  # (histories written before the letter log-loss was recorded)
        history_df["letter_loss"] = np.where(history_df["kind"] == "eval", history_df["loss"], np.nan)
    train_rows = history_df[history_df["kind"] == "train"]
    other_trained = bool((train_rows["loss"] - train_rows["letter_loss"]).abs().gt(1e-6).any()
                         or (train_rows["loss"].notna() & train_rows["letter_loss"].isna()).any())
    fig, axes = plt.subplots(1, 3 if other_trained else 2, figsize=(16 if other_trained else 11, 4))
    ax_4way, ax_acc = axes[0], axes[-1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (fold, rows) in enumerate(history_df.groupby("fold", sort=True)):
        colour = colours[i % len(colours)]
        train = rows[rows["kind"] == "train"].sort_values("step")
        evals = rows[rows["kind"] == "eval"].sort_values("step")
        steps = train.dropna(subset=["letter_loss"])
        ax_4way.plot(steps["step"], steps["letter_loss"], color=colour, lw=1.2, label=f"fold {fold} train")
        ax_4way.plot(evals["step"], evals["letter_loss"], "x--", color=colour, lw=0.8, label=f"fold {fold} eval")
        if other_trained:
            trained = train.dropna(subset=["loss"])
            axes[1].plot(trained["step"], trained["loss"], color=colour, lw=1.2, label=f"fold {fold}")
        ax_acc.plot(evals["step"], evals["accuracy"], "o-", color=colour, ms=5, label=f"fold {fold}")
    ax_4way.axhline(np.log(4), color="grey", ls=":", lw=1, label="chance (ln 4)")
    ax_4way.set(xlabel="step", ylabel="log-loss over a, b, c, d", title="4-way log-loss: train vs eval")
    if other_trained:
        axes[1].set(xlabel="step", ylabel="cross-entropy", title="Trained loss (full vocabulary)")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="Eval accuracy", ylim=(0, 1.02))
    ax_acc.axhline(0.25, color="grey", ls=":", lw=1, label="chance")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _report_save(fig, out_path)


def plot_confusion_matrix(y_true, y_pred, out_path, labels=OPTION_LETTERS):
    """Annotated count matrix; shows whether errors pile onto one letter (a position bias)."""
    labels = list(labels)
    y_true = [labels[i] for i in _report_to_index(y_true, labels)]
    y_pred = [labels[i] for i in _report_to_index(y_pred, labels)]
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ConfusionMatrixDisplay(cm, display_labels=labels).plot(ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(f"Confusion matrix: accuracy {accuracy:.4f} (n={int(cm.sum())})")
    return _report_save(fig, out_path)


def _report_bin_stats(probs, y_true, n_bins):
    """Per equal-width confidence bin: count, accuracy and mean confidence (empty bins are NaN)."""
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == _report_to_index(y_true)).astype(float)
    # Same binning as sklearn's calibration_curve: (lo, hi] bins, with 0 in the first bin.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    count = np.bincount(ids, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(ids, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(ids, weights=conf, minlength=n_bins) / count
    return edges, count, acc, mean_conf


def expected_calibration_error(probs, y_true, n_bins=10):
    """ECE = sum over bins of (bin share) * |bin accuracy - bin mean confidence|."""
    _, count, acc, mean_conf = _report_bin_stats(probs, y_true, n_bins)
    filled = count > 0
    return float(np.sum(count[filled] / count.sum() * np.abs(acc[filled] - mean_conf[filled])))


def plot_reliability_diagram(probs, y_true, out_path, n_bins=10):
    """Accuracy per confidence bin against the diagonal, with bin counts in a lower panel."""
    edges, count, acc, mean_conf = _report_bin_stats(probs, y_true, n_bins)
    ece = expected_calibration_error(probs, y_true, n_bins)
    fig, (ax, ax_hist) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    width = 1.0 / n_bins
    ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", color="#4c72b0",
           edgecolor="white", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(mean_conf, acc, "o", color="#dd8452", ms=4, label="at bin mean confidence")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.03), title=f"Reliability (ECE = {ece:.4f}, n={int(count.sum())})")
    ax.legend(fontsize=8, loc="upper left")
    ax_hist.bar(edges[:-1], count, width=width, align="edge", color="grey", edgecolor="white")
    ax_hist.set(xlabel="confidence (max probability)", ylabel="count")
    return _report_save(fig, out_path)


def plot_uncertainty_gate(gate, out_path):
    """Out-of-fold accuracy before and after the gate's extra views, on the gated rows and on all rows (gate.py)."""
    groups = [(f"gated rows (n={gate['oof_rows_gated']})", gate["oof_accuracy_gated_rows_before"],
               gate["oof_accuracy_gated_rows_after"]),
              (f"all rows (n={gate['oof_rows']})", gate["cv_accuracy_before"], gate["cv_accuracy_after"])]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(len(groups))
    for offset, (label, column, color) in enumerate((("normal pass", 1, "#8c8c8c"), ("with the gate's views", 2, "#4c72b0"))):
        values = [np.nan if g[column] is None else g[column] for g in groups]
        bars = ax.bar(x + (offset - 0.5) * 0.38, np.nan_to_num(values), width=0.38, color=color, label=label)
        ax.bar_label(bars, labels=["-" if np.isnan(v) else f"{v:.3f}" for v in values], padding=2, fontsize=8)
    ax.set_xticks(x, [g[0] for g in groups])
    ax.set(ylabel="out-of-fold accuracy", ylim=(0, 1.15),
           title=f"Uncertainty gate: {'applied' if gate['applied'] else 'not applied'} to the submission")
    ax.legend(fontsize=8, loc="upper right")
    return _report_save(fig, out_path)


def make_run_plots(run_dir, train_df=None) -> dict[str, pathlib.Path]:
    """Write every plot the run folder has data for into `run_dir/plots/`; returns name -> path."""
    run_dir = pathlib.Path(run_dir)
    plots_dir, paths, figs = run_dir / "plots", {}, {}
    oof = pd.read_csv(run_dir / "oof_probs.csv") if (run_dir / "oof_probs.csv").exists() else None
    # Out-of-fold rows cover the whole training set, so they stand in for train_df when it is not given.
    answers_df = train_df if train_df is not None else oof
    if answers_df is not None:
        figs["answer_distribution"] = lambda p: plot_answer_distribution(answers_df, p)
    test_letters = _test_letters(run_dir)
    if test_letters is not None:
        train_answers = None if answers_df is None else answers_df["answer"]
        figs["prediction_distribution"] = lambda p: plot_prediction_distribution(test_letters, train_answers, p)
    if (run_dir / "history.csv").exists():
        history = pd.read_csv(run_dir / "history.csv")
        figs["training_curves"] = lambda p: plot_training_curves(history, p)
    if oof is not None:
        probs = oof[list(PROB_COLUMNS)].to_numpy(dtype=float)
        preds = letters_from_probs(probs)
        figs["confusion_matrix"] = lambda p: plot_confusion_matrix(oof["answer"], preds, p)
        figs["reliability"] = lambda p: plot_reliability_diagram(probs, oof["answer"], p)
    gate = read_json(run_dir / "metrics.json").get("gate")
    if gate:
        figs["uncertainty_gate"] = lambda p: plot_uncertainty_gate(gate, p)
    for name, draw in figs.items():
        paths[name] = plots_dir / f"{name}.png"
        plt.close(draw(paths[name]))  # only files are returned; open figures would pile up in the notebook
    return paths
