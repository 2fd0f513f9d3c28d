// iou_match.cuh: the IoU of an anchor and a box, and the decisions of IoU matching for one anchor.
//
// The IoU repeats minidet.boxes.box_iou operation for operation, in the same order, so that on the same float32
// (or float64) inputs both give the same bits:
//     inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))
//     union = (area1 + area2) - inter,   area = (x2 - x1) * (y2 - y1)
//     iou   = inter / union if union > 0 else 0
// Same bits also needs the compiler to round every operation as written: no fused multiply-add (nvcc and NVRTC
// contract a * b + c into one FMA by default, which rounds once instead of twice: compile with --fmad=false;
// g++ with -ffp-contract=off) and exact division (--prec-div=true); minidet/cuda.py passes those options.
// CuPy adds -ftz=true, which reads float32 values below 1.2e-38 as 0: boxes in pixels never produce such values.
//
// The rules (minidet.matching.match_anchors): an anchor's best box is the one with the highest IoU, the lowest
// index among equals; IoU >= high: matched to that box; low <= IoU < high: IGNORED; IoU < low: BACKGROUND.
#ifndef MINIDET_IOU_MATCH_CUH
#define MINIDET_IOU_MATCH_CUH

#include "common.cuh"

namespace minidet {

// A box (x1, y1, x2, y2) with its area, which each IoU needs and is computed once per box.
template <typename T>
struct Box {
    T x1, y1, x2, y2, area;
};

template <typename T>
__host__ __device__ __forceinline__ Box<T> make_box(T x1, T y1, T x2, T y2) {
    return Box<T>{x1, y1, x2, y2, (x2 - x1) * (y2 - y1)};
}

// Intersection over union of an anchor and a box, as box_iou(anchors, boxes)[i, j] gives it.
template <typename T>
__host__ __device__ __forceinline__ T box_iou(const Box<T>& anchor, const Box<T>& box) {
    const T left = numpy_maximum(anchor.x1, box.x1);      // the intersection's corners
    const T top = numpy_maximum(anchor.y1, box.y1);
    const T right = numpy_minimum(anchor.x2, box.x2);
    const T bottom = numpy_minimum(anchor.y2, box.y2);
    const T width = numpy_maximum(right - left, T(0));    // no overlap: a negative size, clamped to 0
    const T height = numpy_maximum(bottom - top, T(0));
    const T inter = width * height;
    const T union_area = (anchor.area + box.area) - inter;
    return union_area > T(0) ? inter / union_area : T(0);  // two zero-area boxes: 0, not 0 / 0
}

// An anchor's best box so far.
template <typename T>
struct BestBox {
    T iou;
    int box;  // -1 until a box has been seen
};

template <typename T>
__host__ __device__ __forceinline__ BestBox<T> no_box_yet() {
    return BestBox<T>{T(-1), -1};  // below every IoU, so the first box always replaces it
}

// Boxes are visited in increasing index order; a strictly greater IoU is needed to replace the best, so among
// equal IoUs the lowest box index stays (numpy.argmax's rule).
template <typename T>
__host__ __device__ __forceinline__ void keep_best(BestBox<T>& best, T iou, int box) {
    if (iou > best.iou) {
        best.iou = iou;
        best.box = box;
    }
}

// The anchor's entry in `matches`: its best box, IGNORED or BACKGROUND. An image without boxes: BACKGROUND.
template <typename T>
__host__ __device__ __forceinline__ long long match_label(const BestBox<T>& best, T high, T low) {
    if (best.box < 0) return BACKGROUND;
    if (best.iou < low) return BACKGROUND;
    if (best.iou < high) return IGNORED;
    return best.box;
}

// The anchor's entry in `ious`: its best IoU, 0 when the image has no boxes.
template <typename T>
__host__ __device__ __forceinline__ T match_iou(const BestBox<T>& best) {
    return best.box < 0 ? T(0) : best.iou;
}

}  // namespace minidet

#endif  // MINIDET_IOU_MATCH_CUH
