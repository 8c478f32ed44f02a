"""The ``tfds_batch`` notebook on a TFRecord dataset, as ``tfds.load`` prepares one on Colab (TensorFlow tier)."""
from __future__ import annotations

import glob
import os
import sys

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow tier: needs tensorflow (pip install tensorflow-cpu==2.21.0; "
                                         ".ci/run installs it)")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import test_notebooks  # noqa: E402


@pytest.mark.slow
def test_tfds_batch_notebook_reads_a_sharded_tfrecord_split(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTCAM_NOTEBOOK_TFDS_FORMAT", "tfrecord")
    test_notebooks.test_notebook_runs_on_cpu("tfds_batch.ipynb", tmp_path, monkeypatch)
    data_dir = tmp_path / "liftcam-out" / "tensorflow_datasets"  # the notebook's TFDS_DATA_DIR, under OUT_ROOT
    shards = glob.glob(str(data_dir / "**" / "*.tfrecord-*"), recursive=True)
    assert len(shards) == 2 and not glob.glob(str(data_dir / "**" / "*.array_record-*"), recursive=True)
