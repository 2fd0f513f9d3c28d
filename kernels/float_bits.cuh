// float_bits.cuh: a float's bits read as an integer of the same size, and back, for atomicMax on IoUs.
//
// atomicMax works on integers. For floats >= 0 (IoUs are), a larger float has a larger bit pattern read as a signed
// integer, so the integer maximum of the bits is the bits of the float maximum. Used by iou_match_v1.cu and
// iou_match.cu. Device code only.
#ifndef MINIDET_FLOAT_BITS_CUH
#define MINIDET_FLOAT_BITS_CUH

namespace minidet {

// The integer type with the bits of each float type.
template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
    using type = int;
};
template <>
struct BitsOf<double> {
    using type = long long;
};

__device__ __forceinline__ int to_bits(float value) { return __float_as_int(value); }
__device__ __forceinline__ long long to_bits(double value) { return __double_as_longlong(value); }
__device__ __forceinline__ float from_bits(int bits) { return __int_as_float(bits); }
__device__ __forceinline__ double from_bits(long long bits) { return __longlong_as_double(bits); }

}  // namespace minidet

#endif  // MINIDET_FLOAT_BITS_CUH
