"""Gemma 4 on the model-family layer: what differs from the Qwen families, each with a check that fails when
that difference is ignored (the shared per-family tests in test_scoring.py / test_feature_cache.py run for it too).

Two tiny variants with the real classes: "e2b" (per-layer embeddings, KV sharing, as E2B/E4B) and "31b" (K = V on
global layers, bidirectional attention inside an image, the empty thought channel before the answer, as 26B/31B)."""

import json
import pathlib

import pandas as pd
import pytest
import torch
import transformers
from PIL import Image

from conftest import TINY_TEXTS, demo_config, randomise_lora
from mcvqa.core.collate import VqaCollator, cyclic_perms
from mcvqa.core.modeling import unwrap_vlm as unwrap
from mcvqa.core.scoring import letter_logits

pytestmark = pytest.mark.skipif(not hasattr(transformers, "Gemma4ForConditionalGeneration"),
                                reason="transformers without Gemma 4 (from 5.5)")
SHARED_GEMMA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vlm_tokenizers" / "gemma-4-E2B-it"
QUESTIONS = ["그림 속 도형은 무슨 색입니까?", "도형은 그림의 어느 부분에 있습니까? 왼쪽 위를 잘 보세요. " * 2, "몇 개?"]
OPTIONS = [["빨간색", "파란색", "초록색", "노란색"], ["왼쪽 위", "오른쪽 위", "왼쪽 아래 " * 3, "오른쪽 아래"],
           ["1개", "2개", "3개", "4개"]]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, hardware):
    """Factory: gemma(variant) -> (model with random LoRA, processor, prompt format, cfg), fp32 on the CPU."""
    from mcvqa.core.modeling import load_model_for_training, load_processor
    from mcvqa.core.prompts import make_prompt_format
    from mcvqa.demo.demo_model import build_tiny_qwen_vl

    cache = {}

    def get(variant):
        if variant not in cache:
            folder = build_tiny_qwen_vl(tmp_path_factory.mktemp(f"gemma_{variant}"), TINY_TEXTS, family="gemma4",
                                        variant=variant)
            cfg = demo_config(model_name_or_path=str(folder), quantization="none")
            processor = load_processor(cfg)
            model = randomise_lora(load_model_for_training(cfg, hardware)).eval()
            cache[variant] = (model, processor, make_prompt_format(processor, cfg), cfg)
        return cache[variant]

    return get


def _views(n_rows=3):
    """Every row's 4 cyclic option orders (row-major), images of different sizes and colours."""
    views = []
    for r in range(n_rows):
        image = Image.new("RGB", (60 + 40 * r, 90 - 15 * r), (200 - 60 * r, 40 + 50 * r, 90))
        for perm in cyclic_perms(4):
            views.append({"row": r, "perm": perm, "image": image, "question": QUESTIONS[r],
                          "options": [OPTIONS[r][p] for p in perm], "answer": perm.index(0)})
    return views


def _batch(processor, fmt, cfg, views, encoding=None):
    from mcvqa.families.gemma4 import GEMMA4

    return VqaCollator(processor, fmt, cfg.min_pixels, GEMMA4.pixel_cap(cfg), encoding=encoding)(views)


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_the_letter_is_trained_and_scored_where_the_model_writes_it(gemma, variant):
    """E2B/E4B answer right after `<|turn>model\\n`; 26B/31B after the empty thought channel their generation prompt
    ends with (and their answered history drops): the label, the scored position and the letter ids are there."""
    model, processor, fmt, cfg = gemma(variant)
    batch = _batch(processor, fmt, cfg, _views(1)[:1])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    position = int(batch["answer_positions"][0])
    decode = processor.tokenizer.decode
    before = decode(ids[:position + 1])
    assert before.endswith("<|turn>model\n<|channel>thought\n<channel|>" if variant == "31b" else "<|turn>model\n")
    assert [i for i, label in enumerate(labels) if label != -100] == [position + 1]
    assert labels[position + 1] == ids[position + 1] == fmt.letter_ids[0] and decode(ids[position + 1]) == "a"
    assert decode(ids[position + 2:]) == "<turn|>\n" and ids[0] == processor.tokenizer.bos_token_id != ids[1]


def test_without_the_thought_channel_rule_the_31b_template_is_refused(gemma, monkeypatch):
    """The rule has teeth: without it the 31B's prompt is no prefix of its answered conversation, and the
    pipeline stops instead of training a letter the model would never write there."""
    import mcvqa.core.prompts as prompts

    _, processor, _, cfg = gemma("31b")
    monkeypatch.setattr(prompts, "EMPTY_THOUGHT_BLOCKS", ())
    with pytest.raises(ValueError, match="not a prefix of the answered conversation"):
        prompts.make_prompt_format(processor, cfg)


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_scoring_equals_the_full_forward_and_generate(gemma, variant):
    """Four logits read at the answer position equal the model's own forward (soft-capped logits) and `generate`'s
    first step, for a ragged batch of three rows."""
    model, processor, fmt, cfg = gemma(variant)
    views = [dict(view, answer=-1) for view in _views()[::4]]  # prompts only: generate continues them
    batch = _batch(processor, fmt, cfg, views)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3
    stock = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                    "image_position_ids")}
    with torch.no_grad():
        ours = letter_logits(model, batch, fmt.letter_ids, "cpu", torch.float32)
        full = model(**stock, use_cache=False).logits
        want = full[torch.arange(3), batch["answer_positions"]][:, fmt.letter_ids]
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
        one = {k: v[:1] for k, v in stock.items()}
        one["attention_mask"] = one["attention_mask"][:, :int(batch["attention_mask"][0].sum())]
        one["input_ids"], one["mm_token_type_ids"] = (t[:, :one["attention_mask"].shape[1]] for t in
                                                      (one["input_ids"], one["mm_token_type_ids"]))
        out = model.generate(**one, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.softmax(out.scores[0][0, fmt.letter_ids].float(), -1),
                               torch.softmax(ours[0], -1), atol=1e-4, rtol=0)
    # Gemma caps its logits (30 x tanh(x / 30)); the tiny model's are too small to feel a cap of 30, so a cap below
    # their size shows the scorer applies the model's own.
    text = unwrap(model).config.get_text_config()
    text.final_logit_softcapping, cap = 0.05, text.final_logit_softcapping
    try:
        with torch.no_grad():
            capped = letter_logits(model, batch, fmt.letter_ids, "cpu", torch.float32)
            full = model(**stock, use_cache=False).logits[torch.arange(3), batch["answer_positions"]][:, fmt.letter_ids]
    finally:
        text.final_logit_softcapping = cap
    torch.testing.assert_close(capped, full, atol=1e-5, rtol=0)
    assert (capped - ours).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_cached_features_and_the_shared_prefix_equal_the_stock_forward(gemma, variant):
    """Features enter through the model's own forward (its per-layer embeddings, its image-block mask), and one
    prefix pass per row with its cache repeated for 4 option orders gives each view's letter logits, with prompts
    longer than the sliding window (32 tokens in the tiny model) and rows of different lengths."""
    from mcvqa.speed.feature_cache import CachedImageEncoding, FeatureCache
    from mcvqa.speed.shared_prefix import shared_prefix_letter_logits

    model, processor, fmt, cfg = gemma(variant)
    views = _views()
    stock = _batch(processor, fmt, cfg, views)
    assert stock["attention_mask"].sum(1).min() > 2 * model.config.text_config.sliding_window
    cache = FeatureCache()
    with torch.no_grad():
        batch = cache.attach(model, _batch(processor, fmt, cfg, views, encoding=CachedImageEncoding()))
        assert cache.encoded == 3 and torch.equal(batch["input_ids"], stock["input_ids"])
        exact = letter_logits(model, stock, fmt.letter_ids, "cpu", torch.float32)
        cached = letter_logits(model, batch, fmt.letter_ids, "cpu", None)
        shared = shared_prefix_letter_logits(model, batch, fmt.letter_ids, "cpu", n_views=4)
    torch.testing.assert_close(cached, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, exact, atol=1e-4, rtol=0)
    assert not torch.allclose(exact[0], exact[1])


def test_the_shared_prefix_fails_with_right_padding_or_without_its_cache_expansion(gemma, monkeypatch):
    """The two family choices have teeth: prefixes padded on the right push real tokens out of the sliding window
    (it counts cache slots, not positions), and a cache not repeated per option order does not fit the batch."""
    from mcvqa.families.gemma4 import GEMMA4
    from mcvqa.speed.feature_cache import CachedImageEncoding, FeatureCache
    from mcvqa.speed.shared_prefix import shared_prefix_letter_logits

    model, processor, fmt, cfg = gemma("e2b")
    with torch.no_grad():
        batch = FeatureCache().attach(model, _batch(processor, fmt, cfg, _views(), encoding=CachedImageEncoding()))
        exact = letter_logits(model, batch, fmt.letter_ids, "cpu", None)
        monkeypatch.setattr(GEMMA4, "prefix_padding", "right")
        wrong = shared_prefix_letter_logits(model, batch, fmt.letter_ids, "cpu", n_views=4)
        assert (wrong - exact).abs().max() > 1e-3
        monkeypatch.setattr(GEMMA4, "prefix_padding", "left")
        monkeypatch.setattr(GEMMA4, "expand_cache", lambda cache, n_rows, n_views: None)
        with pytest.raises(Exception):
            shared_prefix_letter_logits(model, batch, fmt.letter_ids, "cpu", n_views=4)


def test_the_budget_is_max_soft_tokens(gemma):
    """Gemma's resolution setting: images are decoded within budget x 48² pixels, the processor is told the budget,
    a 448x448 image becomes 256 tokens at 280, and TTA image scales step through the values Gemma takes."""
    from mcvqa.families.gemma4 import GEMMA4
    from mcvqa.core.config import ConfigError

    _, processor, _, _ = gemma("e2b")
    cfg = demo_config(max_soft_tokens=280)
    assert GEMMA4.pixel_cap(cfg) == 280 * 48 * 48 and GEMMA4.image_kwargs(0, GEMMA4.pixel_cap(cfg)) == {"max_soft_tokens": 280}
    assert GEMMA4.soft_tokens(cfg, 1.5) == 280 and GEMMA4.soft_tokens(cfg, 2.0) == 560 and GEMMA4.soft_tokens(cfg, 0.5) == 140
    n, _ = GEMMA4.image_tokens(processor, {"max_soft_tokens": 280}, Image.new("RGB", (448, 448)))
    assert n == 256
    with pytest.raises(ConfigError, match="max_soft_tokens"):
        demo_config(max_soft_tokens=300)


def test_a_folder_without_its_tokenizer_json_is_refused():
    """From the files Gemma publishes besides tokenizer.json, transformers quietly builds a 24-token tokenizer
    (every word `<unk>`): the run stops at once, naming the file to copy."""
    if not SHARED_GEMMA.is_dir():
        pytest.skip("../shared/vlm_tokenizers/gemma-4-E2B-it not found")
    from mcvqa.core.modeling import ModelFolderError, check_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_GEMMA)
    with pytest.raises(ModelFolderError, match="tokenizer.json"):
        check_tokenizer(tokenizer, str(SHARED_GEMMA))


def test_the_real_e2b_config_plans_nf4_on_a_t4_with_its_per_layer_table_in_16_bits(monkeypatch):
    """E2B's per-layer embedding table (262,144 x 35 x 256 = 2.35 B values) is a frozen lookup: k-bit training would
    upcast it to fp32 (8.8 GiB), more than half a T4. The family keeps it, the embedding and the towers' outputs as
    planned; LoRA goes on the decoder's attention and MLP only (KV-sharing layers have no k/v projections)."""
    if not SHARED_GEMMA.is_dir():
        pytest.skip("../shared/vlm_tokenizers/gemma-4-E2B-it not found")
    from mcvqa.core.config import resolve_config
    from mcvqa.core.hardware import choose_hardware
    from mcvqa.core.memory import plan_memory
    from mcvqa.families.gemma4 import GEMMA4

    t4 = choose_hardware([{"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}], dtype="float16")
    cfg = resolve_config("kaggle_t4x2", [f"model_name_or_path={SHARED_GEMMA}"], env={}, verbose=False)
    planned, plan = plan_memory(cfg, t4, verbose=False)
    assert planned.quantization == "nf4" and plan["weights_gib"] < 9
    assert plan["tokens_per_sample"] == 280 + 2 + 160 and plan["patches_per_image"] == 2520
    # q, o, gate, up, down on all 35 layers, k and v on the 15 that keep their own cache: r=16 x (in + out)
    text = json.loads((SHARED_GEMMA / "config.json").read_text())["text_config"]
    assert text["num_kv_shared_layers"] == 20 and plan["lora_params"] > 0
    monkeypatch.setattr(GEMMA4, "embeddings_16bit", False)
    _, upcast = plan_memory(cfg, t4, verbose=False)
    assert upcast["weights_gib"] - plan["weights_gib"] > 5


def test_an_attached_gemma_asks_for_the_release_with_its_fast_paths(tmp_path, monkeypatch):
    """Kaggle's transformers 5.0.0 has no Gemma 4, and 5.5.0-5.5.1 compute wrong logits without a cache on the
    KV-sharing models: located under /kaggle/input, the folder raises the setup cell's requirement and a run on
    an older release stops with the fix, before anything loads."""
    from packaging.version import Version

    import mcvqa.runkit.locate as locate
    from mcvqa.machinery import packages
    from mcvqa.machinery.packages import SetupError

    folder = tmp_path / "gemma-4-e4b-it" / "transformers" / "default" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4"}))
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("KAGGLE_INPUT_DIR", str(tmp_path))
    assert locate.find_model_dir(tmp_path) == str(folder)
    assert packages.run_requirements(tmp_path)["transformers"] == ">=5.18,<6"
    monkeypatch.setattr(locate, "transformers_version", lambda: Version("5.5.1"))
    with pytest.raises(SetupError, match=r"Gemma 4 \(model_type gemma4\), which needs transformers >= 5.5.2 "
                                         r"\(>= 5.18 for its fast paths\)"):
        locate.check_family_release(folder)


def test_features_are_not_cached_where_the_forward_cannot_take_them(gemma, hardware, monkeypatch, capsys):
    """Before transformers 5.18 Gemma4Model.forward has no mm_encoder_outputs: the cache steps aside with the reason
    (the tower then runs on every view) instead of feeding features a way that breaks the per-layer embeddings."""
    from mcvqa.families.gemma4 import GEMMA4
    from mcvqa.speed.feature_cache import make_feature_cache

    model, _, _, cfg = gemma("e2b")
    assert GEMMA4.cached_features_problem(model.get_base_model().model) is None  # (5.25: the path the tests above ran)
    assert make_feature_cache(cfg, model, hardware, verbose=False) is not None
    monkeypatch.setattr(GEMMA4, "cached_features_problem",
                        lambda vlm_model: "Gemma 4's forward takes precomputed image features from transformers 5.18")
    assert make_feature_cache(cfg, model, hardware) is None
    assert "image-feature cache off: Gemma 4's forward takes precomputed image features" in capsys.readouterr().out


def test_nf4_keeps_the_towers_out_of_four_bits_and_trains_lora_on_the_decoder_only(gemma, hardware):
    """The vision tower and its projection stay unquantised and frozen; LoRA sits on the decoder's attention and MLP
    (not the tower's clippable linears, which peft cannot adapt), and a training step reaches every adapter."""
    from mcvqa.core.modeling import load_model_for_training
    from mcvqa.core.scoring import answer_loss

    _, processor, fmt, cfg = gemma("e2b")
    model = load_model_for_training(demo_config(model_name_or_path=cfg.model_name_or_path, quantization="nf4"), hardware)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".language_model.layers." in n and "lora_" in n for n in names)
    assert not any("Linear4bit" in type(m).__name__ for n, m in model.named_modules()
                   if "vision_tower" in n or "embed_vision" in n)
    assert any("Linear4bit" in type(m).__name__ for n, m in model.named_modules() if ".language_model.layers." in n)
    model.train()
    loss, _ = answer_loss(model, _batch(processor, fmt, cfg, _views(1)), fmt.letter_ids, "cpu", torch.float32)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_system_prompt_is_written_as_text(gemma):
    """Gemma 4's template writes list-form system content as its Python repr ("[{'type': 'text', ...}]"; the tiny
    template copies the real one there, test_demo_model.py): the pipeline sends the system turn as a string."""
    import dataclasses

    from mcvqa.core.prompts import make_prompt_format, render_prompt

    _, processor, _, cfg = gemma("e2b")
    fmt = make_prompt_format(processor, dataclasses.replace(cfg, system_prompt="한국어 시험 문제입니다."))
    text, _ = render_prompt(processor, fmt, "그림 속 도형은?", ["원", "별", "네모", "세모"])
    assert text.startswith("<bos><|turn>system\n한국어 시험 문제입니다.<turn|>\n<|turn>user\n<|image|>그림 속 도형은?")
    assert "'type'" not in text


def test_e2b_e4b_folders_with_their_audio_tower_load_with_sdpa(gemma, hardware, tmp_path, capsys):
    """Real E2B/E4B folders carry an audio tower that has eager attention only: asked for SDPA (the pipeline's choice)
    for the whole model, transformers refused to load every one of them. The family asks per part."""
    import shutil

    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    from mcvqa.core.modeling import load_base_model

    _, _, _, cfg = gemma("e2b")
    config = AutoConfig.from_pretrained(cfg.model_name_or_path)
    config.audio_config = type(config.audio_config or transformers.Gemma4AudioConfig())(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, subsampling_conv_channels=[8, 4],
        output_proj_dims=config.text_config.hidden_size, conv_kernel_size=5)
    folder = tmp_path / "with_audio"
    Gemma4ForConditionalGeneration(config).save_pretrained(folder)
    for name in pathlib.Path(cfg.model_name_or_path).iterdir():
        if name.suffix in (".json", ".jinja") and name.name not in ("config.json", "TINY_MODEL.json"):
            shutil.copy(name, folder / name.name)
    with pytest.raises(ValueError, match="does not support an attention implementation"):
        transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa")
    model = load_base_model(demo_config(model_name_or_path=str(folder), quantization="none"), hardware)
    assert "[model] Gemma 4: attention per part" in capsys.readouterr().out
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert model.config.audio_config._attn_implementation == "eager"


def test_a_resumed_run_notices_another_image_budget():
    """max_soft_tokens decides what a fold's Gemma sees, as max_pixels does Qwen's: a run folder resumed with
    another budget is told (folds built with the old one are not mixed in silently); runs saved before the
    setting existed compare as unchanged."""
    from mcvqa.core.config import changed_settings

    cfg = demo_config(max_soft_tokens=560)
    saved = {"instruction_first": cfg.instruction_first}
    assert changed_settings({**saved, "max_soft_tokens": 280}, cfg) == {"max_soft_tokens": (280, 560)}
    assert changed_settings(saved, cfg) == {}
