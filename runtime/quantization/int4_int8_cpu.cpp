// int4 weights x int8 activations on AVX-512 VNNI: the decode-shaped matmul of lqc's "int4_vnni" layout.
//
// llama.cpp's q4_1 x q8_1 dot product, in the layout of lqc's canonical int4 format and with one
// activation scale per token (q8_1 keeps one per 32 inputs: finer, a candidate for the quality gap)
// (runtime/quantization/formats.py: w = (q - 8) * s + z per group of g inputs, q in 0..15):
//
//   y[m, n] = d[m] * sum_g ( s[n,g] * (sum_{k in g} q[n,k] * x8[m,k] - 8 * S[m,g]) + z[n,g] * S[m,g] )
//
// where x8 = round(x / d) is the token's int8 quantization (d = max|x| / 127) and S[m,g] the sum
// of x8 over group g. The integer sums are exact (vpdpbusd: unsigned 4-bit codes times signed
// 8-bit activations, four products per 32-bit lane); only the per-group epilogue is float.
//
// Packed layout, one stream per block of 16 output rows so the hardware prefetcher sees one
// sequential read: for each group, g/8 chunks of 64 bytes, then the group's fp16 scales (16)
// and zeros (16). Byte r*4+j of a chunk holds rows r's codes for inputs k+j (low nibble) and
// k+4+j (high nibble), so the low nibbles of one 64-byte load are the four-input dot products of
// 16 rows with x8[k..k+3], and the high nibbles those with x8[k+4..k+7].
//
// int4_int8_reference in int4_int8_cpu.py computes the same from the same packed bytes; the
// tests hold the two to each other.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>

namespace {

constexpr int64_t kRows = 16;      // output rows per block: one zmm of int32 / float32 lanes
constexpr int64_t kChunk = 8;      // inputs per 64-byte chunk
constexpr int64_t kChunkBytes = 64;

// Per-token symmetric int8: d = max|x| / 127 (at least 1e-8), x8 = round-half-even(x / d).
// Written out scalar, in float32, in the order the Python reference uses, so the codes match it bit for bit.
void quantize_row(const float* x, int64_t k, int64_t k_padded, int8_t* x8, float* d) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  float scale = std::max(amax / 127.f, 1e-8f);
  for (int64_t i = 0; i < k; ++i) {
    float q = std::nearbyint(x[i] / scale);
    x8[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
  }
  for (int64_t i = k; i < k_padded; ++i) x8[i] = 0;
  *d = scale;
}

// Every row of x [M, K] (float32 or bfloat16) quantized as quantize_row does, padded with zeros to k_padded.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t k_padded) {
  auto xc = x.to(at::kFloat).contiguous();
  const int64_t m_rows = x.size(0), k = x.size(1);
  auto x8 = at::empty({m_rows, k_padded}, x.options().dtype(at::kChar));
  auto d = at::empty({m_rows}, x.options().dtype(at::kFloat));
  for (int64_t m = 0; m < m_rows; ++m) {
    quantize_row(xc.data_ptr<float>() + m * k, k, k_padded, x8.data_ptr<int8_t>() + m * k_padded, d.data_ptr<float>() + m);
  }
  return {x8, d};
}

// y[m0..m0+T, rows of one block]: T tokens at once, so each 64-byte chunk is loaded and unpacked
// once for T dot products (prefill-shaped inputs run T = 4 at a time; decode, T = 1).
template <int T>
void tokens_matmul(const uint8_t* block, const int8_t* x8, const int32_t* sums, const float* d, int64_t k_padded,
                   int64_t group, float* out, int64_t out_stride) {
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  const int64_t groups = k_padded / group, chunks = group / kChunk;
  const uint8_t* p = block;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c, p += kChunkBytes) {
      const __m512i w = _mm512_loadu_si512(p);
      const __m512i lo = _mm512_and_si512(w, low_mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low_mask);
      const int64_t k = g * group + c * kChunk;
      for (int t = 0; t < T; ++t) {
        int32_t x_lo, x_hi;
        std::memcpy(&x_lo, x8 + t * k_padded + k, 4);
        std::memcpy(&x_hi, x8 + t * k_padded + k + 4, 4);
        dot[t] = _mm512_dpbusd_epi32(dot[t], lo, _mm512_set1_epi32(x_lo));
        dot[t] = _mm512_dpbusd_epi32(dot[t], hi, _mm512_set1_epi32(x_hi));
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    p += 64;
    for (int t = 0; t < T; ++t) {
      const int32_t sum = sums[t * groups + g];
      const __m512 centered = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[t], _mm512_set1_epi32(8 * sum)));
      acc[t] = _mm512_fmadd_ps(centered, s, acc[t]);
      acc[t] = _mm512_fmadd_ps(z, _mm512_set1_ps(static_cast<float>(sum)), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + t * out_stride, _mm512_mul_ps(acc[t], _mm512_set1_ps(d[t])));
}

// Every token's 16 outputs of one block: four tokens at a time, then the rest one by one. The
// block (~5 KB at K = 576) stays in L1 across the tokens.
void block_matmul(const uint8_t* block, const int8_t* x8, const int32_t* sums, const float* d, int64_t m_rows,
                  int64_t k_padded, int64_t group, float* out, int64_t out_stride) {
  const int64_t groups = k_padded / group;
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) {
    tokens_matmul<4>(block, x8 + m * k_padded, sums + m * groups, d + m, k_padded, group, out + m * out_stride, out_stride);
  }
  for (; m < m_rows; ++m) {
    tokens_matmul<1>(block, x8 + m * k_padded, sums + m * groups, d + m, k_padded, group, out + m * out_stride, out_stride);
  }
}

// x [M, K] float32 or bfloat16 (K <= k_padded), packed uint8 [N_padded / 16, block_bytes] -> y [M, N_padded] float32
at::Tensor int4_int8_mm(const at::Tensor& x, const at::Tensor& packed, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int4_int8_mm: x must be float32 or bfloat16 [M, K]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, "int4_int8_mm: packed must be uint8 [N/16, bytes]");
  TORCH_CHECK(group % kChunk == 0 && group > 0, "int4_int8_mm: the group size must be a multiple of 8");
  const int64_t bytes_per_group = (group / kChunk) * kChunkBytes + 64;
  TORCH_CHECK(packed.size(1) % bytes_per_group == 0, "int4_int8_mm: packed rows do not hold whole groups of ", group);
  const int64_t k_padded = packed.size(1) / bytes_per_group * group;
  const int64_t m_rows = x.size(0), k = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(k <= k_padded, "int4_int8_mm: x has ", k, " inputs, the weight ", k_padded);
  auto pc = packed.contiguous();
  auto [x8, d] = quantize_rows(x, k_padded);
  auto sums = at::empty({m_rows, k_padded / group}, x.options().dtype(at::kInt));
  for (int64_t m = 0; m < m_rows; ++m) {
    const int8_t* row = x8.data_ptr<int8_t>() + m * k_padded;
    for (int64_t g = 0; g < k_padded / group; ++g) {
      int32_t s = 0;
      for (int64_t i = 0; i < group; ++i) s += row[g * group + i];
      sums.data_ptr<int32_t>()[m * (k_padded / group) + g] = s;
    }
  }
  auto y = at::empty({m_rows, blocks * kRows}, x.options().dtype(at::kFloat));
  const uint8_t* base = pc.data_ptr<uint8_t>();
  const int64_t stride = pc.size(1);
  // a block is 16 rows x K: ~5 KB at K=576; 8 blocks per task keeps small matmuls on one thread
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      block_matmul(base + b * stride, x8.data_ptr<int8_t>(), sums.data_ptr<int32_t>(), d.data_ptr<float>(), m_rows,
                   k_padded, group, y.data_ptr<float>() + b * kRows, blocks * kRows);
    }
  });
  return y;
}

// int8 weights (symmetric, one float32 scale per output row) x int8 activations: the w8a8 format's
// math, y[m, n] = d[m] * s[n] * sum_k w[n,k] * x8[m,k]. vpdpbusd wants one unsigned operand: the
// activations go in as x8 + 128 (1..255) and the 128 * sum_k w[n,k] this adds is taken off again
// (the row sums are stored in the packed stream). Packed per block of 16 rows: K/4 chunks of 64
// bytes (byte r*4+j: row r's weight for input k+j), 16 int32 row sums, 16 float32 scales.
template <int T>
void int8_tokens_matmul(const uint8_t* block, const uint8_t* xu, const float* d, int64_t k_padded, float* out,
                        int64_t out_stride) {
  const int64_t chunks = k_padded / 4;
  __m512i dot[T];
  for (int t = 0; t < T; ++t) dot[t] = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512i w = _mm512_loadu_si512(block + c * kChunkBytes);
    for (int t = 0; t < T; ++t) {
      int32_t x4;
      std::memcpy(&x4, xu + t * k_padded + c * 4, 4);
      dot[t] = _mm512_dpbusd_epi32(dot[t], _mm512_set1_epi32(x4), w);
    }
  }
  const __m512i row_sums = _mm512_slli_epi32(_mm512_loadu_si512(block + chunks * kChunkBytes), 7);  // 128 * sum
  const __m512 scales = _mm512_loadu_ps(block + chunks * kChunkBytes + 64);
  for (int t = 0; t < T; ++t) {
    const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[t], row_sums));
    _mm512_storeu_ps(out + t * out_stride, _mm512_mul_ps(_mm512_mul_ps(exact, scales), _mm512_set1_ps(d[t])));
  }
}

// x [M, K] float32 or bfloat16 (K <= k_padded), packed uint8 [N_padded / 16, K_padded / 4 * 64 + 128] -> y [M, N_padded]
at::Tensor int8_int8_mm(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_int8_mm: x must be float32 or bfloat16 [M, K]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && (packed.size(1) - 128) % kChunkBytes == 0,
              "int8_int8_mm: packed must be uint8 [N/16, K/4 * 64 + 128]");
  const int64_t k_padded = (packed.size(1) - 128) / kChunkBytes * 4;
  const int64_t m_rows = x.size(0), k = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(k <= k_padded, "int8_int8_mm: x has ", k, " inputs, the weight ", k_padded);
  auto pc = packed.contiguous();
  auto [x8, d] = quantize_rows(x, k_padded);
  auto xu = (x8.to(at::kShort) + 128).to(at::kByte);  // the unsigned operand; padding becomes 128 against zero weights
  auto y = at::empty({m_rows, blocks * kRows}, x.options().dtype(at::kFloat));
  const uint8_t* base = pc.data_ptr<uint8_t>();
  const uint8_t* xs = xu.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = base + b * pc.size(1);
      float* out = y.data_ptr<float>() + b * kRows;
      int64_t m = 0;
      for (; m + 4 <= m_rows; m += 4) {
        int8_tokens_matmul<4>(block, xs + m * k_padded, d.data_ptr<float>() + m, k_padded, out + m * blocks * kRows,
                              blocks * kRows);
      }
      for (; m < m_rows; ++m) {
        int8_tokens_matmul<1>(block, xs + m * k_padded, d.data_ptr<float>() + m, k_padded, out + m * blocks * kRows,
                              blocks * kRows);
      }
    }
  });
  return y;
}

at::Tensor finish_qlinear(const at::Tensor& y, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                          int64_t out_features) {
  auto out = y.narrow(1, 0, out_features).to(x.scalar_type());
  if (bias.has_value()) out = out + bias->to(x.scalar_type());
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.reshape(sizes);
}

// lqc::qlinear in the w8a8_vnni layout, whole (as qlinear_int4_vnni below).
at::Tensor qlinear_w8a8_vnni(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                             int64_t in_features, int64_t out_features) {
  return finish_qlinear(int8_int8_mm(x.reshape({-1, in_features}), packed), x, bias, out_features);
}

// lqc::qlinear in the int4_vnni layout, whole: x [..., in_features] -> [..., out_features] in x's
// dtype (the product cast first, then the bias added, as the Python reference does). Inductor
// calls this one op per linear (codegen/cpu_decompositions.py), with no Python in between.
at::Tensor qlinear_int4_vnni(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                             int64_t group, int64_t in_features, int64_t out_features) {
  return finish_qlinear(int4_int8_mm(x.reshape({-1, in_features}), packed, group), x, bias, out_features);
}

// The int8 codes and scales int4_int8_mm computes for x: what the tests compare bit for bit.
std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "quantize_rows_int8: x must be float32 [M, K]");
  return quantize_rows(x, x.size(1));
}


}  // namespace

TORCH_LIBRARY(lqc_cpu, m) {
  m.def("int4_int8_mm(Tensor x, Tensor packed, int group_size) -> Tensor");
  m.def("quantize_rows_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_int8_mm(Tensor x, Tensor packed) -> Tensor");
  m.def("qlinear_w8a8_vnni(Tensor x, Tensor packed, Tensor? bias, int in_features, int out_features) -> Tensor");
  m.def("qlinear_int4_vnni(Tensor x, Tensor packed, Tensor? bias, int group_size, int in_features, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(lqc_cpu, CPU, m) {
  m.impl("int4_int8_mm", &int4_int8_mm);
  m.impl("quantize_rows_int8", &quantize_rows_int8);
  m.impl("qlinear_int4_vnni", &qlinear_int4_vnni);
  m.impl("int8_int8_mm", &int8_int8_mm);
  m.impl("qlinear_w8a8_vnni", &qlinear_w8a8_vnni);
}
