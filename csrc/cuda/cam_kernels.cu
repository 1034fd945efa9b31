// Channel attention (CAM) forward and backward, torch-free CUDA (sm_80+).
//
//   a = x [B, C, N];  E = a a^T [B, C, C] (fp32 accumulation whatever the input dtype)
//   A = softmax(rowmax(E) - E) ("original") | softmax(E) ("paper");  O = A a;  y = gamma*O + a
// Forward:
//   cam_gram_kernel<SYM>  : E split over N into S partial sums (fixed split -> deterministic),
//                           only the upper-triangle 64x64 tile pairs (E is symmetric)
//   cam_softmax_kernel    : per row: sum the S partials (mirroring the lower triangle), softmax
//                           -> attn (fp32, returned) and a copy in the MMA dtype
//   cam_mix_kernel        : O = A a with the fused epilogue y = gamma*O + a
// Backward (dO = gamma*dy, s = -1 original / +1 paper):
//   dot_rows + finalize   : dgamma = sum dy*O (deterministic block partials)
//   cam_gram_kernel<!SYM> : dA = dO a^T (S partials, all tile pairs)
//   cam_ds_kernel         : dE = s * A*(dA - rowsum(dA*A))
//   cam_w_kernel          : W1 = gamma*A^T, W2 = dE + dE^T (the symmetric Gram: one product)
//   cam_mix_kernel        : dx = [W1 | W2] [dy ; a] (+ dy residual), a single K = 2C product
// The matmul kernels use the 64x64 tile / warp-engine conventions of device_utils.cuh
// (4 warps, each 16 rows x 64 columns; both operand tiles through the 3-stage cp.async pipeline).
#include "danet_cuda.cuh"
#include "device_utils.cuh"

namespace danet_cuda {
namespace {

using namespace dev;

struct GramArgs {
  Operand u;          // [B, C, N] left factor:  x (forward) | dy in the MMA dtype (backward)
  Operand w;          // [B, C, N] right factor: x
  float* partial;     // [S, B, C, C] fp32: sum over split s of u[b, i, n] * w[b, j, n]
  int64_t B, C, N;    // sizes
  int64_t split_len;  // positions per split (multiple of 64); S = gridDim.y
  int tiles;          // ceil(C / 64)
};

struct MixArgs {
  const void* w[2];   // [B, C, C] contiguous, MMA dtype: left factors W_p
  bool w_vec;         // W rows are 16-byte aligned (cp.async)
  Operand z[2];       // [B, C, N] right factors Z_p
  int nphase;         // 1 (forward) or 2 (backward)
  bool backward;      // epilogue: false: o, y = gamma*o + res | true: dx = acc + res
  const float* gamma; // [1] (forward y) or nullptr
  View3 res;          // [B, C, N] residual: x (forward y) | dy (backward, with gamma); may be absent
  void* out;          // [B, C, N] contiguous, MMA dtype: o | dx
  void* y;            // forward: [B, C, N] contiguous, dtype y_dtype, or nullptr
  DType y_dtype;
  int64_t C, N;       // sizes
};

// ----------------------------------------------------------------------------------------
// partial[s, b, i, j] = sum_{n in split s} u[b, i, n] w[b, j, n] for one 64x64 tile pair.
// grid = (tile pairs, S, B): SYM enumerates ti <= tj only (row-major upper triangle).
// Block 128 = 4 warps, warp w owns rows 16w.. of the tile; A = u tile [i][n], B = w tile [j][n].
template <class T, bool TF32, bool SYM>
__global__ void __launch_bounds__(kThreads, 1) cam_gram_kernel(const GramArgs a) {
  constexpr int TE = Tile<T>::kElems, P = Tile<T>::kPitch;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sStage = reinterpret_cast<T*>(smem);  // [kStages][A | B]

  int ti, tj;
  if constexpr (SYM) {
    int p = blockIdx.x, len = a.tiles;
    ti = 0;
    while (p >= len) {  // < C/64 iterations (<= 256 for C <= contract::kCamCMaxCuda)
      p -= len;
      ++ti;
      --len;
    }
    tj = ti + p;
  } else {
    ti = blockIdx.x / a.tiles;
    tj = blockIdx.x % a.tiles;
  }
  const bool same = SYM && ti == tj;  // diagonal tile: both factors are the same smem tile
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t s = blockIdx.y, b = blockIdx.z, C = a.C;
  const int64_t n_begin = s * a.split_len;
  const int64_t n_end = n_begin + a.split_len < a.N ? n_begin + a.split_len : a.N;
  const int steps = n_end > n_begin ? (int)((n_end - n_begin + kTile - 1) / kTile) : 0;
  const T* U = static_cast<const T*>(a.u.p) + b * a.u.sb;
  const T* W = static_cast<const T*>(a.w.p) + b * a.w.sb;
  const int64_t i0 = (int64_t)ti * kTile, j0 = (int64_t)tj * kTile;

  auto issue = [&](int step) {
    T* sA = sStage + 2 * (step % kStages) * TE;
    const int64_t n0 = n_begin + (int64_t)step * kTile;
    load_tile(sA, U, a.u.sc, a.u.sn, i0, C, n0, n_end, a.u.vec);  // columns past the split are 0
    if (!same) load_tile(sA + TE, W, a.w.sc, a.w.sn, j0, C, n0, n_end, a.w.vec);
  };
  float acc[8][4];
  zero_acc(acc);
  auto compute = [&](int step) {
    const T* sA = sStage + 2 * (step % kStages) * TE;
    // acc[i][j] += sum_n U[i][n] W[j][n]: A(m, k) = sA[m][k], B(k, n) = sB[n][k]
    warp_gemm<T, TF32, false, false>(acc, sA + warp * 16 * P, same ? sA : sA + TE, 4);
  };
  run_pipeline(steps, issue, compute);

  float* out = a.partial + (s * a.B + b) * C * C;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = i0 + warp * 16 + g + (e >> 1) * 8, j = j0 + nt * 8 + 2 * t + (e & 1);
      if (i < C && j < C) out[i * C + j] = acc[nt][e];
    }
}

// One block per (row i, batch b): E[i, :] = sum_s partial (lower-triangle tiles read mirrored),
// then the row softmax. "original" follows the released code's rounding: t = rowmax(E) - E,
// A = softmax(t) (stable: exp(t - max t)); "paper": A = exp(E - max E) / sum.
template <class TC>
__global__ void __launch_bounds__(256) cam_softmax_kernel(const float* partial, int S, int64_t B,
                                                          int64_t C, bool paper, float* attn,
                                                          TC* attn_c) {
  extern __shared__ float row[];  // [C]
  __shared__ float red[32];
  const int64_t i = blockIdx.x, b = blockIdx.y, ti = i / kTile;
  const int64_t CC = C * C;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const bool upper = ti <= j / kTile;
    const int64_t off = b * CC + (upper ? i * C + j : j * C + i);
    float e = 0.f;
    for (int sp = 0; sp < S; ++sp) e += partial[sp * B * CC + off];
    row[j] = e;
    mx = fmaxf(mx, e);
  }
  mx = block_reduce<true>(mx, red);
  float base = mx;
  if (!paper) {
    float m2 = -INFINITY;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float tj = mx - row[j];
      row[j] = tj;
      m2 = fmaxf(m2, tj);
    }
    base = block_reduce<true>(m2, red);
  }
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float ez = expf(row[j] - base);
    row[j] = ez;
    sum += ez;
  }
  const float inv = 1.f / block_reduce<false>(sum, red);
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float v = row[j] * inv;
    attn[(b * C + i) * C + j] = v;
    if (attn_c != nullptr) attn_c[(b * C + i) * C + j] = from_float<TC>(v);
  }
}

// out[b, ci, n] = sum_p sum_cj W_p[b, ci, cj] Z_p[b, cj, n] + epilogue.
// grid = (ceil(N/64), ceil(C/64), B); steps = nphase * ceil(C/64) K-chunks of 64 channels.
// A = W tile [ci][cj] (k contiguous), B = Z tile [cj][n] (n contiguous).
template <class T, bool TF32>
__global__ void __launch_bounds__(kThreads, 1) cam_mix_kernel(const MixArgs a) {
  constexpr int TE = Tile<T>::kElems, P = Tile<T>::kPitch;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sStage = reinterpret_cast<T*>(smem);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t n0 = (int64_t)blockIdx.x * kTile, ci0 = (int64_t)blockIdx.y * kTile;
  const int64_t b = blockIdx.z, C = a.C, N = a.N;
  const int nK = (int)((C + kTile - 1) / kTile);
  const int total = a.nphase * nK;

  auto issue = [&](int step) {
    const int ph = step / nK, kc = step - ph * nK;
    T* sA = sStage + 2 * (step % kStages) * TE;
    const T* Wp = static_cast<const T*>(a.w[ph]) + b * C * C;
    const Operand& z = a.z[ph];
    const T* Zp = static_cast<const T*>(z.p) + b * z.sb;
    load_tile(sA, Wp, C, (int64_t)1, ci0, C, (int64_t)kc * kTile, C, a.w_vec);
    load_tile(sA + TE, Zp, z.sc, z.sn, (int64_t)kc * kTile, C, n0, N, z.vec);
  };

  float acc[8][4];
  zero_acc(acc);
  auto compute = [&](int step) {
    const int kc = step % nK;
    const T* sA = sStage + 2 * (step % kStages) * TE;
    const int64_t left = C - (int64_t)kc * kTile;
    const int k16 = left >= kTile ? 4 : (int)((left + 15) / 16);
    warp_gemm<T, TF32, false, true>(acc, sA + warp * 16 * P, sA + TE, k16);
  };
  run_pipeline(total, issue, compute);

  float* st = reinterpret_cast<float*>(smem);  // [64 channels][kStagePitch] fp32
  stage_acc<false>(st, kStagePitch, acc, warp * 16, 0, 1.f, 1.f);
  __syncthreads();
  T* out = static_cast<T*>(a.out);
  const bool has_res = a.res.data != nullptr;
  const float gm = a.gamma != nullptr ? *a.gamma : 1.f;
  for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
    const int r = idx / kTile, c = idx % kTile;
    const int64_t gc = ci0 + r, gn = n0 + c;
    if (gc < C && gn < N) {
      const float v = st[r * kStagePitch + c];
      const int64_t off = (b * C + gc) * N + gn;
      if (!a.backward) {
        const T o = from_float<T>(v);
        out[off] = o;
        if (a.y != nullptr) store_any(a.y, off, a.y_dtype, gm * to_float(o) + load_view(a.res, b, gc, gn));
      } else {
        out[off] = from_float<T>(has_res ? v + load_view(a.res, b, gc, gn) : v);
      }
    }
  }
}

// One block per (row i, batch b): dA[i, :] = gamma * sum_s partial; r = sum_j dA*A;
// dE[i, j] = sign * A[i, j] * (dA[i, j] - r).
__global__ void __launch_bounds__(256) cam_ds_kernel(const float* partial, int S, int64_t B,
                                                     int64_t C, const float* attn,
                                                     const float* gamma, float sign, float* dE) {
  extern __shared__ float row[];  // [C] dA
  __shared__ float red[32];
  const int64_t i = blockIdx.x, b = blockIdx.y, CC = C * C;
  const float gm = gamma != nullptr ? *gamma : 1.f;
  const float* arow = attn + (b * C + i) * C;
  float r = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    float d = 0.f;
    for (int sp = 0; sp < S; ++sp) d += partial[sp * B * CC + b * CC + i * C + j];
    d *= gm;
    row[j] = d;
    r += d * arow[j];
  }
  r = block_reduce<false>(r, red);
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
    dE[(b * C + i) * C + j] = sign * arow[j] * (row[j] - r);
}

// W1[i, j] = gamma * A[j, i], W2[i, j] = dE[i, j] + dE[j, i] (MMA dtype), 32x32 tiles through smem.
// grid = (ceil(C/32) j-blocks, ceil(C/32) i-blocks, B), block (32, 8).
template <class TC>
__global__ void __launch_bounds__(256) cam_w_kernel(const float* attn, const float* dE,
                                                    const float* gamma, int64_t C, TC* w1,
                                                    TC* w2) {
  __shared__ float tA[32][33], tE[32][33];  // (j-block rows, i-block cols) of A and dE
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j0 = (int64_t)blockIdx.x * 32, i0 = (int64_t)blockIdx.y * 32, b = blockIdx.z;
  const float gm = gamma != nullptr ? *gamma : 1.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int r = ty + 8 * k;
    const int64_t jr = j0 + r, ic = i0 + tx;
    const bool in = jr < C && ic < C;
    tA[r][tx] = in ? attn[(b * C + jr) * C + ic] : 0.f;
    tE[r][tx] = in ? dE[(b * C + jr) * C + ic] : 0.f;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int r = ty + 8 * k;
    const int64_t i = i0 + r, j = j0 + tx;
    if (i < C && j < C) {
      const int64_t off = (b * C + i) * C + j;
      w1[off] = from_float<TC>(gm * tA[tx][r]);
      w2[off] = from_float<TC>(dE[off] + tE[tx][r]);
    }
  }
}

// ----------------------------------------------------------------------------------------
// Launch configuration.
template <class T>
constexpr size_t gram_smem_bytes() { return 2 * kStages * (size_t)Tile<T>::kBytes; }
static_assert(kTile * kStagePitch * 4 <= 2 * kStages * Tile<__half>::kBytes, "mix staging fits");

// Number of N-splits of the Gram products: enough blocks for ~4 per SM, each split >= 1024
// positions. Depends only on the sizes and the device, so the workspace size and the launch agree.
struct Split {
  int S;
  int64_t len;
};
Split gram_split(int64_t B, int64_t C, int64_t N, bool sym) {
  int dev = 0, sms = 108;
  if (cudaGetDevice(&dev) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t T = ceil_div(C, kTile);
  const int64_t pairs = sym ? T * (T + 1) / 2 : T * T;
  int64_t S = ceil_div(4 * (int64_t)sms, pairs * (B > 0 ? B : 1));
  S = S < 1 ? 1 : (S > 32 ? 32 : S);
  const int64_t max_s = N / 1024 > 1 ? N / 1024 : 1;
  if (S > max_s) S = max_s;
  int64_t len = ceil_div(ceil_div(N > 0 ? N : 1, S), kTile) * kTile;
  S = ceil_div(N > 0 ? N : 1, len);  // no empty split
  return Split{(int)S, len};
}

struct FwdWs {
  float* partial;  // [S, B, C, C]
  void* attn_c;    // [B, C, C] MMA dtype (fp16/bf16 only)
};
struct BwdWs {
  float* partial;    // [S, B, C, C]
  float* dE;         // [B, C, C]
  void* w1;          // [B, C, C] MMA dtype
  void* w2;          // [B, C, C] MMA dtype
  float* gpartial;   // [B * ceil(N/32)] sums of dy*O
};

size_t fwd_ws(const CamForwardParams& p, FwdWs* w) {
  const Split sp = gram_split(p.B, p.C, p.N, true);
  const size_t cc = (size_t)(p.B * p.C * p.C);
  const size_t a = align256(sp.S * cc * sizeof(float));
  const size_t c = p.dtype == DType::kFloat32 ? 0 : align256(cc * dtype_size(p.dtype));
  if (w != nullptr) {
    char* base = static_cast<char*>(p.workspace);
    w->partial = reinterpret_cast<float*>(base);
    w->attn_c = c ? base + a : nullptr;
  }
  return a + c;
}
size_t bwd_ws(const CamBackwardParams& p, BwdWs* w) {
  const Split sp = gram_split(p.B, p.C, p.N, false);
  const size_t cc = (size_t)(p.B * p.C * p.C);
  const size_t a = align256(sp.S * cc * sizeof(float));
  const size_t d = align256(cc * sizeof(float));
  const size_t m = align256(cc * dtype_size(p.dtype));
  const size_t g = align256((size_t)(p.B * ceil_div(p.N, 32)) * sizeof(float));
  if (w != nullptr) {
    char* base = static_cast<char*>(p.workspace);
    w->partial = reinterpret_cast<float*>(base);
    w->dE = reinterpret_cast<float*>(base + a);
    w->w1 = base + a + d;
    w->w2 = base + a + d + m;
    w->gpartial = reinterpret_cast<float*>(base + a + d + 2 * m);
  }
  return a + d + 2 * m + g;
}

template <class T, bool TF32, bool SYM>
cudaError_t launch_gram(const Operand& u, const Operand& w, float* partial, int64_t B, int64_t C,
                        int64_t N, cudaStream_t stream) {
  const Split sp = gram_split(B, C, N, SYM);
  GramArgs a{};
  a.u = u;
  a.w = w;
  a.partial = partial;
  a.B = B;
  a.C = C;
  a.N = N;
  a.split_len = sp.len;
  a.tiles = (int)ceil_div(C, kTile);
  const int64_t pairs = SYM ? (int64_t)a.tiles * (a.tiles + 1) / 2 : (int64_t)a.tiles * a.tiles;
  auto kernel = cam_gram_kernel<T, TF32, SYM>;
  const size_t smem = gram_smem_bytes<T>();
  cudaError_t e = prepare_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3((unsigned)pairs, (unsigned)sp.S, (unsigned)B), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class T, bool TF32>
cudaError_t launch_mix(const MixArgs& a, int64_t B, cudaStream_t stream) {
  auto kernel = cam_mix_kernel<T, TF32>;
  const size_t smem = gram_smem_bytes<T>();
  cudaError_t e = prepare_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3((unsigned)ceil_div(a.N, kTile), (unsigned)ceil_div(a.C, kTile), (unsigned)B),
           kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// Row kernels need C floats of dynamic smem.
template <class K>
cudaError_t prepare_row_smem(K kernel, int64_t C) {
  return prepare_smem(kernel, (size_t)C * sizeof(float));
}

bool w_rows_aligned(int64_t C, DType t) { return (C * (int64_t)dtype_size(t)) % 16 == 0; }

template <class T, bool TF32>
cudaError_t cam_forward_impl(const CamForwardParams& p, cudaStream_t stream) {
  FwdWs ws{};
  fwd_ws(p, &ws);
  const Split sp = gram_split(p.B, p.C, p.N, true);
  const Operand x = make_operand(p.x, p.B, p.C, p.N);
  cudaError_t e = launch_gram<T, TF32, true>(x, x, ws.partial, p.B, p.C, p.N, stream);
  if (e != cudaSuccess) return e;

  T* attn_c = std::is_same<T, float>::value ? nullptr : static_cast<T*>(ws.attn_c);
  {
    auto kernel = cam_softmax_kernel<T>;
    if ((e = prepare_row_smem(kernel, p.C)) != cudaSuccess) return e;
    kernel<<<dim3((unsigned)p.C, (unsigned)p.B), 256, (size_t)p.C * sizeof(float), stream>>>(
        ws.partial, sp.S, p.B, p.C, p.paper, p.attn, attn_c);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }

  if (p.N == 0) return cudaSuccess;  // O and y are empty; attn is the softmax of E = 0
  MixArgs m{};
  m.w[0] = attn_c != nullptr ? static_cast<const void*>(attn_c) : static_cast<const void*>(p.attn);
  m.w[1] = m.w[0];
  m.w_vec = w_rows_aligned(p.C, p.dtype);
  m.z[0] = x;
  m.z[1] = x;
  m.nphase = 1;
  m.backward = false;
  const bool has_y = p.gamma != nullptr && p.y != nullptr;
  m.gamma = has_y ? p.gamma : nullptr;
  m.res = has_y ? p.x : View3{};
  m.out = p.o;
  m.y = has_y ? p.y : nullptr;
  m.y_dtype = p.y_dtype;
  m.C = p.C;
  m.N = p.N;
  return launch_mix<T, TF32>(m, p.B, stream);
}

template <class T, bool TF32>
cudaError_t cam_backward_impl(const CamBackwardParams& p, cudaStream_t stream) {
  BwdWs ws{};
  bwd_ws(p, &ws);
  const Split sp = gram_split(p.B, p.C, p.N, false);
  cudaError_t e;
  if (p.gamma != nullptr) {  // dgamma = sum dy*O
    dot_rows_kernel<<<dim3((unsigned)ceil_div(p.N, 32), (unsigned)p.B), dim3(32, 8), 0, stream>>>(
        p.dy, p.o, p.C, p.N, nullptr, nullptr, ws.gpartial);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    finalize_sum_kernel<<<1, 256, 0, stream>>>(ws.gpartial, p.B * ceil_div(p.N, 32), p.dgamma);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  const Operand x = make_operand(p.x, p.B, p.C, p.N);
  const Operand dy = make_operand(p.dy_mma, p.B, p.C, p.N);
  // dA (without gamma) = dy x^T
  if ((e = launch_gram<T, TF32, false>(dy, x, ws.partial, p.B, p.C, p.N, stream)) != cudaSuccess)
    return e;
  {
    auto kernel = cam_ds_kernel;
    if ((e = prepare_row_smem(kernel, p.C)) != cudaSuccess) return e;
    kernel<<<dim3((unsigned)p.C, (unsigned)p.B), 256, (size_t)p.C * sizeof(float), stream>>>(
        ws.partial, sp.S, p.B, p.C, p.attn, p.gamma, p.paper ? 1.f : -1.f, ws.dE);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  const unsigned tb = (unsigned)ceil_div(p.C, 32);
  cam_w_kernel<T><<<dim3(tb, tb, (unsigned)p.B), dim3(32, 8), 0, stream>>>(
      p.attn, ws.dE, p.gamma, p.C, static_cast<T*>(ws.w1), static_cast<T*>(ws.w2));
  if ((e = cudaGetLastError()) != cudaSuccess) return e;

  MixArgs m{};
  m.w[0] = ws.w1;
  m.w[1] = ws.w2;
  m.w_vec = w_rows_aligned(p.C, p.dtype);
  m.z[0] = dy;
  m.z[1] = x;
  m.nphase = 2;
  m.backward = true;
  m.gamma = nullptr;
  m.res = p.gamma != nullptr ? p.dy : View3{};
  m.out = p.dx;
  m.y = nullptr;
  m.y_dtype = p.dtype;
  m.C = p.C;
  m.N = p.N;
  return launch_mix<T, TF32>(m, p.B, stream);
}

// C <= contract::kCamCMaxCuda keeps the [C] fp32 row of the softmax kernels in shared memory.
static_assert(contract::kCamCMaxCuda * sizeof(float) <= 99 * 1024,
              "the [C] fp32 row fits the smallest sm_80+ shared-memory opt-in (99 KB, sm_86/89)");
bool cam_sizes_ok(int64_t B, int64_t C, int64_t N) {
  return B >= 0 && B <= kMaxBatch && C >= contract::kCamCMin && C <= contract::kCamCMaxCuda &&
         N >= 0 && N <= kCamMaxPositions;
}

}  // namespace

size_t cam_forward_workspace_bytes(const CamForwardParams& p) { return fwd_ws(p, nullptr); }
size_t cam_backward_workspace_bytes(const CamBackwardParams& p) { return bwd_ws(p, nullptr); }

cudaError_t cam_forward(const CamForwardParams& p, cudaStream_t stream) {
  if (!cam_sizes_ok(p.B, p.C, p.N) || p.x.dtype != p.dtype) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  if (cudaError_t e = require_sm80(); e != cudaSuccess) return e;
  switch (p.dtype) {
    case DType::kFloat16: return cam_forward_impl<__half, false>(p, stream);
    case DType::kBFloat16: return cam_forward_impl<__nv_bfloat16, false>(p, stream);
    default:
      return p.allow_tf32 ? cam_forward_impl<float, true>(p, stream)
                          : cam_forward_impl<float, false>(p, stream);
  }
}

cudaError_t cam_backward(const CamBackwardParams& p, cudaStream_t stream) {
  if (!cam_sizes_ok(p.B, p.C, p.N) || p.x.dtype != p.dtype || p.dy_mma.dtype != p.dtype)
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.N == 0) {  // dx is empty; dgamma = sum over nothing
    if (p.gamma != nullptr) return cudaMemsetAsync(p.dgamma, 0, sizeof(float), stream);
    return cudaSuccess;
  }
  if (cudaError_t e = require_sm80(); e != cudaSuccess) return e;
  switch (p.dtype) {
    case DType::kFloat16: return cam_backward_impl<__half, false>(p, stream);
    case DType::kBFloat16: return cam_backward_impl<__nv_bfloat16, false>(p, stream);
    default:
      return p.allow_tf32 ? cam_backward_impl<float, true>(p, stream)
                          : cam_backward_impl<float, false>(p, stream);
  }
}

}  // namespace danet_cuda
