"""Shared fixtures: the real Qwen-VL processors (no weights) and tiny Qwen-VL checkpoints built locally.

Everything here is session-scoped and cached: each tiny model is built once (no warm-up, ~0.1 s) and
loaded once per (family, 4-bit or not), so the model tests stay fast on a CPU.
"""

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import transformers

from mcvqa.core.config import Config, resolve_config
from mcvqa.demo.demo_model import build_tiny_qwen_vl
from mcvqa.core.hardware import choose_hardware
from mcvqa.core.modeling import load_model_for_training, load_processor
from mcvqa.core.prompts import make_prompt_format

# Qwen3.5 exists from transformers 5.2 (CI also runs a subset on 5.0): its tests run where the release has it.
HAS_QWEN3_5 = hasattr(transformers, "Qwen3_5ForConditionalGeneration")
REAL_PROCESSOR_NAMES = ("Qwen2.5-VL-7B-Instruct", "Qwen2-VL-2B-Instruct", "Qwen3-VL-4B-Instruct") + \
    (("Qwen3.5-0.8B",) if HAS_QWEN3_5 else ())
TINY_FAMILIES = ("qwen2_5_vl", "qwen3_vl") + (("qwen3_5",) if HAS_QWEN3_5 else ())
HAS_GEMMA4 = hasattr(transformers, "Gemma4ForConditionalGeneration")
# The families the shared scoring, feature-cache and shared-prefix tests run for (Gemma 4: not ChatML, its own
# image layout; its own tests are in test_gemma4.py).
PIPELINE_FAMILIES = TINY_FAMILIES + (("gemma4",) if HAS_GEMMA4 else ())
# The real processor whose chat template the tiny template of each family reproduces.
REAL_FOR_FAMILY = {"qwen2_5_vl": ("Qwen2.5-VL-7B-Instruct", "Qwen2-VL-2B-Instruct"),
                   "qwen3_vl": ("Qwen3-VL-4B-Instruct",), "qwen3_5": ("Qwen3.5-0.8B",)}

# Demo-like Korean strings (questions, option words) the tiny tokenizer is trained on, as the demo does.
TINY_TEXTS = [
    "그림 속 도형은 무슨 색입니까?", "그림 속 도형의 모양은 무엇입니까?", "그림에 도형이 몇 개 있습니까?",
    "도형은 그림의 어느 부분에 있습니까?",
    "빨간색", "파란색", "초록색", "노란색", "보라색", "주황색",
    "원", "사각형", "삼각형", "십자가", "마름모", "별",
    "1개", "2개", "3개", "4개", "왼쪽 위", "오른쪽 위", "왼쪽 아래", "오른쪽 아래",
    Config().instruction, "a. b. c. d.", "You are a helpful assistant.",
]
LORA_INIT_SEED = 1234
LORA_INIT_STD = 0.02


def _qwen_tokenizers_root():
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "qwen_tokenizers"]
    if os.environ.get("QWEN_TOKENIZERS_DIR"):
        candidates.append(Path(os.environ["QWEN_TOKENIZERS_DIR"]))
    for path in candidates:
        if all((path / name).is_dir() for name in REAL_PROCESSOR_NAMES):
            return path
    return None


def demo_config(**changes):
    """The demo profile, isolated from MCVQA_* variables of the calling environment.

    (resolve_config treats every MCVQA_* variable as a config override and rejects unknown ones, so
    e.g. QWEN_TOKENIZERS_DIR must not reach it.)"""
    return dataclasses.replace(resolve_config("demo", verbose=False, env={}), **changes)


@pytest.fixture(scope="module")
def torch_single_thread():
    """The tiny models gain nothing from intra-op threads, and OpenMP threads spinning against another
    busy process on a 2-core CI box made these tests ~40x slower: run them single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_tokenizers_dir():
    root = _qwen_tokenizers_root()
    if root is None:
        pytest.skip("real Qwen tokenizers not found: expected ../shared/qwen_tokenizers beside the repo "
                    "(with " + ", ".join(REAL_PROCESSOR_NAMES) + ") or QWEN_TOKENIZERS_DIR=<folder>")
    return root


@pytest.fixture(scope="session")
def real_processor(qwen_tokenizers_dir):
    """Factory: real_processor(name) -> AutoProcessor of that real checkpoint folder (cached)."""
    from transformers import AutoProcessor

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = AutoProcessor.from_pretrained(qwen_tokenizers_dir / name, local_files_only=True)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hardware():
    return choose_hardware([], flash_attn_installed=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(family) -> folder of a tiny Qwen-VL checkpoint (built once, no warm-up)."""
    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{family}")
            cache[family] = build_tiny_qwen_vl(out, TINY_TEXTS, family=family, seed=0, max_pixels=112 * 112)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_cfg(tiny_model_dir):
    """Factory: tiny_cfg(family, **changes) -> demo config pointing at the tiny model of family."""

    def get(family, **changes):
        return demo_config(model_name_or_path=str(tiny_model_dir(family)), **changes)

    return get


@pytest.fixture(scope="session")
def tiny_processor(tiny_cfg):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_processor(tiny_cfg(family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_fmt(tiny_processor, tiny_cfg):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_prompt_format(tiny_processor(family), tiny_cfg(family))
        return cache[family]

    return get


def randomise_lora(model, seed=LORA_INIT_SEED, std=LORA_INIT_STD):
    """LoRA B starts at zero (adapter = identity); random A and B make the adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.normal_(0.0, std, generator=generator)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg, hardware):
    """Factory: tiny_model(family, load_in_4bit=True) -> fp32 CPU PeftModel with random LoRA, eval mode.

    Shared by many tests: tests must not change its weights."""
    cache = {}

    def get(family, load_in_4bit=True):
        key = (family, load_in_4bit)
        if key not in cache:
            model = load_model_for_training(tiny_cfg(family, quantization="nf4" if load_in_4bit else "none"), hardware)
            cache[key] = randomise_lora(model).eval()
        return cache[key]

    return get
