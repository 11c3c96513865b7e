/* Tier portable (any CPU; on x86-64 built for x86-64-v2, i.e. SSE4.2 without FMA): the
 * vector interface of kernels.c with GCC/Clang vector extensions, 4 float32 lanes.
 * No fused multiply-add: vmac is a multiply and an add, each rounded (never the C library's
 * software fmaf).  The gram bound holds unchanged (see kernels.c).  16 registers assumed:
 * gram tiles 4 x 8, Chebyshev / Manhattan tiles 4 x 8, snapshot tiles 1 x 16. */
#define EMB_TIER_NAME "portable"
#define VW 4
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vfi __attribute__((vector_size(16)));
#define GMR 4
#define GNV 2
#define CMR 4
#define CNV 2
#define SNR 1
static inline vf vset1(float s) { vf v = {s, s, s, s}; return v; }
static inline vf vmac(vf acc, vf a, vf b) { vf p = a * b; return acc + p; }
static inline vf vabs(vf x) { return (vf)((vfi)x & (vfi){0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff}); }
/* max(m, |x|): for m >= 0 and non-NaN x every maximum is the same value */
static inline vf vabsmax(vf m, vf x) {
    const vf a = vabs(x);
    const vfi gt = a > m;
    return (vf)(((vfi)a & gt) | ((vfi)m & ~gt));
}
