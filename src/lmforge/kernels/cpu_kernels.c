/* Kernels for bf16/fp16 training on a CPU, where torch's operators spend more time in
 * dispatch, threading and memory passes than in arithmetic at small sizes:
 *
 * - causal attention for short sequences: softmax(q·kᵀ/√D)·v and its backward.
 *
 * (LayerNorm and GELU kernels were tried: faster alone, not in a training step; see
 * benchmarks/LOG.md.)
 *
 * Plain C (no torch headers, so it compiles in about a second; written for GCC 9 or
 * later), loaded with ctypes by `lmforge.kernels`. All math is fp32; inputs and outputs are bf16 or fp16.
 *
 * Attention inputs and outputs are bf16 or fp16 tensors given as a pointer and
 * element strides (head dimension contiguous), so q, k and v can be read straight from
 * the fused projection's output and the results written in the layout the next matmul
 * reads: no permuting copies. The math is fp32, one (batch, head) pair at a time, with
 * that pair's q, k, v and scores in the core's cache; OpenMP spreads the pairs over the
 * threads of the process's one OpenMP runtime (torch's: same soname, loaded first).
 *
 * Forward saves the probabilities P (B, H, T, T) fp32 (upper triangle zero); backward
 * reads them instead of recomputing the scores.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_BF16 = 0, DT_F16 = 1 };

typedef struct {
    const uint16_t *ptr;
    int64_t sb, sh, st; /* strides of batch, head and time, in elements */
} view_t;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(u >> 16);
}

/* IEEE half <-> float by bit manipulation (GCC before 12 has no _Float16 on x86):
 * exponent rebiasing, subnormals through a float add/subtract with a magic constant,
 * rounding to nearest even; infinities and NaN kept. */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t u = ((uint32_t)h & 0x7fffu) << 13;
    const uint32_t exp = u & shifted_exp;
    u += (127u - 15u) << 23;
    float f;
    if (exp == shifted_exp) {
        u += (128u - 16u) << 23; /* infinity or NaN */
        memcpy(&f, &u, 4);
    } else if (exp == 0) {
        u += 1u << 23; /* zero or subnormal: renormalise */
        const uint32_t magic_u = 113u << 23;
        float magic;
        memcpy(&f, &u, 4);
        memcpy(&magic, &magic_u, 4);
        f -= magic;
    } else {
        memcpy(&f, &u, 4);
    }
    uint32_t out;
    memcpy(&out, &f, 4);
    out |= ((uint32_t)h & 0x8000u) << 16;
    memcpy(&f, &out, 4);
    return f;
}

static inline uint16_t f32_to_f16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint16_t o;
    if (u >= (127u + 16u) << 23) { /* too large for half: infinity, or NaN */
        o = u > (255u << 23) ? 0x7e00u : 0x7c00u;
    } else if (u < 113u << 23) { /* half subnormal or zero: let the float add round */
        const uint32_t magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        float f, magic;
        memcpy(&f, &u, 4);
        memcpy(&magic, &magic_u, 4);
        f += magic;
        memcpy(&u, &f, 4);
        o = (uint16_t)(u - magic_u);
    } else {
        const uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd; /* rebias and round to even */
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

static void load_row(float *dst, const uint16_t *src, int n, int dtype) {
    if (dtype == DT_BF16)
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    else
        for (int i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

static void store_row(uint16_t *dst, const float *src, int n, int dtype) {
    if (dtype == DT_BF16)
        for (int i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
    else
        for (int i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

/* exp(x) for x <= 0 (softmax after subtracting the row maximum): Cody-Waite reduction
 * and a degree-6 polynomial (Cephes' expf), within 2 ulp of expf. See vexp_nonpos. */

static inline const uint16_t *at(const view_t *v, int b, int h, int t) {
    return v->ptr + b * v->sb + h * v->sh + t * v->st;
}

/* Work is done on fp32 blocks padded to multiples of VL in time and head dimension
 * (zeros in the padding), in register tiles of 4 rows by VL columns. */
#define VL 16
typedef float vec __attribute__((vector_size(VL * sizeof(float))));

static inline vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }

int lmf_block(void) { return VL; }

static inline int padded(int n) { return (n + VL - 1) / VL * VL; }

/* One register tile: out[r][0:VL] = Σ_k s[r·s_row + k·s_step] · v[k·v_step : +VL] for
 * r < 4. The three products below are this tile over different operands. */
static inline void tile4(const float *s, int s_row, int s_step, const float *v, int v_step,
                         int K, float *out, int out_row) {
    vec c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
    for (int k = 0; k < K; k++) {
        const vec x = vload(v + k * v_step);
        const float *sk = s + k * s_step;
        c0 += sk[0] * x;
        c1 += sk[s_row] * x;
        c2 += sk[2 * s_row] * x;
        c3 += sk[3 * s_row] * x;
    }
    vstore(out, c0);
    vstore(out + out_row, c1);
    vstore(out + 2 * out_row, c2);
    vstore(out + 3 * out_row, c3);
}

/* S[i][j] = Σ_d A[i][d]·Bt[d][j] (A: Tp×Dp, Bt: Dp×Tp, S: Tp×Tp), for the column blocks
 * that hold some j <= i; the others are not written. */
static void gemm_abt_causal(const float *A, const float *Bt, float *S, int Tp, int Dp) {
    for (int i0 = 0; i0 < Tp; i0 += 4)
        for (int j0 = 0; j0 < i0 + 4; j0 += VL)
            tile4(A + i0 * Dp, Dp, 1, Bt + j0, Tp, Dp, S + i0 * Tp + j0, Tp);
}

/* out[i] = Σ_{j < i0 + 4} M[i][j]·V[j] (M: Tp×Tp, zero above the diagonal; V, out: Tp×Dp). */
static void gemm_ab_causal(const float *M, const float *V, float *out, int Tp, int Dp) {
    for (int i0 = 0; i0 < Tp; i0 += 4)
        for (int d0 = 0; d0 < Dp; d0 += VL)
            tile4(M + i0 * Tp, Tp, 1, V + d0, Dp, i0 + 4, out + i0 * Dp + d0, Dp);
}

/* out[j] = Σ_{i >= j0} M[i][j]·A[i] (Mᵀ·A; M: Tp×Tp, zero above the diagonal). */
static void gemm_atb_causal(const float *M, const float *A, float *out, int Tp, int Dp) {
    for (int j0 = 0; j0 < Tp; j0 += 4)
        for (int d0 = 0; d0 < Dp; d0 += VL)
            tile4(M + j0 * Tp + j0, 1, Tp, A + j0 * Dp + d0, Dp, Tp - j0, out + j0 * Dp + d0, Dp);
}

/* Rows t < T of a (B, H, T, D) view into dst (Tp×Dp, row-major), times `mul`. */
static void load_rows(float *dst, const view_t *src, int b, int h, int T, int D, int Dp,
                      int dtype, float mul) {
    for (int t = 0; t < T; t++) {
        float *row = dst + t * Dp;
        load_row(row, at(src, b, h, t), D, dtype);
        if (mul != 1.0f)
            for (int d = 0; d < D; d++) row[d] *= mul;
    }
}

/* Rows t < T of a (B, H, T, D) view into dst transposed (Dp×Tp); tmp holds VL·D
 * floats. Blocks of VL rows are converted, then written out column by column, so the
 * stores are whole vectors. */
static void load_rows_t(float *dst, const view_t *src, int b, int h, int T, int D, int Tp,
                        int dtype, float *tmp) {
    for (int t0 = 0; t0 < T; t0 += VL) {
        const int nt = T - t0 < VL ? T - t0 : VL;
        for (int t = 0; t < nt; t++) load_row(tmp + t * D, at(src, b, h, t0 + t), D, dtype);
        for (int t = nt; t < VL; t++) memset(tmp + t * D, 0, sizeof(float) * (size_t)D);
        for (int d = 0; d < D; d++) {
            vec col;
            for (int t = 0; t < VL; t++) col[t] = tmp[t * D + d];
            vstore(dst + d * Tp + t0, col);
        }
    }
}

static void store_rows(const view_t *dst, const float *src, int b, int h, int T, int D, int Dp,
                       int dtype, float mul, float *tmp) {
    for (int t = 0; t < T; t++) {
        const float *row = src + t * Dp;
        if (mul != 1.0f) {
            for (int d = 0; d < D; d++) tmp[d] = row[d] * mul;
            row = tmp;
        }
        store_row((uint16_t *)at(dst, b, h, t), row, D, dtype);
    }
}

typedef int32_t ivec __attribute__((vector_size(VL * sizeof(int32_t))));
static const ivec IOTA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline vec splat(float x) { return (vec){0} + x; }

static inline vec blend(ivec take_a, vec a, vec b) { /* take_a: lanes of -1 or 0 */
    return (vec)(((ivec)a & take_a) | ((ivec)b & ~take_a));
}

/* exp_nonpos on a vector. */
static inline vec vexp_nonpos(vec x) {
    x = blend(x < -87.0f, splat(-87.0f), x);
    const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vec r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vec)((__builtin_convertvector(n, ivec) + 127) << 23);
}

/* Horizontal sum and maximum in four shuffle steps (a lane-by-lane loop is a chain of
 * sixteen dependent adds: half a short row's time). */
#if defined(__clang__) || (__GNUC__ >= 12 && !defined(LMF_GCC_SHUFFLE))
#define SHUF(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else /* GCC before 12 */
#define SHUF(v, ...) __builtin_shuffle(v, (ivec){__VA_ARGS__})
#endif
#define SWAP8(v) SHUF(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
#define SWAP4(v) SHUF(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
#define SWAP2(v) SHUF(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
#define SWAP1(v) SHUF(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)

static inline vec vmax(vec a, vec b) { return blend(a > b, a, b); }

static inline float hsum(vec v) {
    v += SWAP8(v);
    v += SWAP4(v);
    v += SWAP2(v);
    v += SWAP1(v);
    return v[0];
}

static inline float hmax(vec v) {
    v = vmax(v, SWAP8(v));
    v = vmax(v, SWAP4(v));
    v = vmax(v, SWAP2(v));
    v = vmax(v, SWAP1(v));
    return v[0];
}

/* Softmax of the causal part of each row of S (Tp×Tp) in place, zeros past the diagonal
 * up to the end of the diagonal's vector (all that the matmuls read; padding rows
 * i >= T are zeroed whole). Four rows at a time: each row is a chain of dependent steps
 * (maximum, exponentials, sum, reciprocal), and four independent chains overlap (one row
 * at a time ran at half the speed). Four rows share their vector count: they lie in one
 * block of VL. Whole vectors, masked: no row ends in a scalar loop. */
static void causal_softmax(float *S, int T, int Tp) {
    for (int i0 = 0; i0 < Tp; i0 += 4) {
        const int nb = padded(i0 + 1);
        int n[4];
        vec vm[4];
        for (int q = 0; q < 4; q++) {
            n[q] = i0 + q < T ? i0 + q + 1 : 0;
            vm[q] = splat(-3.0e38f);
        }
        for (int j0 = 0; j0 < nb; j0 += VL)
            for (int q = 0; q < 4; q++) {
                const vec x = vload(S + (i0 + q) * Tp + j0);
                vm[q] = blend((IOTA + j0 < n[q]) & (x > vm[q]), x, vm[q]);
            }
        float m[4];
        vec vs[4];
        for (int q = 0; q < 4; q++) m[q] = hmax(vm[q]), vs[q] = splat(0.0f);
        for (int j0 = 0; j0 < nb; j0 += VL)
            for (int q = 0; q < 4; q++) {
                float *s = S + (i0 + q) * Tp + j0;
                const ivec keep = IOTA + j0 < n[q];
                const vec e = (vec)((ivec)vexp_nonpos(blend(keep, vload(s) - m[q], splat(-87.0f))) & keep);
                vstore(s, e);
                vs[q] += e;
            }
        float inv[4];
        for (int q = 0; q < 4; q++) inv[q] = n[q] ? 1.0f / hsum(vs[q]) : 0.0f;
        for (int j0 = 0; j0 < nb; j0 += VL)
            for (int q = 0; q < 4; q++) {
                float *s = S + (i0 + q) * Tp + j0;
                vstore(s, vload(s) * inv[q]);
            }
        for (int q = 0; q < 4; q++)
            if (!n[q]) memset(S + (i0 + q) * Tp, 0, sizeof(float) * (size_t)Tp);
    }
}

/* dS = P∘(dP − rowsum(P∘dP)) in place over dP, four rows at a time as above. dP holds
 * finite values in the column blocks up to the diagonal's (written by gemm_abt_causal),
 * and P zeros past the diagonal, so whole vectors need no mask. Padding rows: zero. */
static void softmax_backward(const float *P, float *dP, int T, int Tp) {
    for (int i0 = 0; i0 < Tp; i0 += 4) {
        const int nb = i0 < T ? padded(i0 + 1) : 0;
        vec vd[4] = {{0}};
        for (int j0 = 0; j0 < nb; j0 += VL)
            for (int q = 0; q < 4; q++)
                vd[q] += vload(P + (i0 + q) * Tp + j0) * vload(dP + (i0 + q) * Tp + j0);
        float delta[4];
        for (int q = 0; q < 4; q++) delta[q] = hsum(vd[q]);
        for (int j0 = 0; j0 < nb; j0 += VL)
            for (int q = 0; q < 4; q++) {
                float *g = dP + (i0 + q) * Tp + j0;
                vstore(g, vload(P + (i0 + q) * Tp + j0) * (vload(g) - delta[q]));
            }
        for (int q = 0; q < 4; q++)
            if (i0 + q >= T) memset(dP + (i0 + q) * Tp, 0, sizeof(float) * (size_t)Tp);
    }
}

static float *workspace(size_t n_floats) {
    return aligned_alloc(64, (n_floats * sizeof(float) + 63) / 64 * 64);
}

/* One (b, h) pair forward: S = (q·scale)·kᵀ, P = softmax(S) (saved), y = P·v. */
/* The arguments of one attention call, shared by every (b, h) pair. `y` is the output
 * (forward) or its gradient (backward); dq, dk and dv are used by the backward only. */
typedef struct {
    view_t q, k, v, y, dq, dk, dv;
    float *P; /* (B·H, Tp, Tp) probabilities: written forward, read backward */
    int H, T, D, dtype;
    float scale;
} attn_call_t;

typedef void (*pair_fn)(const attn_call_t *c, int b, int h, float *P, float *ws);

/* Run `pair` over the B·H (b, h) pairs on n_threads threads, each with a workspace of
 * ws_floats floats. Returns 0, or -1 when a thread's workspace could not be allocated. */
static int over_pairs(pair_fn pair, const attn_call_t *c, int B, size_t ws_floats,
                      int n_threads) {
    const int Tp = padded(c->T);
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        float *ws = workspace(ws_floats);
        if (!ws) failed = 1;
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * c->H; bh++) {
            if (ws) pair(c, bh / c->H, bh % c->H, c->P + (int64_t)bh * Tp * Tp, ws);
        }
        free(ws);
    }
    return failed ? -1 : 0;
}

static void forward_pair(const attn_call_t *c, int b, int h, float *P, float *ws) {
    const view_t *q = &c->q, *k = &c->k, *v = &c->v, *y = &c->y;
    const int T = c->T, D = c->D, dtype = c->dtype;
    const float scale = c->scale;
    const int Tp = padded(T), Dp = padded(D);
    float *qf = ws, *kt = qf + Tp * Dp, *vf = kt + Tp * Dp, *yf = vf + Tp * Dp;
    float *tmp = yf + Tp * Dp;
    if (Tp != T || Dp != D) memset(ws, 0, sizeof(float) * (size_t)(3 * Tp * Dp));
    load_rows(qf, q, b, h, T, D, Dp, dtype, scale);
    load_rows_t(kt, k, b, h, T, D, Tp, dtype, tmp);
    load_rows(vf, v, b, h, T, D, Dp, dtype, 1.0f);
    gemm_abt_causal(qf, kt, P, Tp, Dp);
    causal_softmax(P, T, Tp);
    gemm_ab_causal(P, vf, yf, Tp, Dp);
    store_rows(y, yf, b, h, T, D, Dp, dtype, 1.0f, tmp);
}

static size_t forward_workspace(int T, int D) {
    return 4 * (size_t)padded(T) * padded(D) + VL * (size_t)D;
}

/* P: (B·H, Tp, Tp) fp32, Tp = T rounded up to lmf_block(). Returns 0, or -1 when a
 * thread's workspace could not be allocated. */
int lmf_attention_forward(view_t q, view_t k, view_t v, view_t y, float *P, int B, int H,
                          int T, int D, int dtype, float scale, int n_threads) {
    const attn_call_t c = {.q = q, .k = k, .v = v, .y = y, .P = P, .H = H, .T = T, .D = D,
                           .dtype = dtype, .scale = scale};
    return over_pairs(forward_pair, &c, B, forward_workspace(T, D), n_threads);
}

/* One (b, h) pair backward: dP = dy·vᵀ, dS = P∘(dP − rowsum(P∘dP)), dq = dS·k·scale,
 * dk = dSᵀ·(q·scale), dv = Pᵀ·dy. */
static void backward_pair(const attn_call_t *c, int b, int h, float *P, float *ws) {
    const view_t *q = &c->q, *k = &c->k, *v = &c->v, *dy = &c->y;
    const view_t *dq = &c->dq, *dk = &c->dk, *dv = &c->dv;
    const int T = c->T, D = c->D, dtype = c->dtype;
    const float scale = c->scale;
    const int Tp = padded(T), Dp = padded(D), n = Tp * Dp;
    float *qf = ws, *kf = qf + n, *vt = kf + n, *dyf = vt + n, *gf = dyf + n;
    float *dS = gf + n, *tmp = dS + Tp * Tp;
    if (Tp != T || Dp != D) memset(ws, 0, sizeof(float) * (size_t)(4 * n));
    load_rows(qf, q, b, h, T, D, Dp, dtype, scale);
    load_rows(kf, k, b, h, T, D, Dp, dtype, 1.0f);
    load_rows_t(vt, v, b, h, T, D, Tp, dtype, tmp);
    load_rows(dyf, dy, b, h, T, D, Dp, dtype, 1.0f);
    gemm_abt_causal(dyf, vt, dS, Tp, Dp);
    softmax_backward(P, dS, T, Tp);
    gemm_atb_causal(P, dyf, gf, Tp, Dp);
    store_rows(dv, gf, b, h, T, D, Dp, dtype, 1.0f, tmp);
    gemm_ab_causal(dS, kf, gf, Tp, Dp);
    store_rows(dq, gf, b, h, T, D, Dp, dtype, scale, tmp);
    gemm_atb_causal(dS, qf, gf, Tp, Dp);
    store_rows(dk, gf, b, h, T, D, Dp, dtype, 1.0f, tmp);
}

static size_t backward_workspace(int T, int D) {
    return 5 * (size_t)padded(T) * padded(D) + (size_t)padded(T) * padded(T) + VL * (size_t)D;
}

int lmf_attention_backward(view_t q, view_t k, view_t v, view_t dy, const float *P, view_t dq,
                           view_t dk, view_t dv, int B, int H, int T, int D, int dtype,
                           float scale, int n_threads) {
    /* The backward only reads P; the struct's pointer is not const for the forward. */
    const attn_call_t c = {.q = q, .k = k, .v = v, .y = dy, .dq = dq, .dk = dk, .dv = dv,
                           .P = (float *)P, .H = H, .T = T, .D = D, .dtype = dtype,
                           .scale = scale};
    return over_pairs(backward_pair, &c, B, backward_workspace(T, D), n_threads);
}
