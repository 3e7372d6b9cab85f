"""## Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE)

ChatML (`<|im_start|>assistant\n` before the answer), attention in every layer: the base family as it is."""

from .family import ModelFamily


class QwenVL(ModelFamily):
    name = "Qwen2-VL / Qwen2.5-VL / Qwen3-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


QWEN_VL = QwenVL()
