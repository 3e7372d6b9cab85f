"""mcvqa: fine-tune a Qwen vision-language model with 4-bit QLoRA for Kaggle multiple-choice VQA.

Each module is one stage of the flow; `mcvqa.notebook` stitches them, in flow order, into the
self-contained `Kaggle_AllInOne_Pro.ipynb`.
"""
