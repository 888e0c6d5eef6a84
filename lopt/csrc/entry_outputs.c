/* The per-entry part of an optimizer net, fused: features, trunk, output
 * layer, the NF-layer's pooled sums, and the final update.
 *
 * lopt_entry_outputs: for each entry i of one parameter tensor, from the
 * optimizer state after this step's gradient:
 *   features x = (p, g, m_0..m_{K-1}, r, g / d, m_A / d), r = sqrt(v),
 *                d = r * rsqrt_c2 + eps            (lopt.features.entry_channels)
 *   trunk     h = relu(W_in x + b_in), then depth - 1 times h = relu(W h + b)
 *   output    y = W_out h + b_out                  (n_out values)
 *   base[i]   = base_scale * x[K + 4]              (Adam's direction times -lr)
 * Rows [0, n_store) of y are stored in out (n_store, n). With pool_cols > 0
 * the entries are a (n / pool_cols, pool_cols) matrix and rows [n_store,
 * n_out) are not stored but summed along each matrix row into row_sums
 * (n_out - n_store, n / pool_cols) and along each column into col_sums
 * (n_out - n_store, pool_cols): the NF-layer's pooled channels, without
 * writing them to memory. With stats, three more rows are summed the same
 * way after them: p^2, (m_A / d)^2 and g^2 (the per-neuron statistics of
 * lopt.nets.neuron_stats), for any tensor seen as such a matrix. The
 * per-tensor channel scales are folded into W_in by the caller, as in the
 * torch path.
 *
 * Sixteen entries at a time, two SIMD vectors of eight, so features and
 * activations live in registers and L1, memory is read once, and every
 * weight loaded feeds two multiply-adds.
 *
 * lopt_state_update: the optimizer state's update for this step's gradient,
 * in place (momenta m_k lerp towards g with weight w_k, as torch.lerp;
 * v = b2 * v + (1 - b2) g^2), and in the same pass the sums the channel
 * scales need: sum p^2, sum g^2, sum m_k^2 per k, sum v (after the update).
 *
 * lopt_finish: update = base + dir' * exp(min(mag', max_mag)), where dir' and
 * mag' are dir and mag plus the NF-layer's row and column terms (the
 * entries seen as a matrix), written over base; returns the sum of the
 * updates (inf or NaN when one is not finite).
 *
 * Built with -fopenmp where the compiler has it: the loops then run on the
 * OpenMP runtime PyTorch already loaded (libgomp.so.1), so its threads are
 * torch's own and do not fight torch's spinning workers for the cores. Each
 * thread takes one contiguous range, and sums are reduced in thread order,
 * so results depend only on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define MAX_WIDTH 256
#define MAX_OUT 64
#define MAX_FEATURES 16
#ifndef NV
#define NV 2 /* vectors per block */
#endif
#define BLOCK (8 * NV)  /* entries per block */

int lopt_entry_outputs_abi(void) { return 7; }

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
#ifdef __AVX__
    /* maxps returns its second operand when either is NaN: one instruction. */
    return (v8)_mm256_max_ps(_mm256_setzero_ps(), (__m256)a);
#else
    v8i negative = a < splat(0.0f);
    return (v8)((v8i)a & ~negative);
#endif
}
/* sqrt of each lane, correctly rounded as sqrtf is. */
static inline v8 vsqrt(v8 a)
{
#ifdef __AVX__
    return (v8)_mm256_sqrt_ps((__m256)a);
#else
    for (int b = 0; b < 8; b++)
        a[b] = sqrtf(a[b]);
    return a;
#endif
}

static inline float hsum(v8 a)
{
    float s = 0.0f;
    for (int b = 0; b < 8; b++)
        s += a[b];
    return s;
}

/* g outputs of one block: y[r] = w[r] . h + b[r]; returns g. */
static inline __attribute__((always_inline)) int out_rows(const int g, const float *w,
                                                          const float *b, int width,
                                                          v8 h[][NV], v8 y[][NV])
{
    v8 a[6][NV];
    for (int r = 0; r < g; r++)
        for (int u = 0; u < NV; u++)
            a[r][u] = splat(b[r]);
    for (int f = 0; f < width; f++)
        for (int r = 0; r < g; r++) {
            const v8 c = splat(w[r * width + f]);
            for (int u = 0; u < NV; u++)
                a[r][u] += c * h[f][u];
        }
    for (int r = 0; r < g; r++)
        for (int u = 0; u < NV; u++)
            y[r][u] = a[r][u];
    return g;
}

struct net {
    int k_momenta, adam_momentum, width, depth, n_out, n_store, n_pool; /* pooled: [n_store, n_pool) */
    float rsqrt_c2, eps, base_scale;
    const float *w_in, *b_in, *w_hidden, *b_hidden, *w_out, *b_out;
};

/* A pooled sum of the multi-tensor step (see lopt_entry_outputs_many): all
 * fields int64, so Python passes a table of them as one int64 array. */
struct pool {
    int64_t src;     /* -1: summed from the entries; else the index (among its
                        tensor's pools) of the pool it is summed from */
    int64_t c0, nc;  /* its channels: rows [c0, c0 + nc) of the outputs */
    int64_t rows;    /* its rows (each of nc channels) */
    int64_t dst;     /* address of its result, (rows, nc), channels last */
    int64_t soff;    /* offset of its sums in its tensor's scratch, (nc, rows) */
    int64_t s[4];    /* row of an entry (or of a source row): sum of index * s */
    int64_t sd[4];   /* a derived pool's source dims */
    int64_t kind;    /* POOL_GENERIC, POOL_ENTRIES (every entry its own row, in
                        order: whole vectors) or POOL_AXIS (its source summed
                        over axis `axis` of sd: contiguous loops) */
    int64_t axis;
};
#define POOL_FIELDS 16
enum { POOL_GENERIC, POOL_ENTRIES, POOL_AXIS };

struct tensor {
    int64_t n, m_stride, cols, out_stride;
    const float *p, *g, *m, *v;
    float *out, *base;
    const int64_t *dims;       /* the multi-tensor step: its view, 4 axes */
    const struct pool *pools;  /* and its pools (NULL: none, or the matrix ones) */
    int n_pools;
};

/* Rows [n_store, n_pool) of one block of entries into the running sums. */
static void pool_block(const struct net *net, const struct tensor *t, int64_t i0, int nb,
                       v8 y[][NV], float *rows, float *cols)
{
    const int64_t n_rows = t->n / t->cols;
    const int64_t row = i0 / t->cols, col0 = i0 - row * t->cols;
    for (int r = net->n_store; r < net->n_pool; r++) {
        float *rs = rows + (r - net->n_store) * n_rows;
        float *cs = cols + (r - net->n_store) * t->cols;
        if (nb == BLOCK && col0 + BLOCK <= t->cols) { /* one matrix row */
            v8 s = y[r][0];
            for (int u = 0; u < NV; u++) {
                if (u)
                    s += y[r][u];
                store(cs + col0 + 8 * u, load(cs + col0 + 8 * u) + y[r][u]);
            }
            rs[row] += hsum(s);
        } else {
            for (int b = 0; b < nb; b++) {
                const int64_t i = i0 + b, ri = i / t->cols;
                const float val = y[r][b / 8][b % 8];
                rs[ri] += val;
                cs[i - ri * t->cols] += val;
            }
        }
    }
}

/* The index of entry e along each of the 4 axes of dims. */
static inline void unravel(int64_t e, const int64_t *d, int64_t *j)
{
    j[3] = e % d[3];
    e /= d[3];
    j[2] = e % d[2];
    e /= d[2];
    j[1] = e % d[1];
    j[0] = e / d[1];
}

static inline void next_index(int64_t *j, const int64_t *d)
{
    if (++j[3] == d[3]) {
        j[3] = 0;
        if (++j[2] == d[2]) {
            j[2] = 0;
            if (++j[1] == d[1]) {
                j[1] = 0;
                j[0]++;
            }
        }
    }
}

/* The running sums, per channel, of the blocks seen so far of one line of
 * the last axis (the entries whose first three indices are j[0..2]): the
 * pools over that axis get them when the line ends (line_flush), so such a
 * pool costs a vector add per block, not a horizontal sum and a scattered
 * add. Channels [c_lo, c_hi) are the ones those pools read. */
struct line_sums {
    int active;
    int64_t j[4];
    int c_lo, c_hi;
    v8 sum[MAX_OUT];
};

/* A pool summed from the entries over the last axis: in the line's sums. */
static inline int over_lines(const struct pool *pl)
{
    return pl->src < 0 && pl->kind != POOL_ENTRIES && pl->s[3] == 0;
}

static void line_init(const struct tensor *t, struct line_sums *ls)
{
    ls->active = 0;
    ls->c_lo = MAX_OUT;
    ls->c_hi = 0;
    for (int q = 0; q < t->n_pools; q++) {
        const struct pool *pl = t->pools + q;
        if (!over_lines(pl))
            continue;
        if (pl->c0 < ls->c_lo)
            ls->c_lo = (int)pl->c0;
        if (pl->c0 + pl->nc > ls->c_hi)
            ls->c_hi = (int)(pl->c0 + pl->nc);
    }
}

static void line_flush(const struct tensor *t, struct line_sums *ls, float *acc)
{
    if (!ls->active)
        return;
    ls->active = 0;
    float hs[MAX_OUT];
    for (int c = ls->c_lo; c < ls->c_hi; c++)
        hs[c] = hsum(ls->sum[c]);
    for (int q = 0; q < t->n_pools; q++) {
        const struct pool *pl = t->pools + q;
        if (!over_lines(pl))
            continue;
        const int64_t *s = pl->s;
        const int64_t r0 = ls->j[0] * s[0] + ls->j[1] * s[1] + ls->j[2] * s[2];
        float *a = acc + pl->soff;
        for (int64_t c = 0; c < pl->nc; c++)
            a[c * pl->rows + r0] += hs[pl->c0 + c];
    }
}

/* The block's outputs into the running sums of the pools summed from the
 * entries (channel-first in acc); j is the index of its first entry i0. A
 * block inside one run of the last axis adds whole vectors (a pool that
 * keeps that axis) or adds to the line's sums (a pool over it). */
static inline __attribute__((always_inline)) void pool_generic(const struct tensor *t,
                                                               int64_t i0, const int64_t *j,
                                                               int nb, v8 y[][NV], float *acc,
                                                               struct line_sums *ls)
{
    const int run = nb == BLOCK && j[3] + BLOCK <= t->dims[3];
    if (run && ls->c_lo < ls->c_hi) {
        if (ls->active && (ls->j[0] != j[0] || ls->j[1] != j[1] || ls->j[2] != j[2]))
            line_flush(t, ls, acc);
        for (int c = ls->c_lo; c < ls->c_hi; c++) {
            v8 sum = y[c][0];
            for (int u = 1; u < NV; u++)
                sum += y[c][u];
            ls->sum[c] = ls->active ? ls->sum[c] + sum : sum;
        }
        if (!ls->active)
            memcpy(ls->j, j, sizeof ls->j);
        ls->active = 1;
    }
    for (int q = 0; q < t->n_pools; q++) {
        const struct pool *pl = t->pools + q;
        if (pl->src >= 0)
            continue;
        float *a = acc + pl->soff;
        const int64_t rows = pl->rows, c0 = pl->c0;
        const int64_t *s = pl->s;
        if (pl->kind == POOL_ENTRIES) { /* written once: stored, never zeroed first */
            for (int64_t c = 0; c < pl->nc; c++) {
                float *dst = a + c * rows + i0;
                if (nb == BLOCK)
                    for (int u = 0; u < NV; u++)
                        store(dst + 8 * u, y[c0 + c][u]);
                else
                    for (int b = 0; b < nb; b++)
                        dst[b] = y[c0 + c][b / 8][b % 8];
            }
            continue;
        }
        if (run && s[3] == 0) /* in the line's sums */
            continue;
        if (run && s[3] == 1) {
            float *d = a + j[0] * s[0] + j[1] * s[1] + j[2] * s[2] + j[3];
            const v8(*yc)[NV] = (const v8(*)[NV])(y + c0);
            const int nc = (int)pl->nc;
            int c = 0;
            /* Four channels at a time, their loads before their stores:
             * interleaved, a load can be held behind the store before it
             * when the two addresses share their low bits (a column's sums
             * and the outputs on the stack do, for some blocks of a row);
             * this took a tenth off a 1024 x 784 weight's pass. */
            for (; c + 4 <= nc; c += 4) {
                v8 sum[4][NV];
                for (int q = 0; q < 4; q++)
                    for (int u = 0; u < NV; u++)
                        sum[q][u] = load(d + (c + q) * rows + 8 * u) + yc[c + q][u];
                for (int q = 0; q < 4; q++)
                    for (int u = 0; u < NV; u++)
                        store(d + (c + q) * rows + 8 * u, sum[q][u]);
            }
            for (; c < nc; c++)
                for (int u = 0; u < NV; u++) {
                    float *dst = d + c * rows + 8 * u;
                    store(dst, load(dst) + yc[c][u]);
                }
            continue;
        }
        /* Run by run of the last axis: a pool over it adds one sum per run. */
        int64_t k[4] = {j[0], j[1], j[2], j[3]};
        for (int b = 0; b < nb;) {
            const int64_t left = t->dims[3] - k[3];
            const int run = left < nb - b ? (int)left : nb - b;
            const int64_t r = k[0] * s[0] + k[1] * s[1] + k[2] * s[2] + k[3] * s[3];
            for (int64_t c = 0; c < pl->nc; c++) {
                if (s[3] == 0) {
                    float sum = 0.0f;
                    for (int x = b; x < b + run; x++)
                        sum += y[c0 + c][x / 8][x % 8];
                    a[c * rows + r] += sum;
                } else
                    for (int x = b; x < b + run; x++)
                        a[c * rows + r + (x - b) * s[3]] += y[c0 + c][x / 8][x % 8];
            }
            b += run;
            k[3] = t->dims[3] - 1;
            next_index(k, t->dims);
        }
    }
}

static void run_blocks(const struct net *net, const struct tensor *t, int64_t blk0, int64_t blk1,
                       float *rows, float *cols)
{
    const int k = net->k_momenta, nf = k + 5, width = net->width;
    struct line_sums ls;
    int64_t ix[4] = {0, 0, 0, 0}; /* the index of entry i0 in the view (pools != NULL) */
    if (t->pools != NULL) {
        line_init(t, &ls);
        unravel(blk0 * BLOCK, t->dims, ix);
    }
    for (int64_t blk = blk0; blk < blk1; blk++) {
        const int64_t i0 = blk * BLOCK;
        const int nb = (t->n - i0) < BLOCK ? (int)(t->n - i0) : BLOCK;
        v8 x[MAX_FEATURES][NV], h[MAX_WIDTH][NV], h2[MAX_WIDTH][NV], y[MAX_OUT][NV];
        if (nb == BLOCK) {
            for (int u = 0; u < NV; u++) {
                const int64_t i = i0 + 8 * u;
                x[0][u] = load(t->p + i);
                x[1][u] = load(t->g + i);
                for (int q = 0; q < k; q++)
                    x[2 + q][u] = load(t->m + q * t->m_stride + i);
                x[2 + k][u] = load(t->v + i);
            }
        } else { /* the last, short block: zero-padded */
            float tmp[MAX_FEATURES][BLOCK];
            memset(tmp, 0, sizeof tmp);
            for (int b = 0; b < nb; b++) {
                tmp[0][b] = t->p[i0 + b];
                tmp[1][b] = t->g[i0 + b];
                for (int q = 0; q < k; q++)
                    tmp[2 + q][b] = t->m[q * t->m_stride + i0 + b];
                tmp[2 + k][b] = t->v[i0 + b];
            }
            for (int f = 0; f < 3 + k; f++)
                for (int u = 0; u < NV; u++)
                    x[f][u] = load(tmp[f] + 8 * u);
        }
        for (int u = 0; u < NV; u++) {
            x[2 + k][u] = vsqrt(x[2 + k][u]);
            const v8 d = x[2 + k][u] * splat(net->rsqrt_c2) + splat(net->eps);
            x[3 + k][u] = x[1][u] / d;
            x[4 + k][u] = x[2 + net->adam_momentum][u] / d;
        }
        /* Four hidden units at a time: each feature vector feeds four
         * independent chains, each weight two. */
        int j = 0;
        for (; j + 4 <= width; j += 4) {
            v8 a[4][NV];
            const float *w = net->w_in + j * nf;
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++)
                for (int u = 0; u < NV; u++)
                    a[q][u] = splat(net->b_in[j + q]);
            for (int f = 0; f < nf; f++)
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++) {
                    const v8 wq = splat(w[q * nf + f]);
                    for (int u = 0; u < NV; u++)
                        a[q][u] += wq * x[f][u];
                }
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++)
                for (int u = 0; u < NV; u++)
                    h[j + q][u] = relu(a[q][u]);
        }
        for (; j < width; j++) {
            v8 a[NV];
            for (int u = 0; u < NV; u++)
                a[u] = splat(net->b_in[j]);
            for (int f = 0; f < nf; f++)
                for (int u = 0; u < NV; u++)
                    a[u] += splat(net->w_in[j * nf + f]) * x[f][u];
            for (int u = 0; u < NV; u++)
                h[j][u] = relu(a[u]);
        }
        for (int layer = 0; layer < net->depth - 1; layer++) {
            const float *w = net->w_hidden + (int64_t)layer * width * width;
            const float *bias = net->b_hidden + (int64_t)layer * width;
            for (int jj = 0; jj < width; jj++) {
                v8 a[NV];
                for (int u = 0; u < NV; u++)
                    a[u] = splat(bias[jj]);
                for (int f = 0; f < width; f++)
                    for (int u = 0; u < NV; u++)
                        a[u] += splat(w[jj * width + f]) * h[f][u];
                for (int u = 0; u < NV; u++)
                    h2[jj][u] = relu(a[u]);
            }
            memcpy(h, h2, width * sizeof h[0]);
        }
        /* Up to six outputs at a time: 12 independent chains hide the
         * multiply-add latency. */
        for (int r = 0; r < net->n_out;) {
            const int left = net->n_out - r;
            if (left >= 6)
                r += out_rows(6, net->w_out + r * width, net->b_out + r, width, h, y + r);
            else if (left >= 4)
                r += out_rows(4, net->w_out + r * width, net->b_out + r, width, h, y + r);
            else if (left >= 2)
                r += out_rows(2, net->w_out + r * width, net->b_out + r, width, h, y + r);
            else
                r += out_rows(1, net->w_out + r * width, net->b_out + r, width, h, y + r);
        }
        for (int r = 0; r < net->n_store; r++) {
            float *o = t->out + r * t->out_stride + i0;
            if (nb == BLOCK)
                for (int u = 0; u < NV; u++)
                    store(o + 8 * u, y[r][u]);
            else
                for (int b = 0; b < nb; b++)
                    o[b] = y[r][b / 8][b % 8];
        }
        if (net->n_pool > net->n_out) /* the statistics, after the outputs */
            for (int u = 0; u < NV; u++) {
                y[net->n_out][u] = x[0][u] * x[0][u];
                y[net->n_out + 1][u] = x[4 + k][u] * x[4 + k][u];
                y[net->n_out + 2][u] = x[1][u] * x[1][u];
            }
        if (t->pools != NULL) {
            pool_generic(t, i0, ix, nb, y, rows, &ls);
            if (ix[3] + BLOCK < t->dims[3]) /* the next block: no divisions inside a line */
                ix[3] += BLOCK;
            else
                unravel(i0 + BLOCK, t->dims, ix);
        } else if (t->cols > 0)
            pool_block(net, t, i0, nb, y, rows, cols);
        for (int u = 0; u < NV; u++) {
            const v8 scaled = splat(net->base_scale) * x[4 + k][u];
            if (nb == BLOCK)
                store(t->base + i0 + 8 * u, scaled);
            else
                for (int b = 8 * u; b < nb; b++)
                    t->base[i0 + b] = scaled[b - 8 * u];
        }
    }
    if (t->pools != NULL)
        line_flush(t, &ls, rows);
}

#define MAX_THREADS 256 /* slots for per-thread partial sums */

/* This thread's share [*begin, *end) of `units` equal pieces of work, in
 * thread order; returns its id. */
static int thread_share(int64_t units, int64_t *begin, int64_t *end)
{
    int id = 0, count = 1;
#ifdef _OPENMP
    id = omp_get_thread_num();
    count = omp_get_num_threads();
#endif
    *begin = units * id / count;
    *end = units * (id + 1) / count;
    return id;
}

/* The same in whole vectors of 8 entries, the last one clipped to n. */
static int thread_range(int64_t n, int64_t *begin, int64_t *end)
{
    const int id = thread_share((n + 7) / 8, begin, end);
    *begin *= 8;
    *end = 8 * *end < n ? 8 * *end : n;
    return id;
}

static int thread_count(int threads)
{
#ifdef _OPENMP
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
#else
    (void)threads;
    return 1;
#endif
}

int lopt_entry_outputs(
    int64_t n, const float *p, const float *g, const float *m, int64_t m_stride, int k_momenta,
    int adam_momentum, const float *v, float rsqrt_c2, float eps, int width, int depth,
    const float *w_in, const float *b_in, const float *w_hidden, const float *b_hidden, int n_out,
    const float *w_out, const float *b_out, float base_scale, int n_store, float *out, float *base,
    int64_t pool_cols, float *row_sums, float *col_sums, int stats, int threads)
{
    const int n_pool = n_out + (stats ? 3 : 0);
    if (width > MAX_WIDTH || n_pool > MAX_OUT || k_momenta + 5 > MAX_FEATURES || width < 1 ||
        depth < 1 || adam_momentum < 0 || adam_momentum >= k_momenta || n_store < 0 ||
        n_store > n_out || pool_cols < 0 || (pool_cols == 0 && n_store != n_pool) ||
        (pool_cols > 0 && n % pool_cols != 0))
        return 1;
    const struct net net = {k_momenta, adam_momentum, width, depth, n_out, n_store, n_pool,
                            rsqrt_c2, eps, base_scale, w_in, b_in, w_hidden, b_hidden,
                            w_out, b_out};
    const struct tensor t = {n, m_stride, pool_cols, n, p, g, m, v, out, base, NULL, NULL, 0};
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    const int nt = thread_count(threads);
    const int pooled = n_pool - n_store;
    const int64_t per_thread = pool_cols > 0 ? pooled * (n / pool_cols + pool_cols) : 0;
    float *scratch = NULL;
    if (per_thread > 0) {
        scratch = calloc((size_t)(nt * per_thread), sizeof(float));
        if (scratch == NULL)
            return 2;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t b0, b1;
        const int id = thread_share(blocks, &b0, &b1);
        float *rows = scratch ? scratch + id * per_thread : NULL;
        float *cols = rows ? rows + pooled * (n / pool_cols) : NULL;
        run_blocks(&net, &t, b0, b1, rows, cols);
    }
    if (scratch != NULL) {
        const int64_t n_rows = pooled * (n / pool_cols), n_cols = pooled * pool_cols;
        memcpy(row_sums, scratch, n_rows * sizeof(float));
        memcpy(col_sums, scratch + n_rows, n_cols * sizeof(float));
        for (int id = 1; id < nt; id++) {
            const float *s = scratch + id * per_thread;
            for (int64_t i = 0; i < n_rows; i++)
                row_sums[i] += s[i];
            for (int64_t i = 0; i < n_cols; i++)
                col_sums[i] += s[n_rows + i];
        }
        free(scratch);
    }
    return 0;
}

#define STATE_CHUNK 4096 /* entries summed in float before adding to double */

static void state_range(int64_t i0, int64_t i1, const float *p, const float *g, float *m,
                        int64_t m_stride, int k_momenta, const float *weights, float *v, float b2,
                        double *sums)
{
    const int ns = k_momenta + 3;
    for (int q = 0; q < ns; q++)
        sums[q] = 0.0;
    for (int64_t c0 = i0; c0 < i1; c0 += STATE_CHUNK) {
        const int64_t c1 = c0 + STATE_CHUNK < i1 ? c0 + STATE_CHUNK : i1;
        v8 acc[MAX_FEATURES];
        float tail[MAX_FEATURES] = {0};
        for (int q = 0; q < ns; q++)
            acc[q] = splat(0.0f);
        int64_t i = c0;
        for (; i + 8 <= c1; i += 8) {
            const v8 gv = load(g + i), pv = load(p + i);
            acc[0] += pv * pv;
            acc[1] += gv * gv;
            for (int q = 0; q < k_momenta; q++) {
                float *mq = m + q * m_stride + i;
                const v8 mv = load(mq), w = splat(weights[q]);
                /* torch.lerp's two forms, for its rounding */
                const v8 next = weights[q] < 0.5f ? mv + w * (gv - mv)
                                                  : gv - (gv - mv) * (splat(1.0f) - w);
                store(mq, next);
                acc[2 + q] += next * next;
            }
            const v8 vv = load(v + i) * splat(b2) + splat(1.0f - b2) * gv * gv;
            store(v + i, vv);
            acc[2 + k_momenta] += vv;
        }
        for (; i < c1; i++) {
            tail[0] += p[i] * p[i];
            tail[1] += g[i] * g[i];
            for (int q = 0; q < k_momenta; q++) {
                float *mq = m + q * m_stride + i;
                const float w = weights[q];
                const float next = w < 0.5f ? *mq + w * (g[i] - *mq) : g[i] - (g[i] - *mq) * (1.0f - w);
                *mq = next;
                tail[2 + q] += next * next;
            }
            v[i] = v[i] * b2 + (1.0f - b2) * g[i] * g[i];
            tail[2 + k_momenta] += v[i];
        }
        for (int q = 0; q < ns; q++)
            sums[q] += (double)hsum(acc[q]) + (double)tail[q];
    }
}

int lopt_state_update(int64_t n, const float *p, const float *g, float *m, int64_t m_stride,
                      int k_momenta, const float *weights, float *v, float b2, double *sums,
                      int threads)
{
    if (k_momenta < 1 || k_momenta + 3 > MAX_FEATURES)
        return 1;
    const int nt = thread_count(threads);
    double partial[MAX_THREADS][MAX_FEATURES] = {{0}}; /* zero where a thread never ran */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t i0, i1;
        const int id = thread_range(n, &i0, &i1);
        state_range(i0, i1, p, g, m, m_stride, k_momenta, weights, v, b2, partial[id]);
    }
    for (int q = 0; q < k_momenta + 3; q++) {
        sums[q] = 0.0;
        for (int id = 0; id < nt; id++)
            sums[q] += partial[id][q];
    }
    return 0;
}

/* exp(a) for a <= 88: 2^k * e^r with |r| <= ln(2)/2 and a degree-7 Taylor
 * polynomial of e^r (relative error below 1e-8 before rounding); 0 below
 * -87.3; NaN stays NaN. */
static inline v8 vexp(v8 a)
{
    typedef uint32_t v8u __attribute__((vector_size(32)));
    const v8 ln2_hi = splat(0.693359375f), ln2_lo = splat(-2.12194440e-4f);
    const v8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8 t = a * splat(1.44269504088896341f);
    const v8i low = t < splat(-126.0f);
    t = (v8)(((v8i)t & ~low) | ((v8i)splat(-126.0f) & low)) + magic;
    const v8 kf = t - magic;
    const v8 r = (a - kf * ln2_hi) - kf * ln2_lo;
    v8 e = splat(1.0f / 5040.0f);
    e = e * r + splat(1.0f / 720.0f);
    e = e * r + splat(1.0f / 120.0f);
    e = e * r + splat(1.0f / 24.0f);
    e = e * r + splat(1.0f / 6.0f);
    e = e * r + splat(0.5f);
    e = e * r + splat(1.0f);
    e = e * r + splat(1.0f);
    /* t's low mantissa bits hold k: 2^k has exponent bits k + 127. */
    const v8 scale = (v8)(((v8u)t - 0x4B400000u + 127u) << 23);
    const v8i tiny = a < splat(-87.3f);
    return (v8)((v8i)(e * scale) & ~tiny);
}

/* min(a, hi) that keeps NaN, as torch's clamp does. */
static inline v8 vmin(v8 a, float hi)
{
    const v8i above = a > splat(hi);
    return (v8)(((v8i)a & ~above) | ((v8i)splat(hi) & above));
}

/* Entries [e0, e1) of the update; returns their sum. */
static double finish_range(int64_t e0, int64_t e1, const float *dir, const float *mag,
                           float *base, int64_t cols, const float *row_terms,
                           const float *col_terms, int64_t col_stride, float max_mag)
{
    double total = 0.0;
    int64_t e = e0;
    while (e < e1) {
        const int64_t row = e / cols, c0 = e - row * cols;
        const int64_t c1 = (e1 - row * cols) < cols ? (e1 - row * cols) : cols;
        float rd = 0.0f, rm = 0.0f;
        if (row_terms) {
            rd = row_terms[2 * row];
            rm = row_terms[2 * row + 1];
        }
        const float *cd = col_terms, *cm = col_terms ? col_terms + col_stride : NULL;
        const int64_t off = row * cols;
        v8 acc = splat(0.0f);
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8) {
            v8 dv = load(dir + off + c) + splat(rd), mv = load(mag + off + c) + splat(rm);
            if (cd) {
                dv += load(cd + c);
                mv += load(cm + c);
            }
            const v8 u = load(base + off + c) + dv * vexp(vmin(mv, max_mag));
            store(base + off + c, u);
            acc += u;
        }
        float tail = 0.0f;
        for (; c < c1; c++) {
            const float dv = dir[off + c] + rd + (cd ? cd[c] : 0.0f);
            float mv = mag[off + c] + rm + (cd ? cm[c] : 0.0f);
            mv = mv > max_mag ? max_mag : mv;
            const float u = base[off + c] + dv * expf(mv);
            base[off + c] = u;
            tail += u;
        }
        total += (double)(hsum(acc) + tail);
        e = off + c1;
    }
    return total;
}

double lopt_finish(int64_t n, const float *dir, const float *mag, float *base, int64_t cols,
                   const float *row_terms, const float *col_terms, int64_t col_stride,
                   float max_mag, int threads)
{
    /* Entries are a (n / cols, cols) matrix; row_terms is (n / cols, 2) and
     * col_terms (2, cols) with its rows col_stride apart, each may be NULL. */
    if (cols < 1 || n % cols != 0 || (col_terms && col_stride < cols))
        return NAN;
    const int nt = thread_count(threads);
    double partial[MAX_THREADS] = {0};
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t e0, e1;
        const int id = thread_range(n, &e0, &e1);
        partial[id] = finish_range(e0, e1, dir, mag, base, cols, row_terms, col_terms, col_stride,
                                   max_mag);
    }
    double total = 0.0;
    for (int id = 0; id < nt; id++)
        total += partial[id];
    return total;
}

/* ------------------------------------------------------------------------
 * The multi-tensor step: every tensor of a parameter group in one call per
 * pass, described by tables the caller builds once per weight space
 * (lopt.fused_plan). Tensors too small to split between threads are shared
 * out whole, one thread each; larger ones are split as above. Every sum is
 * reduced in a fixed order, so results depend only on the thread count.
 * ------------------------------------------------------------------------ */

/* Threads for a tensor of n entries: one per min_entries (the caller's
 * lopt.fused.MIN_ENTRIES_PER_THREAD), at most nt. */
static int threads_for(int64_t n, int nt, int64_t min_entries)
{
    const int64_t most = min_entries > 0 ? n / min_entries : nt;
    return most < 1 ? 1 : most < nt ? (int)most : nt;
}

/* A state tensor's descriptor (int64) starts n, p, g, m, m_stride, v; rows
 * are `stride` apart (a longer descriptor, lopt_entry_outputs_many's, serves). */
#define STATE_FIELDS 6

static void state_one(const int64_t *d, int k_momenta, const float *weights, float b2,
                      double *sums, int threads)
{
    lopt_state_update(d[0], (const float *)d[1], (const float *)d[2], (float *)d[3], d[4],
                      k_momenta, weights, (float *)d[5], b2, sums, threads);
}

/* Whether every entry of g[i0, i1) has a finite square (as
 * lopt.functional.all_finite reads a gradient): x * x * 0 is 0 then, NaN for
 * an infinite, NaN or huge x, and a NaN stays in the sum. */
static int finite_range(const float *g, int64_t i0, int64_t i1)
{
    v8 acc = splat(0.0f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        const v8 x = load(g + i);
        acc += x * x * splat(0.0f);
    }
    float tail = 0.0f;
    for (; i < i1; i++)
        tail += g[i] * g[i] * 0.0f;
    return hsum(acc) + tail == 0.0f;
}

static int finite_one(const float *g, int64_t n, int nt)
{
    int ok = 1;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(& : ok)
    {
        int64_t a, b;
        thread_range(n, &a, &b);
        ok &= finite_range(g, a, b);
    }
    return ok;
}

/* lopt_state_update for every tensor of a group, once every gradient is
 * known to be finite: returns 3 (nothing written) when one is not, so a
 * caller that skips such a step needs no pass of its own over them. */
int lopt_state_update_many(int count, const int64_t *desc, int64_t stride, int k_momenta,
                           const float *weights, float b2, double *sums, int64_t min_entries,
                           int threads)
{
    if (k_momenta < 1 || k_momenta + 3 > MAX_FEATURES || stride < STATE_FIELDS)
        return 1;
    const int nt = thread_count(threads);
    int ok = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1) reduction(& : ok)
    for (int i = 0; i < count; i++) {
        const int64_t *d = desc + (int64_t)i * stride;
        if (threads_for(d[0], nt, min_entries) == 1)
            ok &= finite_range((const float *)d[2], 0, d[0]);
    }
    for (int i = 0; i < count && ok; i++) {
        const int64_t *d = desc + (int64_t)i * stride;
        const int ti = threads_for(d[0], nt, min_entries);
        if (ti > 1)
            ok &= finite_one((const float *)d[2], d[0], ti);
    }
    if (!ok)
        return 3;
    /* Small tensors shared out whole; then large ones, each split (a
     * parallel region of its own, not nested in another). */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int i = 0; i < count; i++)
        if (threads_for(desc[(int64_t)i * stride], nt, min_entries) == 1)
            state_one(desc + (int64_t)i * stride, k_momenta, weights, b2,
                      sums + i * (k_momenta + 3), 1);
    for (int i = 0; i < count; i++) {
        const int ti = threads_for(desc[(int64_t)i * stride], nt, min_entries);
        if (ti > 1)
            state_one(desc + (int64_t)i * stride, k_momenta, weights, b2,
                      sums + i * (k_momenta + 3), ti);
    }
    return 0;
}

/* A tensor's descriptor (int64) for lopt_entry_outputs_many. */
enum {
    E_N, E_P, E_G, E_M, E_M_STRIDE, E_V, E_OFFSET, E_N_OUT, E_STATS, E_D0, E_D1, E_D2, E_D3,
    E_POOL_BEGIN, E_POOL_END, E_SCRATCH, E_SCRATCH_AT, ENTRY_FIELDS
};

/* Sum the derived pools from their sources, then write every pool's sums
 * times its scale to its destination, channels last. */
static void finish_pools(const struct tensor *t, const float *scale, float *acc)
{
    for (int q = 0; q < t->n_pools; q++) {
        const struct pool *pl = t->pools + q;
        if (pl->src < 0)
            continue;
        const struct pool *sp = t->pools + pl->src;
        float *a = acc + pl->soff;
        const float *sa = acc + sp->soff;
        if (pl->kind == POOL_AXIS) {
            int64_t outer = 1, inner = 1;
            for (int64_t x = 0; x < pl->axis; x++)
                outer *= pl->sd[x];
            for (int64_t x = pl->axis + 1; x < 4; x++)
                inner *= pl->sd[x];
            const int64_t mid = pl->sd[pl->axis];
            for (int64_t c = 0; c < pl->nc; c++) {
                const float *src = sa + c * sp->rows;
                float *dst = a + c * pl->rows;
                if (inner < 8) /* short rows: each sum in a register, not in memory */
                    for (int64_t o = 0; o < outer; o++)
                        for (int64_t x = 0; x < inner; x++) {
                            const float *col = src + o * mid * inner + x;
                            float sum = 0.0f;
                            for (int64_t k = 0; k < mid; k++)
                                sum += col[k * inner];
                            dst[o * inner + x] += sum;
                        }
                else /* whole rows at a time: vectors */
                    for (int64_t o = 0; o < outer; o++)
                        for (int64_t k = 0; k < mid; k++) {
                            const float *row = src + (o * mid + k) * inner;
                            float *out_row = dst + o * inner;
                            for (int64_t x = 0; x < inner; x++)
                                out_row[x] += row[x];
                        }
            }
            continue;
        }
        int64_t k[4] = {0, 0, 0, 0};
        for (int64_t r = 0; r < sp->rows; r++) {
            const int64_t dr = k[0] * pl->s[0] + k[1] * pl->s[1] + k[2] * pl->s[2] + k[3] * pl->s[3];
            for (int64_t c = 0; c < pl->nc; c++)
                a[c * pl->rows + dr] += sa[c * sp->rows + r];
            next_index(k, pl->sd);
        }
    }
    for (int q = 0; q < t->n_pools; q++) {
        const struct pool *pl = t->pools + q;
        float *dst = (float *)pl->dst;
        if (dst == NULL) /* an intermediate sum alone */
            continue;
        const float *a = acc + pl->soff;
        for (int64_t r = 0; r < pl->rows; r++)
            for (int64_t c = 0; c < pl->nc; c++)
                dst[r * pl->nc + c] = a[c * pl->rows + r] * scale[q];
    }
}

/* One tensor's pass on nt threads; returns 2 when scratch cannot be had. */
static int entry_pass(const struct net *net, const struct tensor *t, int64_t scratch_size,
                      float *own, const float *scale, int nt)
{
    const int64_t blocks = (t->n + BLOCK - 1) / BLOCK;
    float *scratch = NULL;
    if (scratch_size > 0 && nt == 1 && own != NULL) { /* the caller's: no fresh pages */
        scratch = own;
        for (int q = 0; q < t->n_pools; q++) /* sums start at 0; stored entries need not */
            if (t->pools[q].kind != POOL_ENTRIES)
                memset(scratch + t->pools[q].soff, 0,
                       t->pools[q].rows * t->pools[q].nc * sizeof(float));
    } else if (scratch_size > 0) {
        scratch = calloc((size_t)(nt * scratch_size), sizeof(float));
        if (scratch == NULL)
            return 2;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t b0, b1;
        const int id = thread_share(blocks, &b0, &b1);
        run_blocks(net, t, b0, b1, scratch ? scratch + id * scratch_size : NULL, NULL);
    }
    if (scratch != NULL) {
        for (int id = 1; id < nt; id++)
            for (int64_t i = 0; i < scratch_size; i++)
                scratch[i] += scratch[id * scratch_size + i];
        finish_pools(t, scale, scratch);
        if (scratch != own)
            free(scratch);
    }
    return 0;
}

struct entry_shared {
    const int64_t *desc;
    const float *base_scale;
    const int64_t *pool_table;
    const float *pool_scale;
    int k_momenta, adam_momentum;
    float rsqrt_c2, eps;
    int width, depth;
    const float *w_in, *b_in, *w_hidden, *b_hidden;
    int n_out_max;
    const float *w_out, *b_out;
    float *out;
    int64_t out_stride;
    float *base;
    float *scratch; /* each tensor's pool sums at its scratch_at, or NULL */
};

/* Tensor i of lopt_entry_outputs_many on nt threads. */
static int entry_one(const struct entry_shared *s, int i, int nt)
{
    const int64_t *d = s->desc + (int64_t)i * ENTRY_FIELDS;
    const int nf = s->k_momenta + 5, width = s->width, n_out = (int)d[E_N_OUT];
    const struct net net = {s->k_momenta, s->adam_momentum, width, s->depth, n_out, 2,
                            n_out + (d[E_STATS] ? 3 : 0), s->rsqrt_c2, s->eps, s->base_scale[i],
                            s->w_in + (int64_t)i * width * nf, s->b_in, s->w_hidden, s->b_hidden,
                            s->w_out + (int64_t)i * s->n_out_max * width,
                            s->b_out + (int64_t)i * s->n_out_max};
    const int64_t p0 = d[E_POOL_BEGIN];
    const struct tensor t = {d[E_N], d[E_M_STRIDE], 0, s->out_stride,
                             (const float *)d[E_P], (const float *)d[E_G],
                             (const float *)d[E_M], (const float *)d[E_V],
                             s->out + d[E_OFFSET], s->base + d[E_OFFSET], d + E_D0,
                             (const struct pool *)(s->pool_table + p0 * POOL_FIELDS),
                             (int)(d[E_POOL_END] - p0)};
    float *own = s->scratch ? s->scratch + d[E_SCRATCH_AT] : NULL;
    return entry_pass(&net, &t, d[E_SCRATCH], own, s->pool_scale + p0, nt);
}

/* lopt_entry_outputs for every tensor of a group: tensor i reads its own
 * first layer w_in + i * width * nf, output layer w_out + i * n_out_max *
 * width (its first n_out rows) and bias b_out + i * n_out_max, and the
 * shared hidden layers; rows 0 and 1 of its outputs go to out + offset and
 * out + out_stride + offset, Adam's part times base_scale[i] to base +
 * offset; its pools (rows [pool_begin, pool_end) of the pool table, their
 * scales alike) sum the other rows, and with stats the three statistics
 * after them, as struct pool says. */
int lopt_entry_outputs_many(int count, const int64_t *desc, const float *base_scale,
                            const int64_t *pool_table, const float *pool_scale, int k_momenta,
                            int adam_momentum, float rsqrt_c2, float eps, int width, int depth,
                            const float *w_in, const float *b_in, const float *w_hidden,
                            const float *b_hidden, int n_out_max, const float *w_out,
                            const float *b_out, float *out, int64_t out_stride, float *base,
                            float *scratch, int64_t scratch_len, int64_t min_entries,
                            int threads)
{
    if (width > MAX_WIDTH || width < 1 || depth < 1 || k_momenta + 5 > MAX_FEATURES ||
        adam_momentum < 0 || adam_momentum >= k_momenta || n_out_max < 2)
        return 1;
    for (int i = 0; i < count; i++) {
        const int64_t *d = desc + (int64_t)i * ENTRY_FIELDS;
        if (d[E_N_OUT] < 2 || d[E_N_OUT] > n_out_max || d[E_N_OUT] + 3 * d[E_STATS] > MAX_OUT ||
            d[E_D0] * d[E_D1] * d[E_D2] * d[E_D3] != d[E_N] ||
            (scratch && d[E_SCRATCH_AT] + d[E_SCRATCH] > scratch_len))
            return 1;
    }
    const int nt = thread_count(threads);
    const struct entry_shared shared = {desc, base_scale, pool_table, pool_scale, k_momenta,
                                        adam_momentum, rsqrt_c2, eps, width, depth, w_in, b_in,
                                        w_hidden, b_hidden, n_out_max, w_out, b_out, out,
                                        out_stride, base, scratch};
    int status = 0;
    /* Small tensors shared out whole; then large ones, each split. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1) reduction(| : status)
    for (int i = 0; i < count; i++)
        if (threads_for(desc[(int64_t)i * ENTRY_FIELDS + E_N], nt, min_entries) == 1)
            status |= entry_one(&shared, i, 1);
    for (int i = 0; i < count; i++) {
        const int ti = threads_for(desc[(int64_t)i * ENTRY_FIELDS + E_N], nt, min_entries);
        if (ti > 1)
            status |= entry_one(&shared, i, ti);
    }
    return status;
}

/* A tensor's descriptor (int64) for lopt_finish_many, and a term's. */
enum {
    F_N, F_OFFSET, F_D0, F_D1, F_D2, F_D3, F_TERM_BEGIN, F_TERM_END, F_ROWS, F_P, F_OPS_BEGIN,
    F_OPS_END, FINISH_FIELDS
};
/* An op that sums a tensor's terms densely before its finish (a short last
 * axis, where adding each term per entry would be scalar work): int64
 * fields kind, dst, src (direction), src2 (log-magnitude), count, outer,
 * mid, inner, dst_stride, src_stride; each node holds (direction,
 * log-magnitude) rows dst_stride apart. */
enum { OP_ZERO, OP_ADD, OP_EXPAND };
#define OP_FIELDS 10

static void dense_ops(const int64_t *ops, int64_t n_ops)
{
    for (int64_t q = 0; q < n_ops; q++) {
        const int64_t *op = ops + q * OP_FIELDS;
        float *dst = (float *)op[1];
        const int64_t count = op[4], outer = op[5], mid = op[6], inner = op[7];
        const int64_t dst_stride = op[8], src_stride = op[9];
        if (op[0] == OP_ZERO) {
            memset(dst, 0, count * sizeof(float));
        } else if (op[0] == OP_ADD) { /* a term, laid out as the node */
            const float *src[2] = {(const float *)op[2], (const float *)op[3]};
            for (int c = 0; c < 2; c++)
                for (int64_t r = 0; r < count; r++)
                    dst[c * dst_stride + r] += src[c][r];
        } else { /* OP_EXPAND: a node over one more axis, broadcast along it */
            for (int c = 0; c < 2; c++) {
                const float *src = (const float *)op[2] + c * src_stride;
                float *d = dst + c * dst_stride;
                for (int64_t o = 0; o < outer; o++)
                    for (int64_t k = 0; k < mid; k++) {
                        float *row = d + (o * mid + k) * inner;
                        const float *from = src + o * inner;
                        for (int64_t x = 0; x < inner; x++)
                            row[x] += from[x];
                    }
            }
        }
    }
}
#define TERM_FIELDS 6 /* dir address, mag address, s[4] */
#define MAX_TERMS 64

struct finish_tensor {
    const float *dir, *mag;
    float *base;
    const int64_t *dims, *terms;
    int n_terms;
};

/* Entries [e0, e1) of one tensor: l = (dir + terms) * exp(min(mag + terms,
 * max_mag)). Without w: base = (base + l) * scale, returning the sum; with
 * w (the row's weights): base = base + l, adding l . w and w . w to dots. */
static double finish_entries(const struct finish_tensor *f, int64_t e0, int64_t e1,
                             float max_mag, float scale, const float *w, float *dots)
{
    const int64_t *d = f->dims;
    double total = 0.0;
    v8 lw = splat(0.0f), ww = splat(0.0f);
    float lw_tail = 0.0f, ww_tail = 0.0f;
    /* Terms that move along the last axis are added per entry; the others
     * are constant over a run of it and are summed once per run. */
    int moving[MAX_TERMS], fixed[MAX_TERMS], n_moving = 0, n_fixed = 0;
    for (int q = 0; q < f->n_terms; q++) {
        if (f->terms[q * TERM_FIELDS + 5] != 0)
            moving[n_moving++] = q;
        else
            fixed[n_fixed++] = q;
    }
    int64_t j[4];
    unravel(e0, d, j);
    int64_t e = e0;
    while (e < e1) {
        const int64_t end = e + (d[3] - j[3]) < e1 ? e + (d[3] - j[3]) : e1;
        const float *td[MAX_TERMS], *tm[MAX_TERMS];
        for (int q = 0; q < f->n_terms; q++) {
            const int64_t *tq = f->terms + q * TERM_FIELDS;
            const int64_t r = j[0] * tq[2] + j[1] * tq[3] + j[2] * tq[4] + j[3] * tq[5];
            td[q] = (const float *)tq[0] + r;
            tm[q] = (const float *)tq[1] + r;
        }
        float cd = 0.0f, cm = 0.0f;
        for (int k = 0; k < n_fixed; k++) {
            cd += *td[fixed[k]];
            cm += *tm[fixed[k]];
        }
        v8 acc = splat(0.0f);
        int64_t c = e;
        for (; c + 8 <= end; c += 8) {
            const int64_t o = c - e;
            v8 dv = load(f->dir + c) + splat(cd), mv = load(f->mag + c) + splat(cm);
            for (int k = 0; k < n_moving; k++) {
                dv += load(td[moving[k]] + o);
                mv += load(tm[moving[k]] + o);
            }
            const v8 l = dv * vexp(vmin(mv, max_mag));
            if (w) {
                const v8 wv = load(w + c - e0);
                lw += l * wv;
                ww += wv * wv;
                store(f->base + c, load(f->base + c) + l);
            } else {
                const v8 u = (load(f->base + c) + l) * splat(scale);
                store(f->base + c, u);
                acc += u;
            }
        }
        float tail = 0.0f;
        for (; c < end; c++) {
            const int64_t o = c - e;
            float dv = f->dir[c] + cd, mv = f->mag[c] + cm;
            for (int k = 0; k < n_moving; k++) {
                dv += td[moving[k]][o];
                mv += tm[moving[k]][o];
            }
            mv = mv > max_mag ? max_mag : mv;
            const float l = dv * expf(mv);
            if (w) {
                lw_tail += l * w[c - e0];
                ww_tail += w[c - e0] * w[c - e0];
                f->base[c] += l;
            } else {
                const float u = (f->base[c] + l) * scale;
                f->base[c] = u;
                tail += u;
            }
        }
        total += (double)(hsum(acc) + tail);
        e = end;
        j[3] = d[3] - 1; /* the run's last entry: the next one starts a run */
        next_index(j, d);
    }
    if (w) {
        dots[0] += hsum(lw) + lw_tail;
        dots[1] += hsum(ww) + ww_tail;
    }
    return total;
}

/* Rows [r0, r1) of a weight (row length len) with the tangent rule: the
 * learned term's part along each row removed, then the scale. */
static double finish_rows(const struct finish_tensor *f, const float *p, int64_t len, int64_t r0,
                          int64_t r1, float max_mag, float scale)
{
    double total = 0.0;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t e0 = r * len;
        float dots[2] = {0.0f, 0.0f};
        finish_entries(f, e0, e0 + len, max_mag, scale, p + e0, dots);
        const float along = dots[0] / (dots[1] + 1e-30f);
        float *u = f->base + e0;
        const float *w = p + e0;
        v8 acc = splat(0.0f);
        int64_t c = 0;
        for (; c + 8 <= len; c += 8) {
            const v8 x = (load(u + c) - splat(along) * load(w + c)) * splat(scale);
            store(u + c, x);
            acc += x;
        }
        float tail = 0.0f;
        for (; c < len; c++) {
            u[c] = (u[c] - along * w[c]) * scale;
            tail += u[c];
        }
        total += (double)(hsum(acc) + tail);
    }
    return total;
}

static double finish_pass(const struct finish_tensor *f, int64_t n, int64_t rows, const float *p,
                          float max_mag, float scale, int nt)
{
    double partial[MAX_THREADS] = {0};
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t a, b;
        int id;
        if (rows > 0) {
            id = thread_share(rows, &a, &b);
            partial[id] = finish_rows(f, p, n / rows, a, b, max_mag, scale);
        } else {
            id = thread_range(n, &a, &b);
            partial[id] = finish_entries(f, a, b, max_mag, scale, NULL, NULL);
        }
    }
    double total = 0.0;
    for (int id = 0; id < nt; id++)
        total += partial[id];
    return total;
}

static double finish_one(const int64_t *d, const int64_t *terms, const int64_t *ops,
                         const float *out, int64_t out_stride, float *base, float max_mag,
                         float scale, int nt)
{
    if (d[F_OPS_END] > d[F_OPS_BEGIN])
        dense_ops(ops + d[F_OPS_BEGIN] * OP_FIELDS, d[F_OPS_END] - d[F_OPS_BEGIN]);
    const struct finish_tensor f = {out + d[F_OFFSET], out + out_stride + d[F_OFFSET],
                                    base + d[F_OFFSET], d + F_D0,
                                    terms + d[F_TERM_BEGIN] * TERM_FIELDS,
                                    (int)(d[F_TERM_END] - d[F_TERM_BEGIN])};
    return finish_pass(&f, d[F_N], d[F_ROWS], (const float *)d[F_P], max_mag, scale, nt);
}

/* The updates of every tensor of a group, over base (see finish_entries and
 * finish_rows; rows > 0: the tangent rule with the parameter at p); writes
 * each tensor's sum to sums[i] and returns their total (not finite when an
 * update is not), or NaN for a bad table. */
double lopt_finish_many(int count, const int64_t *desc, const int64_t *terms, const int64_t *ops,
                        const float *out, int64_t out_stride, float *base, float max_mag,
                        float scale, double *sums, int64_t min_entries, int threads)
{
    for (int i = 0; i < count; i++) {
        const int64_t *d = desc + (int64_t)i * FINISH_FIELDS;
        if (d[F_TERM_END] - d[F_TERM_BEGIN] > MAX_TERMS || (d[F_ROWS] > 0 && d[F_N] % d[F_ROWS]) ||
            d[F_D0] * d[F_D1] * d[F_D2] * d[F_D3] != d[F_N])
            return NAN;
    }
    const int nt = thread_count(threads);
    /* Small tensors shared out whole; then large ones, each split. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int i = 0; i < count; i++)
        if (threads_for(desc[(int64_t)i * FINISH_FIELDS + F_N], nt, min_entries) == 1)
            sums[i] = finish_one(desc + (int64_t)i * FINISH_FIELDS, terms, ops, out, out_stride,
                                 base, max_mag, scale, 1);
    for (int i = 0; i < count; i++) {
        const int ti = threads_for(desc[(int64_t)i * FINISH_FIELDS + F_N], nt, min_entries);
        if (ti > 1)
            sums[i] = finish_one(desc + (int64_t)i * FINISH_FIELDS, terms, ops, out, out_stride,
                                 base, max_mag, scale, ti);
    }
    double total = 0.0;
    for (int i = 0; i < count; i++)
        total += sums[i];
    return total;
}

/* The NF-layer's broadcast terms (lopt.nn.flat_terms) from its pooled means
 * (rows_p, c_in), channels last: each bag (a row of bags: output row, key,
 * members, first member in `members`; sorted by output row) adds its key's
 * weight (c_in, c_out) times the mean of its members' rows of means to its
 * output row, and each bias row its bias; then every output row is
 * multiplied by its tensor's two scales (scale[row_tensor[r] * 2 + channel])
 * and written to dst (2, rows; row stride dst_stride): with c_out == 1 the
 * direction is 0 and the value is the log-magnitude's. Threads take bag
 * ranges that end where an output row does, so no row has two writers. */
/* flat_bags for 4 channels in and 1 out (the shipped nets'), unrolled. */
static void flat_bags_4_1(const int64_t *bags, int64_t b0, int64_t b1, const int64_t *members,
                          const float *means, const float *w, float *out)
{
    for (int64_t k = b0; k < b1; k++) {
        const int64_t *bag = bags + 4 * k;
        const int64_t m = bag[2], *mem = members + bag[3];
        const float *wk = w + bag[1] * 4;
        const float *row = means + mem[0] * 4;
        float a0 = row[0], a1 = row[1], a2 = row[2], a3 = row[3];
        for (int64_t j = 1; j < m; j++) {
            row = means + mem[j] * 4;
            a0 += row[0];
            a1 += row[1];
            a2 += row[2];
            a3 += row[3];
        }
        const float inv = 1.0f / (float)m;
        out[bag[0]] += a0 * inv * wk[0] + a1 * inv * wk[1] + a2 * inv * wk[2] + a3 * inv * wk[3];
    }
}

static void flat_bags(const int64_t *bags, int64_t b0, int64_t b1, const int64_t *members,
                      const float *means, int c_in, const float *w, int c_out, float *out[2],
                      int first)
{
    if (c_in == 4 && c_out == 1) {
        flat_bags_4_1(bags, b0, b1, members, means, w, out[1]);
        return;
    }
    for (int64_t k = b0; k < b1; k++) {
        const int64_t *bag = bags + 4 * k;
        const int64_t m = bag[2], *mem = members + bag[3];
        const float *wk = w + bag[1] * c_in * c_out;
        float mean[MAX_WIDTH];
        const float *row = means + mem[0] * c_in;
        for (int c = 0; c < c_in; c++)
            mean[c] = row[c];
        for (int64_t j = 1; j < m; j++) {
            row = means + mem[j] * c_in;
            for (int c = 0; c < c_in; c++)
                mean[c] += row[c];
        }
        const float inv = 1.0f / (float)m;
        for (int o = 0; o < c_out; o++) {
            float s = 0.0f;
            for (int c = 0; c < c_in; c++)
                s += mean[c] * inv * wk[c * c_out + o];
            out[first + o][bag[0]] += s;
        }
    }
}

void lopt_flat_terms(int64_t n_bags, const int64_t *bags, const int64_t *members, int64_t n_bias,
                     const int64_t *bias_row, const int64_t *bias_index, const float *means,
                     int c_in, const float *w, const float *b, int c_out,
                     const int64_t *row_tensor, const float *scale, int64_t rows, float *dst,
                     int64_t dst_stride, int64_t min_entries, int threads)
{
    float *out[2] = {dst, dst + dst_stride};
    const int first = c_out == 1 ? 1 : 0; /* the output row of channel 0 */
    memset(dst, 0, rows * sizeof(float));
    memset(dst + dst_stride, 0, rows * sizeof(float));
    const int nt = thread_count(n_bags < min_entries / 4 ? 1 : threads);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t b0, b1;
        thread_share(n_bags, &b0, &b1);
        /* Whole rows: start after, and end with, the row a range cuts. */
        while (b0 > 0 && b0 < n_bags && bags[4 * b0] == bags[4 * (b0 - 1)])
            b0++;
        while (b1 > 0 && b1 < n_bags && bags[4 * b1] == bags[4 * (b1 - 1)])
            b1++;
        flat_bags(bags, b0, b1, members, means, c_in, w, c_out, out, first);
    }
    for (int64_t k = 0; k < n_bias; k++)
        for (int o = 0; o < c_out; o++)
            out[first + o][bias_row[k]] += b[bias_index[k] * c_out + o];
    for (int o = first; o < 2; o++)
        for (int64_t r = 0; r < rows; r++)
            out[o][r] *= scale[row_tensor[r] * 2 + o];
}

/* The neuron statistics' log-magnitude terms (lopt.nets.NFNNet.stat_term_buffers)
 * from the sums of p^2, Adam's direction squared before 1 / c1 and g^2 per
 * row (rows, 3), per input-neuron slot (slots, 3) and per tensor (count, 3):
 * with mult = (1, adam_scale^2, 1) and mean = sum * mult / entries, each
 * statistic is 0.5 log(mean + floor) + offset, where floor = (f^2, f^2, f^2
 * g_all + 1e-30) and offset = (shift, 0, -0.5 log(g_all + floor_g)) from
 * the tensor's mean g^2 g_all; a row's term is its statistics times
 * w[ROW], a slot's times w[COLUMN], a tensor's times w[its pool], each times
 * the tensor's scale. Written to dst (2, rows + slots + count; row stride
 * dst_stride), direction rows zero. */
void lopt_stat_terms(int64_t rows, int64_t slots, int count, const float *row_sums,
                     const float *slot_sums, const float *tensor_sums, const int64_t *row_tensor,
                     const float *row_count, const int64_t *slot_tensor, const float *slot_count,
                     const float *numel, const float *shift, const int64_t *whole_pool,
                     const float *adam_scale, const float *scale, const float *w, int row_pool,
                     int column_pool, float stat_floor, float *dst, int64_t dst_stride)
{
    const int64_t n = rows + slots + count;
    float *dir = dst, *mag = dst + dst_stride;
    memset(dir, 0, n * sizeof(float));
    const float f2 = stat_floor * stat_floor;
    for (int64_t k = 0; k < n; k++) {
        int64_t i;
        const float *sums;
        float entries;
        const float *wk;
        if (k < rows) {
            i = row_tensor[k];
            sums = row_sums + 3 * k;
            entries = row_count[k];
            wk = w + 3 * row_pool;
        } else if (k < rows + slots) {
            i = slot_tensor[k - rows];
            sums = slot_sums + 3 * (k - rows);
            entries = slot_count[k - rows];
            wk = w + 3 * column_pool;
        } else {
            i = k - rows - slots;
            sums = tensor_sums + 3 * i;
            entries = numel[i];
            wk = w + 3 * whole_pool[i];
        }
        const float *t = tensor_sums + 3 * i;
        const float g_all = t[2] / numel[i];
        const float floor_g = f2 * g_all + 1e-30f;
        const float mult[3] = {1.0f, adam_scale[i] * adam_scale[i], 1.0f};
        const float floors[3] = {f2, f2, floor_g};
        const float offsets[3] = {shift[i], 0.0f, -0.5f * logf(g_all + floor_g)};
        float s = 0.0f;
        for (int q = 0; q < 3; q++)
            s += (0.5f * logf(sums[q] * mult[q] / entries + floors[q]) + offsets[q]) * wk[q];
        mag[k] = s * scale[i];
    }
}
