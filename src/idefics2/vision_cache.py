"""Image features for generation: each image on its own patch grid, with an LRU feature cache.

First stage of `generate`: pixel_values (B, M, 3, H, W) + pixel_attention_mask -> features
(R, L, D) of the real images, in the (sample, image) order `Idefics2Model.get_image_features`
gives (docs/numerics.md §4.3 steps 1-2, 6). Each image is cropped to its valid patch grid, so no canvas
padding is computed and the same photo has the same cache key in any batch; mathematically equal
to the reference's padded computation (padded patches are never attended to), float noise aside.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor, nn

DEFAULT_CACHE_BYTES = 256 * 2**20


class VisionFeatureCache:
    """LRU map from an image key to its features (L, D), bounded by the features' total bytes.

    Keys hash the image's pixel and mask bytes with their shapes and dtype, and a fingerprint of
    the vision weights, so retraining or reloading the model never serves stale features.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[bytes, Tensor] = OrderedDict()

    def get(self, key: bytes) -> Tensor | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: bytes, features: Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = features
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def _tensor_digest(h: hashlib._Hash, tensor: Tensor) -> None:
    tensor = tensor.detach().contiguous().cpu()
    h.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    h.update(tensor.view(torch.uint8).numpy().data)  # bytes of any dtype, bfloat16 included


def weights_fingerprint(modules: list[nn.Module]) -> bytes:
    """Changes whenever a parameter is replaced (`assign=True` loads) or modified in place."""
    state = [(p.data_ptr(), p._version, p.dtype, p.device) for m in modules for p in m.parameters()]
    return hashlib.blake2b(repr(state).encode(), digest_size=16).digest()


def encode_images(model: nn.Module, pixel_values: Tensor, pixel_attention_mask: Tensor | None,
                  cache: VisionFeatureCache | None = None) -> Tensor:
    """Features (R, L, D) of the real images in `pixel_values` (B, M, 3, H, W).

    Images whose valid patches form a top-left rectangle (what the processor produces) run
    cropped to that rectangle with no mask; others run on the full canvas with their patch mask.
    Images of the same shape go through the tower together; cached images are not recomputed.
    `model` is an `Idefics2ForConditionalGeneration`.
    """
    inner = model.model
    p = inner.config.vision_config.patch_size
    pixels, patch_mask = inner.real_images(pixel_values, pixel_attention_mask)  # (R, 3, H, W), (R, Gh, Gw)
    rows = patch_mask[:, :, 0].sum(dim=1).tolist()
    cols = patch_mask[:, 0, :].sum(dim=1).tolist()
    fingerprint = weights_fingerprint([inner.vision_model, inner.connector]) if cache is not None else b""

    # Per image: the tensors the tower will see, and the cache key derived from exactly those.
    jobs: list[tuple[Tensor, Tensor]] = []
    keys: list[bytes] = []
    for r, (nh, nw) in enumerate(zip(rows, cols, strict=True)):
        rect = torch.zeros_like(patch_mask[r])
        rect[:nh, :nw] = True
        if nh > 0 and nw > 0 and torch.equal(rect, patch_mask[r]):
            image, mask = pixels[r, :, : nh * p, : nw * p], rect[:nh, :nw]  # own grid, every patch valid
        else:
            image, mask = pixels[r], patch_mask[r]
        jobs.append((image, mask))
        if cache is not None:
            h = hashlib.blake2b(fingerprint, digest_size=20)
            _tensor_digest(h, image)
            _tensor_digest(h, mask)
            keys.append(h.digest())

    features: list[Tensor | None] = [cache.get(k) for k in keys] if cache is not None else [None] * len(jobs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, (image, mask) in enumerate(jobs):
        if features[r] is None:
            groups.setdefault((*image.shape, *mask.shape), []).append(r)
    for members in groups.values():
        images = torch.stack([jobs[r][0] for r in members])  # (n, 3, h, w)
        masks = torch.stack([jobs[r][1] for r in members])  # (n, gh, gw)
        patch_features = inner.vision_model(images, masks)  # (n, P, D_v)
        out = inner.connector(patch_features, masks.flatten(1))  # (n, L, D)
        for r, f in zip(members, out, strict=True):
            features[r] = f
            if cache is not None:
                cache.put(keys[r], f.clone())  # own storage, so eviction frees it
    if not jobs:
        L, D = inner.config.perceiver_config.resampler_n_latents, inner.config.text_config.hidden_size
        return pixels.new_zeros(0, L, D)
    return torch.stack(features)  # type: ignore[arg-type]  # (R, L, D)
