"""CAM methods. Each module registers its methods in :mod:`.registry`."""
from .registry import (Method, MethodList, MethodSpec, UnknownMethodError, get, names, parse_method_spec, parse_names,
                       register, resolve, spec_label)
from . import lift_cam  # noqa: F401  (registers lift-cam, deeplift-shap-cam)
from . import cams, perturbation  # noqa: F401  (cam, grad-cam, grad-cam++, xgrad-cam, layer-cam, hires-cam, eigen-cam, score-cam, ablation-cam)
from . import lrp_cam  # noqa: F401  (registers lrp-cam)
from . import lime_cam  # noqa: F401  (registers lime-cam)
from . import shapley_cam  # noqa: F401  (registers shapley-cam)

__all__ = ["Method", "MethodList", "MethodSpec", "UnknownMethodError", "get", "names", "parse_method_spec", "parse_names",
           "register", "resolve", "spec_label"]
