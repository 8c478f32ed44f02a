"""Bench LIFT-CAM on flaxmodels' ResNet-50 split with lj.linen_split at its last block.

Run from the repository root:
    python docs/bench/flaxmodels_resnet50.py
Writes docs/bench/flaxmodels_resnet50_b1.json and .md.
"""
import sys

import jax
import jax.numpy as jnp

import flaxmodels as fm
import liftcam_jax as lj
from liftcam_jax import bench

net = fm.ResNet50(output="logits", pretrained=None, normalize=False)
variables = jax.jit(lambda k, x: net.init(k, x, train=False))(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
split = lj.linen_split(net, "Bottleneck_15", train=False)
split.features(variables, jnp.zeros((1, 224, 224, 3)))  # the head learns the input shape
report = bench.bench(split, variables, (224, 224, 3), ("lift-cam", "grad-cam"), (1,), repeats=9, warmup=1,
                     model="flaxmodels ResNet50", layer="Bottleneck_15", weights="random (flax init)",
                     command="python docs/bench/flaxmodels_resnet50.py", log=lambda m: print(m, file=sys.stderr))
with open("docs/bench/flaxmodels_resnet50_b1.json", "w") as f:
    f.write(report.to_json())
with open("docs/bench/flaxmodels_resnet50_b1.md", "w") as f:
    f.write(bench.markdown(report))
print(bench.markdown(report))
