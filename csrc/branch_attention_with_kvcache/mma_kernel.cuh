// Decoding attention on tensor cores (fp16/bf16, head size 64 or 128), FlashAttention-2 style.
//
// One CTA per (sequence b, KV head h, KV split, row tile). Its rows are (new token i, query head g of the G heads
// that share h), row = i * G + g, BM = 64 rows per CTA: all new tokens of a sequence times the query heads of one
// KV head read each KV tile once (a sequence with Lq * G > 64 takes several row tiles, which re-read the tile from
// L2). Each of the 4 warps owns 16 rows and the whole BN = 64-key tile:
//   S = Q K^T (mma.sync m16n8k16, fp32 accumulators) -> branch mask + causal -> online softmax (fp32, base 2)
//   -> O += P V.
// KV tiles, with the segment/branch ids of their slots, stream through a STAGES-deep cp.async ring in shared
// memory (16-byte copies, a row of a tile is D contiguous elements of one slot and head). Rows are padded by 16
// bytes so that the 8 row addresses of an ldmatrix fall in distinct banks.
//
// Visibility of key slot k for the query at slot qs (SPEC section 2): k <= qs and (seg[k] != seg[qs] or
// br[k] == br[qs]). Padding rows (i >= q_seqlens[b]) get qs = -1, see nothing and are written as zeros.
// With num_splits > 1 each CTA covers a contiguous range of its sequence's tiles and writes a normalised partial
// output and its log2-sum-exp; merge_kernel.cuh combines them.
#pragma once

#include <cfloat>

#include "../common.cuh"
#include "../launch.h"

namespace aspd {

constexpr int kMmaBM = 64;       // rows per CTA (4 warps x 16)
constexpr int kMmaBN = 64;       // keys per tile
constexpr int kMmaThreads = 128;  // two CTAs per SM (launch bounds): shared memory allows two at D=128

template <int D, int STAGES> struct MmaSmem {
  static constexpr int kLds = D + 8;  // padded row stride in elements (16 bytes of padding)
  static constexpr size_t kQ = size_t(kMmaBM) * kLds * 2;
  static constexpr size_t kKV = size_t(STAGES) * kMmaBN * kLds * 2;
  static constexpr size_t kIds = size_t(STAGES) * kMmaBN * 4;
  static constexpr size_t kBytes = kQ + 2 * kKV + 2 * kIds;
};

template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(kMmaThreads, 2) decode_mma_kernel(const DecodeParams p, const int row_tiles) {
  static_assert(D % 16 == 0 && D <= 256, "head size");
  static_assert(STAGES >= 2, "the ring needs two stages");
  constexpr int BM = kMmaBM, BN = kMmaBN, NT = kMmaThreads;
  constexpr int LDS = MmaSmem<D, STAGES>::kLds;
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  static_assert(NT == 2 * BN, "load_tile: one thread per slot for segment ids, one for branch ids");

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * LDS;
  T* sV = sK + STAGES * BN * LDS;
  int* sSeg = reinterpret_cast<int*>(sV + STAGES * BN * LDS);
  int* sBr = sSeg + STAGES * BN;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rt = blockIdx.x % row_tiles;
  const int rest = blockIdx.x / row_tiles;
  const int split = rest % p.num_splits;
  const int h = rest / p.num_splits;
  const int b = blockIdx.y;
  const int G = p.hq / p.hkv;
  const int rows_total = p.lq * G;
  const int row0 = rt * BM;

  // Lengths clamped to what the cache can hold: unchecked values never read out of bounds.
  const int n = clampi(p.cache_seqlens[b], 0, p.capacity);
  const int lq = clampi(p.q_seqlens[b], 0, min(p.lq, n));
  const int i_first = row0 / G;
  const int i_last = min((min(row0 + BM, rows_total) - 1) / G, lq - 1);
  // Keys beyond the last query of this tile are never visible (causal), so they are never read.
  const int kv_end = i_last >= i_first ? n - lq + i_last + 1 : 0;
  const int n_tiles = (kv_end + BN - 1) / BN;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = min(split * per_split, n_tiles);
  const int t_end = min(t_begin + per_split, n_tiles);

  const PageMap pages{p.block_table, p.page_size, p.num_pages, p.max_pages};
  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k);
  const T* vg = static_cast<const T*>(p.v);

  // Q tile: row r -> (token i, head h*G+g); rows past the sequence's new tokens load as zeros.
  for (int c = tid; c < BM * CPR; c += NT) {
    const int r = c / CPR, col = (c % CPR) * 8;
    const int R = row0 + r;
    const int i = R / G, g = R - (R / G) * G;
    const bool valid = R < rows_total && i < lq;
    const T* src = valid ? qg + b * p.q_stride_b + i * p.q_stride_t + int64_t(h * G + g) * p.q_stride_h + col : qg;
    cp_async16(smem_addr(sQ + r * LDS + col), src, valid);
  }
  cp_async_commit();

  auto load_tile = [&](int t, int stage) {
    const int kbase = t * BN;
    T* dk = sK + stage * BN * LDS;
    T* dv = sV + stage * BN * LDS;
    for (int c = tid; c < BN * CPR; c += NT) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const int slot = kbase + r;
      const bool valid = slot < kv_end;
      const T* ks = kg;
      const T* vs = vg;
      if (valid) {
        int64_t page;
        int off;
        pages.locate(b, slot, page, off);
        ks = kg + page * p.k_stride_p + off * p.k_stride_s + h * p.k_stride_h + col;
        vs = vg + page * p.v_stride_p + off * p.v_stride_s + h * p.v_stride_h + col;
      }
      cp_async16(smem_addr(dk + r * LDS + col), ks, valid);
      cp_async16(smem_addr(dv + r * LDS + col), vs, valid);
    }
    // threads 0..63 fetch the segment ids of the tile's slots, 64..127 the branch ids
    const int r = tid % BN;
    const int slot = kbase + r;
    const bool valid = slot < kv_end;
    const int32_t* ids = tid < BN ? p.segment : p.branch;
    const int32_t* src = ids;
    if (valid) {
      int64_t page;
      int off;
      pages.locate(b, slot, page, off);
      src = ids + page * p.page_size + off;
    }
    int* dst = (tid < BN ? sSeg : sBr) + stage * BN + r;
    cp_async4(smem_addr(dst), src, valid);
  };

  // Prologue: STAGES-1 tiles in flight (empty groups keep the group count uniform).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (t_begin + s < t_end) load_tile(t_begin + s, s);
    cp_async_commit();
  }

  // The two rows this thread holds in the mma fragments: r = warp*16 + lane/4 and r + 8.
  int q_slot[2], q_seg[2], q_br[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int R = row0 + warp * 16 + lane / 4 + j * 8;
    const int i = R / G;
    q_slot[j] = -1;
    q_seg[j] = 0;
    q_br[j] = 0;
    if (R < rows_total && i < lq) {
      q_slot[j] = n - lq + i;
      int64_t page;
      int off;
      pages.locate(b, q_slot[j], page, off);
      q_seg[j] = p.segment[page * p.page_size + off];
      q_br[j] = p.branch[page * p.page_size + off];
    }
  }

  cp_async_wait<STAGES - 1>();  // the Q group (the oldest) has landed
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk], smem_addr(sQ + (warp * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8));
  }

  float acc[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};  // per-thread partial sums; the quad reduces them once at the end
  // log2(e): exp(x) = exp2(x * log2 e); one rounding of the product to fp32
  const float scale_log2 = static_cast<float>(p.softmax_scale * 1.4426950408889634);
  // Rows of live tokens are R < lq * G; a warp past them skips the math (serial decoding, lq = 1, G = 8, keeps
  // one warp of four busy) but still copies tiles and meets every barrier.
  const bool warp_active = row0 + warp * 16 < lq * G;

  for (int t = t_begin; t < t_end; ++t) {
    const int it = t - t_begin;
    cp_async_wait<STAGES - 2>();  // tile t has landed for this thread's copies...
    __syncthreads();              // ...and for everyone's; the stage refilled below is no longer being read
    {
      const int tn = t + STAGES - 1;
      if (tn < t_end) load_tile(tn, (it + STAGES - 1) % STAGES);
      cp_async_commit();
    }
    if (!warp_active) continue;  // its rows are all padding: loads and barriers only
    const int stage = it % STAGES;
    const T* tk = sK + stage * BN * LDS;
    const T* tv = sV + stage * BN * LDS;
    const int* tseg = sSeg + stage * BN;
    const int* tbr = sBr + stage * BN;

    // S = Q K^T over the tile: 8 n-tiles of 8 keys, 4 fp32 values each per thread
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_addr(tk + (np * 16 + lane % 8 + (lane / 16) * 8) * LDS + kk * 16 + ((lane / 8) % 2) * 8));
        mma16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // mask (causal + branch), scale, running max
    const int kbase = t * BN;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + (lane % 4) * 2 + (e & 1);
        const int j = e >> 1;
        const bool vis = kbase + col <= q_slot[j] && (tseg[col] != q_seg[j] || tbr[col] == q_br[j]);
        s[nt][e] = vis ? s[nt][e] * scale_log2 : -INFINITY;
        mx[j] = fmaxf(mx[j], s[nt][e]);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 1));
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 2));
      const float m_new = fmaxf(m_run[j], mx[j]);
      m_use[j] = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen nothing yet: exp2(-inf - 0) = 0
      alpha[j] = exp2f(m_run[j] - m_use[j]);
      m_run[j] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m_use[e >> 1]);
        rs[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) l_run[j] = l_run[j] * alpha[j] + rs[j];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      acc[dt][0] *= alpha[0];
      acc[dt][1] *= alpha[0];
      acc[dt][2] *= alpha[1];
      acc[dt][3] *= alpha[1];
    }

    // O += P V: the S accumulators of n-tiles 2j, 2j+1 are exactly the A fragment of key chunk j
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
      pa[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
      pa[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
      pa[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_addr(tv + (j * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + dp * 16 + (lane / 16) * 8));
        mma16816<T>(acc[2 * dp], pa, vb[0], vb[1]);
        mma16816<T>(acc[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory

  // Epilogue: rows r0 = warp*16 + lane/4 and r0 + 8; this thread holds columns dt*8 + (lane%4)*2 + {0, 1}.
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    l_run[j] += __shfl_xor_sync(0xffffffffu, l_run[j], 1);
    l_run[j] += __shfl_xor_sync(0xffffffffu, l_run[j], 2);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int R = row0 + warp * 16 + lane / 4 + j * 8;
    if (R >= rows_total) continue;
    const int i = R / G, g = R - (R / G) * G;
    const int64_t row = (int64_t(b) * p.lq + i) * p.hq + h * G + g;  // row of [B*Lq*Hq]
    const float inv = l_run[j] > 0.f ? 1.f / l_run[j] : 0.f;
    if (p.num_splits == 1) {
      T* o = static_cast<T*>(p.out) + row * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + (lane % 4) * 2;
        *reinterpret_cast<uint32_t*>(o + col) = pack2<T>(acc[dt][2 * j] * inv, acc[dt][2 * j + 1] * inv);
      }
    } else {
      const int64_t rows_all = int64_t(p.batch) * p.lq * p.hq;
      float* o = p.part_out + (split * rows_all + row) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + (lane % 4) * 2;
        *reinterpret_cast<float2*>(o + col) = make_float2(acc[dt][2 * j] * inv, acc[dt][2 * j + 1] * inv);
      }
      if (lane % 4 == 0) {
        p.part_lse[split * rows_all + row] = l_run[j] > 0.f ? m_run[j] + log2f(l_run[j]) : -INFINITY;
      }
    }
  }
}

}  // namespace aspd
