"""## Recipe ablation bench on the reader stand-in (issue 26)

    python bench/bench_recipe.py --seeds 0,1,2 [--variants recipe,no_shuffle,...] [--out runs/bench_recipe]

Fine-tunes the reader stand-in (data/reader_model/qwen2_5_vl, built by bench/build_reader.py) through the product's
CLI, `python -m mcvqa run --profile demo ...`, once per (variant, seed): the recipe (the demo profile's training
settings, options shuffled in training, 4 option orders at test time) and the recipe with one part switched. TTA
variants re-predict the recipe run's adapters (`adapters_from`, no training): 1, 2, 4 cyclic orders and all 24
(the gate on every row). The winners' tricks run on top of the recipe; `first_stage` trains first on a second,
separately seeded reader competition (`<data>_extra`); `zero_shot_check` runs on a copy of the data with 10 % of
the training labels moved to a wrong letter and scores the label check against them. Writes `<out>/results.csv` (one row per run) and `<out>/table.md`: hold-out accuracy, CV
accuracy and the hold-out letter bias (reader_data.letter_bias), also for the first fold's single view (the
stored option order), mean and spread (sample standard deviation) over the seeds. The seed moves the fold split, LoRA initialisation and option shuffles; the data stay fixed.
"""
import argparse
import datetime
import json
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mcvqa.core.data import PROB_COLUMNS  # noqa: E402
from mcvqa.demo.reader_data import generate_reader_dataset, letter_bias, letter_lean  # noqa: E402

# Each variant: (what changes against the recipe, how it runs: "train" a fold, or "tta" re-predicting the recipe run).
RECIPE_RUN = "<the seed's recipe run>"  # placeholder: run_variant puts the folder in
EXTRA_DATA = "<a second reader competition>"  # placeholder: <data>_extra, separately seeded (first_stage_data)
NOISY_DATA = "<the data with planted label noise>"  # placeholder: <data>_noisy
LABEL_NOISE = 0.1
VARIANTS = {
    "recipe": ({}, "train"),
    "no_shuffle": ({"shuffle_options": "false"}, "train"),
    "tta_1": ({"tta_option_views": 1}, "tta"),
    "tta_2": ({"tta_option_views": 2}, "tta"),
    "tta_24": ({"tta_option_views": 1, "gate_fraction": 1.0, "gate_option_orders": 24, "gate_apply": "always"}, "tta"),
    "gate_10pct": ({"gate_fraction": 0.1, "gate_option_orders": 24}, "tta"),
    "ema_off": ({"ema_decay": 0.0}, "train"),
    "loss_vocab": ({"loss_over": "vocab"}, "train"),
    "lora_r4": ({"lora_r": 4, "lora_alpha": 8}, "train"),
    "lora_r64": ({"lora_r": 64, "lora_alpha": 128}, "train"),
    "image_84px": ({"min_pixels": 84 * 84, "max_pixels": 84 * 84}, "train"),  # 9 image tokens instead of 16
    # The winners' tricks (issue 26 part 3), each on top of the recipe:
    "prompt_repeat": ({"prompt_repeat": "true"}, "train"),
    "image_light": ({"image_transform": "light"}, "train"),
    "hard_rows": ({"hard_rows_from": RECIPE_RUN}, "train"),  # the seed's recipe run (all folds): its hard rows
    "gate_base_model": ({"gate_fraction": 0.1, "gate_option_orders": 4, "gate_base_model": "true"}, "tta"),
    "first_stage": ({"first_stage_data": EXTRA_DATA, "first_stage_epochs": 1}, "train"),
    # On a copy of the data with LABEL_NOISE of the training labels moved to a wrong letter: the base model's
    # label check (fold 0's out-of-fold rows) is scored against the planted flips (label_check_* columns).
    "zero_shot_check": ({"zero_shot_label_check": "true", "data_dir": NOISY_DATA}, "train"),
    # The same recipe on the Qwen3.5 stand-in (hybrid linear attention, its <think></think> answer position).
    "recipe_qwen3_5": ({"model_name_or_path": "data/reader_model/qwen3_5"}, "train"),
}


def recipe_settings(args, seed, out_dir):
    """The recipe run's CLI settings: the demo profile's training, the reader's images, the recipe's option tricks."""
    return {"demo": "false", "data_dir": args.data, "model_name_or_path": args.model, "output_dir": out_dir,
            "min_pixels": args.image_size ** 2, "max_pixels": args.image_size ** 2, "n_folds": args.folds,
            "folds": args.fold_list, "epochs": args.epochs, "seed": seed, "shuffle_options": "true",
            "tta_option_views": 4}


def run_cli(settings, log):
    """One `python -m mcvqa run --profile demo` (a fresh process, as a user runs it); returns its seconds."""
    command = [sys.executable, "-m", "mcvqa", "run", "--profile", "demo", *[f"{k}={v}" for k, v in settings.items()]]
    started = time.time()
    with open(log, "w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.time() - started


def _holdout_scores(probs_csv, data_dir):
    """(accuracy, letter bias, soft letter lean) of one probabilities file on the hold-out answers."""
    probs = pd.read_csv(probs_csv)
    answers = probs["id"].map(pd.read_csv(pathlib.Path(data_dir) / "test_answers.csv").set_index("id")["answer"])
    p = probs[PROB_COLUMNS].to_numpy()
    return (float((p.argmax(1) == answers.map("abcd".index).to_numpy()).mean()), letter_bias(p, answers.to_numpy()),
            letter_lean(p, answers.to_numpy()))


def score_run(run_dir, data_dir):
    """Hold-out accuracy and letter bias of the submission's probabilities and of the first fold's single view (the
    stored option order: what shuffled training changes before TTA hides it); CV accuracy from metrics.json."""
    acc, bias, _ = _holdout_scores(run_dir / "test_probs_ensemble.csv", data_dir)
    acc1, bias1, lean1 = _holdout_scores(sorted(run_dir.glob("fold*/test_probs_view0.csv"))[0], data_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"holdout_acc": acc, "cv_acc": metrics["cv_accuracy"], "holdout_bias": bias,
            "holdout_acc_1view": acc1, "holdout_bias_1view": bias1, "holdout_lean_1view": lean1}


def run_variant(name, seed, args, out):
    changes, kind = VARIANTS[name]
    run_dir = out / f"{name}_s{seed}"
    settings = recipe_settings(args, seed, run_dir)
    if kind == "tta":  # the recipe run's adapters, predicted again with other test-time views
        settings["adapters_from"] = out / f"recipe_s{seed}"
    if RECIPE_RUN in changes.values():
        # hard_rows_from needs an earlier run whose out-of-fold pass covered every training row: all folds.
        earlier = out / f"recipe_allfolds_s{seed}"
        if not (earlier / "metrics.json").exists():
            run_cli({**recipe_settings(args, seed, earlier), "folds": "all"}, out / f"recipe_allfolds_s{seed}.log")
        changes = {k: earlier if v == RECIPE_RUN else v for k, v in changes.items()}
    changes = {k: {EXTRA_DATA: f"{args.data}_extra", NOISY_DATA: f"{args.data}_noisy"}.get(v, v)
               for k, v in changes.items()}
    settings.update(changes)
    timing = run_dir / "bench_seconds.txt"  # kept beside the run: a later invocation re-scores it, time included
    if not (run_dir / "metrics.json").exists():
        seconds = run_cli(settings, out / f"{name}_s{seed}.log")
        timing.write_text(f"{seconds:.1f}")
    seconds = float(timing.read_text()) if timing.exists() else float("nan")
    scores = score_run(run_dir, args.data)
    if changes.get("zero_shot_label_check"):
        scores.update(score_label_check(run_dir, changes["data_dir"]))
    return {"variant": name, "seed": seed, "seconds": round(seconds, 1), **scores}


def make_noisy_copy(data_dir, rate=LABEL_NOISE, seed=26):
    """<data>_noisy: the competition with `rate` of its training labels moved to another letter at random (the
    images linked, not copied); the true labels kept in train_clean.csv. Returns the folder."""
    data_dir = pathlib.Path(data_dir)
    out = pathlib.Path(f"{data_dir}_noisy")
    if (out / "train_clean.csv").exists():
        return out
    shutil.copytree(data_dir, out, ignore=shutil.ignore_patterns("*.png"), dirs_exist_ok=True)
    for split in ("train", "test"):
        for image in (data_dir / split).glob("*.png"):
            (out / split / image.name).unlink(missing_ok=True)
            (out / split / image.name).symlink_to(image.resolve())
    train = pd.read_csv(data_dir / "train.csv")
    rng = np.random.default_rng(seed)
    flip = rng.random(len(train)) < rate
    noisy = train.copy()
    noisy.loc[flip, "answer"] = [rng.choice([x for x in "abcd" if x != a]) for a in train.loc[flip, "answer"]]
    noisy.to_csv(out / "train.csv", index=False)
    train.to_csv(out / "train_clean.csv", index=False)  # written last: marks the copy complete
    return out


def score_label_check(run_dir, noisy_dir):
    """The zero-shot label check against the planted flips, on the rows it looked at (the folds' out-of-fold
    rows): how many it flags, the share of the flips it finds (recall) and the share of its flags that are flips
    (precision; flagging at random gives the noise rate)."""
    from mcvqa.toolkit.analysis import zero_shot_disputes

    noisy, clean = pd.read_csv(pathlib.Path(noisy_dir) / "train.csv"), pd.read_csv(pathlib.Path(noisy_dir) / "train_clean.csv")
    seen = pd.concat([pd.read_csv(f) for f in run_dir.glob("fold*/zero_shot_oof_probs.csv")])["id"]
    table = noisy[noisy["id"].isin(seen)].reset_index(drop=True)
    flagged = zero_shot_disputes(run_dir, table)
    flipped = (table["answer"].to_numpy() != clean.set_index("id").loc[table["id"], "answer"].to_numpy())
    return {"label_check_rows": int(len(table)), "label_check_flipped": int(flipped.sum()),
            "label_check_flagged": int(flagged.sum()),
            "label_check_recall": float((flagged & flipped).sum() / max(1, flipped.sum())),
            "label_check_precision": float((flagged & flipped).sum() / max(1, flagged.sum()))}


def markdown_table(results, args):
    """One row per variant: mean ± sd over seeds of hold-out accuracy, CV accuracy and hold-out bias."""
    lines = ["| variant | seeds | hold-out acc | CV acc | hold-out letter bias | single view: acc | single view: bias "
             "| single view: lean | s / run |", "|---|---|---|---|---|---|---|---|---|"]
    for name, group in results.groupby("variant", sort=False):
        cells = [f"{group[c].mean():.3f} ± {group[c].std(ddof=1) if len(group) > 1 else 0:.3f}"
                 for c in ("holdout_acc", "cv_acc", "holdout_bias", "holdout_acc_1view", "holdout_bias_1view",
                           "holdout_lean_1view")]
        lines.append(f"| {name} | {len(group)} | {' | '.join(cells)} | {group['seconds'].mean():.0f} |")
    if "label_check_flagged" in results:
        checked = results.dropna(subset=["label_check_flagged"])
        lines += ["", "Zero-shot label check against planted flips (fold 0's out-of-fold rows; mean ± sd over seeds):", "",
                  "| rows looked at | planted flips | flagged | recall of flips | precision (random flags: the noise "
                  "rate) |", "|---|---|---|---|---|",
                  "| " + " | ".join(f"{checked[c].mean():.3f} ± {checked[c].std(ddof=1) if len(checked) > 1 else 0:.3f}"
                                   for c in ("label_check_rows", "label_check_flipped", "label_check_flagged",
                                             "label_check_recall", "label_check_precision")) + " |"]
    header = (f"Reader stand-in `{args.model}`, data `{args.data}`, fold(s) {args.fold_list} of {args.folds}, "
              f"{args.epochs} epoch(s), the demo profile's training settings otherwise; "
              f"{platform.processor() or platform.machine()} CPU; "
              f"{datetime.date.today()}; command: `python bench/bench_recipe.py {' '.join(sys.argv[1:])}`")
    return header + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/reader_model/qwen2_5_vl")
    parser.add_argument("--data", default="runs/reader_data", help="a reader competition (built if absent)")
    parser.add_argument("--out", default="runs/bench_recipe")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--fold-list", default="0")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    generate_reader_dataset(args.data, image_size=args.image_size)
    # The "external data" of first_stage_data: a second reader competition, separately seeded (no shared rows).
    generate_reader_dataset(f"{args.data}_extra", n_train=800, n_test=4, image_size=args.image_size, seed=1)
    make_noisy_copy(args.data)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.variants.split(","):
            rows.append(run_variant(name, seed, args, out))
            print(json.dumps(rows[-1]), flush=True)
            pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    table = markdown_table(pd.DataFrame(rows), args)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
