"""Direct-logit scoring on tiny Qwen2.5-VL / Qwen3-VL models (fp32, CPU, 4-bit QLoRA and plain).

The reference for every check is the model's own full forward (`model(**inputs).logits`) or
`generate`: the scorer must read the same numbers at the same position.
"""

import weakref

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import PIPELINE_FAMILIES, TINY_FAMILIES
from mcvqa.speed.feature_cache import CachedImageEncoding
from mcvqa.core.collate import VqaCollator, cyclic_perms
from mcvqa.core.inference import predict_views, softmax, to_original_order
from mcvqa.machinery.compat import model_input_names
from mcvqa.core.modeling import unwrap_vlm, vision_tower
from mcvqa.families.registry import family_of
from mcvqa.core.scoring import MODEL_INPUT_KEYS, answer_loss, letter_logits
from mcvqa.core.training import FoldContext

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 112 * 112

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(params=PIPELINE_FAMILIES)
def family(request):
    return request.param


def _items(answers=(2, 0, 3)):
    specs = [((64, 96), (220, 30, 30), "그림 속 도형은 무슨 색입니까?", ["빨간색", "파란색", "초록색", "노란색"]),
             ((120, 80), (30, 70, 220), "도형은?", ["원", "사각형, 삼각형, 그리고 마름모 모양", "별", "십자가"]),
             ((56, 56), (30, 160, 50), "그림에 도형이 몇 개 있습니까? 왼쪽 위를 잘 보세요.", ["1개", "2개", "3개", "4개"])]
    return [{"row": i, "perm": (0, 1, 2, 3), "image": Image.new("RGB", size, rgb), "question": q, "options": opts,
             "answer": answer} for i, ((size, rgb, q, opts), answer) in enumerate(zip(specs, answers))]


def _collate(processor, fmt, items):
    return VqaCollator(processor, fmt, MIN_PIXELS, MAX_PIXELS)(items)


def _stock_inputs(model, batch):
    """The batch keys the model's own forward takes (mm_token_type_ids only from transformers 5.4)."""
    return {k: batch[k] for k in model_input_names(unwrap_vlm(model).model, MODEL_INPUT_KEYS) if k in batch}


def _full_logits(model, batch):
    with torch.no_grad():
        return model(**_stock_inputs(model, batch), use_cache=False).logits


def _letters(model, batch, fmt):
    with torch.no_grad():
        return letter_logits(model, batch, fmt.letter_ids, "cpu", torch.float32)


@pytest.fixture
def setup(family, tiny_processor, tiny_fmt):
    processor, fmt = tiny_processor(family), tiny_fmt(family)
    return processor, fmt


def test_batch_is_ragged(family, setup):
    """Precondition of the tests below: different lengths, different image grids, right padding."""
    processor, fmt = setup
    batch = _collate(processor, fmt, _items())
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and max(lengths) == batch["input_ids"].shape[1]
    if "image_grid_thw" in batch:
        assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 3
    else:  # Gemma: each image's patch grid, from its patch positions (-1: padding)
        assert len({tuple(p.max(dim=0).values.tolist()) for p in batch["image_position_ids"]}) == 3


def test_lora_adapters_change_the_letter_logits(family, setup, tiny_model):
    """The random LoRA weights matter (else the comparisons below could not see a scorer that skips them)."""
    processor, fmt = setup
    model = tiny_model(family)
    batch = _collate(processor, fmt, _items())
    with model.disable_adapter():
        plain = _letters(model, batch, fmt)
    assert (plain - _letters(model, batch, fmt)).abs().max() > 1e-3


@pytest.mark.parametrize("load_in_4bit,atol", [(False, 1e-5), (True, 1e-4)], ids=["fp32", "4bit"])
def test_letter_logits_equal_full_forward(family, setup, tiny_model, load_in_4bit, atol):
    processor, fmt = setup
    model = tiny_model(family, load_in_4bit)
    batch = _collate(processor, fmt, _items())
    got = _letters(model, batch, fmt)
    full = _full_logits(model, batch)
    rows = torch.arange(3)
    want = full[rows, batch["answer_positions"]][:, fmt.letter_ids]
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    # The answer position is the one whose logits the trained label is read against (shifted by one).
    labelled = (batch["labels"] != -100).nonzero()
    assert labelled[:, 0].tolist() == [0, 1, 2]
    assert (labelled[:, 1] - 1).tolist() == batch["answer_positions"].tolist()
    # ...and it is not any neighbour: reading one position off gives different numbers.
    off = full[rows, batch["answer_positions"] - 1][:, fmt.letter_ids]
    assert (off - got).abs().max() > 10 * atol


def test_4bit_and_plain_models_differ(family, setup, tiny_model):
    """Guard that the two loads really are different weights (quantised vs not)."""
    processor, fmt = setup
    batch = _collate(processor, fmt, _items())
    assert (_letters(tiny_model(family, True), batch, fmt) - _letters(tiny_model(family, False), batch, fmt)).abs().max() > 1e-4


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "4bit"])
def test_letter_probs_agree_with_generate(family, setup, tiny_model, load_in_4bit):
    processor, fmt = setup
    model = tiny_model(family, load_in_4bit)
    for item in _items(answers=(-1, -1, -1)):
        batch = _collate(processor, fmt, [item])
        assert batch["attention_mask"].all()  # one sample: no padding
        ours = torch.softmax(_letters(model, batch, fmt)[0], -1)
        with torch.no_grad():
            out = model.generate(**_stock_inputs(model, batch), max_new_tokens=1, output_scores=True,
                                 return_dict_in_generate=True, do_sample=False)
        assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 1
        theirs = torch.softmax(out.scores[0][0, fmt.letter_ids].float(), -1)
        assert int(ours.argmax()) == int(theirs.argmax())
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_batched_equals_one_by_one(family, setup, tiny_model):
    processor, fmt = setup
    model = tiny_model(family, False)
    items = _items()
    batched = _letters(model, _collate(processor, fmt, items), fmt)
    single = torch.cat([_letters(model, _collate(processor, fmt, [it]), fmt) for it in items])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    # Different rows really score differently (the comparison is not trivially between equal rows).
    assert (batched[0] - batched[1]).abs().max() > 1e-4


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "4bit"])
def test_answer_loss_matches_cross_entropy_on_full_logits(family, setup, tiny_model, load_in_4bit):
    processor, fmt = setup
    model = tiny_model(family, load_in_4bit)
    batch = _collate(processor, fmt, _items(answers=(2, 0, 3)))
    full = _full_logits(model, batch)
    at = full[torch.arange(3), batch["answer_positions"]]
    target = torch.tensor(fmt.letter_ids)[torch.tensor([2, 0, 3])]
    # Same as the causal-LM loss on the collator's labels (only one label per row is not -100).
    shifted = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                              ignore_index=-100)
    with torch.no_grad():
        loss_vocab, logits4 = answer_loss(model, batch, fmt.letter_ids, "cpu", torch.float32, loss_over="vocab")
        loss_letters, logits4b = answer_loss(model, batch, fmt.letter_ids, "cpu", torch.float32, loss_over="letters")
    torch.testing.assert_close(loss_vocab, F.cross_entropy(at, target), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_vocab, shifted, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_letters, F.cross_entropy(at[:, fmt.letter_ids], torch.tensor([2, 0, 3])),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(logits4, at[:, fmt.letter_ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits4b, at[:, fmt.letter_ids], atol=1e-5, rtol=0)
    assert float(loss_vocab) > float(loss_letters)  # the full vocabulary spreads more mass off the letters


def test_answer_loss_backpropagates_into_lora(setup, tiny_model, family):
    processor, fmt = setup
    model = tiny_model(family, True)
    batch = _collate(processor, fmt, _items())
    loss, _ = answer_loss(model, batch, fmt.letter_ids, "cpu", torch.float32)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert sum(int(g is not None and g.abs().sum() > 0) for g in grads) > 0


# ---------------------------------------------------------------------------------------------- 5
def test_to_original_order_hand_example():
    display = np.array([[0.1, 0.2, 0.3, 0.4],   # identity view
                        [0.1, 0.2, 0.3, 0.4],   # shift 1: slots show originals (1, 2, 3, 0)
                        [0.1, 0.2, 0.3, 0.4],   # shift 2: (2, 3, 0, 1)
                        [0.7, 0.1, 0.1, 0.1]])  # shift 3: (3, 0, 1, 2)
    perms = np.array([[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]])
    np.testing.assert_array_equal(to_original_order(display, perms), np.array([
        [0.1, 0.2, 0.3, 0.4],
        [0.4, 0.1, 0.2, 0.3],
        [0.3, 0.4, 0.1, 0.2],
        [0.1, 0.1, 0.1, 0.7],  # original option d was shown first and got 0.7
    ]))
    assert cyclic_perms(4) == [tuple(p) for p in perms.tolist()]


def test_cyclic_views_map_back_to_original_options(family, setup, tiny_model, tiny_cfg, hardware, tmp_path):
    processor, fmt = setup
    model = tiny_model(family, False)
    options = ["빨간색", "사각형, 삼각형", "3개", "왼쪽 아래"]
    Image.new("RGB", (80, 64), (140, 50, 190)).save(tmp_path / "img.png")
    frame = pd.DataFrame([{"id": "q0", "image_path": str(tmp_path / "img.png"), "question": "그림 속 도형은?",
                           "a": options[0], "b": options[1], "c": options[2], "d": options[3], "answer": "c"}])
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0)
    views = predict_views(FoldContext(processor, fmt, cfg, hardware), model, frame, desc="test")
    assert sorted(views) == [(1.0, k) for k in range(4)]
    image = Image.open(tmp_path / "img.png").convert("RGB")
    for shift in range(4):
        perm = tuple((j + shift) % 4 for j in range(4))
        item = {"row": 0, "perm": perm, "image": image, "question": "그림 속 도형은?",
                "options": [options[p] for p in perm], "answer": -1}
        display = softmax(_letters(model, _collate(processor, fmt, [item]), fmt).numpy())[0]
        got = views[(1.0, shift)][0]
        np.testing.assert_allclose(got.sum(), 1.0, atol=1e-9)
        # Original option o was shown in the slot holding its text.
        for o, text in enumerate(options):
            np.testing.assert_allclose(got[o], display[[options[p] for p in perm].index(text)], atol=1e-5)
        if shift == 0:
            np.testing.assert_allclose(got, display, atol=1e-5)
    # The option order changes the scores (so the mapping above is not checked on identical rows).
    assert np.abs(views[(1.0, 0)] - views[(1.0, 1)]).max() > 1e-4


def test_fp16_hardware_runs_the_vision_tower_outside_autocast(family, setup, tiny_cfg, hardware):
    """On a T4 (fp16) the training loop's autocast must not push the fp32 vision tower back to fp16."""
    import dataclasses

    from mcvqa.core.modeling import add_lora, load_base_model

    t4 = dataclasses.replace(hardware, dtype="float16")
    cfg = tiny_cfg(family, quantization="none")
    model = add_lora(load_base_model(cfg, hardware), cfg, t4)  # fp32 weights on the CPU, fp16 "hardware"
    vlm = model.get_base_model().model
    family, tower = family_of(model.config), vision_tower(model)
    assert next(tower.parameters()).dtype == torch.float32
    batch = _collate(*setup, _items())
    pixels, meta = batch["pixel_values"].float(), batch[family.image_meta]
    with torch.no_grad():
        reference = family.encode_images(vlm, pixels, meta)[0]
        # CPU autocast stands in for a T4's CUDA autocast: the same switch, another device type.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = family.encode_images(vlm, pixels, meta)[0]
            tower.forward = tower.forward.__wrapped__  # the stock forward, for contrast
            stock = family.encode_images(vlm, pixels, meta)[0]
    for ref, got, raw in zip(reference, under_autocast, stock):
        assert got.dtype == torch.float32 and torch.equal(got, ref)
        assert not torch.equal(raw.float(), ref)  # without the wrapper autocast changes the features


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_shared_prefix_scoring_equals_full_views(family, setup, tiny_model, load_in_4bit):
    """The 4 option orders of a row share system + image + question: one prefix pass plus 4 suffixes
    must give the letter logits of 4 full forward passes (ragged rows, padding inside the batch)."""
    from mcvqa.speed.feature_cache import FeatureCache
    from mcvqa.speed.shared_prefix import shared_prefix_letter_logits

    model = tiny_model(family, load_in_4bit)
    processor, fmt = setup
    rows = _items()
    views = [dict(item, perm=perm, options=[item["options"][p] for p in perm], answer=-1)
             for item in rows for perm in [tuple((j + s) % 4 for j in range(4)) for s in range(4)]]
    collator = VqaCollator(processor, fmt, MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding())
    cache = FeatureCache()
    with torch.no_grad():
        batch = cache.attach(model, collator(views))
        assert cache.encoded == len(rows)  # one tower pass per image, not per view
        full = letter_logits(model, batch, fmt.letter_ids, "cpu", torch.float32)
        shared = shared_prefix_letter_logits(model, batch, fmt.letter_ids, "cpu", n_views=4)
    assert shared is not None and shared.shape == (len(views), 4)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full[0], full[1])  # the views do differ: the check has teeth


@pytest.mark.skipif("qwen3_5" not in TINY_FAMILIES, reason="transformers without Qwen3.5 (from 5.2)")
def test_qwen35_prefixes_padded_on_the_right_would_corrupt_the_recurrent_state(tiny_processor, tiny_fmt, tiny_model,
                                                                               monkeypatch):
    """The test above has teeth for Qwen3.5: pad its prefixes on the right, as the KV families do, and the pads
    pass through the DeltaNet state before the suffixes continue from it; expand its cache the KV way and it
    fails outright (its linear layers have no batch_repeat_interleave)."""
    from mcvqa.families.qwen3_5 import QWEN3_5
    from mcvqa.families.qwen_vl import QWEN_VL
    from mcvqa.speed.shared_prefix import shared_prefix_letter_logits

    from mcvqa.speed.feature_cache import FeatureCache

    model, processor, fmt = tiny_model("qwen3_5", False), tiny_processor("qwen3_5"), tiny_fmt("qwen3_5")
    views = [dict(item, perm=perm, options=[item["options"][p] for p in perm], answer=-1)
             for item in _items() for perm in [tuple((j + s) % 4 for j in range(4)) for s in range(4)]]
    cache = FeatureCache()
    with torch.no_grad():
        batch = cache.attach(model, VqaCollator(processor, fmt, MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding())(views))
        full = letter_logits(model, batch, fmt.letter_ids, "cpu", torch.float32)
        monkeypatch.setattr(QWEN3_5, "prefix_padding", "right")
        wrong = shared_prefix_letter_logits(model, batch, fmt.letter_ids, "cpu", n_views=4)
        assert not torch.allclose(wrong, full, rtol=1e-4, atol=1e-5)  # what the test above requires: the padded rows move
        monkeypatch.setattr(QWEN3_5, "prefix_padding", "left")
        monkeypatch.setattr(QWEN3_5, "expand_cache", QWEN_VL.expand_cache)
        with pytest.raises(AttributeError):
            shared_prefix_letter_logits(model, batch, fmt.letter_ids, "cpu", n_views=4)


def test_predict_views_with_shared_prefix_equals_view_by_view(family, setup, tiny_model, tiny_cfg, hardware, tmp_path,
                                                             monkeypatch):
    """predict_views' shared-prefix path (cache on, rows batched with their option orders, a batch
    size that is no multiple of 4 and a ragged last batch) gives the same {view: probs} as scoring
    every view on its own."""
    from mcvqa.speed.feature_cache import FeatureCache

    processor, fmt = setup
    model = tiny_model(family, True)
    frame = _test_frame(tmp_path)
    base = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0, infer_batch_size=2)
    import mcvqa.speed.shared_prefix as shared_prefix

    used = []
    real = shared_prefix.shared_prefix_letter_logits
    monkeypatch.setattr(shared_prefix, "shared_prefix_letter_logits",
                        lambda *a, **k: _count(used, real(*a, **k)))
    cache = FeatureCache()
    shared = predict_views(FoldContext(processor, fmt, tiny_cfg(family, **base), hardware, feature_cache=cache),
                           model, frame)
    plain = predict_views(FoldContext(processor, fmt, tiny_cfg(family, tta_shared_prefix=False, **base), hardware),
                          model, frame)
    assert sorted(shared) == sorted(plain) == [(1.0, k) for k in range(4)]
    for key in plain:
        np.testing.assert_allclose(shared[key], plain[key], atol=1e-5)
    assert used == [8, 8, 8]  # batches of infer_batch_size = 2 rows x 4 orders, all through the shared path
    assert cache.encoded == len(frame) // 2  # every picture appears twice: keyed by content, encoded once


def _test_frame(tmp_path):
    """A test.csv-like frame of the items twice over (every picture appears in two rows), images on disk."""
    records = []
    for i, item in enumerate(_items() * 2):
        path = tmp_path / f"img{i}.png"
        item["image"].save(path)
        records.append({"id": f"q{i}", "image_path": str(path), "question": item["question"],
                        **dict(zip("abcd", item["options"])), "answer": "a"})
    return pd.DataFrame(records)


def _count(log, logits):
    log.append(None if logits is None else logits.shape[0])
    return logits


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "view-by-view"])
def test_predict_views_halves_the_batch_on_cuda_oom_with_the_same_predictions(
        family, setup, tiny_model, tiny_cfg, hardware, tmp_path, monkeypatch, capsys, shared_prefix):
    """A prediction pass that runs out of GPU memory halves its batch (whole rows) and goes on:
    same probabilities as a pass that never ran out, one message per halving; other errors still stop it."""
    from mcvqa.speed.feature_cache import FeatureCache
    import mcvqa.core.inference as inference
    import mcvqa.speed.shared_prefix as shared_prefix_module

    processor, fmt = setup
    model = tiny_model(family, True)
    frame = _test_frame(tmp_path)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0,
                   infer_batch_size=3 if shared_prefix else 8, tta_shared_prefix=shared_prefix)
    reference = predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=FeatureCache()), model, frame)
    name = "shared_prefix_letter_logits" if shared_prefix else "letter_logits"
    module = shared_prefix_module if shared_prefix else inference  # where the pass looks the scorer up
    real, sizes = getattr(module, name), []
    most = 4 if shared_prefix else 2  # one row's 4 orders / 2 views fit, anything larger "runs out of memory"

    held, alive = [], []  # weak references to what each failed attempt's frame held

    def oom_above(model, batch, *args, **kwargs):
        sizes.append(batch["input_ids"].shape[0])
        alive.append(sum(ref() is not None for ref in held))
        if batch["input_ids"].shape[0] > most:
            activations = torch.ones(256, 1024)
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(module, name, oom_above)
    got = predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=FeatureCache()), model, frame)
    # Shared prefix: 3 rows (12 views) -> 1 row at once; view by view: 8 -> 4 -> 2 views (halved twice).
    halvings = 1 if shared_prefix else 2
    assert capsys.readouterr().out.count("[predict] CUDA out of memory") == halvings
    assert len([s for s in sizes if s > most]) == halvings  # then the smaller batch is kept, no retry per batch
    assert sum(s for s in sizes if s <= most) == 4 * len(frame)  # every view scored exactly once
    assert held and alive == [0] * len(alive)  # a retry starts after the failed attempt's tensors are freed
    for key in reference:
        np.testing.assert_allclose(got[key], reference[key], atol=1e-6)

    calls = []

    def broken(model, batch, *args, **kwargs):  # (the shared prefix's first batch passes its check: the path is used)
        calls.append(1)
        if shared_prefix and len(calls) == 1:
            return real(model, batch, *args, **kwargs)
        raise RuntimeError("not a memory problem")

    monkeypatch.setattr(module, name, broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=FeatureCache()), model, frame)


# ------------------------------------------------- run-time self-checks of the fast paths (compat.py)
def _ignored_cache_argument(language_model):
    """What transformers 5.18-5.23 did with `cache=`: a keyword the decoder swallows and ignores."""
    return "kv_cache_nobody_reads"


def _break_cache_keyword(monkeypatch):
    import mcvqa.families.family as family_module
    import mcvqa.families.gemma4 as gemma4_module

    for module in (family_module, gemma4_module):
        monkeypatch.setattr(module, "cache_argument", _ignored_cache_argument)


def _lose_cached_features(monkeypatch, model):
    """The cached features do not reach the model as the stock forward's do (e.g. a changed placeholder rule)."""
    import dataclasses

    family_class = type(family_of(unwrap_vlm(model).config))
    real = family_class.decoder_forward

    def lost(self, vlm, input_ids, attention_mask, positions, features, device, cache=None, type_ids=None):
        features = [dataclasses.replace(f, embeds=torch.zeros_like(f.embeds)) for f in features or []]
        return real(self, vlm, input_ids, attention_mask, positions, features, device, cache=cache, type_ids=type_ids)

    monkeypatch.setattr(family_class, "decoder_forward", lost)


def test_shared_prefix_that_breaks_falls_back_to_exact_views_with_a_warning(
        family, setup, tiny_model, tiny_cfg, hardware, tmp_path, monkeypatch, capsys):
    """A pass whose shared-prefix scoring disagrees with view-by-view scoring on its first batch warns and
    goes on view by view: the probabilities are the exact ones, not the broken path's."""
    from mcvqa.speed.feature_cache import FeatureCache
    from mcvqa.speed.shared_prefix import shared_or_error

    processor, fmt = setup
    model = tiny_model(family, True)
    frame = _test_frame(tmp_path)
    base = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0, infer_batch_size=2)
    exact = predict_views(FoldContext(processor, fmt, tiny_cfg(family, tta_shared_prefix=False, **base), hardware),
                          model, frame)
    healthy = predict_views(FoldContext(processor, fmt, tiny_cfg(family, **base), hardware,
                                        feature_cache=FeatureCache()),
                            model, frame)
    out = capsys.readouterr()
    assert "WARNING" not in out.err and "shared prefix checked on the first batch (max |Δ logit|" in out.out
    _break_cache_keyword(monkeypatch)
    with torch.no_grad():  # the broken path really is broken (else the fallback could not be seen)
        cache = FeatureCache()
        batch = cache.attach(model, VqaCollator(processor, fmt, MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding())(
            [dict(it, perm=p, options=[it["options"][i] for i in p], answer=-1)
             for it in _items() for p in [(0, 1, 2, 3), (1, 2, 3, 0)]]))
        broken = shared_or_error(model, batch, fmt.letter_ids, "cpu", 2)  # Gemma's masks notice the missing cache
        assert isinstance(broken, Exception) or \
            (broken - letter_logits(model, batch, fmt.letter_ids, "cpu", None)).abs().max() > 1e-2
    got = predict_views(FoldContext(processor, fmt, tiny_cfg(family, **base), hardware, feature_cache=FeatureCache()),
                        model, frame)
    out = capsys.readouterr()
    assert out.err.count("WARNING: test x1: the shared-prefix option-order scoring " +
                         ("fails" if family == "gemma4" else "disagrees")) == 1
    assert "failed: view by view" in out.out
    for key in exact:
        np.testing.assert_allclose(got[key], exact[key], atol=1e-5)
        np.testing.assert_allclose(healthy[key], exact[key], atol=1e-5)


def test_check_fast_paths_switches_off_what_disagrees_with_the_stock_forward(
        family, setup, tiny_model, tiny_cfg, hardware, tmp_path, monkeypatch, capsys):
    from mcvqa.speed.feature_cache import FeatureCache
    from mcvqa.speed.self_check import check_fast_paths

    processor, fmt = setup
    model = tiny_model(family, True)
    frame = _test_frame(tmp_path)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4)
    cache = FeatureCache()
    assert check_fast_paths(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache),
                            model, frame) == (cache, cfg)  # healthy: kept
    out = capsys.readouterr()
    assert "WARNING" not in out.err and "[check] the cached-feature forward = the stock forward" in out.out
    assert "the shared-prefix option-order scoring = scoring each view on its own" in out.out

    _break_cache_keyword(monkeypatch)  # the 5.18-5.23 failure
    got_cache, got_cfg = check_fast_paths(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache), model, frame)
    assert got_cache is cache and got_cfg.tta_shared_prefix is False
    assert ("WARNING: the shared-prefix option-order scoring failed" if family == "gemma4" else
            "WARNING: the shared-prefix option-order scoring gives other letter logits") in capsys.readouterr().err
    monkeypatch.undo()

    _lose_cached_features(monkeypatch, model)
    got_cache, got_cfg = check_fast_paths(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache), model, frame)
    assert got_cache is None and got_cfg.tta_shared_prefix is False
    assert "WARNING: the cached-feature forward gives other letter logits than the stock forward" in capsys.readouterr().err
