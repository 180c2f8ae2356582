"""Detections compared as matched sets: the one comparison every parity test uses.

Two runs of the same model (ONNX vs TensorFlow, OpenVINO vs ONNX Runtime, DALI vs CPU decode, Ray vs
one process, ...) agree when their detections pair up one to one: the same class, boxes that overlap
(IoU >= ``iou``, or every corner within ``box_tol``) and scores within ``score_tol``. Order is not
compared: two detections whose scores differ by 1e-7 swap places on another CPU (TensorFlow's oneDNN
kernels round differently on AVX2, AVX-512 and AMX machines), and that is not a difference in the
detections. What is left unpaired must be explained by rounding alone:

- a detection within ``margin`` of the score cut-off (it may fall on either side of it);
- a detection tied with an unpaired one of the same class in the other run (|score difference| <= ``margin``):
  greedy NMS keeps whichever of two overlapping near-equal boxes comes first, and the other is suppressed;
- detections below the last row of a run that filled all its rows (its keep_top_k cut): that run had no
  room for them, so they are not compared (nor is anything below that row).

Anything else unpaired, or a pair outside the tolerances, fails with a message naming the detections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCORE, BOX = 2, slice(3, 7)


@dataclass
class Comparison:
    """The outcome of comparing two lists of detections of one image."""

    paired: int = 0
    worst_score: float = 0.0          # largest |score difference| of a pair
    worst_box: float = 0.0            # largest |corner difference| of a pair
    lowest_iou: float = 1.0
    excused: list = field(default_factory=list)      # (side, row, why) left unpaired for a reason above
    unexplained: list = field(default_factory=list)  # (side, row) left unpaired for no such reason
    floor: float = 0.0                # the score from which detections were compared

    def merge(self, other: "Comparison") -> "Comparison":
        self.paired += other.paired
        self.worst_score = max(self.worst_score, other.worst_score)
        self.worst_box = max(self.worst_box, other.worst_box)
        self.lowest_iou = min(self.lowest_iou, other.lowest_iou)
        self.excused += other.excused
        self.unexplained += other.unexplained
        return self


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else float(np.allclose(a, b))


def compare_detections(ours: np.ndarray, theirs: np.ndarray, cutoff: float = 0.0, *,
                       rows: tuple[int | None, int | None] = (None, None),
                       iou: float = 0.99, box_tol: float = 1e-3, score_tol: float = 1e-4,
                       margin: float = 1e-5) -> Comparison:
    """Pair the detections of one image: ``ours`` and ``theirs`` are [K, 7] rows (image_id, label, score,
    xmin, ymin, xmax, ymax) of the used rows only; those scoring at least ``cutoff`` are compared. ``rows``:
    how many rows each run had (its keep_top_k; None: unknown), to know when a run was full."""
    ours, theirs = (np.asarray(side, np.float64).reshape(-1, 7) for side in (ours, theirs))
    floor = cutoff
    for side, capacity in zip((ours, theirs), rows):
        if capacity is not None and len(side) >= capacity and len(side):
            floor = max(floor, float(side[:, SCORE].min()))      # a full run: nothing below its last row
    ours, theirs = (side[side[:, SCORE] >= floor] for side in (ours, theirs))
    result = Comparison(floor=floor)
    free = np.ones(len(theirs), bool)
    left = []
    for index in np.argsort(-ours[:, SCORE], kind="stable"):
        mine = ours[index]
        best, best_cost = None, None
        for other in np.flatnonzero(free & (theirs[:, 1] == mine[1])):
            score_diff = abs(theirs[other, SCORE] - mine[SCORE])
            box_diff = float(np.abs(theirs[other, BOX] - mine[BOX]).max())
            overlap = _iou(theirs[other, BOX], mine[BOX])
            if score_diff <= score_tol and (overlap >= iou or box_diff <= box_tol):
                cost = score_diff + box_diff
                if best_cost is None or cost < best_cost:
                    best, best_cost = other, cost
        if best is None:
            left.append(("ours", mine))
            continue
        free[best] = False
        result.paired += 1
        result.worst_score = max(result.worst_score, abs(theirs[best, SCORE] - mine[SCORE]))
        result.worst_box = max(result.worst_box, float(np.abs(theirs[best, BOX] - mine[BOX]).max()))
        result.lowest_iou = min(result.lowest_iou, _iou(theirs[best, BOX], mine[BOX]))
    left += [("theirs", row) for row in theirs[free]]
    for side, row in left:
        if abs(row[SCORE] - floor) <= margin:
            result.excused.append((side, row, "at the cut-off"))
        elif any(other_side != side and other[1] == row[1] and abs(other[SCORE] - row[SCORE]) <= margin
                 for other_side, other in left):
            result.excused.append((side, row, "tied with an unpaired detection of the other run"))
        else:
            result.unexplained.append((side, row))
    return result


def _row(row: np.ndarray) -> str:
    return (f"class {int(row[1])} score {row[SCORE]:.6f} box "
            f"({', '.join(f'{value:.4f}' for value in row[BOX])})")


def assert_same_detections(ours, our_counts, theirs, their_counts, cutoff: float = 0.0, *, names=None,
                           what: str = "ours vs theirs", full_at: tuple | None = None, **tolerances) -> Comparison:
    """``compare_detections`` on every image of two batches ([N, K, 7] detections, [N] counts); fails on a
    detection with no partner that rounding cannot explain. ``full_at``: the row counts at which each run was cut
    (default: each array's K; (None, None) for lists that were never cut). Returns the whole batch's Comparison."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert len(ours) == len(theirs), f"{what}: {len(ours)} vs {len(theirs)} images"
    total, problems = Comparison(), []
    for image in range(len(ours)):
        rows = full_at if full_at is not None else (ours.shape[1], theirs.shape[1])
        result = compare_detections(ours[image][:int(our_counts[image])], theirs[image][:int(their_counts[image])],
                                    cutoff, rows=rows, **tolerances)
        name = names[image] if names is not None else f"image {image}"
        problems += [f"{name}: only in {'ours' if side == 'ours' else 'theirs'}: {_row(row)}"
                     for side, row in result.unexplained]
        total.merge(result)
    assert not problems, (f"{what}: {len(problems)} detection(s) above {cutoff:g} without a partner "
                          f"({total.paired} paired):\n" + "\n".join(problems[:10]))
    return total
