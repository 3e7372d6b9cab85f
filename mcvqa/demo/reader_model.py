"""## Reader stand-in model: a tiny Qwen-VL pre-trained until it reads its options

The demo's tiny model answers "image -> letter" and never reads the options (demo_data.py says why), so the
recipe's option tricks cannot be measured on it. This builder makes the checkpoint they need: the same tiny
architecture classes as the demo (demo_model.py: real Qwen2.5-VL / Qwen3.5 configs, tokenizer, processor and
chat template), a little deeper, pre-trained full-parameter on a separately seeded reader competition
(reader_data.py) **through the product's own prompts, collator and letter scorer**, so what it learned is the
multiple-choice format the fine-tune and the scorer use. It learns from the stored option orders, which follow
the competition's letter prior, so the saved model leans to the prior's letters (a letter-position bias), as a
real instruct model fine-tuned on real data does. The folder is saved with `save_pretrained` and loads through the
product's `from_pretrained` path like any checkpoint; `READER_MODEL.json` holds its build settings and the measured
reading.

Measured (data/reader_model/README.md; bench/results/run43-63): the learning rate decides whether it reads at all.
At 2e-3 the letter loss sat at the prior's entropy (1.32) for thousands of steps and not even the pre-training-only
`lookup` rows (which option is the named value: a string match) were learned; at 5e-4 with the lookup rows the
lookup forms first and carries over to the image types with enough rows: 5,000 steps of 32 (CPU) read 0.37 with the
options permuted (chance 0.25), continued on 2 x 16,000 new rows on an H100 (batch 128, ~250 ms a step) 0.43, then
0.57 (the committed Qwen2.5-VL), leaning to "a" on half the permuted rows. Options in random orders from the start
(`uniform_fraction`) kept the loss at ln 4. Qwen3.5 read only once attention came first as well as last
(`_set_depth`, runs 55-63): 0.48 (the committed one). On a GPU these tiny models are launch-bound: one build per GPU.
"""

import copy
import dataclasses
import json
import pathlib
import time

import numpy as np
import pandas as pd
import torch

from ..core.collate import VqaCollator, VqaDataset, identity_views, shuffled_views
from ..core.config import Config
from ..core.data import OPTION_LETTERS, load_image, read_competition_csv
from ..core.prompts import format_user_text, make_prompt_format
from ..core.scoring import answer_loss, letter_logits
from .demo_model import tiny_model_class, tiny_model_config, tiny_processor, train_tiny_tokenizer, warm_up_tiny_base
from .reader_data import (DEFAULT_LETTER_PRIOR, READER_LOOKUP_TYPE, READER_QUESTION_TYPES, READER_VALUES,
                          generate_reader_dataset, reader_texts)

READER_FAMILIES = ("qwen2_5_vl", "qwen3_5")
_READER_BUILDER_VERSION = 3


@dataclasses.dataclass
class ReaderSpec:
    """What the stand-in is built from: the same spec rebuilds the same folder (its marker makes re-runs free)."""

    family: str = "qwen2_5_vl"
    seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    image_size: int = 112  # the images are drawn this size and read whole (4x4 merged tokens for Qwen2.5-VL)
    pretrain_rows: int = 5000  # separately seeded rows: nothing from the competition the fine-tune sees
    warmup_epochs: int = 2  # first "see": (image, question) -> the answer in words (demo_model.warm_up_tiny_base)
    steps: int = 5000  # full-parameter AdamW steps of `batch_size` rows (run 50: 0.37 permuted, ~25 min on a CPU)
    batch_size: int = 32
    learning_rate: float = 5e-4  # at 2e-3 not even the lookup rows were learned (run 47)
    letter_prior: tuple = DEFAULT_LETTER_PRIOR
    # The first share of the letter steps sees every row's options in a random order (letters uniform: no prior to
    # lean on, reading is the only way down), the rest the stored, prior-following orders (the bias it keeps).
    uniform_fraction: float = 0.0
    init_from: str = ""  # a reader folder to continue from (its tokenizer and weights; no warm-up)
    # Of the pre-training rows: the lookup rows teach "the letter before the matching option" first (runs 46-52).
    question_types: tuple = READER_QUESTION_TYPES + (READER_LOOKUP_TYPE,)


def reader_prompt_config(image_size):
    """The prompt and image settings the stand-in is pre-trained with: the `demo` profile's prompt settings at the
    reader's image size (a fine-tune must pass the same min_pixels/max_pixels: bench/build_reader.py prints them)."""
    return Config(min_pixels=image_size * image_size, max_pixels=image_size * image_size,
                  max_question_tokens=64, max_option_tokens=16, num_workers=0)


def _answer_tokens(tokenizer):
    """{answer value: token count}: the builder wants each value one token (an easy match for a tiny model)."""
    return {v: len(tokenizer.encode(" " + v, add_special_tokens=False)) for v in READER_VALUES}


def _collated_batches(frame, views, processor, fmt, cfg, batch_size, device="cpu"):
    """Every batch of `views` collated once by the product's collator (and moved to `device` once): epochs then
    cost only forward/backward."""
    dataset = VqaDataset(frame, views, cfg.max_pixels)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels)
    batches = [collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
               for start in range(0, len(dataset), batch_size)]
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def _pretrain(model, batches, fmt, spec, device="cpu", uniform_batches=()):
    """Full-parameter fp32 training on the answer letter (loss over the vocabulary, as plain SFT): the first
    `spec.uniform_fraction` of the steps on `uniform_batches` (options in random orders), the rest on `batches`."""
    uniform_steps = int(spec.uniform_fraction * spec.steps) if uniform_batches else 0
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.learning_rate, total_steps=spec.steps,
                                                    pct_start=0.1)
    model.train()
    order, losses, started = [], [], time.time()
    for step in range(spec.steps):
        source = uniform_batches if step < uniform_steps else batches
        if not order or step == uniform_steps:  # a fresh pass over the batches in a new order
            order = torch.randperm(len(source), generator=generator).tolist()
        loss, _ = answer_loss(model, source[order.pop()], fmt.letter_ids, device, torch.float32, loss_over="vocab")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.detach())  # no .item(): one device sync per 100 steps, not per step
        if (step + 1) % 100 == 0:
            print(f"[reader] step {step + 1}/{spec.steps} loss {torch.stack(losses[-100:]).mean().item():.3f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def reader_letter_probs(model, processor, fmt, cfg, frame, views, batch_size=64):
    """[n_views, 4] letter probabilities of `views` (display order) from the product's letter scorer."""
    out = []
    for batch in _collated_batches(frame, views, processor, fmt, cfg, batch_size):
        out.append(torch.softmax(letter_logits(model, batch, fmt.letter_ids, "cpu", torch.float32), -1))
    return torch.cat(out).numpy()


def measure_reading(model, processor, fmt, cfg, frame, seed=0):
    """How the model reads (on the CPU: build_reader_model moves it there first): accuracy on the stored orders and
    with every row's options permuted at random (uniform answer letters: 25 % is chance), also per question type
    (`qtype` column, when present), the permuted predictions' letter rates (bias: above 25 % for the letters the
    prior favoured) and the letters' mean log-probability shift."""
    answers = np.array([OPTION_LETTERS.index(a) for a in frame["answer"]])
    stored = reader_letter_probs(model, processor, fmt, cfg, frame, identity_views(len(frame)))
    views = shuffled_views(len(frame), seed + 7, 0)
    permuted = reader_letter_probs(model, processor, fmt, cfg, frame, views)
    targets = np.array([perm.index(a) for (_, perm), a in zip(views, answers)])
    picks = permuted.argmax(1)
    logp = np.log(np.clip(permuted, 1e-9, 1))
    report = {"stored_order_acc": float((stored.argmax(1) == answers).mean()),
              "permuted_acc": float((picks == targets).mean()),
              "permuted_letter_rates": (np.bincount(picks, minlength=4) / len(picks)).round(4).tolist(),
              "permuted_mean_logprob_shift": (logp.mean(0) - logp.mean()).round(4).tolist(),
              "n_rows": int(len(frame))}
    if "qtype" in frame:
        hits = pd.Series(picks == targets, index=frame["qtype"].to_numpy())
        report["permuted_acc_by_type"] = hits.groupby(level=0).mean().round(3).to_dict()
    return report


def build_reader_model(out_dir, spec=None, eval_data_dir=None, pretrain_data_dir=None, device="cpu", seconds=None):
    """Build and save the reader stand-in into out_dir (skipped when its marker matches `spec`). Returns the
    folder. `eval_data_dir`: a reader competition whose hold-out answers measure the saved model's reading;
    `pretrain_data_dir` (default: beside out_dir) receives the separately seeded pre-training rows. `device`: where
    it trains (the committed folder was trained on a GPU: data/reader_model/README.md). `seconds`: a wall-clock
    budget for the whole build: the letter stage then runs min(spec.steps, what fits) steps, timed on a throwaway
    copy, and the marker records the steps it ran (a lent GPU's call has a hard time limit)."""
    started = time.time()
    spec = spec or ReaderSpec()
    if spec.family not in READER_FAMILIES:
        raise ValueError(f"family must be one of {READER_FAMILIES}, got {spec.family!r}")
    out_dir = pathlib.Path(out_dir)
    marker = out_dir / "READER_MODEL.json"
    wanted = {**dataclasses.asdict(spec), "letter_prior": list(spec.letter_prior), "version": _READER_BUILDER_VERSION,
              "question_types": list(spec.question_types)}
    if marker.exists() and json.loads(marker.read_text())["spec"] == wanted:
        return out_dir
    data = generate_reader_dataset(pretrain_data_dir or f"{out_dir}_pretrain_data", n_train=spec.pretrain_rows, n_test=4,
                                   image_size=spec.image_size, seed=spec.seed + 1000, letter_prior=spec.letter_prior,
                                   question_types=spec.question_types)
    cfg = reader_prompt_config(spec.image_size)
    frame = read_competition_csv(data / "train.csv", "train")
    model, processor = _new_or_continued_model(spec, frame, cfg)
    model = model.to(device)
    tokenizer = processor.tokenizer
    fmt = make_prompt_format(processor, cfg)
    # The stored orders: they carry the letter prior, which the model learns as a bias.
    batches = _collated_batches(frame, identity_views(len(frame)), processor, fmt, cfg, spec.batch_size, device)
    uniform = _collated_batches(frame, shuffled_views(len(frame), spec.seed + 3, 0), processor, fmt, cfg,
                                spec.batch_size, device) if spec.uniform_fraction else ()
    print(f"[reader] {len(frame)} rows rendered and collated ({time.time() - started:.0f} s)", flush=True)
    if spec.warmup_epochs and not spec.init_from:
        # Seeing first: trained on letters alone, a tiny model sits at the prior (loss 1.33 after 500 steps, measured):
        # matching needs perception, and perception gets no gradient before matching pays.
        warm_up_tiny_base(model, processor, _word_examples(frame, cfg), epochs=spec.warmup_epochs,
                          batch_size=spec.batch_size, seed=spec.seed, device=device)
    if seconds is not None:
        spec = dataclasses.replace(spec, steps=_steps_that_fit(model, batches, fmt, spec, device,
                                                               seconds - (time.time() - started)))
        wanted = {**wanted, "steps": spec.steps}
    _pretrain(model, batches, fmt, spec, device, uniform)
    model = model.cpu()
    report = {"spec": wanted, "pretrain_seconds": round(time.time() - started, 1), "device": str(device),
              "answer_tokens": _answer_tokens(tokenizer)}
    if eval_data_dir is not None:
        holdout = _holdout_frame(eval_data_dir)
        report["reading"] = measure_reading(model, processor, fmt, cfg, holdout, spec.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    marker.write_text(json.dumps(report, indent=2, ensure_ascii=False))  # written last: the folder is complete
    return out_dir


def _new_or_continued_model(spec, frame, cfg):
    """(model, processor): continued from `spec.init_from` (its tokenizer, processor and weights), or new: a tiny
    tokenizer trained on the pre-training texts and a model of `spec`'s family, width and depth."""
    torch.manual_seed(spec.seed)
    if spec.init_from:
        from transformers import AutoProcessor

        return tiny_model_class(spec.family).from_pretrained(spec.init_from), AutoProcessor.from_pretrained(spec.init_from)
    texts = reader_texts() + [cfg.instruction, "a. b. c. d.", "You are a helpful assistant."]
    # Whole user texts as the prompt writes them: the BPE then learns " 빨간색" (after "a.") as one token.
    texts += [format_user_text(r.question, [r.a, r.b, r.c, r.d], cfg.instruction, cfg.instruction_first)
              for r in frame.itertuples()]
    tokenizer = train_tiny_tokenizer(texts, family=spec.family)
    config = tiny_model_config(spec.family, tokenizer, spec.hidden_size)
    _set_depth(config, spec.layers)
    return tiny_model_class(spec.family)(config), tiny_processor(spec.family, tokenizer, cfg.max_pixels)


def _steps_that_fit(model, batches, fmt, spec, device, seconds, probe_steps=30, reserve=45.0):
    """Letter-stage steps that fit in `seconds` (less `reserve` for measuring and saving), at most spec.steps:
    timed on a copy of the model, so the real run's schedule and weights are untouched."""
    probe = dataclasses.replace(spec, steps=probe_steps)
    _pretrain(copy.deepcopy(model), batches, fmt, probe, device)  # warms up kernels and allocator first
    started = time.time()
    _pretrain(copy.deepcopy(model), batches, fmt, probe, device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    per_step = (time.time() - started) / probe_steps
    steps = int(min(spec.steps, max(probe_steps, (seconds - reserve) / per_step)))
    print(f"[reader] {per_step * 1000:.1f} ms a step: {steps} letter steps fit in {seconds:.0f} s", flush=True)
    return steps


def _word_examples(frame, cfg):
    """(image, question, answer words) triples for the warm-up (demo_model.warm_up_tiny_base): seeing first.
    Tried instead, worse: the question with its options answered by the right option's words and letter (a
    "copy the option" curriculum): after 1,200 letter steps its loss was 1.27 against 1.14 for this one."""
    return [(load_image(r.image_path, cfg.max_pixels), r.question, getattr(r, r.answer)) for r in frame.itertuples()]


def _set_depth(config, layers):
    """More decoder layers than the demo's 2: the option-matching circuit needs a few. Qwen3.5 gets attention
    first and last with Gated DeltaNet between (its real 3:1 mix puts attention only 4th): with attention only
    at the end the letter lookup barely formed (runs 53-56; run 57: letter loss 1.275 after 600 lookup-only steps
    against 0.978 for this layout and 1.078 for attention everywhere)."""
    text = config.get_text_config()
    if getattr(text, "layer_types", None) and "linear_attention" in text.layer_types:
        text.layer_types = (["full_attention"] + ["linear_attention"] * 2 + ["full_attention"]) * max(1, layers // 4)
        text.num_hidden_layers = len(text.layer_types)
    else:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = [text.layer_types[0]] * layers


def _holdout_frame(data_dir):
    """test.csv with its answers from test_answers.csv and question types from reader_meta.csv."""
    data_dir = pathlib.Path(data_dir)
    frame = read_competition_csv(data_dir / "test.csv", "test")
    answers = pd.read_csv(data_dir / "test_answers.csv").set_index("id")["answer"]
    qtypes = pd.read_csv(data_dir / "reader_meta.csv").set_index("id")["qtype"]
    return frame.assign(answer=frame["id"].map(answers).to_numpy(), qtype=frame["id"].map(qtypes).to_numpy())
