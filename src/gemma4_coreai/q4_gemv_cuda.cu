// One-token q4_0 GEMV for the CUDA fast path (kernels.py builds this on first use with nvcc and falls back to the
// Triton kernel where it cannot). Reads the bundle's packed layout as it is: row n is kg blocks of 16 bytes, byte j
// of a block holding column 2j (low nibble) and 2j+1 (high nibble) as q + 8; one fp16/fp32 scale per block.
//
// out[split, N] = fp32 partial sums of x . W[n] over `split` K slices (their sum is the product; the caller's
// next kernel adds them). Exact products and fp32 accumulation, like the stock dequantize + matmul in fp32.
//
// Why it is shaped this way (H100/H200, batch 1, memory-bound): each lane owns one 32-block per step and loads it
// with one 16-byte load; a warp owns ROWS rows, so x is loaded and widened once per block for ROWS rows; every
// load of a step is issued before the first use (UNROLL blocks x ROWS rows in flight per lane). Nibbles become
// floats without the slow int->float unit: byte_perm puts a nibble under the exponent of 2^23, and subtracting
// 2^23 + 8 leaves q exactly.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace {

constexpr int WARPS = 4;   // warps per CTA
constexpr int ROWS = 2;    // rows per warp
constexpr int UNROLL = 2;  // blocks per lane in flight, per row

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// 32 activations of one block, widened to fp32.
__device__ __forceinline__ void load_x(const __nv_bfloat16* x, float* xf) {
  const uint4* p = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = __ldg(p + i);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      xf[8 * i + 2 * j] = __uint_as_float(w[j] << 16);
      xf[8 * i + 2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
    }
  }
}

__device__ __forceinline__ void load_x(const __half* x, float* xf) {
  const uint4* p = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = __ldg(p + i);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(h[j]);
      xf[8 * i + 2 * j] = f.x;
      xf[8 * i + 2 * j + 1] = f.y;
    }
  }
}

__device__ __forceinline__ void load_x(const float* x, float* xf) {
  const float4* p = reinterpret_cast<const float4*>(x);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 v = __ldg(p + i);
    xf[4 * i] = v.x;
    xf[4 * i + 1] = v.y;
    xf[4 * i + 2] = v.z;
    xf[4 * i + 3] = v.w;
  }
}

// sum_k q[k] * x[k] over one block (16 bytes of nibbles), q exact.
__device__ __forceinline__ float block_dot(const uint4 wv, const float* xf) {
  const uint32_t w[4] = {wv.x, wv.y, wv.z, wv.w};
  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = w[i] & 0x0F0F0F0Fu, hi = (w[i] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float ql = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7650 + p)) - 8388616.f;
      const float qh = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7650 + p)) - 8388616.f;
      a0 = fmaf(ql, xf[8 * i + 2 * p], a0);
      a1 = fmaf(qh, xf[8 * i + 2 * p + 1], a1);
    }
  }
  return a0 + a1;
}

template <typename XT, typename ST>
__global__ void __launch_bounds__(WARPS * 32) q4_gemv_kernel(const XT* __restrict__ x, const uint8_t* __restrict__ w,
                                                            const ST* __restrict__ s, float* __restrict__ out,
                                                            int n, int kg, int kg_split) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= n) return;
  const int g_begin = blockIdx.y * kg_split;
  const int g_end = min(g_begin + kg_split, kg);
  const uint4* wr[ROWS];
  const ST* sr[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(row0 + r, n - 1);  // a missing last row re-reads the one before; never stored
    wr[r] = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * kg * 16);
    sr[r] = s + static_cast<size_t>(row) * kg;
  }
  float acc[ROWS] = {};
  for (int g = g_begin + lane; g < g_end; g += 32 * UNROLL) {
    uint4 wv[UNROLL][ROWS];
    float sc[UNROLL][ROWS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int gu = g + 32 * u;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (gu < g_end) {
          wv[u][r] = __ldcs(wr[r] + gu);  // streamed once: evict first
          sc[u][r] = to_float(sr[r][gu]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int gu = g + 32 * u;
      if (gu < g_end) {
        float xf[32];
        load_x(x + static_cast<size_t>(gu) * 32, xf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] = fmaf(block_dot(wv[u][r], xf), sc[u][r], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    if (lane == 0 && row0 + r < n) out[static_cast<size_t>(blockIdx.y) * n + row0 + r] = v;
  }
}

template <typename XT, typename ST>
void launch(const torch::Tensor& x, const torch::Tensor& q4, const torch::Tensor& scale, torch::Tensor& out, int n,
            int kg, int kg_split, int split) {
  const dim3 grid((n + WARPS * ROWS - 1) / (WARPS * ROWS), split);
  q4_gemv_kernel<XT, ST><<<grid, WARPS * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const XT*>(x.data_ptr()), q4.data_ptr<uint8_t>(), reinterpret_cast<const ST*>(scale.data_ptr()),
      out.data_ptr<float>(), n, kg, kg_split);
}

}  // namespace

torch::Tensor q4_gemv_partials(torch::Tensor x, torch::Tensor q4, torch::Tensor scale, int64_t split) {
  TORCH_CHECK(x.is_cuda() && q4.is_cuda() && scale.is_cuda(), "q4_gemv: tensors must be on CUDA");
  TORCH_CHECK(q4.dtype() == torch::kUInt8 && q4.dim() == 2 && q4.is_contiguous(), "q4_gemv: q4 must be uint8 [N, K/2]");
  const int n = q4.size(0), kg = q4.size(1) / 16;
  TORCH_CHECK(q4.size(1) % 16 == 0 && scale.dim() == 2 && scale.size(0) == n && scale.size(1) == kg &&
                  scale.is_contiguous(), "q4_gemv: scale must be [N, K/32] and contiguous");
  TORCH_CHECK(x.numel() == static_cast<int64_t>(kg) * 32, "q4_gemv: x is not one token of width K");
  TORCH_CHECK(split >= 1 && split <= kg, "q4_gemv: split out of range");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q4.data_ptr()) % 16 == 0, "q4_gemv: q4 must be 16-byte aligned");
  auto xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();
  const int kg_split = (kg + split - 1) / split;
  TORCH_CHECK((kg + kg_split - 1) / kg_split == split, "q4_gemv: a K slice would be empty");
  auto out = torch::empty({split, n}, x.options().dtype(torch::kFloat32));
  const bool s16 = scale.dtype() == torch::kFloat16;
  TORCH_CHECK(s16 || scale.dtype() == torch::kFloat32, "q4_gemv: scale must be fp16 or fp32");
  if (xc.dtype() == torch::kBFloat16) {
    s16 ? launch<__nv_bfloat16, __half>(xc, q4, scale, out, n, kg, kg_split, split)
        : launch<__nv_bfloat16, float>(xc, q4, scale, out, n, kg, kg_split, split);
  } else if (xc.dtype() == torch::kFloat16) {
    s16 ? launch<__half, __half>(xc, q4, scale, out, n, kg, kg_split, split)
        : launch<__half, float>(xc, q4, scale, out, n, kg, kg_split, split);
  } else {
    TORCH_CHECK(xc.dtype() == torch::kFloat32, "q4_gemv: x must be bf16, fp16 or fp32");
    s16 ? launch<float, __half>(xc, q4, scale, out, n, kg, kg_split, split)
        : launch<float, float>(xc, q4, scale, out, n, kg, kg_split, split);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_gemv_partials", &q4_gemv_partials, "one-token q4_0 GEMV: fp32 partial sums [split, N]");
}
