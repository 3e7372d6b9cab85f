"""## Replay of collated batches: the test set's inputs are built once per run

The test pass is the same in every fold: the same rows, option orders, pixel range and batch size; only
the adapter differs. With the image-feature cache on, the first fold keeps its collated batches (pixels
dropped: their features are in the cache) and later folds replay them: no image decoding, prompt
rendering or tokenizing, no data-loader start. Valid while the cache still holds every image in them.
"""

import hashlib

import pandas as pd
import torch

from ..core.collate import make_loader
from ..core.data import OPTION_LETTERS


def pass_signature(frame, order, fmt, cfg, batch_size, max_pixels):
    """What decides a pass's collated batches: the rows' text and images, the views, the prompt format,
    the pixel range and the batch size. Two passes with one signature get identical batches."""
    columns = [c for c in ("id", "image_path", "question", *OPTION_LETTERS, "answer", "image_ok") if c in frame]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes())
    digest.update(repr((order, fmt, cfg.model_name_or_path, cfg.min_pixels, max_pixels, batch_size,
                        cfg.blank_images)).encode())
    return digest.hexdigest()


class KeepingBatches:
    """Iterates a data loader and, once it is through, gives its batches without pixels to `keep`."""

    def __init__(self, loader, keep):
        self.loader, self.keep = loader, keep

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self._batches(iter(self.loader))  # iter() now: a DataLoader starts its workers here

    def _batches(self, batches):
        kept = []
        for batch in batches:
            # Copies: tensors from loader workers live in shared memory, each with an open file
            # descriptor; hundreds of kept batches would exhaust them (and a small /dev/shm).
            kept.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                         if k not in ("pixel_values", "pixel_rows")}
                        | {"pixel_values": torch.zeros(0, 0), "pixel_rows": torch.zeros(0, dtype=torch.long)})
            yield batch
        self.keep(kept)


class PassReplay:
    """Kept passes by signature; a pass is served only while `known_keys()` covers all its images."""

    def __init__(self, known_keys):
        self.known_keys = known_keys
        self.kept = {}  # pass signature -> (collated batches without pixels, their image keys)

    def keep(self, signature, batches):
        """Keep a pass's collated batches (pixels dropped: the features are cached) for an identical later pass."""
        keys = frozenset(key for batch in batches for key in batch["image_keys"])
        missing = keys - self.known_keys()  # (one listing of the disk folder, when it is on)
        if missing:
            print(f"[cache] collated batches not kept: {len(missing)} of their images are over the "
                  f"feature budget, so a later fold needs the data loader anyway")
            return
        self.kept[signature] = (batches, keys)
        size = sum(t.numel() * t.element_size() for b in batches for t in b.values() if isinstance(t, torch.Tensor))
        print(f"[cache] kept {len(batches)} collated batches ({size / 2**20:.0f} MiB): the same pass in a later "
              f"fold skips the data loader")

    def batches_for(self, signature):
        """The kept batches of this pass, if every image in them can still be served (else None)."""
        batches, keys = self.kept.get(signature, (None, frozenset()))
        return batches if batches is not None and keys <= self.known_keys() else None

    def clear(self):
        self.kept.clear()


def pass_batches(replay, frame, order, processor, fmt, cfg, *, batch_size, max_pixels, encoding, pixel_dtype):
    """A pass's batches: the ones an earlier fold kept for this very pass, else the data loader's (kept
    once it is through, for the next fold)."""
    signature = pass_signature(frame, order, fmt, cfg, batch_size, max_pixels)
    kept = replay.batches_for(signature)
    if kept is not None:
        return kept
    loader = make_loader(frame, order, processor, fmt, cfg, batch_size, max_pixels=max_pixels, encoding=encoding,
                         pixel_dtype=pixel_dtype)
    return KeepingBatches(loader, lambda batches: replay.keep(signature, batches))
