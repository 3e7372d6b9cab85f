import json
import re
from collections import deque

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mcvqa.demo.demo_data import (
    DEMO_COLOURS,
    DEMO_COUNTS,
    DEMO_POSITIONS,
    DEMO_QUESTION_TYPES,
    generate_demo_dataset,
)

CSV_NAMES = ("train.csv", "test.csv", "sample_submission.csv", "test_answers.csv", "demo_meta.csv")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(out, n_train=120, n_test=40, image_size=112, seed=0)


def _load(out):
    return {name: pd.read_csv(out / name, dtype=str, keep_default_na=False) for name in CSV_NAMES}


def _pixels(out, rel):
    return np.asarray(Image.open(out / rel).convert("RGB")).astype(int)


def _foreground(arr):
    # The background is plain and shapes never touch the corner, so pixel (0, 0) is background.
    return np.abs(arr - arr[0, 0]).sum(axis=2) > 30


def _meta_by_id(out):
    meta = pd.read_csv(out / "demo_meta.csv", dtype=str)
    return dict(zip(meta["id"], meta["qtype"]))


def test_columns_and_ids(demo):
    d = _load(demo)
    assert list(d["train.csv"].columns) == ["id", "path", "question", "a", "b", "c", "d", "answer"]
    assert list(d["test.csv"].columns) == ["id", "path", "question", "a", "b", "c", "d"]
    assert list(d["sample_submission.csv"].columns) == ["id", "answer"]
    assert list(d["test_answers.csv"].columns) == ["id", "answer"]
    assert list(d["demo_meta.csv"].columns) == ["id", "split", "qtype"]
    train, test = d["train.csv"], d["test.csv"]
    assert len(train) == 120 and len(test) == 40
    assert list(train["id"]) == [f"TRAIN_{i:03d}" for i in range(120)]
    assert list(test["id"]) == [f"TEST_{i:03d}" for i in range(40)]
    assert all(re.fullmatch(r"train/TRAIN_\d{3}\.png", p) for p in train["path"])
    assert all(re.fullmatch(r"test/TEST_\d{3}\.png", p) for p in test["path"])
    assert list(d["sample_submission.csv"]["id"]) == list(test["id"])
    assert set(d["sample_submission.csv"]["answer"]) == {"a"}
    assert list(d["test_answers.csv"]["id"]) == list(test["id"])
    assert set(train["answer"]) | set(d["test_answers.csv"]["answer"]) <= set("abcd")
    assert set(d["demo_meta.csv"]["qtype"]) == set(DEMO_QUESTION_TYPES)
    assert list(d["demo_meta.csv"]["id"]) == list(train["id"]) + list(test["id"])
    assert json.loads((demo / "DEMO_DATASET.json").read_text())["n_train"] == 120


def test_images_exist_rgb_and_sized(demo):
    for split in ("train.csv", "test.csv"):
        for rel in pd.read_csv(demo / split)["path"]:
            with Image.open(demo / rel) as img:
                assert img.mode == "RGB" and img.size == (112, 112)


def test_deterministic(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", n_train=40, n_test=12, seed=3)
    b = generate_demo_dataset(tmp_path / "b", n_train=40, n_test=12, seed=3)
    for name in CSV_NAMES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for rel in pd.read_csv(a / "train.csv")["path"].tolist() + pd.read_csv(a / "test.csv")["path"].tolist():
        assert np.array_equal(_pixels(a, rel), _pixels(b, rel))
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_different_seeds_differ(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", n_train=40, n_test=12, seed=1)
    b = generate_demo_dataset(tmp_path / "b", n_train=40, n_test=12, seed=2)
    assert (a / "train.csv").read_bytes() != (b / "train.csv").read_bytes()
    assert not np.array_equal(_pixels(a, "train/TRAIN_000.png"), _pixels(b, "train/TRAIN_000.png"))


def test_answer_letters_balanced(demo):
    d = _load(demo)
    letters = pd.concat([d["train.csv"]["answer"], d["test_answers.csv"]["answer"]])
    share = letters.value_counts(normalize=True)
    assert set(share.index) == set("abcd")
    assert share.max() <= 0.40


def test_question_types_balanced(demo):
    counts = pd.read_csv(demo / "demo_meta.csv").groupby("split")["qtype"].value_counts()
    assert counts.loc["train"].min() == 30 and counts.loc["test"].min() == 10


def test_options_distinct_and_contain_answer(demo):
    d = _load(demo)
    test = d["test.csv"].merge(d["test_answers.csv"], on="id")
    for df in (d["train.csv"], test):
        for row in df.itertuples():
            options = [row.a, row.b, row.c, row.d]
            assert len(set(options)) == 4 and all(options)
            assert getattr(row, row.answer) in options


def test_marker_short_circuits(tmp_path):
    out = generate_demo_dataset(tmp_path / "m", n_train=8, n_test=4, seed=0)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert generate_demo_dataset(out, n_train=8, n_test=4, seed=0) == out
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # Different arguments must regenerate.
    generate_demo_dataset(out, n_train=10, n_test=4, seed=0)
    assert len(pd.read_csv(out / "train.csv")) == 10


def test_half_written_folder_is_regenerated(tmp_path):
    out = generate_demo_dataset(tmp_path / "h", n_train=8, n_test=4, seed=0)
    good = (out / "train.csv").read_bytes()
    (out / "DEMO_DATASET.json").unlink()  # as if interrupted before the marker was written
    (out / "train.csv").write_text("broken")
    generate_demo_dataset(out, n_train=8, n_test=4, seed=0)
    assert (out / "train.csv").read_bytes() == good


def _labelled_rows(out):
    d = _load(out)
    test = d["test.csv"].merge(d["test_answers.csv"], on="id")
    qtype = _meta_by_id(out)
    for row in pd.concat([d["train.csv"], test]).itertuples():
        yield qtype[row.id], getattr(row, row.answer), _pixels(out, row.path)


def test_colour_rows_match_image(demo):
    names, rgbs = list(DEMO_COLOURS), np.array(list(DEMO_COLOURS.values()))
    seen = 0
    for qtype, answer, arr in _labelled_rows(demo):
        if qtype != "colour":
            continue
        mean = arr[_foreground(arr)].mean(axis=0)
        assert names[np.argmin(((rgbs - mean) ** 2).sum(axis=1))] == answer
        seen += 1
    assert seen >= 30


def test_position_rows_match_image(demo):
    for qtype, answer, arr in _labelled_rows(demo):
        if qtype != "position":
            continue
        ys, xs = np.nonzero(_foreground(arr))
        # Every foreground pixel must lie in the named quadrant, not just the centroid.
        col, row = DEMO_POSITIONS.index(answer) % 2, DEMO_POSITIONS.index(answer) // 2
        assert ((xs >= 56) == bool(col)).all() and ((ys >= 56) == bool(row)).all()


def _blob_count(mask):
    seen, blobs = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        seen[y, x] = True
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return blobs


def test_count_rows_match_image(demo):
    for qtype, answer, arr in _labelled_rows(demo):
        if qtype == "count":
            assert _blob_count(_foreground(arr)) == DEMO_COUNTS.index(answer) + 1


def test_demo_true_never_writes_over_a_users_data_or_model(tmp_path):
    """--profile demo with a data_dir or model_name_or_path that holds something else: one message, nothing written
    (the demo's data and tiny model were written over them before)."""
    import pytest

    from mcvqa.core.config import ConfigError, resolve_config
    from mcvqa.pipeline import prepare_demo

    data, model = tmp_path / "data", tmp_path / "model"
    data.mkdir()
    model.mkdir()
    (data / "train.csv").write_text("id,path,question,a,b,c,d,answer\nq1,x.png,q,1,2,3,4,a\n")
    (model / "config.json").write_text("{}")
    cfg = resolve_config("demo", [f"data_dir={data}", f"model_name_or_path={model}"], env={}, verbose=False)
    with pytest.raises(ConfigError, match=r"demo=true writes the demo's data into data_dir=.*Fix: demo=false"):
        prepare_demo(cfg)
    (data / "train.csv").rename(data / "mine.csv")
    with pytest.raises(ConfigError, match=r"demo=true builds a tiny model into model_name_or_path=.*Fix: demo=false"):
        prepare_demo(cfg)
    assert sorted(p.name for p in data.iterdir()) == ["mine.csv"] and sorted(p.name for p in model.iterdir()) == [
        "config.json"]
