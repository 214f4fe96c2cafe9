// Matrix products that read quantized weights once, for a CPU (chapter 02, course_lib.kernels).
//
// Decode multiplies a few activation rows by every weight of the model: the time goes into reading
// the weights from memory, so a layer runs at the speed of its weight bytes only if the kernel reads
// each byte once and converts it on the fly. These loops do that; the compiler turns each inner
// loop into vector instructions for the machine it is built on (-march=native, `omp simd`).
// Four output rows at a time: four independent sums keep the vector units busy.
//
//   int8_weight_matmul   y[m, n] = s[n] · Σ_k x[m, k] · q[n, k]          (float32 x, INT8 q; many rows
//                        of x: blocks of q converted in cache, then torch's float32 GEMM)
//   int8_int8_matmul     y[m, n] = Σ_k a[m, k] · q[n, k]  (exact int32)   (INT8 a, INT8 q)
//   int8_dynamic_matmul  W8A8: x's rows quantized to INT8 on the fly, int8_int8_matmul (by hand with
//                        AVX2 / VNNI instructions where the CPU has them), dequantized
//   int4_weight_matmul   y[m, n] = Σ_g s[n, g] · Σ_{k in g} x[m, k] · (nibble[n, k] − 8)
//
// The plain references they are tested against: dequantize and F.linear, and torch._int_mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

constexpr int64_t kRows = 4;  // output rows per step

void check(const at::Tensor& x, const at::Tensor& w, at::ScalarType xtype, at::ScalarType wtype,
           int64_t k_of_w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "course_kernels: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == k_of_w, "course_kernels: need x [M, K] and a weight for K");
  TORCH_CHECK(x.scalar_type() == xtype && w.scalar_type() == wtype, "course_kernels: wrong dtypes");
}

// y[m, n] = Σ_k x[m, k] · q[n, k] for every row m of x, summed in Acc (float, or int32: exact).
template <typename X, typename Acc>
void rows_times_int8(const X* x, const int8_t* q, int64_t M, int64_t K, int64_t N, Acc* y) {
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * kRows; n < std::min(end * kRows, N); n += kRows) {
      if (n + kRows > N) {  // the last rows, one at a time
        for (int64_t r = n; r < N; ++r)
          for (int64_t m = 0; m < M; ++m) {
            Acc acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < K; ++k) acc += Acc(x[m * K + k]) * Acc(q[r * K + k]);
            y[m * N + r] = acc;
          }
        break;
      }
      const int8_t *q0 = q + n * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
      for (int64_t m = 0; m < M; ++m) {
        const X* xm = x + m * K;
        Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t k = 0; k < K; ++k) {
          const Acc v = xm[k];
          s0 += v * Acc(q0[k]);
          s1 += v * Acc(q1[k]);
          s2 += v * Acc(q2[k]);
          s3 += v * Acc(q3[k]);
        }
        Acc* ym = y + m * N + n;
        ym[0] = s0, ym[1] = s1, ym[2] = s2, ym[3] = s3;
      }
    }
  });
}

// W8A8 at decode, by hand for x86 with AVX2: 32 INT8 pairs a step. |a| (unsigned) times q with a's
// sign moved onto it (sign_epi8) is a·q; maddubs multiplies such pairs into 16-bit sums (no
// overflow: 2 · 127² < 2¹⁵, as long as no value is −128 — absmax quantization never gives one) and
// madd with ones adds those into 32-bit lanes; with VNNI (AVX-VNNI, AVX-512 VNNI) one instruction,
// dpbusd, does both. The exact int32 sums, as the plain loop gives them, in a third of the steps.
#if defined(__AVX2__)
#include <immintrin.h>

inline __m256i dot_step(__m256i acc, __m256i a_abs, __m256i a, const int8_t* q) {
  const __m256i q_signed = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), a);
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, a_abs, q_signed);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, a_abs, q_signed);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a_abs, q_signed), _mm256_set1_epi16(1)));
#endif
}

inline int32_t lanes_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

void int8_rows_simd(const int8_t* a, const int8_t* q, int64_t M, int64_t K, int64_t N, int32_t* y) {
  const int64_t K32 = K / 32 * 32;
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin * kRows; n0 < std::min(end * kRows, N); n0 += kRows) {
      const int64_t rows = std::min(kRows, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* am = a + m * K;
        __m256i acc[kRows] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
        for (int64_t k = 0; k < K32; k += 32) {
          const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(am + k));
          const __m256i a_abs = _mm256_abs_epi8(av);
          for (int64_t r = 0; r < rows; ++r) acc[r] = dot_step(acc[r], a_abs, av, q + (n0 + r) * K + k);
        }
        for (int64_t r = 0; r < rows; ++r) {
          int32_t sum = lanes_sum(acc[r]);
          for (int64_t k = K32; k < K; ++k) sum += int32_t(am[k]) * int32_t(q[(n0 + r) * K + k]);
          y[m * N + n0 + r] = sum;
        }
      }
    }
  });
}
#endif

// Many rows of x (prefill) make the product compute-bound: torch's float32 GEMM does it, on blocks of
// weight rows (about 1 MiB of float32 each) converted into one buffer that stays in the cache —
// never a float copy of the whole matrix, which would cost more memory traffic than the FP32 layer.
constexpr int64_t kFewRows = 16;  // up to this many rows of x, the loop above; more, blocks and a GEMM

void blocked_int8_gemm(const at::Tensor& x, const at::Tensor& q, at::Tensor& y) {
  const int64_t K = x.size(1), N = q.size(0);
  const int64_t kBlock = std::max<int64_t>(64, (int64_t(1) << 18) / K / 16 * 16);
  auto buffer = at::empty({std::min(kBlock, N), K}, x.options());
  float* bp = buffer.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; n += kBlock) {
    const int64_t rows = std::min(kBlock, N - n);
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int8_t* from = qp + (n + r) * K;
        float* to = bp + r * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) to[k] = float(from[k]);
      }
    });
    auto out = y.narrow(1, n, rows);  // rows of y with stride N: the GEMM writes them in place
    at::mm_out(out, x, buffer.narrow(0, 0, rows).t());
  }
}

at::Tensor int8_weight_matmul(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& s_in) {
  auto x = x_in.contiguous(), q = q_in.contiguous(), s = s_in.contiguous();
  check(x, q, at::kFloat, at::kChar, q.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(s.numel() == N && s.scalar_type() == at::kFloat, "course_kernels: one float32 scale per row");
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  if (M > kFewRows)
    blocked_int8_gemm(x, q, y);
  else
    rows_times_int8(x.data_ptr<float>(), q.data_ptr<int8_t>(), M, K, N, yp);
  const float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] *= sp[n];
  });
  return y;
}

at::Tensor int8_int8_matmul(const at::Tensor& a_in, const at::Tensor& q_in) {
  auto a = a_in.contiguous(), q = q_in.contiguous();
  check(a, q, at::kChar, at::kChar, q.size(1));
  const int64_t M = a.size(0), K = a.size(1), N = q.size(0);
  auto y = at::empty({M, N}, a.options().dtype(at::kInt));
  rows_times_int8(a.data_ptr<int8_t>(), q.data_ptr<int8_t>(), M, K, N, y.data_ptr<int32_t>());
  return y;
}

// W8A8 in one call: each row of x absmax-quantized to INT8 (q = round(x · 127 / max|x|), the same
// float32 operations as course_lib.quant.absmax_quantize_rows), the exact int32 product, then
// y = acc · (s_x ⊗ s_w) in float32.
at::Tensor int8_dynamic_matmul(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& w_scale_in) {
  auto x = x_in.contiguous(), w_scale = w_scale_in.contiguous();
  check(x, q, at::kFloat, at::kChar, q.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(w_scale.numel() == N && w_scale.scalar_type() == at::kFloat, "course_kernels: one float32 scale per row");
  auto a = at::empty({M, K}, x.options().dtype(at::kChar));
  auto x_scale = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float* sp = x_scale.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float absmax = 0;
    for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(xp[m * K + k]));
    absmax = absmax == 0 ? 1.f : std::max(absmax, 127.f * std::numeric_limits<float>::epsilon());
    const float inverse = (1.f / absmax) * 127.f;  // as torch computes 127 / absmax: a reciprocal, then a product
    for (int64_t k = 0; k < K; ++k) ap[m * K + k] = int8_t(std::nearbyint(xp[m * K + k] * inverse));
    sp[m] = absmax / 127.f;
  }
#if defined(__AVX2__)
  auto acc = at::empty({M, N}, x.options().dtype(at::kInt));
  int8_rows_simd(ap, q.contiguous().data_ptr<int8_t>(), M, K, N, acc.data_ptr<int32_t>());
#else
  auto acc = int8_int8_matmul(a, q);
#endif
  auto y = at::empty({M, N}, x.options());
  const int32_t* accp = acc.data_ptr<int32_t>();
  const float* wp = w_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) yp[m * N + n] = float(accp[m * N + n]) * sp[m] * wp[n];
  return y;
}

at::Tensor int4_weight_matmul(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& s_in,
                              int64_t group_size) {
  auto x = x_in.contiguous(), packed = packed_in.contiguous(), s = s_in.contiguous();
  check(x, packed, at::kFloat, at::kByte, 2 * packed.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = K / group_size;
  TORCH_CHECK(group_size % 2 == 0 && K % group_size == 0 && s.scalar_type() == at::kFloat && s.numel() == N * G,
              "course_kernels: float32 scales [N, K / group_size] for an even group_size that divides K");
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float w[64];  // one chunk of a row's weights, unpacked once for every row of x
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = 0;
      for (int64_t g = 0; g < G; ++g) {
        const float scale = sp[n * G + g];
        for (int64_t c = 0; c < group_size; c += 64) {
          const int64_t len = std::min<int64_t>(64, group_size - c), start = g * group_size + c;
          const uint8_t* bytes = pp + n * (K / 2) + start / 2;
          for (int64_t j = 0; j < len / 2; ++j) {  // byte j: element 2j low nibble, 2j + 1 high nibble
            w[2 * j] = float(int(bytes[j] & 15) - 8);
            w[2 * j + 1] = float(int(bytes[j] >> 4) - 8);
          }
          for (int64_t m = 0; m < M; ++m) {
            const float* xm = xp + m * K + start;
            float acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < len; ++k) acc += xm[k] * w[k];
            yp[m * N + n] += acc * scale;
          }
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(course_kernels, m) {
  m.def("int8_weight_matmul(Tensor x, Tensor q, Tensor scale) -> Tensor", &int8_weight_matmul);
  m.def("int8_int8_matmul(Tensor a, Tensor q) -> Tensor", &int8_int8_matmul);
  m.def("int8_dynamic_matmul(Tensor x, Tensor q, Tensor w_scale) -> Tensor", &int8_dynamic_matmul);
  m.def("int4_weight_matmul(Tensor x, Tensor packed, Tensor scale, int group_size) -> Tensor", &int4_weight_matmul);
}
