/* One pre-norm decoder layer of a batch-1 decode step in one call, with 4-bit weights
 * (lmf_q4_decode_layer) or float32 ones (lmf_f32_decode_layer), and the float32
 * matrix-vector product both use (lmf_f32_gemv).
 *
 * The same arithmetic as the layer's modules run one by one (RMS norm, the int4 q/k/v
 * product, rotary + cache write + attention, the output product and residual add, RMS norm,
 * the gate/up product, SiLU(gate) * up, the down product and residual add), with the
 * kernels of quant_gemv.c and lmforge/model/kernels/cpu_ops.c: what it saves is the Python
 * and PyTorch bookkeeping between them, some forty operations a layer.
 */
#include "quant_gemv.c"
#include "../../model/kernels/cpu_ops.c"

/* SwiGLU's elements: m = SiLU(g) * u = g * sigmoid(g) * u, W lanes at a time, with the vector
 * exp of cpu_ops.c on -|g| (so its argument is never positive: sigmoid(g) = 1 / (1 + e) for
 * g >= 0, e / (1 + e) below, e = exp(-|g|)). A scalar expf per element took about 4% of a
 * 16-row step. The last n % W elements go through the same vector arithmetic in a padded copy,
 * so an element's value does not depend on where a span starts or ends (threads split the
 * elements differently for one row and for several). */
static inline vf vsilu_mul(vf g, vf u) {
    const vi below = g < splat(0.0f);
    const vf one = splat(1.0f), e = vexp((vf)((vi)g | (vi)splat(-0.0f)));
    const vf num = (vf)(((vi)e & below) | ((vi)one & ~below));
    return g * num / (one + e) * u;
}

static void silu_mul_span(const float *g, const float *u, float *m, int n) {
    int i = 0;
    for (; i + W <= n; i += W) storeu(m + i, vsilu_mul(loadu(g + i), loadu(u + i)));
    if (i < n) {
        float gt[W] = {0.0f}, ut[W] = {0.0f}, mt[W];
        memcpy(gt, g + i, (size_t)(n - i) * sizeof(float));
        memcpy(ut, u + i, (size_t)(n - i) * sizeof(float));
        storeu(mt, vsilu_mul(loadu(gt), loadu(ut)));
        memcpy(m + i, mt, (size_t)(n - i) * sizeof(float));
    }
}

/* The threads a parallel region started here gets (what quant_gemv.c's regions use). */
static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* x [d] (the residual stream, updated in place); scratch of at least
 * 2 d + (h + 2 hkv) hd + h hd + 3 inter floats. Returns 0, or what a kernel returned. */
int lmf_q4_decode_layer(float *x, int d, const float *attn_norm, const float *mlp_norm, float eps,
                        const uint8_t *qkv_w, const float *qkv_bias, const uint8_t *out_w, const uint8_t *fc_w,
                        const uint8_t *proj_w, int inter, int h, int hkv, int hd, const float *cos, const float *sin,
                        float *kc, float *vc, long head_stride, int pos, float *scratch) {
    const int nqkv = (h + 2 * hkv) * hd;
    float *hn = scratch, *delta = hn + d, *qkv = delta + d, *att = qkv + nqkv, *gu = att + (long)h * hd,
          *m = gu + 2L * inter;
    int code;
    lmf_rms_norm(x, attn_norm, 1, d, eps, hn);
    if ((code = lmf_q4_gemv(qkv_w, nqkv, d, hn, qkv))) return code;
    if (qkv_bias)
        for (int i = 0; i < nqkv; i++) qkv[i] += qkv_bias[i];
    if ((code = lmf_decode_attention(qkv, h, hkv, hd, cos, sin, kc, vc, head_stride, pos, 1.0f / sqrtf((float)hd), att)))
        return code;
    if ((code = lmf_q4_gemv(out_w, d, h * hd, att, delta))) return code;
    for (int i = 0; i < d; i++) x[i] += delta[i];
    lmf_rms_norm(x, mlp_norm, 1, d, eps, hn);
    if ((code = lmf_q4_gemv(fc_w, 2 * inter, d, hn, gu))) return code;
    silu_mul_span(gu, gu + inter, m, inter);
    if ((code = lmf_q4_gemv(proj_w, d, inter, m, delta))) return code;
    for (int i = 0; i < d; i++) x[i] += delta[i];
    return 0;
}

typedef struct {
    const float *attn_norm, *mlp_norm, *qkv_bias;
    const uint8_t *qkv_w, *out_w, *fc_w, *proj_w;
} lmf_q4_layer;

/* A whole batch-1 decode step of a pre-norm model with int4 layers: every layer as
 * lmf_q4_decode_layer (caches at k0/v0 + layer * layer_stride), the final RMS norm, and the head
 * into logits: head_bits 4 (packed int4 rows, n_head_rows of them), 8 (codes + 128 with a
 * float scale per row, head_scale) or 32 (float32 row-major). x: the token's embedding row,
 * changed. scratch: as lmf_q4_decode_layer's. */
int lmf_f32_gemv(const float *w, int colmajor, int n, int k, const float *x, const float *bias, float *y, int threads);

int lmf_q4_decode_model(float *x, int d, int n_layer, const lmf_q4_layer *layers, float eps, int inter, int h,
                        int hkv, int hd, const float *cos, const float *sin, float *k0, float *v0, long layer_stride,
                        long head_stride, int pos, const float *final_norm, float final_eps, int head_bits,
                        const void *head_w, const float *head_scale, int n_head_rows, float *logits,
                        float *scratch) {
    int code;
    for (int l = 0; l < n_layer; l++) {
        const lmf_q4_layer *L = layers + l;
        if ((code = lmf_q4_decode_layer(x, d, L->attn_norm, L->mlp_norm, eps, L->qkv_w, L->qkv_bias, L->out_w,
                                        L->fc_w, L->proj_w, inter, h, hkv, hd, cos, sin, k0 + l * layer_stride,
                                        v0 + l * layer_stride, head_stride, pos, scratch)))
            return code;
    }
    lmf_rms_norm(x, final_norm, 1, d, final_eps, scratch);
    if (head_bits == 4) return lmf_q4_gemv((const uint8_t *)head_w, n_head_rows, d, scratch, logits);
    if (head_bits == 8) return lmf_q8_gemv((const uint8_t *)head_w, head_scale, n_head_rows, d, scratch, logits);
    if (head_bits == 32) return lmf_f32_gemv((const float *)head_w, 0, n_head_rows, d, scratch, NULL, logits, max_threads());
    return 3;
}

/* ---- float32 ----------------------------------------------------------------------------
 * y = W x (+ bias) for one row x, W either row-major [n][k] or column-major (stored as its
 * transpose, [k][n], which is how lmforge keeps the wide matrices of a CPU decoding model:
 * lmforge/infer/layout.py). The threads split the output: row-major by blocks of four rows
 * (four dot products share each load of x), column-major by ranges of outputs, eight rows
 * of the transpose streaming through at a time. `threads` is explicit because the
 * caller's PyTorch may be set to one thread while this runs. */
static void f32_rows(const float *w, int k, const float *x, float *y, int r0, int r1) {
    /* one row at a time, front to back: the thread's rows are one contiguous block, read as a
     * single sequential stream (four rows side by side, sharing each load of x, made four
     * streams 2.3 KB apart and ran at half the speed) */
    for (int r = r0; r < r1; r++) {
        const float *wr = w + (long)r * k;
        vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
        int c = 0;
        for (; c + 4 * W <= k; c += 4 * W) {
            a0 += loadu(wr + c) * loadu(x + c);
            a1 += loadu(wr + c + W) * loadu(x + c + W);
            a2 += loadu(wr + c + 2 * W) * loadu(x + c + 2 * W);
            a3 += loadu(wr + c + 3 * W) * loadu(x + c + 3 * W);
        }
        for (; c + W <= k; c += W) a0 += loadu(wr + c) * loadu(x + c);
        float s = hsum((a0 + a1) + (a2 + a3));
        for (; c < k; c++) s += wr[c] * x[c];
        y[r] = s;
    }
}

static void f32_cols(const float *wt, int n, int k, const float *x, float *y, int c0, int c1) {
    /* eight rows of W^T at a time, front to back: eight sequential streams, and y (this
     * thread's share of the outputs) read and written once per eight rows */
    for (int c = c0; c < c1; c++) y[c] = 0.0f;
    int kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        const float *r0 = wt + (long)kk * n;
        const vf x0 = splat(x[kk]), x1 = splat(x[kk + 1]), x2 = splat(x[kk + 2]), x3 = splat(x[kk + 3]),
                 x4 = splat(x[kk + 4]), x5 = splat(x[kk + 5]), x6 = splat(x[kk + 6]), x7 = splat(x[kk + 7]);
        int c = c0;
        for (; c + W <= c1; c += W) {
            const float *p = r0 + c;
            vf acc = loadu(y + c);
            acc += x0 * loadu(p) + x1 * loadu(p + n) + x2 * loadu(p + 2L * n) + x3 * loadu(p + 3L * n);
            acc += x4 * loadu(p + 4L * n) + x5 * loadu(p + 5L * n) + x6 * loadu(p + 6L * n) + x7 * loadu(p + 7L * n);
            storeu(y + c, acc);
        }
        for (; c < c1; c++)
            for (int i = 0; i < 8; i++) y[c] += x[kk + i] * r0[(long)i * n + c];
    }
    for (; kk < k; kk++) {
        const float *row = wt + (long)kk * n;
        for (int c = c0; c < c1; c++) y[c] += x[kk] * row[c];
    }
}

/* Column-major with few outputs (k <= n <= KSPLIT_MAX): the threads split the k rows of W^T
 * instead, so each reads one contiguous block front to back, adding into its own partial y
 * (n floats, in L1), and the partials are summed after a barrier. Measured on two threads:
 * 960x576 19.7 -> 21.2 GB/s, 576x576 18.4 -> 20.9, 3072x576 unchanged; with k > n (the down
 * projection, 576x1536) it was slower (20.9 -> 18.0), so those keep the output split. */
#define KSPLIT_MAX 4096

static void f32_rows_of_t(const float *wt, int n, const float *x, float *p, int k0, int k1) {
    for (int c = 0; c < n; c++) p[c] = 0.0f;
    int kk = k0;
    for (; kk + 4 <= k1; kk += 4) {
        const float *r0 = wt + (long)kk * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
        const vf x0 = splat(x[kk]), x1 = splat(x[kk + 1]), x2 = splat(x[kk + 2]), x3 = splat(x[kk + 3]);
        int c = 0;
        for (; c + W <= n; c += W)
            storeu(p + c, loadu(p + c) + x0 * loadu(r0 + c) + x1 * loadu(r1 + c) + x2 * loadu(r2 + c) + x3 * loadu(r3 + c));
        for (; c < n; c++) p[c] += x[kk] * r0[c] + x[kk + 1] * r1[c] + x[kk + 2] * r2[c] + x[kk + 3] * r3[c];
    }
    for (; kk < k1; kk++) {
        const float *row = wt + (long)kk * n;
        for (int c = 0; c < n; c++) p[c] += x[kk] * row[c];
    }
}

static void f32_gemv_part(const float *w, int colmajor, int n, int k, const float *x, float *y, int part, int parts) {
    if (colmajor) { /* split the outputs in whole 16-wide vectors */
        const int vecs = (n + W - 1) / W, per = (vecs + parts - 1) / parts;
        int c0 = part * per * W, c1 = (part + 1) * per * W;
        c1 = c1 < n ? c1 : n;
        if (c0 < c1) f32_cols(w, n, k, x, y, c0, c1);
    } else {
        const int quads = (n + 3) / 4, per = (quads + parts - 1) / parts;
        int r0 = part * per * 4, r1 = (part + 1) * per * 4;
        r1 = r1 < n ? r1 : n;
        if (r0 < r1) f32_rows(w, k, x, y, r0, r1);
    }
}

#ifdef _OPENMP
static int thread_id(void) { return omp_get_thread_num(); }
static int thread_count(void) { return omp_get_num_threads(); }
#else
static int thread_id(void) { return 0; }
static int thread_count(void) { return 1; }
#endif

/* This thread's block of n outputs (whole groups of four) in a parallel region. */
static void thread_rows(int n, int *r0, int *r1) {
    const int t = thread_id(), quads = (n + 3) / 4, per = (quads + thread_count() - 1) / thread_count();
    *r0 = t * per * 4;
    *r1 = (t + 1) * per * 4 < n ? (t + 1) * per * 4 : n;
}

/* ---- a few rows at once --------------------------------------------------------------------
 * Y [m, n] = X [m, k] W^T (+ bias) for a row-major W [n, k] and a few rows of X: each weight
 * row is read once for every four rows of X, front to back, and multiplied into them (in L1);
 * a batched decode step of a few sequences then streams the weights about as fast as one row
 * does. The threads split W's rows. */
static inline __attribute__((always_inline)) void f32_rows_m(const float *w, int k, const float *x, long ldx,
                                                              const float *bias, float *y, long ldy, int r0, int r1,
                                                              const int M) {
    /* M (1..4) rows of x; named accumulators (two per row, for the FMA latency) stay in registers */
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    for (int r = r0; r < r1; r++) {
        const float *wr = w + (long)r * k;
        vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int c = 0;
        for (; c + 2 * W <= k; c += 2 * W) {
            const vf w0 = loadu(wr + c), w1 = loadu(wr + c + W);
            a0 += w0 * loadu(x0 + c), b0 += w1 * loadu(x0 + c + W);
            if (M > 1) a1 += w0 * loadu(x1 + c), b1 += w1 * loadu(x1 + c + W);
            if (M > 2) a2 += w0 * loadu(x2 + c), b2 += w1 * loadu(x2 + c + W);
            if (M > 3) a3 += w0 * loadu(x3 + c), b3 += w1 * loadu(x3 + c + W);
        }
        for (; c + W <= k; c += W) {
            const vf w0 = loadu(wr + c);
            a0 += w0 * loadu(x0 + c);
            if (M > 1) a1 += w0 * loadu(x1 + c);
            if (M > 2) a2 += w0 * loadu(x2 + c);
            if (M > 3) a3 += w0 * loadu(x3 + c);
        }
        const float b = bias ? bias[r] : 0.0f;
        float s0 = b + hsum(a0 + b0), s1 = M > 1 ? b + hsum(a1 + b1) : 0.0f, s2 = M > 2 ? b + hsum(a2 + b2) : 0.0f,
              s3 = M > 3 ? b + hsum(a3 + b3) : 0.0f;
        for (; c < k; c++) {
            s0 += wr[c] * x0[c];
            if (M > 1) s1 += wr[c] * x1[c];
            if (M > 2) s2 += wr[c] * x2[c];
            if (M > 3) s3 += wr[c] * x3[c];
        }
        y[r] = s0;
        if (M > 1) y[ldy + r] = s1;
        if (M > 2) y[2 * ldy + r] = s2;
        if (M > 3) y[3 * ldy + r] = s3;
    }
}

/* Values held in registers: without this the compiler folds the repeated loads into the
 * multiplies (a load per multiply, 20 a step instead of 8 in f32_tile), and the loads bound the
 * loop (measured: 4 x 4 tile, one thread, weights in cache: 71 -> 89 GFLOP/s). */
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
#define KEEP(a) __asm__("" : "+v"(a))
#define KEEP4(a, b, c, d) __asm__("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d))
#else
#define KEEP(a) (void)0
#define KEEP4(a, b, c, d) (void)0
#endif

/* Four weight rows (r..r + 3) against M (1..4) rows of x: each weight load serves M rows of x
 * and each x load four weight rows, so for M = 4 there are twice as many multiplies as loads
 * (f32_rows_m's one weight row against four x rows has fewer). Meanwhile it fetches pf_lines
 * cache lines from pf into the second-level cache, one per step (see f32_rows_multi). */
static inline __attribute__((always_inline)) void f32_tile(const float *w, int k, const float *x, long ldx,
                                                            const float *bias, float *y, long ldy, int r,
                                                            const char *pf, int pf_lines, const int M) {
    const float *w0 = w + (long)r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    const float *x0 = x, *x1 = x + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    vf a00 = splat(0.0f), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    vf a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    int c = 0, line = 0;
    for (; c + W <= k; c += W) {
        if (line < pf_lines) __builtin_prefetch(pf + 64L * line++, 0, 2);
        vf v0 = loadu(w0 + c), v1 = loadu(w1 + c), v2 = loadu(w2 + c), v3 = loadu(w3 + c);
        KEEP4(v0, v1, v2, v3);
        vf xj = loadu(x0 + c);
        KEEP(xj);
        a00 += v0 * xj, a10 += v1 * xj, a20 += v2 * xj, a30 += v3 * xj;
        if (M > 1) {
            xj = loadu(x1 + c);
            KEEP(xj);
            a01 += v0 * xj, a11 += v1 * xj, a21 += v2 * xj, a31 += v3 * xj;
        }
        if (M > 2) {
            xj = loadu(x2 + c);
            KEEP(xj);
            a02 += v0 * xj, a12 += v1 * xj, a22 += v2 * xj, a32 += v3 * xj;
        }
        if (M > 3) {
            xj = loadu(x3 + c);
            KEEP(xj);
            a03 += v0 * xj, a13 += v1 * xj, a23 += v2 * xj, a33 += v3 * xj;
        }
    }
    for (; line < pf_lines; line++) __builtin_prefetch(pf + 64L * line, 0, 2);
    const vf acc[16] = {a00, a10, a20, a30, a01, a11, a21, a31, a02, a12, a22, a32, a03, a13, a23, a33};
    for (int j = 0; j < M; j++) {
        const float *xj = x + j * ldx;
        for (int i = 0; i < 4; i++) {
            const float *wi = w0 + (long)i * k;
            float s = (bias ? bias[r + i] : 0.0f) + hsum(acc[4 * j + i]);
            for (int cc = c; cc < k; cc++) s += wi[cc] * xj[cc];
            y[j * ldy + r + i] = s;
        }
    }
}

/* Rows r0..r1 of Y [m, n] (+ bias[r], or none with NULL): tiles of four weight rows against
 * four rows of X (f32_tile). The weight rows go in blocks of about 64 KiB; every group of four
 * rows of X passes over a block while it is in the second-level cache, so the weights come from
 * memory once, and the next block is fetched into that cache a slice per tile over all the
 * passes, so that memory streams at an even rate and not in bursts at each block's first pass.
 * Measured on the default model's layer shapes (2 threads, weights in 2 MiB pages): 16 rows
 * 37 -> 24 ms, 8 rows 27 -> 15, 4 rows 21 -> 16 (one weight row against four x rows, the
 * blocks whole, no prefetch, before). One or two rows are bound by memory alone and keep one
 * weight row at a time, a single sequential stream: inside the model's step the four-row
 * tiles' four streams took 23.3 ms for a 2-row step against 19.3 (3 rows: even; 4: tiles
 * 22.8 against 26.4). */
#define F32_BLOCK_BYTES 65536
static void f32_rows_multi(const float *w, int k, const float *x, long ldx, int m, const float *bias, float *y,
                           long ldy, int r0, int r1) {
    if (m <= 2) { /* bound by memory: one weight row at a time, one sequential stream */
        if (m == 1) f32_rows_m(w, k, x, ldx, bias, y, ldy, r0, r1, 1);
        else f32_rows_m(w, k, x, ldx, bias, y, ldy, r0, r1, 2);
        return;
    }
    int rb = F32_BLOCK_BYTES / (4 * k);
    rb = rb < 4 ? 4 : rb & ~3;
    const int passes = (m + 3) / 4;
    for (int b0 = r0; b0 < r1; b0 += rb) {
        const int b1 = b0 + rb < r1 ? b0 + rb : r1;
        const int nb1 = b1 + rb < r1 ? b1 + rb : r1; /* the next block: rows b1..nb1 */
        const char *next = (const char *)(w + (long)b1 * k);
        const long lines = ((long)(nb1 - b1) * k * 4 + 63) / 64;
        const int tiles = passes * ((b1 - b0) / 4); /* tile calls over this block */
        int t = 0;
        for (int i0 = 0; i0 < m; i0 += 4) {
            const float *xi = x + i0 * ldx;
            float *yi = y + i0 * ldy;
            const int mt = m - i0 < 4 ? m - i0 : 4;
            int r = b0;
            for (; r + 4 <= b1; r += 4, t++) {
                const long l0 = lines * t / tiles, l1 = lines * (t + 1) / tiles;
                const char *pf = next + 64 * l0;
                switch (mt) {
                    case 1: f32_tile(w, k, xi, ldx, bias, yi, ldy, r, pf, (int)(l1 - l0), 1); break;
                    case 2: f32_tile(w, k, xi, ldx, bias, yi, ldy, r, pf, (int)(l1 - l0), 2); break;
                    case 3: f32_tile(w, k, xi, ldx, bias, yi, ldy, r, pf, (int)(l1 - l0), 3); break;
                    default: f32_tile(w, k, xi, ldx, bias, yi, ldy, r, pf, (int)(l1 - l0), 4); break;
                }
            }
            if (r < b1) { /* the last one to three rows of a thread's range */
                switch (mt) {
                    case 1: f32_rows_m(w, k, xi, ldx, bias, yi, ldy, r, b1, 1); break;
                    case 2: f32_rows_m(w, k, xi, ldx, bias, yi, ldy, r, b1, 2); break;
                    case 3: f32_rows_m(w, k, xi, ldx, bias, yi, ldy, r, b1, 3); break;
                    default: f32_rows_m(w, k, xi, ldx, bias, yi, ldy, r, b1, 4); break;
                }
            }
        }
    }
}

int lmf_f32_gemm_rows(const float *w, int n, int k, const float *x, long ldx, int m, const float *bias, float *y,
                      long ldy, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int r0, r1;
        thread_rows(n, &r0, &r1);
        if (r0 < r1) f32_rows_multi(w, k, x, ldx, m, bias, y, ldy, r0, r1);
    }
    return 0;
}

/* Inside a parallel region: each thread its share (row-major: its rows plus their bias), then a
 * barrier. `partials`: room for threads x n floats (used when the k rows are split), or NULL. */
static void f32_gemv_in(const float *w, int colmajor, int n, int k, const float *x, const float *bias, float *y,
                        float *partials) {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int t = 0, nt = 1;
#endif
    if (colmajor && partials && nt > 1 && n <= KSPLIT_MAX && k <= n) {
        const int per = (k + nt - 1) / nt, k0 = t * per, k1 = k0 + per < k ? k0 + per : k;
        f32_rows_of_t(w, n, x, partials + (long)t * n, k0 < k ? k0 : k, k1);
#pragma omp barrier
#pragma omp for
        for (int c = 0; c < n; c++) {
            float v = bias ? bias[c] : 0.0f;
            for (int i = 0; i < nt; i++) v += partials[(long)i * n + c];
            y[c] = v;
        }
        return;
    }
    f32_gemv_part(w, colmajor, n, k, x, y, t, nt);
    if (bias && !colmajor) { /* the rows f32_gemv_part gave this thread */
        int r0, r1;
        thread_rows(n, &r0, &r1);
        for (int i = r0; i < r1; i++) y[i] += bias[i];
    }
#pragma omp barrier
    if (bias && colmajor) {
#pragma omp for
        for (int i = 0; i < n; i++) y[i] += bias[i];
    }
}

int lmf_f32_gemv(const float *w, int colmajor, int n, int k, const float *x, const float *bias, float *y, int threads) {
    if (threads < 1) threads = 1;
    float *partials = colmajor && threads > 1 && n <= KSPLIT_MAX ? malloc((size_t)threads * n * sizeof(float)) : NULL;
#pragma omp parallel num_threads(threads)
    f32_gemv_in(w, colmajor, n, k, x, bias, y, partials);
    free(partials);
    return 0;
}

/* The gate/up product of a row-major [2 inter, k] weight and SiLU(gate) * up into m, then a
 * barrier: each thread takes the same block of gate rows and of up rows, so it finishes its
 * part of m without waiting for the other threads' products. */
static void f32_swiglu_in(const float *w, int inter, int k, const float *x, float *gu, float *m) {
    int r0, r1;
    thread_rows(inter, &r0, &r1);
    if (r0 < r1) {
        f32_rows(w, k, x, gu, r0, r1);
        f32_rows(w, k, x, gu, inter + r0, inter + r1);
        silu_mul_span(gu + r0, gu + inter + r0, m + r0, r1 - r0);
    }
#pragma omp barrier
}

typedef struct {
    const float *attn_norm, *mlp_norm, *qkv_w, *qkv_bias, *out_w, *fc_w, *proj_w;
    int cm_qkv, cm_out, cm_fc, cm_proj;
} lmf_f32_layer;

/* The float32 layer, called by every thread of a parallel region. Each thread keeps its own copy
 * of the residual stream (xp) and of its normed form (hn): the norms and residual adds are
 * computed by every thread alike, so that only the products (split over the threads) and the
 * attention end in a barrier: six a layer. cm_*: whether each weight is column-major. abuf:
 * room for h hd + h attention_stride(pos + 1) floats (the rotated queries and every head's scores). */
static void f32_layer_in(float *xp, float *hn, int d, const lmf_f32_layer *L, float eps, int inter, int h, int hkv,
                         int hd, const float *cos, const float *sin, float *kc, float *vc, long head_stride, int pos,
                         float *scratch, float *partials, float *abuf) {
    const int nqkv = (h + 2 * hkv) * hd, T = pos + 1;
    float *delta = scratch, *qkv = delta + d, *att = qkv + nqkv, *gu = att + (long)h * hd, *m = gu + 2L * inter;
    lmf_rms_norm(xp, L->attn_norm, 1, d, eps, hn);
    f32_gemv_in(L->qkv_w, L->cm_qkv, nqkv, d, hn, L->qkv_bias, qkv, partials);
    /* attention: rotary and cache writes on one thread, then the query heads split over all */
    attention_rows_in(qkv, 1, 0, h, hkv, hd, cos, sin, 0, kc, vc, 0, head_stride, &pos, T, 1.0f / sqrtf((float)hd),
                      abuf, abuf + (long)h * hd, att);
    f32_gemv_in(L->out_w, L->cm_out, d, h * hd, att, NULL, delta, partials);
    for (int i = 0; i < d; i++) xp[i] += delta[i];
    lmf_rms_norm(xp, L->mlp_norm, 1, d, eps, hn);
    if (!L->cm_fc) {
        f32_swiglu_in(L->fc_w, inter, d, hn, gu, m);
    } else {
        f32_gemv_in(L->fc_w, L->cm_fc, 2 * inter, d, hn, NULL, gu, partials);
        int r0, r1;
        thread_rows(inter, &r0, &r1);
        if (r0 < r1) silu_mul_span(gu + r0, gu + inter + r0, m + r0, r1 - r0);
#pragma omp barrier
    }
    f32_gemv_in(L->proj_w, L->cm_proj, d, inter, m, NULL, delta, partials);
    for (int i = 0; i < d; i++) xp[i] += delta[i];
}

/* What a step's parallel region needs besides the caller's scratch: the k-split partial sums
 * (threads x the widest output, with more than one thread), the attention buffer, and every
 * thread's copy of the residual stream and its normed form. One allocation; NULL if it failed. */
typedef struct {
    float *partials, *abuf, *own;
    void *block;
} f32_step_mem;

static int f32_step_alloc(f32_step_mem *mem, int threads, int d, int nqkv, int inter, int vocab, int h, int hd,
                          int T) {
    int most = nqkv > 2 * inter ? nqkv : 2 * inter;
    most = most > d ? most : d;
    most = most > vocab ? most : vocab;
    const size_t np = threads > 1 ? (size_t)threads * most : 0, na = (size_t)h * hd + (size_t)h * attention_stride(T),
                 no = (size_t)threads * 2 * d;
    mem->block = malloc((np + na + no) * sizeof(float));
    if (!mem->block) return 2;
    float *f = mem->block;
    mem->partials = np ? f : NULL;
    mem->abuf = f + np;
    mem->own = f + np + na;
    return 0;
}

/* One layer in its own parallel region (x updated in place). */
int lmf_f32_decode_layer(float *x, int d, const float *attn_norm, const float *mlp_norm, float eps,
                         const float *qkv_w, int cm_qkv, const float *qkv_bias, const float *out_w, int cm_out,
                         const float *fc_w, int cm_fc, const float *proj_w, int cm_proj, int inter, int h, int hkv,
                         int hd, const float *cos, const float *sin, float *kc, float *vc, long head_stride, int pos,
                         float *scratch, int threads) {
    const lmf_f32_layer L = {attn_norm, mlp_norm, qkv_w, qkv_bias, out_w, fc_w, proj_w, cm_qkv, cm_out, cm_fc, cm_proj};
    f32_step_mem mem;
    if (threads < 1) threads = 1;
    if (h % hkv || hd % 2) return 1;
    if (f32_step_alloc(&mem, threads, d, (h + 2 * hkv) * hd, inter, 0, h, hd, pos + 1)) return 2;
#pragma omp parallel num_threads(threads)
    {
        float *xp = mem.own + (long)thread_id() * 2 * d, *hn = xp + d;
        memcpy(xp, x, (size_t)d * sizeof(float));
        f32_layer_in(xp, hn, d, &L, eps, inter, h, hkv, hd, cos, sin, kc, vc, head_stride, pos, scratch,
                     mem.partials, mem.abuf);
        if (thread_id() == 0) memcpy(x, xp, (size_t)d * sizeof(float));
    }
    free(mem.block);
    return 0;
}

/* A whole batch-1 decode step of a pre-norm model in one parallel region: every layer (their
 * caches at k0/v0 + layer * layer_stride, heads head_stride apart), the final RMS norm, and the
 * vocabulary head into logits (vocab floats). x: the token's embedding row (d floats), used as
 * the residual stream and changed. */
int lmf_f32_decode_model(float *x, int d, int n_layer, const lmf_f32_layer *layers, float eps, int inter, int h,
                         int hkv, int hd, const float *cos, const float *sin, float *k0, float *v0, long layer_stride,
                         long head_stride, int pos, const float *final_norm, float final_eps, const float *head_w,
                         int cm_head, int vocab, float *logits, float *scratch, int threads) {
    f32_step_mem mem;
    if (threads < 1) threads = 1;
    if (h % hkv || hd % 2) return 1;
    if (f32_step_alloc(&mem, threads, d, (h + 2 * hkv) * hd, inter, vocab <= KSPLIT_MAX ? vocab : 0, h, hd, pos + 1))
        return 2;
#pragma omp parallel num_threads(threads)
    {
        float *xp = mem.own + (long)thread_id() * 2 * d, *hn = xp + d;
        memcpy(xp, x, (size_t)d * sizeof(float));
        for (int l = 0; l < n_layer; l++)
            f32_layer_in(xp, hn, d, layers + l, eps, inter, h, hkv, hd, cos, sin, k0 + l * layer_stride,
                         v0 + l * layer_stride, head_stride, pos, scratch, mem.partials, mem.abuf);
        lmf_rms_norm(xp, final_norm, 1, d, final_eps, hn);
        f32_gemv_in(head_w, cm_head, vocab, d, hn, NULL, logits, mem.partials);
        if (thread_id() == 0) memcpy(x, xp, (size_t)d * sizeof(float));
    }
    free(mem.block);
    return 0;
}

/* ---- a batched step of a few sequences ----------------------------------------------------
 * One new token for each of B sequences (row b at position pos[b], its own cache row) through a
 * pre-norm model with row-major float32 weights, in one parallel region, as
 * lmf_f32_decode_model does for one: every product is f32_rows_multi (the weights read from
 * memory once for all B rows), the attention as cpu_ops.c's tasks over the threads.
 * X [B, d]: the tokens' embedding rows (changed). cos/sin: [B, hd] rows rope_stride apart.
 * Cache of layer l, row b: k0 + l * layer_stride + b * row_stride (heads head_stride apart).
 * logits [B, vocab]. Returns 1 for shapes it does not take, 2 without memory. */

int lmf_f32_decode_rows_model(float *X, int B, int d, int n_layer, const lmf_f32_layer *layers, float eps, int inter,
                              int h, int hkv, int hd, const float *cos, const float *sin, long rope_stride,
                              float *k0, float *v0, long layer_stride, long row_stride, long head_stride,
                              const int *pos, const float *final_norm, float final_eps, const float *head_w,
                              int vocab, float *logits, int threads) {
    if (h % hkv || hd % 2 || B < 1) return 1;
    for (int l = 0; l < n_layer; l++)
        if (layers[l].cm_qkv || layers[l].cm_out || layers[l].cm_fc || layers[l].cm_proj) return 1;
    int most = 0;
    for (int b = 0; b < B; b++) {
        if (pos[b] < 0) return 1;
        most = pos[b] + 1 > most ? pos[b] + 1 : most;
    }
    if (threads < 1) threads = 1;
    const int nqkv = (h + 2 * hkv) * hd, q = h * hd;
    const size_t shared = (size_t)B * (nqkv + 2 * q + d + 3 * inter) + (size_t)B * h * attention_stride(most),
                 own = (size_t)threads * 2 * B * d;
    float *block = malloc((shared + own) * sizeof(float));
    if (!block) return 2;
    float *QKV = block, *Q = QKV + (long)B * nqkv, *ATT = Q + (long)B * q, *DELTA = ATT + (long)B * q,
          *GU = DELTA + (long)B * d, *M = GU + 2L * B * inter, *S = M + (long)B * inter, *mine = block + shared;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel num_threads(threads)
    {
        float *xp = mine + (long)thread_id() * 2 * B * d, *hn = xp + (long)B * d;
        int r0, r1;
        memcpy(xp, X, (size_t)B * d * sizeof(float));
        for (int l = 0; l < n_layer; l++) {
            const lmf_f32_layer *L = layers + l;
            float *kl = k0 + l * layer_stride, *vl = v0 + l * layer_stride;
            lmf_rms_norm(xp, L->attn_norm, B, d, eps, hn);
            thread_rows(nqkv, &r0, &r1);
            if (r0 < r1) f32_rows_multi(L->qkv_w, d, hn, d, B, L->qkv_bias, QKV, nqkv, r0, r1);
#pragma omp barrier
            attention_rows_in(QKV, B, nqkv, h, hkv, hd, cos, sin, rope_stride, kl, vl, row_stride, head_stride, pos,
                              most, scale, Q, S, ATT);
            thread_rows(d, &r0, &r1);
            if (r0 < r1) f32_rows_multi(L->out_w, q, ATT, q, B, NULL, DELTA, d, r0, r1);
#pragma omp barrier
            for (long i = 0; i < (long)B * d; i++) xp[i] += DELTA[i];
            lmf_rms_norm(xp, L->mlp_norm, B, d, eps, hn);
            thread_rows(inter, &r0, &r1);
            if (r0 < r1) {
                f32_rows_multi(L->fc_w, d, hn, d, B, NULL, GU, 2L * inter, r0, r1);
                f32_rows_multi(L->fc_w, d, hn, d, B, NULL, GU, 2L * inter, inter + r0, inter + r1);
                for (int b = 0; b < B; b++) {
                    const float *g = GU + 2L * b * inter;
                    silu_mul_span(g + r0, g + inter + r0, M + (long)b * inter + r0, r1 - r0);
                }
            }
#pragma omp barrier
            thread_rows(d, &r0, &r1);
            if (r0 < r1) f32_rows_multi(L->proj_w, inter, M, inter, B, NULL, DELTA, d, r0, r1);
#pragma omp barrier
            for (long i = 0; i < (long)B * d; i++) xp[i] += DELTA[i];
        }
        lmf_rms_norm(xp, final_norm, B, d, final_eps, hn);
        thread_rows(vocab, &r0, &r1);
        if (r0 < r1) f32_rows_multi(head_w, d, hn, d, B, NULL, logits, vocab, r0, r1);
        if (thread_id() == 0) memcpy(X, xp, (size_t)B * d * sizeof(float));
    }
    free(block);
    return 0;
}

/* ---- a batched step with int4 layers -------------------------------------------------------
 * One new token for each of B sequences (row b at position pos[b], its own cache row:
 * k0 + l * layer_stride + b * row_stride) through int4 layers, in one parallel region: each
 * product reads every weight row once for up to eight rows (the tiles of quant_gemv.c, the
 * threads splitting the weight rows), the attention as cpu_ops.c's tasks. Every operation
 * on a row is the one lmf_q4_decode_model does for it, so each row's logits equal that row's
 * step alone. One region for the step, as the float32 step has, rather than one per product
 * (some 150 a step): one allocation, and the threads meet at barriers instead of a team being
 * started and ended per product (a 16-row step of the default model took the same time either
 * way on the 2-core machine measured).
 * X [B, d] (changed); cos/sin [B, hd] rows rope_stride apart; logits [B, n_head_rows].
 * Returns 1 for shapes it does not take, 2 without memory. */
#ifdef LMF_VNNI
/* This thread's share of y = the int4 rows of w times B activation rows a, then a barrier. */
static void q4_product_in(const uint8_t *w, int n, int k, const act_t *a, int B, float *y, const float *bias) {
    int r0, r1;
    thread_rows(n, &r0, &r1);
    if (r0 < r1) {
        q4_rows_block(w, lmf_q4_row_bytes(k), r0, r1, a, B, k, y, n);
        if (bias)
            for (int b = 0; b < B; b++)
                for (int i = r0; i < r1; i++) y[(long)b * n + i] += bias[i];
    }
#pragma omp barrier
}

/* The B rows of x (k inputs, row stride ldx) rounded for the products, a row per thread in turn. */
static void act_rows_in(const float *x, long ldx, int k, int B, act_t *a, char *mem, size_t one) {
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) act_prepare(x + (long)b * ldx, k, a + b, mem + one * (size_t)b);
}
#endif

int lmf_q4_decode_rows_model(float *X, int B, int d, int n_layer, const lmf_q4_layer *layers, float eps, int inter,
                             int h, int hkv, int hd, const float *cos, const float *sin, long rope_stride, float *k0,
                             float *v0, long layer_stride, long row_stride, long head_stride, const int *pos,
                             const float *final_norm, float final_eps, int head_bits, const void *head_w,
                             const float *head_scale, int n_head_rows, float *logits) {
#ifdef LMF_VNNI
    if (h % hkv || hd % 2 || B < 1 || (head_bits != 4 && head_bits != 8 && head_bits != 32)) return 1;
    if (d % 64 || inter % 64 || (h * hd) % 64) return 1;
    int most = 0;
    for (int b = 0; b < B; b++) {
        if (pos[b] < 0) return 1;
        most = pos[b] + 1 > most ? pos[b] + 1 : most;
    }
    const int nqkv = (h + 2 * hkv) * hd, q = h * hd;
    int kmax = d > q ? d : q;
    kmax = kmax > inter ? kmax : inter;
    const size_t one = (act_bytes(kmax) + 63) / 64 * 64, one8 = (act8_bytes(d) + 63) / 64 * 64;
    const size_t floats = (size_t)B * (d + nqkv + q + q + d + 3 * inter) + (size_t)B * h * attention_stride(most);
    char *mem = aligned_alloc(64, one * (size_t)B + one8 * (size_t)B + (floats * sizeof(float) + 63) / 64 * 64);
    act_t *a = malloc(sizeof(act_t) * (size_t)B);
    act8_t *a8 = malloc(sizeof(act8_t) * (size_t)B);
    if (!mem || !a || !a8) {
        free(mem); free(a); free(a8);
        return 2;
    }
    char *amem = mem, *a8mem = mem + one * (size_t)B;
    float *HN = (float *)(a8mem + one8 * (size_t)B), *QKV = HN + (long)B * d, *Q = QKV + (long)B * nqkv,
          *ATT = Q + (long)B * q, *DELTA = ATT + (long)B * q, *GU = DELTA + (long)B * d, *M = GU + 2L * B * inter,
          *S = M + (long)B * inter;
    const long n = (long)B * d;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel
    {
        int r0, r1;
        for (int l = 0; l < n_layer; l++) {
            const lmf_q4_layer *L = layers + l;
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) lmf_rms_norm(X + (long)b * d, L->attn_norm, 1, d, eps, HN + (long)b * d);
            act_rows_in(HN, d, d, B, a, amem, one);
            q4_product_in(L->qkv_w, nqkv, d, a, B, QKV, L->qkv_bias);
            attention_rows_in(QKV, B, nqkv, h, hkv, hd, cos, sin, rope_stride, k0 + l * layer_stride,
                              v0 + l * layer_stride, row_stride, head_stride, pos, most, scale, Q, S, ATT);
            act_rows_in(ATT, q, q, B, a, amem, one);
            q4_product_in(L->out_w, d, q, a, B, DELTA, NULL);
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                float *x = X + (long)b * d;
                const float *dl = DELTA + (long)b * d;
                for (int i = 0; i < d; i++) x[i] += dl[i];
                lmf_rms_norm(x, L->mlp_norm, 1, d, eps, HN + (long)b * d);
            }
            act_rows_in(HN, d, d, B, a, amem, one);
            /* gate and up rows of the same outputs on one thread: SiLU(gate) * up without a barrier */
            thread_rows(inter, &r0, &r1);
            if (r0 < r1) {
                const long rb = lmf_q4_row_bytes(d);
                q4_rows_block(L->fc_w, rb, r0, r1, a, B, d, GU, 2L * inter);
                q4_rows_block(L->fc_w, rb, inter + r0, inter + r1, a, B, d, GU, 2L * inter);
                for (int b = 0; b < B; b++) {
                    const float *g = GU + 2L * b * inter;
                    silu_mul_span(g + r0, g + inter + r0, M + (long)b * inter + r0, r1 - r0);
                }
            }
#pragma omp barrier
            act_rows_in(M, inter, inter, B, a, amem, one);
            q4_product_in(L->proj_w, d, inter, a, B, DELTA, NULL);
#pragma omp for schedule(static)
            for (long i = 0; i < n; i++) X[i] += DELTA[i];
        }
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) lmf_rms_norm(X + (long)b * d, final_norm, 1, d, final_eps, HN + (long)b * d);
        if (head_bits == 4) {
            act_rows_in(HN, d, d, B, a, amem, one);
            q4_product_in((const uint8_t *)head_w, n_head_rows, d, a, B, logits, NULL);
        } else if (head_bits == 8) {
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++)
                act8_prepare(HN + (long)b * d, d, a8 + b, amem + one * (size_t)b, a8mem + one8 * (size_t)b);
            thread_rows(n_head_rows, &r0, &r1);
            if (r0 < r1) q8_rows_block((const uint8_t *)head_w, head_scale, r0, r1, a8, B, d, logits, n_head_rows);
        }
    }
    int code = 0;
    if (head_bits == 32) /* outside the region: lmf_f32_gemv splits its work as for one row */
        for (int b = 0; b < B && !code; b++)
            code = lmf_f32_gemv((const float *)head_w, 0, n_head_rows, d, HN + (long)b * d, NULL,
                                logits + (long)b * n_head_rows, max_threads());
    free(mem); free(a); free(a8);
    return code;
#else
    (void)X; (void)B; (void)d; (void)n_layer; (void)layers; (void)eps; (void)inter; (void)h; (void)hkv; (void)hd;
    (void)cos; (void)sin; (void)rope_stride; (void)k0; (void)v0; (void)layer_stride; (void)row_stride;
    (void)head_stride; (void)pos; (void)final_norm; (void)final_eps; (void)head_bits; (void)head_w;
    (void)head_scale; (void)n_head_rows; (void)logits;
    return 1;
#endif
}
