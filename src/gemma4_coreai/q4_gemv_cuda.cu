// One-token q4_0 GEMV for the CUDA fast path (kernels.py builds this on first use with nvcc and falls back to the
// Triton kernel where it cannot). Reads the bundle's packed layout as it is: row n is kg blocks of 16 bytes, byte j
// of a block holding column 2j (low nibble) and 2j+1 (high nibble) as q + 8; one fp16/fp32 scale per block.
//
// out[split, N] = fp32 partial sums of x . W[n] over `split` K slices (their sum is the product; the caller's
// next kernel adds them). Exact products and fp32 accumulation, like the stock dequantize + matmul in fp32.
// With the REDUCE flag (variant | 32) the kernel adds them itself: out[1, N], the last CTA of each row tile summing
// the slices in order (a self-resetting counter per tile), so no separate reduction kernel runs.
//
// Launch overlap (Hopper): kernels are launched with programmatic stream serialization when `set_pdl(true)` (only
// where this build has the sm_90 code). A GEMV then starts while the kernel before it drains: it prefetches its first
// weights into L2 (weights never depend on the previous kernel), waits (griddepcontrol.wait) before touching x, the
// counters or its output, and lets the next kernel launch once its main loop is done (when reducing, at its exit:
// the last CTA still reads the workspace). The tile counters are per device: reducing GEMVs must not run
// concurrently on two streams.
//
// Why it is shaped this way (H100/H200, batch 1, memory-bound): each lane owns one 32-block per step and loads it
// with one 16-byte load; a warp owns ROWS rows, so x is loaded and widened once per block for ROWS rows; every
// load of a step is issued before the first use (UNROLL blocks x ROWS rows in flight per lane). Nibbles become
// floats without the slow int->float unit: byte_perm puts a nibble under the exponent of 2^23, and subtracting
// 2^23 + 8 leaves q exactly.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <type_traits>

namespace {

constexpr int WARPS = 4;   // warps per CTA
// dynamic shared memory of the tensor-core kernel (its x slice), leaving room for the static `last` flag under the
// default 48 KB (kernels.py MMA_SMEM_LIMIT mirrors this)
constexpr size_t MMA_SMEM_LIMIT = 48 * 1024 - 128;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Programmatic dependent launch (sm_90+; no-ops elsewhere and when the kernel was launched without the attribute).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// The split-K epilogue. Without counters, out already holds this CTA's partial sums ([split, N]). With counters, the
// partials went to `part` and the last CTA (of gridDim.y) of row tile blockIdx.x adds them in slice order into
// out[row] for rows [row_begin, row_end) and resets the tile's counter for the next launch.
__device__ __forceinline__ void reduce_split(const float* part, float* out, int* counters, int n, int row_begin,
                                             int row_end) {
  if (counters == nullptr) return;
  __shared__ int last;
  __syncthreads();  // the CTA's partial stores, ordered before thread 0's fence (fences are cumulative)
  if (threadIdx.x == 0) {
    __threadfence();  // release: the partials reach the device before the count does
    last = atomicAdd(counters + blockIdx.x, 1) == static_cast<int>(gridDim.y) - 1;
    if (last) __threadfence();  // acquire: the other CTAs' partials are read after their counts
  }
  __syncthreads();
  if (!last) return;
  for (int row = row_begin + threadIdx.x; row < row_end; row += blockDim.x) {
    float v = 0.f;
    for (int y = 0; y < static_cast<int>(gridDim.y); ++y) v += __ldcg(part + static_cast<size_t>(y) * n + row);
    out[row] = v;
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// 32 activations of one block, widened to fp32. Plain L1-cached loads, not the read-only (__ldg) path: under PDL
// the kernel that writes x may still have been running when this one started.
__device__ __forceinline__ void load_x(const __nv_bfloat16* x, float* xf) {
  const uint4* p = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = __ldca(p + i);
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
    const uint4 v = __ldca(p + i);
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
    const float4 v = __ldca(p + i);
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

// READ_ONLY (benchmarks only): stream the same bytes with no arithmetic, to separate the memory side from the ALU.
template <typename XT, typename ST, int ROWS, int UNROLL, bool READ_ONLY>
__global__ void __launch_bounds__(WARPS * 32) q4_gemv_kernel(const XT* __restrict__ x, const uint8_t* __restrict__ w,
                                                            const ST* __restrict__ s, float* __restrict__ part,
                                                            float* __restrict__ out, int* __restrict__ counters,
                                                            int n, int kg, int kg_split) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
  const bool active = row0 < n;  // no early return: the split epilogue synchronises the CTA
  const int g_begin = blockIdx.y * kg_split;
  const int g_end = active ? min(g_begin + kg_split, kg) : g_begin;
  const uint4* wr[ROWS];
  const ST* sr[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(row0 + r, n - 1);  // a missing last row re-reads the one before; never stored
    wr[r] = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * kg * 16);
    sr[r] = s + static_cast<size_t>(row) * kg;
    for (int u = 0; u < UNROLL; ++u)
      if (g_begin + lane + 32 * u < g_end) prefetch_l2(wr[r] + g_begin + lane + 32 * u);
  }
  wait_for_previous_kernel();
  float acc[ROWS] = {};
  uint32_t bits = 0;
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
        if constexpr (READ_ONLY) {
#pragma unroll
          for (int r = 0; r < ROWS; ++r) bits ^= wv[u][r].x ^ wv[u][r].y ^ wv[u][r].z ^ wv[u][r].w ^ __float_as_uint(sc[u][r]);
        } else {
          float xf[32];
          load_x(x + static_cast<size_t>(gu) * 32, xf);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) acc[r] = fmaf(block_dot(wv[u][r], xf), sc[u][r], acc[r]);
        }
      }
    }
  }
  if (counters == nullptr) allow_next_kernel();  // reducing: the last CTA still reads `part`, which torch may reuse
  if constexpr (READ_ONLY) acc[0] = __uint_as_float(bits & 0x3F000000u);  // keeps the loads; a tiny positive number
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    if (lane == 0 && row0 + r < n) part[static_cast<size_t>(blockIdx.y) * n + row0 + r] = v;
  }
  const int tile = blockIdx.x * WARPS * ROWS;
  reduce_split(part, out, counters, n, tile, min(tile + WARPS * ROWS, n));
}

// ---- tensor-core variant: bf16 x, the "frag" layout (kernels.py `to_frag_layout`) ----
// One warp owns 16 rows; per 4-block chunk of K, lane (g = lane / 4, t = lane % 4) loads 16 bytes for row g and 16
// for row g + 8: word t of each of the 4 blocks (so the warp's two loads are 1 KB contiguous). Word t of a block
// holds columns 8t..8t+7; its nibbles become bf16 pairs (128 + u, magic exponent) minus 136 = q, exact, laid out as
// the A fragment of mma.m16n8k16 (k slots permuted; x is permuted to match as the B fragment, in every column).
// Each block's two mma steps start from zero, so its fp32 sum gets the block's scale: the same math as the CUDA-core
// kernel with the products summed by tensor cores instead of ~3 instructions per weight.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ uint32_t nib2bf16(uint32_t w, int shift) {  // nibbles at bits shift, shift+16 -> q pair
  const uint32_t v = ((w >> shift) & 0x000F000Fu) | 0x43004300u;      // bf16 (128 + u, 128 + u')
  uint32_t r;  // v * 1 - 136 = u - 8 = q, exact (fma.bf16x2: sm_80+, like the mma)
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3F803F80u), "r"(0xC308C308u));
  return r;
}

__device__ __forceinline__ void load_scales(const __half* p, float* f) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
}

__device__ __forceinline__ void load_scales(const float* p, float* f) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
}

template <typename ST, int UNROLL>
__global__ void __launch_bounds__(WARPS * 32) q4_gemv_mma_kernel(const __nv_bfloat16* __restrict__ x,
                                                                 const uint4* __restrict__ w,
                                                                 const ST* __restrict__ s, float* __restrict__ part,
                                                                 float* __restrict__ out, int* __restrict__ counters,
                                                                 int n, int nc, int nc_split) {
  extern __shared__ uint4 xs[];  // [chunks of this slice][block j][lane t]: 16 bytes = x[8t .. 8t + 7] of a block
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int grp = blockIdx.x * WARPS + (threadIdx.x >> 5);  // 16-row group
  const bool active = grp * 16 < n;  // no early return: the CTA synchronises below
  const int c_begin = blockIdx.y * nc_split;
  const int c_end = min(c_begin + nc_split, nc);
  const uint4* wg = w + static_cast<size_t>(min(grp, n / 16 - 1)) * nc * 64 + lane;  // + (c * 2 + h) * 32
  const ST* sg = s + static_cast<size_t>(min(grp, n / 16 - 1)) * nc * 64 + g * 4;   // + (c * 2 + h) * 32
  // Before waiting on the previous kernel: the first two chunks of weights into L2 (they do not depend on it).
  for (int c = c_begin; c < min(c_begin + 2, c_end); ++c) {
    prefetch_l2(wg + c * 64);
    prefetch_l2(wg + c * 64 + 32);
  }
  wait_for_previous_kernel();
  // The CTA's K slice of x goes to shared memory first: the main loop then waits on one global load per chunk
  // (the weights) instead of a weight load followed by a dependent x load.
  const uint4* xg = reinterpret_cast<const uint4*>(x) + static_cast<size_t>(c_begin) * 16;
  for (int i = threadIdx.x; i < (c_end - c_begin) * 16; i += WARPS * 32) xs[i] = __ldca(xg + i);
  __syncthreads();
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  float acc0 = 0.f, acc1 = 0.f;
  for (int c = c_begin; active && c < c_end; c += UNROLL) {
    uint4 wa[UNROLL], wb[UNROLL];
    float sa[UNROLL][4], sb[UNROLL][4];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (c + u < c_end) {
        wa[u] = __ldcs(wg + (c + u) * 64);
        wb[u] = __ldcs(wg + (c + u) * 64 + 32);
        load_scales(sg + (c + u) * 64, sa[u]);
        load_scales(sg + (c + u) * 64 + 32, sb[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (c + u < c_end) {
        const uint32_t ra[4] = {wa[u].x, wa[u].y, wa[u].z, wa[u].w}, rb[4] = {wb[u].x, wb[u].y, wb[u].z, wb[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint4 xx = xs[((c + u - c_begin) * 4 + j) * 4 + t];  // x[8t .. 8t + 7] of block 4c + j
          const uint32_t b0 = __byte_perm(xx.x, xx.z, 0x5410), b1 = __byte_perm(xx.x, xx.z, 0x7632);
          const uint32_t b2 = __byte_perm(xx.y, xx.w, 0x5410), b3 = __byte_perm(xx.y, xx.w, 0x7632);
          const uint32_t a0[4] = {nib2bf16(ra[j], 0), nib2bf16(rb[j], 0), nib2bf16(ra[j], 4), nib2bf16(rb[j], 4)};
          const uint32_t a1[4] = {nib2bf16(ra[j], 8), nib2bf16(rb[j], 8), nib2bf16(ra[j], 12), nib2bf16(rb[j], 12)};
          float d[4];
          mma_bf16(d, a0, b0, b1, zero);
          mma_bf16(d, a1, b2, b3, d);
          acc0 = fmaf(d[0], sa[u][j], acc0);  // row g (every column holds the same sum)
          acc1 = fmaf(d[2], sb[u][j], acc1);  // row g + 8
        }
      }
    }
  }
  if (counters == nullptr) allow_next_kernel();  // reducing: the last CTA still reads `part`, which torch may reuse
  if (t == 0 && active) {
    part[static_cast<size_t>(blockIdx.y) * n + grp * 16 + g] = acc0;
    part[static_cast<size_t>(blockIdx.y) * n + grp * 16 + g + 8] = acc1;
  }
  const int tile = blockIdx.x * WARPS * 16;
  reduce_split(part, out, counters, n, tile, min(tile + WARPS * 16, n));
}

// ---- dequantize for prefill: W [N, K] = q * s in OT, one rounding of the exact product (= q4_dequant_ref) ----
// One thread per 16 bytes of weights: 32 outputs written with 16-byte stores. Packed layout: one block of one row,
// 64 contiguous output bytes. Frag layout: word t of 4 blocks of one row, 8 contiguous outputs in each block.
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16*, float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(__half*, float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename OT>
__device__ __forceinline__ void store8(OT* o, const float* v) {  // 8 outputs, two or one 16-byte stores
  if constexpr (std::is_same_v<OT, float>) {
    reinterpret_cast<float4*>(o)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(o)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    *reinterpret_cast<uint4*>(o) = make_uint4(pack2(o, v[0], v[1]), pack2(o, v[2], v[3]), pack2(o, v[4], v[5]),
                                              pack2(o, v[6], v[7]));
  }
}

// word w (bytes 4i..4i+3 of a block: columns 8i..8i+7) -> 8 values q * s in column order
__device__ __forceinline__ void dequant_word(uint32_t w, float s, float* v) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    v[2 * b] = (static_cast<float>((w >> (8 * b)) & 15u) - 8.f) * s;
    v[2 * b + 1] = (static_cast<float>((w >> (8 * b + 4)) & 15u) - 8.f) * s;
  }
}

template <typename OT, typename ST, bool FRAG>
__global__ void q4_dequant_kernel(const uint4* __restrict__ w, const ST* __restrict__ s, OT* __restrict__ out,
                                  int n, int kg) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // 16-byte unit
  if (i >= static_cast<size_t>(n) * kg) return;
  const uint4 v = __ldcs(w + i);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  const size_t k = static_cast<size_t>(kg) * 32;
  float vals[8];
  if constexpr (!FRAG) {
    const float sc = to_float(s[i]);
    OT* o = out + (i / kg) * k + (i % kg) * 32;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      dequant_word(words[t], sc, vals);
      store8(o + 8 * t, vals);
    }
  } else {
    const int nc = kg / 4, lane = i % 32, h = (i / 32) % 2, c = (i / 64) % nc, g = lane >> 2, t = lane & 3;
    const size_t grp = i / (64 * static_cast<size_t>(nc));
    const size_t row = grp * 16 + h * 8 + g;
    const ST* sp = s + (i / 32) * 32 + g * 4;  // the 4 scales of this row's chunk
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      dequant_word(words[j], to_float(sp[j]), vals);
      store8(out + row * k + (4 * c + j) * 32 + 8 * t, vals);
    }
  }
}

template <typename OT, typename ST>
void launch_dequant(const torch::Tensor& q4, const torch::Tensor& scale, torch::Tensor& out, bool frag) {
  const int n = q4.size(0), kg = q4.size(1) / 16;
  const size_t units = static_cast<size_t>(n) * kg;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((units + threads - 1) / threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  const uint4* w = reinterpret_cast<const uint4*>(q4.data_ptr());
  const ST* sc = reinterpret_cast<const ST*>(scale.data_ptr());
  OT* o = reinterpret_cast<OT*>(out.data_ptr());
  if (frag) q4_dequant_kernel<OT, ST, true><<<blocks, threads, 0, stream>>>(w, sc, o, n, kg);
  else q4_dequant_kernel<OT, ST, false><<<blocks, threads, 0, stream>>>(w, sc, o, n, kg);
}

bool g_pdl = false;  // launch the GEMVs with programmatic stream serialization (set_pdl)

int* tile_counters(int tiles);

// Where a GEMV writes: partial sums [split, N], and with `reduce` their sum [1, N] (else out == part).
struct Dest {
  float* part;
  float* out;
  bool reduce;
};

template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, dim3 grid, size_t smem, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(WARPS * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = g_pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

template <typename XT, typename ST, int ROWS, int UNROLL, bool READ_ONLY = false>
void launch(const torch::Tensor& x, const torch::Tensor& q4, const torch::Tensor& scale, const Dest& d, int n,
            int kg, int kg_split, int split) {
  const dim3 grid((n + WARPS * ROWS - 1) / (WARPS * ROWS), split);
  launch_kernel(q4_gemv_kernel<XT, ST, ROWS, UNROLL, READ_ONLY>, grid, 0, reinterpret_cast<const XT*>(x.data_ptr()),
                static_cast<const uint8_t*>(q4.data_ptr()), reinterpret_cast<const ST*>(scale.data_ptr()), d.part,
                d.out, d.reduce ? tile_counters(grid.x) : nullptr, n, kg, kg_split);
}

template <typename ST, int UNROLL>
void launch_mma(const torch::Tensor& x, const torch::Tensor& q4, const torch::Tensor& scale, const Dest& d, int n,
                int kg, int split) {
  const int nc = kg / 4, nc_split = (nc + split - 1) / split;
  TORCH_CHECK((nc + nc_split - 1) / nc_split == split, "q4_gemv: a K slice would be empty");
  const dim3 grid((n / 16 + WARPS - 1) / WARPS, split);
  const size_t smem = static_cast<size_t>(nc_split) * 256;  // the slice of x, bf16
  TORCH_CHECK(smem <= MMA_SMEM_LIMIT, "q4_gemv: K slice too long for the tensor-core variant (use more K splits)");
  launch_kernel(q4_gemv_mma_kernel<ST, UNROLL>, grid, smem, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
                reinterpret_cast<const uint4*>(q4.data_ptr()), reinterpret_cast<const ST*>(scale.data_ptr()), d.part,
                d.out, d.reduce ? tile_counters(grid.x) : nullptr, n, nc, nc_split);
}

// One counter per row tile, per device, zeroed once; each reducing launch leaves its counters at zero again. Kernels
// on one stream run one after another, so launches share them; allocated outside CUDA-graph capture (the fast path
// runs every GEMV eagerly before capturing).
constexpr int MAX_TILES = 1 << 17;
int* tile_counters(int tiles) {
  static int* buf[64] = {};
  TORCH_CHECK(tiles <= MAX_TILES, "q4_gemv: ", tiles, " row tiles exceed the reduction's ", MAX_TILES);
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  TORCH_CHECK(dev < 64, "q4_gemv: device index out of range");
  if (buf[dev] == nullptr) {
    cudaStreamCaptureStatus status;
    C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status));
    TORCH_CHECK(status == cudaStreamCaptureStatusNone,
                "q4_gemv: run a reducing GEMV once before CUDA-graph capture (its counters are allocated then)");
    C10_CUDA_CHECK(cudaMalloc(&buf[dev], MAX_TILES * sizeof(int)));
    C10_CUDA_CHECK(cudaMemset(buf[dev], 0, MAX_TILES * sizeof(int)));
    C10_CUDA_CHECK(cudaDeviceSynchronize());
  }
  return buf[dev];
}

// Kernel variants by id (kernels.py GEMV_VARIANTS mirrors this list): 0 = the default CUDA-core kernel (2 rows per
// warp, 2 blocks in flight per lane; every x/scale dtype); 1-7 = other rows/unroll shapes (bf16 x, fp16 scales);
// 8 = read-only probe (benchmarks); 16-18 = tensor cores, frag layout, 1/2/4 chunks in flight (bf16 x).
// Flag 32 (REDUCE): sum the K slices in the kernel, out [1, N].
template <typename ST>
bool launch_variant(int variant, const torch::Tensor& x, const torch::Tensor& q4, const torch::Tensor& scale,
                    const Dest& out, int n, int kg, int kg_split, int split) {
  using B = __nv_bfloat16;
  switch (variant) {
    case 1: launch<B, ST, 1, 2>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 2: launch<B, ST, 1, 4>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 3: launch<B, ST, 2, 1>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 4: launch<B, ST, 2, 3>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 5: launch<B, ST, 2, 4>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 6: launch<B, ST, 4, 1>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 7: launch<B, ST, 4, 2>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 8: launch<B, ST, 2, 2, true>(x, q4, scale, out, n, kg, kg_split, split); return true;
    case 16: launch_mma<ST, 1>(x, q4, scale, out, n, kg, split); return true;
    case 17: launch_mma<ST, 2>(x, q4, scale, out, n, kg, split); return true;
    case 18: launch_mma<ST, 4>(x, q4, scale, out, n, kg, split); return true;
    default: return false;
  }
}

}  // namespace

torch::Tensor q4_gemv_partials(torch::Tensor x, torch::Tensor q4, torch::Tensor scale, int64_t split,
                               int64_t variant) {
  TORCH_CHECK(x.is_cuda() && q4.is_cuda() && scale.is_cuda(), "q4_gemv: tensors must be on CUDA");
  const c10::cuda::CUDAGuard guard(q4.device());
  TORCH_CHECK(q4.dtype() == torch::kUInt8 && q4.dim() == 2 && q4.is_contiguous(), "q4_gemv: q4 must be uint8 [N, K/2]");
  const int n = q4.size(0), kg = q4.size(1) / 16;
  TORCH_CHECK(q4.size(1) % 16 == 0 && scale.dim() == 2 && scale.size(0) == n && scale.size(1) == kg &&
                  scale.is_contiguous(), "q4_gemv: scale must be [N, K/32] and contiguous");
  TORCH_CHECK(x.numel() == static_cast<int64_t>(kg) * 32, "q4_gemv: x is not one token of width K");
  TORCH_CHECK(split >= 1 && split <= kg, "q4_gemv: split out of range");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q4.data_ptr()) % 16 == 0, "q4_gemv: q4 must be 16-byte aligned");
  const bool reduce = variant & 32;
  variant &= ~int64_t{32};
  auto xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();
  const int kg_split = (kg + split - 1) / split;
  TORCH_CHECK((kg + kg_split - 1) / kg_split == split, "q4_gemv: a K slice would be empty");
  auto part = torch::empty({split, n}, x.options().dtype(torch::kFloat32));
  torch::Tensor out = reduce && split > 1 ? torch::empty({1, n}, x.options().dtype(torch::kFloat32)) : part;
  const Dest d{part.data_ptr<float>(), out.data_ptr<float>(), reduce && split > 1};
  const bool s16 = scale.dtype() == torch::kFloat16;
  TORCH_CHECK(s16 || scale.dtype() == torch::kFloat32, "q4_gemv: scale must be fp16 or fp32");
  if (variant != 0) {
    TORCH_CHECK(xc.dtype() == torch::kBFloat16, "q4_gemv: kernel variant ", variant, " needs bf16 x");
    if (variant >= 16)
      TORCH_CHECK(n % 16 == 0 && kg % 4 == 0, "q4_gemv: the tensor-core variants need N % 16 == 0 and K % 128 == 0");
    const bool ok = s16 ? launch_variant<__half>(variant, xc, q4, scale, d, n, kg, kg_split, split)
                        : launch_variant<float>(variant, xc, q4, scale, d, n, kg, kg_split, split);
    TORCH_CHECK(ok, "q4_gemv: unknown kernel variant ", variant);
  } else if (xc.dtype() == torch::kBFloat16) {
    s16 ? launch<__nv_bfloat16, __half, 2, 2>(xc, q4, scale, d, n, kg, kg_split, split)
        : launch<__nv_bfloat16, float, 2, 2>(xc, q4, scale, d, n, kg, kg_split, split);
  } else if (xc.dtype() == torch::kFloat16) {
    s16 ? launch<__half, __half, 2, 2>(xc, q4, scale, d, n, kg, kg_split, split)
        : launch<__half, float, 2, 2>(xc, q4, scale, d, n, kg, kg_split, split);
  } else {
    TORCH_CHECK(xc.dtype() == torch::kFloat32, "q4_gemv: x must be bf16, fp16 or fp32");
    s16 ? launch<float, __half, 2, 2>(xc, q4, scale, d, n, kg, kg_split, split)
        : launch<float, float, 2, 2>(xc, q4, scale, d, n, kg, kg_split, split);
  }
  return out;
}

// PDL needs the kernels' griddepcontrol.wait, compiled only into sm_90+ code: refuse where this build lacks it.
bool set_pdl(bool on) {
  g_pdl = false;
  if (!on) return false;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, q4_gemv_mma_kernel<__half, 1>));
  g_pdl = attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
  return g_pdl;
}

torch::Tensor q4_dequant(torch::Tensor q4, torch::Tensor scale, torch::ScalarType dtype, bool frag) {
  TORCH_CHECK(q4.is_cuda() && scale.is_cuda(), "q4_dequant: tensors must be on CUDA");
  const c10::cuda::CUDAGuard guard(q4.device());
  TORCH_CHECK(q4.dtype() == torch::kUInt8 && q4.dim() == 2 && q4.is_contiguous() && q4.size(1) % 16 == 0,
              "q4_dequant: q4 must be contiguous uint8 [N, K/2]");
  const int n = q4.size(0), kg = q4.size(1) / 16;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == kg && scale.is_contiguous(),
              "q4_dequant: scale must be [N, K/32] and contiguous");
  TORCH_CHECK(!frag || (n % 16 == 0 && kg % 4 == 0), "q4_dequant: frag layout needs N % 16 == 0 and K % 128 == 0");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q4.data_ptr()) % 16 == 0, "q4_dequant: q4 must be 16-byte aligned");
  auto out = torch::empty({n, static_cast<int64_t>(kg) * 32}, q4.options().dtype(dtype));
  const bool s16 = scale.dtype() == torch::kFloat16;
  TORCH_CHECK(s16 || scale.dtype() == torch::kFloat32, "q4_dequant: scale must be fp16 or fp32");
  if (n == 0 || kg == 0) return out;
  if (dtype == torch::kBFloat16) {
    s16 ? launch_dequant<__nv_bfloat16, __half>(q4, scale, out, frag)
        : launch_dequant<__nv_bfloat16, float>(q4, scale, out, frag);
  } else if (dtype == torch::kFloat16) {
    s16 ? launch_dequant<__half, __half>(q4, scale, out, frag) : launch_dequant<__half, float>(q4, scale, out, frag);
  } else {
    TORCH_CHECK(dtype == torch::kFloat32, "q4_dequant: dtype must be bf16, fp16 or fp32");
    s16 ? launch_dequant<float, __half>(q4, scale, out, frag) : launch_dequant<float, float>(q4, scale, out, frag);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_gemv_partials", &q4_gemv_partials, "one-token q4_0 GEMV: fp32 partial sums [split, N] ([1, N] with variant flag 32)",
        py::arg("x"), py::arg("q4"), py::arg("scale"), py::arg("split"), py::arg("variant") = 0);
  m.def("set_pdl", &set_pdl, "launch the GEMVs with programmatic dependent launch (sm_90 builds); returns whether it is on",
        py::arg("on"));
  m.def("q4_dequant", &q4_dequant, "q4_0 -> W [N, K] (packed or frag layout)", py::arg("q4"), py::arg("scale"),
        py::arg("dtype"), py::arg("frag") = false);
}
