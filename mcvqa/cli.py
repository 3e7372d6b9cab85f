"""Command line: the same flow as the notebook.

    python -m mcvqa run --profile demo [key=value ...]
    python -m mcvqa setup [--wheels DIR]      # check the packages a run needs, install only what is missing
    python -m mcvqa bundle --out kaggle_bundle  # wheels of those packages for an offline Kaggle notebook (Python 3.12)
    python -m mcvqa snapshot --run runs/demo --name first_try
    python -m mcvqa blend runs/a runs/b --out runs/blend [--per-type]  # weights fitted on out-of-fold probabilities
    python -m mcvqa analyze runs/a [--out DIR]  # error analysis page: confident mistakes, accuracy by type, label noise
    python -m mcvqa worker PAYLOAD      # one saved worker job (what each GPU's worker process runs)
"""

import argparse
import sys

from .bundle import KAGGLE_PYTHON
from .machinery.errors import UserError
from .machinery.packages import SetupError, ensure_packages, package_problems


def _parser():
    parser = argparse.ArgumentParser(prog="python -m mcvqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the folds and write submission.csv")
    run.add_argument("--profile", default="auto", help="demo | kaggle_t4x2 | colab_a100 | colab_t4 | local_gpu | auto")
    run.add_argument("overrides", nargs="*", help="settings as key=value (see mcvqa/config.py)")
    setup = sub.add_parser("setup", help="check the packages a run needs; install only what is missing")
    setup.add_argument("--wheels", default="auto", help="a folder of .whl files (auto: any under /kaggle/input)")
    setup.add_argument("--offline", action="store_true", help="never use the package index")
    bundle = sub.add_parser("bundle", help="download the wheels an offline Kaggle notebook needs into a dataset folder")
    bundle.add_argument("--out", default="kaggle_bundle")
    bundle.add_argument("--python-version", default=KAGGLE_PYTHON, help="the kernel's Python (major.minor; Kaggle's: "
                        f"{KAGGLE_PYTHON}); the setup cell names it when a bundle does not fit")
    bundle.add_argument("--packages", default="", help="comma-separated; default: the run's packages Kaggle lacks")
    bundle.add_argument("--title", default="mcvqa wheels")
    snap = sub.add_parser("snapshot", help="copy a finished run into experiments/<YYMMDD>_<name>/")
    snap.add_argument("--run", required=True, help="the run's output_dir")
    snap.add_argument("--name", required=True)
    snap.add_argument("--notebook", default=None, help="the executed notebook to keep with it")
    blend = sub.add_parser("blend", help="blend finished runs: weights fitted on their out-of-fold probabilities")
    blend.add_argument("runs", nargs="+", help="finished run folders (output_dir of python -m mcvqa run); read only")
    blend.add_argument("--out", required=True, help="a new folder for the blend's submission.csv and report")
    blend.add_argument("--per-type", action="store_true", help="weights per question type (types with enough rows)")
    blend.add_argument("--min-type-rows", type=int, default=None, help="rows a type needs for its own weights (30)")
    blend.add_argument("--data-dir", default=None, help="train.csv/test.csv folder (default: the first run's data_dir)")
    analyze = sub.add_parser("analyze", help="error analysis of a finished run: confident mistakes, accuracy by "
                                             "question type / answer letter / confidence, suspect labels")
    analyze.add_argument("run", help="a finished run folder")
    analyze.add_argument("--out", default=None, help="where to write (default: <run>/analysis; for read-only runs)")
    analyze.add_argument("--data-dir", default=None, help="train.csv folder (default: the run's config.json data_dir)")
    analyze.add_argument("--top", type=int, default=None, help="confident wrong predictions in the gallery (24)")
    analyze.add_argument("--suspect-label-max", type=float, default=None,
                         help="suspect label: its out-of-fold probability below this (0.1) ...")
    analyze.add_argument("--suspect-other-min", type=float, default=None,
                         help="... and another option's above this (0.8)")
    work = sub.add_parser("worker", help="run one pickled worker job (started by parallel.py, one per GPU)")
    work.add_argument("payload", help="the job file: (function, args, result path), pickled")
    return parser


def _command(args):
    if args.command == "setup":
        return ensure_packages(wheels=args.wheels, online=False if args.offline else "auto")
    if args.command == "bundle":
        from .bundle import make_bundle

        return make_bundle(args.out, args.python_version, [p for p in args.packages.split(",") if p], args.title)
    if args.command == "blend":
        from .toolkit.blend import MIN_TYPE_ROWS, blend_runs

        return blend_runs(args.runs, args.out, per_type=args.per_type, data_dir=args.data_dir,
                          min_type_rows=MIN_TYPE_ROWS if args.min_type_rows is None else args.min_type_rows)
    if args.command == "analyze":
        from .toolkit.analysis import analyze_run

        options = {"top_n": args.top, "suspect_label_max": args.suspect_label_max,
                   "suspect_other_min": args.suspect_other_min}
        return analyze_run(args.run, data_dir=args.data_dir, out_dir=args.out,
                           **{k: v for k, v in options.items() if v is not None})
    problems = package_problems()
    if problems:  # before importing them: one message instead of an ImportError deep in the flow
        raise SetupError("missing or unsupported packages: " + ", ".join(
            f"{name}{spec} ({version or 'missing'})" for name, spec, version in problems)
            + ". Fix: python -m mcvqa setup (it installs them from --wheels DIR or the package index)")
    from .core.config import resolve_config
    from .core.hardware import detect_hardware
    from .scale.distributed import finish_distributed, init_distributed
    from .scale.parallel import run_worker_payload
    from .pipeline import run_pipeline
    from .snapshot import snapshot_experiment

    if args.command == "worker":
        return run_worker_payload(args.payload)
    if args.command == "run":
        cfg = resolve_config(args.profile, args.overrides)
        hardware = detect_hardware(cfg)
        owns_process_group = init_distributed()  # under torchrun / accelerate launch; else nothing
        try:
            return run_pipeline(cfg, hardware)
        finally:
            if owns_process_group:
                finish_distributed()
    return print(snapshot_experiment(args.run, args.name, notebook_path=args.notebook))


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        _command(args)
    except UserError as error:  # a known user error: its message says what and how to fix; no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
