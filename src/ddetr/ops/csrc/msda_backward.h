// The backward kernel: one task per (batch, head), owning that head's slice of grad_value (no atomics).
// Part of the fused CPU kernel (ms_deform_attn_cpu.cpp, which includes it once); see its header for the layout.
#pragma once

#include "msda_geometry.h"
#include "vec.h"

#include <cstring>
#include <vector>

namespace ddetr_msda {

// Backward table for one (query, head): the cell position and corner pixels of its L*P samples (see locate).
template <typename acc_t>
struct CornerTable {
  std::vector<acc_t> fx, fy;
  std::vector<int32_t> pixel[4];
  explicit CornerTable(int64_t LP) : fx(LP), fy(LP) {
    for (int k = 0; k < 4; ++k) pixel[k].resize(LP);
  }

  void fill(const acc_t* __restrict loc, const Lanes<acc_t>& lanes, int64_t LP) {
    acc_t* __restrict fxs = fx.data();
    acc_t* __restrict fys = fy.data();
    int32_t* __restrict p0 = pixel[0].data();
    int32_t* __restrict p1 = pixel[1].data();
    int32_t* __restrict p2 = pixel[2].data();
    int32_t* __restrict p3 = pixel[3].data();
#pragma omp simd
    for (int64_t j = 0; j < LP; ++j) {
      int32_t pix[4];
      lanes.locate(loc, j, fxs[j], fys[j], pix);
      p0[j] = pix[0];
      p1[j] = pix[1];
      p2[j] = pix[2];
      p3[j] = pix[3];
    }
  }
};

// One sample's channels, corner k at value row v[k] and gradient row g[k]: d[k] += grad_out * value (lane-wise,
// summed later), g[k] += aw[k] * grad_out. NV > 0: D is exactly NV vectors, grad_out is held in registers (gv) and
// the loop is unrolled; NV = 0: any D, grad_out read from go, channels past the last vector summed into tail.
template <int NV, typename scalar_t, typename acc_t, typename V>
inline void sample_channels(const V* gv, const acc_t* go, int64_t D, const scalar_t* const* v, acc_t* const* g,
                            const acc_t* aw, V* d, acc_t* tail) {
  constexpr int64_t K = Vec<acc_t>::size;
  if constexpr (NV > 0) {
    for (int k = 0; k < 4; ++k)
      for (int i = 0; i < NV; ++i) {
        d[k] += gv[i] * load_vec(v[k] + i * K);
        store_vec(g[k] + i * K, load_vec(g[k] + i * K) + aw[k] * gv[i]);
      }
  } else {
    int64_t ch = 0;
    for (; ch + K <= D; ch += K) {
      const V x = load_vec(go + ch);
      for (int k = 0; k < 4; ++k) {
        d[k] += x * load_vec(v[k] + ch);
        store_vec(g[k] + ch, load_vec(g[k] + ch) + aw[k] * x);
      }
    }
    for (; ch < D; ++ch)
      for (int k = 0; k < 4; ++k) {
        tail[k] += go[ch] * static_cast<acc_t>(v[k][ch]);
        g[k][ch] += aw[k] * go[ch];
      }
  }
}

// Each image's grad_value buffer has the layout of its value buffer; each (batch, head) task clears and
// accumulates its own slice of it.
// NV: the number of channel vectors when D is exactly that many (its loops unrolled), else 0.
template <int NV, typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad_out, const std::vector<const scalar_t*>& images,
                     const std::vector<acc_t*>& grad_images, Layout lay, const acc_t* loc, const acc_t* attn,
                     acc_t* grad_loc, acc_t* grad_attn, int64_t N, int64_t S,
                     int64_t M, int64_t D, int64_t Lq, int64_t P, const std::vector<Level>& levels) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t K = Vec<acc_t>::size;
  const int64_t LP = static_cast<int64_t>(levels.size()) * P;
  const std::vector<scalar_t> zeros(D, scalar_t(0));
  const Lanes<acc_t> lanes(levels, P);

#pragma omp parallel num_threads(threads_for(N * M * (3 * Lq * LP + S) * D, N * M))
  {
    std::vector<acc_t> go(D), dump(D);  // grad_out row in acc_t; sink for corners off the map
    CornerTable<acc_t> t(LP);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < N * M; ++task) {
      const int64_t n = task / M, m = task % M;
      const scalar_t* vhead = images[n] + m * lay.head;
      acc_t* ghead = grad_images[n] + m * lay.head;
      for (int64_t s = 0; s < S; ++s) std::memset(ghead + s * lay.pixel, 0, D * sizeof(acc_t));
      for (int64_t q = 0; q < Lq; ++q) {
        const int64_t row = (n * Lq + q) * M + m;
        if (q + kPrefetchAhead < Lq) {
          const int64_t ahead = row + kPrefetchAhead * M;
          prefetch(loc + ahead * LP * 2, LP * 2 * sizeof(acc_t));
          prefetch(attn + ahead * LP, LP * sizeof(acc_t));
          prefetch(grad_out + ahead * D, D * sizeof(scalar_t));
          prefetch(grad_loc + ahead * LP * 2, LP * 2 * sizeof(acc_t));
          prefetch(grad_attn + ahead * LP, LP * sizeof(acc_t));
        }
        for (int64_t ch = 0; ch < D; ++ch) go[ch] = static_cast<acc_t>(grad_out[row * D + ch]);
        V gv[NV > 0 ? NV : 1];
        for (int i = 0; i < NV; ++i) gv[i] = load_vec(go.data() + i * K);
        t.fill(loc + row * LP * 2, lanes, LP);
        for (int64_t j = 0; j < LP; ++j) {
          const acc_t fx = t.fx[j], fy = t.fy[j], a = attn[row * LP + j];
          const acc_t w[4] = {(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy};
          const scalar_t* v[4];
          acc_t* g[4];
          for (int k = 0; k < 4; ++k) {
            const int32_t pix = t.pixel[k][j];
            v[k] = pix >= 0 ? vhead + pix * lay.pixel : zeros.data();
            g[k] = pix >= 0 ? ghead + pix * lay.pixel : dump.data();
          }
          const acc_t aw[4] = {a * w[0], a * w[1], a * w[2], a * w[3]};
          V d[4] = {};
          acc_t tail[4] = {0, 0, 0, 0};
          sample_channels<NV>(gv, go.data(), D, v, g, aw, d, tail);
          // The sample is sum_k w_k * value_k with w_k bilinear in (fx, fy); grad wrt w_k is dot_k.
          const V dx = (1 - fy) * (d[1] - d[0]) + fy * (d[3] - d[2]);
          const V dy = (1 - fx) * (d[2] - d[0]) + fx * (d[3] - d[1]);
          const V da = w[0] * d[0] + w[1] * d[1] + w[2] * d[2] + w[3] * d[3];
          const acc_t tx = (1 - fy) * (tail[1] - tail[0]) + fy * (tail[3] - tail[2]);
          const acc_t ty = (1 - fx) * (tail[2] - tail[0]) + fx * (tail[3] - tail[1]);
          const acc_t ta = w[0] * tail[0] + w[1] * tail[1] + w[2] * tail[2] + w[3] * tail[3];
          grad_attn[row * LP + j] = hsum(da) + ta;
          grad_loc[(row * LP + j) * 2] = a * (hsum(dx) + tx) * lanes.wf[j];
          grad_loc[(row * LP + j) * 2 + 1] = a * (hsum(dy) + ty) * lanes.hf[j];
        }
      }
    }
  }
}

}  // namespace ddetr_msda
