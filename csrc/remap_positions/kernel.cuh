// SPEC section 3 on the device: one warp per sequence walks its sections in order with the position counter c.
//
// For a section [s, e) (a run of equal segment ids): ranks (a token's index inside its branch) come 32 tokens at
// a time: __match_any_sync groups the lanes holding the same branch id, a lane's rank is the count of earlier
// same-branch lanes plus the running per-branch count kept in shared memory (branch ids >= kTable, which no sane
// layout has, count their earlier tokens in global memory instead). The ranks are parked in `out`; once the
// section's longest branch and largest branch id are known, the lanes rewrite them as positions and c advances
// by the section's length (serial, same-sequential), its longest branch (same-max) or K * W (fixed-length).
// Cost: O(N / 32) warp steps per sequence. Not the decoding hot path (the decoder assigns positions itself).
#pragma once

#include "../common.cuh"
#include "../launch.h"

namespace aspd {

constexpr int kRemapTable = 1024;

__global__ void __launch_bounds__(32) remap_positions_kernel(const RemapParams p) {
  __shared__ int count[kRemapTable];
  const int lane = threadIdx.x;
  const int b = blockIdx.x;
  // Token indices are int64: a chunk's lanes run up to 31 past the sequence's end, and `t += 32` past the last
  // token, which overflows int (to negative indices that pass `t < end`) when N is close to 2**31.
  const int64_t start = clampi(p.cu_seqlens[b], 0, p.total);
  const int64_t end = clampi(p.cu_seqlens[b + 1], static_cast<int>(start), p.total);
  if (p.strategy == Strategy::kSequential) {
    for (int64_t t = start + lane; t < end; t += 32) p.out[t] = static_cast<int32_t>(t - start);
    return;
  }
  for (int j = lane; j < kRemapTable; j += 32) count[j] = 0;
  __syncwarp();

  int64_t c = 0;
  int64_t sec = start;
  while (sec < end) {
    const int seg0 = p.segment[sec];
    int lmax = 0, kmax = 0;
    int64_t e = end;
    for (int64_t base = sec; base < end; base += 32) {
      const int64_t t = base + lane;
      const unsigned same = __ballot_sync(0xffffffffu, t < end && p.segment[t] == seg0);
      const int run = ~same == 0u ? 32 : __ffs(~same) - 1;  // the section's tokens in this chunk: lanes < run
      const bool in = lane < run;
      const int br = in ? p.branch[t] : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, br);
      if (in) {
        const int before = __popc(peers & ((1u << lane) - 1u));
        int prior = 0;
        if (br >= 0 && br < kRemapTable) {
          prior = count[br];
        } else {
          for (int64_t u = sec; u < base; ++u) prior += p.branch[u] == br;
        }
        const int rank = prior + before;
        p.out[t] = rank;
        lmax = max(lmax, rank + 1);
        kmax = max(kmax, br);
      }
      __syncwarp();
      // the last lane of each group carries the group's tokens into the running count
      if (in && br >= 0 && br < kRemapTable && lane == 31 - __clz(peers)) count[br] += __popc(peers);
      __syncwarp();
      if (run < 32) {  // the section ends inside this chunk
        e = base + run;
        break;
      }
    }
#pragma unroll
    for (int w = 16; w > 0; w /= 2) {
      lmax = max(lmax, __shfl_xor_sync(0xffffffffu, lmax, w));
      kmax = max(kmax, __shfl_xor_sync(0xffffffffu, kmax, w));
    }
    const bool parallel = kmax > 0;
    const int64_t width = p.width > 0 ? p.width : lmax;
    for (int64_t t = sec + lane; t < e; t += 32) {
      const int br = p.branch[t];
      int64_t pos;
      if (!parallel) {
        pos = c + (t - sec);
      } else {
        pos = c + p.out[t];  // the rank parked above by this same lane
        if (p.strategy == Strategy::kFixedLength) pos += int64_t(br > 1 ? br - 1 : 0) * width;
      }
      p.out[t] = static_cast<int32_t>(pos);
      if (br >= 0 && br < kRemapTable) count[br] = 0;  // reset for the next section (lanes may race: all write 0)
    }
    __syncwarp();
    const int64_t len = e - sec;
    if (!parallel || p.strategy == Strategy::kSameSequential) {
      c += len;
    } else if (p.strategy == Strategy::kSameMax) {
      c += lmax;
    } else {
      c += int64_t(kmax) * width;
    }
    sec = e;
  }
}

}  // namespace aspd
