"""## Demo data: a tiny synthetic multiple-choice VQA set

This step draws a small, deterministic dataset in the competition layout (`train.csv`, `test.csv`,
`sample_submission.csv`, PNG images) plus a labelled hold-out `test_answers.csv`, so the whole
pipeline can be shown end to end on a CPU. Every question asks about the colour, shape, count or
position of simple shapes. The options of a question type are always the same four values in the
same order, and every answer is equally likely, so the text alone says nothing: a model that ignores
the image scores about 25%, and anything above that is learned from the pixels.

Why a fixed option order: the demo's 2-layer model learns "image -> letter" in minutes, but not
"find the option whose text matches the image" (a matching circuit it did not form in 2,000 full
warm-up steps; measured). Real Qwen-VL models read options fine; there, shuffled options in
training and option-order TTA help, and the `demo` profile turns both off only because its
options never move.
"""
import json
import pathlib

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ..core.data import OPTION_LETTERS
from ..machinery.files import atomic_write

DEMO_QUESTION_TYPES = ("colour", "shape", "count", "position")
# Far-apart RGB values so every colour stays unambiguous on a light background.
DEMO_COLOURS = {
    "빨간색": (220, 30, 30),
    "파란색": (30, 70, 220),
    "초록색": (30, 160, 50),
    "노란색": (235, 200, 0),
}
DEMO_SHAPES = ("원", "사각형", "삼각형", "별")  # drawable besides: "십자가", "마름모"
DEMO_COUNTS = ("1개", "2개", "3개", "4개")
# Order matters: index -> (column, row) of the quadrant.
DEMO_POSITIONS = ("왼쪽 위", "오른쪽 위", "왼쪽 아래", "오른쪽 아래")
_DEMO_QUESTIONS = {
    "colour": "그림 속 도형은 무슨 색입니까?",
    "shape": "그림 속 도형의 모양은 무엇입니까?",
    "count": "그림에 도형이 몇 개 있습니까?",
    "position": "도형은 그림의 어느 부분에 있습니까?",
}
_DEMO_VOCAB = {
    "colour": tuple(DEMO_COLOURS),
    "shape": DEMO_SHAPES,
    "count": DEMO_COUNTS,
    "position": DEMO_POSITIONS,
}
DEMO_MARKER = "DEMO_DATASET.json"
_DEMO_VERSION = 3  # bump when the drawing changes so old folders are regenerated


def _demo_draw_shape(draw, shape, cx, cy, size, rgb):
    """Draw one filled shape whose bounding box is `size` px, centred on (cx, cy)."""
    r = size / 2
    if shape == "원":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "사각형":
        q = r * 0.85  # slightly smaller so its area is close to the circle's
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=rgb)
    elif shape == "삼각형":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=rgb)
    elif shape == "십자가":
        t = r * 0.34
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=rgb)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=rgb)
    elif shape == "마름모":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "별":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _demo_place_apart(rng, k, s):
    """k (cx, cy, size) boxes, one per distinct quadrant, each large but inside its quadrant.

    Large objects, one per quadrant, keep the task learnable for the demo's tiny vision tower,
    which sees a 56 px image as 2x2 merged tokens (one per quadrant)."""
    boxes = []
    for quadrant in rng.permutation(4)[:k]:
        col, row = quadrant % 2, quadrant // 2
        size = rng.uniform(0.30, 0.40) * s
        cx, cy = (np.array([col, row]) * 0.5 + 0.25 + rng.uniform(-0.03, 0.03, size=2)) * s
        boxes.append((cx, cy, size))
    return boxes


def _demo_render(qtype, answer, rng, s):
    """Draw the image for one question; only `answer` (plus noise) decides what is drawn."""
    bg = tuple(int(v) for v in rng.integers(228, 256, size=3))  # light random tint
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    colour = DEMO_COLOURS[answer] if qtype == "colour" else DEMO_COLOURS[rng.choice(_DEMO_VOCAB["colour"])]
    shape = answer if qtype == "shape" else str(rng.choice(DEMO_SHAPES))
    if qtype == "count":
        for cx, cy, size in _demo_place_apart(rng, DEMO_COUNTS.index(answer) + 1, s):
            pick = DEMO_COLOURS[rng.choice(_DEMO_VOCAB["colour"])]
            _demo_draw_shape(draw, str(rng.choice(DEMO_SHAPES)), cx, cy, size, pick)
    elif qtype == "position":
        col, row = DEMO_POSITIONS.index(answer) % 2, DEMO_POSITIONS.index(answer) // 2
        # Centre of the quadrant with small jitter: the shape stays well inside it.
        cx, cy = (np.array([col, row]) * 0.5 + 0.25 + rng.uniform(-0.05, 0.05, size=2)) * s
        _demo_draw_shape(draw, shape, cx, cy, rng.uniform(0.30, 0.38) * s, colour)
    else:
        cx, cy = s / 2 + rng.uniform(-0.05, 0.05, size=2) * s
        _demo_draw_shape(draw, shape, cx, cy, rng.uniform(0.65, 0.80) * s, colour)
    return img


def _demo_options(qtype):
    """The type's four values, always in the same order (see the module note for why)."""
    return [str(v) for v in _DEMO_VOCAB[qtype]]


def _demo_save_png(img, path):
    # Written whole or not at all: an interrupted run never leaves a truncated image; PIL adds no metadata.
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _demo_write_csv(df, path):
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, encoding="utf-8"))


def _demo_make_split(out, split, n, s, rng):
    """Render one split; returns rows (with answers) and the per-row question type."""
    (out / split).mkdir(parents=True, exist_ok=True)
    # Balanced permutations: types appear evenly and each answer letter is used ~n/4 times.
    qtypes = rng.permutation(np.arange(n) % len(DEMO_QUESTION_TYPES))
    letters = rng.permutation(np.arange(n) % 4)
    width = max(3, len(str(max(n - 1, 0))))
    rows, meta = [], []
    for i in range(n):
        qtype = DEMO_QUESTION_TYPES[qtypes[i]]
        options = _demo_options(qtype)
        answer = options[int(letters[i])]
        row_id = f"{split.upper()}_{i:0{width}d}"
        rel = f"{split}/{row_id}.png"
        _demo_save_png(_demo_render(qtype, answer, rng, s), out / rel)
        rows.append([row_id, rel, _DEMO_QUESTIONS[qtype], *options, OPTION_LETTERS[int(letters[i])]])
        meta.append([row_id, split, qtype])
    return pd.DataFrame(rows, columns=["id", "path", "question", "a", "b", "c", "d", "answer"]), meta


def write_competition_folder(out, train, test, meta_rows, meta_name, marker, args):
    """A synthetic competition in the real layout: train.csv, test.csv (no answers), sample_submission.csv, the
    hold-out's test_answers.csv, the rows' question types in `meta_name`, and the marker with `args` last (its
    presence means everything above finished). Returns `out`."""
    _demo_write_csv(train, out / "train.csv")
    _demo_write_csv(test.drop(columns="answer"), out / "test.csv")
    _demo_write_csv(test[["id"]].assign(answer="a"), out / "sample_submission.csv")
    _demo_write_csv(test[["id", "answer"]], out / "test_answers.csv")
    _demo_write_csv(pd.DataFrame(meta_rows, columns=["id", "split", "qtype"]), out / meta_name)
    atomic_write(marker, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(args, sort_keys=True), encoding="utf-8"))
    return out


def _demo_marker_matches(marker, args):
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == args
    except (OSError, ValueError):
        return False


def generate_demo_dataset(out_dir, n_train=300, n_test=100, image_size=112, seed=0):
    """Write the demo dataset into out_dir (skipped if an identical one is already complete)."""
    out = pathlib.Path(out_dir)
    args = {"n_train": int(n_train), "n_test": int(n_test), "image_size": int(image_size),
            "seed": int(seed), "version": _DEMO_VERSION}
    marker = out / DEMO_MARKER
    if _demo_marker_matches(marker, args):
        return out
    if image_size < 64:
        raise ValueError("image_size must be at least 64 so four shapes fit side by side")
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a stale marker must not vouch for a half-rewritten folder
    # Independent streams per split, so the test set doesn't change when n_train does.
    rng_train, rng_test = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    train, train_meta = _demo_make_split(out, "train", args["n_train"], args["image_size"], rng_train)
    test, test_meta = _demo_make_split(out, "test", args["n_test"], args["image_size"], rng_test)
    return write_competition_folder(out, train, test, train_meta + test_meta, "demo_meta.csv", marker, args)
