/* Tier neon (AArch64: Apple Silicon, AWS Graviton, NVIDIA Grace): the per-ISA part of
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
#define EMB_HAS_FMA 1
#define VSET1(s) vdupq_n_f32(s)
#define VMAC(acc, a, b) vfmaq_f32(acc, a, b)
#define VABS(x) vabsq_f32(x)
#define VABSMAX(m, x) vmaxq_f32(m, vabsq_f32(x))
