"""## Blend at the end of a run: `blend_with`

A run with `blend_with=<finished run folders>` (comma-separated; read-only is fine, e.g. earlier Kaggle
outputs attached as datasets) is blended with them when it is done (blend.py: weights fitted on the
out-of-fold probabilities, an honest out-of-fold CV), and the blend becomes the run's submission; this
run's own is kept as `submission_this_run.csv`. The members are read and checked against this run's
test.csv before any training, so a wrong folder stops the run in seconds, not hours.
"""

import shutil

from ..machinery.files import atomic_write
from .blend import BlendError, blend_runs, load_member


def blend_paths(cfg):
    """The finished run folders `blend_with` names (comma-separated)."""
    return [path.strip() for path in cfg.blend_with.split(",") if path.strip()]


def check_blend_members(cfg, test):
    """blend_with: every member must be a finished run of this test.csv (ids in order), found before any training."""
    for member in map(load_member, blend_paths(cfg)):
        if member.test["id"].astype(str).tolist() != test["id"].astype(str).tolist():
            raise BlendError(f"blend_with={member.name}: its test_probs_ensemble.csv lists other test ids (or another "
                             "order) than this run's test.csv. Fix: blend runs of the same competition data")
        print(f"[blend] after this run: blended with {member.name} (CV {member.metrics.get('cv_accuracy')})")


def blend_into_submission(cfg, out_dir, submission):
    """This run blended with the `blend_with` runs (toolkit/blend.py) into <output_dir>/blend; the blend's
    submission replaces this run's (kept as submission_this_run.csv). Returns the blend's summary."""
    report = blend_runs([out_dir, *blend_paths(cfg)], out_dir / "blend",
                        per_type=cfg.blend_per_type, data_dir=cfg.data_dir)
    atomic_write(out_dir / "submission_this_run.csv", lambda temp: shutil.copyfile(submission, temp))
    atomic_write(submission, lambda temp: shutil.copyfile(report["submission"], temp))  # (validated by blend_runs)
    honest = report["blend"]["out_of_fold"]["accuracy"]
    print(f"[blend] {submission} is now the blend's (out-of-fold CV {honest:.4f}, members "
          + ", ".join(f"{m['run']} {m['cv_accuracy']:.4f}" for m in report["members"])
          + f"); this run's own: {out_dir / 'submission_this_run.csv'}")
    return {"out_of_fold_accuracy": honest, "members": report["members"], "weights": report["weights"],
            "report": str(out_dir / "blend" / "blend_report.md")}
