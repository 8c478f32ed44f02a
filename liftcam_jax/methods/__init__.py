"""CAM methods. Each module registers its methods in :mod:`.registry`."""
from .registry import Method, UnknownMethodError, get, names, register
from . import lift_cam  # noqa: F401  (registers lift-cam, deeplift-shap-cam)

__all__ = ["Method", "UnknownMethodError", "get", "names", "register"]
