// One instantiation unit of the dequant-GEMM (see uniform_mma.cuh): codebook (VQ) weights, one or two stages.
#include "uniform_mma.cuh"

namespace llmcomp_mma {
LLMCOMP_MMA_DISPATCH(__half, 2, 4);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 4);
LLMCOMP_MMA_DISPATCH(__half, 2, 5);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 5);
}  // namespace llmcomp_mma
