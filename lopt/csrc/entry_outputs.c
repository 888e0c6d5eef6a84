/* The per-entry part of an optimizer net, fused: features, trunk, output layer.
 *
 * For each entry i of one parameter tensor, from the optimizer state after
 * this step's gradient:
 *   features x = (p, g, m_0..m_{K-1}, r, g / d, m_A / d), r = sqrt(v),
 *                d = r * rsqrt_c2 + eps            (lopt.features.entry_channels)
 *   trunk     h = relu(W_in x + b_in), then depth - 1 times h = relu(W h + b)
 *   output    out[:, i] = W_out h + b_out
 *   base[i]   = base_scale * x[K + 4]              (Adam's direction times -lr)
 * The per-tensor channel scales are folded into W_in by the caller, as in the
 * torch path. Eight entries at a time, one SIMD vector each, so features and
 * activations live in registers and L1 and memory is read once.
 *
 * Built with -fopenmp where the compiler has it: the loop then runs on the
 * OpenMP runtime PyTorch already loaded (libgomp.so.1), so its threads are
 * torch's own and do not fight torch's spinning workers for the cores.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define MAX_WIDTH 256
#define MAX_OUT 64
#define MAX_FEATURES 16

int lopt_entry_outputs_abi(void) { return 2; }

static inline v8 splat(float a) { return (v8){a, a, a, a, a, a, a, a}; }
static inline v8 load(const float *p)
{
    v8 r;
    memcpy(&r, p, sizeof r);
    return r;
}
static inline void store(float *p, v8 a) { memcpy(p, &a, sizeof a); }
/* max(a, 0) that keeps NaN, as torch's relu does. */
static inline v8 relu(v8 a)
{
    v8i negative = a < splat(0.0f);
    return (v8)((v8i)a & ~negative);
}

int lopt_entry_outputs(
    int64_t n, const float *p, const float *g, const float *m, int64_t m_stride, int k_momenta,
    int adam_momentum, const float *v, float rsqrt_c2, float eps, int width, int depth,
    const float *w_in, const float *b_in, const float *w_hidden, const float *b_hidden, int n_out,
    const float *w_out, const float *b_out, float base_scale, float *out, float *base, int threads)
{
    const int nf = k_momenta + 5;
    if (width > MAX_WIDTH || n_out > MAX_OUT || nf > MAX_FEATURES || width < 1 || depth < 1 ||
        adam_momentum < 0 || adam_momentum >= k_momenta)
        return 1;
    const int64_t blocks = (n + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t i0 = blk * 8;
        const int nb = (n - i0) < 8 ? (int)(n - i0) : 8;
        v8 x[MAX_FEATURES], h[MAX_WIDTH], h2[MAX_WIDTH];
        if (nb == 8) {
            x[0] = load(p + i0);
            x[1] = load(g + i0);
            for (int k = 0; k < k_momenta; k++)
                x[2 + k] = load(m + k * m_stride + i0);
            x[2 + k_momenta] = load(v + i0);
        } else { /* the last, short block: zero-padded */
            float tmp[MAX_FEATURES][8];
            memset(tmp, 0, sizeof tmp);
            for (int b = 0; b < nb; b++) {
                tmp[0][b] = p[i0 + b];
                tmp[1][b] = g[i0 + b];
                for (int k = 0; k < k_momenta; k++)
                    tmp[2 + k][b] = m[k * m_stride + i0 + b];
                tmp[2 + k_momenta][b] = v[i0 + b];
            }
            for (int f = 0; f < 3 + k_momenta; f++)
                x[f] = load(tmp[f]);
        }
        for (int b = 0; b < 8; b++)
            x[2 + k_momenta][b] = sqrtf(x[2 + k_momenta][b]);
        const v8 d = x[2 + k_momenta] * splat(rsqrt_c2) + splat(eps);
        x[3 + k_momenta] = x[1] / d;
        x[4 + k_momenta] = x[2 + adam_momentum] / d;
        /* Four hidden units at a time: four independent FMA chains share
         * each feature vector. */
        int j = 0;
        for (; j + 4 <= width; j += 4) {
            v8 a0 = splat(b_in[j]), a1 = splat(b_in[j + 1]);
            v8 a2 = splat(b_in[j + 2]), a3 = splat(b_in[j + 3]);
            const float *w = w_in + j * nf;
            for (int f = 0; f < nf; f++) {
                a0 += splat(w[f]) * x[f];
                a1 += splat(w[nf + f]) * x[f];
                a2 += splat(w[2 * nf + f]) * x[f];
                a3 += splat(w[3 * nf + f]) * x[f];
            }
            h[j] = relu(a0);
            h[j + 1] = relu(a1);
            h[j + 2] = relu(a2);
            h[j + 3] = relu(a3);
        }
        for (; j < width; j++) {
            v8 acc = splat(b_in[j]);
            for (int f = 0; f < nf; f++)
                acc += splat(w_in[j * nf + f]) * x[f];
            h[j] = relu(acc);
        }
        for (int layer = 0; layer < depth - 1; layer++) {
            const float *w = w_hidden + (int64_t)layer * width * width;
            const float *bias = b_hidden + (int64_t)layer * width;
            for (int j = 0; j < width; j++) {
                v8 acc = splat(bias[j]);
                for (int f = 0; f < width; f++)
                    acc += splat(w[j * width + f]) * h[f];
                h2[j] = relu(acc);
            }
            memcpy(h, h2, width * sizeof(v8));
        }
        /* Two outputs at a time, for the same reason. */
        for (int r = 0; r < n_out; r += 2) {
            const int pair = r + 1 < n_out;
            v8 a0 = splat(b_out[r]), a1 = splat(pair ? b_out[r + 1] : 0.0f);
            const float *w0 = w_out + r * width, *w1 = pair ? w0 + width : w0;
            for (int f = 0; f < width; f++) {
                a0 += splat(w0[f]) * h[f];
                a1 += splat(w1[f]) * h[f];
            }
            for (int q = 0; q < 1 + pair; q++) {
                const v8 acc = q ? a1 : a0;
                float *o = out + (r + q) * n + i0;
                if (nb == 8)
                    store(o, acc);
                else
                    for (int b = 0; b < nb; b++)
                        o[b] = acc[b];
            }
        }
        const v8 scaled = splat(base_scale) * x[4 + k_momenta];
        if (nb == 8)
            store(base + i0, scaled);
        else
            for (int b = 0; b < nb; b++)
                base[i0 + b] = scaled[b];
    }
    return 0;
}
