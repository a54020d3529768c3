// Fused multi-scale deformable attention for CPU (OpenMP): forward and a deterministic, atomic-free backward.
//
// Layout as in ddetr/ops/ms_deform_attn.py: value (N, S, M, D), loc (N, Lq, M, L, P, 2) normalised (x, y),
// attn (N, Lq, M, L, P), output (N, Lq, M*D); bilinear sampling with zeros outside the map and pixel
// coordinate = loc * size - 0.5. Half types (bf16/fp16) are read as stored and accumulated in fp32; fp64 stays
// fp64. Channels are processed in register-wide vectors (vec.h: 64 bytes with AVX-512, else 32) plus a scalar
// tail, so any D works.
//
// Forward: one task per (batch, head, block of queries), heads outermost so a head's pixels stay cached; each
// output row is summed by one thread in a fixed order. Backward: one task per (batch, head), which owns that
// head's slice of grad_value outright, so there are no atomics and the result is bitwise the same for any
// thread count. Value is read in place or from a head-major copy (see value_layout), one buffer per image.
//
// This file checks the inputs, lays value out and registers the ops; the kernels are in msda_forward.h and
// msda_backward.h, the sample geometry they share in msda_geometry.h.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "msda_backward.h"
#include "msda_forward.h"
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
    auto run = [&](auto nv) {
      backward_kernel<decltype(nv)::value, scalar_t, acc_t>(
          go.data_ptr<scalar_t>(), pointers<const scalar_t>(images), pointers<acc_t>(grad_images), lay,
          in.loc.data_ptr<acc_t>(), in.attn.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
          grad_attn.data_ptr<acc_t>(), in.N, in.S, in.M, in.D, in.Lq, in.P, in.levels);
    };
    constexpr int64_t K = Vec<acc_t>::size;  // heads of 2 or 4 channel vectors get unrolled loops
    if (in.D == 2 * K) run(std::integral_constant<int, 2>());
    else if (in.D == 4 * K) run(std::integral_constant<int, 4>());
    else run(std::integral_constant<int, 0>());
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
  // The channel vector width this build uses (vec.h): one register, so tests can check it matches the CPU.
  m.def("vector_bytes", []() -> int64_t { return ddetr_msda::kVecBytes; });
}

TORCH_LIBRARY_IMPL(ddetr_msda_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
