/* Small CPU inference kernels: attention over packed sequences of different lengths
 * (encoders), the attention of a batch-1 decode step, and the step's row norm.
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

/* The second part, for query head h: softmax(q_h K^T scale) V over keys 0..T-1 of its key/value
 * head, into out + h D; s: room for T scores. Heads are independent: callers may split them
 * over threads. */
void lmf_attention_head(int h, const float *q, int H, int Hkv, int D, const float *kc, const float *vc,
                        long head_stride, int T, float scale, float *s, float *out) {
    const int g = h / (H / Hkv);
    const float *k = kc + (long)g * head_stride, *v = vc + (long)g * head_stride, *qh = q + (long)h * D;
    float m = -INFINITY;
    if (D % W == 0) {
        for (int j = 0; j < T; j++) {
            const float *kj = k + (long)j * D;
            vf acc = splat(0.0f);
            for (int d = 0; d < D; d += W) acc += loadu(qh + d) * loadu(kj + d);
            s[j] = hsum(acc) * scale;
            m = s[j] > m ? s[j] : m;
        }
    } else {
        for (int j = 0; j < T; j++) {
            const float *kj = k + (long)j * D;
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += qh[d] * kj[d];
            s[j] = dot * scale;
            m = s[j] > m ? s[j] : m;
        }
    }
    float sum = 0.0f;
    int j = 0;
    for (; j + W <= T; j += W) {
        vf e = vexp(loadu(s + j) - splat(m));
        storeu(s + j, e);
        sum += hsum(e);
    }
    for (; j < T; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    const float inv = 1.0f / sum;
    float *o = out + (long)h * D;
    if (D % W == 0 && D <= 8 * W) { /* the output row in registers */
        vf acc[8];
        const int nv = D / W;
        for (int c = 0; c < nv; c++) acc[c] = splat(0.0f);
        for (j = 0; j < T; j++) {
            const vf p = splat(s[j]);
            const float *vj = v + (long)j * D;
            for (int c = 0; c < nv; c++) acc[c] += p * loadu(vj + c * W);
        }
        for (int c = 0; c < nv; c++) storeu(o + c * W, acc[c] * splat(inv));
    } else {
        for (int d = 0; d < D; d++) o[d] = 0.0f;
        for (j = 0; j < T; j++) {
            const float p = s[j] * inv, *vj = v + (long)j * D;
            for (int d = 0; d < D; d++) o[d] += p * vj[d];
        }
    }
}

/* The attention of a decode step of B sequences, each at its own position, called by every
 * thread of a parallel region (or outside one, by one thread): row b's q/k/v at
 * qkv + b qkv_stride, its rotary (cos, sin) at + b rope_stride (0: one for all rows; NULL: no
 * rotation), its cache at kc/vc + b batch_stride (heads head_stride apart), written at pos[b];
 * out [B][H D]. The rows are rotated and written by one thread, then every (row, head) pair is
 * independent and they are shared out. q: room for B H D floats; scores: B H most, most at
 * least every pos[b] + 1. Ends in a barrier. */
static void attention_rows_in(const float *qkv, int B, long qkv_stride, int H, int Hkv, int D, const float *cos,
                              const float *sin, long rope_stride, float *kc, float *vc, long batch_stride,
                              long head_stride, const int *pos, int most, float scale, float *q, float *scores,
                              float *out) {
#pragma omp single
    for (int b = 0; b < B; b++)
        lmf_attention_prepare(qkv + b * qkv_stride, H, Hkv, D, cos ? cos + b * rope_stride : NULL,
                              sin ? sin + b * rope_stride : NULL, kc + b * batch_stride, vc + b * batch_stride,
                              head_stride, pos[b], q + (long)b * H * D);
    if (B == 1) { /* one row: heads in blocks, neighbours sharing a key head on one thread */
#pragma omp for schedule(static)
        for (int h = 0; h < H; h++)
            lmf_attention_head(h, q, H, Hkv, D, kc, vc, head_stride, pos[0] + 1, scale, scores + (long)h * most, out);
    } else { /* rows of different lengths: pairs handed out one at a time */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < B * H; i++) {
            const int b = i / H;
            lmf_attention_head(i % H, q + (long)b * H * D, H, Hkv, D, kc + b * batch_stride, vc + b * batch_stride,
                               head_stride, pos[b] + 1, scale, scores + (long)i * most, out + (long)b * H * D);
        }
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
    float *buf = malloc(((size_t)B * H * D + (size_t)B * H * most) * sizeof(float));
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
