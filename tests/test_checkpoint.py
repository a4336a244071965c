"""Checkpoints: bit-exact round trips, and a clear CheckpointError for any damaged file."""
import json
import os
import struct

import pytest
import torch


from n2n_core import SGD, Adam, CheckpointError, build_model, load_checkpoint, save_checkpoint
from n2n_core.tensorfile import read_tensor_file, write_tensor_file


def _tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(5, generator=g),
        "c": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "big": torch.arange(10, dtype=torch.int64) * (2**40),
    }


def test_tensor_file_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "t.bin"
    tensors = _tensors()
    write_tensor_file(path, tensors, {"k": "v", "json": json.dumps({"x": [1, 2]})})
    back, meta = read_tensor_file(path)
    assert meta == {"k": "v", "json": json.dumps({"x": [1, 2]})}
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name].view(-1).view(torch.uint8) if t.numel() else back[name],
                           t.reshape(-1).view(torch.uint8) if t.numel() else t), name
    assert not [p for p in os.listdir(tmp_path) if p != "t.bin"], "temporary file left behind"


def test_tensor_file_layout_is_safetensors(tmp_path):
    """8-byte little-endian length, JSON header padded to 8, offsets into the data section."""
    path = tmp_path / "t.bin"
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    write_tensor_file(path, {"w": t}, {})
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0
    header = json.loads(blob[8 : 8 + n])
    assert header["w"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert blob[8 + n :] == struct.pack("<6f", *range(6))
    try:
        from safetensors.torch import load_file
    except ImportError:
        return
    assert torch.equal(load_file(str(path))["w"], t)


def _model_and_optimizer(name="seed", dtype=torch.float64, opt="adam", **kwargs):
    g = torch.Generator().manual_seed(0)
    model = build_model(name, generator=g, dtype=dtype, **kwargs)
    optimizer = Adam(model.parameters(), lr=1e-3) if opt == "adam" else SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad += torch.randn(p.shape, generator=g, dtype=dtype)
    optimizer.step()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, kwargs", [("seed", dict(width=4)), ("unet", dict(depth=2, width=4, residual=True))])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, dtype, name, kwargs, opt):
    model, optimizer = _model_and_optimizer(name, dtype, opt, **kwargs)
    gen = torch.Generator().manual_seed(42)
    torch.rand(3, generator=gen)
    config = {"lr": 1e-3, "noise": "gaussian:25", "steps": [1, 2], "nested": {"a": None}}
    path = tmp_path / "model.n2n"
    save_checkpoint(path, model, optimizer, step=1234, config=config,
                    extra_tensors={"rng": gen.get_state()}, extra={"best_psnr": 31.25})
    ck = load_checkpoint(path)

    assert ck.step == 1234 and ck.config == config and ck.extra == {"best_psnr": 31.25}
    assert ck.model_config == model.config and ck.model.config == model.config
    assert ck.model.size_multiple == model.size_multiple and ck.model.in_channels == 3
    for (k1, a), (k2, b) in zip(model.state_dict().items(), ck.model.state_dict().items()):
        assert k1 == k2 and a.dtype == b.dtype and torch.equal(a, b), k1
    saved, loaded = optimizer.state_dict(), ck.optimizer_state
    assert loaded["type"] == saved["type"] and loaded["hyperparams"] == saved["hyperparams"]
    assert set(loaded["state"]) == set(saved["state"]) and all(isinstance(k, int) for k in loaded["state"])
    for i, entry in saved["state"].items():
        assert set(loaded["state"][i]) == set(entry)
        for k, v in entry.items():
            w = loaded["state"][i][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w, (i, k)
    assert loaded["state"][0].get("step", 2) == 2
    restored = torch.Generator()
    restored.set_state(ck.extra_tensors["rng"])
    assert torch.equal(torch.rand(5, generator=restored), torch.rand(5, generator=gen))
    # the loaded optimizer state drives an identical next step
    optimizer2 = type(optimizer)(ck.model.parameters(), lr=0.5)
    optimizer2.load_state_dict(ck.optimizer_state)
    for p, q in zip(model.parameters(), ck.model.parameters()):
        p.grad.fill_(0.25)
        q.grad.fill_(0.25)
    optimizer.step()
    optimizer2.step()
    for p, q in zip(model.parameters(), ck.model.parameters()):
        assert torch.equal(p.data, q.data)


def test_loaded_model_computes_the_same(tmp_path):
    model, _ = _model_and_optimizer("seed", torch.float64, width=4)
    path = tmp_path / "m.n2n"
    save_checkpoint(path, model)
    ck = load_checkpoint(path)
    assert ck.optimizer_state is None and ck.step == 0 and ck.config is None
    x = torch.rand(2, 3, 8, 12, dtype=torch.float64)
    assert torch.equal(model(x), ck.model(x))


def test_load_does_not_touch_global_rng(tmp_path):
    model, _ = _model_and_optimizer("seed", torch.float32, width=4)
    path = tmp_path / "m.n2n"
    save_checkpoint(path, model)
    torch.manual_seed(7)
    load_checkpoint(path)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


@pytest.fixture
def saved(tmp_path):
    model, optimizer = _model_and_optimizer("seed", torch.float32, width=4)
    path = tmp_path / "good.n2n"
    save_checkpoint(path, model, optimizer, step=5, config={"a": 1})
    return path


def _expect_error(path, match=None):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value), f"error does not name the file: {info.value}"
    if match:
        assert match in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize("keep", [0, 4, 8, 9, 100, -1])
def test_truncated_file(saved, keep):
    blob = saved.read_bytes()
    keep = len(blob) + keep if keep < 0 else keep
    saved.write_bytes(blob[:keep])
    _expect_error(saved)


def test_empty_file(saved):
    saved.write_bytes(b"")
    _expect_error(saved, "truncated")


def test_garbage_file(saved):
    saved.write_bytes(os.urandom(4096))
    _expect_error(saved)
    saved.write_bytes(struct.pack("<Q", 16) + b"not json at all!" + b"\0" * 10)
    _expect_error(saved, "JSON")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.n2n", "cannot read")


def test_every_flipped_header_byte_is_caught(saved):
    blob = bytearray(saved.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    caught = 0
    positions = list(range(0, 8)) + list(range(8, 8 + n, max(1, n // 300)))
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        saved.write_bytes(bytes(damaged))
        try:
            load_checkpoint(saved)
        except CheckpointError as e:
            assert str(saved) in str(e)
            caught += 1
        else:
            # only a flip inside the whitespace padding may leave the content unchanged
            text = bytes(damaged[8 : 8 + n])
            assert damaged[pos] in b" !\t\n\r" and pos >= 8, f"flip at byte {pos} went unnoticed"
    assert caught >= len(positions) - 8


def test_flipped_data_byte_is_caught(saved):
    blob = bytearray(saved.read_bytes())
    blob[-3] ^= 0x40
    saved.write_bytes(bytes(blob))
    _expect_error(saved, "checksum")


def _rewrite_metadata(path, **changes):
    tensors, meta = read_tensor_file(path)
    meta.update(changes)
    write_tensor_file(path, tensors, meta)


def test_unknown_architecture(saved):
    _rewrite_metadata(saved, model_config=json.dumps({"name": "resnet-9000", "kwargs": {}}))
    err = _expect_error(saved, "unknown architecture 'resnet-9000'")
    assert "unet" in str(err)


def test_weights_that_do_not_fit(saved):
    _rewrite_metadata(saved, model_config=json.dumps({"name": "seed", "kwargs": {"width": 5}}))
    _expect_error(saved, "do not fit")
    _rewrite_metadata(saved, model_config=json.dumps({"name": "seed", "kwargs": {"colour": 5}}))
    _expect_error(saved, "cannot rebuild")


def test_bad_metadata(saved):
    _rewrite_metadata(saved, step="twelve")
    _expect_error(saved, "'step' is not valid JSON")
    _rewrite_metadata(saved, step="-3")
    _expect_error(saved, "step")
    _rewrite_metadata(saved, step="1", format="something-else")
    _expect_error(saved, "not an n2n checkpoint")


def test_atomic_write_keeps_old_file_on_failure(saved):
    before = saved.read_bytes()
    model = build_model("seed", width=4)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(saved, model, config={"bad": object()})
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_save_rejects_models_without_config(tmp_path):
    from n2n_core import Sequential
    with pytest.raises(TypeError, match="build_model"):
        save_checkpoint(tmp_path / "x.n2n", Sequential())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_and_map_location(tmp_path):
    model = build_model("unet", depth=2, width=4, device="cuda", generator=torch.Generator().manual_seed(0))
    optimizer = Adam(model.parameters())
    for p in model.parameters():
        p.grad += 0.5
    optimizer.step()
    path = tmp_path / "cuda.n2n"
    save_checkpoint(path, model, optimizer, step=3)
    for where in ["cpu", "cuda"]:
        ck = load_checkpoint(path, map_location=where)
        for (name, a), b in zip(model.state_dict().items(), ck.model.parameters()):
            assert b.data.device.type == where and torch.equal(a.cpu(), b.data.cpu()), name
        assert ck.optimizer_state["state"][0]["exp_avg"].device.type == where


# -- untrusted files cost bounded memory and time ---------------------------------------
LOAD_UNDER_3GB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from n2n_core import CheckpointError, load_checkpoint
try:
    load_checkpoint(sys.argv[1])
except CheckpointError as e:
    print("CheckpointError:", e)
else:
    print("loaded")
"""


def _load_in_3gb(path) -> str:
    """Load `path` in a fresh process limited to 3 GiB of address space; its output."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LOAD_UNDER_3GB, str(path)], capture_output=True, text=True,
                            timeout=120)
    return (result.stdout + result.stderr).strip()


def test_architecture_arguments_asking_for_gigabytes_are_refused_before_allocating(tmp_path):
    path = tmp_path / "wide.n2n"
    save_checkpoint(path, build_model("unet", depth=2, width=8))
    # checksum-valid: only the arguments lie; width 40000 would need 57 GB per convolution
    _rewrite_metadata(path, model_config=json.dumps({"name": "unet", "kwargs": {"depth": 2, "width": 40000}}))
    out = _load_in_3gb(path)
    assert out.startswith("CheckpointError:") and str(path) in out, out
    assert "'enc_conv0.weight' is [8, 3, 3, 3] in the file, the architecture needs [40000, 3, 3, 3]" in out
    _rewrite_metadata(path, model_config=json.dumps({"name": "unet", "kwargs": {"depth": 10**9, "width": 8}}))
    out = _load_in_3gb(path)  # a billion levels: refused at the first missing tensor
    assert out.startswith("CheckpointError:") and "weights do not fit" in out, out


def test_a_device_a_fifo_or_a_directory_is_not_read(tmp_path):
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path, kind in (("/dev/zero", "device"), (fifo, "FIFO"), (tmp_path, "directory")):
        out = _load_in_3gb(path)
        assert out.startswith(f"CheckpointError: {path}: not a regular file") and kind in out, out


def test_file_and_header_sizes_are_capped(tmp_path):
    from n2n_core.tensorfile import MAX_FILE_BYTES, MAX_HEADER_BYTES

    huge = tmp_path / "huge.n2n"
    with open(huge, "wb") as f:  # sparse: no disk used, but reading it would need 4 GiB + 1
        f.truncate(MAX_FILE_BYTES + 1)
    out = _load_in_3gb(huge)
    assert out.startswith(f"CheckpointError: {huge}: file is {MAX_FILE_BYTES + 1} bytes, over the limit"), out
    small = tmp_path / "small.n2n"
    save_checkpoint(small, build_model("seed", width=4))
    with pytest.raises(CheckpointError, match="over the limit of 100 bytes"):
        load_checkpoint(small, max_bytes=100)
    header = tmp_path / "header.n2n"
    header.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 8) + b" " * 64)
    _expect_error(header, f"header length {MAX_HEADER_BYTES + 8} is over the limit")


def test_load_from_bytes_names_the_given_name(saved):
    data = saved.read_bytes()
    from_path, from_bytes = load_checkpoint(saved), load_checkpoint(data, name="shipped.n2n")
    assert from_bytes.step == from_path.step == 5 and from_bytes.config == {"a": 1}
    for (k, a), (_, b) in zip(from_path.model.state_dict().items(), from_bytes.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_checkpoint(memoryview(data)).step == 5
    damaged = bytearray(data)
    damaged[-3] ^= 0x40
    with pytest.raises(CheckpointError, match=r"^shipped\.n2n: checksum mismatch"):
        load_checkpoint(bytes(damaged), name="shipped.n2n")
    with pytest.raises(CheckpointError, match=r"^<bytes>: truncated"):
        load_checkpoint(b"\x01")
    tensors, metadata = read_tensor_file(data, name="x")
    assert metadata["format"] == "n2n-checkpoint" and tensors


def test_committed_resume_checkpoint_steps_the_same_flat_or_per_parameter(tmp_path):
    """The committed models/default-resume checkpoint resumes into the flat update with the same
    numbers as into the per-parameter one, and the flat update's state saves in the form the loop loads."""
    from pathlib import Path

    from pipeline.training.flat import FlatParameters

    (path,) = (Path(__file__).resolve().parents[1] / "models" / "default-resume").glob("step-*.n2n")
    ck = load_checkpoint(path)
    runs = {}
    for flat in (True, False):
        model = build_model(ck.model_config.name, **ck.model_config.kwargs)
        model.load_state_dict(ck.model.state_dict())
        if flat:
            FlatParameters(model)  # the driver's layout: weights and grads in one buffer each
        optimizer = Adam(model.parameters(), lr=0.0, flat=flat)
        optimizer.load_state_dict(ck.optimizer_state)
        assert optimizer.lr == ck.optimizer_state["hyperparams"]["lr"]
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in model.parameters():
                p.grad.copy_(torch.randn(p.shape, generator=g) * 1e-3)
            optimizer.step()
        runs[flat] = model, optimizer
    (flat_model, flat_opt), (loop_model, loop_opt) = runs[True], runs[False]
    assert flat_opt._view is not None and flat_opt._view.state, "the flat update was not used"
    for (name, a), b in zip(flat_model.state_dict().items(), loop_model.state_dict().values()):
        assert torch.equal(a, b), f"{name}: flat and per-parameter Adam differ after resuming"
    assert flat_opt.state_dict()["state"][0]["step"] == ck.optimizer_state["state"][0]["step"] + 3
    save_checkpoint(tmp_path / "flat.n2n", flat_model, flat_opt, step=ck.step + 3)
    back = load_checkpoint(tmp_path / "flat.n2n").optimizer_state
    expected = loop_opt.state_dict()
    assert set(back["state"]) == set(expected["state"])
    for i, entry in expected["state"].items():
        for k, v in entry.items():
            w = back["state"][i][k]
            assert (torch.equal(v, w) and v.shape == w.shape) if isinstance(v, torch.Tensor) else v == w, (i, k)
    Adam(loop_model.parameters(), flat=False).load_state_dict(back)  # and the loop loads it
