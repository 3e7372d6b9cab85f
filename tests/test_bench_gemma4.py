"""The bench's Gemma 4 pieces (bench/bench_gemma4.py): E2B's sizes equal the real config.json, the bench tokenizer
has the real vocabulary size and special ids, the assets load as the product loads a processor."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "vlm_tokenizers" / "gemma-4-E2B-it"
sys.path.insert(0, str(ROOT / "bench"))
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4Config"):
    pytest.skip("this transformers has no Gemma 4", allow_module_level=True)
pytestmark = pytest.mark.skipif(not (SHARED / "config.json").exists(), reason="../shared Gemma 4 files absent")

import bench_gemma4 as bg  # noqa: E402


def test_e2b_sizes_are_the_real_config():
    real = transformers.AutoConfig.from_pretrained(SHARED)
    ours = transformers.Gemma4Config(**bg.gemma4_sizes("Gemma-4-E2B"))
    for part in ("text_config", "vision_config", "audio_config"):
        a, b = getattr(real, part).to_dict(), getattr(ours, part).to_dict()
        for key in set(a) - {"dtype", "_name_or_path", "transformers_version", "architectures"}:
            assert a[key] == b.get(key), (part, key, a[key], b.get(key))
    for key in bg.MODEL_IDS:
        assert getattr(real, key) == getattr(ours, key), key


def test_assets_load_with_real_ids(tmp_path):
    bg.prepare_gemma_assets(tmp_path, SHARED, ["그림 속 빨간색 도형은 몇 개입니까?", "파란색", "두 개"])
    e4b = bg.check_processor(tmp_path / bg.ASSET_E4B)  # ids, <bos>, single letters after the header
    b31 = bg.check_processor(tmp_path / bg.ASSET_31B)
    prompt = b31.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "?"}]}],
                                     add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert prompt.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert (tmp_path / bg.ASSET_E4B / "tokenizer_config.json").read_bytes() == (SHARED / "tokenizer_config.json").read_bytes()
    vocab = json.loads((tmp_path / bg.ASSET_E4B / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == bg.VOCAB_SIZE and vocab["\n"] == 107
    ids = e4b.tokenizer.encode("그림 속 빨간색 도형은", add_special_tokens=False)
    assert all(i < 2000 for i in ids) and e4b.tokenizer.decode(ids) == "그림 속 빨간색 도형은"
