/* The anchor's CPU kernels: matrix products over a GGUF file's own quantized blocks, and the
 * attention of generated tokens' rows. Both fix the order of their arithmetic per output element,
 * so a row's bits never depend on the batch it came in (server/engine.py relies on it).
 *
 * Products: y[M, N] = x[M, K] @ W[N, K]^T.
 *
 * x and y are fp32; W stays quantized (Q4_1 or Q8_0: 5 or 8.5 bits a weight instead of 32), so a
 * forward reads about a sixth of the bytes of the dequantized fp32 model. A weight is dequantized
 * exactly as gguf-py (and so transformers) does it: d * q + m, a product then a sum, each rounded
 * to fp32, never fused. The blocks are regrouped at load (server/quant.py) into panels of eight
 * output rows, so that eight outputs' weights for one k unpack into one vector:
 *
 *   panel p (rows 8p .. 8p+7), block b (k = 32b .. 32b+31):
 *     d[8] fp16, then for Q4_1 m[8] fp16, then eight quads g (k = 32b + 4g + kk, kk < 4):
 *     Q4_1: 16 bytes, byte i < 8 = q[i][kk=0] | q[i][kk=1] << 4, byte 8 + i = q[i][2] | q[i][3] << 4
 *     Q8_0: 32 bytes, byte 8 kk + i = q[i][kk] (int8)
 *
 * The same bytes as the GGUF's blocks, in another order. One fixed order of arithmetic per
 * output element, whatever M, the tile or the thread: acc = 0, then acc = fma(x[k], w[k], acc)
 * for k = 0 .. K-1. So a row's result has the same bits alone or among any other rows, which is
 * what lets one forward serve many sessions exactly. The portable code performs the same
 * operations one at a time and gives the same bits as the AVX2 code; tests compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

enum { KIND_Q4_1 = 1, KIND_Q8_0 = 2 }; /* server/kernels.py names them */
#define QK 32                          /* weights per block along k */
#define PANEL 8                        /* output rows per panel */
#define MAX_THREADS 64

/* bytes of one panel's block: the GGUF's block bytes times 8 */
static long panel_block_bytes(int kind) { return kind == KIND_Q4_1 ? 160 : 272; }

typedef struct {
    const float *x;
    const uint8_t *w;
    float *y;
    long m, n, k, ldy;
    int kind, portable;
    atomic_int failed; /* a part could not allocate its scratch */
} Job;

/* Attention of n query rows, row j at position start + j, each over positions [0, start + j]:
 * q [n, H, Dh], keys and values [G, T, Dh] with strides (sg, st), out [n, H * Dh]. */
typedef struct {
    const float *q, *k, *v;
    float *out;
    long n, heads, kv_heads, dh, start, k_sg, k_st, v_sg, v_st;
    float scale;
    int portable;
} Attn;

/* Attention of several sequences' rows in one task: items numbered across the segments. */
typedef struct {
    const Attn *segs;
    const long *first; /* segment s holds items first[s] .. first[s+1]-1 */
    long nseg;
    atomic_int failed; /* a part could not allocate its scores */
} AttnBatch;

typedef struct {
    void (*run)(const void *args, int part, int parts);
    const void *args;
} Task;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        float v = ldexpf((float)mant, -24); /* zero or subnormal, exact */
        return sign ? -v : v;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* A thread's scratch floats, kept between calls: fresh allocations of this size would go to mmap
 * and fault their pages in on every call. NULL when memory runs out. */
static float *scratch(size_t n) {
    static __thread float *buf;
    static __thread size_t cap;
    if (n > cap) {
        free(buf);
        cap = n + n / 4;
        buf = aligned_alloc(32, (cap * sizeof(float) + 31) & ~(size_t)31);
        if (!buf) cap = 0;
    }
    return buf;
}

static float lanes_sum(const float *l) {
    float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
    return (a0 + a2) + (a1 + a3);
}

/* ---- portable: the reference order, one element at a time ---------------------------------- */

/* A panel's weights, ws[k * 8 + i] = W[8p + i][k]. */
static void dequant_panel(int kind, const uint8_t *panel, long k, float *ws) {
    for (long b = 0; b < k / QK; b++) {
        const uint8_t *pb = panel + b * panel_block_bytes(kind);
        for (int i = 0; i < PANEL; i++) {
            float d = half_to_float(load_u16(pb + 2 * i));
            float m = kind == KIND_Q4_1 ? half_to_float(load_u16(pb + 16 + 2 * i)) : 0.f;
            for (int j = 0; j < QK; j++) {
                int g = j / 4, kk = j % 4;
                float w;
                if (kind == KIND_Q4_1) {
                    uint8_t byte = pb[32 + 16 * g + (kk / 2) * 8 + i];
                    w = d * (float)(kk % 2 ? byte >> 4 : byte & 0x0f) + m; /* -ffp-contract=off: never fused */
                } else {
                    w = d * (float)(int8_t)pb[16 + 32 * g + 8 * kk + i];
                }
                ws[(b * QK + j) * PANEL + i] = w;
            }
        }
    }
}

static void part_portable(Job *J, long p0, long p1) {
    float *ws = scratch((size_t)J->k * PANEL);
    if (!ws) {
        atomic_store(&J->failed, 1);
        return;
    }
    for (long p = p0; p < p1; p++) {
        dequant_panel(J->kind, J->w + p * (J->k / QK) * panel_block_bytes(J->kind), J->k, ws);
        for (long r = 0; r < J->m; r++)
            for (int i = 0; i < PANEL; i++) {
                float acc = 0.f;
                for (long k = 0; k < J->k; k++) acc = fmaf(J->x[r * J->k + k], ws[k * PANEL + i], acc);
                J->y[r * J->ldy + p * PANEL + i] = acc;
            }
    }
}

/* ---- AVX2: the same operations, eight outputs at once ------------------------------------- */

#ifdef HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#define ATTR static inline __attribute__((always_inline))

/* The weights of quad g of a panel's block: w[kk] = W[8p .. 8p+7][32b + 4g + kk]. */
ATTR void dequant_quad(int kind, const uint8_t *pb, int g, __m256 d, __m256 m, __m256 *w) {
    if (kind == KIND_Q4_1) {
        __m128i v = _mm_loadu_si128((const __m128i *)(pb + 32 + 16 * g)), nib = _mm_set1_epi8(0x0f);
        __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        __m128i q[4] = {lo, hi, _mm_srli_si128(lo, 8), _mm_srli_si128(hi, 8)};
        for (int kk = 0; kk < 4; kk++)
            w[kk] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q[kk]))), m);
    } else {
        for (int kk = 0; kk < 4; kk++) {
            __m128i q = _mm_loadl_epi64((const __m128i *)(pb + 16 + 32 * g + 8 * kk));
            w[kk] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        }
    }
}

ATTR void block_scales(int kind, const uint8_t *pb, __m256 *d, __m256 *m) {
    *d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)pb));
    *m = kind == KIND_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(pb + 16))) : _mm256_setzero_ps();
}

ATTR float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Few rows: MT rows against NP panels, the weights unpacked in registers as they are used. */
ATTR void tile_direct(const Job *J, int kind, long p0, const int NP, const int MT) {
    long nb = J->k / QK, pbb = panel_block_bytes(kind);
    __m256 acc[8][3];
    _Pragma("GCC unroll 8") for (int p = 0; p < NP; p++)
        _Pragma("GCC unroll 3") for (int r = 0; r < MT; r++) acc[p][r] = _mm256_setzero_ps();
    for (long b = 0; b < nb; b++) {
        _Pragma("GCC unroll 8") for (int p = 0; p < NP; p++) {
            const uint8_t *pb = J->w + ((p0 + p) * nb + b) * pbb;
            __m256 d, m, w[4];
            block_scales(kind, pb, &d, &m);
            for (int g = 0; g < 8; g++) {
                dequant_quad(kind, pb, g, d, m, w);
                long k = b * QK + 4 * g;
                _Pragma("GCC unroll 3") for (int r = 0; r < MT; r++)
                    _Pragma("GCC unroll 4") for (int kk = 0; kk < 4; kk++)
                        acc[p][r] = _mm256_fmadd_ps(_mm256_set1_ps(J->x[r * J->k + k + kk]), w[kk], acc[p][r]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int p = 0; p < NP; p++)
        _Pragma("GCC unroll 3") for (int r = 0; r < MT; r++)
            _mm256_storeu_ps(J->y + r * J->ldy + (p0 + p) * PANEL, acc[p][r]);
}

/* Many rows: the panels' weights unpacked once into ws (NP panels of K x 8 floats), then rows
 * r0 .. r0+MT-1 against them: MT x NP accumulators, each a chain along k. */
ATTR void tile_scratch(const Job *J, const float *ws, long p0, long r0, const int NP, const int MT) {
    __m256 acc[6][2];
    _Pragma("GCC unroll 6") for (int r = 0; r < MT; r++)
        _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++) acc[r][p] = _mm256_setzero_ps();
    const float *x = J->x + r0 * J->k;
    for (long k = 0; k < J->k; k++) {
        __m256 w[2];
        _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++) w[p] = _mm256_load_ps(ws + (p * J->k + k) * PANEL);
        _Pragma("GCC unroll 6") for (int r = 0; r < MT; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * J->k + k);
            _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++) acc[r][p] = _mm256_fmadd_ps(xv, w[p], acc[r][p]);
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < MT; r++)
        _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++)
            _mm256_storeu_ps(J->y + (r0 + r) * J->ldy + (p0 + p) * PANEL, acc[r][p]);
}

static void unpack_panels(int kind, const uint8_t *panels, long nb, int np, long k, float *ws) {
    for (int p = 0; p < np; p++)
        for (long b = 0; b < nb; b++) {
            const uint8_t *pb = panels + (p * nb + b) * panel_block_bytes(kind);
            __m256 d, m, w[4];
            block_scales(kind, pb, &d, &m);
            for (int g = 0; g < 8; g++) {
                dequant_quad(kind, pb, g, d, m, w);
                for (int kk = 0; kk < 4; kk++) _mm256_store_ps(ws + (p * k + b * QK + 4 * g + kk) * PANEL, w[kk]);
            }
        }
}

#define SCRATCH_ROWS(NP)                                                                        \
    static void rows_scratch_##NP(const Job *J, const float *ws, long p0) {                     \
        long r = 0;                                                                             \
        for (; r + 6 <= J->m; r += 6) tile_scratch(J, ws, p0, r, NP, 6);                        \
        switch (J->m - r) {                                                                     \
            case 5: tile_scratch(J, ws, p0, r, NP, 5); break;                                   \
            case 4: tile_scratch(J, ws, p0, r, NP, 4); break;                                   \
            case 3: tile_scratch(J, ws, p0, r, NP, 3); break;                                   \
            case 2: tile_scratch(J, ws, p0, r, NP, 2); break;                                   \
            case 1: tile_scratch(J, ws, p0, r, NP, 1); break;                                   \
        }                                                                                       \
    }
SCRATCH_ROWS(1)
SCRATCH_ROWS(2)

#define DIRECT(kind, name)                                                                      \
    static void direct_##name(const Job *J, long p0, long p1) {                                 \
        long p = p0;                                                                            \
        if (J->m == 1) {                                                                        \
            for (; p + 8 <= p1; p += 8) tile_direct(J, kind, p, 8, 1);                          \
            for (; p + 4 <= p1; p += 4) tile_direct(J, kind, p, 4, 1);                          \
            for (; p < p1; p++) tile_direct(J, kind, p, 1, 1);                                  \
        } else if (J->m == 2) {                                                                 \
            for (; p + 2 <= p1; p += 2) tile_direct(J, kind, p, 2, 2);                          \
            for (; p < p1; p++) tile_direct(J, kind, p, 1, 2);                                  \
        } else {                                                                                \
            for (; p + 2 <= p1; p += 2) tile_direct(J, kind, p, 2, 3);                          \
            for (; p < p1; p++) tile_direct(J, kind, p, 1, 3);                                  \
        }                                                                                       \
    }
DIRECT(KIND_Q4_1, q4_1)
DIRECT(KIND_Q8_0, q8_0)

#define DIRECT_ROWS 3 /* up to this many rows, the weights are unpacked in registers */

static void part_avx2(Job *J, long p0, long p1) {
    long nb = J->k / QK;
    if (J->m <= DIRECT_ROWS) {
        (J->kind == KIND_Q4_1 ? direct_q4_1 : direct_q8_0)(J, p0, p1);
        return;
    }
    float *ws = scratch((size_t)2 * J->k * PANEL);
    if (!ws) {
        atomic_store(&J->failed, 1);
        return;
    }
    long p = p0;
    for (; p + 2 <= p1; p += 2) {
        unpack_panels(J->kind, J->w + p * nb * panel_block_bytes(J->kind), nb, 2, J->k, ws);
        rows_scratch_2(J, ws, p);
    }
    if (p < p1) {
        unpack_panels(J->kind, J->w + p * nb * panel_block_bytes(J->kind), nb, 1, J->k, ws);
        rows_scratch_1(J, ws, p);
    }
}

#pragma GCC pop_options

static int have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
static void part_avx2(Job *J, long p0, long p1) { part_portable(J, p0, p1); }
static int have_avx2(void) { return 0; }
#endif

static void matmul_part(const void *args, int part, int parts) {
    Job *J = (Job *)args;
    /* Split the panels in pairs, so every part keeps whole tiles. */
    long panels = J->n / PANEL, per = (((panels + parts - 1) / parts) + 1) & ~1L;
    long p0 = part * per, p1 = p0 + per < panels ? p0 + per : panels;
    if (p0 >= p1) return;
    if (J->portable) part_portable(J, p0, p1);
    else part_avx2(J, p0, p1);
}

/* ---- attention: per (row, head), scores, softmax and the weighted values in a fixed order ---- */

/* Scores: lane l of a dot product accumulates q[d] k[d] for d = l (mod 8), summed as in a product,
 * times the scale. Softmax: the max; exp(score - max) by exp_lane below; their sum in eight lanes,
 * lane l taking positions i = l (mod 8) in order, summed as a product's lanes. Output: per
 * dimension, the fused multiply-add chain of weight x value in position order, divided by the sum.
 *
 * exp_lane: Cephes' expf polynomial, written as fixed fused and plain operations so that both
 * paths give the same bits (libm's expf may differ between machines). Arguments are <= 0 here;
 * below -87 the result is 2^-126-ish instead of a subnormal, a weight of ~1e-38 either way. */
#define EXP_LO -87.0f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
static const float EXP_C[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static float exp_lane(float x) {
    x = x < EXP_LO ? EXP_LO : x;
    float n = rintf(x * LOG2E);
    float r = fmaf(n, -LN2_HI, x);
    r = fmaf(n, -LN2_LO, r);
    float p = EXP_C[0];
    for (int c = 1; c < 6; c++) p = fmaf(p, r, EXP_C[c]);
    float y = fmaf(p, r * r, r) + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

static void attn_portable(const Attn *A, long j, long h, float *s) {
    long t = A->start + j + 1, g = h / (A->heads / A->kv_heads), dh = A->dh;
    const float *q = A->q + (j * A->heads + h) * dh;
    float mx = -INFINITY, lanes[8] = {0};
    for (long i = 0; i < t; i++) {
        const float *k = A->k + g * A->k_sg + i * A->k_st;
        float acc[8] = {0};
        for (long d = 0; d < dh; d++) acc[d % 8] = fmaf(q[d], k[d], acc[d % 8]);
        s[i] = lanes_sum(acc) * A->scale;
        mx = s[i] > mx ? s[i] : mx;
    }
    for (long i = 0; i < t; i++) {
        s[i] = exp_lane(s[i] - mx);
        lanes[i % 8] += s[i];
    }
    float sum = lanes_sum(lanes), *out = A->out + j * A->heads * dh + h * dh;
    for (long d = 0; d < dh; d++) out[d] = 0.f;
    for (long i = 0; i < t; i++) {
        const float *v = A->v + g * A->v_sg + i * A->v_st;
        for (long d = 0; d < dh; d++) out[d] = fmaf(s[i], v[d], out[d]);
    }
    for (long d = 0; d < dh; d++) out[d] = out[d] / sum;
}

#ifdef HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MAX_DH 256

ATTR __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)); /* x is never NaN here: scores of finite rows */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_C[0]);
    for (int c = 1; c < 6; c++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C[c]));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

ATTR float dot1(const float *q, long nv, const float *k, float scale) {
    __m256 acc = _mm256_setzero_ps();
    for (long c = 0; c < nv; c++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(k + 8 * c), acc);
    return hsum8(acc) * scale;
}

/* Scores of two queries against four keys from k0 (stride st): eight chains in flight. */
ATTR void dot4x2(const float *qa, const float *qb, long nv, const float *k0, long st, float *sa, float *sb,
                 float scale) {
    __m256 a[4], b[4];
    for (int x = 0; x < 4; x++) a[x] = b[x] = _mm256_setzero_ps();
    for (long c = 0; c < nv; c++) {
        __m256 va = _mm256_loadu_ps(qa + 8 * c), vb = _mm256_loadu_ps(qb + 8 * c);
        for (int x = 0; x < 4; x++) {
            __m256 k = _mm256_loadu_ps(k0 + x * st + 8 * c);
            a[x] = _mm256_fmadd_ps(va, k, a[x]);
            b[x] = _mm256_fmadd_ps(vb, k, b[x]);
        }
    }
    for (int x = 0; x < 4; x++) {
        sa[x] = hsum8(a[x]) * scale;
        sb[x] = hsum8(b[x]) * scale;
    }
}

/* out[0 .. 8W) += sum over positions i0..i1-1 of weight s[i] x value i, in position order. */
ATTR void weigh_values(const float *s, const float *v, long st, long i0, long i1, float *out, const int W) {
    __m256 o[8];
    _Pragma("GCC unroll 8") for (int c = 0; c < W; c++) o[c] = _mm256_loadu_ps(out + 8 * c);
    for (long i = i0; i < i1; i++) {
        __m256 e = _mm256_set1_ps(s[i]);
        _Pragma("GCC unroll 8") for (int c = 0; c < W; c++) o[c] = _mm256_fmadd_ps(e, _mm256_loadu_ps(v + i * st + 8 * c), o[c]);
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < W; c++) _mm256_storeu_ps(out + 8 * c, o[c]);
}

/* Queries (j[u], h[u]), u < nq, all of KV head g, in blocks of KEY_BLOCK positions so that a block of
 * keys and values is read from memory once for all of them. s: nq rows of `ld` scores. */
#define KEY_BLOCK 64
static void attn_group_avx2(const Attn *A, long g, const long *js, const long *hs, long nq, float *s, long ld) {
    long nv = A->dh / 8, tmax = 0;
    const float *kg = A->k + g * A->k_sg, *vg = A->v + g * A->v_sg;
    for (long u = 0; u < nq; u++) tmax = A->start + js[u] + 1 > tmax ? A->start + js[u] + 1 : tmax;
    for (long i0 = 0; i0 < tmax; i0 += KEY_BLOCK) {
        for (long u = 0; u < nq; u += 2) {
            /* Two queries at once over the keys both see, four keys at a time: eight chains. */
            long t0 = A->start + js[u] + 1, t1 = u + 1 < nq ? A->start + js[u + 1] + 1 : 0;
            long both = (t1 < t0 ? t1 : t0), i1 = i0 + KEY_BLOCK < both ? i0 + KEY_BLOCK : both, i = i0;
            const float *q0 = A->q + (js[u] * A->heads + hs[u]) * A->dh;
            for (; i + 4 <= i1; i += 4)
                dot4x2(q0, q0 + (js[u + 1] - js[u]) * A->heads * A->dh + (hs[u + 1] - hs[u]) * A->dh, nv,
                       kg + i * A->k_st, A->k_st, s + u * ld + i, s + (u + 1) * ld + i, A->scale);
            for (long w = u; w < u + 2 && w < nq; w++) {
                long t = A->start + js[w] + 1, end = i0 + KEY_BLOCK < t ? i0 + KEY_BLOCK : t;
                for (long x = i; x < end; x++) s[w * ld + x] = dot1(A->q + (js[w] * A->heads + hs[w]) * A->dh, nv,
                                                                     kg + x * A->k_st, A->scale);
            }
        }
    }
    float sums[nq];
    for (long u = 0; u < nq; u++) {
        long t = A->start + js[u] + 1, i;
        float *su = s + u * ld, mx = -INFINITY;
        for (i = 0; i < t; i++) mx = su[i] > mx ? su[i] : mx;
        __m256 m = _mm256_set1_ps(mx), lanes = _mm256_setzero_ps();
        for (i = 0; i + 8 <= t; i += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(su + i), m));
            _mm256_storeu_ps(su + i, e);
            lanes = _mm256_add_ps(lanes, e);
        }
        if (i < t) { /* the tail: its lanes of one more vector */
            float tail[8] = {0}, lane[8];
            for (long x = i; x < t; x++) tail[x - i] = su[x];
            _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), m)));
            _mm256_storeu_ps(lane, lanes);
            for (long x = i; x < t; x++) {
                su[x] = tail[x - i];
                lane[x - i] += su[x];
            }
            lanes = _mm256_loadu_ps(lane);
        }
        sums[u] = hsum8(lanes);
        float *out = A->out + js[u] * A->heads * A->dh + hs[u] * A->dh;
        for (long c = 0; c < nv; c++) _mm256_storeu_ps(out + 8 * c, _mm256_setzero_ps());
    }
    for (long i0 = 0; i0 < tmax; i0 += KEY_BLOCK) {
        for (long u = 0; u < nq; u++) {
            long t = A->start + js[u] + 1, i1 = i0 + KEY_BLOCK < t ? i0 + KEY_BLOCK : t;
            if (i0 >= t) continue;
            float *out = A->out + js[u] * A->heads * A->dh + hs[u] * A->dh;
            const float *su = s + u * ld;
            long c = 0; /* dimensions in register-sized chunks, so the sums stay in registers */
            for (; c + 8 <= nv; c += 8) weigh_values(su, vg + 8 * c, A->v_st, i0, i1, out + 8 * c, 8);
            if (c + 4 <= nv) weigh_values(su, vg + 8 * c, A->v_st, i0, i1, out + 8 * c, 4), c += 4;
            if (c + 2 <= nv) weigh_values(su, vg + 8 * c, A->v_st, i0, i1, out + 8 * c, 2), c += 2;
            if (c < nv) weigh_values(su, vg + 8 * c, A->v_st, i0, i1, out + 8 * c, 1);
        }
    }
    for (long u = 0; u < nq; u++) {
        float *out = A->out + js[u] * A->heads * A->dh + hs[u] * A->dh;
        __m256 sv = _mm256_set1_ps(sums[u]);
        for (long c = 0; c < nv; c++) _mm256_storeu_ps(out + 8 * c, _mm256_div_ps(_mm256_loadu_ps(out + 8 * c), sv));
    }
}
#pragma GCC pop_options
#endif

#define GROUP_QUERIES 64 /* queries of one KV head that share a pass over its keys */

/* Items of a segment are (KV head, row, head of the group), KV head first, so that a run of
 * items shares keys. Items a .. b-1 of segment A; 0 when its scores' scratch is out of memory. */
static int attend_items(const Attn *A, long a, long b) {
    long hpg = A->heads / A->kv_heads, per_g = A->n * hpg, ld = A->start + A->n;
    float *s = scratch((size_t)(b - a < GROUP_QUERIES ? b - a : GROUP_QUERIES) * ld);
    if (!s) return 0;
    long js[GROUP_QUERIES], hs[GROUP_QUERIES];
    for (long it = a; it < b;) {
        long g = it / per_g, nq = 0;
        for (; it < b && it / per_g == g && nq < GROUP_QUERIES; it++, nq++) {
            js[nq] = it % per_g / hpg;
            hs[nq] = g * hpg + it % hpg;
        }
        if (A->portable) {
            for (long u = 0; u < nq; u++) attn_portable(A, js[u], hs[u], s);
        } else {
#ifdef HAVE_X86
            attn_group_avx2(A, g, js, hs, nq, s, ld);
#else
            for (long u = 0; u < nq; u++) attn_portable(A, js[u], hs[u], s);
#endif
        }
    }
    return 1;
}

static void attend_part(const void *args, int part, int parts) {
    AttnBatch *B = (AttnBatch *)args;
    long items = B->first[B->nseg], per = (items + parts - 1) / parts, a = part * per;
    long b = a + per < items ? a + per : items;
    for (long seg = 0; seg < B->nseg && a < b; seg++) {
        long lo = B->first[seg], hi = B->first[seg + 1];
        if (hi <= a || lo >= b) continue;
        if (!attend_items(&B->segs[seg], (a > lo ? a : lo) - lo, (b < hi ? b : hi) - lo)) atomic_store(&B->failed, 1);
    }
}

/* ---- a small thread pool: workers wait on a condition variable, after a short spin -------- */

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one task at a time */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
static Task task;
static int workers, task_parts;
static atomic_long generation;
static atomic_int pending;
#define SPIN 256 /* polls (a few us) before sleeping: longer spins cost more CPU between a forward's tasks than they save */

static void cpu_relax(void) {
#ifdef HAVE_X86
    _mm_pause();
#endif
}

static void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg;
    long seen = 0;
    for (;;) {
        for (int i = 0; i < SPIN && atomic_load(&generation) == seen; i++) cpu_relax();
        if (atomic_load(&generation) == seen) {
            pthread_mutex_lock(&mu);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &mu);
            pthread_mutex_unlock(&mu);
        }
        seen = atomic_load(&generation);
        if (id < task_parts) task.run(task.args, id, task_parts);
        if (atomic_fetch_sub(&pending, 1) == 1) {
            pthread_mutex_lock(&mu);
            pthread_cond_signal(&finished);
            pthread_mutex_unlock(&mu);
        }
    }
    return NULL;
}

static int ensure_workers(int n) {
    while (workers < n) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker_main, (void *)(intptr_t)(workers + 1)) != 0) return -1;
        pthread_detach(t);
        workers++;
    }
    return 0;
}

/* Run `run` in `threads` parts, this thread doing part 0; small tasks stay on this thread. */
static void run_task(void (*run)(const void *, int, int), const void *args, int threads, long work) {
    pthread_mutex_lock(&call_lock);
    if (threads > 1 && work >= (1L << 16) && ensure_workers(threads - 1) == 0) {
        task.run = run;
        task.args = args;
        task_parts = threads;
        atomic_store(&pending, workers);
        pthread_mutex_lock(&mu);
        atomic_fetch_add(&generation, 1);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&mu);
        run(args, 0, threads);
        for (int i = 0; i < SPIN && atomic_load(&pending) > 0; i++) cpu_relax();
        pthread_mutex_lock(&mu);
        while (atomic_load(&pending) > 0) pthread_cond_wait(&finished, &mu);
        pthread_mutex_unlock(&mu);
    } else {
        run(args, 0, 1);
    }
    pthread_mutex_unlock(&call_lock);
}

/* ---- Python: over buffer addresses the caller keeps alive and checks the shapes of ---------- */

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    long m, n, k, ldy;
    int kind, threads, portable;
    if (!PyArg_ParseTuple(args, "KKKlllliip", &x, &w, &y, &m, &n, &k, &ldy, &kind, &threads, &portable))
        return NULL;
    if ((kind != KIND_Q4_1 && kind != KIND_Q8_0) || m < 0 || n < 0 || n % PANEL || k <= 0 || k % QK || ldy < n ||
        threads < 1 || threads > MAX_THREADS) {
        PyErr_SetString(PyExc_ValueError, "bad quantized product arguments");
        return NULL;
    }
    Job J = {(const float *)(uintptr_t)x, (const uint8_t *)(uintptr_t)w, (float *)(uintptr_t)y,
             m, n, k, ldy, kind, portable || !have_avx2(), 0};
    Py_BEGIN_ALLOW_THREADS
    run_task(matmul_part, &J, threads, m * n * k);
    Py_END_ALLOW_THREADS
    if (atomic_load(&J.failed)) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* segs: nseg rows of ten int64 (q, k, v, out addresses; n, start, k_sg, k_st, v_sg, v_st). */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long segs_addr;
    long nseg, heads, kv_heads, dh;
    float scale;
    int threads, portable;
    if (!PyArg_ParseTuple(args, "Kllllfip", &segs_addr, &nseg, &heads, &kv_heads, &dh, &scale, &threads, &portable))
        return NULL;
    const int64_t *rows = (const int64_t *)(uintptr_t)segs_addr;
    int bad = nseg < 0 || heads < 1 || kv_heads < 1 || heads % kv_heads || dh < 8 || dh % 8 || dh > 256 ||
              threads < 1 || threads > MAX_THREADS;
    for (long i = 0; !bad && i < nseg; i++) bad = rows[10 * i + 4] < 0 || rows[10 * i + 5] < 0;
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "bad attention arguments");
        return NULL;
    }
    Attn *segs = malloc((size_t)(nseg ? nseg : 1) * sizeof(Attn));
    long *first = malloc((size_t)(nseg + 1) * sizeof(long)), work = 0;
    if (!segs || !first) {
        free(segs);
        free(first);
        return PyErr_NoMemory();
    }
    first[0] = 0;
    for (long i = 0; i < nseg; i++) {
        const int64_t *r = rows + 10 * i;
        segs[i] = (Attn){(const float *)(uintptr_t)r[0], (const float *)(uintptr_t)r[1], (const float *)(uintptr_t)r[2],
                         (float *)(uintptr_t)r[3], r[4], heads, kv_heads, dh, r[5], r[6], r[7], r[8], r[9], scale,
                         portable || !have_avx2()};
        first[i + 1] = first[i] + r[4] * heads;
        work += r[4] * heads * (r[5] + r[4]) * dh;
    }
    AttnBatch B = {segs, first, nseg, 0};
    Py_BEGIN_ALLOW_THREADS
    run_task(attend_part, &B, threads, work);
    Py_END_ALLOW_THREADS
    free(segs);
    free(first);
    if (atomic_load(&B.failed)) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_simd(PyObject *self, PyObject *noargs) { return PyBool_FromLong(have_avx2()); }

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y[m, n] = x[m, k] @ W[n, k]^T over panels of quantized blocks at raw addresses"},
    {"attend", py_attend, METH_VARARGS, "attention of several sequences' generated rows, each over its own past"},
    {"simd", py_simd, METH_NOARGS, "whether the AVX2 kernels run on this CPU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
