/* Tier avx512 (x86-64 with AVX-512 F/DQ/BW/VL): the per-ISA part of kernels.c.
 * 32 registers of 16 float32: gram tiles 8 x 32, Chebyshev / Manhattan tiles 8 x 32,
 * snapshot tiles 8 x 16. */
#include <immintrin.h>
#define EMB_TIER_NAME "avx512"
#define VW 16
typedef __m512 vf;
#ifndef GMR
#define GMR 8      /* gram: rows per tile (16 live accumulators, 16 parked) */
#endif
#define GNV 2      /* gram: vectors per tile row */
#define CMR 8      /* chebyshev / manhattan: rows per tile */
#define CNV 2
#define SNR 8      /* snapshots: rows per call of snap_rows (16 columns) */
#define EMB_HAS_FMA 1
#define VSET1(s) _mm512_set1_ps(s)
#define VMAC(acc, a, b) _mm512_fmadd_ps(a, b, acc)            /* acc + a * b, one rounding */
#define VABS(x) _mm512_abs_ps(x)
#define VABSMAX(m, x) _mm512_range_ps(m, x, 0x0B)            /* max(|m|, |x|), sign cleared: exact */
/* p[0..16) += (double)v: two widening conversions */
#define VACC_F64(p, v) do { \
        _mm512_storeu_pd((p), _mm512_add_pd(_mm512_loadu_pd(p), _mm512_cvtps_pd(_mm512_castps512_ps256(v)))); \
        _mm512_storeu_pd((p) + 8, _mm512_add_pd(_mm512_loadu_pd((p) + 8), \
                                                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))))); \
    } while (0)
#define VSQRT_D(v) ((vdh)_mm512_sqrt_pd((__m512d)(v)))     /* 8 float64 square roots, correctly rounded */
