// Host launcher of remap_positions (no torch here: see launch.h). One warp per sequence, one launch.
#include "launch.h"
#include "remap_positions/kernel.cuh"

namespace aspd {

cudaError_t launch_remap_positions(const RemapParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.total == 0) return cudaSuccess;
  remap_positions_kernel<<<unsigned(p.batch), 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace aspd
