"""## Model families: what differs between the model lines, in one place per family

The stages (prompts, the model, memory, scoring, the shared-prefix TTA, the feature cache, locate) ask the
checkpoint's family instead of assuming one model line. A family is one module (`families/qwen_vl.py`,
`families/qwen3_5.py`, `families/gemma4.py`): a subclass of `ModelFamily` overriding only what differs from
this base, which is the ChatML, keys-and-values case of Qwen2/2.5/3-VL. What stays shared needs no family:
the answer position is read from each checkpoint's own chat template (rendered with thinking off) and checked
there (prompts.py); the rope positions and cached image features go through the model's own functions.

Images: the base is Qwen's layout. Its processor resizes within a pixel range (`size`), ships the patches of
all images as one [patches, dim] tensor with `image_grid_thw` per image (which the multimodal rope positions
need even when the tower's output comes from the feature cache), and writes one `<|image_pad|>` per merged
patch. Other families say how their processor is asked, how many tokens an image becomes without running
it, and how cached features enter their language model.
"""


import torch
from packaging.version import Version
from transformers import DynamicCache

from ..machinery.compat import cache_argument, image_features, rope_index

# Language-model linear layers (attention and MLP projections) that get LoRA; the vision tower stays frozen.
ATTENTION_MLP_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ModelFamily:
    name = "model family"
    model_types = ()  # config.json's model_type values this family loads
    transformers_floor = "5.0"  # the first transformers release with these model classes (that trains right)
    lora_targets = ATTENTION_MLP_TARGETS  # what lora_target_modules=auto means for this family
    kbit_skip = ()  # language-model layers kept out of 4 bits (besides the vision tower and lm_head)
    # What quantization=auto picks: "nf4" always, or "16bit" where the card holds the 16-bit weights.
    quantization = "nf4"
    # k-bit training upcasts every weight it does not quantise to fp32; True gives the (frozen) embedding and
    # LM head back the compute dtype: on a 248k vocabulary they are GiBs that fp32 buys nothing for.
    embeddings_16bit = False
    shared_prefix_since = "5.0"  # the first transformers release where the shared-prefix TTA is exact
    shared_prefix_before = ""  # what goes wrong on releases before that
    # Why the shared prefix is not used in bf16 ("": it is): a split computation can round further apart there.
    shared_prefix_not_bf16 = ""
    # Why it is not used in fp16 nor bf16 ("": it is), where only fp32 (the CPU) was seen exact.
    shared_prefix_not_16bit = ""
    features_since = "5.0"  # the first release whose forward takes cached image features (feature cache)
    prefix_padding = "right"  # how prefixes of different lengths are padded in one shared-prefix pass
    kernels = ()  # (module, pip package, what it speeds up): optional CUDA kernels this family's layers use
    vision_attr = "visual"  # the frozen vision tower: `<VLM>.model.<vision_attr>`
    tower_modules = ("visual",)  # module names (anywhere in a parameter's path) of the frozen, unquantised towers
    # The collated batch's image metadata: Qwen's grid is per sample (one image each) and stays in the batch
    # when cached features replace the pixels (the rope positions need it).
    image_meta = "image_grid_thw"
    meta_per_sample = True
    processor_classes = ()  # processor classes whose images this family's methods describe (registry.processor_family)

    # -- layers and cache --------------------------------------------------------------------------------
    def kv_layers(self, text_config):
        """Layers that keep keys and values for every token (a shared prefix's cache grows with them)."""
        return text_config.num_hidden_layers

    def kv_bytes_per_token(self, text_config, bytes_per_value):
        """Bytes of keys and values one token adds to a cache."""
        t = text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return 2 * self.kv_layers(t) * t.num_key_value_heads * head_dim * bytes_per_value

    def state_bytes(self, text_config):
        """Fixed per-sequence state of layers that keep no keys and values (recurrent layers): 0 here."""
        return 0

    def new_cache(self, text_config):
        """An empty cache for a shared prefix's pass."""
        return DynamicCache()

    def expand_cache(self, cache, n_rows, n_views):
        """Each row's cache repeated for its n_views option orders, in place (row-major: r0 r0 .. r1 r1 ..)."""
        cache.batch_repeat_interleave(n_views)

    attention_why = ""  # why attn_implementation differs from the hardware's choice, where it does

    def attn_implementation(self, config, requested):
        """The attention implementation to load the checkpoint with (the hardware's choice, or per sub-model)."""
        return requested

    @property
    def vision_modules(self):
        """bitsandbytes skip patterns for the towers (they match from the start of module names): they stay out of
        4 bits."""
        return (*(f"model.{tower}" for tower in self.tower_modules), *self.tower_modules)

    def in_towers(self, name):
        """Whether the parameter or module `name` belongs to a frozen tower (vision, audio, their projections)."""
        return any(f".{t}." in f".{name}." for t in self.tower_modules)

    # -- images ------------------------------------------------------------------------------------------
    def image_token_budget(self, cfg, vision_config):
        """(image tokens, vision patches) of a full-budget image: what the memory plan and time estimate count."""
        merge = vision_config.spatial_merge_size
        return cfg.max_pixels // (vision_config.patch_size * merge) ** 2, cfg.max_pixels // vision_config.patch_size ** 2

    def pixel_cap(self, cfg, scale=1.0):
        """The pixel budget an image is decoded within (data.load_image) for a view at `scale`."""
        return int(cfg.max_pixels * scale)

    def image_kwargs(self, min_pixels, max_pixels):
        """What the processor is told about the image size."""
        return {"size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}}

    def processor_images(self, images):
        """The images of a batch as the processor takes them (one per sample): a flat list here."""
        return images

    def image_tokens(self, processor, kwargs, image):
        """(tokens the image becomes, its per-sample metadata) without resizing it: the processor's resize rule."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = processor.image_processor
        size = kwargs["size"]
        height, width = smart_resize(image.height, image.width, factor=ip.patch_size * ip.merge_size,
                                     min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        grid = torch.tensor([1, height // ip.patch_size, width // ip.patch_size])
        return int(grid.prod()) // ip.merge_size ** 2, grid

    def shipped_tokens(self, processor, out):
        """(tokens, per-sample metadata) of each image the image processor just ran on."""
        merge = processor.image_processor.merge_size ** 2
        return [(int(grid.prod()) // merge, grid) for grid in out["image_grid_thw"]]

    def expand_image(self, processor, text, n_tokens):
        """The text with its image placeholder written as the processor writes it for an image of n_tokens."""
        return text.replace(processor.image_token, processor.image_token * n_tokens, 1)

    def encode_images(self, vlm_model, pixel_values, meta):
        """The frozen tower's output per image: ([embeds per image], [[layer tensor per image] per deepstack layer])."""
        return image_features(vlm_model, pixel_values, meta)

    # -- the language model on cached features ------------------------------------------------------------
    def positions(self, vlm_model, batch_or_ids, type_ids, meta, mask):
        """Position ids [components, batch, seq] of a right-padded batch: Qwen's multimodal rope (3 components)."""
        positions, _ = rope_index(vlm_model, batch_or_ids, type_ids, meta, mask)
        return positions

    def embed_with_features(self, vlm, input_ids, features, device):
        """`inputs_embeds` of input_ids with the cached image features put at the image tokens, as the stock
        forward does with the tower's output, plus Qwen3-VL's deepstack arguments. features: one ImageFeatures
        per image in batch order (None: text only)."""
        embeds = vlm.model.get_input_embeddings()(input_ids)
        if not features:
            return embeds, {}
        image_tokens = input_ids == vlm.config.image_token_id
        image = torch.cat([f.embeds for f in features]).to(device, embeds.dtype, non_blocking=True)
        if int(image_tokens.sum()) != image.shape[0]:
            raise ValueError(f"cached image features: {image.shape[0]} feature rows for {int(image_tokens.sum())} "
                             "image tokens")
        embeds = embeds.masked_scatter(image_tokens.unsqueeze(-1).expand_as(embeds), image)
        if not features[0].deepstack:
            return embeds, {}
        deepstack = [torch.cat([f.deepstack[i] for f in features]).to(device, non_blocking=True)
                     for i in range(len(features[0].deepstack))]
        return embeds, {"visual_pos_masks": image_tokens, "deepstack_visual_embeds": deepstack}

    def decoder_forward(self, vlm, input_ids, attention_mask, positions, features, device, *, cache=None, type_ids=None):
        """The language model on input_ids with cached image features (compat.py says why not the model's own
        forward): what `vlm.model(...)` computes after its vision tower, on every version."""
        embeds, extra = self.embed_with_features(vlm, input_ids.to(device), features, device)
        if cache is not None:
            extra[cache_argument(vlm.model.language_model)] = cache
        return vlm.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask.to(device),
                                        position_ids=positions.to(device), use_cache=cache is not None, **extra)

    def cached_features_problem(self, vlm_model):
        """Why cached image features cannot enter this model on this transformers (None: they can)."""
        return None

    @property
    def recommended_transformers(self):
        """The release from which everything of this family runs, the fast paths included (setup installs it)."""
        return max((self.transformers_floor, self.shared_prefix_since, self.features_since), key=Version)

    def __repr__(self):
        return self.name


def repeat_rows(n_rows, n_views, device=None):
    """[0, 0, .., 1, 1, ..]: the index that repeats each of n_rows rows n_views times."""
    return torch.arange(n_rows, device=device).repeat_interleave(n_views)


def snap_down(value, allowed):
    """The largest of `allowed` (sorted) not above value; the smallest when all are."""
    return max([a for a in allowed if a <= value] or [allowed[0]])
