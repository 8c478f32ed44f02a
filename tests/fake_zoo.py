"""A tiny model zoo for fast CLI and batch tests (importable in subprocesses).

``python tests/fake_zoo.py explain ...`` runs the ``liftcam-jax`` CLI over this
zoo. One model, ``tiny``: 32x32 inputs (``shorter_crop`` 36 -> 32), two conv
stages (``conv1`` 8 channels, ``conv2`` 16 channels at 16x16, the default
split), head ``GAP -> Dense(10)``. Weights: ``None``/``"random"`` = a fixed
random initialisation. ``FAKE_ZOO_SLOW=<seconds>`` makes each image's
preprocessing sleep that long; ``FAKE_ZOO_BATCH_DELAY=<seconds>`` makes every
batch's features take that long at run time (batches then finish one by one, so
a crash test can kill a run part-way).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from liftcam_jax.errors import UsageError
from liftcam_jax.model import Classifier, Preprocess, Split

NUM_CLASSES = 10
SIZE = 32
# the first ten ImageNet WordNet ids: TFDS labels named by them map to these classes by name
CLASS_IDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
             "n01496331", "n01498041", "n01514668", "n01514859", "n01518878")


@dataclasses.dataclass(frozen=True)
class SlowPreprocess(Preprocess):
    delay: float = 0.0

    def resize_image(self, image):
        if self.delay:
            time.sleep(self.delay)
        return super().resize_image(image)


class _Conv1(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(8, (3, 3))(x))


class _Conv2(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))


class _Head(nn.Module):
    @nn.compact
    def __call__(self, a):
        return nn.Dense(NUM_CLASSES)(jnp.mean(a, axis=(1, 2)))


STAGES = (("conv1", _Conv1()), ("conv2", _Conv2()), ("fc", _Head()))
LAYERS = ("conv1", "conv2")
_SPLITS: dict = {}
_PARAMS: dict = {}


def _split(layer: str) -> Split:
    if layer not in _SPLITS:
        k = [n for n, _ in STAGES].index(layer) + 1

        delay = float(os.environ.get("FAKE_ZOO_BATCH_DELAY", "0") or 0)

        def features(params, x, _stages=STAGES[:k]):
            if delay:  # at run time, once per batch: one batch finishes every `delay` seconds
                jax.debug.callback(lambda: time.sleep(delay))
            for name, mod in _stages:
                x = mod.apply(params[name], x)
            return x

        def head(params, a, _stages=STAGES[k:]):
            for name, mod in _stages:
                a = mod.apply(params[name], a)
            return a

        _SPLITS[layer] = Split(features, head)
    return _SPLITS[layer]


def _params():
    if "p" not in _PARAMS:
        key = jax.random.PRNGKey(0)
        x = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
        params = {}
        for name, mod in STAGES:
            key, sub = jax.random.split(key)
            params[name] = mod.init(sub, x)
            x = mod.apply(params[name], x)
        _PARAMS["p"] = params
    return _PARAMS["p"]


def names():
    return ["tiny"]


def load(name, weights=None, layer=None):
    if name != "tiny":
        raise UsageError(f"unknown model {name!r}; valid models: tiny")
    if weights not in (None, "random"):
        raise UsageError(f"the fake zoo has no checkpoints (got weights {weights!r}); use 'random'")
    layer = "conv2" if layer is None else layer
    if layer not in LAYERS:
        raise UsageError(f"unknown layer {layer!r} for tiny; valid layers: {', '.join(LAYERS)}")
    prep = SlowPreprocess(size=SIZE, resize="shorter_crop", resize_to=36,
                          delay=float(os.environ.get("FAKE_ZOO_SLOW", "0") or 0))
    return Classifier("tiny", _split(layer), _params(), prep, layer,
                      class_names=[f"class{i}" for i in range(NUM_CLASSES)], layers=LAYERS,
                      class_ids=CLASS_IDS)


def sample_images():
    return []


def main(argv=None) -> int:
    from liftcam_jax.cli import main as cli_main

    return cli_main(argv, zoo=sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())


def write_photos(folder, n: int, *, first_height: int = 24, name: str = "p{i:02d}.png"):
    """``n`` random RGB PNGs of heights ``first_height + i`` (width 40) in ``folder``, for runs over a folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (first_height + i, 40, 3), dtype=np.uint8)).save(folder / name.format(i=i))
    return folder
