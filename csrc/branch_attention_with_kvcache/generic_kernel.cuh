// Decoding attention for what the tensor-core kernel does not cover: float32/float64, and head sizes other than
// 64/128 (any D <= 256). One warp per query row (b, i, query head): lanes split the head dimension (d = lane +
// 32 j, coalesced row reads), the dot product is a warp all-reduce, and the softmax is online in the
// accumulation type (float64 for float64 inputs). Correct and simple, not fast: fp32 decoding is for checking,
// and the hot path (fp16/bf16, D in {64, 128}) never comes here.
#pragma once

#include "../common.cuh"
#include "../launch.h"

namespace aspd {

constexpr int kGenericWarps = 4;
constexpr int kGenericMaxPerLane = 8;  // D <= 256

template <typename T>
__global__ void __launch_bounds__(kGenericWarps * 32) decode_generic_kernel(const DecodeParams p) {
  using A = typename AccType<T>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kGenericWarps + warp;  // row of [B, Lq, Hq]
  const int64_t rows = int64_t(p.batch) * p.lq * p.hq;
  if (row >= rows) return;
  const int hq_idx = static_cast<int>(row % p.hq);
  const int i = static_cast<int>((row / p.hq) % p.lq);
  const int b = static_cast<int>(row / (int64_t(p.hq) * p.lq));
  const int G = p.hq / p.hkv;
  const int h = hq_idx / G;
  const int D = p.head_dim;
  T* o = static_cast<T*>(p.out) + row * D;

  const int n = clampi(p.cache_seqlens[b], 0, p.capacity);
  const int lq = clampi(p.q_seqlens[b], 0, min(p.lq, n));
  if (i >= lq) {  // padding row
    for (int d = lane; d < D; d += 32) o[d] = from_acc<T>(A(0));
    return;
  }
  const PageMap pages{p.block_table, p.page_size, p.num_pages, p.max_pages};
  const int q_slot = n - lq + i;
  int64_t page;
  int off;
  pages.locate(b, q_slot, page, off);
  const int q_seg = p.segment[page * p.page_size + off];
  const int q_br = p.branch[page * p.page_size + off];

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride_b + i * p.q_stride_t + hq_idx * p.q_stride_h;
  A qv[kGenericMaxPerLane], acc[kGenericMaxPerLane];
#pragma unroll
  for (int j = 0; j < kGenericMaxPerLane; ++j) {
    const int d = lane + 32 * j;
    qv[j] = d < D ? load_as<T, A>(qg + d) : A(0);
    acc[j] = A(0);
  }
  const A scale = static_cast<A>(p.softmax_scale);
  A m = -INFINITY, l = 0;
  for (int k = 0; k <= q_slot; ++k) {
    pages.locate(b, k, page, off);
    const int64_t id = page * p.page_size + off;
    if (p.segment[id] == q_seg && p.branch[id] != q_br) continue;  // a sibling branch (uniform across the warp)
    const T* kr = static_cast<const T*>(p.k) + page * p.k_stride_p + off * p.k_stride_s + h * p.k_stride_h;
    const T* vr = static_cast<const T*>(p.v) + page * p.v_stride_p + off * p.v_stride_s + h * p.v_stride_h;
    A dot = 0;
#pragma unroll
    for (int j = 0; j < kGenericMaxPerLane; ++j) {
      const int d = lane + 32 * j;
      if (d < D) dot += qv[j] * load_as<T, A>(kr + d);
    }
#pragma unroll
    for (int w = 16; w > 0; w /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, w);
    const A sc = dot * scale;
    const A m_new = sc > m ? sc : m;
    const A alpha = exp(m - m_new);  // m = -inf on the first visible key: alpha = 0
    const A pr = exp(sc - m_new);
    l = l * alpha + pr;
#pragma unroll
    for (int j = 0; j < kGenericMaxPerLane; ++j) {
      const int d = lane + 32 * j;
      acc[j] = acc[j] * alpha + (d < D ? pr * load_as<T, A>(vr + d) : A(0));
    }
    m = m_new;
  }
  const A inv = l > A(0) ? A(1) / l : A(0);
#pragma unroll
  for (int j = 0; j < kGenericMaxPerLane; ++j) {
    const int d = lane + 32 * j;
    if (d < D) o[d] = from_acc<T>(acc[j] * inv);
  }
}

}  // namespace aspd
