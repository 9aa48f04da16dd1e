// Three CPU kernels for batch-1 decoding, where every step reads each weight once, a few hundred
// cached keys per layer, and otherwise runs ops on single rows that cost more in dispatch than in
// arithmetic. Built on first use by llmkit/kernels.py (x86-64 with AVX2, FMA and F16C).
//
//   llmkit::matvec(x, weight, bias?)   x (..., in) holding a few rows, weight (out, in) row-major:
//       y = x @ weight^T + bias, accumulated in fp32, returned in x's dtype (fp32, bf16 or fp16).
//       PyTorch's gemv reads these matrices at ~9-12 GB/s on two AVX2 cores; walking each row once
//       from start to end, in the order it lies in memory, reads them at ~15-18 GB/s. With several
//       rows of x (beam search's beams, a server's few sequences) each weight row is read from memory
//       once for all of them, where a GEMM of so few rows streams the weights at gemv speed or worse.
//   llmkit::decode_attention(q, k, v, last_slot?)   q (B, H, 1, D), k/v (B, K, S, D) fp32, H % K == 0:
//       softmax(q k^T / sqrt(D)) v for one new query per row, over key slots 0..S-1 (or 0..last_slot).
//       Query head h reads key/value head h / (H / K) (grouped-query attention). SDPA's flash kernel
//       is built for many queries; for one it takes ~1.5x the time of a direct pass over the keys.
//   llmkit::rms_norm(x, weight, eps)   llmkit's RMSNorm (HF Llama's roundings) over the last dim,
//       in one pass per row instead of eight PyTorch ops (~100 us per call at batch 1).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

// Eight consecutive values widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // a bf16 is the upper half of an fp32
  __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Calls f(T{}) with T the C++ type of dtype: fp32, bf16 or fp16, the types load8 reads.
template <typename F>
void dispatch_float_types(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

#include "decode_ops.inc"  // attend_one, rms_norm_row: shared with quant_kernels.cpp

// Sum of w[i] * x[i] over n values: four independent accumulators keep the FMA units busy.
template <typename T>
float dot(const T* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
  float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) sum += static_cast<float>(w[i]) * x[i];
  return sum;
}

// dot() for two rows of x at once (x0, x1): the weight is loaded once for both, and each row's sum
// runs in dot()'s exact order, so a row's result does not depend on the rows beside it.
template <typename T>
void dot2(const T* w, const float* x0, const float* x1, int64_t n, float* out) {
  __m256 a[2][4];
  for (auto& row : a)
    for (auto& acc : row) acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 4; ++j) {
      const __m256 wj = load8(w + i + 8 * j);
      a[0][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x0 + i + 8 * j), a[0][j]);
      a[1][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x1 + i + 8 * j), a[1][j]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 w0 = load8(w + i);
    a[0][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + i), a[0][0]);
    a[1][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + i), a[1][0]);
  }
  const float* xs[2] = {x0, x1};
  for (int m = 0; m < 2; ++m) {
    float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a[m][0], a[m][1]), _mm256_add_ps(a[m][2], a[m][3])));
    for (int64_t k = i; k < n; ++k) sum += static_cast<float>(w[k]) * xs[m][k];
    out[m] = sum;
  }
}

template <typename T>
void matvec_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 at::Tensor& y) {
  const int64_t out = weight.size(0), in = weight.size(1), rows = x.numel() / in;
  std::vector<float> x32(rows * in);  // x in fp32, read by every weight row
  const T* xt = x.data_ptr<T>();
  const int64_t x_stride = x.stride(-1);  // one row may be strided; several are contiguous
  for (int64_t i = 0; i < rows * in; ++i) x32[i] = static_cast<float>(xt[rows > 1 ? i : i * x_stride]);
  const float* xs = x32.data();
  const T* w = weight.data_ptr<T>();
  const T* b = bias ? bias->data_ptr<T>() : nullptr;
  T* ys = y.data_ptr<T>();
  // Split rows between threads only in chunks worth a fork/join (~64K weights each).
  const int64_t grain = std::max<int64_t>(1, 65536 / in);
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    float sums[2];
    for (int64_t r = begin; r < end; ++r) {
      const T* wr = w + r * in;  // read from memory for the first pair of rows, from L1 for the rest
      const float bias_r = b ? static_cast<float>(b[r]) : 0.0f;
      for (int64_t m = 0; m < rows; m += 2) {
        if (m + 1 < rows) {
          dot2(wr, xs + m * in, xs + (m + 1) * in, in, sums);
          ys[(m + 1) * out + r] = static_cast<T>(b ? sums[1] + bias_r : sums[1]);
        } else {
          sums[0] = dot(wr, xs + m * in, in);
        }
        ys[m * out + r] = static_cast<T>(b ? sums[0] + bias_r : sums[0]);
      }
    }
  });
}

at::Tensor matvec(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "matvec: weight must be a row-major matrix");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == weight.size(1) && x_in.numel() > 0, "matvec: x must be rows of ",
              weight.size(1), " values");
  const at::Tensor x = x_in.numel() == x_in.size(-1) ? x_in : x_in.contiguous();
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "matvec: x and weight dtypes differ");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == weight.size(0) &&
                        bias->scalar_type() == weight.scalar_type()), "matvec: bad bias");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  at::Tensor y = at::empty(shape, x.options());
  dispatch_float_types(weight.scalar_type(), "matvec",
                       [&](auto t) { matvec_rows<decltype(t)>(x, weight, bias, y); });
  return y;
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y) {
  const int64_t C = x.size(-1), rows = x.numel() / C;
  const T *xs = x.data_ptr<T>(), *w = weight.data_ptr<T>();
  T* ys = y.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xs + r * C, w, C, static_cast<float>(eps), ys + r * C);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.numel() == x.size(-1) &&
              x.scalar_type() == weight.scalar_type(), "rms_norm: x must be contiguous (..., C) beside a C weight of its dtype");
  at::Tensor y = at::empty_like(x);
  dispatch_float_types(x.scalar_type(), "rms_norm", [&](auto t) { rms_norm_rows<decltype(t)>(x, weight, eps, y); });
  return y;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& last_slot) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q must be (B, H, 1, D) and k, v (B, K, S, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: q, k and v must be float32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), K = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && D % 8 == 0 && H % K == 0, "decode_attention: bad shapes");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v need contiguous head dims");
  const int64_t S = last_slot ? last_slot->item<int64_t>() + 1 : k.size(2);
  TORCH_CHECK(S >= 1 && S <= k.size(2), "decode_attention: no keys to attend to");
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const float *qs = qc.data_ptr<float>(), *ks = k.data_ptr<float>(), *vs = v.data_ptr<float>();
  float* os = out.data_ptr<float>();
  // One query head per task; consecutive heads share a key/value head, so one thread's share of
  // them reads each key/value head from memory once and again from its cache.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, kv = bh % H / (H / K);
      attend_one(qs + bh * D, ks + b * k.stride(0) + kv * k.stride(1), vs + b * v.stride(0) + kv * v.stride(1),
                 k.stride(2), v.stride(2), S, D, scratch.data(), os + bh * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(llmkit, m) {
  m.def("matvec(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? last_slot) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmkit, CPU, m) {
  m.impl("matvec", TORCH_FN(matvec));
  m.impl("decode_attention", TORCH_FN(decode_attention));
  m.impl("rms_norm", TORCH_FN(rms_norm));
}
