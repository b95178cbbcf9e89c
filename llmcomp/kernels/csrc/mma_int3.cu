// One instantiation unit of the dequant-GEMM (see uniform_mma.cuh): built in parallel with the others.
#include "uniform_mma.cuh"

namespace llmcomp_mma {
LLMCOMP_MMA_DISPATCH(__half, 2, 2);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 2);
LLMCOMP_MMA_DISPATCH(__half, 2, 8);  // fp32 post-scale, M <= 8
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 8);
}  // namespace llmcomp_mma
