"""## Dataset and collator: images processed in the collator, labels only on the answer letter

A *view* is a (row, option order) pair: training draws a fresh option permutation per epoch when
`shuffle_options` is on (the label follows its option), inference uses cyclic shifts for TTA. The
collator renders each prompt, lets the processor expand the image placeholders and make
`pixel_values` with the configured pixel range (the same at train and test time), appends the
answer letter and the template's end-of-turn tokens, pads on the right, and marks the one supervised
position. `answer_positions` is the position whose logits predict the letter: the scorer reads it.
"""

import numpy as np
import torch
from PIL import Image

from ..families.registry import processor_family
from .data import DEFAULT_BOMB_LIMIT_PIXELS, OPTION_LETTERS, image_transform_for, load_image
from .prompts import render_prompt

IGNORE_INDEX = -100
BLANK_IMAGE_SIZE = (224, 224)


def identity_views(n_rows):
    return [(row, (0, 1, 2, 3)) for row in range(n_rows)]


def shuffled_views(n_rows, seed, epoch):
    """One random option order per row, a pure function of (seed, epoch): resume reproduces it."""
    rng = np.random.default_rng([seed, epoch])
    return [(row, tuple(int(i) for i in rng.permutation(4))) for row in range(n_rows)]


def cyclic_perms(n_shifts):
    """TTA option orders: shift k shows original option (j + k) % 4 at display position j."""
    return [tuple((j + shift) % 4 for j in range(4)) for shift in range(n_shifts)]


class VqaDataset(torch.utils.data.Dataset):
    """Loads the image and arranges the options of one view; the collator does the rest."""

    def __init__(self, frame, views, max_pixels, blank_images=False, bomb_limit_pixels=DEFAULT_BOMB_LIMIT_PIXELS,
                 transform=None):
        self.records = frame.to_dict("records")
        self.transform = transform  # data.py's image_transform_for: None, or (image, row) -> image
        self.views = list(views)
        self.max_pixels = max_pixels
        self.blank_images = blank_images
        self.bomb_limit_pixels = bomb_limit_pixels
        self._last = (None, None)  # (row, image): a row's option views come one after another (TTA)

    def __len__(self):
        return len(self.views)

    def __getitem__(self, index):
        row, perm = self.views[index]
        record = self.records[row]
        if self.blank_images or not record.get("image_ok", True):
            # Blank control / opted-in fallback for unreadable images (counted in the run report).
            image = Image.new("RGB", BLANK_IMAGE_SIZE, (255, 255, 255))
        elif self._last[0] == row:
            image = self._last[1]  # the same decoded image for the row's next option view
        else:
            image = load_image(record["image_path"], max_pixels=self.max_pixels, bomb_limit_pixels=self.bomb_limit_pixels)
            if self.transform is not None:  # once per row: its option views see the same transformed image
                image = self.transform(image, row)
            self._last = (row, image)
        options = [record[letter] for letter in OPTION_LETTERS]
        answer = record.get("answer")
        answer = OPTION_LETTERS.index(answer) if isinstance(answer, str) and answer in OPTION_LETTERS else -1
        return {"row": row, "perm": perm, "image": image, "question": record["question"],
                "options": [options[p] for p in perm], "answer": perm.index(answer) if answer >= 0 else -1}


class VqaCollator:
    """Batch of views -> model inputs + labels + the position the scorer reads.

    `encoding` (None: the processor on every view) is an optional strategy that turns the rendered texts
    and images into `input_ids`, `pixel_values` and `image_grid_thw` another way; the image-feature cache
    gives one (speed/feature_cache.py: pixels only for images it has not seen, plus each sample's cache
    key). `pixel_dtype` casts the patches to the tower's dtype here, as the model would (half the bytes
    to move when it is bf16/fp16)."""

    def __init__(self, processor, prompt_format, min_pixels, max_pixels, encoding=None, pixel_dtype=None):
        self.processor = processor
        self.fmt = prompt_format
        self.family = processor_family(processor)
        self.image_kwargs = self.family.image_kwargs(min_pixels, max_pixels)  # Qwen's pixel range, Gemma's budget
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_token_id = processor.image_token_id
        self.encoding = encoding
        self.pixel_dtype = pixel_dtype

    def __call__(self, items):
        texts = [render_prompt(self.processor, self.fmt, it["question"], it["options"])[0] for it in items]
        if self.encoding is not None:
            enc = self.encoding(self.processor, self.image_kwargs, items, texts)
        else:
            # mm_token_type_ids are made below for every version: transformers 5.3's processor fails making
            # them from unpadded rows, and 5.0-5.2 make none. The rendered text holds every special token the
            # template wants (Gemma's `<bos>`): the tokenizer adds none of its own.
            enc = self.processor(text=texts, images=self.family.processor_images([it["image"] for it in items]),
                                 **self.image_kwargs, padding=False,
                                 return_mm_token_type_ids=False, add_special_tokens=False)
        sequences, labels, type_ids, answer_positions = [], [], [], []
        for i, item in enumerate(items):
            prompt = list(enc["input_ids"][i])
            answer_positions.append(len(prompt) - 1)
            seq_labels = [IGNORE_INDEX] * len(prompt)
            if item["answer"] >= 0:
                # The supervised token is exactly the id the scorer reads; the suffix is context only.
                prompt += [self.fmt.letter_ids[item["answer"]]] + self.fmt.suffix_ids
                seq_labels += [self.fmt.letter_ids[item["answer"]]] + [IGNORE_INDEX] * len(self.fmt.suffix_ids)
            sequences.append(prompt)
            labels.append(seq_labels)
            type_ids.append([1 if t == self.image_token_id else 0 for t in prompt])  # 1: image token, 0: text
        width = max(len(s) for s in sequences)

        def pad(rows, value):
            return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        batch = {
            "input_ids": pad(sequences, self.pad_id),
            "attention_mask": pad([[1] * len(s) for s in sequences], 0),
            "mm_token_type_ids": pad(type_ids, 0),
            "pixel_values": enc["pixel_values"] if self.pixel_dtype is None else enc["pixel_values"].to(self.pixel_dtype),
            "labels": pad(labels, IGNORE_INDEX),
            "answer_positions": torch.tensor(answer_positions, dtype=torch.long),
            "answer_index": torch.tensor([it["answer"] for it in items], dtype=torch.long),
            "rows": torch.tensor([it["row"] for it in items], dtype=torch.long),
            "perms": torch.tensor([it["perm"] for it in items], dtype=torch.long),
        }
        for key in ("image_grid_thw", "image_position_ids", "image_keys", "pixel_rows"):  # (Gemma's: its positions)
            if key in enc:
                batch[key] = enc[key]
        return batch


# Batch entries that hold one row (Qwen: one patch row) per shipped image rather than one per sample.
PIXEL_KEYS = ("pixel_values", "pixel_rows", "image_position_ids")


def pixel_spans(batch):
    """[(sample, start, end)] in pixel order: the rows of pixel_values that belong to each shipped image (Qwen:
    its grid's patches; Gemma: one row, padded to the budget). Feature-cache batches ship the samples in
    `pixel_rows` only; other batches every sample."""
    n = batch["input_ids"].shape[0]
    sizes = batch["image_grid_thw"].prod(dim=1).tolist() if "image_grid_thw" in batch else [1] * n
    rows = batch["pixel_rows"].tolist() if "pixel_rows" in batch else range(n)
    spans, start = [], 0
    for row in rows:
        spans.append((row, start, start + sizes[row]))
        start += sizes[row]
    return spans


def slice_rows(batch, start, stop):
    """Samples [start, stop) of a collated batch (each image's patch rows of pixel_values follow its sample)."""
    part = {k: v[start:stop] for k, v in batch.items() if k not in PIXEL_KEYS}
    if "pixel_values" not in batch:  # cached image features were attached instead
        return part
    keep, spans = [], []
    for row, begin, end in pixel_spans(batch):
        if start <= row < stop:
            keep.append(row - start)
            spans.append((begin, end))
    for key in ("pixel_values", "image_position_ids"):
        if key in batch:
            part[key] = torch.cat([batch[key][a:b] for a, b in spans]) if spans else batch[key][:0]
    if "pixel_rows" in batch:
        part["pixel_rows"] = torch.tensor(keep, dtype=torch.long)
    return part


def micro_batches(batch, size):
    """A collated batch in consecutive chunks of at most `size` samples (images' patch rows follow their samples).
    One chunk is the batch itself: no copy of its pixels on the common path."""
    n = batch["input_ids"].shape[0]
    if size >= n:
        return [batch]
    return [slice_rows(batch, start, min(start + size, n)) for start in range(0, n, size)]


def make_loader(frame, views, processor, fmt, cfg, batch_size, *, max_pixels=None, workers=None, encoding=None,
                pixel_dtype=None, split="test", seed=()):
    """DataLoader of collated views in the given order. `encoding`: the collator's optional encoding
    strategy (the image-feature cache's: no pixels for images it holds). split ("train" | "test") and seed (e.g.
    fold, epoch) choose the image transform (data.py, image_transform_for)."""
    max_pixels = max_pixels or pixel_cap(processor, cfg)
    dataset = VqaDataset(frame, views, max_pixels, blank_images=cfg.blank_images, bomb_limit_pixels=cfg.bomb_limit_pixels,
                         transform=image_transform_for(cfg, split, seed))
    collator = VqaCollator(processor, fmt, cfg.min_pixels, max_pixels, encoding=encoding, pixel_dtype=pixel_dtype)
    workers = cfg.num_workers if workers is None else workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator,
                                       num_workers=workers, persistent_workers=False,
                                       pin_memory=cfg.pin_memory and torch.cuda.is_available())


def pixel_cap(processor, cfg, scale=1.0):
    """The pixels an image is decoded within for a view at `scale`: max_pixels (Qwen), or Gemma 4's token budget in
    pixels (max_soft_tokens x 48²)."""
    return processor_family(processor).pixel_cap(cfg, scale)


def loader_encoding(feature_cache, dedupe_images=False):
    """The encoding strategy of a loader for this cache (None: the processor on every view). dedupe_images:
    the views of one image in a batch share its pixels (not for training batches: DDP splits those by sample)."""
    return None if feature_cache is None else feature_cache.encoding(dedupe_images)


def show_example(frame, processor, fmt, cfg, row=0):
    """One training view as the model sees it: the rendered prompt (image placeholders collapsed) and the
    label mask, which keeps exactly one position: the answer letter, the very token id the scorer reads."""
    max_pixels = pixel_cap(processor, cfg)
    dataset = VqaDataset(frame, identity_views(len(frame)), max_pixels, blank_images=cfg.blank_images,
                         bomb_limit_pixels=cfg.bomb_limit_pixels)
    batch = VqaCollator(processor, fmt, cfg.min_pixels, max_pixels)([dataset[row]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    image_tokens = sum(t == processor.image_token_id for t in ids)
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    text = text.replace(processor.image_token * image_tokens, f"{processor.image_token} x {image_tokens}")
    print(text)
    position = supervised[0]
    print(f"[dataset] {len(ids)} tokens, {image_tokens} of them image tokens; the label mask keeps position {position} "
          f"only: token id {ids[position]} ({processor.tokenizer.decode([ids[position]])!r}, answer "
          f"{frame['answer'].iloc[row]!r}), predicted from position {int(batch['answer_positions'][0])}")
    return {"tokens": len(ids), "image_tokens": image_tokens, "supervised_positions": supervised,
            "label_id": ids[position], "answer_position": int(batch["answer_positions"][0])}
