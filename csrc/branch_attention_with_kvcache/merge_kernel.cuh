// Second pass of split-KV decoding: out = sum_s w_s O_s / sum_s w_s with w_s = 2^(lse_s - max_s lse_s).
// One warp per output row; a row no split could see (padding, or nothing visible) is written as zeros.
#pragma once

#include "../common.cuh"
#include "../launch.h"

namespace aspd {

constexpr int kMergeWarps = 4;

template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) decode_merge_kernel(const DecodeParams p) {
  constexpr int PER_LANE = D / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.lq * p.hq;
  const int64_t row = int64_t(blockIdx.x) * kMergeWarps + warp;
  if (row >= rows) return;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.part_lse[s * rows + row]);
  float acc[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) acc[j] = 0.f;
  float wsum = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float lse = p.part_lse[s * rows + row];
      if (lse == -INFINITY) continue;  // an empty split wrote zeros; skip its read
      const float w = exp2f(lse - mx);
      wsum += w;
      const float* src = p.part_out + (s * rows + row) * D;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) acc[j] += w * src[lane + 32 * j];
    }
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  T* o = static_cast<T*>(p.out) + row * D;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) o[lane + 32 * j] = from_acc<T>(acc[j] * inv);
}

}  // namespace aspd
