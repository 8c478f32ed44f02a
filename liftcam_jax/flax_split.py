r"""Splits of a user's own Flax model (linen or NNX) at a named submodule.

A model :math:`f = h \circ g` is cut at the output of one submodule (a
``layer`` path such as ``"stage2"`` or ``"backbone/layer4"``):

* ``features(params, x)`` runs the model and returns that submodule's output
  :math:`A = g(x)`;
* ``head(params, a)`` runs the model with that output *replaced* by ``a``:
  :math:`h(a)`. The modules before the cut still appear in the traced program
  (they run on a zero input of the model's input shape), but nothing reads
  their values, so under ``jit`` XLA removes them: a jitted head computes only
  the modules after the cut (the library's tests check the compiled HLO).

The cut must separate the network: if the output depends on the input other
than through the layer (a skip connection around it), the head is refused
with a :class:`SplitError` rather than computed on the zero input.

The head needs the model's input shape to build that zero input: it is
remembered from ``features`` calls (per activation shape), or given as
``input_shape=(H, W, C)``.

A submodule called several times (a shared block) is chosen by
``call_index`` (0-based, in call order); without it, it is an error.

The head must return one array (the logits). A model that returns more (a
tuple such as big_vision's ``(logits, out)``, a dict, a Hugging Face
``ModelOutput``) is given an output selector, ``output=lambda out: out[0]``,
applied inside the head *before* the skip-connection check: only the selected
output's dependence on the input counts, so activations from before the cut
returned beside the logits do not make the cut look bridged. Without a
selector such a model is a one-line :class:`SplitError` naming ``output=``.
Likewise a submodule returning more than its activation (big_vision's blocks
return ``(x, out)``) is given ``layer_output=lambda out: out[0]``.

A cut inside a Flax lifted transformation (``nn.jit``, ``nn.remat``,
``nn.scan``) is refused in one line: the submodule runs in the
transformation's own trace, and its value cannot be taken out of it.

The split runs the model as a pure function in evaluation mode. Train mode is
refused in one line naming the flag to pass: a BatchNorm using batch statistics
(``use_running_average=False``: it would also write its ``batch_stats``), a
Dropout drawing a random mask (``deterministic=False``), any other write to a
variable collection or draw from an RNG stream; for NNX, ``model.eval()``.

Linen modules are intercepted with ``flax.linen.intercept_methods`` (every
``__call__`` of the submodule at the path); NNX modules are merged from
``(graphdef, state)`` (the state is the ``params`` argument) and the
submodule's ``__call__`` is wrapped on the fresh copy.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import UsageError
from .interpreter import live_equations
from .model import Split

__all__ = ["SplitError", "linen_split", "nnx_split"]


class SplitError(UsageError):
    """A layer path that does not name a submodule called once, a cut that does not separate,
    an output that is not one array, or a model in train mode."""


def _parse(layer) -> Tuple[str, ...]:
    if isinstance(layer, (tuple, list)):
        return tuple(str(p) for p in layer)
    if not isinstance(layer, str) or not layer.strip("/"):
        raise SplitError(f"layer must be a submodule path such as 'stage2' or 'backbone/layer4', got {layer!r}")
    return tuple(layer.strip("/").split("/"))


def _join(path) -> str:
    return "/".join(str(p) for p in path)


class _Hook:
    """One run of the model: counts the calls at ``path`` and records or replaces the chosen one.

    ``select`` (the split's ``layer_output``) picks the activation from a
    submodule that returns more than one array; the replacement then runs the
    submodule and puts ``a`` where the picked array was (every leaf that *is*
    it), so the rest of its output keeps its structure.
    """

    def __init__(self, path, call_index, replacement=None, select=None, history=None):
        self.path, self.call_index, self.replacement, self.select = path, call_index, replacement, select
        self.history = set() if history is None else history  # the layer's calls seen by earlier runs
        self.declared = False  # whether the model's variables hold the layer (set by linen's run)
        self.calls = 0
        self.outputs = []
        self.seen = []  # paths of every submodule called, in order

    def __call__(self, path, run):
        path = tuple(str(p) for p in path)
        if path and path not in self.seen:
            self.seen.append(path)
        if path != self.path:
            return run()
        self.history.add(path)
        i, self.calls = self.calls, self.calls + 1
        if self.replacement is not None and (self.call_index is None or i == self.call_index):
            if self.select is None:
                return self.replacement
            out = run()
            picked = self.select(out)
            leaves, tree = jax.tree_util.tree_flatten(out)
            if not any(leaf is picked for leaf in leaves):
                raise SplitError(f"layer_output must return one array of layer {_join(path)!r}'s output as it is "
                                 "(e.g. layer_output=lambda out: out[0]), not a value computed from it")
            return jax.tree_util.tree_unflatten(tree, [self.replacement if leaf is picked else leaf for leaf in leaves])
        out = run()
        self.outputs.append(out)
        return out

    def chosen(self, layer: str):
        if self.calls == 0 and self.path in self.history:  # an nn.jit's cached trace: its Python does not run
            raise SplitError(f"layer {layer!r} {_TRANSFORMED}")
        if self.calls == 0 and self.declared:
            raise SplitError(f"layer {layer!r} has variables but no call of it was seen: the model (or method=) "
                             f"does not call it, or it {_TRANSFORMED}")
        if self.calls == 0:
            valid = ", ".join(_join(p) for p in self.seen) or "(none)"
            raise SplitError(f"no submodule {layer!r} is called by the model; valid layers: {valid}")
        if self.replacement is None and any(map(_leaked, self.outputs)):
            raise SplitError(f"layer {layer!r} {_TRANSFORMED}")
        if self.call_index is None and self.calls > 1:
            raise SplitError(
                f"submodule {layer!r} is called {self.calls} times; choose one with call_index=0..{self.calls - 1}"
            )
        if self.call_index is not None and not 0 <= self.call_index < self.calls:
            raise SplitError(f"call_index {self.call_index} out of range: {layer!r} is called {self.calls} times")
        if self.replacement is not None:
            return None
        out = self.outputs[self.call_index or 0]
        if self.select is not None:
            return self.select(out)
        if isinstance(out, (jax.Array, np.ndarray)):
            return out
        what, pick = _describe(out)
        raise SplitError(f"layer {layer!r} returns {what}, not one array: pick the activation with "
                         f"layer_output={pick}")


def _describe(out) -> Tuple[str, str]:
    """What a non-array output is, in words, and a selector for it (``lambda out: out[0]``)."""
    name = type(out).__name__
    if isinstance(out, Mapping) or callable(getattr(out, "keys", None)):
        keys = [str(k) for k in out.keys()]
        pick = "logits" if "logits" in keys else (keys[0] if keys else "logits")
        return f"a {name} with keys {', '.join(keys[:6])}", f"lambda out: out[{pick!r}]"
    if isinstance(out, (tuple, list)):
        return f"a {name} of {len(out)}", "lambda out: out[0]"
    return f"a {name}", "lambda out: out.logits"


def _one_array(out, where: str):
    """``out`` when it is one array; a one-line :class:`SplitError` naming ``output=`` otherwise."""
    if isinstance(out, (jax.Array, np.ndarray)):
        return out
    what, pick = _describe(out)
    raise SplitError(
        f"the model returns {what}, not one array of logits: give {where} an output selector, e.g. output={pick}, "
        "or keep the whole output with output=lambda out: out and explain a target function of it"
    )


_TRANSFORMED = ("runs inside a Flax transformation of the model (nn.jit, nn.remat, nn.scan), whose values cannot "
                "be taken out of it: cut at a module outside it, or build the model without it to explain it")


def _leaked(out) -> bool:
    """Whether ``out`` holds a tracer of a transformation inside the model that has ended.

    A submodule run under a Flax lifted transformation (``nn.jit``, ``nn.remat``,
    ``nn.scan``) is called inside that transformation's own trace: its output,
    recorded by the hook, is a tracer that cannot be used outside. Using it
    (``a + 0``, dead code under ``jit``) raises JAX's ``UnexpectedTracerError``.
    """
    for a in jax.tree_util.tree_leaves(out):
        if isinstance(a, jax.core.Tracer):
            try:
                a + 0
            except jax.errors.UnexpectedTracerError:
                return True
            except TypeError:  # a value without + (a PRNG key): not judged
                continue
    return False


def _split(run: Callable, layer, call_index: Optional[int], input_shape, input_dtype,
           output: Optional[Callable] = None, where: str = "the split",
           layer_output: Optional[Callable] = None) -> Split:
    """The :class:`Split` of a model given ``run(params, x, hook) -> output``.

    ``output`` selects the head's value from the model's output (applied
    before the skip-connection check); without it the output must be one
    array (``where`` names the options in the message). ``layer_output``
    selects the activation from the layer's output (see :class:`_Hook`).
    """
    path = _parse(layer)
    name = _join(path)
    inputs: Dict[Any, Tuple[tuple, Any]] = {}
    checked = set()
    history = set()

    def features(params, x):
        hook = _Hook(path, call_index, select=layer_output, history=history)
        run(params, x, hook)
        a = hook.chosen(name)
        inputs[(tuple(jnp.shape(a)[1:]), jnp.result_type(a))] = (tuple(jnp.shape(x)[1:]), jnp.result_type(x))
        return a

    def _input(a):
        key = (tuple(jnp.shape(a)[1:]), jnp.result_type(a))
        if input_shape is not None:
            shape, dtype = tuple(input_shape), input_dtype
        elif key in inputs:
            shape, dtype = inputs[key]
        else:
            raise SplitError(
                f"the head of layer {name!r} needs the model's input shape: call features once "
                "for this activation shape, or pass input_shape=(H, W, C)"
            )
        return jax.ShapeDtypeStruct((jnp.shape(a)[0],) + shape, dtype)

    def run_head(params, x, a):
        hook = _Hook(path, call_index, replacement=a, select=layer_output, history=history)
        out = run(params, x, hook)
        hook.chosen(name)
        return output(out) if output is not None else _one_array(out, where)

    def head(params, a):
        spec = _input(a)
        key = (jax.tree_util.tree_structure(params), spec.shape, spec.dtype, tuple(jnp.shape(a)), jnp.result_type(a))
        if key not in checked:
            _check_separates(run_head, params, spec, a, name)
            checked.add(key)
        return run_head(params, jnp.zeros(spec.shape, spec.dtype), a)

    return Split(features, head)


def _check_separates(run_head, params, spec, a, name):
    """Refuse a head whose output still depends on the model's input (a skip around the cut).

    The head's jaxpr is dead-code eliminated (:func:`liftcam_jax.interpreter.live_equations`,
    which looks inside ``jit`` and ``remat`` bodies): the input is read exactly
    when some output depends on it other than through the replaced layer.
    """
    a_spec = jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    p_spec = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)), params)
    jaxpr = jax.make_jaxpr(run_head)(p_spec, spec, a_spec).jaxpr
    _, used = live_equations(jaxpr)
    n_params = len(jax.tree_util.tree_leaves(p_spec))
    if used[n_params]:
        raise SplitError(
            f"the model's output depends on its input other than through layer {name!r} "
            "(a connection around it); choose a layer that cuts the network in two"
        )


# ---------------------------------------------------------------------------
# train mode
# ---------------------------------------------------------------------------

# A model's evaluation flag, as research code names it, and its evaluation value.
_EVAL_FLAGS = (("train", False), ("training", False), ("is_training", False), ("deterministic", True),
               ("use_running_average", True))


def _eval_flag(fn, given: Mapping) -> Optional[str]:
    """``"train=False"`` (or the like) when ``fn``'s signature has such a flag not yet given its eval value."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    for flag, value in _EVAL_FLAGS:
        if flag in params and given.get(flag, not value) != value:
            return f"{flag}={value}"
    return None


def _train_mode(module, args, kwargs) -> Optional[str]:
    """Why a linen BatchNorm or Dropout about to run is in train mode (``None`` when it is not).

    The flag is Flax's ``merge_param`` of the attribute and the call argument.
    """
    import flax.linen as nn

    def flag(attr, position):
        call = kwargs.get(attr, args[position] if len(args) > position else None)
        return getattr(module, attr) if call is None else call

    if isinstance(module, nn.BatchNorm) and flag("use_running_average", 1) is False:
        return "a BatchNorm with use_running_average=False: batch statistics, and a write to its batch_stats"
    if isinstance(module, nn.Dropout) and module.rate > 0 and flag("deterministic", 1) is False:
        return f"a Dropout with deterministic=False: a random mask (rate {module.rate})"
    return None


def _flax_failure(e: Exception) -> Optional[str]:
    """What a Flax or JAX error raised while running the model says about train mode (``None``: nothing)."""
    from flax import errors

    text = str(e)
    if isinstance(e, errors.ModifyScopeVariableError):
        c = re.search(r'collection "([^"]+)"', text)
        return f"the model writes its {c.group(1) if c else 'variable'!r} collection (train mode)"
    if isinstance(e, errors.InvalidRngError):
        r = re.search(r'PRNG for "([^"]+)"', text)
        return f"the model draws random numbers from the {r.group(1) if r else 'rng'!r} stream (train-mode dropout?)"
    if isinstance(e, NameError) and "unbound axis name" in text:
        return f"the model reduces over a mapped axis ({text.strip()}: a BatchNorm with axis_name in train mode?)"
    if isinstance(e, errors.TraceContextError):
        return "the model changes its state while it runs (a BatchNorm's statistics or a Dropout's RNG stream)"
    return None


# ---------------------------------------------------------------------------
# linen
# ---------------------------------------------------------------------------

def linen_split(module, layer, method=None, *, output: Optional[Callable] = None,
                layer_output: Optional[Callable] = None, call_index: Optional[int] = None,
                input_shape: Optional[Sequence[int]] = None, input_dtype=jnp.float32, tokens=None,
                **apply_kwargs) -> Split:
    """Split a ``flax.linen`` module at the output of the submodule at path ``layer``.

    Args:
      module: the (unbound) linen module; ``variables`` (what ``module.init``
        returns, e.g. ``{"params": ..., "batch_stats": ...}``) are the
        ``params`` argument of ``features`` and ``head``.
      layer: ``"name"`` or ``"parent/child"``: the path of names from the root
        (auto-named submodules too, e.g. ``"Bottleneck_15"``). An unknown path
        is a :class:`SplitError` listing the submodules the model calls.
      method: what ``module.apply`` runs (its ``method=``): a method name, a
        method, or a function ``f(module, x, **apply_kwargs)``, e.g.
        ``lambda m, x, **kw: m(x, **kw)[0]`` for a model returning a tuple.
      output: a function of the model's output giving the head's value, e.g.
        ``lambda out: out[0]`` for big_vision's ``(logits, out)``, or
        ``lambda out: out["logits"]``. It is applied before the skip-connection
        check, so whatever else the model returns does not count. Without
        ``output`` (or ``method``) selecting one array, a model returning a
        tuple, dict or ``ModelOutput`` is a :class:`SplitError`.
      layer_output: a function picking the activation from the layer's output
        when the submodule returns more than one array, e.g. big_vision's
        ``Encoder1DBlock`` returning ``(x, out)``: ``lambda out: out[0]``. It
        must return one array of that output as it is (the head puts ``a`` in
        its place and keeps the rest).
      call_index: which call of a submodule called several times.
      input_shape: the per-image input shape; default: remembered from
        ``features``.
      tokens: for ``(B, N, D)`` token outputs, their
        :class:`~liftcam_jax.tokens.TokenLayout` (default: inferred).
      **apply_kwargs: passed to ``module.apply``: the model's evaluation flag
        (``train=False``, ``deterministic=True``). A BatchNorm or Dropout in
        train mode, a write to a variable collection or a draw from an RNG
        stream is a one-line :class:`SplitError` naming the flag; ``mutable=``
        and ``rngs=`` are refused (the split is a pure, deterministic function).

    Example::

        split = lj.linen_split(net, "backbone/stage4", train=False)
        e = lj.explainer(split, "lift-cam")(variables, x)
        vit = lj.linen_split(big_vision_vit, "Transformer/encoderblock_10",  # blocks return (x, out)
                             layer_output=lambda out: out[0], output=lambda out: out[0])
    """
    import flax.linen as nn

    root = method if callable(method) else getattr(type(module), method or "__call__", None)
    flag = _eval_flag(root, apply_kwargs)
    advice = (f"pass {flag} to linen_split (its keywords go to module.apply)" if flag else
              "pass the model's evaluation flag (e.g. train=False or deterministic=True) to linen_split "
              "(its keywords go to module.apply)")
    for bad in ("mutable", "rngs"):
        if apply_kwargs.get(bad) not in (None, False):
            raise SplitError(f"linen_split runs the model as a pure, deterministic function: drop {bad}= and {advice}")

    def run(variables, x, hook):
        hook.declared = _declared(variables, hook.path)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            why = _train_mode(context.module, args, kwargs)
            if why is not None:
                raise SplitError(f"submodule {_join(context.module.path)!r} is in train mode ({why}); {advice}")
            return hook(context.module.path, lambda: next_fun(*args, **kwargs))

        try:
            with nn.intercept_methods(interceptor):
                return module.apply(variables, x, method=method, **apply_kwargs)
        except (NameError, *_flax_errors()) as e:
            why = _flax_failure(e)
            if why is None:
                raise
            raise SplitError(f"{why}; {advice}") from e

    return _split(run, layer, call_index, input_shape, input_dtype, output,
                  "linen_split (output= or method=)", layer_output)._replace(tokens=tokens)


def _declared(variables, path) -> bool:
    """Whether a linen ``variables`` dict holds the submodule at ``path`` in some collection."""
    for coll in variables.values() if isinstance(variables, Mapping) else ():
        node = coll
        for name in path:
            if not isinstance(node, Mapping) or name not in node:
                break
            node = node[name]
        else:
            return True
    return False


def _flax_errors():
    from flax import errors

    return errors.ModifyScopeVariableError, errors.InvalidRngError, errors.TraceContextError


# ---------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------

def _nnx_train_mode(model) -> Optional[str]:
    """The first submodule of an NNX model in train mode, and why (``None``: evaluation mode).

    ``model.train()`` / ``model.eval()`` set ``use_running_average`` and
    ``deterministic`` on every submodule that has them; a ``deterministic=False``
    with a zero dropout rate draws nothing and is accepted.
    """
    from flax import nnx

    for p, sub in nnx.iter_modules(model):
        where = _join(p) or "(the model)"
        if getattr(sub, "use_running_average", None) is False:
            return f"{type(sub).__name__} {where!r} has use_running_average=False: batch statistics"
        if getattr(sub, "deterministic", None) is False:
            rates = [getattr(sub, r, None) for r in ("rate", "dropout_rate")]
            rates = [r for r in rates if isinstance(r, (int, float))]
            if not rates or max(rates) > 0:
                return f"{type(sub).__name__} {where!r} has deterministic=False: a random mask"
    return None


def nnx_split(model, layer, *, output: Optional[Callable] = None, layer_output: Optional[Callable] = None,
              call_index: Optional[int] = None,
              input_shape: Optional[Sequence[int]] = None, input_dtype=jnp.float32,
              tokens=None, **call_kwargs):
    """Split a ``flax.nnx`` module at the output of the submodule at path ``layer``.

    Returns ``(split, state)``: ``state`` (``nnx.split(model)``'s state: the
    parameters and batch statistics) is the ``params`` argument of
    ``features`` and ``head``, so it is an argument of any compiled program.
    ``layer`` is an attribute path (``"backbone/stage4"``, list items by index:
    ``"blocks/3"``); an unknown one is a :class:`SplitError` listing the valid
    ones. ``output`` is a function of the model's output giving the head's
    value (``lambda out: out[0]``), applied before the skip-connection check,
    as in :func:`linen_split`; so is ``layer_output``, the activation's
    selector for a submodule returning more than one array. ``call_kwargs`` are passed to the model's
    ``__call__``.

    The model must be in evaluation mode (``model.eval()``): a submodule with
    ``use_running_average=False`` or ``deterministic=False`` (a BatchNorm or
    Dropout after ``model.train()``, or built with the defaults) is a one-line
    :class:`SplitError` naming ``model.eval()``, unless ``call_kwargs`` pass an
    evaluation flag (``train=False``, ``deterministic=True``); a state change
    while the model runs is the same error.
    ``tokens``: for ``(B, N, D)`` token outputs, their
    :class:`~liftcam_jax.tokens.TokenLayout` (default: inferred).

    Example::

        model.eval()
        split, state = lj.nnx_split(model, "stage4")
        e = lj.explainer(split, "lift-cam")(state, x)
    """
    from flax import nnx

    advice = "call model.eval() before nnx_split"
    if not any(call_kwargs.get(f, not v) == v for f, v in _EVAL_FLAGS):
        why = _nnx_train_mode(model)
        if why is not None:
            raise SplitError(f"the model is in train mode ({why}); {advice}")
    graphdef, state = nnx.split(model)
    path = _parse(layer)
    valid = [tuple(str(p) for p in p_) for p_, _ in nnx.iter_modules(model) if p_]
    if path not in valid:
        raise SplitError(f"no submodule {_join(path)!r} in the model; valid layers: {', '.join(map(_join, valid))}")

    def run(state, x, hook):
        m = nnx.merge(graphdef, state)
        for p_, sub in nnx.iter_modules(m):
            if tuple(str(q) for q in p_) == path:
                cls = type(sub)
                call = cls.__call__
                sub.__class__ = type(cls.__name__, (cls,), {
                    "__call__": lambda self, *args, **kw: hook(path, lambda: call(self, *args, **kw)),
                })
                break
        try:
            return m(x, **call_kwargs)
        except _flax_errors() as e:
            why = _flax_failure(e)
            if why is None:
                raise
            raise SplitError(f"{why}; {advice}") from e

    return _split(run, layer, call_index, input_shape, input_dtype, output, "nnx_split (output=)",
                  layer_output)._replace(tokens=tokens), state
