// Winograd F(4x4, 3x3) for the inference graph's head: the decoder's first conv and the three DDM query convs,
// all reading the two encoders' features (Lavin & Gray, 2016). Per band of tiles, on one core: the input transform
// (Bt d B) of every 6x6 block, one (tiles x 64) @ (64 x 176) product per position and branch, and the output
// transform (At m A) fused with the biases, LeakyReLU and the branch sum, written straight to the outputs.
// Transforms and accumulation are fp32 whatever the features' type; the products are fp32 (ATen/MKL) or, for bf16,
// bf16 operands with fp32 accumulation (ATen's brgemm micro-kernel: AMX or AVX-512 BF16).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace {

constexpr int K = 6;        // input block side
constexpr int P = K * K;    // transform positions
constexpr int CIN = 64;     // encoder feature channels per branch

// y[i] = sum_a Bt[i][a] x[a] for the six rows of F(4,3)'s Bt, on n contiguous floats each.
inline void input_rows(const float* const x[K], float* const y[K], int n) {
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5];
  float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3], *y4 = y[4], *y5 = y[5];
#pragma omp simd
  for (int c = 0; c < n; ++c) {
    const float a = x4[c] - 4.f * x2[c], b = x3[c] - 4.f * x1[c];
    const float d = x4[c] - x2[c], e = 2.f * (x3[c] - x1[c]);
    y0[c] = 4.f * x0[c] - 5.f * x2[c] + x4[c];
    y1[c] = a + b;
    y2[c] = a - b;
    y3[c] = d + e;
    y4[c] = d - e;
    y5[c] = 4.f * x1[c] - 5.f * x3[c] + x5[c];
  }
}

// y[i] = sum_a At[i][a] x[a] for the four rows of F(4,3)'s At.
inline void output_rows(const float* const x[K], float* const y[4], int n) {
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5];
  float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
#pragma omp simd
  for (int c = 0; c < n; ++c) {
    const float s12 = x1[c] + x2[c], d12 = x1[c] - x2[c], s34 = x3[c] + x4[c], d34 = x3[c] - x4[c];
    y0[c] = x0[c] + s12 + s34;
    y1[c] = d12 + 2.f * d34;
    y2[c] = s12 + 4.f * s34;
    y3[c] = d12 + 8.f * d34 + x5[c];
  }
}

inline float leaky(float v, float slope) { return v > 0.f ? v : v * slope; }

// Flush denormals to zero while in scope (x86: FTZ and DAZ in MXCSR). Without it the real images' features
// produce denormals in the products and the head runs about 2x slower; values below 1e-38 do not reach the output.
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

struct Scratch {
  std::vector<float> v, m;
  std::vector<at::BFloat16> vb;
};

// bf16 <-> fp32 on n values, written so the compiler vectorises them (c10's conversions are scalar calls); narrowing
// rounds to nearest even as c10 does (features are finite, so NaN needs no care).
inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t bits = static_cast<uint32_t>(src[c].x) << 16;
    std::memcpy(dst + c, &bits, sizeof(bits));
  }
}

inline void narrow(const float* src, at::BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    uint32_t bits;
    std::memcpy(&bits, src + c, sizeof(bits));
    dst[c].x = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

}  // namespace

// (..., K, N) bf16 → brgemm's VNNI layout (..., K / 2, N, 2): pairs of consecutive rows of K side by side.
at::Tensor vnni_pairs(const at::Tensor& b) {
  const int64_t k = b.size(-2), n = b.size(-1);
  TORCH_CHECK(b.scalar_type() == at::kBFloat16 && k % 2 == 0, "vnni_pairs takes bf16 (..., K, N) with K even");
  std::vector<int64_t> shape(b.sizes().begin(), b.sizes().end() - 2);
  shape.insert(shape.end(), {k / 2, 2, n});
  return b.reshape(shape).transpose(-2, -1).contiguous();
}

// Whether this build and CPU run ATen's bf16 brgemm on the head's shapes (bf16 products, fp32 accumulation), checked
// on a small product against fp32 once per process.
bool bf16_supported() {
  static const bool ok = [] {
    try {
      if (!at::native::cpublas::could_pack(at::kBFloat16)) return false;
      constexpr int64_t m = 3, n = 176;
      auto a = at::arange(m * CIN, at::kFloat).remainder(7).sub(3).view({m, CIN});
      auto b = at::arange(CIN * n, at::kFloat).remainder(5).sub(2).view({CIN, n});
      auto packed = vnni_pairs(b.to(at::kBFloat16));
      auto ab = a.to(at::kBFloat16).contiguous();
      auto c = at::empty({m, n});
      at::native::cpublas::brgemm(m, n, CIN, CIN, n, n, false, ab.data_ptr<at::BFloat16>(),
                                  packed.data_ptr<at::BFloat16>(), c.data_ptr<float>(), true);
      at::native::cpublas::brgemm_release(true);
      return at::equal(c, at::mm(a, b));  // small integers: exact in bf16 and fp32
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// feats (2, H, W, 64) contiguous, fp32 or bf16; u: transformed weights, index = position * 2 + branch, fp32
// (72, 64, Ctot) or, for bf16 features, bf16 in brgemm's VNNI layout (72, 32, Ctot, 2: pairs of input channels);
// outs, of the features' dtype: outs[0] (H, W, Cd) gets act(dec(F_vis) + dec(F_ir) + bias), outs[k > 0] (H, W, Ck)
// get act(q(F_vis) + b) + act(q(F_ir) + b) for consecutive channel ranges of the remaining columns of u; bias fp32.
template <typename T>
void head_impl(const at::Tensor& feats, const at::Tensor& u, const at::Tensor& bias,
               std::vector<at::Tensor>& outs, double slope_d, int64_t band_cols) {
  constexpr bool low = std::is_same_v<T, at::BFloat16>;
  const int64_t ctot = u.size(2);
  TORCH_CHECK(u.dim() == 3 + low && u.size(0) == 2 * P && u.size(1) * (1 + low) == CIN && u.is_contiguous() &&
              u.scalar_type() == feats.scalar_type(), "u must be (72, 64, C) or, bf16, (72, 32, C, 2)");
  TORCH_CHECK(bias.numel() == ctot && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
              "bias must be fp32 with one value per output channel");
  const int64_t H = feats.size(1), W = feats.size(2);
  std::vector<int64_t> offsets{0};
  for (const auto& o : outs) {
    TORCH_CHECK(o.dim() == 3 && o.size(0) == H && o.size(1) == W && o.is_contiguous() &&
                o.scalar_type() == feats.scalar_type(), "outputs must be contiguous (H, W, C) of the features' dtype");
    offsets.push_back(offsets.back() + o.size(2));
  }
  TORCH_CHECK(offsets.back() == ctot, "output channels must add up to u's columns");
  const float slope = static_cast<float>(slope_d);
  const int64_t th = (H + 3) / 4, tw = (W + 3) / 4;
  const int64_t per_row = (tw + std::max<int64_t>(1, band_cols) - 1) / std::max<int64_t>(1, band_cols);
  const int64_t bc = (tw + per_row - 1) / per_row;  // equal bands across a row of tiles
  const T* fp = feats.data_ptr<T>();
  const float* bp = bias.data_ptr<float>();
  const int64_t cdec = offsets[1];
  std::vector<T*> optr;
  for (auto& o : outs) optr.push_back(o.data_ptr<T>());
  const T* up = u.data_ptr<T>();

  at::parallel_for(0, th * per_row, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    thread_local Scratch s;
    if constexpr (low) s.vb.resize(static_cast<size_t>(2 * P * bc * CIN));
    else s.v.resize(static_cast<size_t>(2 * P * bc * CIN));
    s.m.resize(static_cast<size_t>(2 * P * bc * ctot));
    float rows[P * CIN], block[low ? P * CIN : 1], cols[low ? K * CIN : 1];
    std::vector<float> out_rows(static_cast<size_t>(4 * K * ctot)), y(static_cast<size_t>(2 * 16 * ctot)),
        pixel(static_cast<size_t>(low ? ctot : 0));
    const float zeros[CIN] = {};
    for (int64_t band = begin; band < end; ++band) {
      const int64_t tr = band / per_row, c0 = (band % per_row) * bc, nc = std::min(bc, tw - c0);
      // Input transform of every block, both branches, into v[(pos * 2 + branch)][tile][ch].
      for (int64_t j = 0; j < nc; ++j) {
        for (int n = 0; n < 2; ++n) {
          const float* src[P];
          for (int a = 0; a < K; ++a) {
            const int64_t yy = 4 * tr - 1 + a;
            for (int b = 0; b < K; ++b) {
              const int64_t xx = 4 * (c0 + j) - 1 + b;
              if (yy < 0 || yy >= H || xx < 0 || xx >= W) {
                src[a * K + b] = zeros;
              } else if constexpr (low) {  // widen the pixel's channels to fp32 for the transform
                widen(fp + ((n * H + yy) * W + xx) * CIN, block + (a * K + b) * CIN, CIN);
                src[a * K + b] = block + (a * K + b) * CIN;
              } else {
                src[a * K + b] = fp + ((n * H + yy) * W + xx) * CIN;
              }
            }
          }
          for (int b = 0; b < K; ++b) {  // columns of the block: combine its rows
            const float* x[K];
            float* t[K];
            for (int a = 0; a < K; ++a) { x[a] = src[a * K + b]; t[a] = rows + (a * K + b) * CIN; }
            input_rows(x, t, CIN);
          }
          for (int a = 0; a < K; ++a) {  // rows of the result: combine across columns
            const float* x[K];
            float* t[K];
            for (int b = 0; b < K; ++b) {
              x[b] = rows + (a * K + b) * CIN;
              t[b] = low ? cols + b * CIN : s.v.data() + (((a * K + b) * 2 + n) * nc + j) * CIN;
            }
            input_rows(x, t, CIN);
            if constexpr (low) {
              for (int b = 0; b < K; ++b)
                narrow(cols + b * CIN, s.vb.data() + (((a * K + b) * 2 + n) * nc + j) * CIN, CIN);
            }
          }
        }
      }
      if constexpr (low) {
        for (int64_t q = 0; q < 2 * P; ++q)
          at::native::cpublas::brgemm(nc, ctot, CIN, CIN, ctot, ctot, false, s.vb.data() + q * nc * CIN,
                                      up + q * CIN * ctot, s.m.data() + q * nc * ctot, true);
      } else {
        auto v = torch::from_blob(s.v.data(), {2 * P, nc, CIN});
        auto m = torch::from_blob(s.m.data(), {2 * P, nc, ctot});
        at::bmm_out(m, v, u);
      }
      // Output transform per tile and branch, then bias, LeakyReLU and the branch sum.
      for (int64_t j = 0; j < nc; ++j) {
        for (int n = 0; n < 2; ++n) {
          for (int b = 0; b < K; ++b) {
            const float* x[K];
            float* t[4];
            for (int a = 0; a < K; ++a) x[a] = s.m.data() + (((a * K + b) * 2 + n) * nc + j) * ctot;
            for (int i = 0; i < 4; ++i) t[i] = out_rows.data() + (i * K + b) * ctot;
            output_rows(x, t, static_cast<int>(ctot));
          }
          for (int i = 0; i < 4; ++i) {
            const float* x[K];
            float* t[4];
            for (int b = 0; b < K; ++b) x[b] = out_rows.data() + (i * K + b) * ctot;
            for (int k = 0; k < 4; ++k) t[k] = y.data() + ((n * 4 + i) * 4 + k) * ctot;
            output_rows(x, t, static_cast<int>(ctot));
          }
        }
        for (int i = 0; i < 4; ++i) {
          const int64_t yy = 4 * tr + i;
          if (yy >= H) break;
          for (int k = 0; k < 4; ++k) {
            const int64_t xx = 4 * (c0 + j) + k;
            if (xx >= W) break;
            const float* y0 = y.data() + (i * 4 + k) * ctot;
            const float* y1 = y.data() + ((4 + i) * 4 + k) * ctot;
            // Output o's channels of this pixel: written in place (fp32) or into `pixel`, then narrowed (bf16).
            auto dst = [&](size_t o) -> float* {
              if constexpr (low) return pixel.data() + offsets[o];
              else return optr[o] + (yy * W + xx) * (offsets[o + 1] - offsets[o]);
            };
            float* d = dst(0);
#pragma omp simd
            for (int64_t c = 0; c < cdec; ++c) d[c] = leaky(y0[c] + y1[c] + bp[c], slope);
            for (size_t o = 1; o < outs.size(); ++o) {
              const int64_t lo = offsets[o], co = offsets[o + 1] - lo;
              float* q = dst(o);
#pragma omp simd
              for (int64_t c = 0; c < co; ++c)
                q[c] = leaky(y0[lo + c] + bp[lo + c], slope) + leaky(y1[lo + c] + bp[lo + c], slope);
            }
            if constexpr (low) {
              for (size_t o = 0; o < outs.size(); ++o) {
                const int64_t lo = offsets[o], co = offsets[o + 1] - lo;
                narrow(pixel.data() + lo, optr[o] + (yy * W + xx) * co, co);
              }
            }
          }
        }
      }
    }
    if constexpr (low) at::native::cpublas::brgemm_release(true);
  });
}

void winograd_head(const at::Tensor& feats, const at::Tensor& u, const at::Tensor& bias,
                   std::vector<at::Tensor> outs, double slope, int64_t band_cols) {
  TORCH_CHECK(feats.dim() == 4 && feats.size(0) == 2 && feats.size(3) == CIN && feats.is_contiguous(),
              "feats must be contiguous (2, H, W, 64)");
  if (feats.scalar_type() == at::kFloat) {
    head_impl<float>(feats, u, bias, outs, slope, band_cols);
  } else {
    TORCH_CHECK(feats.scalar_type() == at::kBFloat16, "feats must be fp32 or bf16");
    TORCH_CHECK(bf16_supported(), "bf16 brgemm is not available on this CPU");
    head_impl<at::BFloat16>(feats, u, bias, outs, slope, band_cols);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("winograd_head", &winograd_head, "Winograd F(4,3) head convs (see the source)");
  m.def("bf16_supported", &bf16_supported, "whether bf16 products (brgemm) run on this CPU");
  m.def("vnni_pairs", &vnni_pairs, "bf16 (..., K, N) in the layout the bf16 products read");
  m.attr("input_channels") = CIN;
}
