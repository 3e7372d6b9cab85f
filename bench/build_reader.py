"""## Build the reader stand-in: a tiny Qwen-VL that reads its options (issue 26)

    python bench/build_reader.py --out runs/reader_q25 [--family qwen3_5] [--steps 600]   # the default spec: run 50
    python bench/build_reader.py --device cuda --seconds 520 --init-from <folder> ...     # runs 51-52, on a GPU

Writes the model folder (loadable by `from_pretrained`, so by `model_name_or_path=`), an evaluation competition
`runs/reader_data` (train / test / hold-out answers, letter prior 40/25/20/15) and prints how the model reads it:
accuracy with the options permuted and the permuted predictions' letter rates. Then fine-tune it through the CLI
with the command it prints. Deterministic for one spec (seeded); the default spec takes ~25 minutes on a CPU
(data/reader_model/README.md: how the committed folders were built).
"""
import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mcvqa.demo.reader_data import generate_reader_dataset  # noqa: E402
from mcvqa.demo.reader_model import ReaderSpec, build_reader_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/reader_model/qwen2_5_vl")
    parser.add_argument("--data", default="runs/reader_data", help="the competition the fine-tune uses (built if absent)")
    parser.add_argument("--pretrain-data", default="runs/reader_pretrain_data", help="the pre-training rows (built)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core CPU)")
    parser.add_argument("--device", default="cpu", help="cuda: how the committed folder was built")
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall-clock budget of the build: the letter stage runs what fits, up to --steps")
    for field in dataclasses.fields(ReaderSpec):
        if field.name == "question_types":  # comma-separated
            parser.add_argument("--question-types", type=lambda text: tuple(text.split(",")), default=field.default)
        elif field.name != "letter_prior":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = ReaderSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ReaderSpec) if f.name != "letter_prior"})
    data = generate_reader_dataset(args.data, image_size=spec.image_size)
    started = time.time()
    out = build_reader_model(args.out, spec, eval_data_dir=data, pretrain_data_dir=args.pretrain_data,
                             device=args.device, seconds=args.seconds)
    report = json.loads((out / "READER_MODEL.json").read_text())
    print(json.dumps(report.get("reading"), indent=1))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"[reader] {out} ({size:.1f} MiB) in {time.time() - started:.0f} s. Fine-tune it through the CLI:\n"
          f"python -m mcvqa run --profile demo demo=false data_dir={args.data} model_name_or_path={out} "
          f"output_dir=runs/reader min_pixels={spec.image_size ** 2} max_pixels={spec.image_size ** 2} "
          "shuffle_options=true tta_option_views=4")


if __name__ == "__main__":
    main()
