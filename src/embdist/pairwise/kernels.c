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
 * h: (T, V, D) in float32 (dt=0), bfloat16 (dt=1) or float16 (dt=2), read as is.
 * emb_snap_multi: snapshots [t0, t1) -> out_e (Euclidean, mode 0, or squared, mode 1) and/or
 * out_c (Chebyshev), each (T, V, V) in odt (0 float32, 1 bfloat16, 2 float16) and indexed by
 * the absolute t; a NULL output is not computed.  mode | 2: streaming stores (for an output
 * already faulted in; a fresh one is better written with plain stores, which hit the lines the
 * page fault has just zeroed).  One pass per snapshot:
 *  - the snapshot is converted once into bp: panels of 16 rows, each stored k-major (Dp x 16
 *    float32), zero padded to multiples of 16 in V and D (the padding adds exact zeros to both
 *    metrics), so every operand of the inner loop is a pointer plus a constant offset;
 *  - upper-triangle tiles of 16 x 16 pairs (two halves of 8 rows x 16 columns in registers):
 *    per k one load of 16 columns, per row one subtract with a broadcast row value, then
 *    FMA (Euclidean) and VRANGEPS (Chebyshev) on the same difference;
 *  - each tile is written straight into the output rows and, transposed in registers, into
 *    its mirror; the diagonal is 0.  So the output is written once, exactly symmetric, and
 *    its fresh pages are faulted by the threads that fill them.
 * Euclidean arithmetic: float32 differences (squares within (1+u)^2 of exact); per 16 k one
 *   chain of 16 FMAs from zero; the 4 chains of SNAP_SB = 64 consecutive k are added in
 *   float32 (all terms >= 0: gamma_19 relative); for Dp > 64 these are summed in float64
 *   and rounded once to float32: d^2 within 22u, d = float32 sqrt within 12u ~ 7.2e-7.
 *   The Chebyshev value of the same pass tells identical rows (fl(a - b) = 0 iff a == b under
 *   gradual underflow): they are 0.  Pairs of distinct rows with d^2 < 2^-90 (float32 squares
 *   may underflow) or d^2 >= 2^126 (may overflow) are settled by a float64 direct sum.
 * Chebyshev: float32 |a - b| max, bit-identical to the seed.
 * The plain-C build (no AVX-512) does the same arithmetic pair by pair (snap_pairs), as does
 * any snapshot holding a NaN or an infinity, where the Chebyshev max keeps NaN like torch. */
#define SNAP_SB 64     /* fp32 terms per float32 superblock (4 chains of FLUSH) */

static const float SNAP_TINY = 0x1p-90f, SNAP_BIG = 0x1p126f;

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

static inline float snap_in(const void *h, int dt, int64_t idx) {
    if (dt == 0) return ((const float *)h)[idx];
    if (dt == 1) { uint32_t b = (uint32_t)((const uint16_t *)h)[idx] << 16; float v; memcpy(&v, &b, 4); return v; }
    return half_to_float(((const uint16_t *)h)[idx]);
}

/* row i, coordinate k of the packed snapshot is snap_col(bp, Dp, i)[16 * k] */
static inline const float *snap_col(const float *bp, int64_t Dp, int64_t i) {
    return bp + (i / 16) * Dp * 16 + i % 16;
}

/* exact settling of a flagged pair (i, j) of bp: float64 sum of float64 squared differences,
 * then the metric's value rounded to float32 (a nonzero value never becomes 0) */
static float snap_settle(const float *bp, int64_t Dp, int64_t D, int64_t i, int64_t j, int mode) {
    const float *a = snap_col(bp, Dp, i), *b = snap_col(bp, Dp, j);
    double s = 0.0;
    for (int64_t k = 0; k < D; k++) { double t = (double)b[16 * k] - (double)a[16 * k]; s += t * t; }
    if (mode == 0) s = sqrt(s);
    float f = (float)s;
    if (f == 0.0f && s != 0.0) f = F32_TINY;
    return f;
}

/* snap_col(bp, Dp, i)[16 * k] = h[off + i * D + k] as float32 for i < V, k < D; 0 in the padding.
 * Returns 1 when the snapshot holds a NaN or an infinity. */
static int snap_load(const void *h, int dt, int64_t off, int64_t V, int64_t D, int64_t Vp, int64_t Dp,
                     float *bp);

static inline void snap_put(void *ob, int odt, int64_t idx, float v) {
    if (odt == 0) ((float *)ob)[idx] = v;
    else ((uint16_t *)ob)[idx] = odt == 1 ? f32_to_bf16_keep(v) : f32_to_f16_keep(v);
}

/* pair by pair, the arithmetic of the tiled kernel (same bits); the Chebyshev max keeps a NaN
 * (as torch's max does): used for snapshots with non-finite values, and as the plain-C build */
static void snap_pairs(const float *bp, int64_t V, int64_t D, int64_t Dp, void *oe, void *oc, int mode, int odt) {
    for (int64_t i = 0; i < V; i++) {
        const float *a = snap_col(bp, Dp, i);
        if (oe) snap_put(oe, odt, i * V + i, 0.0f);
        if (oc) snap_put(oc, odt, i * V + i, 0.0f);
        for (int64_t j = i + 1; j < V; j++) {
            const float *b = snap_col(bp, Dp, j);
            float ch = 0.0f, tot = 0.0f;
            double dsum = 0.0;
            for (int64_t s0 = 0; s0 < Dp; s0 += SNAP_SB) {
                const int64_t se = s0 + SNAP_SB < Dp ? s0 + SNAP_SB : Dp;
                if (Dp > SNAP_SB) tot = 0.0f;
                for (int64_t k0 = s0; k0 < se; k0 += FLUSH) {
                    float acc = 0.0f;
                    for (int64_t k = k0; k < k0 + FLUSH; k++) {
                        const float tv = b[16 * k] - a[16 * k];
                        acc = fmaf(tv, tv, acc);
                        const float av = fabsf(tv);
                        ch = (av > ch || av != av) ? av : ch;
                    }
                    tot = tot + acc;
                }
                if (Dp > SNAP_SB) dsum += (double)tot;
            }
            if (Dp > SNAP_SB) tot = (float)dsum;
            if (oe) {
                float v;
                if ((tot < SNAP_TINY && ch > 0.0f) || tot >= SNAP_BIG) v = snap_settle(bp, Dp, D, i, j, mode);
                else v = mode == 0 ? sqrtf(tot) : tot;
                snap_put(oe, odt, i * V + j, v);
                snap_put(oe, odt, j * V + i, v);
            }
            if (oc) {
                snap_put(oc, odt, i * V + j, ch);
                snap_put(oc, odt, j * V + i, ch);
            }
        }
    }
}

#if EMB_AVX512
static inline void tr16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 16; i += 8)
        for (int q = 0; q < 4; q++) {
            t[i + q] = _mm512_shuffle_f32x4(r[i + q], r[i + q + 4], 0x88);
            t[i + q + 4] = _mm512_shuffle_f32x4(r[i + q], r[i + q + 4], 0xDD);
        }
    for (int q = 0; q < 8; q++) {
        r[q] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0x88);
        r[q + 8] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0xDD);
    }
}

static inline __attribute__((always_inline)) __m512 snap_ld16(const void *h, const int dt, int64_t idx,
                                                               __mmask16 mk) {
    if (dt == 0) return mk == 0xFFFF ? _mm512_loadu_ps((const float *)h + idx) : _mm512_maskz_loadu_ps(mk, (const float *)h + idx);
    const __m256i u = mk == 0xFFFF ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)h + idx))
                                   : _mm256_maskz_loadu_epi16(mk, (const uint16_t *)h + idx);
    if (dt == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
    return _mm512_cvtph_ps(u);
}

static inline __attribute__((always_inline)) int snap_load_t(const void *h, const int dt, int64_t off, int64_t V,
                                                             int64_t D, int64_t Vp, int64_t Dp, float *bp) {
    __mmask16 bad = 0;
    for (int64_t i0 = 0; i0 < Vp; i0 += 16)
        for (int64_t k0 = 0; k0 < Dp; k0 += 16) {
            const int64_t nk = D - k0 < 16 ? (D - k0 > 0 ? D - k0 : 0) : 16;
            const __mmask16 mk = (__mmask16)((1u << nk) - 1u);
            __m512 r[16];
#pragma GCC unroll 16
            for (int q = 0; q < 16; q++)
                r[q] = i0 + q < V ? snap_ld16(h, dt, off + (i0 + q) * D + k0, mk) : _mm512_setzero_ps();
#pragma GCC unroll 16
            for (int q = 0; q < 16; q++) bad |= _mm512_fpclass_ps_mask(r[q], 0x99);   /* NaN, +-inf */
            tr16x16(r);
            float *dst = bp + (i0 * Dp + k0 * 16);
#pragma GCC unroll 16
            for (int q = 0; q < 16; q++) _mm512_store_ps(dst + 16 * q, r[q]);
        }
    return bad != 0;
}

static int snap_load(const void *h, int dt, int64_t off, int64_t V, int64_t D, int64_t Vp, int64_t Dp,
                     float *bp) {
    if (dt == 0) return snap_load_t(h, 0, off, V, D, Vp, Dp, bp);
    if (dt == 1) return snap_load_t(h, 1, off, V, D, Vp, Dp, bp);
    return snap_load_t(h, 2, off, V, D, Vp, Dp, bp);
}

static inline __m256i snap_bf16_keep(__m512 f) {
    const __m512i b = _mm512_castps_si512(f);
    const __m512i a = _mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff));
    const __m512i hi = _mm512_srli_epi32(b, 16);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)),
                                                   _mm512_and_si512(hi, _mm512_set1_epi32(1))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
    const __mmask16 z = _mm512_testn_epi32_mask(r, _mm512_set1_epi32(0x7fff)) & _mm512_test_epi32_mask(a, a);
    r = _mm512_mask_or_epi32(r, z, r, _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(r);
}

static inline __m256i snap_f16_keep(__m512 f) {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(f), _mm512_set1_epi32(0x7fffffff));
    __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 z = _mm256_testn_epi16_mask(h, _mm256_set1_epi16(0x7fff)) & _mm512_test_epi32_mask(a, a);
    return _mm256_mask_mov_epi16(h, z, _mm256_or_si256(h, _mm256_set1_epi16(1)));
}

/* 16 values to ob[idx..] in odt, lanes in m; nt: full aligned run, streaming store */
static inline void snap_st16(void *ob, int odt, int64_t idx, __m512 v, __mmask16 m, int nt) {
    if (odt == 0) {
        float *p = (float *)ob + idx;
        if (nt) _mm512_stream_ps(p, v);
        else _mm512_mask_storeu_ps(p, m, v);
    } else {
        const __m256i x = odt == 1 ? snap_bf16_keep(v) : snap_f16_keep(v);
        uint16_t *p = (uint16_t *)ob + idx;
        if (nt) _mm256_stream_si256((__m256i *)p, x);
        else _mm256_mask_storeu_epi16(p, m, x);
    }
}

/* pa: rows i0..i0+7 (8 lanes of a panel), pb: columns j0..j0+15 (a panel) of one snapshot
 * (rows and columns past V are zero padding; their results are never stored):
 * E[r] = d^2 (float32, want_e), C[r] = max |b - a|.  nsb: Dp > SNAP_SB (float64 flushes). */
static inline __attribute__((always_inline)) void snap_rows8(const float *pa, const float *pb, int64_t Dp,
                                                             const int want_e, const int nsb,
                                                             __m512 *E, __m512 *C) {
    __m512 tot[8], ch[8];
    __m512d dl[8], dh[8];
    for (int r = 0; r < 8; r++) { ch[r] = tot[r] = _mm512_setzero_ps(); dl[r] = dh[r] = _mm512_setzero_pd(); }
    for (int64_t s0 = 0; s0 < Dp; s0 += SNAP_SB) {
        const int64_t se = s0 + SNAP_SB < Dp ? s0 + SNAP_SB : Dp;
        if (nsb) for (int r = 0; r < 8; r++) tot[r] = _mm512_setzero_ps();
        for (int64_t k0 = s0; k0 < se; k0 += FLUSH) {
            __m512 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
            const float *ak = pa + 16 * k0, *bk = pb + 16 * k0;
#pragma GCC unroll 16
            for (int kk = 0; kk < FLUSH; kk++) {
                const __m512 bv = _mm512_load_ps(bk + 16 * kk);
#pragma GCC unroll 8
                for (int r = 0; r < 8; r++) {
                    const __m512 tv = _mm512_sub_ps(bv, _mm512_set1_ps(ak[16 * kk + r]));
                    if (want_e) acc[r] = _mm512_fmadd_ps(tv, tv, acc[r]);
                    ch[r] = _mm512_range_ps(ch[r], tv, 0x0B);      /* max(|ch|, |tv|), sign cleared */
                }
            }
            if (want_e) for (int r = 0; r < 8; r++) tot[r] = _mm512_add_ps(tot[r], acc[r]);
        }
        if (want_e && nsb)
            for (int r = 0; r < 8; r++) {
                dl[r] = _mm512_add_pd(dl[r], _mm512_cvtps_pd(_mm512_castps512_ps256(tot[r])));
                dh[r] = _mm512_add_pd(dh[r], _mm512_cvtps_pd(_mm512_extractf32x8_ps(tot[r], 1)));
            }
    }
    for (int r = 0; r < 8; r++) {
        C[r] = ch[r];
        if (want_e)
            E[r] = nsb ? _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(dl[r])), _mm512_cvtpd_ps(dh[r]), 1)
                       : tot[r];
    }
}

static inline __attribute__((always_inline)) void snap_one(const float *bp, int64_t V, int64_t D, int64_t Dp,
                                                           void *oe, void *oc, int mode, int odt, int nt,
                                                           const int want_e, const int nsb) {
    for (int64_t J = 0; J < V; J += 16) {
        const int64_t nj = V - J < 16 ? V - J : 16;
        const __mmask16 mj = (__mmask16)((1u << nj) - 1u);
        for (int64_t I = 0; I <= J; I += 16) {
            const int64_t ni = V - I < 16 ? V - I : 16;
            const __mmask16 mi = (__mmask16)((1u << ni) - 1u);
            __m512 E[16], C[16];
            for (int hh = 0; hh < 16; hh += 8)
                snap_rows8(bp + I * Dp + hh, bp + J * Dp, Dp, want_e, nsb, E + hh, C + hh);
            if (I == J)                                        /* exact zero diagonal */
                for (int r = 0; r < 16; r++) {
                    if (want_e) E[r] = _mm512_mask_mov_ps(E[r], (__mmask16)(1u << r), _mm512_setzero_ps());
                    C[r] = _mm512_mask_mov_ps(C[r], (__mmask16)(1u << r), _mm512_setzero_ps());
                }
            if (want_e) {
                const __m512 tiny = _mm512_set1_ps(SNAP_TINY), big = _mm512_set1_ps(SNAP_BIG);
                for (int r = 0; r < ni; r++) {
                    __mmask16 fl = ((_mm512_cmp_ps_mask(E[r], tiny, _CMP_LT_OQ) &
                                     _mm512_cmp_ps_mask(C[r], _mm512_setzero_ps(), _CMP_GT_OQ)) |
                                    _mm512_cmp_ps_mask(E[r], big, _CMP_GE_OQ)) & mj;
                    if (I == J) fl &= (__mmask16)~(1u << r);
                    __m512 v = mode == 0 ? _mm512_sqrt_ps(E[r]) : E[r];
                    if (fl) {
                        float tmp[16];
                        _mm512_storeu_ps(tmp, v);
                        for (int l = 0; l < 16; l++)
                            if (fl >> l & 1) tmp[l] = snap_settle(bp, Dp, D, I + r, J + l, mode);
                        v = _mm512_loadu_ps(tmp);
                    }
                    E[r] = v;
                }
                for (int r = 0; r < ni; r++) snap_st16(oe, odt, (I + r) * V + J, E[r], mj, nt);
                if (I != J) {
                    tr16x16(E);
                    for (int c = 0; c < nj; c++) snap_st16(oe, odt, (J + c) * V + I, E[c], mi, nt);
                }
            }
            if (oc) {
                for (int r = 0; r < ni; r++) snap_st16(oc, odt, (I + r) * V + J, C[r], mj, nt);
                if (I != J) {
                    tr16x16(C);
                    for (int c = 0; c < nj; c++) snap_st16(oc, odt, (J + c) * V + I, C[c], mi, nt);
                }
            }
        }
    }
}

static void snap_run(const float *bp, int64_t V, int64_t Vp, int64_t D, int64_t Dp, void *oe, void *oc,
                     int mode, int odt, int nt) {
    (void)Vp;
    if (oe) {
        if (Dp > SNAP_SB) snap_one(bp, V, D, Dp, oe, oc, mode, odt, nt, 1, 1);
        else snap_one(bp, V, D, Dp, oe, oc, mode, odt, nt, 1, 0);
    } else snap_one(bp, V, D, Dp, oe, oc, mode, odt, nt, 0, 0);
}
#else /* portable: the same arithmetic, pair by pair */
static int snap_load(const void *h, int dt, int64_t off, int64_t V, int64_t D, int64_t Vp, int64_t Dp,
                     float *bp) {
    int bad = 0;
    for (int64_t i = 0; i < Vp; i++) {
        float *c = bp + (i / 16) * Dp * 16 + i % 16;
        for (int64_t k = 0; k < Dp; k++) {
            const float v = (i < V && k < D) ? snap_in(h, dt, off + i * D + k) : 0.0f;
            bad |= !isfinite(v);
            c[16 * k] = v;
        }
    }
    return bad;
}

static void snap_run(const float *bp, int64_t V, int64_t Vp, int64_t D, int64_t Dp, void *oe, void *oc,
                     int mode, int odt, int nt) {
    (void)nt; (void)Vp;
    snap_pairs(bp, V, D, Dp, oe, oc, mode, odt);
}
#endif

void emb_snap_multi(const void *h, int64_t dt, int64_t V, int64_t D, int64_t t0, int64_t t1,
                    void *out_e, void *out_c, int64_t mode, int64_t odt) {
    if (V <= 0 || (!out_e && !out_c)) return;
    const int64_t Vp = (V + 15) / 16 * 16, Dp = D > 0 ? (D + 15) / 16 * 16 : 16;
    float *bp = (float *)aligned_alloc(64, sizeof(float) * (size_t)(Dp * Vp));
    if (!bp) return;
    const int64_t esz = odt == 0 ? 4 : 2, snap = V * V * esz;
    const uintptr_t al = (uintptr_t)(16 * esz - 1);
    const int nt = (mode & 2) && (V % 16 == 0) && (!out_e || ((uintptr_t)out_e & al) == 0) &&
                   (!out_c || ((uintptr_t)out_c & al) == 0);
    mode &= 1;
    const int64_t in_bytes = V * D * (dt == 0 ? 4 : 2);
    for (int64_t t = t0; t < t1; t++) {
        const int bad = snap_load(h, (int)dt, t * V * D, V, D, Vp, Dp, bp);
        if (t + 1 < t1)                                   /* the next snapshot, while this one computes */
            for (int64_t q = 0; q < in_bytes; q += 64) __builtin_prefetch((const char *)h + (t + 1) * in_bytes + q);
        void *oe = out_e ? (char *)out_e + t * snap : NULL, *oc = out_c ? (char *)out_c + t * snap : NULL;
        if (bad) snap_pairs(bp, V, D, Dp, oe, oc, (int)mode, (int)odt);     /* NaN / inf: IEEE, pair by pair */
        else snap_run(bp, V, Vp, D, Dp, oe, oc, (int)mode, (int)odt, nt);
    }
#if EMB_AVX512
    _mm_sfence();
#endif
    free(bp);
}

/* the single-metric entry points of earlier ABIs (out: base indexed by the absolute t) */
void emb_snap_euclid(const void *h, int64_t dt, int64_t V, int64_t D, int64_t t0, int64_t t1,
                     void *out, int64_t mode, int64_t odt) {
    emb_snap_multi(h, dt, V, D, t0, t1, out, NULL, mode, odt);
}

void emb_snap_cheb(const void *h, int64_t dt, int64_t V, int64_t D, int64_t t0, int64_t t1,
                   void *out, int64_t unused, int64_t odt) {
    (void)unused;
    emb_snap_multi(h, dt, V, D, t0, t1, NULL, out, 0, odt);
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

#include "kernels_stream.c"
