"""Deprecated alias of :mod:`liftcam_jax.files` (the old name shadowed the standard library's ``io``)."""
from .files import *  # noqa: F401,F403
from .files import __all__  # noqa: F401
