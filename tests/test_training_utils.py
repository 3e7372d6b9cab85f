"""Pieces of the training loop and ensemble that can be checked exactly in isolation."""

import time

import numpy as np
import torch
from PIL import Image

from mcvqa.speed.feature_cache import CachedImageEncoding
from mcvqa.core.collate import VqaCollator
from mcvqa.core.ensemble import apply_temperature, ensemble_folds, fit_temperature, fold_weights
from mcvqa.core.inference import softmax
from mcvqa.core.collate import micro_batches
from mcvqa.core.training import LoraEma


def _items():
    sizes = [(56, 84), (112, 56), (84, 84)]
    return [{"row": i, "perm": (0, 1, 2, 3), "image": Image.new("RGB", s, (40 * i, 90, 200)), "question": "색?" * (i + 1),
             "options": ["빨간색", "파란색", "초록색", "노란색"], "answer": i} for i, s in enumerate(sizes)]


def test_micro_batches_equal_collating_their_samples(tiny_processor, tiny_fmt):
    """Accumulation (and the OOM back-off) splits a collated batch; each chunk must be exactly the batch of its samples."""
    collator = VqaCollator(tiny_processor("qwen2_5_vl"), tiny_fmt("qwen2_5_vl"), 28 * 28 * 4, 112 * 112)
    items = _items()
    first, second = micro_batches(collator(items), 2)
    for half, expected in ((first, collator(items[:2])), (second, collator(items[2:]))):
        assert torch.equal(half["pixel_values"], expected["pixel_values"])
        assert torch.equal(half["image_grid_thw"], expected["image_grid_thw"])
        width = expected["input_ids"].shape[1]
        for key in ("input_ids", "labels", "attention_mask", "mm_token_type_ids"):
            assert torch.equal(half[key][:, :width], expected[key]), key
        assert torch.equal(half["answer_positions"], expected["answer_positions"])


def test_micro_batches_keep_shipped_pixels_with_their_samples(tiny_processor, tiny_fmt):
    """Feature-cache batches ship pixels only for pixel_rows; a split keeps each shipped image with its sample."""
    processor, fmt = tiny_processor("qwen2_5_vl"), tiny_fmt("qwen2_5_vl")
    items = _items()
    plain = VqaCollator(processor, fmt, 28 * 28 * 4, 112 * 112)(items)
    keys = VqaCollator(processor, fmt, 28 * 28 * 4, 112 * 112, encoding=CachedImageEncoding())(items)["image_keys"]
    batch = VqaCollator(processor, fmt, 28 * 28 * 4, 112 * 112, encoding=CachedImageEncoding([keys[1]]))(items)
    assert batch["pixel_rows"].tolist() == [0, 2]
    first, second = micro_batches(batch, 2)
    sizes = plain["image_grid_thw"].prod(1).tolist()
    assert first["pixel_rows"].tolist() == [0] and second["pixel_rows"].tolist() == [0]  # sample 2 is row 0 of its chunk
    assert torch.equal(first["pixel_values"], plain["pixel_values"][:sizes[0]])
    assert torch.equal(second["pixel_values"], plain["pixel_values"][sizes[0] + sizes[1]:])


def test_lora_ema_update_and_swap():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    ema = LoraEma(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    assert "bias" not in ema.shadow  # only trainable weights are averaged
    with ema.applied(model):
        assert torch.allclose(model.weight, start + 1.0)
    assert torch.allclose(model.weight, start + 4.0)  # live weights are back


def test_fold_ensemble_and_weights():
    a, b = np.array([[0.7, 0.1, 0.1, 0.1]]), np.array([[0.1, 0.1, 0.1, 0.7]])
    assert np.allclose(ensemble_folds([a, b], [0.5, 0.5]), [[0.4, 0.1, 0.1, 0.4]])
    assert np.allclose(ensemble_folds([a, b], [0.75, 0.25]), [[0.55, 0.1, 0.1, 0.25]])

    class Cfg:
        ensemble_weights = "oof_acc"

    assert np.allclose(fold_weights(Cfg, [0.6, 0.2]), [0.75, 0.25])


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 4)) * 3
    truth = softmax(logits)
    targets = np.array([rng.choice(4, p=p) for p in truth])
    overconfident = softmax(logits * 2.0)  # = softmax(z / T) with T = 0.5: fitting must find T ~ 2
    temperature = fit_temperature(overconfident, targets)
    assert abs(temperature - 2.0) < 0.15
    assert np.allclose(apply_temperature(overconfident, 2.0), truth, atol=1e-6)


class _SlowLoader:
    """A data loader that takes `delay` seconds to start and to hand over each batch."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        time.sleep(self.delay)  # starting the workers (a DataLoader starts them in iter())
        return self._batches()

    def _batches(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def test_predict_letter_logits_reports_the_time_spent_waiting_for_the_loader(tiny_model, tiny_processor, tiny_fmt,
                                                                            hardware):
    """stats: the pass's wall time, the part spent waiting for batches and the part starting the loader."""
    from mcvqa.core.inference import predict_letter_logits

    collator = VqaCollator(tiny_processor("qwen2_5_vl"), tiny_fmt("qwen2_5_vl"), 28 * 28 * 4, 112 * 112)
    batches = [collator(_items()[:2]), collator(_items()[2:])]
    stats = {}
    predict_letter_logits(tiny_model("qwen2_5_vl", False), _SlowLoader(batches, 0.2), tiny_fmt("qwen2_5_vl"), hardware,
                          stats=stats)
    assert stats["views"] == 3
    assert 0.2 <= stats["loader_start_s"] < 0.4
    # start + 2 batches; the scoring in between (also timed in wall_s) is not waiting
    assert 0.6 <= stats["loader_wait_s"] < 0.9 and stats["loader_wait_s"] < stats["wall_s"]
    # The same through the wrapper that keeps the test batches for later folds: start-up is still start-up.
    from mcvqa.speed.replay import KeepingBatches

    kept, stats = [], {}
    predict_letter_logits(tiny_model("qwen2_5_vl", False), KeepingBatches(_SlowLoader(batches, 0.2), kept.extend),
                          tiny_fmt("qwen2_5_vl"), hardware, stats=stats)
    assert 0.2 <= stats["loader_start_s"] < 0.4 and len(kept) == 2
