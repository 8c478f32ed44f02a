"""What the library needs to know about a classifier: a split and a preprocessing.

A CNN classifier ``f`` is split at a stage boundary into two pure functions::

    A = features(params, x)        # (B, h, w, K) activation maps (or (B, N, D) tokens)
    y = head(params, A)            # (B, C) logits,   y = f(x)

A Vision Transformer's split gives ``(B, N, D)`` tokens; their layout (prefix
tokens, then a patch grid) is the split's ``tokens`` or is inferred
(:mod:`liftcam_jax.tokens`).

Every method in ``liftcam_jax`` is a function of these two (and of the
parameters, which are always arguments, never constants baked into a compiled
program). Any model zoo can provide them; ``models`` (the Flax zoo shipped
beside this library) is one. The library never imports a zoo.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from .tokens import TokenLayout

Params = Any
Array = Any


class Split(NamedTuple):
    """A classifier cut in two at a named stage: ``head(p, features(p, x)) == f(p, x)``.

    ``tokens``: for ``(B, N, D)`` token activations, their
    :class:`~liftcam_jax.tokens.TokenLayout` (prefix tokens, then an ``h x w``
    grid); ``None`` infers it from ``N`` and the input size
    (:func:`liftcam_jax.tokens.infer_layout`). Unused for ``(B, h, w, K)`` maps.
    """

    features: Callable[[Params, Array], Array]
    head: Callable[[Params, Array], Array]
    tokens: Optional[TokenLayout] = None

    def __call__(self, params: Params, x: Array) -> Array:
        return self.head(params, self.features(params, x))


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: resizing policy and normalisation.

    ``resize``:
      * ``"squash"``: the whole image resized to ``size x size`` (aspect ratio not kept).
      * ``"shorter_crop"``: shorter side resized to ``resize_to``, then a central
        ``size x size`` crop (torchvision's ``Resize(256) + CenterCrop(224)``).

    Pixel values are scaled to [0, 1], then ``(v - mean) / std`` per channel.
    """

    size: int = 224
    resize: str = "shorter_crop"
    resize_to: int = 256
    interpolation: str = "bilinear"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (size, size, 3), the geometry the model sees."""
        from PIL import Image

        resample = {
            "bilinear": Image.BILINEAR,
            "bicubic": Image.BICUBIC,
            "nearest": Image.NEAREST,
        }[self.interpolation]
        img = Image.fromarray(np.asarray(image, dtype=np.uint8))
        if self.resize == "squash":
            img = img.resize((self.size, self.size), resample)
        elif self.resize == "shorter_crop":
            w, h = img.size
            if w <= h:
                nw, nh = self.resize_to, int(self.resize_to * h / w)
            else:
                nw, nh = int(self.resize_to * w / h), self.resize_to
            img = img.resize((nw, nh), resample)
            left = int(round((nw - self.size) / 2.0))
            top = int(round((nh - self.size) / 2.0))
            img = img.crop((left, top, left + self.size, top + self.size))
        else:
            raise ValueError(f"unknown resize policy {self.resize!r} (use 'squash' or 'shorter_crop')")
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) -> float32 normalised model input."""
        from .image import normalize

        return normalize(image, self.mean, self.std)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) of any size -> float32 (size, size, 3) model input."""
        return self.normalize(self.resize_image(image))

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Model input -> uint8 RGB, for drawing overlays on what the model saw."""
        v = np.asarray(x, np.float32) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return np.clip(np.round(v * 255.0), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A loaded classifier, ready to explain: split, parameters, preprocessing."""

    name: str
    split: Split
    params: Params
    preprocess: Preprocess
    layer: str
    class_names: Optional[Sequence[str]] = None
    layers: Sequence[str] = ()
    class_ids: Optional[Sequence[str]] = None  # e.g. ImageNet WordNet ids, to map dataset labels by name

    @property
    def features(self):
        return self.split.features

    @property
    def head(self):
        return self.split.head

    def with_tokens(self, tokens: Optional[TokenLayout]) -> "Classifier":
        """The same classifier with its split's token layout set (``--tokens`` in the CLI)."""
        return dataclasses.replace(self, split=self.split._replace(tokens=tokens))

    def logits(self, x):
        """The model's output ``split(params, x)``, as one compiled program per split (and input shape).

        Not op by op: run eagerly, JAX compiles each operation of the network on its first call,
        about ten times the cost of compiling the whole forward pass once."""
        return compiled_forward(self.split)(self.params, x)

    def class_name(self, index: int) -> str:
        if self.class_names is not None and 0 <= int(index) < len(self.class_names):
            return str(self.class_names[int(index)])
        return f"class {int(index)}"


@functools.lru_cache(maxsize=16)
def compiled_forward(split: Split) -> Callable:
    """``jax.jit`` of ``split(params, x)``, params an argument (one per split; a Split is hashable)."""
    import jax

    return jax.jit(lambda params, x: split(params, x))
