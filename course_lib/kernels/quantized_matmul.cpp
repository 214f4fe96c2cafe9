// Matrix products that read quantized weights once, for a CPU (chapter 02, course_lib.kernels).
//
// Decode multiplies a few activation rows by every weight of the model: the time goes into reading
// the weights from memory, so a layer runs at the speed of its weight bytes only if the kernel reads
// each byte once and converts it on the fly. These loops do that; the compiler turns each inner
// loop into vector instructions for the machine it is built on (-march=native, `omp simd`), and the
// hottest (W8A8 and 4-bit at decode, and W8A16's one-row loop with AVX2 alone) are written with x86
// vector instructions where the CPU has them. Four output rows at a time: four independent sums keep
// the vector units busy.
//
//   int8_weight_matmul   y[m, n] = s[n] · Σ_k x[m, k] · q[n, k]          (float32 x, INT8 q; many rows
//                        of x: blocks of q converted in cache, then torch's float32 GEMM)
//   int8_int8_matmul     y[m, n] = Σ_k a[m, k] · q[n, k]  (exact int32)   (INT8 a, INT8 q)
//   int8_dynamic_matmul  W8A8: x's rows quantized to INT8 on the fly, int8_int8_matmul (by hand with
//                        AVX2 / VNNI instructions where the CPU has them; many rows: torch's INT8
//                        GEMM), dequantized
//   int4_weight_matmul   y[m, n] = Σ_k x[m, k] · (nibble[n, k] − 8) · s[n, k / group]
//
// The plain references they are tested against: dequantize and F.linear, and torch._int_mm.
#include "quantized_matmul.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace course_kernels {

constexpr int64_t kRows = 4;  // output rows per step

void check(const at::Tensor& x, const at::Tensor& w, at::ScalarType xtype, at::ScalarType wtype,
           int64_t k_of_w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "course_kernels: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == k_of_w, "course_kernels: need x [M, K] and a weight for K");
  TORCH_CHECK(x.scalar_type() == xtype && w.scalar_type() == wtype, "course_kernels: wrong dtypes");
}

// One float32 scale per weight row [N] (or [N, 1]), or one for all of them (a per-tensor scale).
at::Tensor row_scales(const at::Tensor& s, int64_t N) {
  TORCH_CHECK((s.numel() == N || s.numel() == 1) && s.scalar_type() == at::kFloat,
              "course_kernels: one float32 scale per row, or one for the whole tensor");
  return s.numel() == N ? s.contiguous() : s.reshape({1}).expand({N}).contiguous();
}

#if defined(__AVX2__)
inline float lanes_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__)
// Four rows of x against four float weight rows (FP32's own, or W8A16's converted): sixteen sums
// kept in registers, each weight load used by four rows of x and each x load by four weight rows.
// With `ahead`, each step also asks for the same floats of the four weight rows after these (weights
// streamed from memory, as W8A8's loop does below).
inline void dot_4x4(const float* x, const float* w, int64_t K, float* y, int64_t N, const float* ahead) {
  __m512 acc[4][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    if (ahead)
      for (int r = 0; r < 4; ++r) __builtin_prefetch(ahead + r * K + k);
    __m512 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * K + k);
    for (int i = 0; i < 4; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
      for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 4; ++r) y[i * N + r] = _mm512_reduce_add_ps(acc[i][r]);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// W8A16 with one row of x: each step widens 8 INT8 weights of each of the four rows to float32
// (movsx, then cvt) for one multiply-add; the compiler's own loop for this ran at 12 GB/s here.
inline void int8_float_dot_4(const float* x, const int8_t* q, int64_t K, float* out) {
  __m256 acc[4];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < 4; ++r) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + r * K + k));
      acc[r] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    float sum = lanes_sum(acc[r]);
    for (int64_t t = k; t < K; ++t) sum += x[t] * float(q[r * K + t]);
    out[r] = sum;
  }
}
#endif

// y[m, n] = Σ_k x[m, k] · q[n, k] for every row m of x, summed in Acc (float, or int32: exact).
// With several rows of x, each block of four INT8 weight rows is converted to Acc once, not once per
// row; weights already in Acc (float32) are used as they are.
template <typename X, typename W, typename Acc>
void rows_times(const X* x, const W* q, int64_t M, int64_t K, int64_t N, Acc* y) {
  constexpr bool kConvert = !std::is_same_v<W, Acc>;
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    std::vector<Acc> converted(kConvert && M > 1 ? kRows * K : 0);
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
      const Acc* rows = nullptr;  // the four weight rows in Acc, when M > 1
      const Acc* ahead = nullptr;  // the next four rows in memory, prefetched when read as they are
      if constexpr (kConvert) {
        if (M > 1) {
          for (int64_t k = 0; k < kRows * K; k += 64) __builtin_prefetch(q + (n + kRows) * K + k);
#pragma omp simd
          for (int64_t k = 0; k < kRows * K; ++k) converted[k] = Acc(q[n * K + k]);
        }
        rows = converted.data();
      } else {
        rows = q + n * K;
        ahead = rows + kRows * K;
      }
      int64_t m = 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<X, float> && std::is_same_v<Acc, float>) {
        for (; M > 1 && m + 4 <= M; m += 4) dot_4x4(x + m * K, rows, K, y + m * N + n, N, m == 0 ? ahead : nullptr);
      }
#endif
      for (; m < M; ++m) {
        const X* xm = x + m * K;
        Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        if (M > 1) {
          const Acc *w0 = rows, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t k = 0; k < K; ++k) {
            const Acc v = xm[k];
            s0 += v * w0[k];
            s1 += v * w1[k];
            s2 += v * w2[k];
            s3 += v * w3[k];
          }
        } else {  // one row of x: the weights stream from memory; ask for the rows two blocks ahead
          for (int64_t k = 0; k < kRows * K * int64_t(sizeof(W)); k += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(q + (n + 2 * kRows) * K) + k);
#if defined(__AVX2__) && !defined(__AVX512F__)
          if constexpr (std::is_same_v<X, float> && std::is_same_v<W, int8_t> && std::is_same_v<Acc, float>) {
            int8_float_dot_4(xm, q + n * K, K, y + m * N + n);
            continue;
          }
#endif
          const W *q0 = q + n * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t k = 0; k < K; ++k) {
            const Acc v = xm[k];
            s0 += v * Acc(q0[k]);
            s1 += v * Acc(q1[k]);
            s2 += v * Acc(q2[k]);
            s3 += v * Acc(q3[k]);
          }
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

// R weight rows against one row of a: R accumulators that the compiler keeps in registers.
template <int R>
inline void int8_dot_rows(const int8_t* am, const int8_t* q, int64_t K, int32_t* out, bool prefetch) {
  int64_t k0 = 0;
  int32_t wide[R] = {};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // AVX-512: 64 pairs a step; a's sign moves onto q by negating q where a < 0 (a mask). Each step
  // also asks for the same bytes of the rows two blocks of R ahead: one core alone keeps too few reads
  // in flight to stream at the memory's bandwidth (the prefetch took this loop from ~9 to ~20 GB/s on
  // the course's machine; two blocks ahead rather than one: the model's smaller layers 12-15 →
  // 15-22 GB/s; a prefetch past the last row is harmless: it never faults).
  const int64_t K64 = K / 64 * 64;
  __m512i acc512[R];
  for (int r = 0; r < R; ++r) acc512[r] = _mm512_setzero_si512();
  for (; k0 < K64; k0 += 64) {
    const __m512i av = _mm512_loadu_si512(am + k0);
    const __m512i a_abs = _mm512_abs_epi8(av);
    const __mmask64 negative = _mm512_movepi8_mask(av);
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(q + (2 * R + r) * K + k0);
      const __m512i qv = _mm512_loadu_si512(q + r * K + k0);
      acc512[r] = _mm512_dpbusd_epi32(acc512[r], a_abs, _mm512_mask_sub_epi8(qv, negative, _mm512_setzero_si512(), qv));
    }
  }
  for (int r = 0; r < R; ++r) wide[r] = _mm512_reduce_add_epi32(acc512[r]);
#endif
  const int64_t K32 = K / 32 * 32;
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t k = k0; k < K32; k += 32) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(am + k));
    const __m256i a_abs = _mm256_abs_epi8(av);
    if (prefetch && k % 64 == 0)  // as above, for the first row of x (the others find the rows in cache)
      for (int r = 0; r < R; ++r) __builtin_prefetch(q + (2 * R + r) * K + k);
    for (int r = 0; r < R; ++r) acc[r] = dot_step(acc[r], a_abs, av, q + r * K + k);
  }
  for (int r = 0; r < R; ++r) {
    int32_t sum = wide[r] + lanes_sum(acc[r]);
    for (int64_t k = std::max(K32, k0); k < K; ++k) sum += int32_t(am[k]) * int32_t(q[r * K + k]);
    out[r] = sum;
  }
}

void int8_rows_simd(const int8_t* a, const int8_t* q, int64_t M, int64_t K, int64_t N, int32_t* y) {
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin * kRows; n0 < std::min(end * kRows, N); n0 += kRows) {
      for (int64_t m = 0; m < M; ++m) {
        if (n0 + kRows <= N) {
          int8_dot_rows<kRows>(a + m * K, q + n0 * K, K, y + m * N + n0, m == 0);
        } else {  // the last rows, one at a time
          for (int64_t r = n0; r < N; ++r) int8_dot_rows<1>(a + m * K, q + r * K, K, y + m * N + r, false);
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
  auto x = x_in.contiguous(), q = q_in.contiguous();
  check(x, q, at::kFloat, at::kChar, q.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto s = row_scales(s_in, N);
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  if (M > kFewRows)
    blocked_int8_gemm(x, q, y);
  else
    rows_times(x.data_ptr<float>(), q.data_ptr<int8_t>(), M, K, N, yp);
  const float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] *= sp[n];
  });
  return y;
}

// FP32 with 1 to 8 rows of x (decode): from 4 rows on, torch's GEMM (MKL) streams the output layer's
// 49,152 × 576 weights at a fraction of the memory's pace (on an AVX-512 Xeon, 6 GB/s at 8 rows against
// 21 GB/s at 1 row; on an AVX2 EPYC, 5 and 13 GB/s); this loop, with the next rows prefetched, streams
// them at 17 (Xeon, 4 × 4 register blocks) and 12 GB/s (EPYC) at 8 rows, 22-25 GB/s at 1 row (EPYC).
at::Tensor float_few_rows_matmul(const at::Tensor& x_in, const at::Tensor& w_in) {
  auto x = x_in.contiguous(), w = w_in.contiguous();
  check(x, w, at::kFloat, at::kFloat, w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= kFewRows, "float_few_rows_matmul: at most ", kFewRows, " rows of x, got ", M);
  auto y = at::empty({M, N}, x.options());
  rows_times(x.data_ptr<float>(), w.data_ptr<float>(), M, K, N, y.data_ptr<float>());
  return y;
}

at::Tensor int8_int8_matmul(const at::Tensor& a_in, const at::Tensor& q_in) {
  auto a = a_in.contiguous(), q = q_in.contiguous();
  check(a, q, at::kChar, at::kChar, q.size(1));
  const int64_t M = a.size(0), K = a.size(1), N = q.size(0);
  auto y = at::empty({M, N}, a.options().dtype(at::kInt));
  rows_times(a.data_ptr<int8_t>(), q.data_ptr<int8_t>(), M, K, N, y.data_ptr<int32_t>());
  return y;
}

// q[k] = round(x[k] · inverse), half to even as torch.round; 16 at a time with AVX-512.
inline void quantize_row(const float* x, float inverse, int64_t K, int8_t* q) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 by = _mm512_set1_ps(inverse);
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), by),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
#endif
  for (; k < K; ++k) q[k] = int8_t(std::nearbyint(x[k] * inverse));
}

// W8A8 in one call: each row of x absmax-quantized to INT8 (q = round(x · 127 / max|x|), the same
// float32 operations as course_lib.quant.absmax_quantize_rows), the exact int32 product, then
// y = acc · (s_x ⊗ s_w) in float32.
at::Tensor int8_dynamic_matmul(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& w_scale_in) {
  auto x = x_in.contiguous();
  check(x, q, at::kFloat, at::kChar, q.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto w_scale = row_scales(w_scale_in, N);
  auto a = at::empty({M, K}, x.options().dtype(at::kChar));
  auto x_scale = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float* sp = x_scale.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float absmax = 0;
#pragma omp simd reduction(max : absmax)
      for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(xp[m * K + k]));
      absmax = absmax == 0 ? 1.f : std::max(absmax, 127.f * std::numeric_limits<float>::epsilon());
      const float inverse = (1.f / absmax) * 127.f;  // as torch computes 127 / absmax: a reciprocal, then a product
      quantize_row(xp + m * K, inverse, K, ap + m * K);
      sp[m] = absmax / 127.f;
    }
  });
  at::Tensor acc;
  if (M > kFewRows) {  // prefill: torch's INT8 GEMM (oneDNN: VNNI or AMX tiles where the CPU has them)
    acc = at::_int_mm(a, q.contiguous().t());
  } else {
#if defined(__AVX2__)
    acc = at::empty({M, N}, x.options().dtype(at::kInt));
    int8_rows_simd(ap, q.contiguous().data_ptr<int8_t>(), M, K, N, acc.data_ptr<int32_t>());
#else
    acc = int8_int8_matmul(a, q);
#endif
  }
  auto y = at::empty({M, N}, x.options());
  const int32_t* accp = acc.data_ptr<int32_t>();
  const float* wp = w_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] = float(accp[m * N + n]) * sp[m] * wp[n];
  });
  return y;
}

// W4A16 at decode. Byte j of a row holds weights 2j (low nibble) and 2j + 1 (high nibble), so each
// row of x is reordered once into its even elements, then its odd ones (xr [M, K] = [even | odd]):
// byte j then meets even[j] and odd[j].
// Each weight row n (the rows four ahead prefetched) against each row m of xr:
// y[m, n] = dot(row n's bytes, n, even elements of x_m, odd elements of x_m).
template <typename Dot>
void int4_rows(const uint8_t* packed, const float* xr, int64_t M, int64_t H, int64_t N, float* y, Dot dot) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* bytes = packed + n * H;
      for (int64_t j = 0; j < H; j += 64) __builtin_prefetch(bytes + 4 * H + j);
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot(bytes, n, xr + m * 2 * H, xr + m * 2 * H + H);
    }
  });
}

#if defined(__AVX512F__)
// With AVX-512, a group's 16 possible weights (nibble − 8) · scale sit in one register and each
// nibble picks its weight from it (permutexvar): 32 weights a step, no conversion to float at all.
// For groups of whole 16-byte chunks (group_size a multiple of 32, as the course's 32 and 192).
void int4_rows_avx512(const uint8_t* packed, const float* scales, const float* xr, int64_t M, int64_t H,
                      int64_t N, int64_t G, int64_t half, float* y) {
  const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i low = _mm512_set1_epi32(15);
  int4_rows(packed, xr, M, H, N, y, [&](const uint8_t* bytes, int64_t n, const float* xe, const float* xo) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m512 weights = _mm512_mul_ps(centred, _mm512_set1_ps(scales[n * G + g]));
      for (int64_t j = g * half; j < (g + 1) * half; j += 16) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
        acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, low), weights), _mm512_loadu_ps(xe + j), acc);
        acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), weights), _mm512_loadu_ps(xo + j), acc);
      }
    }
    return _mm512_reduce_add_ps(acc);
  });
}
#elif defined(__AVX2__)
// With AVX2 (no lookup across 16 lanes): 8 bytes a step widened to 32-bit lanes, their low and high
// nibbles masked out, 8 subtracted (exact, in integers), converted to float and multiplied with x's
// even and odd elements; a sum per group, times its scale. Groups of whole 8-byte chunks
// (group_size a multiple of 16); two group sums alternate so that neither waits on the other.
void int4_rows_avx2(const uint8_t* packed, const float* scales, const float* xr, int64_t M, int64_t H,
                    int64_t N, int64_t G, int64_t half, float* y) {
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  int4_rows(packed, xr, M, H, N, y, [&](const uint8_t* bytes, int64_t n, const float* xe, const float* xo) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; ++g) {
      __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
      for (int64_t j = g * half; j < (g + 1) * half; j += 8) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j)));
        const __m256i lo = _mm256_sub_epi32(_mm256_and_si256(b, low), eight);
        const __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight);
        even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_loadu_ps(xe + j), even);
        odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_loadu_ps(xo + j), odd);
      }
      acc[g & 1] = _mm256_fmadd_ps(_mm256_add_ps(even, odd), _mm256_set1_ps(scales[n * G + g]), acc[g & 1]);
    }
    return lanes_sum(_mm256_add_ps(acc[0], acc[1]));
  });
}
#endif

// Otherwise (and with 4 rows of x or more, where the lookup per row of x above would be repeated)
// each block of four weight rows is unpacked once into a small float buffer (nibble − 8) · scale,
// contiguous loops only, and every row of x is multiplied with it from the cache: with AVX-512,
// four rows of x at a time by dot_4x4 on xr, whose rows are ordered as the buffer's (even, then odd).
at::Tensor int4_weight_matmul(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& s_in,
                              int64_t group_size) {
  auto x = x_in.contiguous(), packed = packed_in.contiguous(), s = s_in.contiguous();
  check(x, packed, at::kFloat, at::kByte, 2 * packed.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = K / group_size, H = K / 2;
  TORCH_CHECK(group_size % 2 == 0 && K % group_size == 0 && s.scalar_type() == at::kFloat && s.numel() == N * G,
              "course_kernels: float32 scales [N, K / group_size] for an even group_size that divides K");
  const int64_t half = group_size / 2;  // bytes per group
  const auto reordered = x.view({M, H, 2}).transpose(1, 2).contiguous();  // [M, 2, H]: even, then odd
  auto y = at::empty({M, N}, x.options());
  const float *xr = reordered.data_ptr<float>(), *sp = s.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512F__)
  if (half % 16 == 0 && M < 4) {
    int4_rows_avx512(pp, sp, xr, M, H, N, G, half, yp);
    return y;
  }
  const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i low = _mm512_set1_epi32(15);
#elif defined(__AVX2__)
  if (half % 8 == 0 && M < 4) {
    int4_rows_avx2(pp, sp, xr, M, H, N, G, half, yp);
    return y;
  }
#endif
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> unpacked(kRows * K);  // per row: its even weights [H], then its odd ones [H]
    for (int64_t n0 = begin * kRows; n0 < std::min(end * kRows, N); n0 += kRows) {
      const int64_t rows = std::min(kRows, N - n0);
      for (int64_t j = 0; j < kRows * H; j += 64) __builtin_prefetch(pp + (n0 + kRows) * H + j);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* bytes = pp + (n0 + r) * H;
        float *even = unpacked.data() + r * K, *odd = even + H;
        for (int64_t g = 0; g < G; ++g) {
          const float scale = sp[(n0 + r) * G + g];
#if defined(__AVX512F__)
          if (half % 16 == 0) {  // 16 bytes a step, each nibble picking its weight as in int4_rows_avx512
            const __m512 weights = _mm512_mul_ps(centred, _mm512_set1_ps(scale));
            for (int64_t j = g * half; j < (g + 1) * half; j += 16) {
              const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
              _mm512_storeu_ps(even + j, _mm512_permutexvar_ps(_mm512_and_si512(b, low), weights));
              _mm512_storeu_ps(odd + j, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), weights));
            }
            continue;
          }
#endif
#pragma omp simd
          for (int64_t j = g * half; j < (g + 1) * half; ++j) {
            even[j] = float(int(bytes[j] & 15) - 8) * scale;
            odd[j] = float(int(bytes[j] >> 4) - 8) * scale;
          }
        }
      }
      int64_t m = 0;
#if defined(__AVX512F__)
      if (rows == kRows)
        for (; m + 4 <= M; m += 4) dot_4x4(xr + m * K, unpacked.data(), K, yp + m * N + n0, N, nullptr);
#endif
      for (; m < M; ++m) {
        const float *xe = xr + m * K, *xo = xe + H;
        for (int64_t r = 0; r < rows; ++r) {
          const float *even = unpacked.data() + r * K, *odd = even + H;
          float acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < H; ++j) acc += xe[j] * even[j] + xo[j] * odd[j];
          yp[m * N + n0 + r] = acc;
        }
      }
    }
  });
  return y;
}

}  // namespace course_kernels

TORCH_LIBRARY(course_kernels, m) {
  using namespace course_kernels;
  m.def("int8_weight_matmul(Tensor x, Tensor q, Tensor scale) -> Tensor", &int8_weight_matmul);
  m.def("int8_int8_matmul(Tensor a, Tensor q) -> Tensor", &int8_int8_matmul);
  m.def("float_few_rows_matmul(Tensor x, Tensor w) -> Tensor", &float_few_rows_matmul);
  m.def("int8_dynamic_matmul(Tensor x, Tensor q, Tensor w_scale) -> Tensor", &int8_dynamic_matmul);
  m.def("int4_weight_matmul(Tensor x, Tensor packed, Tensor scale, int group_size) -> Tensor", &int4_weight_matmul);
}
