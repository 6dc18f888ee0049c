// Element-indexed linear forward:
//   y[n, v, m] = alpha * sum_u x[n, u, m] * w[species[n], u, v]
// x: (N, mul_in, d), w: (n_el, mul_in, mul_out), species: int64 (N,), y: (N, mul_out, d);
// all contiguous, layout "mul_ir" (channel-major, the d components of a channel adjacent).
//
// Design (nodes in arbitrary order): a block owns TN nodes x TV output channels; one warp per
// node, one lane per output channel, so a warp's weight reads are one coalesced row of
// w[species[n], u, :]. The x tile (TN nodes x TU inputs x D components) is staged in shared
// memory because every lane of the warp reuses it; each thread keeps its D outputs in
// registers, reusing every weight value D times. When all TN nodes of a tile share one species
// (always the case for sorted input, often for slabs/molecules) the weight tile is staged once
// in shared memory and reused by all TN warps instead of being re-read per node from L1/L2.
//
// What a sorted-by-element grouped GEMM would gain: after sorting nodes by species, each
// element is one dense GEMM (count_z * d) x mul_in x mul_out, so the weight tile is loaded once
// per element tile instead of once per 8 nodes, larger register tiles (several v and nodes per
// thread) raise arithmetic intensity, and tensor cores (TF32 / FP64 DMMA on sm_80+) become
// usable. The cost is an argsort + gather/scatter (or keeping a persistent sorted order, since
// species are fixed during MD), which is why this unsorted kernel comes first.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

constexpr int TV = 32;  // output channels per block = warp width (a warp shares one species)
constexpr int TN = 8;   // nodes per block, one warp each
constexpr int TU = 32;  // input channels staged per shared-memory step

// D = register capacity for irrep components; d > D is processed in chunks of D.
template <typename T, int D>
__global__ void __launch_bounds__(TV * TN)
element_linear_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                          const int64_t* __restrict__ species, T* __restrict__ y,
                          int64_t N, int mul_in, int mul_out, int d, T alpha) {
  __shared__ T s_x[TN][TU][D];
  __shared__ T s_w[TU][TV];

  const int tv = threadIdx.x, tn = threadIdx.y, tid = tn * TV + tv;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TN;  // < N by grid construction
  const int64_t n = n0 + tn;
  const int v0 = blockIdx.y * TV, v = v0 + tv;
  const bool active = n < N && v < mul_out;

  // Species must lie in [0, n_el): like torch indexing, out-of-range values read out of bounds.
  const int64_t z0 = species[n0];
  const int64_t z = n < N ? species[n] : z0;
  const bool uniform = __syncthreads_and(z == z0);  // block-uniform, so no divergence below
  const T* wz = w + z * mul_in * static_cast<int64_t>(mul_out);

  for (int m0 = 0; m0 < d; m0 += D) {
    const int dc = min(D, d - m0);
    T acc[D];
#pragma unroll
    for (int mm = 0; mm < D; ++mm) acc[mm] = T(0);

    for (int u0 = 0; u0 < mul_in; u0 += TU) {
      const int uc = min(TU, mul_in - u0);
      // Consecutive threads read consecutive (u, m) of one node: coalesced when dc == d.
      for (int i = tid; i < TN * uc * dc; i += TV * TN) {
        const int nn = i / (uc * dc), r = i - nn * uc * dc, uu = r / dc, mm = r - uu * dc;
        const int64_t ng = n0 + nn;
        if (ng < N) s_x[nn][uu][mm] = x[(ng * mul_in + u0 + uu) * d + m0 + mm];
      }
      if (uniform) {
        for (int i = tid; i < uc * TV; i += TV * TN) {
          const int uu = i / TV, vv = i - uu * TV;
          if (v0 + vv < mul_out) s_w[uu][vv] = wz[static_cast<int64_t>(u0 + uu) * mul_out + v0 + vv];
        }
      }
      __syncthreads();
      if (active) {
        for (int uu = 0; uu < uc; ++uu) {
          const T wv = uniform ? s_w[uu][tv] : __ldg(wz + static_cast<int64_t>(u0 + uu) * mul_out + v);
          // Columns mm >= dc hold stale values; their accumulators are never stored, so no guard.
#pragma unroll
          for (int mm = 0; mm < D; ++mm) acc[mm] += s_x[tn][uu][mm] * wv;
        }
      }
      __syncthreads();  // s_x / s_w are overwritten by the next step
    }
    if (active) {
      T* yo = y + (n * mul_out + v) * d + m0;
#pragma unroll
      for (int mm = 0; mm < D; ++mm)
        if (mm < dc) yo[mm] = alpha * acc[mm];
    }
  }
}

template <typename T, int D>
void launch(uintptr_t x, uintptr_t w, uintptr_t species, uintptr_t y, int64_t N, int mul_in,
            int mul_out, int d, double alpha, cudaStream_t stream) {
  const dim3 block(TV, TN);
  // Nodes on grid.x (limit 2^31-1) since N can be millions; channels on grid.y (limit 65535).
  const dim3 grid(static_cast<unsigned>((N + TN - 1) / TN), static_cast<unsigned>((mul_out + TV - 1) / TV));
  element_linear_fwd_kernel<T, D><<<grid, block, 0, stream>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(w),
      reinterpret_cast<const int64_t*>(species), reinterpret_cast<T*>(y), N, mul_in, mul_out, d,
      static_cast<T>(alpha));
}

template <typename T>
void dispatch_d(uintptr_t x, uintptr_t w, uintptr_t species, uintptr_t y, int64_t N, int mul_in,
                int mul_out, int d, double alpha, cudaStream_t s) {
  // Exact register tiles for the common l = 0..4 blocks; everything else uses 16-wide chunks.
  if (d <= 1) launch<T, 1>(x, w, species, y, N, mul_in, mul_out, d, alpha, s);
  else if (d <= 3) launch<T, 3>(x, w, species, y, N, mul_in, mul_out, d, alpha, s);
  else if (d <= 5) launch<T, 5>(x, w, species, y, N, mul_in, mul_out, d, alpha, s);
  else if (d <= 7) launch<T, 7>(x, w, species, y, N, mul_in, mul_out, d, alpha, s);
  else if (d <= 9) launch<T, 9>(x, w, species, y, N, mul_in, mul_out, d, alpha, s);
  else launch<T, 16>(x, w, species, y, N, mul_in, mul_out, d, alpha, s);
}

}  // namespace

// Host launcher: raw device pointers so the extension needs no torch headers. Asynchronous on
// `stream`; launches on whatever device is current (the caller selects it).
void element_linear_forward(uintptr_t x, uintptr_t w, uintptr_t species, uintptr_t y, int64_t N,
                            int64_t mul_in, int64_t mul_out, int64_t d, double alpha,
                            bool is_double, uintptr_t stream) {
  const char* where = "sparsekern element_linear_forward: ";
  if (N < 0 || mul_in < 0 || mul_out < 0 || d < 0)
    throw std::invalid_argument(std::string(where) + "negative size (N=" + std::to_string(N) +
                                ", mul_in=" + std::to_string(mul_in) + ", mul_out=" +
                                std::to_string(mul_out) + ", d=" + std::to_string(d) + ")");
  if (mul_in > INT32_MAX || mul_out > 65535LL * TV || d > INT32_MAX ||
      (N + TN - 1) / TN > INT32_MAX)
    throw std::invalid_argument(std::string(where) + "sizes exceed the launch grid limits");
  if (N == 0 || mul_out == 0 || d == 0) return;  // empty output: nothing to launch
  if (!species || !y || ((!x || !w) && mul_in > 0))
    throw std::invalid_argument(std::string(where) + "null device pointer");

  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (is_double)
    dispatch_d<double>(x, w, species, y, N, int(mul_in), int(mul_out), int(d), alpha, s);
  else
    dispatch_d<float>(x, w, species, y, N, int(mul_in), int(mul_out), int(d), alpha, s);

  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(where) + "kernel launch failed: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
}
