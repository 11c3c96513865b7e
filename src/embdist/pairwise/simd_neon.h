/* Tier neon (AArch64: Apple Silicon, AWS Graviton, NVIDIA Grace): the vector interface of
 * kernels.c.  32 registers of 4 float32 with fused multiply-add: gram tiles 4 x 8,
 * Chebyshev / Manhattan tiles 8 x 8, snapshot tiles 2 x 16. */
#include <arm_neon.h>
#define EMB_TIER_NAME "neon"
#define VW 4
typedef float32x4_t vf;
#define GMR 4
#define GNV 2
#define CMR 8
#define CNV 2
#define SNR 2
static inline vf vset1(float s) { return vdupq_n_f32(s); }
static inline vf vmac(vf acc, vf a, vf b) { return vfmaq_f32(acc, a, b); }
#define EMB_HAS_FMA 1
/* acc + t * t, one rounding (the snapshots' square-accumulate) */
static inline vf vsqacc(vf acc, vf t) { return vfmaq_f32(acc, t, t); }
static inline vf vabs(vf x) { return vabsq_f32(x); }
static inline vf vabsmax(vf m, vf x) { return vmaxq_f32(m, vabsq_f32(x)); }
