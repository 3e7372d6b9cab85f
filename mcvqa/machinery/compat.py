"""## transformers versions: what differs between the supported releases, in one place

The pipeline runs on transformers `SUPPORTED_TRANSFORMERS` (the range requirements.txt admits; the README
lists the versions that were run). Kaggle's and Colab's images ship an older 5.x than the newest, so
nothing here may depend on one release's internals without a fallback that every supported release
has. Below the public `model(**inputs)` call the pipeline touches three things that moved:

- **cached image features** enter the language model as `inputs_embeds` (the image tokens' embeddings
  replaced by the features, as the stock forward does), with the multimodal rope positions from the
  model's own `get_rope_index`; for Qwen3-VL also the deepstack features. Every 5.x release has these
  arguments. (`mm_encoder_outputs`, which does the same, exists only since 5.18.)
- `get_image_features` splits Qwen3-VL's deepstack features per image since 5.18 (one tensor per layer
  for the whole call before); `image_features` returns them per image on every version.
- `mm_token_type_ids` is a model input since 5.4 (5.0-5.3 find the images from the tokens, and their
  `generate` rejects it): `model_input_names` leaves it out where the forward has no such argument.
- `get_rope_index` takes `mm_token_type_ids` since 5.4; before, it found the images from the tokens.
- the decoder's KV-cache argument is `cache` since 5.24 and `past_key_values` before. An unknown keyword
  is swallowed silently by the decoder's `**kwargs`: passing the wrong one runs the suffix of a
  shared-prefix batch without its prefix (wrong answers on 5.18-5.23 before this module existed).

Because a silently ignored argument gives wrong numbers rather than an error, the fast paths that use
these entries also check themselves against the stock forward at run time (`scoring.check_fast_paths`).
"""

import functools
import inspect
import logging
import sys

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .packages import RUN_PACKAGES, SetupError, installed_version


class _DropLine(logging.Filter):
    """Drops one known, harmless library log line a run would otherwise open with."""

    def __init__(self, starts):
        super().__init__()
        self.starts = starts

    def filter(self, record):
        return not str(record.msg).startswith(self.starts)


# bitsandbytes (0.50), imported on a CPU with AVX512-BF16, asks the hub for a faster CPU 4-bit kernel; offline
# that fails and it logs a warning, then uses its own kernel: the demo's (and a Kaggle CPU's) first line read
# as an alarm. Attached before bitsandbytes is imported (this module comes before the model's).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropLine("Failed to load CPU gemm_4bit_forward"))

_TRANSFORMERS_SPEC = {s.operator: Version(s.version) for s in SpecifierSet(RUN_PACKAGES["transformers"])}
SUPPORTED_TRANSFORMERS = (_TRANSFORMERS_SPEC[">="], _TRANSFORMERS_SPEC["<"])  # [floor, ceiling): packages.py's


def transformers_version():
    return Version(transformers.__version__)


def version_problem(version=None):
    """Why this transformers version is not supported (None when it is)."""
    version = transformers_version() if version is None else Version(str(version))
    floor, ceiling = SUPPORTED_TRANSFORMERS
    if floor <= version < ceiling:
        return None
    return (f"transformers {version} is installed; this pipeline supports >={floor},<{ceiling}. Fix: "
            f"pip install 'transformers>={floor},<{ceiling}' (offline: from a wheel in an attached dataset)")


@functools.lru_cache(maxsize=None)
def _parameters(function):
    return inspect.signature(function).parameters


def rope_index(vlm_model, input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
    """The model's multimodal rope positions [3, batch, seq] (and deltas), on any supported version."""
    if "mm_token_type_ids" in _parameters(type(vlm_model).get_rope_index):
        return vlm_model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask=attention_mask)
    return vlm_model.get_rope_index(input_ids, image_grid_thw, attention_mask=attention_mask)


def model_input_names(vlm_model, names):
    """The collated batch keys this model's forward takes (drops mm_token_type_ids before 5.4)."""
    accepted = _parameters(type(vlm_model).forward)
    return tuple(n for n in names if n != "mm_token_type_ids" or n in accepted)


def cache_argument(language_model):
    """The keyword the decoder takes its KV cache under: `cache` (5.24+) or `past_key_values`."""
    return "cache" if "cache" in _parameters(type(language_model).forward) else "past_key_values"


def image_features(vlm_model, pixel_values, grid_thw):
    """The frozen tower's output per image: ([embeds per image], [[layer tensor per image] per deepstack
    layer]); the second list is empty for Qwen2.5-VL."""
    out = vlm_model.get_image_features(pixel_values, grid_thw, return_dict=True)
    embeds = list(out.pooler_output)
    sizes = [e.shape[0] for e in embeds]
    layers = getattr(out, "deepstack_features", None) or []
    return embeds, [list(torch.split(layer, sizes)) if isinstance(layer, torch.Tensor) else list(layer)
                    for layer in layers]


_SHOWN = {}  # what check_versions printed in this process: the notebook's hardware cell, then start_run


def check_versions(verbose=True):
    """Print the versions a run depends on (once per process); stop with the fix when transformers is outside
    the supported range."""
    found = {name: installed_version(name) or "not installed"
             for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")}
    if verbose and _SHOWN.get("versions") != found:
        print("[versions] " + ", ".join(f"{k} {v}" for k, v in found.items()))
        _SHOWN["versions"] = found
    problem = version_problem()
    if problem:
        raise SetupError(problem)
    return found


def fast_path_fix():
    """What to do when a fast path disagrees with the exact one: below 5.24 (the cache keyword, 5.18-5.23) a newer
    transformers; from there nothing is known to fix, and the pass is exact anyway."""
    if transformers_version() < Version("5.24"):
        return "pip install -U 'transformers>=5.24,<6'"
    return ("none known on this release (the predictions stay exact; in bf16 a split prefix and suffix can also round "
            "further apart than the tolerance); please report the model and versions")


def warn(message):
    """A warning people see: framed, on stderr (a notebook shows it highlighted), not one log line among many."""
    print(f"\n{'!' * 100}\nWARNING: {message}\n{'!' * 100}\n", file=sys.stderr, flush=True)
