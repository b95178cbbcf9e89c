// One instantiation unit of the dequant-GEMM (see uniform_mma.cuh): built in parallel with the others.
#include "uniform_mma.cuh"

namespace llmcomp_mma {
LLMCOMP_MMA_DISPATCH(__half, 2, 0);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 0);
LLMCOMP_MMA_DISPATCH(__half, 2, 3);  // fp32 post-scale, M <= 16
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 3);
}  // namespace llmcomp_mma
