"""Uncertainty-gated test-time compute (runkit/gate.py): which rows get extra views, what their probabilities
become (checked against an independent all-views pass), that every other row is left bit for bit, and
when the submission takes the gated probabilities."""

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import demo_config
from mcvqa.core.config import ConfigError
from mcvqa.runkit.gate import (extra_views_per_row, gate_perms, gate_summary, gated_probs, max_gated_rows,
                             select_gated)
from mcvqa.core.inference import average_views, predict_views, tta_probs
from mcvqa.core.prompts import make_prompt_format
from mcvqa.core.training import FoldContext
from mcvqa.speed.feature_cache import make_feature_cache

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 112 * 112


def _cfg(**changes):
    return dataclasses.replace(demo_config(), **changes)


def test_the_least_certain_rows_within_the_fraction_and_the_threshold():
    probs = np.array([[0.40, 0.35, 0.15, 0.10],   # margin 0.05
                      [0.90, 0.05, 0.03, 0.02],   # 0.85
                      [0.30, 0.30, 0.20, 0.20],   # 0.00
                      [0.50, 0.20, 0.20, 0.10],   # 0.30
                      [0.26, 0.25, 0.25, 0.24]])  # 0.01
    rows, score = select_gated(probs, {}, _cfg(gate_fraction=0.4))
    assert rows.tolist() == [2, 4]  # ceil(0.4 x 5) = 2 lowest margins, in row order
    np.testing.assert_allclose(score, [0.05, 0.85, 0.0, 0.30, 0.01], atol=1e-12)
    assert select_gated(probs, {}, _cfg(gate_fraction=0.6))[0].tolist() == [0, 2, 4]
    # The threshold trims the fraction: only margins below 0.02 (two rows), even with room for four.
    assert select_gated(probs, {}, _cfg(gate_fraction=0.8, gate_threshold=0.02))[0].tolist() == [2, 4]
    assert select_gated(probs, {}, _cfg(gate_fraction=1.0, gate_threshold=0.0))[0].tolist() == []
    assert max_gated_rows(_cfg(gate_fraction=0.0), 100) == 0 and max_gated_rows(_cfg(gate_fraction=0.101), 100) == 11


def test_agreement_gates_rows_whose_views_disagree_first_ties_by_margin():
    views = {(1.0, 0): np.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]]),
             (1.0, 1): np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])}
    probs = tta_probs(views)  # row 0: views agree; rows 1 and 2: one view each picks b
    rows, score = select_gated(probs, views, _cfg(gate_by="agreement", gate_fraction=0.33, tta_option_views=2))
    np.testing.assert_allclose(score, [1.0, 0.5, 0.5])
    assert rows.tolist() == [1]  # of the two tied rows, the one with the smaller margin (0.10 vs 0.20)
    assert select_gated(probs, views, _cfg(gate_by="agreement", gate_fraction=1.0, tta_option_views=2))[0].tolist() == [1, 2]


def test_gate_view_plan_and_its_bound():
    perms = gate_perms(_cfg(tta_option_views=4, gate_fraction=0.1))
    assert len(perms) == 24 and set(perms) == set(itertools.permutations(range(4)))
    assert perms[:4] == [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]  # the normal pass's, reused
    assert extra_views_per_row(_cfg(tta_option_views=4, gate_fraction=0.1)) == 20
    assert extra_views_per_row(_cfg(tta_option_views=1, gate_fraction=0.1)) == 23
    assert extra_views_per_row(_cfg(tta_option_views=4, gate_option_orders=4, gate_image_scale=1.5)) == 4
    assert extra_views_per_row(_cfg(tta_option_views=4, gate_image_scale=1.5, tta_image_scales="0.75")) == 24 * 3 - 8


@pytest.mark.parametrize("setting", ["gate_by=entropy", "gate_apply=never", "gate_option_orders=6",
                                     "gate_fraction=1.5", "gate_image_scale=-1", "tta_average=median"])
def test_a_bad_gate_setting_names_itself_before_any_work(setting):
    from mcvqa.core.config import resolve_config

    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=f"config: {key} "):
        resolve_config("demo", [setting], env={}, verbose=False)


def test_a_gate_that_adds_no_view_is_refused_with_the_fix():
    from mcvqa.core.config import resolve_config

    settings = ["gate_fraction=0.1", "tta_option_views=4", "gate_option_orders=4"]
    with pytest.raises(ConfigError, match="no view beyond the normal pass's .* Fix: gate_option_orders=24"):
        resolve_config("demo", settings, env={}, verbose=False)
    assert extra_views_per_row(resolve_config("demo", settings + ["gate_image_scale=1.5"], env={}, verbose=False)) == 4
    with pytest.raises(ConfigError, match="gate_by=agreement needs 2\\+ views"):  # the demo: one view
        resolve_config("demo", ["gate_fraction=0.1", "gate_by=agreement"], env={}, verbose=False)


@pytest.mark.parametrize("orders, scale", [(24, 0.0), (4, 2.0)])
def test_gated_rows_get_all_their_views_and_the_other_rows_stay_bit_identical(orders, scale, tiny_model, tiny_cfg,
                                                                            hardware, tmp_path):
    """The gated rows' probabilities equal an independent pass over all their views (view by view, no cache,
    no shared prefix); the ungated rows' are the normal pass's, bit for bit."""
    family = "qwen2_5_vl"
    model = tiny_model(family, False)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0,
                   infer_batch_size=2, gate_fraction=0.5, gate_option_orders=orders, gate_image_scale=scale)
    from mcvqa.core.modeling import load_processor

    processor = load_processor(cfg)
    fmt = make_prompt_format(processor, cfg)
    words = ["빨간색", "파란색", "초록색", "노란색", "원", "별"]
    rows = []
    for i in range(6):  # 200 x 160 images: a larger pixel budget (scale 2) is another image to the tower
        Image.new("RGB", (200, 160), (40 * i, 200 - 30 * i, 90)).save(tmp_path / f"{i}.png")
        options = words[i % 3:i % 3 + 4]
        rows.append({"id": f"q{i}", "image_path": str(tmp_path / f"{i}.png"), "question": "그림 속 도형은 무슨 색입니까?",
                     "a": options[0], "b": options[1], "c": options[2], "d": options[3], "answer": "a"})
    frame = pd.DataFrame(rows)
    cache = make_feature_cache(cfg, model, hardware)
    assert cache is not None  # the product's path: cached features, shared prefix
    views = predict_views(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache), model, frame)
    probs = tta_probs(views)
    gated, report = gated_probs(FoldContext(processor, fmt, cfg, hardware, feature_cache=cache),
                                model, frame, probs, views, desc="test", map_shards=lambda part, fn: [fn(part)])
    chosen, _ = select_gated(probs, views, cfg)
    assert len(chosen) == 3 and report["gated"] == 3 and report["gated_ids"] == [f"q{i}" for i in chosen]
    others = np.setdiff1d(np.arange(6), chosen)
    assert np.array_equal(gated[others], probs[others])  # bit for bit
    plain = dataclasses.replace(cfg, cache_image_features=False, tta_shared_prefix=False)
    perms = gate_perms(cfg)
    reference = []
    for s in ([1.0] + ([scale] if scale else [])):
        reference += list(predict_views(FoldContext(processor, fmt, plain, hardware),
                                        model, frame.iloc[chosen].reset_index(drop=True), perms=perms, scales=[s]).values())
    assert len(reference) == (24 if orders == 24 else 8)
    np.testing.assert_allclose(gated[chosen], average_views(reference), atol=2e-6)
    # The extra views changed them, by well over the tolerance above (the tiny model's letters are near 0.25).
    assert np.abs(gated[chosen] - probs[chosen]).max() > 2e-5
    assert report["extra_views"] == 3 * extra_views_per_row(cfg)


def test_the_submission_takes_the_gate_only_when_it_raised_out_of_fold_accuracy():
    answers = np.array(["a", "b", "c", "d", "a", "b"])
    ungated = np.eye(4)[[0, 1, 2, 3, 1, 0]] * 0.5 + 0.125  # rows 4 and 5 wrong
    better = ungated.copy()
    better[4] = [0.6, 0.2, 0.1, 0.1]  # the gate fixes row 4
    mask = np.array([False, False, False, False, True, True])
    reports = {"oof": [{"rows": 6, "gated": 2, "extra_views": 40, "extra_s": 2.0, "normal_views": 24,
                        "normal_s": 4.0}], "test": []}
    summary = gate_summary(ungated, better, answers, mask, "auto", reports)
    assert summary["applied"] and summary["oof_rows_gated"] == 2
    assert (summary["oof_accuracy_gated_rows_before"], summary["oof_accuracy_gated_rows_after"]) == (0.0, 0.5)
    assert summary["cv_accuracy_before"] == pytest.approx(4 / 6) and summary["cv_accuracy_after"] == pytest.approx(5 / 6)
    cost = summary["cost"]["oof"]
    # 0.05 s per extra view against 4 / 24 s per normal view; 4 views per row, so one single-view pass is 1 s.
    assert cost["s_per_extra_view"] == pytest.approx(0.05) and cost["s_per_normal_view"] == pytest.approx(4 / 24)
    assert cost["extra_in_single_view_passes"] == pytest.approx(2.0)
    worse = ungated.copy()
    worse[0] = [0.1, 0.7, 0.1, 0.1]  # an ungated row would not change; here the gate would hurt row 0 if applied
    mask_worse = np.array([True, False, False, False, True, True])
    assert not gate_summary(ungated, worse, answers, mask_worse, "auto", reports)["applied"]
    assert not gate_summary(ungated, ungated, answers, mask, "auto", reports)["applied"]  # no gain: not applied
    assert gate_summary(ungated, worse, answers, mask_worse, "always", reports)["applied"]


def test_the_gate_plot_shows_the_before_and_after_it_is_given(tmp_path):
    from mcvqa.runkit.reporting import plot_uncertainty_gate

    gate = {"oof_rows_gated": 60, "oof_rows": 300, "oof_accuracy_gated_rows_before": 0.367,
            "oof_accuracy_gated_rows_after": 0.233, "cv_accuracy_before": 0.783, "cv_accuracy_after": 0.757,
            "applied": False}
    fig = plot_uncertainty_gate(gate, tmp_path / "gate.png")
    heights = [round(bar.get_height(), 3) for bar in fig.axes[0].patches]
    assert heights == [0.367, 0.783, 0.233, 0.757]  # normal pass (gated, all), then with the gate's views
    assert "not applied" in fig.axes[0].get_title() and (tmp_path / "gate.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close(fig)  # (test_reporting checks that no figure is left open)


def test_the_base_model_is_one_more_view_of_the_gated_rows(tiny_model, tiny_cfg, hardware, tmp_path):
    """gate_base_model: the gated rows' probabilities are the average of their normal views and the base model's
    (adapter off) views of the same option orders, each computed independently here (no cache, no shared prefix);
    the adapter is on again afterwards."""
    family = "qwen2_5_vl"
    model = tiny_model(family, False)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, tta_option_views=4, num_workers=0,
                   infer_batch_size=2, gate_fraction=0.5, gate_option_orders=4, gate_base_model=True)
    from mcvqa.core.modeling import load_processor

    processor = load_processor(cfg)
    fmt = make_prompt_format(processor, cfg)
    rows = []
    for i in range(4):
        Image.new("RGB", (120, 100), (60 * i, 180 - 40 * i, 90)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"q{i}", "image_path": str(tmp_path / f"{i}.png"), "question": "무슨 색입니까?",
                     "a": "빨간색", "b": "파란색", "c": "초록색", "d": "노란색", "answer": "a"})
    frame = pd.DataFrame(rows)
    ctx = FoldContext(processor, fmt, cfg, hardware, feature_cache=make_feature_cache(cfg, model, hardware))
    views = predict_views(ctx, model, frame)
    probs = tta_probs(views)
    gated, report = gated_probs(ctx, model, frame, probs, views, desc="test", map_shards=lambda part, fn: [fn(part)])
    chosen, _ = select_gated(probs, views, cfg)
    assert len(chosen) == 2 and report["extra_views"] == 2 * 4 == 2 * extra_views_per_row(cfg)
    plain = FoldContext(processor, fmt, dataclasses.replace(cfg, cache_image_features=False, tta_shared_prefix=False),
                        hardware)
    subset = frame.iloc[chosen].reset_index(drop=True)
    adapted = list(predict_views(plain, model, subset).values())
    with model.disable_adapter():
        base = list(predict_views(plain, model, subset).values())
    np.testing.assert_allclose(gated[chosen], average_views(adapted + base), atol=2e-6)
    assert np.abs(np.array(base) - np.array(adapted)).max() > 1e-4  # another opinion, 50x the tolerance above
    np.testing.assert_allclose(tta_probs(predict_views(plain, model, subset)), average_views(adapted), atol=1e-7)


def test_the_zero_shot_label_check_scores_with_the_adapter_off(tiny_model, tiny_cfg, hardware, tmp_path):
    """zero_shot_label_check: the fold's out-of-fold rows scored by the base model (one view), written once."""
    from mcvqa.core.modeling import load_processor
    from mcvqa.pipeline import ZERO_SHOT_OOF, zero_shot_scores

    family = "qwen2_5_vl"
    model = tiny_model(family, False)
    cfg = tiny_cfg(family, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, num_workers=0, infer_batch_size=2)
    processor = load_processor(cfg)
    ctx = FoldContext(processor, make_prompt_format(processor, cfg), cfg, hardware, fold_dir=tmp_path)
    rows = []
    for i in range(3):
        Image.new("RGB", (120, 100), (70 * i, 90, 180 - 50 * i)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"z{i}", "image_path": str(tmp_path / f"{i}.png"), "question": "무슨 색입니까?",
                     "a": "빨간색", "b": "파란색", "c": "초록색", "d": "노란색", "answer": "a"})
    frame = pd.DataFrame(rows)
    zero_shot_scores(ctx, model, frame)
    written = pd.read_csv(tmp_path / ZERO_SHOT_OOF)
    with model.disable_adapter():
        base = predict_views(ctx, model, frame, perms=[(0, 1, 2, 3)], scales=[1.0])[(1.0, 0)]
    adapted = predict_views(ctx, model, frame, perms=[(0, 1, 2, 3)], scales=[1.0])[(1.0, 0)]
    assert written["id"].tolist() == ["z0", "z1", "z2"]
    np.testing.assert_allclose(written[["p_a", "p_b", "p_c", "p_d"]].to_numpy(), base, atol=1e-6)
    assert np.abs(base - adapted).max() > 1e-4  # the adapter was really off
