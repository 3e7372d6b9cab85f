"""Gemma 4 for the benchmarks: full-size configs (E2B, E4B, 31B), a bench tokenizer at the real ids, the assets.

- **Configs** (`gemma4_sizes`): E2B is a copy of the real google/gemma-4-E2B-it config.json
  (../shared/vlm_tokenizers/gemma-4-E2B-it, sha256 1b28f3d2..., checked by tests/test_bench_gemma4.py). E4B and
  31B are NOT from an official file: their numbers come from third-party copies of the published configs
  (test fixtures, a maxtext-style config, vLLM / lightllm tests, a memory planner that read the live HF config;
  /tmp/gemma4_report.md section 10). What is assumed on top is marked `# assumed` below.
- **Tokenizer** (`build_tokenizer_json`): the real tokenizer.json (32 MB) is not available. The bench's has
  exactly 262,144 entries like the real vocabulary, the special tokens at their REAL ids (0-4, 46-52, 98,
  100-101, 105-106, 255999-256000, 258880-258884: config.json, generation_config.json and third-party tables
  that agree with each other), `\n` at 107 as in the real one, the 256 byte-fallback tokens `<0x00>`..`<0xFF>`,
  then a SentencePiece-style BPE (spaces as `▁`, byte fallback: what transformers' GemmaTokenizer rebuilds from
  the file) trained on the bench's own Korean texts, and every other id a placeholder `<uN>` (N = its id) no merge
  ever produces. Token counts per Korean sample therefore DIFFER from the real tokenizer's (this one
  knows a few hundred Korean pieces; the real one ~262k pieces of many languages): sequence lengths, hence
  speed and memory, are close but not the real ones. `a`..`d` are single tokens, the same after
  `<|turn>model\n` (no merge crosses a newline) and after `<channel|>` (a special token); `<bos>` is added
  with add_special_tokens=True (the post-processor), as the real one does.
- **Assets** (`prepare_gemma_assets`): `.bench_assets/gemma-4-E4B-it/` = the bench tokenizer.json + the real
  tokenizer_config.json, processor_config.json, chat_template.jinja, generation_config.json (E2B and E4B share
  all of them); `.bench_assets/gemma-4-31B-it/` = the same with a RECONSTRUCTED 31B template: E2B's template
  whose generation prompt ends in the empty thought channel `<|channel>thought\\n<channel|>` when thinking is off
  (the block found in public llama.cpp copies of google-gemma-4-31B-it.jinja; the real 31B template's bytes,
  sha256 85a08664..., were not available).
"""

import json
import pathlib
import shutil
import tempfile

VOCAB_SIZE = 262144
# Real ids. From the real config.json / generation_config.json: pad 0, eos 1, bos 2, <|image> 255999, <|audio>
# 256000, <|image|> 258880, <|audio|> 258881, <image|> 258882, <audio|> 258883, <|video|> 258884 (and eos 106 =
# <turn|>, generation eos 50 = <|tool_response>). From third-party Gemma 4 token tables (several agree): unk 3,
# <|tool> 46 ... <|"|> 52, <|think|> 98, <|channel> 100, <channel|> 101, <|turn> 105, <turn|> 106, "\n" 107.
# <mask> 4: Gemma's usual place (Gemma 2/3), not confirmed for Gemma 4.
SPECIAL_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49, "<|tool_response>": 50,
    "<tool_response|>": 51, '<|"|>': 52, "<|think|>": 98, "<|channel>": 100, "<channel|>": 101,
    "<|turn>": 105, "<turn|>": 106,
    "<|image>": 255999, "<|audio>": 256000, "<|image|>": 258880, "<|audio|>": 258881, "<image|>": 258882,
    "<audio|>": 258883, "<|video|>": 258884,
}
NEWLINE_ID = 107
MODEL_IDS = dict(image_token_id=258880, boi_token_id=255999, eoi_token_id=258882, video_token_id=258884,
                 audio_token_id=258881, boa_token_id=256000, eoa_token_id=258883, eoa_token_index=258883)
ASSET_E4B, ASSET_31B = "gemma-4-E4B-it", "gemma-4-31B-it"
COPIED = ("tokenizer_config.json", "processor_config.json", "chat_template.jinja", "generation_config.json")
GENERATION_PROMPT = "        {{- '<|turn>model\\n' -}}\n"
EMPTY_CHANNEL = "        {%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}\n"

# --------------------------------------------------------------------------------------------------- configs
ROPE = {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
# Real E2B config.json, verbatim (text: all size fields; vision, audio: whole).
E2B_TEXT = dict(vocab_size=VOCAB_SIZE, vocab_size_per_layer_input=VOCAB_SIZE, hidden_size=1536, intermediate_size=6144,
                num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
                layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, sliding_window=512,
                hidden_size_per_layer_input=256, num_kv_shared_layers=20, use_double_wide_mlp=True,
                attention_k_eq_v=False, num_global_key_value_heads=None, use_bidirectional_attention=None,
                enable_moe_block=False, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                max_position_embeddings=131072, rms_norm_eps=1e-6, attention_bias=False, rope_parameters=ROPE,
                pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True)
E2B_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                  num_key_value_heads=12, head_dim=64, global_head_dim=64, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=10240, default_output_length=280, max_position_embeddings=131072,
                  hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, attention_bias=False,
                  rope_parameters={"rope_theta": 100.0, "rope_type": "default"}, standardize=False,
                  use_clipped_linears=True)
E2B_AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, hidden_act="silu",
                 subsampling_conv_channels=[128, 32], conv_kernel_size=5, residual_weight=0.5, attention_chunk_size=12,
                 attention_context_left=13, attention_context_right=0, attention_logit_cap=50.0,
                 attention_invalid_logits_value=-1e9, use_clipped_linears=True, rms_norm_eps=1e-6,
                 gradient_clipping=1e10, output_proj_dims=1536)
# E4B: third-party copies of its config.json (report section 10): 42 layers (35 sliding : 7 full, every 6th
# full), hidden 2560, 8 / 2 heads, intermediate 10240 (not double-wide), PLE 256, 18 KV-shared layers, window 512.
E4B_TEXT = dict(E2B_TEXT, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_key_value_heads=2,
                layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7, num_kv_shared_layers=18,
                use_double_wide_mlp=False)
# 31B: third-party copies (report section 10): 60 layers (50 sliding : 10 full, every 6th full), hidden 5376,
# 32 / 16 heads, global layers 4 KV heads with V = K, intermediate 21504, no PLE, no KV sharing, window 1024,
# bidirectional attention within images, context 262144. Vision: 27 layers, 1152 wide, 16 heads of 72,
# MLP 4304, standardize=True (vLLM #40290). No audio tower.
B31_TEXT = dict(E2B_TEXT, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
                num_key_value_heads=16, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10,
                sliding_window=1024, hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB_SIZE,
                num_kv_shared_layers=0, use_double_wide_mlp=False, attention_k_eq_v=True, num_global_key_value_heads=4,
                use_bidirectional_attention="vision", max_position_embeddings=262144)
B31_VISION = dict(E2B_VISION, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=72, global_head_dim=72, standardize=True,
                  use_clipped_linears=False)  # assumed: clipped linears are the E models' (unknown for the 31B)
GEMMA4_MODELS = {  # name: (text, vision, audio or None, processor asset)
    "Gemma-4-E2B": (E2B_TEXT, E2B_VISION, E2B_AUDIO, ASSET_E4B),
    # E4B's vision and audio towers: E2B's (assumed: the same encoders ship with both E models).
    "Gemma-4-E4B": (E4B_TEXT, E2B_VISION, E2B_AUDIO, ASSET_E4B),
    "Gemma-4-31B": (B31_TEXT, B31_VISION, None, ASSET_31B),
}
# --tiny: the same structure (sliding/full, KV sharing, PLE or V = K, bidirectional vision) at toy widths; the
# vocabulary stays 262,144 so that the bench tokenizer and the product's tokenizer check are the real ones.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, global_head_dim=32, sliding_window=16,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=16, global_head_dim=16, position_embedding_size=256)
TINY_AUDIO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                  output_proj_dims=32)


def gemma4_sizes(name, tiny=False):
    """Gemma4Config keyword arguments (text_config, vision_config, audio_config, the special ids) for `name`."""
    text, vision, audio, _ = GEMMA4_MODELS[name]
    text, vision, audio = json.loads(json.dumps([text, vision, audio]))
    if tiny:
        text.update(TINY_TEXT)
        if text["hidden_size_per_layer_input"]:
            text.update(hidden_size_per_layer_input=16, num_kv_shared_layers=2)
        if text["num_global_key_value_heads"]:
            text["num_global_key_value_heads"] = 1
        vision.update(TINY_VISION)
        if audio:
            audio.update(TINY_AUDIO)
    return dict(text_config=text, vision_config=vision, audio_config=audio, tie_word_embeddings=True, **MODEL_IDS)


# ------------------------------------------------------------------------------------------------- tokenizer
def corpus(texts):
    """Lines to train the BPE on: the bench's Korean texts, the product's instruction, option lines, the template's
    words. No line holds a newline, so no merge crosses one (the letter after `<|turn>model\\n` stays alone)."""
    from mcvqa.core.config import Config

    lines = [t for text in texts for t in str(text).splitlines() if t]
    lines += [Config().instruction, "user model system thought", "a. b. c. d.", "0 1 2 3 4 5 6 7 8 9"]
    lines += [f"{letter}. {text}" for letter in "abcd" for text in texts[:40]]
    return lines * 3


def build_tokenizer_json(texts, path, vocab_size=VOCAB_SIZE, trained=400):
    """Write the bench tokenizer.json (see the module's docstring) to `path`."""
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    # GemmaTokenizer's own pipeline (transformers rebuilds it from the file's vocab and merges).
    def pipeline(tok):
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok

    lines = corpus(texts)
    alphabet = sorted(set("".join(lines).replace(" ", "▁")) | set(string.ascii_letters + string.digits + string.punctuation)
                      | {"▁"})
    tok = pipeline(Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True)))
    # Trained on words (`▁` starts one, as in SentencePiece) of at most 2 characters: merges never cross a word,
    # and a Korean question is not learned whole from this small corpus (~1 token per 1-2 syllables instead).
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    tok.train_from_iterator(lines, BpeTrainer(vocab_size=len(alphabet) + trained, initial_alphabet=alphabet,
                                              show_progress=False, special_tokens=[], limit_alphabet=len(alphabet),
                                              max_token_length=2))
    model = json.loads(tok.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    vocab = dict(SPECIAL_IDS)
    taken = set(vocab.values())
    free = (i for i in range(vocab_size) if i not in taken and i != NEWLINE_ID)
    vocab["\n"] = NEWLINE_ID
    for token in [f"<0x{b:02X}>" for b in range(256)] + [t for t in learned if t not in vocab]:
        vocab[token] = next(free)
    for i in free:  # never produced: no merge builds them, and they are not added tokens
        vocab[f"<u{i}>"] = i
    assert len(vocab) == vocab_size and sorted(vocab.values()) == list(range(vocab_size))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    final = pipeline(Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)))
    final.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    final.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                         special_tokens=[("<bos>", SPECIAL_IDS["<bos>"])])
    final.save(str(path), pretty=False)
    return path


def reconstructed_31b_template(template):
    """E2B's template with the 31B's generation prompt: `<|turn>model\\n` then, thinking off, the empty thought
    channel (RECONSTRUCTED: the block as public llama.cpp copies of google-gemma-4-31B-it.jinja have it)."""
    if template.count(GENERATION_PROMPT) != 1:
        raise SystemExit("chat_template.jinja: the generation prompt line to extend for the 31B was not found once")
    return template.replace(GENERATION_PROMPT, GENERATION_PROMPT + EMPTY_CHANNEL)


def prepare_gemma_assets(assets, source, texts):
    """`.bench_assets/gemma-4-E4B-it` and `gemma-4-31B-it` from ../shared/vlm_tokenizers/gemma-4-E2B-it, checked by
    loading them as the product does (AutoProcessor) and reading the ids back."""
    source = pathlib.Path(source)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_json = build_tokenizer_json(texts, pathlib.Path(tmp) / "tokenizer.json")
        for name in (ASSET_E4B, ASSET_31B):
            folder = pathlib.Path(assets) / name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for file in COPIED:
                shutil.copy(source / file, folder / file)
            shutil.copy(tokenizer_json, folder / "tokenizer.json")
            if name == ASSET_31B:
                template = (folder / "chat_template.jinja").read_text()
                (folder / "chat_template.jinja").write_text(reconstructed_31b_template(template))
                (folder / "RECONSTRUCTED.md").write_text(
                    "chat_template.jinja: E2B's April-2026 template with the 31B's generation-prompt block (the empty "
                    "thought channel when thinking is off) as public llama.cpp copies of google-gemma-4-31B-it.jinja "
                    "have it; not the real 31B file. tokenizer.json: the bench's (bench/bench_gemma4.py), not Google's.\n")
            check_processor(folder)
    print(f"[bench] Gemma 4 processors (bench tokenizer, real configs) written to {assets}")


def check_processor(folder):
    """The asset loads like a model folder's processor, with the real ids where the product reads them."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    assert len(tok) == VOCAB_SIZE, len(tok)
    for token, i in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == i, (token, tok.convert_tokens_to_ids(token), i)
    assert (processor.image_token_id, tok.convert_tokens_to_ids(processor.boi_token),
            tok.convert_tokens_to_ids(processor.eoi_token)) == (258880, 255999, 258882)
    assert tok.encode("x", add_special_tokens=True)[0] == 2 and tok.encode("x", add_special_tokens=False)[0] != 2
    header = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "?"}]}],
                                           add_generation_prompt=True, tokenize=False, enable_thinking=False)
    for letter in "abcd":
        alone = tok.encode(letter, add_special_tokens=False)
        assert len(alone) == 1 and tok.encode(header + letter, add_special_tokens=False)[-1] == alone[0], letter
    return processor
