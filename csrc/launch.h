// The seam between the torch boundary (ops.cpp) and the kernels (*.cu): plain structs and launchers, no torch.
// Keeping torch out of the .cu files keeps each nvcc run short (torch's headers cost ~1 min per file and arch).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace aspd {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Slot `s` of sequence `b` lives in page `p`, row `off`: contiguous caches use p = b, off = s (one page of
// `page_size` = Ncap slots per sequence); paged caches use p = block_table[b, s / page_size], off = s % page_size.
// segment/branch are contiguous [num_pages, page_size]; k/v use their own strides (last dim contiguous).
struct DecodeParams {
  const void* q;        // [B, Lq, Hq, D]
  const void* k;        // [num_pages, page_size, Hkv, D]
  const void* v;
  void* out;            // [B, Lq, Hq, D] contiguous
  const int32_t* cache_seqlens;  // [B]
  const int32_t* q_seqlens;      // [B]
  const int32_t* segment;        // [num_pages, page_size]
  const int32_t* branch;
  const int32_t* block_table;    // [B, max_pages], nullptr for a contiguous cache
  float* part_out;      // [num_splits, B*Lq*Hq, D] float32 when num_splits > 1
  float* part_lse;      // [num_splits, B*Lq*Hq] float32 (log2 units)
  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t k_stride_p, k_stride_s, k_stride_h;
  int64_t v_stride_p, v_stride_s, v_stride_h;
  int batch, lq, hq, hkv, head_dim;
  int page_size, num_pages, max_pages;
  int capacity;         // slots a sequence can hold: page_size (contiguous) or max_pages * page_size (paged)
  int num_splits;       // filled by plan_decode
  double softmax_scale;  // double: the float64 path must not round the scale to fp32 (1e-7 relative error)
  DType dtype;
  bool aligned;         // k/v pointers and strides allow 16-byte copies (else the generic kernel runs)
};

// Chooses the kernel and the number of KV splits from shapes and the SM count only (never from device values,
// so the launch sequence is the same at every step and can be captured in a CUDA graph). A positive
// `force_splits` overrides the heuristic (tests use it to reach the merge path on small inputs).
// Returns the error of the attribute queries, if any.
cudaError_t plan_decode(DecodeParams& p, int force_splits, int device);

// Whether these inputs run on the tensor-core kernel (else the generic warp-per-row kernel).
bool decode_uses_mma(const DecodeParams& p);

cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream);

struct RopeAppendParams {
  const void* q;        // [B, L, Hq, D]
  const void* k;        // [B, L, Hkv, D]
  const void* v;
  void* q_out;          // [B, L, Hq, D] contiguous
  void* k_cache;        // [num_pages, page_size, Hkv, D]
  void* v_cache;
  int32_t* segment_cache;  // [num_pages, page_size] contiguous
  int32_t* branch_cache;
  const void* positions;   // [B, L] int32 or int64, contiguous
  bool positions_int64;
  const float* cos_sin;    // [P, rot_dim] contiguous
  const int32_t* cache_seqlens;
  const int32_t* q_seqlens;
  const int32_t* segment;  // [B, L] contiguous
  const int32_t* branch;
  const int32_t* block_table;  // nullptr: contiguous
  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t k_stride_b, k_stride_t, k_stride_h;
  int64_t v_stride_b, v_stride_t, v_stride_h;
  int64_t kc_stride_p, kc_stride_s, kc_stride_h;
  int64_t vc_stride_p, vc_stride_s, vc_stride_h;
  int batch, len, hq, hkv, head_dim, rot_dim, num_positions;
  int page_size, num_pages, max_pages, capacity;
  DType dtype;
};

cudaError_t launch_rope_append_kv(const RopeAppendParams& p, cudaStream_t stream);

enum class Strategy : int { kSameSequential = 0, kSameMax = 1, kFixedLength = 2, kSequential = 3 };

struct RemapParams {
  const int32_t* segment;     // [N]
  const int32_t* branch;      // [N]
  const int32_t* cu_seqlens;  // [B + 1]
  int32_t* out;               // [N]
  int total, batch;
  Strategy strategy;
  int width;                  // <= 0: each section's longest branch
};

cudaError_t launch_remap_positions(const RemapParams& p, cudaStream_t stream);

}  // namespace aspd
