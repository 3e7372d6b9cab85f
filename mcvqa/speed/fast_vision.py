"""## Fast vision attention: all windows of a batch in a few SDPA calls (`fast_vision_attention`, on by default)

Under SDPA, transformers' Qwen2.5-VL / Qwen3-VL vision attention runs one attention call per chunk of
`cu_seqlens`: per 112-pixel window in Qwen2.5-VL's windowed layers (16 windows of a 392x392 image, so
~500 tiny calls per layer for a batch of 32 images) and per image in the full-attention layers. The
Python loop and the tiny kernels, not the arithmetic, then bound the tower's speed on a GPU.

`patch_vision_attention` replaces that loop, on the model's vision-attention modules only, by grouping
the chunks by length: chunks of one length are gathered into one [chunks, heads, length, head_dim]
batch and go through a single SDPA call without a mask (so the fused flash / memory-efficient kernels
apply), and the results are scattered back. A 392x392 image has windows of only a few lengths, so a
layer makes a handful of calls. Each chunk still attends only to itself: the result equals the stock
module's up to floating-point rounding (tested). FlashAttention 2's varlen kernel already does this,
so modules running flash_attention_2 are left alone.

With the loop gone, the tower's time goes to its elementwise work: fp32 RMSNorm, SwiGLU and the fp32
rotary each make several full passes over the activations, and cuBLAS matmuls were under half of the
tower's GPU time (bench/profile_tower.py, H200). `compile_vision_elementwise` (`compile_vision`,
auto: on for sm80+ GPUs with triton) hands the blocks' norms, MLP and the rotary to torch.compile,
which fuses each into a few kernels; attention stays the grouped SDPA calls above (dynamic window
groups would make a whole-block graph recompile). Same arithmetic, fp32 inside the fused kernels:
equal to stock in fp32, bf16 rounding otherwise (tested).
"""

import importlib.util
import shutil
import sys
import types

import torch
import torch.nn.functional as F

from ..core.config import ConfigError


def chunk_groups(cu_seqlens):
    """[(length, index [n_chunks, length])] of the token positions of each chunk, grouped by length."""
    bounds = cu_seqlens.tolist()
    starts = torch.tensor(bounds[:-1], dtype=torch.long)
    lengths = torch.tensor(bounds[1:], dtype=torch.long) - starts
    groups = []
    for length in sorted(set(lengths.tolist())):
        if length == 0:
            continue
        first = starts[lengths == length]
        index = first[:, None] + torch.arange(length)[None, :]
        groups.append((length, index.to(cu_seqlens.device)))
    return groups


def grouped_attention(query, key, value, groups, scaling):
    """Attention of q, k, v [tokens, heads, head_dim] within each chunk; returns [tokens, heads, head_dim]."""
    out = torch.empty_like(query)
    for _, index in groups:
        # [n, length, heads, dim] -> [n, heads, length, dim]: a batch of independent chunks.
        q, k, v = (t[index].transpose(1, 2) for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        out[index.reshape(-1)] = o.transpose(1, 2).reshape(-1, *query.shape[1:])
    return out


def _grouped_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """The stock vision-attention forward with the per-chunk loop replaced by `grouped_attention`."""
    seq_length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    # The model's own rotary helper (same module as the attention class), so numerics match exactly;
    # its torch.compile'd version when compile_vision_elementwise ran.
    rotary = getattr(self, "_mcvqa_rotary", None) or sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    query, key = rotary(query, key, cos, sin)
    # The same cu_seqlens tensor is passed to every windowed (or every full) layer: plan once per tensor.
    plan = self._mcvqa_plans
    if not any(tensor is cu_seqlens for tensor, _ in plan):
        plan.append((cu_seqlens, chunk_groups(cu_seqlens)))
        del plan[:-2]  # the window plan and the full-attention plan of the current forward
    groups = next(g for tensor, g in plan if tensor is cu_seqlens)
    out = grouped_attention(query, key, value, groups, self.scaling)
    return self.proj(out.reshape(seq_length, -1).contiguous())


def patch_vision_attention(model):
    """Swap the per-chunk loop of every SDPA vision-attention module for grouped calls; returns how many."""
    patched = 0
    plans = []  # shared by all layers: the chunk plan is built once per cu_seqlens tensor, not per layer
    for name, module in model.named_modules():
        if not (type(module).__name__.endswith("VisionAttention") and hasattr(module, "qkv")
                and hasattr(module, "proj") and "visual" in name):
            continue
        if module.config._attn_implementation != "sdpa":
            continue  # flash_attention_2 already runs all chunks in one varlen call; eager is left as is
        module._mcvqa_plans = plans
        module.forward = types.MethodType(_grouped_forward, module)
        patched += 1
    return patched


def unpatch_vision_attention(model):
    """Undo patch_vision_attention (the class's own forward comes back)."""
    for module in model.modules():
        if "_mcvqa_plans" in vars(module):
            del module.forward, module._mcvqa_plans
        vars(module).pop("_mcvqa_rotary", None)


def compile_vision_choice(setting, hardware):
    """(compile?, why) for the `compile_vision` setting (auto | on | off) on this hardware."""
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"config: compile_vision must be auto, on or off, got {setting!r}")
    if setting != "auto":
        return setting == "on", f"compile_vision={setting} set in the config"
    if hardware.device != "cuda":
        return False, "on the CPU compiling costs more time than it saves (compile_vision=on to force)"
    if tuple(hardware.compute_capability) < (8, 0):
        return False, (f"{hardware.gpu_name} is below sm80, where it was not measured "
                       "(the tower runs once per image with the cache; compile_vision=on to try)")
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (torch.compile needs it on a GPU)"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return False, "no C compiler on the PATH (triton builds its kernel launcher with one)"
    return True, "sm80+ GPU with triton: fused norms, MLP and rotary (1.9x the 3B tower on an H200, BENCHMARKS.md)"


def compile_vision_elementwise(model):
    """torch.compile each vision block's norms and MLP, in place (state-dict keys unchanged), and the
    rotary of the grouped attention; returns the number of blocks. dynamic=True: one graph for every
    batch's token count. The first batch pays the compile (seconds)."""
    blocks = [m for name, m in model.named_modules() if type(m).__name__.endswith("VisionBlock") and "visual" in name]
    for block in blocks:
        for part in (block.norm1, block.norm2, block.mlp):
            part.compile(dynamic=True)
    rotaries = {}
    for module in model.modules():
        if "_mcvqa_plans" in vars(module):  # patched attention: it calls the rotary by name
            source = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
            if source not in rotaries:
                rotaries[source] = torch.compile(source, dynamic=True)
            module._mcvqa_rotary = rotaries[source]
    return len(blocks)


def speed_up_vision_tower(model, cfg, hardware):
    """The tower's fast paths where it has the parts they replace (Qwen-VL's windowed attention and vision blocks;
    other towers run as they are), each said in one line."""
    if cfg.fast_vision_attention:
        layers = patch_vision_attention(model)
        print(f"[model] grouped SDPA vision attention in {layers} layers" if layers else
              "[model] grouped SDPA vision attention: nothing to group in this tower (Qwen-VL's windowed towers only)")
    compile_on, why = compile_vision_choice(cfg.compile_vision, hardware)
    blocks = compile_vision_elementwise(model) if compile_on else 0
    if blocks:
        print(f"[model] torch.compile of the vision tower's norms, MLP and rotary in {blocks} blocks: {why}")
    else:
        print(f"[model] vision tower not compiled: {why if not compile_on else 'no Qwen-VL vision blocks in this tower'}")
