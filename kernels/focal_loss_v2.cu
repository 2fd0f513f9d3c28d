// focal_loss_v2.cu: version 2 of the focal loss kernel. What changes from version 1 (focal_loss_v1.cu): a
// grid-stride loop over one wave of blocks, and the loss added up in each thread's register, then per block
// (block_sum.cuh), so there is one atomicAdd per block instead of one per logit. (Version 3, focal_loss.cu, is the
// one minidet launches.)
//
// Same inputs and outputs as focal_loss.cu. The launch has as many blocks as the GPU runs at once (one "wave",
// S threads in all), and thread t takes elements t, t + S, t + 2S, ...: any A * K works with any grid. For each
// element it divides i by K for the anchor and class, computes the weighted loss and gradient, writes the gradient
// and adds the loss to its running sum. At the end the block's 256 sums become one, and one atomicAdd.
//
// What it still costs: an integer division per element (about 20 instructions on a GPU), and one load at a time
// per thread. Version 3 divides once per thread and keeps 4 loads in flight.
#include "block_sum.cuh"
#include "focal_loss.cuh"

namespace {

constexpr int BLOCK_SIZE = 256;  // threads per block; minidet/cuda.py launches with this many

template <typename T>
__device__ __forceinline__ void focal_loss_with_labels(const T* __restrict__ logits, const int* __restrict__ labels,
                                                       const T* __restrict__ weights, int num_anchors,
                                                       int num_classes, T alpha, T gamma, T* __restrict__ grad,
                                                       T* __restrict__ loss) {
    // The caller checks that A * K < 2^31 and launches one wave (S is well below 2^28): no 32-bit overflow.
    const unsigned int num_elements = static_cast<unsigned int>(num_anchors) * num_classes;
    const unsigned int stride = gridDim.x * BLOCK_SIZE;
    T sum = T(0);
    for (unsigned int i = blockIdx.x * BLOCK_SIZE + threadIdx.x; i < num_elements; i += stride) {
        const unsigned int anchor = i / num_classes;
        const int k = static_cast<int>(i % num_classes);
        const minidet::FocalLossTerm<T> term =
            minidet::focal_loss_term_of_label(logits[i], labels[anchor], k, weights[anchor], alpha, gamma);
        grad[i] = term.grad;
        sum += term.loss;
    }
    minidet::add_block_sum<BLOCK_SIZE>(sum, loss);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(BLOCK_SIZE)
focal_loss_with_labels_float32(const float* logits, const int* labels, const float* weights, int num_anchors,
                               int num_classes, float alpha, float gamma, float* grad, float* loss) {
    focal_loss_with_labels(logits, labels, weights, num_anchors, num_classes, alpha, gamma, grad, loss);
}

extern "C" __global__ void __launch_bounds__(BLOCK_SIZE)
focal_loss_with_labels_float64(const double* logits, const int* labels, const double* weights, int num_anchors,
                               int num_classes, double alpha, double gamma, double* grad, double* loss) {
    focal_loss_with_labels(logits, labels, weights, num_anchors, num_classes, alpha, gamma, grad, loss);
}
