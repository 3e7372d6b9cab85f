"""## Reader stand-in data: a synthetic competition that cannot be solved without reading the options

The demo data (demo_data.py) keeps every question type's options in one fixed order, so its tiny model
learns "image -> letter" and never reads the options; on it, option shuffling and option-order TTA can only
hurt. This generator draws the competition the recipe is made for: several objects per image (1-4 shapes,
each with its own colour, in distinct quadrants), six Korean question types, the four options drawn from the
type's answer space in a random order per question, short Korean words drawn in the image, and a letter prior that is not uniform (by default
40/25/20/15 % for a/b/c/d, as real multiple-choice sets lean to some letters). A model that ignores the
options can score at most the prior's 40 %; one that reads them can score far more, and a model trained on
the stored orders learns the prior as a letter-position bias, which is what option-order TTA and shuffled
training are there to remove.

Question types (every answer value is a short word the tiny tokenizer keeps whole):
- `colour`: which of these colours is in the picture (one present, three absent);
- `shape`: which of these shapes is in the picture (one present, three absent);
- `count`: how many shapes (the four counts in a random order);
- `position`: where is the shape of a named colour (the four quadrants in a random order);
- `category`: which option is a colour (or a shape) name, the others words of other kinds: answered by reading
  the options alone, the lookup the other types need too (without it the tiny model stayed at the prior);
- `word`: which word is written in the picture (one Korean word drawn large across the top or bottom half, up to
  two shapes in the other half; the words are pasted from a committed glyph atlas, `reader_words.png`, drawn once
  from NanumGothic Bold by bench/build_reader_words.py, so no Hangul font is needed to generate the data).

Same layout as the demo: `train.csv`, `test.csv` (id, path, question, a-d [, answer]), `sample_submission.csv`,
PNG images, the labelled hold-out `test_answers.csv`, and `reader_meta.csv` (question type per row).
"""
import functools
import pathlib

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ..core.data import OPTION_LETTERS
from .demo_data import (DEMO_POSITIONS, _demo_draw_shape, _demo_marker_matches, _demo_save_png,
                        write_competition_folder)

READER_QUESTION_TYPES = ("colour", "shape", "count", "position", "category", "word")
# Six far-apart colours: three can be absent from an image of up to three objects.
READER_COLOURS = {
    "빨간색": (220, 30, 30), "파란색": (30, 70, 220), "초록색": (30, 160, 50),
    "노란색": (235, 200, 0), "보라색": (140, 40, 170), "검은색": (20, 20, 20),
}
READER_SHAPES = ("원", "사각형", "삼각형", "별", "십자가", "마름모")
READER_COUNTS = ("1개", "2개", "3개", "4개")
# Words of different lengths and outlines (1-3 syllables): told apart by their drawing, not by one glyph.
READER_WORDS = ("사과", "고양이", "바다", "자동차", "꽃", "우산")
READER_WORDS_ATLAS = pathlib.Path(__file__).with_name("reader_words.png")  # one grey mask per word, stacked
READER_WORD_CELL = (96, 40)  # (width, height) of one word's mask in the atlas
READER_POSITIONS = DEMO_POSITIONS  # index -> quadrant (column = index % 2, row = index // 2)
# Every answer value of every type (the lookup type's options; the tokenizer and its one-token check read them too).
READER_VALUES = (*READER_COLOURS, *READER_SHAPES, *READER_COUNTS, *READER_POSITIONS, *READER_WORDS)
READER_QUESTIONS = {
    "colour": "다음 중 그림에 있는 색은 무엇입니까?",
    "shape": "다음 중 그림에 있는 도형은 무엇입니까?",
    "count": "그림에 도형이 몇 개 있습니까?",
    "position": "{colour} 도형은 그림의 어느 부분에 있습니까?",
    "category": "다음 중 {kind} 이름은 무엇입니까?",
    "word": "그림에 쓰인 단어는 무엇입니까?",
    "lookup": "다음 중 {value}인 것은 무엇입니까?",
}
# Pre-training only (ReaderSpec.question_types), not in the competition: "which option is <the named value>", a
# string match that teaches the letter lookup alone (the curriculum run 46 tries).
READER_LOOKUP_TYPE = "lookup"
# The category question's kinds: its answer is a word of that kind, its distractors words of the other kinds.
_READER_KINDS = {"색": tuple(READER_COLOURS), "도형": READER_SHAPES}
# The answer position's prior (a, b, c, d): real sets are not uniform, and the bias it plants is measurable.
DEFAULT_LETTER_PRIOR = (0.40, 0.25, 0.20, 0.15)
_READER_MARKER = "READER_DATASET.json"
_READER_VERSION = 2  # bump when the drawing or the questions change so old folders are regenerated


def _reader_objects(rng, k, colours=None, shapes=None):
    """k objects [(quadrant, colour, shape)] in distinct quadrants; colours/shapes default to random picks."""
    quadrants = rng.permutation(4)[:k]
    colours = colours if colours is not None else rng.choice(list(READER_COLOURS), size=k)
    shapes = shapes if shapes is not None else rng.choice(READER_SHAPES, size=k)
    return [(int(q), str(c), str(s)) for q, c, s in zip(quadrants, colours, shapes)]


def _reader_question(qtype, rng):
    """(question text, objects to draw, answer value, three distractor values) for one row."""
    if qtype == "colour":
        k = int(rng.integers(1, 4))
        colours = list(rng.permutation(list(READER_COLOURS)))
        objects = _reader_objects(rng, k, colours=colours[:k])  # distinct colours: the rest are absent
        return READER_QUESTIONS[qtype], objects, colours[int(rng.integers(k))], colours[k:k + 3]
    if qtype == "shape":
        k = int(rng.integers(1, 4))
        shapes = list(rng.permutation(READER_SHAPES))
        objects = _reader_objects(rng, k, shapes=shapes[:k])
        return READER_QUESTIONS[qtype], objects, shapes[int(rng.integers(k))], shapes[k:k + 3]
    if qtype == "count":
        k = int(rng.integers(1, 5))
        answer = READER_COUNTS[k - 1]
        return READER_QUESTIONS[qtype], _reader_objects(rng, k), answer, [c for c in READER_COUNTS if c != answer]
    if qtype == "position":
        k = int(rng.integers(1, 5))
        objects = _reader_objects(rng, k, colours=list(rng.permutation(list(READER_COLOURS)))[:k])
        quadrant, colour, _ = objects[int(rng.integers(k))]
        answer = READER_POSITIONS[quadrant]
        question = READER_QUESTIONS[qtype].format(colour=colour)
        return question, objects, answer, [p for p in READER_POSITIONS if p != answer]
    if qtype == "category":
        # Answered by reading the options alone (the image is drawn but says nothing): the lookup "which option
        # is the one asked for -> its letter" that the image types need too, and that a tiny model learns first.
        kind = str(rng.choice(list(_READER_KINDS)))
        others = [w for k, words in _READER_KINDS.items() if k != kind for w in words] + list(READER_COUNTS)
        question = READER_QUESTIONS[qtype].format(kind=kind)
        return question, _reader_objects(rng, int(rng.integers(1, 5))), str(rng.choice(_READER_KINDS[kind])), \
            list(rng.choice(others, size=3, replace=False))
    if qtype == READER_LOOKUP_TYPE:
        picked = [str(v) for v in rng.choice(READER_VALUES, size=4, replace=False)]
        return READER_QUESTIONS[qtype].format(value=picked[0]), _reader_objects(rng, int(rng.integers(1, 5))), \
            picked[0], picked[1:]
    if qtype == "word":
        # The word fills the top or bottom half (quadrants 0-1 or 2-3), up to two shapes sit in the other half:
        # objects carry the word as their shape, in the half's left quadrant, and _reader_render draws it.
        words = list(rng.permutation(READER_WORDS))
        half = int(rng.integers(2))
        shapes = [(int(q), str(c), str(s)) for q, c, s in zip(rng.permutation([2 - 2 * half, 3 - 2 * half]),
                                                           rng.choice(list(READER_COLOURS), size=2),
                                                           rng.choice(READER_SHAPES, size=2))]
        objects = [(2 * half, str(rng.choice(list(READER_COLOURS))), words[0])] + shapes[:int(rng.integers(3))]
        return READER_QUESTIONS[qtype], objects, words[0], words[1:4]
    raise ValueError(f"unknown question type {qtype!r}")


@functools.lru_cache(maxsize=None)
def _reader_word_masks():
    """{word: its grey-level mask (L image, READER_WORD_CELL)} from the committed atlas, read once."""
    width, height = READER_WORD_CELL
    with Image.open(READER_WORDS_ATLAS) as atlas:
        grey = atlas.convert("L")
    return {word: grey.crop((0, row * height, width, (row + 1) * height)) for row, word in enumerate(READER_WORDS)}


def _reader_word_mask(word):
    return _reader_word_masks()[word]


def _reader_draw_word(img, word, half, colour, rng):
    """Paste the word in `colour` across the top (half 0) or bottom (1) half, 80-90 % of the image wide."""
    s = img.size[0]
    width = int(rng.uniform(0.8, 0.9) * s)
    height = max(1, round(width * READER_WORD_CELL[1] / READER_WORD_CELL[0]))
    mask = _reader_word_mask(word).resize((width, height), Image.BILINEAR)
    x = int((s - width) / 2 + rng.uniform(-0.03, 0.03) * s)
    y = int((half + 0.5) * s / 2 - height / 2 + rng.uniform(-0.03, 0.03) * s)
    img.paste(Image.new("RGB", mask.size, READER_COLOURS[colour]), (x, y), mask)


def _reader_render(objects, rng, s):
    """Each object large in its own quadrant (the tiny vision tower sees a quadrant as a few merged tokens)."""
    img = Image.new("RGB", (s, s), tuple(int(v) for v in rng.integers(228, 256, size=3)))
    draw = ImageDraw.Draw(img)
    for quadrant, colour, shape in objects:
        if shape in READER_WORDS:  # a word: drawn across its half (the `word` question type)
            _reader_draw_word(img, shape, quadrant // 2, colour, rng)
            continue
        col, row = quadrant % 2, quadrant // 2
        cx, cy = (np.array([col, row]) * 0.5 + 0.25 + rng.uniform(-0.03, 0.03, size=2)) * s
        _demo_draw_shape(draw, shape, cx, cy, rng.uniform(0.32, 0.42) * s, READER_COLOURS[colour])
    return img


def _reader_options(answer, distractors, letter, rng):
    """The answer at `letter`, the distractors in a random order around it."""
    others = [str(d) for d in rng.permutation(distractors)]
    return others[:letter] + [str(answer)] + others[letter:]


def _reader_make_split(out, split, n, s, rng, prior, types=READER_QUESTION_TYPES):
    """Render one split: rows (with answers) and the question type per row."""
    (out / split).mkdir(parents=True, exist_ok=True)
    qtypes = rng.permutation(np.arange(n) % len(types))  # types appear evenly
    letters = rng.choice(4, size=n, p=np.asarray(prior) / np.sum(prior))  # the planted letter prior
    width = max(3, len(str(max(n - 1, 0))))
    rows, meta = [], []
    for i in range(n):
        qtype = types[qtypes[i]]
        question, objects, answer, distractors = _reader_question(qtype, rng)
        row_id = f"{split.upper()}_{i:0{width}d}"
        rel = f"{split}/{row_id}.png"
        _demo_save_png(_reader_render(objects, rng, s), out / rel)
        options = _reader_options(answer, distractors, int(letters[i]), rng)
        rows.append([row_id, rel, question, *options, OPTION_LETTERS[int(letters[i])]])
        meta.append([row_id, split, qtype])
    return pd.DataFrame(rows, columns=["id", "path", "question", "a", "b", "c", "d", "answer"]), meta


def reader_texts():
    """Every word the questions and options use: the stand-in's tokenizer is trained on them (plus the data)."""
    words = list(READER_VALUES)
    questions = [READER_QUESTIONS[t].format(colour=c, kind=k) for t in READER_QUESTION_TYPES for c in READER_COLOURS
                 for k in _READER_KINDS]
    return words + questions


def generate_reader_dataset(out_dir, n_train=400, n_test=200, image_size=112, seed=0,
                            letter_prior=DEFAULT_LETTER_PRIOR, test_letter_prior=None, question_types=None):
    """Write the reader stand-in competition into out_dir (skipped if an identical one is already complete).

    `test_letter_prior` (None: the train prior, as in a real competition): e.g. (1, 1, 1, 1) makes a hold-out on
    which any letter preference is pure bias, the cleanest place to see what TTA and shuffling do to it.
    `question_types` (None: READER_QUESTION_TYPES): the types drawn, evenly (pre-training may add "lookup")."""
    types = tuple(question_types or READER_QUESTION_TYPES)
    unknown = set(types) - set(READER_QUESTIONS)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}: choose from {list(READER_QUESTIONS)}")
    out = pathlib.Path(out_dir)
    test_letter_prior = letter_prior if test_letter_prior is None else test_letter_prior
    args = {"n_train": int(n_train), "n_test": int(n_test), "image_size": int(image_size), "seed": int(seed),
            "letter_prior": [float(p) for p in letter_prior], "version": _READER_VERSION}
    if list(test_letter_prior) != list(letter_prior):
        args["test_letter_prior"] = [float(p) for p in test_letter_prior]
    if types != READER_QUESTION_TYPES:
        args["question_types"] = list(types)
    marker = out / _READER_MARKER
    if _demo_marker_matches(marker, args):
        return out
    for prior in (letter_prior, test_letter_prior):
        if len(prior) != 4 or min(prior) < 0 or sum(prior) <= 0:
            raise ValueError(f"a letter prior is four non-negative weights (a, b, c, d), got {prior!r}")
    if image_size < 56:
        raise ValueError("image_size must be >= 56 so that four shapes fit side by side")
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a stale marker must not vouch for a half-rewritten folder
    # Independent streams per split, so the test set doesn't change when n_train does.
    rng_train, rng_test = (np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 26]).spawn(2))
    train, train_meta = _reader_make_split(out, "train", args["n_train"], args["image_size"], rng_train, letter_prior,
                                           types)
    test, test_meta = _reader_make_split(out, "test", args["n_test"], args["image_size"], rng_test, test_letter_prior,
                                         types)
    return write_competition_folder(out, train, test, train_meta + test_meta, "reader_meta.csv", marker, args)


def letter_rates(letters):
    """Share of each letter a-d among `letters` (indices 0-3 or 'a'-'d')."""
    indices = [OPTION_LETTERS.index(x) if isinstance(x, str) else int(x) for x in letters]
    return np.bincount(indices, minlength=4) / max(1, len(indices))


def letter_bias(probs, answers):
    """Letter-position bias of predictions: the total-variation distance between the predicted letters' shares and
    the true answers' shares (0: the model picks each letter as often as it is right; 0.15: it over-picks one
    letter by 15 points). Measured on the same rows, it compares TTA and single-view predictions fairly."""
    return float(0.5 * np.abs(letter_rates(np.asarray(probs).argmax(1)) - letter_rates(answers)).sum())


def letter_lean(probs, answers):
    """The soft letter-position bias: the total-variation distance between the mean predicted probability of each
    letter and the true answers' shares. Unlike letter_bias it still moves when one letter wins every argmax (a
    weak reader's single view): it shows training that flattens the lean before it flips any pick."""
    return float(0.5 * np.abs(np.asarray(probs, dtype=float).mean(0) - letter_rates(answers)).sum())
