"""One-off probe (issue 26, run 57): bench/build_reader.py with the Qwen3.5 reader's text config overridden after
`_set_depth` by the JSON in PROBE_TEXT, e.g. PROBE_TEXT='{"layer_types": [...]}'. Run from the repository root."""
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from mcvqa.demo import reader_model  # noqa: E402

OVERRIDES = json.loads(os.environ.get("PROBE_TEXT", "{}"))
_set_depth = reader_model._set_depth


def _set_depth_overridden(config, layers):
    _set_depth(config, layers)
    text = config.get_text_config()
    for key, value in OVERRIDES.items():
        setattr(text, key, value)
    text.num_hidden_layers = len(text.layer_types)
    print("[probe] text config", {k: getattr(text, k) for k in (
        "layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
        "linear_value_head_dim", "num_attention_heads", "head_dim")}, flush=True)


reader_model._set_depth = _set_depth_overridden
import build_reader  # noqa: E402

build_reader.main()
