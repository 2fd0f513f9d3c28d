"""Checkpoints: atomic writes, no pickles, clear errors for missing and damaged files."""

import os

import numpy as np
import pytest

import minidet as md
from minidet import nn


def test_save_and_load_round_trip(tmp_path):
    state = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int64(7),
             "tensor": md.tensor([1.0, 2.0])}
    md.save(state, tmp_path / "ckpt.npz")
    loaded = md.load(tmp_path / "ckpt.npz")
    assert loaded.keys() == state.keys()
    np.testing.assert_array_equal(loaded["conv.weight"], state["conv.weight"])
    assert loaded["conv.weight"].dtype == np.float32 and loaded["step"] == 7
    np.testing.assert_array_equal(loaded["tensor"], [1.0, 2.0])


def test_model_state_round_trip(tmp_path):
    conv = nn.Conv2d(3, 2, 3)
    md.save(conv.state_dict(), tmp_path / "conv.npz")
    other = nn.Conv2d(3, 2, 3)
    other.load_state_dict(md.load(tmp_path / "conv.npz"))
    np.testing.assert_array_equal(other.weight.numpy(), conv.weight.numpy())


def test_path_without_npz_suffix_is_used_as_given(tmp_path):
    md.save({"a": np.ones(1)}, tmp_path / "weights.ckpt")
    assert os.listdir(tmp_path) == ["weights.ckpt"]


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    md.save({"version": np.array(1)}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process is interrupted halfway through writing

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        md.save({"version": np.array(2)}, path)
    assert md.load(path)["version"] == 1
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_objects_are_refused(tmp_path):
    with pytest.raises(TypeError, match="'config' is a dict.*arrays only"):
        md.save({"config": {"lr": 0.1}}, tmp_path / "c.npz")


def test_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        md.load(tmp_path / "nope.npz")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_damaged_file_gives_a_clear_error(tmp_path, damage):
    path = tmp_path / "ckpt.npz"
    md.save({"w": np.random.default_rng(0).standard_normal(1000)}, path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"not a checkpoint at all"
    else:
        data = data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:]   # one corrupted byte inside the array
    path.write_bytes(data)
    with pytest.raises(ValueError, match="cannot be read: it is corrupt, truncated"):
        md.load(path)


def test_pickled_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds pickled objects"):
        md.load(path)


def test_checkpoint_has_the_usual_permissions_not_a_temp_files(tmp_path):
    umask = os.umask(0o022)
    try:
        md.save({"a": np.ones(1)}, tmp_path / "c.npz")
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "c.npz").st_mode & 0o777 == 0o644


def test_a_npy_file_or_a_folder_is_named_for_what_it_is(tmp_path):
    np.save(tmp_path / "weights.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"holds a single array \(a .npy file\), not the named arrays"):
        md.load(tmp_path / "weights.npy")
    with pytest.raises(IsADirectoryError, match="is a folder; give the .npz file in it"):
        md.load(tmp_path)
