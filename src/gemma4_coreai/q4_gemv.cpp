// CPU q4_0 matmul kernels (AVX2 + FMA + F16C) for the bundle's packed layout, built by cpu_kernels.py.
//
// Weights stay exactly as the bundle stores them (docs/INTERNALS.md): q4 uint8 [N, K/2], column 2j in the low
// nibble of byte j and 2j+1 in the high nibble, stored as u = q + 8; scale [N, K/32] fp16 (or fp32). One block of
// 32 weights is 16 contiguous bytes. Unpacking a block gives [u(even columns) | u(odd columns)] in one 256-bit
// register, so the activations are reordered per block the same way (even columns, then odd) when they are
// prepared, once per call.
//
// q8 (approximate, like llama.cpp's q4_0 x q8_0): activations quantized per 32-block to int8 with scale
// dx = max|x| / 127. Per block, _mm256_maddubs_epi16(u, xq) (u unsigned 0..15, xq signed: no sign tricks
// needed, no saturation: 2 * 15 * 127 < 32767) and _mm256_madd_epi16 give the integer dot sum(u * xq); the
// "+8" offset is removed with the precomputed per-block term -8 * dx * sum(xq), folded in once per 8 blocks
// with one FMA against the 8 weight scales. y = sum_b dw_b * dx_b * (sum u*xq - 8 sum xq).
//
// f32 (exact activations): nibbles -> int8 (u - 8) -> fp32 in registers, FMA with the fp32 activations
// (reordered), block sum scaled by dw. Same function as the stock dequantize + F.linear up to fp32
// summation order.
//
// Both are tiled RM tokens x RN rows (weights unpacked once per tile and reused across tokens) and parallelised
// over output rows with at::parallel_for.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename ST> inline __m256 load8_scales(const ST* p);
template <> inline __m256 load8_scales<uint16_t>(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m256 load8_scales<float>(const float* p) { return _mm256_loadu_ps(p); }
template <typename ST> inline float load1_scale(const ST* p);
template <> inline float load1_scale<uint16_t>(const uint16_t* p) { return _cvtsh_ss(*p); }
template <> inline float load1_scale<float>(const float* p) { return *p; }

// 16 packed bytes -> 32 unsigned nibbles [low nibbles (even columns) | high nibbles (odd columns)].
inline __m256i unpack_block(const uint8_t* p) {
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i v = _mm256_set_m128i(_mm_srli_epi16(w, 4), w);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// ---- q8 activations ----------------------------------------------------------------------------------------

// x [M, K] fp32 -> xq [M, K] int8 (block-reordered), xd [M, nb] (dx), xs [M, nb] (-8 * dx * sum(xq)).
void quantize_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xs) {
  const int64_t nb = K / 32;
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xb = x + (i / nb) * K + (i % nb) * 32;
      int8_t* qb = xq + (i / nb) * K + (i % nb) * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int j = 0; j < 16; ++j) {
        const int a = static_cast<int>(std::nearbyint(xb[2 * j] * id));
        const int b = static_cast<int>(std::nearbyint(xb[2 * j + 1] * id));
        qb[j] = static_cast<int8_t>(a);
        qb[16 + j] = static_cast<int8_t>(b);
        sum += a + b;
      }
      xd[i] = d;
      xs[i] = -8.f * d * static_cast<float>(sum);
    }
  });
}

#ifndef G4_PF
#define G4_PF 1
#endif
constexpr int PF = G4_PF;

template <int RM, int RN, typename ST>
inline void tile_q8(const uint8_t* W, const ST* S, int64_t K, const int8_t* XQ, const float* XD, const float* XS,
                    float* Y, int64_t ldy) {
  const int64_t nb = K / 32, kb = K / 2;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RM][RN];
  float tail[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) { acc[m][r] = _mm256_setzero_ps(); tail[m][r] = 0.f; }
  alignas(32) float dwx[RM][RN][8];
  int64_t b0 = 0;
  for (; b0 + 8 <= nb; b0 += 8) {
    __m256 sw[RN];
    for (int r = 0; r < RN; ++r) {
      // Software prefetch of the tile PF tiles ahead (the same rows' bytes there: two lines per 8 blocks, and
      // their scales). Without it one core keeps too few misses in flight: 7 GB/s per core from DRAM; with it
      // the two cores reach ~20 GB/s (benchmarks/NOTES.md).
      const char* pw = reinterpret_cast<const char*>(W + (PF * RN + r) * kb + b0 * 16);
      _mm_prefetch(pw, _MM_HINT_T0);
      _mm_prefetch(pw + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(S + (PF * RN + r) * nb + b0), _MM_HINT_T0);
      sw[r] = load8_scales<ST>(S + r * nb + b0);
    }
    for (int m = 0; m < RM; ++m) {
      const __m256 xd = _mm256_loadu_ps(XD + m * nb + b0);
      const __m256 xs = _mm256_loadu_ps(XS + m * nb + b0);
      for (int r = 0; r < RN; ++r) {
        _mm256_store_ps(dwx[m][r], _mm256_mul_ps(sw[r], xd));
        acc[m][r] = _mm256_fmadd_ps(sw[r], xs, acc[m][r]);
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const int64_t b = b0 + j;
      __m256i wv[RN];
      for (int r = 0; r < RN; ++r) wv[r] = unpack_block(W + r * kb + b * 16);
      for (int m = 0; m < RM; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQ + m * K + b * 32));
        for (int r = 0; r < RN; ++r) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv[r], xv), ones);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&dwx[m][r][j]), acc[m][r]);
        }
      }
    }
  }
  for (int64_t b = b0; b < nb; ++b) {  // fewer than 8 blocks left
    for (int r = 0; r < RN; ++r) {
      const float dw = load1_scale<ST>(S + r * nb + b);
      const __m256i wv = unpack_block(W + r * kb + b * 16);
      for (int m = 0; m < RM; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQ + m * K + b * 32));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * XD[m * nb + b]), acc[m][r]);
        tail[m][r] += dw * XS[m * nb + b];
      }
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) Y[m * ldy + r] = hsum(acc[m][r]) + tail[m][r];
}

// ---- f32 activations ---------------------------------------------------------------------------------------

// x [M, K] -> xp [M, K], each 32-block reordered to [even columns | odd columns].
void reorder_f32(const float* x, int64_t M, int64_t K, float* xp) {
  at::parallel_for(0, M * (K / 32), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xb = x + i * 32;
      float* pb = xp + i * 32;
      for (int j = 0; j < 16; ++j) { pb[j] = xb[2 * j]; pb[16 + j] = xb[2 * j + 1]; }
    }
  });
}

template <int RM, int RN, typename ST>
inline void tile_f32(const uint8_t* W, const ST* S, int64_t K, const float* XP, float* Y, int64_t ldy) {
  const int64_t nb = K / 32, kb = K / 2;
  const __m128i m4 = _mm_set1_epi8(0x0F), e8 = _mm_set1_epi8(8);
  __m256 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 wf[RN][4];
    for (int r = 0; r < RN; ++r) {
      const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(W + r * kb + b * 16));
      const __m128i lo = _mm_sub_epi8(_mm_and_si128(w, m4), e8);
      const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(w, 4), m4), e8);
      const __m256 dw = _mm256_set1_ps(load1_scale<ST>(S + r * nb + b));
      wf[r][0] = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
      wf[r][1] = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
      wf[r][2] = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
      wf[r][3] = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
    }
    for (int m = 0; m < RM; ++m) {
      const float* xb = XP + m * K + b * 32;
      const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
      const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
      for (int r = 0; r < RN; ++r) {
        __m256 a = _mm256_fmadd_ps(wf[r][0], x0, acc[m][r]);
        a = _mm256_fmadd_ps(wf[r][1], x1, a);
        a = _mm256_fmadd_ps(wf[r][2], x2, a);
        acc[m][r] = _mm256_fmadd_ps(wf[r][3], x3, a);
      }
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) Y[m * ldy + r] = hsum(acc[m][r]);
}


// ---- look-ahead of the next weight into the shared L3 (decode) ---------------------------------------------
//
// Between two linears the eager torch ops of a decode step (norms, attention, activations: ~30 ms of an E4B
// token) run on one core while the memory bus idles. The calls come in the same order every step, so each call
// records which weight followed the previous one; after a one-token product, a helper thread touches the first
// `g_ahead` bytes of the weight that came next last time (and its scales), on the otherwise idle core, so the
// next product reads that part from L3 instead of DRAM. Every call bumps a generation counter first, which
// stops the helper within a few cache lines. g_ahead = 0 turns it off.

struct Span { const char* p; int64_t n; };
struct Next { Span w, s; };

std::atomic<int64_t> g_ahead{0};  // off: measured slower (NOTES.md), kept as a knob
std::atomic<uint64_t> g_gen{0};
std::mutex g_mu;
std::condition_variable g_cv;
Next g_job{};
uint64_t g_job_gen = 0;
bool g_have_job = false;
std::unordered_map<const void*, Next> g_next;
const void* g_last = nullptr;

void helper_loop() {
  for (;;) {
    Next job; uint64_t gen;
    {
      std::unique_lock<std::mutex> lk(g_mu);
      g_cv.wait(lk, [] { return g_have_job; });
      job = g_job; gen = g_job_gen; g_have_job = false;
    }
    const int64_t budget = g_ahead.load(std::memory_order_relaxed);
    for (const Span& sp : {job.s, job.w}) {
      const int64_t n = std::min(sp.n, budget);
      volatile char sink = 0;
      for (int64_t off = 0; off < n; off += 64) {
        if ((off & 4095) == 0 && g_gen.load(std::memory_order_relaxed) != gen) break;
        sink = sink + sp.p[off];
      }
      if (g_gen.load(std::memory_order_relaxed) != gen) break;
    }
  }
}

// Called at the start of every product: stop the helper, learn "w follows the previous weight".
void on_call_start(const void* w, const Span& ws, const Span& ss) {
  g_gen.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_last != nullptr && g_last != w) g_next[g_last] = Next{ws, ss};
  g_last = w;
}

// Called at the end of a one-token product: start touching the weight that followed this one last time.
void on_call_end(const void* w) {
  if (g_ahead.load(std::memory_order_relaxed) <= 0) return;
  static std::once_flag once;
  std::call_once(once, [] { std::thread(helper_loop).detach(); });
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_next.find(w);
  if (it == g_next.end()) return;
  g_job = it->second;
  g_job_gen = g_gen.load(std::memory_order_relaxed);
  g_have_job = true;
  g_cv.notify_one();
}

// ---- drivers -----------------------------------------------------------------------------------------------

#ifndef G4_RN1
#define G4_RN1 2
#endif
constexpr int RN1 = G4_RN1;  // rows per tile when M == 1 (decode)
constexpr int RMT = 4;  // tokens per tile when M > 1 (prefill)
constexpr int RNT = 2;  // rows per tile when M > 1

template <typename Tile>
void drive(int64_t M, int64_t N, int64_t K, const Tile& tile) {
  // tile(m0, n0, rm, rn): rm in 1..RMT (or 1), rn in 1..RN.
  const int rn_full = M == 1 ? RN1 : RNT;
  const int64_t ntiles = (N + rn_full - 1) / rn_full;
  // Split only where each chunk gets at least ~256K multiply-adds (~10 us): smaller is not worth a thread wake-up.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (rn_full * K * M));
  at::parallel_for(0, ntiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * rn_full;
      const int rn = static_cast<int>(std::min<int64_t>(rn_full, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += RMT) {
        const int rm = static_cast<int>(std::min<int64_t>(M == 1 ? 1 : RMT, M - m0));
        tile(m0, n0, rm, rn);
      }
    }
  });
}

template <typename Fn>
inline void dispatch(int rm, int rn, const Fn& fn) {
  switch (rm * 16 + rn) {
    case 1 * 16 + 1: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{}); break;
    case 1 * 16 + 2: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 2>{}); break;
    case 1 * 16 + 3: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 3>{}); break;
    case 1 * 16 + 4: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 4>{}); break;
#if G4_RN1 > 4
    case 1 * 16 + 5: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 5>{}); break;
    case 1 * 16 + 6: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 6>{}); break;
    case 1 * 16 + 7: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 7>{}); break;
    case 1 * 16 + 8: fn(std::integral_constant<int, 1>{}, std::integral_constant<int, 8>{}); break;
#endif
    case 2 * 16 + 1: fn(std::integral_constant<int, 2>{}, std::integral_constant<int, 1>{}); break;
    case 2 * 16 + 2: fn(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{}); break;
    case 3 * 16 + 1: fn(std::integral_constant<int, 3>{}, std::integral_constant<int, 1>{}); break;
    case 3 * 16 + 2: fn(std::integral_constant<int, 3>{}, std::integral_constant<int, 2>{}); break;
    case 4 * 16 + 1: fn(std::integral_constant<int, 4>{}, std::integral_constant<int, 1>{}); break;
    case 4 * 16 + 2: fn(std::integral_constant<int, 4>{}, std::integral_constant<int, 2>{}); break;
    default: TORCH_CHECK(false, "q4 tile ", rm, "x", rn, " not instantiated");
  }
}

void check_args(const torch::Tensor& x, const torch::Tensor& q4, const torch::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && q4.device().is_cpu() && scale.device().is_cpu(), "q4_mm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "q4_mm: x must be fp32 [M, K]");
  TORCH_CHECK(q4.dim() == 2 && q4.scalar_type() == torch::kUInt8 && q4.is_contiguous(), "q4_mm: q4 must be uint8 [N, K/2]");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 32 == 0 && q4.size(1) * 2 == K, "q4_mm: K must be a multiple of 32 and match q4");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == q4.size(0) && scale.size(1) == K / 32 && scale.is_contiguous(),
              "q4_mm: scale must be [N, K/32]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 || scale.scalar_type() == torch::kFloat32,
              "q4_mm: scale must be fp16 or fp32");
}

template <typename ST>
void run_q8(const torch::Tensor& x, const torch::Tensor& q4, const ST* S, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = q4.size(0), nb = K / 32;
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto xd = torch::empty({M, nb}, x.options());
  auto xs = torch::empty({M, nb}, x.options());
  quantize_q8(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
  const uint8_t* W = q4.data_ptr<uint8_t>();
  const int8_t* XQ = xq.data_ptr<int8_t>();
  const float *XD = xd.data_ptr<float>(), *XS = xs.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  drive(M, N, K, [&](int64_t m0, int64_t n0, int rm, int rn) {
    dispatch(rm, rn, [&](auto RM, auto RN) {
      tile_q8<decltype(RM)::value, decltype(RN)::value, ST>(W + n0 * (K / 2), S + n0 * nb, K, XQ + m0 * K,
                                                             XD + m0 * nb, XS + m0 * nb, Y + m0 * N + n0, N);
    });
  });
}

template <typename ST>
void run_f32(const torch::Tensor& x, const torch::Tensor& q4, const ST* S, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = q4.size(0), nb = K / 32;
  auto xp = torch::empty({M, K}, x.options());
  reorder_f32(x.data_ptr<float>(), M, K, xp.data_ptr<float>());
  const uint8_t* W = q4.data_ptr<uint8_t>();
  const float* XP = xp.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  drive(M, N, K, [&](int64_t m0, int64_t n0, int rm, int rn) {
    dispatch(rm, rn, [&](auto RM, auto RN) {
      tile_f32<decltype(RM)::value, decltype(RN)::value, ST>(W + n0 * (K / 2), S + n0 * nb, K, XP + m0 * K,
                                                              Y + m0 * N + n0, N);
    });
  });
}

}  // namespace

// y [M, N] fp32 = x [M, K] fp32 @ W.T; mode 0: q8 activations (approximate), 1: fp32 activations.
torch::Tensor q4_mm(torch::Tensor x, torch::Tensor q4, torch::Tensor scale, int64_t mode) {
  check_args(x, q4, scale);
  auto y = torch::empty({x.size(0), q4.size(0)}, x.options());
  const bool f16 = scale.scalar_type() == torch::kFloat16;
  const void* wkey = q4.data_ptr();
  const bool ahead = g_ahead.load(std::memory_order_relaxed) > 0;
  if (ahead)
    on_call_start(wkey, Span{static_cast<const char*>(wkey), q4.numel()},
                  Span{static_cast<const char*>(scale.data_ptr()), scale.numel() * scale.element_size()});
  const uint16_t* s16 = f16 ? reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()) : nullptr;
  const float* s32 = f16 ? nullptr : scale.data_ptr<float>();
  if (mode == 0) {
    if (f16) run_q8<uint16_t>(x, q4, s16, y); else run_q8<float>(x, q4, s32, y);
  } else {
    if (f16) run_f32<uint16_t>(x, q4, s16, y); else run_f32<float>(x, q4, s32, y);
  }
  if (ahead && x.size(0) == 1) on_call_end(wkey);
  return y;
}

// Bytes of the next weight the helper touches ahead of time (0: off); returns the previous value.
int64_t set_lookahead(int64_t nbytes) { return g_ahead.exchange(nbytes); }

// The same product as a dispatcher op, torch.ops.gemma4_cpu.q4_mm (its fake implementation is in cpu_kernels.py):
// torch.compile keeps it opaque and fuses everything around it.
TORCH_LIBRARY(gemma4_cpu, m) { m.def("q4_mm(Tensor x, Tensor q4, Tensor scale, int mode) -> Tensor"); }
TORCH_LIBRARY_IMPL(gemma4_cpu, CPU, m) { m.impl("q4_mm", &q4_mm); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_lookahead", &set_lookahead, "bytes of the next weight touched ahead by the helper thread (0: off)");
  m.def("q4_mm", &q4_mm, "q4_0 matmul: y = x @ W.T (mode 0: q8 activations, 1: fp32 activations)");
}
