// block_sum.cuh: add one value per thread of a block into a total in global memory, with one atomicAdd per block.
// Used by focal_loss_v2.cu and focal_loss.cu (version 3); version 1 (focal_loss_v1.cu) does without it, with one
// atomicAdd per thread.
//
// Two steps. Each warp (32 threads) adds its 32 values with shuffles: __shfl_down_sync(mask, value, offset) hands
// each lane the value of the lane `offset` places further on (a lane with none gets its own back); adding it with
// offsets 16, 8, 4, 2, 1 leaves the warp's sum in lane 0 after 5 steps. Lane 0 of each warp puts its sum in shared
// memory; after a __syncthreads (every warp has written its sum), the first warp adds those sums the same way, and
// thread 0 adds the block's sum to the total. Device code only: the CPU checks of the arithmetic do not include it.
#ifndef MINIDET_BLOCK_SUM_CUH
#define MINIDET_BLOCK_SUM_CUH

namespace minidet {

constexpr unsigned FULL_WARP = 0xffffffffu;

// The sum of `value` over the 32 threads of a warp, in lane 0 of the warp.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset /= 2) {
        value += __shfl_down_sync(FULL_WARP, value, offset);
    }
    return value;
}

// Adds the sum of `value` over the block's BLOCK_SIZE threads (a multiple of 32, at most 1024) to *total. Every
// thread of the block must call it: it waits at a __syncthreads.
template <int BLOCK_SIZE, typename T>
__device__ __forceinline__ void add_block_sum(T value, T* total) {
    __shared__ T warp_sums[BLOCK_SIZE / 32];
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    value = warp_sum(value);
    if (lane == 0) warp_sums[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = warp_sum(lane < BLOCK_SIZE / 32 ? warp_sums[lane] : T(0));
        if (lane == 0) atomicAdd(total, value);
    }
}

}  // namespace minidet

#endif  // MINIDET_BLOCK_SUM_CUH
