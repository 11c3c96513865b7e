/* Tier portable (any CPU; on x86-64 built for x86-64-v2, i.e. SSE4.2 without FMA): the
 * per-ISA part of kernels.c, in GCC/Clang vector extensions, 4 float32 lanes.
 * No fused multiply-add: VMAC is a multiply and an add, each rounded (never the C library's
 * software fmaf).  The gram bound holds unchanged (see kernels.c).  16 registers assumed:
 * gram tiles 3 x 16 (12 accumulators; 3 does not divide the panel, its last 2 rows are a tile of
 * their own), Chebyshev / Manhattan tiles 4 x 8, snapshot tiles 1 x 16. */
#define EMB_TIER_NAME "portable"
#define VW 4
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vfi __attribute__((vector_size(16)));
#ifndef GMR
#define GMR 3
#endif
#ifndef GNV
#define GNV 4
#endif
#define CMR 4
#define CNV 2
#define SNR 1
#define EMB_HAS_FMA 0
#define VSET1(s) ((vf){(s), (s), (s), (s)})
#define VMAC(acc, a, b) ((acc) + (a) * (b))      /* two roundings: -ffp-contract=off */
#define VABS(x) ((vf)((vfi)(x) & (vfi){0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff}))
/* max(m, |x|): for m >= 0 and non-NaN x every maximum is the same value */
static inline vf vabsmax_portable(vf m, vf x) {
    const vf a = VABS(x);
    const vfi gt = a > m;
    return (vf)(((vfi)a & gt) | ((vfi)m & ~gt));
}
#define VABSMAX(m, x) vabsmax_portable(m, x)

/* acc + t * t rounded once to float32, exactly as an FMA would (so snapshots keep the same bits
 * on every tier) without the C library's software fmaf: t * t is exact in float64, the float64
 * sum is made round-to-odd from its exact error (TwoSum), and rounding a round-to-odd float64
 * (53 >= 24 + 2 bits) to float32 is the correctly rounded result (Boldo & Melquiond 2008).
 * For finite inputs; a non-finite sum is passed through. */
typedef double vd2 __attribute__((vector_size(16)));
typedef uint64_t vu2 __attribute__((vector_size(16)));
typedef float vf2 __attribute__((vector_size(8)));
/* two lanes; integer operations only (no 64-bit vector compares or arithmetic shifts, which SSE
 * lacks): fix = 1 when e != 0 and s's last bit is even, step = +1 when e has s's sign, else -1 */
static inline vf2 sqacc2(vf2 acc, vf2 t) {
    const vd2 td = __builtin_convertvector(t, vd2), c = __builtin_convertvector(acc, vd2);
    const vd2 p = td * td, s = p + c, bb = s - p;
    const vd2 e = (p - (s - bb)) + (c - bb);
    const vu2 u = (vu2)s, ue = (vu2)e, m = ue << 1;
    const vu2 fix = ((m | (0 - m)) >> 63) & ~u & 1;
    const vu2 step = 1 - (((ue ^ u) >> 63) << 1);
    return __builtin_convertvector((vd2)(u + ((0 - fix) & step)), vf2);
}
static inline vf vsqacc_exact(vf acc, vf t) {
    vf2 a[2], b[2], r[2];
    memcpy(a, &acc, sizeof acc);
    memcpy(b, &t, sizeof t);
    r[0] = sqacc2(a[0], b[0]);
    r[1] = sqacc2(a[1], b[1]);
    vf out;
    memcpy(&out, r, sizeof out);
    return out;
}
static inline float sqacc_exact(float acc, float t) {
    const double p = (double)t * (double)t, c = acc, s = p + c, bb = s - p;
    const double e = (p - (s - bb)) + (c - bb);
    uint64_t u, ue;
    memcpy(&u, &s, 8);
    memcpy(&ue, &e, 8);
    if (e != 0.0 && !(u & 1) && s - s == 0.0) u += ((int64_t)(u ^ ue) >= 0) ? 1 : (uint64_t)-1;
    double r;
    memcpy(&r, &u, 8);
    return (float)r;
}
#if defined(__SSE2__)
#include <emmintrin.h>
/* p[0..4) += (double)v: two widening conversions (the generic vector-extension code is slower) */
#define VACC_F64(p, v) do { \
        const __m128 v_ = (__m128)(v); \
        _mm_storeu_pd((p), _mm_add_pd(_mm_loadu_pd(p), _mm_cvtps_pd(v_))); \
        _mm_storeu_pd((p) + 2, _mm_add_pd(_mm_loadu_pd((p) + 2), _mm_cvtps_pd(_mm_movehl_ps(v_, v_)))); \
    } while (0)
#endif
