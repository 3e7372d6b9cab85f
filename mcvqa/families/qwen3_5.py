"""## Qwen3.5 / 3.6 (dense and MoE): hybrid attention, thinking templates, a 248k vocabulary

- **Layers**: three Gated DeltaNet (linear attention) layers to one full-attention layer. A DeltaNet layer
  keeps a fixed recurrent state and a short convolution window per sequence instead of keys and values.
  LoRA also goes on its projections (`in_proj_qkv`, `in_proj_z`, `out_proj`); its two 16- to 64-row gate
  projections (`in_proj_a`, `in_proj_b`, and MoE's `shared_expert_gate`) stay out of 4 bits.
- **Shared prefix**: a right pad inside a prefix would pass through the recurrent state (decaying it), so
  prefixes are padded on the left, where the padding mask zeroes pads while the state is still zero, and the
  cache (made with the text config: it needs to know which layers are linear) is repeated per option order
  with `reorder_cache`, which its linear layers have. Exact from transformers 5.7; 5.2-5.6 restart the
  recurrent state on every multi-token forward over a cache, so there the views are scored one by one. In bf16
  the split computation rounds as far from the whole prompt's as the self-check's tolerance (a 9B's letter
  logits 0.12-0.18 apart, 0.02 in fp16): there the views are scored one by one too, said once per fold.
- **Precision**: Unsloth advises against 4-bit QLoRA for Qwen3.5 (larger quantisation error): `quantization=auto`
  takes 16-bit LoRA where the card holds it (memory.py), NF4 where only that fits.
- **Kernels**: the DeltaNet layers use flash-linear-attention and causal-conv1d where installed (CUDA);
  without them transformers runs a slower torch loop (prints it once).
- **Template**: 4B and larger default to thinking; the pipeline renders with `enable_thinking=False`
  (prompts.py), so an empty `<think>\n\n</think>\n\n` precedes the letter, trained and scored alike.
"""

from transformers import DynamicCache

from .family import ModelFamily, repeat_rows


class Qwen35(ModelFamily):
    name = "Qwen3.5 / Qwen3.6"
    model_types = ("qwen3_5", "qwen3_5_moe")
    transformers_floor = "5.2"
    lora_targets = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                    r"|in_proj_qkv|in_proj_z|out_proj)")
    kbit_skip = ("in_proj_a", "in_proj_b", "shared_expert_gate")
    quantization = "16bit"
    embeddings_16bit = True
    shared_prefix_since = "5.7"
    shared_prefix_before = "earlier releases restart the linear-attention state on every multi-token forward over a cache"
    shared_prefix_not_bf16 = ("in bf16 the DeltaNet state built from a split prefix and suffix rounds 0.12-0.18 apart from "
                              "the whole prompt's on a 9B (BENCHMARKS.md, runs 33 and 36: at the self-check's tolerance, "
                              "which then turned it off in 4 of 6 passes), against 0.02 in fp16")
    prefix_padding = "left"
    kernels = (("fla", "flash-linear-attention", "the DeltaNet rule"), ("causal_conv1d", "causal-conv1d",
                                                                        "the DeltaNet convolution"))

    def kv_layers(self, text_config):
        return sum(kind == "full_attention" for kind in text_config.layer_types)

    def state_bytes(self, text_config):
        """Per DeltaNet layer: the fp32 recurrent state [value heads, key dim, value dim] and the convolution
        window over q, k and v (kernel size x channels, 16 bits)."""
        t = text_config
        recurrent = t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim * 4
        channels = 2 * t.linear_num_key_heads * t.linear_key_head_dim + t.linear_num_value_heads * t.linear_value_head_dim
        linear_layers = t.num_hidden_layers - self.kv_layers(t)
        return linear_layers * (recurrent + channels * t.linear_conv_kernel_dim * 2)

    def new_cache(self, text_config):
        return DynamicCache(config=text_config)

    def expand_cache(self, cache, n_rows, n_views):
        cache.reorder_cache(repeat_rows(n_rows, n_views))


QWEN3_5 = Qwen35()
