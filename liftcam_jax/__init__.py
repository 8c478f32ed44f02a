"""liftcam-jax: class activation maps for CNN classifiers in JAX, with LIFT-CAM at the core.

LIFT-CAM (Jung & Oh, ICCV 2021, arXiv 2102.05228) estimates the SHAP values of a
CNN's activation maps with DeepLIFT on the network's head, at the cost of
about one forward pass. The library is a set of pure functions of a model split
into ``features(params, x)`` and ``head(params, A)``.
"""
from . import methods, rescale
from . import lrp, shap  # LRP-epsilon transformation; Shapley values of activation maps
from .explain import explain, explainer
from .explanation import Attribution, Explanation, assemble
from .flax_split import SplitError, linen_split, nnx_split
from .methods.lift_cam import lift_cam_coefficients
from .model import Classifier, Preprocess, Split
from .tokens import TokenLayout
from .rescale import NoRescaleRule, deeplift, linearize

__version__ = "0.1.0"

# The rest of the library loads on first use (``liftcam_jax.batch.run(...)`` works
# after a plain ``import liftcam_jax``), keeping the import itself light.
_LAZY = ("batch", "bench", "data", "distributed", "evaluation", "files", "metrics", "viz", "cli", "errors", "image", "model", "explanation",
         "results", "runs", "primitives", "throughput")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Attribution",
    "Classifier",
    "Explanation",
    "NoRescaleRule",
    "Preprocess",
    "Split",
    "assemble",
    "deeplift",
    "explain",
    "explainer",
    "linen_split",
    "nnx_split",
    "SplitError",
    "TokenLayout",
    "lift_cam_coefficients",
    "linearize",
    "lrp",
    "methods",
    "rescale",
    "shap",
]
