// Host launcher of rope_append_kv (no torch here: see launch.h).
#include "launch.h"
#include "rope_append_kv/kernel.cuh"

namespace aspd {

cudaError_t launch_rope_append_kv(const RopeAppendParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.len == 0) return cudaSuccess;
  const dim3 grid(unsigned(p.len), unsigned(p.batch));
  switch (p.dtype) {
    case DType::kFloat16: rope_append_kv_kernel<__half><<<grid, kRopeThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: rope_append_kv_kernel<__nv_bfloat16><<<grid, kRopeThreads, 0, stream>>>(p); break;
    case DType::kFloat32: rope_append_kv_kernel<float><<<grid, kRopeThreads, 0, stream>>>(p); break;
    case DType::kFloat64: rope_append_kv_kernel<double><<<grid, kRopeThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace aspd
