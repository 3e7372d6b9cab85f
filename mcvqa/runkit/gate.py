"""## Uncertainty-gated test-time compute: extra views only for the rows the model is unsure of

After a fold's normal pass (its option-order views), the rows it is least sure of get more views: all 24
option orders (`gate_option_orders=24`) and/or a larger pixel budget (`gate_image_scale`). A gated row's
probabilities become the average over all its views, the normal ones included (they are not computed
twice); every other row keeps its probabilities bit for bit. Unsure means a score below `gate_threshold`,
and at most the `gate_fraction` least certain rows: the score is the top-2 probability margin
(`gate_by=margin`) or the share of the row's views that pick the average's letter (`agreement`, ties
broken by margin). So the extra cost is bounded by gate_fraction x rows x extra views per row, printed
before the pass. The out-of-fold rows go through the same gate, so the report shows the accuracy on the
gated rows before and after; with `gate_apply=auto` the submission uses the gated probabilities only when
they raised it (collect_results). The 1st places of sister competitions did this by hand (+0.2-0.6 pp).
With `gate_base_model` the gated rows also get the base model's views (the adapter switched off, one per normal
option order), as the 16-1 winner did: a second opinion that has not fitted the training labels.
The extra passes reuse the cached image features and the shared prefix, like the normal pass.
"""

import contextlib

import itertools
import math
import time

import numpy as np
import pandas as pd

from ..core.collate import cyclic_perms
from ..core.data import PROB_COLUMNS, letters_from_probs
from ..core.inference import average_views, gather_views, image_scales, predict_views
from ..machinery.files import read_json


def gate_on(cfg):
    return cfg.gate_fraction > 0


def gate_perms(cfg):
    """Option orders of a gated row: the normal pass's cyclic shifts first, then (24) the other permutations."""
    cyclic = cyclic_perms(max(1, cfg.tta_option_views))
    if cfg.gate_option_orders == 24:
        return cyclic + [p for p in itertools.permutations(range(4)) if p not in cyclic]
    return cyclic_perms(max(cfg.gate_option_orders, cfg.tta_option_views))


def gate_scales(cfg):
    scales = image_scales(cfg)
    return scales + ([cfg.gate_image_scale] if cfg.gate_image_scale > 0 and cfg.gate_image_scale not in scales else [])


def extra_views_per_row(cfg):
    """Views a gated row gets beyond the normal pass's (the base model's included)."""
    normal = max(1, cfg.tta_option_views) * len(image_scales(cfg))
    return len(gate_perms(cfg)) * len(gate_scales(cfg)) - normal + base_views_per_row(cfg)


def base_views_per_row(cfg):
    return max(1, cfg.tta_option_views) if cfg.gate_base_model else 0


def adapter_off(model):
    """The base model for the duration: peft's disable_adapter (no adapter, e.g. zero-shot: nothing to switch)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def max_gated_rows(cfg, n_rows):
    return min(n_rows, math.ceil(cfg.gate_fraction * n_rows)) if gate_on(cfg) else 0


def margin(probs):
    """Top-2 probability gap per row: 0 = a coin toss between two letters, 1 = certain."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def agreement(probs, views):
    """Share of a row's views whose letter is the averaged probabilities' letter."""
    letters = probs.argmax(1)
    return np.mean([view.argmax(1) == letters for view in views.values()], axis=0)


def select_gated(probs, views, cfg):
    """(gated row indices ascending, score per row): score < gate_threshold, at most the gate_fraction least certain."""
    gaps = margin(probs)
    score = gaps if cfg.gate_by == "margin" else agreement(probs, views)  # (config.py allows only these two)
    least_certain = np.lexsort((np.arange(len(score)), gaps, score))[:max_gated_rows(cfg, len(score))]
    return np.sort(least_certain[score[least_certain] < cfg.gate_threshold]), score


def gated_probs(ctx, model, frame, probs, views, *, desc, map_shards):
    """(probs with the gated rows re-averaged over all their views, a report of what it cost).

    `ctx`: the fold's FoldContext (core/training.py); `views`: the normal pass's {(scale, shift): [N, 4]}
    (core/inference.predict_views); `map_shards`: the process group's (under DDP each rank predicts a shard of
    the gated rows)."""
    cfg = ctx.cfg
    rows, score = select_gated(probs, views, cfg)
    normal_views = len(views) * len(frame)
    report = {"rows": len(frame), "gated": len(rows), "gate_by": cfg.gate_by, "extra_views": 0, "extra_s": 0.0,
              "normal_views": normal_views, "gated_ids": frame["id"].iloc[rows].astype(str).tolist(),
              "score_below": float(score[rows].max()) if len(rows) else None}
    if not len(rows):
        print(f"[gate] {desc}: no row below gate_threshold={cfg.gate_threshold:g} ({cfg.gate_by}): nothing gated")
        return probs, report
    shifts = cyclic_perms(max(1, cfg.tta_option_views))
    have = {(scale, shifts[shift]): view[rows] for (scale, shift), view in views.items()}
    perms = gate_perms(cfg)
    todo = [(scale, [p for p in perms if (scale, p) not in have]) for scale in gate_scales(cfg)]
    todo = [(scale, missing) for scale, missing in todo if missing]
    if not todo and not cfg.gate_base_model:  # (config.py refuses most such settings up front)
        print(f"[gate] {desc}: the gate's views are all in the normal pass already: nothing to add")
        return probs, report
    extra = len(rows) * (sum(len(missing) for _, missing in todo) + base_views_per_row(cfg))
    print(f"[gate] {desc}: the {len(rows)} least certain of {len(frame)} rows (gate_fraction={cfg.gate_fraction:g}, "
          f"{cfg.gate_by} < {report['score_below']:.3g}) get {extra // len(rows)} more views each "
          f"({len(perms)} option orders x scales {gate_scales(cfg)}"
          f"{', the base model' if cfg.gate_base_model else ''}): {extra} extra views, "
          f"{extra / normal_views:.2f}x the normal pass's {normal_views}")
    subset = frame.iloc[rows].reset_index(drop=True)
    # As many samples per batch as the normal pass's (its batches fit): fewer rows, more views each.
    batch_rows = max(1, cfg.infer_batch_size * max(1, cfg.tta_option_views) // max([len(m) for _, m in todo] + [1]))
    started = time.perf_counter()
    for scale, missing in todo:
        new_views = gather_views(map_shards(subset, lambda part: predict_views(
            ctx, model, part, desc=f"{desc} gated", perms=missing, scales=[scale], batch_rows=batch_rows)))
        have.update({(scale, missing[shift]): view for (_, shift), view in new_views.items()})
    if cfg.gate_base_model:
        with adapter_off(model):
            base_views = gather_views(map_shards(subset, lambda part: predict_views(
                ctx, model, part, desc=f"{desc} gated, base model", perms=shifts, scales=[1.0], batch_rows=batch_rows)))
        have.update({("base", key): view for key, view in base_views.items()})
    out = probs.copy()
    out[rows] = average_views(list(have.values()), cfg.tta_average)
    changed = int((out[rows].argmax(1) != probs[rows].argmax(1)).sum())
    report.update(extra_views=extra, extra_s=round(time.perf_counter() - started, 3), letters_changed=changed)
    print(f"[gate] {desc}: {extra} extra views in {report['extra_s']:.1f} s; {changed} of {len(rows)} gated rows "
          "changed their letter")
    return out, report


def _cost(reports):
    """Summed cost of the gated passes of some folds against their normal passes (from the *_gate.json files)."""
    total = {key: sum(r.get(key) or 0 for r in reports) for key in ("rows", "gated", "extra_views", "extra_s",
                                                                     "normal_views", "normal_s")}
    per_extra = total["extra_s"] / total["extra_views"] if total["extra_views"] else None
    per_normal = total["normal_s"] / total["normal_views"] if total["normal_views"] else None
    views_per_row = total["normal_views"] / total["rows"] if total["rows"] else 1
    return total | {
        "s_per_extra_view": per_extra, "s_per_normal_view": per_normal,
        # The extra time in units of one single-view pass over all the rows (the cost a reader can picture):
        # exact when the normal pass is one view (tta_option_views=1), else estimated as its time / views per row.
        "extra_in_single_view_passes": total["extra_s"] / (total["normal_s"] / views_per_row) if total["normal_s"] else None}


def gate_summary(ungated, gated, answers, mask, apply, reports):
    """The gate's out-of-fold evidence: accuracy on the gated rows and overall, before and after; whether the
    submission takes the gated probabilities (apply: auto = only if they raised the accuracy on the gated
    rows | always); and the cost, {"oof": [...], "test": [...]} reports of each fold."""
    right_before = np.asarray(letters_from_probs(ungated)) == np.asarray(answers)
    right_after = np.asarray(letters_from_probs(gated)) == np.asarray(answers)
    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    before = float(right_before[mask].mean()) if n else None
    after = float(right_after[mask].mean()) if n else None
    applied = apply == "always" or (n > 0 and after > before)
    why = ("gate_apply=always" if apply == "always" else "it raised the out-of-fold accuracy on the gated rows"
           if applied else "gate_apply=auto and it did not raise the out-of-fold accuracy on the gated rows")
    return {"applied": bool(applied), "why": why, "oof_rows": int(len(mask)), "oof_rows_gated": n,
            "oof_accuracy_gated_rows_before": before, "oof_accuracy_gated_rows_after": after,
            "cv_accuracy_before": float(right_before.mean()), "cv_accuracy_after": float(right_after.mean()),
            "cost": {part: _cost(part_reports) for part, part_reports in reports.items()}}


def gate_choice(cfg, fold_dirs, oof, test_tta, read_test_probs):
    """With the gate on: (out-of-fold rows, per-fold test probabilities) as the submission takes them, the gate's
    out-of-fold evidence (gate_summary), and both variants of the test probabilities, from the folds'
    `*_gate.json` and `*_probs_ungated.csv`. Without the gate: unchanged, None, None.

    `oof`: the folds' out-of-fold rows (their `*_probs.csv`, gated) with `answer`; `test_tta`: their gated
    test probabilities; `read_test_probs(path)`: a fold's test probabilities in test.csv order."""
    if not gate_on(cfg) or not all((d / "oof_gate.json").exists() for d in fold_dirs):
        return oof, test_tta, None, None
    reports = {part: [read_json(d / f"{part}_gate.json") for d in fold_dirs] for part in ("oof", "test")}
    ungated = pd.concat([pd.read_csv(d / "oof_probs_ungated.csv") for d in fold_dirs])
    if ungated["id"].astype(str).tolist() != oof["id"].astype(str).tolist():
        raise RuntimeError(f"{fold_dirs[0].parent}: the folds' oof_probs_ungated.csv and oof_probs.csv list other rows; "
                           "delete the folds' *_probs*.csv files and re-run (they are predicted again with the saved "
                           "adapters)")
    gated_ids = {str(i) for report in reports["oof"] for i in report["gated_ids"]}
    mask = oof["id"].astype(str).isin(gated_ids).to_numpy()
    summary = gate_summary(ungated[PROB_COLUMNS].to_numpy(), oof[PROB_COLUMNS].to_numpy(), oof["answer"], mask,
                           cfg.gate_apply, reports)
    variants = {"gated": test_tta, "ungated": [read_test_probs(d / "test_probs_ungated.csv") for d in fold_dirs]}
    oof = oof.assign(gated=mask)
    if not summary["applied"]:  # the normal pass's probabilities, out-of-fold and test
        oof[PROB_COLUMNS] = ungated[PROB_COLUMNS].to_numpy()
    return oof, variants["gated" if summary["applied"] else "ungated"], summary, variants


def describe_gate(summary):
    """One line for the log and the report."""
    if not summary["oof_rows_gated"]:
        return "[gate] no out-of-fold row was gated: the submission is the normal pass's"
    test = summary["cost"].get("test", {})
    return (f"[gate] out-of-fold: {summary['oof_rows_gated']} of {summary['oof_rows']} rows gated, accuracy on them "
            f"{summary['oof_accuracy_gated_rows_before']:.4f} -> {summary['oof_accuracy_gated_rows_after']:.4f} (CV "
            f"{summary['cv_accuracy_before']:.4f} -> {summary['cv_accuracy_after']:.4f}); "
            + ("applied to the submission" if summary["applied"] else "not applied") + f" ({summary['why']}); "
            f"test: {test.get('gated', 0)} gated row-folds, {test.get('extra_views', 0)} extra views in "
            f"{test.get('extra_s', 0):.1f} s")
