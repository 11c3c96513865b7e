/* C-level contract harness of the pairwise kernels, for any tier and any CPU (tests/test_arm64.py
 * cross-compiles it for AArch64 and runs it under qemu-aarch64; tests/test_tiers.py runs it on
 * the x86 tiers).  It includes kernels.c itself (built with the tier's -DEMB_TIER), builds
 * matrices with planted structure (duplicate groups, rows one bf16 step apart, subnormal rows,
 * random shapes), drives the exported entry points as _cpu.py does, and checks against a float64
 * reference computed here:
 *   Euclidean within 2e-6 relative (and the subnormal spacing 2^-149), 0 iff identical rows,
 *   symmetric, zero diagonal;
 *   Chebyshev bit-identical to the seed's float32 max |a - b|;  Manhattan within 2e-6;
 *   snapshots (float32 and bfloat16 input), both metrics, as above.
 * It prints one line per kernel family with a hash of the output bits, so the test can check
 * that tiers agree bit for bit where the design says they must (Chebyshev, Manhattan, snapshots
 * everywhere; Euclidean among the FMA tiers), and ends with "OK" (exit 0) or the first failures. */
#include "kernels.c"

#include <stdio.h>

static uint64_t rs = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd64(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static double unif(void) { return (double)(rnd64() >> 11) * 0x1p-53; }
static float gauss(void) {
    double u = unif() + 1e-300, v = unif();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}
static float bf16_round(float f) {
    uint32_t b; memcpy(&b, &f, 4);
    b = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &b, 4); return f;
}
static float bf16_step(float f, int s) {           /* s bf16 steps up (towards +inf for f > 0) */
    uint32_t b; memcpy(&b, &f, 4);
    b += (uint32_t)s << 16;
    memcpy(&f, &b, 4); return f;
}

static int fails = 0;
#define FAIL(...) do { if (fails++ < 10) { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); } } while (0)

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *c = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++) { h ^= c[i]; h *= 0x100000001b3ULL; }
    return h;
}

static int same_row(const float *x, int64_t d, int64_t i, int64_t j) {
    for (int64_t k = 0; k < d; k++) if (!(x[i * d + k] == x[j * d + k])) return 0;
    return 1;
}

/* a test matrix: random rows, duplicate groups, bf16 neighbours, subnormal rows */
static void make_matrix(float *x, int64_t n, int64_t d, int kind) {
    const float sc = kind == 2 ? 1e-39f : 0.05f;
    for (int64_t i = 0; i < n * d; i++) x[i] = bf16_round(gauss() * sc);
    if (kind == 2)                                       /* subnormal rows: float32 values */
        for (int64_t i = 0; i < n * d; i++) x[i] = gauss() * 1e-39f;
    if (n < 8) return;
    for (int64_t g = 0; g < 3; g++)                      /* duplicate groups of 2, 3, 4 rows */
        for (int64_t m = 1; m <= g + 1; m++) {
            const int64_t src = (int64_t)(rnd64() % (uint64_t)n), dst = (int64_t)(rnd64() % (uint64_t)n);
            if (src != dst) memcpy(x + dst * d, x + src * d, sizeof(float) * (size_t)d);
        }
    for (int64_t t = 0; t < 4; t++) {                    /* rows one representable step apart */
        const int64_t src = (int64_t)(rnd64() % (uint64_t)n), dst = (int64_t)(rnd64() % (uint64_t)n);
        if (src == dst) continue;
        memcpy(x + dst * d, x + src * d, sizeof(float) * (size_t)d);
        const int64_t k = (int64_t)(rnd64() % (uint64_t)d);
        if (kind == 2) { uint32_t b; memcpy(&b, &x[dst * d + k], 4); b += 1; memcpy(&x[dst * d + k], &b, 4); }
        else x[dst * d + k] = bf16_step(x[dst * d + k], 1);
    }
    if (kind == 1)                                       /* a -0.0 / +0.0 pair (identical) */
        for (int64_t k = 0; k < d; k++) { x[0 * d + k] = 0.0f; x[1 * d + k] = -0.0f; }
}

static void engine(const float *x, int64_t n, int64_t d, uint64_t *he, uint64_t *hc, uint64_t *hl) {
    const int64_t dp = d > 0 ? ((d + GCH - 1) / GCH) * GCH : GCH, npan = (n + PW - 1) / PW;
    float *packed = (float *)aligned_alloc(64, sizeof(float) * (size_t)(npan * dp * PW + 64));
    double *norms = (double *)calloc((size_t)(npan * PW), sizeof(double));
    double *rn = (double *)calloc((size_t)(npan * PW), sizeof(double));
    int64_t *groups = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    float *out = (float *)malloc(sizeof(float) * (size_t)(n * n));
    double *scr = (double *)aligned_alloc(64, (size_t)(4 * PW * 16 * PW) * 12 + 64);
    float mx = 0.0f;
    for (int64_t i = 0; i < n * d; i++) mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
    int e = 0;
    if (mx > 0) { frexp(mx, &e); e = e > 120 ? 120 : (e < -120 ? -120 : e); }
    emb_pack(x, 0, n, d, dp, NULL, ldexp(1.0, -e), packed, 0, npan, norms);
    for (int64_t i = 0; i < npan * PW; i++) rn[i] = sqrt(norms[i]);
    for (int64_t i = 0; i < n; i++) {
        groups[i] = i;
        for (int64_t j = 0; j < i; j++) if (same_row(x, d, i, j)) { groups[i] = groups[j]; break; }
    }
    const double u = 0x1p-24, e53 = 0x1p-53, gam = GBOUND * u / (1 - GBOUND * u);   /* gamma_(chain + log2 chains): the chains summed pairwise */
    const double prm[8] = {2 * gam + 2.02 * (double)((dp + GBLK - 1) / GBLK) * e53 + 1.02 * 2 * e53, 1.01 * (double)(d + 1) * e53 + 2 * e53,
                           (double)dp * 0x1p-148, 1.0 / (2 * 1.5e-6), u * (1 + 2 * u), sqrt((double)d) * 0x1p-149,
                           3e-7 * 3e-7, ldexp(1.0, 2 * e)};
    for (int kind = 0; kind < 3; kind++) {
        for (int64_t rp0 = 0; rp0 < npan; rp0 += 4) {
            const int64_t nrp = npan - rp0 < 4 ? npan - rp0 : 4;
            for (int64_t cp0 = rp0; cp0 < npan; cp0 += 16) {
                const int64_t ncp = npan - cp0 < 16 ? npan - cp0 : 16;
                if (kind == 0)
                    emb_euclid_block(packed, dp, n, d, x, 0, rp0 * PW, nrp, cp0 * PW, ncp, scr, norms, rn, groups, NULL, 0,
                                     prm, out, n);
                else if (kind == 1) emb_cheb_block(packed, dp, n, (float *)scr, rp0 * PW, nrp, cp0 * PW, ncp, out, n);
                else emb_l1_block(packed, dp, n, scr, rp0 * PW, nrp, cp0 * PW, ncp, out, n);
            }
        }
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) {
                const float v = out[i * n + j];
                if (v != out[j * n + i]) FAIL("kind %d n %ld d %ld: not symmetric at %ld,%ld", kind, (long)n, (long)d, (long)i, (long)j);
                const int ident = groups[i] == groups[j];
                if ((v == 0.0f) != ident) FAIL("kind %d n %ld d %ld: zero iff identical broken at %ld,%ld (%g)", kind, (long)n, (long)d, (long)i, (long)j, v);
                double s = 0.0, l1 = 0.0;
                float ch = 0.0f;
                for (int64_t k = 0; k < d; k++) {
                    const double t = (double)x[i * d + k] - (double)x[j * d + k];
                    s += t * t; l1 += fabs(t);
                    const float a = fabsf(x[j * d + k] - x[i * d + k]);
                    ch = a > ch ? a : ch;
                }
                if (kind == 0 && fabs(v - sqrt(s)) > 2e-6 * sqrt(s) + 0x1p-149)
                    FAIL("euclid n %ld d %ld (%ld,%ld): %.9g vs %.9g", (long)n, (long)d, (long)i, (long)j, v, sqrt(s));
                if (kind == 2 && fabs(v - l1) > 2e-6 * l1 + 0x1p-149)
                    FAIL("manhattan n %ld d %ld (%ld,%ld): %.9g vs %.9g", (long)n, (long)d, (long)i, (long)j, v, l1);
                if (kind == 1 && memcmp(&ch, &v, 4) != 0)
                    FAIL("chebyshev n %ld d %ld (%ld,%ld): %.9g vs seed %.9g", (long)n, (long)d, (long)i, (long)j, v, ch);
            }
        uint64_t h = hash_bytes(0xcbf29ce484222325ULL, out, sizeof(float) * (size_t)(n * n));
        if (kind == 0) *he ^= h; else if (kind == 1) *hc ^= h; else *hl ^= h;
        if (kind == 0) emb_pack(x, 0, n, d, dp, NULL, 1.0, packed, 0, npan, NULL);   /* unscaled for cheb/l1 */
    }
    free(packed); free(norms); free(rn); free(groups); free(out); free(scr);
}

static void snapshots(int64_t T, int64_t V, int64_t D, int dt, uint64_t *hs) {
    float *h32 = (float *)malloc(sizeof(float) * (size_t)(T * V * D));
    uint16_t *h16 = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(T * V * D));
    for (int64_t t = 0; t < T; t++) make_matrix(h32 + t * V * D, V, D, (int)(t % 3));
    for (int64_t i = 0; i < T * V * D; i++) {
        float f = bf16_round(h32[i]);
        if (dt == 1) h32[i] = f;
        uint32_t b; memcpy(&b, &f, 4); h16[i] = (uint16_t)(b >> 16);
    }
    float *oe = (float *)malloc(sizeof(float) * (size_t)(T * V * V)), *oc = (float *)malloc(sizeof(float) * (size_t)(T * V * V));
    emb_snap_multi(dt == 0 ? (const void *)h32 : (const void *)h16, dt, V, D, 0, T, oe, oc, 0, 0);
    for (int64_t t = 0; t < T; t++) {
        const float *x = h32 + t * V * D;
        for (int64_t i = 0; i < V; i++)
            for (int64_t j = 0; j < V; j++) {
                double s = 0.0;
                float ch = 0.0f;
                for (int64_t k = 0; k < D; k++) {
                    const double q = (double)x[i * D + k] - (double)x[j * D + k];
                    s += q * q;
                    const float a = fabsf(x[j * D + k] - x[i * D + k]);
                    ch = a > ch ? a : ch;
                }
                const float e = oe[(t * V + i) * V + j], c = oc[(t * V + i) * V + j];
                if (memcmp(&ch, &c, 4) != 0) FAIL("snapshot cheb T%ld V%ld D%ld dt%d (%ld,%ld,%ld): %.9g vs %.9g", (long)T, (long)V, (long)D, dt, (long)t, (long)i, (long)j, c, ch);
                if ((e == 0.0f) != (ch == 0.0f)) FAIL("snapshot zero iff identical T%ld V%ld D%ld (%ld,%ld,%ld)", (long)T, (long)V, (long)D, (long)t, (long)i, (long)j);
                if (fabs(e - sqrt(s)) > 2e-6 * sqrt(s) + 0x1p-149) FAIL("snapshot euclid T%ld V%ld D%ld (%ld,%ld,%ld): %.9g vs %.9g", (long)T, (long)V, (long)D, (long)t, (long)i, (long)j, e, sqrt(s));
                if (e != oe[(t * V + j) * V + i]) FAIL("snapshot not symmetric");
            }
    }
    *hs = hash_bytes(*hs, oe, sizeof(float) * (size_t)(T * V * V));
    *hs = hash_bytes(*hs, oc, sizeof(float) * (size_t)(T * V * V));
    free(h32); free(h16); free(oe); free(oc);
}

int main(int argc, char **argv) {
    const int quick = argc > 1 && strcmp(argv[1], "quick") == 0;
    uint64_t he = 0, hc = 0, hl = 0, hs = 0xcbf29ce484222325ULL;
    static const int64_t shapes[][2] = {{5, 7}, {33, 37}, {70, 64}, {40, 1}, {97, 130}, {150, 33}, {64, 300}};
    const int ns = quick ? 4 : (int)(sizeof shapes / sizeof shapes[0]);
    for (int s = 0; s < ns; s++)
        for (int kind = 0; kind < 3; kind++) {
            const int64_t n = shapes[s][0], d = shapes[s][1];
            float *x = (float *)malloc(sizeof(float) * (size_t)(n * d));
            make_matrix(x, n, d, kind);
            engine(x, n, d, &he, &hc, &hl);
            free(x);
        }
    static const int64_t snaps[][3] = {{3, 20, 8}, {2, 33, 64}, {2, 16, 70}, {2, 48, 130}, {1, 5, 3}};
    for (int s = 0; s < (quick ? 3 : 5); s++)
        for (int dt = 0; dt < 2; dt++) snapshots(snaps[s][0], snaps[s][1], snaps[s][2], dt, &hs);
    printf("tier %s\n", emb_tier());
    printf("gram %d %d %d\n", GCH, GNCH, EMB_HAS_FMA);   /* the summation shape: equal shapes, equal bits */
    printf("hash euclidean %016llx\n", (unsigned long long)he);
    printf("hash chebyshev %016llx\n", (unsigned long long)hc);
    printf("hash manhattan %016llx\n", (unsigned long long)hl);
    printf("hash snapshots %016llx\n", (unsigned long long)hs);
    if (fails) { printf("FAILED %d checks\n", fails); return 1; }
    printf("OK\n");
    return 0;
}
