"""## The run: the stages above, in order, with the engine room plugged in

`run_pipeline` = `start_run` (inputs, data, folds) -> `run_all_folds` (each fold trained, then its
out-of-fold and test rows predicted with TTA and, if on, the uncertainty gate) -> `finish_run` (ensemble,
submission, report, error analysis, and with `blend_with` the blend). It is safe to re-run: finished folds
are skipped, an interrupted fold resumes from its checkpoint. Outputs in `output_dir`: `config.json`,
`folds.csv`, per fold `foldK/` (checkpoint, best adapter, history), `oof_probs.csv`, `test_probs_foldK.csv`,
`test_probs_ensemble.csv`, `history.csv`, `metrics.json`, `plots/`, `analysis/` (toolkit/analysis.py),
`blend/` (toolkit/blend.py) and `submission.csv`. Under `torchrun` (scale/distributed.py) every rank runs
this flow and trains each fold together; rank 0 writes. This is the one module that joins the core stages
to the speed, scale, demo and toolkit wings.
"""

import dataclasses
import json
import pathlib
import time

import numpy as np
import pandas as pd
import torch

from .core.config import PROFILES, Config, ConfigError, check_adapter_source, check_resume, save_config
from .core.data import (PROB_COLUMNS, add_image_hashes, check_images, letter_indices, letters_from_probs, load_image,
                        make_folds, probs_frame, read_competition_csv, with_reversed_copies)
from .core.ensemble import apply_temperature, ensemble_folds, fit_temperature, fold_weights
from .core.hardware import apply_memory_cap
from .core.inference import gather_views, image_scales, predict_views, tta_probs
from .core.memory import free_memory, plan_memory
from .core.modeling import (describe_kernels, load_model_for_training, load_processor, load_trainable_state,
                            model_family)
from .core.prompts import make_prompt_format
from .core.submission import read_sample_submission, write_submission
from .core.training import FoldContext, train_fold
from .demo.demo_data import DEMO_MARKER, generate_demo_dataset
from .demo.demo_model import build_tiny_qwen_vl
from .machinery.compat import check_versions
from .machinery.files import atomic_write
from .machinery.process import process_group
from .runkit.budget import RunClock
from .runkit.gate import (adapter_off, describe_gate, extra_views_per_row, gate_choice, gate_on, gated_probs,
                          max_gated_rows)
from .runkit.locate import resolve_inputs
from .runkit.preflight import preflight
from .runkit.reporting import make_run_plots
from .runkit.resume import check_code, fold_manifest, prediction_settings, prepare_fold, save_code_signature
from .scale.parallel import parallel_workers, run_folds
from .speed.fast_vision import speed_up_vision_tower
from .speed.feature_cache import make_feature_cache
from .speed.self_check import check_fast_paths
from .toolkit.analysis import analyze_run, hard_row_ids
from .toolkit.run_blend import blend_into_submission, check_blend_members

SKIPPED_FOR_TIME = "SKIPPED_FOR_TIME"  # marks a fold the time budget left out (collect_results ensembles the others)


# What the tiny base is built from: a run that changes one of them gets a base of its own (tiny_model_dir).
TINY_BASE_SETTINGS = {"seed": "seed", "demo_hidden_size": "h", "max_pixels": "px", "demo_image_size": "img",
                      "demo_warmup_rows": "rows", "demo_warmup_epochs": "ep"}


def tiny_model_dir(cfg):
    """data/tiny_models/<family> for the demo profile's settings, else a folder named after what differs, so
    that e.g. seed=7 builds its own base instead of silently rebuilding the one every other run shares."""
    demo = Config(**{k: v for k, v in PROFILES["demo"].items() if k in TINY_BASE_SETTINGS})
    differs = [f"{short}{getattr(cfg, name)}" for name, short in TINY_BASE_SETTINGS.items()
               if getattr(cfg, name) != getattr(demo, name)]
    return pathlib.Path("data/tiny_models") / "_".join([cfg.demo_family, *differs])


def check_demo_targets(data_dir, model_dir):
    """demo=true writes the demo's data into data_dir and a tiny model into model_dir: refused where they hold
    something else (a train.csv without the demo's marker, a model without TINY_MODEL.json), before any write."""
    data_dir, model_dir = pathlib.Path(data_dir), pathlib.Path(model_dir)
    if (data_dir / "train.csv").exists() and not (data_dir / DEMO_MARKER).exists():
        raise ConfigError(f"config: demo=true writes the demo's data into data_dir={data_dir}, which holds another "
                          f"dataset (its train.csv is not the demo's). Fix: demo=false to run on it (after --profile "
                          "demo too), or another data_dir")
    if (model_dir / "config.json").exists() and not (model_dir / "TINY_MODEL.json").exists():
        raise ConfigError(f"config: demo=true builds a tiny model into model_name_or_path={model_dir}, which holds "
                          "another model. Fix: demo=false to fine-tune it (after --profile demo too), or leave "
                          "model_name_or_path empty")


def prepare_demo(cfg):
    """Build the embedded demo data and tiny model (both cached; seconds on a re-run)."""
    model_dir = cfg.model_name_or_path or tiny_model_dir(cfg)
    check_demo_targets(cfg.data_dir, model_dir)
    data_dir = generate_demo_dataset(cfg.data_dir, image_size=cfg.demo_image_size)
    texts = []
    for name in ("train.csv", "test.csv"):
        frame = pd.read_csv(data_dir / name)
        texts += frame[["question", "a", "b", "c", "d"]].astype(str).to_numpy().ravel().tolist()
    texts += [cfg.instruction, "a. b. c. d.", "You are a helpful assistant."]
    # The base's warm-up uses its own, differently seeded images: nothing from train or test.
    warmup_dir = generate_demo_dataset(pathlib.Path(f"{model_dir}_warmup_data"), n_train=cfg.demo_warmup_rows,
                                       n_test=4, image_size=cfg.demo_image_size, seed=cfg.seed + 1000)
    warmup = pd.read_csv(warmup_dir / "train.csv")
    examples = []
    for row in warmup.itertuples():
        image = load_image(warmup_dir / row.path)
        # Perception only (the answer in words): the multiple-choice letters are what fine-tuning
        # teaches, so the base scores about chance on the demo before it (see README).
        examples.append((image, row.question, getattr(row, row.answer)))
    build_tiny_qwen_vl(model_dir, texts, family=cfg.demo_family, seed=cfg.seed, max_pixels=cfg.max_pixels,
                       hidden_size=cfg.demo_hidden_size, warmup_examples=examples, warmup_epochs=cfg.demo_warmup_epochs)
    print(f"[demo] data in {data_dir}, tiny {cfg.demo_family} model in {model_dir}")
    return dataclasses.replace(cfg, model_name_or_path=str(model_dir))


def load_competition(cfg):
    """Read and validate train/test CSVs, images and sample_submission.csv; returns (train, test,
    sample_submission path or None, bad rows)."""
    data_dir = pathlib.Path(cfg.data_dir)  # (auto resolved by locate.resolve_inputs)
    train = read_competition_csv(data_dir / "train.csv", "train")
    test = read_competition_csv(data_dir / "test.csv", "test")
    sample = data_dir / "sample_submission.csv"
    if sample.exists():  # checked now, not when the submission is written after the training
        _, sample_ids = read_sample_submission(sample, test["id"])
        if sample_ids != [str(i).strip() for i in test["id"]]:
            print(f"[data] {sample} lists the test ids in another order than test.csv: submission.csv follows its "
                  "order (Kaggle matches the rows by id)")
    train, bad_train = _checked_images(cfg, train, data_dir / "train.csv")
    test, bad_test = _checked_images(cfg, test, data_dir / "test.csv")
    if cfg.max_train_rows:
        train = train.iloc[: cfg.max_train_rows].reset_index(drop=True)
    print(f"[data] {len(train)} train rows, {len(test)} test rows from {data_dir}")
    return train, test, (sample if sample.exists() else None), bad_train + bad_test


def load_first_stage(cfg):
    """first_stage_data's train.csv and images, read and checked like the competition's (test.csv not needed)."""
    data_dir = pathlib.Path(cfg.first_stage_data)
    if not (data_dir / "train.csv").is_file():
        raise ConfigError(f"config: first_stage_data={data_dir}: no train.csv there. Fix: a folder in the "
                          "competition's layout (train.csv with id, path or image, question, a-d, answer; its images)")
    frame, _ = _checked_images(cfg, read_competition_csv(data_dir / "train.csv", "train"), data_dir / "train.csv")
    print(f"[first stage] {len(frame)} rows from {data_dir}: one adapter trains on them before the folds, which start "
          "from it")
    return frame


def _checked_images(cfg, frame, csv_path):
    """(frame, bad rows): its images checked (cfg.on_bad_image) and hashed (folds group by them, resume checks them)."""
    frame, bad = check_images(frame, csv_path, cfg.on_bad_image, cfg.max_pixels, cfg.bomb_limit_pixels)
    return add_image_hashes(frame), bad


def test_labels(cfg, test):
    """Hold-out answers when known (the demo ships them; a labelled test.csv works too)."""
    path = pathlib.Path(cfg.data_dir) / "test_answers.csv"
    if path.exists():
        answers = pd.read_csv(path).set_index("id")["answer"]
        return test["id"].map(answers).to_numpy()
    return test["answer"].to_numpy() if "answer" in test else None


def folds_to_run(cfg):
    return list(range(cfg.n_folds)) if cfg.folds == "all" else [int(f) for f in cfg.folds.split(",")]


@dataclasses.dataclass
class Run:
    """What the stages of one run share: the settings, the checked data, the prompt format, the folds."""

    cfg: object
    hardware: object
    out_dir: pathlib.Path
    clock: RunClock
    train: pd.DataFrame
    test: pd.DataFrame
    folds: np.ndarray
    processor: object
    fmt: object
    sample_submission: object  # path of sample_submission.csv, or None
    bad_rows: list
    hard_ids: frozenset = frozenset()  # hard_rows_from's hard rows: they train twice, once in reversed option order
    first_stage: object = None  # first_stage_data's checked training rows (a DataFrame), or None


def start_run(cfg, hardware):
    """Inputs found and checked, the data read, the memory plan, the prompt format and the folds, and everything
    the run needs at its end (runkit/preflight.py): all before the first fold, nothing expensive loaded yet, and
    nothing written into the run folder until every check has passed (a refused run leaves none behind)."""
    group = process_group()
    clock = RunClock.start(cfg.time_budget_hours)
    check_versions(verbose=group.is_main())
    if cfg.demo:
        if group.is_main():
            cfg = prepare_demo(cfg)
        group.barrier()
        if not group.is_main():  # rank 0 built them; the others find them ready (several nodes: a shared folder)
            cfg = prepare_demo(cfg)
    cfg = resolve_inputs(cfg)  # data_dir / model_name_or_path "auto", a hub id, Colab's Drive: before any write
    out_dir = pathlib.Path(cfg.output_dir)
    if group.is_main():
        check_resume(cfg, out_dir)  # the same prompt and image settings...
        check_code(out_dir)  # ...and code as the folds already there
    train, test, sample_submission, bad_rows = load_competition(cfg)
    apply_memory_cap(hardware)
    cfg, plan = plan_memory(cfg, hardware, verbose=group.is_main())  # checkpointing and batch sizes for this card
    processor = load_processor(cfg)  # (its tokenizer checked against the model's vocabulary)
    fmt = make_prompt_format(processor, cfg)
    folds = make_folds(train, cfg.n_folds, cfg.seed)
    folds_frame = pd.DataFrame({"id": train["id"], "fold": folds})
    if cfg.adapters_from:
        # The same prompts, images and folds as that run, and an adapter for every fold to predict.
        check_adapter_source(cfg, folds_frame, folds_to_run(cfg))
    hard = frozenset(hard_row_ids(cfg.hard_rows_from, cfg.hard_row_margin) & set(train["id"].astype(str))) \
        if cfg.hard_rows_from else frozenset()
    if cfg.hard_rows_from:
        print(f"[train] {len(hard)} training rows that hard_rows_from={cfg.hard_rows_from} got wrong or nearly (top-2 "
              f"margin < {cfg.hard_row_margin:g}) train twice, the copy in reversed option order")
    first_stage = load_first_stage(cfg) if cfg.first_stage_data else None  # checked before anything is written
    if cfg.blend_with and group.is_main():
        check_blend_members(cfg, test)
    if group.is_main():
        workers = max(1, parallel_workers(cfg, hardware, len(folds_to_run(cfg)), verbose=False))
        n_images = len(set(train["image_hash"]) | set(test["image_hash"]))
        preflight(cfg, hardware, plan, n_train=len(train), n_test=len(test), n_images=n_images,
                  n_folds=len(folds_to_run(cfg)), workers=workers)
        save_config(cfg, out_dir)  # the run folder's first files, after every check
        save_code_signature(out_dir)
        (out_dir / "memory_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        folds_frame.to_csv(out_dir / "folds.csv", index=False)
    print(f"[folds] {cfg.n_folds} folds of {np.bincount(folds).tolist()} rows (stratified by answer, grouped by image)")
    return Run(cfg, hardware, out_dir, clock, train, test, folds, processor, fmt, sample_submission, bad_rows, hard, first_stage)


# %% Each fold: load the model, train, predict the out-of-fold and test rows with TTA

def run_feature_cache(cfg, model, hardware, shared):
    """The image-feature cache of this run, made once and shared by its folds (None where it is off).

    `shared` is the run's holder (a dict run_all_folds makes): every fold loads the same frozen vision
    tower, so fold 1 reuses what fold 0 encoded. Checked per fold: a trainable tower gets no cache.
    Worker processes (parallel.py) each get their own copy of the holder."""
    cache = make_feature_cache(cfg, model, hardware, reuse=shared.get("cache"))
    shared["cache"] = cache
    return cache


def run_fold(run, fold, shared_cache=None):
    """Train one fold (or resume / skip it) and write its out-of-fold and test probabilities.

    `run`: the run's parts (start_run); `shared_cache`: the run's feature-cache holder (see run_feature_cache);
    None = this fold alone. The fold's stages share one FoldContext (core/training.py), made by load_fold_model."""
    fold_dir = run.out_dir / f"fold{fold}"
    apply_memory_cap(run.hardware)  # (again in a fold worker: a new process)
    train_part = run.train[run.folds != fold].reset_index(drop=True)
    if run.hard_ids:
        plain, train_part = len(train_part), with_reversed_copies(train_part, run.hard_ids)
        print(f"[train] fold {fold}: {len(train_part) - plain} reversed-order copies of hard rows (hard_rows_from) "
              f"among its {len(train_part)} training rows")
    val_part = run.train[run.folds == fold].reset_index(drop=True)
    zero_shot = run.cfg.epochs == 0
    # Reuse only what belongs to the current rows (resume.py): stale predictions are made again.
    manifest = fold_manifest(train_part, val_part, run.test, zero_shot, prediction_settings(run.cfg))
    if fold_needs_no_work(run, fold, fold_dir, manifest):
        return
    shared_cache = {} if shared_cache is None else shared_cache
    model, ctx = load_fold_model(run, fold, fold_dir, train_part, shared_cache)
    fit_fold(ctx, model, train_part, val_part, run.test)
    predict_fold(ctx, model, val_part, run.test, shared_cache=shared_cache, zero_shot=zero_shot)
    report_fold_end(ctx, run.out_dir)
    del model
    free_memory()


def fold_needs_no_work(run, fold, fold_dir, manifest):
    """True when the fold's predictions exist and match the current rows (resume.py), or when the time budget
    leaves none for it (marked SKIPPED_FOR_TIME, and the submission comes from the other folds)."""
    out_dir, clock = run.out_dir, run.clock
    if process_group().from_main(lambda: prepare_fold(fold_dir, fold, manifest, run.test["id"])):
        print(f"[fold {fold}] predictions exist and match the current rows, skipping")
        return True
    if clock is not None and clock.out_of_time() and list(out_dir.glob("fold*/test_probs.csv")):
        print(f"[time] fold {fold} skipped ({clock.describe()}): no time left for it; the submission comes from the "
              "folds with predictions")
        if process_group().is_main():
            (fold_dir / SKIPPED_FOR_TIME).write_text(clock.describe() + "\n")
        return True
    (fold_dir / SKIPPED_FOR_TIME).unlink(missing_ok=True)
    return False


def load_fold_model(run, fold, fold_dir, train_part, shared_cache):
    """(the fold's model, its FoldContext): the model with its LoRA initialised from seed + fold, on this rank's
    GPU, its vision tower sped up and its fast paths checked against the stock forward on `train_part`'s rows."""
    cfg, hardware = run.cfg, run.hardware
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.seed + fold)  # same LoRA initialisation on every (re-)run of this fold
    model = load_model_for_training(cfg, hardware, device=process_group().local_device(hardware))  # DDP: this rank's GPU
    kernels = describe_kernels(model_family(cfg.model_name_or_path), hardware)  # (Qwen3.5's linear attention)
    if kernels:
        print(kernels)
    speed_up_vision_tower(model, cfg, hardware)
    cache = run_feature_cache(cfg, model, hardware, shared_cache)
    ctx = FoldContext(run.processor, run.fmt, cfg, hardware, feature_cache=cache, fold=fold, fold_dir=fold_dir,
                      clock=run.clock)
    # The fast paths are checked against the stock forward on this transformers version before they are used.
    cache, cfg = check_fast_paths(ctx, model, train_part)
    return model, dataclasses.replace(ctx, feature_cache=cache, cfg=cfg)


def fit_fold(ctx, model, train_part, val_part, test):
    """The fold's adapter in `model`: the earlier run's (adapters_from), none (epochs=0: zero-shot), or trained
    now (train_fold) and its best EMA weights loaded."""
    cfg, fold, fold_dir = ctx.cfg, ctx.fold, ctx.fold_dir
    if cfg.adapters_from:
        # Inference only: the earlier run's adapter for this fold, copied here so this run folder stands alone.
        source = pathlib.Path(cfg.adapters_from) / f"fold{fold}" / "best_adapter.pt"  # (start_run checked it is there)
        state = torch.load(source, map_location="cpu")
        load_trainable_state(model, state)
        if process_group().is_main():
            torch.save(state, fold_dir / "best_adapter.pt")
        print(f"[fold {fold}] adapters_from: predicting with {source}, no training")
    elif cfg.epochs == 0:
        # epochs=0: the base model answers (LoRA starts as the identity); every fold scores the same test set.
        print(f"[fold {fold}] epochs=0: zero-shot, the base model scores its out-of-fold rows and the test set")
    else:
        views = max(1, cfg.tta_option_views) * len(image_scales(cfg)) * (len(val_part) + len(test)) + \
            extra_views_per_row(cfg) * (max_gated_rows(cfg, len(val_part)) + max_gated_rows(cfg, len(test)))
        if cfg.zero_shot_label_check:
            zero_shot_scores(ctx, model, val_part)
        if cfg.first_stage_data:
            start_from_first_stage(ctx, model)
        train_fold(ctx, model, train_part, val_part, reserve_views=views)
        load_trainable_state(model, process_group().from_main(lambda: torch.load(fold_dir / "best_adapter.pt", map_location="cpu")))


ZERO_SHOT_OOF = "zero_shot_oof_probs.csv"


def zero_shot_scores(ctx, model, val_part):
    """The base model's probabilities (adapter off, one view) of the fold's out-of-fold rows, before it trains:
    every training row is out of fold once, so the run ends with a zero-shot opinion on each (toolkit/analysis.py
    adds the rows whose label is outside its top 2 to the suspect labels). Once per fold; a resumed fold keeps it."""
    path = pathlib.Path(ctx.fold_dir) / ZERO_SHOT_OOF
    if path.exists():
        return
    with adapter_off(model):
        views = gather_views(process_group().map_shards(val_part, lambda part: predict_views(
            ctx, model, part, desc=f"fold {ctx.fold} zero-shot label check", perms=[(0, 1, 2, 3)], scales=[1.0])))
    if process_group().is_main():
        atomic_write(path, lambda temp: probs_frame(val_part["id"], views[(1.0, 0)]).to_csv(temp, index=False))


def report_fold_end(ctx, out_dir):
    """The fold's closing lines: its feature cache, the time so far and the pace, its peak GPU memory."""
    cfg, fold, clock, hardware = ctx.cfg, ctx.fold, ctx.clock, ctx.hardware
    if ctx.feature_cache is not None:
        print(f"[cache] after fold {fold}: {ctx.feature_cache.summary()}")
    if clock is not None:
        done, total = len(list(out_dir.glob("fold*/test_probs.csv"))), len(folds_to_run(cfg))
        eta = clock.elapsed() / max(done, 1) * (total - done) / 3600  # (workers in parallel: an upper bound)
        print(f"[time] fold {fold} done: {clock.describe()}; {done} of {total} folds have predictions, "
              f"~{eta:.2f} h more at this pace")
    if hardware.device == "cuda":
        print(f"[memory] fold {fold}: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved, of {hardware.gpu_memory_gib:g} GiB")


def predict_fold(ctx, model, val_part, test, *, shared_cache, zero_shot):
    """The fold's out-of-fold and test probabilities with TTA (and the uncertainty gate, gate.py), written to
    ctx.fold_dir: `*_probs_view0.csv` (one view), with the gate `*_probs_ungated.csv` and `*_gate.json` (what it
    gated and cost), and `*_probs.csv` (what the ensemble takes)."""
    fold, fold_dir, cfg = ctx.fold, ctx.fold_dir, ctx.cfg
    for name, frame in (("oof", val_part), ("test", test)):
        if zero_shot and name == "test" and "zero_shot_test" in shared_cache:
            views, probs, gated, report = shared_cache["zero_shot_test"]  # the same untrained model: the same outputs
        else:
            # Under DDP each rank predicts one contiguous row shard; all shards come back in row order.
            # The test pass is the same in every fold: its batches are kept for the next fold (feature cache on).
            tick = time.perf_counter()
            views = gather_views(process_group().map_shards(frame, lambda part: predict_views(
                ctx, model, part, desc=f"fold {fold} {name}", reuse_batches=name == "test")))
            normal_s = time.perf_counter() - tick
            probs, gated, report = tta_probs(views, cfg.tta_average), None, None
            if gate_on(cfg):
                gated, report = gated_probs(ctx, model, frame, probs, views, desc=f"fold {fold} {name}",
                                            map_shards=process_group().map_shards)
                report["normal_s"] = round(normal_s, 3)
        if zero_shot and name == "test":
            shared_cache["zero_shot_test"] = views, probs, gated, report
        if not process_group().is_main():
            continue
        probs_frame(frame["id"], views[(1.0, 0)]).to_csv(fold_dir / f"{name}_probs_view0.csv", index=False)
        if gated is not None:
            probs_frame(frame["id"], probs).to_csv(fold_dir / f"{name}_probs_ungated.csv", index=False)
            (fold_dir / f"{name}_gate.json").write_text(json.dumps(report, indent=1) + "\n")
        # Written last: its presence marks the fold complete.
        probs_frame(frame["id"], probs if gated is None else gated).to_csv(fold_dir / f"{name}_probs.csv", index=False)


FIRST_STAGE = "first_stage"


def train_first_stage(run, shared_cache):
    """first_stage_data: one adapter trained on the extra rows (a tenth of them for its validation), resumable like a
    fold in <output_dir>/first_stage; the folds start from its best adapter (start_from_first_stage)."""
    stage_dir = run.out_dir / FIRST_STAGE
    if (stage_dir / "DONE.json").exists():
        print(f"[first stage] already trained ({stage_dir / 'best_adapter.pt'})")
        return
    frame = run.first_stage.sample(frac=1.0, random_state=run.cfg.seed).reset_index(drop=True)
    n_val = max(1, len(frame) // 10)
    stage = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, epochs=run.cfg.first_stage_epochs))
    index = run.cfg.n_folds  # past the folds: its own LoRA initialisation and shuffles (seeds must be >= 0)
    print(f"[first stage] training on {len(frame) - n_val} rows, validating on {n_val} (its lines say fold {index})")
    model, ctx = load_fold_model(stage, index, stage_dir, frame, shared_cache)
    train_fold(ctx, model, frame.iloc[n_val:].reset_index(drop=True), frame.iloc[:n_val].reset_index(drop=True))
    del model
    free_memory()


def start_from_first_stage(ctx, model):
    """The fold's LoRA weights set to the first stage's best adapter (a resumed fold's checkpoint then wins)."""
    source = pathlib.Path(ctx.fold_dir).parent / FIRST_STAGE / "best_adapter.pt"
    load_trainable_state(model, torch.load(source, map_location="cpu"))
    print(f"[fold {ctx.fold}] starting from the first stage's adapter ({source})")


def run_all_folds(run):
    """Every fold trained (or resumed, or skipped when done) and its predictions written: one after another
    here (under DDP each across all ranks), or with 2+ GPUs one worker process per GPU (scale/parallel.py)."""
    shared_cache = {}  # the folds of this run share one image-feature cache
    if run.first_stage is not None:
        train_first_stage(run, shared_cache)
    run_folds(run_fold, {fold: (run, fold, shared_cache) for fold in folds_to_run(run.cfg)}, run.cfg, run.hardware,
              run.out_dir / "workers")
    shared_cache.clear()  # the folds are done: free their image features (GPU memory too) and kept batches


# %% After the folds: the ensemble, the submission, the report

def _accuracy(probs, letters):
    return float(np.mean(np.asarray(letters_from_probs(probs)) == np.asarray(letters)))


def _test_probs(path, test):
    """A fold's test probabilities, in test order; never matched to the rows by position alone."""
    saved = pd.read_csv(path)
    if saved["id"].astype(str).tolist() != test["id"].astype(str).tolist():
        raise RuntimeError(f"{path}: its ids are not the current test.csv's, in order (resume.prepare_fold should "
                           "have predicted it again); delete the fold's *_probs.csv files and re-run")
    return saved[PROB_COLUMNS].to_numpy()


def collect_results(cfg, train, test, folds, out_dir):
    """Read the fold outputs back, ensemble them, and compute the metrics and ablations."""
    skipped = [k for k in folds_to_run(cfg) if (out_dir / f"fold{k}" / SKIPPED_FOR_TIME).exists()]
    run = [k for k in folds_to_run(cfg) if k not in skipped]
    if skipped:
        print(f"[time] folds {skipped} were skipped for the time budget: the ensemble has folds {run}")
    oof = pd.concat([pd.read_csv(out_dir / f"fold{k}" / "oof_probs.csv").assign(fold=k) for k in run])
    oof = oof.merge(train[["id", "answer"]], on="id", how="left")
    test_tta = [_test_probs(out_dir / f"fold{k}" / "test_probs.csv", test) for k in run]
    oof, test_tta, gate, gate_variants = gate_choice(cfg, [out_dir / f"fold{k}" for k in run], oof, test_tta,
                                                     lambda path: _test_probs(path, test))
    oof.to_csv(out_dir / "oof_probs.csv", index=False)
    oof_view0 = pd.concat([pd.read_csv(out_dir / f"fold{k}" / "oof_probs_view0.csv") for k in run])
    fold_acc = [_accuracy(g[PROB_COLUMNS].to_numpy(), g["answer"]) for _, g in oof.groupby("fold")]
    test_view0 = [_test_probs(out_dir / f"fold{k}" / "test_probs_view0.csv", test) for k in run]
    weights = fold_weights(cfg, fold_acc)
    ensemble = ensemble_folds(test_tta, weights)
    metrics = {"profile": cfg.profile, "zero_shot": cfg.epochs == 0, "folds_skipped_for_time": skipped,
               "fold_accuracy": fold_acc,
               "cv_accuracy": _accuracy(oof[PROB_COLUMNS].to_numpy(), oof["answer"]),
               "cv_accuracy_single_view": _accuracy(oof_view0[PROB_COLUMNS].to_numpy(),
                                                    oof["answer"].to_numpy()),
               "fold_weights": weights.tolist()}
    if gate is not None:
        metrics["gate"] = gate
    if cfg.temperature_scaling:
        targets = letter_indices(oof["answer"])
        metrics["temperature"] = fit_temperature(oof[PROB_COLUMNS].to_numpy(), targets)
        ensemble = apply_temperature(ensemble, metrics["temperature"])
    for k, probs in zip(run, test_tta):
        probs_frame(test["id"], probs).to_csv(out_dir / f"test_probs_fold{k}.csv", index=False)
    probs_frame(test["id"], ensemble).to_csv(out_dir / "test_probs_ensemble.csv", index=False)
    labels = test_labels(cfg, test)
    if labels is not None:
        metrics["ablation"] = {
            f"single fold (fold {run[0]}), one view": _accuracy(test_view0[0], labels),
            f"{len(run)}-fold ensemble, one view": _accuracy(ensemble_folds(test_view0, weights), labels),
        }
        if cfg.tta_option_views > 1 or cfg.tta_image_scales.strip():
            metrics["ablation"][f"{len(run)}-fold ensemble + TTA ({cfg.tta_option_views} option orders)"] = \
                _accuracy(ensemble_folds(gate_variants["ungated"], weights) if gate else ensemble, labels)
        if gate is not None:
            metrics["ablation"][f"{len(run)}-fold ensemble + uncertainty gate ({'applied' if gate['applied'] else 'not applied'})"] = \
                _accuracy(ensemble_folds(gate_variants["gated"], weights), labels)
    return ensemble, metrics


def finish_run(run):
    """After the folds: ensemble, submission, metrics.json, plots, the error analysis and, with `blend_with`, the
    blend (run_pipeline's last stage)."""
    cfg, hardware, train, test, folds, out_dir = run.cfg, run.hardware, run.train, run.test, run.folds, run.out_dir
    sample_submission, bad_rows, started = run.sample_submission, run.bad_rows, run.clock.started
    ensemble, metrics = collect_results(cfg, train, test, folds, out_dir)

    def write_metrics():
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=str))

    submission = write_submission(letters_from_probs(ensemble), test["id"].tolist(),
                                  cfg.submission_path or out_dir / "submission.csv", sample_submission)
    histories = [pd.read_csv(p) for p in sorted(out_dir.glob("fold*/history.csv"))]
    if histories:
        pd.concat(histories).to_csv(out_dir / "history.csv", index=False)
    metrics.update(runtime_s=round(time.time() - started, 1), hardware=dataclasses.asdict(hardware),
                   bad_images_replaced_by_blank=len(bad_rows), bad_image_rows=bad_rows[:50],
                   submission=str(submission))
    write_metrics()  # (the plots and the blend read it)
    make_run_plots(out_dir, train)
    if "gate" in metrics:
        print(describe_gate(metrics["gate"]))
    analyze_run(out_dir, cfg.data_dir)  # analysis/: the confident mistakes, accuracy by type, suspect labels
    if cfg.blend_with:
        metrics["blend"] = blend_into_submission(cfg, out_dir, submission)
        write_metrics()
    print(f"[done] {'zero-shot (epochs=0: the base model, nothing trained) ' if metrics['zero_shot'] else ''}"
          f"CV accuracy {metrics['cv_accuracy']:.4f} (folds {[round(a, 4) for a in metrics['fold_accuracy']]})")
    for name, value in metrics.get("ablation", {}).items():
        print(f"[done] hold-out accuracy, {name}: {value:.4f}")
    print(f"[done] submission: {submission} ({len(test)} rows{', the blend' if cfg.blend_with else ''}) in "
          f"{metrics['runtime_s']} s")
    return metrics


def run_pipeline(cfg, hardware):
    """Everything, end to end. Returns the metrics dict (also saved as metrics.json)."""
    run = start_run(cfg, hardware)
    run_all_folds(run)
    return process_group().from_main(lambda: finish_run(run))  # under DDP: rank 0 writes, every rank gets the metrics
