"""## Resuming a run folder: reuse only what belongs to the current data

A re-run into an existing `output_dir` skips finished folds and resumes an interrupted one. That is only
right while the folds' rows are the ones they were made from: a fold trained on other training rows
does not belong to this data, and saved test probabilities of another `test.csv` (other ids, another
order, other questions or images) would be ensembled with the current rows by position. Each fold
therefore keeps `rows.json`, a signature of its training, validation and test rows (ids in order and a
hash of their text and image bytes). On a re-run:

- test rows changed: the fold's predictions are made again with its saved adapter (no retraining);
- training rows changed: the run stops and says which fold and how to go on (new `output_dir`, or delete
  the fold's folder);
- a zero-shot fold (`epochs=0`, nothing trained) is trained by a later run with `epochs` > 0; a trained
  fold is never overwritten by a zero-shot run;
- prediction settings changed (TTA views, the uncertainty gate: `PREDICTION_SETTINGS`): the fold's
  predictions are made again with its saved adapter, e.g. to try the gate on a finished run;
- the code that builds prompts and images changed (an edited cell in a fork: `code.json` keeps a hash of each such
  function): the run stops before anything is loaded and names the functions; settings are checked likewise
  (config.py, check_resume).
"""

import hashlib
import inspect
import json
import pathlib

import pandas as pd

from ..core.collate import VqaCollator, VqaDataset
from ..core.config import ConfigError
from ..core.data import OPTION_LETTERS, custom_image_transform, light_image_transform, load_image
from ..core.prompts import build_messages, format_user_text, make_prompt_format, render_prompt

SIGNED_COLUMNS = ("id", "question", *OPTION_LETTERS, "answer", "image_hash")
PREDICTION_FILES = ("oof_probs.csv", "oof_probs_view0.csv", "test_probs.csv", "test_probs_view0.csv",
                    "oof_probs_ungated.csv", "test_probs_ungated.csv", "oof_gate.json", "test_gate.json")
# Settings that decide a fold's predicted probabilities, beyond its adapter (a change re-predicts, no retraining).
PREDICTION_SETTINGS = ("tta_option_views", "tta_image_scales", "tta_average", "gate_fraction", "gate_by",
                       "gate_threshold", "gate_option_orders", "gate_image_scale", "gate_base_model")


def _digest(values):
    return hashlib.blake2b(pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes(),
                           digest_size=12).hexdigest()


def rows_signature(frame):
    """What identifies a set of rows: their count, their ids in order, the id set, and everything the model
    sees of them (text and the image file's bytes: `image_hash`, see data.add_image_hashes)."""
    columns = [c for c in SIGNED_COLUMNS if c in frame]
    ids = frame["id"].astype(str)
    return {"rows": len(frame), "ids": _digest(ids), "id_set": _digest(ids.sort_values()),
            "content": _digest(frame[columns].astype(str))}


def describe_change(before, now):
    """In words, how two row signatures differ (None when they do not)."""
    if before == now:
        return None
    if before["rows"] != now["rows"]:
        return f"{before['rows']} rows then, {now['rows']} now"
    if before["id_set"] != now["id_set"]:
        return "other ids"
    if before["ids"] != now["ids"]:
        return "the same ids in another order"
    return "the same ids in the same order, but other questions, options, answers or images"


def prediction_settings(cfg):
    """The PREDICTION_SETTINGS of cfg; with the gate off (gate_fraction 0) its other settings do not matter."""
    names = PREDICTION_SETTINGS if cfg.gate_fraction > 0 else [n for n in PREDICTION_SETTINGS
                                                                if not n.startswith("gate_")] + ["gate_fraction"]
    return {name: getattr(cfg, name) for name in names}


def fold_manifest(train_part, val_part, test, zero_shot, predict=None):
    """What a fold's outputs belong to: its rows, zero-shot or not, and (`predict`) the prediction settings."""
    return {"train": rows_signature(train_part), "val": rows_signature(val_part), "test": rows_signature(test),
            "zero_shot": bool(zero_shot), "predict": predict}


def _remove(fold_dir, names):
    for name in names:
        (fold_dir / name).unlink(missing_ok=True)


def prepare_fold(fold_dir, fold, manifest, test_ids):
    """Decide what a (re-)run of this fold may reuse; returns True when its predictions are complete and
    current (skip the fold). Removes what is stale, stops (ConfigError) when the training is, and writes
    the current manifest."""
    fold_dir = pathlib.Path(fold_dir)
    path = fold_dir / "rows.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    trained = any((fold_dir / name).exists() for name in ("DONE.json", "checkpoint.pt", "best_adapter.pt"))
    if saved is None and (fold_dir / "test_probs.csv").exists():
        # A fold from before rows.json existed: only the ids can be checked.
        saved_ids = pd.read_csv(fold_dir / "test_probs.csv", usecols=["id"])["id"].astype(str).tolist()
        if saved_ids != [str(i) for i in test_ids]:
            print(f"[fold {fold}] its saved test predictions are for other test ids or another order: predicting again")
            _remove(fold_dir, PREDICTION_FILES)
        else:
            print(f"[fold {fold}] predictions from an earlier version (same test ids, contents not recorded), skipping")
            return True
    if saved is not None:
        if saved.get("zero_shot") and not manifest["zero_shot"]:
            print(f"[fold {fold}] was a zero-shot fold (epochs=0): training it now")
            _remove(fold_dir, PREDICTION_FILES + ("DONE.json", "checkpoint.pt", "best_adapter.pt"))
            trained = False
        elif manifest["zero_shot"] and not saved.get("zero_shot") and trained:
            raise ConfigError(f"{fold_dir}: fold {fold} is trained, and epochs=0 asks for the untrained base model. "
                              f"Fix: use a new output_dir for the zero-shot run (this folder's folds stay as they are)")
        for part in ("train", "val"):
            change = describe_change(saved[part], manifest[part])
            if change and trained:
                raise ConfigError(
                    f"{fold_dir}: fold {fold} was trained on other rows of train.csv than now ({part} rows: {change}). "
                    f"Its adapter and predictions do not belong to this data. Fix: use a new output_dir, or delete "
                    f"{fold_dir} to train this fold again")
        change = describe_change(saved["test"], manifest["test"])
        if change and (fold_dir / "test_probs.csv").exists():
            print(f"[fold {fold}] test.csv changed since this fold predicted it ({change}): predicting it again "
                  "with the fold's saved adapter")
            _remove(fold_dir, PREDICTION_FILES)
        before, now = saved.get("predict"), manifest.get("predict")
        if before is not None and now is not None and before != now and (fold_dir / "test_probs.csv").exists():
            # (The gate's other settings are recorded only while it is on: gate_fraction says it.)
            listed = ", ".join(f"{k}: {before[k]!r} then, {now[k]!r} now" for k in PREDICTION_SETTINGS
                               if k in before and k in now and before[k] != now[k])
            print(f"[fold {fold}] prediction settings changed ({listed}): predicting again with the fold's saved "
                  "adapter (no training)")
            _remove(fold_dir, PREDICTION_FILES)
    fold_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return (fold_dir / "test_probs.csv").exists()


# The code that decides what a fold's model sees, by name: looked up when the run starts, so that in the notebook the
# cell as it is now is what gets signed.
PROMPT_AND_IMAGE_CODE = ("format_user_text", "build_messages", "make_prompt_format", "render_prompt", "load_image",
                         "VqaDataset", "VqaCollator", "custom_image_transform", "light_image_transform")
CODE_FILE = "code.json"


def _source(obj):
    """The source text of a function, or of a class's functions (a class defined in a notebook cell has no file
    for inspect to read, its methods do); the compiled code where no source can be found."""
    if inspect.isclass(obj):
        return "\n".join(_source(f) for _, f in sorted(vars(obj).items()) if inspect.isfunction(f))
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return repr((obj.__code__.co_code, obj.__code__.co_consts))


def code_signature():
    """{name: hash of its source} of PROMPT_AND_IMAGE_CODE."""
    return {name: hashlib.blake2b(_source(globals()[name]).encode("utf-8"), digest_size=8).hexdigest()
            for name in PROMPT_AND_IMAGE_CODE}


def check_code(out_dir):
    """A re-run into a folder with folds must build prompts and images with the same code: an edited prompt or image
    cell would otherwise be ensembled with folds made by the old one, without a word."""
    out_dir = pathlib.Path(out_dir)
    path = out_dir / CODE_FILE
    if not path.exists() or not any(p.is_dir() for p in out_dir.glob("fold*")):
        return
    before, now = json.loads(path.read_text(encoding="utf-8")), code_signature()
    changed = [name for name in PROMPT_AND_IMAGE_CODE if name in before and before[name] != now[name]]
    if changed:
        raise ConfigError(f"{path}: this run folder's folds were made by other prompt or image code ({', '.join(changed)} "
                          "changed since). Resuming would ensemble folds that saw different prompts or images. Fix: a "
                          f"new output_dir (e.g. output_dir={out_dir}_v2), or put the code back")


def save_code_signature(out_dir):
    path = pathlib.Path(out_dir) / CODE_FILE
    path.write_text(json.dumps(code_signature(), indent=1) + "\n", encoding="utf-8")
