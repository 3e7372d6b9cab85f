"""## Data: read and validate the competition files

Reads `train.csv` / `test.csv` (utf-8, utf-8 with BOM or cp949), normalises column names, text and
answers, resolves every image path to an absolute one, and checks every image can really be decoded.
All problems of one kind are collected and reported together in one `DataError` naming the file, the
spreadsheet line, the row id and the column, so a broken dataset is fixed in one pass rather than
discovered row by row in the middle of a GPU run. Folds group identical image bytes together, so a
repeated image never leaks between training and validation.
"""
import codecs
import contextlib
import hashlib
import io
import logging
import math
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageFilter, ImageOps
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from ..machinery.errors import UserError
from .config import Config

logger = logging.getLogger("mcvqa")

OPTION_LETTERS = ("a", "b", "c", "d")  # the option columns, the answers, the scored letters: one definition
PROB_COLUMNS = [f"p_{letter}" for letter in OPTION_LETTERS]  # probabilities in saved tables, original option order
TEXT_COLUMNS = ("question",) + OPTION_LETTERS
IMAGE_COLUMN_CANDIDATES = ("path", "image")  # first one present wins
DEFAULT_BOMB_LIMIT_PIXELS = Config.bomb_limit_pixels  # the setting's default
QWEN_MIN_IMAGE_SIDE = 28  # Qwen-VL's processor rejects images with a side below one 28 px patch
QWEN_MAX_ASPECT_RATIO = 200  # ... and images longer than 200x their width
MAX_LISTED_DATA_PROBLEMS = 50
IMAGE_CHECK_PROGRESS_MIN_ROWS = 200


class DataError(UserError, ValueError):
    """A problem in the competition files, with file, line, id and column in the message."""


def letter_indices(answers):
    """0-3 for the answer letters a-d (a column of answers or a list), as an int array."""
    return np.array([OPTION_LETTERS.index(a) for a in answers], dtype=int)


def _csv_row_ref(csv_name, index, row_id=None, column=None):
    # index + 2: the header is spreadsheet line 1, so the first data row is line 2.
    ref = f"{csv_name} line {index + 2}"
    if row_id is not None:
        ref += f" (id {row_id!r})"
    return ref + (f", column {column!r}" if column else "")


def _raise_data_problems(headline, problems):
    listed = problems[:MAX_LISTED_DATA_PROBLEMS]
    more = len(problems) - len(listed)
    tail = [f"... and {more} more ({len(problems)} in total)"] if more else []
    raise DataError("\n  ".join([f"{headline} ({len(problems)}):"] + listed + tail))


def _decode_csv_bytes(raw, csv_path):
    # A BOM decodes "successfully" as utf-8 but would glue U+FEFF onto the first column name.
    encodings = ("utf-8-sig",) if raw.startswith(codecs.BOM_UTF8) else ("utf-8", "cp949")
    for encoding in encodings:
        try:
            text = raw.decode(encoding)  # strict: a wrong guess must fail, not produce mojibake
        except UnicodeDecodeError:
            continue
        if encoding != "utf-8":
            logger.info("%s: read with encoding %s", csv_path, encoding)
        return text
    raise DataError(f"{csv_path}: cannot decode as utf-8, utf-8 with BOM or cp949")


def _parse_csv_text(text, csv_path):
    try:
        # keep_default_na=False: an option that reads "NA" or "None" is text, not a missing cell.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{csv_path}: not a valid CSV ({exc})") from None
    frame.columns = [str(name).strip().lower() for name in frame.columns]
    if frame.empty:
        raise DataError(f"{csv_path}: no data rows")
    return frame


def _find_image_column(frame, split, csv_path):
    image_column = next((c for c in IMAGE_COLUMN_CANDIDATES if c in frame.columns), None)
    required = ["id", *TEXT_COLUMNS] + (["answer"] if split == "train" else [])
    missing = [c for c in required if c not in frame.columns]
    if image_column is None:
        missing.append("path (or image)")
    if missing:
        raise DataError(f"{csv_path}: missing required columns: {', '.join(missing)}; "
                        f"found: {', '.join(frame.columns)}")
    return image_column


def _check_no_empty_cells(frame, columns, csv_name):
    problems = []
    for index, row in frame.iterrows():
        for column in columns:
            if pd.isna(row[column]) or not str(row[column]).strip():
                problems.append(_csv_row_ref(csv_name, index, row["id"] or None, column))
    if problems:
        _raise_data_problems(f"{csv_name}: empty cells", problems)


def _check_unique_ids(ids, csv_name):
    duplicated = ids[ids.duplicated(keep=False)]
    if duplicated.empty:
        return
    problems = [f"id {row_id!r} on lines {', '.join(str(i + 2) for i in group.index)}"
                for row_id, group in duplicated.groupby(duplicated, sort=False)]
    _raise_data_problems(f"{csv_name}: duplicate ids", problems)


def _resolve_image_path(value, csv_dir):
    # Windows-made CSVs use backslashes; Path joining and resolve() handle "./" and "../".
    return str((csv_dir / str(value).strip().replace("\\", "/")).resolve())


def _normalise_answers(frame, csv_name):
    answers = frame["answer"].fillna("").map(
        lambda value: unicodedata.normalize("NFKC", str(value)).strip().lower())
    bad = [f"{_csv_row_ref(csv_name, i, frame.at[i, 'id'], 'answer')}: {frame.at[i, 'answer']!r}"
           for i in answers.index[~answers.isin(OPTION_LETTERS)]]
    if bad:
        _raise_data_problems(f"{csv_name}: answers not in {', '.join(OPTION_LETTERS)}", bad)
    return answers


def read_competition_csv(csv_path, split):
    """Read train/test CSV into columns id, image_path, question, a, b, c, d[, answer]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    csv_path = Path(csv_path)
    frame = _parse_csv_text(_decode_csv_bytes(csv_path.read_bytes(), csv_path), csv_path)
    image_column = _find_image_column(frame, split, csv_path)
    frame["id"] = frame["id"].fillna("").astype(str).str.strip()
    _check_no_empty_cells(frame, ["id", image_column, *TEXT_COLUMNS], csv_path.name)
    _check_unique_ids(frame["id"], csv_path.name)
    result = pd.DataFrame({"id": frame["id"], "image_path": [
        _resolve_image_path(value, csv_path.parent) for value in frame[image_column]]})
    for column in TEXT_COLUMNS:  # NFKC folds full-width letters/digits; newlines and commas stay
        result[column] = frame[column].map(lambda text: unicodedata.normalize("NFKC", text).strip())
    if "answer" in frame.columns:
        if split == "test" and (frame["answer"].fillna("").str.strip() == "").any():
            logger.warning("%s: answer column is partly empty; dropped", csv_path.name)
        else:
            result["answer"] = _normalise_answers(frame, csv_path.name)
    result.attrs.update(image_column=image_column, source_csv=str(csv_path))
    return result


@contextlib.contextmanager
def _strict_pil_decoding(bomb_limit_pixels):
    # PIL's bomb guard reads a module global: swap in our limit, make its warning fatal, and
    # refuse truncated files even if some other library switched LOAD_TRUNCATED_IMAGES on.
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = bomb_limit_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _budget_size(size, max_pixels):
    scale = math.sqrt(max_pixels / (size[0] * size[1]))
    width, height = max(1, int(size[0] * scale)), max(1, int(size[1] * scale))
    while width * height > max_pixels and max(width, height) > 1:  # float rounding guard
        width, height = (width - 1, height) if width >= height else (width, height - 1)
    return width, height


def _high_depth_to_grayscale(img):
    pixels = np.asarray(img, dtype=np.float64)
    if pixels.max(initial=0) > 255:  # 16-bit data: map 0..65535 onto 0..255
        pixels = pixels / 257
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def _to_rgb_on_white(img):
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_depth_to_grayscale(img)
    if not img.has_transparency_data:
        return img.convert("RGB")
    # Transparent pixels often hide black RGB values; the model should see white paper instead.
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def _fit_qwen_side_limits(img):
    short_side, long_side = sorted(img.size)
    target_short = max(short_side, QWEN_MIN_IMAGE_SIDE)
    target_long = min(round(long_side * target_short / short_side),
                      QWEN_MAX_ASPECT_RATIO * target_short)
    if (target_short, target_long) == (short_side, long_side):
        return img
    landscape = img.size[0] >= img.size[1]
    size = (target_long, target_short) if landscape else (target_short, target_long)
    return img.resize(size, Image.Resampling.BICUBIC)


def load_image(path, max_pixels=None, bomb_limit_pixels=DEFAULT_BOMB_LIMIT_PIXELS):
    """Decode an image fully into RGB, upright, within max_pixels and Qwen's side limits."""
    try:
        with _strict_pil_decoding(bomb_limit_pixels), Image.open(path) as img:
            if max_pixels and img.size[0] * img.size[1] > max_pixels:
                img.draft(img.mode, _budget_size(img.size, max_pixels))  # JPEG: decode at 1/2..1/8
            img.load()  # full decode here, so truncated files fail now and not inside the trainer
            rgb = _to_rgb_on_white(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: image exceeds {bomb_limit_pixels} pixels (a possible decompression bomb: a small "
                        f"file that decodes to a huge image). If the image is genuine, set the setting "
                        f"bomb_limit_pixels above its size: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if max_pixels and rgb.size[0] * rgb.size[1] > max_pixels:
        rgb = rgb.resize(_budget_size(rgb.size, max_pixels), Image.Resampling.LANCZOS)
    return _fit_qwen_side_limits(rgb)


def check_images(df, csv_path, on_bad_image="error", max_pixels=None, bomb_limit_pixels=DEFAULT_BOMB_LIMIT_PIXELS):
    """Decode every image; raise one DataError listing all bad rows, or flag them (image_ok)."""
    if on_bad_image not in ("error", "blank"):
        raise ValueError(f"on_bad_image must be 'error' or 'blank', got {on_bad_image!r}")
    csv_name, column = Path(csv_path).name, df.attrs.get("image_column", "image_path")
    image_ok, bad_rows = [], []
    rows = tqdm(df.itertuples(), total=len(df), desc=f"checking images of {csv_name}",
                disable=len(df) < IMAGE_CHECK_PROGRESS_MIN_ROWS)
    for row in rows:
        try:
            load_image(row.image_path, max_pixels=max_pixels, bomb_limit_pixels=bomb_limit_pixels)
            image_ok.append(True)
        except DataError as exc:
            image_ok.append(False)
            bad_rows.append({"file": csv_name, "line": row.Index + 2, "id": row.id,
                             "column": column, "image_path": row.image_path, "reason": str(exc)})
    if bad_rows and on_bad_image == "error":
        _raise_data_problems(f"{csv_name}: unreadable images", [
            f"{_csv_row_ref(csv_name, bad['line'] - 2, bad['id'], column)}: {bad['reason']}"
            for bad in bad_rows])
    if bad_rows:
        logger.warning("%s: %d of %d images unreadable; they will be fed as blank images",
                       csv_name, len(bad_rows), len(df))
    return df.assign(image_ok=image_ok), bad_rows


def image_content_hash(path):
    """sha1 of the file bytes: identical images under different names share one hash."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha1").hexdigest()


def add_image_hashes(df):
    """df with `image_hash`: the image file's content hash (folds group by it; resume signs the rows with it)."""
    cache = {}
    return df.assign(image_hash=[_fold_group_key(path, cache) for path in df["image_path"]])


def _fold_group_key(path, cache):
    if path not in cache:
        try:
            cache[path] = image_content_hash(path)
        except OSError:  # a missing file (blank fallback) still needs a group of its own
            cache[path] = f"unreadable:{path}"
    return cache[path]


def make_folds(df, n_folds=3, seed=42, source="train.csv"):
    """Fold id per row: stratified by answer, grouped by identical image bytes."""
    if len(df) < n_folds:
        raise DataError(f"{source}: cannot make {n_folds} folds from {len(df)} rows. Fix: add rows, or set n_folds "
                        f"to at most {len(df)}")
    if "answer" not in df.columns:
        raise DataError("make_folds needs an 'answer' column (train data)")
    groups = np.asarray(df["image_hash"] if "image_hash" in df else add_image_hashes(df)["image_hash"])
    if len(set(groups)) < n_folds:
        raise DataError(f"{source}: cannot make {n_folds} folds: its {len(df)} rows have only {len(set(groups))} distinct "
                        f"image file(s). Rows are grouped by the bytes of their image (identical files, under any name, "
                        f"stay in one fold so that no image is in both training and validation). Fix: check that the "
                        f"image paths point to different pictures, or set n_folds to at most {len(set(groups))} (>= 2)")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_ids = np.full(len(df), -1, dtype=int)
    for fold, (_, held_out) in enumerate(splitter.split(groups, df["answer"], groups)):
        fold_ids[held_out] = fold
    return fold_ids


def probs_frame(ids, probs, **extra):
    frame = pd.DataFrame(probs, columns=PROB_COLUMNS)
    frame.insert(0, "id", list(ids))
    for key, value in extra.items():
        frame[key] = value
    return frame


def letters_from_probs(probs):
    return [OPTION_LETTERS[i] for i in np.asarray(probs).argmax(1)]


REVERSED_LETTERS = dict(zip(OPTION_LETTERS, reversed(OPTION_LETTERS)))  # a <-> d, b <-> c


def with_reversed_copies(frame, ids):
    """`frame` plus, for each row whose id is in `ids`, a copy with its options in reversed order (d, c, b, a)
    and its answer moved with them; the copy's id ends in "#reversed". Hard rows seen twice, in two orders."""
    hard = frame[frame["id"].astype(str).isin(set(ids))]
    if hard.empty:
        return frame
    copies = hard.copy()
    for letter in OPTION_LETTERS:
        copies[letter] = hard[REVERSED_LETTERS[letter]].to_numpy()
    copies["answer"] = hard["answer"].map(REVERSED_LETTERS)
    copies["id"] = hard["id"].astype(str) + "#reversed"
    return pd.concat([frame, copies], ignore_index=True)

# %% Your image transform (edit this cell in a fork)
def custom_image_transform(image, rng):
    """Your own image transform, used with `image_transform=custom` (on training batches, or every pass with
    `image_transform_on=train+test`): a PIL RGB image in, a PIL RGB image out. `rng` is a numpy Generator seeded by
    (seed, fold, epoch, row), so a resumed run draws the same. Declaring it in the settings makes the feature cache
    step aside, and a resume into the same output_dir stops if this code changed (runkit/resume.py)."""
    return image


# %% Image transforms: the light one, and which pass gets which
def light_image_transform(image, rng):
    """The 0.972 Gemma 4 single model's light augmentation: a small shift and rotation, a slight blur half of the
    time, re-encoded as JPEG at quality 65-80. Option order and text are untouched (shuffle_options does those)."""
    width, height = image.size
    angle = float(rng.uniform(-3, 3))
    shift = (float(rng.uniform(-0.02, 0.02)) * width, float(rng.uniform(-0.02, 0.02)) * height)
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=shift, fillcolor=(255, 255, 255))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(65, 81)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


class SeededTransform:
    """A transform with its seed: `(image, row) -> image`, drawing from (seed..., row). Picklable (loader workers)."""

    def __init__(self, name, seed):
        self.name, self.seed = name, [int(s) for s in seed]

    def __call__(self, image, row):
        # Looked up at call time, so an edited custom_image_transform cell is what runs.
        transform = custom_image_transform if self.name == "custom" else light_image_transform
        return transform(image, np.random.default_rng(self.seed + [int(row)]))


def image_transform_for(cfg, split, seed=()):
    """The transform a pass's images go through, or None. split: "train" (training batches) or "test" (validation,
    out-of-fold and test passes, which see it only with image_transform_on=train+test)."""
    if cfg.image_transform == "none" or (split != "train" and cfg.image_transform_on == "train"):
        return None
    return SeededTransform(cfg.image_transform, [cfg.seed, *seed])
