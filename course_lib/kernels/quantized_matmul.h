// The course's quantized matrix products (quantized_matmul.cpp), shared with the fused decode step
// (fused_decode.cpp). Each returns y = x · Wᵀ [M, N] in float32 for float32 x [M, K].
#pragma once
#include <ATen/ATen.h>

namespace course_kernels {

// FP32 for at most 16 rows of x: each weight row read once, 4 × 4 register blocks.
at::Tensor float_few_rows_matmul(const at::Tensor& x, const at::Tensor& w);
// W8A16: INT8 weights q [N, K], one float32 scale per row (or one for all), float32 arithmetic.
at::Tensor int8_weight_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);
// W8A8: x's rows absmax-quantized to INT8 on the fly, exact int32 sums, dequantized by s_x ⊗ s_w.
at::Tensor int8_dynamic_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& w_scale);
// W4A16: two 4-bit weights a byte (packed [N, K/2]), one float32 scale per group [N, K/group_size].
at::Tensor int4_weight_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                              int64_t group_size);

}  // namespace course_kernels
