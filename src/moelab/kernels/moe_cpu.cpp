// Fused CPU kernels for the sparse MoE path (built on first use by moelab.kernels; see __init__.py).
//
// Each op replaces a chain of small ATen calls whose per-call cost dominates at MoE shapes
// (N*k rows of a few hundred features, (N, E) router logits with E = 8..64):
//
//   topk_softmax           logits (N, E) -> top-k ids, weights, logsumexp, sum_n p (E,), entropy (N,), loads,
//                          the count of non-finite logits, the Switch balance loss
//   topk_softmax_backward  one pass per row for every gradient that reaches the logits
//   sort_plan              counting sort of (N*k,) expert ids (stable), counts, inverse permutation
//   expert_rows            the flat layout's row maps and group ends straight from the expert ids
//   bucket_rows            row maps of the padded bucketed layout
//   gather_rows            x[row_token] with zero padding rows, cast to the compute dtype, one pass
//   gather_sum             backward of gather_rows: sum of each token's k row gradients
//   combine / combine_backward   y[n] = sum_j w[n, j] ye[row(n, j)] and its gradients
//   permute_cast           w[perm] cast to a dtype in one pass (stacked expert weights)
//   sparse_mlp             gather -> grouped_mlp -> combine, with its autograd in C++ (as topk_softmax's)
//   grouped_mlp / _backward     every expert's two-layer MLP on its expert-sorted rows (fp32/fp64), one
//                          GEMM per expert and layer (small_gemm or the BLAS), and its gradients
//
// Index conventions follow moelab/moe/dispatch.py: a padding row has token N (reads zero), a dropped
// assignment has row R (reads zero), a padding row has assignment N*k. Accumulation is in float
// (double for double tensors).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

template <typename A, typename B>
using acc_of = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

// Element loads/stores through the accumulation type. bf16 <-> float by bit operations (round to
// nearest even, NaN kept) so that the loops calling them vectorise; other types by static_cast.
template <typename A, typename T>
inline A ld(const T* p, int64_t i) {
  return static_cast<A>(static_cast<at::opmath_type<T>>(p[i]));
}
template <typename A>
inline A ld(const c10::BFloat16* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return static_cast<A>(f);
}
template <typename T, typename A>
inline void st(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}
template <typename A>
inline void st(c10::BFloat16* p, int64_t i, A v) {
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(f != f ? 0x7FC0u : r);
}

#define MOELAB_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// A copy that casts: the body (a lambda, expanded in place) sees the source type S, the output type D
// and the type A they are converted through.
#define MOELAB_DISPATCH_CAST(SRC, DST, NAME, ...) \
  MOELAB_DISPATCH(SRC, NAME, [&] {                \
    using S = scalar_t;                           \
    MOELAB_DISPATCH(DST, NAME "_out", [&] {       \
      using D = scalar_t;                         \
      using A = acc_of<S, D>;                     \
      (__VA_ARGS__)();                            \
    });                                           \
  })

// (R, *f) -> (R, prod f), also for R = 0 (where reshape(R, -1) is ambiguous)
Tensor rows2d(const Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "expected a tensor with a leading row dimension, got a scalar");
  int64_t f = 1;
  for (int64_t d = 1; d < t.dim(); ++d) f *= t.size(d);
  return t.reshape({t.size(0), f});
}

// The sizes of t with the leading (row) dimension replaced by n.
std::vector<int64_t> with_rows(const Tensor& t, int64_t n) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[0] = n;
  return shape;
}

void check_index(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1,
              op, ": ", name, " must be a 1-D int64 CPU tensor, got ", t.scalar_type(), " of shape ", t.sizes());
}

void check_float(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && at::isFloatingType(t.scalar_type()),
              op, ": ", name, " must be a floating-point CPU tensor, got ", t.scalar_type());
}

// ---- SIMD. GCC/Clang vector types: a 256-bit vector of T (two 128-bit ones on SSE or NEON) and an integer
// vector of the same lane width (what a comparison gives, and the type of a select's mask).
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename Simd<T>::V;
template <typename T>
using ivec_t = typename Simd<T>::I;
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// e^x lane by lane. float: 2^n e^r with |r| <= ln2 / 2 and the Cephes expf polynomial on whole vectors, relative
// error ~2e-7 (std::exp would keep the loops scalar); double: std::exp per lane.
inline vec_t<float> vexp(vec_t<float> x) {
  using V = vec_t<float>;
  using I = ivec_t<float>;
  x = x < -87.0f ? V{} - 87.0f : x;
  x = x > 88.0f ? V{} + 88.0f : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  return p * (V)bits;  // a same-size vector cast reinterprets the bits
}
inline vec_t<double> vexp(vec_t<double> x) {
  for (int64_t q = 0; q < kLanes<double>; ++q) x[q] = std::exp(x[q]);
  return x;
}

template <typename T>
inline vec_t<T> vmax(const vec_t<T>& a, const vec_t<T>& b) {
  return a > b ? a : b;
}

// lane q = p[q * stride] (lane loads of a row block: one row per lane)
template <typename T, size_t... Q>
inline vec_t<T> lanes_of(const T* p, int64_t stride, std::index_sequence<Q...>) {
  return vec_t<T>{p[static_cast<int64_t>(Q) * stride]...};
}
template <typename T>
inline vec_t<T> lanes_of(const T* p, int64_t stride) {
  return lanes_of<T>(p, stride, std::make_index_sequence<kLanes<T>>{});
}

// The logits of rows [r0, r0 + nb) of L (N, E), nb <= lanes, one row per lane: t[i] = logit i of every row
// (a partial block repeats its last row in the spare lanes, through pad (lanes * E)); returns the row maxima.
template <typename T>
inline vec_t<T> load_row_block(const T* L, int64_t r0, int64_t nb, int64_t e, T* pad, vec_t<T>* t) {
  constexpr int64_t B = kLanes<T>;
  const T* rows = L + r0 * e;
  if (nb < B) {
    for (int64_t q = 0; q < B; ++q) std::memcpy(pad + q * e, L + (r0 + std::min(q, nb - 1)) * e, sizeof(T) * e);
    rows = pad;
  }
  vec_t<T> m = t[0] = lanes_of<T>(rows, e);
  for (int64_t i = 1; i < e; ++i) m = vmax<T>(m, t[i] = lanes_of<T>(rows + i, e));
  return m;
}

// ------------------------------------------------------------------------------------------ router

// logits (N, E) float/double -> indices (N, k), weights (N, k), lse (N,), psum (E,) = sum_n p_n, ent (N,),
// counts (E,) int64 = assignments per expert, bad () int64 = non-finite logits (the router refuses them),
// balance () = the Switch balance loss E sum_i f_i P_i, f_i = counts_i / (N k), P_i = psum_i / N
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> topk_softmax(const Tensor& logits_, int64_t k,
                                                                                        bool normalize) {
  TORCH_CHECK(logits_.dim() == 2, "topk_softmax: logits must be (N, E), got shape ", logits_.sizes());
  TORCH_CHECK(logits_.scalar_type() == at::kFloat || logits_.scalar_type() == at::kDouble,
              "topk_softmax: logits must be float32 or float64, got ", logits_.scalar_type());
  const Tensor logits = logits_.contiguous();
  const int64_t n = logits.size(0), e = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= e, "topk_softmax: k must be in [1, E=", e, "], got ", k);
  auto opt = logits.options();
  Tensor indices = at::empty({n, k}, opt.dtype(at::kLong));
  Tensor weights = at::empty({n, k}, opt), lse = at::empty({n}, opt), ent = at::empty({n}, opt);
  Tensor psum = at::empty({e}, opt), balance = at::empty({}, opt);  // written whole below (no zero_ / fill_ ops)
  Tensor counts = at::empty({e}, opt.dtype(at::kLong)), bad = at::empty({}, opt.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "topk_softmax", [&] {
    using T = scalar_t;
    const T* L = logits.data_ptr<T>();
    int64_t* I = indices.data_ptr<int64_t>();
    T *W = weights.data_ptr<T>(), *S = lse.data_ptr<T>(), *H = ent.data_ptr<T>();
    const int64_t nt = at::get_num_threads();
    std::vector<T> part(static_cast<size_t>(nt * e), T(0));  // per-thread sum_n p_n
    // Rows in blocks of B, one row per SIMD lane: every step below is the same for all B rows (max, exp, sums,
    // the top-k insertion as compares and selects) and runs on whole vectors (vec_t) held in registers or
    // written and read whole, instead of along a row of E = 8..64 logits, where the top-k's branches and the
    // per-row log cost more than the arithmetic.
    using V = vec_t<T>;
    using VI = ivec_t<T>;
    constexpr int64_t B = kLanes<T>;
    at::parallel_for(0, n, 256, [&, e, k](int64_t b, int64_t end) {
      std::vector<V> t(e), pe(e), acc(e, V{});  // (E,) vectors: the block's logits, their e^(l - max), sum of p
      std::vector<V> tv(k), wv(k);       // (k,) the top values so far, then the weights
      std::vector<VI> ti(k);             // (k,) their ids
      std::vector<T> pad(static_cast<size_t>(B * e));  // a last, partial block: its rows, the last one repeated
      for (int64_t r0 = b; r0 < end; r0 += B) {
        const int64_t nb = std::min(B, end - r0);
        const V m = load_row_block<T>(L, r0, nb, e, pad.data(), t.data());
        V sum{}, sl{};
        for (int64_t i = 0; i < e; ++i) {
          const V d = t[i] - m;
          sum += (pe[i] = vexp(d));
          sl += pe[i] * d;
        }
        V ls, valid;  // log sum; 1 in the lanes of real rows
        for (int64_t q = 0; q < B; ++q) {
          ls[q] = std::log(sum[q]);
          valid[q] = q < nb ? T(1) : T(0);
        }
        const V inv = valid / sum, lz = m + ls;
        for (int64_t i = 0; i < e; ++i) acc[i] += pe[i] * inv;  // p, 0 in the lanes past the rows
        const V h = ls - sl / sum;  // -sum p log p with log p = (l - m) - log s
        // top-k by value, descending; ties keep the lower id (as torch.topk on CPU); the first k ids fill the
        // empty slots (id -1) whatever their values, so a row of -inf still gets k distinct experts
        for (int64_t j = 0; j < k; ++j) {
          tv[j] = V{};
          ti[j] = VI{} - 1;
        }
        for (int64_t i = 0; i < e; ++i) {
          V v = t[i];  // the value and id carried down the slots
          VI id = VI{} + static_cast<int32_t>(i);
          for (int64_t j = 0; j < k; ++j) {
            const V tj = tv[j];
            const VI ij = ti[j], g = (ij < 0) | (v > tj);
            tv[j] = g ? v : tj;
            ti[j] = g ? id : ij;
            v = g ? tj : v;
            id = g ? ij : id;
          }
        }
        V ws{};
        for (int64_t j = 0; j < k; ++j) ws += (wv[j] = vexp(tv[j] - (normalize ? tv[0] : lz)));
        const V winv = normalize ? T(1) / ws : V{} + T(1);
        for (int64_t q = 0; q < nb; ++q) {
          const int64_t r = r0 + q;
          S[r] = lz[q];
          H[r] = h[q];
          for (int64_t j = 0; j < k; ++j) {
            I[r * k + j] = ti[j][q];
            W[r * k + j] = wv[j][q] * winv[q];
          }
        }
      }
      T* part_t = part.data() + at::get_thread_num() * e;
      for (int64_t i = 0; i < e; ++i)
        for (int64_t q = 0; q < B; ++q) part_t[i] += acc[i][q];
    });
    T* P = psum.data_ptr<T>();
    std::fill(P, P + e, T(0));
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t i = 0; i < e; ++i) P[i] += part[t * e + i];
    int64_t* C = counts.data_ptr<int64_t>();
    std::fill(C, C + e, int64_t(0));
    for (int64_t i = 0; i < n * k; ++i) ++C[I[i]];
    int64_t nb = 0;  // non-finite logits: |l| <= max is false for inf and NaN
    const T big = std::numeric_limits<T>::max();
_Pragma("omp simd reduction(+ : nb)")
    for (int64_t i = 0; i < n * e; ++i) nb += !(std::abs(L[i]) <= big);
    *bad.data_ptr<int64_t>() = nb;
    T bal = 0;
    for (int64_t i = 0; i < e; ++i) bal += static_cast<T>(C[i]) * P[i];
    *balance.data_ptr<T>() = n ? bal * static_cast<T>(e) / (static_cast<T>(n) * static_cast<T>(n) * static_cast<T>(k)) : T(0);
  });
  return {indices, weights, lse, psum, ent, counts, bad, balance};
}

// Gradient of the logits from the gradients of topk_softmax's outputs (each optional).
Tensor topk_softmax_backward(const Tensor& logits_, const Tensor& ent_, const Tensor& indices_,
                             const Tensor& weights_, bool normalize, const c10::optional<Tensor>& g_w,
                             const c10::optional<Tensor>& g_lse, const c10::optional<Tensor>& g_psum,
                             const c10::optional<Tensor>& g_ent) {
  const Tensor logits = logits_.contiguous(), ent = ent_.contiguous();
  const Tensor indices = indices_.contiguous(), weights = weights_.contiguous();
  const int64_t n = logits.size(0), e = logits.size(1), k = indices.size(1);
  auto opt_c = [&](const c10::optional<Tensor>& t) {
    return t.has_value() && t->defined() ? t->to(logits.scalar_type()).contiguous() : Tensor();
  };
  const Tensor gw = opt_c(g_w), gl = opt_c(g_lse), gp = opt_c(g_psum), ge = opt_c(g_ent);
  Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "topk_softmax_backward", [&] {
    using T = scalar_t;
    const T *L = logits.data_ptr<T>(), *H = ent.data_ptr<T>(), *W = weights.data_ptr<T>();
    const int64_t* I = indices.data_ptr<int64_t>();
    const T* GW = gw.defined() ? gw.data_ptr<T>() : nullptr;
    const T* GL = gl.defined() ? gl.data_ptr<T>() : nullptr;
    const T* GP = gp.defined() ? gp.data_ptr<T>() : nullptr;
    const T* GE = ge.defined() ? ge.data_ptr<T>() : nullptr;
    T* G = grad.data_ptr<T>();
    // rows in blocks of B, one per SIMD lane, as in the forward
    using V = vec_t<T>;
    constexpr int64_t B = kLanes<T>;
    at::parallel_for(0, n, 256, [&, e, k](int64_t b, int64_t end) {
      std::vector<V> t(e), p(e);  // (E,) vectors: the block's logits, then p
      std::vector<T> pad(static_cast<size_t>(B * e)), out(static_cast<size_t>(B * e));  // out: (B, E) gradient rows
      for (int64_t r0 = b; r0 < end; r0 += B) {
        const int64_t nb = std::min(B, end - r0);
        // p and log p from the row max (as the forward), not from the stored lse: exact for large logits
        const V m = load_row_block<T>(L, r0, nb, e, pad.data(), t.data());
        V sum{};
        for (int64_t i = 0; i < e; ++i) sum += (p[i] = vexp(t[i] - m));
        const V inv = T(1) / sum;
        V cp{}, ls, a{}, he{}, hr{}, sw{};  // sum_i p_i g_psum_i; log sum; the row gradients of lse and entropy
        for (int64_t i = 0; i < e; ++i) {
          p[i] *= inv;
          if (GP) cp += p[i] * GP[i];
        }
        for (int64_t q = 0; q < nb; ++q) {
          const int64_t r = r0 + q;
          ls[q] = std::log(sum[q]);
          if (GL) a[q] = GL[r];
          if (GE) he[q] = GE[r];
          hr[q] = H[r];
          if (GW)
            for (int64_t j = 0; j < k; ++j) sw[q] += W[r * k + j] * GW[r * k + j];
        }
        for (int64_t q = nb; q < B; ++q) ls[q] = T(0);
        const V c0 = a - cp, cl = m + ls - hr;  // d(-sum p log p)/dl_i = -p_i (log p_i + H)
        for (int64_t i = 0; i < e; ++i) {
          V g = p[i] * (c0 - he * (t[i] - cl) + (GP ? GP[i] : T(0)));
          if (GW && !normalize) g -= p[i] * sw;  // w_j = p_{idx_j}: dw_j / dl_i = w_j ([i = idx_j] - p_i)
          for (int64_t q = 0; q < B; ++q) out[q * e + i] = g[q];
        }
        for (int64_t q = 0; q < nb; ++q) {
          const int64_t r = r0 + q;
          T* g = G + r * e;
          std::memcpy(g, out.data() + q * e, sizeof(T) * e);
          if (GW)
            for (int64_t j = 0; j < k; ++j) {
              const T wg = W[r * k + j] * GW[r * k + j];
              g[I[r * k + j]] += normalize ? wg - W[r * k + j] * sw[q] : wg;  // normalize: a softmax over the k
            }
        }
      }
    });
  });
  return grad;
}

// ---------------------------------------------------------------------------------------- dispatch

// flat (A,) expert ids in [0, E] (E = dropped) -> order (A,) stable sort, counts (E + 1,), inverse (A,)
std::tuple<Tensor, Tensor, Tensor> sort_plan(const Tensor& flat_, int64_t num_experts) {
  check_index(flat_, "sort_plan", "expert ids");
  const Tensor flat = flat_.contiguous();
  const int64_t a = flat.numel();
  const int64_t* f = flat.data_ptr<int64_t>();
  Tensor counts = at::zeros({num_experts + 1}, flat.options());
  Tensor order = at::empty({a}, flat.options()), inverse = at::empty({a}, flat.options());
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < a; ++i) {
    TORCH_CHECK(f[i] >= 0 && f[i] <= num_experts, "sort_plan: expert id ", f[i], " at position ", i,
                " is outside [0, ", num_experts, "]");
    ++c[f[i]];
  }
  std::vector<int64_t> pos(static_cast<size_t>(num_experts + 1), 0);
  for (int64_t v = 1; v <= num_experts; ++v) pos[v] = pos[v - 1] + c[v - 1];
  int64_t *o = order.data_ptr<int64_t>(), *inv = inverse.data_ptr<int64_t>();
  for (int64_t i = 0; i < a; ++i) {
    const int64_t p = pos[f[i]]++;
    o[p] = i;
    inv[i] = p;
  }
  return {order, counts, inverse};
}

// The flat (unpadded, trimmed) layout of (A,) = (N*k,) expert ids in [0, E] (E: a dropped assignment) in one
// pass: row_token (M,), row_assign (M,) of the M kept assignments sorted by expert (stable), assign_row (A,)
// (M for a dropped one), offsets (E,) the end row of each expert's group.
std::tuple<Tensor, Tensor, Tensor, Tensor> expert_rows(const Tensor& flat_, int64_t k, int64_t num_experts) {
  check_index(flat_, "expert_rows", "expert ids");
  TORCH_CHECK(k >= 1 && flat_.numel() % k == 0, "expert_rows: ", flat_.numel(), " ids is not a multiple of k=", k);
  const Tensor flat = flat_.contiguous();
  const int64_t a = flat.numel(), e = num_experts;
  const int64_t* f = flat.data_ptr<int64_t>();
  std::vector<int64_t> pos(static_cast<size_t>(e + 2), 0);
  for (int64_t i = 0; i < a; ++i) {
    TORCH_CHECK(f[i] >= 0 && f[i] <= e, "expert_rows: expert id ", f[i], " at position ", i, " is outside [0, ", e,
                "]");
    ++pos[f[i] + 1];
  }
  for (int64_t v = 1; v <= e + 1; ++v) pos[v] += pos[v - 1];  // pos[v]: first row of expert v
  const int64_t m = pos[e];  // kept assignments
  Tensor offsets = at::empty({e}, flat.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t v = 0; v < e; ++v) off[v] = pos[v + 1];
  Tensor row_token = at::empty({m}, flat.options()), row_assign = at::empty({m}, flat.options());
  Tensor assign_row = at::empty({a}, flat.options());
  int64_t *rt = row_token.data_ptr<int64_t>(), *ra = row_assign.data_ptr<int64_t>();
  int64_t* ar = assign_row.data_ptr<int64_t>();
  for (int64_t i = 0; i < a; ++i) {
    if (f[i] == e) {
      ar[i] = m;
      continue;
    }
    const int64_t r = pos[f[i]]++;
    rt[r] = i / k;
    ra[r] = i;
    ar[i] = r;
  }
  return {row_token, row_assign, assign_row, offsets};
}

// Sorted rows (order (M,), expert (M,) non-decreasing) -> padded layout maps given each expert's first
// padded row start (E,): row_token (R,), row_assign (R,), assign_row (A,) (A = num_tokens * k).
std::tuple<Tensor, Tensor, Tensor> bucket_rows(const Tensor& order_, const Tensor& expert_, const Tensor& start_,
                                               int64_t num_rows, int64_t num_tokens, int64_t k, int64_t num_assign) {
  check_index(order_, "bucket_rows", "order");
  check_index(expert_, "bucket_rows", "expert");
  check_index(start_, "bucket_rows", "start");
  const Tensor order = order_.contiguous(), expert = expert_.contiguous(), start = start_.contiguous();
  const int64_t m = order.numel();
  auto opt = order.options();
  Tensor row_token = at::full({num_rows}, num_tokens, opt), row_assign = at::full({num_rows}, num_assign, opt);
  Tensor assign_row = at::full({num_assign}, num_rows, opt);
  const int64_t *o = order.data_ptr<int64_t>(), *ex = expert.data_ptr<int64_t>(), *st = start.data_ptr<int64_t>();
  int64_t *rt = row_token.data_ptr<int64_t>(), *ra = row_assign.data_ptr<int64_t>(), *ar = assign_row.data_ptr<int64_t>();
  int64_t prev = -1, first = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (ex[i] != prev) {
      prev = ex[i];
      first = i;
    }
    const int64_t row = st[ex[i]] + (i - first);
    TORCH_CHECK(row >= 0 && row < num_rows && o[i] >= 0 && o[i] < num_assign, "bucket_rows: row ", row,
                " or assignment ", o[i], " out of range (rows ", num_rows, ", assignments ", num_assign, ")");
    rt[row] = o[i] / k;
    ra[row] = o[i];
    ar[o[i]] = row;
  }
  return {row_token, row_assign, assign_row};
}

// out[r] = x[index[r]] cast to dtype; index[r] == N reads zeros. x (N, F) -> (R, F)
Tensor gather_rows(const Tensor& x_, const Tensor& index_, at::ScalarType dtype) {
  RECORD_FUNCTION("moelab::gather_rows", std::vector<c10::IValue>());  // named in profiles when called inside an op
  check_float(x_, "gather_rows", "x");
  check_index(index_, "gather_rows", "index");
  const Tensor x = rows2d(x_).contiguous(), index = index_.contiguous();
  const int64_t n = x.size(0), f = x.size(1), r = index.numel();
  Tensor out = at::empty(with_rows(x_, r), x.options().dtype(dtype));
  const int64_t* idx = index.data_ptr<int64_t>();
  MOELAB_DISPATCH_CAST(x.scalar_type(), dtype, "gather_rows", [&] {
    const S* X = x.data_ptr<S>();
    D* O = out.data_ptr<D>();
    at::parallel_for(0, r, 64, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        D* o = O + i * f;
        const int64_t t = idx[i];
        if (t == n) {
          std::fill(o, o + f, D(0));
          continue;
        }
        TORCH_CHECK(t >= 0 && t < n, "gather_rows: index ", t, " out of range [0, ", n, "]");
        const S* s = X + t * f;
_Pragma("omp simd")
        for (int64_t j = 0; j < f; ++j) st(o, j, ld<A>(s, j));
      }
    });
  });
  return out;
}

// Backward of gather_rows: out[t] = sum_j grad[rows[t*k + j]] (rows == R: dropped, skipped), in dtype.
Tensor gather_sum(const Tensor& grad_, const Tensor& rows_, int64_t k, at::ScalarType dtype) {
  RECORD_FUNCTION("moelab::gather_sum", std::vector<c10::IValue>());  // named in profiles when called inside an op
  check_float(grad_, "gather_sum", "grad");
  check_index(rows_, "gather_sum", "rows");
  const Tensor grad = rows2d(grad_).contiguous(), rows = rows_.contiguous();
  const int64_t nr = grad.size(0), f = grad.size(1);
  TORCH_CHECK(k >= 1 && rows.numel() % k == 0, "gather_sum: ", rows.numel(), " rows is not a multiple of k=", k);
  const int64_t n = rows.numel() / k;
  Tensor out = at::empty(with_rows(grad_, n), grad.options().dtype(dtype));
  const int64_t* rw = rows.data_ptr<int64_t>();
  MOELAB_DISPATCH_CAST(grad.scalar_type(), dtype, "gather_sum", [&] {
    const S* G = grad.data_ptr<S>();
    D* O = out.data_ptr<D>();
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t end) {
      std::vector<A> acc(static_cast<size_t>(f));
      for (int64_t t = b; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = rw[t * k + j];
          if (row == nr) continue;
          TORCH_CHECK(row >= 0 && row < nr, "gather_sum: row ", row, " out of range [0, ", nr, "]");
          const S* g = G + row * f;
_Pragma("omp simd")
          for (int64_t c = 0; c < f; ++c) acc[c] += ld<A>(g, c);
        }
        D* o = O + t * f;
_Pragma("omp simd")
        for (int64_t c = 0; c < f; ++c) st(o, c, acc[c]);
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------------------- combine

// y[t] = sum_j w[t, j] * ye[rows[t*k + j]] (rows == R: dropped, reads zero); ye (R, O) -> y (N, O) in ye's dtype
Tensor combine(const Tensor& ye_, const Tensor& rows_, const Tensor& w_) {
  RECORD_FUNCTION("moelab::combine", std::vector<c10::IValue>());  // named in profiles when called inside an op
  check_float(ye_, "combine", "expert outputs");
  check_index(rows_, "combine", "rows");
  check_float(w_, "combine", "weights");
  const Tensor ye = rows2d(ye_).contiguous(), rows = rows_.contiguous(), w = w_.contiguous();
  TORCH_CHECK(w.dim() == 2 && w.numel() == rows.numel(), "combine: weights ", w.sizes(), " do not match ",
              rows.numel(), " assignments");
  const int64_t nr = ye.size(0), f = ye.size(1), n = w.size(0), k = w.size(1);
  Tensor out = at::empty(with_rows(ye_, n), ye.options());
  const int64_t* rw = rows.data_ptr<int64_t>();
  MOELAB_DISPATCH(ye.scalar_type(), "combine", [&] {
    using S = scalar_t;
    const S* Y = ye.data_ptr<S>();
    S* O = out.data_ptr<S>();
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "combine_w", [&] {
      using WT = scalar_t;
      using A = acc_of<S, WT>;
      const WT* Wp = w.data_ptr<WT>();
      at::parallel_for(0, n, 64, [&](int64_t b, int64_t end) {
        std::vector<A> acc(static_cast<size_t>(f));
        for (int64_t t = b; t < end; ++t) {
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t j = 0; j < k; ++j) {
            const int64_t row = rw[t * k + j];
            if (row == nr) continue;
            TORCH_CHECK(row >= 0 && row < nr, "combine: row ", row, " out of range [0, ", nr, "]");
            const A wt = static_cast<A>(Wp[t * k + j]);
            const S* y = Y + row * f;
_Pragma("omp simd")
            for (int64_t c = 0; c < f; ++c) acc[c] += wt * ld<A>(y, c);
          }
          S* o = O + t * f;
_Pragma("omp simd")
          for (int64_t c = 0; c < f; ++c) st(o, c, acc[c]);
        }
      });
    });
  });
  return out;
}

// Gradients of combine: grad_ye[r] = w[a] grad[a / k] for the assignment a = row_assign[r] (padding rows:
// zero), grad_w[t, j] = <ye[rows[t*k + j]], grad[t]> (dropped: zero). Undefined outputs when not needed.
std::tuple<Tensor, Tensor> combine_backward(const Tensor& grad_, const Tensor& ye_, const Tensor& rows_,
                                            const Tensor& row_assign_, const Tensor& w_, bool need_ye, bool need_w) {
  RECORD_FUNCTION("moelab::combine_backward", std::vector<c10::IValue>());  // named in profiles when called inside an op
  const Tensor grad = rows2d(grad_).contiguous();
  const Tensor ye = rows2d(ye_).contiguous();
  const Tensor rows = rows_.contiguous(), row_assign = row_assign_.contiguous(), w = w_.contiguous();
  const int64_t nr = ye.size(0), f = ye.size(1), n = w.size(0), k = w.size(1), na = n * k;
  Tensor grad_ye, grad_w;
  const int64_t *rw = rows.data_ptr<int64_t>(), *ra = row_assign.data_ptr<int64_t>();
  MOELAB_DISPATCH(ye.scalar_type(), "combine_backward", [&] {
    using S = scalar_t;
    const S* Y = ye.data_ptr<S>();
    MOELAB_DISPATCH(grad.scalar_type(), "combine_backward_g", [&] {
      using GT = scalar_t;
      const GT* G = grad.data_ptr<GT>();
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "combine_backward_w", [&] {
        using WT = scalar_t;
        using A = acc_of<acc_of<S, GT>, WT>;
        const WT* Wp = w.data_ptr<WT>();
        if (need_w) {
          grad_w = at::empty({n, k}, w.options());
          WT* GWp = grad_w.data_ptr<WT>();
          at::parallel_for(0, n, 64, [&](int64_t b, int64_t end) {
            for (int64_t t = b; t < end; ++t) {
              const GT* g = G + t * f;
              for (int64_t j = 0; j < k; ++j) {
                const int64_t row = rw[t * k + j];
                A s = 0;
                if (row != nr) {
                  const S* y = Y + row * f;
_Pragma("omp simd reduction(+ : s)")
                  for (int64_t c = 0; c < f; ++c) s += ld<A>(y, c) * ld<A>(g, c);
                }
                GWp[t * k + j] = static_cast<WT>(s);
              }
            }
          });
        }
        if (need_ye) {
          grad_ye = at::empty(ye_.sizes(), ye.options());
          S* GY = grad_ye.data_ptr<S>();
          at::parallel_for(0, nr, 64, [&](int64_t b, int64_t end) {
            for (int64_t r = b; r < end; ++r) {
              S* o = GY + r * f;
              const int64_t a = ra[r];
              if (a == na) {
                std::fill(o, o + f, S(0));
                continue;
              }
              TORCH_CHECK(a >= 0 && a < na, "combine_backward: assignment ", a, " out of range [0, ", na, "]");
              const A wt = static_cast<A>(Wp[a]);
              const GT* g = G + (a / k) * f;
_Pragma("omp simd")
              for (int64_t c = 0; c < f; ++c) st(o, c, wt * ld<A>(g, c));
            }
          });
        }
      });
    });
  });
  return {grad_ye, grad_w};
}

// --------------------------------------------------------------------------------------- weights

// out[i] = w[perm[i]] cast to dtype (E, ...) -> (len(perm), ...); one pass instead of cast + gather.
Tensor permute_cast(const Tensor& w_, const Tensor& perm_, at::ScalarType dtype) {
  check_float(w_, "permute_cast", "w");
  check_index(perm_, "permute_cast", "perm");
  const Tensor w = w_.contiguous(), perm = perm_.contiguous();
  const int64_t e = w.size(0), n = perm.numel();
  Tensor out = at::empty(with_rows(w, n), w.options().dtype(dtype));
  const int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < e, "permute_cast: perm[", i, "] = ", p[i], " out of range [0, ", e, ")");
  const int64_t inner = e ? w.numel() / e : 0;
  MOELAB_DISPATCH_CAST(w.scalar_type(), dtype, "permute_cast", [&] {
    const S* W = w.data_ptr<S>();
    D* O = out.data_ptr<D>();
    const int64_t total = n * inner;
    at::parallel_for(0, total, 16384, [&](int64_t b, int64_t end) {
      while (b < end) {
        const int64_t i = b / inner, off = b % inner, stop = std::min(end, (i + 1) * inner);
        const S* s = W + p[i] * inner + off;
        D* o = O + b;
        const int64_t len = stop - b;
_Pragma("omp simd")
        for (int64_t j = 0; j < len; ++j) st(o, j, ld<A>(s, j));
        b = stop;
      }
    });
  });
  return out;
}


// ------------------------------------------------------------------------------------- grouped MLP

// Expert e's rows of the expert-sorted (R, in) input are [offsets[e-1], offsets[e]) (offsets[-1] = R). The
// two layers of every expert run as one row-major GEMM per expert and layer: small operands on small_gemm
// below, the others issued straight to the BLAS that torch links (MKL's or OpenBLAS's sgemm_/dgemm_, about
// 0.3 us a call) or, where the library exports none, through at::addmm_ on views. The hidden activation is the ATen op of the reference path, so both
// paths compute the same function.

}  // namespace

extern "C" {
// Fortran BLAS of the library torch links (weak: absent on some builds; then the ATen fallback runs).
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace {

template <typename T>
void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const T* alpha,
                  const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c, const int* ldc);
template <>
void fortran_gemm<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                         const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
void fortran_gemm<double>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                          const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                          const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

std::atomic<bool> blas_on{true};  // use_blas(false): the ATen path (tests of the fallback)

template <typename T>
bool have_blas() {
  return blas_on.load(std::memory_order_relaxed) && (std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr);
}

// ---- small GEMMs. At the sizes of small experts (tens of rows, widths of 32..256) a BLAS call spends more on
// its fixed costs (argument checks, packing both operands into panels) than on the arithmetic: MKL reaches
// 25-50 GFLOP/s on a 64 x 32 x 64 product on one core that gives it 75 at 512 rows. These operands fit in
// the L1/L2 caches as they are, so a register-blocked kernel reads them in place: a tile of MR rows x two
// 256-bit vectors of C is kept in 2 MR registers while the k products are summed into it (B's row
// segment loaded once per p, A's MR values broadcast), the classic BLIS micro-kernel without the packing.
// GCC/Clang vector types keep it portable (a 256-bit vector is two 128-bit ones on SSE or NEON).

// C[:MR, :NV lanes] = A (MR, k) B (k, NV lanes) (+ C when acc); A(i, p) = A[i ras + p cas], B row-major.
template <typename T, int MR, int NV>
inline void gemm_tile(int64_t k, const T* A, int64_t ras, int64_t cas, const T* B, int64_t ldb, bool acc, T* C,
                      int64_t ldc) {
  using V = vec_t<T>;
  constexpr int L = sizeof(V) / sizeof(T);
  V c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) c[i][v] = V{};
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + p * ldb + v * L);
    const T* a = A + p * cas;
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i * ras];
      for (int v = 0; v < NV; ++v) c[i][v] += ai * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      T* o = C + i * ldc + v * L;
      vstore(o, acc ? c[i][v] + vload(o) : c[i][v]);
    }
}

// every row block of one column panel of NV vectors
template <typename T, int NV>
void gemm_panel(int64_t m, int64_t k, const T* A, int64_t ras, int64_t cas, const T* B, int64_t ldb, bool acc, T* C,
                int64_t ldc) {
  constexpr int MR = 6;  // 2 x 6 accumulators + 2 of B + 1 broadcast: the 16 registers of AVX2
  int64_t i = 0;
  for (; i + MR <= m; i += MR) gemm_tile<T, MR, NV>(k, A + i * ras, ras, cas, B, ldb, acc, C + i * ldc, ldc);
  const T* a = A + i * ras;
  T* c = C + i * ldc;
  switch (m - i) {
    case 5: gemm_tile<T, 5, NV>(k, a, ras, cas, B, ldb, acc, c, ldc); break;
    case 4: gemm_tile<T, 4, NV>(k, a, ras, cas, B, ldb, acc, c, ldc); break;
    case 3: gemm_tile<T, 3, NV>(k, a, ras, cas, B, ldb, acc, c, ldc); break;
    case 2: gemm_tile<T, 2, NV>(k, a, ras, cas, B, ldb, acc, c, ldc); break;
    case 1: gemm_tile<T, 1, NV>(k, a, ras, cas, B, ldb, acc, c, ldc); break;
    default: break;
  }
}

// C (m, n) = A (m, k) B (k, n) (+ C when acc), B and C row-major, A(i, p) = A[i ras + p cas]
template <typename T>
void small_gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t ras, int64_t cas, const T* B, int64_t ldb,
                bool acc, T* C, int64_t ldc) {
  constexpr int64_t L = sizeof(vec_t<T>) / sizeof(T);
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) gemm_panel<T, 2>(m, k, A, ras, cas, B + j, ldb, acc, C + j, ldc);
  for (; j + L <= n; j += L) gemm_panel<T, 1>(m, k, A, ras, cas, B + j, ldb, acc, C + j, ldc);
  for (; j < n; ++j)  // the last n mod L columns
    for (int64_t i = 0; i < m; ++i) {
      T s = acc ? C[i * ldc + j] : T(0);
      for (int64_t p = 0; p < k; ++p) s += A[i * ras + p * cas] * B[p * ldb + j];
      C[i * ldc + j] = s;
    }
}

// Operands up to this many bytes take small_gemm (B: its (k, n) panel, read once per row block; A: re-read
// once per column panel); 0: never. Set by the small_gemm_limit op (tests, benchmarks).
std::atomic<int64_t> small_limit{64 * 1024};

// Row-major C (m, n) = op(A) op(B) + beta C, op(A) (m, k), op(B) (k, n); A stored (m, k) (or (k, m) when ta),
// B stored (k, n) (or (n, k) when tb), leading dimensions in elements. beta is 0 or 1.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == T(0))
      for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, T(0));
    return;
  }
  const int64_t lim = small_limit.load(std::memory_order_relaxed);
  if (static_cast<int64_t>(sizeof(T)) * std::max(k * n, m * k) <= lim) {
    if (tb) {  // op(B) = B^T: a row-major copy of it (a few KB) for the kernel's vector loads along n
      thread_local std::vector<T> bt;
      bt.resize(static_cast<size_t>(k * n));
      for (int64_t j = 0; j < n; ++j)
        for (int64_t p = 0; p < k; ++p) bt[p * n + j] = B[j * ldb + p];
      small_gemm<T>(m, n, k, A, ta ? 1 : lda, ta ? lda : 1, bt.data(), n, beta != T(0), C, ldc);
    } else {
      small_gemm<T>(m, n, k, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, beta != T(0), C, ldc);
    }
    return;
  }
  if (have_blas<T>() && std::max({m, n, k, lda, ldb, ldc}) < std::numeric_limits<int>::max()) {
    // column-major: C^T (n, m) = op(B)^T op(A)^T; a row-major (r, c) block is a column-major (c, r) one
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const T one = 1;
    fortran_gemm<T>(tb ? "T" : "N", ta ? "T" : "N", &M, &N, &K, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t r, int64_t c, int64_t ld, bool t) {
    return t ? at::from_blob(const_cast<T*>(p), {r, c}, {1, ld}, opt)
             : at::from_blob(const_cast<T*>(p), {r, c}, {ld, 1}, opt);
  };
  Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  c.addmm_(view(A, m, k, lda, ta), view(B, k, n, ldb, tb), beta, 1);
}

enum Act : int64_t { kIdentity = 0, kGelu = 1, kRelu = 2, kSilu = 3, kTanh = 4, kSigmoid = 5 };

Tensor act_forward(const Tensor& a, int64_t act) {
  switch (act) {
    case kIdentity: return a;
    case kGelu: return at::gelu(a);
    case kRelu: return at::relu(a);
    case kSilu: return at::silu(a);
    case kTanh: return at::tanh(a);
    case kSigmoid: return at::sigmoid(a);
  }
  TORCH_CHECK(false, "grouped_mlp: unknown activation code ", act);
}

// the reference path's backward formula of each activation (autograd's own), from a = pre-activation, h = act(a)
Tensor act_backward(const Tensor& g, const Tensor& a, const Tensor& h, int64_t act) {
  switch (act) {
    case kIdentity: return g;
    case kGelu: return at::gelu_backward(g, a);
    case kRelu: return at::threshold_backward(g, h, 0);
    case kSilu: return at::silu_backward(g, a);
    case kTanh: return at::tanh_backward(g, h);
    case kSigmoid: return at::sigmoid_backward(g, h);
  }
  TORCH_CHECK(false, "grouped_mlp: unknown activation code ", act);
}

std::vector<int64_t> group_bounds(const Tensor& offsets_, int64_t rows, int64_t e, const char* op) {
  TORCH_CHECK(offsets_.device().is_cpu() && offsets_.dim() == 1 && offsets_.numel() == e &&
                  (offsets_.scalar_type() == at::kLong || offsets_.scalar_type() == at::kInt),
              op, ": offsets must be a 1-D int32/int64 CPU tensor of ", e, " end rows, got ", offsets_.scalar_type(),
              " of shape ", offsets_.sizes());
  const Tensor off = offsets_.to(at::kLong).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  std::vector<int64_t> b(static_cast<size_t>(e + 1), 0);
  for (int64_t i = 0; i < e; ++i) {
    TORCH_CHECK(o[i] >= b[i] && o[i] <= rows, op, ": offsets must be non-decreasing end rows in [0, ", rows,
                "], got offsets[", i, "] = ", o[i]);
    b[i + 1] = o[i];
  }
  TORCH_CHECK(b[e] == rows, op, ": the last offset (", b[e], ") must be the row count ", rows);
  return b;
}

void check_mlp(const Tensor& xs, const Tensor& w1, const Tensor& w2, const char* op) {
  TORCH_CHECK(xs.device().is_cpu() && (xs.scalar_type() == at::kFloat || xs.scalar_type() == at::kDouble) &&
                  xs.dim() == 2,
              op, ": rows must be a 2-D float32/float64 CPU tensor, got ", xs.scalar_type(), " ", xs.sizes());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3 && w1.size(1) == xs.size(1) && w2.size(0) == w1.size(0) &&
                  w2.size(1) == w1.size(2),
              op, ": w1 (E, in, h) and w2 (E, h, out) do not fit rows of width ", xs.size(1), ": ", w1.sizes(),
              ", ", w2.sizes());
  TORCH_CHECK(w1.scalar_type() == xs.scalar_type() && w2.scalar_type() == xs.scalar_type(), op,
              ": weights and rows must share a dtype, got ", w1.scalar_type(), ", ", w2.scalar_type(), " and ",
              xs.scalar_type());
}

// out rows [b, e) = bias[g] (or zero): the GEMM then accumulates onto it
template <typename T>
void fill_rows(T* out, int64_t b, int64_t e, int64_t f, const T* bias) {
  for (int64_t r = b; r < e; ++r) {
    T* o = out + r * f;
    if (bias == nullptr) {
      std::fill(o, o + f, T(0));
    } else {
      std::memcpy(o, bias, sizeof(T) * f);
    }
  }
}

// xs (R, in) rows sorted by expert -> ys (R, out) = act(xs W1_e + b1_e) W2_e + b2_e, a (R, h) the
// pre-activation, h (R, h) = act(a) (saved for the backward).
std::tuple<Tensor, Tensor, Tensor> grouped_mlp(const Tensor& xs_, const Tensor& offsets, const Tensor& w1_,
                                               const std::optional<Tensor>& b1_, const Tensor& w2_,
                                               const std::optional<Tensor>& b2_, int64_t act) {
  RECORD_FUNCTION("moelab::grouped_mlp", std::vector<c10::IValue>());  // named in profiles when called inside an op
  check_mlp(xs_, w1_, w2_, "grouped_mlp");
  const Tensor xs = xs_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const Tensor b1 = b1_.has_value() ? b1_->contiguous() : Tensor(), b2 = b2_.has_value() ? b2_->contiguous() : Tensor();
  const int64_t r = xs.size(0), in = xs.size(1), e = w1.size(0), hd = w1.size(2), out = w2.size(2);
  const std::vector<int64_t> g = group_bounds(offsets, r, e, "grouped_mlp");
  Tensor a = at::empty({r, hd}, xs.options()), ys = at::empty({r, out}, xs.options());
  Tensor h;
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "grouped_mlp", [&] {
    using T = scalar_t;
    const T *X = xs.data_ptr<T>(), *W1 = w1.data_ptr<T>(), *W2 = w2.data_ptr<T>();
    const T* B1 = b1.defined() ? b1.data_ptr<T>() : nullptr;
    const T* B2 = b2.defined() ? b2.data_ptr<T>() : nullptr;
    T *Ap = a.data_ptr<T>(), *Yp = ys.data_ptr<T>();
    for (int64_t x = 0; x < e; ++x) {
      const int64_t s = g[x], n = g[x + 1] - s;
      if (n == 0) continue;
      fill_rows(Ap, s, s + n, hd, B1 ? B1 + x * hd : nullptr);
      gemm_rm<T>(false, false, n, hd, in, X + s * in, in, W1 + x * in * hd, hd, T(1), Ap + s * hd, hd);
    }
    h = act_forward(a, act);
    const T* H = h.data_ptr<T>();
    for (int64_t x = 0; x < e; ++x) {
      const int64_t s = g[x], n = g[x + 1] - s;
      if (n == 0) continue;
      fill_rows(Yp, s, s + n, out, B2 ? B2 + x * out : nullptr);
      gemm_rm<T>(false, false, n, out, hd, H + s * hd, hd, W2 + x * hd * out, out, T(1), Yp + s * out, out);
    }
  });
  return {ys, a, h};
}

// column sums of rows [s, s + n) of m (rows, f) into o (f,)
template <typename T>
void column_sums(const T* m, int64_t s, int64_t n, int64_t f, T* o) {
  std::fill(o, o + f, T(0));
  for (int64_t r = s; r < s + n; ++r) {
    const T* row = m + r * f;
_Pragma("omp simd")
    for (int64_t c = 0; c < f; ++c) o[c] += row[c];
  }
}

// Gradients of grouped_mlp from gys (R, out): (grad xs or undefined, gw1, gb1 or undefined, gw2, gb2 or undefined)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_mlp_backward(
    const Tensor& gys_, const Tensor& xs_, const Tensor& a_, const Tensor& h_, const Tensor& offsets,
    const Tensor& w1_, const Tensor& w2_, bool has_b1, bool has_b2, int64_t act, bool need_x) {
  RECORD_FUNCTION("moelab::grouped_mlp_backward", std::vector<c10::IValue>());  // named in profiles when called inside an op
  check_mlp(xs_, w1_, w2_, "grouped_mlp_backward");
  const Tensor gys = gys_.contiguous().to(xs_.scalar_type()), xs = xs_.contiguous(), a = a_.contiguous();
  const Tensor h = h_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const int64_t r = xs.size(0), in = xs.size(1), e = w1.size(0), hd = w1.size(2), out = w2.size(2);
  TORCH_CHECK(gys.dim() == 2 && gys.size(0) == r && gys.size(1) == out && a.sizes() == h.sizes() &&
                  a.size(0) == r && a.size(1) == hd,
              "grouped_mlp_backward: gradient ", gys.sizes(), " / activations ", a.sizes(), " do not fit ", r,
              " rows of widths ", hd, ", ", out);
  const std::vector<int64_t> g = group_bounds(offsets, r, e, "grouped_mlp_backward");
  Tensor gw1 = at::empty(w1.sizes(), xs.options()), gw2 = at::empty(w2.sizes(), xs.options());
  Tensor gb1 = has_b1 ? at::empty({e, hd}, xs.options()) : Tensor();
  Tensor gb2 = has_b2 ? at::empty({e, out}, xs.options()) : Tensor();
  Tensor gh = at::empty({r, hd}, xs.options());
  Tensor gxs = need_x ? at::empty({r, in}, xs.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "grouped_mlp_backward", [&] {
    using T = scalar_t;
    const T *X = xs.data_ptr<T>(), *H = h.data_ptr<T>(), *GY = gys.data_ptr<T>();
    const T *W1 = w1.data_ptr<T>(), *W2 = w2.data_ptr<T>();
    T *GW1 = gw1.data_ptr<T>(), *GW2 = gw2.data_ptr<T>(), *GH = gh.data_ptr<T>();
    T* GB1 = has_b1 ? gb1.data_ptr<T>() : nullptr;
    T* GB2 = has_b2 ? gb2.data_ptr<T>() : nullptr;
    for (int64_t x = 0; x < e; ++x) {
      const int64_t s = g[x], n = g[x + 1] - s;
      T* gw2x = GW2 + x * hd * out;
      gemm_rm<T>(true, false, hd, out, n, H + s * hd, hd, GY + s * out, out, T(0), gw2x, out);  // h^T gy
      if (GB2) column_sums(GY, s, n, out, GB2 + x * out);
      gemm_rm<T>(false, true, n, hd, out, GY + s * out, out, W2 + x * hd * out, out, T(0), GH + s * hd, hd);
    }
    const Tensor ga = act_backward(gh, a, h, act).contiguous();
    const T* GA = ga.data_ptr<T>();
    T* GX = need_x ? gxs.data_ptr<T>() : nullptr;
    for (int64_t x = 0; x < e; ++x) {
      const int64_t s = g[x], n = g[x + 1] - s;
      gemm_rm<T>(true, false, in, hd, n, X + s * in, in, GA + s * hd, hd, T(0), GW1 + x * in * hd, hd);  // x^T ga
      if (GB1) column_sums(GA, s, n, hd, GB1 + x * hd);
      if (GX) gemm_rm<T>(false, true, n, in, hd, GA + s * hd, hd, W1 + x * in * hd, hd, T(0), GX + s * in, in);
    }
  });
  return {gxs, gw1, gb1, gw2, gb2};
}


// ------------------------------------------------------------------------------ the sparse MLP layer

// y[n] = sum_j w[n, j] mlp_{e(n, j)}(x[n]): gather -> grouped_mlp -> combine, one op (no autograd: inference)
Tensor sparse_mlp(const Tensor& x, const Tensor& weights, const Tensor& w1, const std::optional<Tensor>& b1,
                  const Tensor& w2, const std::optional<Tensor>& b2, const Tensor& row_token,
                  const Tensor& assign_row, const Tensor& row_assign, const Tensor& offsets, int64_t act) {
  const Tensor xs = gather_rows(x, row_token, x.scalar_type());
  return combine(std::get<0>(grouped_mlp(xs, offsets, w1, b1, w2, b2, act)), assign_row, weights);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The autograd of sparse_mlp and topk_softmax in C++: one node each, no Python between the kernels.
struct SparseMLPFn : public torch::autograd::Function<SparseMLPFn> {
  // (an absent bias is an empty optional: autograd then gives it no edge; x and weights are edges 0 and 1)
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weights, const Tensor& w1,
                        const std::optional<Tensor>& b1, const Tensor& w2, const std::optional<Tensor>& b2,
                        const Tensor& row_token, const Tensor& assign_row, const Tensor& row_assign,
                        const Tensor& offsets, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Tensor xs = gather_rows(x, row_token, x.scalar_type());  // (R, in)
    auto [ys, a, h] = grouped_mlp(xs, offsets, w1, b1, w2, b2, act);
    ctx->save_for_backward({xs, a, h, ys, weights, w1, w2, assign_row, row_assign, offsets});
    ctx->saved_data["act"] = act;
    ctx->saved_data["k"] = weights.size(1);
    ctx->saved_data["b1"] = b1.has_value() && b1->defined();
    ctx->saved_data["b2"] = b2.has_value() && b2->defined();
    return combine(ys, assign_row, weights);  // (N, out)
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &xs = saved[0], &a = saved[1], &h = saved[2], &ys = saved[3], &weights = saved[4];
    const Tensor &w1 = saved[5], &w2 = saved[6], &assign_row = saved[7], &row_assign = saved[8];
    const Tensor& offsets = saved[9];
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    Tensor gy = grads[0];
    if (!gy.defined()) gy = at::zeros({weights.size(0), w2.size(2)}, xs.options());
    auto [gys, gw] = combine_backward(gy, ys, assign_row, row_assign, weights, true, need_w);
    auto [gxs, gw1, gb1, gw2, gb2] =
        grouped_mlp_backward(gys, xs, a, h, offsets, w1, w2, ctx->saved_data["b1"].toBool(),
                             ctx->saved_data["b2"].toBool(), ctx->saved_data["act"].toInt(), need_x);
    const Tensor gx = need_x ? gather_sum(gxs, assign_row, ctx->saved_data["k"].toInt(), xs.scalar_type()) : Tensor();
    return {gx, need_w ? gw : Tensor(), gw1, gb1, gw2, gb2, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor sparse_mlp_autograd(const Tensor& x, const Tensor& weights, const Tensor& w1, const std::optional<Tensor>& b1,
                           const Tensor& w2, const std::optional<Tensor>& b2, const Tensor& row_token,
                           const Tensor& assign_row, const Tensor& row_assign, const Tensor& offsets, int64_t act) {
  auto some = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined() ? t : std::nullopt; };
  return SparseMLPFn::apply(x, weights, w1, some(b1), w2, some(b2), row_token, assign_row, row_assign, offsets, act);
}

struct TopKSoftmaxFn : public torch::autograd::Function<TopKSoftmaxFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, int64_t k, bool normalize) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [indices, weights, lse, psum, ent, counts, bad, balance] = topk_softmax(logits, k, normalize);
    ctx->save_for_backward({logits, ent, indices, weights, counts});
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["k"] = k;
    ctx->mark_non_differentiable({indices, counts, bad});
    ctx->set_materialize_grads(false);  // an output nothing reads gets no zero gradient (6 tensors a step)
    return {indices, weights, lse, psum, ent, counts, bad, balance};
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto s = ctx->get_saved_variables();
    auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    Tensor g_psum = g[3];
    if (g[7].defined()) {  // d balance / d psum_i = E counts_i / (N^2 k): into psum's gradient, one small pass
      const int64_t n = s[0].size(0), e = s[0].size(1), k = ctx->saved_data["k"].toInt();
      const double c = n ? static_cast<double>(e) / (static_cast<double>(n) * n * k) : 0.0;
      const double gb = g[7].item<double>() * c;
      const Tensor counts = s[4].contiguous(), prev = g_psum.defined() ? g_psum.to(at::kDouble).contiguous() : Tensor();
      g_psum = at::empty({e}, s[0].options());
      AT_DISPATCH_FLOATING_TYPES(s[0].scalar_type(), "topk_softmax_balance_grad", [&] {
        scalar_t* o = g_psum.data_ptr<scalar_t>();
        const int64_t* cn = counts.data_ptr<int64_t>();
        const double* pv = prev.defined() ? prev.data_ptr<double>() : nullptr;
        for (int64_t i = 0; i < e; ++i) o[i] = static_cast<scalar_t>((pv ? pv[i] : 0.0) + static_cast<double>(cn[i]) * gb);
      });
    }
    Tensor grad = topk_softmax_backward(s[0], s[1], s[2], s[3], ctx->saved_data["normalize"].toBool(), opt(g[1]),
                                        opt(g[2]), opt(g_psum), opt(g[4]));
    return {grad, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> topk_softmax_autograd(const Tensor& logits, int64_t k,
                                                                                 bool normalize) {
  auto out = TopKSoftmaxFn::apply(logits, k, normalize);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
}


}  // namespace

TORCH_LIBRARY(moelab, m) {
  m.def("topk_softmax(Tensor logits, int k, bool normalize) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
  m.def("topk_softmax_backward(Tensor logits, Tensor ent, Tensor indices, Tensor weights, "
        "bool normalize, Tensor? g_w, Tensor? g_lse, Tensor? g_psum, Tensor? g_ent) -> Tensor");
  m.def("sort_plan(Tensor flat, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def("expert_rows(Tensor flat, int k, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bucket_rows(Tensor order, Tensor expert, Tensor start, int num_rows, int num_tokens, int k, "
        "int num_assign) -> (Tensor, Tensor, Tensor)");
  m.def("gather_rows(Tensor x, Tensor index, ScalarType dtype) -> Tensor");
  m.def("gather_sum(Tensor grad, Tensor rows, int k, ScalarType dtype) -> Tensor");
  m.def("combine(Tensor ye, Tensor rows, Tensor w) -> Tensor");
  m.def("combine_backward(Tensor grad, Tensor ye, Tensor rows, Tensor row_assign, Tensor w, bool need_ye, "
        "bool need_w) -> (Tensor, Tensor)");
  m.def("permute_cast(Tensor w, Tensor perm, ScalarType dtype) -> Tensor");
  m.def("grouped_mlp(Tensor xs, Tensor offsets, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("grouped_mlp_backward(Tensor gys, Tensor xs, Tensor a, Tensor h, Tensor offsets, Tensor w1, Tensor w2, "
        "bool has_b1, bool has_b2, int act, bool need_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sparse_mlp(Tensor x, Tensor weights, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor row_token, "
        "Tensor assign_row, Tensor row_assign, Tensor offsets, int act) -> Tensor");
  m.def("blas() -> bool", [] { return have_blas<float>() && have_blas<double>(); });  // BLAS GEMMs, not ATen
  m.def("use_blas(bool on) -> bool", [](bool on) { return blas_on.exchange(on); });  // -> the previous setting
  m.def("small_gemm_limit(int bytes) -> int", [](int64_t b) { return small_limit.exchange(b); });  // -> previous
}

TORCH_LIBRARY_IMPL(moelab, CPU, m) {
  m.impl("topk_softmax", &topk_softmax);
  m.impl("topk_softmax_backward", &topk_softmax_backward);
  m.impl("sort_plan", &sort_plan);
  m.impl("expert_rows", &expert_rows);
  m.impl("bucket_rows", &bucket_rows);
  m.impl("gather_rows", &gather_rows);
  m.impl("gather_sum", &gather_sum);
  m.impl("combine", &combine);
  m.impl("combine_backward", &combine_backward);
  m.impl("permute_cast", &permute_cast);
  m.impl("grouped_mlp", &grouped_mlp);
  m.impl("grouped_mlp_backward", &grouped_mlp_backward);
  m.impl("sparse_mlp", &sparse_mlp);
}

TORCH_LIBRARY_IMPL(moelab, Autograd, m) {
  m.impl("topk_softmax", &topk_softmax_autograd);
  m.impl("sparse_mlp", &sparse_mlp_autograd);
}

