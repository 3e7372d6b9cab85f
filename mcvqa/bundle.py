"""## Offline bundle: the wheels a notebook without internet needs, as a folder ready to become a dataset

A competition notebook often runs without internet, and Kaggle's image lacks peft and bitsandbytes: the
bundle is the wheel dataset the setup cell installs them from. It is made once, in a session with internet:

- in this notebook: `MAKE_BUNDLE = True` in the parameters cell, the internet on, *Run All*. The setup cell
  writes the wheels for this kernel's Python and platform to `/kaggle/working/mcvqa_wheels` (outside
  Kaggle: `./mcvqa_wheels`), prints how to keep them as a dataset, and stops the run there: making the
  bundle is that session's only job;
- with the package, on any machine: `python -m mcvqa bundle --out kaggle_bundle [--python-version 3.12]`
  (Kaggle's Python 3.12 and manylinux x86_64 unless told otherwise).

pip resolves the packages for that Python and platform, everything they need included, then downloads
those wheels except torch and its CUDA libraries (Kaggle ships them; the setup cell never replaces them).
The folder gets a `dataset-metadata.json` for `kaggle datasets create`, and an `mcvqa_bundle.json` naming
the Python, the platform tags and the packages it was made for: the setup cell compares it with the kernel
and, when they differ, stops before pip with the command that rebuilds it. Standard library only: it runs
before anything is installed.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from .machinery.errors import UserError
from .machinery.packages import (BUNDLE_METADATA, RUN_PACKAGES, SetupError, describe_kernel, describe_platforms,
                            index_allowed, kernel_platforms, kernel_python, package_problems)

KAGGLE_PYTHON = "3.12"  # Kaggle's image: what `python -m mcvqa bundle` makes wheels for unless told otherwise
# What Kaggle's image lacks (it ships transformers and the scientific stack): the default bundle.
KAGGLE_LACKS = ("peft", "bitsandbytes", "accelerate", "transformers", "cloudpickle")
# Never bundled: the platform's torch and what only its CUDA build needs.
PLATFORM_PREFIXES = ("torch", "torchvision", "torchaudio", "triton", "nvidia-", "cuda-")
MANYLINUX = tuple(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)) + ("manylinux2014_x86_64",)
BUNDLE_FOLDER = "mcvqa_wheels"  # MAKE_BUNDLE's folder, in /kaggle/working: a saved version keeps it as output


class BundleMade(UserError):
    """Not a failure: MAKE_BUNDLE made the wheel folder and the run stops there on purpose (it must not train)."""


def _target_args(python_version, platforms):
    platform_args = [arg for tag in platforms for arg in ("--platform", tag)]
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version, *platform_args]


def resolve_wheels(requirements, python_version, platforms=MANYLINUX):
    """[(name, version)] pip would install into an empty environment of that Python and platform."""
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--disable-pip-version-check", "--report", str(report), "--target", str(pathlib.Path(tmp) / "t"),
                   *_target_args(python_version, platforms), *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SetupError(f"pip could not resolve {' '.join(requirements)} for Python {python_version}:\n"
                             f"{done.stderr.strip()[-1500:]}")
        return [(item["metadata"]["name"], item["metadata"]["version"]) for item in json.loads(report.read_text())["install"]]


def write_bundle_metadata(out, python_version, platforms, packages):
    """mcvqa_bundle.json: what the wheels are for, which the setup cell compares with the kernel before pip runs."""
    target = {"python": python_version, "implementation": "cp", "platforms": list(platforms),
              "packages": dict(packages), "made_by": "mcvqa bundle"}
    (pathlib.Path(out) / BUNDLE_METADATA).write_text(json.dumps(target, indent=2) + "\n")


def _upload_steps(out):
    return (f"Upload: put your Kaggle user name into {out / 'dataset-metadata.json'}, then `kaggle datasets create -p "
            f"{out}`; in the notebook, Add Input -> Datasets -> this one. The setup cell installs from it what is missing.")


def make_bundle(out, python_version=KAGGLE_PYTHON, packages=(), title="mcvqa wheels", platforms=MANYLINUX,
                next_steps=_upload_steps):
    """Download the wheels into `out`, write its dataset metadata and bundle metadata and print `next_steps(out)`;
    returns the wheel file names."""
    if not re.fullmatch(r"3\.\d+", str(python_version)):
        raise SetupError(f"bundle: Python version {python_version!r} is not major.minor. Fix: --python-version 3.12 "
                         "(the kernel's: python -c 'import sys; print(sys.version)')")
    names = list(packages) or list(KAGGLE_LACKS)
    unknown = [n for n in names if n not in RUN_PACKAGES]
    if unknown:
        raise SetupError(f"bundle: {', '.join(unknown)} not among the run's packages ({', '.join(RUN_PACKAGES)})")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve_wheels([f"{n}{RUN_PACKAGES[n]}" for n in names], python_version, platforms)
    wanted = [(name, version) for name, version in resolved if not name.lower().startswith(PLATFORM_PREFIXES)]
    print(f"[bundle] {len(wanted)} wheels for Python {python_version} on {describe_platforms(platforms)} (torch and "
          "its CUDA libraries left out): " + ", ".join(f"{name}=={version}" for name, version in wanted))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(out), *_target_args(python_version, platforms),
               *[f"{name}=={version}" for name, version in wanted]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SetupError(f"pip download failed:\n{done.stderr.strip()[-1500:]}")
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    (out / "dataset-metadata.json").write_text(json.dumps(
        {"title": title, "id": f"YOUR_KAGGLE_USERNAME/{slug}", "licenses": [{"name": "other"}]}, indent=2) + "\n")
    write_bundle_metadata(out, python_version, platforms, wanted)
    wheels = sorted(p.name for p in out.glob("*.whl"))
    size = sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20
    print(f"[bundle] {len(wheels)} wheels, {size:.0f} MiB in {out}. {next_steps(out)}")
    return wheels


def bundle_folder():
    """Where MAKE_BUNDLE writes: /kaggle/working/mcvqa_wheels on Kaggle (KAGGLE_WORKING_DIR moves it, to rehearse a
    session elsewhere), else ./mcvqa_wheels."""
    on_kaggle = os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("KAGGLE_URL_BASE")
    working = os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working") if on_kaggle else os.getcwd()
    return pathlib.Path(working) / BUNDLE_FOLDER


def _keep_steps(out):
    return (f"Made for this kernel ({describe_kernel()}). Next:\n"
            "  1. Keep it as a dataset: Save Version (Save & Run All), open that version, Output -> New Dataset;\n"
            f"     or, from a session with your Kaggle API token: put your user name into {out / 'dataset-metadata.json'}"
            f", then `kaggle datasets create -p {out}`\n"
            "  2. In the notebook that runs without internet: Add Input -> Datasets -> that dataset, MAKE_BUNDLE = False, "
            "Run All: the setup cell installs from it what is missing")


def make_kernel_bundle(out=None):
    """MAKE_BUNDLE = True: the wheel folder for this kernel's Python and platform (what this notebook needs when it
    runs offline on the same image), the steps that make it a dataset, then a stop: this session must not train."""
    out = pathlib.Path(out) if out else bundle_folder()
    if not index_allowed():  # before anything is written: without the index there is nothing to download
        raise SetupError("MAKE_BUNDLE = True downloads the wheels, but this session has no internet. Fix: turn the "
                         "notebook's internet on (Settings -> Internet) and run again, or set MAKE_BUNDLE = False")
    lacking = [name for name, _, _ in package_problems() if name not in KAGGLE_LACKS]  # beyond what Kaggle lacks
    make_bundle(out, kernel_python(), [*KAGGLE_LACKS, *lacking], platforms=kernel_platforms(), next_steps=_keep_steps)
    raise BundleMade(f"MAKE_BUNDLE = True: the wheel folder {out} is made (the steps above make it a dataset); the "
                     "run stops here on purpose. For the run itself: MAKE_BUNDLE = False and that dataset attached")
