"""The whole detector: presets, the loss (gradients, counts, normalisation, clear errors), inference (threshold,
top-k per level, decoding, clipping, NMS, the cap), and end-to-end checks that small models learn to find objects."""

import math

import numpy as np
import pytest
from backbone_checks import found_objects, steps_to_find

import minidet as md
import minidet.functional as F
from minidet import backend, nn, optim
from minidet.boxes import box_iou
from minidet.models import RetinaNet
from minidet.testing import gradcheck

K = 3   # classes in the hand-made cases


def small_model(preset="paper", num_classes=K, fpn_channels=16, **options):
    md.manual_seed(0)
    return RetinaNet(num_classes, backbone="resnet_small", preset=preset, fpn_channels=fpn_channels, **options)


def images(n=1, size=(64, 64), seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3) + size).astype(np.float32)


def target(boxes, labels):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64)}


# --- presets ---------------------------------------------------------------------------------------------------------

def test_paper_preset():
    model = small_model("paper")
    assert model.fpn.p6_input == "c5" and model.fpn.p6.weight.shape[1] == 128     # C5 of resnet_small
    assert model.anchor_generator.preset == "paper"
    assert model.allow_low_quality_matches is False
    assert model.box_loss_beta == 0.11 and model.loss_normalization == "batch"
    assert model.detections_per_img == 100
    assert isinstance(model.backbone.bn1, nn.BatchNorm2d)
    assert model.classification_head.conv[0][0].bias is not None                   # no head norm


def test_torchvision_preset():
    model = small_model("torchvision")
    assert model.fpn.p6_input == "p5" and model.fpn.p6.weight.shape[1] == 16       # P5 has fpn_channels
    assert model.anchor_generator.preset == "torchvision"
    assert model.allow_low_quality_matches is True
    assert model.box_loss_beta == 0.0 and model.loss_normalization == "image"
    assert model.detections_per_img == 300
    assert isinstance(model.backbone.bn1, nn.FrozenBatchNorm2d)


def test_options_override_the_preset():
    model = small_model("paper", allow_low_quality_matches=True, detections_per_img=10, backbone_norm="frozen",
                        head_norm="group", fpn_channels=32)
    assert model.allow_low_quality_matches is True and model.detections_per_img == 10
    assert isinstance(model.backbone.bn1, nn.FrozenBatchNorm2d)
    assert isinstance(model.regression_head.conv[0][1], nn.GroupNorm)


@pytest.mark.parametrize("backbone", ["resnet_small", "vgg_small", "efficientnet_small"])
def test_a_retinanet_on_each_small_backbone_learns_to_find_the_shapes_it_is_shown(backbone):
    steps, found, total = steps_to_find(backbone)
    assert found == total, f"{backbone}: after {steps} steps, found {found} of {total} objects"


def test_found_objects_needs_the_class_the_overlap_and_the_score():
    target = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), "labels": np.array([1, 2])}
    detections = {"boxes": np.array([[1, 1, 10, 10], [20, 20, 40, 29], [20, 20, 40, 40]], np.float32),
                  "scores": np.array([0.9, 0.9, 0.2]), "labels": np.array([1, 2, 2])}
    assert found_objects([detections], [target]) == 1         # the second box: IoU 0.45, then score 0.2
    assert found_objects([detections], [target], min_score=0.1) == 2
    detections["labels"][0] = 0
    assert found_objects([detections], [target], min_score=0.1) == 1


def test_the_loss_to_train_is_classification_plus_lambda_times_box_regression():
    md.manual_seed(0)
    images = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    targets = [target([[8, 8, 40, 40]], [1])]
    losses = {}
    for weight in (1.0, 2.5):
        md.manual_seed(0)
        losses[weight] = RetinaNet(K, backbone="resnet_small", fpn_channels=16, box_loss_weight=weight)(images, targets)
    for weight, loss in losses.items():
        expected = loss["classification"].item() + weight * loss["box_regression"].item()
        assert loss["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert losses[2.5]["box_regression"].item() == losses[1.0]["box_regression"].item() > 0
    with pytest.raises(ValueError, match="box_loss_weight .the article's lambda. must be >= 0, got -1"):
        RetinaNet(K, backbone="resnet_small", box_loss_weight=-1)


def test_unknown_preset_and_backbone_are_refused():
    with pytest.raises(ValueError, match="unknown preset 'detectron'"):
        RetinaNet(3, preset="detectron")
    with pytest.raises(ValueError, match="unknown backbone 'mobilenet_v2'.*resnet_small.*vgg16"):
        RetinaNet(3, backbone="mobilenet_v2")


def test_torchvision_retinanet_resnet50_fpn_state_dict_size_and_names():
    # torchvision's v1 state dict has 354 entries with 91 classes, 53 of them ``num_batches_tracked`` counters
    # that FrozenBatchNorm does not have. The rest correspond one to one (renamed, see the module docstrings).
    state = RetinaNet(91, backbone="resnet50", preset="torchvision").state_dict()
    assert len(state) == 354 - 53
    shapes = {name: value.shape for name, value in state.items()}
    assert shapes["backbone.layer4.2.bn3.running_var"] == (2048,)
    assert shapes["fpn.lateral3.weight"] == (256, 512, 1, 1) and shapes["fpn.lateral5.weight"] == (256, 2048, 1, 1)
    assert shapes["fpn.output4.weight"] == (256, 256, 3, 3)
    assert shapes["fpn.p6.weight"] == (256, 256, 3, 3) and shapes["fpn.p7.weight"] == (256, 256, 3, 3)
    assert shapes["classification_head.conv.3.0.weight"] == (256, 256, 3, 3)
    assert shapes["classification_head.cls_logits.weight"] == (9 * 91, 256, 3, 3)
    assert shapes["regression_head.bbox_reg.weight"] == (9 * 4, 256, 3, 3)


# --- images and targets are checked ----------------------------------------------------------------------------------

def test_image_sizes_must_be_multiples_of_32():
    with pytest.raises(ValueError, match=r"multiples of 32 .* got 64 x 100; pad .* to 64 x 128"):
        small_model()(images(size=(64, 100)), [target([[0, 0, 10, 10]], [0])])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        small_model().predict(np.zeros((1, 1, 64, 64), np.float32))


def test_edge_batches_name_their_cause():
    model = small_model()
    with pytest.raises(ValueError, match=r"the batch is empty \(0 images\)"):
        model(images(n=0), [])
    with pytest.raises(ValueError, match=r"got one dict; for a single image pass \[target\]"):
        model(images(), target([[0, 0, 10, 10]], [0]))
    with pytest.raises(ValueError, match=r"training batch norm on 1 image of 32 x 32 leaves one value per channel "
                                         r"on C5 \(1 x 1\).*2 or more images a batch"):
        model(images(size=(32, 32)), [target([[0, 0, 10, 10]], [0])])
    model(images(n=2, size=(32, 32)), [target([[0, 0, 10, 10]], [0])] * 2)      # two values per channel: fine
    assert len(model.eval().predict(images(size=(32, 32)))) == 1                 # and inference needs no batch stats


def test_degenerate_box_is_reported_with_its_image_and_index():
    targets = [target([[0, 0, 10, 10]], [0]), target([[0, 0, 10, 10], [5, 5, 20, 30], [30, 8, 30, 20]], [0, 1, 2])]
    with pytest.raises(ValueError, match=r"image 1, box 2: \(30, 8, 30, 20\) has x2 <= x1"):
        small_model()(images(n=2), targets)


def test_label_out_of_range_is_reported_with_its_image_and_box():
    model = small_model()
    with pytest.raises(ValueError, match=r"image 0, box 1: label 3 is not a class of this model \(0\.\.2\)"):
        model(images(), [target([[0, 0, 10, 10], [5, 5, 20, 30]], [0, 3])])
    with pytest.raises(ValueError, match=r"image 1, box 0: label -1"):
        model(images(n=2), [target(np.zeros((0, 4)), []), target([[0, 0, 10, 10]], [-1])])
    with pytest.raises(ValueError, match=r"image 0: labels must be an integer array of shape \(1,\)"):
        model(images(), [{"boxes": np.array([[0, 0, 10, 10.0]]), "labels": np.array([0.0])}])
    with pytest.raises(ValueError, match="2 targets for 1 images"):
        model(images(), [target([[0, 0, 10, 10]], [0])] * 2)


# --- the loss --------------------------------------------------------------------------------------------------------

# Five anchors against the box (0, 0, 10, 10):
ANCHORS = np.array([[0, 0, 10, 10],      # IoU 1                   -> positive
                    [0, 0, 10, 20],      # IoU 100 / 200 = 0.5     -> positive (>= 0.5)
                    [0, 0, 10, 22],      # IoU 100 / 220 = 0.45    -> ignored (between 0.4 and 0.5)
                    [0, 0, 10, 30],      # IoU 100 / 300 = 0.33    -> background
                    [20, 20, 30, 30]],   # IoU 0                   -> background
                   np.float32)
TARGETS = [target([[0, 0, 10, 10]], [1]),
           target([[20, 20, 30, 50]], [0]),   # best anchor: the last, IoU 100 / 300: positive only if low-quality
           target(np.zeros((0, 4)), [])]      # an image without objects: every anchor background


def random_subnet_outputs(xp, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    logits = xp.asarray(rng.standard_normal((3, 5, K)), dtype=dtype)
    deltas = xp.asarray(rng.standard_normal((3, 5, 4)), dtype=dtype)
    return logits, deltas


@pytest.mark.parametrize("preset, counts", [("paper", (2, 1, 12)), ("torchvision", (3, 1, 11))])
def test_anchor_counts_of_a_hand_checked_case(xp, preset, counts):
    logits, deltas = random_subnet_outputs(xp, dtype=np.float32)
    losses = small_model(preset).compute_loss(md.tensor(logits), md.tensor(deltas), xp.asarray(ANCHORS), TARGETS)
    # Image 0: 2 positive, 1 ignored, 2 background. Image 1: 5 background, or with torchvision's low-quality
    # matches 1 positive (the box's best anchor) and 4 background. Image 2: 5 background.
    assert (losses["num_positive"], losses["num_ignored"], losses["num_negative"]) == counts
    assert all(type(losses[k]) is int for k in ("num_positive", "num_ignored", "num_negative"))


def test_the_loss_raises_the_true_class_of_positives_lowers_the_rest_and_leaves_ignored_anchors_alone(xp):
    logits = md.tensor(xp.zeros((3, 5, K), np.float32), requires_grad=True)
    deltas = md.tensor(xp.ones((3, 5, 4), np.float32), requires_grad=True)
    losses = small_model("torchvision").compute_loss(logits, deltas, xp.asarray(ANCHORS), TARGETS)
    (losses["classification"] + losses["box_regression"]).backward()
    # Descending the gradient raises a logit where it is negative: only the true class of a positive anchor.
    expected = np.ones((3, 5, K))                   # background: every class pushed down
    expected[0, [0, 1], 1] = -1                     # image 0: anchors 0 and 1 are positive for class 1
    expected[0, 2] = 0                              # anchor 2 is ignored: no gradient at all
    expected[1, 4, 0] = -1                          # image 1: the low-quality match, class 0
    np.testing.assert_array_equal(np.sign(backend.to_numpy(logits.grad)), expected)
    # Only positive anchors get a box gradient.
    has_box_gradient = np.abs(backend.to_numpy(deltas.grad)).sum(axis=2) > 0
    assert np.argwhere(has_box_gradient).tolist() == [[0, 0], [0, 1], [1, 4]]


@pytest.mark.parametrize("preset", ["paper", "torchvision"])
def test_loss_gradcheck_with_respect_to_both_subnets_outputs(xp, preset):
    model = small_model(preset)
    anchors = xp.asarray(ANCHORS)

    def losses(cls_logits, box_deltas):
        out = model.compute_loss(cls_logits, box_deltas, anchors, TARGETS)
        return F.stack([out["classification"], out["box_regression"]])

    gradcheck(losses, list(random_subnet_outputs(xp)), name=f"compute_loss({preset})")


def test_paper_and_torchvision_normalise_differently():
    """All logits and offsets 0, so every term is known: p = 0.5 gives each (anchor, class) pair a focal loss of
    alpha_t * 0.5^2 * log(2)."""
    positive_term = 0.25 * 0.25 * math.log(2)          # alpha = 0.25 for the true class
    negative_term = 0.75 * 0.25 * math.log(2)          # 1 - alpha for every other class
    # Image 0: 2 positives (1 + 2 negatives terms each) and 2 background anchors (3 negative terms each).
    # Image 1: its box (20, 20, 30, 30) is exactly the last anchor: 1 positive and 4 background anchors.
    targets = [target([[0, 0, 10, 10]], [1]), target([[20, 20, 30, 30]], [0])]
    cls_sums = [2 * positive_term + 10 * negative_term, positive_term + 14 * negative_term]
    # Box targets: anchor (0, 0, 10, 20) to box (0, 0, 10, 10) is (dx, dy, dw, dh) = (0, -0.25, 0, log(0.5)); the
    # other positives are their boxes exactly (targets 0).
    dy, dh = 0.25, math.log(2)
    l1_sums = [dy + dh, 0.0]
    smooth_sums = [(dy - 0.055) + (dh - 0.055), 0.0]   # |d| > beta = 0.11: |d| - beta / 2
    logits, deltas = md.tensor(np.zeros((2, 5, K), np.float32)), md.tensor(np.zeros((2, 5, 4), np.float32))

    paper = small_model("paper").compute_loss(logits, deltas, ANCHORS, targets)
    assert paper["classification"].item() == pytest.approx(sum(cls_sums) / 3, rel=1e-5)    # 3 positives in all
    assert paper["box_regression"].item() == pytest.approx(sum(smooth_sums) / 3, rel=1e-5)

    tv = small_model("torchvision").compute_loss(logits, deltas, ANCHORS, targets)
    assert tv["classification"].item() == pytest.approx((cls_sums[0] / 2 + cls_sums[1] / 1) / 2, rel=1e-5)
    assert tv["box_regression"].item() == pytest.approx((l1_sums[0] / 2 + l1_sums[1] / 1) / 2, rel=1e-5)


def test_without_positives_the_loss_is_divided_by_one_and_the_box_loss_is_zero():
    logits, deltas = md.tensor(np.zeros((1, 5, K), np.float32)), md.tensor(np.ones((1, 5, 4), np.float32))
    losses = small_model().compute_loss(logits, deltas, ANCHORS, [target(np.zeros((0, 4)), [])])
    assert losses["classification"].item() == pytest.approx(5 * K * 0.75 * 0.25 * math.log(2), rel=1e-5)
    assert losses["box_regression"].item() == 0 and losses["num_negative"] == 5


def test_at_initialisation_the_loss_is_about_1_13_per_positive_anchor():
    # Every probability starts at 0.01: a positive costs 0.25 * 0.99^2 * log(100) = 1.13, a negative 7.5e-7,
    # and the loss is divided by the number of positives.
    model = small_model()
    losses = model(images(), [target([[8, 8, 48, 40]], [2])])
    assert losses["num_positive"] > 0
    assert losses["classification"].item() == pytest.approx(0.25 * 0.99 ** 2 * math.log(100), rel=0.01)
    assert losses["num_positive"] + losses["num_ignored"] + losses["num_negative"] == (64 + 16 + 4 + 1 + 1) * 9


def test_the_whole_model_in_float64_passes_gradcheck_with_respect_to_the_images():
    model = small_model("torchvision", backbone_norm="batch").to(np.float64)
    # Random weights at a scale that keeps activations O(1): at initialisation the subnets' std of 0.01 makes
    # the gradients with respect to the pixels so small that any gradient would pass the absolute tolerance.
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.data = (rng.standard_normal(p.shape) / math.sqrt(math.prod(p.shape[1:])) if p.ndim == 4
                  else 1 + 0.2 * rng.standard_normal(p.shape))
    targets = [target([[8, 8, 48, 40]], [2]), target([[30, 20, 60, 60]], [0])]

    def loss(images):
        losses = model(images, targets)
        return losses["classification"] + losses["box_regression"]

    pixels = images(n=2).astype(np.float64)
    gradcheck(loss, [pixels], eps=1e-5, max_elements=60, name="RetinaNet loss")


# --- inference -------------------------------------------------------------------------------------------------------

# Two pyramid levels: four anchors on the first, two on the second. Anchors 2 and 3 overlap with IoU 9 / 11.
PREDICT_ANCHORS = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [41, 0, 51, 10],
                            [0, 20, 20, 40], [30, 20, 50, 40]], np.float32)
PER_LEVEL = [4, 2]


def logit(p):
    return math.log(p / (1 - p))


def crafted(xp, scores, deltas=None, num_images=1):
    """Subnet outputs where (anchor, class) has probability ``scores[(anchor, class)]`` and all others ~0."""
    logits = np.full((num_images, 6, K), -20.0, np.float32)
    for (anchor, k), p in scores.items():
        logits[:, anchor, k] = logit(p)
    box_deltas = np.zeros((num_images, 6, 4), np.float32)
    for anchor, d in (deltas or {}).items():
        box_deltas[:, anchor] = d
    return xp.asarray(logits), xp.asarray(box_deltas), xp.asarray(PREDICT_ANCHORS)


def detect(xp, model, scores, deltas=None, image_size=(64, 64)):
    logits, box_deltas, anchors = crafted(xp, scores, deltas)
    (found,) = model.postprocess_detections(logits, box_deltas, anchors, PER_LEVEL, [image_size])
    return {k: backend.to_numpy(v) for k, v in found.items()}


def test_one_firing_anchor_gives_its_decoded_and_clipped_box(xp):
    # Anchor 1 (20, 0, 30, 10): centre (25, 5), 10 x 10. Offsets (0.1, -0.2, log 2, 0) move the centre by
    # (0.1 * 10, -0.2 * 10) to (26, 3) and double the width: (16, -2, 36, 8), clipped at y = 0.
    found = detect(xp, small_model(), {(1, 2): 0.9}, {1: [0.1, -0.2, math.log(2), 0.0]})
    np.testing.assert_allclose(found["boxes"], [[16, 0, 36, 8]], rtol=1e-5)
    np.testing.assert_allclose(found["scores"], [0.9], rtol=1e-5)
    assert found["labels"].tolist() == [2] and found["labels"].dtype == np.int64


def test_boxes_are_clipped_to_each_images_own_size(xp):
    model = small_model()
    logits, deltas, anchors = crafted(xp, {(5, 0): 0.9}, num_images=2)     # anchor 5: (30, 20, 50, 40)
    found = model.postprocess_detections(logits, deltas, anchors, PER_LEVEL, [(64, 64), (32, 40)])
    np.testing.assert_allclose(backend.to_numpy(found[0]["boxes"]), [[30, 20, 50, 40]])
    np.testing.assert_allclose(backend.to_numpy(found[1]["boxes"]), [[30, 20, 40, 32]])


def test_score_threshold(xp):
    found = detect(xp, small_model(), {(0, 0): 0.04, (1, 1): 0.06, (5, 2): 0.5})
    assert found["labels"].tolist() == [2, 1]                            # 0.04 is below score_thresh = 0.05
    found = detect(xp, small_model(score_thresh=0.3), {(0, 0): 0.04, (1, 1): 0.06, (5, 2): 0.5})
    assert found["labels"].tolist() == [2]


def test_top_k_candidates_is_per_level(xp):
    model = small_model(topk_candidates=2)
    found = detect(xp, model, {(0, 0): 0.9, (1, 0): 0.8, (2, 0): 0.7, (4, 0): 0.3})
    # Level 1 keeps its best two (0.9, 0.8); its third (0.7) goes even though it beats level 2's 0.3.
    np.testing.assert_allclose(found["scores"], [0.9, 0.8, 0.3], rtol=1e-5)


def test_nms_is_class_wise(xp):
    model = small_model()
    same_class = detect(xp, model, {(2, 0): 0.9, (3, 0): 0.8})          # IoU 0.82 > 0.5: the lower one goes
    np.testing.assert_allclose(same_class["scores"], [0.9], rtol=1e-5)
    other_class = detect(xp, model, {(2, 0): 0.9, (3, 1): 0.8})         # a different class is never suppressed
    assert other_class["labels"].tolist() == [0, 1]
    one_anchor_two_classes = detect(xp, model, {(0, 0): 0.6, (0, 1): 0.7})
    assert one_anchor_two_classes["labels"].tolist() == [1, 0]
    np.testing.assert_array_equal(one_anchor_two_classes["boxes"], [[0, 0, 10, 10]] * 2)


def test_detections_per_image_keeps_the_best(xp):
    found = detect(xp, small_model(detections_per_img=2), {(0, 0): 0.6, (1, 1): 0.9, (4, 2): 0.7, (5, 0): 0.8})
    np.testing.assert_allclose(found["scores"], [0.9, 0.8], rtol=1e-5)


def test_nothing_above_the_threshold_gives_empty_arrays_of_the_right_shapes(xp):
    found = detect(xp, small_model(), {})
    assert found["boxes"].shape == (0, 4) and found["scores"].shape == (0,) and found["labels"].shape == (0,)
    assert found["labels"].dtype == np.int64


def test_predict_on_a_fresh_model():
    model = small_model()
    batch = images(n=2)
    # At initialisation every probability is about 0.01, below score_thresh = 0.05: nothing is detected.
    assert [len(d["boxes"]) for d in model.predict(batch)] == [0, 0]
    model.score_thresh = 0.0
    detections = model.predict(batch, image_sizes=[(64, 64), (40, 50)])
    assert model.training                                   # predict ran in eval mode and put training back
    for d, (h, w) in zip(detections, [(64, 64), (40, 50)]):
        assert len(d["boxes"]) == model.detections_per_img
        assert np.all(np.diff(d["scores"]) <= 0) and d["labels"].max() < K and d["labels"].dtype == np.int64
        assert np.all(d["boxes"] >= 0) and np.all(d["boxes"][:, [0, 2]] <= w) and np.all(d["boxes"][:, [1, 3]] <= h)
    # The model called without targets predicts.
    same = model(batch)
    np.testing.assert_array_equal(same[0]["boxes"], model.predict(batch)[0]["boxes"])


def test_predict_uses_the_running_statistics_and_builds_no_graph():
    model = small_model()
    model(images(n=2), [target([[8, 8, 48, 40]], [2])] * 2)          # a training step moves the running statistics
    before = model.backbone.bn1.running_mean.copy()
    model.score_thresh = 0.0
    first = model.predict(images(n=2))
    np.testing.assert_array_equal(model.backbone.bn1.running_mean, before)
    second = model.predict(images(n=2))                               # deterministic: eval mode, no batch statistics
    np.testing.assert_array_equal(first[1]["scores"], second[1]["scores"])


# --- devices ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_the_model_on_the_gpu_matches_the_cpu():
    if not md.cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    targets = [target([[8, 8, 48, 40]], [2]), target(np.zeros((0, 4)), [])]
    cpu = small_model("torchvision", backbone_norm="batch")
    gpu = small_model("torchvision", backbone_norm="batch").to("cuda")
    batch = images(n=2)
    cpu_losses = cpu(batch, targets)
    gpu_losses = gpu(backend.to_device(batch, "cuda"), targets)
    for key in ("classification", "box_regression"):
        assert gpu_losses[key].device == "cuda"
        assert gpu_losses[key].item() == pytest.approx(cpu_losses[key].item(), rel=1e-4)
    assert gpu_losses["num_positive"] == cpu_losses["num_positive"]
    cpu.score_thresh = gpu.score_thresh = 0.0
    on_gpu = gpu.predict(backend.to_device(batch, "cuda"))[0]
    assert backend.device_of(on_gpu["boxes"]) == "cuda"
    np.testing.assert_allclose(backend.to_numpy(on_gpu["scores"]), cpu.predict(batch)[0]["scores"], rtol=1e-4)


# --- it learns -------------------------------------------------------------------------------------------------------

def two_synthetic_images():
    """Two 128 x 128 grey images with filled rectangles: a red class 0 and a blue class 1, three objects in all."""
    batch = np.full((2, 3, 128, 128), 0.5, np.float32)
    targets = [target([[20, 30, 70, 90], [80, 16, 120, 56]], [0, 1]), target([[40, 40, 100, 84]], [1])]
    colours = {0: (1.0, 0.2, 0.2), 1: (0.2, 0.2, 1.0)}
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), label in zip(t["boxes"].astype(int), t["labels"]):
            batch[i, :, y1:y2, x1:x2] = np.array(colours[label])[:, None, None]
    return batch, targets


@pytest.mark.slow
def test_the_small_model_overfits_two_images_and_then_finds_their_objects():
    batch, targets = two_synthetic_images()
    md.manual_seed(0)
    model = RetinaNet(2, backbone="resnet_small", fpn_channels=32)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    for step in range(250):
        losses = model(batch, targets)
        loss = losses["classification"] + losses["box_regression"]
        if step == 0:
            first = loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10, f"loss went from {first:.3f} to {loss.item():.3f} only"

    detections = model.predict(batch)
    for i, t in enumerate(targets):
        confident = detections[i]["scores"] > 0.5
        boxes, labels = detections[i]["boxes"][confident], detections[i]["labels"][confident]
        iou = box_iou(t["boxes"], boxes)                                  # (G, D)
        for g, label in enumerate(t["labels"]):
            same_class = labels == label
            assert same_class.any() and iou[g, same_class].max() > 0.5, f"image {i}: object {g} not found"
        # The most confident detection of each image is one of its objects, with the right class.
        best = np.argmax(detections[i]["scores"])
        g = np.argmax(box_iou(detections[i]["boxes"][best:best + 1], t["boxes"])[0])
        assert box_iou(detections[i]["boxes"][best:best + 1], t["boxes"])[0, g] > 0.5
        assert detections[i]["labels"][best] == t["labels"][g]
