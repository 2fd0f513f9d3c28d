"""The training loop (minidet/train.py): metrics, checkpoints, exact resume, the divergence guard, gradient
clipping, and the optimizer and scheduler state that resuming needs."""

import dataclasses
import json
import re

import numpy as np
import pytest

import minidet as md
from minidet import backend, load, nn, optim
from minidet.data import Shapes, resize_image
from minidet.data.shapes import CLASSES as SHAPE_CLASSES
from minidet.train import (
    TrainConfig,
    TrainingDiverged,
    build_model,
    clip_grad_norm,
    grad_norm,
    load_trained_model,
    train,
    training_batch,
)

METRIC_KEYS = {"step", "epoch", "lr", "loss", "classification", "box_regression", "num_positive", "num_ignored",
               "num_negative", "grad_norm", "seconds"}


def tiny_config(out, **changes):
    """A run of a few tenths of a second: the small backbone, 16-channel pyramid (too few channels for 32 groups,
    so no group norm), six 64 x 64 images, 2 a batch, 3 epochs of 3 steps of SGD with the step schedule. No anchor
    check before it (its reads of the data would shift the counts of ``StopAfter``); the anchor tests turn it on."""
    settings = dict(fpn_channels=16, head_norm=None, num_images=6, image_size=64, batch_size=2, epochs=3,
                    optimizer="sgd", lr=0.01, schedule="step", warmup_iters=2, progress=False, out=str(out),
                    auto_anchors=False)
    settings.update(changes)
    return TrainConfig(**settings)


def weights(model):
    return model.state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [name for name in a if not np.array_equal(a[name], b[name])]
    assert not different, f"weights differ in {len(different)} arrays, e.g. {different[:3]}"


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


class StopAfter:
    """A dataset that raises ``KeyboardInterrupt`` at its ``reads``-th item read, as if the run were killed then
    (``poison=True`` instead returns an image of huge pixels from then on: finite, but the network overflows)."""

    def __init__(self, dataset, reads, poison=False):
        self.dataset, self.reads, self.poison, self.count = dataset, reads, poison, 0
        self.classes = dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.count += 1
        image, target = self.dataset[index]
        if self.count >= self.reads:
            if not self.poison:
                raise KeyboardInterrupt("killed")
            image = np.full_like(image, 3e38)
        return image, target


def tiny_shapes(config):
    return Shapes(config.num_images, image_size=config.image_size, seed=config.data_seed)


# --- a run ----------------------------------------------------------------------------------------------------------
def test_short_run_writes_metrics_and_a_checkpoint_that_loads(tmp_path):
    config = tiny_config(tmp_path)
    result = train(config)
    assert result.out == str(tmp_path)

    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows == result.metrics
    assert [row["step"] for row in rows] == list(range(1, 10)), "one line per step, 3 epochs of 3 steps"
    assert [row["epoch"] for row in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for row in rows:
        assert set(row) == METRIC_KEYS
        assert np.isfinite(row["loss"]) and row["loss"] == pytest.approx(row["classification"] + row["box_regression"])
        assert row["num_positive"] > 0 and row["num_negative"] > 0
    # warm-up from lr / 3 over 2 steps, then x0.1 at 2/3 and 8/9 of the 9 steps (steps 6 and 8, counting from 0)
    assert [row["lr"] for row in rows] == pytest.approx([0.01 / 3, 0.01 * 2 / 3, 0.01, 0.01, 0.01, 0.01, 0.001,
                                                         0.001, 0.0001])

    state = load(tmp_path / "last.npz")
    assert int(state["step"]) == 9 and int(state["epoch"]) == 3 and int(state["batch_in_epoch"]) == 0
    assert state["config"].dtype.kind == "U" and state["config"].shape == ()
    assert TrainConfig.from_json(str(state["config"])) == TrainConfig(**{**vars(config), "num_classes": 4,
                                                                         "classes": list(SHAPE_CLASSES)})
    assert any(name.startswith("optimizer.state.") for name in state)
    assert int(state["scheduler.last_step"]) == 9
    model, saved_config = load_trained_model(tmp_path / "last.npz")
    assert saved_config.num_classes == 4 and not model.training
    assert_same_weights(weights(model), weights(result.model))


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path):
    first = train(tiny_config(tmp_path / "a", epochs=1))
    second = train(tiny_config(tmp_path / "b", epochs=1))
    assert_same_weights(weights(first.model), weights(second.model))
    assert without_time(first.metrics) == without_time(second.metrics)
    other = train(tiny_config(tmp_path / "c", epochs=1, seed=1))
    assert not np.array_equal(weights(other.model)["fpn.lateral3.weight"], weights(first.model)["fpn.lateral3.weight"])


def test_loss_falls_when_fitting_a_few_images(tmp_path):
    # Four images, no flips, a high rate kept constant after warm-up: in 40 steps the model must start to fit them
    # (at lr 0.01 the focal loss hardly moves in so few steps).
    result = train(tiny_config(tmp_path, num_images=4, batch_size=4, epochs=40, lr=0.2, flip_prob=0.0,
                               milestones=[1000]))
    losses = [row["loss"] for row in result.metrics]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, f"loss went from {first:.3f} to {last:.3f} in {len(losses)} steps"


@pytest.mark.parametrize("checkpoint_every", [None, 1], ids=["end-of-epoch checkpoints", "checkpoint every step"])
def test_resume_after_a_kill_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, checkpoint_every):
    config = tiny_config(tmp_path / "whole", checkpoint_every=checkpoint_every)
    whole = train(config)

    # Killed while reading the 9th image: in step 5 (epoch 1, batch 1), after step 4 was logged. The last
    # checkpoint is the end of epoch 0 (step 3), or, checkpointing every step, step 4 in the middle of epoch 1.
    config = tiny_config(tmp_path / "killed", checkpoint_every=checkpoint_every)
    with pytest.raises(KeyboardInterrupt):
        train(config, dataset=StopAfter(tiny_shapes(config), reads=9))
    state = load(tmp_path / "killed" / "last.npz")
    assert int(state["step"]) == (3 if checkpoint_every is None else 4)

    resumed = train(config, resume=True)
    assert_same_weights(weights(resumed.model), weights(whole.model))
    assert without_time(resumed.metrics) == without_time(whole.metrics), "each step logged once, as in one run"


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume: .*last.npz does not exist"):
        train(tiny_config(tmp_path, epochs=1), resume=True)
    train(tiny_config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"lr \(0.01 in the checkpoint, 0.02 now\)"):
        train(tiny_config(tmp_path, epochs=1, lr=0.02), resume=True)
    train(tiny_config(tmp_path, epochs=1, progress=True, log_every=5), resume=True)   # these may change


# --- the divergence guard -------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path / "poisoned", epochs=2, milestones=[100])
    # From the 7th image read on, the pixels are 3e38: the first step of epoch 1 (step 4) has a NaN loss.
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged) as caught:
        train(config, dataset=StopAfter(tiny_shapes(config), reads=7, poison=True))
    message = str(caught.value)
    assert "step 4 (epoch 1)" in message and "loss is nan" in message
    assert "learning rate" in message and "bad boxes" in message and "float16" in message
    assert "last.npz, was kept" in message

    # last.npz is still the end of epoch 0: the same weights as a clean one-epoch run
    state = load(tmp_path / "poisoned" / "last.npz")
    assert int(state["step"]) == 3
    one_epoch = train(tiny_config(tmp_path / "clean", epochs=1, milestones=[100]))
    model, _ = load_trained_model(tmp_path / "poisoned" / "last.npz")
    assert_same_weights(weights(model), weights(one_epoch.model))


def test_a_huge_learning_rate_is_caught_before_any_bad_checkpoint(tmp_path):
    # lr 1e6: step 1 is fine, its update wrecks the weights, and the loss of step 2 is 3e19 (step 3's would be NaN).
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match=r"lr was 1e\+06") as caught:
        train(tiny_config(tmp_path / "huge", lr=1e6, warmup_iters=0))
    assert "training diverged at step 2 (epoch 0): the loss is 3" in str(caught.value)
    assert "No checkpoint had been written yet" in str(caught.value)
    assert not (tmp_path / "huge" / "last.npz").exists()

    # lr 1e40 overflows the weights in the update itself, with a finite loss and gradients: the check before
    # writing the checkpoint at the end of the epoch (one step here) stops it.
    overflowed = r"diverged at step 1 \(epoch 0\): the largest weight of \S+ after the update is (inf|nan)"
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match=overflowed):
        train(tiny_config(tmp_path / "overflow", num_images=2, lr=1e40, warmup_iters=0))
    assert not (tmp_path / "overflow" / "last.npz").exists()


def test_a_loss_that_explodes_but_stays_finite_is_caught(tmp_path):
    # Adam at lr 10: step 1's loss is 1.656, step 2's is 9e18, finite: caught, and step 1's checkpoint kept.
    config = tiny_config(tmp_path / "explodes", lr=10.0, optimizer="adam", warmup_iters=0, checkpoint_every=1)
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged) as caught:
        train(config)
    message = str(caught.value)
    assert re.search(r"^training diverged at step 2 \(epoch 0\): the loss is [\d.]+e\+\d+, over 1000 times where "
                     r"it started \(1.6", message), message
    assert int(load(tmp_path / "explodes" / "last.npz")["step"]) == 1 and "was kept" in message


def test_images_with_nan_pixels_are_refused_by_index(tmp_path):
    class OneNaN(StopAfter):
        def __getitem__(self, index):
            image, target = self.dataset[index]
            return (np.full_like(image, np.nan), target) if index == 4 else (image, target)

    config = tiny_config(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"^train: image 4 of the dataset has NaN or infinite pixels; fix or remove"):
        train(config, dataset=OneNaN(tiny_shapes(config), reads=0))


def test_a_moved_run_folder_resumes_and_a_torn_metrics_line_is_dropped(tmp_path):
    config = tiny_config(tmp_path / "here", checkpoint_every=1)
    whole = train(tiny_config(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(config, dataset=StopAfter(tiny_shapes(config), reads=9))
    (tmp_path / "here").rename(tmp_path / "there")
    metrics = tmp_path / "there" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "epoch": 1, "lr"')        # cut off mid-write
    (tmp_path / "there" / ".tmp-abc123.npz").write_bytes(b"half a checkpoint")        # a killed write's leftover
    with pytest.warns(UserWarning, match="dropped its last line 5, which was cut off"):
        resumed = train(dataclasses.replace(config, out=str(tmp_path / "there")), resume=True)
    assert_same_weights(weights(resumed.model), weights(whole.model))
    assert [row["step"] for row in resumed.metrics] == list(range(1, 10))
    assert not list((tmp_path / "there").glob(".tmp-*"))

    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON row of metrics"):
        train(dataclasses.replace(config, out=str(tmp_path / "there")), resume=True)


def test_a_fresh_run_removes_the_old_checkpoint_at_once(tmp_path):
    train(tiny_config(tmp_path, epochs=1))
    config = tiny_config(tmp_path, epochs=2)
    with pytest.raises(KeyboardInterrupt):                     # killed in its first epoch, before any checkpoint
        train(config, dataset=StopAfter(tiny_shapes(config), reads=2))
    assert not (tmp_path / "last.npz").exists()                # so no resume can mix the old run with the new
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(config, resume=True)


def test_a_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    model = build_model(tiny_config(tmp_path, num_classes=4))
    md.save(model.state_dict(), tmp_path / "weights.npz")
    with pytest.raises(ValueError, match=r"weights.npz is not a checkpoint of minidet train: it holds the weights "
                                         r"of a model \(a state dict"):
        load_trained_model(tmp_path / "weights.npz")


# --- pieces ---------------------------------------------------------------------------------------------------------
def test_clip_grad_norm_scales_all_gradients_together():
    a, b = nn.Parameter(np.zeros(2, np.float32)), nn.Parameter(np.zeros((1, 1), np.float32))
    unused = nn.Parameter(np.zeros(3, np.float32))
    a.grad, b.grad = np.array([3.0, 0.0], np.float32), np.array([[4.0]], np.float32)
    assert grad_norm([a, b, unused]) == pytest.approx(5.0)

    assert clip_grad_norm([a, b, unused], max_norm=10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(a.grad, [3.0, 0.0])           # under the limit: untouched

    assert clip_grad_norm([a, b, unused], max_norm=1.0) == pytest.approx(5.0)   # returns the norm before clipping
    assert grad_norm([a, b]) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(a.grad, [0.6, 0.0], rtol=1e-5)   # same direction, shorter
    np.testing.assert_allclose(b.grad, [[0.8]], rtol=1e-5)
    assert unused.grad is None

    a.grad = np.array([np.inf, 0.0], np.float32)
    assert not np.isfinite(grad_norm([a, b]))


def test_gradient_clipping_is_applied_in_training(tmp_path):
    # With the gradients clipped to a norm of 1e-9 and no weight decay, one epoch barely moves the weights ...
    clipped = train(tiny_config(tmp_path / "clipped", epochs=1, clip_grad_norm=1e-9, weight_decay=0.0))
    initial = weights(build_model(tiny_config(tmp_path, num_classes=4)))      # the weights training starts from
    for name, p in clipped.model.named_parameters():
        np.testing.assert_allclose(p.numpy(), initial[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # ... which without clipping they do.
    free = train(tiny_config(tmp_path / "free", epochs=1, weight_decay=0.0))
    moved = max(np.abs(p.numpy() - initial[name]).max() for name, p in free.model.named_parameters())
    assert moved > 1e-4


def test_training_batch_flips_normalises_and_pads():
    dataset = Shapes(2, image_size=40, seed=3)
    items = [dataset[0], dataset[1]]
    rng = np.random.default_rng(0)
    images, targets = training_batch(items, rng, flip_prob=1.0, device="cpu")
    assert images.shape == (2, 3, 64, 64) and images.dtype == np.float32       # padded to multiples of 32
    image, target = items[0]
    np.testing.assert_array_equal(targets[0]["boxes"][:, [0, 2]], 40 - target["boxes"][:, [2, 0]])
    np.testing.assert_array_equal(targets[0]["labels"], target["labels"])
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(images[0, :, :40, :40], (image[:, :, ::-1] - mean) / std, rtol=1e-5, atol=1e-6)
    assert (images[0, :, 40:, :] == 0).all()

    images, targets = training_batch(items, rng, flip_prob=0.0, device="cpu")
    np.testing.assert_array_equal(targets[0]["boxes"], target["boxes"])


def test_multiscale_training_draws_a_shorter_side_per_image():
    dataset = Shapes(40, image_size=40, seed=3)
    items = [dataset[i] for i in range(40)]
    images, targets = training_batch(items, np.random.default_rng(0), 0.0, "cpu", multiscale_sizes=[20, 40, 80])
    scales = {round(float(t["boxes"][0, 2] / item[1]["boxes"][0, 2]), 3) for t, item in zip(targets, items)
              if len(item[1]["boxes"])}
    assert scales == {0.5, 1.0, 2.0} and images.shape[-2:] == (96, 96)           # all three, padded to 80 -> 96
    again, _ = training_batch(items, np.random.default_rng(0), 0.0, "cpu", multiscale_sizes=[20, 40, 80])
    np.testing.assert_array_equal(again, images)                                  # the rng decides
    capped, targets = training_batch(items[:8], np.random.default_rng(0), 0.0, "cpu", max_size=60,
                                     multiscale_sizes=[80])
    assert capped.shape[-2:] == (64, 64)                                          # 80 capped at 60, padded to 64


def test_training_batch_resizes_each_image_and_its_boxes():
    dataset = Shapes(2, image_size=40, seed=3)
    items = [dataset[0], (dataset[1][0][:, :, :20], {"boxes": np.array([[2, 4, 10, 30]], np.float32),
                                                      "labels": np.array([1])})]         # 40 x 20
    images, targets = training_batch(items, np.random.default_rng(0), 0.0, "cpu", min_size=80, max_size=100)
    # 40 x 40 -> 80 x 80 (scale 2); 40 x 20 -> 100 x 50, its longer side capped (scale 2.5)
    assert images.shape == (2, 3, 128, 96)
    np.testing.assert_array_equal(targets[0]["boxes"], items[0][1]["boxes"] * 2)
    np.testing.assert_array_equal(targets[1]["boxes"], [[5, 10, 25, 75]])
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(images[1, :, :100, :50], (resize_image(items[1][0], (100, 50)) - mean) / std,
                               rtol=1e-5, atol=1e-6)
    assert (images[1, :, :, 50:] == 0).all()


BAD_SETTINGS = [
    ("num_classes", 0), ("classes", ["cat", ""]), ("backbone", "resnet1000"), ("fpn_channels", 0),
    ("head_norm", "batch"), ("preset", "detectron"), ("num_images", 0), ("image_size", 16), ("data_seed", -1),
    ("flip_prob", 1.5), ("flip_prob", float("nan")), ("optimizer", "rmsprop"), ("batch_size", 0),
    ("batch_size", -4), ("batch_size", 2.5), ("epochs", 0), ("lr", -1.0), ("lr", 0), ("lr", float("inf")),
    ("momentum", 1.0), ("weight_decay", -1e-4), ("warmup_iters", -1), ("warmup_factor", 0), ("warmup_factor", 2),
    ("schedule", "linear"), ("milestones", [30, 10]), ("milestones", [0]), ("clip_grad_norm", -1.0),
    ("clip_grad_norm", 0), ("seed", -1), ("device", "gpu"), ("out", ""), ("log_every", 0),
    ("checkpoint_every", 0), ("progress", "yes"), ("batch_size", True), ("min_size", 4), ("max_size", 16),
    ("max_size", 512.0), ("anchor_sizes", [32, 64]), ("anchor_sizes", [64, 32, 128, 256, 512]),
    ("anchor_sizes", [0, 1, 2, 3, 4]), ("aspect_ratios", []), ("aspect_ratios", [0, 1]), ("auto_anchors", "yes"),
    ("multiscale_sizes", []), ("multiscale_sizes", [96, 4]), ("multiscale_sizes", [96.5]),
    ("box_loss_weight", -1.0), ("box_loss_weight", float("nan")), ("backbone_norm", "group"),
]


@pytest.mark.parametrize("name, value", BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v in BAD_SETTINGS])
def test_every_setting_is_checked_where_it_is_set(name, value):
    with pytest.raises(ValueError, match=rf"^TrainConfig: {name} must be .*, got {re.escape(repr(value))}$"):
        TrainConfig(**{name: value})


def test_the_defaults_and_the_edges_of_every_range_are_accepted():
    TrainConfig()
    TrainConfig(min_size=None, max_size=None)
    TrainConfig(min_size=8, max_size=32)
    TrainConfig(num_classes=1, image_size=32, flip_prob=0, momentum=0, weight_decay=0, warmup_iters=0,
                warmup_factor=1, schedule="step", milestones=[5, 9], clip_grad_norm=0.1, checkpoint_every=1,
                optimizer="sgd", head_norm=None, preset="torchvision", device="cuda", lr=1)


@pytest.mark.gpu
def test_training_on_cuda_matches_the_cpu_and_resumes(tmp_path):
    if not backend.cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    on_cpu = train(tiny_config(tmp_path / "cpu"))
    config = tiny_config(tmp_path / "gpu", device="cuda")
    with pytest.raises(KeyboardInterrupt):
        train(config, dataset=StopAfter(tiny_shapes(config), reads=9))
    on_gpu = train(config, resume=True)
    assert on_gpu.model.parameters()[0].device == "cuda"
    expected = weights(on_cpu.model)
    for name, p in on_gpu.model.named_parameters():
        np.testing.assert_allclose(p.numpy(), expected[name], rtol=1e-3, atol=1e-4, err_msg=name)


# --- the optimizer's and the scheduler's state ----------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                                  lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.9))], ids=["SGD", "Adam"])
def test_optimizer_state_dict_round_trip_continues_exactly(make):
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in [(2, 3), (3,)]] for _ in range(4)]

    def stepped(optimizer, params, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = g
            optimizer.step()

    params = [nn.Parameter(np.ones((2, 3), np.float32)), nn.Parameter(np.zeros(3, np.float32))]
    optimizer = make(params)
    stepped(optimizer, params, grads[:2])
    state = optimizer.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values()), "a checkpoint holds arrays only"

    copies = [nn.Parameter(p.data.copy()) for p in params]
    restored = make(copies)
    restored.param_groups[0]["lr"] = 123.0          # overwritten by the loaded settings
    restored.load_state_dict(state)
    assert restored.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    stepped(optimizer, params, grads[2:])
    stepped(restored, copies, grads[2:])
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(p.data, q.data)


def test_optimizer_load_state_dict_errors():
    p = nn.Parameter(np.ones(3, np.float32))
    optimizer = optim.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="missing keys"):
        optimizer.load_state_dict({})
    state = dict(optimizer.state_dict(), **{"state.0.momentum_buffer": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"state.0.momentum_buffer has shape \(4,\)"):
        optimizer.load_state_dict(state)


@pytest.mark.parametrize("make", [
    lambda o: optim.MultiStepLR(o, milestones=[6, 8], warmup_iters=4, warmup_factor=0.25),
    lambda o: optim.CosineAnnealingLR(o, T_max=10, warmup_iters=3),
], ids=["MultiStepLR", "CosineAnnealingLR"])
def test_scheduler_state_dict_round_trip_continues_exactly(make):
    optimizer = optim.SGD([nn.Parameter(np.ones(1))], lr=0.1)
    schedule = make(optimizer)
    for _ in range(5):
        schedule.step()
    other = optim.SGD([nn.Parameter(np.ones(1))], lr=0.1)
    restored = make(other)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()
    for _ in range(6):
        schedule.step()
        restored.step()
        assert restored.get_last_lr() == schedule.get_last_lr()


# --- anchors fitted to the data -------------------------------------------------------------------------------------
def test_auto_anchors_fit_small_objects_say_so_and_the_run_keeps_them(tmp_path, capsys):
    small = Shapes(6, image_size=64, seed=0, min_size=8, max_size=16)
    config = tiny_config(tmp_path / "auto", epochs=2, auto_anchors=True)
    with pytest.raises(KeyboardInterrupt):      # 12 reads to check and fit the anchors, 6 for epoch 0, 2 more
        train(config, dataset=StopAfter(small, reads=20))
    out = capsys.readouterr().out
    assert "of the boxes cannot reach IoU 0.5 with any of the preset's anchors" in out
    assert "Training with anchors fitted to the boxes instead" in out
    result = train(config, small, resume=True)               # the same fit again: the run resumes
    assert [row["step"] for row in result.metrics] == list(range(1, 7))
    assert "Training with anchors fitted" in capsys.readouterr().out
    fitted = result.config.anchor_sizes
    assert fitted[0] < 32 and result.config.aspect_ratios is not None
    assert result.model.anchor_generator.sizes == tuple(fitted)
    model, saved = load_trained_model(tmp_path / "auto" / "last.npz")
    assert saved.anchor_sizes == fitted and model.anchor_generator.sizes == tuple(fitted)

    kept = train(tiny_config(tmp_path / "kept", epochs=1), small)           # auto_anchors=False
    assert kept.config.anchor_sizes is None and kept.model.anchor_generator.sizes == (32, 64, 128, 256, 512)
    assert "anchors:" not in capsys.readouterr().out


def test_box_loss_weight_reaches_the_model_and_weights_the_loss_that_is_trained(tmp_path):
    config = tiny_config(tmp_path, box_loss_weight=0.0, epochs=1, num_classes=len(SHAPE_CLASSES))
    assert build_model(config).box_loss_weight == 0.0
    before = build_model(config).state_dict()
    result = train(config)
    after = result.model.state_dict()
    # With lambda = 0 nothing reaches the regression subnet's last layer but weight decay: it moves by a factor.
    weight = "regression_head.bbox_reg.weight"
    ratio = after[weight] / before[weight]
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    logits = "classification_head.cls_logits.weight"
    assert not np.allclose(after[logits] / before[logits], (after[logits] / before[logits]).flat[0])


def test_anchor_settings_reach_the_model_and_its_heads():
    config = tiny_config("unused", anchor_sizes=[16, 32, 64, 128, 256], aspect_ratios=[0.25, 0.5, 1, 2, 4],
                         num_classes=3)
    model = build_model(config)
    assert model.anchor_generator.sizes == (16, 32, 64, 128, 256)
    cls, box, anchors, _ = model.head_outputs(md.tensor(np.zeros((1, 3, 64, 64), np.float32)))
    per_image = (8 * 8 + 4 * 4 + 2 * 2 + 1 + 1) * 15          # 5 ratios x 3 scales = 15 anchors per position
    assert anchors.shape == (per_image, 4) and cls.shape == (1, per_image, 3) and box.shape == (1, per_image, 4)
