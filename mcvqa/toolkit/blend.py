"""## Blend: weighted average of finished runs, weights fitted on out-of-fold probabilities

    python -m mcvqa blend runs/a runs/b [runs/c ...] --out runs/blend [--per-type] [--data-dir DIR]

Each member is a finished run folder (read only; nothing is written into it): its `oof_probs.csv`
(out-of-fold probabilities of the train rows, with `fold` and `answer`), `test_probs_ensemble.csv`
(test.csv order), `folds.csv` and `config.json`. The members must cover the same train ids and the
same test ids in the same order. The blend's probabilities are sum_m w_m p_m with w on the simplex
(w >= 0, sum 1), fitted by minimising the log-loss of the out-of-fold rows (convex in w: SLSQP from equal
weights finds the optimum). `--per-type` fits one weight vector per question type (question_types.py)
that has at least `min_type_rows` rows; smaller types use the global weights (in the honest estimate
below, a type needs that many rows among the rows the weights are fitted on).

The weights are fitted on the same rows the blend's CV is read from, so that number is optimistic
(reported as `in_sample`). The honest number (`out_of_fold`) fits the weights on the other folds of the
first member's fold column and scores each held-out fold with them; `oof_probs.csv` in `--out` holds
those honest blended probabilities, so `python -m mcvqa analyze` works on a blend folder too.
Outputs in `--out`: `blend_report.json`, `blend_report.md`, `oof_probs.csv`, `test_probs_ensemble.csv`,
`submission.csv` (validated against the data folder's sample_submission.csv when it has one),
`folds.csv`, `config.json` and `metrics.json`.
"""

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from ..core.data import (OPTION_LETTERS, PROB_COLUMNS, letter_indices, letters_from_probs, probs_frame,
                         read_competition_csv)
from ..core.submission import write_submission
from ..machinery.errors import UserError
from ..machinery.files import read_json
from ..runkit.reporting import make_run_plots
from .question_types import QUESTION_TYPES, question_type

MIN_TYPE_ROWS = 30  # a question type needs this many out-of-fold rows for weights of its own
FALLBACK_SPLITS = 5  # honest estimate when the members' oof rows have one fold only: this many seeded splits
EPS = 1e-12
MAX_LISTED_IDS = 3


class BlendError(UserError, ValueError):
    """A member run folder is missing a file, or the members do not fit together."""


@dataclasses.dataclass
class Member:
    name: str  # the folder as given on the command line
    path: pathlib.Path
    oof: pd.DataFrame  # id, p_a..p_d, fold, answer (the run's row order)
    test: pd.DataFrame  # id, p_a..p_d in test.csv order
    folds: pd.Series | None  # folds.csv: id -> fold; None when the run has none
    config: dict
    metrics: dict


# --- reading and checking the members -------------------------------------------------------------

def _some(ids):
    ids = sorted(ids)
    return ", ".join(map(repr, ids[:MAX_LISTED_IDS])) + (" ..." if len(ids) > MAX_LISTED_IDS else "")


def _read_probs(path, name, extra=()):
    if not path.exists():
        raise BlendError(f"{path}: not found, so {name} is not a finished run folder. Fix: pass the output_dir of a "
                         "finished `python -m mcvqa run` (it writes oof_probs.csv and test_probs_ensemble.csv)")
    frame = pd.read_csv(path, dtype={"id": str})
    missing = [c for c in ("id", *PROB_COLUMNS, *extra) if c not in frame.columns]
    if missing:
        raise BlendError(f"{path}: missing columns {', '.join(missing)} (found {', '.join(frame.columns)}). "
                         "Fix: pass a run folder written by `python -m mcvqa run`")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise BlendError(f"{path}: duplicate ids {_some(set(duplicated))}. Fix: re-run that run; its files are damaged")
    probs = frame[PROB_COLUMNS].to_numpy(dtype=float)
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs.sum(1) <= 0).any():
        raise BlendError(f"{path}: probabilities must be finite, non-negative and not all zero in a row. "
                         "Fix: re-run that run; its files are damaged")
    frame[PROB_COLUMNS] = probs / probs.sum(1, keepdims=True)
    if "answer" in extra:
        frame["answer"] = frame["answer"].astype(str).str.strip().str.lower()
        bad = frame["id"][~frame["answer"].isin(OPTION_LETTERS)]
        if len(bad):
            raise BlendError(f"{path}: answers not in a-d for ids {_some(bad)}. Fix: re-run that run")
    return frame


def load_member(run_dir):
    """A finished run folder's out-of-fold and test probabilities, folds, config and metrics (read only)."""
    path = pathlib.Path(run_dir)
    if not path.is_dir():
        raise BlendError(f"{run_dir}: no such run folder. Fix: pass the output_dir of a finished `python -m mcvqa run`")
    folds = None
    if (path / "folds.csv").exists():
        frame = pd.read_csv(path / "folds.csv", dtype={"id": str})
        if {"id", "fold"} - set(frame.columns):
            raise BlendError(f"{path / 'folds.csv'}: expected columns id, fold (found {', '.join(frame.columns)})")
        folds = frame.set_index("id")["fold"]
    return Member(str(run_dir), path, _read_probs(path / "oof_probs.csv", run_dir, ("fold", "answer")),
                  _read_probs(path / "test_probs_ensemble.csv", run_dir), folds,
                  read_json(path / "config.json"), read_json(path / "metrics.json"))


def check_members(members):
    """Raise BlendError unless every member has the first one's train ids (oof, same labels) and test ids in
    order; return the members with their oof rows in the first member's order."""
    if len(members) < 2:
        raise BlendError("blend needs at least two run folders. Fix: python -m mcvqa blend runs/a runs/b --out DIR")
    names = [m.path.resolve() for m in members]
    if len(set(names)) < len(names):
        raise BlendError("the same run folder is given twice. Fix: pass each run folder once")
    ref = members[0]
    ref_ids = ref.oof["id"].tolist()
    aligned = [ref]
    for member in members[1:]:
        oof_path, ref_oof = member.path / "oof_probs.csv", ref.path / "oof_probs.csv"
        only_here = set(member.oof["id"]) - set(ref_ids)
        only_there = set(ref_ids) - set(member.oof["id"])
        if only_here or only_there:
            raise BlendError(
                f"{oof_path}: its out-of-fold train ids differ from {ref_oof} ({len(only_here)} only in {member.name}"
                f"{': ' + _some(only_here) if only_here else ''}; {len(only_there)} only in {ref.name}"
                f"{': ' + _some(only_there) if only_there else ''}). Fix: blend runs of the same train.csv with the "
                "same folds, n_folds and max_train_rows settings")
        oof = member.oof.set_index("id").loc[ref_ids].reset_index()
        differ = oof["id"][oof["answer"].to_numpy() != ref.oof["answer"].to_numpy()]
        if len(differ):
            raise BlendError(f"{oof_path}: labels differ from {ref_oof} for {len(differ)} ids ({_some(differ)}): "
                             "the runs read different train.csv files. Fix: blend runs of the same train.csv")
        test_path = member.path / "test_probs_ensemble.csv"
        if member.test["id"].tolist() != ref.test["id"].tolist():
            same_set = set(member.test["id"]) == set(ref.test["id"]) and len(member.test) == len(ref.test)
            raise BlendError(
                f"{test_path}: its test ids {'are in another order than' if same_set else 'differ from'} "
                f"{ref.path / 'test_probs_ensemble.csv'} ({len(member.test)} vs {len(ref.test)} rows). "
                "Fix: blend runs that predicted the same test.csv (re-run the older one on it)")
        aligned.append(dataclasses.replace(member, oof=oof))
    return aligned


def compare_folds(members):
    """How each member's folds (folds.csv, else its oof fold column) differ from the first member's."""
    def fold_of(member):
        if member.folds is not None:
            return member.folds, "folds.csv"
        return member.oof.set_index("id")["fold"], "oof_probs.csv fold column"

    ref_folds, _ = fold_of(members[0])
    notes = []
    for member in members[1:]:
        folds, source = fold_of(member)
        common = ref_folds.index.intersection(folds.index)
        moved = int((ref_folds.loc[common].to_numpy() != folds.loc[common].to_numpy()).sum())
        moved += len(ref_folds.index.symmetric_difference(folds.index))
        if moved:
            notes.append({"member": member.name, "source": source, "ids_in_another_fold": moved,
                          "of": int(len(ref_folds.index.union(folds.index)))})
    return notes


# --- fitting ----------------------------------------------------------------------------------------

def log_loss(probs, labels):
    probs = np.asarray(probs, dtype=float)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, None))))


def accuracy(probs, labels):
    return float(np.mean(np.asarray(probs).argmax(1) == np.asarray(labels)))


def fit_weights(member_probs, labels):
    """Weights w >= 0, sum 1, minimising the log-loss of sum_m w_m member_probs[m]; member_probs [M, N, 4]."""
    member_probs = np.asarray(member_probs, dtype=float)
    n_members = member_probs.shape[0]
    if n_members == 1 or len(labels) == 0:
        return np.full(n_members, 1.0 / n_members)
    right = member_probs[:, np.arange(len(labels)), labels].T  # [N, M]: each member's prob of the label

    def loss(w):
        return -np.mean(np.log(np.clip(right @ w, EPS, None)))

    def grad(w):
        return -(right / np.clip(right @ w, EPS, None)[:, None]).mean(0)

    result = minimize(loss, np.full(n_members, 1.0 / n_members), jac=grad, method="SLSQP",
                      bounds=[(0.0, 1.0)] * n_members,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
                      options={"ftol": 1e-12, "maxiter": 500})
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def fit_blend(member_probs, labels, types=None, min_type_rows=MIN_TYPE_ROWS):
    """{"global": w, "per_type": {type: w}}: per-type weights for the types with >= min_type_rows rows."""
    model = {"global": fit_weights(member_probs, labels), "per_type": {}}
    if types is not None:
        types = np.asarray(types)
        for kind in QUESTION_TYPES:
            rows = types == kind
            if rows.sum() >= min_type_rows:
                model["per_type"][kind] = fit_weights(member_probs[:, rows], labels[rows])
    return model


def apply_blend(member_probs, model, types=None):
    """[N, 4] blended probabilities: each row weighted by its type's weights, else the global ones."""
    member_probs = np.asarray(member_probs, dtype=float)
    weights = np.tile(model["global"], (member_probs.shape[1], 1))  # [N, M]
    if types is not None:
        types = np.asarray(types)
        for kind, w in model["per_type"].items():
            weights[types == kind] = w
    return np.einsum("nm,mnk->nk", weights, member_probs)


def honest_splits(oof_folds, n_splits=FALLBACK_SPLITS, seed=0):
    """(split id per row, description): the oof fold column when it has 2+ folds, else seeded splits."""
    oof_folds = np.asarray(oof_folds)
    if len(np.unique(oof_folds)) >= 2:
        return oof_folds, f"the first member's folds ({len(np.unique(oof_folds))})"
    splits = np.random.default_rng(seed).permutation(len(oof_folds)) % n_splits
    return splits, (f"{n_splits} seeded random splits of the out-of-fold rows (they all come from one fold, "
                    "so there are no other folds to fit on)")


def out_of_fold_blend(member_probs, labels, splits, types=None, min_type_rows=MIN_TYPE_ROWS):
    """Blended probabilities of each split's rows from weights fitted on the other splits only."""
    member_probs, labels, splits = np.asarray(member_probs, dtype=float), np.asarray(labels), np.asarray(splits)
    types = None if types is None else np.asarray(types)
    blended = np.empty(member_probs.shape[1:])
    for split in np.unique(splits):
        held, fit = splits == split, splits != split
        model = fit_blend(member_probs[:, fit], labels[fit], None if types is None else types[fit], min_type_rows)
        blended[held] = apply_blend(member_probs[:, held], model, None if types is None else types[held])
    return blended


def disagreement(probs_a, probs_b):
    """Fraction of rows where the two members' top answers differ."""
    return float(np.mean(np.asarray(probs_a).argmax(1) != np.asarray(probs_b).argmax(1)))


# --- the command ------------------------------------------------------------------------------------

def _data_dir(members, data_dir):
    if data_dir is not None:
        return pathlib.Path(data_dir), "--data-dir"
    value = members[0].config.get("data_dir")
    return (pathlib.Path(value), f"{members[0].path / 'config.json'} data_dir") if value else (None, None)


def _questions(data_dir, source, split, ids):
    path = None if data_dir is None else data_dir / f"{split}.csv"
    if path is None or not path.exists():
        where = (f"{path} not found (from {source})" if path is not None
                 else "the first member's config.json has no data_dir")
        raise BlendError(f"--per-type needs the question text: {where}. "
                         "Fix: --data-dir <the folder with train.csv and test.csv>")
    frame = read_competition_csv(path, split).set_index("id")
    missing = [i for i in ids if i not in frame.index]
    if missing:
        raise BlendError(f"{path}: {len(missing)} ids of the runs are not in it ({_some(missing)}). "
                         "Fix: --data-dir <the data folder these runs were trained on>")
    return frame.loc[list(ids), "question"].tolist()


def _holdout_labels(data_dir, test_ids):
    """Label indices of the test rows from the data folder's test_answers.csv (the demo's), else None."""
    path = None if data_dir is None else data_dir / "test_answers.csv"
    if path is None or not path.exists():
        return None
    answers = pd.read_csv(path, dtype=str).set_index("id")["answer"].str.strip().str.lower()
    if not set(test_ids) <= set(answers.index) or not answers.loc[list(test_ids)].isin(OPTION_LETTERS).all():
        return None
    return letter_indices(answers.loc[list(test_ids)])


def _weights_table(names, model):
    rows = {"global": dict(zip(names, map(float, model["global"])))}
    rows.update({kind: dict(zip(names, map(float, w))) for kind, w in model["per_type"].items()})
    return rows


def _report_md(report):
    names = [m["run"] for m in report["members"]]
    lines = ["# Blend report", "", "| member | CV accuracy | log-loss | weight |", "|---|---|---|---|"]
    for member in report["members"]:
        lines.append(f"| {member['run']} | {member['cv_accuracy']:.4f} | {member['log_loss']:.4f} | "
                     f"{report['weights']['global'][member['run']]:.3f} |")
    blend = report["blend"]
    lines += ["", "| blend | CV accuracy | log-loss |", "|---|---|---|",
              f"| out-of-fold (honest: weights fitted without the scored rows) | "
              f"{blend['out_of_fold']['accuracy']:.4f} | {blend['out_of_fold']['log_loss']:.4f} |",
              f"| in-sample (weights fitted on these rows: optimistic) | {blend['in_sample']['accuracy']:.4f} | "
              f"{blend['in_sample']['log_loss']:.4f} |", "",
              f"Honest estimate split by {blend['out_of_fold']['split']}.", "", "Pairwise disagreement (fraction of "
              "out-of-fold rows whose top answer differs):", ""]
    lines += [f"- {d['a']} vs {d['b']}: {d['disagreement']:.3f}" for d in report["disagreement"]]
    if report["per_type"]:
        lines += ["", "| weights | " + " | ".join(names) + " | rows |", "|---" * (len(names) + 2) + "|"]
        for kind, weights in report["weights"].items():
            rows = report["type_rows"].get(kind, report["n_oof"]) if kind != "global" else report["n_oof"]
            lines.append(f"| {kind} | " + " | ".join(f"{weights[n]:.3f}" for n in names) + f" | {rows} |")
        if report["types_on_global_weights"]:
            lines += ["", f"Types with fewer than {report['min_type_rows']} rows use the global weights: "
                      + ", ".join(f"{k} ({report['type_rows'][k]})" for k in report["types_on_global_weights"])]
    if "holdout_accuracy" in report:
        lines += ["", "Hold-out accuracy (test_answers.csv): " + ", ".join(
            f"{name} {value:.4f}" for name, value in report["holdout_accuracy"].items())]
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def blend_runs(run_dirs, out_dir, per_type=False, data_dir=None, min_type_rows=MIN_TYPE_ROWS):
    """Blend finished run folders into out_dir (see the module docstring); returns the report dict."""
    out_dir = pathlib.Path(out_dir)
    members = check_members([load_member(d) for d in run_dirs])
    if any(out_dir.resolve() == m.path.resolve() for m in members):
        raise BlendError(f"--out {out_dir} is one of the member run folders; they are never written to. "
                         "Fix: --out <a new folder>, e.g. runs/blend")
    ref, names = members[0], [m.name for m in members]
    labels = letter_indices(ref.oof["answer"])
    oof_probs = np.stack([m.oof[PROB_COLUMNS].to_numpy() for m in members])
    test_probs = np.stack([m.test[PROB_COLUMNS].to_numpy() for m in members])
    notes, fold_notes = _fold_notes(members)
    data_path, data_source = _data_dir(members, data_dir)
    train_types, test_types = _question_types(data_path, data_source, ref) if per_type else (None, None)
    model = fit_blend(oof_probs, labels, train_types, min_type_rows)
    in_sample = apply_blend(oof_probs, model, train_types)
    splits, split_note = honest_splits(ref.oof["fold"])
    honest = out_of_fold_blend(oof_probs, labels, splits, train_types, min_type_rows)
    test_blend = apply_blend(test_probs, model, test_types)
    type_rows = {} if train_types is None else {k: int((train_types == k).sum()) for k in QUESTION_TYPES
                                                if (train_types == k).any()}
    on_global = [k for k in type_rows if k not in model["per_type"]]
    report = {
        "members": _member_rows(members, oof_probs, labels, train_types, type_rows),
        "n_oof": len(labels), "n_test": len(ref.test),
        "disagreement": [{"a": names[i], "b": names[j], "disagreement": disagreement(oof_probs[i], oof_probs[j])}
                         for i in range(len(members)) for j in range(i + 1, len(members))],
        "per_type": bool(per_type), "min_type_rows": min_type_rows, "type_rows": type_rows,
        "types_on_global_weights": on_global,
        "weights": _weights_table(names, model),
        "blend": {"out_of_fold": {"accuracy": accuracy(honest, labels), "log_loss": log_loss(honest, labels),
                                  "split": split_note},
                  "in_sample": {"accuracy": accuracy(in_sample, labels), "log_loss": log_loss(in_sample, labels),
                                "note": "weights fitted on these same rows: optimistic"}},
        "folds_agree": not fold_notes, "folds_differ": fold_notes,
        "data_dir": None if data_path is None else str(data_path), "notes": notes,
    }
    holdout = _holdout_labels(data_path, ref.test["id"])
    if holdout is not None:  # (the demo ships test_answers.csv: the hold-out check of the blend)
        report["holdout_accuracy"] = {**{m.name: accuracy(p, holdout) for m, p in zip(members, test_probs)},
                                      "blend": accuracy(test_blend, holdout)}
    out_dir.mkdir(parents=True, exist_ok=True)
    probs_frame(ref.oof["id"], honest, fold=ref.oof["fold"].to_numpy(), answer=ref.oof["answer"].to_numpy()).to_csv(
        out_dir / "oof_probs.csv", index=False)
    probs_frame(ref.test["id"], test_blend).to_csv(out_dir / "test_probs_ensemble.csv", index=False)
    sample = None if data_path is None else data_path / "sample_submission.csv"
    if sample is None or not sample.exists():
        where = f"in {data_path}" if data_path is not None else "(no data_dir: --data-dir DIR)"
        notes.append(f"no sample_submission.csv {where}: submission.csv is checked against the runs' test ids only")
        sample = None
    report["submission"] = str(write_submission(letters_from_probs(test_blend), ref.test["id"].tolist(),
                                                out_dir / "submission.csv", sample))
    if ref.folds is not None:
        shutil.copyfile(ref.path / "folds.csv", out_dir / "folds.csv")
    _write_blend_reports(out_dir, report, names,
                         [accuracy(honest[splits == s], labels[splits == s]) for s in np.unique(splits)])
    return report


def _fold_notes(members):
    """(the report's notes on the members' folds, compare_folds' list of the members whose folds differ)."""
    ref, notes = members[0], []
    fold_notes = compare_folds(members)
    for fold_note in fold_notes:
        notes.append(f"folds differ: {fold_note['member']} has {fold_note['ids_in_another_fold']} of "
                     f"{fold_note['of']} train ids in another fold than {ref.name} ({fold_note['source']}). Each "
                     "member's probabilities are still out-of-fold for that member, but its models were trained on "
                     f"other rows, and the honest estimate uses {ref.name}'s folds only: read the blend's CV "
                     "with some caution. Runs with the same n_folds and seed share their folds")
    if ref.folds is None:
        notes.append(f"{ref.path / 'folds.csv'} not found: the members' folds were compared on the oof fold column")
    return notes, fold_notes


def _question_types(data_path, data_source, ref):
    """(question type of each out-of-fold row, of each test row), in the reference member's order (per_type)."""
    train_types = np.array([question_type(q) for q in _questions(data_path, data_source, "train",
                                                                 ref.oof["id"].tolist())])
    test_types = np.array([question_type(q) for q in _questions(data_path, data_source, "test",
                                                                ref.test["id"].tolist())])
    return train_types, test_types


def _member_rows(members, oof_probs, labels, train_types, type_rows):
    """The report's row of each member: its run, CV accuracy and log-loss, profile and model (and with per_type,
    its accuracy by question type)."""
    rows = [{"run": m.name, "path": str(m.path), "cv_accuracy": accuracy(p, labels),
             "log_loss": log_loss(p, labels), "profile": m.metrics.get("profile", m.config.get("profile")),
             "model": m.config.get("model_name_or_path"), "demo_family": m.config.get("demo_family")
             if m.config.get("demo") else None}
            for m, p in zip(members, oof_probs)]
    if train_types is not None:  # which member is good at which type: what the per-type weights follow
        for member, probs in zip(rows, oof_probs):
            member["accuracy_by_type"] = {k: accuracy(probs[train_types == k], labels[train_types == k])
                                          for k in type_rows}
    return rows


def _write_blend_reports(out_dir, report, names, fold_accuracy):
    """The blend folder's config.json, metrics.json (`fold_accuracy`: the honest blend's per split),
    blend_report.json/.md (printed too) and plots."""
    (out_dir / "config.json").write_text(json.dumps(
        {"profile": "blend", "blend_of": names, "data_dir": report["data_dir"], "per_type": report["per_type"],
         "min_type_rows": report["min_type_rows"]}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(
        {"profile": "blend", "cv_accuracy": report["blend"]["out_of_fold"]["accuracy"],
         "cv_log_loss": report["blend"]["out_of_fold"]["log_loss"],
         "cv_accuracy_in_sample": report["blend"]["in_sample"]["accuracy"],
         "fold_accuracy": fold_accuracy,
         "blend_weights": report["weights"]}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "blend_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    markdown = _report_md(report)
    (out_dir / "blend_report.md").write_text(markdown, encoding="utf-8")
    print(markdown, end="")
    plots = make_run_plots(out_dir)  # the blend's own predictions: letter balance, confusion, reliability
    print(f"[blend] wrote {out_dir}: submission.csv, test_probs_ensemble.csv, oof_probs.csv, blend_report.json/.md, "
          f"plots/ ({', '.join(plots)})")
