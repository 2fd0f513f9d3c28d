// focal_loss_v1.cu: version 1 of the focal loss kernel, the simplest that is right: one thread per logit, and one
// atomicAdd per thread. (Version 2 is focal_loss_v2.cu; version 3, focal_loss.cu, is the one minidet launches.)
//
// Same inputs and outputs as focal_loss.cu. Thread i of the grid (blockIdx.x * 256 + threadIdx.x) takes logit
// i = a * K + k: it finds its anchor a = i / K and class k = i % K, computes the weighted loss and gradient of
// that logit (focal_loss_term_of_label in focal_loss.cuh), writes the gradient, and adds its loss to the total
// with atomicAdd. The launch has ceil(A * K / 256) blocks, so every logit has its own thread.
//
// What it costs: A * K atomic additions to one address. The GPU does atomics on one address one after another,
// so they, not the memory, set the speed. Version 2 adds the loss up in registers and shared memory first.
#include "focal_loss.cuh"

namespace {

constexpr int BLOCK_SIZE = 256;  // threads per block; minidet/cuda.py launches with this many

template <typename T>
__device__ __forceinline__ void focal_loss_with_labels(const T* __restrict__ logits, const int* __restrict__ labels,
                                                       const T* __restrict__ weights, int num_anchors,
                                                       int num_classes, T alpha, T gamma, T* __restrict__ grad,
                                                       T* __restrict__ loss) {
    const long long i = static_cast<long long>(blockIdx.x) * BLOCK_SIZE + threadIdx.x;
    if (i >= static_cast<long long>(num_anchors) * num_classes) return;   // the last block's spare threads
    const int anchor = static_cast<int>(i / num_classes);
    const int k = static_cast<int>(i % num_classes);
    const minidet::FocalLossTerm<T> term =
        minidet::focal_loss_term_of_label(logits[i], labels[anchor], k, weights[anchor], alpha, gamma);
    grad[i] = term.grad;
    atomicAdd(loss, term.loss);
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
