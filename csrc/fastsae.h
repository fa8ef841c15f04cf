// Declarations shared by the CPU (fastsae.cpp) and CUDA (cuda/*.cu) implementations.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace fastsae {
// Argument checks common to every device's fire_counts: dtypes, shapes, devices.
void check_fire_counts_args(const at::Tensor& idx, int64_t n_features, const std::optional<at::Tensor>& vals);
}  // namespace fastsae
