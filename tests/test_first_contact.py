"""First contact on Kaggle, rehearsed: only the notebook copied into a working folder, the competition data
and a Qwen-VL model folder (nested as Kaggle Models nest it) under a stand-in for /kaggle/input, no
internet, peft / bitsandbytes / accelerate / cloudpickle missing. The notebook first stops with the one
message naming what is missing and the two fixes; MAKE_BUNDLE without internet says it needs it; the
default bundle (made for Kaggle's Python 3.12, not this kernel's) stops before pip with the command that
rebuilds it; with a bundle for this kernel (`python -m mcvqa bundle --python-version ...`) attached too it
installs them from that folder alone and runs top to bottom, no path typed by hand."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import nbformat
import pandas as pd
import papermill
import transformers
import pytest

from conftest import TINY_TEXTS
from mcvqa.demo.demo_data import generate_demo_dataset
from mcvqa.demo.demo_model import build_tiny_qwen_vl
from mcvqa.bundle import KAGGLE_PYTHON, MANYLINUX, write_bundle_metadata
from mcvqa.machinery.packages import RUN_PACKAGES

ROOT = pathlib.Path(__file__).resolve().parents[1]
KAGGLE_LACKS = ("peft", "bitsandbytes", "accelerate", "cloudpickle")


def test_requirements_txt_lists_the_run_packages_at_the_same_versions():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {}
    for line in filter(None, lines):
        name = line.split(">")[0].split("<")[0].split("=")[0].strip()
        listed[name] = line[len(name):].replace(" ", "")
    for name, spec in RUN_PACKAGES.items():
        assert listed.get(name) == spec, (name, listed.get(name), spec)


def _kaggle_like_env(tmp):
    """A virtualenv that sees the test environment's packages except those Kaggle's image lacks."""
    base = tmp / "kaggle_base"
    base.mkdir()
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.startswith(KAGGLE_LACKS) or name.startswith(("pip", "_distutils_hack", "distutils-precedence")):
            continue
        (base / entry.name).symlink_to(entry)
    env = tmp / "kaggle_env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    own_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    pathlib.Path(own_site, "kaggle_base.pth").write_text(str(base) + "\n")
    return python


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kaggle")
    inputs = tmp / "input"
    generate_demo_dataset(inputs / "vqa-competition", n_train=90, n_test=30, image_size=64)
    build_tiny_qwen_vl(inputs / "qwen2.5-vl" / "transformers" / "tiny" / "1", TINY_TEXTS, family="qwen2_5_vl",
                       max_pixels=56 * 56)
    python = _kaggle_like_env(tmp)
    kernels = tmp / "jupyter" / "kernels" / "kaggle"
    kernels.mkdir(parents=True)
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "KAGGLE_INPUT_DIR": str(inputs), "PIP_NO_INDEX": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (kernels / "kernel.json").write_text(json.dumps({"argv": [str(python), "-m", "ipykernel_launcher", "-f",
                                                              "{connection_file}"],
                                                     "display_name": "kaggle", "language": "python", "env": env}))
    working = tmp / "working"
    working.mkdir()
    (working / "notebook.ipynb").write_bytes((ROOT / "Kaggle_AllInOne_Pro.ipynb").read_bytes())
    return {"tmp": tmp, "inputs": inputs, "python": python, "working": working, "env": env}


# Only speed, no paths to data or model (auto finds them); outputs go to the stand-in working folder.
def _overrides(working):
    return "\n".join([f"output_dir={working / 'run'}", f"submission_path={working / 'submission.csv'}", "epochs=1",
                      "folds=0", "num_workers=0", "min_pixels=3136", "max_pixels=3136", "tta_option_views=2",
                      "micro_batch_size=16", "evals_per_epoch=1", "max_question_tokens=64", "max_option_tokens=16"])


def _run_notebook(kaggle, name, **parameters):
    os.environ["JUPYTER_PATH"] = str(kaggle["tmp"] / "jupyter")
    out = kaggle["working"] / name
    parameters = {"PROFILE": "auto", "OVERRIDES": _overrides(kaggle["working"])} | parameters
    try:
        papermill.execute_notebook(str(kaggle["working"] / "notebook.ipynb"), str(out), cwd=str(kaggle["working"]),
                                   kernel_name="kaggle", parameters=parameters, progress_bar=False)
        error = None
    except papermill.PapermillExecutionError as raised:
        error = raised
    return nbformat.read(out, as_version=4), error


def _cli(kaggle, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")} | kaggle["env"]
    return subprocess.run([str(kaggle["python"]), "-m", "mcvqa", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_kaggle_first_contact_without_then_with_the_wheel_bundle(kaggle):
    # The CLI in the same environment names what is missing before importing it.
    done = _cli(kaggle, "run", "--profile", "kaggle_t4x2")
    assert done.returncode == 2 and "missing or unsupported packages: " in done.stderr
    assert "peft" in done.stderr and "Fix: python -m mcvqa setup" in done.stderr and "Traceback" not in done.stderr

    notebook, error = _run_notebook(kaggle, "first_try.ipynb")
    assert error is not None and error.ename == "SetupError"
    message = str(error.evalue)
    for name in KAGGLE_LACKS:
        assert name in message
    assert "python -m mcvqa bundle" in message and "Internet" in message  # the two fixes
    assert "MAKE_BUNDLE = True" in message  # the bundle made by the notebook alone

    # MAKE_BUNDLE in this session without internet: it says so before writing anything.
    notebook, error = _run_notebook(kaggle, "make_bundle_offline.ipynb", MAKE_BUNDLE=True)
    assert error is not None and error.ename == "SetupError"
    assert "MAKE_BUNDLE = True downloads the wheels, but this session has no internet" in str(error.evalue)

    # The default bundle (no --python-version: Kaggle's 3.12) on a kernel of another Python: stopped before pip.
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    made_for = KAGGLE_PYTHON if KAGGLE_PYTHON != here else "3.10"  # this environment: 3.11 against the default 3.12
    default = kaggle["inputs"] / "mcvqa-wheels-default"
    default.mkdir()
    tag = f"cp{made_for.replace('.', '')}"
    (default / f"regex-2024.11.6-{tag}-{tag}-manylinux_2_17_x86_64.whl").write_bytes(b"")  # never opened
    write_bundle_metadata(default, made_for, MANYLINUX, {"regex": "2024.11.6"})
    notebook, error = _run_notebook(kaggle, "default_bundle.ipynb")
    assert error is not None and error.ename == "SetupError"
    message = str(error.evalue)
    assert f"the wheel folder {default} was made for Python {made_for} on Linux x86_64" in message
    assert f"this kernel is Python {here} on Linux" in message
    assert f"`python -m mcvqa bundle --out kaggle_bundle --python-version {here}`" in message
    assert "pip install" not in "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))

    # Made where there is internet (here: this test's own environment and package index), then attached.
    bundle = subprocess.run([sys.executable, "-m", "mcvqa", "bundle", "--out", str(kaggle["inputs"] / "mcvqa-wheels"),
                             "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert bundle.returncode == 0, bundle.stderr[-2000:]
    assert (kaggle["inputs"] / "mcvqa-wheels" / "dataset-metadata.json").exists()

    notebook, error = _run_notebook(kaggle, "second_try.ipynb")
    assert error is None, error
    outputs = "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    assert "installing " in outputs and "from the wheel folder(s)" in outputs
    assert f"leaving out {default}: made for Python {made_for}" in outputs  # the bundle for this kernel is used
    assert "profile=kaggle_t4x2 (KAGGLE_KERNEL_RUN_TYPE is set)" in outputs
    assert f"data_dir=auto -> {kaggle['inputs'] / 'vqa-competition'}" in outputs
    assert f"model_name_or_path=auto -> {kaggle['inputs'] / 'qwen2.5-vl' / 'transformers' / 'tiny' / '1'}" in outputs
    submission = pd.read_csv(kaggle["working"] / "submission.csv")
    assert submission["id"].tolist() == pd.read_csv(kaggle["inputs"] / "vqa-competition" / "test.csv")["id"].tolist()
    assert set(submission["answer"]) <= set("abcd")
    # Installed from the bundle, and nothing it already had was replaced (torch above all).
    check = _cli(kaggle, "setup", "--offline")
    assert check.returncode == 0 and "every package is there" in check.stdout
    wheels = kaggle["inputs"] / "mcvqa-wheels"
    assert not list(wheels.glob("torch-*")) and not list(wheels.glob("nvidia_*"))
    where = subprocess.run([str(kaggle["python"]), "-c", "import torch, peft; print(torch.__file__); print(peft.__file__)"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert "kaggle_base" in where[0] and "kaggle_env" in where[1]  # torch is the image's, peft came from the bundle

    # A Qwen3.5 model attached instead (Kaggle Models nesting): auto finds it, nothing typed, top to bottom.
    shutil.move(kaggle["inputs"] / "qwen2.5-vl", kaggle["tmp"] / "detached-qwen2.5-vl")
    qwen35 = build_tiny_qwen_vl(kaggle["inputs"] / "qwen3.5" / "transformers" / "tiny" / "1", TINY_TEXTS,
                                family="qwen3_5", max_pixels=56 * 56)
    _run_attached(kaggle, "qwen3_5", qwen35, "transformers>=5.7,<6")

    # A Gemma 4 model (the 31B's template: the answer after an empty thought channel) attached instead: the same.
    if not hasattr(transformers, "Gemma4ForConditionalGeneration"):
        return
    shutil.move(kaggle["inputs"] / "qwen3.5", kaggle["tmp"] / "detached-qwen3.5")
    gemma = build_tiny_qwen_vl(kaggle["inputs"] / "gemma-4" / "transformers" / "tiny" / "1", TINY_TEXTS,
                               family="gemma4", variant="31b")
    _run_attached(kaggle, "gemma4", gemma, "transformers>=5.18,<6", "max_soft_tokens=70")


def _run_attached(kaggle, model_type, model_dir, requirement, *overrides):
    """The notebook top to bottom with model_name_or_path=auto and `model_dir` the one model attached: found, its
    transformers requirement said, the fast paths checked, a submission of the test ids written."""
    (kaggle["working"] / "submission.csv").unlink()
    notebook, error = _run_notebook(kaggle, f"{model_type}.ipynb", OVERRIDES="\n".join([_overrides(kaggle["working"]).replace(
        f"output_dir={kaggle['working'] / 'run'}", f"output_dir={kaggle['working'] / ('run_' + model_type)}"), *overrides]))
    assert error is None, error
    outputs = "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    assert f"a {model_type} model is attached: it needs {requirement}" in outputs
    assert f"model_name_or_path=auto -> {model_dir}" in outputs
    assert "[check] the cached-feature forward = the stock forward" in outputs and "shared-prefix option-order" in outputs
    submission = pd.read_csv(kaggle["working"] / "submission.csv")
    assert submission["id"].tolist() == pd.read_csv(kaggle["inputs"] / "vqa-competition" / "test.csv")["id"].tolist()
