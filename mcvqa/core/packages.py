"""## Setup: check the packages a run needs; install only what is missing, from an attached wheel folder or the index

Kaggle's image (a Colab base) ships torch, transformers and the scientific stack, but not peft or
bitsandbytes, and a competition notebook often has no internet. This cell runs before anything imports
them: it lists every package the run needs and its supported versions, and installs only what is
missing or too old, from wheel folders attached under `/kaggle/input` (`python -m mcvqa bundle` makes
one) when there are any, else from the package index when it is reachable; otherwise it stops with one
message naming what is missing and the two ways to fix it. Nothing that is already good is reinstalled,
and torch is never touched (a constraint pins the installed build): Kaggle's and Colab's CUDA builds must
stay. Standard library only, so it runs on a bare image.
"""

import glob
import importlib
import importlib.metadata
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

from .errors import UserError

# What a run imports, at the versions the pipeline supports (requirements.txt lists the same: tested).
RUN_PACKAGES = {
    "transformers": ">=5.0,<6",
    "tokenizers": ">=0.22",
    "peft": ">=0.17",
    "bitsandbytes": ">=0.46",
    "accelerate": ">=1.0",
    "scikit-learn": ">=1.4",
    "scipy": ">=1.11",
    "pandas": ">=2.0",
    "pillow": ">=10.0",
    "matplotlib": ">=3.7",
    "tqdm": ">=4.66",
    "cloudpickle": ">=2.0",
}
PLATFORM_PACKAGES = ("torch", "torchvision")  # checked, never installed: the platform's CUDA builds


def kaggle_input():
    """Where Kaggle mounts a notebook's inputs (KAGGLE_INPUT_DIR moves it, to rehearse a Kaggle session elsewhere)."""
    return os.environ.get("KAGGLE_INPUT_DIR", "/kaggle/input")


class SetupError(UserError, RuntimeError):
    """A package missing or at a version the pipeline does not support: names it and how to install it."""


def installed_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfies(version, spec):
    from packaging.specifiers import SpecifierSet  # (packaging comes with pip and with transformers)

    return SpecifierSet(spec).contains(version, prereleases=True)


def package_problems(required=None):
    """[(name, spec, installed version or None)] for every required package that is missing or outside its spec."""
    required = RUN_PACKAGES if required is None else required
    problems = []
    for name, spec in required.items():
        version = installed_version(name)
        if version is None or not _satisfies(version, spec):
            problems.append((name, spec, version))
    return problems


def wheel_folders(root=None):
    """Folders under the Kaggle inputs (any depth) that hold .whl files: attached wheel datasets."""
    root = kaggle_input() if root is None else root
    return sorted({str(pathlib.Path(p).parent) for p in glob.glob(f"{root}/**/*.whl", recursive=True)})


def index_reachable(host="pypi.org", port=443, timeout=3.0):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _describe(problems):
    return ", ".join(f"{name}{spec} ({'missing' if version is None else version + ' installed'})"
                     for name, spec, version in problems)


def _pip_install(requirements, folders):
    """pip install the requirements (from the folders alone when given), torch pinned to what is installed."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        for name in PLATFORM_PACKAGES:
            version = installed_version(name)
            if version:
                constraints.write(f"{name}=={version}\n")
    source = ["--no-index", *[arg for folder in folders for arg in ("--find-links", folder)]] if folders else []
    command = [sys.executable, "-m", "pip", "install", *source, "--quiet", "--disable-pip-version-check",
               "-c", constraints.name, *requirements]
    print("[setup] pip install " + " ".join(command[4:]))
    done = subprocess.run(command, capture_output=True, text=True)
    os.unlink(constraints.name)
    if done.returncode:
        raise SetupError(f"pip could not install {', '.join(requirements)}:\n{done.stderr.strip()[-1500:]}")


def ensure_packages(wheels="auto", online="auto", required=None):
    """Install what the run needs and lacks; print what was there. wheels: folder(s) of .whl files, "auto"
    (any under /kaggle/input) or None; online: whether the package index may be used ("auto": if reachable)."""
    required = RUN_PACKAGES if required is None else required
    missing_platform = [name for name in PLATFORM_PACKAGES if installed_version(name) is None]
    if missing_platform:
        raise SetupError(f"{', '.join(missing_platform)} not installed. Fix: pip install torch torchvision (on Kaggle "
                         "and Colab they come with the image: choose a GPU runtime)")
    problems = package_problems(required)
    if not problems:
        print("[setup] every package is there: " + ", ".join(f"{n} {installed_version(n)}" for n in required))
        return []
    folders = wheel_folders() if wheels == "auto" else [wheels] if isinstance(wheels, (str, pathlib.Path)) else wheels or []
    folders = [str(f) for f in folders]
    if online == "auto":  # PIP_NO_INDEX: pip's own switch for "never use the index" (a session without internet)
        online = os.environ.get("PIP_NO_INDEX", "").lower() not in ("1", "true", "yes") and index_reachable()
    if not folders and not online:
        raise SetupError(
            f"missing: {_describe(problems)}; no wheel folder under {kaggle_input()} and no internet. Fix, either: "
            "(1) attach the wheel dataset made by `python -m mcvqa bundle --out kaggle_bundle` "
            "(Add Input -> Datasets) and run this cell again; or (2) turn the notebook's internet on "
            "(Settings -> Internet) and run this cell again")
    print(f"[setup] installing {_describe(problems)} from "
          + (f"the wheel folder(s) {', '.join(folders)}" if folders else "the package index"))
    _pip_install([f"{name}{spec}" for name, spec, _ in problems], folders)
    importlib.invalidate_caches()
    still = package_problems(required)
    if still:
        raise SetupError(f"still missing after installing: {_describe(still)}. Fix: add their wheels to the folder, "
                         "or turn the internet on")
    stale = [name for name, _, version in problems if version and name in sys.modules]
    if stale:
        raise SetupError(f"{', '.join(stale)} were upgraded while an older version is imported in this session. "
                         "Fix: restart the kernel (Run -> Restart) and run all cells again")
    print("[setup] installed: " + ", ".join(f"{name} {installed_version(name)}" for name, _, _ in problems))
    return [name for name, _, _ in problems]
