/* Small CPU kernels: attention over packed sequences of different lengths (encoders), the
 * attention of a batch-1 decode step, and the step's row norm; a bf16 prefill's passes between
 * its products (q/k/v preparation, SwiGLU) and a bf16 vocabulary head's cross-entropy.
 *
 * lmf_varlen_attention: one (sequence, head) pair at a time.
 *
 * Why this exists: PyTorch's CPU attention kernels are tiled for long sequences. On the
 * short sentences an embedding model reads (20-60 tokens, head size 32) they spend most of
 * each (sequence, head) pair setting up small matrix products: about 8 us for some 60k
 * multiply-adds that take well under 1 us in registers. This file does the whole pair in
 * one function: K transposed into a small buffer once, scores for four queries at a time
 * held in 16-wide vectors, softmax with a vector exp, and P.V accumulated in registers.
 *
 * Layout (what lmforge/model/cpu_ops.py passes):
 *   qkv  [N, row_stride] float32, each token's row holds H query heads, then Hkv key heads,
 *        then Hkv value heads, D floats each (the fused q/k/v product of the model);
 *   offsets [batch + 1]: sequence b owns rows offsets[b] .. offsets[b+1]-1;
 *   out  [N, out_stride] float32, H heads of D floats per row.
 * Queries of head h read key/value head h / (H / Hkv) (grouped-query attention).
 *
 * Vectors are GCC/Clang vector extensions of 16 floats: one AVX-512 register, two AVX2
 * registers; the compiler picks the instructions for the CPU it is built on (-march=native).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));

#define W 16
#define QB 4 /* queries per block */

static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vf loadu(const float *p) { return *(const vfu *)p; }
static inline void storeu(float *p, vf x) { *(vfu *)p = x; }

/* exp(x) for x <= 0 (softmax after subtracting the row's maximum): 2^n * p(r) with
 * x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 polynomial; relative error ~2e-7. Inputs below
 * -87 give 0. */
static inline vf vexp(vf x) {
    const vf lo = splat(-87.0f);
    vi under = x < lo;
    x = (vf)((vi)x & ~under) + (vf)((vi)lo & under);
    vf n = x * splat(1.44269504088896341f);
    /* round to nearest: add and subtract 1.5 * 2^23 */
    const vf magic = splat(12582912.0f);
    n = (n + magic) - magic;
    vf r = x - n * splat(0.693145751953125f) - n * splat(1.42860682030941723212e-6f);
    vf p = splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf y = p * (vf)e;
    return (vf)((vi)y & ~under);
}

static inline vf vmax(vf a, vf b) {
    vi c = a > b;
    return (vf)(((vi)a & c) | ((vi)b & ~c));
}

static inline float hmax(vf x) {
    float m = x[0];
    for (int i = 1; i < W; i++) m = x[i] > m ? x[i] : m;
    return m;
}

typedef float vh __attribute__((vector_size(32)));
typedef float vq __attribute__((vector_size(16)));

static inline float hsum(vf x) { /* halves added: 16 -> 8 -> 4 lanes, then four scalars */
    vh a, b;
    memcpy(&a, &x, sizeof a);
    memcpy(&b, (const char *)&x + sizeof a, sizeof b);
    a += b;
    vq c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (const char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* One (sequence, head) pair. q0: the first query row (rows `stride` floats apart); kt: the
 * head's keys transposed, D rows of tp floats (tp = T rounded up to W, zeros past T); v0: its
 * values as T contiguous rows of D floats; s: scratch of QB * tp floats. D is a compile-time constant in each specialization below,
 * so the loops over it unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend_pair(const float *q0, const float *kt, const float *v0,
                                                              long stride, int T, const int D, int causal, float scale,
                                                              float *o0, long ostride, float *s) {
    const int tp = (T + W - 1) / W * W;
    const vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vf ninf = splat(-INFINITY);
    for (int i0 = 0; i0 < T; i0 += QB) {
        const int nq = T - i0 < QB ? T - i0 : QB;
        /* keys this block needs: all, or up to its last query when causal */
        const int tk = causal ? i0 + nq : T;
        const int nb = (tk + W - 1) / W;
        float qs[QB][D];
        for (int r = 0; r < QB; r++)
            for (int d = 0; d < D; d++) qs[r][d] = r < nq ? q0[(long)(i0 + r) * stride + d] * scale : 0.0f;
        int b = 0;
        for (; b + 1 < nb; b += 2) { /* two key blocks, four queries: eight independent sums */
            vf a[QB][2];
            for (int r = 0; r < QB; r++) a[r][0] = a[r][1] = splat(0.0f);
            const float *col = kt + b * W;
            for (int d = 0; d < D; d++) {
                vf k0v = *(const vf *)(col + (long)d * tp), k1v = *(const vf *)(col + (long)d * tp + W);
                for (int r = 0; r < QB; r++) {
                    vf qd = splat(qs[r][d]);
                    a[r][0] += qd * k0v;
                    a[r][1] += qd * k1v;
                }
            }
            for (int r = 0; r < QB; r++) {
                *(vf *)(s + r * tp + b * W) = a[r][0];
                *(vf *)(s + r * tp + b * W + W) = a[r][1];
            }
        }
        if (b < nb) {
            vf a[QB];
            for (int r = 0; r < QB; r++) a[r] = splat(0.0f);
            const float *col = kt + b * W;
            for (int d = 0; d < D; d++) {
                vf kv = *(const vf *)(col + (long)d * tp);
                for (int r = 0; r < QB; r++) a[r] += splat(qs[r][d]) * kv;
            }
            for (int r = 0; r < QB; r++) *(vf *)(s + r * tp + b * W) = a[r];
        }
        float inv[QB] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int r = 0; r < nq; r++) {
            float *sr = s + (long)r * tp;
            const int valid = causal ? i0 + r + 1 : T;
            /* keys at or past `valid` (padding, or the future) get -inf */
            vf m = ninf;
            for (int c = 0; c < nb; c++) {
                vi keep = (iota + c * W) < valid;
                vf x = (vf)(((vi)*(vf *)(sr + c * W) & keep) | ((vi)ninf & ~keep));
                *(vf *)(sr + c * W) = x;
                m = vmax(m, x);
            }
            vf mx = splat(hmax(m)), sum = splat(0.0f);
            for (int c = 0; c < nb; c++) {
                vf e = vexp(*(vf *)(sr + c * W) - mx);
                *(vf *)(sr + c * W) = e;
                sum += e;
            }
            inv[r] = 1.0f / hsum(sum);
        }
        /* out rows = P V: each value row is read once for the block's four queries */
        vf o[QB][D / W];
        for (int r = 0; r < QB; r++)
            for (int c = 0; c < D / W; c++) o[r][c] = splat(0.0f);
        for (int j = 0; j < tk; j++) {
            const float *vj = v0 + (long)j * D;
            for (int c = 0; c < D / W; c++) {
                vf vv = loadu(vj + c * W);
                for (int r = 0; r < QB; r++) o[r][c] += splat(s[r * tp + j]) * vv;
            }
        }
        for (int r = 0; r < nq; r++)
            for (int c = 0; c < D / W; c++) storeu(o0 + (long)(i0 + r) * ostride + c * W, o[r][c] * splat(inv[r]));
    }
}

#define SPECIALIZE(DIM)                                                                                      \
    static void attend_pair_##DIM(const float *q0, const float *kt, const float *v0, long stride, int T,    \
                                  int causal, float scale, float *o0, long ostride, float *s) {             \
        attend_pair(q0, kt, v0, stride, T, DIM, causal, scale, o0, ostride, s);                             \
    }
SPECIALIZE(16)
SPECIALIZE(32)
SPECIALIZE(48)
SPECIALIZE(64)

typedef void (*pair_fn)(const float *, const float *, const float *, long, int, int, float, float *, long, float *);

/* Returns 0 on success, 1 for a head size this kernel does not take (D % 16 or D > 64),
 * 2 when scratch memory could not be had. */
int lmf_varlen_attention(const float *qkv, long row_stride, const int64_t *offsets, int batch, int H, int Hkv,
                         int D, int causal, float scale, float *out, long out_stride) {
    if (D % W != 0 || D > 64 || H % Hkv != 0) return 1;
    int maxlen = 0;
    for (int b = 0; b < batch; b++) {
        int t = (int)(offsets[b + 1] - offsets[b]);
        maxlen = t > maxlen ? t : maxlen;
    }
    const long tp = (maxlen + W - 1) / W * W;
    const int group = H / Hkv;
    const pair_fn fn = D == 16 ? attend_pair_16 : D == 32 ? attend_pair_32 : D == 48 ? attend_pair_48 : attend_pair_64;
    int failed = 0;
    /* One task per sequence. Its rows are contiguous; while a thread works on one sequence it
     * asks the cache for the rows of the next sequence it will take (static interleaved
     * schedule: b, b + threads, ...), so that the strided reads of q, k and v find them there.
     * Each key head is transposed just before its query heads use it (D x tp floats, in L1). */
#pragma omp parallel reduction(| : failed)
    {
        float *kt = aligned_alloc(64, (size_t)(2 * D * tp + QB * tp) * sizeof(float));
        if (!kt) {
            failed = 1;
        } else {
            float *vc = kt + (long)D * tp, *s = vc + (long)D * tp;
            int threads = 1;
#ifdef _OPENMP
            threads = omp_get_num_threads();
#endif
#pragma omp for schedule(static, 1)
            for (int b = 0; b < batch; b++) {
                if (b + threads < batch) {
                    const char *next = (const char *)(qkv + offsets[b + threads] * row_stride);
                    const long bytes = (offsets[b + threads + 1] - offsets[b + threads]) * row_stride * (long)sizeof(float);
                    for (long x = 0; x < bytes; x += 64) __builtin_prefetch(next + x, 0, 2);
                }
                const long start = offsets[b];
                const int T = (int)(offsets[b + 1] - start);
                if (T <= 0) continue;
                const int tpb = (T + W - 1) / W * W;
                const float *base = qkv + start * row_stride;
                for (int h = 0; h < H; h++) {
                    const int g = h / group;
                    if (h % group == 0) {
                        const float *k = base + (long)(H + g) * D, *v = base + (long)(H + Hkv + g) * D;
                        for (int j = 0; j < T; j++) {
                            for (int d = 0; d < D; d++) kt[(long)d * tpb + j] = k[(long)j * row_stride + d];
                            memcpy(vc + (long)j * D, v + (long)j * row_stride, D * sizeof(float));
                        }
                        for (int d = 0; d < D; d++)
                            for (int j = T; j < tpb; j++) kt[(long)d * tpb + j] = 0.0f;
                    }
                    fn(base + (long)h * D, kt, vc, row_stride, T, causal, scale,
                       out + start * out_stride + (long)h * D, out_stride, s);
                }
            }
            free(kt);
        }
    }
    return failed ? 2 : 0;
}

/* The first part of a decode step's attention: q rotated into q_out [H D], k rotated into the
 * cache at `pos`, v copied there. */
void lmf_attention_prepare(const float *qkv, int H, int Hkv, int D, const float *cos, const float *sin, float *kc,
                           float *vc, long head_stride, int pos, float *q_out) {
    const int half = D / 2;
    for (int h = 0; h < H + Hkv; h++) {
        const float *x = qkv + (long)h * D;
        float *dst = h < H ? q_out + (long)h * D : kc + (long)(h - H) * head_stride + (long)pos * D;
        if (cos) {
            for (int i = 0; i < half; i++) {
                dst[i] = x[i] * cos[i] - x[i + half] * sin[i];
                dst[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
            }
        } else {
            memcpy(dst, x, (size_t)D * sizeof(float));
        }
    }
    for (int g = 0; g < Hkv; g++)
        memcpy(vc + (long)g * head_stride + (long)pos * D, qkv + (long)(H + Hkv + g) * D, (size_t)D * sizeof(float));
}

/* The second part, over keys j0..j1-1 of key/value head g, for n consecutive query heads of its
 * group (qh: the first one's D floats, the others D apart): each head's scores q k^T scale, their
 * exponentials against the head's own maximum, and the sum of value rows they weight. The n heads
 * read every key and value row once together: a group's heads reading the cache one by one made a
 * long-context step of a three-heads-a-group model read it three times. s[r]: room for j1 - j0
 * scores of head r, rounded up to whole vectors. Out per head: m[r] (its maximum), l[r] (the sum
 * of its exponentials) and o[r D .. r D + D) (the value rows' sum, not yet divided by l[r]).
 * NV: D / W, a constant where inlined. */
static inline __attribute__((always_inline)) void attention_part_v(const float *qh, const int n, const int NV,
                                                                   const float *k, const float *v, int j0, int j1,
                                                                   float scale, float *const *s, float *m, float *l,
                                                                   float *o) {
    const int D = NV * W, T = j1 - j0, T16 = (T + W - 1) / W * W;
    vf q[4][8], acc[4][8];
    float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < n; r++)
        for (int c = 0; c < NV; c++) q[r][c] = loadu(qh + (long)r * D + c * W);
    for (int j = 0; j < T; j++) {
        const float *kj = k + (long)(j0 + j) * D;
        vf kv[8];
        for (int c = 0; c < NV; c++) kv[c] = loadu(kj + c * W);
        for (int r = 0; r < n; r++) {
            vf a = splat(0.0f);
            for (int c = 0; c < NV; c++) a += q[r][c] * kv[c];
            const float x = hsum(a) * scale;
            s[r][j] = x;
            mx[r] = x > mx[r] ? x : mx[r];
        }
    }
    for (int r = 0; r < n; r++) {
        float *sr = s[r];
        for (int i = T; i < T16; i++) sr[i] = -INFINITY; /* exp gives 0: whole vectors to the end */
        vf e_sum = splat(0.0f);
        for (int i = 0; i < T16; i += W) {
            vf e = vexp(loadu(sr + i) - splat(mx[r]));
            storeu(sr + i, e);
            e_sum += e;
        }
        sum[r] = hsum(e_sum);
        for (int c = 0; c < NV; c++) acc[r][c] = splat(0.0f);
    }
    for (int j = 0; j < T; j++) {
        const float *vj = v + (long)(j0 + j) * D;
        vf vv[8];
        for (int c = 0; c < NV; c++) vv[c] = loadu(vj + c * W);
        for (int r = 0; r < n; r++) {
            const vf p = splat(s[r][j]);
            for (int c = 0; c < NV; c++) acc[r][c] += p * vv[c];
        }
    }
    for (int r = 0; r < n; r++) {
        m[r] = mx[r];
        l[r] = sum[r];
        for (int c = 0; c < NV; c++) storeu(o + (long)r * D + c * W, acc[r][c]);
    }
}

/* The same for any head size, one head after another in scalar loops. */
static void attention_part_any(const float *qh, int n, int D, const float *k, const float *v, int j0, int j1,
                               float scale, float *const *s, float *m, float *l, float *o) {
    for (int r = 0; r < n; r++) {
        const float *qr = qh + (long)r * D;
        float mx = -INFINITY, sum = 0.0f, *orow = o + (long)r * D;
        for (int j = j0; j < j1; j++) {
            const float *kj = k + (long)j * D;
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += qr[d] * kj[d];
            s[r][j - j0] = dot * scale;
            mx = s[r][j - j0] > mx ? s[r][j - j0] : mx;
        }
        for (int d = 0; d < D; d++) orow[d] = 0.0f;
        for (int j = j0; j < j1; j++) {
            const float p = expf(s[r][j - j0] - mx), *vj = v + (long)j * D;
            sum += p;
            for (int d = 0; d < D; d++) orow[d] += p * vj[d];
        }
        m[r] = mx;
        l[r] = sum;
    }
}

static void attention_part(const float *qh, int n, int D, const float *k, const float *v, int j0, int j1, float scale,
                           float *const *s, float *m, float *l, float *o) {
#define LMF_PART(N, NV) attention_part_v(qh, N, NV, k, v, j0, j1, scale, s, m, l, o)
#define LMF_PARTS(NV) switch (n) { case 1: LMF_PART(1, NV); return; case 2: LMF_PART(2, NV); return; \
                                   case 3: LMF_PART(3, NV); return; default: LMF_PART(4, NV); return; }
    if (D == 2 * W) LMF_PARTS(2)
    if (D == 4 * W) LMF_PARTS(4)
    if (D == 8 * W) LMF_PARTS(8)
#undef LMF_PARTS
#undef LMF_PART
    attention_part_any(qh, n, D, k, v, j0, j1, scale, s, m, l, o);
}

/* Keys are taken in parts of ATT_PART: (row, key head, part, up to ATT_HEADS of its query heads)
 * is one task, and a row's parts are combined afterwards by their maxima and sums (the split
 * softmax of flash-decoding). How a row's keys are split depends on its length only, never on the
 * batch or the threads, so a row's result is the same in any batch. */
#define ATT_PART 256
#define ATT_HEADS 4
#define ATT_MAX_D 256 /* wider heads take one head at a time */

/* Parts of ATT_PART keys that `keys` keys make. */
static inline int attention_parts(int keys) { return (keys + ATT_PART - 1) / ATT_PART; }

/* Floats of scores each (row, query head) needs for caches of up to `most` keys: whole parts,
 * each of which also holds its part's maximum, sum and output sum once its scores are spent. */
static inline long attention_stride(int most) { return (long)attention_parts(most) * ATT_PART; }

/* The attention of a decode step of B sequences, each at its own position, called by every
 * thread of a parallel region (or outside one, by one thread): row b's q/k/v at
 * qkv + b qkv_stride, its rotary (cos, sin) at + b rope_stride (0: one for all rows; NULL: no
 * rotation), its cache at kc/vc + b batch_stride (heads head_stride apart), written at pos[b];
 * out [B][H D]. Each row is rotated and written by one thread; then the tasks above are shared
 * out; then rows of several parts are combined. q: room for B H D floats; scores:
 * B H attention_stride(most) floats, most at least every pos[b] + 1. Ends in a barrier. */
static void attention_rows_in(const float *qkv, int B, long qkv_stride, int H, int Hkv, int D, const float *cos,
                              const float *sin, long rope_stride, float *kc, float *vc, long batch_stride,
                              long head_stride, const int *pos, int most, float scale, float *q, float *scores,
                              float *out) {
    const int G = H / Hkv, wide = D > ATT_MAX_D, per = wide ? 1 : ATT_HEADS, chunks = (G + per - 1) / per;
    const int parts = attention_parts(most), split = parts > 1 && D + 2 <= ATT_PART;
    const long stride = attention_stride(most);
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++)
        lmf_attention_prepare(qkv + b * qkv_stride, H, Hkv, D, cos ? cos + b * rope_stride : NULL,
                              sin ? sin + b * rope_stride : NULL, kc + b * batch_stride, vc + b * batch_stride,
                              head_stride, pos[b], q + (long)b * H * D);
    const int per_row = Hkv * chunks * (split ? parts : 1);
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < B * per_row; i++) {
        const int b = i / per_row, rest = i % per_row, T = pos[b] + 1, row_parts = attention_parts(T);
        const int p = split ? rest % parts : 0, gc = split ? rest / parts : rest;
        if (p >= row_parts) continue; /* a shorter row than the longest */
        const int g = gc / chunks, h0 = g * G + gc % chunks * per, n = g * G + G - h0 < per ? g * G + G - h0 : per;
        const int own = split && row_parts > 1; /* this part is combined with the row's others */
        const int j0 = p * ATT_PART, j1 = own && j0 + ATT_PART < T ? j0 + ATT_PART : T;
        float *s[ATT_HEADS], m[ATT_HEADS], l[ATT_HEADS], o[ATT_HEADS * ATT_MAX_D];
        const float *kg = kc + b * batch_stride + g * head_stride, *vg = vc + b * batch_stride + g * head_stride;
        for (int r = 0; r < n; r++) s[r] = scores + ((long)b * H + h0 + r) * stride + j0;
        float *os = wide ? out + ((long)b * H + h0) * D : o; /* one wide head: its sum in place */
        attention_part(q + ((long)b * H + h0) * D, n, D, kg, vg, j0, j1, scale, s, m, l, os);
        for (int r = 0; r < n; r++) {
            if (own) { /* kept for the combination below */
                s[r][0] = m[r];
                s[r][1] = l[r];
                memcpy(s[r] + 2, os + (long)r * D, (size_t)D * sizeof(float));
            } else {
                float *y = out + ((long)b * H + h0 + r) * D;
                const float inv = 1.0f / l[r];
                for (int d = 0; d < D; d++) y[d] = os[(long)r * D + d] * inv;
            }
        }
    }
    if (!split) return;
#pragma omp for schedule(static)
    for (int i = 0; i < B * H; i++) {
        const int row_parts = attention_parts(pos[i / H] + 1);
        if (row_parts < 2) continue;
        const float *s = scores + (long)i * stride;
        float mx = -INFINITY, sum = 0.0f, *y = out + (long)i * D;
        for (int p = 0; p < row_parts; p++) mx = s[(long)p * ATT_PART] > mx ? s[(long)p * ATT_PART] : mx;
        for (int d = 0; d < D; d++) y[d] = 0.0f;
        for (int p = 0; p < row_parts; p++) {
            const float *part = s + (long)p * ATT_PART, w = expf(part[0] - mx);
            sum += w * part[1];
            for (int d = 0; d < D; d++) y[d] += w * part[2 + d];
        }
        const float inv = 1.0f / sum;
        for (int d = 0; d < D; d++) y[d] *= inv;
    }
}

/* `attention_rows_in` in its own parallel region, once the caches are long enough to pay for
 * waking the threads. Returns 1 for shapes it does not take, 2 when its buffer cannot be had. */
int lmf_decode_attention_rows(const float *qkv, int B, long qkv_stride, int H, int Hkv, int D, const float *cos,
                              const float *sin, long rope_stride, float *kc, float *vc, long batch_stride,
                              long head_stride, const int *pos, float scale, float *out) {
    if (H % Hkv != 0 || D % 2 != 0 || B < 1) return 1;
    int most = 0;
    long work = 0;
    for (int b = 0; b < B; b++) {
        if (pos[b] < 0) return 1;
        most = pos[b] + 1 > most ? pos[b] + 1 : most;
        work += (long)(pos[b] + 1) * H;
    }
    float *buf = malloc(((size_t)B * H * D + (size_t)B * H * attention_stride(most)) * sizeof(float));
    if (!buf) return 2;
#pragma omp parallel if (work >= 4096)
    attention_rows_in(qkv, B, qkv_stride, H, Hkv, D, cos, sin, rope_stride, kc, vc, batch_stride, head_stride, pos,
                      most, scale, buf, buf + (long)B * H * D, out);
    free(buf);
    return 0;
}

/* One decode step of one sequence: the new token's q/k/v row in, its attention output out.
 *
 * Does what the step's PyTorch path does in some twenty operations a layer: rotates q and k
 * (pairs (x[i], x[i + D/2]) by cos/sin, when given), writes k and v into the cache at
 * position `pos`, and attends from every query head to keys 0..pos of its key/value head.
 *   qkv    [(H + 2 Hkv) D]: H query heads, then Hkv key heads, then Hkv value heads;
 *   cos/sin [D] for position pos, or NULL (no rotation);
 *   kc/vc  this layer's cache of this sequence: Hkv heads, `head_stride` floats apart, rows of D;
 *   out    [H D].
 * The one-row case of lmf_decode_attention_rows; returns 2 when its buffer cannot be had. */
int lmf_decode_attention(const float *qkv, int H, int Hkv, int D, const float *cos, const float *sin, float *kc,
                         float *vc, long head_stride, int pos, float scale, float *out) {
    return lmf_decode_attention_rows(qkv, 1, 0, H, Hkv, D, cos, sin, 0, kc, vc, 0, head_stride, &pos, scale, out);
}

/* RMS norm of `rows` rows of n floats: out = x / sqrt(mean(x^2) + eps) * w. */
void lmf_rms_norm(const float *x, const float *w, int rows, int n, float eps, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * n;
        float *o = out + (long)r * n;
        double ss = 0.0;
        int i = 0;
        vf acc = splat(0.0f);
        for (; i + W <= n; i += W) {
            vf v = loadu(xr + i);
            acc += v * v;
        }
        ss = hsum(acc);
        for (; i < n; i++) ss += (double)xr[i] * xr[i];
        const float inv = 1.0f / sqrtf((float)(ss / n) + eps);
        i = 0;
        for (; i + W <= n; i += W) storeu(o + i, loadu(xr + i) * splat(inv) * loadu(w + i));
        for (; i < n; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* RMS norm of many rows (a prompt's), the rows split over the threads. */
void lmf_rms_norm_rows(const float *x, const float *w, int rows, int n, float eps, float *out) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++) lmf_rms_norm(x + (long)r * n, w, 1, n, eps, out + (long)r * n);
}

/* float32 -> bfloat16, rounded to nearest even as PyTorch rounds (NaN stays a quiet NaN). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* bfloat16 -> float32: exact (bf16 is float32's upper half). */
static inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A prompt's attention inputs, in one pass over its q/k/v product: for row b's token t (at
 * position pos0 + t), every query head rotated and written as bf16 into q_out [B, H, L, D], every
 * key head rotated, every value head as is, each written into the float32 cache (kc/vc: this
 * layer's, row b at b * cache_row_stride, head g at g * head_stride, position p at p * D; NULL:
 * no cache) and as bf16 into k_out / v_out [B, Hkv, L, D]. qkv: [B * L] rows of row_stride
 * values (H, then Hkv, then Hkv heads of D; at most 4096), float32, or bf16 with qkv_bf16.
 * cos / sin: [L, D] for positions pos0.., or NULL (no rotation). Rotation pairs x[i] with x[i + D/2], as the model's apply_rotary does. */
void lmf_prefill_prepare(const void *qkv, int qkv_bf16, long row_stride, int B, int L, int H, int Hkv, int D,
                         const float *cos, const float *sin, float *kc, float *vc, long cache_row_stride,
                         long head_stride, int pos0, uint16_t *q_out, uint16_t *k_out, uint16_t *v_out) {
    const int half = D / 2;
#pragma omp parallel for schedule(static) if ((long)B * L >= 64)
    for (long bt = 0; bt < (long)B * L; bt++) {
        const long b = bt / L, t = bt % L;
        const float *c = cos ? cos + t * D : NULL, *s = sin ? sin + t * D : NULL;
        float wide[4096], rot[256];
        const int width = (H + 2 * Hkv) * D;
        const float *row;
        if (qkv_bf16) { /* a bf16 product's row, widened once (exactly) */
            const uint16_t *r16 = (const uint16_t *)qkv + bt * row_stride;
            for (int i = 0; i < width; i++) wide[i] = from_bf16(r16[i]);
            row = wide;
        } else {
            row = (const float *)qkv + bt * row_stride;
        }
        for (int h = 0; h < H + 2 * Hkv; h++) {
            const float *x = row + (long)h * D;
            const float *src = x;
            if (c && h < H + Hkv) {
                for (int i = 0; i < half; i++) {
                    rot[i] = x[i] * c[i] - x[i + half] * s[i];
                    rot[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
                }
                src = rot;
            }
            uint16_t *dst;
            if (h < H) {
                dst = q_out + ((b * H + h) * L + t) * D;
            } else {
                const int g = h < H + Hkv ? h - H : h - H - Hkv;
                float *cache = h < H + Hkv ? kc : vc;
                if (cache) memcpy(cache + b * cache_row_stride + g * head_stride + (pos0 + t) * (long)D, src,
                                  (size_t)D * sizeof(float));
                dst = (h < H + Hkv ? k_out : v_out) + ((b * Hkv + g) * L + t) * D;
            }
            for (int i = 0; i < D; i++) dst[i] = to_bf16(src[i]);
        }
    }
}

typedef uint16_t vbh __attribute__((vector_size(32)));
typedef uint16_t vbhu __attribute__((vector_size(32), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(64)));

static inline vf load_bf16(const uint16_t *p) {
    return (vf)(__builtin_convertvector(*(const vbhu *)p, vu) << 16);
}

static inline void store_bf16(uint16_t *p, vf x) { /* rounded to nearest even */
    vu u = (vu)x;
    u += 0x7fffu + ((u >> 16) & 1u);
    *(vbhu *)p = __builtin_convertvector(u >> 16, vbh);
}

/* SwiGLU's activation on a bf16 feed-forward product: for each of `rows` rows of h (row_stride
 * values apart; the gate's n values, then the up projection's n), out = silu(gate) * up in
 * bf16 [rows, n], computed in float32 and rounded once. silu(g) = g / (1 + exp(-g)), with the
 * exponential taken of -|g| so that it never overflows. */
void lmf_silu_mul_bf16(const uint16_t *h, long rows, int n, long row_stride, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows >= 16)
    for (long r = 0; r < rows; r++) {
        const uint16_t *gate = h + r * row_stride, *up = gate + n;
        uint16_t *o = out + r * n;
        int i = 0;
        for (; i + W <= n; i += W) {
            vf g = load_bf16(gate + i), u = load_bf16(up + i);
            vi neg = g < splat(0.0f);
            vf a = (vf)((vi)g & ~neg) + (vf)((vi)(-g) & neg); /* |g| */
            vf e = vexp(-a);
            vf num = (vf)((vi)splat(1.0f) & ~neg) + (vf)((vi)e & neg); /* 1, or e for g < 0 */
            store_bf16(o + i, g * u * num / (splat(1.0f) + e));
        }
        for (; i < n; i++) {
            const float g = from_bf16(gate[i]), u = from_bf16(up[i]);
            o[i] = to_bf16(g * u / (1.0f + expf(-g)));
        }
    }
}

/* Cross-entropy of `rows` rows of logits (row_stride values apart; float32, or bf16 with
 * logits_bf16) against their targets, and its gradient. Per row: the loss
 * log(sum_j exp(x_j)) - x_target, computed against the row's maximum, into loss[r]; with
 * grad (same dtype as the logits, the same row_stride; may be the logits themselves) non-NULL,
 * d(scale * loss)/dx = scale * (softmax(x) - onehot(target)) written into it. One read of the row
 * for its maximum, one for the sum of exponentials, one to write the gradient: the row (at most a
 * vocabulary's 2^17 values) stays in cache between them. */
int lmf_cross_entropy_rows(const void *logits, int logits_bf16, long rows, int V, long row_stride,
                           const int64_t *targets, float scale, float *loss, void *grad) {
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (rows >= 4)
    for (long r = 0; r < rows; r++) {
        const int64_t t = targets[r];
        if (t < 0 || t >= V) {
            bad = 1;
            continue;
        }
        const float *xf = logits_bf16 ? NULL : (const float *)logits + r * row_stride;
        const uint16_t *xh = logits_bf16 ? (const uint16_t *)logits + r * row_stride : NULL;
#define X_VEC(j) (xh ? load_bf16(xh + (j)) : loadu(xf + (j)))
#define X_AT(j) (xh ? from_bf16(xh[j]) : xf[j])
        int j = 0;
        vf vmx = splat(-INFINITY);
        for (; j + W <= V; j += W) {
            vf x = X_VEC(j);
            vi gt = x > vmx;
            vmx = (vf)(((vi)x & gt) | ((vi)vmx & ~gt));
        }
        float mx = -INFINITY;
        for (int i = 0; i < W; i++) mx = vmx[i] > mx ? vmx[i] : mx;
        for (; j < V; j++) mx = X_AT(j) > mx ? X_AT(j) : mx;
        vf vs = splat(0.0f);
        float tail = 0.0f;
        for (j = 0; j + W <= V; j += W) vs += vexp(X_VEC(j) - splat(mx));
        for (; j < V; j++) tail += expf(X_AT(j) - mx);
        const float sum = hsum(vs) + tail, xt = X_AT(t);
        loss[r] = logf(sum) + mx - xt;
        if (!grad) continue;
        const float k = scale / sum;
        float *gf = logits_bf16 ? NULL : (float *)grad + r * row_stride;
        uint16_t *gh = logits_bf16 ? (uint16_t *)grad + r * row_stride : NULL;
        /* the target's value first: the gradient may overwrite the logits */
        const float gt_value = expf(xt - mx) * k - scale;
        for (j = 0; j + W <= V; j += W) {
            vf p = vexp(X_VEC(j) - splat(mx)) * splat(k);
            if (gh) store_bf16(gh + j, p); else storeu(gf + j, p);
        }
        for (; j < V; j++) {
            const float p = expf(X_AT(j) - mx) * k;
            if (gh) gh[j] = to_bf16(p); else gf[j] = p;
        }
        if (gh) gh[t] = to_bf16(gt_value); else gf[t] = gt_value;
#undef X_VEC
#undef X_AT
    }
    return bad;
}
