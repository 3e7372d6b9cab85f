"""One-off probe (issue 26): Qwen3.5 reader variants via JSON overrides of the text config (env PROBE_TEXT)."""
import json, os, sys, pathlib
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/bench")
from mcvqa.demo import reader_model
_orig = reader_model._set_depth
def _set_depth(config, layers):
    _orig(config, layers)
    text = config.get_text_config()
    for k, v in json.loads(os.environ.get("PROBE_TEXT", "{}")).items():
        setattr(text, k, v)
    if "layer_types" in json.loads(os.environ.get("PROBE_TEXT", "{}")):
        text.num_hidden_layers = len(text.layer_types)
    print("[probe] text config", {k: getattr(text, k) for k in ("layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "num_attention_heads", "head_dim")}, flush=True)
reader_model._set_depth = _set_depth
import build_reader
build_reader.main()
