// focal_loss.cu: the sigmoid focal loss of (A, K) logits with one class label per anchor, and its gradient, in
// one pass over the logits. The arithmetic is in focal_loss.cuh; this file is how the GPU's threads share the work.
//
// This is version 3, the one minidet launches. Version 1 (focal_loss_v1.cu) takes one thread per logit and one
// atomicAdd per thread; version 2 (focal_loss_v2.cu) adds the grid-stride loop and the block sums. Version 3
// changes how a thread walks its elements: one division at the start instead of one per element, and 4 loads in
// flight before it computes, so that the memory is kept busy.
//
// Inputs: logits (A, K) row-major; labels (A,) int32: 0..K-1 is the class of a positive anchor, -1 (BACKGROUND)
// means all K targets are 0, -2 (IGNORED) means the anchor adds nothing; weights (A,): each anchor's loss is
// multiplied by its weight (RetinaNet puts 1 / number of positives there). Outputs: grad (A, K), the gradient of
// the loss with respect to each logit, and loss, one number, which the caller sets to 0 before the launch.

#include "block_sum.cuh"
#include "focal_loss.cuh"

namespace {

constexpr int BLOCK_SIZE = 256;         // threads per block; minidet/cuda.py launches with this many
constexpr int ELEMENTS_PER_ROUND = 4;   // elements a thread loads before it computes any of them

// Which thread does what: the A * K logits are one flat list, and thread t of the grid takes elements t,
// t + S, t + 2S, ... where S is the number of threads in the grid (a "grid-stride loop": any A * K works with any
// grid size; minidet/cuda.py launches as many threads as the GPU runs at once, one "wave"). For element
// i = a * K + k it reads the logit and the anchor's label and weight, and calls focal_loss_term_of_label
// (focal_loss.cuh) for the weighted loss and gradient of that one logit (target 1 if label == k, else 0; nothing
// for an IGNORED anchor). It writes the gradient at once and adds the loss to a running sum in a register.
// Neighbouring threads take neighbouring logits, so a warp reads and writes 32 consecutive floats, 128 bytes, in
// one memory transaction each way; the K threads of one anchor read the same label and weight, from the cache.
// Two details for speed: a thread finds its anchor a = i / K by one division at the start and then steps it along
// (ElementCursor in focal_loss.cuh; an integer division costs about 20 instructions); and a thread loads 4 of its
// elements before it computes any, so that it has several logits on their way from memory at once (with one at a
// time, the loads in flight might be too few to keep the memory busy).
//
// The reduction: the block's 256 running sums become one number (add_block_sum in block_sum.cuh: shuffles within
// each warp, the 8 warp sums through shared memory, the first warp adds those), and thread 0 adds it to the loss
// with one atomicAdd. So there are as many atomic additions as blocks (a few hundred), not A * K.
// The order of the additions differs from NumPy's (and from run to run, with the atomics), so the loss agrees
// with the NumPy reference within float32 rounding, not bit for bit; each gradient element is computed alone
// and does not depend on the order.
template <typename T>
__device__ __forceinline__ void focal_loss_with_labels(const T* __restrict__ logits, const int* __restrict__ labels,
                                                       const T* __restrict__ weights, int num_anchors,
                                                       int num_classes, T alpha, T gamma, T* __restrict__ grad,
                                                       T* __restrict__ loss) {
    // The caller checks that A * K < 2^31 and launches one wave (S is well below 2^28), so unsigned 32-bit indices
    // cannot overflow, even a few strides past the end.
    const unsigned int num_elements = static_cast<unsigned int>(num_anchors) * num_classes;
    const unsigned int stride = gridDim.x * blockDim.x;
    minidet::ElementCursor at(blockIdx.x * blockDim.x + threadIdx.x, stride, num_classes);   // i, anchor, k
    T sum = T(0);
    while (at.i < num_elements) {
        // Load the thread's next ELEMENTS_PER_ROUND elements first, then compute: their loads are then in flight
        // together (predicated, so the last round may go past the end without reading there).
        unsigned int index[ELEMENTS_PER_ROUND];
        int class_index[ELEMENTS_PER_ROUND], label[ELEMENTS_PER_ROUND];
        T logit[ELEMENTS_PER_ROUND], weight[ELEMENTS_PER_ROUND];
#pragma unroll
        for (int u = 0; u < ELEMENTS_PER_ROUND; ++u) {
            index[u] = at.i;
            class_index[u] = at.k;
            if (at.i < num_elements) {
                logit[u] = logits[at.i];
                label[u] = labels[at.anchor];
                weight[u] = weights[at.anchor];
            }
            at.advance(stride);                                // the thread's next element
        }
#pragma unroll
        for (int u = 0; u < ELEMENTS_PER_ROUND; ++u) {
            if (index[u] < num_elements) {
                const minidet::FocalLossTerm<T> term =
                    minidet::focal_loss_term_of_label(logit[u], label[u], class_index[u], weight[u], alpha, gamma);
                grad[index[u]] = term.grad;
                sum += term.loss;
            }
        }
    }

    minidet::add_block_sum<BLOCK_SIZE>(sum, loss);
}

}  // namespace

// Bytes moved, for 8 images x 120,000 anchors x 80 classes (A = 960,000, K = 80, A * K = 76.8 million):
// read 4 B and write 4 B per logit, 614 MB; labels and weights 8 B per anchor, 7.7 MB (each is read by the K
// threads of its anchor, but from memory only once); about 622 MB in all, about 207 us at the 3.0 TB/s an H100
// copies at. The arithmetic is one exp, one log1p, one division and about 40 other operations per logit; that
// should fit in the same time, so the kernel is limited by memory, and the goal is to be close to that floor.
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
