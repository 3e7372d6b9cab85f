"""Recipe regression test (issue 26): on the reader stand-in, the recipe's option tricks must do their job.

The stand-in (mcvqa/demo/reader_model.py; committed under data/reader_model/, rebuilt by its builder when absent)
reads its options (0.57 with them permuted) and leans to the letters its pre-training data favoured (prior
40/25/20/15). It is fine-tuned here through the product's own CLI, twice: the recipe (options shuffled in training,
4 option orders at test time) and the same trained on the stored, prior-following orders (the planted bias). The
hold-out's answers are spread evenly over a-d, so any letter the predictions favour is bias. Asserted:
- option-order TTA cancels the planted letter bias (on the stored-orders run: the TTA predictions' bias below half
  the single view's, and their accuracy higher);
- shuffled training reduces it (the single view's bias and lean after shuffled training below the stored orders');
- the fine-tuned stand-in reads (4-order accuracy far above chance).
Measured (2026-12-06, 2 CPU cores, the stand-in of run 52): stored orders: bias 0.394 single view -> 0.069 with 4
orders, accuracy 0.519 -> 0.650; single view after shuffled training: bias 0.088 (stored orders 0.394), lean 0.059
(0.159); the recipe's 4-order accuracy 0.600 (160 rows, even letters; chance 0.25); the Qwen3.5 stand-in (run 63,
stored orders): bias 0.506 single view -> 0.069 with 4 orders, accuracy 0.456 -> 0.500.
Seen failing, each with its feature switched off: RECIPE_TEST_OFF=tta (tta_option_views=1 in both runs): the TTA
tests, bias 0.394 -> 0.394 and (Qwen3.5) 0.506 -> 0.506; RECIPE_TEST_OFF=shuffle (shuffle_options=false in the
recipe run): the shuffle test, bias 0.394 vs 0.394.
"""

import json
import os
import pathlib

import numpy as np
import pandas as pd
import pytest
import torch

from mcvqa.cli import main as cli_main
from mcvqa.core.data import PROB_COLUMNS
from mcvqa.demo.reader_data import READER_WORDS, _reader_word_mask, generate_reader_dataset, letter_bias, letter_lean
from mcvqa.demo.reader_model import ReaderSpec, _set_depth, build_reader_model

REPO = pathlib.Path(__file__).resolve().parents[1]
# RECIPE_TEST_MODEL: another stand-in folder, used as it is (the committed one is checked against its builder).
READER_MODEL = pathlib.Path(os.environ.get("RECIPE_TEST_MODEL", REPO / "data" / "reader_model" / "qwen2_5_vl"))
OFF = os.environ.get("RECIPE_TEST_OFF", "")  # tta | shuffle: switch that feature off to see its assertion fail
IMAGE_PIXELS = ReaderSpec().image_size ** 2


def _fine_tune(data_dir, out_dir, **settings):
    """One run of the product's CLI on the stand-in (fold 0 of 2, the demo profile's training), returning the run
    folder."""
    overrides = {"demo": "false", "data_dir": data_dir, "model_name_or_path": READER_MODEL, "output_dir": out_dir,
                 "min_pixels": IMAGE_PIXELS, "max_pixels": IMAGE_PIXELS, "n_folds": 2, "folds": "0", "epochs": 2,
                 "seed": 0, **settings}
    assert cli_main(["run", "--profile", "demo", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    return pathlib.Path(out_dir)


def _holdout(run, data_dir, name):
    """(probabilities [n, 4] in the original option order, answer letters) of the hold-out rows."""
    probs = pd.read_csv(run / name)
    answers = pd.read_csv(data_dir / "test_answers.csv").set_index("id")["answer"]
    return probs[PROB_COLUMNS].to_numpy(), probs["id"].map(answers).to_numpy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The stand-in (built once if not committed), a small reader competition with an even hold-out, and the two
    fine-tunes: the recipe and the same on the stored option orders."""
    if not (READER_MODEL / "READER_MODEL.json").exists():
        # The committed folder was pre-trained on a GPU (data/reader_model/README.md); absent, the default spec
        # (run 50) builds one on the CPU (about 25 minutes; it reads less well: 0.37 permuted, not 0.57).
        build_reader_model(READER_MODEL)
    root = tmp_path_factory.mktemp("recipe")
    data = generate_reader_dataset(root / "data", n_train=480, n_test=160, seed=5, test_letter_prior=(1, 1, 1, 1))
    views = 1 if OFF == "tta" else 4
    return {"data": data,
            "recipe": _fine_tune(data, root / "recipe", shuffle_options="false" if OFF == "shuffle" else "true",
                                 tta_option_views=views),
            # Trained on the stored, prior-following orders: the planted letter bias survives into its single view.
            "stored_orders": _fine_tune(data, root / "stored", shuffle_options="false", tta_option_views=views)}


def _accuracy(probs, answers):
    return (probs.argmax(1) == np.array(["abcd".index(a) for a in answers])).mean()


def test_option_order_tta_cancels_the_letter_bias(runs):
    """On the run trained on the stored orders (the bias planted by the prior), 4 option orders at test time cancel
    most of the bias and raise the accuracy."""
    single, answers = _holdout(runs["stored_orders"] / "fold0", runs["data"], "test_probs_view0.csv")
    tta, _ = _holdout(runs["stored_orders"] / "fold0", runs["data"], "test_probs.csv")
    print(f"bias: single view {letter_bias(single, answers):.3f}, 4-order TTA {letter_bias(tta, answers):.3f}; "
          f"accuracy {_accuracy(single, answers):.3f} -> {_accuracy(tta, answers):.3f}")
    assert letter_bias(tta, answers) < 0.5 * letter_bias(single, answers)
    # A reader whose bias is cancelled answers more rows right (0.519 -> 0.650 measured; 160 rows).
    assert _accuracy(tta, answers) > _accuracy(single, answers) + 0.05


def test_shuffled_training_reduces_the_letter_bias(runs):
    shuffled, answers = _holdout(runs["recipe"] / "fold0", runs["data"], "test_probs_view0.csv")
    stored, _ = _holdout(runs["stored_orders"] / "fold0", runs["data"], "test_probs_view0.csv")
    print(f"single view: bias {letter_bias(shuffled, answers):.3f} after shuffled training, "
          f"{letter_bias(stored, answers):.3f} after the stored orders; lean {letter_lean(shuffled, answers):.3f} vs "
          f"{letter_lean(stored, answers):.3f}")
    assert letter_bias(shuffled, answers) < 0.5 * letter_bias(stored, answers)
    # The soft lean (mean probabilities) too: it does not saturate when a weaker reader picks one letter always.
    assert letter_lean(shuffled, answers) < letter_lean(stored, answers) - 0.015


def test_option_order_tta_cancels_the_letter_bias_on_qwen3_5(runs):
    """The same on the Qwen3.5 stand-in (hybrid DeltaNet layers; its answer letter after the empty think block),
    fine-tuned through the CLI on the same data's stored orders: the 4-order TTA's bias far below its single view's.
    (Its accuracy rises too, 0.456 -> 0.500, but by less than the 0.05 the Qwen2.5-VL test asserts: not asserted.)"""
    model = READER_MODEL.parent / "qwen3_5"
    if "RECIPE_TEST_MODEL" in os.environ or not (model / "READER_MODEL.json").exists():
        pytest.skip("the committed Qwen3.5 stand-in (data/reader_model/qwen3_5) only")
    run = _fine_tune(runs["data"], runs["data"].parent / "qwen3_5", model_name_or_path=model, shuffle_options="false",
                     tta_option_views=1 if OFF == "tta" else 4) / "fold0"
    single, answers = _holdout(run, runs["data"], "test_probs_view0.csv")
    tta, _ = _holdout(run, runs["data"], "test_probs.csv")
    print(f"Qwen3.5 bias: single view {letter_bias(single, answers):.3f}, 4-order TTA {letter_bias(tta, answers):.3f}; "
          f"accuracy {_accuracy(single, answers):.3f} -> {_accuracy(tta, answers):.3f}")
    assert letter_bias(tta, answers) < 0.5 * letter_bias(single, answers)


def test_the_stand_in_reads_its_options(runs):
    """With its bias cancelled (4 option orders) the fine-tuned stand-in is far above chance on the even hold-out: it
    reads the options (0.600 measured, 160 rows; chance 0.25). Without reading, no TTA could get there."""
    tta, answers = _holdout(runs["recipe"] / "fold0", runs["data"], "test_probs.csv")
    accuracy = _accuracy(tta, answers)
    print(f"hold-out accuracy with 4 option orders: {accuracy:.3f} (chance 0.25)")
    assert accuracy > 0.45


def test_reader_data_layout_prior_and_options(tmp_path):
    """The competition layout of the demo, four distinct options per row in a new order each time, the answer at
    the prior's letters (40/25/20/15 by default) and an even hold-out when asked for."""
    out = generate_reader_dataset(tmp_path, n_train=400, n_test=200, image_size=56, seed=1,
                                  test_letter_prior=(1, 1, 1, 1))
    for name in ("train.csv", "test.csv", "sample_submission.csv", "test_answers.csv", "reader_meta.csv"):
        assert (out / name).exists()
    train, test = pd.read_csv(out / "train.csv"), pd.read_csv(out / "test.csv")
    assert list(test.columns) == ["id", "path", "question", "a", "b", "c", "d"]
    assert all((out / p).exists() for p in pd.concat([train["path"], test["path"]]))
    options = train[["a", "b", "c", "d"]].to_numpy()
    assert all(len(set(row)) == 4 for row in options)
    assert len({tuple(row) for row in options}) > 100  # the options move: no fixed order per question type
    rates = train["answer"].value_counts(normalize=True)
    assert rates["a"] > rates["b"] > rates["d"] and abs(rates["a"] - 0.40) < 0.07
    held = pd.read_csv(out / "test_answers.csv")["answer"].value_counts(normalize=True)
    assert (held - 0.25).abs().max() < 0.1  # 200 rows: sampling noise ~0.03 a letter
    assert generate_reader_dataset(tmp_path, n_train=400, n_test=200, image_size=56, seed=1,
                                   test_letter_prior=(1, 1, 1, 1)) == out  # cached: the marker matches
    # The word type: its answer is one of the drawn words, and every word's mask in the atlas has ink of its own.
    meta = pd.read_csv(out / "reader_meta.csv").set_index("id")["qtype"]
    words = train[train["id"].map(meta) == "word"]
    assert len(words) > 50 and set(words.apply(lambda r: r[r["answer"]], axis=1)) == set(READER_WORDS)
    masks = [np.asarray(_reader_word_mask(w)) > 128 for w in READER_WORDS]
    assert all(m.sum() > 100 for m in masks) and len({m.tobytes() for m in masks}) == len(READER_WORDS)


def test_reader_lookup_rows_name_their_answer(tmp_path):
    """The pre-training-only `lookup` type: the question names the answer's value and no other option's; an unknown
    type is refused with the known ones named."""
    out = generate_reader_dataset(tmp_path, n_train=60, n_test=4, image_size=56, seed=3,
                                  question_types=("colour", "lookup"))
    train = pd.read_csv(out / "train.csv")
    lookup = train[train["question"].str.endswith("인 것은 무엇입니까?")]
    assert len(lookup) == 30
    for row in lookup.itertuples():
        named = row.question.removeprefix("다음 중 ").removesuffix("인 것은 무엇입니까?")
        assert getattr(row, row.answer) == named and [getattr(row, x) for x in "abcd"].count(named) == 1
    with pytest.raises(ValueError, match="unknown question types"):
        generate_reader_dataset(tmp_path / "bad", question_types=("colour", "colours"))


def test_reader_builder_continues_a_folder(tmp_path):
    """`init_from` continues an earlier build (its tokenizer and weights; the run-45 experiment): with a zero
    learning rate the continued folder's weights equal the earlier one's, and a fresh build's do not."""
    from safetensors.torch import load_file

    small = dict(hidden_size=64, layers=2, pretrain_rows=64, warmup_epochs=0, steps=4, batch_size=16)
    data = generate_reader_dataset(tmp_path / "data", n_train=8, n_test=16, seed=2)
    first = build_reader_model(tmp_path / "first", ReaderSpec(**small), pretrain_data_dir=tmp_path / "pre")
    again = build_reader_model(tmp_path / "again", ReaderSpec(**small, learning_rate=0.0, uniform_fraction=0.5,
                                                              init_from=str(first)),
                               eval_data_dir=data, pretrain_data_dir=tmp_path / "pre")
    fresh = build_reader_model(tmp_path / "fresh", ReaderSpec(**small, seed=1), pretrain_data_dir=tmp_path / "pre")
    weights = [load_file(folder / "model.safetensors") for folder in (first, again, fresh)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert (first / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    assert set(json.loads((again / "READER_MODEL.json").read_text())["reading"]["permuted_acc_by_type"]) <= \
        {"category", "colour", "count", "position", "shape", "word"}


def test_qwen3_5_reader_layout_has_attention_first_and_last():
    """The Qwen3.5 stand-in's layers: gated attention first and last, Gated DeltaNet between (run 57: with attention
    only 4th, the real 3:1 mix, the letter lookup barely formed); the committed folder is built that way."""
    try:
        from transformers import Qwen3_5Config
    except ImportError:
        pytest.skip("Qwen3.5 needs transformers >= 5.2")
    layout = ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    for layers in (4, 8):
        config = Qwen3_5Config()
        _set_depth(config, layers)
        assert config.text_config.layer_types == layout * (layers // 4)
        assert config.text_config.num_hidden_layers == layers
    committed = json.loads((REPO / "data" / "reader_model" / "qwen3_5" / "config.json").read_text())
    assert committed["text_config"]["layer_types"] == layout
