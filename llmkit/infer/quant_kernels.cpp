// Kernels for weights kept in GGUF's 32-value blocks (Q8_0, Q4_0, Q4_1), used in place from the
// memory-mapped file. Built on first use by llmkit/infer/quant.py WITHOUT -m flags: each
// instruction set's code sits in its own `#pragma GCC target` region (quant_isa.inc, included once
// per ISA) and the kernels are picked when the library loads, from what this CPU reports, so one
// build runs on AVX2-only, AVX-512-VNNI and AMX machines alike.
//
//   llmkit_quant::linear(x, blocks, format, bias?, isa)   x (..., in) float32 with a few rows,
//       blocks (out, in / 32 * block bytes) uint8: y = x @ W^T (+ bias). Each activation row is
//       first rounded to int16 per block of 32 (one float scale per block), then every block product
//       is a 32-way integer dot product scaled once: decoding reads 4.5-8.5 bits per weight instead of
//       32 and does integer math on them. llama.cpp rounds activations to int8 instead; on SmolLM2
//       that moved logits by up to 0.26 and changed 8 of 12 greedy chat answers, int16 (256x finer,
//       the same number of multiply-add instructions per block) keeps them equal to float32's.
//   llmkit_quant::dequantize(blocks, format, first, count, isa)   rows first..first+count-1 to float32
//       (prefill tiles: a GEMM over a dequantized tile beats integer dots once there are many rows).
//   llmkit_quant::embedding(ids, blocks, format, isa)   the rows of `ids`, for token embeddings.
//   llmkit_quant::decode_block(...)   one decoding step of a whole Llama-style block (quant_step.inc).
//   llmkit_quant::isa_supported(isa)   whether this CPU runs an ISA: 1 generic C++, 2 AVX2+FMA+F16C,
//       3 AVX-512 VL/BW + VNNI (vpdpwssd on 256-bit vectors); 0 asks for the best one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;
// Formats by their ggml type codes, the `format` argument of every op.
constexpr int Q4_0 = 2, Q4_1 = 3, Q8_0 = 8;

constexpr int64_t block_bytes(int format) { return format == Q8_0 ? 34 : format == Q4_1 ? 20 : 18; }

int format_index(int64_t format) {
  TORCH_CHECK(format == Q8_0 || format == Q4_0 || format == Q4_1, "quantized kernels: unsupported format ", format);
  return format == Q8_0 ? 0 : format == Q4_0 ? 1 : 2;
}

using DotFn = float (*)(const uint8_t*, const int16_t*, const float*, int64_t);
using DequantizeFn = void (*)(const uint8_t*, int64_t, float*);
struct Kernels {
  DotFn dot[3];                 // by format_index
  DequantizeFn dequantize[3];
};

// Plain C++: the reference every SIMD path is tested against, and the path of non-x86 CPUs.
namespace generic {

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline int q4_value(const uint8_t* qs, int i) { return i < 16 ? qs[i] & 15 : qs[i - 16] >> 4; }

template <int F>
float dot(const uint8_t* w, const int16_t* xq, const float* ds, int64_t nb) {
  float acc = 0.0f, offset = 0.0f;
  for (int64_t b = 0; b < nb; ++b, w += block_bytes(F)) {
    const int16_t* x = xq + b * QK;
    const float d = half_to_float(w);
    int32_t sum = 0;
    if constexpr (F == Q8_0) {
      for (int i = 0; i < QK; ++i) sum += static_cast<int8_t>(w[2 + i]) * x[i];
    } else {
      for (int i = 0; i < QK; ++i) sum += q4_value(w + (F == Q4_1 ? 4 : 2), i) * x[i];
    }
    acc += d * ds[2 * b] * static_cast<float>(sum);
    if constexpr (F == Q4_0) offset += d * ds[2 * b + 1];
    if constexpr (F == Q4_1) offset += half_to_float(w + 2) * ds[2 * b + 1];
  }
  return acc + (F == Q4_0 ? -8.0f * offset : offset);
}

template <int F>
void dequantize_row(const uint8_t* w, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b, w += block_bytes(F), out += QK) {
    const float d = half_to_float(w);
    for (int i = 0; i < QK; ++i) {
      if constexpr (F == Q8_0) out[i] = d * static_cast<int8_t>(w[2 + i]);
      if constexpr (F == Q4_0) out[i] = d * static_cast<float>(q4_value(w + 2, i) - 8);
      if constexpr (F == Q4_1) out[i] = d * static_cast<float>(q4_value(w + 4, i)) + half_to_float(w + 2);
    }
  }
}

Kernels kernels() {
  return {{dot<Q8_0>, dot<Q4_0>, dot<Q4_1>}, {dequantize_row<Q8_0>, dequantize_row<Q4_0>, dequantize_row<Q4_1>}};
}

}  // namespace generic

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
// acc + pairs of int16 products summed to int32 (|sums| < 2 * 127 * 32767: no overflow).
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#include "quant_isa.inc"
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#include "decode_ops.inc"  // decode_block's attention and RMSNorm, on every CPU with AVX2
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
// vpdpwssd: the same multiply-add and sum in one instruction.
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }
#include "quant_isa.inc"
}  // namespace vnni
#pragma GCC pop_options
#endif

enum Isa : int64_t { BEST = 0, GENERIC = 1, AVX2 = 2, AVX512_VNNI = 3 };

bool isa_supported(int64_t isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == AVX2) return avx2;
  if (isa == AVX512_VNNI)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
  return isa == GENERIC || isa == BEST;
}

int64_t best_isa() {
  for (int64_t isa : {AVX512_VNNI, AVX2})
    if (isa_supported(isa)) return isa;
  return GENERIC;
}

const Kernels& kernels_for(int64_t isa) {
  static const Kernels table[] = {
      generic::kernels(), generic::kernels(),
#if defined(__x86_64__)
      // an ISA's kernels() is itself compiled for that ISA (it may copy the table with its widest
      // registers): called only where the CPU has it
      isa_supported(AVX2) ? avx2::kernels() : generic::kernels(),
      isa_supported(AVX512_VNNI) ? vnni::kernels() : generic::kernels(),
#else
      generic::kernels(), generic::kernels(),
#endif
  };
  static const int64_t best = best_isa();
  if (isa == BEST) isa = best;
  TORCH_CHECK(isa >= GENERIC && isa <= AVX512_VNNI && isa_supported(isa),
              "quantized kernels: instruction set ", isa, " is not available on this CPU");
  return table[isa];
}

// One activation row rounded to int16 per block of 32: q = round(x / d), d = max|x| / 32767, with
// ds = (d, d * sum(q)) per block: the scale, and the sum the constant terms of Q4_0 and Q4_1 need.
struct QuantRow {
  std::vector<int16_t> q;
  std::vector<float> ds;

  QuantRow(const float* x, int64_t n) : q(n), ds(n / QK * 2) {
    for (int64_t b = 0; b < n / QK; ++b) {
      const float* xb = x + b * QK;
      float amax = 0.0f;
      for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = amax / 32767.0f, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
      int32_t sum = 0;
      for (int i = 0; i < QK; ++i) sum += q[b * QK + i] = static_cast<int16_t>(std::nearbyint(xb[i] * inverse));
      ds[2 * b] = scale;
      ds[2 * b + 1] = scale * static_cast<float>(sum);
    }
  }
};

void check_blocks(const at::Tensor& blocks, int64_t format) {
  format_index(format);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
              blocks.size(1) % block_bytes(format) == 0, "quantized kernels: blocks must be a contiguous uint8 "
              "(rows, blocks * ", block_bytes(format), ") tensor");
}

// One quantized weight matrix as the products read it: checked once, then used by row.
struct QuantMatrix {
  const uint8_t* w;
  int64_t rows, row_bytes, nb;
  DotFn dot;
  const float* bias;
};

QuantMatrix quant_matrix(const at::Tensor& blocks, int64_t format, const std::optional<at::Tensor>& bias,
                         int64_t isa) {
  check_blocks(blocks, format);
  const int64_t rows = blocks.size(0);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == rows),
              "quantized kernels: bad bias");
  return {blocks.data_ptr<uint8_t>(), rows, blocks.size(1), blocks.size(1) / block_bytes(format),
          kernels_for(isa).dot[format_index(format)], bias ? bias->data_ptr<float>() : nullptr};
}

// ys[a * rows + r] = weight row r . activation row a (+ bias): each weight row is read once and
// multiplied by every activation row while it is in L1; threads split the weight rows.
void products(const QuantMatrix& m, const std::vector<QuantRow>& xq, float* ys) {
  const int64_t n = static_cast<int64_t>(xq.size());
  at::parallel_for(0, m.rows, std::max<int64_t>(1, 131072 / (m.nb * QK * n)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t a = 0; a < n; ++a)
        ys[a * m.rows + r] = m.dot(m.w + r * m.row_bytes, xq[a].q.data(), xq[a].ds.data(), m.nb) +
                             (m.bias ? m.bias[r] : 0.0f);
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& blocks, int64_t format, const std::optional<at::Tensor>& bias,
                  int64_t isa) {
  const QuantMatrix m = quant_matrix(blocks, format, bias, isa);
  const int64_t in = m.nb * QK;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == in, "quantized linear: x must be float32 (..., ", in, ")");
  const at::Tensor xc = x.contiguous();
  std::vector<QuantRow> xq;
  for (int64_t a = 0; a < xc.numel() / in; ++a) xq.emplace_back(xc.data_ptr<float>() + a * in, in);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = m.rows;
  at::Tensor y = at::empty(shape, x.options());
  products(m, xq, y.data_ptr<float>());
  return y;
}

at::Tensor dequantize(const at::Tensor& blocks, int64_t format, int64_t first, int64_t count, int64_t isa) {
  check_blocks(blocks, format);
  TORCH_CHECK(first >= 0 && count >= 0 && first + count <= blocks.size(0), "dequantize: rows out of range");
  const int64_t nb = blocks.size(1) / block_bytes(format), in = nb * QK;
  const DequantizeFn row = kernels_for(isa).dequantize[format_index(format)];
  at::Tensor out = at::empty({count, in}, blocks.options().dtype(at::kFloat));
  const uint8_t* w = blocks.data_ptr<uint8_t>() + first * blocks.size(1);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, count, std::max<int64_t>(1, 65536 / in), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(w + r * blocks.size(1), nb, o + r * in);
  });
  return out;
}

at::Tensor embedding(const at::Tensor& ids, const at::Tensor& blocks, int64_t format, int64_t isa) {
  check_blocks(blocks, format);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "quantized embedding: ids must be int64");
  const int64_t nb = blocks.size(1) / block_bytes(format), in = nb * QK, vocab = blocks.size(0);
  const DequantizeFn row = kernels_for(isa).dequantize[format_index(format)];
  const at::Tensor idc = ids.contiguous();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(in);
  at::Tensor out = at::empty(shape, blocks.options().dtype(at::kFloat));
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < idc.numel(); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < vocab, "quantized embedding: token id ", id[i], " is out of range");
  for (int64_t i = 0; i < idc.numel(); ++i)
    row(blocks.data_ptr<uint8_t>() + id[i] * blocks.size(1), nb, out.data_ptr<float>() + i * in);
  return out;
}

#include "quant_step.inc"

}  // namespace

TORCH_LIBRARY(llmkit_quant, m) {
  m.def("linear(Tensor x, Tensor blocks, int format, Tensor? bias, int isa) -> Tensor");
  m.def("dequantize(Tensor blocks, int format, int first, int count, int isa) -> Tensor");
  m.def("embedding(Tensor ids, Tensor blocks, int format, int isa) -> Tensor");
  m.def("decode_block(Tensor x, Tensor[] norms, float eps, Tensor[] blocks, int[] formats, Tensor?[] biases, "
        "Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int n_head, int isa) -> Tensor");
  m.def("isa_supported(int isa) -> bool", isa_supported);
  m.def("best_isa() -> int", best_isa);
}

TORCH_LIBRARY_IMPL(llmkit_quant, CPU, m) {
  m.impl("linear", TORCH_FN(linear));
  m.impl("dequantize", TORCH_FN(dequantize));
  m.impl("embedding", TORCH_FN(embedding));
  m.impl("decode_block", TORCH_FN(decode_block));
}
