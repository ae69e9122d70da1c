// Host launchers of the decoding attention (no torch here: see launch.h). Kernel choice:
//   fp16/bf16 with D in {64, 128}  -> decode_mma_kernel (tensor cores), split-KV + merge when the grid is small;
//   anything else (fp32, fp64, other D <= 256, k/v views whose rows are not 16-byte aligned)
//   -> decode_generic_kernel.
#include "branch_attention_with_kvcache/generic_kernel.cuh"
#include "branch_attention_with_kvcache/merge_kernel.cuh"
#include "branch_attention_with_kvcache/mma_kernel.cuh"
#include "launch.h"

#include <atomic>

namespace aspd {
namespace {

// Shared memory per CTA: D=64, three stages, ~66 KB; D=128, two stages, ~88 KB. What each architecture then holds
// (128 threads, <= 255 registers by the launch bounds) is read from the device, not assumed: on sm_90 (227 KB) two
// CTAs per SM at either size; on sm_80 (163 KB) two at D=64, one at D=128; on sm_86/sm_89 (99 KB) one at either.
template <int D> constexpr int stages_for() { return D == 64 ? 3 : 2; }

int row_tiles_of(const DecodeParams& p) {
  const int rows = p.lq * (p.hq / p.hkv);
  return (rows + kMmaBM - 1) / kMmaBM;
}

// Per device ordinal (up to 64) and kernel instance: the >48 KB shared-memory opt-in, done once, and the CTAs per SM
// that the occupancy calculator then reports. 0 = not prepared yet.
template <typename T, int D> cudaError_t prepare_mma(int device, int* ctas_per_sm) {
  constexpr size_t smem = MmaSmem<D, stages_for<D>()>::kBytes;
  static std::atomic<int> per_sm[64] = {};
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  int cached = per_sm[device].load(std::memory_order_relaxed);
  if (cached > 0) {
    *ctas_per_sm = cached;
    return cudaSuccess;
  }
  auto kernel = decode_mma_kernel<T, D, stages_for<D>()>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  int blocks = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kMmaThreads, smem);
  if (err != cudaSuccess) return err;
  if (blocks < 1) return cudaErrorLaunchOutOfResources;  // the CTA does not fit this GPU at all
  per_sm[device].store(blocks, std::memory_order_relaxed);
  *ctas_per_sm = blocks;
  return cudaSuccess;
}

cudaError_t prepare_mma_for(const DecodeParams& p, int device, int* ctas_per_sm) {
  const bool half = p.dtype == DType::kFloat16;
  if (p.head_dim == 64) return half ? prepare_mma<__half, 64>(device, ctas_per_sm)
                                    : prepare_mma<__nv_bfloat16, 64>(device, ctas_per_sm);
  return half ? prepare_mma<__half, 128>(device, ctas_per_sm) : prepare_mma<__nv_bfloat16, 128>(device, ctas_per_sm);
}

template <typename T, int D> cudaError_t launch_mma(const DecodeParams& p, cudaStream_t stream) {
  constexpr int S = stages_for<D>();
  constexpr size_t smem = MmaSmem<D, S>::kBytes;
  int device = 0, ctas_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = prepare_mma<T, D>(device, &ctas_per_sm);  // the opt-in, once per device (a no-op after the first call)
  if (err != cudaSuccess) return err;
  const int row_tiles = row_tiles_of(p);
  const dim3 grid(unsigned(p.hkv * p.num_splits * row_tiles), unsigned(p.batch));
  decode_mma_kernel<T, D, S><<<grid, kMmaThreads, smem, stream>>>(p, row_tiles);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = int64_t(p.batch) * p.lq * p.hq;
  const unsigned blocks = unsigned((rows + kMergeWarps - 1) / kMergeWarps);
  decode_merge_kernel<T, D><<<blocks, kMergeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_generic(const DecodeParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.lq * p.hq;
  const unsigned blocks = unsigned((rows + kGenericWarps - 1) / kGenericWarps);
  decode_generic_kernel<T><<<blocks, kGenericWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool decode_uses_mma(const DecodeParams& p) {
  return p.aligned && (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128);
}

cudaError_t plan_decode(DecodeParams& p, int force_splits, int device) {
  p.num_splits = 1;
  if (!decode_uses_mma(p)) return cudaSuccess;
  if (force_splits > 0) {
    p.num_splits = force_splits;
    return cudaSuccess;
  }
  int sms = 0, ctas_per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = prepare_mma_for(p, device, &ctas_per_sm);
  if (err != cudaSuccess) return err;
  // Only shapes are known on the host (cache_seqlens stays on the device): size the splits for the capacity, fill
  // one wave of the CTAs the device holds per SM without starting a second, partial one (rounding up gave 288
  // CTAs for 264 slots at K = 64 on an H100: 503 us against 337 us with 8 splits, bench/results/*decode-probe*),
  // and keep at least four 64-key tiles per split so that the partials stay small next to the KV bytes. Each CTA
  // re-divides its own sequence's tiles among the splits on the device.
  const int64_t ctas = int64_t(p.batch) * p.hkv * row_tiles_of(p);
  const int64_t want = int64_t(ctas_per_sm) * sms / ctas;
  const int64_t cap_tiles = (int64_t(p.capacity) + kMmaBN - 1) / kMmaBN;
  const int64_t most = cap_tiles / 4 > 1 ? cap_tiles / 4 : 1;
  int64_t splits = want < most ? want : most;
  if (splits > 128) splits = 128;
  p.num_splits = splits < 1 ? 1 : static_cast<int>(splits);
  return cudaSuccess;
}

cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.lq == 0 || p.hq == 0) return cudaSuccess;
  if (decode_uses_mma(p)) {
    const bool half = p.dtype == DType::kFloat16;
    if (p.head_dim == 64) return half ? launch_mma<__half, 64>(p, stream) : launch_mma<__nv_bfloat16, 64>(p, stream);
    return half ? launch_mma<__half, 128>(p, stream) : launch_mma<__nv_bfloat16, 128>(p, stream);
  }
  switch (p.dtype) {
    case DType::kFloat16: return launch_generic<__half>(p, stream);
    case DType::kBFloat16: return launch_generic<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return launch_generic<float>(p, stream);
    case DType::kFloat64: return launch_generic<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace aspd
