"""## Finding the data and the model: `auto` looks under /kaggle/input; Colab's Drive must be mounted

On Kaggle every input is a read-only folder under `/kaggle/input`, the competition's and the model's
alike, and Kaggle Models nest a model several levels deep (`<model>/transformers/<variant>/<version>/`).
`data_dir=auto` takes the one folder holding `train.csv` and `test.csv`; `model_name_or_path=auto` the
one folder whose `config.json` is a model of a family the pipeline loads (families/: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Qwen3.5, Gemma 4) with weights beside it, and checks that the installed transformers has that family;
a model setting that names a folder without `config.json` (a Kaggle Models parent) is searched the same way.
With none or several, the message lists what was found and the line that chooses. A hub id (no local
folder) is tried once up front, so a session without internet says so instead of failing deep inside
the model loading. On Colab, the profiles keep data and runs on Google Drive: a Drive that is not mounted
stops the run before anything is written.
"""

import dataclasses
import glob
import json
import os
import pathlib

from packaging.version import Version

from ..families.registry import FAMILIES, MODEL_TYPES, family_of
from ..machinery.compat import transformers_version
from ..machinery.errors import UserError
from ..machinery.packages import SetupError, kaggle_input

DRIVE_ROOT = "/content/drive"


class InputNotFoundError(UserError, FileNotFoundError):
    """A data or model folder that is not where the settings say: names what was looked for and the fix."""


def _choose(setting, found, what, search_root, given="auto"):
    """The one folder found; none or several stop with the candidates and the line that chooses."""
    if len(found) == 1:
        print(f"[inputs] {setting}={given} -> {found[0]}")
        return found[0]
    if not found:
        raise InputNotFoundError(f"{setting}={given}: no {what} under {search_root}. Fix: attach it as an input "
                                 f"(Kaggle: Add Input), or set {setting}=<folder>")
    listed = "\n  ".join(f"{setting}={path}" for path in found)
    raise InputNotFoundError(f"{setting}={given}: {len(found)} candidates ({what}) under {search_root}; choose one "
                             f"with one of these lines in OVERRIDES (or on the command line):\n  {listed}")


def find_data_dir(search_root=None):
    """The one folder under search_root (the Kaggle inputs by default; any depth) holding train.csv and test.csv."""
    search_root = kaggle_input() if search_root is None else search_root
    found = sorted({str(pathlib.Path(p).parent) for p in glob.glob(f"{search_root}/**/train.csv", recursive=True)
                    if (pathlib.Path(p).parent / "test.csv").exists()})
    return _choose("data_dir", found, "folder with train.csv and test.csv", search_root)


def _model_type(config_path):
    try:
        return json.loads(pathlib.Path(config_path).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def _is_model_folder(config_path):
    """A checkpoint of a family the pipeline loads (families/registry.py), with weights beside its config."""
    folder = pathlib.Path(config_path).parent
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    return _model_type(config_path) in MODEL_TYPES and has_weights


def find_model_dir(search_root=None, given="auto"):
    """The one model folder under search_root (the Kaggle inputs; any depth, as Kaggle Models nest them)."""
    search_root = kaggle_input() if search_root is None else search_root
    found = sorted(str(pathlib.Path(p).parent) for p in glob.glob(f"{search_root}/**/config.json", recursive=True)
                   if _is_model_folder(p))
    return _choose("model_name_or_path", found, f"model folder ({', '.join(f.name for f in FAMILIES)}): config.json "
                   f"of model_type {'/'.join(MODEL_TYPES)} with weights beside it", search_root, given)


def check_family_release(model_dir):
    """A model line newer than the installed transformers (Qwen3.5 on Kaggle's 5.0.0) stops here, before its
    config is parsed into an unhelpful "unrecognized model type"."""
    model_type = _model_type(pathlib.Path(model_dir) / "config.json")
    if model_type is None:
        return
    family = family_of(model_type)
    installed = transformers_version()
    if installed < Version(family.transformers_floor):
        raise SetupError(f"model_name_or_path={model_dir} is {family.name} (model_type {model_type}), which needs "
                         f"transformers >= {family.transformers_floor} (>= {family.recommended_transformers} for its fast "
                         f"paths); {installed} is installed. Fix: the setup cell installs a newer one when it sees such a "
                         f"model attached (or pip install -U 'transformers>={family.recommended_transformers},<6'; "
                         "offline: the wheel bundle), then restart the kernel")


def check_hub_model(name):
    """A hub id must be reachable (or in the local cache) before the run starts."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except OSError as error:
        raise InputNotFoundError(
            f"model_name_or_path={name}: not a local folder, and the Hugging Face hub could not give its config "
            f"({type(error).__name__}; no internet on Kaggle, or a typo). Fix: attach the model (Kaggle: Add Input "
            f"-> Models) and set model_name_or_path=auto, or set it to the model's folder") from None


def check_drive(cfg):
    """Colab profiles read and write under /content/drive: stop before writing anything if Drive is not mounted."""
    on_drive = [f"{name}={getattr(cfg, name)}" for name in ("data_dir", "output_dir")
                if str(getattr(cfg, name)).startswith(DRIVE_ROOT + "/")]
    if on_drive and not os.path.isdir(os.path.join(DRIVE_ROOT, "MyDrive")):
        raise InputNotFoundError(
            f"Google Drive is not mounted ({', '.join(on_drive)}). Fix: run `from google.colab import drive; "
            f"drive.mount('{DRIVE_ROOT}')` in a cell first and put the competition files (train.csv, test.csv, "
            f"sample_submission.csv, images) in MyDrive/mcvqa/data; or set data_dir=<folder> "
            f"output_dir=/content/runs/latest to work without Drive (a disconnect then loses the run)")


def resolve_inputs(cfg, search_root=None):
    """cfg with data_dir and model_name_or_path resolved (auto -> the folder found), checked before any write."""
    check_drive(cfg)
    data_dir = find_data_dir(search_root) if cfg.data_dir == "auto" else cfg.data_dir
    if not cfg.demo and not os.path.isdir(data_dir):
        raise InputNotFoundError(f"data_dir={data_dir}: no such folder. Fix: set data_dir to the folder holding "
                                 "train.csv, test.csv and the images (on Kaggle data_dir=auto finds it)")
    model = cfg.model_name_or_path
    if model == "auto":
        model = find_model_dir(search_root)
    elif model and os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        # A Kaggle Models parent (/kaggle/input/qwen2.5-vl): the model folder sits some levels inside, as for auto.
        model = find_model_dir(model, given=model)
    elif model and not os.path.isdir(model):
        if model.startswith(("/", ".", "~")) or model.count("/") != 1:  # a path, not a hub id ("org/name")
            raise InputNotFoundError(f"model_name_or_path={model}: no such folder. Fix: set it to the model's folder, "
                                     "or model_name_or_path=auto on Kaggle")
        check_hub_model(model)
    if model and os.path.isdir(model):
        check_family_release(model)
    if data_dir != cfg.data_dir or model != cfg.model_name_or_path:
        return dataclasses.replace(cfg, data_dir=str(data_dir), model_name_or_path=model)
    return cfg

