"""Command line: the same flow as the notebook.

    python -m mcvqa run --profile demo [key=value ...]
    python -m mcvqa snapshot --run runs/demo --name first_try
    python -m mcvqa worker PAYLOAD      # one saved worker job (what each GPU's worker process runs)
"""

import argparse
import sys

from .config import UserError, resolve_config
from .hardware import detect_hardware
from .parallel import run_worker_payload
from .pipeline import run_pipeline
from .reporting import snapshot_experiment


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcvqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the folds and write submission.csv")
    run.add_argument("--profile", default="auto", help="demo | kaggle_t4x2 | colab_a100 | local_gpu | auto")
    run.add_argument("overrides", nargs="*", help="settings as key=value (see mcvqa/config.py)")
    snap = sub.add_parser("snapshot", help="copy a finished run into experiments/<YYMMDD>_<name>/")
    snap.add_argument("--run", required=True, help="the run's output_dir")
    snap.add_argument("--name", required=True)
    snap.add_argument("--notebook", default=None, help="the executed notebook to keep with it")
    work = sub.add_parser("worker", help="run one pickled worker job (started by parallel.py, one per GPU)")
    work.add_argument("payload", help="the job file: (function, args, result path), pickled")
    args = parser.parse_args(argv)
    try:
        if args.command == "worker":
            run_worker_payload(args.payload)
        elif args.command == "run":
            cfg = resolve_config(args.profile, args.overrides)
            run_pipeline(cfg, detect_hardware(cfg))
        else:
            print(snapshot_experiment(args.run, args.name, notebook_path=args.notebook))
    except UserError as error:  # a known user error: its message says what and how to fix; no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
