// fastsae's C++ extension: the schema of the death-statistics ops and their CPU implementations.
// CUDA implementations live in csrc/cuda/*.cu and register under the same names for the CUDA key.
// The Python side (fastsae/_ext.py) adds fake impls; fastsae/reference.py defines what each op computes.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "fastsae.h"

namespace fastsae {

void check_fire_counts_args(const at::Tensor& idx, int64_t n_features, const std::optional<at::Tensor>& vals) {
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
              "fire_counts: idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(n_features >= 1 && n_features <= (int64_t(1) << 31), "fire_counts: n_features must be in [1, 2^31], got ",
              n_features);
  if (vals.has_value()) {
    TORCH_CHECK(vals->sizes() == idx.sizes(), "fire_counts: vals must have the shape of idx ", idx.sizes(), ", got ",
                vals->sizes());
    TORCH_CHECK(at::isFloatingType(vals->scalar_type()), "fire_counts: vals must be floating point, got ",
                vals->scalar_type());
    TORCH_CHECK(vals->device() == idx.device(), "fire_counts: vals is on ", vals->device(), ", idx on ", idx.device());
  }
}

namespace {

template <typename index_t>
void fire_counts_cpu_loop(const index_t* idx, const at::Tensor& vals, int64_t n, int64_t n_features, int64_t* out) {
  const float* v = vals.defined() ? vals.data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t f = static_cast<int64_t>(idx[i]);
    TORCH_CHECK(f >= 0 && f < n_features, "fire_counts: idx holds ", f, " at flat position ", i,
                ", outside [0, n_features=", n_features, ")");
    if (v == nullptr || v[i] > 0.0f) out[f] += 1;
  }
}

at::Tensor fire_counts_cpu(const at::Tensor& idx, int64_t n_features, const std::optional<at::Tensor>& vals) {
  check_fire_counts_args(idx, n_features, vals);
  at::Tensor out = at::zeros({n_features}, idx.options().dtype(at::kLong));
  const at::Tensor idx_c = idx.contiguous();
  // Only the sign of a value matters, so an fp32 copy loses nothing for any input dtype.
  const at::Tensor vals_f = vals.has_value() ? vals->to(at::kFloat).contiguous() : at::Tensor();
  AT_DISPATCH_INDEX_TYPES(idx_c.scalar_type(), "fire_counts_cpu", [&] {
    fire_counts_cpu_loop<index_t>(idx_c.data_ptr<index_t>(), vals_f, idx_c.numel(), n_features,
                                  out.data_ptr<int64_t>());
  });
  return out;
}

at::Tensor fire_counts_dense_cpu(const at::Tensor& acts) {
  TORCH_CHECK(acts.dim() == 2, "fire_counts_dense: acts must be [B, F], got shape ", acts.sizes());
  TORCH_CHECK(at::isFloatingType(acts.scalar_type()), "fire_counts_dense: acts must be floating point, got ",
              acts.scalar_type());
  const int64_t n_rows = acts.size(0), n_features = acts.size(1);
  at::Tensor out = at::zeros({n_features}, acts.options().dtype(at::kLong));
  const at::Tensor a = acts.contiguous();
  int64_t* counts = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fire_counts_dense_cpu", [&] {
    const scalar_t* data = a.data_ptr<scalar_t>();
    // Row by row so the inner loop walks contiguous memory.
    for (int64_t b = 0; b < n_rows; ++b) {
      const scalar_t* row = data + b * n_features;
      for (int64_t f = 0; f < n_features; ++f) counts[f] += static_cast<float>(row[f]) > 0.0f;
    }
  });
  return out;
}

// Elementwise, so ATen's own kernels serve every device without a host synchronisation.
void update_since_fired(at::Tensor& tokens_since_fired, const at::Tensor& counts, int64_t n_tokens) {
  TORCH_CHECK(tokens_since_fired.scalar_type() == at::kLong, "update_since_fired: tokens_since_fired must be int64");
  TORCH_CHECK(counts.sizes() == tokens_since_fired.sizes(), "update_since_fired: counts has shape ", counts.sizes(),
              ", tokens_since_fired ", tokens_since_fired.sizes());
  TORCH_CHECK(n_tokens >= 0, "update_since_fired: n_tokens must be >= 0, got ", n_tokens);
  tokens_since_fired.add_(n_tokens).masked_fill_(counts > 0, 0);
}

at::Tensor dead_mask(const at::Tensor& tokens_since_fired, int64_t threshold) {
  return tokens_since_fired > threshold;
}

}  // namespace
}  // namespace fastsae

TORCH_LIBRARY(fastsae, m) {
  m.def("fire_counts(Tensor idx, int n_features, Tensor? vals=None) -> Tensor");
  m.def("fire_counts_dense(Tensor acts) -> Tensor");
  m.def("update_since_fired(Tensor(a!) tokens_since_fired, Tensor counts, int n_tokens) -> ()");
  m.def("dead_mask(Tensor tokens_since_fired, int threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("fire_counts", &fastsae::fire_counts_cpu);
  m.impl("fire_counts_dense", &fastsae::fire_counts_dense_cpu);
}

TORCH_LIBRARY_IMPL(fastsae, CompositeExplicitAutograd, m) {
  m.impl("update_since_fired", &fastsae::update_since_fired);
  m.impl("dead_mask", &fastsae::dead_mask);
}
