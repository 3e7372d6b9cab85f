"""## Reports: plots, and experiment snapshots

These helpers turn a finished run folder (`history.csv`, `oof_probs.csv`, `metrics.json`,
`config.json`) into plots: the answer-letter balance, training curves per fold, the out-of-fold
confusion matrix and a reliability diagram with its expected calibration error (ECE). A snapshot
then freezes the run into `experiments/<YYMMDD>_<name>/` with a filled-in `REPORT.md`, and adds
one row to the top-level scoreboard so runs can be compared side by side.
"""
import datetime
import json
import os
import pathlib
import re
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

_REPORT_LETTERS = ("a", "b", "c", "d")
_REPORT_PROB_COLS = ("p_a", "p_b", "p_c", "p_d")
_REPORT_PLOT_NAMES = ("answer_distribution", "training_curves", "confusion_matrix", "reliability")
# Report label -> config keys to try; mcvqa.config spells the learning rate `learning_rate`.
_REPORT_SETTINGS = {"n_folds": ("n_folds",), "epochs": ("epochs",), "lr": ("lr", "learning_rate"),
                    "lora_r": ("lora_r",), "max_pixels": ("max_pixels",), "tta_option_views": ("tta_option_views",)}
_REPORT_SCOREBOARD_HEADER = (
    "| date | experiment | model | CV acc | Public LB | notes |\n"
    "|---|---|---|---|---|---|\n"
)
_REPORT_SCOREBOARD_INTRO = (
    "# Experiment scoreboard\n\n"
    "One row per snapshot; add a row with "
    "`python -m mcvqa snapshot --run runs/<name> --name <short_name>` "
    "and fill in Public LB by hand after submitting.\n\n"
)


def _report_save(fig, out_path):
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    return fig


def _report_to_index(y, labels=_REPORT_LETTERS):
    """Letters ('a'..'d') or integer indices -> int array, so callers may pass either."""
    y = np.asarray(y)
    if y.dtype.kind in "iuf":
        return y.astype(int)
    lookup = {str(label): i for i, label in enumerate(labels)}
    return np.array([lookup[str(v).strip().lower()] for v in y], dtype=int)


def plot_answer_distribution(train_df, out_path):
    """Bar chart of answer letter counts; a skewed prior would make accuracy look better than it is."""
    counts = train_df["answer"].astype(str).str.strip().str.lower().value_counts()
    counts = counts.reindex(_REPORT_LETTERS, fill_value=0)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(list(counts.index), counts.to_numpy(), color="#4c72b0")
    ax.bar_label(bars, labels=[str(int(c)) for c in counts], padding=2)
    ax.set(xlabel="answer", ylabel="questions", title=f"Answer distribution (n={int(counts.sum())})")
    ax.margins(y=0.12)  # room for the count labels above the tallest bar
    return _report_save(fig, out_path)


def plot_training_curves(history_df, out_path):
    """Train loss (left) and eval accuracy (right) against step, one colour per fold."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (fold, rows) in enumerate(history_df.groupby("fold", sort=True)):
        colour = colours[i % len(colours)]
        train = rows[rows["kind"] == "train"].dropna(subset=["loss"]).sort_values("step")
        evals = rows[rows["kind"] == "eval"].sort_values("step")
        ax_loss.plot(train["step"], train["loss"], color=colour, lw=1.2, label=f"fold {fold} train")
        if evals["loss"].notna().any():  # eval loss on the same axes shows over-fitting
            ax_loss.plot(evals["step"], evals["loss"], "x--", color=colour, lw=0.8, label=f"fold {fold} eval")
        ax_acc.plot(evals["step"], evals["accuracy"], "o-", color=colour, ms=5, label=f"fold {fold}")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="Eval accuracy", ylim=(0, 1.02))
    ax_acc.axhline(0.25, color="grey", ls=":", lw=1, label="chance")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _report_save(fig, out_path)


def plot_confusion_matrix(y_true, y_pred, out_path, labels=_REPORT_LETTERS):
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


def _report_read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def make_run_plots(run_dir, train_df=None) -> dict[str, pathlib.Path]:
    """Write every plot the run folder has data for into `run_dir/plots/`; returns name -> path."""
    run_dir = pathlib.Path(run_dir)
    plots_dir, paths, figs = run_dir / "plots", {}, {}
    oof = pd.read_csv(run_dir / "oof_probs.csv") if (run_dir / "oof_probs.csv").exists() else None
    # Out-of-fold rows cover the whole training set, so they stand in for train_df when it is not given.
    answers_df = train_df if train_df is not None else oof
    if answers_df is not None:
        figs["answer_distribution"] = lambda p: plot_answer_distribution(answers_df, p)
    if (run_dir / "history.csv").exists():
        history = pd.read_csv(run_dir / "history.csv")
        figs["training_curves"] = lambda p: plot_training_curves(history, p)
    if oof is not None:
        probs = oof[list(_REPORT_PROB_COLS)].to_numpy(dtype=float)
        preds = [_REPORT_LETTERS[i] for i in probs.argmax(axis=1)]
        figs["confusion_matrix"] = lambda p: plot_confusion_matrix(oof["answer"], preds, p)
        figs["reliability"] = lambda p: plot_reliability_diagram(probs, oof["answer"], p)
    for name, draw in figs.items():
        paths[name] = plots_dir / f"{name}.png"
        plt.close(draw(paths[name]))  # only files are returned; open figures would pile up in the notebook
    return paths


def _report_find(cfg, *keys):
    """First of `keys` found at the top level of the config, else inside its nested sections."""
    for key in keys:
        if key in cfg:
            return cfg[key]
    for value in cfg.values():
        if isinstance(value, dict) and (found := _report_find(value, *keys)) is not None:
            return found
    return None


def _report_fmt(value, digits=4):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) <= 1e4 else f"{value:g}"
    return str(value).replace("|", "\\|")  # a bare pipe would split the markdown cell


def _report_runtime(seconds):
    if seconds is None:
        return "n/a"
    h, rem = divmod(int(round(float(seconds))), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s ({float(seconds):.0f} s)"


def _report_experiment_md(name, date, run_dir, cfg, metrics, plots):
    """Markdown body of the per-experiment REPORT.md."""
    model = _report_find(cfg, "model_name_or_path")
    lines = [f"# Experiment {name}", "", f"- Date: {date.isoformat()}", f"- Run folder: `{run_dir}`",
             f"- Profile: {_report_fmt(metrics.get('profile'))}", f"- Model: `{_report_fmt(model)}`",
             f"- CV accuracy (OOF): **{_report_fmt(metrics.get('cv_accuracy'))}**", "- Public LB: (fill in)",
             "", "## Key settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {label} | {_report_fmt(_report_find(cfg, *keys))} |" for label, keys in _REPORT_SETTINGS.items()]
    lines += ["", "## Cross-validation", "", "| fold | accuracy |", "|---|---|"]
    lines += [f"| {i} | {_report_fmt(acc)} |" for i, acc in enumerate(metrics.get("fold_accuracy") or [])]
    lines += [f"| CV (OOF) | {_report_fmt(metrics.get('cv_accuracy'))} |", "", "## Ablation", ""]
    ablation = metrics.get("ablation") or {}
    if ablation:
        lines += ["| variant | accuracy |", "|---|---|"]
        lines += [f"| {_report_fmt(k)} | {_report_fmt(v)} |" for k, v in ablation.items()]
    else:
        lines.append("(none recorded)")
    hardware = metrics.get("hardware") or {}
    hw = ", ".join(f"{k}: {_report_fmt(v)}" for k, v in hardware.items()) or "n/a"
    lines += ["", "## Runtime and hardware", "", f"- Runtime: {_report_runtime(metrics.get('runtime_s'))}",
              f"- Hardware: {hw}", "", "## Plots", ""]
    lines += [f"![{p.stem.replace('_', ' ')}](plots/{p.name})\n" for p in plots] or ["(no plots)"]
    return "\n".join(lines + ["", "## Notes", "", "(fill in)", ""])


def _report_add_scoreboard_row(report_path, row):
    """Insert the row after the table's last line, so any prose below the table stays below it."""
    report_path = pathlib.Path(report_path)
    if not report_path.exists():
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(_REPORT_SCOREBOARD_INTRO + _REPORT_SCOREBOARD_HEADER, encoding="utf-8")
    lines = report_path.read_text(encoding="utf-8").splitlines()
    table_rows = [i for i, line in enumerate(lines) if line.lstrip().startswith("|")]
    if not table_rows:  # a hand-edited file that lost its table: start a new one at the end
        lines += ["", *_REPORT_SCOREBOARD_HEADER.splitlines()]
        table_rows = [len(lines) - 1]
    lines.insert(table_rows[-1] + 1, row)
    report_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def snapshot_experiment(run_dir, name, experiments_dir="experiments", report_path="REPORT.md",
                        notebook_path=None, today=None) -> pathlib.Path:
    """Freeze a run into `experiments/<YYMMDD>_<name>/` and add its row to the scoreboard."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_")
    if not safe:
        raise ValueError(f"experiment name {name!r} has no usable characters")
    today = today or datetime.date.today()
    exp_dir = pathlib.Path(experiments_dir) / f"{today:%y%m%d}_{safe}"
    exp_dir.mkdir(parents=True, exist_ok=False)  # FileExistsError: never overwrite a past snapshot
    for fname in ("config.json", "metrics.json", "history.csv", "oof_probs.csv"):
        if (run_dir / fname).exists():
            shutil.copy2(run_dir / fname, exp_dir / fname)
    if (run_dir / "plots").is_dir():
        shutil.copytree(run_dir / "plots", exp_dir / "plots")
    if notebook_path is not None:
        shutil.copy2(notebook_path, exp_dir / pathlib.Path(notebook_path).name)
    cfg, metrics = _report_read_json(run_dir / "config.json"), _report_read_json(run_dir / "metrics.json")
    plots = [exp_dir / "plots" / f"{n}.png" for n in _REPORT_PLOT_NAMES if (exp_dir / "plots" / f"{n}.png").exists()]
    (exp_dir / "REPORT.md").write_text(
        _report_experiment_md(exp_dir.name, today, run_dir, cfg, metrics, plots), encoding="utf-8")
    model = str(_report_find(cfg, "model_name_or_path") or "n/a").rstrip("/").split("/")[-1]
    # Relative link, so the scoreboard still works when the repo is cloned elsewhere.
    link = pathlib.Path(os.path.relpath(exp_dir.resolve(), pathlib.Path(report_path).resolve().parent))
    notes = f"profile: {_report_fmt(metrics.get('profile'))}"
    _report_add_scoreboard_row(report_path, f"| {today.isoformat()} | [{exp_dir.name}]({link.as_posix()}/) | "
                                            f"{_report_fmt(model)} | {_report_fmt(metrics.get('cv_accuracy'))} |   | {notes} |")
    return exp_dir
