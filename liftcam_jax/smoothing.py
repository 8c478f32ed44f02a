r"""Smoothing and layer fusion of CAMs, as pytorch-grad-cam 1.5.7 defines them.

Three options, composable, for every registered method:

* **eigen_smooth** (:func:`eigen_smoothed`): the map is the projection of the
  weighted activations on their first principal component instead of their sum
  over channels (pytorch-grad-cam's ``get_2d_projection``; Muhammad & Yeasin,
  "Eigen-CAM", IJCNN 2020, arXiv 2008.00299). With ``W_{ijk} = w_k A_{ijk}``
  (or ``w_{ijk} A_{ijk}`` for per-position weights) as an ``(h*w, K)`` matrix,
  channel means :math:`\mu` and first right singular vector ``v`` of
  ``W - 1 mu^T``,

  .. math::  L = \mathrm{ReLU}\big((W - \mathbf 1 \mu^T) v\big)
             = \mathrm{ReLU}\Big(\sum_k (w_k v_k) A^k - \mu^T v\Big).

  The singular vector's sign is arbitrary (pytorch-grad-cam keeps numpy's);
  here ``v`` is oriented with :func:`liftcam_jax.methods.cams.eigen_direction`
  (``sum_k v_k >= 0``: the projection correlates positively with the
  un-smoothed weighted sum ``sum_k W^k``). Under eigen_smooth
  ``coefficients`` are the projection's channel weights ``w_k v_k`` (for
  per-position weights, the spatial sums of ``w v A``), ``raw`` the rectified
  projection. ``eigen-cam`` is already such a projection (pytorch-grad-cam
  ignores the flag there); asking for both is a :class:`UsageError`.

* **aug_smooth** (:func:`explain_smoothed`, ``aug_smooth=True``): test-time
  augmentation, pytorch-grad-cam's default ``ttach`` set in its order
  (:data:`AUGMENTATIONS`): no flip / horizontal flip of the input, times the
  input multiplied by 0.9, 1, 1.1 (six passes). Each augmented batch is
  explained, its normalised map flipped back, and the maps are averaged:

  .. math::  M = \frac{1}{|T|} \sum_{(f, s) \in T} F_f\big(\mathrm{map}(F_f(s\,x))\big),

  with no renormalisation after the mean (pytorch-grad-cam's
  ``forward_augmentation_smoothing``), so ``M`` need not reach 0 or 1. The six
  passes run as ONE batch of ``6 B`` images. The explained class is resolved
  once on the un-augmented input (``targets=None``: its predicted class);
  pytorch-grad-cam re-predicts on each augmented copy, which differs only
  when a flip or a scaling changes the prediction. ``raw`` is ``(B, T, ...)``
  per augmentation (flipped back), ``coefficients`` ``(B, T, ...)`` per
  augmentation, ``reference_logits`` ``(B, T, C)`` or ``None``; ``logits``
  are those of the un-augmented input.

* **layer fusion** (:func:`explain_smoothed` with several splits of one model):
  each layer's map rectified, min-max scaled at its own feature resolution
  and then upsampled to the input (``m_l = upsample(normalize(raw_l))``, NOT
  rescaled after upsampling: bilinear upsampling by a factor lowers a
  maximum that no output pixel centre hits, so this differs from the
  library's per-layer ``maps``), then averaged over the layers and min-max
  scaled again (pytorch-grad-cam's ``compute_cam_per_layer`` +
  ``aggregate_multi_layers``), or, with ``fusion="max"``, their pixel-wise
  maximum, scaled:

  .. math::  M = \mathrm{normalize}\Big(\frac1L \sum_l m_l\Big)
             \quad\text{or}\quad \mathrm{normalize}\big(\max_l m_l\big).

  Layer-CAM's paper (Jiang et al., IEEE TIP 2021) fuses stages this way. Under
  fusion ``raw`` is ``(B, L, H, W)``: the ``m_l`` that were fused, at the
  input resolution (the layers' feature resolutions differ), ``coefficients`` ``(B, K_1 + ... + K_L)``: the layers' coefficients
  concatenated in layer order, ``reference_logits`` ``(B, L, C)`` or ``None``.
  Each layer's features are computed from the input by its own split.

With both aug_smooth and fusion, fusion happens inside each augmentation
(pytorch-grad-cam's order): ``raw`` is ``(B, T, L, H, W)`` and
``coefficients`` ``(B, T, sum K_l)``.

pytorch-grad-cam normalises with a ``+1e-7`` guard and before resizing; the
library normalises after (min-max commutes with bilinear resizing up to the
guard; see :mod:`liftcam_jax.methods.cams`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from . import methods as _methods
from .errors import UsageError
from .explain import explain
from .explanation import Attribution, Explanation, normalize, resolve_targets, upsample
from .methods import Method
from .methods.cams import eigen_direction
from .model import Split

__all__ = ["AUGMENTATIONS", "FUSIONS", "Smoothing", "augment", "eigen_smooth_attribution", "eigen_smoothed",
           "explain_smoothed", "fuse_maps"]

#: pytorch-grad-cam's default test-time augmentations, ``(flip, factor)`` in ``ttach.Compose``'s order:
#: ``itertools.product([HorizontalFlip: False, True], [Multiply: 0.9, 1, 1.1])``.
AUGMENTATIONS: Tuple[Tuple[bool, float], ...] = tuple(itertools.product((False, True), (0.9, 1.0, 1.1)))

#: the layer fusions: pytorch-grad-cam's mean, and the pixel-wise maximum
FUSIONS = ("mean", "max")


def eigen_smooth_attribution(activations, att: Attribution) -> Attribution:
    r"""The :class:`Attribution` whose assembled map is the first-principal-component projection
    of the weighted activations ``W = w * A`` (see the module docstring).

    ``sum_k (w_k v_k) A^k - mu . v`` is returned as per-channel (or per-position) weights
    ``w * v`` and the bias ``-mu . v``, so the shared assembly
    (:func:`liftcam_jax.explanation.from_attribution`) rectifies, upsamples and normalises it.
    """
    if att.bias is not None:
        raise UsageError("eigen_smooth projects the weighted activations of a method without a bias; "
                         "this method's map is already a projection (eigen-cam: drop eigen_smooth)")
    w = att.weights.astype(activations.dtype)
    weights = w[:, None, None, :] if w.ndim == 2 else w
    v, mean = eigen_direction(activations * weights)
    smoothed = w * (v if w.ndim == 2 else v[:, None, None, :])
    return Attribution(smoothed, bias=-jnp.sum(mean * v, axis=-1), reference_logits=att.reference_logits,
                       relu=att.relu)


@functools.lru_cache(maxsize=None)
def eigen_smoothed(method: Union[str, Method]) -> Method:
    """The registered ``method`` with eigen_smooth: a :class:`Method` named ``NAME+eigen-smooth``.

    Its function is the method's followed by :func:`eigen_smooth_attribution`; it
    explains with :func:`liftcam_jax.explain` like any method (and is the same object
    for the same method, so compiled steps are cached).
    """
    m = _methods.resolve(method)
    if m.name == "eigen-cam":
        raise UsageError("eigen-cam is already the first principal component of the activations; "
                         "eigen_smooth does not apply to it (pytorch-grad-cam ignores it there)")

    @functools.wraps(m.fn)
    def fn(split, params, x, activations, targets, logits, **options):
        att = m.fn(split, params, x, activations, targets, logits, **options)
        return eigen_smooth_attribution(activations, att)

    return dataclasses.replace(m, name=f"{m.name}+eigen-smooth", fn=fn,
                               summary=f"{m.summary} (eigen-smoothed)")


def augment(x, flip: bool, factor: float):
    """``x`` (``(B, H, W, 3)``) flipped left-right when ``flip``, times ``factor`` (ttach's order)."""
    x = x[:, :, ::-1] if flip else x
    return x if factor == 1 else x * jnp.asarray(factor, x.dtype)


def fuse_maps(maps, fusion: str = "mean"):
    """``(B, L, H, W)`` per-layer maps ``m_l`` -> ``(B, H, W)``: ``normalize(mean_l)`` or ``normalize(max_l)``."""
    if fusion not in FUSIONS:
        raise UsageError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
    combined = jnp.mean(maps, axis=1) if fusion == "mean" else jnp.max(maps, axis=1)
    return normalize(combined)


def _fused(splits, params, x, targets, method, key, fusion, options) -> Explanation:
    es = [explain(s, params, x, targets, method=method, key=key, **options) for s in splits]
    if len(es) == 1:
        return es[0]
    size = x.shape[1:3]
    maps = jnp.stack([upsample(normalize(e.raw), size) for e in es], axis=1)
    refs = None if es[0].reference_logits is None else jnp.stack([e.reference_logits for e in es], axis=1)
    coeffs = jnp.concatenate([e.coefficients.reshape(e.coefficients.shape[0], -1) for e in es], axis=-1)
    return Explanation(fuse_maps(maps, fusion), maps, coeffs, es[0].logits, es[0].targets, refs)


def explain_smoothed(splits: Union[Split, Sequence[Split]], params, x, targets=None, *,
                     method: Union[str, Method] = "lift-cam", aug_smooth: bool = False, eigen_smooth: bool = False,
                     fusion: str = "mean", augmentations: Sequence[Tuple[bool, float]] = AUGMENTATIONS,
                     key=None, **options) -> Explanation:
    """Explain with aug_smooth, eigen_smooth and/or the fusion of several splits of one model.

    ``splits``: one :class:`~liftcam_jax.model.Split` or a sequence of splits of the
    same model (the same ``params``; e.g. ``[net.split("layer3"), net.split("layer4")]`` for
    ``net = models.get("resnet50")``, the zoo's splits per layer name).
    ``fusion``: ``"mean"`` (pytorch-grad-cam's) or ``"max"``. The rest as
    :func:`liftcam_jax.explain`. What ``maps``, ``raw`` and ``coefficients`` hold under
    each option is in the module docstring. Pure and jit-able (``splits``, ``method``
    and the flags are static).
    """
    splits = (splits,) if isinstance(splits, Split) else tuple(splits)
    if not splits:
        raise UsageError("no splits to explain")
    if fusion not in FUSIONS:
        raise UsageError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
    if callable(targets) or (targets is not None and jnp.ndim(targets) > 1) or options.get("top_k") is not None:
        raise UsageError("smoothing and layer fusion explain one class per image: give class indices "
                         "(one int or one per image), not a target function, (B, T) targets or top_k")
    method = eigen_smoothed(method) if eigen_smooth else _methods.resolve(method)
    if method.needs_key and key is None:
        key = jax.random.PRNGKey(0)
    if not aug_smooth:
        return _fused(splits, params, x, targets, method, key, fusion, options)
    augmentations = tuple((bool(f), float(s)) for f, s in augmentations)
    if not augmentations:
        raise UsageError("aug_smooth needs at least one augmentation")
    logits = splits[0](params, x)
    targets = resolve_targets(targets, logits)
    n, b = len(augmentations), x.shape[0]
    xs = jnp.concatenate([augment(x, f, s) for f, s in augmentations])
    e = _fused(splits, params, xs, jnp.tile(targets, n), method, key, fusion, options)
    flips = jnp.asarray([f for f, _ in augmentations])

    def per_augmentation(a, unflip):  # (n*B, ...) -> (B, n, ...), width (last axis) flipped back
        a = a.reshape((n, b) + a.shape[1:])
        if unflip:
            mask = flips.reshape((n,) + (1,) * (a.ndim - 1))
            a = jnp.where(mask, jnp.flip(a, axis=-1), a)
        return jnp.moveaxis(a, 0, 1)

    maps = jnp.mean(per_augmentation(e.maps, True), axis=1)
    refs = None if e.reference_logits is None else per_augmentation(e.reference_logits, False)
    return Explanation(maps, per_augmentation(e.raw, True), per_augmentation(e.coefficients, False), logits,
                       targets, refs)


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """What a dataset run (``liftcam-jax explain``) smooths and fuses, beside the method.

    ``layers``: extra ``(name, split)`` pairs of the same model, fused after the
    run's own split (the CLI's ``--layer a,b``: the classifier's split at ``a``,
    then ``("b", split_b)``); ``fusion``: ``"mean"`` or ``"max"``.
    """

    aug_smooth: bool = False
    eigen_smooth: bool = False
    fusion: str = "mean"
    layers: Tuple[Tuple[str, Split], ...] = ()

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise UsageError(f"unknown fusion {self.fusion!r}; valid: {', '.join(FUSIONS)}")

    @property
    def active(self) -> bool:
        return bool(self.aug_smooth or self.eigen_smooth or self.layers)

    def explain(self, split: Split, params, x, targets=None, *, method, key=None, **options) -> Explanation:
        """:func:`explain_smoothed` of ``split`` followed by :attr:`layers`."""
        return explain_smoothed((split,) + tuple(s for _, s in self.layers), params, x, targets, method=method,
                                aug_smooth=self.aug_smooth, eigen_smooth=self.eigen_smooth, fusion=self.fusion,
                                key=key, **options)

    def identity(self, layer: str) -> dict:
        """For ``run.json``: the flags and the fused layers (``layer`` is the run's own)."""
        return {"aug_smooth": self.aug_smooth, "eigen_smooth": self.eigen_smooth,
                "layers": [layer] + [n for n, _ in self.layers], "fusion": self.fusion if self.layers else None}

    def layout(self, layer: str) -> dict:
        """What one image's ``raw`` and ``coefficients`` hold, for its ``.npz``: ``raw_axes`` and
        ``coefficients_axes`` (comma-separated axis names), ``layers`` (fused layer names, when
        fused) and ``augmentations`` (``(T, 2)``: flip 0/1, factor; under aug_smooth)."""
        aug = ["augmentation"] if self.aug_smooth else []
        fused = bool(self.layers)
        out = {"raw_axes": ",".join(aug + (["layer", "H", "W"] if fused else ["h", "w"])),
               "coefficients_axes": ",".join(aug + ["channel of the layers, concatenated" if fused else "channel"])}
        if fused:
            out["layers"] = [layer] + [n for n, _ in self.layers]
        if self.aug_smooth:
            out["augmentations"] = [[float(f), s] for f, s in AUGMENTATIONS]
        return out
