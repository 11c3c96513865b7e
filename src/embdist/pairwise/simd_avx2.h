/* Tier avx2 (x86-64 with AVX2 + FMA: AMD Zen 1-5, Intel Haswell and later desktop chips):
 * the vector interface of kernels.c.  16 registers of 8 float32: gram tiles 6 x 16
 * (12 live accumulators; the first chain of a block parked in L1 by the register allocator;
 * 6 does not divide the panel: its last 2 rows are a tile of their own),
 * Chebyshev / Manhattan tiles 4 x 16, snapshot tiles 2 x 16. */
#include <immintrin.h>
#define EMB_TIER_NAME "avx2"
#define VW 8
typedef __m256 vf;
#ifndef GMR
#define GMR 6
#endif
#ifndef GNV
#define GNV 2
#endif
#define CMR 4
#define CNV 2
#define SNR 2
static inline vf vset1(float s) { return _mm256_set1_ps(s); }
static inline vf vmac(vf acc, vf a, vf b) { return _mm256_fmadd_ps(a, b, acc); }
#define EMB_HAS_FMA 1
/* acc + t * t, one rounding (the snapshots' square-accumulate) */
static inline vf vsqacc(vf acc, vf t) { return _mm256_fmadd_ps(t, t, acc); }
static inline vf vabs(vf x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
static inline vf vabsmax(vf m, vf x) { return _mm256_max_ps(m, vabs(x)); }
