"""## Setup: check the packages a run needs; install only what is missing, from an attached wheel folder or the index

Kaggle's image (a Colab base) ships torch, transformers and the scientific stack, but not peft or
bitsandbytes, and a competition notebook often has no internet. This cell runs before anything imports
them: it lists every package the run needs and its supported versions, and installs only what is
missing or too old, from wheel folders attached under `/kaggle/input` (`MAKE_BUNDLE = True` in this
notebook, or `python -m mcvqa bundle`, makes one) when there are any, else from the package index when it
is reachable; otherwise it stops with one message naming what is missing and the ways to fix it. A wheel
folder made by the bundle says in its `mcvqa_bundle.json` which Python and platform its wheels are for:
one made for another kernel stops the cell before pip runs, naming the folder, both Pythons and the
command that rebuilds it. Nothing that is already good is reinstalled, and torch is never touched (a
constraint pins the installed build): Kaggle's and Colab's CUDA builds must stay. Standard library only,
so it runs on a bare image.
"""

import glob
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import socket
import subprocess
import sys
import sysconfig
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
# What a model line needs from transformers for every path the pipeline runs (families/: Qwen3.5 loads from 5.2, its
# shared-prefix option orders are exact from 5.7): attached under /kaggle/input, it raises the run's requirement
# (Kaggle's image has 5.0.0). A test keeps this in step with the families.
MODEL_TYPE_TRANSFORMERS = {"qwen3_5": ">=5.7,<6", "qwen3_5_moe": ">=5.7,<6", "gemma4": ">=5.18,<6"}
BUNDLE_METADATA = "mcvqa_bundle.json"  # written by the bundle beside its wheels: the Python and platform they are for


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


def attached_model_types(root=None):
    """model_type of every config.json under root (the Kaggle inputs; any depth), read with the standard library."""
    root = kaggle_input() if root is None else root
    types = set()
    for path in glob.glob(f"{root}/**/config.json", recursive=True):
        try:
            types.add(json.loads(pathlib.Path(path).read_text(encoding="utf-8")).get("model_type"))
        except (OSError, ValueError, AttributeError):
            continue
    return types


def run_requirements(root=None):
    """RUN_PACKAGES, with transformers raised to what the attached models' families need."""
    required = dict(RUN_PACKAGES)
    for model_type in sorted(attached_model_types(root) & set(MODEL_TYPE_TRANSFORMERS)):
        required["transformers"] = MODEL_TYPE_TRANSFORMERS[model_type]
        print(f"[setup] a {model_type} model is attached: it needs transformers{required['transformers']}")
    return required


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


def index_allowed():
    """Whether pip may use the package index: PIP_NO_INDEX (pip's own switch: a session without internet) unset,
    and the index reachable."""
    return os.environ.get("PIP_NO_INDEX", "").lower() not in ("1", "true", "yes") and index_reachable()


def kernel_python():
    """This kernel's Python as major.minor: what a wheel folder must have been made for."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def kernel_platforms():
    """The wheel platform tags this kernel installs, newest first (on Linux: manylinux up to its glibc)."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux"):
        return [re.sub(r"[-.]", "_", sysconfig.get_platform())]
    libc, version = platform.libc_ver()
    tags = []
    if libc == "glibc" and version:
        major, minor = (int(part) for part in version.split(".")[:2])
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}  # the old names of those glibc versions
        for n in range(minor, 4, -1):
            tags += [f"manylinux_{major}_{n}_{machine}"] + ([f"{legacy[n]}_{machine}"] if n in legacy else [])
    return tags + [f"linux_{machine}"]


def describe_platforms(tags):
    """A person's name for wheel platform tags: "Linux x86_64 (manylinux, glibc 2.17-2.39)", else the tags."""
    arches = {re.sub(r"^(many)?linux(1|2010|2014|_\d+_\d+)?_", "", tag) for tag in tags}
    if len(arches) != 1 or not all("linux" in tag for tag in tags):
        return ", ".join(tags)
    glibc = sorted(int(m.group(1)) for tag in tags if (m := re.match(r"manylinux_2_(\d+)_", tag)))
    return f"Linux {arches.pop()}" + (f" (manylinux, glibc 2.{glibc[0]}-2.{glibc[-1]})" if glibc else "")


def describe_kernel():
    libc, version = platform.libc_ver()
    where = f"Linux {platform.machine().lower()}" if sys.platform.startswith("linux") else sysconfig.get_platform()
    return f"Python {kernel_python()} on {where}" + (f" (glibc {version})" if libc == "glibc" and version else "")


def bundle_target(folder):
    """What a wheel folder was made for (its mcvqa_bundle.json), or None for a folder made by hand."""
    path = pathlib.Path(folder, BUNDLE_METADATA)
    if not path.is_file():
        return None
    try:
        target = json.loads(path.read_text(encoding="utf-8"))
        return {"python": str(target["python"]), "platforms": list(target["platforms"]),
                "packages": dict(target.get("packages", {}))}
    except (ValueError, KeyError, TypeError) as error:
        raise SetupError(f"{path} is not a bundle's metadata ({error}). Fix: make the wheel folder again "
                         f"({_rebuild_how()}) and attach it instead") from error


def fits_kernel(target):
    """Whether this kernel can install wheels made for `target`: the same Python, a platform tag in common."""
    return target["python"] == kernel_python() and bool(set(target["platforms"]) & set(kernel_platforms()))


def _describe_target(target):
    return f"Python {target['python']} on {describe_platforms(target['platforms'])}"


def _rebuild_how():
    return ("in this notebook: MAKE_BUNDLE = True in the parameters cell, the internet on (Settings -> Internet), "
            "Run All; or with the package, on any machine with internet: "
            f"`python -m mcvqa bundle --out kaggle_bundle --python-version {kernel_python()}`")


def usable_wheel_folders(folders):
    """The folders pip may use. A bundle made for another Python or platform is left out when a bundle made for
    this kernel is attached too; otherwise the cell stops here, before pip, saying what to rebuild. Folders
    made by hand (no metadata) are tried as they are."""
    targets = {folder: bundle_target(folder) for folder in folders}
    wrong = [folder for folder, target in targets.items() if target and not fits_kernel(target)]
    if not wrong:
        return folders
    if any(target and fits_kernel(target) for target in targets.values()):
        for folder in wrong:
            print(f"[setup] leaving out {folder}: made for {_describe_target(targets[folder])}, "
                  f"this kernel is {describe_kernel()}")
        return [folder for folder in folders if folder not in wrong]
    made_for = "; ".join(f"{folder} was made for {_describe_target(targets[folder])}, says its {BUNDLE_METADATA}"
                         for folder in wrong)
    raise SetupError(f"the wheel folder {made_for}, but this kernel is {describe_kernel()}: pip would find none of "
                     f"its wheels. Fix: make the wheels for this kernel ({_rebuild_how()}), attach that dataset "
                     "instead (Add Input -> Datasets) and run this cell again")


def _made_for(folder):
    target = bundle_target(folder)
    return f"made for {_describe_target(target)}" if target else f"made by hand: no {BUNDLE_METADATA}"


def _no_wheel_message(stderr, folders):
    """pip's "Could not find a version that satisfies the requirement" from wheel folders, said for a person."""
    match = re.search(r"satisfies the requirement (\S+)", stderr)
    wanted = match.group(1) if match else "a requirement"
    made_for = ", ".join(f"{folder} ({_made_for(folder)})" for folder in folders)
    return (f"no wheel of {wanted} that this kernel ({describe_kernel()}) can install in the wheel folder(s) "
            f"{made_for}. Fix: make the wheels for this kernel ({_rebuild_how()}), attach that dataset instead "
            "(Add Input -> Datasets) and run this cell again")


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
    if done.returncode and folders and re.search(r"Could not find a version|No matching distribution", done.stderr):
        raise SetupError(_no_wheel_message(done.stderr, folders))
    if done.returncode:
        raise SetupError(f"pip could not install {', '.join(requirements)}:\n{done.stderr.strip()[-1500:]}")


def ensure_packages(wheels="auto", online="auto", required=None):
    """Install what the run needs and lacks; print what was there. wheels: folder(s) of .whl files, "auto"
    (any under /kaggle/input) or None; online: whether the package index may be used ("auto": if reachable).
    required: {package: spec}; by default RUN_PACKAGES raised for the models attached (run_requirements)."""
    required = run_requirements() if required is None else required
    missing_platform = [name for name in PLATFORM_PACKAGES if installed_version(name) is None]
    if missing_platform:
        raise SetupError(f"{', '.join(missing_platform)} not installed. Fix: pip install torch torchvision (on Kaggle "
                         "and Colab they come with the image: choose a GPU runtime)")
    problems = package_problems(required)
    if not problems:
        print("[setup] every package is there: " + ", ".join(f"{n} {installed_version(n)}" for n in required))
        return []
    folders = wheel_folders() if wheels == "auto" else [wheels] if isinstance(wheels, (str, pathlib.Path)) else wheels or []
    folders = usable_wheel_folders([str(f) for f in folders])  # before pip: a bundle for another Python stops here
    if online == "auto":
        online = index_allowed()
    if not folders and not online:
        raise SetupError(
            f"missing: {_describe(problems)}; no wheel folder under {kaggle_input()} and no internet. Fix, either: "
            f"(1) make the wheel dataset ({_rebuild_how()}), attach it (Add Input -> Datasets) and run this cell "
            "again; or (2) turn the notebook's internet on (Settings -> Internet) and run this cell again")
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
