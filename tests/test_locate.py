"""Finding the inputs (locate.py): the model and data folders under a Kaggle-like /kaggle/input, a hub id
without internet, Colab's Drive not mounted; each a one-message stop with the fix."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from mcvqa.core.config import resolve_config
from mcvqa.runkit.locate import InputNotFoundError, find_data_dir, find_model_dir, resolve_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model_folder(folder, model_type="qwen2_5_vl", weights=True):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    if weights:
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    return folder


def _data_folder(folder):
    folder.mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (folder / name).write_text("id\n")
    return folder


def test_model_auto_finds_the_one_qwen_vl_folder_however_deep_kaggle_nests_it(tmp_path, capsys):
    wanted = _model_folder(tmp_path / "qwen2.5-vl" / "transformers" / "3b-instruct" / "1")
    _model_folder(tmp_path / "llama" / "transformers" / "8b" / "2", model_type="llama")  # not a Qwen-VL
    _model_folder(tmp_path / "processor-only" / "x", weights=False)  # a config without weights
    assert find_model_dir(tmp_path) == str(wanted)
    assert f"model_name_or_path=auto -> {wanted}" in capsys.readouterr().out


def test_model_auto_with_none_or_several_lists_them_and_how_to_choose(tmp_path):
    with pytest.raises(InputNotFoundError, match=r"model_name_or_path=auto: no model folder.*Fix: attach it"):
        find_model_dir(tmp_path)
    a = _model_folder(tmp_path / "qwen2.5-vl-3b" / "1")
    b = _model_folder(tmp_path / "qwen3-vl-8b" / "1", model_type="qwen3_vl")
    with pytest.raises(InputNotFoundError) as caught:
        find_model_dir(tmp_path)
    message = str(caught.value)
    assert "2 candidates (model folder" in message
    assert f"model_name_or_path={a}" in message and f"model_name_or_path={b}" in message


def test_a_model_setting_naming_a_kaggle_models_parent_folder_looks_inside_it(tmp_path, capsys):
    """model_name_or_path=/kaggle/input/qwen2.5-vl (no config.json there): before, transformers' raw
    "Unrecognized processing class" traceback; now the folder is searched as auto searches /kaggle/input."""
    parent = tmp_path / "qwen2.5-vl"
    wanted = _model_folder(parent / "transformers" / "3b-instruct" / "1")
    data = _data_folder(tmp_path / "data")
    cfg = resolve_config("local_gpu", [f"data_dir={data}", f"model_name_or_path={parent}"], env={}, verbose=False)
    assert resolve_inputs(cfg).model_name_or_path == str(wanted)
    assert f"model_name_or_path={parent} -> {wanted}" in capsys.readouterr().out
    other = _model_folder(parent / "transformers" / "7b-instruct" / "1")
    with pytest.raises(InputNotFoundError, match=rf"model_name_or_path={parent}: 2 candidates") as caught:
        resolve_inputs(cfg)
    assert f"model_name_or_path={other}" in str(caught.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = resolve_config("local_gpu", [f"data_dir={data}", f"model_name_or_path={empty}"], env={}, verbose=False)
    with pytest.raises(InputNotFoundError, match=rf"model_name_or_path={empty}: no model folder.* under {empty}"):
        resolve_inputs(cfg)


def test_data_auto_with_two_datasets_lists_both_lines(tmp_path):
    a, b = _data_folder(tmp_path / "competition"), _data_folder(tmp_path / "old-copy" / "data")
    with pytest.raises(InputNotFoundError) as caught:
        find_data_dir(tmp_path)
    assert f"data_dir={a}" in str(caught.value) and f"data_dir={b}" in str(caught.value)


def test_resolve_inputs_replaces_auto_with_the_folders_found(tmp_path):
    data, model = _data_folder(tmp_path / "comp"), _model_folder(tmp_path / "m" / "1")
    cfg = resolve_config("kaggle_t4x2", env={}, verbose=False)
    assert (cfg.data_dir, cfg.model_name_or_path) == ("auto", "auto")  # the Kaggle defaults
    resolved = resolve_inputs(cfg, search_root=tmp_path)
    assert (resolved.data_dir, resolved.model_name_or_path) == (str(data), str(model))


def _cli(*overrides, profile="local_gpu", env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "mcvqa", "run", "--profile", profile, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_hub_id_without_internet_stops_up_front_with_the_fix(tmp_path):
    data = _data_folder(tmp_path / "data")
    done = _cli(f"data_dir={data}", "model_name_or_path=Qwen/Qwen2.5-VL-3B-Instruct", f"output_dir={tmp_path / 'run'}",
                env_extra={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model_name_or_path=Qwen/Qwen2.5-VL-3B-Instruct: not a local folder" in done.stderr
    assert "set model_name_or_path=auto" in done.stderr
    assert not (tmp_path / "run").exists()  # stopped before writing anything


@pytest.mark.skipif(os.path.isdir("/content/drive/MyDrive"), reason="a real mounted Drive")
def test_colab_without_drive_mounted_says_how_to_mount_and_writes_nothing():
    done = _cli(profile="colab_t4")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Google Drive is not mounted" in done.stderr and "drive.mount('/content/drive')" in done.stderr
    assert not os.path.exists("/content/drive/MyDrive/mcvqa")
