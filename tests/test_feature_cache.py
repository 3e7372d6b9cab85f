"""Image-feature cache (mcvqa/feature_cache.py) on tiny Qwen2.5-VL / Qwen3-VL models, fp32 on the CPU.

The reference for every check is the same computation without the cache: letter probabilities, the
training loss and its LoRA gradients must not change, only the number of vision-tower passes. Each
equality test also checks that the compared quantity would notice wrong features (swapped images,
dropped deepstack features), so the tests can fail.
"""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import PIPELINE_FAMILIES, TINY_FAMILIES, randomise_lora
from mcvqa.speed.feature_cache import CachedImageEncoding
from mcvqa.core.collate import VqaCollator
from mcvqa.machinery.compat import image_features
from mcvqa.speed.fast_vision import (chunk_groups, compile_vision_choice, compile_vision_elementwise, grouped_attention,
                               patch_vision_attention, unpatch_vision_attention)
from mcvqa.core.hardware import choose_hardware
from mcvqa.speed.feature_cache import FeatureCache, ImageFeatures, cache_blockers, image_key, make_feature_cache
from mcvqa.core.inference import predict_views
from mcvqa.core.modeling import load_model_for_training
from mcvqa.pipeline import run_feature_cache
from mcvqa.core.modeling import unwrap_vlm, vision_tower
from mcvqa.core.scoring import answer_loss, letter_logits
from mcvqa.core.collate import micro_batches
from mcvqa.core import training
from mcvqa.core.training import FoldContext, train_fold

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 112 * 112

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

SPECS = [((64, 96), (220, 30, 30), "그림 속 도형은 무슨 색입니까?", ["빨간색", "파란색", "초록색", "노란색"]),
         ((120, 80), (30, 70, 220), "도형은?", ["원", "사각형, 삼각형, 그리고 마름모 모양", "별", "십자가"]),
         ((56, 56), (30, 160, 50), "그림에 도형이 몇 개 있습니까?", ["1개", "2개", "3개", "4개"])]


@pytest.fixture(params=PIPELINE_FAMILIES)
def family(request):
    return request.param


def _image(size, rgb):
    """A two-colour image: a plain one would give every patch the same features."""
    image = Image.new("RGB", size, rgb)
    image.paste((255 - rgb[0], 255 - rgb[1], 255 - rgb[2]), (0, 0, size[0] // 2, size[1] // 3))
    return image


def _items(answers=(2, 0, 3)):
    return [{"row": i, "perm": (0, 1, 2, 3), "image": _image(size, rgb), "question": q, "options": opts,
             "answer": answer} for i, ((size, rgb, q, opts), answer) in enumerate(zip(SPECS, answers))]


def _collate(family, tiny_processor, tiny_fmt, items):
    return VqaCollator(tiny_processor(family), tiny_fmt(family), MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding())(items)


def _cache(tiny_cfg, family, model, hardware, **changes):
    return make_feature_cache(tiny_cfg(family, **changes), model, hardware, verbose=False)


def test_keys_follow_pixels_and_pixel_range():
    a, b = _image((64, 96), (200, 10, 10)), _image((64, 96), (200, 10, 10))
    size = {"size": {"shortest_edge": 1, "longest_edge": 2}}
    assert image_key(a, size) == image_key(b, size)  # same pixels, other object
    assert image_key(a, size) != image_key(a, {"size": {"shortest_edge": 1, "longest_edge": 3}})  # other patches
    assert image_key(a, {"max_soft_tokens": 70}) != image_key(a, {"max_soft_tokens": 140})  # Gemma's budget
    assert image_key(a, size) != image_key(_image((64, 96), (200, 10, 11)), size)


def test_cached_letter_logits_equal_uncached(family, tiny_model, tiny_cfg, tiny_processor, tiny_fmt, hardware):
    model, fmt = tiny_model(family, False), tiny_fmt(family)
    items = _items()
    batch = _collate(family, tiny_processor, tiny_fmt, items)
    cache = _cache(tiny_cfg, family, model, hardware)
    # Fill the cache one image at a time, then score the ragged 3-image batch from it: features must not
    # depend on which images shared the tower call.
    for item in items:
        cache.attach(model, _collate(family, tiny_processor, tiny_fmt, [item]))
    cached = cache.attach(model, batch)
    assert "pixel_values" not in cached and len(cached["image_features"]) == 3
    assert (cache.encoded, cache.hits) == (3, 3)
    with torch.no_grad():
        plain = letter_logits(model, batch, fmt.letter_ids, "cpu", torch.float32)
        got = letter_logits(model, cached, fmt.letter_ids, "cpu", torch.float32)
        torch.testing.assert_close(got.softmax(-1), plain.softmax(-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
        # Would the comparison notice features of the wrong image? (other colours, same sizes)
        others = [dict(it, image=_image(it["image"].size, (90, 200, 250))) for it in items]
        wrong_features = cache.attach(model, _collate(family, tiny_processor, tiny_fmt, others))["image_features"]
        wrong = letter_logits(model, {**cached, "image_features": wrong_features}, fmt.letter_ids, "cpu", torch.float32)
        assert (wrong - plain).abs().max() > 1e-2
        if family == "qwen3_vl":
            # Qwen3-VL's deepstack features reach the decoder too: dropping them must show.
            assert all(len(f.deepstack) > 0 for f in cached["image_features"])
            flat = [ImageFeatures(f.embeds, tuple(torch.zeros_like(d) for d in f.deepstack))
                    for f in cached["image_features"]]
            no_deep = letter_logits(model, {**cached, "image_features": flat}, fmt.letter_ids, "cpu", torch.float32)
            assert (no_deep - plain).abs().max() > 1e-2


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "4bit"])
def test_training_loss_and_gradients_equal_uncached(family, tiny_model, tiny_cfg, tiny_processor, tiny_fmt, hardware,
                                                    load_in_4bit):
    model, fmt = tiny_model(family, load_in_4bit), tiny_fmt(family)
    batch = _collate(family, tiny_processor, tiny_fmt, _items(answers=(2, 0, 3)))
    cached = _cache(tiny_cfg, family, model, hardware).attach(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for b in (batch, cached):
        loss, _ = answer_loss(model, b, fmt.letter_ids, "cpu", torch.float32)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_plain, grads_plain), (loss_cached, grads_cached) = results
    torch.testing.assert_close(loss_cached, loss_plain, atol=1e-6, rtol=0)
    assert sum(int(g.abs().sum() > 0) for g in grads_plain) > len(params) // 2  # real gradients are compared
    for gc, gp in zip(grads_cached, grads_plain):
        torch.testing.assert_close(gc, gp, atol=1e-6, rtol=1e-5)


def test_micro_batches_keep_features_with_their_samples(tiny_model, tiny_cfg, tiny_processor, tiny_fmt, hardware):
    family = "qwen3_vl"
    model = tiny_model(family, False)
    cached = _cache(tiny_cfg, family, model, hardware).attach(model, _collate(family, tiny_processor, tiny_fmt, _items()))
    first, second = micro_batches(cached, 2)
    assert first["image_features"] == cached["image_features"][:2] and second["image_features"] == cached["image_features"][2:]
    assert first["image_keys"] == cached["image_keys"][:2] and "pixel_values" not in first


def _frame(tmp_path, n=3):
    rows = []
    for i, (size, rgb, question, options) in enumerate(SPECS[:n]):
        path = tmp_path / f"img{i}.png"
        _image(size, rgb).save(path)
        rows.append({"id": f"q{i}", "image_path": str(path), "question": question, "a": options[0], "b": options[1],
                     "c": options[2], "d": options[3], "answer": "abcd"[(i + 2) % 4]})
    return pd.DataFrame(rows)


def _count_tower_images(model):
    counter = {"images": 0}

    def pre(module, args, kwargs):  # Qwen: one grid row per image; Gemma: one pixel_values row per image
        if "grid_thw" in kwargs or len(args) > 1:
            counter["images"] += int((kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]).shape[0])
        else:
            counter["images"] += int((kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]).shape[0])

    return counter, vision_tower(model).register_forward_pre_hook(pre, with_kwargs=True)


def test_each_image_encoded_once_across_views_and_folds(family, tiny_model, tiny_cfg, tiny_processor, tiny_fmt, hardware,
                                                        tmp_path, monkeypatch):
    model, processor, fmt = tiny_model(family, False), tiny_processor(family), tiny_fmt(family)
    frame = _frame(tmp_path)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0,
                   infer_batch_size=5)  # batches straddle views: the same image twice in one batch
    counter, handle = _count_tower_images(model)
    processed = []  # images the data loader's image processor saw, per predict_views call
    image_processor = processor.image_processor
    original_call = type(image_processor).__call__
    monkeypatch.setattr(type(image_processor), "__call__",
                        lambda self, images=None, **kw: processed.append(len(images)) or original_call(self, images, **kw))
    try:
        plain = predict_views(FoldContext(processor, fmt, cfg, hardware), model, frame)
        assert counter["images"] == 12 and sum(processed) == 12  # without the cache: once per view
        counter["images"], processed[:] = 0, []
        cache = _cache(tiny_cfg, family, model, hardware)
        cached = predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache), model, frame)
        assert sum(processed) == 3  # the 4 option views of a row are one batch: its image processed once
        processed[:] = []
        again = predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache),
                              model, frame)  # "next fold"
        assert sum(processed) == 0  # cached when the loader was made: no pixels at all
    finally:
        handle.remove()
    assert counter["images"] == 3 and cache.encoded == 3  # each image once, across 8 views
    assert cache.hits == 24 - 3 and cache.misses == 3
    for view in plain:
        np.testing.assert_allclose(cached[view], plain[view], atol=1e-6, rtol=0)
        np.testing.assert_allclose(again[view], plain[view], atol=1e-6, rtol=0)
    assert np.abs(plain[(1.0, 0)] - plain[(1.0, 1)]).max() > 1e-4  # views really differ


def test_train_fold_with_cache_matches_without(tiny_cfg, tiny_processor, tiny_fmt, hardware, tmp_path, monkeypatch):
    """The whole training loop (shuffled options, OOM-style micro-batch splits, EMA, evaluation): every step's
    gradients, the losses and the trained weights are the same with the cache as without."""
    family = "qwen3_vl"
    processor, fmt = tiny_processor(family), tiny_fmt(family)
    frame = _frame(tmp_path)
    cfg = tiny_cfg(family, quantization="none", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, num_workers=0, epochs=2,
                   micro_batch_size=1, grad_accum_steps=2, learning_rate=1e-2, evals_per_epoch=1, infer_batch_size=2)
    results, stepping = [], training.optimizer_step
    for use_cache in (False, True):
        grads = []

        def record(run, *args):  # each step's accumulated gradients, before the optimizer uses them
            grads.append({n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None})
            return stepping(run, *args)

        monkeypatch.setattr(training, "optimizer_step", record)
        torch.manual_seed(0)
        model = randomise_lora(load_model_for_training(cfg, hardware))
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        cache = _cache(tiny_cfg, family, model, hardware) if use_cache else None
        out = tmp_path / f"fold_cache{use_cache}"
        train_fold(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache, fold=0, fold_dir=out),
                   model, frame, frame)
        history = pd.read_csv(out / "history.csv")
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((history, state, cache, grads))
    (hist_plain, state_plain, _, grads_plain), (hist_cached, state_cached, cache, grads_cached) = results
    assert cache.encoded == 3 and cache.hits > 3 * 2  # two epochs + evaluations reuse the three images
    np.testing.assert_allclose(hist_cached["loss"].to_numpy(float), hist_plain["loss"].to_numpy(float), atol=1e-5, rtol=0)
    assert len(grads_plain) == len(grads_cached) == 4
    for plain, cached in zip(grads_plain, grads_cached):  # (1.3e-5 of the scale apart on transformers 5.0, 4e-6 on 5.25)
        scale = max(float(g.abs().max()) for g in plain.values())
        for name, grad in plain.items():
            torch.testing.assert_close(cached[name], grad, atol=1e-4 * scale, rtol=0)
    # AdamW divides each gradient by its running RMS: where a gradient is ~1e-8, float rounding of the same
    # computation moves that weight's step by far more than its size (1.4e-5 on one of 2,048 weights on torch
    # 2.14, CPU). The gradients above are the code under test; the weights agree to 1 % of the learning rate.
    for name, value in state_plain.items():
        torch.testing.assert_close(state_cached[name], value, atol=1e-4, rtol=1e-4)
    assert max(float((state_plain[n] - start[n]).abs().max()) for n in start) > 1e-3  # training moved the weights


def test_cache_turns_off_when_vision_tower_is_trainable(family, tiny_model, tiny_cfg, hardware, capsys):
    model = tiny_model(family, False)
    cfg = tiny_cfg(family)
    assert make_feature_cache(cfg, model, hardware) is not None
    weight = next(vision_tower(model).parameters())
    weight.requires_grad_(True)
    try:
        assert cache_blockers(model, cfg) == ["the vision tower has trainable parameters"]
        assert make_feature_cache(cfg, model, hardware) is None
        assert "image-feature cache off: the vision tower has trainable parameters" in capsys.readouterr().out
        assert run_feature_cache(cfg, model, hardware, {}) is None
    finally:
        weight.requires_grad_(False)
    assert make_feature_cache(dataclasses.replace(cfg, cache_image_features=False), model, hardware) is None


@pytest.mark.parametrize("transform", ["light", "custom"])
def test_cache_steps_aside_for_declared_image_transforms(tiny_model, tiny_cfg, transform):
    """The image transform is declared in the settings (data.py): the cache knows, not a field-name guess."""
    model = tiny_model("qwen2_5_vl", False)
    assert cache_blockers(model, tiny_cfg("qwen2_5_vl")) == []
    cfg = tiny_cfg("qwen2_5_vl", image_transform=transform)
    assert cache_blockers(model, cfg) == [f"images are transformed (image_transform={transform}, on train)"]


def test_run_cache_is_shared_by_folds(tiny_model, tiny_cfg, hardware, tmp_path):
    cfg = tiny_cfg("qwen2_5_vl", output_dir=str(tmp_path / "run"))
    model = tiny_model("qwen2_5_vl", False)
    shared = {}  # what run_pipeline hands every fold of one run
    first = run_feature_cache(cfg, model, hardware, shared)
    assert first is not None and run_feature_cache(cfg, model, hardware, shared) is first
    assert run_feature_cache(cfg, model, hardware, {}) is not first  # another run starts empty


def test_disk_cache_survives_a_new_session_and_ram_budget(tiny_model, tiny_cfg, tiny_processor, tiny_fmt, hardware, tmp_path):
    family = "qwen3_vl"
    model = tiny_model(family, False)
    batch = _collate(family, tiny_processor, tiny_fmt, _items())
    cfg_changes = dict(output_dir=str(tmp_path / "run"), feature_cache_on_disk=True)
    first = _cache(tiny_cfg, family, model, hardware, **cfg_changes)
    reference = first.attach(model, batch)["image_features"]
    assert len(list(first.disk_dir.glob("*.pt"))) == 3
    # A restarted session (new cache object) with no RAM budget reads every feature back from disk.
    second = _cache(tiny_cfg, family, model, hardware, feature_cache_max_gib=0.0, **cfg_changes)
    assert second.disk_dir == first.disk_dir
    counter, handle = _count_tower_images(model)
    try:
        got = second.attach(model, batch)["image_features"]
    finally:
        handle.remove()
    assert counter["images"] == 0 and second.disk_reads == 3 and len(second) == 0
    for a, b in zip(got, reference):
        assert torch.equal(a.embeds, b.embeds) and all(torch.equal(x, y) for x, y in zip(a.deepstack, b.deepstack))
    # Without disk and without RAM budget nothing is kept: the next lookup encodes again.
    third = FeatureCache(max_bytes=0)
    third.attach(model, batch)
    third.attach(model, batch)
    assert third.encoded == 6 and third.hits == 0


# ---------------------------------------------------------------- fast vision attention (fast_vision.py)
def _tower_outputs(model, batch):
    with torch.no_grad():
        embeds, deepstack = image_features(unwrap_vlm(model).model, batch["pixel_values"], batch["image_grid_thw"])
    return [torch.cat(embeds)] + [torch.cat(layer) for layer in deepstack]


def test_grouped_vision_attention_equals_stock(family, tiny_model, tiny_processor, tiny_fmt, monkeypatch):
    model = tiny_model(family, False)
    if family == "gemma4":  # no windowed attention to group: the tower runs as it is (and the run says so)
        assert patch_vision_attention(model) == 0
        return
    # Larger, ragged images: several windows of several lengths per image (tiny Qwen2.5-VL: 56 px windows).
    items = [dict(it, image=_image(size, rgb))
             for it, size, (_, rgb, _, _) in zip(_items(), [(112, 84), (84, 112), (56, 112)], SPECS)]
    batch = _collate(family, tiny_processor, tiny_fmt, items)
    calls = {"n": 0}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls["n"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    stock = _tower_outputs(model, batch)
    stock_calls, calls["n"] = calls["n"], 0
    assert patch_vision_attention(model) == len(unwrap_vlm(model).model.visual.blocks)
    try:
        fast = _tower_outputs(model, batch)
        fast_calls = calls["n"]
        groups = chunk_groups(torch.tensor([0, 3, 5, 8, 9]))
        assert [(n, g.tolist()) for n, g in groups] == [(1, [[8]]), (2, [[3, 4]]), (3, [[0, 1, 2], [5, 6, 7]])]
    finally:
        unpatch_vision_attention(model)
    assert fast_calls < stock_calls, (fast_calls, stock_calls)
    for a, b in zip(fast, stock):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert _tower_outputs(model, batch)[0].equal(stock[0])  # unpatched again
    # The check can fail: attention leaking across chunks (one chunk for everything) changes the features.
    visual = unwrap_vlm(model).model.visual
    attn = visual.blocks[0].attn
    x = torch.randn(30, attn.qkv.in_features)
    q, k, v = attn.qkv(x).reshape(30, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    split = grouped_attention(q, k, v, chunk_groups(torch.tensor([0, 10, 30])), attn.scaling)
    whole = grouped_attention(q, k, v, chunk_groups(torch.tensor([0, 30])), attn.scaling)
    assert (split - whole).abs().max() > 1e-2


def _equal_up_to_fp32_rounding(a, b):
    """Fused elementwise ops round differently in fp32: ~1e-5 on outputs of size ~30 (a few ulps), so the
    tolerance follows the outputs' scale (1e-6 of it), not a fixed 1e-5 that is 100 ulps at size 0.1."""
    torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=1e-5)


def test_compiled_vision_elementwise_equals_stock(family, tiny_cfg, hardware, tiny_processor, tiny_fmt):
    """torch.compile of the blocks' norms, MLP and the grouped attention's rotary: same tower outputs in
    fp32, and the compiled code really runs (dynamo compiled graphs, rotary through the compiled function)."""
    model = load_model_for_training(tiny_cfg(family, quantization="none"), hardware).eval()  # own copy: compiled in place
    if family == "gemma4":  # no Qwen-VL vision blocks: nothing compiled
        assert compile_vision_elementwise(model) == 0
        return
    items = [dict(it, image=_image(size, rgb))
             for it, size, (_, rgb, _, _) in zip(_items(), [(112, 84), (84, 112), (56, 112)], SPECS)]
    batch = _collate(family, tiny_processor, tiny_fmt, items)
    patch_vision_attention(model)
    stock = _tower_outputs(model, batch)
    keys = set(model.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    blocks = unwrap_vlm(model).model.visual.blocks
    assert compile_vision_elementwise(model) == len(blocks)
    rotary_calls = {"n": 0}
    compiled_rotary = blocks[0].attn._mcvqa_rotary

    def counting_rotary(*args):
        rotary_calls["n"] += 1
        return compiled_rotary(*args)

    for block in blocks:
        block.attn._mcvqa_rotary = counting_rotary
    fast = _tower_outputs(model, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # norm, mlp, rotary at least
    assert rotary_calls["n"] == len(blocks)
    assert set(model.state_dict()) == keys  # compiled in place: checkpoints and adapters load as before
    for a, b in zip(fast, stock):
        _equal_up_to_fp32_rounding(a, b)
    # New batch shapes reuse the dynamic graphs: after a second shape (duck-sizing coincidences of the
    # tiny sizes may add one graph), a third compiles nothing new, so a run is not recompiled per batch.
    for n_images in (2, 1):
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        got = _tower_outputs(model, _collate(family, tiny_processor, tiny_fmt, items[:n_images]))[0]
        _equal_up_to_fp32_rounding(got, stock[0][:len(got)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_compile_vision_auto_choice():
    """auto: on for sm80+ with triton, off on T4 and CPU (each with its reason); on/off forced; typos fail."""
    t4 = choose_hardware([{"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}], flash_attn_installed=False)
    h100 = choose_hardware([{"name": "NVIDIA H100", "capability": (9, 0), "memory_gib": 80.0}], flash_attn_installed=False)
    cpu = choose_hardware([], flash_attn_installed=False)
    assert compile_vision_choice("auto", t4)[0] is False and "sm80" in compile_vision_choice("auto", t4)[1]
    assert compile_vision_choice("auto", cpu)[0] is False
    import importlib.util
    import shutil
    can_compile = importlib.util.find_spec("triton") is not None and bool(shutil.which("cc") or shutil.which("gcc"))
    assert compile_vision_choice("auto", h100)[0] is can_compile
    assert compile_vision_choice("on", cpu)[0] is True and compile_vision_choice("off", h100)[0] is False
    with pytest.raises(ValueError, match="compile_vision"):
        compile_vision_choice("yes", h100)


def test_later_fold_reuses_the_kept_test_batches(tiny_model, tiny_cfg, tiny_processor, tiny_fmt, hardware, tmp_path,
                                                 monkeypatch):
    """With reuse_batches, the second identical pass (the next fold's test set) makes no data loader and
    gives the same probabilities; a changed frame or an image the cache lost goes through the loader."""
    import mcvqa.speed.replay as replay

    family = "qwen2_5_vl"
    model, processor, fmt = tiny_model(family, False), tiny_processor(family), tiny_fmt(family)
    frame = _frame(tmp_path)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0,
                   infer_batch_size=2)
    loaders = []
    real_make_loader = replay.make_loader  # reuse_batches: the replay makes the loader when it has no batches
    monkeypatch.setattr(replay, "make_loader", lambda *a, **kw: loaders.append(1) or real_make_loader(*a, **kw))
    cache = _cache(tiny_cfg, family, model, hardware)

    def run(data):
        return predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache),
                             model, data, reuse_batches=True)

    first = run(frame)
    assert len(loaders) == 1 and len(cache.replay.kept) == 1
    (batches, keys), = cache.replay.kept.values()
    assert len(batches) == 2 and len(keys) == 3 and all(b["pixel_values"].numel() == 0 for b in batches)
    again = run(frame)
    assert len(loaders) == 1  # replayed: no loader made
    for view in first:
        np.testing.assert_array_equal(again[view], first[view])
    changed = frame.assign(question=frame["question"].where(frame.index != 1, "도형은 몇 개입니까?"))
    other = run(changed)
    assert len(loaders) == 2 and len(cache.replay.kept) == 2
    assert np.abs(other[(1.0, 0)][1] - first[(1.0, 0)][1]).max() > 1e-6  # the new question was scored
    np.testing.assert_allclose(other[(1.0, 0)][[0, 2]], first[(1.0, 0)][[0, 2]], atol=1e-6, rtol=0)  # (padding)
    lost = next(iter(keys))
    cache.bytes -= cache.store.pop(lost).nbytes  # e.g. dropped: its pixels are needed again
    after_loss = run(frame)
    assert len(loaders) == 3 and cache.encoded == 4  # the 3 images once, the lost one again
    for view in first:
        np.testing.assert_allclose(after_loss[view], first[view], atol=1e-6, rtol=0)


def test_kept_batches_are_plain_memory_and_features_are_compact(tiny_model, tiny_cfg, tiny_processor, tiny_fmt,
                                                                 hardware, tmp_path, capsys):
    """Kept batches from loader workers are copies (no shared-memory tensor, no open file descriptor each);
    each image's features own just their bytes (not a view of the whole tower call, which torch.save
    would write whole); over the budget, no batches are kept (a later fold could not replay them)."""
    family = "qwen2_5_vl"
    model, processor, fmt = tiny_model(family, False), tiny_processor(family), tiny_fmt(family)
    frame = _frame(tmp_path)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=2,
                   infer_batch_size=2)
    cache = _cache(tiny_cfg, family, model, hardware)
    predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache), model, frame, reuse_batches=True)
    (batches, _), = cache.replay.kept.values()
    tensors = [t for b in batches for t in b.values() if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.is_shared() for t in tensors)
    for features in cache.store.values():
        assert features.embeds.untyped_storage().nbytes() == features.nbytes
    small = _cache(tiny_cfg, family, model, hardware, feature_cache_max_gib=cache.bytes / 2 / 2**30)
    capsys.readouterr()
    predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=small), model, frame, reuse_batches=True)
    assert small.replay.kept == {} and "not kept" in capsys.readouterr().out


def test_feature_cache_place():
    """auto keeps features on GPUs of 60 GiB or more, in RAM on a T4 and on the CPU; cuda without a GPU fails."""
    from mcvqa.core.config import resolve_config
    from mcvqa.speed.feature_cache import feature_cache_place

    t4 = choose_hardware([{"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}], flash_attn_installed=False)
    a100_40 = choose_hardware([{"name": "NVIDIA A100", "capability": (8, 0), "memory_gib": 39.4}], flash_attn_installed=False)
    h100 = choose_hardware([{"name": "NVIDIA H100", "capability": (9, 0), "memory_gib": 79.1}], flash_attn_installed=False)
    cpu = choose_hardware([], flash_attn_installed=False)
    cfg = resolve_config("demo", env={}, verbose=False)
    assert [feature_cache_place(cfg, hw) for hw in (t4, a100_40, h100, cpu)] == ["cpu", "cpu", "cuda", "cpu"]
    assert feature_cache_place(dataclasses.replace(cfg, feature_cache_device="cpu"), h100) == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        feature_cache_place(dataclasses.replace(cfg, feature_cache_device="cuda"), cpu)
    with pytest.raises(ValueError, match="feature_cache_device"):
        feature_cache_place(dataclasses.replace(cfg, feature_cache_device="gpu"), h100)
