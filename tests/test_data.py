import logging
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from mcvqa.core.data import (
    OPTION_LETTERS,
    IMAGE_COLUMN_CANDIDATES,
    DataError,
    check_images,
    image_content_hash,
    load_image,
    make_folds,
    read_competition_csv,
)

HEADER = "id,path,question,a,b,c,d,answer"


def write_csv(folder, lines, name="train.csv", encoding="utf-8"):
    path = Path(folder) / name
    path.write_bytes("\n".join(lines).encode(encoding) + b"\n")
    return path


def save_image(path, size=(32, 32), color=(200, 30, 30), mode="RGB", **save_kwargs):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def valid_rows(n=2):
    return [f"q{i},img{i}.png,question {i},A{i},B{i},C{i},D{i},a" for i in range(n)]


# ---------------------------------------------------------------- CSV reading

def test_reads_valid_train_csv(tmp_path):
    frame = read_competition_csv(write_csv(tmp_path, [HEADER, *valid_rows()]), "train")
    assert list(frame.columns) == ["id", "image_path", "question", "a", "b", "c", "d", "answer"]
    assert frame["image_path"].tolist() == [str(tmp_path / "img0.png"), str(tmp_path / "img1.png")]


def test_missing_columns_are_all_listed(tmp_path):
    csv = write_csv(tmp_path, ["id,path,question,a", "q1,x.png,what?,A"])
    with pytest.raises(DataError) as error:
        read_competition_csv(csv, "train")
    message = str(error.value)
    assert "train.csv" in message
    for column in ("b", "c", "d", "answer"):
        assert f" {column}" in message.split("missing required columns:")[1].split(";")[0]


def test_missing_image_column_names_file(tmp_path):
    csv = write_csv(tmp_path, ["id,question,a,b,c,d,answer", "q1,Q,A,B,C,D,a"])
    with pytest.raises(DataError, match=r"train\.csv.*path \(or image\)"):
        read_competition_csv(csv, "train")


def test_image_column_and_path_preferred(tmp_path):
    only_image = write_csv(tmp_path, ["ID, Image ,Question,A,B,C,D", "q1,pic.png,Q,A,B,C,D"],
                           name="test.csv")
    assert read_competition_csv(only_image, "test")["image_path"][0] == str(tmp_path / "pic.png")
    both = write_csv(tmp_path, ["id,image,path,question,a,b,c,d", "q1,wrong.png,right.png,Q,A,B,C,D"],
                     name="both.csv")
    frame = read_competition_csv(both, "test")
    assert frame["image_path"][0] == str(tmp_path / "right.png")
    assert frame.attrs["image_column"] == "path"


def test_relative_dot_backslash_and_absolute_paths(tmp_path):
    absolute = tmp_path / "elsewhere" / "abs.png"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    csv = write_csv(data_dir, [
        HEADER,
        "q1,./images/one.png,Q,A,B,C,D,a",
        r"q2,images\sub\two.png,Q,A,B,C,D,a",
        r"q3,.\images\three.png,Q,A,B,C,D,a",
        f"q4,{absolute},Q,A,B,C,D,a",
    ])
    frame = read_competition_csv(csv, "train")
    assert frame["image_path"].tolist() == [
        str(data_dir / "images" / "one.png"), str(data_dir / "images" / "sub" / "two.png"),
        str(data_dir / "images" / "three.png"), str(absolute)]


def test_answers_are_stripped_and_lowercased(tmp_path):
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,A,B,C,D,A", 'q2,x.png,Q,A,B,C,D," b "',
                               "q3,x.png,Q,A,B,C,D,Ｃ"])
    assert read_competition_csv(csv, "train")["answer"].tolist() == ["a", "b", "c"]


def test_invalid_answers_in_train_are_all_listed(tmp_path):
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,A,B,C,D,a", "q2,x.png,Q,A,B,C,D,e",
                               "q3,x.png,Q,A,B,C,D,", "q4,x.png,Q,A,B,C,D,ab"])
    with pytest.raises(DataError) as error:
        read_competition_csv(csv, "train")
    message = str(error.value)
    assert "train.csv line 3 (id 'q2'), column 'answer'" in message
    assert "train.csv line 4 (id 'q3'), column 'answer'" in message
    assert "train.csv line 5 (id 'q4'), column 'answer'" in message
    assert "line 2 " not in message


def test_empty_and_missing_options_are_all_listed(tmp_path):
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,,B,C,D,a", "q2,x.png,Q,A,B,   ,D,a",
                               "q3,x.png,,A,B,C,D,a", "q4,x.png,Q,A,B,C"])  # q4: short row -> NaN
    with pytest.raises(DataError) as error:
        read_competition_csv(csv, "train")
    message = str(error.value)
    for expected in ("line 2 (id 'q1'), column 'a'", "line 3 (id 'q2'), column 'c'",
                     "line 4 (id 'q3'), column 'question'", "line 5 (id 'q4'), column 'd'"):
        assert expected in message
    assert "empty cells (4)" in message


def test_option_text_that_looks_like_na_is_kept(tmp_path):
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,NA,None,nan,D,a"])
    assert read_competition_csv(csv, "train").loc[0, ["a", "b", "c"]].tolist() == ["NA", "None", "nan"]


def test_duplicate_ids_listed_with_lines(tmp_path):
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,A,B,C,D,a", " q1 ,x.png,Q,A,B,C,D,a",
                               "q2,x.png,Q,A,B,C,D,a", "q2,x.png,Q,A,B,C,D,a", "q3,x.png,Q,A,B,C,D,a"])
    with pytest.raises(DataError) as error:
        read_competition_csv(csv, "train")
    message = str(error.value)
    assert "id 'q1' on lines 2, 3" in message and "id 'q2' on lines 4, 5" in message
    assert "q3" not in message


def test_ids_are_strings(tmp_path):
    csv = write_csv(tmp_path, [HEADER, "007,x.png,Q,A,B,C,D,a"])
    assert read_competition_csv(csv, "train")["id"].tolist() == ["007"]


@pytest.mark.parametrize("content", [b"", (HEADER + "\n").encode()])
def test_empty_csv_raises(tmp_path, content):
    csv = tmp_path / "train.csv"
    csv.write_bytes(content)
    with pytest.raises(DataError, match="train.csv"):
        read_competition_csv(csv, "train")


def test_test_csv_with_complete_answer_column_is_kept(tmp_path):
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,A,B,C,D,B"], name="test.csv")
    assert read_competition_csv(csv, "test")["answer"].tolist() == ["b"]
    bad = write_csv(tmp_path, [HEADER, "q1,x.png,Q,A,B,C,D,z"], name="test_bad.csv")
    with pytest.raises(DataError, match="test_bad.csv line 2"):
        read_competition_csv(bad, "test")


def test_test_csv_with_partial_answer_column_drops_it(tmp_path, caplog):
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,A,B,C,D,a", "q2,x.png,Q,A,B,C,D,"],
                    name="test.csv")
    with caplog.at_level(logging.WARNING, logger="mcvqa"):
        frame = read_competition_csv(csv, "test")
    assert "answer" not in frame.columns
    assert "answer column" in caplog.text


def test_train_without_answer_column_fails_but_test_is_fine(tmp_path):
    csv = write_csv(tmp_path, ["id,path,question,a,b,c,d", "q1,x.png,Q,A,B,C,D"])
    with pytest.raises(DataError, match="answer"):
        read_competition_csv(csv, "train")
    assert "answer" not in read_competition_csv(csv, "test").columns


def test_korean_text_reads_identically_in_all_encodings(tmp_path, caplog):
    lines = ["id,path,question,a,b,c,d,answer",
             'k1,x.png,"이 사진에서, 무엇이\n보이나요?",고양이,강아지,새,물고기,a',
             "k2,x.png,ＡＢＣ １２３ 은 무엇인가요?,사과,배,감,귤,d"]
    frames = {}
    for encoding in ("utf-8", "utf-8-sig", "cp949"):
        with caplog.at_level(logging.INFO, logger="mcvqa"):
            frames[encoding] = read_competition_csv(
                write_csv(tmp_path, lines, name=f"{encoding}.csv", encoding=encoding), "train")
    pd.testing.assert_frame_equal(frames["utf-8"], frames["utf-8-sig"], check_like=False)
    pd.testing.assert_frame_equal(frames["utf-8"], frames["cp949"])
    assert frames["cp949"]["question"][0] == "이 사진에서, 무엇이\n보이나요?"
    assert frames["utf-8"]["question"][1] == "ABC 123 은 무엇인가요?"  # NFKC folds full width
    assert "cp949" in caplog.text and "utf-8-sig" in caplog.text


def test_undecodable_csv_names_file(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_bytes(HEADER.encode() + b"\nq1,x.png,\xff\xfe\xff,A,B,C,D,a\n")
    with pytest.raises(DataError, match="train.csv.*cannot decode"):
        read_competition_csv(csv, "train")


# ---------------------------------------------------------------- images

def test_missing_and_corrupt_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="corrupt.jpg"):
        load_image(corrupt)


def noisy_jpeg(path, size=(256, 256)):
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_truncated_jpeg_fails_even_if_pil_allows_truncation(tmp_path, monkeypatch):
    path = noisy_jpeg(tmp_path / "full.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="full.jpg.*truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # global restored


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = save_image(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0), quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    red, green, blue = img.getpixel((16, 16))
    assert img.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_grayscale_and_16_bit_become_rgb(tmp_path):
    gray = load_image(save_image(tmp_path / "gray.png", mode="L", color=100))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    deep = Image.new("I;16", (32, 32), 65535)
    deep.paste(32896, (0, 0, 16, 32))  # mid-range 16-bit value must scale to mid gray, not clip
    deep.save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((4, 4)) == (128, 128, 128) and loaded.getpixel((20, 4)) == (255,) * 3


def test_palette_png_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    img.paste(1, (20, 0, 40, 40))
    img.save(tmp_path / "pal.png", transparency=0)
    loaded = load_image(tmp_path / "pal.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((30, 5)) == (255, 0, 0)


def test_rgba_and_la_transparency_composited_on_white(tmp_path):
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (20, 0, 40, 40))
    img.save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.getpixel((5, 5)) == (255, 255, 255) and loaded.getpixel((30, 5)) == (0, 0, 255)
    la = load_image(save_image(tmp_path / "la.png", mode="LA", color=(0, 0)))
    assert la.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (30, 60)
    red, green, _ = loaded.getpixel((loaded.width - 4, 4))  # top-left lands top-right
    assert red > 200 and green < 60
    assert loaded.getpixel((4, 4))[1] > 200


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_large_image_downsized_within_budget(tmp_path, suffix):
    path = save_image(tmp_path / f"big.{suffix}", size=(3000, 2000))
    img = load_image(path, max_pixels=100_000)
    assert 0.9 * 100_000 <= img.width * img.height <= 100_000
    assert abs(img.width / img.height - 1.5) < 0.02
    assert load_image(path).size == (3000, 2000)


def test_bomb_guard_limits_and_restores_global(tmp_path, monkeypatch):
    small = save_image(tmp_path / "small.png", size=(40, 30))  # 1200 px: PIL warning zone
    big = save_image(tmp_path / "big.png", size=(100, 100))  # 10000 px: PIL error zone
    for path in (small, big):
        with pytest.raises(DataError, match=rf"{path.name}.*decompression bomb"):
            load_image(path, bomb_limit_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # our limit replaces PIL's global
    assert load_image(big).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 100


@pytest.mark.parametrize("size, expected", [((1, 1), (28, 28)), ((5, 40), (28, 224)),
                                            ((40, 5), (224, 28))])
def test_tiny_images_upscaled(tmp_path, size, expected):
    assert load_image(save_image(tmp_path / "tiny.png", size=size)).size == expected


def test_extreme_aspect_ratio_capped(tmp_path):
    img = load_image(save_image(tmp_path / "line.png", size=(2, 2000)))
    assert min(img.size) >= 28 and max(img.size) / min(img.size) <= 200


def make_image_csv(tmp_path, n_good=2):
    for i in range(n_good):
        save_image(tmp_path / f"good{i}.png", color=(i, i, i))
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    truncated = noisy_jpeg(tmp_path / "trunc.jpg")
    truncated.write_bytes(truncated.read_bytes()[:3000])
    rows = [f"g{i},good{i}.png,Q,A,B,C,D,a" for i in range(n_good)]
    rows += ["m1,missing.png,Q,A,B,C,D,b", "c1,corrupt.png,Q,A,B,C,D,c", "t1,trunc.jpg,Q,A,B,C,D,d"]
    csv = write_csv(tmp_path, [HEADER, *rows])
    return csv, read_competition_csv(csv, "train")


def test_check_images_lists_every_bad_row(tmp_path):
    csv, frame = make_image_csv(tmp_path)
    with pytest.raises(DataError) as error:
        check_images(frame, csv)
    message = str(error.value)
    assert "unreadable images (3)" in message
    assert "train.csv line 4 (id 'm1'), column 'path'" in message and "not found" in message
    assert "train.csv line 5 (id 'c1'), column 'path'" in message
    assert "train.csv line 6 (id 't1'), column 'path'" in message and "truncated" in message


def test_check_images_error_truncates_long_lists(tmp_path):
    rows = [f"m{i},missing{i}.png,Q,A,B,C,D,a" for i in range(60)]
    csv = write_csv(tmp_path, [HEADER, *rows])
    with pytest.raises(DataError) as error:
        check_images(read_competition_csv(csv, "train"), csv)
    message = str(error.value)
    assert "(id 'm49')" in message and "(id 'm50')" not in message
    assert "10 more (60 in total)" in message


def test_check_images_blank_fallback(tmp_path, caplog):
    csv, frame = make_image_csv(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mcvqa"):
        checked, bad_rows = check_images(frame, csv, on_bad_image="blank")
    assert checked["image_ok"].tolist() == [True, True, False, False, False]
    assert [bad["id"] for bad in bad_rows] == ["m1", "c1", "t1"]
    assert [bad["line"] for bad in bad_rows] == [4, 5, 6]
    assert all(bad["column"] == "path" and bad["file"] == "train.csv" for bad in bad_rows)
    assert "3 of 5 images unreadable" in caplog.text
    assert "image_ok" not in frame.columns


def test_check_images_all_good(tmp_path):
    save_image(tmp_path / "x.png")
    csv = write_csv(tmp_path, [HEADER, "q1,x.png,Q,A,B,C,D,a"])
    checked, bad_rows = check_images(read_competition_csv(csv, "train"), csv)
    assert checked["image_ok"].tolist() == [True] and bad_rows == []


# ---------------------------------------------------------------- folds

def fold_frame(tmp_path, n_images, copies_per_image, answers):
    paths = []
    for image in range(n_images):
        first = save_image(tmp_path / f"img{image}_0.png", color=(image % 256, image // 256, 7))
        paths.append(first)
        for copy in range(1, copies_per_image):  # identical bytes under another name
            paths.append(Path(shutil.copy(first, tmp_path / f"img{image}_{copy}.png")))
    return pd.DataFrame({"image_path": [str(p) for p in paths], "answer": answers})


def test_image_content_hash_matches_identical_bytes(tmp_path):
    one = save_image(tmp_path / "one.png")
    two = Path(shutil.copy(one, tmp_path / "two.png"))
    other = save_image(tmp_path / "other.png", color=(1, 2, 3))
    assert image_content_hash(one) == image_content_hash(two) != image_content_hash(other)


def test_folds_are_stratified(tmp_path):
    answers = [letter for letter in "abcd" for _ in range(30)]
    frame = fold_frame(tmp_path, 120, 1, answers)
    folds = make_folds(frame, n_folds=3, seed=42)
    assert sorted(set(folds)) == [0, 1, 2]
    for fold in range(3):
        counts = Counter(frame["answer"][folds == fold])
        assert all(abs(counts[letter] - 10) <= 1 for letter in "abcd"), counts


def test_folds_keep_identical_images_together(tmp_path):
    answers = ["abcd"[i % 4] for i in range(90)]
    frame = fold_frame(tmp_path, 30, 3, answers)
    folds = make_folds(frame, n_folds=3, seed=0)
    for start in range(0, 90, 3):
        assert len(set(folds[start:start + 3])) == 1
    assert len(set(folds)) == 3


def test_folds_deterministic_with_seed(tmp_path):
    answers = ["abcd"[i % 4] for i in range(60)]
    frame = fold_frame(tmp_path, 60, 1, answers)
    first = make_folds(frame, n_folds=3, seed=1)
    assert np.array_equal(first, make_folds(frame, n_folds=3, seed=1))
    assert not np.array_equal(first, make_folds(frame, n_folds=3, seed=2))


def test_folds_need_enough_rows(tmp_path):
    frame = fold_frame(tmp_path, 2, 1, ["a", "b"])
    with pytest.raises(DataError, match="3 folds from 2 rows"):
        make_folds(frame, n_folds=3)


def test_folds_from_identical_images_name_the_file_the_grouping_and_the_fix(tmp_path):
    frame = fold_frame(tmp_path, 1, 12, ["abcd"[i % 4] for i in range(12)])  # one picture for every row
    with pytest.raises(DataError) as caught:
        make_folds(frame, n_folds=3)
    message = str(caught.value)
    assert message.startswith("train.csv: cannot make 3 folds")
    assert "only 1 distinct image" in message and "grouped by the bytes of their image" in message
    assert "Fix:" in message and "n_folds" in message


def test_bomb_message_names_a_setting_that_exists_and_is_honoured(tmp_path):
    from mcvqa.core.config import resolve_config

    path = save_image(tmp_path / "big.png", size=(100, 100))
    frame = pd.DataFrame({"id": ["q1"], "image_path": [str(path)]})
    with pytest.raises(DataError, match=r"set the setting bomb_limit_pixels above its size"):
        check_images(frame, tmp_path / "train.csv", bomb_limit_pixels=1000)
    cfg = resolve_config("demo", ["bomb_limit_pixels=20000"], env={}, verbose=False)
    checked, bad = check_images(frame, tmp_path / "train.csv", bomb_limit_pixels=cfg.bomb_limit_pixels)
    assert checked["image_ok"].tolist() == [True] and bad == []


def test_data_readme_describes_the_layout_the_code_reads_and_what_git_ignores():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "data" / "README.md").read_text(encoding="utf-8")
    for column in ("id", "question", *OPTION_LETTERS, "answer") + IMAGE_COLUMN_CANDIDATES:
        assert column in readme
    for name in ("train.csv", "test.csv", "sample_submission.csv", "data/demo/", "data/tiny_models/"):
        assert name in readme, name
    ignored = (root / ".gitignore").read_text()
    assert "data/demo/" in ignored and "data/tiny_models/" in ignored and "data/README.md" not in ignored


def test_every_bundle_folder_is_ignored_by_git():
    """`python -m mcvqa bundle --out kaggle_bundle_py311` (another Python) must not land in a commit either."""
    root = Path(__file__).resolve().parents[1]
    for folder in ("kaggle_bundle/", "kaggle_bundle_py311/", "kaggle_bundle-3.10/"):
        checked = subprocess.run(["git", "check-ignore", "-q", "--no-index", folder + "x.whl"], cwd=root)
        assert checked.returncode == 0, folder


def test_reversed_copies_move_the_answer_with_its_option():
    """hard_rows_from's copies: options d, c, b, a and the answer letter that still names the same option text."""
    import pandas as pd

    from mcvqa.core.data import with_reversed_copies

    frame = pd.DataFrame([{"id": "1", "question": "q", "a": "빨강", "b": "파랑", "c": "초록", "d": "노랑", "answer": "b"},
                          {"id": "2", "question": "q", "a": "원", "b": "별", "c": "네모", "d": "세모", "answer": "d"}])
    out = with_reversed_copies(frame, {"2", "unknown"})
    assert list(out["id"]) == ["1", "2", "2#reversed"]
    copy = out.iloc[2]
    assert [copy[c] for c in "abcd"] == ["세모", "네모", "별", "원"] and copy["answer"] == "a"
    assert copy[copy["answer"]] == frame.iloc[1][frame.iloc[1]["answer"]]  # the same option text is right
    assert with_reversed_copies(frame, set()) is frame
