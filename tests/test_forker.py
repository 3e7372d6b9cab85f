"""The forker's workflow (issue 25): settings as users write them, where each value came from, a declared image
transform (train-only or every pass), and a resume that notices edited prompt or image code."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from mcvqa.core import data as data_module
from mcvqa.core.collate import VqaDataset, identity_views
from mcvqa.core.config import ConfigError, resolve_config
from mcvqa.core.data import image_transform_for, light_image_transform
from mcvqa.runkit import resume
from mcvqa.runkit.resume import CODE_FILE, check_code, code_signature, save_code_signature


# --- values as users write them ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, field, expected", [
    ("768*768", "max_pixels", 589824), ("602112", "max_pixels", 602112), ("1e-4", "learning_rate", 1e-4),
    ("2**20", "max_pixels", 2**20), ("1_000", "max_train_rows", 1000), ("0.5", "gate_fraction", 0.5),
    ("3", "ema_decay", 3.0), ("1e3", "max_train_rows", 1000),
])
def test_numbers_as_users_write_them(text, field, expected):
    cfg = resolve_config("demo", [f"{field}={text}"], env={}, verbose=False)
    assert getattr(cfg, field) == expected and type(getattr(cfg, field)) is type(expected)


@pytest.mark.parametrize("text, message", [
    ("2.5", r"config: epochs expects a whole number, got '2\.5' \(= 2\.5\); e\.g\. epochs=2"),
    ("two", r"config: epochs expects a whole number \(e\.g\. 602112 or 768\*768\), got 'two'"),
    ("__import__('os').getcwd()", r"config: epochs expects a whole number"),  # arithmetic on literals only, never code
])
def test_numbers_refused_with_the_fix(text, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("demo", [f"epochs={text}"], env={}, verbose=False)


def test_config_cell_says_where_each_value_came_from(capsys):
    resolve_config("kaggle_t4x2", ["micro_batch_size=4", "epochs=1"], env={}, verbose=True)
    out = capsys.readouterr().out
    profile_line = next(line for line in out.splitlines() if line.startswith("[config] from the kaggle_t4x2 profile"))
    assert "infer_batch_size=16" in profile_line and "micro_batch_size" not in profile_line  # the override won
    assert "[config] from OVERRIDES: micro_batch_size=4, epochs=1" in out
    assert "a setting goes in OVERRIDES (key=value lines: they win over the profile)" in out


# --- the declared image transform ----------------------------------------------------------------------------------

@pytest.fixture
def demo_cfg():
    return resolve_config("demo", env={}, verbose=False)


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def _frame(path):
    import pandas as pd

    return pd.DataFrame([{"id": "r0", "image_path": str(path), "question": "q", "a": "1", "b": "2", "c": "3",
                          "d": "4", "answer": "a"}])


def test_light_transform_changes_the_image_reproducibly(picture):
    image = Image.open(picture).convert("RGB")
    one = np.asarray(light_image_transform(image, np.random.default_rng([1, 0, 0, 5])))
    again = np.asarray(light_image_transform(image, np.random.default_rng([1, 0, 0, 5])))
    other = np.asarray(light_image_transform(image, np.random.default_rng([1, 0, 1, 5])))
    assert one.shape == np.asarray(image).shape
    assert np.array_equal(one, again) and not np.array_equal(one, other)
    assert not np.array_equal(one, np.asarray(image))


@pytest.mark.parametrize("on, test_transformed", [("train", False), ("train+test", True)])
def test_transform_reaches_the_passes_it_is_declared_for(picture, demo_cfg, on, test_transformed):
    cfg = dataclasses.replace(demo_cfg, image_transform="light", image_transform_on=on)
    plain = VqaDataset(_frame(picture), identity_views(1), None)[0]["image"]
    train = VqaDataset(_frame(picture), identity_views(1), None,
                       transform=image_transform_for(cfg, "train", (0, 1)))[0]["image"]
    test = VqaDataset(_frame(picture), identity_views(1), None, transform=image_transform_for(cfg, "test"))[0]["image"]
    assert not np.array_equal(np.asarray(train), np.asarray(plain))
    assert (not np.array_equal(np.asarray(test), np.asarray(plain))) is test_transformed
    assert image_transform_for(demo_cfg, "train", (0, 1)) is None  # image_transform=none: nothing


def test_custom_transform_is_looked_up_when_it_runs(picture, demo_cfg, monkeypatch):
    """A fork edits the custom_image_transform cell: the edited function is the one that runs."""
    cfg = dataclasses.replace(demo_cfg, image_transform="custom")
    transform = image_transform_for(cfg, "train", (0, 0))
    monkeypatch.setattr(data_module, "custom_image_transform", lambda image, rng: image.convert("L").convert("RGB"))
    image = VqaDataset(_frame(picture), identity_views(1), None, transform=transform)[0]["image"]
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])  # grey: the edited transform ran


def test_unknown_transform_refused():
    with pytest.raises(ConfigError, match=r"image_transform='blur'; choose one of none, light, custom"):
        resolve_config("demo", ["image_transform=blur"], env={}, verbose=False)


# --- resume notices edited prompt or image code --------------------------------------------------------------------

def test_resume_stops_when_prompt_or_image_code_changed(tmp_path, monkeypatch):
    (tmp_path / "fold0").mkdir()
    save_code_signature(tmp_path)
    assert json.loads((tmp_path / CODE_FILE).read_text()) == code_signature()
    check_code(tmp_path)  # unchanged: resumes

    def build_messages(user_text, system_prompt="", answer_letter=None):  # an edited cell
        return [{"role": "user", "content": user_text.upper()}]

    monkeypatch.setitem(resume.__dict__, "build_messages", build_messages)
    with pytest.raises(ConfigError, match=r"made by other prompt or image code \(build_messages changed since\).*"
                                          r"Fix: a new output_dir"):
        check_code(tmp_path)


def test_code_check_only_where_folds_exist(tmp_path, monkeypatch):
    save_code_signature(tmp_path)
    monkeypatch.setitem(resume.__dict__, "load_image", lambda *a, **k: None)
    check_code(tmp_path)  # no fold yet: nothing to mix with
