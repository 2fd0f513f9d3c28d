"""The ``minidet`` command: train, evaluate and run a RetinaNet, from the shell.

    minidet demo                              shapes -> train -> evaluate -> pictures and a report (a few minutes)
    minidet make-shapes OUT                   write the built-in synthetic data as a COCO-format folder
    minidet train [--data FOLDER]             train on a COCO-format folder, or on the built-in shapes
    minidet evaluate CHECKPOINT [--data ...]  COCO mAP, per-class AP, precision-recall curves, detection pictures
    minidet detect CHECKPOINT IMAGE...        PNGs with boxes, labels and scores, and a JSON of the detections
    minidet inspect-anchors [--data FOLDER]   do the anchors fit the boxes? sizes, unmatchable share, pictures
    minidet convert WEIGHTS.pth OUT.npz       torchvision's RetinaNet weights as a minidet checkpoint

Each command is a thin layer over the library (``minidet.train``, ``minidet.evaluate``, ``minidet.plots``,
``minidet.anchor_report``, ``minidet.data``): what it does can be done from Python in as many lines. Errors the
user can fix (a missing file, a bad flag value, bad annotations) are printed as one line naming the fix, with exit
status 1 (``--debug`` shows the traceback instead); argparse handles unknown flags (exit status 2). Ctrl-C stops
with exit status 130 and, for ``train``, says how to resume.

``convert`` is the only place where minidet imports torch, to read the ``.pth`` file.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

import minidet as md
from minidet import anchor_report, distributed, plots
from minidet.checkpoint import write_atomically
from minidet.data import CocoDataset, Shapes, export_coco
from minidet.data.coco import read_image
from minidet.evaluate import coco_evaluate, predict_dataset, predict_images, relabel_to_dataset
from minidet.models import BACKBONES, convert_torchvision_efficientnet, convert_torchvision_vgg
from minidet.models.efficientnet import SCALING, scaled_stages
from minidet.models.torchvision_weights import EPS_KEY, convert_torchvision_state_dict, torchvision_num_classes
from minidet.train import TrainConfig, load_trained_model, train

# Held-out shapes are drawn with this offset added to the training data's seed, so they are other images.
HELD_OUT_SEED_OFFSET = 1_000_003
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# --- data -----------------------------------------------------------------------------------------------------------
def held_out_shapes(config, num_images):
    """Shapes images the run described by ``config`` never trained on, drawn like its training images."""
    return Shapes(num_images, image_size=config.image_size, seed=config.data_seed + HELD_OUT_SEED_OFFSET)


def coco_source(args):
    """What ``--data FOLDER`` or ``--images DIR --annotations FILE`` name, for ``CocoDataset``; None for neither."""
    if args.data and (args.images or args.annotations):
        raise ValueError("give either --data FOLDER (holding images/ and annotations.json) or --images DIR "
                         "--annotations FILE, not both")
    if bool(args.images) != bool(args.annotations):
        given, missing = ("--images", "--annotations FILE") if args.images else ("--annotations", "--images DIR")
        raise ValueError(f"{given} needs {missing} too (the images folder and the COCO annotations file)")
    if args.images:
        return (args.images, args.annotations)
    return args.data


def dataset_from_args(args, config=None, held_out=False):
    """The COCO-format data of ``--data`` or ``--images``/``--annotations``, or else the built-in shapes
    (``held_out``: images not trained on)."""
    source = coco_source(args)
    if source is not None:
        dataset = CocoDataset(source, on_error=args.on_error)
        print(f"data: {len(dataset)} images, {len(dataset.classes)} classes from {dataset.annotations_path}")
        return dataset
    if held_out:
        dataset = held_out_shapes(config, args.num_images)
        print(f"data: {len(dataset)} held-out shapes images of {config.image_size} px (seed "
              f"{config.data_seed + HELD_OUT_SEED_OFFSET})")
    else:
        image_size = args.image_size or _default("image_size")
        dataset = Shapes(args.num_images, image_size=image_size, seed=args.seed)
        print(f"data: {len(dataset)} shapes images of {image_size} px (seed {args.seed})")
    return dataset


def image_paths(inputs):
    """The image files among ``inputs`` (files, or folders whose images are taken in name order)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"the folder {item!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item!r} does not exist; give image files or folders of images")
    return paths


# --- the steps the commands share -----------------------------------------------------------------------------------
def report_evaluation(model, config, dataset, out, batch_size, sizes=None, progress=True):
    """Evaluate ``model`` on ``dataset``; write metrics.json, precision_recall.png and detections.png to ``out``.

    ``sizes``: (min_size, max_size) to resize the images by; default the ones ``config`` trained with."""
    os.makedirs(out, exist_ok=True)
    min_size, max_size = sizes or (config.min_size, config.max_size)
    trained_on = config.classes if config.classes is not None else config.num_classes
    relabel_to_dataset([], trained_on, dataset.classes)         # other classes: stop here, before predicting
    if config.classes is not None and list(config.classes) != list(dataset.classes):
        print(f"the dataset lists the model's classes in another order, {list(dataset.classes)}: its detections "
              "are matched to them by name")
    detections = predict_dataset(model, dataset, batch_size=batch_size, min_size=min_size, max_size=max_size,
                                 progress=progress)
    detections = relabel_to_dataset(detections, trained_on, dataset.classes)
    result = coco_evaluate(dataset, detections)
    print(result.summary())
    write_atomically(os.path.join(out, "metrics.json"),
                                   lambda f: f.write(json.dumps(result.to_dict(), indent=2).encode()))
    names = list(dataset.classes)
    plots.plot_precision_recall(result.precision, result.recall_points, names,
                                os.path.join(out, "precision_recall.png"))
    shown = range(min(8, len(dataset)))
    items = [dataset[i] for i in shown]
    plots.plot_detection_grid([image for image, _ in items], [detections[i] for i in shown], names,
                              os.path.join(out, "detections.png"), targets=[target for _, target in items])
    print(f"wrote metrics.json, precision_recall.png and detections.png to {out}")
    return result


# --- the commands ---------------------------------------------------------------------------------------------------
def check_flags(args, *names):
    """Raise ValueError, naming the flag, for a count below 1 or a --score-thresh outside [0, 1], before any work."""
    for name in names:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if name == "score_thresh" and not 0 <= value <= 1:
            raise ValueError(f"{flag} must be from 0 to 1 (a probability), got {value}")
        if name != "score_thresh" and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")


def config_from_flags(flags_of=None, **settings):
    """``TrainConfig(**settings)``, its error naming the flag that set the bad value (``flags_of``: setting name ->
    flag, where the flag is not the setting's name with dashes)."""
    try:
        return TrainConfig(**settings)
    except ValueError as error:
        name = str(error).split(":", 1)[1].split()[0]                      # "TrainConfig: lr must be ..." -> lr
        flag = (flags_of or {}).get(name, "--" + name.replace("_", "-"))
        raise ValueError(str(error).replace(f"TrainConfig: {name}", f"{flag} (TrainConfig.{name})", 1)) from None


def demo(args):
    """`minidet demo`: train the small model on synthetic shapes, score it on held-out ones, write pictures and
    report.md."""
    check_flags(args, "val_images")
    started = time.perf_counter()
    config = config_from_flags({"num_images": "--train-images", "data_seed": "--seed"},
                               num_images=args.train_images, image_size=args.image_size, epochs=args.epochs,
                               data_seed=args.seed, seed=args.seed, device=args.device, out=args.out)
    train_set = Shapes(config.num_images, image_size=config.image_size, seed=config.data_seed)
    print(f"minidet demo: a RetinaNet ({config.backbone}, FPN {config.fpn_channels}) learns to find "
          f"{', '.join(train_set.classes)} in {config.num_images} synthetic {config.image_size}-px images "
          f"({config.epochs} epochs on {config.device}), then is scored on {args.val_images} images it never saw")
    if os.path.exists(os.path.join(args.out, "last.npz")):
        print(f"replacing the earlier demo in {args.out}")
    run = train(config, train_set)
    trained_at = time.perf_counter()
    last = run.metrics[-1]
    steps = f"{last['step']} step{'s' * (last['step'] != 1)}"
    print(f"trained {steps} in {trained_at - started:.0f} s: loss {run.metrics[0]['loss']:.3f} -> "
          f"{np.mean([row['loss'] for row in run.metrics[-20:]]):.3f} (mean of the last 20 steps)")
    plots.plot_losses(run.metrics, os.path.join(args.out, "loss.png"))

    result = report_evaluation(run.model.eval(), config, held_out_shapes(config, args.val_images), args.out,
                               batch_size=16)
    trained = run.config
    stats = anchor_report.anchor_statistics(train_set, trained.preset, trained.anchor_sizes, trained.aspect_ratios,
                                            trained.min_size, trained.max_size)
    anchor_report.plot_anchor_report(stats, os.path.join(args.out, "anchors.png"))
    seconds = time.perf_counter() - started
    report = (f"# minidet demo\n\nRetinaNet ({config.backbone} backbone, FPN {config.fpn_channels} channels) "
              f"trained on {config.num_images} Shapes images of {config.image_size} px for {last['step']} steps "
              f"on {config.device}, evaluated on {args.val_images} held-out images.\n\n"
              f"- time: {seconds:.0f} s in all ({trained_at - started:.0f} s training)\n"
              f"- COCO AP {result.ap:.3f}, AP50 {result.ap50:.3f}, AP75 {result.ap75:.3f}\n"
              f"- boxes no anchor can match at IoU 0.5: {stats.share_unmatchable:.1%}\n\n"
              "Pictures: loss.png (training), detections.png (held-out images: detections solid, ground truth "
              "dashed), precision_recall.png, anchors.png (box sizes against anchor sizes).\n"
              f"The model is in last.npz: `minidet detect {os.path.join(args.out, 'last.npz')} IMAGE...`\n")
    write_atomically(os.path.join(args.out, "report.md"), lambda f: f.write(report.encode()))
    print(f"done in {seconds:.0f} s: AP50 {result.ap50:.3f}, AP {result.ap:.3f}; "
          f"pictures and report.md in {args.out}")


def make_shapes(args):
    """`minidet make-shapes`: write the synthetic data as a COCO-format folder."""
    check_flags(args, "num_images")
    if os.path.exists(os.path.join(args.out, "annotations.json")):
        raise FileExistsError(f"{args.out!r} already holds a dataset (annotations.json); choose another folder "
                              "or delete it")
    sizes = dict(zip(("min_size", "max_size"), args.object_sizes)) if args.object_sizes else {}   # else Shapes'
    dataset = Shapes(args.num_images, image_size=args.image_size, seed=args.seed, **sizes)
    path = export_coco(dataset, args.out)
    print(f"wrote {len(dataset)} images of {args.image_size} px ({', '.join(dataset.classes)}, objects of "
          f"{dataset.min_size:g} to {dataset.max_size:g} px) and {path}")


def train_command(args):
    """`minidet train`: the flags given become a TrainConfig (the others keep its defaults), then ``train``."""
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    # A flag not given is None and leaves TrainConfig's default; --min-size and --max-size are absent when not
    # given, so their "none" (None) is a value.
    settings = {name: value for name, value in vars(args).items()
                if name in fields and (value is not None or name in ("min_size", "max_size"))}
    if settings.get("head_norm") == "none":
        settings["head_norm"] = None
    config = config_from_flags({"data_seed": "--seed"}, **settings, data_seed=args.seed)
    checkpoint = os.path.join(args.out, "last.npz")
    if os.path.exists(checkpoint) and not (args.resume or args.overwrite):
        raise FileExistsError(f"{checkpoint} exists: add --resume to continue that run, --overwrite to start "
                              "again in the same folder, or choose another --out")
    dataset = dataset_from_args(args)
    run = train(config, dataset, resume=args.resume)
    if distributed.launched_rank() == 0:          # under mpiexec, the first worker writes for all of them
        loss_curve = plots.plot_losses(run.metrics, os.path.join(args.out, "loss.png"))
        print(f"trained {run.metrics[-1]['step']} steps; checkpoint {checkpoint}, loss curve {loss_curve}")


def evaluate_command(args):
    """`minidet evaluate`: COCO mAP of a checkpoint on a dataset, with pictures."""
    check_flags(args, "num_images", "batch_size")
    model, config = load_trained_model(args.checkpoint, device=args.device)
    dataset = dataset_from_args(args, config, held_out=True)
    report_evaluation(model, config, dataset, args.out, batch_size=args.batch_size, sizes=resize_settings(args, config))


def detect(args):
    """`minidet detect`: a checkpoint's detections in image files, drawn and as JSON."""
    check_flags(args, "batch_size", "score_thresh")
    paths = image_paths(args.images)
    model, config = load_trained_model(args.checkpoint, device=args.device)
    model.score_thresh = args.score_thresh
    names = config.classes or [str(k) for k in range(config.num_classes)]
    images = [read_image(path) for path in paths]
    min_size, max_size = resize_settings(args, config)
    detections = predict_images(model, images, batch_size=args.batch_size, min_size=min_size, max_size=max_size)
    os.makedirs(args.out, exist_ok=True)
    records = []
    for path, image, found in zip(paths, images, detections):
        stem = os.path.splitext(os.path.basename(path))[0]
        plots.save_detections(image, found, names, os.path.join(args.out, stem + ".png"),
                              score_thresh=args.score_thresh)
        records.append({"image": path, "detections": [
            {"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "label": int(label),
             "class": names[int(label)]}
            for box, score, label in zip(found["boxes"], found["scores"], found["labels"])]})
        print(f"{path}: {len(found['scores'])} objects")
    json_path = os.path.join(args.out, "detections.json")
    write_atomically(json_path, lambda f: f.write(json.dumps(records, indent=1).encode()))
    print(f"wrote {len(paths)} pictures and {json_path}")


def inspect_anchors(args):
    """`minidet inspect-anchors`: how many of a dataset's boxes the anchors can match, with pictures."""
    check_flags(args, "num_images", "show")
    dataset = dataset_from_args(args)
    settings = dict(anchor_sizes=args.anchor_sizes, aspect_ratios=args.aspect_ratios,
                    min_size=getattr(args, "min_size", _default("min_size")),
                    max_size=getattr(args, "max_size", _default("max_size")))
    stats = anchor_report.anchor_statistics(dataset, preset=args.preset, **settings)
    print(stats.summary())
    if stats.unmatchable.any():
        fit = anchor_report.fit_anchors(dataset, args.preset, settings["min_size"], settings["max_size"])
        print(fit.summary())
    report = anchor_report.plot_anchor_report(stats, os.path.join(args.out, "anchor_report.png"))
    # Show the images whose boxes the anchors miss first: they are the ones to look at.
    worst = list(dict.fromkeys(int(i) for i in stats.image_index[stats.unmatchable]))
    shown = (worst + [i for i in range(len(dataset)) if i not in worst])[:args.show]
    matched = anchor_report.plot_matched_anchors(dataset, shown, os.path.join(args.out, "matched_anchors.png"),
                                                 preset=args.preset, **settings)
    print(f"wrote {report} and {matched}")


def convert(args):
    """`minidet convert`: torchvision's state dict (.pth) as a minidet checkpoint (.npz)."""
    if args.eps < 0:
        raise ValueError(f"--eps must be 0 or more, got {args.eps}")
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"{args.weights!r} does not exist; give the path of the .pth file")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder {folder!r} for {args.out!r} does not exist")
    try:
        import torch
    except ImportError:
        raise RuntimeError("reading a .pth file needs PyTorch, which minidet itself does not use: "
                           "pip install torch, then run this command again") from None
    try:
        # weights_only: unpickle tensors and plain containers only, never code (a .pth file is a pickle)
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _torch_load_error(args.weights, error) from error
    if not isinstance(state, dict):
        raise ValueError(f"{args.weights!r} holds a {type(state).__name__}, not a state dict (a dict of tensors)")
    arrays = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{args.weights!r} is not a state dict of tensors: {name!r} holds a "
                             f"{type(value).__name__}")
        value = value.detach().cpu()
        arrays[name] = (value.float() if value.is_floating_point() else value).numpy()
    backbone = torchvision_backbone_name(arrays)
    if backbone is not None:                                 # an ImageNet classifier: its backbone's weights
        converter = convert_torchvision_efficientnet if backbone.startswith("efficientnet") else convert_torchvision_vgg
        converted = converter(arrays)
        md.save(converted, args.out)
        print(f"converted the {len(converted)} backbone tensors of torchvision's {backbone} to {args.out}")
        print(f"use it: model = RetinaNet(num_classes, backbone={backbone!r}, backbone_norm='frozen'); "
              f"model.backbone.load_state_dict(minidet.load({args.out!r}))")
        return
    converted = convert_torchvision_state_dict(arrays)       # ValueError naming the wrong keys
    num_classes = torchvision_num_classes(converted)
    md.save({**converted, EPS_KEY: np.array(args.eps, np.float64)}, args.out)
    print(f"converted {len(converted)} tensors of torchvision's retinanet_resnet50_fpn ({num_classes} classes, "
          f"frozen batch norm eps {args.eps:g}) to {args.out}")
    print(f"use it: state = minidet.load({args.out!r}); model = RetinaNet({num_classes}, backbone='resnet50', "
          "preset='torchvision'); load_torchvision_weights(model, state)")


def torchvision_backbone_name(state):
    """The minidet backbone a torchvision classifier's state dict is for ("vgg16_bn", "efficientnet_b0", ...), or
    None when it is not one of those: told apart by their names and by how many convolutions they have."""
    if not state or not all(name.startswith(("features.", "classifier.")) for name in state):
        return None
    if any(".block." in name for name in state):       # an EfficientNet: its stem's width and its count of blocks
        blocks = len({name.split(".block.")[0] for name in state if ".block." in name})
        stem = len(state["features.0.0.weight"]) if "features.0.0.weight" in state else None
        for variant, (width, depth) in SCALING.items():
            stages = scaled_stages(width, depth)
            if (stem, blocks) == (stages[0][3], sum(stage[-1] for stage in stages)):
                return f"efficientnet_{variant}"
        raise ValueError(f"an EfficientNet with a {stem}-channel stem and {blocks} blocks; minidet has B0 to B7")
    convolutions = sum(1 for name, value in state.items() if name.endswith(".weight") and np.ndim(value) == 4)
    depth = {8: "vgg11", 13: "vgg16"}.get(convolutions)
    if depth is None:
        raise ValueError(f"a VGG with {convolutions} convolutions; minidet has VGG-11 (8) and VGG-16 (13)")
    return depth + "_bn" if any(name.endswith("running_mean") for name in state) else depth


def _torch_load_error(path, error):
    """One line for torch.load's many-line error: the file holds code (a whole model), or is not torch's."""
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    detail = (detail.strip().splitlines() or [type(error).__name__])[0]
    if "GLOBAL " in detail:     # "Unsupported global: GLOBAL argparse.Namespace was not an allowed global ..."
        name = detail.split("GLOBAL ", 1)[1].split()[0]
        return ValueError(f"{path!r} holds Python objects besides tensors ({name}: a whole model, or a training "
                          "checkpoint?), which torch.load(weights_only=True) does not unpickle because that could "
                          "run code; torch.save the model's state_dict() and convert that")
    return ValueError(f"{path!r} cannot be read by torch.load(weights_only=True); is it a file torch.save wrote? "
                      f"({detail})")


def _default(name):
    """TrainConfig's default for setting ``name``, for the help texts."""
    return {field.name: field.default for field in dataclasses.fields(TrainConfig)}[name]


def add_data_flags(parser, shapes_help, num_images=None):
    num_images = num_images or _default("num_images")
    group = parser.add_argument_group(f"data (default: {shapes_help})")
    group.add_argument("--data", metavar="FOLDER",
                       help="a COCO-format folder: images/ and annotations.json (see make-shapes)")
    group.add_argument("--images", metavar="DIR",
                       help="with --annotations: COCO's own layout, e.g. --images val2017 --annotations "
                            "annotations/instances_val2017.json (file names may hold sub-folders of DIR)")
    group.add_argument("--annotations", metavar="FILE", help="the COCO annotations file that goes with --images")
    group.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                       help="bad annotations: fail (default: stop and list them) or skip them (listed in a "
                            "warning)")
    group.add_argument("--num-images", type=int, default=num_images,
                       help=f"without COCO data: how many shapes images (default: {num_images})")


def numbers(text):
    """A comma-separated list of numbers, e.g. "16,32,64,128,256"."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.5,1,2") from None


def whole_numbers(text):
    """A comma-separated list of whole numbers, e.g. "96,128,160"."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers, e.g. "
                                         "96,128,160") from None


def size_setting(text):
    """A --min-size / --max-size value: a whole number of pixels, or "none"."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels or 'none'") from None


def add_size_flags(parser, default_help):
    """--min-size and --max-size: how images are resized first (TrainConfig.min_size and max_size)."""
    parser.add_argument("--min-size", type=size_setting, default=argparse.SUPPRESS, metavar="PIXELS",
                        help="resize each image so its shorter side is this, keeping its aspect ratio, unless "
                             "that makes the longer side exceed --max-size; none: never enlarge "
                             f"(default: {default_help})")
    parser.add_argument("--max-size", type=size_setting, default=argparse.SUPPRESS, metavar="PIXELS",
                        help=f"the longest an image's longer side may be; none: no cap (default: {default_help})")


def resize_settings(args, config):
    """(min_size, max_size): the flags where given, else the checkpoint's ``config``."""
    return getattr(args, "min_size", config.min_size), getattr(args, "max_size", config.max_size)


def add_device_flag(parser):
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to compute (default: cpu; cuda needs CuPy and an NVIDIA GPU)")


def add_train_flags(parser):
    """The training settings: each flag sets the TrainConfig field of the same name (see minidet.train)."""
    group = parser.add_argument_group("training settings (defaults: TrainConfig's, the demo's recipe)")
    flags = [
        ("--epochs", int, "passes over the training images"),
        ("--batch-size", int, "images per step"),
        ("--lr", float, "learning rate after warm-up"),
        ("--optimizer", ["sgd", "adam"], "sgd (with momentum, the paper's) or adam"),
        ("--schedule", ["step", "cosine"], "step: x0.1 at 2/3 and 8/9 of training; cosine: down to 0"),
        ("--warmup-iters", int, "steps of linear learning-rate warm-up"),
        ("--weight-decay", float, "L2 weight decay"),
        ("--clip-grad-norm", float, "clip the gradients' global norm to this (default: no clipping)"),
        ("--backbone", sorted(BACKBONES), "the backbone network: resnet18, resnet34, resnet50, vgg11, vgg16 (and "
                                          "_bn), efficientnet_b0 to efficientnet_b7, or, to train on a laptop CPU, "
                                          "resnet_small, vgg_small, efficientnet_small"),
        ("--fpn-channels", int, "channels of the pyramid levels and of the subnets"),
        ("--box-loss-weight", float, "lambda, the weight of the box loss in L = L_cls + lambda * L_loc"),
        ("--backbone-norm", ["batch", "frozen"], "the backbone's batch norm: trained, or frozen (default: the "
                                                 "preset's; frozen keeps data-parallel workers equal to one process)"),
        ("--head-norm", ["group", "none"], "normalisation in the subnets' towers"),
        ("--preset", ["paper", "torchvision"], "the paper's settings or torchvision's (minidet.models.PRESETS)"),
        ("--image-size", int, "without --data: the side of the shapes images, in pixels"),
        ("--checkpoint-every", int, "also write last.npz every this many steps (default: each epoch only)"),
        ("--anchor-sizes", numbers, "the anchors' base size on P3,P4,P5,P6,P7 in pixels, e.g. 16,32,64,128,256 "
                                    "(default: 32,64,128,256,512, or fitted to the boxes: see --no-auto-anchors)"),
        ("--aspect-ratios", numbers, "the anchors' shapes h/w, e.g. 0.5,1,2 (default: 0.5,1,2, or fitted)"),
        ("--multiscale-sizes", whole_numbers, "train each image at a shorter side drawn from these, e.g. 96,128,160 "
                                              "(default: --min-size only)"),
    ]
    for flag, kind, text in flags:
        name = flag[2:].replace("-", "_")
        default = _default(name)
        shown = "" if default is None or "default:" in text else f" (default: {default})"
        if isinstance(kind, list):       # a long list of choices is named in the help, not in the usage line
            group.add_argument(flag, choices=kind, metavar="NAME" if len(kind) > 4 else None, help=text + shown)
        else:
            group.add_argument(flag, type=kind, help=text + shown)
    group.add_argument("--no-auto-anchors", dest="auto_anchors", action="store_false", default=None,
                       help="keep the preset's anchors even when many boxes cannot reach IoU 0.5 with them (by "
                            "default, anchors fitted to the boxes are used then, and the run says so)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the initial weights, the image order and flips, and of the shapes data "
                            "(default: 0)")


def add_shapes_flags(parser, seed_help, size_help="side of the images in pixels"):
    """--image-size and --seed of the built-in shapes data, for the commands that draw it."""
    parser.add_argument("--image-size", type=int, default=_default("image_size"),
                        help=f"{size_help} (default: {_default('image_size')})")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: 0)")


def add_out_flag(parser, default, what):
    parser.add_argument("--out", default=default, help=f"the folder for {what} (default: {default})")


def add_demo(commands):
    p = commands.add_parser("demo", help="train a detector on synthetic shapes, evaluate it, draw pictures",
                            description="Generate synthetic shapes, train a small RetinaNet on the CPU, evaluate "
                                        "it (COCO mAP) on held-out images, and write pictures and report.md. "
                                        "With the defaults it takes a few minutes on a laptop.")
    add_out_flag(p, "minidet-demo", "the checkpoint, pictures and report")
    p.add_argument("--train-images", type=int, default=_default("num_images"),
                   help=f"training images (default: {_default('num_images')})")
    p.add_argument("--val-images", type=int, default=200, help="held-out images to evaluate on (default: 200)")
    p.add_argument("--epochs", type=int, default=_default("epochs"),
                   help=f"passes over the training images (default: {_default('epochs')})")
    add_shapes_flags(p, "seed of the data and the initial weights")
    add_device_flag(p)
    p.set_defaults(run=demo)


def add_make_shapes(commands):
    p = commands.add_parser("make-shapes", help="write synthetic shapes as a COCO-format folder",
                            description="Write the built-in synthetic data as OUT/images/*.png and "
                                        "OUT/annotations.json. Training on it gives the same model as training "
                                        "on the generator with the same seed.")
    p.add_argument("out", metavar="OUT", help="the folder to create (it must not already hold a dataset)")
    p.add_argument("--num-images", type=int, default=_default("num_images"),
                   help=f"how many images (default: {_default('num_images')})")
    add_shapes_flags(p, "the data's seed")
    p.add_argument("--object-sizes", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="the objects' sizes in pixels, e.g. 10 40 for small objects (default: 24 to 0.8 x the "
                        "image size)")
    p.set_defaults(run=make_shapes)


def add_train(commands):
    p = commands.add_parser("train", help="train a RetinaNet on a COCO-format folder or on synthetic shapes",
                            description="Train a RetinaNet. Writes OUT/last.npz (each epoch, atomically), "
                                        "OUT/metrics.jsonl (a line per step) and OUT/loss.png.")
    add_data_flags(p, "the built-in synthetic shapes")
    p.add_argument("--out", default="runs/train", help="the run folder (default: runs/train)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.npz, exactly where it stopped (same settings)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in --out even if it holds one")
    add_size_flags(p, f"{_default('min_size')} and {_default('max_size')}: only images longer than "
                      f"{_default('max_size')} px are made smaller")
    add_device_flag(p)
    add_train_flags(p)
    p.set_defaults(run=train_command)


def add_evaluate(commands):
    p = commands.add_parser("evaluate", help="COCO mAP of a trained checkpoint, with pictures",
                            description="Score a checkpoint of `minidet train` with COCO's mAP (pycocotools): "
                                        "prints AP, AP50, AP75 and per-class AP, writes metrics.json, "
                                        "precision_recall.png and detections.png.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a last.npz written by minidet train or demo")
    add_data_flags(p, "held-out shapes drawn like the checkpoint's training data", num_images=200)
    add_out_flag(p, "runs/evaluate", "the results")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    add_size_flags(p, "the checkpoint's, as it trained")
    add_device_flag(p)
    p.set_defaults(run=evaluate_command)


def add_detect(commands):
    p = commands.add_parser("detect", help="find objects in images: PNGs with boxes, and a JSON",
                            description="Run a trained checkpoint on image files (or folders of them); write one "
                                        "PNG per image with boxes, class names and scores, and detections.json "
                                        "(boxes as x1, y1, x2, y2 in the image's pixels).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a last.npz written by minidet train or demo")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...) or folders of them")
    add_out_flag(p, "runs/detect", "the results")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="keep detections scoring above this (default: 0.3)")
    add_size_flags(p, "the checkpoint's, as it trained")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    add_device_flag(p)
    p.set_defaults(run=detect)


def add_inspect_anchors(commands):
    p = commands.add_parser("inspect-anchors", help="do the anchors fit a dataset's boxes?",
                            description="For each box of a dataset, its best IoU with any anchor: prints the "
                                        "share that no anchor can match at IoU 0.5, writes anchor_report.png "
                                        "(box sizes against anchor sizes) and matched_anchors.png (the anchors "
                                        "each box gets, worst images first).")
    add_data_flags(p, "the built-in synthetic shapes")
    add_shapes_flags(p, "without --data: the shapes' seed", size_help="without --data: side of the shapes images")
    p.add_argument("--preset", choices=["paper", "torchvision"], default="paper",
                   help="whose anchors and matching (default: paper)")
    p.add_argument("--anchor-sizes", type=numbers, help="the anchors to check: base sizes on P3-P7, e.g. "
                                                         "16,32,64,128,256 (default: the preset's)")
    p.add_argument("--aspect-ratios", type=numbers, help="the anchors' shapes h/w, e.g. 0.5,1,2 (default: "
                                                          "the preset's)")
    add_size_flags(p, f"training's, {_default('min_size')} and {_default('max_size')}")
    p.add_argument("--show", type=int, default=8, help="images in matched_anchors.png (default: 8)")
    add_out_flag(p, "runs/anchors", "the pictures")
    p.set_defaults(run=inspect_anchors)


def add_convert(commands):
    p = commands.add_parser(
        "convert", help="convert torchvision's RetinaNet, VGG or EfficientNet weights (.pth) to minidet's (.npz)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert the state dict of torchvision's retinanet_resnet50_fpn (v1), such as its published\n"
                    "COCO weights retinanet_resnet50_fpn_coco-eeacb38b.pth, to a minidet checkpoint: the names\n"
                    "become minidet's, the arrays stay as they are. Needs PyTorch, to read the .pth file.\n"
                    "The state dict of torchvision's vgg11, vgg11_bn, vgg16, vgg16_bn or efficientnet_b0 to _b7\n"
                    "(an ImageNet classifier) becomes the weights of that backbone, its classifier dropped.",
        epilog="then, in Python:\n"
               "  import minidet\n"
               "  from minidet.models import RetinaNet, load_torchvision_weights, torchvision_num_classes\n"
               "  state = minidet.load('OUT.npz')\n"
               "  model = RetinaNet(torchvision_num_classes(state), backbone='resnet50', preset='torchvision')\n"
               "  load_torchvision_weights(model, state)     # the weights, and eps from the file\n"
               "  detections = model.predict(images)\n"
               "with images prepared as torchvision prepares them: RGB in [0, 1], minus the ImageNet mean\n"
               "(0.485, 0.456, 0.406), divided by its std (0.229, 0.224, 0.225), padded to multiples of 32.")
    p.add_argument("weights", metavar="WEIGHTS.pth", help="torchvision's state dict, as torch.save wrote it")
    p.add_argument("out", metavar="OUT.npz", help="the minidet checkpoint to write (replaced atomically)")
    p.add_argument("--eps", type=float, default=0.0,
                   help="the frozen batch norm eps the weights need, stored in OUT.npz as frozen_bn_eps "
                        "(default: 0.0, right for torchvision's published COCO weights; 1e-5 for "
                        "weights of a model torchvision built with its default FrozenBatchNorm2d eps)")
    p.set_defaults(run=convert)


COMMANDS = [add_demo, add_make_shapes, add_train, add_evaluate, add_detect, add_inspect_anchors, add_convert]


def build_parser():
    """The ``minidet`` command line: one sub-command per function of ``COMMANDS``, each with --debug."""
    parser = argparse.ArgumentParser(prog="minidet", description="RetinaNet from scratch, for learning.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="minidet COMMAND --help explains each command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    for command in commands.choices.values():
        command.add_argument("--debug", action="store_true",
                             help="on an error, show Python's full traceback instead of one line")
    return parser


def interrupted_message(args):
    """What to say after Ctrl-C: where the run's last checkpoint is and how to go on from it."""
    if args.command != "train":
        return f"minidet {args.command}: interrupted (Ctrl-C)"
    checkpoint = os.path.join(args.out, "last.npz")
    if not os.path.exists(checkpoint):
        return "minidet train: interrupted (Ctrl-C) before the first checkpoint; run the command again to start over"
    step = int(md.load(checkpoint)["step"])
    return (f"minidet train: interrupted (Ctrl-C); {checkpoint} holds the run after step {step}: run the same command "
            "with --resume to continue it exactly")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if distributed.launched_rank() != 0:          # under mpiexec -n N: one worker speaks, not N
        sys.stdout = open(os.devnull, "w")
    try:
        args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(interrupted_message(args), file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, OSError, ImportError) as error:
        if args.debug:
            raise
        print(f"minidet {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
