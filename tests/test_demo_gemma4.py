"""The tiny Gemma 4 demo checkpoints: the real architecture classes with E2B's (or 31B's) features, a tokenizer with
Gemma 4's special tokens that adds <bos> like the real one, and templates that render like the real ones."""

import pandas as pd
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import TINY_TEXTS
from mcvqa.core.data import load_image
from mcvqa.core.prompts import build_messages
from mcvqa.demo.demo_data import generate_demo_dataset
from mcvqa.demo.demo_model import (GEMMA4_SPECIAL_TOKENS, _warmup_collate, _warmup_encode, build_tiny_qwen_vl,
                                   tiny_chat_template, tiny_model_class, tiny_model_config, tiny_processor,
                                   train_tiny_tokenizer, warm_up_tiny_base)

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.skipif(not hasattr(transformers, "Gemma4ForConditionalGeneration"),
                                 reason="transformers has no Gemma 4 (it came in 5.5)")]

QUESTION = "그림 속 도형은 무슨 색입니까?"


def _prompt(processor, system=""):
    return processor.apply_chat_template(build_messages(QUESTION, system), add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)


def _image(colour=(200, 30, 30)):
    return Image.new("RGB", (112, 112), colour)


@pytest.fixture(scope="module")
def gemma4_dir(tiny_model_dir):
    return tiny_model_dir("gemma4")


@pytest.fixture(scope="module")
def gemma4_31b_dir(tmp_path_factory):
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_gemma4_31b"), TINY_TEXTS, family="gemma4", variant="31b")


def _load(folder):
    return (AutoProcessor.from_pretrained(folder, local_files_only=True),
            AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval())


def test_gemma4_folder_loads_like_a_real_checkpoint_and_keeps_e2b_features(gemma4_dir):
    processor, model = _load(gemma4_dir)
    assert type(processor).__name__ == "Gemma4Processor"
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    tok, text = processor.tokenizer, model.config.text_config
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image|>") == processor.image_token_id
    assert text.vocab_size == len(tok)
    assert text.hidden_size_per_layer_input > 0 and text.num_kv_shared_layers > 0 and text.use_double_wide_mlp
    assert set(text.layer_types) == {"sliding_attention", "full_attention"} and text.layer_types[-1] == "full_attention"
    assert text.sliding_window == 32 and text.final_logit_softcapping == 30.0
    assert "reuse" in text.kv_sharing_modes
    language = model.model.language_model
    assert model.lm_head.weight.data_ptr() == language.embed_tokens.weight.data_ptr()  # tied, as in the real one
    assert processor.image_processor.max_soft_tokens == 70  # the smallest budget Gemma4ImageProcessor allows


def test_gemma4_reloaded_model_gives_the_built_models_logits(gemma4_dir):
    """No warm-up: the built model is the seeded init, so rebuilding it in memory must match the saved folder."""
    processor, loaded = _load(gemma4_dir)
    torch.manual_seed(0)
    built = tiny_model_class("gemma4")(tiny_model_config("gemma4", processor.tokenizer)).eval()
    enc = processor(text=[_prompt(processor)], images=[_image()], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(built(**enc).logits, loaded(**enc).logits)


def test_gemma4_tokenizer_is_the_one_saved(gemma4_dir):
    loaded = AutoProcessor.from_pretrained(gemma4_dir, local_files_only=True).tokenizer
    trained = train_tiny_tokenizer(TINY_TEXTS, family="gemma4")
    assert len(loaded) == len(trained)
    # The real vocabulary's first ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4.
    assert [loaded.convert_tokens_to_ids(t) for t in GEMMA4_SPECIAL_TOKENS] == list(range(len(GEMMA4_SPECIAL_TOKENS)))
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2)
    assert all(loaded.added_tokens_decoder[i].special for i in range(len(GEMMA4_SPECIAL_TOKENS)))
    text = "<|turn>user\n<|image|>그림 a. b.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>a<turn|>\n"
    assert loaded.encode(text, add_special_tokens=False) == trained.encode(text, add_special_tokens=False)
    letters = [loaded.convert_tokens_to_ids(letter) for letter in "abcd"]
    assert len(set(letters)) == 4
    for header in ("<|turn>model\n", "<|turn>model\n<|channel>thought\n<channel|>"):
        assert [loaded.encode(header + letter, add_special_tokens=False)[-1] for letter in "abcd"] == letters
    # Gemma4Processor needs these names, boa/eoa even without audio.
    assert (loaded.image_token, loaded.boi_token, loaded.eoi_token) == ("<|image|>", "<|image>", "<image|>")
    assert (loaded.boa_token, loaded.eoa_token) == ("<|audio>", "<audio|>")
    assert loaded.padding_side == "left"


def test_gemma4_tokenizer_adds_bos_like_the_real_one(gemma4_dir):
    """The template writes <bos>; tokenizing its text with the default add_special_tokens=True doubles it."""
    processor = AutoProcessor.from_pretrained(gemma4_dir, local_files_only=True)
    tok = processor.tokenizer
    x = tok.encode("x", add_special_tokens=False)
    assert tok("x").input_ids == [tok.bos_token_id] + x
    assert tok("x", add_special_tokens=False).input_ids == x
    prompt = _prompt(processor)
    assert prompt.startswith("<bos><|turn>user\n")
    doubled = processor(text=[prompt], images=[_image()], return_tensors="pt").input_ids[0, :2].tolist()
    single = processor(text=[prompt], images=[_image()], return_tensors="pt", add_special_tokens=False).input_ids
    assert doubled == [tok.bos_token_id] * 2 and single[0, :2].tolist() != doubled


def test_gemma4_forward_and_generate_on_a_rendered_prompt(gemma4_dir):
    processor, model = _load(gemma4_dir)
    enc = processor(text=[_prompt(processor)], images=[_image()], return_tensors="pt", add_special_tokens=False)
    assert {"pixel_values", "image_position_ids", "mm_token_type_ids"} <= set(enc)
    image_tokens = enc.input_ids == processor.image_token_id
    assert torch.equal(enc.mm_token_type_ids.bool(), image_tokens)
    assert enc.input_ids.shape[1] > model.config.text_config.sliding_window  # the sliding layers do slide
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all() and logits.abs().max() <= 30.0  # soft-capped
    assert out.shape[1] == enc.input_ids.shape[1] + 3


def test_gemma4_31b_variant_builds_and_attends_bidirectionally_in_the_image(gemma4_31b_dir):
    processor, model = _load(gemma4_31b_dir)
    text = model.config.text_config
    assert text.attention_k_eq_v and text.use_bidirectional_attention == "vision"
    assert text.hidden_size_per_layer_input == 0 and text.num_kv_shared_layers == 0
    assert model.config.vision_config.standardize
    prompt = _prompt(processor)
    assert prompt.endswith("<|turn>model\n<|channel>thought\n<channel|>")  # the 26B/31B template
    enc = processor(text=[prompt], images=[_image()], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits
        causal = model(**{k: v for k, v in enc.items() if k != "mm_token_type_ids"}).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, causal)  # mm_token_type_ids switches on attention within the image


def test_gemma4_thought_channel_template_strings():
    """The 26B/31B template: with thinking off the generation prompt ends in an empty thought channel; the answered
    conversation's model turn has none (history turns strip it), so it is not prompt + answer."""
    template = tiny_chat_template("gemma4", thought_channel=True)
    tok = train_tiny_tokenizer(TINY_TEXTS, family="gemma4")

    def render(messages, **kwargs):
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)

    user = "<bos><|turn>user\n<|image|>?<turn|>\n"
    for thinking in ({"enable_thinking": False}, {}):
        assert render(build_messages("?"), add_generation_prompt=True, **thinking) == (
            user + "<|turn>model\n<|channel>thought\n<channel|>")
    assert render(build_messages("?", "", "b"), enable_thinking=False) == user + "<|turn>model\nb<turn|>\n"
    assert render(build_messages("?", "", "<|channel>thought\nhm<channel|>b")) == user + "<|turn>model\nb<turn|>\n"
    assert render(build_messages("?"), add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n<|image|>?<turn|>\n<|turn>model\n")
    system = [{"role": "system", "content": "S"}, *build_messages("?")]
    assert render(system, add_generation_prompt=True) == (
        user.replace("<bos>", "<bos><|turn>system\nS<turn|>\n") + "<|turn>model\n<|channel>thought\n<channel|>")


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_gemma4_warm_up_lowers_the_loss(variant, tmp_path):
    data = generate_demo_dataset(tmp_path / "data", n_train=40, n_test=4, seed=1000)
    frame = pd.read_csv(data / "train.csv")
    examples = [(load_image(data / r.path), r.question, getattr(r, r.answer)) for r in frame.itertuples()]
    tok = train_tiny_tokenizer(TINY_TEXTS + [e[2] for e in examples], family="gemma4")
    torch.manual_seed(0)
    model = tiny_model_class("gemma4")(tiny_model_config("gemma4", tok, variant=variant))
    processor = tiny_processor("gemma4", tok, 112 * 112, thought_channel=variant == "31b")

    def loss():
        batch = _warmup_collate([_warmup_encode(processor, *e) for e in examples], tok.pad_token_id,
                                processor.image_token_id)
        ids = batch["input_ids"]
        assert ids[:, 0].eq(tok.bos_token_id).all() and ids[:, 1].ne(tok.bos_token_id).all()  # one <bos>
        with torch.no_grad():
            return model.eval()(**batch).loss.item()

    before = loss()
    warm_up_tiny_base(model, processor, examples, epochs=6, batch_size=8)
    after = loss()
    assert after < before - 2.0, (before, after)
