"""## Demo model: a tiny Qwen-VL (or Gemma 4) built locally

The `demo` profile needs no download: it builds a *tiny* Qwen2.5-VL (or Qwen3-VL, Qwen3.5, Gemma 4) with the
real architecture classes, random weights from a fixed seed, a small byte-level BPE tokenizer trained on
the demo text plus Qwen's special tokens, a chat template that renders the Qwen-VL conversation
format, and an image processor with a small pixel budget. Everything is saved with
`save_pretrained`, so the rest of the notebook loads it through exactly the same `from_pretrained`
code as a real checkpoint. On Kaggle this cell only defines functions; nothing runs.
"""

import json
import pathlib

import torch
from tqdm.auto import tqdm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from ..core.prompts import template_kwargs
from ..families.gemma4 import GEMMA4, PIXELS_PER_TOKEN, SOFT_TOKEN_BUDGETS
from ..families.registry import processor_family
from ..machinery.compat import model_input_names

# Qwen's special tokens, in Qwen's order (ids differ in the tiny vocabulary, names do not).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen3.5's template writes an empty thinking block before the answer: one token each, added after the
# trained vocabulary and not special, as in the real tokenizer.json.
THINK_TOKENS = ("<think>", "</think>")
# Qwen2's pre-tokenizer regex: splitting text the same way keeps ' a' and 'a' distinct tokens.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5's regex (its tokenizer.json normalises to NFC first): combining marks stay with their letters.
# AutoTokenizer loads a qwen3_5 folder as Qwen3_5Tokenizer, which sets this regex and NFC whatever
# tokenizer.json says, so the tiny tokenizer is trained with both: the one saved is the one loaded.
QWEN3_5_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The Qwen-VL conversation format for what this pipeline sends: an optional system turn (Qwen2/2.5-VL
# insert a default one, Qwen3-VL and Qwen3.5 do not), user turns holding images and text, assistant text
# (Qwen3.5: after an empty thinking block, in the answer after the last user turn and in the prompt).
# tests/test_demo_model.py renders the same conversations with the real templates and compares.
_TINY_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' and DEFAULT_SYSTEM %}"
    "{{ '<|im_start|>system\\nDEFAULT_SYSTEM<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}ANSWER_THINK"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{ part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}PROMPT_THINK{%- endif %}"
)
# Qwen3.5's thinking blocks, as its real template renders them when no reasoning is given: the prompt
# ends in an empty block unless enable_thinking=True (off by default, as in the 0.8B/2B; the pipeline wants off).
_QWEN3_5_ANSWER_THINK = (
    "{%- if message['role'] == 'assistant' and not (messages[loop.index0:] | selectattr('role', 'equalto', 'user')"
    " | list) %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)
_QWEN3_5_PROMPT_THINK = (
    "{%- if enable_thinking is defined and enable_thinking is true %}{{ '<think>\\n' }}"
    "{%- else %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)

# Gemma 4's special tokens, first in the vocabulary so the ids of pad/eos/bos/unk/mask (0-4) are the real ones.
GEMMA4_SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|image|>", "<|image>", "<image|>",
    "<|audio|>", "<|audio>", "<audio|>", "<|video|>", "<|channel>", "<channel|>", "<|think|>",
)
# The names the real tokenizer_config.json gives them; Gemma4Processor reads image/boi/eoi, and raises without
# boa/eoa even when no audio is passed (operator precedence in its validate_inputs).
GEMMA4_NAMED_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "sot_token": "<|turn>", "eot_token": "<turn|>",
    "soc_token": "<|channel>", "eoc_token": "<channel|>", "think_token": "<|think|>",
}
# The Gemma 4 E2B/E4B template (../shared/vlm_tokenizers/gemma-4-E2B-it/chat_template.jinja) for what this
# pipeline sends, without tools: <bos>, a system turn when there is a system message or thinking is on
# (content rendered with the same `| trim`, so list content renders as the real one does), turns
# '<|turn>{user|model}\n' ... '<turn|>\n', the image as <|image|> where it stands in the content, model text
# with any thought channel stripped. THOUGHT is the 26B/31B generation prompt's empty thought channel.
_GEMMA4_TEMPLATE = (
    "{{- bos_token -}}{%- set loop_messages = messages -%}"
    "{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] in ['system', 'developer'] -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}{{- messages[0]['content'] | trim -}}"
    "{%- set loop_messages = messages[1:] -%}{%- endif -%}{{- '<turn|>\\n' -}}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- set model = message['role'] == 'assistant' -%}"
    "{{- '<|turn>' + ('model' if model else message['role']) + '\\n' -}}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string"
    " else message['content'] -%}"
    "{%- for item in parts -%}{%- if item['type'] == 'text' -%}"
    "{{- (item['text'].split('<channel|>')[-1] if model else item['text']) | trim -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}{%- endif -%}{%- endfor -%}"
    "{{- '<turn|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}THOUGHT{%- endif -%}"
)
# 26B/31B: with thinking off the generation prompt ends in an empty thought channel (history turns never have one).
_GEMMA4_THOUGHT = "{%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"

TINY_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma4")


def tiny_model_class(family):
    """The architecture class of `family`. Qwen3.5's and Gemma 4's are looked up when asked for: they exist from
    transformers 5.2 and 5.5, and the pipeline must import on Kaggle's 5.0 (where it says to upgrade, locate.py)."""
    import transformers

    return {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
            "qwen3_5": getattr(transformers, "Qwen3_5ForConditionalGeneration", None),
            "gemma4": getattr(transformers, "Gemma4ForConditionalGeneration", None)}[family]


def tiny_chat_template(family, thought_channel=False):
    """The chat template of the tiny model of `family` (Qwen2.5-VL adds a default system turn, Qwen3.5
    thinking blocks; Gemma 4 with `thought_channel` renders like the 26B/31B template, else like the E2B/E4B)."""
    if family == "gemma4":
        return _GEMMA4_TEMPLATE.replace("THOUGHT", _GEMMA4_THOUGHT if thought_channel else "")
    qwen3_5 = family == "qwen3_5"
    template = (_TINY_TEMPLATE.replace("ANSWER_THINK", _QWEN3_5_ANSWER_THINK if qwen3_5 else "")
                .replace("PROMPT_THINK", _QWEN3_5_PROMPT_THINK if qwen3_5 else ""))
    if family == "qwen2_5_vl":
        return template.replace("and DEFAULT_SYSTEM", "").replace("DEFAULT_SYSTEM", "You are a helpful assistant.")
    return template.replace("and DEFAULT_SYSTEM", "and false").replace("DEFAULT_SYSTEM", "")


def train_tiny_tokenizer(texts, vocab_size=1200, family="qwen2_5_vl"):
    """A byte-level BPE tokenizer in Qwen's style: every byte is a token, so 'a'..'d' are single tokens.
    Qwen3.5's normalises to NFC, splits with its own regex and has the thinking tokens; Gemma 4's has
    Gemma's special tokens (gemma4_tokenizer)."""
    if family == "gemma4":
        return _train_gemma4_tokenizer(texts, vocab_size)
    qwen3_5 = family == "qwen3_5"
    tok = Tokenizer(models.BPE())
    if qwen3_5:
        tok.normalizer = normalizers.NFC()
    regex = QWEN3_5_PRETOKENIZE_REGEX if qwen3_5 else QWEN_PRETOKENIZE_REGEX
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]), clean_up_tokenization_spaces=False,
    )
    if qwen3_5:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    return tokenizer


def _byte_level_bpe(texts, vocab_size, special_tokens):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_gemma4_tokenizer(texts, vocab_size):
    """Byte-level BPE (not Gemma's SentencePiece-style one: the letters and turn tokens are what matter) with
    Gemma 4's special tokens at ids 0-16. Like the real one it adds <bos> when add_special_tokens=True, so a
    pipeline that forgets add_special_tokens=False shows a double <bos> (the template writes one); it pads
    on the left, as the real one does."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(texts, vocab_size, GEMMA4_SPECIAL_TOKENS), bos_token="<bos>",
        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", add_bos_token=True,
        padding_side="left", extra_special_tokens=dict(GEMMA4_NAMED_TOKENS), clean_up_tokenization_spaces=False,
    )


def _tiny_special_ids(tokenizer):
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    return ids


def tiny_model_config(family, tokenizer, hidden_size=64, variant="e2b"):
    """Architecture of the tiny model: the real config classes with small sizes (`variant`: Gemma 4 only)."""
    if family == "gemma4":
        return _tiny_gemma4_config(tokenizer, hidden_size, variant)
    special = _tiny_special_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=hidden_size // 16, num_key_value_heads=hidden_size // 32, max_position_embeddings=2048,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "qwen2_5_vl":
        # Head dim is 16 at any width: mrope_section splits its 8 rotary pairs over (time, height, width).
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      window_size=56, fullatt_block_indexes=[1], out_hidden_size=hidden_size, initializer_range=0.3)  # louder image tokens: the warm-up learns from them in minutes
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    if family == "qwen3_5":
        return _tiny_qwen3_5_config(text, hidden_size, special)
    text["head_dim"] = 16
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                               "mrope_interleaved": True}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  num_position_embeddings=64, deepstack_visual_indexes=[0], out_hidden_size=hidden_size)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **special)


def _tiny_qwen3_5_config(text, hidden_size, special):
    """Qwen3.5 in miniature: the real 3:1 hybrid (three Gated DeltaNet layers, then one gated full-attention
    layer), so the recurrent state passes through several layers before attention reads it."""
    # No pad_token_id: nn.Embedding would zero the pad row, and zero pad inputs stay exactly zero through
    # the DeltaNet layers, hiding padding bugs (the real checkpoint has none either).
    text = {k: v for k, v in text.items() if k != "pad_token_id"}
    text.update(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
                # Head dim 32: a quarter of it rotates (as in the real model), mrope_section splits
                # those 4 pairs over (time, height, width).
                head_dim=32, num_attention_heads=hidden_size // 32, num_key_value_heads=max(1, hidden_size // 64),
                # Few, wide DeltaNet heads: on a CPU its chunked torch fallback costs per head, not per width.
                # Two value heads per key head, as in the larger Qwen3.5: exercises the grouped-value repeat.
                linear_num_key_heads=1, linear_num_value_heads=2,
                linear_key_head_dim=hidden_size // 4, linear_value_head_dim=hidden_size // 4)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                               "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    # No deepstack in Qwen3.5: the image reaches the language model only as its tokens' embeddings, so they are
    # made louder, as for Qwen2.5-VL (at the default init the demo's fine-tune stayed near chance, CV 0.37).
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  num_position_embeddings=64, out_hidden_size=hidden_size, initializer_range=0.3)
    from transformers import Qwen3_5Config  # (transformers >= 5.2: tiny_model_class)

    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)


def _tiny_gemma4_config(tokenizer, hidden_size, variant):
    """Gemma 4 in miniature. "e2b" keeps the E2B/E4B features: per-layer embeddings, the last layers reusing
    earlier layers' KV, their double-wide MLP; "31b" the 26B/31B ones: K = V on full-attention layers and
    bidirectional attention inside each image. Both: sliding and full layers (the last full), logit soft-capping,
    tied embeddings, and a sliding window short enough that a demo prompt (~100 tokens) exceeds it."""
    if variant not in ("e2b", "31b"):
        raise ValueError(f"variant must be 'e2b' or '31b', got {variant!r}")
    e2b = variant == "e2b"
    text = dict(
        vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=4, num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=32, max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=30.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, hidden_size_per_layer_input=16 if e2b else 0,
        # Layers 2-3 reuse the KV of layers 0-1 (one producer per layer type, which the config requires).
        num_kv_shared_layers=2 if e2b else 0, use_double_wide_mlp=e2b, attention_k_eq_v=not e2b,
        use_bidirectional_attention=None if e2b else "vision")
    if not e2b:
        text["num_global_key_value_heads"] = 1
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, global_head_dim=16, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=256, use_clipped_linears=True, standardize=not e2b,
                  # Louder image tokens, as for Qwen: after a 6-epoch warm-up on 320 demo rows the held-out loss
                  # rose 1.73 -> 1.81 with the images shuffled at 0.3, not at all at the default 0.02 (blind).
                  rope_parameters={"rope_theta": 100.0, "rope_type": "default"}, initializer_range=0.3)
    ids = tokenizer.convert_tokens_to_ids
    from transformers import Gemma4Config  # (transformers >= 5.5: tiny_model_class)

    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True,
                        image_token_id=ids("<|image|>"), boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"),
                        video_token_id=ids("<|video|>"), audio_token_id=ids("<|audio|>"),
                        boa_token_id=ids("<|audio>"), eoa_token_index=ids("<audio|>"))


def tiny_gemma4_processor(tokenizer, max_pixels, thought_channel=False):
    """Gemma4Processor with the smallest soft-token budget per image that holds `max_pixels` (a soft token is
    a 3x3 pool of 16 px patches, 48x48 px): 70, the smallest allowed, for the demo's 112x112."""
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor,
                              Gemma4VideoProcessor)

    budget = next((b for b in SOFT_TOKEN_BUDGETS if b * PIXELS_PER_TOKEN >= max_pixels), SOFT_TOKEN_BUDGETS[-1])
    image_processor = Gemma4ImageProcessor(max_soft_tokens=budget, patch_size=16, pooling_kernel_size=3)
    return Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor,
                           tokenizer=tokenizer, video_processor=Gemma4VideoProcessor(), image_seq_length=budget,
                           chat_template=tiny_chat_template("gemma4", thought_channel))


def tiny_processor(family, tokenizer, max_pixels, thought_channel=False):
    """Image processor + tokenizer + chat template, as a Qwen-VL processor of `family` (Qwen3.5 uses
    Qwen3-VL's, as the real one does; Gemma 4: tiny_gemma4_processor)."""
    if family == "gemma4":
        return tiny_gemma4_processor(tokenizer, max_pixels, thought_channel)
    patch = 14 if family == "qwen2_5_vl" else 16
    factor = patch * 2
    # Smallest allowed image is one merged patch; the budget caps the token count per image.
    pixels = {"shortest_edge": factor * factor, "longest_edge": max_pixels}
    mean_std = ({"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
                if family == "qwen2_5_vl" else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    image_processor = Qwen2VLImageProcessor(size=pixels, patch_size=patch, merge_size=2, **mean_std)
    if family == "qwen2_5_vl":
        video = Qwen2VLVideoProcessor(size=pixels, patch_size=patch, merge_size=2, **mean_std)
        return Qwen2_5_VLProcessor(image_processor, tokenizer, video, chat_template=tiny_chat_template(family))
    video = Qwen3VLVideoProcessor(size=pixels, patch_size=patch, merge_size=2, **mean_std)
    return Qwen3VLProcessor(image_processor, tokenizer, video, chat_template=tiny_chat_template(family))


def _warmup_encode(processor, image, question, answer):
    """One chat-formatted (image, question) -> answer words example; labels on the answer and end token."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False, **template_kwargs(processor))  # rendered as the pipeline renders it
    if processor_family(processor) is GEMMA4:  # its template writes <bos> (the tokenizer would add a second); its turns end in <turn|>
        enc = processor(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)
        end = "<turn|>"
    else:
        enc = processor(text=[prompt], images=[image], return_tensors="pt", return_mm_token_type_ids=False)
        end = "<|im_end|>"
    ids = enc["input_ids"][0].tolist()
    target = processor.tokenizer.encode(answer + end, add_special_tokens=False)
    # The image tensors: Qwen's pixel_values + image_grid_thw, Gemma 4's pixel_values + image_position_ids.
    images = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {"ids": ids + target, "labels": [-100] * len(ids) + target, "images": images}


def _warmup_collate(examples, pad_id, image_token_id):
    width = max(len(e["ids"]) for e in examples)
    ids = [e["ids"] + [pad_id] * (width - len(e["ids"])) for e in examples]
    return {"input_ids": torch.tensor(ids),
            # Qwen3-VL's forward (transformers 5.4+) needs them to place the images: 1 at image tokens.
            "mm_token_type_ids": torch.tensor([[int(t == image_token_id) for t in row] for row in ids]),
            "attention_mask": torch.tensor([[1] * len(e["ids"]) + [0] * (width - len(e["ids"])) for e in examples]),
            "labels": torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples]),
            **{k: torch.cat([e["images"][k] for e in examples]) for k in examples[0]["images"]}}


def warm_up_tiny_base(model, processor, examples, *, epochs=6, lr=2e-3, batch_size=32, seed=0, device="cpu"):
    """Full-parameter fp32 training of the tiny base on (image, question, answer words) triples.

    This is the tiny model's "pre-training": it learns to see (name the colour, shape, count or
    position in words), never the multiple-choice letters the fine-tune teaches. Examples are
    encoded once, so each step costs only the forward and backward pass."""
    encoded = [_warmup_encode(processor, *example) for example in examples]
    pad_id = processor.tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = epochs * ((len(encoded) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(total=steps, desc="warm-up of the tiny base", leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = _warmup_collate([encoded[i] for i in order[start:start + batch_size]], pad_id, processor.image_token_id)
            loss = model(**{k: batch[k].to(device) for k in model_input_names(model.model, tuple(batch))}).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def build_tiny_qwen_vl(out_dir, texts, *, family="qwen2_5_vl", seed=0, max_pixels=112 * 112, hidden_size=64,
                       warmup_examples=(), warmup_epochs=6, variant="e2b"):
    """Build and save a tiny Qwen-VL (or Gemma 4) checkpoint folder (config, weights, tokenizer, processor).

    `variant` (Gemma 4 only): "e2b" like E2B/E4B, "31b" like 26B/31B, with their thought-channel template.
    Returns the folder. A `TINY_MODEL.json` marker written last makes re-runs free.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    out_dir = pathlib.Path(out_dir)
    marker = out_dir / "TINY_MODEL.json"
    spec = {"family": family, "seed": seed, "max_pixels": max_pixels, "hidden_size": hidden_size,
            "n_texts": len(texts), "n_warmup": len(warmup_examples), "warmup_epochs": warmup_epochs,
            "builder_version": 5}
    if family == "gemma4":  # (the Qwen markers stay as they were: their folders are not rebuilt)
        spec["variant"] = variant
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out_dir
    tokenizer = train_tiny_tokenizer(texts, family=family)
    config = tiny_model_config(family, tokenizer, hidden_size, variant=variant)
    torch.manual_seed(seed)
    model = tiny_model_class(family)(config).eval()
    processor = tiny_processor(family, tokenizer, max_pixels, thought_channel=variant == "31b")
    if warmup_examples:
        warm_up_tiny_base(model, processor, list(warmup_examples), epochs=warmup_epochs, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    marker.write_text(json.dumps(spec))
    return out_dir
