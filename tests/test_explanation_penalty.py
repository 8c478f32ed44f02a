"""The optax example (examples/explanation_penalty.py): a LIFT-CAM penalty in the loss moves the map onto
the object and the model off the corner shortcut. Fixed seeds; the thresholds below are the claims."""
import importlib.util
import os

import pytest

pytest.importorskip("optax")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                     "explanation_penalty.py")
_spec = importlib.util.spec_from_file_location("explanation_penalty", _PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def test_the_penalty_moves_the_map_and_the_model_off_the_shortcut():
    plain, penalised = example.run(weight=1.0, seed=0)
    # both learn the training distribution
    assert plain.accuracy >= 0.95 and penalised.accuracy >= 0.95
    # without the penalty: the map lies mostly outside the object, and the corner patch decides
    assert plain.outside > 0.5 and plain.flipped_accuracy < 0.3
    # with it: the map is on the object, and flipping the patch no longer fools the model
    assert penalised.outside < 0.1 and penalised.flipped_accuracy > 0.9
