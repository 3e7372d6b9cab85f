"""GPU benchmark of what users run: the product's CLI with a profile's own settings on full-size models.

Each run is `python -m mcvqa run --profile <profile>` (3 folds, train -> out-of-fold -> test with the
profile's option-order TTA) on a folder of a full-size Qwen-VL architecture with random weights, saved
and loaded like a model dataset, on a synthetic competition folder (JPEGs of 500-1024 px, Korean
questions), under the memory of the card the profile targets (`gpu_memory_gib`; fp16 forced for the T4
profile). It prints per stage: train samples/s and MFU, test TTA rows/s, peak memory, the whole run's
wall time, OOM back-offs and warnings, and (`--seed N`) the seed notebook's loop and `generate` on the
same 4-bit model in the same precision. Nothing is refused here that the product would run: the
product's own checks decide.

    python bench/bench_profiles.py --prepare          # on the CPU machine: the real processors -> .bench_assets/
    python bench/bench_profiles.py --runs kaggle_t4x2:Qwen2.5-VL-3B,kaggle_t4x2:Qwen3-VL-8B,colab_a100:Qwen2.5-VL-7B
    python bench/bench_profiles.py --tiny --runs kaggle_t4x2:Qwen2.5-VL-3B   # CPU smoke test with tiny models
    python bench/bench_profiles.py --runs kaggle_t4x2:Qwen2.5-VL-3B+gate_fraction=0.1   # a run with its own settings
    python bench/bench_profiles.py --runs colab_a100:Qwen3.5-27B@bnb-4bit   # the folder saved pre-quantised (NF4)
    python bench/bench_profiles.py --tiny --runs kaggle_t4x2:Qwen3.5-4B,kaggle_t4x2:Qwen3.5-9B@bnb-4bit --n-train 24 \
        --n-test 8
    python bench/bench_profiles.py --runs kaggle_t4x2:Gemma-4-E4B,colab_a100:Gemma-4-31B@bnb-4bit   # Gemma 4
    python bench/bench_profiles.py --tiny --runs kaggle_t4x2:Gemma-4-E4B --n-train 24 --n-test 8

Gemma 4 (bench_gemma4.py) runs with the BENCH tokenizer (262,144 entries, special tokens at the real ids, a BPE
trained on the bench's Korean texts: fewer Korean tokens per sample than the real one would give) and the real
tokenizer/processor configs and template (the 31B's reconstructed), made by --prepare into .bench_assets.
transformers 5.25 on the GPU machine (it has 5.17): carry `.gpu/tf525` (transformers, huggingface_hub 2.4 and its
httpx2, tokenizers, safetensors, kernels, hf-xet as wheels), then on the machine
`pip install --no-index --no-deps --target /tmp/t525 .gpu/tf525/*.whl` and `PYTHONPATH=/tmp/t525:.gpu/site`.

Qwen3.5 needs bitsandbytes for NF4 and runs its DeltaNet layers with flash-linear-attention where importable
(`PYTHONPATH=.gpu/site:.gpu/fla`), else transformers' torch loop.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_gemma4 import GEMMA4_MODELS, prepare_gemma_assets  # noqa: E402
from bench_gpu import MODELS, matmul_peak_tflops, model_config  # noqa: E402

# What makes the H200 stand in for each profile's card (profile settings themselves are untouched).
CARD = {"kaggle_t4x2": ["gpu_memory_gib=15", "dtype=float16", "compile_vision=off"],  # a T4: 15 GiB, no bf16, no compile (auto is off below sm80)
        "colab_a100": ["gpu_memory_gib=39.5"],  # Colab's usual A100 40 GB
        "local_gpu": []}
PROCESSORS = ("Qwen2.5-VL-7B-Instruct", "Qwen3-VL-4B-Instruct", "Qwen3.5-0.8B")  # copied from ../shared/qwen_tokenizers
GEMMA_SOURCE = ROOT.parent / "shared" / "vlm_tokenizers" / "gemma-4-E2B-it"  # real files, no tokenizer.json
QUESTIONS = ["그림 속 빨간색 도형은 몇 개입니까?", "그림의 왼쪽 위에 있는 물체는 무엇입니까?",
             "이 사진에서 가장 큰 도형의 색은 무엇입니까?", "그림에 적힌 글자는 무엇입니까?",
             "파란색 원은 어느 쪽에 있습니까? 그림을 잘 보고 답하세요."]
WORDS = ["빨간색", "파란색", "초록색", "노란색", "원", "사각형", "삼각형", "별", "한 개", "두 개", "세 개", "네 개",
         "왼쪽 위", "오른쪽 아래", "가운데", "자동차", "고양이", "나무"]


def prepare(assets, source, gemma_source=GEMMA_SOURCE):
    """Copy the real processors (tokenizer, chat template, image processor configs; no weights) here, and make the
    Gemma 4 ones (bench_gemma4.prepare_gemma_assets: the bench tokenizer with the real configs)."""
    assets.mkdir(parents=True, exist_ok=True)
    for name in PROCESSORS:
        if (assets / name / "tokenizer_config.json").exists():  # copies are read-only: copying again would fail
            continue
        shutil.copytree(source / name, assets / name, dirs_exist_ok=True)
    print(f"[bench] processors copied to {assets}")
    prepare_gemma_assets(assets, gemma_source, QUESTIONS + WORDS)


def make_competition(folder, n_train, n_test, seed=0):
    """train.csv / test.csv / sample_submission.csv and JPEGs of 500-1024 px with drawn shapes."""
    import pandas as pd

    if (folder / "sample_submission.csv").exists():
        return folder
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    frames = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            w, h = (int(v) for v in rng.integers(500, 1025, size=2))
            image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(2, 8))):
                x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
                box = [x0, y0, x0 + int(rng.integers(40, w // 2)), y0 + int(rng.integers(40, h // 2))]
                fill = tuple(int(c) for c in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
            path = f"images/{split}_{i:05d}.jpg"
            image.save(folder / path, quality=90)
            options = rng.choice(WORDS, size=4, replace=False)
            row = {"id": f"{split.upper()}_{i:05d}", "path": path, "question": QUESTIONS[i % len(QUESTIONS)],
                   **dict(zip("abcd", options))}
            if split == "train":
                row["answer"] = "abcd"[int(rng.integers(0, 4))]
            rows.append(row)
        frames[split] = pd.DataFrame(rows)
        frames[split].to_csv(folder / f"{split}.csv", index=False)
    frames["test"][["id"]].assign(answer="a").to_csv(folder / "sample_submission.csv", index=False)
    return folder


PREQUANTISED = "bnb-4bit"  # profile:model@bnb-4bit: the folder saved in NF4, like unsloth/...-bnb-4bit downloads


def build_model_folder(name, assets, folder, tiny, quantise=""):
    """A full-size (or --tiny) architecture with random weights, saved like a downloaded model folder: bf16, or
    (quantise="bnb-4bit") pre-quantised NF4 + double quantisation, the bf16 weights never written to disk."""
    from transformers import AutoProcessor

    if (folder / "config.json").exists():
        return folder
    config, model_cls, processor_name = model_config(name, tiny)
    started = time.perf_counter()
    if not tiny:
        bf16 = parameter_count(config, model_cls) * 2 / 2**30
        free, total = (v / 2**30 for v in torch.cuda.mem_get_info())
        # Built whole in bf16 on the card, then (@bnb-4bit) quantised layer by layer in place: the peak is the bf16
        # model (Gemma-4-31B: ~58.5 GiB; Qwen3.5-27B ~51) plus one layer's NF4 copy, under an H100's ~79 GiB.
        print(f"[bench] {name}: building {bf16:.1f} GiB of bf16 weights on the GPU ({free:.1f} of {total:.1f} GiB "
              "free)", flush=True)
        if bf16 > free - 2:
            raise SystemExit(f"{name}: {bf16:.1f} GiB of bf16 weights do not fit the {free:.1f} GiB free on this card")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (not fp32, then cast): a 27B's 51 GiB fit an 80 GB card
    try:
        with torch.device("cpu" if tiny else "cuda"):
            model = model_cls(config).to(torch.bfloat16)
    finally:
        torch.set_default_dtype(default)
    n = sum(p.numel() for p in model.parameters())
    if quantise == PREQUANTISED:
        quantise_nf4_in_place(model, name)
    elif quantise:
        raise SystemExit(f"{name}@{quantise}: unknown; the one pre-quantised form is @{PREQUANTISED}")
    model.save_pretrained(folder, max_shard_size="4GB")
    if name in GEMMA4_MODELS:  # the asset's files as they are (the real configs, as a downloaded folder has them)
        for file in (assets / processor_name).iterdir():
            shutil.copy(file, folder / file.name)
    else:
        AutoProcessor.from_pretrained(assets / processor_name).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    print(f"[bench] {name}: {n / 1e9:.2f} B parameters, random weights{', NF4 pre-quantised' if quantise else ''}, "
          f"{size:.1f} GiB saved to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def quantise_nf4_in_place(model, name):
    """The language model's linear layers -> bitsandbytes Linear4bit (NF4, double quantisation, uint8 storage),
    where the bf16 model lies (GPU, or the CPU with --tiny), one layer at a time (its bf16 weight freed as it
    goes), and `config.quantization_config` set as transformers writes it when it quantises on load: the folder
    then loads through transformers' pre-quantised path. Which layers: every nn.Linear the loader would replace
    with these skip modules (vision tower, lm_head, the family's kbit_skip): the same modules the product quantises."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from mcvqa.families.registry import family_of

    # The product's own skip list (core/modeling.py load_base_model): towers, lm_head, the family's gates / router.
    family = family_of(model.config)
    skip = [*family.vision_modules, "lm_head", *family.kbit_skip]
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("model.language_model.")
             and n.rsplit(".", 1)[-1] not in skip]
    for module_name in names:  # by name: a list of the modules would keep every bf16 weight alive to the end
        module = model.get_submodule(module_name)
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.uint8, device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=torch.uint8, module=layer
                                         ).to(module.weight.device)  # .to() quantises
        if module.bias is not None:
            layer.bias = module.bias
        layer.requires_grad_(False)
        model.set_submodule(module_name, layer)
        del module, layer
    if not names:
        raise SystemExit(f"{name}: no linear layer of the language model found to quantise")
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=skip)
    print(f"[bench] {name}: {len(names)} linear layers of the language model quantised to NF4 in place", flush=True)


def parameter_count(config, model_cls):
    """Parameters of the architecture, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config).parameters())


def flops_per_token(name, tiny):
    """2 x the language model's matmul parameters (embeddings excluded, LM head at one position only)."""
    config, model_cls, _ = model_config(name, tiny)
    with torch.device("meta"):
        model = model_cls(config)
    lm = model.model.language_model
    return 2 * sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))


def parse_log(text):
    """The stage figures the product prints, per fold."""
    found = {"train": [], "oof": [], "test": [], "peak": [], "plan": [], "checks": []}
    for line in text.splitlines():
        if m := re.search(r"\[train\] fold (\d+): (\d+) samples \((\d+) tokens\) in ([\d.]+) s of training steps.*?, "
                          r"([\d.]+) s evaluating", line):
            found["train"].append({"fold": int(m[1]), "samples": int(m[2]), "tokens": int(m[3]), "s": float(m[4]),
                                   "eval_s": float(m[5])})
        elif m := re.search(r"\[predict\] fold (\d+) (oof|test) x1: (\d+) rows x (\d+) views in ([\d.]+) s", line):
            found[m[2]].append({"fold": int(m[1]), "rows": int(m[3]), "views": int(m[4]), "s": float(m[5])})
        elif m := re.search(r"\[memory\] fold (\d+): peak ([\d.]+) GiB allocated, ([\d.]+) GiB reserved", line):
            found["peak"].append({"fold": int(m[1]), "allocated": float(m[2]), "reserved": float(m[3])})
        elif line.startswith("[memory]"):
            found["plan"].append(line)
        elif line.startswith("[check]"):
            found["checks"].append(line)
    found["oom"] = text.count("CUDA out of memory at")
    found["warnings"] = [line for line in text.splitlines() if line.startswith("WARNING")]
    return found


def run_cli(label, profile, overrides, log_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mcvqa", "run", "--profile", profile, *overrides], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if not line.startswith(("fold ", "eval", "predict")) and "it/s]" not in line and "s/it]" not in line:
                print(f"<{label}> {line}", end="", flush=True)
        code = proc.wait()
    return code, time.perf_counter() - started, "".join(lines)


def load_like_the_product(profile, overrides):
    """(cfg, hardware, train, processor, fmt, model) as a run of the profile gets them: memory cap and plan included."""
    from mcvqa.core.config import resolve_config
    from mcvqa.core.hardware import apply_memory_cap, detect_hardware
    from mcvqa.core.memory import plan_memory
    from mcvqa.core.modeling import load_model_for_training, load_processor
    from mcvqa.pipeline import load_competition
    from mcvqa.core.prompts import make_prompt_format

    cfg = resolve_config(profile, overrides, env={}, verbose=False)
    hardware = detect_hardware(cfg, verbose=False)
    apply_memory_cap(hardware)
    cfg, _ = plan_memory(cfg, hardware, verbose=False)
    train, *_ = load_competition(cfg)
    processor = load_processor(cfg)
    return cfg, hardware, train, processor, make_prompt_format(processor, cfg), load_model_for_training(cfg, hardware)


def seed_baseline(profile, overrides, name, n):
    """The seed notebook's loop on the product's own 4-bit model and precision: batch 1 x accumulation 4, the
    causal-LM loss over the whole sequence; and its inference, one sample through `generate`."""
    from mcvqa.core.collate import VqaCollator, VqaDataset, identity_views
    from mcvqa.machinery.compat import model_input_names
    from mcvqa.core.hardware import compute_autocast
    from mcvqa.core.modeling import unwrap_vlm
    from mcvqa.core.scoring import MODEL_INPUT_KEYS

    cfg, hardware, train, processor, fmt, model = load_like_the_product(profile, overrides)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels)
    dataset = VqaDataset(train.iloc[:n], identity_views(n), cfg.max_pixels)
    batches = [collator([dataset[i]]) for i in range(n)]
    keys = model_input_names(unwrap_vlm(model).model, MODEL_INPUT_KEYS)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=hardware.use_grad_scaler)
    model.train()

    def train_loop(items):
        for i, b in enumerate(items):
            inputs = {k: b[k].to(device) for k in keys}
            with compute_autocast(hardware):
                loss = model(**inputs, labels=inputs["input_ids"]).loss / 4
            scaler.scale(loss).backward()
            if (i + 1) % 4 == 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

    train_loop(batches[:4])
    sync()
    t = time.perf_counter()
    train_loop(batches[4:])
    sync()
    train_rate = (n - 4) / (time.perf_counter() - t)
    model.eval()
    plain = [VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels)([dict(dataset[i], answer=-1)]) for i in range(n)]
    with torch.no_grad(), compute_autocast(hardware):
        sync()
        t = time.perf_counter()
        for b in plain:
            model.generate(**{k: b[k].to(device) for k in keys}, max_new_tokens=1, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
        sync()
    infer_rate = n / (time.perf_counter() - t)
    print(f"[bench] seed on {name}: train {train_rate:.2f} samples/s (batch 1 x accumulation 4, whole-sequence loss), "
          f"generate {infer_rate:.2f} samples/s (one option order)", flush=True)
    del model
    torch.cuda.empty_cache()
    return {"train_samples_per_s": train_rate, "generate_samples_per_s": infer_rate}


def summarise(label, profile, name, code, wall, found, metrics, peak_tflops, fpt, cap):
    train_s = sum(t["s"] for t in found["train"])
    samples = sum(t["samples"] for t in found["train"])
    test_s = sum(t["s"] for t in found["test"])
    test_rows = sum(t["rows"] for t in found["test"])
    views = found["test"][0]["views"] if found["test"] else 0
    train_rate = samples / train_s if train_s else float("nan")
    tokens = sum(t["tokens"] for t in found["train"]) / max(samples, 1)  # mean tokens per trained sample
    # Model FLOPs of LoRA training: forward 2N + backward 4N per token (the base's weight gradients are
    # not computed, but the input gradients are: counted as full, as MFU conventions do; checkpointing's
    # recomputation is not counted).
    mfu = train_rate * tokens * 3 * fpt / (peak_tflops * 1e12) if train_s else float("nan")
    row = {"label": label, "profile": profile, "model": name, "exit": code, "wall_s": round(wall, 1),
           "train_samples": samples, "train_s": round(train_s, 1), "train_samples_per_s": round(train_rate, 2),
           "train_mfu": round(mfu, 4), "eval_s": round(sum(t["eval_s"] for t in found["train"]), 1),
           "test_rows_per_s": round(test_rows / test_s, 2) if test_s else None, "test_views": views,
           "oof_s": round(sum(t["s"] for t in found["oof"]), 1), "test_s": round(test_s, 1),
           "peak_allocated_gib": max((p["allocated"] for p in found["peak"]), default=None),
           "peak_reserved_gib": max((p["reserved"] for p in found["peak"]), default=None), "cap_gib": cap,
           "oom_backoffs": found["oom"], "warnings": found["warnings"], "checks": found["checks"][:1],
           "memory_plan": found["plan"], "tokens_per_sample": round(tokens, 1),
           "runtime_s": (metrics or {}).get("runtime_s"), "cv_accuracy": (metrics or {}).get("cv_accuracy")}
    print(f"[bench] SUMMARY {label}: exit {code}, wall {wall:.0f} s; train {train_rate:.2f} samples/s "
          f"(MFU {100 * mfu:.1f} %); test TTA {row['test_rows_per_s']} rows/s x {views} views; peak "
          f"{row['peak_allocated_gib']} GiB allocated / {row['peak_reserved_gib']} reserved of {cap} GiB; "
          f"{found['oom']} OOM back-offs; {len(found['warnings'])} warnings", flush=True)
    return row


def parse_spec(spec):
    """profile:model[@bnb-4bit][+key=value...]: one run, with settings of its own after the profile's (e.g. the
    gate); @bnb-4bit saves the model folder pre-quantised (build_model_folder)."""
    head, *extra = spec.split("+")
    profile, model = head.split(":")
    name, _, quantise = model.partition("@")
    if name not in MODELS:
        raise SystemExit(f"{spec}: no model {name!r}; bench_gpu.MODELS has {', '.join(MODELS)}")
    return profile, name, quantise, extra


def gate_row(metrics):
    """The uncertainty gate's cost (runkit/gate.py, metrics.json), test and out-of-fold passes of all folds."""
    gate = (metrics or {}).get("gate")
    if not gate:
        return None
    keep = ("rows", "gated", "extra_views", "extra_s", "normal_views", "normal_s", "s_per_extra_view",
            "s_per_normal_view", "extra_in_single_view_passes")
    return {part: {k: cost[k] for k in keep} for part, cost in gate["cost"].items()} | {
        "oof_rows_gated": gate["oof_rows_gated"], "applied": gate["applied"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepare", action="store_true", help="copy the real processors into --assets and stop")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "qwen_tokenizers"))
    parser.add_argument("--gemma-source", default=str(GEMMA_SOURCE))
    parser.add_argument("--assets", default=str(ROOT / ".bench_assets"))
    parser.add_argument("--runs", default="kaggle_t4x2:Qwen2.5-VL-3B",
                        help="profile:model[@bnb-4bit][+key=value...],... (models: bench_gpu.MODELS)")
    parser.add_argument("--work", default="/tmp/bench_profiles")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--tag", default="", help="suffix of the log and JSON names (e.g. the transformers version)")
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-test", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="also time the seed loop and generate on N samples")
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every run")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep the model folders (disk: 7-18 GB each; Qwen3.5-27B 51 GiB in bf16, ~18 @bnb-4bit)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, no cap")
    args = parser.parse_args()
    assets = pathlib.Path(args.assets)
    if args.prepare:
        return prepare(assets, pathlib.Path(args.source), pathlib.Path(args.gemma_source))
    specs = [parse_spec(spec) for spec in args.runs.split(",")]
    missing = sorted({MODELS[name][2] for _, name, _, _ in specs} - {
        p.name for p in assets.glob("*") if (p / "tokenizer_config.json").exists()})
    if missing:
        raise SystemExit(f"{assets}: processors {missing} missing. Fix: python bench/bench_profiles.py --prepare "
                         "(copies them from ../shared/qwen_tokenizers, makes Gemma 4's from ../shared/vlm_tokenizers), "
                         "and carry .bench_assets to the GPU machine")
    import transformers

    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else torch.cuda.get_device_name(0)
    peak = 1.0 if args.tiny else matmul_peak_tflops("cuda", torch.float16)
    print(f"[bench] {device}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"fp16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    data = make_competition(work / "data", args.n_train, args.n_test)
    rows = []
    for index, (profile, name, quantise, extra) in enumerate(specs):
        suffix = "".join("-" + re.sub(r"[^A-Za-z0-9.]+", "", setting) for setting in extra)
        folder_name = name + (f"-{quantise}" if quantise else "")
        label = f"{profile}-{folder_name}{suffix}{'-' + args.tag if args.tag else ''}"
        model_dir = build_model_folder(name, assets, work / "models" / folder_name, args.tiny, quantise)
        overrides = [f"data_dir={data}", f"model_name_or_path={model_dir}", f"output_dir={work / 'runs' / label}",
                     f"submission_path={work / 'runs' / label / 'submission.csv'}", f"epochs={args.epochs}",
                     *([] if args.tiny else CARD[profile]), *args.set, *extra]
        if args.tiny:
            overrides += ["num_workers=0", "min_pixels=3136", "max_pixels=12544"]
            if name in GEMMA4_MODELS:  # Gemma's image budget is its own setting: the smallest (70 soft tokens)
                overrides += ["max_soft_tokens=70"]
        shutil.rmtree(work / "runs" / label, ignore_errors=True)
        code, wall, text = run_cli(label, profile, overrides, out / f"profile_{label}.log")
        metrics_path = work / "runs" / label / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
        plan_path = work / "runs" / label / "memory_plan.json"
        plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
        cap = plan.get("gpu_memory_gib")
        row = summarise(label, profile, name, code, wall, parse_log(text), metrics, peak, flops_per_token(name, args.tiny),
                        cap)
        row.update(transformers=transformers.__version__, device=device, plan=plan, settings=extra, gate=gate_row(metrics),
                   folder=quantise or "bf16")
        if row["gate"]:
            test = row["gate"]["test"]
            print(f"[bench] GATE {label}: test {test['gated']} of {test['rows']} row-folds gated, {test['extra_views']} "
                  f"extra views in {test['extra_s']:.1f} s = {1000 * (test['s_per_extra_view'] or 0):.1f} ms per extra "
                  f"view vs {1000 * test['s_per_normal_view']:.1f} ms per view of the normal pass "
                  f"({test['normal_views']} views in {test['normal_s']:.1f} s); "
                  f"{test['extra_in_single_view_passes']:.2f} single-view passes", flush=True)
        if args.seed and code == 0:
            row["seed"] = seed_baseline(profile, overrides, name, args.seed)
            row["train_speedup_vs_seed"] = round(row["train_samples_per_s"] / row["seed"]["train_samples_per_s"], 2)
        rows.append(row)
        (out / f"profiles{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
        later = [(n, q) for _, n, q, _ in specs[index + 1:]]
        if not args.keep_models and not args.tiny and (name, quantise) not in later:
            shutil.rmtree(model_dir, ignore_errors=True)
    print("\n| run | exit | wall s | train samples/s | MFU | test rows/s (views) | peak GiB (cap) | OOM | warnings |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['exit']} | {r['wall_s']} | {r['train_samples_per_s']} | {100 * r['train_mfu']:.1f} % | "
              f"{r['test_rows_per_s']} ({r['test_views']}) | {r['peak_allocated_gib']} ({r['cap_gib']}) | "
              f"{r['oom_backoffs']} | {len(r['warnings'])} |")


if __name__ == "__main__":
    main()
