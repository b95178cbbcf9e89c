// One instantiation unit of the dequant-GEMM (see uniform_mma.cuh): built in parallel with the others.
// E2M1 elements with byte block scales and a row factor (ELEM 9).
#include "uniform_mma.cuh"

namespace llmcomp_mma {
LLMCOMP_MMA_DISPATCH(__half, 4, 9);
LLMCOMP_MMA_DISPATCH(__nv_bfloat16, 4, 9);
}  // namespace llmcomp_mma
