r"""Vision Transformers as timm 1.0 computes them (Dosovitskiy et al. 2021; DeiT, Touvron et al. 2021).

``vit_tiny_patch16_224``, ``vit_small_patch16_224``, ``vit_base_patch16_224`` (timm's
``VisionTransformer`` with class-token pooling) and ``deit_tiny_distilled_patch16_224``
(``VisionTransformerDistilled``: a class and a distillation token, two heads averaged in
inference). No weights are bundled and none are downloaded: ``models.load(name,
weights=PATH)`` reads a timm ``state_dict`` (``.pth`` or ``.safetensors``, e.g. the hub's
``model.safetensors``) under timm's key names (:mod:`models.convert`).

The computation, with ``D`` the width, ``H`` heads of ``d = D / H`` channels, ``P`` the
patch size and ``T`` the prefix tokens (1: class; 2: class and distillation)::

    embed:    z_0 = [cls; (dist;) patches(x) W_p + b_p] + pos          (B, T + h w, D)
    block l:  u   = z + proj(attention(LN_1(z)))
              z'  = u + fc2(GELU(fc1(LN_2(u))))
    norm:     LN(z_L)
    head:     head(z[:, 0])        (DeiT: (head(z[:, 0]) + head_dist(z[:, 1])) / 2)

with ``attention(y) = softmax(q k^T / sqrt(d)) v`` per head (``q, k, v`` from one ``qkv``
linear layer, heads side by side), LayerNorm's ``eps = 1e-6``, and GELU's exact (erf) form
(PyTorch's ``nn.GELU()``). The patches are read by a ``P x P`` stride-``P`` convolution and
flattened row by row, so token ``T + i w + j`` is patch ``(i, j)``: after the ``T`` prefix
tokens the tokens lie on the ``h x w = (S / P) x (S / P)`` grid (14 x 14 at 224).

**Stages and split points**, named as timm names the modules: ``embed`` (the embedding above;
timm's ``patch_embed``, class token and ``pos_embed``), ``blocks.0`` .. ``blocks.{L-1}`` (each
block's output), ``norm`` (the final LayerNorm), ``head`` (logits; not a split). Inside block
``l``: ``blocks.l.norm1`` (after ``LN_1``) and ``blocks.l.norm2`` (after ``LN_2``). The
residual stream is carried after the normalised tokens, as ResNet's inner splits carry their
shortcut (:mod:`models.base`): ``A = concat([LN_1(z), z], -1)`` at ``norm1`` and
``concat([LN_2(u), u], -1)`` at ``norm2``, ``(B, N, 2D)``; the head takes them apart again.
Every split's activations are tokens ``(B, N, D)`` (``2D`` inside a block) with the layout
:attr:`StagedModel.tokens` ``= (T, (h, w))``.

**Default split** ``blocks.{L-1}.norm1``: the head reads only the class (and distillation)
token after the last block, and the last block's output reaches it only through token ``0``
(``1``), so maps at ``norm`` or at the last block's output are blank on the patch grid;
inside the last block, the attention still mixes every token into the class token. This is
the layer pytorch-grad-cam's ViT example explains (``model.blocks[-1].norm1``).

**Preprocessing**, timm 1.0's ``pretrained_cfg`` of each default tag (``augreg_in21k_ft_in1k``,
``augreg2_in21k_ft_in1k`` for ViT-B, ``fb_in1k`` for DeiT): bicubic resizing of the shorter
side to ``floor(224 / crop_pct) = 248`` (``crop_pct = 0.9``), a central 224 crop, then
``(v - 0.5) / 0.5`` for the ViTs and ImageNet's mean and standard deviation for DeiT.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from liftcam_jax.model import Preprocess

from .base import Phase, StagedModel, run_block
from .layers import conv

EPS = 1e-6
CROP_PCT = 0.9  # timm's crop_pct for every model here


def timm_preprocess(size: int = 224, inception: bool = True) -> Preprocess:
    """timm's eval transform: bicubic resize of the shorter side to ``floor(size / crop_pct)``,
    central ``size`` crop; mean = std = 0.5 (``inception``) or ImageNet's."""
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) if inception else {}
    return Preprocess(size=size, resize="shorter_crop", resize_to=math.floor(size / CROP_PCT),
                      interpolation="bicubic", **stats)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """``width`` D, ``depth`` L, ``heads`` H, ``patch`` P, input ``size`` S, ``distilled``
    (a distillation token and a second head, DeiT), ``mlp_ratio`` (hidden width / D)."""

    width: int
    depth: int
    heads: int
    patch: int = 16
    size: int = 224
    distilled: bool = False
    mlp_ratio: int = 4

    @property
    def prefix(self) -> int:
        """Tokens before the patch grid: the class token (and the distillation token)."""
        return 2 if self.distilled else 1

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.size // self.patch, self.size // self.patch)


CONFIGS = {
    "vit_tiny_patch16_224": ViTConfig(192, 12, 3),
    "vit_small_patch16_224": ViTConfig(384, 12, 6),
    "vit_base_patch16_224": ViTConfig(768, 12, 12),
    "deit_tiny_distilled_patch16_224": ViTConfig(192, 12, 3, distilled=True),
}


def layer_norm(name: str) -> nn.LayerNorm:
    """timm's ``nn.LayerNorm(eps=1e-6)``: ``(x - mean) / sqrt(var + eps) * scale + bias`` over
    the last axis, the variance as the mean of squared deviations (not ``E[x^2] - E[x]^2``)."""
    return nn.LayerNorm(epsilon=EPS, use_fast_variance=False, name=name)


class Embed(nn.Module):
    """Patch embedding (``proj``: ``P x P`` conv, stride ``P``, with bias), then the prefix
    tokens (``cls_token``, ``dist_token``) in front and ``pos_embed`` added to every token."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        init = nn.initializers.normal(0.02)
        patches = conv(c.width, c.patch, c.patch, 0, bias=True, name="proj")(x)
        b = patches.shape[0]
        tokens = [self.param("cls_token", init, (1, 1, c.width))]
        if c.distilled:
            tokens.append(self.param("dist_token", init, (1, 1, c.width)))
        pos = self.param("pos_embed", init, (1, c.prefix + c.grid[0] * c.grid[1], c.width))
        tokens = [jnp.broadcast_to(t, (b, 1, c.width)).astype(patches.dtype) for t in tokens]
        z = jnp.concatenate(tokens + [patches.reshape(b, -1, c.width)], axis=1)
        return z + pos.astype(z.dtype)


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h)``, with
    ``[q | k | v] = qkv(y)`` and head ``h`` the channels ``h d .. (h + 1) d - 1`` of each."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, y):
        b, n, _ = y.shape
        d = self.width // self.heads
        qkv = nn.Dense(3 * self.width, name="qkv")(y).reshape(b, n, 3, self.heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, d)
        weights = nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q, k) * (d ** -0.5), axis=-1)
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, self.width)
        return nn.Dense(self.width, name="proj")(out)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(y)))``, GELU in its exact form ``y Phi(y)``."""

    hidden: int
    width: int

    @nn.compact
    def __call__(self, y):
        y = nn.gelu(nn.Dense(self.hidden, name="fc1")(y), approximate=False)
        return nn.Dense(self.width, name="fc2")(y)


class Block(nn.Module):
    """A pre-norm transformer block, two residual halves: ``u = z + attn(norm1(z))``, then
    ``u + mlp(norm2(u))``.

    Split points ``norm1`` and ``norm2`` (after each LayerNorm); each carries its half's
    residual stream (``z``, ``u``) after the normalised tokens (see :mod:`models.base`)."""

    cfg: ViTConfig
    points = ("norm1", "norm2")

    @nn.compact
    def __call__(self, x, start=None, stop=None):
        c = self.cfg
        if start == "norm2" and stop == "norm1":
            raise ValueError("split point 'norm2' comes after 'norm1'")
        if start != "norm2":
            x = run_block([
                Phase("norm1", c.width, layer_norm("norm1")),
                Phase(None, c.width, lambda y: Attention(c.width, c.heads, name="attn")(y)),
            ], x, start, "norm1" if stop == "norm1" else None, jnp.add)
            if stop == "norm1":
                return x
        return run_block([
            Phase("norm2", c.width, layer_norm("norm2")),
            Phase(None, c.width, lambda y: Mlp(c.mlp_ratio * c.width, c.width, name="mlp")(y)),
        ], x, "norm2" if start == "norm2" else None, stop, jnp.add)


class Head(nn.Module):
    """Class-token pooling and the classifier ``head``; distilled: the mean of ``head`` on
    the class token and ``head_dist`` on the distillation token (DeiT's inference)."""

    num_classes: int
    distilled: bool = False

    @nn.compact
    def __call__(self, z):
        logits = nn.Dense(self.num_classes, name="head")(z[:, 0])
        if self.distilled:
            logits = (logits + nn.Dense(self.num_classes, name="head_dist")(z[:, 1])) / 2
        return logits


def vision_transformer(name: str, cfg: ViTConfig, num_classes: int = 1000,
                       preprocess: Preprocess | None = None) -> StagedModel:
    """The staged ViT of ``cfg`` (any size: the zoo's, or a small one for tests).

    ``name`` names the model; it starts with ``vit`` or ``deit`` for :mod:`models.convert`
    to read timm's key names."""
    if cfg.width % cfg.heads or cfg.size % cfg.patch:
        raise ValueError(f"{name}: width {cfg.width} must divide into {cfg.heads} heads and "
                         f"size {cfg.size} into {cfg.patch}-pixel patches")
    if preprocess is None:
        preprocess = timm_preprocess(cfg.size, inception=not cfg.distilled)
    stages = [("embed", Embed(cfg))]
    stages += [(f"blocks.{i}", Block(cfg)) for i in range(cfg.depth)]
    stages += [("norm", layer_norm(None)), ("head", Head(num_classes, cfg.distilled))]
    return StagedModel(name=name, stages=tuple(stages), default_layer=f"blocks.{cfg.depth - 1}.norm1",
                       preprocess=preprocess, num_classes=num_classes,
                       tokens=(cfg.prefix, cfg.grid))


def vit(name: str, num_classes: int = 1000) -> StagedModel:
    """The staged zoo ViT ``name`` (one of :data:`CONFIGS`)."""
    return vision_transformer(name, CONFIGS[name], num_classes)
