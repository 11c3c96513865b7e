/* Tier avx2 (x86-64 with AVX2 + FMA: AMD Zen 1-5, Intel Haswell and later desktop chips):
 * the per-ISA part of kernels.c.  16 registers of 8 float32: gram tiles 6 x 16 (12 live
 * accumulators; the partial of a block's earlier chains parked in L1 by the register allocator;
 * 6 does not divide the panel, its last 2 rows are a 2 x 32 tile of their own), Chebyshev / Manhattan tiles
 * 4 x 16, snapshot tiles 2 x 16. */
#include <immintrin.h>
#define EMB_TIER_NAME "avx2"
#define VW 8
typedef __m256 vf;
#ifndef GMR
#define GMR 6
#endif
#define GNV 2
/* 16 chains of 16 per float64 flush, summed pairwise (bound gamma_20; 4 added one by one were
 * gamma_19; see kernels.c): with 16 registers the flush (widening conversions, float64 adds, the
 * C tile from L2) is costly; A/B batch by batch on the engine's blocks here: 4 chains one by one
 * 1-8% faster than 2, 8 pairwise 5% faster again, 16 pairwise 2.5% more (one flush per KC);
 * avx512 keeps 2 */
#ifndef GNCH
#define GNCH 16
#endif
#ifndef GREM_NV
#define GREM_NV 4  /* the 2 rows left in a panel: one 2 x 32 tile (8 accumulators, not 2 x 4) */
#endif
#define CMR 4
#define CNV 2
#define SNR 2
#define EMB_HAS_FMA 1
#define VSET1(s) _mm256_set1_ps(s)
#define VMAC(acc, a, b) _mm256_fmadd_ps(a, b, acc)
#define VABS(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)
#define VABSMAX(m, x) _mm256_max_ps(m, VABS(x))
/* p[0..8) += (double)v: two widening conversions (the generic vector-extension code splits them) */
#define VACC_F64(p, v) do { \
        _mm256_storeu_pd((p), _mm256_add_pd(_mm256_loadu_pd(p), _mm256_cvtps_pd(_mm256_castps256_ps128(v)))); \
        _mm256_storeu_pd((p) + 4, _mm256_add_pd(_mm256_loadu_pd((p) + 4), _mm256_cvtps_pd(_mm256_extractf128_ps((v), 1)))); \
    } while (0)
#define VSQRT_D(v) ((vdh)_mm256_sqrt_pd((__m256d)(v)))     /* 4 float64 square roots, correctly rounded */
