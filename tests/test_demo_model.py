"""The tiny demo checkpoints: same chat format as the real Qwen-VL templates, loaded through the same
`from_pretrained` code as a real checkpoint, quantised where a real one is, and reproducible."""

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import REAL_FOR_FAMILY, TINY_FAMILIES, TINY_TEXTS
from mcvqa.demo.demo_model import build_tiny_qwen_vl, tiny_chat_template, train_tiny_tokenizer
from mcvqa.core.collate import VqaCollator
from mcvqa.machinery.compat import model_input_names
from mcvqa.core.modeling import add_lora, load_base_model, load_model_for_training, load_processor, unwrap_vlm
from mcvqa.core.prompts import answer_letter_ids, build_messages, format_user_text
from mcvqa.core.scoring import MODEL_INPUT_KEYS

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

# Per family, the tiny language model's linear layers, those kept out of 4 bits, and those with LoRA: Qwen2.5-VL
# and Qwen3-VL 2 layers x (q, k, v, o, gate, up, down); Qwen3.5 3 DeltaNet layers x (in_proj_qkv, in_proj_z,
# in_proj_a, in_proj_b, out_proj + MLP) and 1 full-attention layer x 7, its 16-row in_proj_a / in_proj_b
# kept out of 4 bits (families/qwen3_5.py) and given no LoRA.
LINEARS = {"qwen2_5_vl": (14, 0, 14), "qwen3_vl": (14, 0, 14), "qwen3_5": (3 * 8 + 7, 3 * 2, 3 * 6 + 7)}
CLASS_NAMES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
               "qwen3_5": "Qwen3_5ForConditionalGeneration"}
PROCESSOR_NAMES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor", "qwen3_5": "Qwen3VLProcessor"}
PAIRS = [(family, real) for family in TINY_FAMILIES for real in REAL_FOR_FAMILY[family]]
# The tests that need only the demo builder (not collate/scoring) also run Gemma 4 where transformers has it.
HAS_GEMMA4 = hasattr(transformers, "Gemma4ForConditionalGeneration")
DEMO_FAMILIES = TINY_FAMILIES + (("gemma4",) if HAS_GEMMA4 and "gemma4" not in TINY_FAMILIES else ())
# Where the answer letter follows, and the token that ends the answer, per family.
ANSWER_HEADER = {"gemma4": ("<|turn>model\n", "<turn|>")}
QWEN_ANSWER_HEADER = ("<|im_start|>assistant\n", "<|im_end|>")
# The real Gemma 4 E2B template (no tokenizer.json there), found like the Qwen tokenizers: ../shared beside the repo.
GEMMA4_REAL_TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "vlm_tokenizers" / "gemma-4-E2B-it" / \
    "chat_template.jinja"


# ---------------------------------------------------------------------------------------------- 1
def _conversations(instruction):
    user = format_user_text("그림 속 도형은 무슨 색입니까?", ["빨간색", "파란색, 초록색", "노란색", "보라색"], instruction)
    out = []
    for system in ("", "당신은 시험 도우미입니다."):
        out.append((f"prompt/system={bool(system)}", build_messages(user, system), True))
        for letter in ("a", "d"):
            out.append((f"answered-{letter}/system={bool(system)}", build_messages(user, system, letter), False))
    return out


@pytest.mark.parametrize("family,real_name", PAIRS)
def test_tiny_template_renders_like_real_template(family, real_name, tiny_processor, real_processor, tiny_cfg,
                                                  qwen_tokenizers_dir):
    if not (qwen_tokenizers_dir / real_name).is_dir():
        pytest.skip(f"{real_name} not in {qwen_tokenizers_dir}")
    tiny, real = tiny_processor(family), real_processor(real_name)
    assert tiny.chat_template == tiny_chat_template(family)
    # The pipeline renders with enable_thinking=False (Qwen3.5's thinking switch; the others ignore it).
    for thinking in ({"enable_thinking": False}, {}, {"enable_thinking": True}):
        for label, messages, add_generation_prompt in _conversations(tiny_cfg(family).instruction):
            want = real.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                            **thinking)
            got = tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                           **thinking)
            assert got == want, (label, thinking)


@pytest.mark.skipif(not HAS_GEMMA4, reason="transformers has no Gemma 4 (it came in 5.5)")
def test_tiny_gemma4_template_renders_like_real_template(tiny_processor, tiny_cfg):
    """Gemma 4's template (thought_channel off, as E2B/E4B) against the real E2B one, on what the pipeline sends,
    with the system content as a string (build_messages) and as a list (the real template prints its repr)."""
    if not GEMMA4_REAL_TEMPLATE.is_file():
        pytest.skip(f"real Gemma 4 template not found: {GEMMA4_REAL_TEMPLATE}")
    real = GEMMA4_REAL_TEMPLATE.read_text()
    tiny = tiny_processor("gemma4")
    assert tiny.chat_template == tiny_chat_template("gemma4")
    conversations = _conversations(tiny_cfg("gemma4").instruction)
    conversations += [(label + "/list-system", [{**m, "content": [{"type": "text", "text": m["content"]}]}
                                                if m["role"] == "system" else m for m in messages], prompt)
                      for label, messages, prompt in conversations if messages[0]["role"] == "system"]
    for thinking in ({"enable_thinking": False}, {}, {"enable_thinking": True}):
        for label, messages, add_generation_prompt in conversations:
            kwargs = dict(add_generation_prompt=add_generation_prompt, tokenize=False, **thinking)
            want = tiny.apply_chat_template(messages, chat_template=real, **kwargs)
            assert tiny.apply_chat_template(messages, **kwargs) == want, (label, thinking)


@pytest.mark.parametrize("family,real_name", PAIRS)
def test_default_system_turn_matches_family(family, real_name, tiny_processor):
    """Qwen2/2.5-VL insert 'You are a helpful assistant.'; Qwen3-VL and Qwen3.5 add no system turn, Qwen3.5
    an empty thinking block after the assistant header (pinned text: checked without the real templates too)."""
    processor = tiny_processor(family)
    text = processor.apply_chat_template(build_messages("?"), add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family == "qwen2_5_vl" else ""
    think = "<think>\n\n</think>\n\n" if family == "qwen3_5" else ""
    assert text == (system + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n"
                    "<|im_start|>assistant\n" + think)
    answered = processor.apply_chat_template(build_messages("?", "", "b"), tokenize=False, enable_thinking=False)
    assert answered == text + "b<|im_end|>\n"


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_folder_loads_like_a_real_checkpoint(family, tiny_model_dir, tiny_cfg, tiny_processor):
    folder = tiny_model_dir(family)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert type(processor).__name__ == type(load_processor(tiny_cfg(family))).__name__
    assert type(processor).__name__ == PROCESSOR_NAMES[family]
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    assert type(model).__name__ == CLASS_NAMES[family]
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_4bit_load_quantises_language_model_only(family, tiny_cfg, hardware):
    model = load_base_model(tiny_cfg(family, quantization="nf4"), hardware)
    assert type(model).__name__ == CLASS_NAMES[family]
    linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    language = {n: t for n, t in linears.items() if n.startswith("model.language_model.")}
    vision = {n: t for n, t in linears.items() if n.startswith("model.visual.")}
    total, kept_out, _ = LINEARS[family]
    assert len(language) == total and len(vision) >= 2 * 4
    assert sum(t is bnb.nn.Linear4bit for t in language.values()) == total - kept_out
    assert all(t is torch.nn.Linear for n, t in language.items() if n.rsplit(".", 1)[-1] in ("in_proj_a", "in_proj_b"))
    assert set(vision.values()) == {torch.nn.Linear}
    assert type(model.lm_head) is torch.nn.Linear
    assert set(linears) == set(language) | set(vision) | {"lm_head"}
    q_proj = next(m for n, m in model.named_modules() if n.endswith("self_attn.q_proj"))
    assert q_proj.weight.quant_state is not None and q_proj.weight.quant_state.quant_type == "nf4"
    assert {p.dtype for p in model.model.visual.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "fp32"])
def test_lora_only_on_language_model(family, load_in_4bit, tiny_cfg, hardware):
    cfg = tiny_cfg(family, quantization="nf4" if load_in_4bit else "none")
    model = add_lora(load_base_model(cfg, hardware), cfg, hardware)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lora_modules = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_modules) == LINEARS[family][2]  # every projection the family names, nothing else
    assert all(".model.language_model.layers." in n for n in lora_modules)
    assert len(trainable) == 2 * len(lora_modules)
    assert not any("visual" in n or "lm_head" in n for n in trainable)
    base = model.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear
    assert {type(m) for m in base.model.visual.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    assert base.model.visual.patch_embed.proj.weight.dtype == torch.float32


def test_tiny_qwen3_5_is_a_hybrid_like_the_real_one(tiny_model_dir):
    """Three Gated DeltaNet layers, then a gated full-attention layer; the build gotchas of the real config."""
    folder = tiny_model_dir("qwen3_5")
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    text, language = model.config.text_config, model.model.language_model
    assert model.config.model_type == "qwen3_5"
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    kinds = [type(layer.linear_attn if kind == "linear_attention" else layer.self_attn).__name__
             for layer, kind in zip(language.layers, text.layer_types)]
    assert kinds == ["Qwen3_5GatedDeltaNet"] * 3 + ["Qwen3_5Attention"]
    deltanet = language.layers[0].linear_attn
    assert deltanet.num_v_heads > deltanet.num_k_heads  # the grouped-value repeat runs
    # Partial rotary: mrope_section splits the rotating quarter of each head, not the whole head.
    rope = text.rope_parameters
    assert 2 * sum(rope["mrope_section"]) == text.head_dim * rope["partial_rotary_factor"]
    # No pad_token_id: a zeroed pad row would pass the DeltaNet layers as exact zeros, hiding padding bugs.
    pad = AutoProcessor.from_pretrained(folder, local_files_only=True).tokenizer.pad_token_id
    assert text.pad_token_id is None and language.embed_tokens.padding_idx is None
    assert language.embed_tokens.weight[pad].abs().sum() > 0
    with safe_open(folder / "model.safetensors", "pt") as weights:  # as built (from_pretrained would cast)
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}  # no bf16 language model
    assert model.lm_head.weight.data_ptr() == language.embed_tokens.weight.data_ptr()  # tied, as in the real one


def test_tiny_qwen3_5_tokenizer_is_the_one_saved(tiny_model_dir):
    """AutoTokenizer loads a qwen3_5 folder as Qwen3_5Tokenizer, which sets its own normaliser (NFC) and split
    regex: the tiny tokenizer is trained with both, so the warm-up's tokens are the pipeline's; <think> and
    </think> are whole tokens, not special (as in the real tokenizer.json)."""
    folder = tiny_model_dir("qwen3_5")
    loaded = AutoProcessor.from_pretrained(folder, local_files_only=True).tokenizer
    trained = train_tiny_tokenizer(TINY_TEXTS, family="qwen3_5")
    saved, used = json.loads((folder / "tokenizer.json").read_text()), json.loads(loaded.backend_tokenizer.to_str())
    assert saved["normalizer"] == used["normalizer"] == {"type": "NFC"}
    assert saved["pre_tokenizer"] == used["pre_tokenizer"]
    text = "e\u0301 \u1100\u1161 그림 a. b.\n<think>\n\n</think>\n\na"  # a combining mark, decomposed Hangul
    assert loaded.encode(text, add_special_tokens=False) == trained.encode(text, add_special_tokens=False)
    think = [loaded.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    assert loaded.encode("<think></think>", add_special_tokens=False) == think
    assert [loaded.added_tokens_decoder[i].special for i in think] == [False, False]
    assert len(loaded) == len(trained) and max(think) == len(loaded) - 1


def test_tiny_qwen3_5_in_4bit_runs_forward_and_backward_with_lora(tiny_cfg, tiny_processor, tiny_fmt, hardware):
    """NF4 reaches the DeltaNet projections (conv1d and the vision tower stay full precision); a forward and
    backward through the LoRA model run and reach every adapter. Which projections LoRA targets is the
    lora_target_modules setting's business, not this test's."""
    cfg = tiny_cfg("qwen3_5", quantization="nf4")
    model = load_model_for_training(cfg, hardware)
    base = unwrap_vlm(model)
    deltanet = base.model.language_model.layers[0].linear_attn
    for name in ("in_proj_qkv", "in_proj_z", "out_proj"):
        layer = getattr(deltanet, name)
        assert type(getattr(layer, "base_layer", layer)) is bnb.nn.Linear4bit, name  # under LoRA if targeted
    assert type(deltanet.conv1d) is torch.nn.Conv1d and deltanet.conv1d.weight.dtype == torch.float32
    assert {type(m) for m in base.model.visual.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    images = [Image.new("RGB", (64, 96), (220, 30, 30)), Image.new("RGB", (96, 64), (30, 70, 220))]
    items = [{"row": i, "perm": (0, 1, 2, 3), "image": image, "question": "그림 속 도형은 무슨 색입니까?" * (i + 1),
              "options": ["빨간색", "파란색", "초록색", "노란색"], "answer": i} for i, image in enumerate(images)]
    batch = VqaCollator(tiny_processor("qwen3_5"), tiny_fmt("qwen3_5"), 32 * 32, 112 * 112)(items)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 2  # right padding runs through the DeltaNet
    model.eval()  # where bitsandbytes' CPU repack (off in load_base_model) would trip on the 2-row in_proj_a/b
    with torch.no_grad():
        inputs = {k: batch[k] for k in model_input_names(base.model, MODEL_INPUT_KEYS) if k in batch}
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    model.train()
    model(**inputs).logits.sum().backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if ".lora_B." in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_build_is_reproducible(family, tmp_path, tiny_model_dir):
    first = build_tiny_qwen_vl(tmp_path / "one", TINY_TEXTS, family=family, seed=0, max_pixels=112 * 112)
    second = build_tiny_qwen_vl(tmp_path / "two", TINY_TEXTS, family=family, seed=0, max_pixels=112 * 112)
    other = build_tiny_qwen_vl(tmp_path / "seed1", TINY_TEXTS, family=family, seed=1, max_pixels=112 * 112)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # Same bytes as the session's model too (built in another folder), and the seed does matter.
    assert (first / "model.safetensors").read_bytes() == (tiny_model_dir(family) / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_rebuild_with_same_spec_is_skipped(tmp_path):
    folder = build_tiny_qwen_vl(tmp_path, TINY_TEXTS[:5], family="qwen3_vl", seed=0)
    (folder / "model.safetensors").write_bytes(b"sentinel")
    assert build_tiny_qwen_vl(tmp_path, TINY_TEXTS[:5], family="qwen3_vl", seed=0) == folder
    assert (folder / "model.safetensors").read_bytes() == b"sentinel"  # marker matched: nothing rebuilt
    build_tiny_qwen_vl(tmp_path, TINY_TEXTS[:5], family="qwen3_vl", seed=1)  # spec changed: rebuilt
    assert (folder / "model.safetensors").read_bytes() != b"sentinel"


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_qwen_vl(tmp_path, TINY_TEXTS, family="qwen2_vl")


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_answer_letters_are_single_tokens_in_tiny_tokenizer(family, tiny_processor):
    tok = tiny_processor(family).tokenizer
    header, end = ANSWER_HEADER.get(family, QWEN_ANSWER_HEADER)
    ids = answer_letter_ids(tok, header)
    assert [tok.decode([i]) for i in ids] == ["a", "b", "c", "d"]
    assert [tok.convert_tokens_to_ids(letter) for letter in "abcd"] == ids
    assert len(set(ids)) == 4
    spaced = [tok.encode(" " + letter, add_special_tokens=False) for letter in "abcd"]
    assert all(len(s) == 1 and s[0] not in ids for s in spaced)  # ' a' is its own token, as in Qwen
    assert tok.encode(header + "c" + end, add_special_tokens=False)[-2] == ids[2]


def test_a_demo_run_with_another_seed_builds_its_own_tiny_base(tmp_path, monkeypatch):
    """`seed=7` on the demo used to rebuild data/tiny_models/qwen2_5_vl with seed 7, silently changing the base
    every later demo run used (and rebuilding it again for them). The base's folder now names what differs."""
    import mcvqa.pipeline as pipeline
    from mcvqa.core.config import resolve_config

    built = []
    monkeypatch.setattr(pipeline, "generate_demo_dataset", lambda folder, **kw: tmp_path / "data")
    monkeypatch.setattr(pipeline, "build_tiny_qwen_vl", lambda folder, texts, **kw: built.append((str(folder), kw)))
    monkeypatch.setattr(pipeline, "load_image", lambda path: None)
    (tmp_path / "data").mkdir()
    import pandas as pd

    for name in ("train.csv", "test.csv"):
        pd.DataFrame({"question": ["q"], "a": ["1"], "b": ["2"], "c": ["3"], "d": ["4"], "answer": ["a"],
                      "path": ["x.png"]}).to_csv(tmp_path / "data" / name, index=False)
    for overrides in ([], ["seed=7"], ["seed=7", "demo_hidden_size=64"], ["demo_family=qwen3_vl"]):
        pipeline.prepare_demo(resolve_config("demo", overrides, env={}, verbose=False))
    folders = [folder for folder, _ in built]
    assert folders == ["data/tiny_models/qwen2_5_vl", "data/tiny_models/qwen2_5_vl_seed7",
                       "data/tiny_models/qwen2_5_vl_seed7_h64", "data/tiny_models/qwen3_vl"]
    assert [kw["seed"] for _, kw in built] == [42, 7, 7, 42]
