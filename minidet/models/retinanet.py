"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", 2017): the whole detector.

    images (N, 3, H, W)
      -> backbone (a ResNet)      C3, C4, C5
      -> feature pyramid          P3, ..., P7, C channels each
      -> classification subnet    (N, M, K) logits, one row per anchor      M = sum_l H_l * W_l * A
      -> regression subnet        (N, M, 4) box offsets (dx, dy, dw, dh)
    training:  match the M anchors to the ground-truth boxes; focal loss + box regression loss
    inference: sigmoid scores, best candidates per level, decode, clip, class-wise NMS

Two presets (see ``PRESETS``): ``"paper"``, the article and its Detectron configuration, and ``"torchvision"``,
which reproduces ``torchvision.models.detection.retinanet_resnet50_fpn`` (v1) so its weights give the same
detections here.
"""

from functools import partial
from itertools import accumulate

from minidet import functional as F
from minidet import nn
from minidet.anchors import DEFAULT_ASPECT_RATIOS, AnchorGenerator
from minidet.autograd import Tensor, no_grad
from minidet.backend import get_array_module, to_numpy
from minidet.boxes import batched_nms, check_boxes, clip_boxes, decode_boxes, encode_boxes
from minidet.functional.activation import stable_sigmoid
from minidet.matching import BACKGROUND, IGNORED, match_anchors_batch
from minidet.models.efficientnet import SCALING, efficientnet, efficientnet_small
from minidet.models.fpn import FeaturePyramid
from minidet.models.heads import ClassificationHead, RegressionHead
from minidet.models.resnet import resnet18, resnet34, resnet50, resnet_small
from minidet.models.vgg import vgg11, vgg11_bn, vgg16, vgg16_bn, vgg_small

# Backbones by name. Each builder takes ``norm`` and returns a module whose forward gives [C3, C4, C5] and whose
# ``out_channels`` gives their channels; another family is one more line here.
BACKBONES = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet_small": resnet_small,
             "vgg11": vgg11, "vgg11_bn": vgg11_bn, "vgg16": vgg16, "vgg16_bn": vgg16_bn, "vgg_small": vgg_small,
             "efficientnet_small": efficientnet_small,
             **{f"efficientnet_{variant}": partial(efficientnet, variant) for variant in SCALING}}

# What the two presets set. The anchors follow the preset
# of the same name in ``minidet.anchors``.
PRESETS = {
    "paper": {
        "p6_input": "c5",                      # P6 = 3x3 stride-2 conv on the backbone's C5
        "allow_low_quality_matches": False,    # anchors with IoU < 0.5 are never positive
        "match_zero_iou": False,               # (if low-quality matches are turned on: a box no anchor overlaps
                                               # promotes nothing)
        "box_loss_beta": 0.11,                 # smooth L1, quadratic below 0.11
        "loss_normalization": "batch",         # each loss / max(1, positive anchors in the whole batch)
        "detections_per_img": 100,
        "backbone_norm": "batch",              # trainable batch norm: the backbone learns from scratch here
    },
    "torchvision": {
        "p6_input": "p5",                      # P6 on the pyramid's P5 (torchvision v1)
        "allow_low_quality_matches": True,     # each box's best anchors are positive whatever their IoU
        "match_zero_iou": True,                # even 0: as torchvision's Matcher, for exact parity
        "box_loss_beta": 0.0,                  # beta 0: the plain L1 loss
        "loss_normalization": "image",         # each image's losses / max(1, its positives), then the mean
        "detections_per_img": 300,
        "backbone_norm": "frozen",             # FrozenBatchNorm, as for torchvision's pretrained weights
    },
}

# IoU matching thresholds: >= 0.5 positive, < 0.4 background, in between ignored (the same in both presets).
POSITIVE_IOU = 0.5
BACKGROUND_IOU = 0.4
# The focal loss settings of the paper (alpha weights the positives, gamma focuses on hard examples).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# Images must be multiples of C5's stride, so every level of the pyramid is exactly twice the next one.
SIZE_DIVISOR = 32


class RetinaNet(nn.Module):
    """RetinaNet with a ResNet backbone, a feature pyramid P3-P7 and the two subnets.

    Args:
        num_classes: K, the number of object classes (labels 0..K-1; there is no background class).
        backbone: a name in ``BACKBONES``: "resnet18", "resnet34", "resnet50", "vgg11", "vgg16" (and "_bn"),
            "efficientnet_b0" to "efficientnet_b7", or, to train on a laptop CPU, "resnet_small", "vgg_small",
            "efficientnet_small".
        preset: ``"paper"`` (default) or ``"torchvision"``; see ``PRESETS``.
        fpn_channels: C, the channels of every pyramid level and of the subnets (256).
        head_norm: None, or ``"group"`` for GroupNorm(32) in the subnets' towers.
        backbone_norm: ``"batch"`` or ``"frozen"``; None takes the preset's.
        allow_low_quality_matches: None takes the preset's (off in the paper, on in torchvision).
        anchor_sizes: the anchors' base size on each level P3-P7 in pixels; None takes the preset's (32, 64, 128,
            256, 512). Each level has three scales of its size (x1, x1.26, x1.59), as in the paper.
        aspect_ratios: the anchors' shapes h / w, shared by all levels; None takes (0.5, 1, 2). A = 3 x
            len(aspect_ratios) anchors per position (9).
        score_thresh: inference keeps (anchor, class) pairs whose probability is above this (0.05).
        topk_candidates: and at most this many of them per pyramid level (1000).
        nms_thresh: the IoU above which class-wise NMS drops the lower-scoring box (0.5).
        detections_per_img: the most detections kept per image; None takes the preset's (100 or 300).
        box_loss_weight: lambda in the article's L = lambda * L_loc + L_cls, the weight of the box regression loss
            in the loss to backpropagate (1, as in the paper and torchvision).

    Modules: ``backbone``, ``fpn``, ``classification_head``, ``regression_head``; ``anchor_generator`` (no weights).

    Calling the model:
        ``model(images, targets)`` in training returns the losses (see ``compute_loss``); backpropagate
        ``losses["loss"]``, which is ``losses["classification"] + box_loss_weight * losses["box_regression"]``.
        ``model(images)`` returns ``model.predict(images)``, the detections.
    """

    def __init__(self, num_classes, backbone="resnet50", preset="paper", fpn_channels=256, head_norm=None,
                 backbone_norm=None, allow_low_quality_matches=None, anchor_sizes=None, aspect_ratios=None,
                 score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5, detections_per_img=None,
                 box_loss_weight=1.0):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"RetinaNet: unknown preset {preset!r}: use one of {tuple(PRESETS)}")
        if backbone not in BACKBONES:
            raise ValueError(f"RetinaNet: unknown backbone {backbone!r}: use one of {tuple(BACKBONES)}")
        settings = PRESETS[preset]
        self.num_classes = num_classes
        self.preset = preset
        self.allow_low_quality_matches = (settings["allow_low_quality_matches"] if allow_low_quality_matches is None
                                          else allow_low_quality_matches)
        self.match_zero_iou = settings["match_zero_iou"]
        self.box_loss_beta = settings["box_loss_beta"]
        if not box_loss_weight >= 0:
            raise ValueError(f"RetinaNet: box_loss_weight (the article's lambda) must be >= 0, got {box_loss_weight}")
        self.box_loss_weight = box_loss_weight
        self.loss_normalization = settings["loss_normalization"]
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_img = settings["detections_per_img"] if detections_per_img is None else detections_per_img

        self.backbone = BACKBONES[backbone](norm=backbone_norm or settings["backbone_norm"])
        self.fpn = FeaturePyramid(self.backbone.out_channels, fpn_channels, p6_input=settings["p6_input"])
        self.anchor_generator = AnchorGenerator(preset, sizes=anchor_sizes,
                                                aspect_ratios=aspect_ratios or DEFAULT_ASPECT_RATIOS)
        num_anchors = self.anchor_generator.num_anchors_per_location
        self.classification_head = ClassificationHead(fpn_channels, num_anchors, num_classes, norm=head_norm)
        self.regression_head = RegressionHead(fpn_channels, num_anchors, norm=head_norm)

    # --- the network ----------------------------------------------------------------------------------------------
    def head_outputs(self, images):
        """Run the network on a checked batch.

        Returns:
            cls_logits: Tensor (N, M, K); box_deltas: Tensor (N, M, 4);
            anchors: array (M, 4) float32 on the images' device, row m being the anchor of row m of both outputs;
            num_anchors_per_level: [H_l * W_l * A for P3, ..., P7], how the M rows split into levels.
        """
        features = self.fpn(self.backbone(images))                       # [P3, ..., P7]
        feature_sizes = [tuple(p.shape[-2:]) for p in features]
        anchors = self.anchor_generator(images.shape[-2:], feature_sizes, like=images.data)
        return (self.classification_head(features), self.regression_head(features), anchors,
                self.anchor_generator.num_anchors_per_level(feature_sizes))

    def forward(self, images, targets=None):
        """Training: ``targets`` given, returns the losses and counts of ``compute_loss``. Otherwise ``predict``.

        Args:
            images: Tensor or array (N, 3, H, W), float, H and W multiples of 32 (pad the batch to get them).
            targets: list of N dicts, {"boxes": (G_i, 4) float array (x1, y1, x2, y2) in pixels, "labels": (G_i,)
                int array of classes 0..K-1}; G_i may be 0.
        """
        if targets is None:
            return self.predict(images)
        images = self._check_images(images)
        self._check_targets(targets, images.shape[0])     # before the network runs: fail fast
        self._check_batch_norm_statistics(images)
        cls_logits, box_deltas, anchors, _ = self.head_outputs(images)
        return self.compute_loss(cls_logits, box_deltas, anchors, targets)

    # --- training -------------------------------------------------------------------------------------------------
    def compute_loss(self, cls_logits, box_deltas, anchors, targets):
        """The focal loss and the box regression loss, from the subnets' outputs.

        The anchors are matched to each image's boxes (``minidet.matching.match_anchors_batch``, all images at once):
        IoU >= 0.5 positive, < 0.4 background, in between ignored (plus each box's best anchors when
        ``allow_low_quality_matches``).

        - classification: the focal loss (alpha 0.25, gamma 2) summed over the K classes of every anchor that is not
          ignored; the target is 1 for a positive anchor's class, 0 everywhere else. Computed by
          ``sigmoid_focal_loss_with_labels`` from one label per anchor (its class, or background, or ignored), so
          the (N, M, K) targets are never built; on a GPU it is one kernel.
        - box_regression: smooth L1 (beta 0.11; torchvision: plain L1) between the predicted offsets of the
          positive anchors and their matched boxes encoded against them (``encode_boxes``, weights 1, 1, 1, 1).
        - normalisation: ``"batch"`` (paper) divides both sums by max(1, positive anchors in the batch);
          ``"image"`` (torchvision) divides each image's sums by max(1, its positives) and averages over images.
          Dividing by the positives, not by all anchors, keeps the loss's scale independent of the ~100k easy
          negatives, whose focal loss is nearly 0 anyway. The focal loss gets it as a weight per anchor.

        Args:
            cls_logits: Tensor (N, M, K). box_deltas: Tensor (N, M, 4).
            anchors: array (M, 4), the anchors shared by every image of the batch.
            targets: list of N dicts {"boxes": (G_i, 4), "labels": (G_i,)}, as for ``forward``.

        Returns:
            dict: "classification" and "box_regression", scalar Tensors; "loss", the loss to backpropagate,
            classification + ``box_loss_weight`` * box_regression (the article's L = L_cls + lambda L_loc);
            "num_positive", "num_ignored", "num_negative", ints, the anchors of the whole batch in each category.
        """
        num_images, num_anchors, num_classes = cls_logits.shape
        self._check_targets(targets, num_images)
        xp = get_array_module(anchors)
        boxes = [xp.asarray(t["boxes"]) for t in targets]
        labels = [xp.asarray(t["labels"]) for t in targets]

        # The images' boxes and labels padded to the largest number of boxes (at least 1 slot, so that the label
        # lookup below has something to index even when no image has a box).
        counts = [len(b) for b in boxes]
        max_boxes = max(counts + [1])
        padded_boxes = xp.zeros((num_images, max_boxes, 4), dtype=anchors.dtype)      # (N, Gmax, 4)
        padded_labels = xp.zeros((num_images, max_boxes), dtype=xp.int64)              # (N, Gmax)
        for i, count in enumerate(counts):
            padded_boxes[i, :count] = boxes[i]
            padded_labels[i, :count] = labels[i]
        matches, _ = match_anchors_batch(anchors, padded_boxes, xp.asarray(counts, dtype=xp.int32), POSITIVE_IOU,
                                         BACKGROUND_IOU, self.allow_low_quality_matches,
                                         match_zero_iou=self.match_zero_iou)          # (N, M) box, -1 or -2
        positive = matches >= 0                                                 # (N, M)

        # The number each image's losses are divided by, set by the preset's normalisation.
        positives_per_image = positive.sum(axis=1)                              # (N,)
        if self.loss_normalization == "batch":
            divisor = xp.full(num_images, max(1, int(positives_per_image.sum())))
        else:
            divisor = num_images * xp.maximum(positives_per_image, 1)           # (N,)
        divisor = divisor.astype(cls_logits.dtype)

        # Classification: each anchor's label is the class of its box if it is positive, and otherwise its match
        # code, BACKGROUND (-1) or IGNORED (-2), which are also the focal loss's label codes. Its weight is
        # 1 / its image's divisor.
        box_class = xp.take_along_axis(padded_labels, xp.maximum(matches, 0), axis=1)    # (N, M)
        anchor_labels = xp.where(positive, box_class, matches)                 # (N, M)
        anchor_weights = xp.broadcast_to((1 / divisor)[:, None], (num_images, num_anchors))   # (N, M)
        classification = F.sigmoid_focal_loss_with_labels(
            cls_logits.reshape(num_images * num_anchors, num_classes), anchor_labels.reshape(-1),
            anchor_weights.reshape(-1), alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA)

        # Box regression targets: each positive anchor's box, encoded relative to the anchor.
        box_targets = xp.concatenate([
            encode_boxes(boxes[i][matches[i][positive[i]]].astype(box_deltas.dtype), anchors[positive[i]])
            for i in range(num_images)])                                        # (P, 4), images in order
        image_of_positive = xp.nonzero(positive)[0]                             # (P,)
        box_loss = F.smooth_l1_loss(box_deltas[positive], box_targets, reduction="none",
                                    beta=self.box_loss_beta)                    # (P, 4)
        box_regression = (box_loss.sum(dim=1) / divisor[image_of_positive]).sum()

        return {"classification": classification, "box_regression": box_regression,
                "loss": classification + self.box_loss_weight * box_regression,
                "num_positive": int(positive.sum()), "num_ignored": int((matches == IGNORED).sum()),
                "num_negative": int((matches == BACKGROUND).sum())}

    # --- inference ------------------------------------------------------------------------------------------------
    def predict(self, images, image_sizes=None):
        """Detect objects: a list of N dicts {"boxes": (D, 4), "scores": (D,), "labels": (D,) int64}.

        Runs in evaluation mode without building a graph, then puts the model back in the mode it was in.
        Boxes are (x1, y1, x2, y2) in pixels of the input, arrays on the images' device, highest score first.

        Args:
            images: (N, 3, H, W), H and W multiples of 32, as for ``forward``.
            image_sizes: the (h, w) of each image before padding, to clip its boxes to; default (H, W).
        """
        images = self._check_images(images)
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"RetinaNet.predict: {len(image_sizes)} image sizes for {images.shape[0]} images")
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                cls_logits, box_deltas, anchors, num_anchors_per_level = self.head_outputs(images)
        finally:
            self.train(was_training)
        return self.postprocess_detections(cls_logits.data, box_deltas.data, anchors, num_anchors_per_level,
                                           image_sizes)

    def postprocess_detections(self, cls_logits, box_deltas, anchors, num_anchors_per_level, image_sizes):
        """From the subnets' outputs to detections, in the order of operations of torchvision's method of this name.

        Per image, per level: probabilities p = sigmoid(logit) of every (anchor, class) pair, flattened so that
        pair index = anchor * K + class; keep pairs with p > ``score_thresh``; of those, the ``topk_candidates``
        best; decode their anchors' offsets into boxes and clip them to the image. Then over all levels together,
        class-wise NMS at ``nms_thresh``, and the ``detections_per_img`` best.

        Thresholding and top-k per level first means only a few thousand boxes are ever decoded, not all M * K.

        Args:
            cls_logits: array (N, M, K). box_deltas: array (N, M, 4). anchors: array (M, 4).
            num_anchors_per_level: [M_l], summing to M.
            image_sizes: N pairs (h, w), the size each image's boxes are clipped to.

        Returns:
            list of N dicts {"boxes": (D, 4), "scores": (D,), "labels": (D,) int64}, highest score first.
        """
        xp = get_array_module(cls_logits)
        num_classes = cls_logits.shape[2]
        probabilities = stable_sigmoid(cls_logits)[0]                          # (N, M, K)
        level_ends = list(accumulate(num_anchors_per_level))
        level_starts = [0] + level_ends[:-1]
        detections = []
        for i, image_size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for start, end in zip(level_starts, level_ends):
                level_scores = probabilities[i, start:end].reshape(-1)          # (M_l * K,) anchor * K + class
                candidates = xp.flatnonzero(level_scores > self.score_thresh)   # (C,)
                best_first = xp.argsort(-level_scores[candidates], kind="stable")[:self.topk_candidates]
                pairs = candidates[best_first]                                  # (T,) highest score first
                anchor_index = start + pairs // num_classes                     # (T,) rows of the M anchors
                level_boxes = decode_boxes(box_deltas[i, anchor_index], anchors[anchor_index])   # (T, 4)
                boxes.append(clip_boxes(level_boxes, image_size))
                scores.append(level_scores[pairs])
                labels.append((pairs % num_classes).astype(xp.int64))
            boxes, scores, labels = xp.concatenate(boxes), xp.concatenate(scores), xp.concatenate(labels)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    # --- checks ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_images(images):
        """The images as a Tensor, after checking they are (N, 3, H, W) floats with H, W multiples of 32."""
        if not isinstance(images, Tensor):
            images = Tensor(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RetinaNet: images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        if images.dtype.kind != "f":
            raise TypeError(f"RetinaNet: images must be float32, got {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("RetinaNet: the batch is empty (0 images); give at least one image")
        height, width = images.shape[-2:]
        if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
            padded = tuple(-(-n // SIZE_DIVISOR) * SIZE_DIVISOR for n in (height, width))
            raise ValueError(f"RetinaNet: image height and width must be multiples of {SIZE_DIVISOR} (the stride "
                             f"of C5), got {height} x {width}; pad the batch with zeros at the bottom and right to "
                             f"{padded[0]} x {padded[1]}")
        return images

    def _check_batch_norm_statistics(self, images):
        """In training, batch norm needs two or more values per channel on C5, its smallest map (1/32 of the image):
        raise ValueError, with the fix, for a batch too small for that."""
        if not (self.training and any(isinstance(m, nn.BatchNorm2d) for m in self.backbone.modules())):
            return
        n, _, height, width = images.shape
        if n * (height // SIZE_DIVISOR) * (width // SIZE_DIVISOR) < 2:
            raise ValueError(f"RetinaNet: training batch norm on {n} image{'s' * (n != 1)} of {height} x {width} "
                             f"leaves one value per channel on C5 ({height // SIZE_DIVISOR} x "
                             f"{width // SIZE_DIVISOR}), whose variance is 0; train on 2 or more images a batch, or "
                             "on images of 64 px or more")

    def _check_targets(self, targets, num_images):
        """Raise ValueError, naming the image and the box, unless ``targets`` are N usable annotations."""
        if isinstance(targets, dict):
            raise ValueError("RetinaNet: targets must be a list with one dict per image, got one dict; for a single "
                             "image pass [target]")
        if len(targets) != num_images:
            raise ValueError(f"RetinaNet: {len(targets)} targets for {num_images} images; give one dict per image")
        for i, target in enumerate(targets):
            if "boxes" not in target or "labels" not in target:
                raise ValueError(f"RetinaNet: target {i} must be a dict with 'boxes' and 'labels', "
                                 f"got keys {sorted(target)}")
            check_boxes(target["boxes"], image_index=i)
            labels = to_numpy(target["labels"])
            num_boxes = len(target["boxes"])
            if labels.shape != (num_boxes,) or labels.dtype.kind not in "iu":
                raise ValueError(f"RetinaNet: image {i}: labels must be an integer array of shape ({num_boxes},), "
                                 f"one per box; got dtype {labels.dtype} and shape {labels.shape}")
            bad = ((labels < 0) | (labels >= self.num_classes)).nonzero()[0]
            if bad.size:
                j = int(bad[0])
                raise ValueError(f"RetinaNet: image {i}, box {j}: label {int(labels[j])} is not a class of this "
                                 f"model (0..{self.num_classes - 1}); labels count from 0 and there is no "
                                 "background class")
