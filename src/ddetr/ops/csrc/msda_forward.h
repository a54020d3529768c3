// The forward kernel: per (batch, head, block of queries) sample tables and a branch-free weighted gather.
// Part of the fused CPU kernel (ms_deform_attn_cpu.cpp, which includes it once); see its header for the layout.
#pragma once

#include <ATen/OpMathType.h>

#include "msda_geometry.h"
#include "vec.h"

#include <type_traits>
#include <vector>

namespace ddetr_msda {

// Forward table for one (query, head): bilinear weights with the attention weight folded in, and where each
// corner's channels start, corner k of sample j at [k][j], as base + offset in bytes. Offsets are int32 relative
// to the head when value is a head-major copy of ours (half the table, no 64-bit arithmetic), else absolute
// addresses (base 0). Corners off the map point at a zero row: the gather has no branches.
template <typename scalar_t, typename acc_t, typename offset_t>
struct SampleTable {
  std::vector<acc_t> w[4];
  std::vector<offset_t> off[4];
  uintptr_t base = 0;
  explicit SampleTable(int64_t LP) {
    for (int k = 0; k < 4; ++k) {
      w[k].resize(LP);
      off[k].resize(LP);
    }
  }

  // Corner offsets are origin + pixel * row, or zero off the map.
  void fill(const acc_t* __restrict loc, const acc_t* __restrict attn, const Lanes<acc_t>& lanes, int64_t LP,
            offset_t origin, offset_t row, offset_t zero) {
    acc_t* __restrict w0 = w[0].data();
    acc_t* __restrict w1 = w[1].data();
    acc_t* __restrict w2 = w[2].data();
    acc_t* __restrict w3 = w[3].data();
    offset_t* __restrict o0 = off[0].data();
    offset_t* __restrict o1 = off[1].data();
    offset_t* __restrict o2 = off[2].data();
    offset_t* __restrict o3 = off[3].data();
#pragma omp simd
    for (int64_t j = 0; j < LP; ++j) {
      acc_t fx, fy;
      int32_t pix[4];
      lanes.locate(loc, j, fx, fy, pix);
      const acc_t a = attn[j];
      w0[j] = a * (1 - fx) * (1 - fy);
      w1[j] = a * fx * (1 - fy);
      w2[j] = a * (1 - fx) * fy;
      w3[j] = a * fx * fy;
      o0[j] = pix[0] >= 0 ? origin + pix[0] * row : zero;
      o1[j] = pix[1] >= 0 ? origin + pix[1] * row : zero;
      o2[j] = pix[2] >= 0 ? origin + pix[2] * row : zero;
      o3[j] = pix[3] >= 0 ? origin + pix[3] * row : zero;
    }
  }

  const scalar_t* corner(int k, int64_t j) const {
    return reinterpret_cast<const scalar_t*>(base + static_cast<uintptr_t>(static_cast<intptr_t>(off[k][j])));
  }
};

// Weighted sum of the table's corners over W vectors of channels starting at channel ch, into C groups of
// accumulators (corner k into group k % C): W * C independent FMA chains, as many as the registers allow.
template <int W, int C, typename Table, typename scalar_t>
inline void gather(const Table& t, int64_t LP, scalar_t* out, int64_t ch) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t K = Vec<acc_t>::size;
  V acc[C][W] = {};
  for (int64_t j = 0; j < LP; ++j) {
    for (int k = 0; k < 4; ++k) {
      const acc_t w = t.w[k][j];
      const scalar_t* p = t.corner(k, j) + ch;
      for (int i = 0; i < W; ++i) acc[k % C][i] += w * load_vec(p + i * K);
    }
  }
  static_assert(C == 2 || C == 4, "corners go into 2 or 4 accumulator groups");
  for (int i = 0; i < W; ++i) {
    V sum = acc[0][i] + acc[1][i];
    if constexpr (C == 4) sum += acc[2][i] + acc[3][i];  // (0 + 1) + (2 + 3), as before the groups
    store_vec(out + i * K, sum);
  }
}

constexpr int64_t kQueryBlock = 32;

template <typename scalar_t, typename acc_t, typename offset_t>
void forward_kernel(const std::vector<const scalar_t*>& images, Layout lay, const acc_t* loc, const acc_t* attn,
                    scalar_t* out, int64_t N, int64_t M, int64_t D, int64_t Lq, int64_t P,
                    const std::vector<Level>& levels) {
  using Table = SampleTable<scalar_t, acc_t, offset_t>;
  constexpr bool relative = std::is_same_v<offset_t, int32_t>;
  constexpr auto bytes = static_cast<offset_t>(sizeof(scalar_t));
  constexpr int64_t K = Vec<acc_t>::size;
  const int64_t LP = static_cast<int64_t>(levels.size()) * P;
  const int64_t blocks = (Lq + kQueryBlock - 1) / kQueryBlock;
  const std::vector<scalar_t> zeros(D, scalar_t(0));
  const Lanes<acc_t> lanes(levels, P);

#pragma omp parallel num_threads(threads_for(N * Lq * M * LP * D, N * M * blocks))
  {
    // Two tables: the next query's table is filled before this query's gather, so the gather's loads do not
    // wait on just-written table entries.
    Table tables[2] = {Table(LP), Table(LP)};
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < N * M * blocks; ++task) {
      const int64_t n = task / (M * blocks), m = task / blocks % M, b = task % blocks;
      const scalar_t* vhead = images[n] + m * lay.head;
      tables[0].base = tables[1].base = relative ? reinterpret_cast<uintptr_t>(vhead) : 0;
      const auto origin = relative ? offset_t(0) : static_cast<offset_t>(reinterpret_cast<intptr_t>(vhead));
      const auto zero = relative ? static_cast<offset_t>((lay.zero - m * lay.head) * bytes)
                                 : static_cast<offset_t>(reinterpret_cast<intptr_t>(zeros.data()));
      const auto row_bytes = static_cast<offset_t>(lay.pixel * bytes);
      const int64_t q0 = b * kQueryBlock, q1 = std::min(Lq, q0 + kQueryBlock);
      auto fill = [&](int64_t q) {
        const int64_t row = (n * Lq + q) * M + m;
        if (q + kPrefetchAhead < Lq) {  // may run into the next block: that is usually this thread's next task
          const int64_t ahead = row + kPrefetchAhead * M;
          prefetch(loc + ahead * LP * 2, LP * 2 * sizeof(acc_t));
          prefetch(attn + ahead * LP, LP * sizeof(acc_t));
        }
        tables[q & 1].fill(loc + row * LP * 2, attn + row * LP, lanes, LP, origin, row_bytes, zero);
      };
      fill(q0);
      for (int64_t q = q0; q < q1; ++q) {
        if (q + 1 < q1) fill(q + 1);
        const Table& t = tables[q & 1];
        scalar_t* orow = out + ((n * Lq + q) * M + m) * D;
        int64_t ch = 0;
        // 8 accumulators fit the 16 registers of AVX2 and the 32 of AVX-512 with room for the loads: 32-byte
        // vectors take a 32-channel head (4 vectors) in one pass, 64-byte ones 2 vectors (32 channels) per pass.
        if constexpr (kVecBytes == 32)
          for (; ch + 4 * K <= D; ch += 4 * K) gather<4, 2>(t, LP, orow + ch, ch);
        for (; ch + 2 * K <= D; ch += 2 * K) gather<2, 4>(t, LP, orow + ch, ch);
        for (; ch + K <= D; ch += K) gather<1, 4>(t, LP, orow + ch, ch);
        for (; ch < D; ++ch) {
          acc_t acc = 0;
          for (int k = 0; k < 4; ++k)
            for (int64_t j = 0; j < LP; ++j) acc += t.w[k][j] * static_cast<acc_t>(t.corner(k, j)[ch]);
          orow[ch] = static_cast<scalar_t>(acc);
        }
      }
    }
  }
}

}  // namespace ddetr_msda
