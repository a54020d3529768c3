// Fused multi-scale deformable attention for CPU (OpenMP): forward and a deterministic, atomic-free backward.
//
// Layout as in ddetr/ops/ms_deform_attn.py: value (N, S, M, D), loc (N, Lq, M, L, P, 2) normalised (x, y),
// attn (N, Lq, M, L, P), output (N, Lq, M*D); bilinear sampling with zeros outside the map and pixel
// coordinate = loc * size - 0.5. Half types (bf16/fp16) are read as stored and accumulated in fp32; fp64 stays
// fp64. Channels are processed in 64-byte vectors (16 fp32 or 8 fp64 lanes) plus a scalar tail, so any D works.
//
// Forward: one task per (batch, head, block of queries), heads outermost so a head's pixels stay cached; each
// output row is summed by one thread in a fixed order. Backward: one task per (batch, head), which owns that
// head's slice of grad_value outright, so there are no atomics and the result is bitwise the same for any
// thread count. Value is read in place or from a head-major copy (see value_layout), one buffer per image.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace ddetr_msda;

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
    const acc_t* __restrict wf = lanes.wf.data();
    const acc_t* __restrict hf = lanes.hf.data();
    const int32_t* __restrict wi = lanes.wi.data();
    const int32_t* __restrict hi = lanes.hi.data();
    const int32_t* __restrict start = lanes.start.data();
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
      locate(loc[2 * j], loc[2 * j + 1], wf[j], hf[j], wi[j], hi[j], start[j], fx, fy, pix);
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

// Weighted sum of the table's corners over W vectors of channels starting at channel ch (one accumulator
// per corner and vector keeps the FMA chains short).
template <int W, typename Table, typename scalar_t>
inline void gather(const Table& t, int64_t LP, scalar_t* out, int64_t ch) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t K = Vec<acc_t>::size;
  V acc[4][W] = {};
  for (int64_t j = 0; j < LP; ++j) {
    for (int k = 0; k < 4; ++k) {
      const acc_t w = t.w[k][j];
      const scalar_t* p = t.corner(k, j) + ch;
      for (int i = 0; i < W; ++i) acc[k][i] += w * load_vec(p + i * K);
    }
  }
  for (int i = 0; i < W; ++i) store_vec(out + i * K, (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]));
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
        for (; ch + 2 * K <= D; ch += 2 * K) gather<2>(t, LP, orow + ch, ch);
        for (; ch + K <= D; ch += K) gather<1>(t, LP, orow + ch, ch);
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

// Backward table for one (query, head): the cell position and corner pixels of its L*P samples (see locate).
template <typename acc_t>
struct CornerTable {
  std::vector<acc_t> fx, fy;
  std::vector<int32_t> pixel[4];
  explicit CornerTable(int64_t LP) : fx(LP), fy(LP) {
    for (int k = 0; k < 4; ++k) pixel[k].resize(LP);
  }

  void fill(const acc_t* __restrict loc, const Lanes<acc_t>& lanes, int64_t LP) {
    const acc_t* __restrict wf = lanes.wf.data();
    const acc_t* __restrict hf = lanes.hf.data();
    const int32_t* __restrict wi = lanes.wi.data();
    const int32_t* __restrict hi = lanes.hi.data();
    const int32_t* __restrict start = lanes.start.data();
    acc_t* __restrict fxs = fx.data();
    acc_t* __restrict fys = fy.data();
    int32_t* __restrict p0 = pixel[0].data();
    int32_t* __restrict p1 = pixel[1].data();
    int32_t* __restrict p2 = pixel[2].data();
    int32_t* __restrict p3 = pixel[3].data();
#pragma omp simd
    for (int64_t j = 0; j < LP; ++j) {
      int32_t pix[4];
      locate(loc[2 * j], loc[2 * j + 1], wf[j], hf[j], wi[j], hi[j], start[j], fxs[j], fys[j], pix);
      p0[j] = pix[0];
      p1[j] = pix[1];
      p2[j] = pix[2];
      p3[j] = pix[3];
    }
  }
};

// Each image's grad_value buffer has the layout of its value buffer; each (batch, head) task clears and
// accumulates its own slice of it.
template <typename scalar_t, typename acc_t>
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
          // d[k] accumulates <grad_out, value at corner k> lane-wise; tail[k] the channels past the last vector.
          V d[4] = {};
          acc_t tail[4] = {0, 0, 0, 0};
          int64_t ch = 0;
          for (; ch + K <= D; ch += K) {
            const V gv = load_vec(go.data() + ch);
            for (int k = 0; k < 4; ++k) {
              d[k] += gv * load_vec(v[k] + ch);
              store_vec(g[k] + ch, load_vec(g[k] + ch) + (a * w[k]) * gv);
            }
          }
          for (; ch < D; ++ch) {
            for (int k = 0; k < 4; ++k) {
              tail[k] += go[ch] * static_cast<acc_t>(v[k][ch]);
              g[k][ch] += (a * w[k]) * go[ch];
            }
          }
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

struct Inputs {
  at::Tensor value;      // fp64 if any input is fp64, else as given
  at::Tensor loc, attn;  // contiguous, in the accumulation dtype
  std::vector<Level> levels;
  int64_t N, S, M, D, Lq, P;
};

Inputs prepare(const at::Tensor& value, at::IntArrayRef shapes, const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.device().is_cpu() && loc.device().is_cpu() && attn.device().is_cpu(),
              "ms_deform_attn_cpu: all inputs must be CPU tensors");
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn_cpu: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2, "ms_deform_attn_cpu: loc must be (N, Lq, M, L, P, 2), got ",
              loc.sizes());
  TORCH_CHECK(attn.dim() == 5 && attn.sizes() == loc.sizes().slice(0, 5),
              "ms_deform_attn_cpu: attn must be (N, Lq, M, L, P) matching loc, got ", attn.sizes());
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2),
              "ms_deform_attn_cpu: batch/head dims of loc ", loc.sizes(), " do not match value ", value.sizes());
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 * loc.size(3),
              "ms_deform_attn_cpu: shapes must hold one (H, W) pair per level, got ", shapes);
  Inputs in;
  int64_t start = 0;
  for (size_t i = 0; i < shapes.size(); i += 2) {
    TORCH_CHECK(shapes[i] > 0 && shapes[i + 1] > 0, "ms_deform_attn_cpu: bad level shape ", shapes);
    in.levels.push_back({shapes[i], shapes[i + 1], start});
    start += shapes[i] * shapes[i + 1];
  }
  TORCH_CHECK(start == value.size(1), "ms_deform_attn_cpu: shapes cover ", start, " positions, value has ",
              value.size(1));
  TORCH_CHECK(start < (int64_t{1} << 31), "ms_deform_attn_cpu: more than 2^31 positions per image");
  const bool f64 = value.scalar_type() == at::kDouble || loc.scalar_type() == at::kDouble ||
                   attn.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  in.value = f64 ? value.to(at::kDouble) : value;
  in.loc = loc.to(acc).contiguous();
  in.attn = attn.to(acc).contiguous();
  in.N = value.size(0);
  in.S = value.size(1);
  in.M = value.size(2);
  in.D = value.size(3);
  in.Lq = loc.size(1);
  in.P = loc.size(4);
  return in;
}

// Value in the layout the kernels read. With many samples per pixel (the encoder: Lq * L * P = 16 S) a
// head-major copy pays for itself, as each head's pixels become contiguous (~1.2x faster at the encoder shape
// with realistic points, copy included); with few (decoders: 300 queries) the copy would dominate, so value is
// read in place.
bool use_head_major(const Inputs& in) { return in.Lq * static_cast<int64_t>(in.levels.size()) * in.P >= 4 * in.S; }

// One buffer per image in the layout the kernels read, and that layout. A head-major buffer is (M * S + 1, D):
// the heads' pixels, then the zero row.
std::pair<std::vector<at::Tensor>, Layout> value_layout(const Inputs& in) {
  std::vector<at::Tensor> images;
  for (int64_t n = 0; n < in.N; ++n) {
    const at::Tensor image = in.value.select(0, n);
    if (!use_head_major(in)) {
      images.push_back(image.contiguous());
      continue;
    }
    at::Tensor buffer = at::empty({in.M * in.S + 1, in.D}, in.value.options());
    buffer.narrow(0, 0, in.M * in.S).view({in.M, in.S, in.D}).copy_(image.permute({1, 0, 2}));
    buffer.select(0, in.M * in.S).zero_();
    images.push_back(buffer);
  }
  if (use_head_major(in)) return {images, Layout{in.S * in.D, in.D, in.M * in.S * in.D}};
  return {images, Layout{in.D, in.M * in.D, -1}};
}

// Relative int32 offsets reach every byte of a head-major image buffer below 2 GiB.
bool relative_offsets(const Inputs& in, Layout lay) {
  return lay.zero >= 0 && (lay.zero + in.D) * static_cast<int64_t>(in.value.element_size()) < (int64_t{1} << 31);
}

template <typename T>
std::vector<T*> pointers(const std::vector<at::Tensor>& tensors) {
  std::vector<T*> out;
  for (const at::Tensor& t : tensors) out.push_back(t.data_ptr<std::remove_const_t<T>>());
  return out;
}

at::Tensor forward(const at::Tensor& value, at::IntArrayRef shapes, const at::Tensor& loc, const at::Tensor& attn) {
  const Inputs in = prepare(value, shapes, loc, attn);
  const auto [images, lay] = value_layout(in);
  at::Tensor out = at::empty({in.N, in.Lq, in.M * in.D}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.value.scalar_type(), "ms_deform_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = [&](auto offset) {
      forward_kernel<scalar_t, acc_t, decltype(offset)>(pointers<const scalar_t>(images), lay,
                                                         in.loc.data_ptr<acc_t>(), in.attn.data_ptr<acc_t>(),
                                                         out.data_ptr<scalar_t>(), in.N, in.M, in.D, in.Lq, in.P,
                                                         in.levels);
    };
    if (relative_offsets(in, lay)) {
      run(int32_t{0});
    } else {
      run(intptr_t{0});
    }
  });
  return out.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& value,
                                                        at::IntArrayRef shapes, const at::Tensor& loc,
                                                        const at::Tensor& attn) {
  const Inputs in = prepare(value, shapes, loc, attn);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({in.N, in.Lq, in.M * in.D}),
              "ms_deform_attn_cpu: grad_out must be (N, Lq, M*D), got ", grad_out.sizes());
  auto [images, lay] = value_layout(in);
  const at::Tensor go = grad_out.to(in.value.scalar_type()).contiguous();
  // grad_value is accumulated in the accumulation dtype, in value's working layout: per image when head-major,
  // else in slices of one batch tensor that is returned as it is when the dtype allows.
  const bool head_major = use_head_major(in);
  at::Tensor grad_acc = head_major ? at::Tensor() : at::empty(in.value.sizes(), in.loc.options());
  std::vector<at::Tensor> grad_images;
  for (int64_t n = 0; n < in.N; ++n) {
    grad_images.push_back(head_major ? at::empty({in.M, in.S, in.D}, in.loc.options()) : grad_acc.select(0, n));
  }
  at::Tensor grad_loc = at::empty_like(in.loc), grad_attn = at::empty_like(in.attn);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.value.scalar_type(), "ms_deform_attn_cpu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(go.data_ptr<scalar_t>(), pointers<const scalar_t>(images),
                                     pointers<acc_t>(grad_images), lay, in.loc.data_ptr<acc_t>(),
                                     in.attn.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
                                     grad_attn.data_ptr<acc_t>(), in.N, in.S, in.M, in.D, in.Lq, in.P, in.levels);
  });
  images.clear();  // the head-major copies are not needed any more: lower the peak memory
  at::Tensor grad_value;
  if (head_major) {
    grad_value = at::empty(value.sizes(), value.options().memory_format(at::MemoryFormat::Contiguous));
    for (int64_t n = 0; n < in.N; ++n) {
      grad_value.select(0, n).copy_(grad_images[n].permute({1, 0, 2}));
      grad_images[n].reset();
    }
  } else {
    grad_value = grad_acc.to(value.scalar_type());
  }
  return {grad_value, grad_loc.to(loc.scalar_type()), grad_attn.to(attn.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(ddetr_msda_cpu, m) {
  m.def("forward(Tensor value, int[] shapes, Tensor loc, Tensor attn) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor value, int[] shapes, Tensor loc, Tensor attn) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddetr_msda_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
