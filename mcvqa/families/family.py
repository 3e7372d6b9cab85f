"""## Model families: what differs between the model lines, in one place per family

The stages (prompts, the model, memory, scoring, the shared-prefix TTA, locate) ask the checkpoint's family
instead of assuming one model line. A family is one module (`families/qwen_vl.py`, `families/qwen3_5.py`):
a subclass of `ModelFamily` overriding only what differs from this base, which is the ChatML,
keys-and-values case of Qwen2/2.5/3-VL. What stays shared needs no family: the answer position is read
from each checkpoint's own chat template (rendered with thinking off) and checked there (prompts.py); the
rope positions and cached image features go through the model's own functions (compat.py).
"""

import torch
from transformers import DynamicCache

# Language-model linear layers (attention and MLP projections) that get LoRA; the vision tower stays frozen.
ATTENTION_MLP_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ModelFamily:
    name = "model family"
    model_types = ()  # config.json's model_type values this family loads
    transformers_floor = "5.0"  # the first transformers release with these model classes
    lora_targets = ATTENTION_MLP_TARGETS  # what lora_target_modules=auto means for this family
    kbit_skip = ()  # language-model layers kept out of 4 bits (besides the vision tower and lm_head)
    # What quantization=auto picks: "nf4" always, or "16bit" where the card holds the 16-bit weights.
    quantization = "nf4"
    # k-bit training upcasts every weight it does not quantise to fp32; True gives the (frozen) embedding and
    # LM head back the compute dtype: on a 248k vocabulary they are GiBs that fp32 buys nothing for.
    embeddings_16bit = False
    shared_prefix_since = "5.0"  # the first transformers release where the shared-prefix TTA is exact
    prefix_padding = "right"  # how prefixes of different lengths are padded in one shared-prefix pass
    kernels = ()  # (module, pip package, what it speeds up): optional CUDA kernels this family's layers use

    def kv_layers(self, text_config):
        """Layers that keep keys and values for every token (a shared prefix's cache grows with them)."""
        return text_config.num_hidden_layers

    def state_bytes(self, text_config):
        """Fixed per-sequence state of layers that keep no keys and values (recurrent layers): 0 here."""
        return 0

    def new_cache(self, text_config):
        """An empty cache for a shared prefix's pass."""
        return DynamicCache()

    def expand_cache(self, cache, n_rows, n_views):
        """Each row's cache repeated for its n_views option orders, in place (row-major: r0 r0 .. r1 r1 ..)."""
        cache.batch_repeat_interleave(n_views)

    def __repr__(self):
        return self.name


def repeat_rows(n_rows, n_views, device=None):
    """[0, 0, .., 1, 1, ..]: the index that repeats each of n_rows rows n_views times."""
    return torch.arange(n_rows, device=device).repeat_interleave(n_views)
