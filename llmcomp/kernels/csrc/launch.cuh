#pragma once
// Kernel launches shared by the dequant-GEMMs (uniform_mma.cuh) and the codebook lookup-table GEMV (vq_lut.cu):
// programmatic dependent launch on the device side, and one launch call that asks for it when pdl() says so.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace llmcomp_mma {

// Programmatic dependent launch (sm_90+; no-ops below, and when the launch did not ask for it): a kernel launched
// with programmatic stream serialization may start before the previous kernel in the stream has finished. It
// reads only its constant weights (and codebooks) before grid_dep_wait, which returns once that kernel has
// completed and its writes are visible; nothing is read from x nor written before it. (So the weights must not be
// written by the kernel just before: true once prepared, but not formally for a weight's first call right after its
// layout is built on the same stream — another reason PDL is opt-in.) grid_dep_launch lets the
// next such kernel start once every block of this one has begun, so the next layer's weight loads overlap this
// one's tail (pdl() in uniform_mma.cu; opt-in, LLMCOMP_PDL=1: on an H200 seven W4 linears of an 8B layer back to
// back took 48.8 µs a layer with it against 53.6 without, but a compiled 8B decode step, where most of our kernels
// follow and precede inductor's, took 2.86 ms against 2.80 — bench/results/kernels_h200_notes.md).
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launch with programmatic stream serialization (see grid_dep_wait): on sm_90+ with LLMCOMP_PDL=1 (read once a
// process, the device of the first launch decides; set_pdl switches it).
bool pdl();

// Whether environment variable `name` turns a default-on switch off: 0, off, false or no, in any case, surrounding
// spaces ignored (llmcomp/kernels/switches.py reads the same).
bool env_off(const char* name);

// One launch on the current stream, with programmatic stream serialization when pdl().
template <typename... P, typename... A>
void launch_ex(void (*kern)(P...), dim3 grid, int threads, size_t smem, A... args) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, args...));
}

}  // namespace llmcomp_mma
