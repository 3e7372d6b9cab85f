"""## Which family a checkpoint belongs to

`family_of(config)` names the family of a loaded or meta model's config (its `model_type`), and
`FAMILIES` lists every family the pipeline loads (locate.py finds their folders under /kaggle/input)."""

from ..machinery.errors import UserError
from .gemma4 import GEMMA4
from .qwen3_5 import QWEN3_5
from .qwen_vl import QWEN_VL

FAMILIES = (QWEN_VL, QWEN3_5, GEMMA4)
MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


class UnknownFamilyError(UserError, ValueError):
    """A checkpoint of a model line the pipeline does not load."""


def processor_family(processor):
    """The family whose processor this is, for how images are asked for and written (the base, Qwen's, unless a
    family names the processor class: Qwen3.5 uses Qwen3-VL's)."""
    name = type(processor).__name__
    return next((f for f in FAMILIES if name in f.processor_classes), QWEN_VL)


def family_of(config):
    """The family of a transformers config (or a model_type string)."""
    model_type = config if isinstance(config, str) else config.model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnknownFamilyError(f"model_type {model_type!r} is not a model line this pipeline loads; it loads "
                             + "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
                             + ". Fix: model_name_or_path=<a folder of one of these>")
