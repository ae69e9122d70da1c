// The torch boundary of the CUDA kernels: argument checks, device guard, current stream, dtype mapping, workspace
// allocation, and registration as torch.ops.aspd.cuda_* (CUDA dispatch key). The Python custom ops
// (aspd_kernels/*.py) have already validated shapes and values; the checks here keep a direct call from
// crashing the process. CUDA errors come back as exceptions that name the op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

namespace aspd {
namespace {

void check_cuda(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "aspd::", op, ": ", what, " failed: ", cudaGetErrorString(err));
}

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "aspd::", op, ": unsupported dtype ", t.scalar_type());
  return DType::kFloat32;  // unreachable: the check throws
}

void check_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda(), "aspd::", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.device() == like.device(), "aspd::", op, ": ", name, " must be on ", like.device());
  TORCH_CHECK_VALUE(t.dim() == dim, "aspd::", op, ": ", name, " must have ", dim, " dimensions, got ", t.dim());
}

void check_int32(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like, int64_t dim) {
  check_tensor(t, op, name, dim, like);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "aspd::", op, ": ", name, " must be int32");
  TORCH_CHECK_VALUE(t.is_contiguous(), "aspd::", op, ": ", name, " must be contiguous");
}

// A paged cache needs block_table [B, max_blocks]; a contiguous one needs B rows. Returns whether it is paged.
bool check_cache_rows(const std::optional<at::Tensor>& block_table, const at::Tensor& k_cache, int64_t bsz,
                      const char* op, const at::Tensor& q) {
  if (!block_table.has_value()) {
    TORCH_CHECK_VALUE(k_cache.size(0) == bsz, "aspd::", op, ": a contiguous k_cache must have B rows");
    return false;
  }
  check_int32(*block_table, op, "block_table", q, 2);
  TORCH_CHECK_VALUE(block_table->size(0) == bsz && block_table->size(1) > 0, "aspd::", op,
                    ": block_table must be [B, max_blocks] with max_blocks > 0");
  return true;
}

void check_last_dim(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.stride(-1) == 1, "aspd::", op, ": ", name, " must have a contiguous last dimension");
}

// 16-byte copies of whole rows need 16-byte aligned rows: base pointer and every outer stride.
bool rows_aligned16(const at::Tensor& t) {
  const int64_t elems = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.stride(i) % elems != 0) return false;
  }
  return true;
}

int as_int(int64_t x, const char* op, const char* what) {
  TORCH_CHECK_VALUE(x >= 0 && x <= INT32_MAX, "aspd::", op, ": ", what, " does not fit in int32");
  return static_cast<int>(x);
}

// q [B, Lq, Hq, D]; k_cache, v_cache [B, Ncap, Hkv, D] or paged [num_blocks, block_size, Hkv, D];
// cache_seqlens, q_seqlens int32 [B]; segment, branch int32 [k_cache.shape[0], k_cache.shape[1]];
// block_table int32 [B, max_blocks] or None. num_splits: 0 chooses, > 0 forces (tests).
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, const at::Tensor& segment, const at::Tensor& branch,
                            const at::Tensor& q_seqlens, const std::optional<at::Tensor>& block_table,
                            double softmax_scale, int64_t num_splits) {
  constexpr const char* op = "cuda_decode_attention";
  check_tensor(q_in, op, "q", 4, q_in);
  // q is small: a misaligned view is copied rather than sent to the slow kernel
  const at::Tensor q = rows_aligned16(q_in) ? q_in : q_in.clone(at::MemoryFormat::Contiguous);
  check_tensor(k_cache, op, "k_cache", 4, q);
  check_tensor(v_cache, op, "v_cache", 4, q);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                   "aspd::", op, ": k_cache and v_cache must have q's dtype");
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) check_last_dim(*t, op, name);
  const int64_t bsz = q.size(0), lq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "aspd::", op, ": Hq (", hq, ") must be a multiple of Hkv (", hkv, ")");
  TORCH_CHECK_VALUE(k_cache.size(3) == d && v_cache.sizes() == k_cache.sizes(), "aspd::", op,
                    ": k_cache and v_cache must both be [*, *, Hkv, D] with q's D");
  TORCH_CHECK_VALUE(d > 0 && d <= 256, "aspd::", op, ": head size ", d, " is not in 1..256");
  check_int32(cache_seqlens, op, "cache_seqlens", q, 1);
  check_int32(q_seqlens, op, "q_seqlens", q, 1);
  TORCH_CHECK_VALUE(cache_seqlens.size(0) == bsz && q_seqlens.size(0) == bsz, "aspd::", op,
                    ": cache_seqlens and q_seqlens must have B entries");
  check_int32(segment, op, "segment", q, 2);
  check_int32(branch, op, "branch", q, 2);
  TORCH_CHECK_VALUE(segment.size(0) == k_cache.size(0) && segment.size(1) == k_cache.size(1) &&
                        branch.sizes() == segment.sizes(),
                    "aspd::", op, ": segment and branch must be [k_cache.shape[0], k_cache.shape[1]]");
  const bool paged = check_cache_rows(block_table, k_cache, bsz, op, q);

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({bsz, lq, hq, d}, q.options());
  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.q_seqlens = q_seqlens.data_ptr<int32_t>();
  p.segment = segment.data_ptr<int32_t>();
  p.branch = branch.data_ptr<int32_t>();
  p.block_table = paged ? block_table->data_ptr<int32_t>() : nullptr;
  p.q_stride_b = q.stride(0);
  p.q_stride_t = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_stride_p = k_cache.stride(0);
  p.k_stride_s = k_cache.stride(1);
  p.k_stride_h = k_cache.stride(2);
  p.v_stride_p = v_cache.stride(0);
  p.v_stride_s = v_cache.stride(1);
  p.v_stride_h = v_cache.stride(2);
  p.batch = as_int(bsz, op, "B");
  p.lq = as_int(lq, op, "Lq");
  p.hq = as_int(hq, op, "Hq");
  p.hkv = as_int(hkv, op, "Hkv");
  p.head_dim = static_cast<int>(d);
  p.page_size = as_int(k_cache.size(1), op, "k_cache.shape[1]");
  p.num_pages = as_int(k_cache.size(0), op, "k_cache.shape[0]");
  p.max_pages = paged ? as_int(block_table->size(1), op, "block_table.shape[1]") : 1;
  // A cache with no page holds nothing: its capacity is 0, else the page clamp of PageMap would give index -1
  p.capacity = p.num_pages == 0 ? 0 : as_int(int64_t(p.page_size) * p.max_pages, op, "the cache capacity");
  p.softmax_scale = softmax_scale;
  p.dtype = dtype_of(q, op);
  p.aligned = rows_aligned16(k_cache) && rows_aligned16(v_cache);
  TORCH_CHECK_VALUE(bsz <= 65535, "aspd::", op, ": B must be <= 65535 (grid limit)");
  TORCH_CHECK_VALUE(num_splits >= 0 && num_splits <= 1024, "aspd::", op, ": num_splits must lie in [0, 1024]");
  if (out.numel() == 0) return out;
  check_cuda(plan_decode(p, static_cast<int>(num_splits), q.get_device()), op, "plan");
  at::Tensor part_out, part_lse;  // kept alive until the launches are queued; the allocator is stream-ordered
  if (p.num_splits > 1) {
    const int64_t rows = bsz * lq * hq;
    part_out = at::empty({p.num_splits, rows, d}, q.options().dtype(at::kFloat));
    part_lse = at::empty({p.num_splits, rows}, q.options().dtype(at::kFloat));
    p.part_out = part_out.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  check_cuda(launch_decode_attention(p, c10::cuda::getCurrentCUDAStream().stream()), op, "kernel launch");
  return out;
}

// q [B, L, Hq, D]; k, v [B, L, Hkv, D]; positions int32/int64 [B, L]; cos_sin_cache float32 [P, rot_dim];
// caches as in decode_attention (written in place); segment, branch int32 [B, L]. Returns the rotated q.
at::Tensor rope_append_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                          const at::Tensor& cos_sin_cache, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& segment_cache, const at::Tensor& branch_cache,
                          const at::Tensor& cache_seqlens, const at::Tensor& segment, const at::Tensor& branch,
                          const at::Tensor& q_seqlens, const std::optional<at::Tensor>& block_table) {
  constexpr const char* op = "cuda_rope_append_kv";
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    check_tensor(*t, op, name, 4, q);
    check_last_dim(*t, op, name);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "aspd::", op, ": ", name, " must have q's dtype");
  }
  const int64_t bsz = q.size(0), len = q.size(1), hq = q.size(2), d = q.size(3), hkv = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == bsz && k.size(1) == len && k.size(3) == d && v.sizes() == k.sizes(), "aspd::", op,
                    ": k and v must be [B, L, Hkv, D]");
  TORCH_CHECK_VALUE(k_cache.size(2) == hkv && k_cache.size(3) == d && v_cache.sizes() == k_cache.sizes(), "aspd::",
                    op, ": k_cache and v_cache must be [*, *, Hkv, D]");
  check_tensor(positions, op, "positions", 2, q);
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, "aspd::", op,
                   ": positions must be int32 or int64");
  TORCH_CHECK_VALUE(positions.is_contiguous() && positions.size(0) == bsz && positions.size(1) == len, "aspd::",
                    op, ": positions must be a contiguous [B, L]");
  check_tensor(cos_sin_cache, op, "cos_sin_cache", 2, q);
  TORCH_CHECK_TYPE(cos_sin_cache.scalar_type() == at::kFloat, "aspd::", op, ": cos_sin_cache must be float32");
  TORCH_CHECK_VALUE(cos_sin_cache.is_contiguous(), "aspd::", op, ": cos_sin_cache must be contiguous");
  const int64_t rot = cos_sin_cache.size(1);
  TORCH_CHECK_VALUE(rot > 0 && rot % 2 == 0 && rot <= d && cos_sin_cache.size(0) > 0, "aspd::", op,
                    ": cos_sin_cache must be [P > 0, rot_dim] with rot_dim even and <= D");
  check_int32(segment_cache, op, "segment_cache", q, 2);
  check_int32(branch_cache, op, "branch_cache", q, 2);
  TORCH_CHECK_VALUE(segment_cache.size(0) == k_cache.size(0) && segment_cache.size(1) == k_cache.size(1) &&
                        branch_cache.sizes() == segment_cache.sizes(),
                    "aspd::", op, ": segment_cache and branch_cache must be [k_cache.shape[0], k_cache.shape[1]]");
  check_int32(cache_seqlens, op, "cache_seqlens", q, 1);
  check_int32(q_seqlens, op, "q_seqlens", q, 1);
  TORCH_CHECK_VALUE(cache_seqlens.size(0) == bsz && q_seqlens.size(0) == bsz, "aspd::", op,
                    ": cache_seqlens and q_seqlens must have B entries");
  check_int32(segment, op, "segment", q, 2);
  check_int32(branch, op, "branch", q, 2);
  TORCH_CHECK_VALUE(segment.size(0) == bsz && segment.size(1) == len && branch.sizes() == segment.sizes(), "aspd::",
                    op, ": segment and branch must be [B, L]");
  const bool paged = check_cache_rows(block_table, k_cache, bsz, op, q);

  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = at::empty({bsz, len, hq, d}, q.options());
  RopeAppendParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.segment_cache = segment_cache.data_ptr<int32_t>();
  p.branch_cache = branch_cache.data_ptr<int32_t>();
  p.positions = positions.data_ptr();
  p.positions_int64 = positions.scalar_type() == at::kLong;
  p.cos_sin = cos_sin_cache.data_ptr<float>();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.q_seqlens = q_seqlens.data_ptr<int32_t>();
  p.segment = segment.data_ptr<int32_t>();
  p.branch = branch.data_ptr<int32_t>();
  p.block_table = paged ? block_table->data_ptr<int32_t>() : nullptr;
  p.q_stride_b = q.stride(0);
  p.q_stride_t = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0);
  p.k_stride_t = k.stride(1);
  p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_t = v.stride(1);
  p.v_stride_h = v.stride(2);
  p.kc_stride_p = k_cache.stride(0);
  p.kc_stride_s = k_cache.stride(1);
  p.kc_stride_h = k_cache.stride(2);
  p.vc_stride_p = v_cache.stride(0);
  p.vc_stride_s = v_cache.stride(1);
  p.vc_stride_h = v_cache.stride(2);
  p.batch = as_int(bsz, op, "B");
  p.len = as_int(len, op, "L");
  p.hq = as_int(hq, op, "Hq");
  p.hkv = as_int(hkv, op, "Hkv");
  p.head_dim = as_int(d, op, "D");
  p.rot_dim = as_int(rot, op, "rot_dim");
  p.num_positions = as_int(cos_sin_cache.size(0), op, "cos_sin_cache.shape[0]");
  p.page_size = as_int(k_cache.size(1), op, "k_cache.shape[1]");
  p.num_pages = as_int(k_cache.size(0), op, "k_cache.shape[0]");
  p.max_pages = paged ? as_int(block_table->size(1), op, "block_table.shape[1]") : 1;
  // A cache with no page holds nothing: its capacity is 0, else the page clamp of PageMap would give index -1
  p.capacity = p.num_pages == 0 ? 0 : as_int(int64_t(p.page_size) * p.max_pages, op, "the cache capacity");
  p.dtype = dtype_of(q, op);
  // grid (L, B): only gridDim.y is limited to 65535, so a long prefill (L > 65535) stays legal
  TORCH_CHECK_VALUE(bsz <= 65535, "aspd::", op, ": B must be <= 65535 (grid limit)");
  check_cuda(launch_rope_append_kv(p, c10::cuda::getCurrentCUDAStream().stream()), op, "kernel launch");
  return q_out;
}

// segment, branch int32 [N]; cu_seqlens int32 [B + 1]; strategy: index into reference.STRATEGIES;
// width <= 0: each section's longest branch.
at::Tensor remap_positions(const at::Tensor& segment, const at::Tensor& branch, const at::Tensor& cu_seqlens,
                           int64_t strategy, int64_t width) {
  constexpr const char* op = "cuda_remap_positions";
  check_int32(segment, op, "segment", segment, 1);
  check_int32(branch, op, "branch", segment, 1);
  check_int32(cu_seqlens, op, "cu_seqlens", segment, 1);
  TORCH_CHECK_VALUE(branch.size(0) == segment.size(0), "aspd::", op, ": branch must have segment's length");
  TORCH_CHECK_VALUE(cu_seqlens.size(0) >= 2, "aspd::", op, ": cu_seqlens must hold B + 1 >= 2 entries");
  TORCH_CHECK_VALUE(strategy >= 0 && strategy <= 3, "aspd::", op, ": strategy code must lie in [0, 3]");
  TORCH_CHECK_VALUE(width <= INT32_MAX, "aspd::", op, ": width does not fit in int32");

  const c10::cuda::CUDAGuard guard(segment.device());
  auto out = at::empty({segment.size(0)}, segment.options());
  RemapParams p{};
  p.segment = segment.data_ptr<int32_t>();
  p.branch = branch.data_ptr<int32_t>();
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr<int32_t>();
  p.total = as_int(segment.size(0), op, "N");
  p.batch = as_int(cu_seqlens.size(0) - 1, op, "B");
  p.strategy = static_cast<Strategy>(strategy);
  p.width = width > 0 ? static_cast<int>(width) : 0;
  check_cuda(launch_remap_positions(p, c10::cuda::getCurrentCUDAStream().stream()), op, "kernel launch");
  return out;
}

}  // namespace
}  // namespace aspd

TORCH_LIBRARY_FRAGMENT(aspd, m) {
  m.def(
      "cuda_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor segment, "
      "Tensor branch, Tensor q_seqlens, Tensor? block_table, float softmax_scale, int num_splits=0) -> Tensor");
  m.def(
      "cuda_rope_append_kv(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin_cache, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) segment_cache, Tensor(d!) branch_cache, "
      "Tensor cache_seqlens, Tensor segment, Tensor branch, Tensor q_seqlens, Tensor? block_table) -> Tensor");
  m.def(
      "cuda_remap_positions(Tensor segment, Tensor branch, Tensor cu_seqlens, int strategy, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(aspd, CUDA, m) {
  m.impl("cuda_decode_attention", &aspd::decode_attention);
  m.impl("cuda_rope_append_kv", &aspd::rope_append_kv);
  m.impl("cuda_remap_positions", &aspd::remap_positions);
}
