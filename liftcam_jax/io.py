"""Deprecated alias of :mod:`liftcam_jax.files` (the old name shadowed the standard library's ``io``)."""
import sys

from . import files

sys.modules[__name__] = files
