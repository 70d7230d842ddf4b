/* One pre-norm decoder layer of a batch-1 decode step with 4-bit weights, in one call.
 *
 * The same arithmetic as the layer's modules run one by one (RMS norm, the int4 q/k/v
 * product, rotary + cache write + attention, the output product and residual add, RMS norm,
 * the gate/up product, SiLU(gate) * up, the down product and residual add), with the
 * kernels of quant_gemv.c and lmforge/model/kernels/cpu_ops.c: what it saves is the Python
 * and PyTorch bookkeeping between them, some forty operations a layer.
 */
#include "quant_gemv.c"
#include "../../model/kernels/cpu_ops.c"

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
    for (int i = 0; i < inter; i++) {
        const float g = gu[i];
        m[i] = g / (1.0f + expf(-g)) * gu[inter + i];
    }
    if ((code = lmf_q4_gemv(proj_w, d, inter, m, delta))) return code;
    for (int i = 0; i < d; i++) x[i] += delta[i];
    return 0;
}
