"""ShapleyCAM's and Grad-CAM's channel weights against their Shapley readings, beside LIFT-CAM.

For the first N labelled images of a folder, at one split of a zoo model and for one score
(the class logit or ReST), against permutation SHAP values of the channel game (the
estimator and key that ``liftcam-jax evaluate --metrics shap`` uses, batch by batch):

* ``lift-cam``: its coefficients (DeepLIFT's channel contributions);
* ``grad-cam`` / ``shapley-cam``: their weights ``w_k = mean_ij(g)`` and
  ``mean_ij(g - H A / 2)`` (what their maps weight each channel with);
* ``grad x A`` / ``shapley-cam x A``: the same terms summed against the activations,
  ``sum_ij A (g)`` and ``sum_ij A (g - H A / 2)``: the channel totals of the first- and
  second-order Taylor readings of the Shapley value that ShapleyCAM's paper gives per
  activation (Cai, arXiv 2501.06261).

Prints the mean cosine with the SHAP values (and a Student-t 95% half-width) per reading.
Usage: python docs/runs/shapley_cam_readings.py DATA MODEL LAYER SCORE N
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import liftcam_jax as lj
import models
from liftcam_jax import metrics, shap, targets
from liftcam_jax.data import open_labelled
from liftcam_jax.methods.shapley_cam import shapley_terms


def main(data, model, layer, score_name, n, samples=32, batch=4):
    clf = models.load(model, layer=layer)
    source = open_labelled(data)
    items = source.items[:n]
    score = targets.SCORES[score_name]
    explain = jax.jit(lambda p, x, t: lj.explain(clf.split, p, x, t, method="lift-cam", score=score_name).coefficients)
    feats = jax.jit(clf.split.features)
    terms = jax.jit(lambda p, a, t: shapley_terms(clf.split.head, p, a, score(t)))
    values = jax.jit(lambda p, a, t: shap.shap_values(clf.split.head, p, a, score(t), method="permutation",
                                                      num_samples=samples, key=jax.random.PRNGKey(0)).values)
    rows = {k: [] for k in ("lift-cam", "grad-cam", "shapley-cam", "grad x A", "shapley-cam x A")}
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        examples = [read() for _, read in source.read(part)]
        x = np.stack([clf.preprocess(e.image) for e in examples])
        t = jnp.asarray([e.label for e in examples], jnp.int32)
        a = feats(clf.params, x)
        phi = values(clf.params, a, t)
        g, hvp = terms(clf.params, a, t)
        readings = {"lift-cam": explain(clf.params, x, t), "grad-cam": g.mean((1, 2)),
                    "shapley-cam": (g - 0.5 * hvp).mean((1, 2)), "grad x A": (a * g).sum((1, 2)),
                    "shapley-cam x A": (a * (g - 0.5 * hvp)).sum((1, 2))}
        for k, c in readings.items():
            rows[k] += list(np.asarray(metrics.cosine_similarity(c, phi)))
    print(f"{model} at {layer}, {score_name} game, {len(items)} images, SHAP {samples} permutations:")
    for k, v in rows.items():
        v = np.asarray(v)
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
        print(f"| {k} | {v.mean():.4f} ± {half:.4f} |")


if __name__ == "__main__":
    d, m, layer, s, n = sys.argv[1:6]
    main(d, m, layer, s, int(n))
