// iou_match_v1.cu: version 1 of the matching kernels, without shared memory: each thread reads every box of its
// image from global memory, and, for low-quality matches, folds every IoU into its box's best IoU with an
// atomicMax on global memory. (Version 2, iou_match.cu, is the one minidet launches.)
//
// Same inputs, outputs and two passes as iou_match.cu, whose comment explains the matching; the grid is the same,
// (ceil(A / 256), B) blocks of 256 threads, one thread per (image, anchor).
//
// What it costs: the 256 threads of a block all read the same boxes from global memory (from the cache, mostly,
// but each read is an instruction that waits), and pass 1 makes up to one atomicMax per (anchor, box) with an
// overlap, on the few addresses of the image's boxes, which the GPU does one after another. Version 2 loads each
// box once per block into shared memory, and takes the maximum over a warp, then over the block, before one
// atomicMax per (block, box).
#include "float_bits.cuh"
#include "iou_match.cuh"

namespace {

constexpr int BLOCK_SIZE = 256;  // anchors per block; minidet/cuda.py launches with this many

template <typename T>
__device__ __forceinline__ minidet::Box<T> load_box(const T* corners, long long index) {
    const T* c = corners + 4 * index;
    return minidet::make_box(c[0], c[1], c[2], c[3]);
}

template <typename T>
__device__ __forceinline__ void match_best_box(const T* __restrict__ anchors, const T* __restrict__ boxes,
                                               const int* __restrict__ counts, int num_anchors, int max_boxes,
                                               T high, T low, int find_box_best,
                                               typename minidet::BitsOf<T>::type* __restrict__ box_best,
                                               long long* __restrict__ matches, T* __restrict__ ious) {
    const int image = blockIdx.y;
    const int anchor_index = blockIdx.x * BLOCK_SIZE + threadIdx.x;
    if (anchor_index >= num_anchors) return;        // no barrier below: spare threads may leave at once
    const long long first_box = static_cast<long long>(image) * max_boxes;
    const minidet::Box<T> anchor = load_box(anchors, anchor_index);
    minidet::BestBox<T> best = minidet::no_box_yet<T>();
    for (int j = 0; j < counts[image]; ++j) {
        const T iou = minidet::box_iou(anchor, load_box(boxes, first_box + j));
        minidet::keep_best(best, iou, j);
        if (find_box_best && iou > T(0)) atomicMax(&box_best[first_box + j], minidet::to_bits(iou));
    }
    const long long out = static_cast<long long>(image) * num_anchors + anchor_index;
    matches[out] = minidet::match_label(best, high, low);
    ious[out] = minidet::match_iou(best);
}

template <typename T>
__device__ __forceinline__ void promote_low_quality(const T* __restrict__ anchors, const T* __restrict__ boxes,
                                                    const int* __restrict__ counts, int num_anchors, int max_boxes,
                                                    const typename minidet::BitsOf<T>::type* __restrict__ box_best,
                                                    long long* __restrict__ matches) {
    const int image = blockIdx.y;
    const int anchor_index = blockIdx.x * BLOCK_SIZE + threadIdx.x;
    if (anchor_index >= num_anchors) return;
    const long long first_box = static_cast<long long>(image) * max_boxes;
    const minidet::Box<T> anchor = load_box(anchors, anchor_index);
    minidet::BestBox<T> best = minidet::no_box_yet<T>();
    bool is_best_of_a_box = false;
    for (int j = 0; j < counts[image]; ++j) {
        const T iou = minidet::box_iou(anchor, load_box(boxes, first_box + j));   // the same bits as in pass 1
        minidet::keep_best(best, iou, j);
        if (iou == minidet::from_bits(box_best[first_box + j])) is_best_of_a_box = true;
    }
    if (is_best_of_a_box) matches[static_cast<long long>(image) * num_anchors + anchor_index] = best.box;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(BLOCK_SIZE)
match_best_box_float32(const float* anchors, const float* boxes, const int* counts, int num_anchors, int max_boxes,
                       float high, float low, int find_box_best, int* box_best, long long* matches, float* ious) {
    match_best_box(anchors, boxes, counts, num_anchors, max_boxes, high, low, find_box_best, box_best, matches,
                   ious);
}

extern "C" __global__ void __launch_bounds__(BLOCK_SIZE)
match_best_box_float64(const double* anchors, const double* boxes, const int* counts, int num_anchors,
                       int max_boxes, double high, double low, int find_box_best, long long* box_best,
                       long long* matches, double* ious) {
    match_best_box(anchors, boxes, counts, num_anchors, max_boxes, high, low, find_box_best, box_best, matches,
                   ious);
}

extern "C" __global__ void __launch_bounds__(BLOCK_SIZE)
promote_low_quality_float32(const float* anchors, const float* boxes, const int* counts, int num_anchors,
                            int max_boxes, const int* box_best, long long* matches) {
    promote_low_quality(anchors, boxes, counts, num_anchors, max_boxes, box_best, matches);
}

extern "C" __global__ void __launch_bounds__(BLOCK_SIZE)
promote_low_quality_float64(const double* anchors, const double* boxes, const int* counts, int num_anchors,
                            int max_boxes, const long long* box_best, long long* matches) {
    promote_low_quality(anchors, boxes, counts, num_anchors, max_boxes, box_best, matches);
}
