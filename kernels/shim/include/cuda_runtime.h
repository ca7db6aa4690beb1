// Stand-in for the CUDA header <cuda_runtime.h> in the CPU shim build (feature
// `cpu-kernels`): everything lives in cuda_shim.h.
#pragma once
#include "../cuda_shim.h"
