// Rotary embedding of the new tokens and their append into the KV cache, in one kernel.
// One CTA per new token (b, i): it rotates the token's Hq query heads into q_out and, when the token is live
// (i < q_seqlens[b]) and its slot fits the cache, writes its rotated K heads, its V heads and its segment/branch
// ids at slot cache_seqlens[b] - q_seqlens[b] + i. Rotate-half (Llama/Qwen2 in transformers) on the first
// rot_dim features: out[d] = x[d] cos[d] - x[d + half] sin[d] (d < half),
// out[d] = x[d] cos[d - half] + x[d - half] sin[d - half] (half <= d < rot_dim), x[d] beyond; computed in
// fp32 (fp64 for float64) and rounded once.
#pragma once

#include "../common.cuh"
#include "../launch.h"

namespace aspd {

constexpr int kRopeThreads = 128;

template <typename T, typename A>
__device__ __forceinline__ A rotated(const T* x, int d, int half, int rot, const float* cs) {
  const A xd = load_as<T, A>(x + d);
  if (d < half) return xd * A(cs[d]) - load_as<T, A>(x + d + half) * A(cs[half + d]);
  if (d < rot) return xd * A(cs[d - half]) + load_as<T, A>(x + d - half) * A(cs[d]);
  return xd;
}

template <typename T>
__global__ void __launch_bounds__(kRopeThreads) rope_append_kv_kernel(const RopeAppendParams p) {
  using A = typename AccType<T>::type;
  const int i = blockIdx.x, b = blockIdx.y;
  const int D = p.head_dim, half = p.rot_dim / 2;
  const int64_t tok = int64_t(b) * p.len + i;
  const int64_t raw = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[tok]
                                        : static_cast<const int32_t*>(p.positions)[tok];
  const int64_t pos = raw < 0 ? 0 : (raw >= p.num_positions ? p.num_positions - 1 : raw);
  const float* cs = p.cos_sin + pos * p.rot_dim;  // cos in [0, half), sin in [half, rot_dim)

  const T* qx = static_cast<const T*>(p.q) + b * p.q_stride_b + i * p.q_stride_t;
  T* qo = static_cast<T*>(p.q_out) + tok * p.hq * D;
  for (int e = threadIdx.x; e < p.hq * D; e += blockDim.x) {
    const int hh = e / D, d = e - (e / D) * D;
    qo[e] = from_acc<T>(rotated<T, A>(qx + hh * p.q_stride_h, d, half, p.rot_dim, cs));
  }

  const int n = clampi(p.cache_seqlens[b], 0, p.capacity);
  const int lq = clampi(p.q_seqlens[b], 0, p.len);
  const int slot = n - lq + i;
  if (i >= lq || slot < 0 || slot >= p.capacity) return;  // padding row, or a slot the cache cannot hold
  const PageMap pages{p.block_table, p.page_size, p.num_pages, p.max_pages};
  int64_t page;
  int off;
  pages.locate(b, slot, page, off);
  const T* kx = static_cast<const T*>(p.k) + b * p.k_stride_b + i * p.k_stride_t;
  const T* vx = static_cast<const T*>(p.v) + b * p.v_stride_b + i * p.v_stride_t;
  T* kc = static_cast<T*>(p.k_cache) + page * p.kc_stride_p + off * p.kc_stride_s;
  T* vc = static_cast<T*>(p.v_cache) + page * p.vc_stride_p + off * p.vc_stride_s;
  for (int e = threadIdx.x; e < p.hkv * D; e += blockDim.x) {
    const int hh = e / D, d = e - (e / D) * D;
    kc[hh * p.kc_stride_h + d] = from_acc<T>(rotated<T, A>(kx + hh * p.k_stride_h, d, half, p.rot_dim, cs));
    vc[hh * p.vc_stride_h + d] = vx[hh * p.v_stride_h + d];
  }
  if (threadIdx.x == 0) {
    p.segment_cache[page * p.page_size + off] = p.segment[tok];
    p.branch_cache[page * p.page_size + off] = p.branch[tok];
  }
}

}  // namespace aspd
