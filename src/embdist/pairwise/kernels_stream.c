/* Streaming reductions over the engine's tiles: whole-vocabulary statistics without an N x N
 * matrix (embdist.pairwise._stream).  Included at the end of kernels.c, so the GEMM
 * (gram_block), the Chebyshev tiles (cheb_block), direct_sq, the dtype loads, mix64 and the build flags
 * are the engine's own.  Every symbol defined here is prefixed st_ / emb_stream_.
 *
 * A pass visits the engine's upper-triangle work items (128 rows x 512 columns).  Per item the
 * tile is computed as in pairwise() (Euclidean: the proven-bound GEMM and its flag rule, pairs
 * the expansion cannot resolve recomputed directly in float64; Chebyshev: the bit-exact
 * kernel), turned into q = squared distance (float64, input units; -1 = no pair: the lower
 * triangle, padding, or the same exact-duplicate group), then reduced:
 *   - per-thread: histogram of sqrt(q) in fixed bins, counts below radii, max, pair count;
 *   - per item: the float64 sum of the distances (its own fixed order; summed with fsum later);
 *   - per row AND per column: the K smallest keys (q, id) over the other distinct vectors
 *     (pairs of two group representatives), kept as a max-heap per row and merged under
 *     per-panel spin locks; minap[r] = min q over the "approximate" (expansion-valued)
 *     candidates that were left out of row r's list (what the final exactness check needs);
 *   - candidates for the exact maximum (q within a band of the running max) and for
 *     near-duplicates (q below both rows' bound), as pairs in C-owned growable buffers.
 * All results are functions of the set of pairs, not of the order of items or threads: the
 * lists keep the K smallest keys (q, id) (ids are distinct per row) and minap is a minimum.
 *
 * Input matrices are read in their stored dtype (dt: 0 float32, 1 bfloat16, 2 float16), so no
 * float32 copy of the matrix is needed. */

#define ST_MAXRAD 8
#define ST_NDSET 4096

typedef struct {
    int64_t n, K;
    double *hq;        /* n*K: candidate q, ascending by (q, id) */
    int64_t *hid;      /* n*K: candidate column id */
    uint8_t *hex;      /* n*K: 1 = q is exact (direct float64 or exact kernel) */
    int64_t *hcnt;     /* n: entries in use */
    double *hthr;      /* n: q of the K-th entry (admission threshold), +inf while not full */
    double *minap;     /* n: min q of approximate candidates left out */
    int64_t *nd;       /* near-duplicate candidate pairs (a, b) of group representatives */
    int64_t nd_len, nd_cap;
    int64_t *mxp;      /* max candidates: pairs (i, j) */
    double *mxq;       /* and their q */
    int64_t mx_len, mx_cap;
    int lock;          /* guards nd and mx */
    int *locks;        /* one per 32-row panel: guards those rows' lists and minap */
} emb_stream_t;

static inline void st_lock(int *l) {
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
}
static inline void st_unlock(int *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

static inline double st_load_thr(const double *p) { double v; __atomic_load(p, &v, __ATOMIC_RELAXED); return v; }
static inline void st_store_thr(double *p, double v) { __atomic_store(p, &v, __ATOMIC_RELAXED); }

/* the exact value of a pair, through the representatives of the two rows' duplicate groups:
 * squared Euclidean (direct_sq, float64) or squared Chebyshev (float32 max |a - b|,
 * bit-identical to the Chebyshev kernel, squared in float64: exact) */
static double st_direct_cheb_sq(const void *x, int dt, int64_t d, int64_t i, int64_t j) {
    float m = 0.0f;
    for (int64_t k = 0; k < d; k++) {
        float v = fabsf(ld_f32(x, dt, j * d + k) - ld_f32(x, dt, i * d + k));
        m = v > m ? v : m;
    }
    return (double)m * (double)m;
}

static inline double st_exact(const void *x, int dt, int64_t d, int64_t metric, int64_t a, int64_t b) {
    return metric == 0 ? direct_sq(x, dt, d, a, b) : st_direct_cheb_sq(x, dt, d, a, b);
}

/* ------------------------------------------------------------------ preparation */
/* out[0] = max_i sqrt(sum_k (x_ik - mu_k)^2), out[1] = max_i max_k |x_ik - mu_k| (float64; mu
 * may be NULL); the centring itself (mu, max |fl(x - mu)|) is the engine's (_cpu.centre) */
void emb_stream_extent(const void *x, int64_t dt, int64_t n, int64_t d, const float *mu, int64_t r0, int64_t r1,
                       double *out) {
    (void)n;
    double mn = 0.0, mc = 0.0;
    for (int64_t i = r0; i < r1; i++) {
        double s = 0.0;
        for (int64_t k = 0; k < d; k++) {
            float v = ld_f32(x, (int)dt, i * d + k);
            double e = (double)v - (mu ? (double)mu[k] : 0.0);
            s += e * e;
            double ae = fabs(e);
            mc = ae > mc ? ae : mc;
        }
        s = sqrt(s);
        mn = s > mn ? s : mn;
    }
    out[0] = mn; out[1] = mc;
}

/* one step of the stored format at |v|: ulp of v (the smallest subnormal for 0 / subnormals) */
static inline double st_step(const void *x, int dt, int64_t idx) {
    if (dt == 1) { int e = (((const uint16_t *)x)[idx] >> 7) & 0xff; return ldexp(1.0, (e ? e : 1) - 127 - 7); }
    if (dt == 2) { int e = (((const uint16_t *)x)[idx] >> 10) & 0x1f; return ldexp(1.0, (e ? e : 1) - 15 - 10); }
    uint32_t u; memcpy(&u, (const float *)x + idx, 4);
    int e = (u >> 23) & 0xff;
    return ldexp(1.0, (e ? e : 1) - 127 - 23);
}

/* Near-duplicate bound per row: b within nsteps steps of a in every coordinate implies
 * |a_k - b_k| <= 2 nsteps step(a_k) (nsteps steps cross at most one binade upward, where the
 * step doubles), so ||a - b||_2^2 <= sum_k (2 n step(a_k))^2 (metric 0) and
 * ||a - b||_inf^2 <= max_k (2 n step(a_k))^2 (metric 1).  Exact in float64 (powers of two). */
void emb_stream_nd_bound(const void *x, int64_t dt, int64_t n, int64_t d, int64_t nsteps, int64_t metric,
                         int64_t r0, int64_t r1, double *out) {
    (void)n;
    for (int64_t i = r0; i < r1; i++) {
        double s = 0.0;
        for (int64_t k = 0; k < d; k++) {
            double t = 2.0 * (double)nsteps * st_step(x, (int)dt, i * d + k);
            t = t * t;
            if (metric == 0) s += t; else s = t > s ? t : s;
        }
        out[i] = s;
    }
}

static inline int64_t st_ord(const void *x, int dt, int64_t idx) {
    if (dt == 0) {
        uint32_t u; memcpy(&u, (const float *)x + idx, 4);
        int64_t m = (int64_t)(u & 0x7fffffffu);
        return (u & 0x80000000u) ? -m : m;
    }
    uint16_t u = ((const uint16_t *)x)[idx];
    int64_t m = (int64_t)(u & 0x7fffu);
    return (u & 0x8000u) ? -m : m;
}

/* ok[t] = 1 when rows ii[t], jj[t] are at most nsteps representable steps apart in every coordinate */
void emb_stream_within_steps(const void *x, int64_t dt, int64_t d, const int64_t *ii, const int64_t *jj, int64_t m,
                             int64_t nsteps, uint8_t *ok) {
    for (int64_t t = 0; t < m; t++) {
        int good = 1;
        for (int64_t k = 0; k < d && good; k++) {
            int64_t a = st_ord(x, (int)dt, ii[t] * d + k), b = st_ord(x, (int)dt, jj[t] * d + k);
            int64_t df = a > b ? a - b : b - a;
            good = df <= nsteps;
        }
        ok[t] = (uint8_t)good;
    }
}

/* out[t] = exact q of the pair (ii[t], jj[t]) (callers pass group representatives) */
void emb_stream_exact(const void *x, int64_t dt, int64_t d, int64_t metric, const int64_t *ii, const int64_t *jj,
                      int64_t m, double *out) {
    for (int64_t t = 0; t < m; t++) out[t] = st_exact(x, (int)dt, d, metric, ii[t], jj[t]);
}

/* out[j] = exact q between row i and every representative j outside i's group (NaN elsewhere):
 * the fallback for a row whose candidate list cannot prove its order. */
void emb_stream_row_exact(const void *x, int64_t dt, int64_t n, int64_t d, int64_t metric, const int64_t *groups,
                          int64_t i, double *out) {
    const int64_t gi = groups[i];
    for (int64_t j = 0; j < n; j++) {
        const int64_t gj = groups[j];
        out[j] = (gj != j || gj == gi) ? NAN : st_exact(x, (int)dt, d, metric, gi < gj ? gi : gj, gi < gj ? gj : gi);
    }
}

/* ------------------------------------------------------------------ candidate lists */
static inline int st_gt(double qa, int64_t ia, double qb, int64_t ib) {
    return qa > qb || (qa == qb && ia > ib);
}

/* Row r's list is a max-heap of (q, id) (ids are distinct per row: each pair is offered once). */
static void st_heap_insert(emb_stream_t *st, int64_t r, double q, int64_t id, uint8_t ex) {
    const int64_t K = st->K;
    double *hq = st->hq + r * K;
    int64_t *hid = st->hid + r * K;
    uint8_t *hx = st->hex + r * K;
    const int64_t c = st->hcnt[r];
    int64_t p;
    if (c < K) {                                   /* not full: sift up */
        p = c;
        while (p > 0) {
            const int64_t par = (p - 1) >> 1;
            if (!st_gt(q, id, hq[par], hid[par])) break;
            hq[p] = hq[par]; hid[p] = hid[par]; hx[p] = hx[par];
            p = par;
        }
        hq[p] = q; hid[p] = id; hx[p] = ex;
        st->hcnt[r] = c + 1;
        if (c + 1 == K) st_store_thr(&st->hthr[r], hq[0]);
        return;
    }
    if (!st_gt(hq[0], hid[0], q, id)) {            /* not among the K smallest */
        if (!ex && q < st->minap[r]) st->minap[r] = q;
        return;
    }
    if (!hx[0] && hq[0] < st->minap[r]) st->minap[r] = hq[0];   /* the largest is evicted */
    p = 0;
    for (;;) {
        const int64_t l = 2 * p + 1;
        if (l >= K) break;
        int64_t ch = l;
        if (l + 1 < K && st_gt(hq[l + 1], hid[l + 1], hq[l], hid[l])) ch = l + 1;
        if (!st_gt(hq[ch], hid[ch], q, id)) break;
        hq[p] = hq[ch]; hid[p] = hid[ch]; hx[p] = hx[ch];
        p = ch;
    }
    hq[p] = q; hid[p] = id; hx[p] = ex;
    st_store_thr(&st->hthr[r], hq[0]);
}

/* merge another partial's lists into st (row by row; same result as having seen its pairs) */
void emb_stream_absorb(emb_stream_t *st, const double *hq, const int64_t *hid, const uint8_t *hex,
                       const int64_t *hcnt, const double *minap, int64_t r0, int64_t r1) {
    const int64_t K = st->K;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < hcnt[r]; t++) st_heap_insert(st, r, hq[r * K + t], hid[r * K + t], hex[r * K + t]);
        if (minap[r] < st->minap[r]) st->minap[r] = minap[r];
    }
}

void emb_stream_free(emb_stream_t *st) {
    free(st->nd); st->nd = NULL; st->nd_len = st->nd_cap = 0;
    free(st->mxp); free(st->mxq); st->mxp = NULL; st->mxq = NULL; st->mx_len = st->mx_cap = 0;
}

typedef struct { int64_t target, other; double q; int64_t ex; } st_push_t;

typedef struct {
    st_push_t *p; int64_t len, cap;        /* row side: targets are the item's rows, in order */
    st_push_t *pc; int64_t lenc, capc;     /* column side */
    int64_t *mxp; double *mxq; int64_t mlen, mcap;
    int64_t *nd; int64_t ndlen, ndcap;
    int64_t ndset[ST_NDSET];
    int oom;
} st_local_t;

static void *st_grow(void *p, int64_t *cap, int64_t need, size_t elem, int *oom) {
    if (need <= *cap) return p;
    int64_t nc = *cap ? *cap : 1024;
    while (nc < need) nc *= 2;
    void *q = realloc(p, (size_t)nc * elem);
    if (!q) { *oom = 1; return p; }
    *cap = nc;
    return q;
}

static inline void st_push(st_local_t *L, int64_t target, int64_t other, double q, int ex) {
    if (L->len == L->cap) { L->p = (st_push_t *)st_grow(L->p, &L->cap, L->len + 1, sizeof(st_push_t), &L->oom); if (L->len == L->cap) return; }
    st_push_t *e = &L->p[L->len++];
    e->target = target; e->other = other; e->q = q; e->ex = ex;
}
static inline void st_pushc(st_local_t *L, int64_t target, int64_t other, double q, int ex) {
    if (L->lenc == L->capc) { L->pc = (st_push_t *)st_grow(L->pc, &L->capc, L->lenc + 1, sizeof(st_push_t), &L->oom); if (L->lenc == L->capc) return; }
    st_push_t *e = &L->pc[L->lenc++];
    e->target = target; e->other = other; e->q = q; e->ex = ex;
}

static int st_grow_mx(int64_t **p, double **q, int64_t *cap, int64_t need) {
    if (need <= *cap) return 1;
    int64_t nc = *cap ? *cap : 1024;
    while (nc < need) nc *= 2;
    int64_t *np_ = (int64_t *)realloc(*p, sizeof(int64_t) * 2 * (size_t)nc);
    if (!np_) return 0;
    *p = np_;
    double *nq = (double *)realloc(*q, sizeof(double) * (size_t)nc);
    if (!nq) return 0;
    *q = nq;
    *cap = nc;
    return 1;
}

static inline void st_push_mx(st_local_t *L, int64_t i, int64_t j, double q) {
    if (!st_grow_mx(&L->mxp, &L->mxq, &L->mcap, L->mlen + 1)) { L->oom = 1; return; }
    L->mxp[2 * L->mlen] = i; L->mxp[2 * L->mlen + 1] = j; L->mxq[L->mlen++] = q;
}

static inline void st_push_nd(st_local_t *L, int64_t n, int64_t ga, int64_t gb) {
    const int64_t a = ga < gb ? ga : gb, b = ga < gb ? gb : ga;
    const int64_t key = a * n + b;
    uint64_t h = mix64((uint64_t)key) & (ST_NDSET - 1);
    for (int p = 0; p < 16; p++, h = (h + 1) & (ST_NDSET - 1)) {
        if (L->ndset[h] == key) return;
        if (L->ndset[h] < 0) { L->ndset[h] = key; break; }
    }
    if (2 * (L->ndlen + 1) > L->ndcap) { L->nd = (int64_t *)st_grow(L->nd, &L->ndcap, 2 * (L->ndlen + 1), sizeof(int64_t), &L->oom); if (2 * (L->ndlen + 1) > L->ndcap) return; }
    L->nd[2 * L->ndlen] = a; L->nd[2 * L->ndlen + 1] = b; L->ndlen++;
}

/* row r of a reduction (matrix row r0 + r): its row minimum starts at +inf; 0 past the matrix */
static inline int st_row(int64_t r0, int64_t r, int64_t n, double *rowmin) {
    rowmin[r] = INFINITY;
    return r0 + r < n;
}

/* Stream parameters sp[]: 0 nbins, 1 bins per unit distance, 2 nrad, 3 tolq (relative error bound of an
 * approximate q; 0 = every q exact), 4 near-dup slack (relative), 5.. radius^2 (nrad values).
 * Thread accumulators: thist[nbins]; tcnt[0..7] pairs below each radius, [8] pairs, [9] flagged,
 * [10] failed allocations; tst[0] max q, [1] band for max candidates. */
static void st_reduce(emb_stream_t *st, const double *Q, const uint8_t *EX, int64_t ldq, int64_t ldx,
                      int64_t r0, int64_t nr, int64_t c0, int64_t nc, int64_t n, const int64_t *groups,
                      const double *ndthr, const double *sp, uint64_t *thist, int64_t *tcnt, double *tst,
                      double *isum) {
    const int64_t nbins = (int64_t)sp[0], nrad = (int64_t)sp[2];
    const double hs = sp[1], tolq = sp[3], ndmul = 1.0 + sp[4];
    const double *rad2 = sp + 5;
    st_local_t *L = (st_local_t *)calloc(1, sizeof(st_local_t));
    if (!L) { tcnt[10]++; return; }
    for (int t = 0; t < ST_NDSET; t++) L->ndset[t] = -1;
    double colthr[nc], colmin[nc], rowmin[nr];
    for (int64_t c = 0; c < nc; c++) {
        colthr[c] = c0 + c < n ? st_load_thr(&st->hthr[c0 + c]) : -1.0;
        colmin[c] = INFINITY;
    }
    double maxq = tst[0], band = tst[1];
    int64_t pairs = 0;
    int64_t rc[ST_MAXRAD] = {0};
#if EMB_AVX512
    __m512d vsum = _mm512_setzero_pd();
    const __m512d vzero = _mm512_setzero_pd(), vhs = _mm512_set1_pd(hs), vinf = _mm512_set1_pd(INFINITY);
    const __m512d vtop = _mm512_set1_pd((double)(nbins - 1));
    for (int64_t r = 0; r < nr; r++) {
        if (!st_row(r0, r, n, rowmin)) continue;
        const int64_t i = r0 + r;
        const double *Qr = Q + r * ldq;
        const uint8_t *Er = EX + r * ldx;
        const __m512d vrthr = _mm512_set1_pd(st_load_thr(&st->hthr[i]));
        const __m512d vband = _mm512_set1_pd(band);
        const double ndi = ndthr ? ndthr[i] : 0.0;
        const __m512d vndi = _mm512_set1_pd(ndi), vndm = _mm512_set1_pd(ndmul);
        __m512d vrmin = vinf, vmax = _mm512_set1_pd(maxq);
        const int irep = groups[i] == i;
        const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
        for (int64_t jb = 0; jb < nc; jb += 8) {
            const __m512d q = _mm512_loadu_pd(Qr + jb);
            const __mmask8 v = _mm512_cmp_pd_mask(q, vzero, _CMP_GE_OQ);
            if (!v) continue;
            const __mmask8 ex = Er[jb >> 3];
            const int64_t j = c0 + jb;
            pairs += __builtin_popcount(v);
            const __m512d dv = _mm512_sqrt_pd(_mm512_max_pd(q, vzero));
            vsum = _mm512_mask_add_pd(vsum, v, vsum, dv);
            vmax = _mm512_mask_max_pd(vmax, v, vmax, q);
            int64_t bins[8];
            _mm512_storeu_si512((void *)bins, _mm512_cvttpd_epi64(_mm512_min_pd(_mm512_mul_pd(dv, vhs), vtop)));
            for (int l = 0; l < 8; l++) if (v >> l & 1) thist[bins[l]]++;
            for (int64_t t = 0; t < nrad; t++)
                rc[t] += __builtin_popcount(_mm512_mask_cmp_pd_mask(v, q, _mm512_set1_pd(rad2[t]), _CMP_LT_OQ));
            /* candidate lists: pairs of two representatives only (a group's other members have
             * the same values; their rows use the representative's list) */
            const __mmask8 vr = irep ? (__mmask8)(v & _mm512_mask_cmpeq_epi64_mask(
                v, _mm512_maskz_loadu_epi64(v, groups + j), _mm512_add_epi64(iota, _mm512_set1_epi64(j)))) : 0;
            const __mmask8 a = _mm512_mask_cmp_pd_mask(vr, q, vrthr, _CMP_LE_OQ);
            if (a) {
                double tq[8]; _mm512_storeu_pd(tq, q);
                for (int l = 0; l < 8; l++) if (a >> l & 1) st_push(L, i, j + l, tq[l], ex >> l & 1);
            }
            vrmin = _mm512_mask_min_pd(vrmin, (__mmask8)(vr & ~a & ~ex), vrmin, q);
            /* column lists */
            const __m512d ct = _mm512_loadu_pd(colthr + jb);
            const __mmask8 b = _mm512_mask_cmp_pd_mask(vr, q, ct, _CMP_LE_OQ);
            if (b) {
                double tq[8]; _mm512_storeu_pd(tq, q);
                for (int l = 0; l < 8; l++) if (b >> l & 1) st_pushc(L, j + l, i, tq[l], ex >> l & 1);
            }
            const __mmask8 bm = (__mmask8)(vr & ~b & ~ex);
            if (bm) _mm512_storeu_pd(colmin + jb, _mm512_mask_min_pd(_mm512_loadu_pd(colmin + jb), bm, _mm512_loadu_pd(colmin + jb), q));
            /* max candidates */
            if (tolq > 0.0) {
                const __mmask8 m = _mm512_mask_cmp_pd_mask(v, q, vband, _CMP_GE_OQ);
                if (m) {
                    double tq[8]; _mm512_storeu_pd(tq, q);
                    for (int l = 0; l < 8; l++) if (m >> l & 1) st_push_mx(L, i, j + l, tq[l]);
                }
            }
            /* near-duplicate candidates */
            if (ndthr) {
                const __m512d t = _mm512_mul_pd(_mm512_min_pd(vndi, _mm512_loadu_pd(ndthr + j)), vndm);
                const __mmask8 c = _mm512_mask_cmp_pd_mask(v, q, t, _CMP_LE_OQ);
                if (c) for (int l = 0; l < 8; l++) if (c >> l & 1) st_push_nd(L, n, groups[i], groups[j + l]);
            }
        }
        rowmin[r] = _mm512_reduce_min_pd(vrmin);
        const double rm = _mm512_reduce_max_pd(vmax);
        if (rm > maxq) { maxq = rm; band = maxq * (1.0 - 4.0 * tolq); }
    }
    *isum = _mm512_reduce_add_pd(vsum);
#else
    double sum = 0.0;
    for (int64_t r = 0; r < nr; r++) {
        if (!st_row(r0, r, n, rowmin)) continue;
        const int64_t i = r0 + r;
        const double *Qr = Q + r * ldq;
        const uint8_t *Er = EX + r * ldx;
        const double rthr = st_load_thr(&st->hthr[i]);
        double rmax = maxq;
        for (int64_t c = 0; c < nc; c++) {
            const double q = Qr[c];
            if (!(q >= 0.0)) continue;
            const int ex = Er[c >> 3] >> (c & 7) & 1;
            const int64_t j = c0 + c;
            pairs++;
            const double dv = sqrt(q);
            sum += dv;
            rmax = q > rmax ? q : rmax;
            const double fb = dv * hs;
            thist[fb < (double)(nbins - 1) ? (int64_t)fb : nbins - 1]++;
            for (int64_t t = 0; t < nrad; t++) rc[t] += q < rad2[t];
            if (groups[i] == i && groups[j] == j) {
                if (q <= rthr) st_push(L, i, j, q, ex);
                else if (!ex && q < rowmin[r]) rowmin[r] = q;
                if (q <= colthr[c]) st_pushc(L, j, i, q, ex);
                else if (!ex && q < colmin[c]) colmin[c] = q;
            }
            if (tolq > 0.0 && q >= band) st_push_mx(L, i, j, q);
            if (ndthr) {
                double t = (ndthr[i] < ndthr[j] ? ndthr[i] : ndthr[j]) * ndmul;
                if (q <= t) st_push_nd(L, n, groups[i], groups[j]);
            }
        }
        if (rmax > maxq) { maxq = rmax; band = maxq * (1.0 - 4.0 * tolq); }
    }
    *isum = sum;
#endif
    tst[0] = maxq; tst[1] = band;
    tcnt[8] += pairs;
    for (int64_t t = 0; t < nrad; t++) tcnt[t] += rc[t];
    /* merge into the shared lists, one 32-row panel (one lock) at a time */
    {
        int64_t t = 0;
        for (int64_t p0 = r0 / PW; p0 * PW < r0 + nr && p0 * PW < n; p0++) {
            st_lock(&st->locks[p0]);
            for (; t < L->len && L->p[t].target / PW == p0; t++)
                st_heap_insert(st, L->p[t].target, L->p[t].q, L->p[t].other, (uint8_t)L->p[t].ex);
            for (int64_t r = p0 * PW - r0; r < (p0 + 1) * PW - r0 && r < nr; r++)
                if (r >= 0 && r0 + r < n && rowmin[r] < st->minap[r0 + r]) st->minap[r0 + r] = rowmin[r];
            st_unlock(&st->locks[p0]);
        }
        const int64_t npc = (nc + PW - 1) / PW;
        int64_t start[npc + 1];
        for (int64_t q = 0; q <= npc; q++) start[q] = 0;
        for (int64_t u = 0; u < L->lenc; u++) start[(L->pc[u].target - c0) / PW + 1]++;
        for (int64_t q = 0; q < npc; q++) start[q + 1] += start[q];
        st_push_t *sorted = L->lenc ? (st_push_t *)malloc(sizeof(st_push_t) * (size_t)L->lenc) : NULL;
        if (L->lenc && !sorted) L->oom = 1;
        else {
            int64_t pos[npc];
            for (int64_t q = 0; q < npc; q++) pos[q] = start[q];
            for (int64_t u = 0; u < L->lenc; u++) sorted[pos[(L->pc[u].target - c0) / PW]++] = L->pc[u];
            for (int64_t q = 0; q < npc && c0 + q * PW < n; q++) {
                const int64_t p0 = c0 / PW + q;
                st_lock(&st->locks[p0]);
                for (int64_t u = start[q]; u < start[q + 1]; u++)
                    st_heap_insert(st, sorted[u].target, sorted[u].q, sorted[u].other, (uint8_t)sorted[u].ex);
                for (int64_t c = q * PW; c < (q + 1) * PW && c < nc; c++)
                    if (c0 + c < n && colmin[c] < st->minap[c0 + c]) st->minap[c0 + c] = colmin[c];
                st_unlock(&st->locks[p0]);
            }
        }
        free(sorted);
    }
    st_lock(&st->lock);
    if (L->mlen) {
        if (st_grow_mx(&st->mxp, &st->mxq, &st->mx_cap, st->mx_len + L->mlen)) {
            memcpy(st->mxp + 2 * st->mx_len, L->mxp, sizeof(int64_t) * 2 * (size_t)L->mlen);
            memcpy(st->mxq + st->mx_len, L->mxq, sizeof(double) * (size_t)L->mlen);
            st->mx_len += L->mlen;
        } else L->oom = 1;
    }
    if (L->ndlen) {
        st->nd = (int64_t *)st_grow(st->nd, &st->nd_cap, 2 * (st->nd_len + L->ndlen), sizeof(int64_t), &L->oom);
        if (!L->oom) {
            memcpy(st->nd + 2 * st->nd_len, L->nd, sizeof(int64_t) * 2 * (size_t)L->ndlen);
            st->nd_len += L->ndlen;
        }
    }
    st_unlock(&st->lock);
    if (L->oom) tcnt[10]++;
    free(L->p); free(L->pc); free(L->mxp); free(L->mxq); free(L->nd); free(L);
}

/* ------------------------------------------------------------------ passes (one work item each) */

/* Euclidean.  prm: the engine's bound constants (c1, c2, c3, inv2tol, u, c4, ct2, inv_scale2);
 * sp: stream parameters (st_reduce).  Pairs near a radius (|q - r^2| <= 2 tolq r^2) are
 * recomputed directly too, so the counts below radii are exact.  C: scratch of
 * nrp*PW x ncp*PW doubles + nrp*PW*ncp*PW/8 bytes. */
void emb_stream_euclid_item(emb_stream_t *st, const float *packed, int64_t dp, int64_t n, int64_t d,
                            const void *x, int64_t dt, int64_t r0, int64_t nrp, int64_t c0, int64_t ncp,
                            double *C, const double *norms, const double *rnorms, const int64_t *groups,
                            const double *prm, const double *sp, const double *ndthr, uint64_t *thist,
                            int64_t *tcnt, double *tst, double *isum) {
    gram_block(packed, dp, r0, nrp, c0, ncp, C);
    const int64_t ldc = ncp * PW, nr = nrp * PW, ldx = ldc / 8;
    uint8_t *EX = (uint8_t *)(C + nr * ldc);
    const double c1 = prm[0], c2 = prm[1], c3 = prm[2], inv2tol = prm[3], u = prm[4], c4 = prm[5],
                 ct2 = prm[6], isc2 = prm[7];
    const int64_t nrad = (int64_t)sp[2];
    const double tolq = sp[3];
    const double *rad2 = sp + 5;
    memo_t *memo = (memo_t *)malloc(sizeof(memo_t) * MEMO);
    for (int q = 0; memo && q < MEMO; q++) memo[q].key = -1;
    int64_t flagged = 0;
    for (int64_t r = 0; r < nr; r++) {
        const int64_t i = r0 + r;
        double *Crow = C + r * ldc;
        uint8_t *Erow = EX + r * ldx;
        if (i >= n) {
            for (int64_t c = 0; c < ldc; c++) Crow[c] = -1.0;
            memset(Erow, 0, (size_t)ldx);
            continue;
        }
        const double na = norms[i], ra = rnorms[i];
        const int64_t gi = groups[i];
        for (int64_t jb = 0; jb < ldc; jb += 8) {
            const int64_t j = c0 + jb;
            uint8_t vm = 0;
            for (int l = 0; l < 8; l++) vm |= (uint8_t)((j + l > i && j + l < n) << l);
            if (!vm) {
#if EMB_AVX512
                _mm512_storeu_pd(Crow + jb, _mm512_set1_pd(-1.0));
#else
                for (int l = 0; l < 8; l++) Crow[jb + l] = -1.0;
#endif
                Erow[jb >> 3] = 0;
                continue;
            }
#if EMB_AVX512
            const __m512d vna = _mm512_set1_pd(na), vra = _mm512_set1_pd(ra);
            __m512d g = _mm512_loadu_pd(Crow + jb);
            __m512d nb = _mm512_maskz_loadu_pd(vm, norms + j);
            __m512d rb = _mm512_maskz_loadu_pd(vm, rnorms + j);
            __m512i gj = _mm512_maskz_loadu_epi64(vm, groups + j);
            __m512d s = _mm512_add_pd(vna, nb);
            __m512d d2 = _mm512_sub_pd(s, _mm512_mul_pd(_mm512_set1_pd(2.0), g));
            __m512d e = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(c1), _mm512_mul_pd(vra, rb)),
                                                    _mm512_mul_pd(_mm512_set1_pd(c2), s)), _mm512_set1_pd(c3));
            __mmask8 fl = _mm512_cmp_pd_mask(d2, _mm512_mul_pd(e, _mm512_set1_pd(inv2tol)), _CMP_LE_OQ);
            __m512d ce = _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(u), _mm512_add_pd(vra, rb)), _mm512_set1_pd(c4));
            fl |= _mm512_cmp_pd_mask(_mm512_mul_pd(d2, _mm512_set1_pd(ct2)), _mm512_mul_pd(ce, ce), _CMP_LE_OQ);
            const __mmask8 same = _mm512_mask_cmpeq_epi64_mask(vm, gj, _mm512_set1_epi64(gi));
            __m512d q = _mm512_max_pd(_mm512_mul_pd(d2, _mm512_set1_pd(isc2)), _mm512_setzero_pd());
            for (int64_t t = 0; t < nrad; t++) {
                const __m512d r2 = _mm512_set1_pd(rad2[t]);
                const __m512d dif = _mm512_abs_pd(_mm512_sub_pd(q, r2));
                fl |= _mm512_cmp_pd_mask(dif, _mm512_mul_pd(r2, _mm512_set1_pd(2.0 * tolq)), _CMP_LE_OQ);
            }
            const __mmask8 live = (__mmask8)(vm & (uint8_t)~same);
            fl &= live;
            if (fl) {
                double tmp[8];
                _mm512_storeu_pd(tmp, q);
                for (int l = 0; l < 8; l++)
                    if (fl >> l & 1)
                        tmp[l] = memo_sq(memo, x, (int)dt, d, n, gi, groups[j + l]);
                q = _mm512_loadu_pd(tmp);
                flagged += __builtin_popcount(fl);
            }
            q = _mm512_mask_mov_pd(_mm512_set1_pd(-1.0), live, q);
            _mm512_storeu_pd(Crow + jb, q);
            Erow[jb >> 3] = fl;
#else
            uint8_t flb = 0;
            for (int l = 0; l < 8; l++) {
                const int64_t jj = j + l;
                if (!(vm >> l & 1) || groups[jj] == gi) { Crow[jb + l] = -1.0; continue; }
                double g = Crow[jb + l], nb = norms[jj], rb = rnorms[jj];
                double s = na + nb, d2 = s - 2.0 * g;
                double e = c1 * (ra * rb) + c2 * s + c3;
                double ce = u * (ra + rb) + c4;
                int fl = d2 <= e * inv2tol || d2 * ct2 <= ce * ce;
                double q = d2 * isc2; if (q < 0) q = 0;
                for (int64_t t = 0; t < nrad; t++) fl |= fabs(q - rad2[t]) <= rad2[t] * 2.0 * tolq;
                if (fl) {
                    const int64_t gj = groups[jj];
                    q = memo_sq(memo, x, (int)dt, d, n, gi, gj);
                    flagged++;
                    flb |= (uint8_t)(1u << l);
                }
                Crow[jb + l] = q;
            }
            Erow[jb >> 3] = flb;
#endif
        }
    }
    free(memo);
    tcnt[9] += flagged;
    st_reduce(st, C, EX, ldc, ldx, r0, nr, c0, ldc, n, groups, ndthr, sp, thist, tcnt, tst, isum);
}

/* Chebyshev: the engine's kernel on unscaled, uncentred panels (bit-identical values), q = c^2
 * (exact in float64), every q exact.  C: scratch of nrp*PW x ncp*PW doubles + as many floats
 * + the mask bytes. */
void emb_stream_cheb_item(emb_stream_t *st, const float *packed, int64_t dp, int64_t n, int64_t r0, int64_t nrp,
                          int64_t c0, int64_t ncp, double *C, const int64_t *groups, const double *sp,
                          const double *ndthr, uint64_t *thist, int64_t *tcnt, double *tst, double *isum) {
    const int64_t ldc = ncp * PW, nr = nrp * PW, ldx = ldc / 8;
    float *F = (float *)(C + nr * ldc);
    uint8_t *EX = (uint8_t *)(F + nr * ldc);
    cheb_block(packed, dp, r0, nrp, c0, ncp, F);
    for (int64_t r = 0; r < nr; r++) {
        const int64_t i = r0 + r;
        double *Qr = C + r * ldc;
        const float *Fr = F + r * ldc;
        memset(EX + r * ldx, 0xFF, (size_t)ldx);
        for (int64_t c = 0; c < ldc; c++) {
            const int64_t j = c0 + c;
            if (i >= n || j <= i || j >= n || groups[j] == groups[i]) Qr[c] = -1.0;
            else Qr[c] = (double)Fr[c] * (double)Fr[c];
        }
    }
    st_reduce(st, C, EX, ldc, ldx, r0, nr, c0, ldc, n, groups, ndthr, sp, thist, tcnt, tst, isum);
}
