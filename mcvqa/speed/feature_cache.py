"""## Image-feature cache: each image goes through the vision tower once per run

The vision tower is frozen (LoRA is on the language model only), so its output for an image (for
Qwen3-VL also the deepstack features it injects into early decoder layers) depends only on the image,
the pixel range and the tower's precision. A run shows every image many times: each training image in
two folds' training and one fold's validation, every epoch, and every test image under 4 option views
in 3 folds. The cache encodes each image the first time it is seen and afterwards the language model
gets the stored features in place of the image tokens' embeddings (its family's `decoder_forward`, on every
supported transformers version: compat.py). `image_grid_thw` and the `<|image_pad|>` tokens stay in the
batch, so the multimodal rope positions (`get_rope_index`) are computed exactly as before.

The key is a hash of the decoded image's pixels and the pixel range; the cache itself belongs to one
(model, tower dtype, precision) namespace. Features live on the CPU (moved to the GPU per batch) or,
on GPUs with memory to spare, on the GPU, within a budget; optionally also on disk under the run
folder, so a restarted Kaggle session reuses them. The cache is the speed wing's face to the core
stages: its encoding strategy for the collator (`encoding`), the features for a batch (`attach`), the
scorer of a row's option orders (`view_scorer`, shared_prefix.py) and the replay of an identical later
pass (`pass_batches`, replay.py). It turns itself off, and says so, when the tower has trainable weights
or images are augmented: then the features would change from one view to the next.
"""

import contextlib
import dataclasses
import hashlib
import pathlib

import torch
from ..core.collate import pixel_spans
from ..core.config import ConfigError
from ..core.modeling import frozen_towers, tower_device, tower_dtype, unwrap_vlm
from ..families.registry import family_of, processor_family
from ..machinery.files import atomic_write
from .replay import PassReplay, pass_batches
from .shared_prefix import SharedPrefixScorer


@dataclasses.dataclass
class ImageFeatures:
    """The tower's output for one image, on the CPU, exactly as the tower returned it."""

    embeds: torch.Tensor  # [image tokens, text hidden size]
    deepstack: tuple = ()  # Qwen3-VL: one [image tokens, text hidden size] tensor per deepstack layer

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))


def image_key(image, image_kwargs):
    """Content hash of a decoded PIL image plus the processor's size arguments that decide its patches.

    Hashing the pixels (not the path) also covers blank fallback images and files copied under
    other names; it costs ~0.4 ms for a 384x384 image and runs in the data-loader workers."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}|{image.size}|{sorted(image_kwargs.items())}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class CachedImageEncoding:
    """The collator's encoding strategy while the cache is on (core/collate.py's `encoding`).

    The batch carries each sample's cache key, and `pixel_values` holds only the images the tower still
    has to see: those in `pixel_rows` (sample indices, one per image, in pixel order). Images whose key
    is in `known_keys` (cached when the loader was made) get no pixels, and with `dedupe_images` the
    option views of one image in a batch share one copy. The image processor then runs once per new
    image instead of once per view, and the workers ship a fraction of the fp32 patches. Only keys
    travel: the cache lives in the main process (data-loader workers are separate processes), where
    FeatureCache.attach swaps pixel_values for the cached features."""

    def __init__(self, known_keys=(), dedupe_images=False):
        self.known_keys = frozenset(known_keys)
        self.dedupe_images = dedupe_images

    def __call__(self, processor, image_kwargs, items, texts):
        """The processor's output, with pixels only for images not known to the cache (one per image
        with dedupe_images), and each sample's key. Equal to `processor(text, images)` on the rest (tested)."""
        family = processor_family(processor)
        by_object = {}  # the option views of a row share one decoded image object: hash it once
        for it in items:
            if id(it["image"]) not in by_object:
                by_object[id(it["image"])] = image_key(it["image"], image_kwargs)
        keys = [by_object[id(it["image"])] for it in items]
        pixel_rows, seen = [], set()
        for i, key in enumerate(keys):
            if key in self.known_keys or (self.dedupe_images and key in seen):
                continue
            seen.add(key)
            pixel_rows.append(i)
        shipped, out = {}, {"pixel_values": torch.zeros(0, 0)}
        if pixel_rows:
            out = processor.image_processor(images=[items[i]["image"] for i in pixel_rows], **image_kwargs,
                                            return_tensors="pt")
            shipped = {keys[i]: tokens for i, tokens in zip(pixel_rows, family.shipped_tokens(processor, out))}
        tokens = [shipped[k] if k in shipped else family.image_tokens(processor, image_kwargs, it["image"])
                  for k, it in zip(keys, items)]
        # What the processor does to the text: the image placeholder becomes the image's tokens.
        expanded = [family.expand_image(processor, text, n) for text, (n, _) in zip(texts, tokens)]
        input_ids = processor.tokenizer(expanded, padding=False, add_special_tokens=False)["input_ids"]
        enc = {"input_ids": input_ids, "pixel_values": out["pixel_values"],
               "pixel_rows": torch.tensor(pixel_rows, dtype=torch.long), "image_keys": keys}
        if family.meta_per_sample:  # (Qwen: each sample's grid, cached or not: the rope positions need it)
            enc[family.image_meta] = torch.stack([meta for _, meta in tokens])
        elif pixel_rows:
            enc[family.image_meta] = out[family.image_meta]
        return enc


def vision_is_trainable(model):
    return any(p.requires_grad for tower in frozen_towers(model) for p in tower.parameters())


def cache_blockers(model, cfg):
    """Why the features of an image could change between views (empty list: caching is exact)."""
    reasons = []
    if vision_is_trainable(model):
        reasons.append("the vision tower has trainable parameters")
    if cfg.image_transform != "none":  # declared in the settings (data.py): a view's image is not the cached one
        reasons.append(f"images are transformed (image_transform={cfg.image_transform}, on {cfg.image_transform_on})")
    vlm = unwrap_vlm(model)
    problem = family_of(vlm.config).cached_features_problem(vlm.model)
    if problem:
        reasons.append(problem)
    return reasons


class FeatureCache:
    """Vision-tower outputs by image key; `attach` swaps a batch's pixel_values for cached features."""

    def __init__(self, namespace="", fp32=False, max_bytes=12 * 2**30, disk_dir=None, device="cpu"):
        self.namespace = namespace
        self.fp32 = fp32  # encode with autocast off: the tower's own dtype (fp32 on T4)
        self.max_bytes = max_bytes
        # Where the features are kept: the CPU (a batch's are copied to the GPU when used), or the GPU
        # (no copies at all, for cards with memory to spare).
        self.device = torch.device(device)
        self.disk_dir = pathlib.Path(disk_dir) if disk_dir else None
        if self.disk_dir:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.store = {}
        self.bytes = 0
        self.hits = self.misses = self.encoded = self.disk_reads = 0
        self.replay = PassReplay(self.known_keys)  # the test set's collated batches, for later folds

    def __len__(self):
        return len(self.store)

    def summary(self):
        return (f"{self.encoded} images encoded, {self.hits} lookups served from the cache "
                f"({self.disk_reads} from disk), {len(self.store)} in RAM ({self.bytes / 2**30:.2f} GiB)")

    def encoding(self, dedupe_images=False):
        """The collator's encoding strategy for a loader made now: no pixels for the images held already."""
        return CachedImageEncoding(self.known_keys(), dedupe_images)

    def known_keys(self):
        """Keys whose features can be served without pixels (RAM, or disk when on): the loader skips their images."""
        keys = set(self.store)
        if self.disk_dir:
            keys.update(path.stem for path in self.disk_dir.glob("*.pt"))
        return frozenset(keys)

    def _disk_path(self, key):
        return self.disk_dir / f"{key}.pt"

    def _get(self, key):
        if key in self.store:
            return self.store[key]
        if self.disk_dir and self._disk_path(key).exists():
            saved = torch.load(self._disk_path(key), weights_only=True, map_location=self.device)
            self.disk_reads += 1
            return self._keep(key, ImageFeatures(saved["embeds"], tuple(saved["deepstack"])), write=False)
        return None

    def _keep(self, key, features, write=True):
        """RAM while the budget lasts; disk (write-through) when enabled; else recomputed next time."""
        if self.bytes + features.nbytes <= self.max_bytes:
            self.store[key] = features
            self.bytes += features.nbytes
        if write and self.disk_dir:
            # Whole or not at all: a killed session leaves no half-written file.
            atomic_write(self._disk_path(key), lambda tmp: torch.save({"embeds": features.embeds,
                                                                      "deepstack": list(features.deepstack)}, tmp))
        return features

    def _precision(self, device):
        if self.fp32:
            # The frozen tower then computes in its own weights' dtype (fp32 on T4: modeling.add_lora).
            return torch.autocast(device.type, enabled=False)
        return contextlib.nullcontext()  # the caller's autocast, exactly as the uncached forward

    @torch.no_grad()
    def encode(self, model, pixel_values, meta):
        """Run the frozen tower on the images of (pixel_values, meta: Qwen's grid, Gemma's patch positions): one
        ImageFeatures each, on the CPU."""
        vlm = unwrap_vlm(model)
        device = tower_device(model)
        with self._precision(device):
            embeds, deepstack = family_of(vlm.config).encode_images(vlm.model, pixel_values.to(device, non_blocking=True),
                                                                    meta.to(device))
        # copy=True: each image's features are views into one tensor of the whole call; kept as views they
        # would hold (and torch.save would write) that whole tensor when it is already on self.device.
        return [ImageFeatures(image.to(self.device, copy=True), tuple(layer[i].to(self.device, copy=True)
                                                                      for layer in deepstack))
                for i, image in enumerate(embeds)]

    def attach(self, model, batch, max_images=64):
        """The batch with `image_features` (one per sample, in order) instead of `pixel_values`.

        Images not cached yet are encoded together, up to `max_images` per tower call, each once even
        when several views of it are in the batch. Needs the collator's `image_keys` (one image per
        sample) and `pixel_rows` (which samples' pixels `pixel_values` holds; all when absent)."""
        keys = batch["image_keys"]
        if len(keys) != batch["input_ids"].shape[0]:
            raise ValueError(f"feature cache: {len(keys)} image keys for {batch['input_ids'].shape[0]} samples (one image "
                             "per sample expected)")
        family = family_of(unwrap_vlm(model).config)
        found = {}
        for key in keys:
            if key not in found:
                found[key] = self._get(key)
        missing = [k for k, f in found.items() if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            pixels_of = self._pixel_slices(batch)
            unknown = [k for k in missing if k not in pixels_of]
            if unknown:
                raise RuntimeError(f"feature cache: {len(unknown)} image(s) of this batch have neither cached features "
                                   "nor pixels (the loader was told they were cached; was the cache cleared?)")
            for i in range(0, len(missing), max_images):
                chunk = missing[i:i + max_images]
                spans = [pixels_of[k] for k in chunk]
                pixels = _gather(batch["pixel_values"], spans)
                # Qwen's grid is per sample; Gemma's patch positions travel row for row with the pixels.
                meta = batch[family.image_meta][[pixels_of[k][2] for k in chunk]] if family.meta_per_sample \
                    else _gather(batch[family.image_meta], spans)
                for key, features in zip(chunk, self.encode(model, pixels, meta)):
                    found[key] = self._keep(key, features)
                    self.encoded += 1
        out = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_rows", "image_position_ids")}
        out["image_features"] = [found[k] for k in keys]
        return out

    def pass_batches(self, frame, order, processor, fmt, cfg, *, batch_size, max_pixels, pixel_dtype):
        """A prediction pass's batches, replayed from an earlier fold when it made the very same pass (replay.py)."""
        return pass_batches(self.replay, frame, order, processor, fmt, cfg, batch_size=batch_size, max_pixels=max_pixels,
                            encoding=self.encoding(dedupe_images=True), pixel_dtype=pixel_dtype)

    def view_scorer(self, n_views, hardware, desc="predict"):
        """The scorer of a pass whose rows bring n_views option orders each: one shared prefix per row."""
        return SharedPrefixScorer(n_views, hardware, desc)

    @staticmethod
    def _pixel_slices(batch):
        """{key: (start, end, sample)}: where each shipped image's patch rows are in pixel_values."""
        slices = {}
        for row, start, end in pixel_spans(batch):
            slices.setdefault(batch["image_keys"][row], (start, end, row))
        return slices


def _gather(tensor, spans):
    """The rows [start, end) of each span, in order: a view when they are consecutive, else a copy."""
    if all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return tensor[spans[0][0]:spans[-1][1]]
    return torch.cat([tensor[a:b] for a, b, _ in spans])


def make_feature_cache(cfg, model, hardware, reuse=None, verbose=True):
    """A FeatureCache for this model, or None (printed with the reason) where caching would not be exact.

    `reuse`: an earlier fold's cache, returned as is when it holds features of the same frozen tower."""
    if not cfg.cache_image_features:
        return None
    reasons = cache_blockers(model, cfg)
    if reasons:
        if verbose:
            print(f"[cache] image-feature cache off: {'; '.join(reasons)}")
        return None
    dtype = tower_dtype(model)
    precision = "fp32" if cfg.feature_cache_fp32 or hardware.dtype == "float32" else f"autocast-{hardware.dtype}"
    namespace = f"{cfg.model_name_or_path}|{dtype}|{precision}"
    if reuse is not None and reuse.namespace == namespace:
        if verbose:
            print(f"[cache] reusing the image features of earlier folds ({len(reuse)} images in RAM)")
        return reuse
    disk_dir = None
    if cfg.feature_cache_on_disk:
        # A changed model or precision gets its own folder: stale features are never read.
        disk_dir = pathlib.Path(cfg.output_dir) / "feature_cache" / hashlib.blake2b(
            namespace.encode(), digest_size=8).hexdigest()
    device = tower_device(model) if feature_cache_place(cfg, hardware) == "cuda" else torch.device("cpu")
    cache = FeatureCache(namespace, cfg.feature_cache_fp32, int(cfg.feature_cache_max_gib * 2**30), disk_dir, device)
    if verbose:
        print(f"[cache] image-feature cache on ({precision}, tower {dtype}, kept on {device}, budget "
              f"{cfg.feature_cache_max_gib:g} GiB{', disk ' + str(disk_dir) if disk_dir else ''})")
    return cache


def feature_cache_place(cfg, hardware):
    """"cpu" or "cuda": where the features live. auto: on a GPU of 60 GiB or more (A100/H100-80GB, H200)
    the budget fits beside the model and each batch skips a host-to-device copy; on smaller cards (T4)
    in CPU RAM."""
    choice = cfg.feature_cache_device
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config: feature_cache_device must be auto, cpu or cuda, got {choice!r}")
    if choice == "auto":
        return "cuda" if hardware.device == "cuda" and hardware.gpu_memory_gib >= 60 else "cpu"
    if choice == "cuda" and hardware.device != "cuda":
        raise ConfigError("config: feature_cache_device=cuda but no CUDA GPU was detected")
    return choice
