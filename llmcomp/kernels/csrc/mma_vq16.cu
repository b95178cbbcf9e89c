// One instantiation unit of the dequant-GEMM (see uniform_mma.cuh): codebook (VQ) weights, one or two stages,
// the table replicated across the shared-memory banks (ELEM 6 / 7).
#include "uniform_mma.cuh"

namespace llmcomp_mma {
LLMCOMP_MMA_DISPATCH(__half, 2, 6);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 6);
LLMCOMP_MMA_DISPATCH(__half, 2, 7);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 7);
}  // namespace llmcomp_mma
