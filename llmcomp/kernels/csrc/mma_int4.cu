// One instantiation unit of the dequant-GEMM (see uniform_mma.cuh): built in parallel with the others.
#include "uniform_mma.cuh"

namespace llmcomp_mma {
LLMCOMP_MMA_DISPATCH(__half, 4, 0);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 4, 0);
LLMCOMP_MMA_DISPATCH(__half, 4, 3);  // fp32 post-scale, M <= 16
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 4, 3);
}  // namespace llmcomp_mma
