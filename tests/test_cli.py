"""The `minidet` command."""

import argparse
import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import minidet as md
from minidet.cli import build_parser, main
from minidet.data import read_image
from minidet.evaluate import predict_images
from minidet.train import load_trained_model

TINY_DEMO = ["--train-images", "8", "--val-images", "4", "--epochs", "1", "--image-size", "64"]
TINY_TRAIN = ["--epochs", "1", "--batch-size", "4", "--image-size", "64", "--num-images", "6"]


def read_png(path):
    data = Path(path).read_bytes()
    assert data.startswith(b"\x89PNG"), f"{path} is not a PNG"
    return matplotlib.image.imread(path)


def test_demo_trains_evaluates_and_writes_pictures_and_a_report(tmp_path, capsys):
    assert main(["demo", *TINY_DEMO, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"trained 1 step in \d+ s: loss \d\.\d{3} -> \d\.\d{3}", out)
    assert re.search(r"done in \d+ s: AP50 \d\.\d{3}, AP \d\.\d{3}", out)
    for name in ("loss.png", "detections.png", "precision_recall.png", "anchors.png"):
        assert read_png(tmp_path / name).size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"ap", "ap50", "ap75", "per_class_ap"} <= set(metrics)
    assert set(metrics["per_class_ap"]) == {"circle", "square", "triangle", "cross"}
    report = (tmp_path / "report.md").read_text()
    assert f"AP50 {metrics['ap50']:.3f}" in report and "detections.png" in report
    assert (tmp_path / "last.npz").exists()


def test_every_flag_of_every_command_is_explained():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"demo", "make-shapes", "train", "evaluate", "detect", "inspect-anchors",
                                     "convert"}
    for name, command in commands.choices.items():
        assert command.description, f"{name} has no description"
        for action in command._actions:
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings or action.dest}: no help"


def test_unknown_flag_is_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--stepz", "3"])
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, setting", [("--lr", "-1", "lr"), ("--batch-size", "0", "batch_size"),
                                                  ("--clip-grad-norm", "-1", "clip_grad_norm"),
                                                  ("--epochs", "0", "epochs"),
                                                  ("--multiscale-sizes", "64,4", "multiscale_sizes")])
def test_a_bad_training_setting_is_one_clear_line(tmp_path, capsys, flag, value, setting):
    assert main(["train", flag, value, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minidet train: {flag} (TrainConfig.{setting}) must be ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()                 # nothing was started


def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys):
    from minidet import backend
    if backend.cuda_available():
        pytest.skip("a GPU is present")
    assert main(["demo", *TINY_DEMO, "--device", "cuda", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minidet demo: device 'cuda' asked for, but no CUDA GPU is usable")
    assert err.count("\n") == 1


def test_training_on_a_make_shapes_folder_equals_training_on_the_generator(tmp_path):
    assert main(["make-shapes", str(tmp_path / "data"), "--num-images", "6", "--image-size", "64", "--seed", "3"]) == 0
    assert main(["train", "--data", str(tmp_path / "data"), *TINY_TRAIN, "--seed", "3",
                 "--out", str(tmp_path / "from_folder")]) == 0
    assert main(["train", *TINY_TRAIN, "--seed", "3", "--out", str(tmp_path / "from_generator")]) == 0
    from_folder, from_generator = md.load(tmp_path / "from_folder" / "last.npz"), md.load(
        tmp_path / "from_generator" / "last.npz")
    weights = [name for name in from_folder if name.startswith("model.")]
    assert len(weights) > 50
    for name in weights:
        np.testing.assert_array_equal(from_folder[name], from_generator[name], err_msg=name)


def test_make_shapes_does_not_overwrite_a_dataset(tmp_path, capsys):
    assert main(["make-shapes", str(tmp_path), "--num-images", "2", "--image-size", "32"]) == 0
    assert main(["make-shapes", str(tmp_path), "--num-images", "2", "--image-size", "32"]) == 1
    assert "already holds a dataset" in capsys.readouterr().err


def test_train_refuses_to_replace_a_run_but_resumes_it(tmp_path, capsys):
    run = ["train", *TINY_TRAIN, "--out", str(tmp_path)]
    assert main(run) == 0
    assert (tmp_path / "loss.png").exists()
    assert main(run) == 1
    assert "add --resume to continue that run, --overwrite to start again" in capsys.readouterr().err
    assert main([*run[:2], "2", *run[3:], "--resume"]) == 1          # --epochs 2 is another run: refused
    assert "cannot resume exactly with different settings: epochs (1 in the checkpoint, 2 now)" in \
        capsys.readouterr().err
    assert main([*run, "--overwrite"]) == 0


def test_evaluate_and_detect_a_trained_checkpoint(tmp_path, capsys):
    assert main(["train", *TINY_TRAIN, "--out", str(tmp_path / "run")]) == 0
    checkpoint = str(tmp_path / "run" / "last.npz")
    assert main(["evaluate", checkpoint, "--num-images", "3", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "held-out shapes images of 64 px" in out and "AP50" in out
    assert read_png(tmp_path / "eval" / "precision_recall.png").size > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["ap"] >= 0

    assert main(["make-shapes", str(tmp_path / "data"), "--num-images", "2", "--image-size", "64"]) == 0
    assert main(["detect", checkpoint, str(tmp_path / "data" / "images"), "--score-thresh", "0.05",
                 "--out", str(tmp_path / "det")]) == 0
    records = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["000000.png", "000001.png"]
    for record in records:
        assert read_png(tmp_path / "det" / Path(record["image"]).name).shape[:2] == (64, 64)
        for found in record["detections"]:
            assert found["score"] > 0.05 and found["class"] in ("circle", "square", "triangle", "cross")
            x1, y1, x2, y2 = found["box"]
            assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64


def test_detect_and_evaluate_name_missing_files_in_one_line(tmp_path, capsys):
    assert main(["detect", str(tmp_path / "none.npz"), str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"minidet detect: the folder {str(tmp_path)!r} holds no images")
    assert main(["evaluate", str(tmp_path / "none.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minidet evaluate: ") and "none.npz" in err and err.count("\n") == 1


def test_inspect_anchors_reports_the_unmatchable_share_and_draws(tmp_path, capsys):
    assert main(["inspect-anchors", "--num-images", "4", "--image-size", "64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"unmatchable \(best IoU < 0.5\): \d+ of \d+ boxes", out)
    assert read_png(tmp_path / "anchor_report.png").size > 0
    assert read_png(tmp_path / "matched_anchors.png").size > 0


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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint trained one step on shapes of 64 px, and a COCO-format folder of 3 such images."""
    root = tmp_path_factory.mktemp("tiny_run")
    assert main(["train", *TINY_TRAIN, "--out", str(root / "run")]) == 0
    assert main(["make-shapes", str(root / "data"), "--num-images", "3", "--image-size", "64"]) == 0
    return root / "run" / "last.npz", root / "data"


def test_the_coco_layout_images_and_annotations_apart(tmp_path, tiny_run, capsys):
    checkpoint, data = tiny_run
    # COCO's own layout: the images in a folder of their own, file names with a sub-folder, the JSON elsewhere.
    coco = json.loads((data / "annotations.json").read_text())
    (tmp_path / "val2017" / "part").mkdir(parents=True)
    for entry in coco["images"]:
        (tmp_path / "val2017" / "part" / entry["file_name"]).write_bytes((data / "images" / entry["file_name"])
                                                                         .read_bytes())
        entry["file_name"] = "part/" + entry["file_name"]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    layout = ["--images", str(tmp_path / "val2017"), "--annotations",
              str(tmp_path / "annotations" / "instances_val2017.json")]
    assert main(["evaluate", str(checkpoint), *layout, "--out", str(tmp_path / "a")]) == 0
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert (json.loads((tmp_path / "a" / "metrics.json").read_text())
            == json.loads((tmp_path / "b" / "metrics.json").read_text()))
    assert main(["inspect-anchors", *layout, "--out", str(tmp_path / "c")]) == 0

    for args, message in [(layout[:2], "--images needs --annotations FILE too"),
                          (layout[2:], "--annotations needs --images DIR too"),
                          (["--data", str(data), *layout], "give either --data FOLDER")]:
        assert main(["evaluate", str(checkpoint), *args, "--out", str(tmp_path / "d")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("minidet evaluate: ") and message in err and err.count("\n") == 1, err


def test_evaluate_matches_classes_by_name_and_refuses_other_classes(tmp_path, tiny_run, capsys):
    checkpoint, data = tiny_run
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "same")]) == 0
    coco = json.loads((data / "annotations.json").read_text())
    # The same classes listed in another order: category ids reversed, so label k is another class.
    new_id = {c["id"]: 5 - c["id"] for c in coco["categories"]}
    for c in coco["categories"]:
        c["id"] = new_id[c["id"]]
    for a in coco["annotations"]:
        a["category_id"] = new_id[a["category_id"]]
    (tmp_path / "reordered.json").write_text(json.dumps(coco))
    assert main(["evaluate", str(checkpoint), "--images", str(data / "images"), "--annotations",
                 str(tmp_path / "reordered.json"), "--out", str(tmp_path / "reordered")]) == 0
    assert "another order" in capsys.readouterr().out
    same, reordered = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("same", "reordered"))
    assert same["ap"] == reordered["ap"] and same["per_class_ap"] == reordered["per_class_ap"]

    coco["categories"][0]["name"] = "dog"
    (tmp_path / "other.json").write_text(json.dumps(coco))
    assert main(["evaluate", str(checkpoint), "--images", str(data / "images"), "--annotations",
                 str(tmp_path / "other.json"), "--out", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minidet evaluate: the model was trained on the classes") and "'dog'" in err
    assert err.count("\n") == 1 and not (tmp_path / "other" / "metrics.json").exists()


def test_size_flags_resize_and_detections_stay_in_original_pixels(tmp_path, tiny_run, capsys):
    checkpoint, data = tiny_run
    model, saved = load_trained_model(checkpoint)
    assert (saved.min_size, saved.max_size) == (None, 512)                  # the defaults, saved with the run
    big = np.kron(matplotlib.image.imread(data / "images" / "000000.png")[:, :, :3], np.ones((3, 5, 1)))  # 192x320
    matplotlib.image.imsave(tmp_path / "big.png", big)
    image = read_image(tmp_path / "big.png")
    model.score_thresh = 0.01
    for flags, sizes in [([], (None, 512)), (["--max-size", "64"], (None, 64)),
                         (["--min-size", "32", "--max-size", "none"], (32, None))]:
        assert main(["detect", str(checkpoint), str(tmp_path / "big.png"), "--score-thresh", "0.01",
                     "--out", str(tmp_path / "det"), *flags]) == 0
        found = json.loads((tmp_path / "det" / "detections.json").read_text())[0]["detections"]
        expected, = predict_images(model, [image], min_size=sizes[0], max_size=sizes[1])
        assert len(found) == len(expected["boxes"]) > 0
        np.testing.assert_allclose([d["box"] for d in found], expected["boxes"], atol=0.006)
        boxes = expected["boxes"]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 320).all() and (boxes[:, [1, 3]] <= 192).all()
        if flags:      # resized to at most 64 px wide, then mapped back to the 320 px of the original
            assert boxes[:, 2].max() > 64
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["detect", str(checkpoint), str(tmp_path / "big.png"), "--max-size", "big"])
    assert "'big' is not a whole number of pixels or 'none'" in capsys.readouterr().err
    assert main(["train", *TINY_TRAIN, "--min-size", "600", "--max-size", "500", "--out", str(tmp_path / "r")]) == 1
    assert "--min-size (TrainConfig.min_size) must be at most max_size (500), got 600" in capsys.readouterr().err


def test_small_objects_get_fitted_anchors_unless_told_otherwise(tmp_path, capsys):
    data = str(tmp_path / "small")
    assert main(["make-shapes", data, "--num-images", "6", "--image-size", "64", "--object-sizes", "8", "16"]) == 0
    assert "objects of 8 to 16 px" in capsys.readouterr().out
    assert main(["inspect-anchors", "--data", data, "--out", str(tmp_path / "anchors")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fitted anchors: sizes [\d.,]+ px \(P3-P7\), aspect ratios [\d.,]+: unmatchable boxes "
                     r"100\.0% -> \d+\.\d%", out), out
    fitted_flags = re.search(r"--anchor-sizes \S+ --aspect-ratios \S+", out).group(0).split()

    run = ["train", "--data", data, "--epochs", "1", "--batch-size", "3"]
    assert main([*run, "--out", str(tmp_path / "auto")]) == 0
    assert "Training with anchors fitted to the boxes instead" in capsys.readouterr().out
    auto = load_trained_model(tmp_path / "auto" / "last.npz")[1]
    assert auto.anchor_sizes == [float(v) for v in fitted_flags[1].split(",")]
    assert main([*run, *fitted_flags, "--out", str(tmp_path / "given")]) == 0      # inspect-anchors' advice
    given = load_trained_model(tmp_path / "given" / "last.npz")[1]
    assert given.anchor_sizes == auto.anchor_sizes
    np.testing.assert_allclose(given.aspect_ratios, auto.aspect_ratios, rtol=1e-5)
    assert main([*run, "--no-auto-anchors", "--out", str(tmp_path / "preset")]) == 0
    assert "anchors:" not in capsys.readouterr().out
    assert load_trained_model(tmp_path / "preset" / "last.npz")[1].anchor_sizes is None

    with pytest.raises(SystemExit):
        main([*run, "--aspect-ratios", "1:2"])
    assert "'1:2' is not a comma-separated list of numbers" in capsys.readouterr().err
    assert main([*run, "--anchor-sizes", "16,32", "--out", str(tmp_path / "bad")]) == 1
    assert "--anchor-sizes (TrainConfig.anchor_sizes) must be None or 5 increasing" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    run = ["train", *TINY_TRAIN, "--out", str(tmp_path / "run")]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minidet.cli.train", interrupted)
    assert main(run) == 130
    assert capsys.readouterr().err == ("minidet train: interrupted (Ctrl-C) before the first checkpoint; run the "
                                       "command again to start over\n")
    monkeypatch.undo()
    assert main(run) == 0
    monkeypatch.setattr("minidet.cli.train", interrupted)
    assert main([*run, "--resume"]) == 130
    err = capsys.readouterr().err
    assert "holds the run after step 2: run the same command with --resume to continue it exactly" in err
    assert err.count("\n") == 1

    assert main(["evaluate", str(tmp_path / "none.npz")]) == 1
    with pytest.raises(FileNotFoundError, match="none.npz"):
        main(["evaluate", str(tmp_path / "none.npz"), "--debug"])


def bad_invocations(tmp_path, checkpoint, data):
    """(argv, what the one-line message must hold) for every command: missing files, folders given as files and
    files as folders, and values out of range."""
    missing, a_file, a_folder = str(tmp_path / "missing"), str(tmp_path / "note.txt"), str(tmp_path)
    images = str(data / "images")
    return [
        (["demo", "--epochs", "0", "--out", a_folder + "/d"], "--epochs (TrainConfig.epochs) must be"),
        (["demo", "--train-images", "0", "--out", a_folder + "/d"], "--train-images (TrainConfig.num_images) must be"),
        (["demo", "--val-images", "0", "--out", a_folder + "/d"], "--val-images"),
        (["demo", "--image-size", "10", "--out", a_folder + "/d"], "--image-size (TrainConfig.image_size)"),
        (["make-shapes", a_file], a_file),
        (["make-shapes", a_folder + "/s", "--num-images", "0"], "--num-images"),
        (["make-shapes", a_folder + "/s", "--object-sizes", "50", "10"], "min_size"),
        (["train", "--data", missing, "--out", a_folder + "/t"], missing),
        (["train", "--data", a_file, "--out", a_folder + "/t"], a_file),
        (["train", "--images", images, "--annotations", missing, "--out", a_folder + "/t"], missing),
        (["train", "--images", a_file, "--annotations", str(data / "annotations.json"), "--out", a_folder + "/t"],
         a_file),
        (["train", "--lr", "-1", "--out", a_folder + "/t"], "--lr (TrainConfig.lr) must be"),
        (["train", "--num-images", "0", "--out", a_folder + "/t"], "--num-images (TrainConfig.num_images)"),
        (["train", *TINY_TRAIN, "--out", a_file], a_file),
        (["evaluate", missing], missing),
        (["evaluate", a_folder], "is a folder"),
        (["evaluate", a_file], a_file),
        (["evaluate", checkpoint, "--batch-size", "0", "--out", a_folder + "/e"], "--batch-size"),
        (["evaluate", checkpoint, "--data", missing, "--out", a_folder + "/e"], missing),
        (["evaluate", checkpoint, "--num-images", "0", "--out", a_folder + "/e"], "--num-images"),
        (["detect", missing, images], missing),
        (["detect", checkpoint, missing], missing),
        (["detect", checkpoint, a_file, "--out", a_folder + "/x"], a_file),
        (["detect", checkpoint, images, "--batch-size", "0", "--out", a_folder + "/x"], "--batch-size"),
        (["detect", checkpoint, images, "--score-thresh", "1.5", "--out", a_folder + "/x"], "--score-thresh"),
        (["detect", checkpoint, images, "--out", a_file], a_file),
        (["inspect-anchors", "--data", missing, "--out", a_folder + "/i"], missing),
        (["inspect-anchors", "--num-images", "0", "--out", a_folder + "/i"], "--num-images"),
        (["inspect-anchors", "--show", "0", "--out", a_folder + "/i"], "--show"),
        (["inspect-anchors", "--anchor-sizes", "1,2", "--out", a_folder + "/i"], "anchor"),
        (["convert", missing, a_folder + "/c.npz"], missing),
        (["convert", a_file, missing + "/c.npz"], missing),
        (["convert", a_file, a_folder + "/c.npz", "--eps", "-1"], "--eps"),
    ]


def test_every_command_answers_bad_input_with_one_line_and_status_1(tmp_path, tiny_run, capsys):
    checkpoint, data = (str(p) for p in tiny_run)
    (tmp_path / "note.txt").write_text("not an image, a checkpoint, a folder or a dataset")
    from pathlib import Path as P
    for argv, expected in bad_invocations(tmp_path, checkpoint, P(data)):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 1, f"{argv}: status {status}, {err!r}"
        assert err.startswith(f"minidet {argv[0]}: ") and err.count("\n") == 1, f"{argv}: {err!r}"
        assert expected in err, f"{argv}: {err!r} does not say {expected!r}"
        assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "--lr", "fast"], ["detect"], ["evaluate", "a", "--batch-size", "x"],
                                  ["inspect-anchors", "--min-size", "big"], ["nonsense"]])
def test_usage_errors_are_argparse_s_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "usage: minidet" in capsys.readouterr().err


@pytest.mark.parametrize("backbone, family", [("vgg_small", "VGG"), ("efficientnet_small", "EfficientNet")])
def test_train_and_evaluate_with_another_backbone(tmp_path, capsys, backbone, family):
    assert main(["train", *TINY_TRAIN, "--backbone", backbone, "--out", str(tmp_path / "run")]) == 0
    model, config = load_trained_model(tmp_path / "run" / "last.npz")
    assert config.backbone == backbone and type(model.backbone).__name__ == family
    assert main(["evaluate", str(tmp_path / "run" / "last.npz"), "--num-images", "2", "--out",
                 str(tmp_path / "eval")]) == 0


@pytest.mark.reference
@pytest.mark.parametrize("name", ["vgg11_bn", "efficientnet_b0", "efficientnet_b1"])
def test_convert_takes_a_torchvision_backbone_and_says_how_to_load_it(torchvision, tmp_path, capsys, name):
    import torch

    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None)
    torch.save(theirs.state_dict(), tmp_path / "weights.pth")
    assert main(["convert", str(tmp_path / "weights.pth"), str(tmp_path / "backbone.npz")]) == 0
    out = capsys.readouterr().out
    assert f"backbone tensors of torchvision's {name}" in out and f"backbone={name!r}, backbone_norm='frozen'" in out
    model = md.models.RetinaNet(3, backbone=name, backbone_norm="frozen")
    model.backbone.load_state_dict(md.load(tmp_path / "backbone.npz"))          # strict: every tensor is there
    first = "features.0.weight" if name.startswith("vgg") else "features.0.0.weight"
    np.testing.assert_array_equal(model.backbone.state_dict()[first], theirs.state_dict()[first].numpy())
