"""## 5. Dataset and collator: images processed in the collator, labels only on the answer letter

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
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from .data import DEFAULT_BOMB_LIMIT_PIXELS, load_image
from .feature_cache import image_key
from .prompts import OPTION_LETTERS, render_prompt

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


def cyclic_views(n_rows, n_shifts):
    """TTA views, shift by shift: every row in order k = 0, then every row in order k = 1, ..."""
    return [(row, perm) for perm in cyclic_perms(n_shifts) for row in range(n_rows)]


class VqaDataset(torch.utils.data.Dataset):
    """Loads the image and arranges the options of one view; the collator does the rest."""

    def __init__(self, frame, views, max_pixels, blank_images=False, bomb_limit_pixels=DEFAULT_BOMB_LIMIT_PIXELS):
        self.records = frame.to_dict("records")
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
            self._last = (row, image)
        options = [record[letter] for letter in OPTION_LETTERS]
        answer = record.get("answer")
        answer = OPTION_LETTERS.index(answer) if isinstance(answer, str) and answer in OPTION_LETTERS else -1
        return {"row": row, "perm": perm, "image": image, "question": record["question"],
                "options": [options[p] for p in perm], "answer": perm.index(answer) if answer >= 0 else -1}


class VqaCollator:
    """Batch of views -> model inputs + labels + the position the scorer reads.

    With `image_keys` (the feature cache is on) the batch also carries each sample's cache key, and
    `pixel_values` holds only the images the tower still has to see: those in `pixel_rows` (sample
    indices, one per image, in pixel order). Images whose key is in `known_keys` (cached when the
    loader was made) get no pixels, and with `dedupe_images` the option views of one image in a batch
    share one copy. The image processor then runs once per new image instead of once per view, and
    the workers ship a fraction of the fp32 patches. `pixel_dtype` casts the patches to the tower's
    dtype here, as the model would (half the bytes to move when it is bf16/fp16)."""

    def __init__(self, processor, prompt_format, min_pixels, max_pixels, image_keys=False, known_keys=(),
                 dedupe_images=False, pixel_dtype=None):
        self.processor = processor
        self.fmt = prompt_format
        self.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_token_id = processor.image_token_id
        # image_keys: add each sample's feature-cache key, in order. Only keys: the cache lives in the
        # main process (data-loader workers are separate processes), where FeatureCache.attach swaps
        # pixel_values for the cached features.
        self.image_keys = image_keys
        self.known_keys = frozenset(known_keys)
        self.dedupe_images = dedupe_images
        self.pixel_dtype = pixel_dtype

    def image_grid(self, image):
        """[1, h, w] patch grid the image processor gives this image (its resize rule), without resizing it."""
        ip = self.processor.image_processor
        height, width = smart_resize(image.height, image.width, factor=ip.patch_size * ip.merge_size,
                                     min_pixels=self.size["shortest_edge"], max_pixels=self.size["longest_edge"])
        return torch.tensor([1, height // ip.patch_size, width // ip.patch_size])

    def encode_for_cache(self, items, texts):
        """The processor's output, with pixels only for images not known to the cache (one per image
        with dedupe_images), and each sample's key. Equal to `processor(text, images)` on the rest (tested)."""
        by_object = {}  # the option views of a row share one decoded image object: hash it once
        for it in items:
            if id(it["image"]) not in by_object:
                by_object[id(it["image"])] = image_key(it["image"], self.size["shortest_edge"], self.size["longest_edge"])
        keys = [by_object[id(it["image"])] for it in items]
        pixel_rows, seen = [], set()
        for i, key in enumerate(keys):
            if key in self.known_keys or (self.dedupe_images and key in seen):
                continue
            seen.add(key)
            pixel_rows.append(i)
        grids = {}
        pixel_values = torch.zeros(0, 0)
        if pixel_rows:
            out = self.processor.image_processor(images=[items[i]["image"] for i in pixel_rows], size=self.size,
                                                 return_tensors="pt")
            pixel_values = out["pixel_values"]
            grids = {keys[i]: grid for i, grid in zip(pixel_rows, out["image_grid_thw"])}
        grid_thw = torch.stack([grids[k] if k in grids else self.image_grid(it["image"]) for k, it in zip(keys, items)])
        # What the processor does to the text: each image placeholder becomes one token per merged patch.
        image_token, merge = self.processor.image_token, self.processor.image_processor.merge_size ** 2
        expanded = [text.replace(image_token, image_token * int(grid.prod() // merge), 1)
                    for text, grid in zip(texts, grid_thw)]
        input_ids = self.processor.tokenizer(expanded, padding=False)["input_ids"]
        return {"input_ids": input_ids, "pixel_values": pixel_values,
                "image_grid_thw": grid_thw, "pixel_rows": torch.tensor(pixel_rows, dtype=torch.long), "image_keys": keys}

    def __call__(self, items):
        texts = [render_prompt(self.processor, self.fmt, it["question"], it["options"])[0] for it in items]
        if self.image_keys:
            enc = self.encode_for_cache(items, texts)
        else:
            # mm_token_type_ids are made below for every version: transformers 5.3's processor fails making
            # them from unpadded rows, and 5.0-5.2 make none.
            enc = self.processor(text=texts, images=[it["image"] for it in items], size=self.size, padding=False,
                                 return_mm_token_type_ids=False)
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
            "image_grid_thw": enc["image_grid_thw"],
            "labels": pad(labels, IGNORE_INDEX),
            "answer_positions": torch.tensor(answer_positions, dtype=torch.long),
            "answer_index": torch.tensor([it["answer"] for it in items], dtype=torch.long),
            "rows": torch.tensor([it["row"] for it in items], dtype=torch.long),
            "perms": torch.tensor([it["perm"] for it in items], dtype=torch.long),
        }
        if self.image_keys:
            batch["image_keys"] = enc["image_keys"]
            batch["pixel_rows"] = enc["pixel_rows"]
        return batch
