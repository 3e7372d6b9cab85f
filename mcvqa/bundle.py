"""Offline bundle: the wheels a Kaggle notebook without internet needs, as a folder ready to upload as a dataset.

    python -m mcvqa bundle --out kaggle_bundle [--python-version 3.12] [--packages peft,bitsandbytes]

pip resolves the packages for Kaggle's Python and platform (manylinux x86_64), everything they need
included, then downloads those wheels except torch and its CUDA libraries (Kaggle ships them; the setup
cell never replaces them). The folder gets a `dataset-metadata.json` for `kaggle datasets create`. Attach
the dataset to the notebook: its setup cell finds any folder of wheels under /kaggle/input and installs
from it what is missing. This is a build tool run on a machine with internet; it is not in the notebook.
"""

import json
import pathlib
import subprocess
import sys
import tempfile

from .core.packages import RUN_PACKAGES, SetupError

# What Kaggle's image lacks (it ships transformers and the scientific stack): the default bundle.
KAGGLE_LACKS = ("peft", "bitsandbytes", "accelerate", "transformers", "cloudpickle")
# Never bundled: the platform's torch and what only its CUDA build needs.
PLATFORM_PREFIXES = ("torch", "torchvision", "torchaudio", "triton", "nvidia-", "cuda-")
MANYLINUX = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)] + ["manylinux2014_x86_64"]


def _target_args(python_version):
    platforms = [arg for tag in MANYLINUX for arg in ("--platform", tag)]
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version, *platforms]


def resolve(requirements, python_version):
    """[(name, version)] pip would install into an empty Kaggle-like environment for these requirements."""
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--disable-pip-version-check", "--report", str(report), "--target", str(pathlib.Path(tmp) / "t"),
                   *_target_args(python_version), *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SetupError(f"pip could not resolve {' '.join(requirements)} for Python {python_version}:\n"
                             f"{done.stderr.strip()[-1500:]}")
        return [(item["metadata"]["name"], item["metadata"]["version"]) for item in json.loads(report.read_text())["install"]]


def make_bundle(out, python_version="3.12", packages=(), title="mcvqa wheels"):
    """Download the wheels into `out` and write its dataset metadata; returns the wheel file names."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(packages) or list(KAGGLE_LACKS)
    unknown = [n for n in names if n not in RUN_PACKAGES]
    if unknown:
        raise SetupError(f"bundle: {', '.join(unknown)} not among the run's packages ({', '.join(RUN_PACKAGES)})")
    resolved = resolve([f"{n}{RUN_PACKAGES[n]}" for n in names], python_version)
    wanted = [f"{name}=={version}" for name, version in resolved if not name.lower().startswith(PLATFORM_PREFIXES)]
    print(f"[bundle] {len(wanted)} wheels for Python {python_version} (torch and its CUDA libraries left out): "
          + ", ".join(wanted))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(out), *_target_args(python_version), *wanted]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SetupError(f"pip download failed:\n{done.stderr.strip()[-1500:]}")
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    (out / "dataset-metadata.json").write_text(json.dumps(
        {"title": title, "id": f"YOUR_KAGGLE_USERNAME/{slug}", "licenses": [{"name": "other"}]}, indent=2) + "\n")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    size = sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20
    print(f"[bundle] {len(wheels)} wheels, {size:.0f} MiB in {out}. Upload: put your Kaggle user name into "
          f"{out / 'dataset-metadata.json'}, then `kaggle datasets create -p {out}`; in the notebook, Add Input -> "
          "Datasets -> this one. The setup cell installs from it what is missing.")
    return wheels
