"""Runs over many inputs: ``explain`` and ``evaluate``, resumable, sharded, on one or several hosts.

* :mod:`.folder`: the output folder, its identity (``run.json``), one log per
  process named the same way for every command, merged records, status;
* :mod:`.loop`: reading and batching (:class:`~.loop.Entry`), the run loop,
  padding, label mapping, and the one compiled sharded explain step;
* :mod:`.explain`: :func:`~.explain.run`, what ``liftcam-jax explain`` does;
* :mod:`.evaluate`: :func:`~.evaluate.evaluate`, what ``liftcam-jax evaluate`` does.

:mod:`liftcam_jax.batch` and :mod:`liftcam_jax.evaluation` are their public faces.
"""
