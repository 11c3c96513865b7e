/* Training dynamics (embdist.dynamics, issue 14): the per-step passes of a history chunk in
 * native code.  Included at the end of kernels.c (after kernels_stream.c), so the dtype loads
 * (ld_f32, half_to_float), direct_sq (the engine's float64 Euclidean sum) and mix64 are the
 * engine's own.  Every symbol defined here is prefixed dyn_ / emb_dyn_.
 *
 *   emb_dyn_labels      group labels per step from the row hashes of embdist.rows (hash_rows),
 *                       equal hashes verified bytewise on the canonical bits: the rows contract
 *                       (labels[i] = the smallest index whose row is identical to row i);
 *   emb_dyn_steps       per step and token: row changed since the step before, row differs from
 *                       step 0, lattice units moved (see dynamics.py), and the count of
 *                       non-finite values;
 *   emb_dyn_components  connected components at thresholds, per step: candidate pairs of distinct
 *                       vectors by a necessary condition (a pair within distance r differs by at
 *                       most r in every column: a sorted window on one column, then a lane filter
 *                       on the next columns of largest spread), each candidate's distance
 *                       evaluated exactly with the engine's arithmetic (Chebyshev: the float32 max |a - b| of the Chebyshev
 *                       kernel; Euclidean: direct_sq, float64), joined in one union-find per
 *                       threshold.  Exact: the same pairs as a brute force over all pairs.
 *
 * Element codes (dt): 0 float32, 1 bfloat16, 2 float16, the stored dtype. */

/* ------------------------------------------------------------------ labels */
void emb_dyn_labels(const uint8_t *bits, int64_t c, int64_t v, int64_t rowbytes, const uint64_t *hashes,
                    int64_t *labels) {
    int64_t cap = 16;
    while (cap < 2 * v) cap <<= 1;
    int64_t *tab = (int64_t *)malloc((size_t)cap * sizeof(int64_t));
    if (!tab) { for (int64_t k = 0; k < c * v; k++) labels[k] = -1; return; }
    const uint64_t mask = (uint64_t)cap - 1;
    for (int64_t t = 0; t < c; t++) {
        const uint64_t *h = hashes + t * v;
        const uint8_t *b = bits + t * v * rowbytes;
        int64_t *lab = labels + t * v;
        memset(tab, 0xff, (size_t)cap * sizeof(int64_t));
        for (int64_t i = 0; i < v; i++) {
            uint64_t s = mix64(h[i]) & mask;
            for (;;) {
                const int64_t j = tab[s];
                if (j < 0) { tab[s] = i; lab[i] = i; break; }
                if (h[j] == h[i] && memcmp(b + j * rowbytes, b + i * rowbytes, (size_t)rowbytes) == 0) {
                    lab[i] = j;
                    break;
                }
                s = (s + 1) & mask;
            }
        }
    }
    free(tab);
}

/* ------------------------------------------------------------------ changes and lattice units */
static const uint32_t DYN_NONFINITE[3] = {0x7F800000u, 0x7F80u, 0x7C00u};

/* float32 value of element idx of canonical bits (dt as above) */
static inline float dyn_val(const void *b, int dt, int64_t idx) { return ld_f32(b, dt, idx); }

/* 2^(134 - max(E, 1)), E the float32 (= bfloat16) exponent field of f */
static inline double dyn_scale(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    const int e = (int)((u >> 23) & 0xFFu);
    const uint64_t b = (uint64_t)(134 - (e > 1 ? e : 1) + 1023) << 52;   /* exponents -120..133: normal doubles */
    double r; memcpy(&r, &b, 8); return r;
}

/* bf16 x -> y when the sign or exponent differs: |y - x| * 2^(134 - max(E_x, 1)) (exact: a
 * float64 difference of two bf16 values times a power of two); 0 otherwise */
static inline double dyn_units_other(uint16_t x, uint16_t y) {
    const uint32_t bx = (uint32_t)x << 16, by = (uint32_t)y << 16;
    float fx, fy; memcpy(&fx, &bx, 4); memcpy(&fy, &by, 4);   /* fx's exponent field is x's */
    return ((x ^ y) >= 0x80) ? fabs((double)fy - (double)fx) * dyn_scale(fx) : 0.0;
}

static double dyn_units_row(const void *p, const void *q, int dt, int64_t off, int64_t d) {
    double f = 0.0;
    if (dt == 1) {
        const uint16_t *a = (const uint16_t *)p + off, *b = (const uint16_t *)q + off;
        int32_t is = 0, other = 0;                /* d < 2^15 values of < 2^16 each per block */
        int64_t tot = 0;
        for (int64_t k0 = 0; k0 < d; k0 += 32768) {
            const int64_t k1 = d < k0 + 32768 ? d : k0 + 32768;
            is = 0;
            for (int64_t k = k0; k < k1; k++) {   /* branch-free: vectorises */
                const int32_t x = a[k], y = b[k], df = x > y ? x - y : y - x;
                const int32_t o = (x ^ y) >= 0x80;  /* sign or exponent differs */
                other += o;
                is += o ? 0 : df;                 /* same sign and exponent: |bits difference| */
            }
            tot += is;
        }
        if (other) {                              /* the values that changed sign or binade */
            double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t k = 0;
            for (; k + 8 <= d; k += 8)                /* branch-free, eight partial sums: vectorises */
                for (int l = 0; l < 8; l++) acc[l] += dyn_units_other(a[k + l], b[k + l]);
            for (int l = 0; k < d; k++, l++) acc[l] += dyn_units_other(a[k], b[k]);
            f = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
        return (double)tot + f;
    }
    for (int64_t k = 0; k < d; k++) {
        const float fx = dyn_val(p, dt, off + k), fy = dyn_val(q, dt, off + k);
        f += fabs((double)fy - (double)fx) * dyn_scale(fx);
    }
    return f;
}

/* bits: (c, v, d) canonical elements; prev: (v, d) of the step before the chunk or NULL; first:
 * (v, d) of step 0.  changed/differs0: (c, v) 0/1; units: (c, v).  Returns the number of
 * non-finite values in the chunk (NaN / Inf: the callers refuse them). */
int64_t emb_dyn_steps(const void *bits, const void *prev, const void *first, int64_t dt, int64_t c, int64_t v,
                      int64_t d, uint8_t *changed, uint8_t *differs0, double *units) {
    const int es = dt == 0 ? 4 : 2;
    const size_t rb = (size_t)(d * es);
    int64_t bad = 0;
    const int64_t n = c * v * d;
    if (dt == 0) {
        const uint32_t *u = (const uint32_t *)bits;
        for (int64_t k = 0; k < n; k++) bad += (u[k] & 0x7FFFFFFFu) >= DYN_NONFINITE[0];
    } else {
        const uint16_t *u = (const uint16_t *)bits;
        const uint16_t lim = (uint16_t)DYN_NONFINITE[dt];
        for (int64_t k = 0; k < n; k++) bad += (uint16_t)(u[k] & 0x7FFFu) >= lim;
    }
    if (bad) return bad;
    const uint8_t *B = (const uint8_t *)bits, *P = (const uint8_t *)prev, *F = (const uint8_t *)first;
    for (int64_t t = 0; t < c; t++) {
        const uint8_t *cur = B + (size_t)t * v * rb;
        const uint8_t *ref = t ? cur - (size_t)v * rb : P;
        for (int64_t i = 0; i < v; i++) {
            const int64_t o = t * v + i;
            differs0[o] = memcmp(cur + i * rb, F + i * rb, rb) != 0;
            if (!ref || memcmp(cur + i * rb, ref + i * rb, rb) == 0) { changed[o] = 0; units[o] = 0.0; continue; }
            changed[o] = 1;
            units[o] = dyn_units_row(ref, cur, (int)dt, i * d, d);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ components */
static inline int64_t dyn_find(int64_t *par, int64_t a) {
    while (par[a] != a) { par[a] = par[par[a]]; a = par[a]; }
    return a;
}
static inline void dyn_union(int64_t *par, int64_t *sz, int64_t a, int64_t b) {
    a = dyn_find(par, a); b = dyn_find(par, b);
    if (a == b) return;
    if (sz[a] < sz[b]) { int64_t t = a; a = b; b = t; }
    par[b] = a; sz[a] += sz[b];
}

#define DYN_K 16

typedef struct {
    const void *x; int dt; int64_t d; int metric;
    const int64_t *order;          /* columns, most spread first: the early-exit order */
    double top, top2;
    const double *thr; int64_t nthr;
    const int64_t *rep;            /* rep slot -> row */
    int64_t *par, *sz;             /* nthr union-finds over rep slots */
    int64_t nr, evaluated;
    const float *buf; int64_t kb;  /* rep slot r's first kb columns of `order` at buf + r * DYN_K */
} dyn_ctx;

/* the pair of rep slots r, s: its exact distance, when within the largest threshold at which the
 * two are not joined yet, joins them in the union-finds of the thresholds it meets (joined at
 * one threshold means joined at every larger one: a pair joined at the smallest is skipped) */
static inline void dyn_pair(dyn_ctx *C, int64_t r, int64_t s) {
    int64_t qj = C->nthr;                      /* the smallest threshold index where r, s are joined */
    while (qj > 0 && dyn_find(C->par + (qj - 1) * C->nr, r) == dyn_find(C->par + (qj - 1) * C->nr, s)) qj--;
    if (qj == 0) return;
    const double lim1 = C->thr[qj - 1];
    const int64_t a = C->rep[r] < C->rep[s] ? C->rep[r] : C->rep[s];
    const int64_t b = C->rep[r] < C->rep[s] ? C->rep[s] : C->rep[r];
    const int64_t ia = a * C->d, ib = b * C->d;
    const int dt = C->dt;
    double dist;
    C->evaluated++;
    if (C->metric == 1) {
        float m = 0.0f;
        const float *pa = C->buf + r * DYN_K, *pb = C->buf + s * DYN_K;
        for (int64_t k = 0; k < C->kb; k++) {     /* the first columns of `order`, packed */
            const float df = fabsf(pb[k] - pa[k]);
            if (df > m) { m = df; if ((double)m > lim1) return; }
        }
        for (int64_t k = C->kb; k < C->d; k++) {
            const int64_t col = C->order[k];
            const float df = fabsf(ld_f32(C->x, dt, ib + col) - ld_f32(C->x, dt, ia + col));
            if (df > m) { m = df; if ((double)m > lim1) return; }
        }
        dist = (double)m;            /* = sqrt((double)m * m): the streaming pass's exact value */
    } else {
        double sacc = 0.0;
        const double lim = lim1 * lim1 * (1.0 + 1e-9);   /* partial sums: a lower bound up to rounding */
        const float *pa = C->buf + r * DYN_K, *pb = C->buf + s * DYN_K;
        for (int64_t k = 0; k < C->kb; k++) {
            const double df = (double)pb[k] - (double)pa[k];
            sacc += df * df;
            if (sacc > lim) return;
        }
        for (int64_t k = C->kb; k < C->d; k++) {
            const int64_t col = C->order[k];
            const double df = (double)ld_f32(C->x, dt, ib + col) - (double)ld_f32(C->x, dt, ia + col);
            sacc += df * df;
            if (sacc > lim) return;
        }
        dist = sqrt(direct_sq(C->x, dt, C->d, a, b));
        if (dist > lim1) return;
    }
    for (int64_t q = 0; q < qj; q++)
        if (dist <= C->thr[q]) dyn_union(C->par + q * C->nr, C->sz + q * C->nr, r, s);
}

typedef struct { float v; int64_t r; } dyn_sv;
static int dyn_cmp_sv(const void *p, const void *q) {
    const dyn_sv *a = (const dyn_sv *)p, *b = (const dyn_sv *)q;
    return a->v < b->v ? -1 : a->v > b->v ? 1 : (a->r > b->r) - (a->r < b->r);
}

/* x: (c, v, d) stored values; labels: (c, v); thr: nthr thresholds ascending; order: the d columns,
 * most spread first; kcols: columns packed for the lane filter (<= DYN_K).  count, largest:
 * (c, nthr).  Candidates: the rows sorted by column order[0]; row i against the window of rows
 * after it within w on that column, DYN_L rows at a time, lanes dropped as soon as a column of
 * order[0..kb) differs by more than w (a superset of the pairs within top: |a_k - b_k| <= the
 * distance, up to rounding covered by w); the survivors evaluated exactly (dyn_pair).
 * Returns the number of pairs evaluated, or -1 when memory ran out. */
#define DYN_L 16
#define DYN_R 8          /* rows sharing each column block */
/* Euclidean lanes: acc[l] += (col[l] - a)^2 (float32), bit l set while acc[l] <= q */
static inline uint32_t dyn_lanes_sq(const float *col, float a, float *acc, float q) {
    uint32_t m = 0;
    for (int l = 0; l < DYN_L; l++) {
        const float t = col[l] - a;
        acc[l] += t * t;
        m |= (uint32_t)(acc[l] <= q) << l;
    }
    return m;
}

/* bit l set when |col[l] - a| <= w (float32, as the scalar code), l < DYN_L */
static inline uint32_t dyn_lanes(const float *col, float a, float w) {
#if defined(__AVX512F__)
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(col), _mm512_set1_ps(a));
    const __m512 ad = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFFFFFF)));
    return (uint32_t)_mm512_cmp_ps_mask(ad, _mm512_set1_ps(w), _CMP_LE_OQ);
#elif defined(__AVX2__)
    const __m256 av = _mm256_set1_ps(a), wv = _mm256_set1_ps(w), ab = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 d0 = _mm256_and_ps(_mm256_sub_ps(_mm256_loadu_ps(col), av), ab);
    const __m256 d1 = _mm256_and_ps(_mm256_sub_ps(_mm256_loadu_ps(col + 8), av), ab);
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(d0, wv, _CMP_LE_OQ))
         | ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(d1, wv, _CMP_LE_OQ)) << 8);
#else
    uint32_t m = 0;
    for (int l = 0; l < DYN_L; l++) m |= (uint32_t)(fabsf(col[l] - a) <= w) << l;
    return m;
#endif
}
int64_t emb_dyn_components(const void *x, int64_t dt, int64_t c, int64_t v, int64_t d, const int64_t *labels,
                           int64_t metric, const double *thr, int64_t nthr, const int64_t *order, int64_t kcols,
                           int64_t *count, int64_t *largest) {
    int64_t total = 0;
    const double top = thr[nthr - 1];
    const double w = top * (1.0 + 0x1p-20);        /* window: >= any joined pair's column gap */
    float w32 = (float)(top * (1.0 + 0x1p-19));
    w32 = nextafterf(w32 > 0x1p-126f ? w32 : 0x1p-126f, INFINITY);
    /* Euclidean lanes: a float32 partial sum of squares over the packed columns is within a
     * relative 2e-6 of the exact one (at most DYN_K terms), so 1e-5 over top^2 keeps every pair */
    float q32 = (float)(top * top * (1.0 + 1e-5));
    q32 = nextafterf(q32 > 0x1p-126f ? q32 : 0x1p-126f, INFINITY);
    const int64_t kb = d < kcols ? d : (kcols < DYN_K ? kcols : DYN_K);
    const int64_t ld = v + DYN_L;                  /* packed columns, padded for the last lanes */
    int64_t *rep = malloc((size_t)(v + 1) * sizeof(int64_t));
    int64_t *gsz = malloc((size_t)(v + 1) * sizeof(int64_t));
    int64_t *par = malloc((size_t)(v * nthr + 1) * sizeof(int64_t));
    int64_t *sz = malloc((size_t)(v * nthr + 1) * sizeof(int64_t));
    int64_t *slot = malloc((size_t)(v + 1) * sizeof(int64_t));     /* sorted position -> rep slot */
    dyn_sv *sv = malloc((size_t)(v + 1) * sizeof(dyn_sv));
    float *buf = malloc((size_t)(v * DYN_K + 1) * sizeof(float));  /* row-major: dyn_pair's packed columns */
    float *colm = malloc((size_t)(ld * (kb ? kb : 1)) * sizeof(float)); /* column-major, sorted order */
    if (!rep || !gsz || !par || !sz || !slot || !sv || !buf || !colm) { total = -1; goto done; }
    for (int64_t t = 0; t < c; t++) {
        const void *xt = dt == 0 ? (const void *)((const float *)x + t * v * d)
                                 : (const void *)((const uint16_t *)x + t * v * d);
        const int64_t *lab = labels + t * v;
        int64_t nr = 0;
        for (int64_t i = 0; i < v; i++) gsz[i] = 0;
        for (int64_t i = 0; i < v; i++) { gsz[lab[i]]++; if (lab[i] == i) rep[nr++] = i; }
        for (int64_t q = 0; q < nthr; q++)
            for (int64_t r = 0; r < nr; r++) { par[q * nr + r] = r; sz[q * nr + r] = gsz[rep[r]]; }
        if (nr > 1 && top > 0 && kb > 0) {
            for (int64_t r = 0; r < nr; r++) {
                sv[r].v = ld_f32(xt, (int)dt, rep[r] * d + order[0]);
                sv[r].r = r;
                for (int64_t k = 0; k < kb; k++) buf[r * DYN_K + k] = ld_f32(xt, (int)dt, rep[r] * d + order[k]);
            }
            qsort(sv, (size_t)nr, sizeof(dyn_sv), dyn_cmp_sv);
            for (int64_t i = 0; i < nr; i++) {
                slot[i] = sv[i].r;
                for (int64_t k = 0; k < kb; k++) colm[k * ld + i] = buf[sv[i].r * DYN_K + k];
            }
            for (int64_t k = 0; k < kb; k++)
                for (int64_t i = nr; i < ld; i++) colm[k * ld + i] = INFINITY;   /* padding lanes never pass */
            dyn_ctx C = {xt, (int)dt, d, (int)metric, order, top, top * top, thr, nthr, rep, par, sz, nr, 0, buf, kb};
            /* DYN_R consecutive rows at a time against the union of their windows: each packed
             * column block is loaded once for all of them */
            int64_t hi = 0;
            for (int64_t i0 = 0; i0 < nr; i0 += DYN_R) {
                const int64_t i1 = i0 + DYN_R < nr ? i0 + DYN_R : nr;
                if (hi < i1) hi = i1;
                while (hi < nr && (double)sv[hi].v - (double)sv[i1 - 1].v <= w) hi++;
                const float *ai[DYN_R];
                for (int64_t r = 0; r < DYN_R; r++) ai[r] = buf + slot[i0 + r < i1 ? i0 + r : i0] * DYN_K;
                for (int64_t j0 = i0 + 1; j0 < hi; j0 += DYN_L) {
                    uint32_t alive[DYN_R], any = 0;
                    float acc[DYN_R][DYN_L];                  /* Euclidean: partial sums of squares */
                    if (metric != 1) memset(acc, 0, sizeof acc);
                    const uint32_t in = hi - j0 >= DYN_L ? 0xFFFFu : ((1u << (hi - j0)) - 1u);
                    for (int64_t r = 0; r < DYN_R; r++) {
                        const int64_t lo = i0 + r + 1 - j0;          /* lanes after row i0 + r */
                        alive[r] = i0 + r >= i1 ? 0u : lo <= 0 ? in : lo >= DYN_L ? 0u : in & ~((1u << lo) - 1u);
                        any |= alive[r];
                    }
                    for (int64_t k = 0; k < kb && any; k++) {
                        const float *col = colm + k * ld + j0;
                        any = 0;
                        for (int64_t r = 0; r < DYN_R; r++) {
                            alive[r] &= metric == 1 ? dyn_lanes(col, ai[r][k], w32)
                                                    : dyn_lanes_sq(col, ai[r][k], acc[r], q32);
                            any |= alive[r];
                        }
                    }
                    for (int64_t r = 0; r < DYN_R && any; r++)
                        while (alive[r]) {
                            const int l = __builtin_ctz(alive[r]);
                            alive[r] &= alive[r] - 1;
                            dyn_pair(&C, slot[i0 + r], slot[j0 + l]);
                        }
                }
            }
            total += C.evaluated;
        }
        for (int64_t q = 0; q < nthr; q++) {
            int64_t cnt = 0, big = 0;
            for (int64_t r = 0; r < nr; r++)
                if (par[q * nr + r] == r) { cnt++; big = sz[q * nr + r] > big ? sz[q * nr + r] : big; }
            count[t * nthr + q] = cnt;
            largest[t * nthr + q] = big;
        }
    }
done:
    free(rep); free(gsz); free(par); free(sz); free(slot); free(sv); free(buf); free(colm);
    return total;
}
