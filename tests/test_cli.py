"""The `minidet` command."""

import re

import pytest

from minidet.cli import main


def test_demo_trains_and_draws_its_loss_curve(tmp_path, capsys):
    assert main(["demo", "--steps", "120", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert losses[-1] < 0.1 * losses[0]
    accuracy = float(re.search(r"held-out accuracy ([\d.]+)%", out).group(1))
    assert accuracy > 95
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_unknown_flag_is_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--stepz", "3"])
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys):
    from minidet import backend
    if backend.cuda_available():
        pytest.skip("a GPU is present")
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minidet demo: device 'cuda' asked for, but no CUDA GPU is usable")
