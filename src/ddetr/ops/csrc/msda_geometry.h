// Sample geometry shared by the forward and backward: level lanes, corner lookup, prefetch, thread count.
// Part of the fused CPU kernel (ms_deform_attn_cpu.cpp, which includes it once); see its header for the layout.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ddetr_msda {

// Prefetch `bytes` from p. The backward walks loc/attn/grads of one head, i.e. with a stride of M rows, which
// the hardware prefetchers do not follow across pages (measured: the backward is ~30% faster with it).
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off);
}
constexpr int64_t kPrefetchAhead = 8;  // queries

// Threads worth waking for `work` channel multiply-adds split into `tasks`: each should get about a millisecond
// of work, as waking a core that is busy with another process can cost several. Decoder-sized calls (300
// queries, a few hundred microseconds) therefore stay on the calling thread.
inline int threads_for(int64_t work, int64_t tasks) {
  constexpr int64_t kGrain = int64_t{1} << 22;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), tasks, work / kGrain})));
}

struct Level {
  int64_t h, w, start;
};

// Where element (s, m, c) of one image's value (and grad_value) lives, from that image's base pointer:
// m * head + s * pixel + c. Images are separate buffers: with the batch in one head-major copy, batch 2 at
// 800x1333 (45 MB) passes glibc's 32 MB mmap threshold and every call pays fresh page faults (measured: 22k
// faults, +85 ms per call), while per-image buffers are reused from the heap.
// A head-major copy ends with one zero row, at element `zero` (-1 when value is read in place).
struct Layout {
  int64_t head, pixel, zero;
};

// Level geometry repeated per sample (index l * P + p), so the coordinate loop has no divisions and vectorises.
template <typename acc_t>
struct Lanes {
  std::vector<acc_t> wf, hf;
  std::vector<int32_t> wi, hi, start;
  Lanes(const std::vector<Level>& levels, int64_t P) {
    for (const Level& lvl : levels) {
      for (int64_t p = 0; p < P; ++p) {
        wf.push_back(static_cast<acc_t>(lvl.w));
        hf.push_back(static_cast<acc_t>(lvl.h));
        wi.push_back(static_cast<int32_t>(lvl.w));
        hi.push_back(static_cast<int32_t>(lvl.h));
        start.push_back(static_cast<int32_t>(lvl.start));
      }
    }
  }

  // `locate` for sample j of the query whose (x, y) locations start at loc.
  void locate(const acc_t* loc, int64_t j, acc_t& fx, acc_t& fy, int32_t (&pixel)[4]) const;
};

// Pixel cell of one sample at normalised (lx, ly) on a level: position inside the cell (fx, fy) and the pixel
// index of each corner, (y0, x0), (y0, x1), (y1, x0), (y1, x1), or -1 off the map. A sample entirely off the
// map gets fx = fy = 0 and no corners. Branch-free so that the loops calling it vectorise (needs
// -fno-trapping-math); the floor is a truncation fixed up by hand, exact as x, y are first limited to [-1, size).
template <typename acc_t>
inline void locate(acc_t lx, acc_t ly, acc_t wf, acc_t hf, int32_t wi, int32_t hi, int32_t start, acc_t& fx,
                   acc_t& fy, int32_t (&pixel)[4]) {
  acc_t x = lx * wf - acc_t(0.5), y = ly * hf - acc_t(0.5);
  const bool inside = (x >= -1) & (x < wf) & (y >= -1) & (y < hf);  // false for NaN
  x = inside ? x : acc_t(0);
  y = inside ? y : acc_t(0);
  int32_t x0 = static_cast<int32_t>(x), y0 = static_cast<int32_t>(y);
  x0 -= x < static_cast<acc_t>(x0);
  y0 -= y < static_cast<acc_t>(y0);
  fx = x - static_cast<acc_t>(x0);
  fy = y - static_cast<acc_t>(y0);
  const bool vx0 = inside & (x0 >= 0), vx1 = inside & (x0 + 1 < wi), vy0 = y0 >= 0, vy1 = y0 + 1 < hi;
  const int32_t p00 = start + y0 * wi + x0;
  pixel[0] = vy0 & vx0 ? p00 : -1;
  pixel[1] = vy0 & vx1 ? p00 + 1 : -1;
  pixel[2] = vy1 & vx0 ? p00 + wi : -1;
  pixel[3] = vy1 & vx1 ? p00 + wi + 1 : -1;
}

template <typename acc_t>
inline void Lanes<acc_t>::locate(const acc_t* loc, int64_t j, acc_t& fx, acc_t& fy, int32_t (&pixel)[4]) const {
  ddetr_msda::locate(loc[2 * j], loc[2 * j + 1], wf[j], hf[j], wi[j], hi[j], start[j], fx, fy, pixel);
}

}  // namespace ddetr_msda
