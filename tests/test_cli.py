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


# --- minidet convert ---------------------------------------------------------------------------------------------

def test_convert_a_missing_file_is_one_clear_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere.pth"), str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert err == f"minidet convert: {str(tmp_path / 'nowhere.pth')!r} does not exist; give the path of the .pth file\n"


def test_convert_without_torch_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import sys

    (tmp_path / "weights.pth").write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` now fails, as where it is not installed
    assert main(["convert", str(tmp_path / "weights.pth"), str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minidet convert: reading a .pth file needs PyTorch") and err.count("\n") == 1
    assert "pip install torch" in err
    assert not (tmp_path / "out.npz").exists()


def test_convert_refuses_what_is_not_a_torchvision_retinanet(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    torch.save({"conv.weight": torch.zeros(2, 3)}, tmp_path / "other.pth")
    torch.save({"model": {"conv.weight": torch.zeros(2, 3)}, "epoch": 3}, tmp_path / "checkpoint.pth")
    torch.save(torch.nn.Conv2d(3, 2, 1), tmp_path / "module.pth")       # a whole module, not its state dict

    assert main(["convert", str(tmp_path / "garbage.pth"), str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert "cannot be read by torch.load(weights_only=True); is it a file torch.save wrote?" in err
    assert err.count("\n") == 1
    assert main(["convert", str(tmp_path / "module.pth"), str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert "holds Python objects besides tensors (torch.nn.modules.conv.Conv2d: a whole model" in err
    assert err.count("\n") == 1
    assert main(["convert", str(tmp_path / "other.pth"), str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minidet convert: not a state dict of torchvision's retinanet_resnet50_fpn (v1; v2 is not "
                          "supported): missing 301 keys: backbone.body.conv1.weight, ")
    assert err.endswith("; unexpected 1 key: conv.weight\n") and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "checkpoint.pth"), str(tmp_path / "out.npz")]) == 1
    assert "is not a state dict of tensors: 'model' holds a dict" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.reference
def test_convert_writes_a_checkpoint_that_loads(torchvision, tmp_path, capsys):
    """torchvision's own state dict, saved by torch.save (354 entries, the counters included), converted with the
    default eps and with --eps 1e-5; each file loads into minidet's model with that eps."""
    import numpy as np
    import torch

    import minidet as md
    from minidet.models import RetinaNet, load_torchvision_weights
    from minidet.nn import FrozenBatchNorm2d

    tv_model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                                                   num_classes=3)
    torch.save(tv_model.state_dict(), tmp_path / "weights.pth")
    model = RetinaNet(3, backbone="resnet50", preset="torchvision")
    for flags, eps in [([], 0.0), (["--eps", "1e-5"], 1e-5)]:
        assert main(["convert", str(tmp_path / "weights.pth"), str(tmp_path / "out.npz"), *flags]) == 0
        out = capsys.readouterr().out
        assert out.startswith("converted 301 tensors of torchvision's retinanet_resnet50_fpn (3 classes, frozen "
                              f"batch norm eps {eps:g}) to ")
        state = md.load(tmp_path / "out.npz")
        assert len(state) == 302 and state["frozen_bn_eps"] == eps
        load_torchvision_weights(model, state)
        assert {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)} == {eps}
        np.testing.assert_array_equal(model.fpn.lateral5.weight.numpy(),
                                      tv_model.backbone.fpn.inner_blocks[2][0].weight.detach().numpy())
        np.testing.assert_array_equal(model.backbone.layer4[2].bn3.running_var,
                                      tv_model.backbone.body.layer4[2].bn3.running_var.numpy())
