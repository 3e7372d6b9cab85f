"""The model-family layer (mcvqa/families/): which family a checkpoint is, and what each family says about
LoRA targets, 4-bit skips, precision, the memory of a shared prefix, and the transformers release it needs;
each checked against an independent count from the published configs."""

import json
import pathlib

import pytest
import torch
from packaging.version import Version
from transformers import AutoModelForImageTextToText, Qwen3_5Config

from mcvqa.core.config import resolve_config
from mcvqa.core.hardware import choose_hardware
from mcvqa.runkit.locate import check_family_release, find_model_dir
from mcvqa.core.memory import choose_quantization, kv_cache_gib_per_row, lora_parameters, plan_memory
from mcvqa.core.modeling import lora_targets, model_family
from mcvqa.machinery.compat import transformers_version
from mcvqa.machinery.packages import SetupError
from mcvqa.families.qwen3_5 import QWEN3_5
from mcvqa.families.qwen_vl import QWEN_VL
from conftest import HAS_QWEN3_5
from mcvqa.families.registry import FAMILIES, UnknownFamilyError, family_of

T4 = {"name": "Tesla T4", "capability": (7, 5), "memory_gib": 15.0}
A100_40 = {"name": "NVIDIA A100-SXM4-40GB", "capability": (8, 0), "memory_gib": 39.5}
LAYERS_3_TO_1 = lambda n: ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * (n // 4)  # noqa: E731
ROPE = {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
        "mrope_interleaved": True}
# Published Qwen3.5 text configs (Qwen/Qwen3.5-4B and -9B config.json: widths, heads, DeltaNet heads); the vision
# towers are assumed the size of Qwen3-VL's of the same class (they change the weights by < 0.5 B).
QWEN35 = {
    "4B": dict(hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
               num_key_value_heads=4, tie_word_embeddings=True, vision=(24, 1024, 4096, 16)),
    "9B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
               num_key_value_heads=4, tie_word_embeddings=False, vision=(27, 1152, 4304, 16)),
}


def qwen35_config(size):
    spec = dict(QWEN35[size])
    depth, width, inner, heads = spec.pop("vision")
    tied = spec["tie_word_embeddings"]
    text = dict(spec, vocab_size=248320, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                layer_types=LAYERS_3_TO_1(spec["num_hidden_layers"]), rope_parameters=ROPE)
    vision = dict(depth=depth, hidden_size=width, intermediate_size=inner, num_heads=heads,
                  out_hidden_size=spec["hidden_size"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304, deepstack_visual_indexes=[])
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tied, image_token_id=248056,
                         video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054)


@pytest.fixture(scope="module")
def qwen35_dirs(tmp_path_factory):
    dirs = {}
    for size in QWEN35:
        dirs[size] = tmp_path_factory.mktemp(f"qwen35_{size}")
        qwen35_config(size).save_pretrained(dirs[size])
    return dirs


def _cfg(profile, model_dir, *overrides):
    return resolve_config(profile, [f"model_name_or_path={model_dir}", *overrides], env={}, verbose=False)


def test_every_model_type_has_exactly_one_family():
    types = [t for family in FAMILIES for t in family.model_types]
    assert len(types) == len(set(types))
    assert family_of("qwen2_5_vl") is QWEN_VL and family_of("qwen3_vl_moe") is QWEN_VL
    assert family_of("qwen3_5") is QWEN3_5 and family_of("qwen3_5_moe") is QWEN3_5
    with pytest.raises(UnknownFamilyError, match=r"model_type 'llama' is not a model line this pipeline loads.*qwen3_5"):
        family_of("llama")


def test_qwen35_lora_reaches_the_deltanet_projections(qwen35_dirs):
    """The Qwen-VL regex reached attention only in 1 layer of 4 (the full-attention ones); the family's adds the
    DeltaNet projections. Counted by hand from the 4B config: r x (in + out) per targeted layer."""
    cfg = _cfg("kaggle_t4x2", qwen35_dirs["4B"])
    assert lora_targets(cfg) == QWEN3_5.lora_targets
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(qwen35_config("4B"))
    h, inner = 2560, 9216
    keys, values = 16 * 128, 32 * 128  # DeltaNet: q and k of 16 heads, v of 32 heads, 128 wide each
    linear = (h + 2 * keys + values) + (h + values) + (values + h)  # in_proj_qkv, in_proj_z, out_proj
    full = (h + 2 * 16 * 256) + 2 * (h + 4 * 256) + (16 * 256 + h)  # q_proj (output gate: 2x), k, v, o
    mlp = 3 * (h + inner)
    assert lora_parameters(model, cfg) == 16 * (24 * linear + 8 * full + 32 * mlp)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n.endswith("linear_attn.in_proj_qkv") for n in names)
    old = _cfg("kaggle_t4x2", qwen35_dirs["4B"], f"lora_target_modules={QWEN_VL.lora_targets}")
    assert lora_parameters(model, old) == 16 * (8 * full + 32 * mlp)  # what the Qwen-VL regex gave: no DeltaNet


def test_a_shared_prefix_caches_keys_only_in_full_attention_layers_and_a_state_in_the_others():
    """Qwen3.5-0.8B (its published config): 6 of 24 layers keep keys and values; each of the other 18 keeps an
    fp32 recurrent state of 16 heads x 128 x 128 and a 4-wide convolution window over q, k and v: 18.8 MiB per
    sequence, whatever its length."""
    text = Qwen3_5Config(text_config=dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                                          num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                                          linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                                          linear_value_head_dim=128, linear_conv_kernel_dim=4,
                                          layer_types=LAYERS_3_TO_1(24), rope_parameters=ROPE)).text_config
    assert QWEN3_5.kv_layers(text) == 6 and QWEN_VL.kv_layers(text) == 24
    per_layer = 16 * 128 * 128 * 4 + (2 * 16 * 128 + 16 * 128) * 4 * 2
    assert QWEN3_5.state_bytes(text) == 18 * per_layer and round(18 * per_layer / 2**20, 1) == 18.8
    assert QWEN_VL.state_bytes(text) == 0

    class Config:  # what kv_cache_gib_per_row reads
        text_config = text

    tokens, views = 300, 4
    kv = 2 * 6 * 2 * 256 * tokens * 2
    one_layer = tokens * (4 * 1024 + 2 * 3584) * 2
    expected = ((kv + 18 * per_layer) * (1 + views) + 2.0 * one_layer) / 2**30
    assert kv_cache_gib_per_row(Config, QWEN3_5, tokens, views, 2) == pytest.approx(expected)


@pytest.mark.parametrize("size,card,chosen", [("4B", T4, "none"), ("9B", T4, "nf4"), ("9B", A100_40, "none")])
def test_qwen35_trains_16_bit_where_the_card_holds_it_else_nf4(qwen35_dirs, size, card, chosen, capsys):
    """Unsloth advises against 4-bit QLoRA for Qwen3.5: auto takes 16-bit LoRA where the 16-bit weights and a
    sample fit (4B on a T4, 9B on a 40 GB A100), NF4 where only that does (9B on a T4), and says why."""
    profile = "kaggle_t4x2" if card is T4 else "colab_a100"
    hardware = choose_hardware([card], dtype="float16" if card is T4 else "auto")
    planned, plan = plan_memory(_cfg(profile, qwen35_dirs[size]), hardware)
    assert planned.quantization == plan["quantization"] == chosen
    out = capsys.readouterr().out
    assert ("16-bit LoRA" in out) if chosen == "none" else ("prefers 16-bit LoRA, but" in out)
    # A Qwen-VL checkpoint keeps QLoRA; a setting wins over the family.
    model, config = None, None
    assert choose_quantization(_cfg(profile, qwen35_dirs[size], "quantization=nf4"), QWEN3_5, model, config,
                               hardware)[0] == "nf4"


def test_the_9b_nf4_plan_keeps_the_248k_embeddings_in_16_bits(qwen35_dirs, monkeypatch):
    """k-bit training upcasts what it does not quantise to fp32: Qwen3.5-9B's untied 248k x 4096 embedding and
    head would take 7.6 GiB in fp32; the family gives them back 16 bits (3.8 GiB less), which leaves a T4 room
    for its activations."""
    cfg, t4 = _cfg("kaggle_t4x2", qwen35_dirs["9B"]), choose_hardware([T4], dtype="float16")
    _, plan = plan_memory(cfg, t4, verbose=False)
    monkeypatch.setattr(QWEN3_5, "embeddings_16bit", False)
    _, upcast = plan_memory(cfg, t4, verbose=False)
    assert plan["quantization"] == upcast["quantization"] == "nf4"
    assert upcast["weights_gib"] - plan["weights_gib"] == pytest.approx(2 * 248320 * 4096 * 2 / 2**30, abs=0.01)
    assert plan["free_gib"] > 3 > upcast["free_gib"]


def test_a_family_newer_than_the_installed_transformers_stops_with_the_fix(tmp_path, monkeypatch):
    import mcvqa.runkit.locate as locate
    from packaging.version import Version

    folder = tmp_path / "qwen3.5-9b" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    (folder / "model.safetensors").write_bytes(b"")
    assert find_model_dir(tmp_path) == str(folder)  # auto finds a Qwen3.5 folder under /kaggle/input
    monkeypatch.setattr(locate, "transformers_version", lambda: Version("5.0.0"))  # Kaggle's image
    with pytest.raises(SetupError, match=r"is Qwen3.5 / Qwen3.6 \(model_type qwen3_5\), which needs transformers >= "
                                         r"5.2 \(>= 5.7 for its fast paths\); 5.0.0 is installed"):
        check_family_release(folder)
    monkeypatch.setattr(locate, "transformers_version", lambda: Version("5.2.0"))
    check_family_release(folder)


def test_model_family_of_a_folder(qwen35_dirs, tiny_model_dir):
    assert model_family(str(qwen35_dirs["9B"])) is QWEN3_5
    assert model_family(str(tiny_model_dir("qwen2_5_vl"))) is QWEN_VL


def test_an_attached_qwen35_raises_the_setup_cells_transformers_requirement(tmp_path, monkeypatch, capsys):
    """Kaggle's image has transformers 5.0.0: with a Qwen3.5 folder attached, the setup cell asks for what the
    family needs (its shared-prefix TTA: 5.7) and would install it, before anything imports transformers."""
    from mcvqa.machinery import packages

    assert packages.run_requirements(tmp_path) == packages.RUN_PACKAGES  # nothing attached: the floor
    folder = tmp_path / "qwen3.5-4b" / "transformers" / "default" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    required = packages.run_requirements(tmp_path)
    assert required["transformers"] == ">=5.7,<6" and "needs transformers>=5.7,<6" in capsys.readouterr().out
    monkeypatch.setattr(packages, "installed_version", lambda name: "5.0.0" if name == "transformers" else "99")
    assert packages.package_problems(required) == [("transformers", ">=5.7,<6", "5.0.0")]
    assert packages.package_problems(packages.RUN_PACKAGES) == []  # the floor alone would have kept 5.0.0


def test_the_setup_cells_table_is_the_families_own_need():
    """packages.py runs before anything is installed (standard library only), so it keeps its own table of what
    a model line needs: in step with the families."""
    from mcvqa.machinery.packages import MODEL_TYPE_TRANSFORMERS

    for family in FAMILIES:
        for model_type in family.model_types:
            if family.recommended_transformers == "5.0":
                assert model_type not in MODEL_TYPE_TRANSFORMERS
            else:
                assert MODEL_TYPE_TRANSFORMERS[model_type] == f">={family.recommended_transformers},<6"


def test_a_folder_saved_in_4_bits_trains_qlora_with_its_own_quantization(tiny_cfg, hardware, tmp_path, capsys):
    """A `...-bnb-4bit` download: auto plans NF4 for it (whatever the family prefers), none is refused with the
    fix, and it loads without a second quantization_config, computing in the hardware's dtype."""
    import warnings

    from mcvqa.core.modeling import add_lora, load_base_model, saved_in_4bit

    import dataclasses

    saved, source = tmp_path / "tiny-bnb-4bit", pathlib.Path(tiny_cfg("qwen2_5_vl").model_name_or_path)
    # Saved as downloads are: from a bf16 load (its unquantised weights and the 4-bit weights' dequantised dtype bf16).
    bf16 = dataclasses.replace(hardware, dtype="bfloat16")
    load_base_model(tiny_cfg("qwen2_5_vl", quantization="nf4"), bf16).save_pretrained(saved)
    for path in source.iterdir():  # the processor's files beside the 4-bit weights
        if path.suffix != ".safetensors" and path.name != "config.json":
            (saved / path.name).write_bytes(path.read_bytes())
    assert saved_in_4bit(str(saved)) and not saved_in_4bit(tiny_cfg("qwen2_5_vl").model_name_or_path)
    cfg = resolve_config("demo", [f"model_name_or_path={saved}", "quantization=auto"], env={}, verbose=False)
    planned, plan = plan_memory(cfg, hardware)
    assert planned.quantization == plan["quantization"] == "nf4"
    assert "saved in 4 bits (bitsandbytes)" in capsys.readouterr().out
    with pytest.raises(Exception, match="quantization=none, but .* is saved in 4 bits"):
        plan_memory(resolve_config("demo", [f"model_name_or_path={saved}", "quantization=none"], env={},
                                   verbose=False), hardware)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers warns when a second quantization_config is passed
        model = load_base_model(planned, hardware)
    layers = [m for m in model.modules() if hasattr(m, "compute_dtype")]
    assert layers and all(m.compute_dtype == hardware.torch_dtype for m in layers)
    # ...and everything else too: bf16 weights would round the LM head's input and every dequantised layer (on the
    # CPU the shared-prefix check then saw 5e-3 where fp32 gives 5e-7; a T4 has no bf16).
    assert all(p.dtype == hardware.torch_dtype for p in model.parameters() if type(p).__name__ != "Params4bit")
    assert all(m.weight.quant_state.dtype == hardware.torch_dtype for m in layers)
    add_lora(model, planned, hardware)  # k-bit preparation ran: the LoRA model builds on it


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
def test_kbit_preparation_is_peft_s_but_keeps_the_embeddings_16_bit_where_the_family_says(family, tiny_cfg):
    """Against peft's prepare_model_for_kbit_training, loaded in bf16: the same weights upcast to fp32, the same
    frozen base and checkpointing; only Qwen3.5's embedding (tied to its head) stays 16-bit, as its family asks."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from mcvqa.core.modeling import prepare_for_kbit_training

    folder = tiny_cfg(family).model_name_or_path

    def load():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16,
                                          llm_int8_skip_modules=[*QWEN3_5.vision_modules, "lm_head", "in_proj_a", "in_proj_b"])
        return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quantization,
                                                           device_map={"": "cpu"})

    theirs = prepare_model_for_kbit_training(load(), use_gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
    mine = load()
    keep = {mine.get_input_embeddings(), mine.get_output_embeddings()} if family == "qwen3_5" else set()
    ours = prepare_for_kbit_training(mine, True, keep_16bit=keep)
    embedding = "model.language_model.embed_tokens.weight"
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        expected = torch.bfloat16 if (family == "qwen3_5" and name == embedding) else a.dtype
        assert b.dtype == expected and b.requires_grad == a.requires_grad is False, name
    layers = [m for m in ours.model.language_model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and [m.gradient_checkpointing for m in layers] == \
        [m.gradient_checkpointing for m in theirs.model.language_model.modules() if hasattr(m, "gradient_checkpointing")]
    assert any(m.gradient_checkpointing for m in layers)
    assert dict(ours.named_parameters())[embedding].dtype == (torch.bfloat16 if family == "qwen3_5" else torch.float32)


def test_qwen35_scores_option_orders_with_the_whole_prompt_in_bf16_only(tiny_cfg, hardware, capsys, tmp_path):
    """Runs 33 and 36: in bf16 the DeltaNet state of a split prefix and suffix rounds as far from the whole prompt's
    as the self-check's tolerance (warnings, 4 of 6 passes view by view); fp16 agrees 8x closer. The family turns the
    shared prefix off in bf16 only, said once per fold; the other families keep it."""
    import dataclasses

    from mcvqa.speed.shared_prefix import shared_prefix_problem

    assert "off in bf16" in shared_prefix_problem(QWEN3_5, "bfloat16")
    assert shared_prefix_problem(QWEN3_5, "float16") is None and shared_prefix_problem(QWEN3_5, "float32") is None
    assert shared_prefix_problem(QWEN_VL, "bfloat16") is None
    from mcvqa.families.gemma4 import GEMMA4

    if transformers_version() >= Version(GEMMA4.shared_prefix_since):  # Gemma 4: off in 16 bits (runs 41-42)
        assert "off in float16" in shared_prefix_problem(GEMMA4, "float16")
        assert "runs 41-42" in shared_prefix_problem(GEMMA4, "bfloat16")
        assert shared_prefix_problem(GEMMA4, "float32") is None  # the CPU: exact (tests/test_gemma4.py)
    if not HAS_QWEN3_5:
        return
    import pandas as pd
    from PIL import Image

    from mcvqa.core.modeling import load_model_for_training, load_processor
    from mcvqa.core.prompts import make_prompt_format
    from mcvqa.speed.feature_cache import FeatureCache
    from mcvqa.core.training import FoldContext
    from mcvqa.speed.self_check import check_fast_paths

    cfg = tiny_cfg("qwen3_5", tta_option_views=4)
    processor = load_processor(cfg)
    model = load_model_for_training(cfg, hardware)
    rows = []
    for i in range(2):
        Image.new("RGB", (60 + 10 * i, 50), (40 * i, 120, 200)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"q{i}", "image_path": str(tmp_path / f"{i}.png"), "question": "그림의 색은?",
                     "a": "빨간색", "b": "파란색", "c": "초록색", "d": "노란색"})
    frame = pd.DataFrame(rows)
    bf16 = dataclasses.replace(hardware, dtype="bfloat16")
    cache, checked = check_fast_paths(FoldContext(processor, make_prompt_format(processor, cfg), cfg, bf16,
                                                  feature_cache=FeatureCache()),
                                      model, frame)
    out = capsys.readouterr()
    assert checked.tta_shared_prefix is False and cache is not None and "WARNING" not in out.err
    assert "shared-prefix option orders off in bf16" in out.out
