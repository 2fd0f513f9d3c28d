// common.cuh: what both kernels share: the label codes, and small math functions that behave as NumPy's.
//
// Every function here is `__host__ __device__`: the kernels call them on the GPU, and the tests build them with
// the host C++ compiler (the CUDA qualifiers defined away) to compare them with NumPy, value by value.
#ifndef MINIDET_COMMON_CUH
#define MINIDET_COMMON_CUH

#ifndef __CUDACC__
#include <math.h>  // the host build of the checks; nvcc and NVRTC have the math functions built in
#endif

namespace minidet {

// Codes for anchors without a box, as in minidet.matching (and torchvision's Matcher).
constexpr int BACKGROUND = -1;  // a negative example: the target is 0 for every class
constexpr int IGNORED = -2;     // too close to call: no loss, no gradient

// numpy.maximum and numpy.minimum, NaN included: a NaN in either argument is the result. (fmaxf would drop it.)
// When a == b, the result is b, as NumPy's vectorised loops give it for 0 and -0.
template <typename T>
__host__ __device__ __forceinline__ T numpy_maximum(T a, T b) {
    return (a > b || a != a) ? a : b;
}

template <typename T>
__host__ __device__ __forceinline__ T numpy_minimum(T a, T b) {
    return (a < b || a != a) ? a : b;
}

// One name for the float and the double version of each function, so the templates below can call it.
__host__ __device__ __forceinline__ float math_exp(float x) { return expf(x); }
__host__ __device__ __forceinline__ double math_exp(double x) { return exp(x); }
__host__ __device__ __forceinline__ float math_log1p(float x) { return log1pf(x); }
__host__ __device__ __forceinline__ double math_log1p(double x) { return log1p(x); }
__host__ __device__ __forceinline__ float math_abs(float x) { return fabsf(x); }
__host__ __device__ __forceinline__ double math_abs(double x) { return fabs(x); }
__host__ __device__ __forceinline__ float math_sqrt(float x) { return sqrtf(x); }
__host__ __device__ __forceinline__ double math_sqrt(double x) { return sqrt(x); }
__host__ __device__ __forceinline__ float math_pow(float x, float y) { return powf(x, y); }
__host__ __device__ __forceinline__ double math_pow(double x, double y) { return pow(x, y); }

// base ** exponent as NumPy computes `array ** exponent` for a scalar exponent: it takes exact shortcuts for the
// exponents 2, 1, 0 and 0.5 (a square, a copy, ones, a square root). So do we: the same bits for RetinaNet's
// gamma = 2 (and gamma - 1 = 1), and no powf, which is slow on a GPU.
template <typename T>
__host__ __device__ __forceinline__ T numpy_power(T base, T exponent) {
    if (exponent == T(2)) return base * base;
    if (exponent == T(1)) return base;
    if (exponent == T(0)) return T(1);
    if (exponent == T(0.5)) return math_sqrt(base);
    return math_pow(base, exponent);
}

}  // namespace minidet

#endif  // MINIDET_COMMON_CUH
