"""Explanations are differentiable: jax.grad of LIFT-CAM's and Grad-CAM's outputs matches finite differences.

In float64, central differences along a random direction of the parameters and of the input
against ``jax.grad`` (relative 1e-3), away from kinks and ties; at a kink or a tie the gradient
is finite.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax.model import Split


@pytest.fixture(autouse=True)
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _pool(a):
    return jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


HEADS = {
    "tanh": lambda p, a: jnp.tanh(a.mean((1, 2))) @ p["w"],
    "relu": lambda p, a: jax.nn.relu(a.mean((1, 2)) + p["b"]) @ p["w"],
    "maxpool-tanh": lambda p, a: jnp.tanh(_pool(a).mean((1, 2))) @ p["w"],
}


def _split(head):
    # features: an elementwise map of the input, so the input's gradient reaches the head
    return Split(lambda p, x: x * p["s"] + p["t"], head)


def _params(key, k=3, c=4):
    ks = jax.random.split(key, 4)
    return {
        "s": 1.0 + 0.3 * jax.random.normal(ks[0], (k,), jnp.float64),
        "t": 0.1 * jax.random.normal(ks[1], (k,), jnp.float64),
        "w": jax.random.normal(ks[2], (k, c), jnp.float64),
        "b": 0.5 + 0.1 * jax.random.normal(ks[3], (k,), jnp.float64),
    }


def _loss(explain, params, x, which, targets=1):
    e = explain(params, x, targets)
    rng = np.random.default_rng(0)
    weights = {name: jnp.asarray(rng.normal(size=getattr(e, name).shape)) for name in which}
    return sum(jnp.sum(getattr(e, name) * w) for name, w in weights.items())


def _check_against_fd(explain, params, x, which, rtol=1e-3, h=1e-6, targets=1):
    f = lambda p, xx: _loss(explain, p, xx, which, targets)
    gp, gx = jax.grad(f, argnums=(0, 1))(params, x)
    rng = np.random.default_rng(1)
    vp = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    vx = jnp.asarray(rng.normal(size=x.shape))
    for grad, direction, shift in (
        (gp, vp, lambda t: (jax.tree_util.tree_map(lambda a, v: a + t * v, params, vp), x)),
        (gx, vx, lambda t: (params, x + t * vx)),
    ):
        analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree_util.tree_leaves(grad),
                                                      jax.tree_util.tree_leaves(direction)))
        fd = (f(*shift(h)) - f(*shift(-h))) / (2 * h)
        assert np.isfinite(float(analytic))
        np.testing.assert_allclose(float(analytic), float(fd), rtol=rtol, atol=1e-7 * max(1.0, abs(float(fd))))


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("which", [("coefficients",), ("raw",), ("maps",)])
def test_lift_cam_gradients_match_finite_differences(head, which):
    split = _split(HEADS[head])
    explain = lj.explainer(split, "lift-cam")
    params = _params(jax.random.PRNGKey(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 3), jnp.float64) + 0.2
    _check_against_fd(explain, params, x, which)


def test_an_activation_equal_to_the_reference_has_the_right_gradient():
    """A channel exactly at the zero reference takes the midpoint derivative: value and
    gradient of the secant (g'' / 2 per side)."""
    split = _split(HEADS["tanh"])
    explain = lj.explainer(split, "lift-cam")
    params = _params(jax.random.PRNGKey(3))
    params["t"] = params["t"].at[1].set(0.0)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 3), jnp.float64) + 0.2
    x = x.at[..., 1].set(0.0)  # channel 1 is exactly the reference
    _check_against_fd(explain, params, x, ("coefficients",))
    _check_against_fd(explain, params, x, ("raw",))


def test_gradients_at_a_kink_and_a_tie_are_finite():
    params = _params(jax.random.PRNGKey(3))
    x = jnp.ones((2, 4, 4, 3), jnp.float64)  # every pooling window a tie, a constant map
    params["t"] = jnp.zeros(3)
    for head in ("relu", "maxpool-tanh"):
        explain = lj.explainer(_split(HEADS[head]), "lift-cam")
        if head == "relu":
            params = {**params, "b": -jnp.ones(3)}  # the ReLU exactly at its kink
        for which in ("coefficients", "raw", "maps"):
            g = jax.grad(lambda p, xx: _loss(explain, p, xx, (which,)), argnums=(0, 1))(params, x)
            assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(g)), (head, which)


def test_grad_cam_gradients_match_finite_differences_on_a_smooth_head():
    explain = lj.explainer(_split(HEADS["tanh"]), "grad-cam")
    params = _params(jax.random.PRNGKey(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 3), jnp.float64) + 0.2
    _check_against_fd(explain, params, x, ("coefficients",))
    _check_against_fd(explain, params, x, ("raw",))


def test_gradients_through_target_functions_match_finite_differences():
    """A logit difference (classes 1 - 3) on the tanh head, and a mask-summed class of a
    per-pixel segmentation head (tanh then 1x1 conv, output (B, h, w, C)), through LIFT-CAM
    and Grad-CAM: jax.grad of the coefficients and raw maps against central differences."""
    from liftcam_jax import targets as T

    params = _params(jax.random.PRNGKey(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 3), jnp.float64) + 0.2
    diff = T.logit_difference(1, 3)
    mask = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 4, 4)))
    seg = T.segmentation(jnp.array([2, 0]), mask)
    seg_split = _split(lambda p, a: jnp.tanh(a) @ p["w"])
    for split, target in ((_split(HEADS["tanh"]), diff), (seg_split, seg)):
        for method in ("lift-cam", "grad-cam"):
            explain = lj.explainer(split, method)  # the targets (Partials) are arguments of the compiled program
            _check_against_fd(explain, params, x, ("coefficients", "raw"), targets=target)
