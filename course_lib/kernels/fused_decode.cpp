// One decoded token through every layer of a Llama-family model in one call (chapter 02: the
// "fused" step of course_lib.decoder.Decoder).
//
// At batch 1 a token reads each weight once and does little arithmetic besides. Run op by op from
// Python, the same step is ~35 torch operations a layer (~1,000 a token for the teacher), and their
// overhead costs as much time as reading the weights. Here the step is one loop over the layers, as
// llama.cpp runs its graph: the matrix products are the course's kernels (quantized_matmul.cpp) or
// torch's float32 GEMM (the course's loop for up to 8 rows), and the small operations between them
// are plain loops over a few hundred floats:
//
//   h = RMSNorm(x) · w₁;   q | k | v = h · W_qkvᵀ;   q, k rotated;   k, v → cache[slot]
//   x += softmax(q · Kᵀ · scale, over the slots ≤ slot that hold real tokens) · V · W_oᵀ
//        (query head j reads key/value head j / (H / H_kv): grouped-query attention)
//   h = RMSNorm(x) · w₂;   g | u = h · W_guᵀ;   x += (silu(g) · u) · W_downᵀ
//   logits = RMSNorm(x) · w · W_headᵀ
//
// The op-by-op step in course_lib/decoder.py is the reference it is tested against.
#include "quantized_matmul.h"

#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

// A linear layer in one of the course's forms: float32 weights [N, K], INT8 weight-only ("w8a16"),
// W8A8 ("w8a8"), or 4-bit weights ("w4a16", packed [N, K/2]); float32 scales; an optional float32
// bias. Holds the module's own tensors, no copies.
struct Linear : torch::CustomClassHolder {
  enum Kind { kFloat, kW8A16, kW8A8, kW4A16 } kind;
  at::Tensor weight, scale, bias;
  int64_t group_size;

  Linear(std::string name, at::Tensor weight_, c10::optional<at::Tensor> scale_,
         c10::optional<at::Tensor> bias_, int64_t group_size_)
      : weight(weight_.contiguous()), group_size(group_size_) {
    const auto wtype = weight.scalar_type();
    if (name == "float") {
      kind = kFloat;
      TORCH_CHECK(wtype == at::kFloat, "Linear: a float layer needs float32 weights");
    } else if (name == "w8a16" || name == "w8a8") {
      kind = name == "w8a8" ? kW8A8 : kW8A16;
      TORCH_CHECK(wtype == at::kChar, "Linear: ", name, " needs int8 weights");
    } else if (name == "w4a16") {
      kind = kW4A16;
      TORCH_CHECK(wtype == at::kByte && group_size > 0, "Linear: w4a16 needs packed uint8 weights and a group_size");
    } else {
      TORCH_CHECK(false, "Linear: kind must be float, w8a16, w8a8 or w4a16, got ", name);
    }
    TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(), "Linear: a 2-D CPU weight");
    TORCH_CHECK(kind == kFloat || (scale_.has_value() && scale_->scalar_type() == at::kFloat),
                "Linear: quantized weights need their float32 scales");
    if (scale_.has_value()) scale = scale_->contiguous();
    if (bias_.has_value()) {
      TORCH_CHECK(bias_->scalar_type() == at::kFloat && bias_->numel() == weight.size(0), "Linear: a float32 bias [N]");
      bias = bias_->contiguous();
    }
  }

  int64_t in_features() const { return kind == kW4A16 ? 2 * weight.size(1) : weight.size(1); }
  int64_t out_features() const { return weight.size(0); }

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    switch (kind) {
      case kFloat:  // up to 8 rows: the course's loop (float_few_rows_matmul); more, torch's GEMM
        if (x.size(0) > 8) return at::linear(x, weight, bias);
        y = course_kernels::float_few_rows_matmul(x, weight);
        break;
      case kW8A16: y = course_kernels::int8_weight_matmul(x, weight, scale); break;
      case kW8A8: y = course_kernels::int8_dynamic_matmul(x, weight, scale); break;
      case kW4A16: y = course_kernels::int4_weight_matmul(x, weight, scale, group_size); break;
    }
    return bias.defined() ? y.add_(bias) : y;
  }
};

using LinearPtr = c10::intrusive_ptr<Linear>;

struct Layer {
  at::Tensor norm1, norm2, k_cache, v_cache;
  double eps1, eps2, scaling;
  LinearPtr qkv, o, gate_up, down;
};

// y[b] = x[b] / sqrt(mean(x[b]²) + eps) · w, for each of the B rows of x [B, C].
void rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y) {
  const int64_t B = x.size(0), C = x.size(1);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = xp + b * C;
    float squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < C; ++c) squares += row[c] * row[c];
    const float inverse = 1.f / std::sqrt(squares / float(C) + float(eps));
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yp[b * C + c] = row[c] * inverse * wp[c];
  }
}

void add_into(at::Tensor& x, const at::Tensor& y) {
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) xp[i] += yp[i];
}

// silu(g) · u for gu = [g | u] [B, 2F]: [B, F].
at::Tensor swiglu(const at::Tensor& gu) {
  const int64_t B = gu.size(0), F = gu.size(1) / 2;
  auto out = at::empty({B, F}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const float g = gp[b * 2 * F + f];
      op[b * F + f] = g / (1.f + std::exp(-g)) * gp[b * 2 * F + F + f];
    }
  return out;
}

class DecodeStep : public torch::CustomClassHolder {
 public:
  DecodeStep(int64_t heads, int64_t kv_heads, int64_t head_dim, at::Tensor final_norm, double final_eps,
             LinearPtr head)
      : heads_(heads), kv_heads_(kv_heads), dim_(head_dim), final_norm_(final_norm.contiguous()),
        final_eps_(final_eps), head_(std::move(head)) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "DecodeStep: heads must be a multiple of kv_heads, head_dim even");
    TORCH_CHECK(final_norm_.scalar_type() == at::kFloat && final_norm_.numel() == head_->in_features(),
                "DecodeStep: the final norm's float32 weight must match the output layer's input");
  }

  void add_layer(at::Tensor norm1, double eps1, LinearPtr qkv, LinearPtr o, double scaling, at::Tensor k_cache,
                 at::Tensor v_cache, at::Tensor norm2, double eps2, LinearPtr gate_up, LinearPtr down) {
    const int64_t C = final_norm_.numel();
    TORCH_CHECK(norm1.numel() == C && norm2.numel() == C && norm1.scalar_type() == at::kFloat &&
                norm2.scalar_type() == at::kFloat, "DecodeStep.add_layer: float32 norm weights of the hidden size");
    TORCH_CHECK(qkv->in_features() == C && qkv->out_features() == (heads_ + 2 * kv_heads_) * dim_ &&
                o->in_features() == heads_ * dim_ && o->out_features() == C && gate_up->in_features() == C &&
                gate_up->out_features() == 2 * down->in_features() && down->out_features() == C,
                "DecodeStep.add_layer: projections of the wrong shapes (q/k/v fused, gate/up fused)");
    for (const auto& cache : {k_cache, v_cache})
      TORCH_CHECK(cache.dim() == 4 && cache.size(1) == kv_heads_ && cache.size(3) == dim_ &&
                  cache.scalar_type() == at::kFloat && cache.is_contiguous() &&
                  cache.sizes() == k_cache.sizes() && (layers_.empty() || cache.sizes() == layers_[0].k_cache.sizes()),
                  "DecodeStep.add_layer: contiguous float32 caches [batch, kv_heads, max_length, head_dim]");
    layers_.push_back({norm1.contiguous(), norm2.contiguous(), k_cache, v_cache, eps1, eps2, scaling,
                       std::move(qkv), std::move(o), std::move(gate_up), std::move(down)});
  }

  // x [B, C]: the new tokens' embeddings; cos, sin [B, D]: their rotary angles; valid [B, L]: which
  // cache slots hold real tokens (left padding does not); slot: where the new tokens go.
  // Returns the logits [B, vocab]. The caller (Decoder.step) has checked the shapes once.
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& valid,
                     int64_t slot) {
    TORCH_CHECK(!layers_.empty() && slot >= 0 && slot < layers_[0].k_cache.size(2), "DecodeStep: slot out of range");
    at::Tensor x = x_in.contiguous().clone();  // the residual stream
    at::Tensor h = at::empty_like(x);
    at::Tensor attention = at::empty({x.size(0), heads_ * dim_}, x.options());
    const at::Tensor c = cos.contiguous(), s = sin.contiguous(), v = valid.contiguous();
    for (auto& layer : layers_) {
      rms_norm(x, layer.norm1, layer.eps1, h);
      at::Tensor qkv = (*layer.qkv)(h);
      attend(qkv, layer, c.data_ptr<float>(), s.data_ptr<float>(), v.data_ptr<bool>(), slot, attention);
      add_into(x, (*layer.o)(attention));
      rms_norm(x, layer.norm2, layer.eps2, h);
      add_into(x, (*layer.down)(swiglu((*layer.gate_up)(h))));
    }
    rms_norm(x, final_norm_, final_eps_, h);
    return (*head_)(h);
  }

 private:
  // Rotate q and k (rotate_half: x·cos + (−x₂, x₁)·sin), write k and v into the caches at `slot`,
  // then attention of each query head over the slots up to `slot` that hold real tokens.
  void attend(at::Tensor& qkv, Layer& layer, const float* cos, const float* sin, const bool* valid, int64_t slot,
              at::Tensor& out) const {
    const int64_t B = qkv.size(0), H = heads_, KV = kv_heads_, D = dim_, half = D / 2, L = layer.k_cache.size(2);
    const int64_t width = (H + 2 * KV) * D;
    float *qp = qkv.data_ptr<float>(), *kc = layer.k_cache.data_ptr<float>(), *vc = layer.v_cache.data_ptr<float>();
    float* op = out.data_ptr<float>();
    std::vector<float> rotated(D);
    for (int64_t b = 0; b < B; ++b) {
      const float *cb = cos + b * D, *sb = sin + b * D;
      for (int64_t j = 0; j < H + KV; ++j) {  // q heads, then k heads
        float* head = qp + b * width + j * D;
        for (int64_t i = 0; i < D; ++i)
          rotated[i] = head[i] * cb[i] + (i < half ? -head[i + half] : head[i - half]) * sb[i];
        std::copy(rotated.begin(), rotated.end(), head);
      }
      for (int64_t j = 0; j < KV; ++j) {
        const int64_t at_slot = ((b * KV + j) * L + slot) * D;
        std::copy_n(qp + b * width + (H + j) * D, D, kc + at_slot);
        std::copy_n(qp + b * width + (H + KV + j) * D, D, vc + at_slot);
      }
    }
    const int64_t group = H / KV;
    at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(slot + 1);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, j = bh % H;
        const float* q = qp + b * width + j * D;
        const float* keys = kc + (b * KV + j / group) * L * D;
        const float* values = vc + (b * KV + j / group) * L * D;
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t <= slot; ++t) {
          if (!valid[b * L + t]) {
            scores[t] = -std::numeric_limits<float>::infinity();
            continue;
          }
          float dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < D; ++i) dot += q[i] * keys[t * D + i];
          scores[t] = dot * float(layer.scaling);
          best = std::max(best, scores[t]);
        }
        float total = 0;
        for (int64_t t = 0; t <= slot; ++t) total += scores[t] = std::exp(scores[t] - best);
        float* o = op + b * H * D + j * D;
        std::fill_n(o, D, 0.f);
        for (int64_t t = 0; t <= slot; ++t) {
          const float p = scores[t] / total;
          if (p == 0) continue;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) o[i] += p * values[t * D + i];
        }
      }
    });
  }

  int64_t heads_, kv_heads_, dim_;
  at::Tensor final_norm_;
  double final_eps_;
  LinearPtr head_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(course_kernels, m) {
  m.class_<Linear>("Linear")
      .def(torch::init<std::string, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t>());
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<int64_t, int64_t, int64_t, at::Tensor, double, LinearPtr>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("forward", &DecodeStep::forward);
}
