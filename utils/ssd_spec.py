"""SsdSpec: everything the post-processing needs about one SSD graph, the single source of truth.

Read once from the graph and its pipeline.config by utils.spec_reader (conversion); stored inside
the converted file (utils.artifact) and read back from there by the runners.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


# The ranges a value may take, wherever it is read (pipeline.config, NMS flags): name -> (test, wording).
_RANGES = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "iou_threshold": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "score_threshold": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "top_k": (lambda v: v >= 1, "must be at least 1"),
    "keep_top_k": (lambda v: v >= 1, "must be at least 1"),
}


def check_value(check: str, value) -> str | None:
    """Why ``value`` is out of the range named ``check`` (a key of _RANGES), or None when it is in it."""
    test, wording = _RANGES[check]
    try:
        return None if test(value) and value == value else wording   # NaN fails every range
    except TypeError:
        return wording


SSD_GENERATOR = "ssd"                # TF's ssd_anchor_generator (MultipleGridAnchorGenerator)
MULTISCALE_GENERATOR = "multiscale"  # TF's multiscale_anchor_generator (MultiscaleGridAnchorGenerator, FPN / RetinaNet)
MULTISCALE_ASPECT_RATIOS = (1.0, 2.0, 0.5)


@dataclass(frozen=True)
class AnchorSpec:
    """Parameters of TF's anchor generator: ssd_anchor_generator (= GridAnchor_TRT's fields) or
    multiscale_anchor_generator (levels, anchor scale, scales per octave; aspect_ratios shared)."""

    min_scale: float = 0.2
    max_scale: float = 0.95
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 0.3333)
    reduce_boxes_in_lowest_layer: bool = True
    interpolated_scale_aspect_ratio: float = 1.0
    feature_map_shapes: tuple[tuple[int, int], ...] = ()   # (height, width) per layer
    generator: str = SSD_GENERATOR
    min_level: int = 3            # multiscale: the first feature map's stride is 2 ** min_level
    max_level: int = 7
    anchor_scale: float = 4.0
    scales_per_octave: int = 2

    @property
    def num_layers(self) -> int:
        return len(self.feature_map_shapes)

    @property
    def multiscale(self) -> bool:
        return self.generator == MULTISCALE_GENERATOR

    def boxes_per_location(self, layer: int) -> int:
        """Anchors per feature-map cell in one layer, as TF's create_ssd_anchors (or the multiscale generator)
        lays them out."""
        if self.multiscale:
            return len(self.aspect_ratios) * self.scales_per_octave
        if layer == 0 and self.reduce_boxes_in_lowest_layer:
            return 3
        return len(self.aspect_ratios) + (1 if self.interpolated_scale_aspect_ratio > 0 else 0)


# Where the graph's post-processing clips the decoded boxes to the window [0, 0, 1, 1] (read from the graph by
# utils.tf_graph.clip_order): the OD API's exports of 2017 and early 2018 clip every class's boxes and drop the
# zero-area ones BEFORE the per-class NMS (IoUs of clipped boxes); exports since tensorflow/models 59f7e80a
# (2018-08-07) run NMS on the unclipped boxes and clip the sorted union AFTER it (then drop zero-area ones).
CLIP_BEFORE_NMS = "before_nms"
CLIP_AFTER_NMS = "after_nms"
CLIP_ORDERS = (CLIP_BEFORE_NMS, CLIP_AFTER_NMS)


@dataclass(frozen=True)
class NmsSpec:
    """Per-class NMS parameters (TF's batch_non_max_suppression = NMS_TRT's fields) and the graph's clip order."""

    score_threshold: float = 1e-8
    iou_threshold: float = 0.6
    top_k: int = 100        # boxes kept per class (TF max_detections_per_class)
    keep_top_k: int = 100   # boxes kept per image (TF max_total_detections)
    clip_order: str = CLIP_AFTER_NMS   # CLIP_BEFORE_NMS or CLIP_AFTER_NMS (files written before it existed: after)

    @property
    def clips_before_nms(self) -> bool:
        return self.clip_order == CLIP_BEFORE_NMS

    def rows(self, num_anchors: int, num_classes: int) -> int:
        """Detection rows per image: keepTopK, at most one per (anchor, foreground class) pair."""
        return min(self.keep_top_k, num_anchors * (num_classes - 1))


@dataclass(frozen=True)
class NmsOverrides:
    """Command-line overrides of the graph's NMS parameters (None keeps the graph's value)."""

    score_threshold: float | None = None
    iou_threshold: float | None = None
    top_k: int | None = None
    keep_top_k: int | None = None

    def any(self) -> bool:
        return any(value is not None for value in asdict(self).values())

    def problem(self) -> str | None:
        """Why one of the overrides is out of range (e.g. "iou_threshold 2.0 must be in (0, 1]"), or None."""
        for name, value in asdict(self).items():
            why = None if value is None else check_value(name, value)
            if why:
                return f"{name} {value:g} {why}"
        return None


@dataclass(frozen=True)
class SsdSpec:
    """The single source of truth about one SSD graph."""

    num_classes: int                      # including background (class 0)
    input_size: tuple[int, int]           # (width, height)
    anchors: AnchorSpec
    box_coder_scales: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w
    nms: NmsSpec = field(default_factory=NmsSpec)

    @property
    def num_anchors(self) -> int:
        return sum(h * w * self.anchors.boxes_per_location(i)
                   for i, (h, w) in enumerate(self.anchors.feature_map_shapes))

    @property
    def variances(self) -> tuple[float, float, float, float]:
        """The box coder scales as TensorRT's variances (x, y, w, h order of GridAnchor_TRT)."""
        y, x, h, w = self.box_coder_scales
        return (1.0 / x, 1.0 / y, 1.0 / w, 1.0 / h)

    @property
    def max_detections(self) -> int:
        """Rows of the [N, K, 7] detections output (K)."""
        return self.nms.rows(self.num_anchors, self.num_classes)

    def to_dict(self) -> dict:
        """Plain JSON-able values (the form stored in ONNX metadata and engine sidecars)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SsdSpec":
        """The inverse of ``to_dict`` (files written before the multiscale fields existed read as ssd anchors)."""
        anchors = data["anchors"]
        anchors = AnchorSpec(**{**anchors, "aspect_ratios": tuple(anchors["aspect_ratios"]),
                                "feature_map_shapes": tuple(tuple(s) for s in anchors["feature_map_shapes"])})
        nms = NmsSpec(**data["nms"])
        if nms.clip_order not in CLIP_ORDERS:
            raise ValueError(f"clip_order {nms.clip_order!r} is not one of {', '.join(CLIP_ORDERS)}")
        return cls(num_classes=int(data["num_classes"]), input_size=tuple(data["input_size"]), anchors=anchors,
                   box_coder_scales=tuple(data["box_coder_scales"]), nms=nms)

    def with_nms(self, **overrides) -> "SsdSpec":
        """Copy with some NMS parameters replaced (None values are ignored)."""
        return replace(self, nms=replace(self.nms, **{k: v for k, v in overrides.items() if v is not None}))
