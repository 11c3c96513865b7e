/* Native CPU kernels of embdist.pairwise (see the package docstring for the design).
 *
 * Built at first use by _native.py, once per tier, each tier its own cached library:
 *   cc -O3 <tier flags> -DEMB_TIER=<n> -ffp-contract=off -fno-fast-math
 * No OpenMP: the Python side runs work items on a few threads (ctypes releases the GIL),
 * so interrupting and progress stay in Python and no second OpenMP runtime is loaded.
 *
 * One kernel design, four tiers (avx512, avx2, neon, portable).
 * Mechanism: GCC/Clang vector extensions plus a handful of per-ISA intrinsics behind one
 * small interface (the simd_<tier>.h headers, about 20 lines each: the vector type vf of VW
 * float32 lanes, VSET1, VMAC = multiply-add, VABS, VABSMAX = max(m, |x|), whether the tier has
 * FMA, the tile shapes, and optionally VACC_F64, the float64 widening add of the gram flush, which
 * the generic vector-extension code compiles poorly), in the way SimSIMD arranges its per-ISA kernels.  Everything else -- dtype loads, half-float conversions,
 * constants, packing, column sums, the direct float64 sums, the micro-kernels
 * themselves (written once over vf with the ordinary + - * operators, which GCC and Clang
 * accept on __m512 / __m256 / float32x4_t / vector_size types alike), the block drivers and
 * the epilogues -- exists once, in this file and kernels_stream.c.  Why this and not:
 *  - Google Highway: C++ (the engine is built at first use by whatever C compiler the machine
 *    has; a C++ toolchain and libhwy-dev are one more thing to be missing on a laptop or a
 *    cluster node), and its dynamic dispatch is what _native.py already does per tier, with
 *    the tier a recorded, forcible choice (EMBDIST_KERNELS) instead of a hidden one;
 *  - vector extensions alone: they have no fused multiply-add and no cheap max-abs
 *    (VRANGEPS, vabsq), and the exactness contract names the exact operation sequence, so the
 *    four operations whose instruction matters are spelled per ISA, in one place;
 *  - intrinsics everywhere: four copies of every kernel, which is what this file replaced.
 * The AVX-512 tier keeps one hand-vectorised epilogue, the snapshot writer (16x16 register
 * transposes, masked stores); every other epilogue, the Euclidean one included, is generic
 * (float64 vector extensions, the square root spelled per ISA by VSQRT_D where the tier has it).
 *
 * Arithmetic contract (identical on every tier unless said otherwise):
 *  - gram:  per GBLK = GNCH * 16 products GNCH float32 chains of 16 multiply-adds from zero
 *           (k0..k0+15, k0+16..k0+31, ...; GNCH = 2, avx2 16: simd_avx2.h says why), summed
 *           pairwise in float32 (GLOG = log2 GNCH levels), then added to a float64 accumulator (the
 *           widening conversion and add spelled per ISA by VACC_F64 where the tier has it: the
 *           same values).  A chain
 *           errs by <= gamma_16 sum|a_k b_k| whether a step is one fused multiply-add (avx512,
 *           avx2, neon: 16 roundings per term at most) or a rounded multiply and a rounded add
 *           (portable: the product's rounding plus at most 15 additions, the first addition to
 *           0 being exact), so |fl(G) - G| <= gamma_(16 + GLOG) sum|a_k b_k| + O(2^-53) (gamma_17,
 *           avx2 gamma_20: the tier reports it, emb_gram_shape, and Python's bound uses it; the
 *           last block of a row may hold fewer chains, so d is padded to whole chains only);
 *           underflow: one multiplication (or FMA) per product may err by 2^-150 absolutely,
 *           additions of subnormals are exact, which c3 = dp 2^-148 covers.  The values differ
 *           in the last bits between tiers; the proven bound (for the tier's shape) and the
 *           recomputation rule are the same, so every tier meets the Euclidean contract.
 *  - cheb:  max of |b - a| computed as float32 subtract + exact abs-max, bit-identical to
 *           torch's abs(a - b).max() whatever the order, on every tier.
 *  - l1:    float32 |b - a| summed 16 at a time in float32, then in float64.
 *  - direct: float64 sum of float64 squared differences of the stored rows (8 lanes, fixed order).
 *  - snapshots: the square-accumulate acc + t*t rounded once on every tier (the FMA instruction;
 *           on portable an exact emulation, simd_portable.h), so all tiers give the same bits
 *           (see the snapshot section).  Checked by tests/kernels_harness.c on every tier.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EMB_ABI 13
#define PW 32      /* panel width: rows per packed panel (and columns per panel tile) */
#define FLUSH 16   /* fp32 terms per float64 flush in the l1 / snapshot kernels */
#define GCH 16     /* gram: multiply-adds per float32 chain */

/* ------------------------------------------------------------------ tier selection */
#define EMB_T_PORTABLE 0
#define EMB_T_AVX2 1
#define EMB_T_AVX512 2
#define EMB_T_NEON 3
#ifndef EMB_TIER
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define EMB_TIER EMB_T_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define EMB_TIER EMB_T_AVX2
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define EMB_TIER EMB_T_NEON
#else
#define EMB_TIER EMB_T_PORTABLE
#endif
#endif

#if EMB_TIER == EMB_T_AVX512
#define EMB_AVX512 1
#include "simd_avx512.h"
#elif EMB_TIER == EMB_T_AVX2
#define EMB_AVX512 0
#include "simd_avx2.h"
#elif EMB_TIER == EMB_T_NEON
#define EMB_AVX512 0
#include "simd_neon.h"
#else
#define EMB_AVX512 0
#include "simd_portable.h"
#endif

#ifndef GNCH
#define GNCH 2     /* gram: chains per float64 flush, a power of two (a tier's header may set 8) */
#endif
/* the chains of a flush are summed pairwise (a binary tree of GLOG levels) */
#define GLOG (GNCH == 1 ? 0 : GNCH == 2 ? 1 : GNCH == 4 ? 2 : GNCH == 8 ? 3 : GNCH == 16 ? 4 : -1)
#if GLOG < 0
#error "GNCH must be 1, 2, 4, 8 or 16"
#endif
#define GBLK (GCH * GNCH)   /* gram: products per float64 flush (the last of a row may be shorter) */
#define GBOUND (GCH + GLOG) /* gram: the float32 part errs by <= gamma_GBOUND sum|a_k b_k| per flush */
#define GNC (GNV * VW)   /* gram: columns per tile */
#ifndef GREM_NV
#define GREM_NV GNV      /* gram: vectors per row of the tile of the PW % GMR rows left in a panel */
#endif
#define GNVMAX (GNV > GREM_NV ? GNV : GREM_NV)
#if PW % (GREM_NV * VW) || (GREM_NV * VW) % GNC
#error "the remainder tile must cover whole gram tiles"
#endif
#define CNC (CNV * VW)   /* chebyshev / manhattan: columns per tile */
#if PW % GNC || PW % CMR || PW % CNC || 16 % VW || 16 % SNR
#error "tile shapes must divide the panel width"
#endif

#define EMB_INLINE static inline __attribute__((always_inline))

/* the vector interface over the tier's macros */
EMB_INLINE vf vset1(float s) { return VSET1(s); }
EMB_INLINE vf vmac(vf acc, vf a, vf b) { return VMAC(acc, a, b); }
EMB_INLINE vf vabs(vf x) { return VABS(x); }
EMB_INLINE vf vabsmax(vf m, vf x) { return VABSMAX(m, x); }
#if EMB_HAS_FMA
EMB_INLINE vf vsqacc(vf acc, vf t) { return VMAC(acc, t, t); }   /* acc + t*t, one rounding */
#else
EMB_INLINE vf vsqacc(vf acc, vf t) { return vsqacc_exact(acc, t); }
#endif

int emb_abi(void) { return EMB_ABI; }
int emb_has_avx512(void) { return EMB_AVX512; }
const char *emb_tier(void) { return EMB_TIER_NAME; }
/* the gram's summation shape, for the bound on the Python side: GCH | GNCH << 8 | GBOUND << 16 */
int emb_gram_shape(void) { return GCH | GNCH << 8 | GBOUND << 16; }

/* ------------------------------------------------------------------ generic vector helpers */
typedef double vd __attribute__((vector_size(VW * 8)));   /* VW float64 lanes */
EMB_INLINE vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
EMB_INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
EMB_INLINE vf vzero(void) { return vset1(0.0f); }
/* p[0..VW) += (double)v (float64 accumulation of a float32 partial), in two halves of the
 * register width (one float64 vector each: no wider-than-register temporaries) */
typedef float vfh __attribute__((vector_size(VW * 2)));   /* VW/2 float32 lanes */
typedef double vdh __attribute__((vector_size(VW * 4)));  /* VW/2 float64 lanes: one register */
typedef int64_t vlh __attribute__((vector_size(VW * 4)));  /* VW/2 int64 lanes (masks of vdh) */
typedef int32_t vih __attribute__((vector_size(VW * 2)));  /* VW/2 int32 lanes (masks of vfh) */
EMB_INLINE vdh vsqrt_d(vdh v) {   /* lane-wise sqrt (the tier's VSQRT_D instruction when it names one) */
#ifdef VSQRT_D
    return VSQRT_D(v);
#else
    for (int l = 0; l < VW / 2; l++) v[l] = __builtin_sqrt(v[l]);
    return v;
#endif
}
EMB_INLINE void vacc_f64(double *p, vf v) {
#ifdef VACC_F64
    VACC_F64(p, v);
#else
    vfh h[2];
    memcpy(h, &v, sizeof v);
    for (int q = 0; q < 2; q++) {
        vdh c;
        memcpy(&c, p + q * (VW / 2), sizeof c);
        c += __builtin_convertvector(h[q], vdh);
        memcpy(p + q * (VW / 2), &c, sizeof c);
    }
#endif
}

/* acc + t*t rounded once (the snapshots' square-accumulate, the same bits on every tier):
 * the FMA instruction where the tier has one, else sqacc_exact */
#if EMB_HAS_FMA
EMB_INLINE float sqacc(float acc, float t) { return fmaf(t, t, acc); }
#else
EMB_INLINE float sqacc(float acc, float t) { return sqacc_exact(acc, t); }
#endif

/* ------------------------------------------------------------------ dtype loads
 * dt: 0 float32, 1 bfloat16, 2 float16 (the stored dtype; never a float32 copy of a matrix) */
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

EMB_INLINE float ld_f32(const void *x, const int dt, int64_t idx) {
    if (dt == 0) return ((const float *)x)[idx];
    const uint16_t h = ((const uint16_t *)x)[idx];
    if (dt == 1) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }
    return half_to_float(h);
}

/* f(dt) with dt a compile-time constant in each branch (so loads vectorise) */
#define DT_DISPATCH(dt, CALL) \
    do { if ((dt) == 0) { const int DT = 0; CALL; } else if ((dt) == 1) { const int DT = 1; CALL; } \
         else { const int DT = 2; CALL; } } while (0)

/* ------------------------------------------------------------------ hashing
 * mix64: the finaliser of the hash tables (the memos here, kernels_stream.c, kernels_dynamics.c);
 * row identity itself is embdist.rows */
static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 33; z *= 0xff51afd7ed558ccdULL;
    z ^= z >> 33; z *= 0xc4ceb9fe1a85ec53ULL;
    z ^= z >> 33; return z;
}

/* ------------------------------------------------------------------ centring helpers
 * acc[k] += float64 sum of column k over rows [r0, r1); where cmin / cmax are given, also the
 * column's min / max (NaN ignored): fl(x - mu) is monotone in x, so max |fl(x - mu)| over a
 * column is reached at its min or max and the centring scale needs no second pass */
EMB_INLINE void col_sums_t(const void *x, const int dt, int64_t d, int64_t r0, int64_t r1, double *acc,
                           float *cmin, float *cmax) {
    for (int64_t i = r0; i < r1; i++) {
        if (cmin)
            for (int64_t k = 0; k < d; k++) {
                const float v = ld_f32(x, dt, i * d + k);
                acc[k] += (double)v;
                cmin[k] = v < cmin[k] ? v : cmin[k];
                cmax[k] = v > cmax[k] ? v : cmax[k];
            }
        else
            for (int64_t k = 0; k < d; k++) acc[k] += (double)ld_f32(x, dt, i * d + k);
    }
}
void emb_col_sums(const void *x, int64_t dt, int64_t n, int64_t d, int64_t r0, int64_t r1, double *acc,
                  float *cmin, float *cmax) {
    (void)n;
    DT_DISPATCH(dt, col_sums_t(x, DT, d, r0, r1, acc, cmin, cmax));
}

/* ------------------------------------------------------------------ packing
 * Panel p holds rows p*PW .. p*PW+PW-1 as packed[p*dp*PW + k*PW + j] (k < dp, zero padded),
 * value fl(fl(x - mu) * scale) (mu may be NULL, scale a power of two), x read in its stored
 * dtype.  norms[i] = float64 sum of squares of the packed row (exact values of what the GEMM sees). */
EMB_INLINE void pack_t(const void *x, const int dt, int64_t n, int64_t d, int64_t dp, const float *mu, float s,
                       float *packed, int64_t p0, int64_t p1, double *norms) {
    /* KB columns of the panel's rows at a time, so the KB destination lines (k-major) stay in
     * L1 while the PW rows are read (row by row over all of d, every store missed L1: the
     * pack took 8 cycles an element); each norm in 8 float64 lanes added in a fixed order (as
     * direct_sq_t), the same on every tier */
    enum { KB = 16 };
    for (int64_t p = p0; p < p1; p++) {
        float *dst = packed + p * dp * PW;
        double acc[PW][8];
        memset(acc, 0, sizeof acc);
        for (int64_t k0 = 0; k0 < d; k0 += KB) {
            const int64_t ke = k0 + KB < d ? k0 + KB : d;
            for (int64_t j = 0; j < PW; j++) {
                const int64_t i = p * PW + j;
                if (i >= n) {
                    for (int64_t k = k0; k < ke; k++) dst[k * PW + j] = 0.0f;
                    continue;
                }
                for (int64_t k = k0; k < ke; k++) {
                    float v = ld_f32(x, dt, i * d + k);
                    if (mu) v = v - mu[k];
                    v = v * s;
                    dst[k * PW + j] = v;
                    acc[j][k & 7] += (double)v * (double)v;
                }
            }
        }
        for (int64_t k = d; k < dp; k++) memset(dst + k * PW, 0, sizeof(float) * PW);
        if (norms)
            for (int64_t j = 0; j < PW && p * PW + j < n; j++) {
                const double *a = acc[j];
                norms[p * PW + j] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            }
    }
}
void emb_pack(const void *x, int64_t dt, int64_t n, int64_t d, int64_t dp, const float *mu, double scale,
                     float *packed, int64_t p0, int64_t p1, double *norms) {
    DT_DISPATCH(dt, pack_t(x, DT, n, d, dp, mu, (float)scale, packed, p0, p1, norms));
}

/* ------------------------------------------------------------------ direct float64 sums
 * Rows i and j of x (stored dtype): float64 sum of float64 squared differences in 8 lanes
 * added in a fixed order, so identical rows give identical sums and (i, j), (j, i) agree. */
EMB_INLINE double direct_sq_t(const void *x, const int dt, int64_t d, int64_t i, int64_t j) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        for (int l = 0; l < 8; l++) {
            const double t = (double)ld_f32(x, dt, j * d + k + l) - (double)ld_f32(x, dt, i * d + k + l);
            s[l] += t * t;
        }
    for (int l = 0; k < d; k++, l++) {
        const double t = (double)ld_f32(x, dt, j * d + k) - (double)ld_f32(x, dt, i * d + k);
        s[l] += t * t;
    }
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}
static double direct_sq(const void *x, int dt, int64_t d, int64_t i, int64_t j) {
    double r;
    DT_DISPATCH(dt, r = direct_sq_t(x, DT, d, i, j));
    return r;
}


/* Direct recomputation of a flagged pair through the representatives a < b of the two rows'
 * duplicate groups (identical rows give identical sums), memoised per work item: a pair of
 * big near-duplicate groups (e.g. 814 x 704 rows a few bf16 steps apart) costs one sum. */
#define MEMO 2048
typedef struct { int64_t key; double val; } memo_t;

static double memo_sq(memo_t *tab, const void *x, int dt, int64_t d, int64_t n, int64_t ga, int64_t gb) {
    const int64_t a = ga < gb ? ga : gb, b = ga < gb ? gb : ga;
    if (!tab) return direct_sq(x, dt, d, a, b);
    const int64_t key = a * n + b;
    uint64_t h = mix64((uint64_t)key) & (MEMO - 1);
    for (int p = 0; p < 8; p++, h = (h + 1) & (MEMO - 1)) {
        if (tab[h].key == key) return tab[h].val;
        if (tab[h].key < 0) {
            double v = direct_sq(x, dt, d, a, b);
            tab[h].key = key;
            tab[h].val = v;
            return v;
        }
    }
    return direct_sq(x, dt, d, a, b);
}

/* ------------------------------------------------------------------ micro-kernels (generic over vf)
 * a: GMR / CMR consecutive rows of a packed panel, b: GNC / CNC consecutive columns of another,
 * both k-major with stride PW (panels are 64-byte aligned). */

/* The one loop of every engine micro-kernel: for K steps along k (ak, bk advance by PW), load
 * the NV column vectors bv[v] of bk, broadcast each of the R row values of ak as s, and run
 * BODY for every (r, v).  UNROLL: the loop's unroll pragma. */
#define EMB_PRAGMA(x) _Pragma(#x)
#define TS_NVMAX (GNVMAX > CNV ? GNVMAX : CNV)
#define TILE_STEPS(UNROLL, K, R, NV, ak, bk, BODY)                                        \
    EMB_PRAGMA(GCC unroll UNROLL)                                                          \
    for (int64_t k_ = 0; k_ < (K); k_++, ak += PW, bk += PW) {                             \
        vf bv[TS_NVMAX];   /* fixed size: a runtime NV would make a stack VLA */       \
        for (int v = 0; v < (NV); v++) bv[v] = vload(bk + v * VW);                         \
        for (int r = 0; r < (R); r++) {                                                    \
            const vf s = vset1(ak[r]);                                                     \
            for (int v = 0; v < (NV); v++) { BODY; }                                       \
        }                                                                                  \
    }

/* one float32 chain: c[r][v] = sum of GCH products a[k*PW + r] * b[k*PW + v*VW + lane], from
 * zero, for the R (<= GMR) rows of the tile */
EMB_INLINE void gram_chain(const float *ak, const float *bk, vf c[GMR][GNVMAX], const int R, const int NV) {
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) c[r][v] = vzero();
    TILE_STEPS(16, GCH, R, NV, ak, bk, c[r][v] = vmac(c[r][v], s, bv[v]))
}

/* C[r][c] (float64, ldc) += sum_k a[k*PW + r] * b[k*PW + c], r < R, c < NV * VW; kc % GCH == 0.
 * Per block of GBLK products (the last one of kc may be shorter): its nq <= GNCH chains of GCH,
 * each from zero, summed pairwise in float32 as they come (a binary counter: chain q merges with
 * the parked sums of the 1, 2, 4, ... chains before it while bit l of q is set; a short block's
 * leftover parked sums are added at the end), so every product passes at most GCH + GLOG
 * roundings, and the block's sum is added to the float64 tile once:
 * |fl(block) - block| <= gamma_GBOUND sum|a_k b_k| (see the header).  Pairwise, 8 chains cost the
 * bound of 4 added one by one, 16 one more rounding. */
EMB_INLINE void gram_tile_r(const float *a, const float *b, int64_t kc, double *C, int64_t ldc, const int R,
                            const int NV) {
    for (int64_t k0 = 0; k0 < kc; k0 += GBLK) {
        const int nq = kc - k0 >= GBLK ? GNCH : (int)((kc - k0) / GCH);
        vf park[GLOG > 0 ? GLOG : 1][GMR][GNVMAX], c[GMR][GNVMAX];
        int l = 0;
        EMB_PRAGMA(GCC unroll 1)      /* one copy of the chain: unrolled, 8 chains overflow the uop cache */
        for (int q = 0; q < nq; q++) {
            gram_chain(a + (k0 + q * GCH) * PW, b + (k0 + q * GCH) * PW, c, R, NV);
            for (l = 0; (q >> l) & 1; l++)
                for (int r = 0; r < R; r++)
                    for (int v = 0; v < NV; v++) c[r][v] = park[l][r][v] + c[r][v];
            if (q < nq - 1)
                for (int r = 0; r < R; r++)
                    for (int v = 0; v < NV; v++) park[l][r][v] = c[r][v];
        }
        for (l = l + 1; l < GLOG; l++)      /* a short block: the sums parked above c's level */
            if ((nq >> l) & 1)
                for (int r = 0; r < R; r++)
                    for (int v = 0; v < NV; v++) c[r][v] = park[l][r][v] + c[r][v];
        for (int r = 0; r < R; r++)
            for (int v = 0; v < NV; v++) vacc_f64(C + r * ldc + v * VW, c[r][v]);
    }
}
/* GMR rows, and the PW % GMR rows left at the end of a panel (GMR need not divide PW) */
static __attribute__((noinline)) void gram_tile(const float *a, const float *b, int64_t kc, double *C, int64_t ldc) {
    gram_tile_r(a, b, kc, C, ldc, GMR, GNV);
}
static __attribute__((noinline)) void gram_tile_rem(const float *a, const float *b, int64_t kc, double *C, int64_t ldc) {
    gram_tile_r(a, b, kc, C, ldc, PW % GMR ? PW % GMR : GMR, GREM_NV);
}

/* C[r][c] (float32, ldc) = max(C, max_k |b[k*PW+c] - a[k*PW+r]|) */
static inline void cheb_tile(const float *a, const float *b, int64_t kc, float *C, int64_t ldc) {
    vf c[CMR][CNV];
    for (int r = 0; r < CMR; r++)
        for (int v = 0; v < CNV; v++) c[r][v] = vload(C + r * ldc + v * VW);
    TILE_STEPS(4, kc, CMR, CNV, a, b, c[r][v] = vabsmax(c[r][v], bv[v] - s))
    for (int r = 0; r < CMR; r++)
        for (int v = 0; v < CNV; v++) vstore(C + r * ldc + v * VW, c[r][v]);
}

/* C[r][c] (float64) += sum_k |b - a|, float32 partial sums of FLUSH terms */
static inline void l1_tile(const float *a, const float *b, int64_t kc, double *C, int64_t ldc) {
    for (int64_t k0 = 0; k0 < kc; k0 += FLUSH) {
        vf acc[CMR][CNV];
        for (int r = 0; r < CMR; r++)
            for (int v = 0; v < CNV; v++) acc[r][v] = vzero();
        const float *ak = a + k0 * PW, *bk = b + k0 * PW;
        TILE_STEPS(1, FLUSH, CMR, CNV, ak, bk, acc[r][v] = acc[r][v] + vabs(bv[v] - s))
        for (int r = 0; r < CMR; r++)
            for (int v = 0; v < CNV; v++) vacc_f64(C + r * ldc + v * VW, acc[r][v]);
    }
}

/* ------------------------------------------------------------------ block drivers
 * A work item: rows [r0, r0 + nr) (r0 % PW == 0, nr % PW == 0 after padding) against
 * columns [c0, c0 + nc) (c0 % PW == 0).  Only pairs j > i are stored (plus mirror).
 * C: nrp*PW x ncp*PW tile (ldc = ncp*PW), zeroed here. */
#define KC 256
#if KC % GBLK
#error "KC must be whole gram blocks (only the last block of a row is short, see euclid_params)"
#endif
enum { K_GRAM, K_CHEB, K_L1 };

EMB_INLINE void tiles(const int kind, const float *packed, int64_t dp, int64_t r0, int64_t nrp, int64_t c0,
                      int64_t ncp, void *C) {
    const int64_t ldc = ncp * PW;
    const size_t esz = kind == K_CHEB ? sizeof(float) : sizeof(double);
    memset(C, 0, esz * (size_t)(nrp * PW) * (size_t)ldc);
    const int mr = kind == K_GRAM ? GMR : CMR, nc = kind == K_GRAM ? GNC : CNC;
    for (int64_t pc = 0; pc < dp; pc += KC) {
        int64_t kc = dp - pc < KC ? dp - pc : KC;
        for (int64_t cp = 0; cp < ncp; cp++)
            for (int cs = 0; cs < PW; cs += nc) {
                const float *b = packed + (c0 / PW + cp) * dp * PW + pc * PW + cs;
                for (int64_t rp = 0; rp < nrp; rp++) {
                    const float *a = packed + (r0 / PW + rp) * dp * PW + pc * PW;
                    for (int s = 0; s < PW; s += mr) {
                        const int64_t off = (rp * PW + s) * ldc + cp * PW + cs;
                        const int rem = kind == K_GRAM && s + GMR > PW;   /* GREM_NV * VW columns from cs */
                        /* a tile whose columns all lie at or left of its first row holds no pair
                         * j > i (the epilogues read only those): skipped, 1.5% of the work */
                        if (c0 + cp * PW + cs + (rem ? GREM_NV * VW : nc) - 1 <= r0 + rp * PW + s) continue;
                        if (rem) {
                            if (cs % (GREM_NV * VW) == 0) gram_tile_rem(a + s, b, kc, (double *)C + off, ldc);
                        }
                        else if (kind == K_GRAM) gram_tile(a + s, b, kc, (double *)C + off, ldc);
                        else if (kind == K_CHEB) cheb_tile(a + s, b, kc, (float *)C + off, ldc);
                        else l1_tile(a + s, b, kc, (double *)C + off, ldc);
                    }
                }
            }
    }
}

static void gram_block(const float *packed, int64_t dp, int64_t r0, int64_t nrp, int64_t c0, int64_t ncp,
                       double *C) {
    tiles(K_GRAM, packed, dp, r0, nrp, c0, ncp, C);
}
static void cheb_block(const float *packed, int64_t dp, int64_t r0, int64_t nrp, int64_t c0, int64_t ncp,
                       float *C) {
    tiles(K_CHEB, packed, dp, r0, nrp, c0, ncp, C);
}
static void l1_block(const float *packed, int64_t dp, int64_t r0, int64_t nrp, int64_t c0, int64_t ncp,
                     double *C) {
    tiles(K_L1, packed, dp, r0, nrp, c0, ncp, C);
}


static const float F32_TINY = 1.40129846e-45f; /* smallest positive subnormal */

/* 4 x 4 float32 transposes in 128-bit vectors on every tier (GCC spells the shuffle
 * __builtin_shuffle, Clang __builtin_shufflevector) */
typedef float v4f __attribute__((vector_size(16)));
#if defined(__clang__)
#define SHUF4(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
typedef int32_t v4i __attribute__((vector_size(16)));
#define SHUF4(a, b, i0, i1, i2, i3) __builtin_shuffle(a, b, (v4i){i0, i1, i2, i3})
#endif

/* out[j][i] = R[i - r0][j - c0] for the pairs i < j of the block (the lower-triangle mirror),
 * written as contiguous runs along i: 4 x 4 transposes in registers where all 16 pairs have
 * i < j (a scalar copy cost four times the instructions), single floats along the diagonal.
 * R: the block's values, Chebyshev's float32 tile, else the block's rows of out just written
 * (still in cache; a copy in the scratch measured no faster and cost 4 bytes a pair of it). */
static void mirror_block(const float *R, int64_t ldr, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                         int64_t n, float *out, int64_t ld) {
    const int64_t rend = r0 + nr < n ? r0 + nr : n, cend = c0 + nc < n ? c0 + nc : n;
    for (int64_t jb = c0; jb < cend; jb += 16) {
        const int64_t je = jb + 16 < cend ? jb + 16 : cend;
        for (int64_t i = r0; i < rend;) {
            const float *rr = R + (i - r0) * ldr - c0;
            if (i + 4 <= rend && jb >= i + 4 && je == jb + 16) {
                for (int64_t j = jb; j < je; j += 4) {
                    v4f a0, a1, a2, a3;
                    memcpy(&a0, rr + j, 16);
                    memcpy(&a1, rr + ldr + j, 16);
                    memcpy(&a2, rr + 2 * ldr + j, 16);
                    memcpy(&a3, rr + 3 * ldr + j, 16);
                    const v4f t0 = SHUF4(a0, a1, 0, 4, 1, 5), t1 = SHUF4(a0, a1, 2, 6, 3, 7);
                    const v4f t2 = SHUF4(a2, a3, 0, 4, 1, 5), t3 = SHUF4(a2, a3, 2, 6, 3, 7);
                    const v4f o0 = SHUF4(t0, t2, 0, 1, 4, 5), o1 = SHUF4(t0, t2, 2, 3, 6, 7);
                    const v4f o2 = SHUF4(t1, t3, 0, 1, 4, 5), o3 = SHUF4(t1, t3, 2, 3, 6, 7);
                    memcpy(out + j * ld + i, &o0, 16);
                    memcpy(out + (j + 1) * ld + i, &o1, 16);
                    memcpy(out + (j + 2) * ld + i, &o2, 16);
                    memcpy(out + (j + 3) * ld + i, &o3, 16);
                }
                i += 4;
            } else {
                for (int64_t j = (jb > i + 1 ? jb : i + 1); j < je; j++) out[j * ld + i] = rr[j];
                i++;
            }
        }
    }
}

/* a flagged pair (i, j) of the engine (x in its stored dtype dt): direct, through the group
 * representatives */
static double flagged_sq(memo_t *tab, const void *x, int dt, int64_t d, int64_t n, int64_t i, int64_t j,
                         const int64_t *groups) {
    const int64_t gi = groups[i], gj = groups[j];
    if (gi == i && gj == j) return direct_sq(x, dt, d, i, j);   /* no other member */
    return memo_sq(tab, x, dt, d, n, gi, gj);
}

/* params: c1, c2, c3, inv2tol, u, c4, ct2, inv_scale2 (double[8]) */
int64_t emb_euclid_block(const float *packed, int64_t dp, int64_t n, int64_t d, const void *x, int64_t dt,
                         int64_t r0, int64_t nrp, int64_t c0, int64_t ncp, double *C,
                         const double *norms, const double *rnorms, const int64_t *groups,
                         const uint8_t *zero_rows, int64_t mode, const double *prm, float *out,
                         int64_t ld) {
    gram_block(packed, dp, r0, nrp, c0, ncp, C);
#ifdef EMB_GRAM_ONLY
    return 0;
#endif
    const int64_t ldc = ncp * PW;
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
        /* VW/2 pairs per step in float64 vectors of one register (vector extensions, every
         * tier), the few flagged lanes recomputed one by one; the rest in the scalar loop */
        const vdh vzero_d = {0};
        const vfh vzero_f = {0};
        int64_t j = js;
        for (; j + VW / 2 <= cend; j += VW / 2) {
            vdh g, nb, rb, res;
            vlh gj;
            memcpy(&g, Crow + j, sizeof g);
            memcpy(&nb, norms + j, sizeof nb);
            memcpy(&rb, rnorms + j, sizeof rb);
            memcpy(&gj, groups + j, sizeof gj);
            const vdh s = na + nb;
            vdh d2 = s - 2.0 * g;
            const vdh e = c1 * (ra * rb) + c2 * s + c3;
            const vdh ce = u * (ra + rb) + c4;
            const vlh same = gj == gi;
            const vlh fl = ~same & ((d2 <= e * inv2tol) | (d2 * ct2 <= ce * ce));
            d2 = d2 * isc2;
            d2 = (vdh)((vlh)d2 & ~(d2 < 0.0));                       /* max(d2, 0), NaN kept */
            for (int l = 0; l < VW / 2; l++)
                if (fl[l]) { d2[l] = flagged_sq(memo, x, (int)dt, d, n, i, j + l, groups); flagged++; }
            if (mode == 0) res = vsqrt_d(d2);
            else if (mode == 1) res = d2;
            else {
                res = d2 * 0.5;
                const vlh big = res > 2.0;
                res = (vdh)(((vlh)res & ~big) | ((vlh)(vzero_d + 2.0) & big));   /* min(res, 2) */
                if (zero_rows)
                    for (int l = 0; l < VW / 2; l++)
                        if (zero_rows[j + l] != zi) res[l] = 1.0;
            }
            res = (vdh)((vlh)res & ~same);
            vfh r32 = __builtin_convertvector(res, vfh);
            vih z = (r32 == 0.0f) & ~__builtin_convertvector(same, vih);
            if (mode == 2) z &= __builtin_convertvector(res != 0.0, vih);
            r32 = (vfh)(((vih)r32 & ~z) | ((vih)(vzero_f + F32_TINY) & z));
            memcpy(orow + j, &r32, sizeof r32);
        }
        for (; j < cend; j++) {
            double g = Crow[j], nb = norms[j], rb = rnorms[j];
            double s = na + nb, d2 = s - 2.0 * g;
            double e = c1 * (ra * rb) + c2 * s + c3;
            double ce = u * (ra + rb) + c4;
            int same = groups[j] == gi;
            int fl = !same && (d2 <= e * inv2tol || d2 * ct2 <= ce * ce);
            d2 = d2 * isc2; if (d2 < 0) d2 = 0;
            if (fl) { d2 = flagged_sq(memo, x, (int)dt, d, n, i, j, groups); flagged++; }
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
        }
    }
    mirror_block(out + r0 * ld + c0, ld, r0, nrp * PW, c0, ncp * PW, n, out, ld);
    return flagged;
}

/* row i of a block whose columns end at cend: 0 when i is past the matrix; else the diagonal
 * zeroed when the block holds it, *js = the block's first column j > i, and 1 */
EMB_INLINE int block_row(int64_t i, int64_t n, int64_t c0, int64_t cend, float *out, int64_t ld, int64_t *js) {
    if (i >= n) return 0;
    if (i >= c0 && i < cend) out[i * ld + i] = 0.0f;
    *js = i + 1 > c0 ? i + 1 : c0;
    return 1;
}

void emb_cheb_block(const float *packed, int64_t dp, int64_t n, float *C, int64_t r0, int64_t nrp,
                    int64_t c0, int64_t ncp, float *out, int64_t ld) {
    const int64_t ldc = ncp * PW;
    cheb_block(packed, dp, r0, nrp, c0, ncp, C);
    const int64_t cend = c0 + ncp * PW < n ? c0 + ncp * PW : n;
    for (int64_t r = 0, js; r < nrp * PW && block_row(r0 + r, n, c0, cend, out, ld, &js); r++)
        if (js < cend) memcpy(out + (r0 + r) * ld + js, C + r * ldc - c0 + js, sizeof(float) * (size_t)(cend - js));
    mirror_block(C, ldc, r0, nrp * PW, c0, ncp * PW, n, out, ld);
}

void emb_l1_block(const float *packed, int64_t dp, int64_t n, double *C, int64_t r0, int64_t nrp,
                  int64_t c0, int64_t ncp, float *out, int64_t ld) {
    const int64_t ldc = ncp * PW;
    l1_block(packed, dp, r0, nrp, c0, ncp, C);
    const int64_t cend = c0 + ncp * PW < n ? c0 + ncp * PW : n;
    for (int64_t r = 0, js; r < nrp * PW && block_row(r0 + r, n, c0, cend, out, ld, &js); r++) {
        const int64_t i = r0 + r;
        const double *Crow = C + r * ldc - c0;
        for (int64_t j = js; j < cend; j++) {
            float v = (float)Crow[j];
            if (v == 0.0f && Crow[j] != 0.0) v = F32_TINY;
            out[i * ld + j] = v;
        }
    }
    mirror_block(out + r0 * ld + c0, ld, r0, nrp * PW, c0, ncp * PW, n, out, ld);
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
 * Every other tier runs the same arithmetic through snap_rows (the tile over vf) and a plain-C
 * writer; any snapshot holding a NaN or an infinity goes pair by pair (snap_pairs), where the
 * Chebyshev max keeps NaN like torch.  The square-accumulate is rounded once everywhere
 * (sqacc / vsqacc), so all tiers write the same bits. */
#define SNAP_SB 64     /* fp32 terms per float32 superblock (4 chains of FLUSH) */

static const float SNAP_TINY = 0x1p-90f, SNAP_BIG = 0x1p126f;

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
 * (as torch's max does): used for snapshots with non-finite values */
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
                        acc = sqacc(acc, tv);
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
#else /* every other tier: the tile over vf (same arithmetic, same bits), the epilogue in plain C */
EMB_INLINE int snap_load_t(const void *h, const int dt, int64_t off, int64_t V, int64_t D, int64_t Vp, int64_t Dp,
                           float *bp) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < Vp; i++) {
        float *c = bp + (i / 16) * Dp * 16 + i % 16;
        int64_t k = 0;
        if (i < V)
            for (; k < D; k++) {
                const float v = ld_f32(h, dt, off + i * D + k);
                uint32_t u; memcpy(&u, &v, 4);
                bad |= (u & 0x7f800000u) == 0x7f800000u;          /* NaN, +-inf */
                c[16 * k] = v;
            }
        for (; k < Dp; k++) c[16 * k] = 0.0f;
    }
    return bad != 0;
}

static int snap_load(const void *h, int dt, int64_t off, int64_t V, int64_t D, int64_t Vp, int64_t Dp,
                     float *bp) {
    int r;
    DT_DISPATCH(dt, r = snap_load_t(h, DT, off, V, D, Vp, Dp, bp));
    return r;
}

/* rows hh..hh+SNR-1 of the panel at pa (pa = panel + hh), against the 16 columns of the panel
 * at pb: E[r*16 + c] = d^2 (float32, want_e), C[r*16 + c] = max |b - a|: snap_pairs' arithmetic */
EMB_INLINE void snap_rows(const float *pa, const float *pb, int64_t Dp, const int want_e, const int nsb,
                          float *E, float *Cc) {
    enum { NV = 16 / VW };
    vf tot[SNR][NV], ch[SNR][NV];
    vd dsum[SNR][NV];
    for (int r = 0; r < SNR; r++)
        for (int v = 0; v < NV; v++) {
            tot[r][v] = ch[r][v] = vzero();
            dsum[r][v] = __builtin_convertvector(vzero(), vd);
        }
    for (int64_t s0 = 0; s0 < Dp; s0 += SNAP_SB) {
        const int64_t se = s0 + SNAP_SB < Dp ? s0 + SNAP_SB : Dp;
        if (nsb)
            for (int r = 0; r < SNR; r++)
                for (int v = 0; v < NV; v++) tot[r][v] = vzero();
        for (int64_t k0 = s0; k0 < se; k0 += FLUSH) {
            vf acc[SNR][NV];
            for (int r = 0; r < SNR; r++)
                for (int v = 0; v < NV; v++) acc[r][v] = vzero();
            const float *ak = pa + 16 * k0, *bk = pb + 16 * k0;
#pragma GCC unroll 16
            for (int kk = 0; kk < FLUSH; kk++) {
                vf bv[NV];
                for (int v = 0; v < NV; v++) bv[v] = vload(bk + 16 * kk + v * VW);
                for (int r = 0; r < SNR; r++) {
                    const vf s = vset1(ak[16 * kk + r]);
                    for (int v = 0; v < NV; v++) {
                        const vf tv = bv[v] - s;
                        if (want_e) acc[r][v] = vsqacc(acc[r][v], tv);
                        ch[r][v] = vabsmax(ch[r][v], tv);
                    }
                }
            }
            if (want_e)
                for (int r = 0; r < SNR; r++)
                    for (int v = 0; v < NV; v++) tot[r][v] = tot[r][v] + acc[r][v];
        }
        if (want_e && nsb)
            for (int r = 0; r < SNR; r++)
                for (int v = 0; v < NV; v++) dsum[r][v] += __builtin_convertvector(tot[r][v], vd);
    }
    for (int r = 0; r < SNR; r++)
        for (int v = 0; v < NV; v++) {
            vstore(Cc + r * 16 + v * VW, ch[r][v]);
            if (want_e) vstore(E + r * 16 + v * VW, nsb ? __builtin_convertvector(dsum[r][v], vf) : tot[r][v]);
        }
}

/* the tile of all 16 rows, one specialisation per (want_e, nsb): registers of its own */
#define SNAP_TILE(NAME, WE, NSB) \
    static __attribute__((noinline)) void NAME(const float *pa, const float *pb, int64_t Dp, float *E, float *Cc) { \
        for (int hh = 0; hh < 16; hh += SNR) snap_rows(pa + hh, pb, Dp, WE, NSB, E + hh * 16, Cc + hh * 16); \
    }
SNAP_TILE(snap_tile_c, 0, 0)
SNAP_TILE(snap_tile_ec, 1, 0)
SNAP_TILE(snap_tile_ec_sb, 1, 1)

static inline void snap_put_run(void *ob, int odt, int64_t idx, const float *v, int64_t m) {
    if (odt == 0 && m == 16) {
        float *o = (float *)ob + idx;
        for (int q = 0; q < 16; q += VW) vstore(o + q, vload(v + q));
    } else if (odt == 0) memcpy((float *)ob + idx, v, sizeof(float) * (size_t)m);
    else for (int64_t l = 0; l < m; l++) snap_put(ob, odt, idx + l, v[l]);
}

/* one tile: rows and mirror of the output written once, exactly symmetric, diagonal 0 */
static inline void snap_store_tile(void *ob, int odt, int64_t V, int64_t I, int64_t J, int64_t ni, int64_t nj,
                                   const float *T) {
    for (int64_t r = 0; r < ni; r++) snap_put_run(ob, odt, (I + r) * V + J, T + r * 16, nj);
    if (I != J) {
        float Tt[256] __attribute__((aligned(64)));
        for (int c = 0; c < 16; c++)
            for (int r = 0; r < 16; r++) Tt[c * 16 + r] = T[r * 16 + c];
        for (int64_t c = 0; c < nj; c++) snap_put_run(ob, odt, (J + c) * V + I, Tt + c * 16, ni);
    }
}

static void snap_one(const float *bp, int64_t V, int64_t D, int64_t Dp, void *oe, void *oc, int mode, int odt,
                     const int want_e, const int nsb) {
    float E[256] __attribute__((aligned(64))), Cc[256] __attribute__((aligned(64)));
    for (int64_t J = 0; J < V; J += 16) {
        const int64_t nj = V - J < 16 ? V - J : 16;
        for (int64_t I = 0; I <= J; I += 16) {
            const int64_t ni = V - I < 16 ? V - I : 16;
            if (!want_e) snap_tile_c(bp + I * Dp, bp + J * Dp, Dp, E, Cc);
            else if (!nsb) snap_tile_ec(bp + I * Dp, bp + J * Dp, Dp, E, Cc);
            else snap_tile_ec_sb(bp + I * Dp, bp + J * Dp, Dp, E, Cc);
            if (I == J)                                        /* exact zero diagonal */
                for (int r = 0; r < 16; r++) E[r * 17] = Cc[r * 17] = 0.0f;
            if (want_e) {
                int any = 0;
                for (int l = 0; l < 256; l++) any |= ((E[l] < SNAP_TINY) & (Cc[l] > 0.0f)) | (E[l] >= SNAP_BIG);
                float pre[256];
                if (any) memcpy(pre, E, sizeof pre);
                if (mode == 0)
                    for (int l = 0; l < 256; l++) E[l] = sqrtf(E[l]);
                if (any)
                    for (int64_t r = 0; r < ni; r++)
                        for (int64_t l = 0; l < nj; l++) {
                            const float e = pre[r * 16 + l];
                            if (((e < SNAP_TINY && Cc[r * 16 + l] > 0.0f) || e >= SNAP_BIG) && !(I == J && l == r))
                                E[r * 16 + l] = snap_settle(bp, Dp, D, I + r, J + l, mode);
                        }
                snap_store_tile(oe, odt, V, I, J, ni, nj, E);
            }
            if (oc) snap_store_tile(oc, odt, V, I, J, ni, nj, Cc);
        }
    }
}

static void snap_run(const float *bp, int64_t V, int64_t Vp, int64_t D, int64_t Dp, void *oe, void *oc,
                     int mode, int odt, int nt) {
    (void)nt; (void)Vp;
    if (oe) {
        if (Dp > SNAP_SB) snap_one(bp, V, D, Dp, oe, oc, mode, odt, 1, 1);
        else snap_one(bp, V, D, Dp, oe, oc, mode, odt, 1, 0);
    } else snap_one(bp, V, D, Dp, oe, oc, mode, odt, 0, 0);
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
#include "kernels_dynamics.c"
