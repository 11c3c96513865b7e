/* Native CPU kernels of embdist.pairwise (see the package docstring for the design).
 *
 * Built at first use by _native.py:  cc -O3 -march=native -ffp-contract=off -fno-fast-math
 * No OpenMP: the Python side runs work items on a few threads (ctypes releases the GIL),
 * so interrupting and progress stay in Python and no second OpenMP runtime is loaded.
 *
 * Arithmetic contract used by the error analysis in __init__.py:
 *  - gram:  per 32 products two fp32 chains of 16 FMAs from zero, added in fp32, then added
 *           to a float64 accumulator.  |fl(G) - G| <= gamma_17 sum|a_k b_k| + O(2^-53).
 *  - cheb:  max of |b - a| computed as fp32 subtract + exact abs-max (VRANGEPS / fmaxf),
 *           bit-identical to torch's abs(a - b).max() whatever the order.
 *  - l1:    fp32 |b - a| summed 16 at a time in fp32, then in float64.
 *  - direct: float64 sum of float64 squared differences of the original rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EMB_ABI 8
#define PW 32      /* panel width: rows per packed panel (and columns per micro-tile) */
#define MR 8       /* rows per micro-tile */
#define FLUSH 16   /* fp32 terms per float64 flush in the l1 / snapshot kernels */
#define GBLK 32    /* gram: products per float64 flush, as two 16-FMA chains (bound: gamma_17) */
#define GMR 4      /* gram: rows per micro-tile */

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define EMB_AVX512 1
#include <immintrin.h>
#else
#define EMB_AVX512 0
#endif

int emb_abi(void) { return EMB_ABI; }
int emb_has_avx512(void) { return EMB_AVX512; }

/* ------------------------------------------------------------------ row hashing */
static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 33; z *= 0xff51afd7ed558ccdULL;
    z ^= z >> 33; z *= 0xc4ceb9fe1a85ec53ULL;
    z ^= z >> 33; return z;
}
static inline uint64_t canon_bits(float f) {
    uint32_t b; memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) == 0) b = 0;          /* -0.0 == 0.0 */
    return b;
}
static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

void emb_row_hash(const float *x, int64_t n, int64_t d, int64_t r0, int64_t r1, uint64_t *out) {
    (void)n;
    const uint64_t P = 0x9E3779B97F4A7C15ULL;
    for (int64_t i = r0; i < r1; i++) {
        const float *row = x + i * d;
        uint64_t h0 = 0x243F6A8885A308D3ULL, h1 = 0x13198A2E03707344ULL,
                 h2 = 0xA4093822299F31D0ULL, h3 = 0x082EFA98EC4E6C89ULL;
        int64_t k = 0;
        for (; k + 4 <= d; k += 4) {
            h0 = rotl((h0 ^ canon_bits(row[k])) * P, 29);
            h1 = rotl((h1 ^ canon_bits(row[k + 1])) * P, 29);
            h2 = rotl((h2 ^ canon_bits(row[k + 2])) * P, 29);
            h3 = rotl((h3 ^ canon_bits(row[k + 3])) * P, 29);
        }
        for (; k < d; k++) h0 = rotl((h0 ^ canon_bits(row[k])) * P, 29);
        out[i] = mix64(h0 ^ rotl(h1, 17) ^ rotl(h2, 31) ^ rotl(h3, 47) ^ (uint64_t)d);
    }
}

/* ------------------------------------------------------------------ centring helpers */
void emb_col_sums(const float *x, int64_t n, int64_t d, int64_t r0, int64_t r1, double *acc) {
    (void)n;
    for (int64_t i = r0; i < r1; i++)
        for (int64_t k = 0; k < d; k++) acc[k] += (double)x[i * d + k];
}

double emb_centred_absmax(const float *x, int64_t n, int64_t d, const float *mu, int64_t r0, int64_t r1) {
    (void)n;
    float m = 0.0f;
    for (int64_t i = r0; i < r1; i++)
        for (int64_t k = 0; k < d; k++) {
            float v = fabsf(x[i * d + k] - mu[k]);
            m = v > m ? v : m;
        }
    return (double)m;
}

/* ------------------------------------------------------------------ packing
 * Panel p holds rows p*PW .. p*PW+PW-1 as packed[p*dp*PW + k*PW + j] (k < dp, zero padded),
 * value fl(fl(x - mu) * scale) (mu may be NULL, scale a power of two).  norms[i] = float64
 * sum of squares of the packed row (exact values of what the GEMM sees). */
void emb_pack_panels(const float *x, int64_t n, int64_t d, int64_t dp, const float *mu, double scale,
                     float *packed, int64_t p0, int64_t p1, double *norms) {
    const float s = (float)scale;
    for (int64_t p = p0; p < p1; p++) {
        float *dst = packed + p * dp * PW;
        for (int64_t j = 0; j < PW; j++) {
            int64_t i = p * PW + j;
            double acc = 0.0;
            if (i < n) {
                const float *row = x + i * d;
                for (int64_t k = 0; k < d; k++) {
                    float v = row[k];
                    if (mu) v = v - mu[k];
                    v = v * s;
                    dst[k * PW + j] = v;
                    acc += (double)v * (double)v;
                }
                if (norms) norms[i] = acc;
            } else {
                for (int64_t k = 0; k < d; k++) dst[k * PW + j] = 0.0f;
            }
            for (int64_t k = d; k < dp; k++) dst[k * PW + j] = 0.0f;
        }
    }
}

/* ------------------------------------------------------------------ micro-kernels */
#if EMB_AVX512
/* C[r][c] (float64, ldc) += sum_k a[k*PW + r] * b[k*PW + c], r < GMR, c < 32; kc % GBLK == 0.
 * Per block of GBLK = 32 products, each output has two float32 chains (even / odd k), each
 * taking exactly 16 fused multiply-adds from zero; the two are added in float32 (one more
 * rounding: gamma_16 + u(1 + gamma_16) <= gamma_17) and the sum is added to the float64 tile.
 * This is what the error bound counts: |fl(block) - block| <= gamma_17 sum|a_k b_k|. */
static inline void gram_4x32(const float *a, const float *b, int64_t kc, double *C, int64_t ldc) {
    for (int64_t k0 = 0; k0 < kc; k0 += GBLK) {
        __m512 c[2][GMR][2];
#pragma GCC unroll 2
        for (int z = 0; z < 2; z++)
#pragma GCC unroll 4
            for (int r = 0; r < GMR; r++) c[z][r][0] = c[z][r][1] = _mm512_setzero_ps();
        const float *ak = a + k0 * PW, *bk = b + k0 * PW;
#pragma GCC unroll 2
        for (int k = 0; k < GBLK; k += 2, ak += 2 * PW, bk += 2 * PW) {
#pragma GCC unroll 2
            for (int z = 0; z < 2; z++) {
                const __m512 b0 = _mm512_load_ps(bk + z * PW), b1 = _mm512_load_ps(bk + z * PW + 16);
#pragma GCC unroll 4
                for (int r = 0; r < GMR; r++) {
                    const __m512 v = _mm512_set1_ps(ak[z * PW + r]);
                    c[z][r][0] = _mm512_fmadd_ps(v, b0, c[z][r][0]);
                    c[z][r][1] = _mm512_fmadd_ps(v, b1, c[z][r][1]);
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < GMR; r++)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                double *cp = C + r * ldc + h * 16;
                const __m512 sum = _mm512_add_ps(c[0][r][h], c[1][r][h]);
                _mm512_storeu_pd(cp, _mm512_add_pd(_mm512_loadu_pd(cp),
                                                   _mm512_cvtps_pd(_mm512_castps512_ps256(sum))));
                _mm512_storeu_pd(cp + 8, _mm512_add_pd(_mm512_loadu_pd(cp + 8),
                                                       _mm512_cvtps_pd(_mm512_extractf32x8_ps(sum, 1))));
            }
    }
}

/* C[r][c] (float32, ldc) = max(C, max_k |b[k*PW+c] - a[k*PW+r]|) */
static inline void cheb_8x32(const float *a, const float *b, int64_t kc, float *C, int64_t ldc) {
    __m512 c00 = _mm512_loadu_ps(C), c01 = _mm512_loadu_ps(C + 16);
    __m512 c10 = _mm512_loadu_ps(C + ldc), c11 = _mm512_loadu_ps(C + ldc + 16);
    __m512 c20 = _mm512_loadu_ps(C + 2 * ldc), c21 = _mm512_loadu_ps(C + 2 * ldc + 16);
    __m512 c30 = _mm512_loadu_ps(C + 3 * ldc), c31 = _mm512_loadu_ps(C + 3 * ldc + 16);
    __m512 c40 = _mm512_loadu_ps(C + 4 * ldc), c41 = _mm512_loadu_ps(C + 4 * ldc + 16);
    __m512 c50 = _mm512_loadu_ps(C + 5 * ldc), c51 = _mm512_loadu_ps(C + 5 * ldc + 16);
    __m512 c60 = _mm512_loadu_ps(C + 6 * ldc), c61 = _mm512_loadu_ps(C + 6 * ldc + 16);
    __m512 c70 = _mm512_loadu_ps(C + 7 * ldc), c71 = _mm512_loadu_ps(C + 7 * ldc + 16);
    const float *ak = a, *bk = b;
#define AM(acc, x) acc = _mm512_range_ps(acc, x, 0x0B) /* max(|acc|, |x|), sign cleared */
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; k++, ak += PW, bk += PW) {
        __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16);
        __m512 v;
        v = _mm512_set1_ps(ak[0]); AM(c00, _mm512_sub_ps(b0, v)); AM(c01, _mm512_sub_ps(b1, v));
        v = _mm512_set1_ps(ak[1]); AM(c10, _mm512_sub_ps(b0, v)); AM(c11, _mm512_sub_ps(b1, v));
        v = _mm512_set1_ps(ak[2]); AM(c20, _mm512_sub_ps(b0, v)); AM(c21, _mm512_sub_ps(b1, v));
        v = _mm512_set1_ps(ak[3]); AM(c30, _mm512_sub_ps(b0, v)); AM(c31, _mm512_sub_ps(b1, v));
        v = _mm512_set1_ps(ak[4]); AM(c40, _mm512_sub_ps(b0, v)); AM(c41, _mm512_sub_ps(b1, v));
        v = _mm512_set1_ps(ak[5]); AM(c50, _mm512_sub_ps(b0, v)); AM(c51, _mm512_sub_ps(b1, v));
        v = _mm512_set1_ps(ak[6]); AM(c60, _mm512_sub_ps(b0, v)); AM(c61, _mm512_sub_ps(b1, v));
        v = _mm512_set1_ps(ak[7]); AM(c70, _mm512_sub_ps(b0, v)); AM(c71, _mm512_sub_ps(b1, v));
    }
#undef AM
    _mm512_storeu_ps(C, c00); _mm512_storeu_ps(C + 16, c01);
    _mm512_storeu_ps(C + ldc, c10); _mm512_storeu_ps(C + ldc + 16, c11);
    _mm512_storeu_ps(C + 2 * ldc, c20); _mm512_storeu_ps(C + 2 * ldc + 16, c21);
    _mm512_storeu_ps(C + 3 * ldc, c30); _mm512_storeu_ps(C + 3 * ldc + 16, c31);
    _mm512_storeu_ps(C + 4 * ldc, c40); _mm512_storeu_ps(C + 4 * ldc + 16, c41);
    _mm512_storeu_ps(C + 5 * ldc, c50); _mm512_storeu_ps(C + 5 * ldc + 16, c51);
    _mm512_storeu_ps(C + 6 * ldc, c60); _mm512_storeu_ps(C + 6 * ldc + 16, c61);
    _mm512_storeu_ps(C + 7 * ldc, c70); _mm512_storeu_ps(C + 7 * ldc + 16, c71);
}

/* C[r][c] (float64) += sum_k |b - a|, fp32 partial sums of FLUSH terms */
static inline void l1_8x32(const float *a, const float *b, int64_t kc, double *C, int64_t ldc) {
    for (int64_t k0 = 0; k0 < kc; k0 += FLUSH) {
        __m512 acc[MR][2];
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const float *ak = a + k0 * PW, *bk = b + k0 * PW;
        for (int k = 0; k < FLUSH; k++, ak += PW, bk += PW) {
            __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16);
            for (int r = 0; r < MR; r++) {
                __m512 v = _mm512_set1_ps(ak[r]);
                acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_abs_ps(_mm512_sub_ps(b0, v)));
                acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_abs_ps(_mm512_sub_ps(b1, v)));
            }
        }
        for (int r = 0; r < MR; r++)
            for (int h = 0; h < 2; h++) {
                double *cp = C + r * ldc + h * 16;
                __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(acc[r][h]));
                __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(acc[r][h], 1));
                _mm512_storeu_pd(cp, _mm512_add_pd(_mm512_loadu_pd(cp), lo));
                _mm512_storeu_pd(cp + 8, _mm512_add_pd(_mm512_loadu_pd(cp + 8), hi));
            }
    }
}

static double direct_sq(const float *a, const float *b, int64_t d) {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
        __m512 va = _mm512_loadu_ps(a + k), vb = _mm512_loadu_ps(b + k);
        __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(va)),
                                   _mm512_cvtps_pd(_mm512_castps512_ps256(vb)));
        __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(va, 1)),
                                   _mm512_cvtps_pd(_mm512_extractf32x8_ps(vb, 1)));
        s0 = _mm512_fmadd_pd(d0, d0, s0);
        s1 = _mm512_fmadd_pd(d1, d1, s1);
    }
    double s = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    for (; k < d; k++) { double t = (double)a[k] - (double)b[k]; s += t * t; }
    return s;
}
#else /* portable fallback: same arithmetic contract, plain loops */
static inline void gram_4x32(const float *a, const float *b, int64_t kc, double *C, int64_t ldc) {
    for (int64_t k0 = 0; k0 < kc; k0 += GBLK)
        for (int r = 0; r < GMR; r++)
            for (int c = 0; c < PW; c++) {
                float s0 = 0.0f, s1 = 0.0f;
                for (int k = 0; k < GBLK; k += 2) {
                    s0 = fmaf(a[(k0 + k) * PW + r], b[(k0 + k) * PW + c], s0);
                    s1 = fmaf(a[(k0 + k + 1) * PW + r], b[(k0 + k + 1) * PW + c], s1);
                }
                C[r * ldc + c] += (double)(s0 + s1);
            }
}
static inline void cheb_8x32(const float *a, const float *b, int64_t kc, float *C, int64_t ldc) {
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < PW; c++) {
            float m = C[r * ldc + c];
            for (int64_t k = 0; k < kc; k++) {
                float v = fabsf(b[k * PW + c] - a[k * PW + r]);
                m = v > m ? v : m;
            }
            C[r * ldc + c] = m;
        }
}
static inline void l1_8x32(const float *a, const float *b, int64_t kc, double *C, int64_t ldc) {
    for (int64_t k0 = 0; k0 < kc; k0 += FLUSH)
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < PW; c++) {
                float s = 0.0f;
                for (int k = 0; k < FLUSH; k++) s += fabsf(b[(k0 + k) * PW + c] - a[(k0 + k) * PW + r]);
                C[r * ldc + c] += (double)s;
            }
}
static double direct_sq(const float *a, const float *b, int64_t d) {
    double s = 0.0;
    for (int64_t k = 0; k < d; k++) { double t = (double)a[k] - (double)b[k]; s += t * t; }
    return s;
}
#endif

void emb_direct_sq(const float *x, int64_t n, int64_t d, const int64_t *ii, const int64_t *jj,
                   int64_t m, double *out) {
    (void)n;
    for (int64_t t = 0; t < m; t++) out[t] = direct_sq(x + ii[t] * d, x + jj[t] * d, d);
}

/* ------------------------------------------------------------------ block drivers
 * A work item: rows [r0, r0 + nr) (r0 % PW == 0, nr % PW == 0 after padding) against
 * columns [c0, c0 + nc) (c0 % PW == 0).  Only pairs j > i are stored (plus mirror). */
#define KC 256

static void gram_block(const float *packed, int64_t dp, int64_t r0, int64_t nrp, int64_t c0, int64_t ncp,
                       double *C) {
    const int64_t ldc = ncp * PW;
    memset(C, 0, sizeof(double) * (size_t)(nrp * PW) * (size_t)ldc);
    for (int64_t pc = 0; pc < dp; pc += KC) {
        int64_t kc = dp - pc < KC ? dp - pc : KC;
        for (int64_t cp = 0; cp < ncp; cp++) {
            const float *b = packed + (c0 / PW + cp) * dp * PW + pc * PW;
            for (int64_t rp = 0; rp < nrp; rp++) {
                const float *a = packed + (r0 / PW + rp) * dp * PW + pc * PW;
                for (int s = 0; s < PW / GMR; s++)
                    gram_4x32(a + s * GMR, b, kc, C + (rp * PW + s * GMR) * ldc + cp * PW, ldc);
            }
        }
    }
}

static const float F32_TINY = 1.40129846e-45f; /* smallest positive subnormal */

/* out[j][i] = R[i - r0][j - c0] for the pairs i < j of the block (the lower-triangle mirror),
 * written as contiguous runs along i: no strided single-float stores. */
static void mirror_block(const float *R, int64_t ldr, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                         int64_t n, float *out, int64_t ld) {
    const int64_t rend = r0 + nr < n ? r0 + nr : n, cend = c0 + nc < n ? c0 + nc : n;
    for (int64_t jb = c0; jb < cend; jb += 16) {
        const int64_t je = jb + 16 < cend ? jb + 16 : cend;
        for (int64_t i = r0; i < rend; i++) {
            const float *rr = R + (i - r0) * ldr - c0;
            for (int64_t j = (jb > i + 1 ? jb : i + 1); j < je; j++) out[j * ld + i] = rr[j];
        }
    }
}

/* Direct float64 recomputation of a flagged pair through the representatives of the two rows'
 * duplicate groups (identical rows give identical sums), memoised per work item: a pair of
 * big near-duplicate groups (e.g. 814 x 704 rows a few bf16 steps apart) costs one sum. */
#define MEMO 2048
typedef struct { int64_t key; double val; } memo_t;

static double flagged_sq(memo_t *tab, const float *x, int64_t d, int64_t n, int64_t i, int64_t j,
                         const int64_t *groups) {
    const int64_t gi = groups[i], gj = groups[j];
    if (gi == i && gj == j) return direct_sq(x + i * d, x + j * d, d);   /* no other member */
    const int64_t a = gi < gj ? gi : gj, b = gi < gj ? gj : gi;
    const int64_t key = a * n + b;
    uint64_t h = mix64((uint64_t)key) & (MEMO - 1);
    for (int p = 0; p < 8; p++, h = (h + 1) & (MEMO - 1)) {
        if (tab[h].key == key) return tab[h].val;
        if (tab[h].key < 0) {
            double v = direct_sq(x + a * d, x + b * d, d);
            tab[h].key = key;
            tab[h].val = v;
            return v;
        }
    }
    return direct_sq(x + a * d, x + b * d, d);
}

/* params: c1, c2, c3, inv2tol, u, c4, ct2, inv_scale2 (double[8]) */
int64_t emb_euclid_block(const float *packed, int64_t dp, int64_t n, int64_t d, const float *x,
                         int64_t r0, int64_t nrp, int64_t c0, int64_t ncp, double *C,
                         const double *norms, const double *rnorms, const int64_t *groups,
                         const uint8_t *zero_rows, int64_t mode, const double *prm, float *out,
                         int64_t ld) {
    gram_block(packed, dp, r0, nrp, c0, ncp, C);
    const int64_t ldc = ncp * PW;
    float *R = (float *)(C + nrp * PW * ldc);   /* scratch holds C (float64) then R (float32) */
    const double c1 = prm[0], c2 = prm[1], c3 = prm[2], inv2tol = prm[3], u = prm[4], c4 = prm[5],
                 ct2 = prm[6], isc2 = prm[7];
    int64_t flagged = 0;
    memo_t memo[MEMO];
    for (int q = 0; q < MEMO; q++) memo[q].key = -1;
    const int64_t cend = c0 + ncp * PW < n ? c0 + ncp * PW : n;
    for (int64_t r = 0; r < nrp * PW; r++) {
        const int64_t i = r0 + r;
        if (i >= n) break;
        if (i >= c0 && i < cend) out[i * ld + i] = 0.0f;
        int64_t js = i + 1 > c0 ? i + 1 : c0;
        if (js >= cend) continue;
        const double na = norms[i], ra = rnorms[i];
        const int64_t gi = groups[i];
        const int zi = zero_rows ? zero_rows[i] : 0;
        const double *Crow = C + r * ldc - c0;
        float *orow = out + i * ld;
        float *Rrow = R + r * ldc - c0;
#if EMB_AVX512
        const __m512d vna = _mm512_set1_pd(na), vra = _mm512_set1_pd(ra), vc1 = _mm512_set1_pd(c1),
                      vc2 = _mm512_set1_pd(c2), vc3 = _mm512_set1_pd(c3), vit = _mm512_set1_pd(inv2tol),
                      vu = _mm512_set1_pd(u), vc4 = _mm512_set1_pd(c4), vct2 = _mm512_set1_pd(ct2),
                      visc = _mm512_set1_pd(isc2), vtwo = _mm512_set1_pd(2.0), vhalf = _mm512_set1_pd(0.5),
                      vzero = _mm512_setzero_pd(), vone = _mm512_set1_pd(1.0), vtwo2 = _mm512_set1_pd(2.0);
        const __m512i vgi = _mm512_set1_epi64(gi);
        for (int64_t j = js; j < cend; j += 8) {
            const int64_t left = cend - j;
            const __mmask8 m = left >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << left) - 1u);
            __m512d g = _mm512_maskz_loadu_pd(m, Crow + j);
            __m512d nb = _mm512_maskz_loadu_pd(m, norms + j);
            __m512d rb = _mm512_maskz_loadu_pd(m, rnorms + j);
            __m512i gj = _mm512_maskz_loadu_epi64(m, groups + j);
            __m512d s = _mm512_add_pd(vna, nb);
            __m512d d2 = _mm512_sub_pd(s, _mm512_mul_pd(vtwo, g));
            __m512d e = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(vc1, _mm512_mul_pd(vra, rb)),
                                                    _mm512_mul_pd(vc2, s)), vc3);
            __mmask8 fl = _mm512_cmp_pd_mask(d2, _mm512_mul_pd(e, vit), _CMP_LE_OQ);
            __m512d ce = _mm512_add_pd(_mm512_mul_pd(vu, _mm512_add_pd(vra, rb)), vc4);
            fl |= _mm512_cmp_pd_mask(_mm512_mul_pd(d2, vct2), _mm512_mul_pd(ce, ce), _CMP_LE_OQ);
            __mmask8 same = _mm512_cmpeq_epi64_mask(gj, vgi) & m;
            fl &= (__mmask8)(m & ~same);
            d2 = _mm512_max_pd(_mm512_mul_pd(d2, visc), vzero);
            if (fl) {
                double tmp[8];
                _mm512_storeu_pd(tmp, d2);
                for (int l = 0; l < 8; l++)
                    if (fl >> l & 1) tmp[l] = flagged_sq(memo, x, d, n, i, j + l, groups);
                d2 = _mm512_loadu_pd(tmp);
                flagged += __builtin_popcount(fl);
            }
            __m512d res;
            if (mode == 0) res = _mm512_sqrt_pd(d2);
            else if (mode == 1) res = d2;
            else {
                res = _mm512_min_pd(_mm512_mul_pd(d2, vhalf), vtwo2);
                if (zero_rows) {
                    __mmask8 zb = 0;
                    for (int l = 0; l < 8 && l < left; l++) zb |= (__mmask8)((zero_rows[j + l] != zi) << l);
                    res = _mm512_mask_mov_pd(res, zb, vone);
                }
            }
            res = _mm512_mask_mov_pd(res, same, vzero);
            __m256 r32 = _mm512_cvtpd_ps(res);
            __mmask8 z = _mm256_cmp_ps_mask(r32, _mm256_setzero_ps(), _CMP_EQ_OQ) & (__mmask8)(m & ~same);
            if (mode == 2) z &= _mm512_cmp_pd_mask(res, vzero, _CMP_NEQ_OQ);
            r32 = _mm256_mask_mov_ps(r32, z, _mm256_set1_ps(F32_TINY));
            _mm256_mask_storeu_ps(orow + j, m, r32);
            _mm256_mask_storeu_ps(Rrow + j, m, r32);
        }
#else
        for (int64_t j = js; j < cend; j++) {
            double g = Crow[j], nb = norms[j], rb = rnorms[j];
            double s = na + nb, d2 = s - 2.0 * g;
            double e = c1 * (ra * rb) + c2 * s + c3;
            double ce = u * (ra + rb) + c4;
            int same = groups[j] == gi;
            int fl = !same && (d2 <= e * inv2tol || d2 * ct2 <= ce * ce);
            d2 = d2 * isc2; if (d2 < 0) d2 = 0;
            if (fl) { d2 = flagged_sq(memo, x, d, n, i, j, groups); flagged++; }
            double res;
            if (mode == 0) res = sqrt(d2);
            else if (mode == 1) res = d2;
            else {
                res = d2 * 0.5; if (res > 2.0) res = 2.0;
                if (zero_rows && zero_rows[j] != zi) res = 1.0;
            }
            if (same) res = 0.0;
            float r32 = (float)res;
            if (r32 == 0.0f && !same && (mode != 2 || res != 0.0)) r32 = F32_TINY;
            orow[j] = r32;
            Rrow[j] = r32;
        }
#endif
    }
    mirror_block(R, ldc, r0, nrp * PW, c0, ncp * PW, n, out, ld);
    return flagged;
}

void emb_cheb_block(const float *packed, int64_t dp, int64_t n, float *C, int64_t r0, int64_t nrp,
                    int64_t c0, int64_t ncp, float *out, int64_t ld) {
    const int64_t ldc = ncp * PW;
    memset(C, 0, sizeof(float) * (size_t)(nrp * PW) * (size_t)ldc);
    for (int64_t pc = 0; pc < dp; pc += KC) {
        int64_t kc = dp - pc < KC ? dp - pc : KC;
        for (int64_t cp = 0; cp < ncp; cp++) {
            const float *b = packed + (c0 / PW + cp) * dp * PW + pc * PW;
            for (int64_t rp = 0; rp < nrp; rp++) {
                const float *a = packed + (r0 / PW + rp) * dp * PW + pc * PW;
                for (int s = 0; s < PW / MR; s++)
                    cheb_8x32(a + s * MR, b, kc, C + (rp * PW + s * MR) * ldc + cp * PW, ldc);
            }
        }
    }
    const int64_t cend = c0 + ncp * PW < n ? c0 + ncp * PW : n;
    for (int64_t r = 0; r < nrp * PW; r++) {
        const int64_t i = r0 + r;
        if (i >= n) break;
        if (i >= c0 && i < cend) out[i * ld + i] = 0.0f;
        const float *Crow = C + r * ldc - c0;
        const int64_t js = i + 1 > c0 ? i + 1 : c0;
        if (js < cend) memcpy(out + i * ld + js, Crow + js, sizeof(float) * (size_t)(cend - js));
    }
    mirror_block(C, ldc, r0, nrp * PW, c0, ncp * PW, n, out, ld);
}

void emb_l1_block(const float *packed, int64_t dp, int64_t n, double *C, int64_t r0, int64_t nrp,
                  int64_t c0, int64_t ncp, float *out, int64_t ld) {
    const int64_t ldc = ncp * PW;
    float *R = (float *)(C + nrp * PW * ldc);
    memset(C, 0, sizeof(double) * (size_t)(nrp * PW) * (size_t)ldc);
    for (int64_t pc = 0; pc < dp; pc += KC) {
        int64_t kc = dp - pc < KC ? dp - pc : KC;
        for (int64_t cp = 0; cp < ncp; cp++) {
            const float *b = packed + (c0 / PW + cp) * dp * PW + pc * PW;
            for (int64_t rp = 0; rp < nrp; rp++) {
                const float *a = packed + (r0 / PW + rp) * dp * PW + pc * PW;
                for (int s = 0; s < PW / MR; s++)
                    l1_8x32(a + s * MR, b, kc, C + (rp * PW + s * MR) * ldc + cp * PW, ldc);
            }
        }
    }
    const int64_t cend = c0 + ncp * PW < n ? c0 + ncp * PW : n;
    for (int64_t r = 0; r < nrp * PW; r++) {
        const int64_t i = r0 + r;
        if (i >= n) break;
        if (i >= c0 && i < cend) out[i * ld + i] = 0.0f;
        const double *Crow = C + r * ldc - c0;
        float *Rrow = R + r * ldc - c0;
        for (int64_t j = (i + 1 > c0 ? i + 1 : c0); j < cend; j++) {
            float v = (float)Crow[j];
            if (v == 0.0f && Crow[j] != 0.0) v = F32_TINY;
            out[i * ld + j] = v;
            Rrow[j] = v;
        }
    }
    mirror_block(R, ldc, r0, nrp * PW, c0, ncp * PW, n, out, ld);
}

/* ------------------------------------------------------------------ snapshots
 * h: (T, V, D) in float32 (dt=0), bfloat16 (dt=1) or float16 (dt=2); out: (T, V, V) float32.
 * Snapshots [t0, t1).  Full V x V tiles (both triangles computed with identical arithmetic,
 * so the result is exactly symmetric) and plain vector stores.
 * Euclidean: float32 differences, squares summed 16 at a time in float32 (fused), then in
 *   float64: relative error <= 18u on d^2.  Pairs whose d^2 < 2^-90 (where float32 squares
 *   may underflow) are settled exactly: equal rows -> 0, else a float64 direct sum.
 * Chebyshev: float32 |a - b| max, bit-identical to the seed. */
static inline float half_to_float(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, b;
    if (e == 0) {
        if (m == 0) b = s;
        else {                         /* subnormal: normalise */
            int sh = 0;
            while (!(m & 0x400u)) { m <<= 1; sh++; }
            m &= 0x3FFu;
            b = s | ((uint32_t)(127 - 15 + 1 - sh) << 23) | (m << 13);
        }
    } else if (e == 31) b = s | 0x7F800000u | (m << 13);
    else b = s | ((e + 127 - 15) << 23) | (m << 13);
    float f; memcpy(&f, &b, 4); return f;
}

static void load_snapshot(const void *h, int dt, int64_t off, int64_t V, int64_t D, int64_t Vp,
                          float *xs, float *bt) {
    for (int64_t i = 0; i < V; i++)
        for (int64_t k = 0; k < D; k++) {
            float v;
            if (dt == 0) v = ((const float *)h)[off + i * D + k];
            else if (dt == 1) { uint32_t b = (uint32_t)((const uint16_t *)h)[off + i * D + k] << 16; memcpy(&v, &b, 4); }
            else v = half_to_float(((const uint16_t *)h)[off + i * D + k]);
            xs[i * D + k] = v;
            bt[k * Vp + i] = v;
        }
    for (int64_t k = 0; k < D; k++)
        for (int64_t i = V; i < Vp; i++) bt[k * Vp + i] = 0.0f;
}

/* float32 -> bfloat16 / float16 bits, round to nearest even; a nonzero value that rounds to
 * zero becomes the smallest subnormal (0 stays reserved for identical rows) */
static inline uint16_t f32_to_bf16_keep(float f) {
    uint32_t b; memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);   /* NaN */
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    if ((r & 0x7fffu) == 0 && (b & 0x7fffffffu) != 0) r |= 1u;
    return (uint16_t)r;
}
static inline uint16_t f32_to_f16_keep(float f) {
    uint32_t b; memcpy(&b, &f, 4);
    const uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
    uint16_t h;
    if (a > 0x7f800000u) h = (uint16_t)(sign | 0x7e00u);                  /* NaN */
    else if (a >= 0x477ff000u) h = (uint16_t)(sign | 0x7c00u);            /* rounds to inf */
    else if (a >= 0x38800000u) {                                          /* normal half */
        uint32_t m = a - 0x38000000u;                                     /* rebias exponent */
        h = (uint16_t)(sign | ((m + 0x0fffu + ((m >> 13) & 1u)) >> 13));
    } else {                                                              /* subnormal half */
        float af; memcpy(&af, &a, 4);
        float q = af * 16777216.0f;                       /* units of 2^-24, exact (power of 2) */
        float r = nearbyintf(q);                          /* round to nearest even */
        h = (uint16_t)(sign | (uint32_t)r);
    }
    if ((h & 0x7fffu) == 0 && a != 0) h |= 1u;
    return h;
}

/* copy a finished snapshot to the output in its dtype (0 float32, 1 bfloat16, 2 float16);
 * float32 uses streaming stores when aligned (the output is write-only memory traffic) */
static void store_snapshot(void *dst, int odt, const float *src, int64_t nel) {
    if (odt == 0) {
#if EMB_AVX512
        if (((uintptr_t)dst & 63) == 0 && (nel & 15) == 0) {
            for (int64_t q = 0; q < nel; q += 16) _mm512_stream_ps((float *)dst + q, _mm512_load_ps(src + q));
            return;
        }
#endif
        memcpy(dst, src, sizeof(float) * (size_t)nel);
    } else if (odt == 1) {
        uint16_t *o = (uint16_t *)dst;
        for (int64_t q = 0; q < nel; q++) o[q] = f32_to_bf16_keep(src[q]);
    } else {
        uint16_t *o = (uint16_t *)dst;
        for (int64_t q = 0; q < nel; q++) o[q] = f32_to_f16_keep(src[q]);
    }
}

/* lower triangle := upper triangle (exact symmetry), diagonal := 0 */
static void mirror_square(float *o, int64_t V) {
    for (int64_t i = 0; i < V; i++) {
        o[i * V + i] = 0.0f;
        for (int64_t j = i + 1; j < V; j++) o[j * V + i] = o[i * V + j];
    }
}

static double settle_tiny(const float *a, const float *b, int64_t D) {
    int eq = 1;
    int64_t k = 0;
#if EMB_AVX512
    for (; k + 16 <= D; k += 16)
        if (_mm512_cmp_ps_mask(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), _CMP_EQ_OQ) != 0xFFFF) { eq = 0; break; }
#endif
    if (eq)
        for (; k < D; k++) if (!(a[k] == b[k])) { eq = 0; break; }
    if (eq) return 0.0;
    double s = 0.0;
    for (int64_t k = 0; k < D; k++) { double t = (double)a[k] - (double)b[k]; s += t * t; }
    return s;
}

void emb_snap_euclid(const void *h, int64_t dt, int64_t V, int64_t D, int64_t t0, int64_t t1,
                     void *out, int64_t mode, int64_t odt) {
    const int64_t Vp = (V + 15) / 16 * 16;
    float *bt = (float *)aligned_alloc(64, sizeof(float) * (size_t)(D * Vp + 16));
    float *xs = (float *)aligned_alloc(64, sizeof(float) * (size_t)((V * D + 15) / 16 * 16 + 16));
    float *o = (float *)aligned_alloc(64, sizeof(float) * (size_t)((V * V + 15) / 16 * 16 + 16));
    if (!bt || !xs || !o) { free(bt); free(xs); free(o); return; }
    const double tiny = 0x1p-90;
    for (int64_t t = t0; t < t1; t++) {
        load_snapshot(h, (int)dt, t * V * D, V, D, Vp, xs, bt);
        for (int64_t j0 = 0; j0 < V; j0 += 16) {
            const int64_t nj = V - j0 < 16 ? V - j0 : 16;
            for (int64_t i0 = 0; i0 < V && i0 < j0 + nj; i0 += 8) {   /* upper-triangle tiles */
                const int64_t ni = V - i0 < 8 ? V - i0 : 8;
#if EMB_AVX512
                const float *rp[8];
                for (int r = 0; r < 8; r++) rp[r] = xs + (i0 + (r < ni ? r : 0)) * D;
                __m512d lo[8], hi[8];
                for (int r = 0; r < 8; r++) lo[r] = hi[r] = _mm512_setzero_pd();
                for (int64_t k0 = 0; k0 < D; k0 += FLUSH) {
                    const int64_t ke = k0 + FLUSH < D ? k0 + FLUSH : D;
                    __m512 acc[8];
                    for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
                    for (int64_t k = k0; k < ke; k++) {
                        const __m512 bv = _mm512_load_ps(bt + k * Vp + j0);
                        for (int r = 0; r < 8; r++) {
                            const __m512 tv = _mm512_sub_ps(bv, _mm512_set1_ps(rp[r][k]));
                            acc[r] = _mm512_fmadd_ps(tv, tv, acc[r]);
                        }
                    }
                    for (int r = 0; r < 8; r++) {
                        lo[r] = _mm512_add_pd(lo[r], _mm512_cvtps_pd(_mm512_castps512_ps256(acc[r])));
                        hi[r] = _mm512_add_pd(hi[r], _mm512_cvtps_pd(_mm512_extractf32x8_ps(acc[r], 1)));
                    }
                }
                const __m512d vt = _mm512_set1_pd(tiny);
                const __mmask16 mj = (__mmask16)((1u << nj) - 1u);
                for (int r = 0; r < ni; r++) {
                    const int64_t i = i0 + r;
                    __mmask16 tl = (__mmask16)(_mm512_cmp_pd_mask(lo[r], vt, _CMP_LT_OQ) |
                                               ((__mmask16)_mm512_cmp_pd_mask(hi[r], vt, _CMP_LT_OQ) << 8)) & mj;
                    if (tl) {
                        double tmp[16];
                        _mm512_storeu_pd(tmp, lo[r]); _mm512_storeu_pd(tmp + 8, hi[r]);
                        for (int l = 0; l < 16; l++)
                            if (tl >> l & 1)
                                tmp[l] = (i == j0 + l) ? 0.0 : settle_tiny(xs + i * D, xs + (j0 + l) * D, D);
                        lo[r] = _mm512_loadu_pd(tmp); hi[r] = _mm512_loadu_pd(tmp + 8);
                    }
                    __m512d a = lo[r], b = hi[r];
                    if (mode == 0) { a = _mm512_sqrt_pd(a); b = _mm512_sqrt_pd(b); }
                    __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(a)), _mm512_cvtpd_ps(b), 1);
                    const __mmask16 nz = (__mmask16)(_mm512_cmp_pd_mask(a, _mm512_setzero_pd(), _CMP_NEQ_OQ) |
                                                     ((__mmask16)_mm512_cmp_pd_mask(b, _mm512_setzero_pd(), _CMP_NEQ_OQ) << 8));
                    const __mmask16 fz = _mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_EQ_OQ) & nz;
                    f = _mm512_mask_mov_ps(f, fz, _mm512_set1_ps(F32_TINY));
                    _mm512_mask_storeu_ps(o + i * V + j0, mj, f);
                }
#else
                double d2[8][16];
                for (int r = 0; r < 8; r++) {
                    const float *ap = xs + (i0 + (r < ni ? r : 0)) * D;
                    for (int l = 0; l < 16; l++) {
                        double s = 0.0;
                        for (int64_t k0 = 0; k0 < D; k0 += FLUSH) {
                            float acc = 0.0f;
                            const int64_t ke = k0 + FLUSH < D ? k0 + FLUSH : D;
                            for (int64_t k = k0; k < ke; k++) {
                                float tv = bt[k * Vp + j0 + l] - ap[k];
                                acc = fmaf(tv, tv, acc);
                            }
                            s += (double)acc;
                        }
                        d2[r][l] = s;
                    }
                }
                for (int r = 0; r < ni; r++) {
                    const int64_t i = i0 + r;
                    float *orow = o + i * V + j0;
                    for (int l = 0; l < nj; l++) {
                        double v = d2[r][l];
                        if (v < tiny) v = (i == j0 + l) ? 0.0 : settle_tiny(xs + i * D, xs + (j0 + l) * D, D);
                        if (mode == 0) v = sqrt(v);
                        float f = (float)v;
                        if (f == 0.0f && v != 0.0) f = F32_TINY;
                        orow[l] = f;
                    }
                }
#endif
            }
        }
        mirror_square(o, V);
        store_snapshot((char *)out + t * V * V * (odt == 0 ? 4 : 2), (int)odt, o, V * V);
    }
#if EMB_AVX512
    _mm_sfence();
#endif
    free(bt);
    free(xs);
    free(o);
}

void emb_snap_cheb(const void *h, int64_t dt, int64_t V, int64_t D, int64_t t0, int64_t t1,
                   void *out, int64_t unused, int64_t odt) {
    (void)unused;
    const int64_t Vp = (V + 15) / 16 * 16;
    float *bt = (float *)aligned_alloc(64, sizeof(float) * (size_t)(D * Vp + 16));
    float *xs = (float *)aligned_alloc(64, sizeof(float) * (size_t)((V * D + 15) / 16 * 16 + 16));
    float *o = (float *)aligned_alloc(64, sizeof(float) * (size_t)((V * V + 15) / 16 * 16 + 16));
    if (!bt || !xs || !o) { free(bt); free(xs); free(o); return; }
    for (int64_t t = t0; t < t1; t++) {
        load_snapshot(h, (int)dt, t * V * D, V, D, Vp, xs, bt);
        for (int64_t j0 = 0; j0 < V; j0 += 16) {
            const int64_t nj = V - j0 < 16 ? V - j0 : 16;
            for (int64_t i0 = 0; i0 < V && i0 < j0 + nj; i0 += 8) {   /* upper-triangle tiles */
                const int64_t ni = V - i0 < 8 ? V - i0 : 8;
#if EMB_AVX512
                const float *rp[8];
                for (int r = 0; r < 8; r++) rp[r] = xs + (i0 + (r < ni ? r : 0)) * D;
                __m512 acc[8];
                for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
                for (int64_t k = 0; k < D; k++) {
                    const __m512 bv = _mm512_load_ps(bt + k * Vp + j0);
                    for (int r = 0; r < 8; r++)
                        acc[r] = _mm512_range_ps(acc[r], _mm512_sub_ps(bv, _mm512_set1_ps(rp[r][k])), 0x0B);
                }
                const __mmask16 m = (__mmask16)((1u << nj) - 1u);
                for (int r = 0; r < ni; r++) _mm512_mask_storeu_ps(o + (i0 + r) * V + j0, m, acc[r]);
#else
                for (int r = 0; r < ni; r++)
                    for (int l = 0; l < nj; l++) {
                        float mx = 0.0f;
                        for (int64_t k = 0; k < D; k++) {
                            float v = fabsf(bt[k * Vp + j0 + l] - xs[(i0 + r) * D + k]);
                            mx = v > mx ? v : mx;
                        }
                        o[(i0 + r) * V + j0 + l] = mx;
                    }
#endif
            }
        }
        mirror_square(o, V);
        store_snapshot((char *)out + t * V * V * (odt == 0 ? 4 : 2), (int)odt, o, V * V);
    }
#if EMB_AVX512
    _mm_sfence();
#endif
    free(bt);
    free(xs);
    free(o);
}

/* ------------------------------------------------------------------ statistics
 * Strict upper triangle of d (float32, row stride ld), rows [r0, r1).
 * prefix_bits == 0: hist[key >> 16]++ and st = {min, max, sum, zeros, nans} (accumulated).
 * prefix_bits == 16: hist[key & 0xFFFF]++ for keys with (key >> 16) == prefix. */
static inline uint32_t sort_key(float v) {
    uint32_t b;
    v = v + 0.0f;
    memcpy(&b, &v, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

void emb_hist_upper(const float *d, int64_t n, int64_t ld, int64_t r0, int64_t r1, int64_t prefix_bits,
                    int64_t prefix, int64_t unused, int64_t *hist, double *st) {
    (void)unused;
    double mn = st[0], mx = st[1], sum = st[2], zeros = st[3], nans = st[4];
    for (int64_t i = r0; i < r1; i++) {
        const float *row = d + i * ld;
        if (prefix_bits == 0) {
            double rs = 0.0;
            float rmn = INFINITY, rmx = -INFINITY;
            int64_t rz = 0, rn = 0;
            for (int64_t j = i + 1; j < n; j++) {
                float v = row[j];
                if (v != v) { rn++; continue; }
                rs += (double)v;
                rmn = v < rmn ? v : rmn;
                rmx = v > rmx ? v : rmx;
                rz += (v == 0.0f);
                hist[sort_key(v) >> 16]++;
            }
            sum += rs; zeros += (double)rz; nans += (double)rn;
            if (rmn < mn) mn = rmn;
            if (rmx > mx) mx = rmx;
        } else {
            for (int64_t j = i + 1; j < n; j++) {
                float v = row[j];
                if (v != v) continue;
                uint32_t k = sort_key(v);
                if ((int64_t)(k >> 16) == prefix) hist[k & 0xFFFFu]++;
            }
        }
    }
    st[0] = mn; st[1] = mx; st[2] = sum; st[3] = zeros; st[4] = nans;
}
