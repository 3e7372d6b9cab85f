"""The setup cell and the bundle, with pip stood in for (no internet): a bundle says which Python and platform
it was made for, the setup cell stops before pip when that is not this kernel, pip's own "Could not find a
version" from a wheel folder becomes the same kind of message, and MAKE_BUNDLE makes the bundle for this
kernel in the working folder, then stops."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from mcvqa import bundle
from mcvqa.bundle import (BUNDLE_FOLDER, KAGGLE_LACKS, KAGGLE_PYTHON, MANYLINUX, BundleMade, bundle_folder,
                          make_bundle, make_kernel_bundle, write_bundle_metadata)
from mcvqa.machinery import packages
from mcvqa.machinery.packages import (BUNDLE_METADATA, SetupError, ensure_packages, kernel_platforms, kernel_python,
                                 usable_wheel_folders)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABSENT = {"mcvqa-test-absent-package": ">=1.0"}  # a required package no environment has: setup must act
RESOLVED = [("peft", "0.17.1"), ("regex", "2024.11.6"), ("torch", "2.8.0"), ("nvidia-cublas-cu12", "12.8")]


class FakePip:
    """subprocess.run for pip: the dry run reports RESOLVED, a download writes empty wheels, an install answers
    with `install_error` (stderr; success when None). Every command is kept."""

    def __init__(self, install_error=None):
        self.commands, self.install_error = [], install_error

    def __call__(self, command, **kwargs):
        self.commands.append(list(command))
        args = command[3:]
        if args[0] == "install" and "--dry-run" in args:
            report = pathlib.Path(args[args.index("--report") + 1])
            report.write_text(json.dumps({"install": [{"metadata": {"name": n, "version": v}} for n, v in RESOLVED]}))
        elif args[0] == "download":
            out = pathlib.Path(args[args.index("-d") + 1])
            for pin in (a for a in args if "==" in a):
                name, version = pin.split("==")
                (out / f"{name}-{version}-py3-none-any.whl").write_bytes(b"")
        elif args[0] == "install" and self.install_error:
            return subprocess.CompletedProcess(command, 1, "", self.install_error)
        return subprocess.CompletedProcess(command, 0, "", "")

    def option(self, verb, name):
        """The value of `name` in every `pip <verb>` command."""
        return [c[c.index(name) + 1] for c in self.commands if c[3] == verb and name in c]


@pytest.fixture
def pip(monkeypatch):
    fake = FakePip()
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


def _other_python(monkeypatch):
    """The default bundle's Python is another kernel's (this environment: 3.11 against 3.12); made so on 3.12."""
    if kernel_python() == KAGGLE_PYTHON:
        monkeypatch.setattr(packages, "kernel_python", lambda: "3.10")
    return packages.kernel_python()


def test_the_bundle_records_the_python_platform_and_packages_it_was_made_for(tmp_path, pip):
    wheels = make_bundle(tmp_path / "kaggle_bundle")  # the default users get: Kaggle's Python
    target = json.loads((tmp_path / "kaggle_bundle" / BUNDLE_METADATA).read_text())
    assert target["python"] == KAGGLE_PYTHON == "3.12"
    assert target["platforms"] == list(MANYLINUX)
    assert target["packages"] == {"peft": "0.17.1", "regex": "2024.11.6"}  # torch and CUDA left out
    assert wheels == ["peft-0.17.1-py3-none-any.whl", "regex-2024.11.6-py3-none-any.whl"]
    assert pip.option("install", "--python-version") == pip.option("download", "--python-version") == ["3.12"]
    assert (tmp_path / "kaggle_bundle" / "dataset-metadata.json").is_file()


def test_the_cli_default_is_the_bundles_default():
    from mcvqa.cli import _parser

    assert _parser().parse_args(["bundle"]).python_version == KAGGLE_PYTHON


def test_a_bundle_version_that_is_not_major_minor_stops_before_pip(tmp_path, pip):
    with pytest.raises(SetupError, match=r"'3\.12\.1' is not major\.minor\. Fix: --python-version 3\.12"):
        make_bundle(tmp_path / "b", "3.12.1")
    assert pip.commands == []


def test_the_default_bundle_on_another_python_stops_before_pip_with_the_rebuild_command(tmp_path, pip, monkeypatch):
    folder = tmp_path / "input" / "mcvqa-wheels"
    make_bundle(folder)  # what `python -m mcvqa bundle --out ...` makes, no --python-version
    here = _other_python(monkeypatch)
    pip.commands.clear()
    with pytest.raises(SetupError) as raised:
        ensure_packages(wheels=str(folder), online=False, required=ABSENT)
    message = str(raised.value)
    assert f"the wheel folder {folder} was made for Python 3.12 on Linux x86_64" in message
    assert f"this kernel is Python {here} on " in message
    assert f"`python -m mcvqa bundle --out kaggle_bundle --python-version {here}`" in message
    assert "MAKE_BUNDLE = True" in message
    assert pip.commands == []  # stopped before pip


def test_a_bundle_for_another_platform_stops_too(tmp_path, pip):
    folder = tmp_path / "arm"
    folder.mkdir()
    (folder / "regex-1-cp311-cp311-manylinux_2_17_aarch64.whl").write_bytes(b"")
    write_bundle_metadata(folder, kernel_python(), ["manylinux_2_17_aarch64"], {"regex": "1"})
    with pytest.raises(SetupError, match=r"made for Python \d\.\d+ on Linux aarch64 \(manylinux, glibc 2\.17-2\.17\)"):
        ensure_packages(wheels=str(folder), online=False, required=ABSENT)
    assert pip.commands == []


def test_a_bundle_for_this_kernel_wins_over_one_for_another(tmp_path, capsys):
    mine, other = tmp_path / "mine", tmp_path / "old"
    for folder in (mine, other):
        folder.mkdir()
    write_bundle_metadata(mine, kernel_python(), kernel_platforms(), {})
    write_bundle_metadata(other, "3.9", MANYLINUX, {})
    assert usable_wheel_folders([str(other), str(mine)]) == [str(mine)]
    assert f"leaving out {other}: made for Python 3.9" in capsys.readouterr().out
    # A folder made by hand (no metadata) is tried as it is.
    hand = tmp_path / "hand"
    hand.mkdir()
    assert usable_wheel_folders([str(hand), str(mine)]) == [str(hand), str(mine)]


def test_broken_bundle_metadata_names_the_file(tmp_path):
    (tmp_path / BUNDLE_METADATA).write_text("{not json")
    with pytest.raises(SetupError, match=f"{tmp_path / BUNDLE_METADATA} is not a bundle's metadata"):
        usable_wheel_folders([str(tmp_path)])


def test_pips_could_not_find_a_version_from_a_wheel_folder_is_said_for_a_person(tmp_path, monkeypatch):
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "peft-0.17.1-py3-none-any.whl").write_bytes(b"")
    pip = FakePip(install_error="ERROR: Could not find a version that satisfies the requirement regex>=2024.1 "
                                "(from versions: none)\nERROR: No matching distribution found for regex>=2024.1")
    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(SetupError) as raised:
        ensure_packages(wheels=str(hand), online=False, required=ABSENT)
    message = str(raised.value)
    assert pip.option("install", "--find-links") == [str(hand)]  # a hand-made folder is still tried
    assert "no wheel of regex>=2024.1 that this kernel (Python " in message
    assert f"{hand} (made by hand: no {BUNDLE_METADATA})" in message
    assert f"--python-version {kernel_python()}`" in message and "MAKE_BUNDLE = True" in message
    assert "from versions" not in message


def test_missing_packages_without_wheels_or_internet_names_both_ways_to_make_the_bundle(tmp_path, monkeypatch, pip):
    monkeypatch.setenv("KAGGLE_INPUT_DIR", str(tmp_path))
    with pytest.raises(SetupError) as raised:
        ensure_packages(online=False, required=ABSENT)
    message = str(raised.value)
    assert "mcvqa-test-absent-package>=1.0 (missing)" in message
    assert "MAKE_BUNDLE = True in the parameters cell, the internet on" in message
    assert f"`python -m mcvqa bundle --out kaggle_bundle --python-version {kernel_python()}`" in message
    assert "Settings -> Internet" in message
    assert pip.commands == []


def test_make_bundle_in_the_notebook_is_for_this_kernel_in_the_working_folder_then_stops(tmp_path, monkeypatch,
                                                                                        pip, capsys):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("KAGGLE_WORKING_DIR", str(tmp_path))
    monkeypatch.setattr(bundle, "index_allowed", lambda: True)
    with pytest.raises(BundleMade, match="run stops here on purpose"):
        make_kernel_bundle()
    out = tmp_path / BUNDLE_FOLDER
    assert pip.option("download", "-d") == [str(out)]
    assert pip.option("install", "--python-version") == pip.option("download", "--python-version") == [kernel_python()]
    platforms = [c[i + 1] for c in pip.commands for i, a in enumerate(c) if a == "--platform" and c[3] == "download"]
    assert platforms == kernel_platforms()
    requested = [a for a in next(c for c in pip.commands if "--dry-run" in c) if a.split(">")[0] in KAGGLE_LACKS]
    assert [r.split(">")[0] for r in requested] == list(KAGGLE_LACKS)
    target = json.loads((out / BUNDLE_METADATA).read_text())
    assert target["python"] == kernel_python() and target["platforms"] == kernel_platforms()
    assert (out / "dataset-metadata.json").is_file()
    steps = capsys.readouterr().out
    assert "Save Version" in steps and "Output -> New Dataset" in steps and f"kaggle datasets create -p {out}" in steps
    assert "MAKE_BUNDLE = False" in steps
    # What it made is what the setup cell of this kernel takes.
    assert usable_wheel_folders([str(out)]) == [str(out)]


def test_make_bundle_folder_is_kaggles_working_folder_on_kaggle_else_here(tmp_path, monkeypatch):
    for name in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_WORKING_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert bundle_folder() == tmp_path / "mcvqa_wheels"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert bundle_folder() == pathlib.Path("/kaggle/working/mcvqa_wheels")


def test_make_bundle_without_internet_stops_before_anything(tmp_path, monkeypatch, pip):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(SetupError, match=r"MAKE_BUNDLE = True downloads the wheels, but this session has no "
                                         r"internet\. Fix: turn the notebook's internet on \(Settings -> Internet\)"):
        make_kernel_bundle(tmp_path / "wheels")
    assert pip.commands == [] and not (tmp_path / "wheels").exists()


@pytest.mark.parametrize("module", ["machinery/errors.py", "machinery/packages.py", "bundle.py"])
def test_the_setup_modules_import_only_the_standard_library(module):
    """They run in the notebook before anything is installed."""
    tree = ast.parse((ROOT / "mcvqa" / module).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in sys.stdlib_module_names for a in node.names), ast.dump(node)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module.split(".")[0] in sys.stdlib_module_names, node.module
