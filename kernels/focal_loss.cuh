// focal_loss.cuh: the sigmoid focal loss of one logit and its derivative, computed together.
//
// This is minidet.functional.loss.focal_loss_terms for one element, operation for operation (read them side by
// side). With p = sigmoid(x), q = 1 - p and a target t in [0, 1]:
//     ce      = (1 - t) softplus(x) + t softplus(-x)     (= softplus(x) - t x, the cross-entropy, see below)
//     1 - p_t = t q + (1 - t) p                          (how wrong the prediction is: "miss" below)
//     loss    = alpha_t (1 - p_t)^gamma ce,  alpha_t = alpha t + (1 - alpha)(1 - t)   (alpha < 0: alpha_t = 1)
//     dloss/dx = alpha_t [(1 - p_t)^gamma (p - t) + gamma (1 - p_t)^(gamma - 1) (1 - 2t) p q ce]
//
// Numerically: every exponential is e = exp(-|x|), in (0, 1], so nothing overflows for x = +-100; p and q both
// come from e without a subtraction, so q does not round to 0 when p rounds to 1; softplus(x) is
// max(x, 0) + log1p(e), and the cross-entropy is a sum of two non-negative terms, never log(sigmoid(x)) (which
// is log(0) = -inf once sigmoid(x) underflows) and never softplus(x) - x (which loses all its digits for large x).
#ifndef MINIDET_FOCAL_LOSS_CUH
#define MINIDET_FOCAL_LOSS_CUH

#include "common.cuh"

namespace minidet {

template <typename T>
struct FocalLossTerm {
    T loss;  // alpha_t (1 - p_t)^gamma ce
    T grad;  // d loss / d x
};

// The focal loss of one logit x with target t, and its derivative with respect to x.
template <typename T>
__host__ __device__ __forceinline__ FocalLossTerm<T> focal_loss_term(T x, T t, T alpha, T gamma) {
    const T one = T(1);
    const T e = math_exp(-math_abs(x));                     // exp(-|x|)
    const T r = one / (one + e);
    const T p = x >= T(0) ? r : e * r;                      // sigmoid(x)
    const T q = x >= T(0) ? e * r : r;                      // 1 - sigmoid(x) = sigmoid(-x)
    const T log1p_e = math_log1p(e);
    const T ce = (one - t) * (numpy_maximum(x, T(0)) + log1p_e) + t * (numpy_maximum(-x, T(0)) + log1p_e);
    const T miss = t * q + (one - t) * p;                   // 1 - p_t
    const T modulator = numpy_power(miss, gamma);           // (1 - p_t)^gamma
    T loss = modulator * ce;
    T grad = modulator * (p * (one - t) - q * t);           // (p - t), written so that no term cancels
    if (gamma != T(0)) {
        grad = grad + gamma * numpy_power(miss, gamma - one) * (one - T(2) * t) * p * q * ce;
    }
    if (alpha >= T(0)) {
        const T alpha_t = alpha * t + (one - alpha) * (one - t);
        loss = alpha_t * loss;
        grad = alpha_t * grad;
    }
    return FocalLossTerm<T>{loss, grad};
}

// Logit k of an anchor with this label (a class 0..K-1, BACKGROUND or IGNORED) and weight: its weighted loss and
// gradient. The target is 1 for the anchor's class and 0 for every other class (all of them for BACKGROUND); an
// IGNORED anchor adds no loss and gets no gradient.
template <typename T>
__host__ __device__ __forceinline__ FocalLossTerm<T> focal_loss_term_of_label(T x, int label, int k, T weight,
                                                                              T alpha, T gamma) {
    if (label == IGNORED) return FocalLossTerm<T>{T(0), T(0)};
    const T target = label == k ? T(1) : T(0);
    const FocalLossTerm<T> term = focal_loss_term(x, target, alpha, gamma);
    return FocalLossTerm<T>{term.loss * weight, term.grad * weight};
}

// Where a thread is in the (A, K) logits as it steps through them `stride` elements at a time: the flat index
// i = anchor * K + k, and the anchor and class it belongs to. Found with one division at the start; each step is
// then an addition and a carry (an integer division costs about 20 instructions on a GPU).
struct ElementCursor {
    unsigned int i;
    unsigned int anchor;
    int k;
    unsigned int stride_anchors;  // a step of `stride` elements moves the anchor by this many
    int stride_classes;           // and the class by this many (with a carry into the anchor)
    int num_classes;

    __host__ __device__ ElementCursor(unsigned int first, unsigned int stride, int num_classes)
        : i(first),
          anchor(first / num_classes),
          k(static_cast<int>(first % num_classes)),
          stride_anchors(stride / num_classes),
          stride_classes(static_cast<int>(stride % num_classes)),
          num_classes(num_classes) {}

    __host__ __device__ void advance(unsigned int stride) {
        i += stride;
        anchor += stride_anchors;
        k += stride_classes;
        if (k >= num_classes) {
            k -= num_classes;
            anchor += 1;
        }
    }
};

}  // namespace minidet

#endif  // MINIDET_FOCAL_LOSS_CUH
