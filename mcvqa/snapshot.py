"""Experiment snapshots (command line only): `python -m mcvqa snapshot --run runs/x --name y`.

Freezes a finished run into `experiments/<YYMMDD>_<name>/` with a filled-in `REPORT.md` (settings, folds,
ablation, plots, the uncertainty gate's evidence, the error analysis and the blend, where the run has
them), and adds one row to the top-level scoreboard so runs can be compared side by side. A folder of
`python -m mcvqa blend` (config.json's `blend_of`) is reported as the blend it is: its members (run
folders, models, CV), their weights and the blend's CV, out-of-fold and in-sample.
"""

import datetime
import os
import pathlib
import re
import shutil

from .machinery.files import read_json
from .runkit.reporting import _REPORT_PLOT_NAMES

# Report label -> config keys to try; mcvqa.config spells the learning rate `learning_rate`.
_REPORT_SETTINGS = {"n_folds": ("n_folds",), "epochs": ("epochs",), "lr": ("lr", "learning_rate"),
                    "lora_r": ("lora_r",), "max_pixels": ("max_pixels",), "tta_option_views": ("tta_option_views",)}
_BLEND_SETTINGS = {"per_type": ("per_type",), "min_type_rows": ("min_type_rows",)}  # (a blend folder's config.json)
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
        return f"{value:.{digits}f}" if value == 0 or 1e-3 <= abs(value) <= 1e4 else f"{value:g}"
    return str(value).replace("|", "\\|")  # a bare pipe would split the markdown cell


def _report_model(model):
    """The model's last path part (Qwen2.5-VL-7B-Instruct of Qwen/... or /kaggle/input/.../), or None."""
    return str(model).rstrip("/").split("/")[-1] if model else None


def _report_member_models(blend):
    """Each blend member's model (its run folder's name when its config has none)."""
    return [_report_model(m.get("model")) or pathlib.Path(m["run"]).name for m in blend["members"]]


def _report_runtime(seconds):
    if seconds is None:
        return "n/a"
    h, rem = divmod(int(round(float(seconds))), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s ({float(seconds):.0f} s)"


def _report_experiment_md(name, date, run_dir, cfg, metrics, plots, *, analysis=None, blend=None):
    """Markdown body of the per-experiment REPORT.md; blend: the blend_report.json the run has, if any."""
    blend_folder = "blend_of" in cfg  # (written by `python -m mcvqa blend`: no model, no training settings)
    model = (f"blend of {', '.join(_report_member_models(blend))}" if blend_folder and blend
             else f"`{_report_fmt(_report_find(cfg, 'model_name_or_path'))}`")
    lines = [f"# Experiment {name}", "", f"- Date: {date.isoformat()}", f"- Run folder: `{run_dir}`",
             f"- Profile: {_report_fmt(metrics.get('profile'))}", f"- Model: {model}",
             f"- CV accuracy (OOF): **{_report_fmt(metrics.get('cv_accuracy'))}**", "- Public LB: (fill in)",
             "", "## Key settings", "", "| setting | value |", "|---|---|"]
    settings = _BLEND_SETTINGS if blend_folder else _REPORT_SETTINGS
    lines += [f"| {label} | {_report_fmt(_report_find(cfg, *keys))} |" for label, keys in settings.items()]
    lines += ["", "## Cross-validation", "", "| fold | accuracy |", "|---|---|"]
    lines += [f"| {i} | {_report_fmt(acc)} |" for i, acc in enumerate(metrics.get("fold_accuracy") or [])]
    lines += [f"| CV (OOF) | {_report_fmt(metrics.get('cv_accuracy'))} |"]
    if metrics.get("cv_accuracy_in_sample") is not None:  # (a blend's weights fitted on the scored rows)
        lines.append(f"| CV in-sample (optimistic) | {_report_fmt(metrics['cv_accuracy_in_sample'])} |")
    lines += ["", "## Ablation", ""]
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
    lines += (_report_gate_md(metrics.get("gate")) + _report_analysis_md(analysis)
              + _report_blend_md(blend, "Blend" if blend_folder else "Blend (the submission)"))
    return "\n".join(lines + ["", "## Notes", "", "(fill in)", ""])


def _report_gate_md(gate):
    """The uncertainty gate's out-of-fold evidence (runkit/gate.py), when the run had it on."""
    if not gate:
        return []
    test = gate.get("cost", {}).get("test", {})
    return ["", "## Uncertainty gate", "", "| out-of-fold | before | after |", "|---|---|---|",
            f"| accuracy on the {gate['oof_rows_gated']} gated of {gate['oof_rows']} rows | "
            f"{_report_fmt(gate['oof_accuracy_gated_rows_before'])} | {_report_fmt(gate['oof_accuracy_gated_rows_after'])} |",
            f"| CV accuracy | {_report_fmt(gate['cv_accuracy_before'])} | {_report_fmt(gate['cv_accuracy_after'])} |", "",
            f"- Applied to the submission: **{'yes' if gate['applied'] else 'no'}** ({gate['why']})",
            f"- Test: {test.get('gated', 0)} gated rows over the folds, {test.get('extra_views', 0)} extra views in "
            f"{_report_fmt(test.get('extra_s'), 1)} s ({_report_fmt(test.get('extra_in_single_view_passes'), 2)} "
            "single-view passes)"]


def _report_analysis_md(analysis):
    """The run's error analysis (toolkit/analysis.py): accuracy by question type, the gallery, suspect labels."""
    if not analysis:
        return []
    lines = ["", "## Error analysis", "", f"{analysis['n_wrong']} of {analysis['n_rows']} out-of-fold rows wrong; "
             f"the most confident mistakes and {len(analysis['suspect_ids'])} suspect labels are in "
             "[analysis/analysis.html](analysis/analysis.html).", "", "| question type | rows | accuracy |", "|---|---|---|"]
    lines += [f"| {row['key']} | {row['n']} | {_report_fmt(row['accuracy'])} |" for row in analysis["by_type"]]
    return lines + [""] + [f"![{name.replace('_', ' ')}](analysis/{png})\n" for name, png in analysis["plots"].items()]


def _report_blend_md(blend, title):
    """The blend (toolkit/blend.py's blend_report.json): members, their weights, the blend's CV both ways."""
    if not blend:
        return []
    weights, cv = blend["weights"]["global"], blend["blend"]
    lines = ["", f"## {title}", "", "| member | model | profile | CV accuracy | log-loss | weight |", "|---|---|---|---|---|---|"]
    lines += [f"| `{_report_fmt(m['run'])}` | {_report_fmt(model)} | {_report_fmt(m.get('profile'))} | "
              f"{_report_fmt(m['cv_accuracy'])} | {_report_fmt(m['log_loss'])} | {_report_fmt(weights[m['run']], 3)} |"
              for m, model in zip(blend["members"], _report_member_models(blend))]
    lines += ["", "| blend | CV accuracy | log-loss |", "|---|---|---|",
              f"| out-of-fold (honest: weights fitted without the scored rows) | "
              f"{_report_fmt(cv['out_of_fold']['accuracy'])} | {_report_fmt(cv['out_of_fold']['log_loss'])} |",
              f"| in-sample (weights fitted on these rows: optimistic) | {_report_fmt(cv['in_sample']['accuracy'])} | "
              f"{_report_fmt(cv['in_sample']['log_loss'])} |", "",
              f"- Honest estimate split by {cv['out_of_fold']['split']}.",
              f"- Weights {'per question type' if blend.get('per_type') else 'global'}; the whole report, with "
              "per-type weights, disagreement and notes: [blend/blend_report.md](blend/blend_report.md)"]
    return lines


def _report_scoreboard_model_notes(cfg, metrics, blend):
    """The scoreboard's model and notes cells: a blend folder names its members' models, CVs and weights."""
    if "blend_of" not in cfg or not blend:
        return _report_model(_report_find(cfg, "model_name_or_path")), f"profile: {_report_fmt(metrics.get('profile'))}"
    weights = blend["weights"]["global"]
    members = ", ".join(f"{pathlib.Path(m['run']).name} {_report_fmt(m['cv_accuracy'])} (w {weights[m['run']]:.2f})"
                        for m in blend["members"])
    return (f"blend: {' + '.join(_report_member_models(blend))}",
            f"blend of {members}; in-sample {_report_fmt(blend['blend']['in_sample']['accuracy'])}")


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
    for folder in ("plots", "analysis"):
        if (run_dir / folder).is_dir():
            shutil.copytree(run_dir / folder, exp_dir / folder)
    # A blend folder has its report at the top, a run with blend_with in blend/: the snapshot keeps it in blend/.
    blend_dir = run_dir if (run_dir / "blend_report.json").exists() else run_dir / "blend"
    for fname in ("blend_report.md", "blend_report.json"):
        if (blend_dir / fname).exists():
            (exp_dir / "blend").mkdir(exist_ok=True)
            shutil.copy2(blend_dir / fname, exp_dir / "blend" / fname)
    if notebook_path is not None:
        shutil.copy2(notebook_path, exp_dir / pathlib.Path(notebook_path).name)
    cfg, metrics = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
    blend = read_json(exp_dir / "blend" / "blend_report.json")
    plots = [exp_dir / "plots" / f"{n}.png" for n in _REPORT_PLOT_NAMES if (exp_dir / "plots" / f"{n}.png").exists()]
    (exp_dir / "REPORT.md").write_text(
        _report_experiment_md(exp_dir.name, today, run_dir, cfg, metrics, plots,
                              analysis=read_json(exp_dir / "analysis" / "analysis.json"), blend=blend), encoding="utf-8")
    model, notes = _report_scoreboard_model_notes(cfg, metrics, blend)
    # Relative link, so the scoreboard still works when the repo is cloned elsewhere.
    link = pathlib.Path(os.path.relpath(exp_dir.resolve(), pathlib.Path(report_path).resolve().parent))
    _report_add_scoreboard_row(report_path, f"| {today.isoformat()} | [{exp_dir.name}]({link.as_posix()}/) | "
                                            f"{_report_fmt(model)} | {_report_fmt(metrics.get('cv_accuracy'))} |   | {notes} |")
    return exp_dir
