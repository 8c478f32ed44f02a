"""Explaining datasets: sharded over devices, streamed, crash-safe and resumable (``liftcam-jax explain``).

The public face of :mod:`liftcam_jax.runs` for explaining: :func:`run` (see
:mod:`liftcam_jax.runs.explain` for the pipeline, the outputs and resume),
the run folder and its logs (:mod:`liftcam_jax.runs.folder`) and the shared
run loop (:mod:`liftcam_jax.runs.loop`)::

    from liftcam_jax import batch
    summary = batch.run(classifier, ["photos/", "tfds:imagenette:validation[:500]"],
                        method="lift-cam", out_dir="out/", batch_size=32)
"""
from .runs.explain import SAVE_MODES, RunConfig, RunSummary, output_paths, run
from .runs.folder import RunFolder, check_run_identity, manifest_name, merged_records, read_manifests, status
from .data import DataOptions
from .runs.loop import MAX_RESIZED_PIXELS, Entry, Meta, Progress, Reader, padded_size, run_loop

Summary = RunSummary  # the name before RunSummary (metrics.Summary is the mean and its interval)

__all__ = ["DataOptions", "Entry", "MAX_RESIZED_PIXELS", "Meta", "Progress", "Reader", "RunConfig", "RunFolder",
           "RunSummary", "SAVE_MODES", "Summary", "check_run_identity", "manifest_name", "merged_records",
           "output_paths", "padded_size", "read_manifests", "run", "run_loop", "status"]
