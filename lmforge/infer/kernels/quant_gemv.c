/* Matrix-vector products with 4-bit and 8-bit weights for batch-1 decode, integer dot products.
 *
 * A decode step multiplies every weight once by one activation row, so it is bound by the
 * bytes of the weights: the kernels here read them once, packed, and never widen them to
 * floats. The products are integer dot products, AVX-512 VNNI's vpdpbusd (64 unsigned x
 * signed byte products summed into 16 int32 lanes), so the activation row is written in
 * bytes too: per group of 32 inputs with d = max|x| / 127, x = d (x8 + r8 / 128) where x8 is
 * x / d rounded and r8 the rounded rest in steps of d / 128. Both byte vectors go through
 * the same weights and their sums meet as 128 dot(q, x8) + dot(q, r8), an integer; the row's
 * rounding error is then at most d / 256, finer than bfloat16's 8 significant bits. (One
 * byte alone, as llama.cpp's Q8_0 rounds activations, cost the default model 1% in
 * perplexity scored token by token; this costs it 0.1%, docs/benchmarks.md.)
 *
 * int4 rows (`lmf_q4_pack`, `lmf_q4_gemv`): weights w = q s + z per group of 32 inputs,
 * codes q in 0..15. A row is a run of chunks of four groups (128 inputs): 64 bytes of codes
 * (byte 16 g + j holds code j of group g in its low nibble and code 16 + j in its high one),
 * then the four scales s and four offsets z as float16. A row whose length is 64 mod 128
 * ends in a half chunk: 32 bytes of codes, two scales, two offsets. So
 *     sum_k w_k x_k = sum_g s_g u_g sum_k q_k X_k + z_g sum_k x_k
 * with X = 128 x8 + r8 and u = d / 128; the offsets meet the exact float sums of x.
 *
 * int8 rows (`lmf_q8_gemv`): codes q in -127..127 stored as q + 128 (unsigned, as vpdpbusd
 * wants its first operand), one float scale per row: w = q s. The +128 adds
 * 128 sum_g dx_g sum_k x8_k to every row's sum, the same constant for all rows, taken off
 * once (with X in place of x8 as above).
 *
 * Built for the CPU it runs on (-march=native); without AVX-512 VNNI the entry points return
 * 1 and lmforge keeps PyTorch's kernels.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LMF_VNNI 1
#include <immintrin.h>
#endif

int lmf_quant_gemv_supported(void) {
#ifdef LMF_VNNI
    return 1;
#else
    return 0;
#endif
}

/* bytes of one packed int4 row of k inputs (k a multiple of 64) */
long lmf_q4_row_bytes(int k) {
    long full = k / 128, half = (k % 128) / 64;
    return full * (64 + 16) + half * (32 + 8);
}

static uint16_t to_half(float f) {
    /* float -> IEEE half, round to nearest even (scales are normal numbers or zero) */
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = (v.u >> 16) & 0x8000, exp = (v.u >> 23) & 0xff, man = v.u & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* codes [n][k] (0..15), scales and offsets [n][k / 32] -> out, n rows of lmf_q4_row_bytes(k).
 * Returns 1 if k is not a multiple of 64. */
int lmf_q4_pack(const uint8_t *codes, const float *scales, const float *offsets, int n, int k, uint8_t *out) {
    if (k % 64) return 1;
    const long row_bytes = lmf_q4_row_bytes(k), groups = k / 32;
    for (int r = 0; r < n; r++) {
        const uint8_t *q = codes + (long)r * k;
        const float *s = scales + r * groups, *z = offsets + r * groups;
        uint8_t *o = out + r * row_bytes;
        for (int g0 = 0; g0 < groups;) {
            const int ng = groups - g0 >= 4 ? 4 : 2;
            for (int g = 0; g < ng; g++)
                for (int j = 0; j < 16; j++)
                    o[16 * g + j] = (uint8_t)((q[(g0 + g) * 32 + j] & 15) | ((q[(g0 + g) * 32 + 16 + j] & 15) << 4));
            uint16_t *h = (uint16_t *)(o + 16 * ng);
            for (int g = 0; g < ng; g++) {
                h[g] = to_half(s[g0 + g]);
                h[ng + g] = to_half(z[g0 + g]);
            }
            o += 16 * ng + 4 * ng;
            g0 += ng;
        }
    }
    return 0;
}

#ifdef LMF_VNNI
/* The activation row, rounded for the integer products, laid out as the chunks read it. */
typedef struct {
    int8_t *x8;    /* per chunk: the low-nibble partners (64 or 32 bytes), then the high ones */
    int8_t *r8;    /* the rounded rests, laid out as x8 */
    float *dx;     /* per chunk: 16 lanes, lane -> scale of the group its products belong to */
    float *xsum;   /* per chunk: 8 floats, 0 0 0 0 then the exact sums of x over its groups (4 or 2) */
    float *gscale; /* per group: u_g = d_g / 128, the unit of X */
    int32_t *gsum; /* per group: sum of X = 128 x8 + r8 */
} act_t;

static int act_prepare(const float *x, int k, act_t *a, void *mem) {
    const int groups = k / 32, chunks = (k + 127) / 128;
    char *p = (char *)mem;
    a->x8 = (int8_t *)p; p += (size_t)chunks * 128;
    a->r8 = (int8_t *)p; p += (size_t)chunks * 128;
    a->dx = (float *)p; p += (size_t)chunks * 16 * sizeof(float);
    a->xsum = (float *)p; p += (size_t)chunks * 8 * sizeof(float);
    a->gscale = (float *)p; p += (size_t)groups * sizeof(float);
    a->gsum = (int32_t *)p;
    int8_t q[32], r[32];
    const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
    for (int g = 0; g < groups; g++) {
        const float *xg = x + g * 32;
        const __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        /* x / d rounded to nearest (even), clamped; then the rest in steps of 1/128 */
        const __m512 t0 = _mm512_mul_ps(v0, _mm512_set1_ps(inv)), t1 = _mm512_mul_ps(v1, _mm512_set1_ps(inv));
        const __m512i q0 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(t0), lim), nlim);
        const __m512i q1 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(t1), lim), nlim);
        const __m512 k128 = _mm512_set1_ps(128.0f);
        const __m512i r0 = _mm512_max_epi32(_mm512_min_epi32(
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t0, _mm512_cvtepi32_ps(q0)), k128)), lim), nlim);
        const __m512i r1 = _mm512_max_epi32(_mm512_min_epi32(
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t1, _mm512_cvtepi32_ps(q1)), k128)), lim), nlim);
        _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
        _mm_storeu_si128((__m128i *)r, _mm512_cvtepi32_epi8(r0));
        _mm_storeu_si128((__m128i *)(r + 16), _mm512_cvtepi32_epi8(r1));
        const int32_t isum = _mm512_reduce_add_epi32(_mm512_add_epi32(
            _mm512_slli_epi32(_mm512_add_epi32(q0, q1), 7), _mm512_add_epi32(r0, r1)));
        a->gscale[g] = d / 128.0f;
        a->gsum[g] = isum;
        const int c = g / 4, gi = g % 4;
        const int ng = groups - c * 4 >= 4 ? 4 : 2;
        int8_t *lo = a->x8 + (long)c * 128, *hi = lo + 16 * ng;
        memcpy(lo + 16 * gi, q, 16);
        memcpy(hi + 16 * gi, q + 16, 16);
        lo = a->r8 + (long)c * 128, hi = lo + 16 * ng;
        memcpy(lo + 16 * gi, r, 16);
        memcpy(hi + 16 * gi, r + 16, 16);
        float *dxc = a->dx + c * 16;
        for (int l = 0; l < 16; l++)
            if ((ng == 4 && l / 4 == gi) || (ng == 2 && (l / 4) % 2 == gi)) dxc[l] = d / 128.0f;
        float *xs = a->xsum + c * 8;
        if (gi == 0) memset(xs, 0, 8 * sizeof(float));
        xs[ng + gi] = sum; /* lines up with the float16 offsets, which follow the ng scales */
    }
    return 0;
}

static size_t act_bytes(int k) {
    const int chunks = (k + 127) / 128, groups = k / 32;
    return (size_t)chunks * (2 * 128 + 16 * 4 + 8 * 4) + (size_t)groups * 8 + 64;
}

static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

static float q4_row(const uint8_t *row, const act_t *a, int k) {
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i idx2 = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    __m256 zacc = _mm256_setzero_ps();
    const int full = k / 128;
    const uint8_t *p = row;
    for (int c = 0; c < full; c++) {
        const __m512i w = _mm512_loadu_si512((const void *)p);
        const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
        const int8_t *xc = a->x8 + (long)c * 128, *rc = a->r8 + (long)c * 128;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xc));
        dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void *)(xc + 64)));
        __m512i rest = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)rc));
        rest = _mm512_dpbusd_epi32(rest, hi, _mm512_loadu_si512((const void *)(rc + 64)));
        dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 7), rest);
        const __m256 sz = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 64)));
        const __m512 s16 = _mm512_permutexvar_ps(idx4, _mm512_castps256_ps512(sz));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s16, _mm512_loadu_ps(a->dx + c * 16)), acc);
        zacc = _mm256_fmadd_ps(sz, _mm256_loadu_ps(a->xsum + c * 8), zacc);
        p += 80;
    }
    if (k % 128) { /* half chunk: two groups */
        const int c = full;
        const __m256i w = _mm256_loadu_si256((const __m256i *)p);
        const __m256i n4 = _mm256_set1_epi8(15);
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w, n4)),
                                                _mm256_and_si256(_mm256_srli_epi16(w, 4), n4), 1);
        const __m512i dot = _mm512_add_epi32(
            _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), both,
                                                  _mm512_loadu_si512((const void *)(a->x8 + (long)c * 128))), 7),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), both, _mm512_loadu_si512((const void *)(a->r8 + (long)c * 128))));
        /* two scales then two offsets: widen the four halves, the upper lanes stay zero */
        const __m128 sz = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p + 32)));
        const __m512 s16 = _mm512_permutexvar_ps(idx2, _mm512_castps128_ps512(sz));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s16, _mm512_loadu_ps(a->dx + c * 16)), acc);
        const __m128 zt = _mm_mul_ps(sz, _mm_loadu_ps(a->xsum + c * 8)); /* s0 s1 z0 z1 x 0 0 sum0 sum1 */
        zacc = _mm256_add_ps(zacc, _mm256_insertf128_ps(_mm256_setzero_ps(), zt, 0));
    }
    float z[8];
    _mm256_storeu_ps(z, zacc);
    return hsum512(acc) + z[0] + z[1] + z[2] + z[3] + z[4] + z[5] + z[6] + z[7];
}

/* Two rows at once: each activation load serves both rows' products. */
static void q4_rows2(const uint8_t *row0, const uint8_t *row1, const act_t *a, int k, float *y0, float *y1) {
    const int full = k / 128;
    if (k % 128) { /* rows with a half chunk take the one-row path */
        *y0 = q4_row(row0, a, k);
        *y1 = q4_row(row1, a, k);
        return;
    }
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 zacc0 = _mm256_setzero_ps(), zacc1 = _mm256_setzero_ps();
    for (int c = 0; c < full; c++) {
        const int8_t *xc = a->x8 + (long)c * 128, *rc = a->r8 + (long)c * 128;
        const __m512i xlo = _mm512_loadu_si512((const void *)xc), xhi = _mm512_loadu_si512((const void *)(xc + 64));
        const __m512i rlo = _mm512_loadu_si512((const void *)rc), rhi = _mm512_loadu_si512((const void *)(rc + 64));
        const __m512 dx = _mm512_loadu_ps(a->dx + c * 16);
        const __m256 xs = _mm256_loadu_ps(a->xsum + c * 8);
        const uint8_t *p0 = row0 + (long)c * 80, *p1 = row1 + (long)c * 80;
        const __m512i w0 = _mm512_loadu_si512((const void *)p0), w1 = _mm512_loadu_si512((const void *)p1);
        const __m512i lo0 = _mm512_and_si512(w0, nib), hi0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), nib);
        const __m512i lo1 = _mm512_and_si512(w1, nib), hi1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), nib);
        __m512i d0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, xlo), hi0, xhi);
        __m512i e0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, rlo), hi0, rhi);
        __m512i d1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo1, xlo), hi1, xhi);
        __m512i e1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo1, rlo), hi1, rhi);
        d0 = _mm512_add_epi32(_mm512_slli_epi32(d0, 7), e0);
        d1 = _mm512_add_epi32(_mm512_slli_epi32(d1, 7), e1);
        const __m256 sz0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p0 + 64)));
        const __m256 sz1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p1 + 64)));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(_mm512_permutexvar_ps(idx4, _mm512_castps256_ps512(sz0)), dx), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(_mm512_permutexvar_ps(idx4, _mm512_castps256_ps512(sz1)), dx), acc1);
        zacc0 = _mm256_fmadd_ps(sz0, xs, zacc0);
        zacc1 = _mm256_fmadd_ps(sz1, xs, zacc1);
    }
    float z0[8], z1[8];
    _mm256_storeu_ps(z0, zacc0);
    _mm256_storeu_ps(z1, zacc1);
    *y0 = hsum512(acc0) + z0[0] + z0[1] + z0[2] + z0[3] + z0[4] + z0[5] + z0[6] + z0[7];
    *y1 = hsum512(acc1) + z1[0] + z1[1] + z1[2] + z1[3] + z1[4] + z1[5] + z1[6] + z1[7];
}
#endif


/* y[n] = sum_k w[r][k] x[k] for the packed int4 rows w (see lmf_q4_pack). Returns 0, or 1 when
 * this CPU has no AVX-512 VNNI or k is not a multiple of 64, 2 when memory is short. */
int lmf_q4_gemv(const uint8_t *w, int n, int k, const float *x, float *y) {
#ifdef LMF_VNNI
    if (k % 64) return 1;
    void *mem = aligned_alloc(64, (act_bytes(k) + 63) / 64 * 64);
    if (!mem) return 2;
    act_t a;
    act_prepare(x, k, &a, mem);
    const long row_bytes = lmf_q4_row_bytes(k);
    const int pairs = n / 2;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < pairs; i++)
        q4_rows2(w + (long)(2 * i) * row_bytes, w + (long)(2 * i + 1) * row_bytes, &a, k, y + 2 * i, y + 2 * i + 1);
    if (n % 2) y[n - 1] = q4_row(w + (long)(n - 1) * row_bytes, &a, k);
    free(mem);
    return 0;
#else
    (void)w; (void)n; (void)k; (void)x; (void)y;
    return 1;
#endif
}

/* The rows of a product of several activation rows: every weight row is read (and its
 * codes unpacked) once for up to QROWS activation rows, and each row's sum is formed by exactly
 * the operations of the one-row kernels, in the same order, so a row's result does not depend
 * on the rows it is batched with. Weight rows go in blocks of QBLOCK, small enough to stay in
 * the first-level cache while every tile of activation rows passes over them. */
#define QROWS 8
#define QBLOCK 8

#ifdef LMF_VNNI
/* One int4 weight row against mt activation rows (q4_row's arithmetic for each). */
static inline __attribute__((always_inline)) void q4_row_tile(const uint8_t *row, const act_t *a, const int mt,
                                                              int k, float *y, long ldy) {
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i idx2 = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[QROWS];
    __m256 zacc[QROWS];
#pragma GCC unroll 8
    for (int j = 0; j < mt; j++) {
        acc[j] = _mm512_setzero_ps();
        zacc[j] = _mm256_setzero_ps();
    }
    const int full = k / 128;
    const uint8_t *p = row;
    for (int c = 0; c < full; c++) {
        const __m512i w = _mm512_loadu_si512((const void *)p);
        const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
        const __m256 sz = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 64)));
        const __m512 s16 = _mm512_permutexvar_ps(idx4, _mm512_castps256_ps512(sz));
#pragma GCC unroll 8
        for (int j = 0; j < mt; j++) {
            const int8_t *xc = a[j].x8 + (long)c * 128, *rc = a[j].r8 + (long)c * 128;
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xc));
            dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void *)(xc + 64)));
            __m512i rest = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)rc));
            rest = _mm512_dpbusd_epi32(rest, hi, _mm512_loadu_si512((const void *)(rc + 64)));
            dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 7), rest);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s16, _mm512_loadu_ps(a[j].dx + c * 16)), acc[j]);
            zacc[j] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(a[j].xsum + c * 8), zacc[j]);
        }
        p += 80;
    }
    if (k % 128) {
        const int c = full;
        const __m256i w = _mm256_loadu_si256((const __m256i *)p);
        const __m256i n4 = _mm256_set1_epi8(15);
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w, n4)),
                                                _mm256_and_si256(_mm256_srli_epi16(w, 4), n4), 1);
        const __m128 sz = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p + 32)));
        const __m512 s16 = _mm512_permutexvar_ps(idx2, _mm512_castps128_ps512(sz));
#pragma GCC unroll 8
        for (int j = 0; j < mt; j++) {
            const __m512i dot = _mm512_add_epi32(
                _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), both,
                                                      _mm512_loadu_si512((const void *)(a[j].x8 + (long)c * 128))), 7),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), both,
                                    _mm512_loadu_si512((const void *)(a[j].r8 + (long)c * 128))));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s16, _mm512_loadu_ps(a[j].dx + c * 16)), acc[j]);
            const __m128 zt = _mm_mul_ps(sz, _mm_loadu_ps(a[j].xsum + c * 8));
            zacc[j] = _mm256_add_ps(zacc[j], _mm256_insertf128_ps(_mm256_setzero_ps(), zt, 0));
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < mt; j++) {
        float z[8];
        _mm256_storeu_ps(z, zacc[j]);
        y[j * ldy] = hsum512(acc[j]) + z[0] + z[1] + z[2] + z[3] + z[4] + z[5] + z[6] + z[7];
    }
}

/* Rows [r0, r1) of y for activation rows [0, m), tile by tile. */
static void q4_rows_block(const uint8_t *w, long row_bytes, int r0, int r1, const act_t *a, int m, int k,
                          float *y, long ldy) {
    for (int t = 0; t < m; t += QROWS) {
        const int mt = m - t < QROWS ? m - t : QROWS;
        for (int r = r0; r < r1; r++) {
            const uint8_t *row = w + (long)r * row_bytes;
            float *yr = y + (long)t * ldy + r;
            switch (mt) { /* a constant tile height for each copy of the loop */
            case 1: q4_row_tile(row, a + t, 1, k, yr, ldy); break;
            case 2: q4_row_tile(row, a + t, 2, k, yr, ldy); break;
            case 3: q4_row_tile(row, a + t, 3, k, yr, ldy); break;
            case 4: q4_row_tile(row, a + t, 4, k, yr, ldy); break;
            case 5: q4_row_tile(row, a + t, 5, k, yr, ldy); break;
            case 6: q4_row_tile(row, a + t, 6, k, yr, ldy); break;
            case 7: q4_row_tile(row, a + t, 7, k, yr, ldy); break;
            default: q4_row_tile(row, a + t, 8, k, yr, ldy); break;
            }
        }
    }
}
#endif

/* Y[m][n] (row stride ldy) = X[m][k] (row stride ldx) times the packed int4 rows w, each
 * row of Y equal to what lmf_q4_gemv gives for that row of X (one row: lmf_q4_gemv itself,
 * whose rows read in pairs stream faster alone). Returns as lmf_q4_gemv. */
int lmf_q4_gemm_rows(const uint8_t *w, int n, int k, const float *x, long ldx, int m, float *y, long ldy) {
#ifdef LMF_VNNI
    if (k % 64) return 1;
    if (m <= 0) return 0;
    if (m == 1) return lmf_q4_gemv(w, n, k, x, y);
    const size_t one = (act_bytes(k) + 63) / 64 * 64;
    char *mem = aligned_alloc(64, one * (size_t)m);
    act_t *a = malloc(sizeof(act_t) * (size_t)m);
    if (!mem || !a) {
        free(mem); free(a);
        return 2;
    }
    for (int j = 0; j < m; j++) act_prepare(x + (long)j * ldx, k, a + j, mem + one * (size_t)j);
    const long row_bytes = lmf_q4_row_bytes(k);
    const int blocks = (n + QBLOCK - 1) / QBLOCK;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int r0 = b * QBLOCK, r1 = r0 + QBLOCK < n ? r0 + QBLOCK : n;
        q4_rows_block(w, row_bytes, r0, r1, a, m, k, y, ldy);
    }
    free(mem); free(a);
    return 0;
#else
    (void)w; (void)n; (void)k; (void)x; (void)ldx; (void)m; (void)y; (void)ldy;
    return 1;
#endif
}

#ifdef LMF_VNNI
/* An activation row for the int8 rows: x8 and r8 (as act_t's) in input order, per 64 inputs a
 * 16-lane vector of the two groups' units, and what the +128 of the codes adds to a row's sum. */
typedef struct {
    int8_t *x8, *r8;
    float *dx;
    float bias;
} act8_t;

static size_t act8_bytes(int k) { return (size_t)2 * k + (size_t)(k / 64) * 16 * sizeof(float) + 64; }

static void act8_prepare(const float *x, int k, act8_t *o, void *scratch, void *mem) {
    act_t a;
    act_prepare(x, k, &a, scratch);
    o->x8 = (int8_t *)mem;
    o->r8 = o->x8 + k;
    o->dx = (float *)(o->r8 + k);
    const int groups = k / 32;
    for (int g = 0; g < groups; g++) {
        const int c = g / 4, gi = g % 4, ng = groups - c * 4 >= 4 ? 4 : 2;
        const int8_t *lo = a.x8 + (long)c * 128, *hi = lo + 16 * ng;
        memcpy(o->x8 + g * 32, lo + 16 * gi, 16);
        memcpy(o->x8 + g * 32 + 16, hi + 16 * gi, 16);
        const int8_t *rlo = a.r8 + (long)c * 128, *rhi = rlo + 16 * ng;
        memcpy(o->r8 + g * 32, rlo + 16 * gi, 16);
        memcpy(o->r8 + g * 32 + 16, rhi + 16 * gi, 16);
        for (int l = 0; l < 8; l++) o->dx[(g / 2) * 16 + (g % 2) * 8 + l] = a.gscale[g];
    }
    float bias = 0.0f;
    for (int g = 0; g < groups; g++) bias += 128.0f * a.gscale[g] * (float)a.gsum[g];
    o->bias = bias;
}

/* One int8 weight row against mt activation rows. */
static inline __attribute__((always_inline)) void q8_row_tile(const uint8_t *row, float scale, const act8_t *a,
                                                              const int mt, int k, float *y, long ldy) {
    __m512 acc[QROWS];
#pragma GCC unroll 8
    for (int j = 0; j < mt; j++) acc[j] = _mm512_setzero_ps();
    const int pairs = k / 64;
    for (int p = 0; p < pairs; p++) {
        const __m512i w = _mm512_loadu_si512((const void *)(row + p * 64));
#pragma GCC unroll 8
        for (int j = 0; j < mt; j++) {
            const __m512i dot = _mm512_add_epi32(
                _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_load_si512((const void *)(a[j].x8 + p * 64))), 7),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_load_si512((const void *)(a[j].r8 + p * 64))));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(a[j].dx + p * 16), acc[j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < mt; j++) y[j * ldy] = scale * (hsum512(acc[j]) - a[j].bias);
}

static void q8_rows_block(const uint8_t *w, const float *scale, int r0, int r1, const act8_t *a, int m, int k,
                          float *y, long ldy) {
    for (int t = 0; t < m; t += QROWS) {
        const int mt = m - t < QROWS ? m - t : QROWS;
        for (int r = r0; r < r1; r++) {
            const uint8_t *row = w + (long)r * k;
            float *yr = y + (long)t * ldy + r;
            switch (mt) {
            case 1: q8_row_tile(row, scale[r], a + t, 1, k, yr, ldy); break;
            case 2: q8_row_tile(row, scale[r], a + t, 2, k, yr, ldy); break;
            case 3: q8_row_tile(row, scale[r], a + t, 3, k, yr, ldy); break;
            case 4: q8_row_tile(row, scale[r], a + t, 4, k, yr, ldy); break;
            case 5: q8_row_tile(row, scale[r], a + t, 5, k, yr, ldy); break;
            case 6: q8_row_tile(row, scale[r], a + t, 6, k, yr, ldy); break;
            case 7: q8_row_tile(row, scale[r], a + t, 7, k, yr, ldy); break;
            default: q8_row_tile(row, scale[r], a + t, 8, k, yr, ldy); break;
            }
        }
    }
}

static int q8_product(const uint8_t *w, const float *scale, int n, int k, const float *x, long ldx, int m,
                      float *y, long ldy) {
    if (k % 64) return 1;
    if (m <= 0) return 0;
    const size_t one = (act8_bytes(k) + 63) / 64 * 64, tmp = (act_bytes(k) + 63) / 64 * 64;
    char *mem = aligned_alloc(64, one * (size_t)m + tmp);
    act8_t *a = malloc(sizeof(act8_t) * (size_t)m);
    if (!mem || !a) {
        free(mem); free(a);
        return 2;
    }
    for (int j = 0; j < m; j++) act8_prepare(x + (long)j * ldx, k, a + j, mem + one * (size_t)m, mem + one * (size_t)j);
    const int blocks = (n + QBLOCK - 1) / QBLOCK;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int r0 = b * QBLOCK, r1 = r0 + QBLOCK < n ? r0 + QBLOCK : n;
        q8_rows_block(w, scale, r0, r1, a, m, k, y, ldy);
    }
    free(mem); free(a);
    return 0;
}
#endif

/* y[n] = scale[r] sum_k q[r][k] x[k] for int8 codes stored as q + 128 ([n][k] bytes). */
int lmf_q8_gemv(const uint8_t *w, const float *scale, int n, int k, const float *x, float *y) {
#ifdef LMF_VNNI
    return q8_product(w, scale, n, k, x, k, 1, y, n);
#else
    (void)w; (void)scale; (void)n; (void)k; (void)x; (void)y;
    return 1;
#endif
}

/* Y[m][n] = X[m][k] times the int8 rows, each row of Y what lmf_q8_gemv gives for that row. */
int lmf_q8_gemm_rows(const uint8_t *w, const float *scale, int n, int k, const float *x, long ldx, int m,
                     float *y, long ldy) {
#ifdef LMF_VNNI
    return q8_product(w, scale, n, k, x, ldx, m, y, ldy);
#else
    (void)w; (void)scale; (void)n; (void)k; (void)x; (void)ldx; (void)m; (void)y; (void)ldy;
    return 1;
#endif
}
