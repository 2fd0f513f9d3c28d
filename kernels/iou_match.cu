// iou_match.cu: IoU matching of anchors to ground-truth boxes for a batch of images, without ever building the
// anchors x boxes IoU matrix.
//
// This is version 2, the one minidet launches. Version 1 (iou_match_v1.cu) has each thread read every box from
// global memory and fold every IoU into its box's best with an atomicMax on global memory. Version 2 stages the
// boxes in shared memory, a tile of 256 at a time, and takes each box's best over a warp with shuffles, then over
// the block in shared memory, before one atomicMax on global memory per (block, box).
//
// Inputs: anchors (A, 4), shared by every image; boxes (B, Gmax, 4), each image's boxes padded to Gmax;
// counts (B,) int32, how many of an image's Gmax slots are real boxes (the rest are never read); the thresholds
// high and low. Outputs: matches (B, A) int64 (the index of the anchor's box, or BACKGROUND -1, or IGNORED -2)
// and ious (B, A), each anchor's best IoU. Same results as minidet.matching.match_anchors, bit for bit.

#include "float_bits.cuh"
#include "iou_match.cuh"

namespace {

constexpr int BLOCK_SIZE = 256;  // anchors per block, and boxes per tile; minidet/cuda.py launches with this
constexpr unsigned FULL_WARP = 0xffffffffu;

// The largest of `value` over the 32 threads of a warp, in every thread of the warp.
template <typename Bits>
__device__ __forceinline__ Bits warp_max(Bits value) {
    for (int offset = 16; offset > 0; offset /= 2) {
        const Bits other = __shfl_xor_sync(FULL_WARP, value, offset);
        value = other > value ? other : value;
    }
    return value;
}

template <typename T>
__device__ __forceinline__ minidet::Box<T> load_box(const T* corners, long long index) {
    const T* c = corners + 4 * index;
    return minidet::make_box(c[0], c[1], c[2], c[3]);
}

// Which thread does what: one thread per (image, anchor). The grid is (ceil(A / 256), B): block (x, b) takes
// image b and its 256 anchors x * 256, ..., x * 256 + 255. Each thread loops over the image's boxes, computes
// the IoU with its anchor (box_iou in iou_match.cuh) and keeps the best IoU and its box (keep_best), then
// writes its anchor's label (match_label) and IoU. Threads past the last anchor have nothing to write, but
// still help to load boxes and take part in the reductions, so every thread reaches every __syncthreads.
//
// Shared memory: the 256 threads of a block all need the same boxes, so they first copy them from global
// memory into shared memory together (thread j copies box j, and computes its area once), wait for each other
// (__syncthreads), and then every thread reads every box from shared memory. An image with more than 256 boxes
// is done in tiles of 256: load a tile, use it, wait, load the next. A tile takes 256 x 5 values (x1, y1, x2,
// y2, area), 5 KB in float32, plus 1 KB for the per-box maxima below.
//
// Low-quality matches (allow_low_quality_matches) need, for each box, its best IoU over all the anchors of the
// image, which no single thread knows. So the kernel runs in two passes:
//   pass 1 (match_best_box): besides the above, each block finds, for each box, the largest IoU among its 256
//     anchors: a warp combines its 32 values with shuffles (warp_max), thread 0 of each warp folds the result
//     into the box's slot in shared memory with atomicMax, and at the end of the tile one thread per box folds
//     the block's maximum into box_best (B, Gmax) in global memory, again with atomicMax. atomicMax works on
//     integers, and we give it the float's bits read as an integer: for IoUs, which are >= 0, a larger float
//     has a larger bit pattern, so the integer maximum is the float maximum. box_best starts at 0 (the bits of
//     0.0), the value the NumPy reference starts from too.
//   pass 2 (promote_low_quality), a second launch, so that pass 1 has finished in every block: each thread
//     computes its anchor's IoUs again, with the same function, so they have the same bits as in pass 1, and
//     if one of them equals its box's best (==, ties included), sets the anchor's match to its own best box.
//     (Recomputing the IoUs is cheaper than storing the (B, A, Gmax) IoUs we set out not to build.)
template <typename T>
__device__ __forceinline__ void match_best_box(const T* __restrict__ anchors, const T* __restrict__ boxes,
                                               const int* __restrict__ counts, int num_anchors, int max_boxes,
                                               T high, T low, int find_box_best,
                                               typename minidet::BitsOf<T>::type* __restrict__ box_best,
                                               long long* __restrict__ matches, T* __restrict__ ious) {
    using Bits = typename minidet::BitsOf<T>::type;
    __shared__ minidet::Box<T> tile[BLOCK_SIZE];
    __shared__ Bits tile_box_best[BLOCK_SIZE];

    const int image = blockIdx.y;
    const int anchor_index = blockIdx.x * BLOCK_SIZE + threadIdx.x;
    const bool has_anchor = anchor_index < num_anchors;
    const int num_boxes = counts[image];
    const long long first_box = static_cast<long long>(image) * max_boxes;  // this image's slots in boxes
    const minidet::Box<T> anchor = load_box(anchors, has_anchor ? anchor_index : 0);

    minidet::BestBox<T> best = minidet::no_box_yet<T>();
    for (int start = 0; start < num_boxes; start += BLOCK_SIZE) {
        const int tile_size = min(BLOCK_SIZE, num_boxes - start);
        __syncthreads();  // every thread is done with the previous tile
        if (threadIdx.x < tile_size) {
            tile[threadIdx.x] = load_box(boxes, first_box + start + threadIdx.x);
            tile_box_best[threadIdx.x] = 0;
        }
        __syncthreads();  // the tile is loaded
        for (int j = 0; j < tile_size; ++j) {
            const T iou = minidet::box_iou(anchor, tile[j]);
            minidet::keep_best(best, iou, start + j);
            if (find_box_best) {
                const Bits block_best = warp_max(has_anchor ? minidet::to_bits(iou) : Bits(0));
                if (threadIdx.x % 32 == 0) atomicMax(&tile_box_best[j], block_best);
            }
        }
        if (find_box_best) {
            __syncthreads();  // every warp has folded its maxima into tile_box_best
            if (threadIdx.x < tile_size && tile_box_best[threadIdx.x] > 0) {
                atomicMax(&box_best[first_box + start + threadIdx.x], tile_box_best[threadIdx.x]);
            }
        }
    }
    if (has_anchor) {
        const long long out = static_cast<long long>(image) * num_anchors + anchor_index;
        matches[out] = minidet::match_label(best, high, low);
        ious[out] = minidet::match_iou(best);
    }
}

template <typename T>
__device__ __forceinline__ void promote_low_quality(const T* __restrict__ anchors, const T* __restrict__ boxes,
                                                    const int* __restrict__ counts, int num_anchors, int max_boxes,
                                                    const typename minidet::BitsOf<T>::type* __restrict__ box_best,
                                                    long long* __restrict__ matches) {
    __shared__ minidet::Box<T> tile[BLOCK_SIZE];
    __shared__ T tile_box_best[BLOCK_SIZE];

    const int image = blockIdx.y;
    const int anchor_index = blockIdx.x * BLOCK_SIZE + threadIdx.x;
    const bool has_anchor = anchor_index < num_anchors;
    const int num_boxes = counts[image];
    const long long first_box = static_cast<long long>(image) * max_boxes;
    const minidet::Box<T> anchor = load_box(anchors, has_anchor ? anchor_index : 0);

    minidet::BestBox<T> best = minidet::no_box_yet<T>();
    bool is_best_of_a_box = false;
    for (int start = 0; start < num_boxes; start += BLOCK_SIZE) {
        const int tile_size = min(BLOCK_SIZE, num_boxes - start);
        __syncthreads();
        if (threadIdx.x < tile_size) {
            tile[threadIdx.x] = load_box(boxes, first_box + start + threadIdx.x);
            tile_box_best[threadIdx.x] = minidet::from_bits(box_best[first_box + start + threadIdx.x]);
        }
        __syncthreads();
        for (int j = 0; j < tile_size; ++j) {
            const T iou = minidet::box_iou(anchor, tile[j]);  // the same function as pass 1: the same bits
            minidet::keep_best(best, iou, start + j);
            if (iou == tile_box_best[j]) is_best_of_a_box = true;
        }
    }
    if (has_anchor && is_best_of_a_box) {
        matches[static_cast<long long>(image) * num_anchors + anchor_index] = best.box;
    }
}

}  // namespace

// Bytes moved and work, for 8 images x 120,000 anchors x 50 boxes with low-quality matches: each pass reads
// the anchors once per image (16 B x 120,000 x 8 = 15 MB, mostly from the L2 cache) and a few KB of boxes, and
// the outputs are 12 B per (image, anchor), 11.5 MB: memory is not the limit. The work is 2 x 48 million IoUs
// at about 15 operations each, plus, in pass 1, a warp reduction per (warp, box): the kernel is limited by
// arithmetic and by the launches, and should take tens of microseconds on an H100. The IoU matrix it avoids
// would take 8 x 120,000 x 50 x 4 B = 192 MB, and its temporaries several times that.
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
