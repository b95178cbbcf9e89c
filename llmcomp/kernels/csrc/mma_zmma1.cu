// One instantiation unit of the dequant-GEMM (see uniform_mma.cuh): built in parallel with the others.
#include "uniform_mma.cuh"

namespace llmcomp_mma {
LLMCOMP_MMA_DISPATCH(__half, 4, 9);  // fp32 post-scale with the zero taken by mma in the codes' chain, M <= 8
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 4, 9);
LLMCOMP_MMA_DISPATCH(__half, 2, 9);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 2, 9);
}  // namespace llmcomp_mma
