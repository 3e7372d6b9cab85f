"""## Reader stand-in model: a tiny Qwen-VL pre-trained until it reads its options

The demo's tiny model answers "image -> letter" and never reads the options (demo_data.py says why), so the
recipe's option tricks cannot be measured on it. This builder makes the checkpoint they need: the same tiny
architecture classes as the demo (demo_model.py: real Qwen2.5-VL / Qwen3.5 configs, tokenizer, processor and
chat template), a little deeper, pre-trained full-parameter on a separately seeded reader competition
(reader_data.py) **through the product's own prompts, collator and letter scorer**, so what it learned is the
multiple-choice format the fine-tune and the scorer use. It learns from the stored option orders, which follow
the competition's letter prior, so the saved model both reads its options (accuracy with the options permuted
far above 25 %) and leans to the prior's letters (a letter-position bias), as a real instruct model fine-tuned on
real data does. The folder is saved with `save_pretrained` and loads through the product's `from_pretrained`
path like any checkpoint; `READER_MODEL.json` holds its build settings and the measured reading.

Measured (data/reader_model/README.md): the default spec reads weakly (0.33 with the options permuted, chance 0.25;
best on the text-only `category` type and counts) and leans hard to "a" (92 % of its permuted picks). Trained on
letters alone a tiny model sits at the prior (loss 1.33 for 500+ steps): it must first see (the words warm-up)
and then find the lookup "the option asked for -> its letter", which it does slowly (the loss leaves the prior
after ~700 steps on 2,000 rows, ~1,500 on 5,000). A stronger reader needs more steps than a CPU build affords.
"""

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
from .reader_data import DEFAULT_LETTER_PRIOR, generate_reader_dataset, reader_texts

READER_FAMILIES = ("qwen2_5_vl", "qwen3_5")
_READER_BUILDER_VERSION = 1


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
    steps: int = 2000  # full-parameter AdamW steps of `batch_size` rows
    batch_size: int = 32
    learning_rate: float = 2e-3
    letter_prior: tuple = DEFAULT_LETTER_PRIOR


def reader_prompt_config(image_size):
    """The prompt and image settings the stand-in is pre-trained with: the `demo` profile's prompt settings at the
    reader's image size (a fine-tune must pass the same min_pixels/max_pixels: bench/build_reader.py prints them)."""
    return Config(min_pixels=image_size * image_size, max_pixels=image_size * image_size,
                  max_question_tokens=64, max_option_tokens=16, num_workers=0)


def _answer_tokens(tokenizer):
    """{answer value: token count}: the builder wants each value one token (an easy match for a tiny model)."""
    from .reader_data import READER_COLOURS, READER_COUNTS, READER_POSITIONS, READER_SHAPES

    values = list(READER_COLOURS) + list(READER_SHAPES) + list(READER_COUNTS) + list(READER_POSITIONS)
    return {v: len(tokenizer.encode(" " + v, add_special_tokens=False)) for v in values}


def _collated_batches(frame, views, processor, fmt, cfg, batch_size):
    """Every batch of `views` collated once by the product's collator: epochs then cost only forward/backward."""
    dataset = VqaDataset(frame, views, cfg.max_pixels)
    collator = VqaCollator(processor, fmt, cfg.min_pixels, cfg.max_pixels)
    return [collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)]


def _pretrain(model, batches, fmt, spec):
    """Full-parameter fp32 training on the answer letter (loss over the vocabulary, as plain SFT)."""
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.learning_rate, total_steps=spec.steps,
                                                    pct_start=0.1)
    model.train()
    order, losses, started = [], [], time.time()
    for step in range(spec.steps):
        if not order:  # a fresh pass over the batches in a new order
            order = torch.randperm(len(batches), generator=generator).tolist()
        loss, _ = answer_loss(model, batches[order.pop()], fmt.letter_ids, "cpu", torch.float32, loss_over="vocab")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"[reader] step {step + 1}/{spec.steps} loss {np.mean(losses[-100:]):.3f} "
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
    """How the model reads: accuracy on the stored orders and with every row's options permuted at random
    (uniform answer letters: 25 % is chance), the permuted predictions' letter rates (bias: above 25 % for the
    letters the prior favoured) and the letters' mean log-probability shift."""
    answers = np.array([OPTION_LETTERS.index(a) for a in frame["answer"]])
    stored = reader_letter_probs(model, processor, fmt, cfg, frame, identity_views(len(frame)))
    views = shuffled_views(len(frame), seed + 7, 0)
    permuted = reader_letter_probs(model, processor, fmt, cfg, frame, views)
    targets = np.array([perm.index(a) for (_, perm), a in zip(views, answers)])
    picks = permuted.argmax(1)
    logp = np.log(np.clip(permuted, 1e-9, 1))
    return {"stored_order_acc": float((stored.argmax(1) == answers).mean()),
            "permuted_acc": float((picks == targets).mean()),
            "permuted_letter_rates": (np.bincount(picks, minlength=4) / len(picks)).round(4).tolist(),
            "permuted_mean_logprob_shift": (logp.mean(0) - logp.mean()).round(4).tolist(),
            "n_rows": int(len(frame))}


def build_reader_model(out_dir, spec=None, eval_data_dir=None, pretrain_data_dir=None):
    """Build and save the reader stand-in into out_dir (skipped when its marker matches `spec`). Returns the
    folder. `eval_data_dir`: a reader competition whose hold-out answers measure the saved model's reading;
    `pretrain_data_dir` (default: beside out_dir) receives the separately seeded pre-training rows."""
    spec = spec or ReaderSpec()
    if spec.family not in READER_FAMILIES:
        raise ValueError(f"family must be one of {READER_FAMILIES}, got {spec.family!r}")
    out_dir = pathlib.Path(out_dir)
    marker = out_dir / "READER_MODEL.json"
    wanted = {**dataclasses.asdict(spec), "letter_prior": list(spec.letter_prior), "version": _READER_BUILDER_VERSION}
    if marker.exists() and json.loads(marker.read_text())["spec"] == wanted:
        return out_dir
    data = generate_reader_dataset(pretrain_data_dir or f"{out_dir}_pretrain_data", n_train=spec.pretrain_rows, n_test=4,
                                   image_size=spec.image_size, seed=spec.seed + 1000, letter_prior=spec.letter_prior)
    cfg = reader_prompt_config(spec.image_size)
    frame = read_competition_csv(data / "train.csv", "train")
    texts = reader_texts() + [cfg.instruction, "a. b. c. d.", "You are a helpful assistant."]
    # Whole user texts as the prompt writes them: the BPE then learns " 빨간색" (after "a.") as one token.
    texts += [format_user_text(r.question, [r.a, r.b, r.c, r.d], cfg.instruction, cfg.instruction_first)
              for r in frame.itertuples()]
    tokenizer = train_tiny_tokenizer(texts, family=spec.family)
    config = tiny_model_config(spec.family, tokenizer, spec.hidden_size)
    _set_depth(config, spec.layers)
    torch.manual_seed(spec.seed)
    model = tiny_model_class(spec.family)(config)
    processor = tiny_processor(spec.family, tokenizer, cfg.max_pixels)
    fmt = make_prompt_format(processor, cfg)
    # The stored orders: they carry the letter prior, which the model learns as a bias.
    batches = _collated_batches(frame, identity_views(len(frame)), processor, fmt, cfg, spec.batch_size)
    started = time.time()
    if spec.warmup_epochs:
        # Seeing first: trained on letters alone, a tiny model sits at the prior (loss 1.33 after 500 steps, measured):
        # matching needs perception, and perception gets no gradient before matching pays.
        warm_up_tiny_base(model, processor, _word_examples(frame, cfg), epochs=spec.warmup_epochs,
                          batch_size=spec.batch_size, seed=spec.seed)
    _pretrain(model, batches, fmt, spec)
    report = {"spec": wanted, "pretrain_seconds": round(time.time() - started, 1),
              "answer_tokens": _answer_tokens(tokenizer)}
    if eval_data_dir is not None:
        holdout = _holdout_frame(eval_data_dir)
        report["reading"] = measure_reading(model, processor, fmt, cfg, holdout, spec.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    marker.write_text(json.dumps(report, indent=2, ensure_ascii=False))  # written last: the folder is complete
    return out_dir


def _word_examples(frame, cfg):
    """(image, question, answer words) triples for the warm-up (demo_model.warm_up_tiny_base): seeing first.
    Tried instead, worse: the question with its options answered by the right option's words and letter (a
    "copy the option" curriculum): after 1,200 letter steps its loss was 1.27 against 1.14 for this one."""
    return [(load_image(r.image_path, cfg.max_pixels), r.question, getattr(r, r.answer)) for r in frame.itertuples()]


def _set_depth(config, layers):
    """More decoder layers than the demo's 2: the option-matching circuit needs a few (Qwen3.5 keeps its 3:1 mix)."""
    text = config.get_text_config()
    if getattr(text, "layer_types", None) and "linear_attention" in text.layer_types:
        text.layer_types = (["linear_attention"] * 3 + ["full_attention"]) * max(1, layers // 4)
        text.num_hidden_layers = len(text.layer_types)
    else:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = [text.layer_types[0]] * layers


def _holdout_frame(data_dir):
    """test.csv with its answers from test_answers.csv."""
    data_dir = pathlib.Path(data_dir)
    frame = read_competition_csv(data_dir / "test.csv", "test")
    answers = pd.read_csv(data_dir / "test_answers.csv").set_index("id")["answer"]
    return frame.assign(answer=frame["id"].map(answers).to_numpy())
