"""The gradient family on token activations against pytorch-grad-cam 1.5.7 with its ``reshape_transform``.

A small random-weight timm ViT (``vit_tiny_patch16_224``'s architecture at 32x32
inputs, patch 8: a 4x4 grid, 2 blocks, class token, optionally 4 register
tokens) is explained at the output of its first block. pytorch-grad-cam gets the
``reshape_transform`` its README gives for ViTs (drop the prefix tokens, reshape
to the grid); the library infers the layout (1 + 4x4, or 5 + 4x4 with registers)
and runs on a minimal functional ViT written here from the same ``state_dict``
(the zoo's ViTs are another change). Normalised maps must agree within 1e-3
(measured: about 1e-6).
"""
import numpy as np
import pytest

REASON = "parity tier needs the PyTorch reference stack (pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)"
torch = pytest.importorskip("torch", reason=REASON)
timm = pytest.importorskip("timm", reason=REASON)
pgc = pytest.importorskip("pytorch_grad_cam", reason=REASON)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import liftcam_jax as lj  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TOL = 1e-3
SIZE, PATCH, DIM, HEADS, CLASSES = 32, 8, 32, 2, 10
GRID = SIZE // PATCH
METHODS = {
    "grad-cam": pgc.GradCAM,
    "grad-cam++": pgc.GradCAMPlusPlus,
    "xgrad-cam": pgc.XGradCAM,
    "layer-cam": pgc.LayerCAM,
}
# Not HiResCAM: here its map sum_k g_nk A_nk is zero up to rounding (about 1e-9 of the terms), on both sides.
# A grid token reaches the class token only through block 1's attention, which reads it through LayerNorm,
# and LayerNorm is invariant to scaling its input token: the derivative along A_n is zero (Euler), so
# g_n . A_n = 0 for every grid token n. Comparing two normalised rounding noises would prove nothing.


def _layer_norm(x, p, name, eps=1e-6):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _linear(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _block(x, p, i):
    """timm's pre-norm ``Block``: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (exact GELU)."""
    b, n, d = x.shape
    hd = d // HEADS
    qkv = _linear(_layer_norm(x, p, f"blocks.{i}.norm1"), p, f"blocks.{i}.attn.qkv")
    q, k, v = jnp.transpose(qkv.reshape(b, n, 3, HEADS, hd), (2, 0, 3, 1, 4))
    attn = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) * hd ** -0.5, axis=-1)
    y = jnp.swapaxes(attn @ v, 1, 2).reshape(b, n, d)
    x = x + _linear(y, p, f"blocks.{i}.attn.proj")
    h = jax.nn.gelu(_linear(_layer_norm(x, p, f"blocks.{i}.norm2"), p, f"blocks.{i}.mlp.fc1"), approximate=False)
    return x + _linear(h, p, f"blocks.{i}.mlp.fc2")


def features(p, x):
    """Patch embedding (conv 8x8 stride 8 as a patch matmul), prefix tokens, position embedding, block 0."""
    b = x.shape[0]
    patches = x.reshape(b, GRID, PATCH, GRID, PATCH, 3).transpose(0, 1, 3, 5, 2, 4)  # (b, i, j, c, u, v)
    t = jnp.einsum("bijcuv,dcuv->bijd", patches, p["patch_embed.proj.weight"]) + p["patch_embed.proj.bias"]
    t = t.reshape(b, GRID * GRID, DIM)
    prefix = [p["cls_token"]] + ([p["reg_token"]] if "reg_token" in p else [])
    prefix = jnp.concatenate([jnp.broadcast_to(q, (b,) + q.shape[1:]) for q in prefix], axis=1)
    t = jnp.concatenate([prefix, t], axis=1) + p["pos_embed"]
    return _block(t, p, 0)


def head(p, t):
    """Block 1, the final LayerNorm, the class token, the classifier."""
    return _linear(_layer_norm(_block(t, p, 1), p, "norm")[:, 0], p, "head")


@pytest.fixture(scope="module", params=[0, 4], ids=["cls", "cls+4reg"])
def vit(request):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH, depth=2,
                              embed_dim=DIM, num_heads=HEADS, num_classes=CLASSES, reg_tokens=request.param).eval()
    with torch.no_grad():  # random biases and LayerNorm affines, so that none is an identity by accident
        gen = torch.Generator().manual_seed(1)
        for name, v in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                v.copy_(torch.randn(v.shape, generator=gen) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0))
            if name in ("cls_token", "reg_token", "pos_embed"):
                v.copy_(torch.randn(v.shape, generator=gen) * 0.5)
        model.head.weight.mul_(8.0)
    params = {k: jnp.asarray(v.numpy()) for k, v in model.state_dict().items()}
    return model, params, request.param


def test_gradient_family_equals_pytorch_grad_cam_with_reshape_transform(vit):
    model, params, registers = vit
    prefix = 1 + registers
    x = np.random.default_rng(3).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    split = lj.Split(features, head)
    with torch.no_grad():
        logits = model(xt).numpy()
    ours = np.asarray(split(params, jnp.asarray(x)))
    np.testing.assert_allclose(ours, logits, atol=1e-4 * np.abs(logits).max())
    order = np.argsort(logits, axis=1)
    targets = [int(order[0, -1]), int(order[1, -2])]

    def reshape_transform(t):  # pytorch-grad-cam's README for ViTs, with the prefix tokens of this model
        return t[:, prefix:, :].reshape(t.size(0), GRID, GRID, t.size(2)).permute(0, 3, 1, 2)

    e_layout = lj.tokens.resolve(features(params, jnp.asarray(x)), (SIZE, SIZE))
    assert e_layout == lj.TokenLayout(prefix, (GRID, GRID))
    for name, cls in METHODS.items():
        with cls(model=model, target_layers=[model.blocks[0]], reshape_transform=reshape_transform) as cam:
            ref = cam(input_tensor=xt, targets=[ClassifierOutputTarget(t) for t in targets])
        assert np.all(ref.max(axis=(1, 2)) > 0.99), "degenerate reference map: the comparison would prove nothing"
        e = lj.explain(split, params, jnp.asarray(x), jnp.asarray(targets), method=name)
        err = float(np.abs(np.asarray(e.maps) - ref).max())
        print(f"\nparity vit+{registers}reg {name}: max abs error {err:.2e}")
        assert err < TOL, f"{name}: max abs error {err:.2e}"
