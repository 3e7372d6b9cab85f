"""The memory plan (memory.py) on full-size Qwen-VL configs (no weights: meta tensors) and faked cards,
and the per-process memory cap that rehearses a smaller card."""

import dataclasses

import pytest
from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

from mcvqa.core.config import resolve_config
from mcvqa.core.hardware import choose_hardware
from mcvqa.core.memory import LORA_COPIES, _meta_model, plan_memory, weight_gib

SPECIAL = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
# Published sizes (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-8B-Instruct config.json).
QWEN25_3B = Qwen2_5_VLConfig(
    text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14),
    tie_word_embeddings=True, **SPECIAL)
QWEN3_8B = Qwen3VLConfig(
    text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True}),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False, **SPECIAL)
T4 = {"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for name, config in (("3b", QWEN25_3B), ("8b", QWEN3_8B)):
        dirs[name] = tmp_path_factory.mktemp(name)
        config.save_pretrained(dirs[name])
    return dirs


def _cfg(profile, model_dir, *overrides):
    return resolve_config(profile, [f"model_name_or_path={model_dir}", *overrides], env={}, verbose=False)


@pytest.mark.parametrize("name,measured", [("3b", 5.11), ("8b", 10.31)])
def test_weight_estimate_matches_the_measured_load(model_dirs, name, measured):
    """Measured on an H200 under the T4 settings (BENCHMARKS.md "T4 budget": the model right after
    load_model_for_training, fp16, NF4, fp32 vision tower); the estimate adds the LoRA optimizer state."""
    cfg = _cfg("kaggle_t4x2", model_dirs[name])
    model, _ = _meta_model(cfg)
    weights = weight_gib(model, cfg, choose_hardware([T4]), nf4=True)
    base = weight_gib(model, dataclasses.replace(cfg, lora_r=0), choose_hardware([T4]), nf4=True)
    lora_state = weights - base  # LoRA weights, gradients, two AdamW moments, EMA: 5 fp32 copies
    assert lora_state > 0.2
    assert abs(base + lora_state / LORA_COPIES - measured) / measured < 0.12  # the load held the LoRA weights only


def test_t4_plan_for_8b_turns_checkpointing_on_and_lowers_the_batches_keeping_the_effective_batch(model_dirs, capsys):
    cfg = _cfg("kaggle_t4x2", model_dirs["8b"])
    planned, plan = plan_memory(cfg, choose_hardware([T4]))
    out = capsys.readouterr().out
    assert planned.gradient_checkpointing == "on" and "gradient checkpointing on: micro-batch 16 needs" in out
    assert planned.micro_batch_size < cfg.micro_batch_size
    assert planned.micro_batch_size * planned.grad_accum_steps == cfg.micro_batch_size * cfg.grad_accum_steps
    assert "same effective batch of 16" in out
    assert planned.infer_batch_size < cfg.infer_batch_size and "infer_batch_size 16 ->" in out
    # What the run on an H200 under a 15 GiB cap measured with this plan (BENCHMARKS.md, run 18): 13.7 GiB peak.
    assert plan["weights_gib"] + planned.micro_batch_size * plan["activation_gib_per_sample"] < 15.0


def test_a_bigger_card_drops_checkpointing_where_the_micro_batch_fits_without_it(model_dirs, capsys):
    cfg = _cfg("local_gpu", model_dirs["3b"], "micro_batch_size=8", "max_pixels=200704")
    on_40 = plan_memory(cfg, choose_hardware([{"name": "A100-40GB", "capability": (8, 0), "memory_gib": 40.0}]))[0]
    on_80 = plan_memory(cfg, choose_hardware([{"name": "A100-80GB", "capability": (8, 0), "memory_gib": 80.0}]))[0]
    assert on_40.gradient_checkpointing == "on" and on_80.gradient_checkpointing == "off"
    assert on_40.micro_batch_size == on_80.micro_batch_size == 8
    forced = plan_memory(_cfg("local_gpu", model_dirs["3b"], "gradient_checkpointing=on", "micro_batch_size=8"),
                         choose_hardware([{"name": "A100-80GB", "capability": (8, 0), "memory_gib": 80.0}]))[0]
    assert forced.gradient_checkpointing == "on"  # a setting the user forced is kept


def test_a_model_too_big_for_the_card_stops_with_the_fix(model_dirs):
    with pytest.raises(ValueError, match=r"needs ~.* GiB for its weights alone.*Fix: a smaller model.*or quantization=nf4"):
        plan_memory(_cfg("kaggle_t4x2", model_dirs["8b"], "quantization=none"), choose_hardware([T4]))


def test_cpu_plan_only_resolves_auto(model_dirs):
    cfg = _cfg("local_gpu", model_dirs["3b"])
    planned, plan = plan_memory(cfg, choose_hardware([]), verbose=False)
    assert planned.gradient_checkpointing == "off" and planned.micro_batch_size == cfg.micro_batch_size
    assert plan["device"] == "cpu" and plan["gradient_checkpointing"] == "off"
    # The sizes preflight.py checks the disk and the time budget against, from Qwen2.5-VL-3B's config by hand:
    # per layer q, o: 2048 -> 2048; k, v: 2048 -> 256; gate, up: 2048 -> 11008; down: 11008 -> 2048.
    pairs = [(2048, 2048)] * 2 + [(2048, 256)] * 2 + [(2048, 11008)] * 2 + [(11008, 2048)]
    assert plan["lora_params"] == 36 * sum(16 * (i + o) for i, o in pairs) == 29_933_568
    assert plan["lm_matmul_params"] == 36 * sum(i * o for i, o in pairs)
    assert plan["tokens_per_sample"] == 448 * 448 // 28**2 + 160
    assert plan["feature_bytes_per_image"] == 448 * 448 // 28**2 * 2048 * 2  # one bf16/fp16 vector per image token
    # The tower: 32 blocks of qkv 1280 -> 3840, proj 1280 -> 1280, gate/up 1280 -> 3420, down 3420 -> 1280; the
    # merger's 5120 -> 5120 -> 2048. 1,024 patches of 14 px in 448 x 448.
    blocks = 32 * (1280 * 3840 + 1280 * 1280 + 2 * 1280 * 3420 + 3420 * 1280)
    assert plan["vision_matmul_params"] == blocks + 5120 * 5120 + 5120 * 2048 and plan["patches_per_image"] == 1024


def test_gradient_checkpointing_setting_takes_booleans_and_rejects_others():
    assert resolve_config("demo", ["gradient_checkpointing=true"], env={}, verbose=False).gradient_checkpointing == "on"
    assert resolve_config("demo", env={}, verbose=False).gradient_checkpointing == "off"  # the profile's False
    assert resolve_config("local_gpu", env={}, verbose=False).gradient_checkpointing == "auto"
    with pytest.raises(ValueError, match="gradient_checkpointing must be auto, on or off"):
        resolve_config("demo", ["gradient_checkpointing=sometimes"], env={}, verbose=False)


def test_memory_cap_rehearses_a_smaller_card():
    h200 = {"name": "NVIDIA H200", "capability": (9, 0), "memory_gib": 139.8}
    capped = choose_hardware([h200], dtype="float16", memory_cap_gib=15)
    assert capped.gpu_memory_gib == 15 and capped.memory_capped
    assert any("gpu_memory_gib=15" in reason for reason in capped.reasons)
    assert not choose_hardware([h200], memory_cap_gib=200).memory_capped  # a cap above the card is no cap
    assert not choose_hardware([], memory_cap_gib=15).memory_capped  # nothing to cap on the CPU
