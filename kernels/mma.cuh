// Shared by the kernel files: the f16 tensor-core product they all use.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

// c += a (16x16, row-major A fragment) * b (16x8, column-major B fragment),
// f16 inputs, f32 accumulation (mma.sync m16n8k16, sm_80+).
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
