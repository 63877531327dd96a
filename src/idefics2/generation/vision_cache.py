"""The vision-feature cache of generation: an image's features (L, D) are computed once.

`Idefics2Model.get_image_features` runs each image on its own patch grid, so the same photo
gives the same tensors, and so the same key, in any batch; it asks this cache for the images it
has seen and stores the rest. A chat that sends the same image with every turn then pays for the
vision tower once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

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

    def keys(self, modules: Sequence[nn.Module], images: Sequence[tuple[Tensor, Tensor]]) -> list[bytes]:
        """One key per (image, patch mask): their bytes, shapes and dtypes, and a fingerprint of
        the weights of `modules`."""
        fingerprint = weights_fingerprint(modules)
        keys = []
        for image, mask in images:
            h = hashlib.blake2b(fingerprint, digest_size=20)
            _tensor_digest(h, image)
            _tensor_digest(h, mask)
            keys.append(h.digest())
        return keys

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


def weights_fingerprint(modules: Sequence[nn.Module]) -> bytes:
    """Changes whenever a parameter is replaced (`assign=True` loads) or modified in place."""
    state = [(p.data_ptr(), p._version, p.dtype, p.device) for m in modules for p in m.parameters()]
    return hashlib.blake2b(repr(state).encode(), digest_size=16).digest()
