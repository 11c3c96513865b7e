/* Tier avx512 (x86-64 with AVX-512 F/DQ/BW/VL): the vector interface of kernels.c.
 * 32 registers of 16 float32: gram tiles 4 x 32 (8 live accumulators + 8 parked),
 * Chebyshev / Manhattan tiles 8 x 32, snapshot tiles 8 x 16. */
#include <immintrin.h>
#define EMB_TIER_NAME "avx512"
#define VW 16
typedef __m512 vf;
#define GMR 4      /* gram: rows per tile */
#define GNV 2      /* gram: vectors per tile row (32 columns) */
#define CMR 8      /* chebyshev / manhattan: rows per tile */
#define CNV 2
#define SNR 8      /* snapshots: rows per call of snap_rows (16 columns) */
static inline vf vset1(float s) { return _mm512_set1_ps(s); }
/* acc + a * b, one rounding (FMA) */
static inline vf vmac(vf acc, vf a, vf b) { return _mm512_fmadd_ps(a, b, acc); }
/* max(m, |x|) for m >= 0 (exact: VRANGEPS max-abs, sign cleared) */
static inline vf vabsmax(vf m, vf x) { return _mm512_range_ps(m, x, 0x0B); }
#define EMB_HAS_FMA 1
/* acc + t * t, one rounding (the snapshots' square-accumulate) */
static inline vf vsqacc(vf acc, vf t) { return _mm512_fmadd_ps(t, t, acc); }
static inline vf vabs(vf x) { return _mm512_abs_ps(x); }
