"""The tiny demo checkpoints: same chat format as the real Qwen-VL templates, loaded through the same
`from_pretrained` code as a real checkpoint, quantised where a real one is, and reproducible."""

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import REAL_FOR_FAMILY, TINY_FAMILIES, TINY_TEXTS
from mcvqa.demo.demo_model import build_tiny_qwen_vl, tiny_chat_template
from mcvqa.core.modeling import add_lora, load_base_model, load_processor
from mcvqa.core.prompts import answer_letter_ids, build_messages, format_user_text

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

CLASS_NAMES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}
PAIRS = [(family, real) for family in TINY_FAMILIES for real in REAL_FOR_FAMILY[family]]


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
def test_tiny_template_renders_like_real_template(family, real_name, tiny_processor, real_processor, tiny_cfg):
    tiny, real = tiny_processor(family), real_processor(real_name)
    assert tiny.chat_template == tiny_chat_template(family)
    for label, messages, add_generation_prompt in _conversations(tiny_cfg(family).instruction):
        want = real.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        got = tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert got == want, label


@pytest.mark.parametrize("family,real_name", PAIRS)
def test_default_system_turn_matches_family(family, real_name, tiny_processor):
    """Qwen2/2.5-VL insert 'You are a helpful assistant.'; Qwen3-VL adds no system turn (pinned text)."""
    text = tiny_processor(family).apply_chat_template(build_messages("?"), add_generation_prompt=True, tokenize=False)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family == "qwen2_5_vl" else ""
    assert text == (system + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n"
                    "<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_folder_loads_like_a_real_checkpoint(family, tiny_model_dir, tiny_cfg, tiny_processor):
    folder = tiny_model_dir(family)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert type(processor).__name__ == type(load_processor(tiny_cfg(family))).__name__
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[family]
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
    assert len(language) == 2 * 7 and len(vision) >= 2 * 4  # 2 layers x (q, k, v, o, gate, up, down)
    assert set(language.values()) == {bnb.nn.Linear4bit}
    assert set(vision.values()) == {torch.nn.Linear}
    assert type(model.lm_head) is torch.nn.Linear
    assert set(linears) == set(language) | set(vision) | {"lm_head"}
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
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
    assert len(lora_modules) == 2 * 7  # every q/k/v/o/gate/up/down of both layers, nothing else
    assert all(".model.language_model.layers." in n for n in lora_modules)
    assert len(trainable) == 2 * len(lora_modules)
    assert not any("visual" in n or "lm_head" in n for n in trainable)
    base = model.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear
    assert {type(m) for m in base.model.visual.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    assert base.model.visual.patch_embed.proj.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("family", TINY_FAMILIES)
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


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_answer_letters_are_single_tokens_in_tiny_tokenizer(family, tiny_processor):
    tok = tiny_processor(family).tokenizer
    ids = answer_letter_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["a", "b", "c", "d"]
    assert [tok.convert_tokens_to_ids(letter) for letter in "abcd"] == ids
    assert len(set(ids)) == 4
    spaced = [tok.encode(" " + letter, add_special_tokens=False) for letter in "abcd"]
    assert all(len(s) == 1 and s[0] not in ids for s in spaced)  # ' a' is its own token, as in Qwen
    assert tok.encode("<|im_start|>assistant\nc<|im_end|>", add_special_tokens=False)[-2] == ids[2]


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
