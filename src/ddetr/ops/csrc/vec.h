// Channel vectors for the CPU ms_deform_attn kernel, one register wide: 64 bytes (16 fp32 or 8 fp64 lanes) with
// AVX-512, 32 bytes elsewhere (AVX2: 64-byte vectors there are register pairs, and the forward's 8 accumulators
// of them spilled to the stack: 13x slower than at 32 bytes, measured on an AVX2-only AMD EPYC). Loads widen
// bf16/fp16 to fp32, stores round back (to nearest even, like c10), and horizontal sums. GCC/Clang vector
// extensions, with AVX-512 intrinsics (AVX ones for 32-byte horizontal sums) where they are shorter and a portable
// version of those otherwise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace ddetr_msda {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t size = kVecBytes / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t size = kVecBytes / 8;
};
constexpr int kLanes = Vec<float>::size;  // fp32 lanes; a vector of bf16/fp16 takes half the bytes
typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));
typedef int32_t I32 __attribute__((vector_size(kVecBytes)));
using VecF = Vec<float>::type;
using VecD = Vec<double>::type;

// Load one vector of channels, widening half types to fp32.
inline VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline VecD load_vec(const double* p) {
  VecD v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline VecF load_vec(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
#if defined(__AVX512F__)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (VecF)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#else
  U16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return (VecF)(__builtin_convertvector(raw, U32) << 16);
#endif
}
inline VecF load_vec(const c10::Half* p) {
#if defined(__AVX512F__)
  return (VecF)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  VecF v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// Store one vector of channels, rounding to the storage type.
inline void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }
inline void store_vec(double* p, VecD v) { std::memcpy(p, &v, sizeof(v)); }
inline void store_vec(c10::BFloat16* p, VecF v) {
  const U32 bits = (U32)v;
  const U32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even, like c10
  const U32 r = (U32)(v != v ? (I32)(U32){} + 0x7FC0 : (I32)rounded);  // NaN stays a (quiet) NaN
  const U16 h = __builtin_convertvector(r, U16);
  std::memcpy(p, &h, sizeof(h));
}
inline void store_vec(c10::Half* p, VecF v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kLanes; ++i) p[i] = static_cast<c10::Half>(v[i]);
#endif
}

// Horizontal sums as trees of halves (a lane-by-lane chain cost the AVX2 backward ~40 instructions per sample).
inline float hsum(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__)
  const __m256 x = (__m256)v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}
inline double hsum(VecD v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_pd((__m512d)v);
#elif defined(__AVX__)
  const __m256d x = (__m256d)v;
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
#else
  double s = 0;
  for (int i = 0; i < kLanes / 2; ++i) s += v[i];
  return s;
#endif
}

}  // namespace ddetr_msda
