/* Compiled CPU kernels, float32 (loaded by kernels/cpu_kernels.py): block-sparse weight matmul (for
   kernels/blocksparse_cpu.py) and band attention (for kernels/cpu_attention.py). Both are built on one
   register-tiled product (rank_updates) and one thread pool per call (parallel), which also runs the tanh
   GELU of training's feed-forward layers (float32 or bfloat16, for kernels/activations.py), its layer
   norms (float32 in, float32 or bfloat16 out, for kernels/layer_norm.py), and the copies between the qkv
   projection's layout and the attention's (heads_copy).

   Block-sparse matmul, blocks of 16, 32 or 64: y = x @ W, W sparse in b x b blocks stored compactly as
   w [nnz][b][b]. bs_mm reads x, dy and w in place: no gathered copies.
     bs_mm: out[:, j] = sum over the list of j of  a[:, src[e]] @ w[wid[e]]  (or @ w[wid[e]]^T with trans).
            The forward is bs_mm over the layout's columns; dX is bs_mm over its rows with trans.
            A tile of R rows x b outputs stays in registers over the whole list, so each output is written
            once; the weight blocks of one output block (at most a few hundred KB) stay in the cache for
            all its row tiles. With trans, an output block's weight blocks are first transposed into a
            per-thread buffer.
     bs_dw: dw[e] = x[:, rows[e]]^T @ dy[:, cols[e]] for every listed block (dW only where W has blocks),
            from packed copies of x's and dy's column blocks, DW_CHUNK tokens at a time.
   Band attention (band_forward, band_backward): query block r reads key blocks r - M + 1 .. r (local and
   similar layouts), in block order [BH][QB][b][D]. Per (batch x head) and query block: the scores of all
   M slots in one [b][M b] buffer (masked entries -inf), an exact softmax per row, P V; the backward takes
   P from the forward where it kept it (probs) or recomputes it from the log-sum-exp, and accumulates dK and
   dV of the key blocks in place, so one thread owns each (batch x head). Each row and key computes only
   the span of the window it reads (Spans), so the masked halves of edge blocks cost nothing.
   Each call runs on `threads` threads (PyTorch's OpenMP threads, or its own without OpenMP: parallel), the work
   split into contiguous ranges of equal cost; each output is summed in the same order whatever the thread count. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vexp.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#ifdef __AVX512F__
#define VL 16 /* floats per vector */
#define ACC 24 /* accumulator vectors a tile keeps in registers (of 32) */
#else
#define VL 8
#define ACC 12 /* of 16 */
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
#define MAX_THREADS 256
#define DW_CHUNK 64 /* tokens per packed chunk in bs_dw */
#define MAX_ROWS 12 /* rows per tile: more did not help (4,096 features, blocks 16-64) */
#define COLUMN_GROUP_BYTES (1 << 20) /* band attention on a strided grid: packed rows per item, at most */
#define MAX_COLUMN_GROUP 16
#define PACKED 9 /* packed buffers per column: q, k, v, dout, o and out, dq, dk, dv */
#define INLINE static inline __attribute__((always_inline))

INLINE vf vld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void vst(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf splat(float a) { return a - (vf){0}; }

/* The widest vectors this build computes with, in bytes: 64 with AVX-512, 32 with AVX2 and FMA, else 0
   (the caller then keeps to its PyTorch schedule: without FMA units this code has no edge). */
int bs_vector_bytes(void) {
#if defined(__AVX512F__)
    return 64;
#elif defined(__AVX2__) && defined(__FMA__)
    return 32;
#else
    return 0;
#endif
}

/* 1 where the parts of a call run on OpenMP's threads (PyTorch's), 0 where on threads of their own. */
int uses_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---- threads ----------------------------------------------------------------------------------------- */

typedef void (*part_fn)(void *arg, int index, int64_t first, int64_t end);
typedef struct { part_fn fn; void *arg; int index; int64_t first, end; } Part;

static void *run_part(void *p) {
    Part *part = p;
    part->fn(part->arg, part->index, part->first, part->end);
    return NULL;
}

/* How many threads run n items: 1 to min(threads, n, MAX_THREADS). */
static int thread_count(int64_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    return threads < 1 ? 1 : threads;
}

/* Run fn over [0, n) in thread_count(n, threads) contiguous parts of about equal cost, part `index` getting
   that index (its scratch); cum[k] (k = 0..n) is the cost of items [0, k) (NULL: one each). Built with OpenMP,
   the parts run on the OpenMP threads PyTorch already keeps (the same libgomp): they are waiting, often
   spinning, after PyTorch's last parallel operation, and threads of our own would have to share the cores with
   them. Without OpenMP the caller runs the first part and starts a thread for each other one (or runs it
   itself where one could not start). */
static void parallel(part_fn fn, void *arg, int64_t n, const int64_t *cum, int threads) {
    threads = thread_count(n, threads);
    Part parts[MAX_THREADS];
    int64_t total = cum ? cum[n] : n, first = 0;
    for (int t = 0; t < threads; t++) {
        int64_t end = n;
        if (t < threads - 1) { /* first item whose cumulative cost reaches this part's share */
            int64_t goal = total * (t + 1) / threads;
            end = first;
            while (end < n && (cum ? cum[end] : end) < goal) end++;
        }
        parts[t] = (Part){fn, arg, t, first, end};
        first = end;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) /* fewer threads: each runs more */
        if (parts[t].first < parts[t].end) run_part(&parts[t]);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++)
        started[t] = parts[t].first < parts[t].end && pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0;
    for (int t = 1; t < threads; t++)
        if (!started[t] && parts[t].first < parts[t].end) run_part(&parts[t]);
    if (parts[0].first < parts[0].end) run_part(&parts[0]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
#endif
}

/* ---- out = a @ blocks --------------------------------------------------------------------------------- */

/* acc[r * NV + v] += sum_k a[r * a_row + k * a_red] * bm[k * b_red + v * VL] for r < R, k < K: rank-1 updates
   of an R x (NV vectors) tile, the loop both products share (acc stays in registers once inlined). */
INLINE void rank_updates(const int R, const int NV, vf *acc, const float *a, int64_t a_row, int64_t a_red,
                         const float *bm, int64_t b_red, int64_t K) {
    for (int64_t k = 0; k < K; k++) {
        vf bv[8];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) bv[v] = vld(bm + k * b_red + v * VL);
#pragma GCC unroll 32
        for (int r = 0; r < R; r++) {
            vf ar = splat(a[r * a_row + k * a_red]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) acc[r * NV + v] += ar * bv[v];
        }
    }
}

INLINE void store_tile(const int R, const int NV, const vf *acc, float *out, int64_t ldo) {
#pragma GCC unroll 32
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) vst(out + r * ldo + v * VL, acc[r * NV + v]);
}

/* TILE(r) over rows i in [0, n): tiles of R rows, then of 8, 4, 2 and 1 (each a constant, so that every
   tile's accumulators are registers). */
#define IN_TILES(R, n, i, TILE)                                                  \
    do {                                                                         \
        for (; (i) + (R) <= (n); (i) += (R)) TILE(R);                            \
        if ((R) > 8) for (; (i) + 8 <= (n); (i) += 8) TILE((8 < (R) ? 8 : (R))); \
        if ((R) > 4) for (; (i) + 4 <= (n); (i) += 4) TILE((4 < (R) ? 4 : (R))); \
        if ((R) > 2) for (; (i) + 2 <= (n); (i) += 2) TILE((2 < (R) ? 2 : (R))); \
        for (; (i) < (n); (i)++) TILE(1);                                        \
    } while (0)

/* out[r, :b] = sum_e sum_k a[r, off[e] + k] * wp[e][k, :] for rows r < R (NV = b / VL vectors per row). */
INLINE void mm_tile(const int R, const int NV, const float *a, int64_t lda, int count, const int64_t *off,
                    const float *const *wp, float *out, int64_t ldo) {
    vf acc[ACC]; /* [R][NV]; fixed sizes, so that the unrolled loops keep them in registers */
#pragma GCC unroll 32
    for (int i = 0; i < R * NV; i++) acc[i] = (vf){0};
    for (int e = 0; e < count; e++) rank_updates(R, NV, acc, a + off[e], lda, 1, wp[e], NV * VL, NV * VL);
    store_tile(R, NV, acc, out, ldo);
}

/* All rows of one output block. */
INLINE void mm_rows(const int NV, const float *a, int64_t lda, int64_t T, int count, const int64_t *off,
                    const float *const *wp, float *out, int64_t ldo) {
    int64_t t = 0;
#define MM_TILE(r) mm_tile(r, NV, a + t * lda, lda, count, off, wp, out + t * ldo, ldo)
    IN_TILES(ACC / NV > MAX_ROWS ? MAX_ROWS : ACC / NV, T, t, MM_TILE);
#undef MM_TILE
}

typedef struct {
    const float *a, *w;
    const int32_t *ptr, *src, *wid;
    int64_t lda, ldo, T;
    int b, trans, max_count;
    float *out;
    char *scratch; /* per thread: off [max_count], wp [max_count], with trans the transposed blocks */
    size_t scratch_bytes;
} MM;

static void mm_part(void *arg, int index, int64_t first, int64_t end) {
    const MM *m = arg;
    const int b = m->b, NV = b / VL;
    const int64_t bb = (int64_t)b * b;
    char *scratch = m->scratch + index * m->scratch_bytes;
    float *tbuf = (float *)scratch;
    int64_t *off = (int64_t *)(scratch + (m->trans ? sizeof(float) * bb * m->max_count : 0));
    const float **wp = (const float **)(off + m->max_count);
    for (int64_t j = first; j < end; j++) {
        int count = m->ptr[j + 1] - m->ptr[j];
        float *out = m->out + j * b;
        if (count == 0) {
            for (int64_t t = 0; t < m->T; t++) memset(out + t * m->ldo, 0, sizeof(float) * b);
            continue;
        }
        for (int e = 0; e < count; e++) {
            int64_t k = m->ptr[j] + e;
            const float *blk = m->w + (int64_t)m->wid[k] * bb;
            off[e] = (int64_t)m->src[k] * b;
            if (m->trans) { /* the block's transpose, in this thread's buffer */
                float *tb = tbuf + e * bb;
                for (int p = 0; p < b; p++)
                    for (int q = 0; q < b; q++) tb[q * b + p] = blk[p * b + q];
                wp[e] = tb;
            } else {
                wp[e] = blk;
            }
        }
        switch (NV) {
        case 1: mm_rows(1, m->a, m->lda, m->T, count, off, wp, out, m->ldo); break;
        case 2: mm_rows(2, m->a, m->lda, m->T, count, off, wp, out, m->ldo); break;
        case 4: mm_rows(4, m->a, m->lda, m->T, count, off, wp, out, m->ldo); break;
        default: mm_rows(8, m->a, m->lda, m->T, count, off, wp, out, m->ldo);
        }
    }
}

/* out [T, n_out * b] (row stride ldo) from a [T, *] (row stride lda), w [*][b][b]; ptr [n_out + 1], src and
   wid [ptr[n_out]]: output block j reads a's block src[e] times weight block wid[e] (transposed if trans)
   for e in [ptr[j], ptr[j + 1]). Returns 0; -1 for a block size it does not know, -2 out of memory. */
int bs_mm(const float *a, int64_t lda, const float *w, const int32_t *ptr, const int32_t *src,
          const int32_t *wid, int64_t n_out, int64_t T, int b, int trans, float *out, int64_t ldo, int threads) {
    if (b != 16 && b != 32 && b != 64) return -1;
    int max_count = 1;
    int64_t *cum = malloc(sizeof(int64_t) * (n_out + 1));
    if (!cum) return -2;
    cum[0] = 0;
    for (int64_t j = 0; j < n_out; j++) {
        int c = ptr[j + 1] - ptr[j];
        if (c > max_count) max_count = c;
        cum[j + 1] = cum[j] + c + 1; /* + 1: an empty block still writes its zeros */
    }
    size_t bytes = (sizeof(int64_t) + sizeof(float *) + (trans ? sizeof(float) * b * b : 0)) * max_count;
    bytes = (bytes + 63) / 64 * 64;
    int used = thread_count(n_out, threads);
    char *scratch = malloc(bytes * used);
    if (!scratch) { free(cum); return -2; }
    MM m = {a, w, ptr, src, wid, lda, ldo, T, b, trans, max_count, out, scratch, bytes};
    parallel(mm_part, &m, n_out, cum, used);
    free(scratch);
    free(cum);
    return 0;
}

/* ---- a product of any two strided operands ------------------------------------------------------------- */

/* out[r, :] = (add ? out[r, :] : 0) + alpha * sum_k A(r, k) B(k, :) for r < n_rows, with A(r, k) =
   a[r * a_row + k * a_red] and B's row k at bm + k * b_red (NV vectors); out's row stride ldo. */
INLINE void product_tile(const int R, const int NV, const float *a, int64_t a_row, int64_t a_red, const float *bm,
                         int64_t b_red, int64_t K, float *out, int64_t ldo, int add, float alpha) {
    vf acc[ACC];
#pragma GCC unroll 32
    for (int i = 0; i < R * NV; i++) acc[i] = (vf){0};
    rank_updates(R, NV, acc, a, a_row, a_red, bm, b_red, K);
#pragma GCC unroll 32
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) {
            float *o = out + r * ldo + v * VL;
            vst(o, (add ? vld(o) : (vf){0}) + alpha * acc[r * NV + v]);
        }
}

INLINE void product_nv(const int NV, int64_t n_rows, const float *a, int64_t a_row, int64_t a_red, const float *bm,
                       int64_t b_red, int64_t K, float *out, int64_t ldo, int add, float alpha) {
    int64_t r = 0;
#define PRODUCT_TILE(R) product_tile(R, NV, a + r * a_row, a_row, a_red, bm, b_red, K, out + r * ldo, ldo, add, alpha)
    IN_TILES(ACC / NV > MAX_ROWS ? MAX_ROWS : ACC / NV, n_rows, r, PRODUCT_TILE);
#undef PRODUCT_TILE
}

/* product_nv for n_cols = NV * VL columns, NV in 1, 2, 4, 8 */
static void product(int n_cols, int64_t n_rows, const float *a, int64_t a_row, int64_t a_red, const float *bm,
                    int64_t b_red, int64_t K, float *out, int64_t ldo, int add, float alpha) {
    switch (n_cols / VL) {
    case 1: product_nv(1, n_rows, a, a_row, a_red, bm, b_red, K, out, ldo, add, alpha); break;
    case 2: product_nv(2, n_rows, a, a_row, a_red, bm, b_red, K, out, ldo, add, alpha); break;
    case 4: product_nv(4, n_rows, a, a_row, a_red, bm, b_red, K, out, ldo, add, alpha); break;
    default: product_nv(8, n_rows, a, a_row, a_red, bm, b_red, K, out, ldo, add, alpha);
    }
}

/* ---- dw = x^T @ dy on the listed blocks ------------------------------------------------------------------ */

/* rows [T0, T1) of column block `col` of a [T, *] (row stride ld) into buf [T1 - T0][b] */
static void pack_column(const float *a, int64_t ld, int64_t col, int b, int64_t T0, int64_t T1, float *buf) {
    for (int64_t t = T0; t < T1; t++)
        for (int v = 0; v < b; v += VL) vst(buf + (t - T0) * b + v, vld(a + t * ld + col * b + v));
}

typedef struct {
    const float *x, *dy;
    const int32_t *rows, *cols;
    int64_t ldx, lddy, T;
    int b;
    float *dw;
    float *scratch; /* per thread: x's and dy's packed column blocks, DW_CHUNK x b each */
} DW;

/* Token chunks outermost; in each, a packed copy of x's column block (shared by the consecutive entries of
   one row) and of dy's: read with a stride of whole rows, a column block's lines would fall into a few
   cache sets. */
static void dw_part(void *arg, int index, int64_t first, int64_t end) {
    const DW *m = arg;
    const int b = m->b;
    float *xb = m->scratch + (int64_t)index * 2 * DW_CHUNK * b, *db = xb + DW_CHUNK * b;
    for (int64_t t0 = 0; t0 < m->T; t0 += DW_CHUNK) {
        int64_t t1 = t0 + DW_CHUNK < m->T ? t0 + DW_CHUNK : m->T;
        for (int64_t e = first; e < end; e++) {
            if (e == first || m->rows[e] != m->rows[e - 1]) pack_column(m->x, m->ldx, m->rows[e], b, t0, t1, xb);
            pack_column(m->dy, m->lddy, m->cols[e], b, t0, t1, db);
            /* dw[e] (+)= xb^T db: rows k of A(k, t) = xb[t][k], B's row t = db[t] */
            product(b, b, xb, 1, b, db, b, t1 - t0, m->dw + e * b * b, b, t0 > 0, 1.0f);
        }
    }
}

/* dw [nnz][b][b]: dw[e] = x[:, rows[e]]^T @ dy[:, cols[e]] (block indices; x, dy [T, *] with row strides
   ldx, lddy). Returns 0; -1 for a block size it does not know, -2 out of memory. */
int bs_dw(const float *x, int64_t ldx, const float *dy, int64_t lddy, const int32_t *rows, const int32_t *cols,
          int64_t nnz, int64_t T, int b, float *dw, int threads) {
    if (b != 16 && b != 32 && b != 64) return -1;
    int used = thread_count(nnz, threads);
    float *scratch = malloc(sizeof(float) * 2 * DW_CHUNK * b * used);
    if (!scratch) return -2;
    DW m = {x, dy, rows, cols, ldx, lddy, T, b, dw, scratch};
    parallel(dw_part, &m, nnz, NULL, used);
    free(scratch);
    return 0;
}

/* ---- band attention ---------------------------------------------------------------------------------- */

typedef int32_t vi __attribute__((vector_size(VL * 4)));
INLINE vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

VEXP(vexp, vf, vi) /* vexp.h */

/* One band layout: slot m of query block r reads key block r + m - (M - 1); kinds [QB][M]: 0 nothing (padding),
   1 every element, 2 the elements of masks[mask_id[r][m]] ([b][b] floats: 0 = read, -inf = not); the slots
   a block reads are consecutive and end at m = M - 1. Tensors are [BH][QB b][D] (lse [BH][QB b]) in the order
   the caller holds them: blocks in sequence order (ell = 0), or a strided layout in place (ell > 0: the
   sequence is an [R][ell] grid and block r holds column (r b) / R, grid rows (r b) % R onwards), so that
   the caller makes no copy.
   Work comes in segments whose blocks read only each other: the whole sequence (ell = 0), or one column of
   the grid, packed into contiguous rows (its rows lie ell rows apart) with its neighbours (group) and unpacked
   after. */
typedef struct {
    const float *q, *k, *v, *dout, *lse, *o; /* o: the forward's output, for the backward's rowsum(o dout) */
    float *out, *lse_out, *dq, *dk, *dv;
    float *probs; /* NULL, or P [BH][QB][b][M b]: written by the forward, read by the backward for its scores */
    const int32_t *kinds, *mask_id;
    const float *masks;
    int64_t QB, R, ell;
    int b, D, M;
    int group; /* columns packed together (ell > 0) */
    float scale;
    float *scratch; /* per thread, see band_run */
    int64_t scratch_floats;
} Band;

typedef struct {         /* one segment of one (batch x head), rows contiguous */
    const float *q, *k, *v, *dout, *o;
    float *out, *dq, *dk, *dv;
    float *probs;           /* NULL, or this (batch x head)'s P [QB][b][M b] (by layout block) */
    int64_t block0, blocks; /* its first block and block count */
    int64_t row0, step;     /* row t is row row0 + t * step of [BH][QB b] (lse) */
} Segment;

static int64_t segment_blocks(const Band *B) { return B->ell ? B->R / B->b : B->QB; }

/* dst[d * ldd + j] = src[j * lds + d] for j, d < VL: one VL x VL tile transposed in registers */
INLINE void transpose_tile(const float *src, int64_t lds, float *dst, int64_t ldd) {
#if defined(__AVX512F__)
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ldd, r[i]);
#elif defined(__AVX__)
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
#else
    for (int j = 0; j < VL; j++)
        for (int d = 0; d < VL; d++) dst[d * ldd + j] = src[j * lds + d];
#endif
}

/* t[kb][d][j] = x[kb b + j][d]: key blocks transposed, so that scores are rank updates over d */
static void transpose_blocks(const float *x, int64_t blocks, int b, int D, float *t) {
    for (int64_t kb = 0; kb < blocks; kb++)
        for (int j0 = 0; j0 < b; j0 += VL)
            for (int d0 = 0; d0 < D; d0 += VL) transpose_tile(x + (kb * b + j0) * D + d0, D, t + kb * D * b + d0 * b + j0, b);
}

/* Columns s0 .. s0 + g - 1 of a strided grid (rows of ell columns, D floats each) <-> g packed columns
   buf[c] [rows][D], seg floats apart: each grid row's g columns are one contiguous read or write. */
static void pack_columns(const float *x, int64_t rows, int64_t s0, int64_t ell, int g, int D, int64_t seg, float *buf) {
    for (int64_t t = 0; t < rows; t++)
        for (int c = 0; c < g; c++) memcpy(buf + c * seg + t * D, x + (t * ell + s0 + c) * D, sizeof(float) * D);
}
static void unpack_columns(const float *buf, int64_t rows, int64_t s0, int64_t ell, int g, int D, int64_t seg, float *x) {
    for (int64_t t = 0; t < rows; t++)
        for (int c = 0; c < g; c++) memcpy(x + (t * ell + s0 + c) * D, buf + c * seg + t * D, sizeof(float) * D);
}

/* The first slot query block r reads (M: none). */
static int first_slot(const Band *B, int64_t r) {
    int m = 0;
    while (m < B->M && B->kinds[r * B->M + m] == 0) m++;
    return m;
}

/* S [b][M b] = scale * q_r k_kb^T for slots m0.. (earlier slots untouched), -inf at masked elements; r the
   segment's block, g = block0 + r the layout's. */
static void band_scores(const Band *B, const Segment *sg, int64_t r, int m0, const float *kT, float *S) {
    const int b = B->b, D = B->D, M = B->M, W = M * b;
    const int64_t g = sg->block0 + r;
    for (int m = m0; m < M; m++) {
        int64_t kb = r + m - (M - 1);
        product(b, b, sg->q + r * b * D, D, 1, kT + kb * D * b, b, D, S + m * b, W, 0, B->scale);
        if (B->kinds[g * M + m] == 2) { /* + 0 where read, + -inf where not */
            const float *mask = B->masks + (int64_t)B->mask_id[g * M + m] * b * b;
            for (int i = 0; i < b; i++) {
                float *row = S + i * W + m * b;
                for (int j = 0; j < b; j += VL) vst(row + j, vld(row + j) + vld(mask + i * b + j));
            }
        }
    }
}

/* Bit j set where the mask element m[j] is read (0, not -inf), for j < VL. */
INLINE uint64_t read_bits(const float *m) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(m), _mm512_set1_ps(-__builtin_inff()), _CMP_GT_OQ);
#elif defined(__AVX__)
    return (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(m), _mm256_set1_ps(-__builtin_inff()), _CMP_GT_OQ));
#else
    uint64_t bits = 0;
    for (int j = 0; j < VL; j++) bits |= (uint64_t)(m[j] > -__builtin_inff()) << j;
    return bits;
#endif
}

/* What each row and key of query block g reads, over its window of c = (M - m0) b keys from slot m0 on:
   row i reads keys [first[i], last[i]) and key j is read by rows [kfirst[j], klast[j]) (the smallest spans
   holding every read element; masked elements inside a span are -inf in the scores, so computing them is
   exact). The products and exponentials skip what lies outside: the masked halves of a local layout's
   diagonal and window-edge blocks. A row that reads nothing keeps the whole window (as if unranged).
   g: the block they were last computed for (-1: none); a block whose slots read the same (kinds and mask ids)
   keeps them, so a local layout computes them once per segment. */
typedef struct { int *first, *last, *kfirst, *klast; int64_t g; } Spans;

static void block_spans(const Band *B, int64_t g, int m0, Spans *sp) {
    const int b = B->b, M = B->M, c = (M - m0) * b;
    if (sp->g >= 0) {
        int same = 1;
        for (int m = 0; m < M && same; m++) {
            int kind = B->kinds[g * M + m];
            same = kind == B->kinds[sp->g * M + m] && (kind != 2 || B->mask_id[g * M + m] == B->mask_id[sp->g * M + m]);
        }
        if (same) return;
    }
    sp->g = g;
    for (int i = 0; i < b; i++) sp->first[i] = c, sp->last[i] = 0;
    for (int j = 0; j < c; j++) sp->kfirst[j] = b, sp->klast[j] = 0;
    for (int m = m0; m < M; m++) {
        const int off = (m - m0) * b;
        if (B->kinds[g * M + m] == 1) {
            for (int i = 0; i < b; i++) {
                sp->first[i] = sp->first[i] < off ? sp->first[i] : off;
                sp->last[i] = off + b;
            }
            for (int j = off; j < off + b; j++) sp->kfirst[j] = 0, sp->klast[j] = b;
            continue;
        }
        const float *mask = B->masks + (int64_t)B->mask_id[g * M + m] * b * b;
        uint64_t seen = 0, bits[64]; /* bits[i]: the keys row i reads in this block (b <= 64) */
        for (int i = 0; i < b; i++) {
            bits[i] = 0;
            for (int j0 = 0; j0 < b; j0 += VL) bits[i] |= read_bits(mask + i * b + j0) << j0;
            if (!bits[i]) continue;
            int lo = off + __builtin_ctzll(bits[i]), hi = off + 64 - __builtin_clzll(bits[i]);
            sp->first[i] = lo < sp->first[i] ? lo : sp->first[i];
            sp->last[i] = hi > sp->last[i] ? hi : sp->last[i];
            for (uint64_t fresh = bits[i] & ~seen; fresh; fresh &= fresh - 1) sp->kfirst[off + __builtin_ctzll(fresh)] = i;
            seen |= bits[i];
        }
        seen = 0;
        for (int i = b - 1; i >= 0; i--) {
            for (uint64_t fresh = bits[i] & ~seen; fresh; fresh &= fresh - 1) sp->klast[off + __builtin_ctzll(fresh)] = i + 1;
            seen |= bits[i];
        }
    }
    for (int i = 0; i < b; i++)
        if (sp->first[i] >= sp->last[i]) sp->first[i] = 0, sp->last[i] = c;
}

/* The span [lo, hi) of rows [i0, i1) together, rounded out to whole vectors (at most c) when `vectors`. */
static void span_of(const int *first, const int *last, int i0, int i1, int vectors, int c, int *lo, int *hi) {
    int a = first[i0], z = last[i0];
    for (int i = i0 + 1; i < i1; i++) a = first[i] < a ? first[i] : a, z = last[i] > z ? last[i] : z;
    if (a >= z) a = z = 0;
    if (vectors) a -= a % VL, z = z % VL ? z - z % VL + VL : z, z = z < c ? z : c;
    *lo = a, *hi = z;
}

/* out[i, :n_cols] = (add ? out : 0) + alpha * sum over k in the span of rows' chunk of A(i, k) B(k, :), for
   rows i < n_rows in chunks of one register tile each: A(i, k) = a[i a_row + k a_red], B(k, :) at bm + k b_red. */
static void product_spans(int n_cols, int n_rows, const float *a, int64_t a_row, int64_t a_red, const float *bm,
                          int64_t b_red, const int *first, const int *last, float *out, int64_t ldo, int add,
                          float alpha) {
    const int nv = n_cols / VL, tile = ACC / nv > MAX_ROWS ? MAX_ROWS : ACC / nv;
    for (int i0 = 0; i0 < n_rows; i0 += tile) {
        int i1 = i0 + tile < n_rows ? i0 + tile : n_rows, lo, hi;
        span_of(first, last, i0, i1, 0, 0, &lo, &hi);
        product(n_cols, i1 - i0, a + i0 * a_row + lo * a_red, a_row, a_red, bm + lo * b_red, b_red, hi - lo,
                out + i0 * ldo, ldo, add, alpha);
    }
}

static float vmax_all(vf a) { float m = a[0]; for (int i = 1; i < VL; i++) m = a[i] > m ? a[i] : m; return m; }
static float vsum_all(vf a) { float s = 0; for (int i = 0; i < VL; i++) s += a[i]; return s; }

/* s[j] = exp(s[j] - shift) over row i's span of the c keys (whole vectors), 0 elsewhere; the span's sum */
static float exp_span(float *s, const Spans *sp, int i, int c, float shift) {
    int lo, hi;
    span_of(sp->first, sp->last, i, i + 1, 1, c, &lo, &hi);
    vf sum = (vf){0};
    for (int j = lo; j < hi; j += VL) { vf p = vexp(vld(s + j) - shift); vst(s + j, p); sum += p; }
    memset(s, 0, sizeof(float) * lo), memset(s + hi, 0, sizeof(float) * (c - hi));
    return vsum_all(sum);
}

static void band_fwd_segment(const Band *B, const Segment *sg, float *kT, float *S, float *lse, Spans *sp) {
    const int b = B->b, D = B->D, M = B->M, W = M * b;
    transpose_blocks(sg->k, sg->blocks, b, D, kT);
    for (int64_t r = 0; r < sg->blocks; r++) {
        int m0 = first_slot(B, sg->block0 + r), c = (M - m0) * b; /* the keys read: c, from slot m0 on */
        float *orow = sg->out + r * b * D;
        if (m0 == M) { /* reads nothing */
            memset(orow, 0, sizeof(float) * b * D);
            for (int i = 0; i < b; i++) lse[sg->row0 + (r * b + i) * sg->step] = -__builtin_inff();
            continue;
        }
        band_scores(B, sg, r, m0, kT, S);
        block_spans(B, sg->block0 + r, m0, sp);
        float total[64], top[64];
        for (int i = 0; i < b; i++) { /* softmax over the row's span */
            float *s = S + i * W + m0 * b;
            int lo, hi;
            span_of(sp->first, sp->last, i, i + 1, 1, c, &lo, &hi);
            vf mx = splat(-__builtin_inff());
            for (int j = lo; j < hi; j += VL) { vf x = vld(s + j); mx = vsel(x > mx, x, mx); }
            top[i] = vmax_all(mx);
            total[i] = exp_span(s, sp, i, c, top[i]);
        }
        /* P V: the key blocks a block reads are consecutive rows; each tile of rows over its span */
        product_spans(D, b, S + m0 * b, W, 1, sg->v + (r + m0 - (M - 1)) * b * D, D, sp->first, sp->last, orow, D,
                      0, 1.0f);
        float *pr = sg->probs ? sg->probs + (sg->block0 + r) * b * W : NULL;
        for (int i = 0; i < b; i++) {
            vf inv = splat(1.0f / total[i]);
            for (int d = 0; d < D; d += VL) vst(orow + i * D + d, vld(orow + i * D + d) * inv);
            lse[sg->row0 + (r * b + i) * sg->step] = logf(total[i]) + top[i];
            if (pr) /* P, as the backward would recompute it (up to rounding) */
                for (int j = 0; j < c; j += VL) vst(pr + i * W + m0 * b + j, vld(S + i * W + m0 * b + j) * inv);
        }
    }
}

/* Key block r is first read by query block r (its last slot): dK and dV of the earlier key blocks accumulate,
   block r's start there (or are zeroed where block r reads nothing), so no pass zeroes them first. */
static void band_bwd_segment(const Band *B, const Segment *sg, float *kT, float *vT, float *S, float *dP,
                             const float *lse, Spans *sp) {
    const int b = B->b, D = B->D, M = B->M, W = M * b;
    if (!sg->probs) transpose_blocks(sg->k, sg->blocks, b, D, kT);
    transpose_blocks(sg->v, sg->blocks, b, D, vT);
    for (int64_t r = 0; r < sg->blocks; r++) {
        int m0 = first_slot(B, sg->block0 + r), c = (M - m0) * b;
        int64_t key = r + m0 - (M - 1); /* the first key block read */
        const float *qr = sg->q + r * b * D, *dor = sg->dout + r * b * D, *orow = sg->o + r * b * D;
        float *dqr = sg->dq + r * b * D;
        if (m0 == M) {
            memset(dqr, 0, sizeof(float) * b * D);
            memset(sg->dk + r * b * D, 0, sizeof(float) * b * D);
            memset(sg->dv + r * b * D, 0, sizeof(float) * b * D);
            continue;
        }
        block_spans(B, sg->block0 + r, m0, sp);
        float *P = S; /* P [b][M b]: the forward's, or recomputed */
        if (sg->probs)
            P = sg->probs + (sg->block0 + r) * b * W;
        else {
            band_scores(B, sg, r, m0, kT, S);
            for (int i = 0; i < b; i++) /* P = exp(S - lse) */
                exp_span(S + i * W + m0 * b, sp, i, c, lse[sg->row0 + (r * b + i) * sg->step]);
        }
        for (int m = m0; m < M; m++) /* dP = dO v^T */
            product(b, b, dor, D, 1, vT + (r + m - (M - 1)) * D * b, b, D, dP + m * b, W, 0, 1.0f);
        for (int i = 0; i < b; i++) { /* dS = P (dP - delta), in dP; delta = rowsum(o dO) */
            vf dot = (vf){0};
            for (int d = 0; d < D; d += VL) dot += vld(orow + i * D + d) * vld(dor + i * D + d);
            vf dl = splat(vsum_all(dot));
            float *p = dP + i * W + m0 * b, *ps = P + i * W + m0 * b;
            for (int j = 0; j < c; j += VL) vst(p + j, vld(ps + j) * (vld(p + j) - dl));
        }
        /* dS k over each row tile's span of keys; dS^T q and P^T dO over each key tile's span of rows */
        product_spans(D, b, dP + m0 * b, W, 1, sg->k + key * b * D, D, sp->first, sp->last, dqr, D, 0, B->scale);
        for (int fresh = 0; fresh < 2; fresh++) { /* the earlier key blocks (add), then block r (write) */
            const int j0 = fresh ? c - b : 0, n = fresh ? b : c - b;
            const int64_t at = (key * b + j0) * D;
            product_spans(D, n, dP + m0 * b + j0, 1, W, qr, D, sp->kfirst + j0, sp->klast + j0, sg->dk + at, D, !fresh,
                          B->scale);
            product_spans(D, n, P + m0 * b + j0, 1, W, dor, D, sp->kfirst + j0, sp->klast + j0, sg->dv + at, D, !fresh,
                          1.0f);
        }
    }
}

/* Items: (batch x head, group of segments): the whole sequence (ell = 0), or B->group adjacent columns of the grid.
   Per thread: kT, vT [rows][D], S, dP [b][M b], with ell > 0 the packed rows of q, k, v, dout, o and of out or
   dq, dk, dv of the group's columns (PACKED x group x [rows][D]; rows = a segment's), and the Spans. */
static void band_part(void *arg, int index, int64_t first, int64_t end, int backward) {
    const Band *B = arg;
    const int b = B->b, D = B->D;
    const int64_t groups = B->ell ? (B->ell + B->group - 1) / B->group : 1, blocks = segment_blocks(B);
    const int64_t rows = blocks * b, N = B->QB * b, n = N * D, seg = rows * D, packed = B->group * seg;
    float *kT = B->scratch + index * B->scratch_floats, *vT = kT + seg, *S = vT + seg, *dP = S + b * B->M * b;
    float *pack = dP + b * B->M * b;
    int *ints = (int *)(pack + (B->ell ? PACKED * packed : 0)); /* then the Spans: first, last [b], kfirst, klast [M b] */
    Spans sp = {ints, ints + b, ints + 2 * b, ints + 2 * b + B->M * b, -1};
    for (int64_t item = first; item < end; item++) {
        const int64_t bh = item / groups, s0 = (item % groups) * B->group;
        const int g = B->ell ? (int)(B->ell - s0 < B->group ? B->ell - s0 : B->group) : 1;
        const float *inputs[5] = {B->q + bh * n, B->k + bh * n, B->v + bh * n, B->dout ? B->dout + bh * n : NULL,
                                  B->o ? B->o + bh * n : NULL};
        float *targets[4] = {B->out ? B->out + bh * n : NULL, B->dq ? B->dq + bh * n : NULL,
                             B->dk ? B->dk + bh * n : NULL, B->dv ? B->dv + bh * n : NULL};
        if (B->ell) /* pack the group's columns; outputs go to packed rows first */
            for (int i = 0; i < 5; i++)
                if (inputs[i]) pack_columns(inputs[i], rows, s0, B->ell, g, D, seg, pack + i * packed);
        for (int c = 0; c < g; c++) {
            Segment sg = {inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], targets[0], targets[1], targets[2], targets[3],
                          B->probs ? B->probs + bh * B->QB * B->b * B->M * B->b : NULL, (s0 + c) * blocks, blocks,
                          bh * N + s0 + c, B->ell ? B->ell : 1};
            if (B->ell) {
                float *col = pack + c * seg;
                sg.q = col, sg.k = col + packed, sg.v = col + 2 * packed, sg.dout = B->dout ? col + 3 * packed : NULL;
                sg.o = B->o ? col + 4 * packed : NULL;
                sg.out = col + 5 * packed, sg.dq = col + 6 * packed, sg.dk = col + 7 * packed, sg.dv = col + 8 * packed;
            }
            if (backward)
                band_bwd_segment(B, &sg, kT, vT, S, dP, B->lse, &sp);
            else
                band_fwd_segment(B, &sg, kT, S, B->lse_out, &sp);
        }
        if (B->ell)
            for (int i = backward ? 1 : 0; i < (backward ? 4 : 1); i++)
                unpack_columns(pack + (5 + i) * packed, rows, s0, B->ell, g, D, seg, targets[i]);
    }
}
static void band_fwd_part(void *arg, int index, int64_t first, int64_t end) { band_part(arg, index, first, end, 0); }
static void band_bwd_part(void *arg, int index, int64_t first, int64_t end) { band_part(arg, index, first, end, 1); }

static int pow2_vectors(int n) { return n % VL == 0 && n / VL <= 8 && ((n / VL) & (n / VL - 1)) == 0; }

static int band_run(Band *B, int64_t BH, int threads, int backward) {
    if (B->b > 64 || !pow2_vectors(B->b) || !pow2_vectors(B->D)) return -1;
    if (B->ell && (B->R % B->b || B->R * B->ell != B->QB * B->b)) return -1;
    const int64_t seg = segment_blocks(B) * B->b * B->D;
    /* columns packed together: as many as keep the packed rows within COLUMN_GROUP_BYTES, at least one */
    B->group = B->ell ? (int)(COLUMN_GROUP_BYTES / (PACKED * seg * (int64_t)sizeof(float))) : 1;
    B->group = B->group < 1 ? 1 : B->group > MAX_COLUMN_GROUP ? MAX_COLUMN_GROUP : B->group;
    const int64_t items = BH * (B->ell ? (B->ell + B->group - 1) / B->group : 1);
    /* per thread: kT, vT, S, dP, the packed rows and the Spans' ints (as many bytes as floats) */
    B->scratch_floats = 2 * seg + (B->ell ? PACKED * B->group * seg : 0) + 2 * (int64_t)B->b * B->M * B->b + 2 * B->b +
                        2 * B->M * B->b + 64;
    int used = thread_count(items, threads);
    B->scratch = malloc(sizeof(float) * B->scratch_floats * used);
    if (!B->scratch) return -2;
    parallel(backward ? band_bwd_part : band_fwd_part, B, items, NULL, used);
    free(B->scratch);
    return 0;
}

/* Forward of band attention: out [BH][QB b][D], lse [BH][QB b] (see Band for the layout and R, ell), and where
   probs is not NULL the probabilities P [BH][QB][b][M b] for the backward. b / VL and D / VL must be 1, 2, 4 or 8
   and b at most 64. Returns 0; -1 for sizes it does not know, -2 out of memory. */
int band_forward(const float *q, const float *k, const float *v, const int32_t *kinds, const int32_t *mask_id,
                 const float *masks, int64_t BH, int64_t QB, int b, int D, int M, int64_t R, int64_t ell,
                 float scale, float *out, float *lse, float *probs, int threads) {
    Band B = {q, k, v, NULL, NULL, NULL, out, lse, NULL, NULL, NULL, probs, kinds, mask_id, masks, QB, R, ell, b, D,
              M, 0, scale, NULL, 0};
    return band_run(&B, BH, threads, 0);
}

/* Backward: dq, dk, dv like q from dout, the forward's output o and lse, and the forward's probs where not NULL
   (else P is recomputed from q, k and lse). */
int band_backward(const float *q, const float *k, const float *v, const float *dout, const float *lse,
                  const float *o, const int32_t *kinds, const int32_t *mask_id, const float *masks, int64_t BH,
                  int64_t QB, int b, int D, int M, int64_t R, int64_t ell, float scale, const float *probs,
                  float *dq, float *dk, float *dv, int threads) {
    Band B = {q, k, v, dout, lse, o, NULL, NULL, dq, dk, dv, (float *)probs, kinds, mask_id, masks, QB, R, ell, b,
              D, M, 0, scale, NULL, 0};
    return band_run(&B, BH, threads, 1);
}

/* ---- tanh GELU ---------------------------------------------------------------------------------------- */

/* y = x / 2 (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), elementwise over float32 or bfloat16 (bf16 = 1:
   uint16 storage, computed in float32 and rounded to nearest even; with AVX512-BF16, subnormal results, under
   1.2e-38, round to zero). Written as y = x s with s = (1 + tanh(u)) / 2 = 1 / (1 + exp(-2 u)), so that neither
   end loses digits to 1 + tanh(u) near 0. The backward takes dy and x:
   dx = dy (s + 2 x s (1 - s) sqrt(2 / pi) (1 + 3 0.044715 x^2)), since 1 - tanh(u)^2 = 4 s (1 - s). */
#define GELU_BETA 0.7978845608028654f
#define GELU_KAPPA 0.044715f
#define GELU_CHUNK 16384 /* elements per thread item */
typedef struct { const void *x, *dy; void *out; int64_t n; int bf16; } Gelu;

typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

INLINE vf load_any(const void *p, int64_t i, int bf16) {
    if (!bf16) return vld((const float *)p + i);
#if defined(__AVX512F__) /* one widening load (the generic form compiles to two halves and an insert) */
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16);
#else
    vh h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

INLINE void store_any(void *p, int64_t i, int bf16, vf v) {
    if (!bf16) { vst((float *)p + i, v); return; }
#if defined(__AVX512BF16__) /* one instruction; it flushes subnormal results (under 1.2e-38) to zero */
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), (__m256i)_mm512_cvtneps_pbh((__m512)v));
    return;
#endif
    vu u = (vu)v;
    vu rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
    rounded = (vu)vsel(v != v, (vf)(u >> 16 | 0x40), (vf)rounded); /* NaN stays a (quiet) NaN */
    vh h = __builtin_convertvector(rounded, vh);
    memcpy((uint16_t *)p + i, &h, sizeof h);
}

/* Element i of a float32 or bfloat16 array, as a float. */
INLINE float load1(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX512F__)
/* exp(a) for gelu_vector on AVX-512: vexp's polynomial (vexp.h's constants) with the nearest n by roundscale,
   2^n by scalef and the clamps by min and max (NaN passes), about half of vexp's instructions. a is clamped to
   [-87, 88.38]: below -87 the sigmoid is 1 in float32 either way, and no subnormal (slow) values arise. */
INLINE vf gelu_exp(vf a) {
    __m512 x = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_min_ps(_mm512_set1_ps(VEXP_MAX), (__m512)a));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(VEXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(VEXP_LN2_HI), x);
    x = _mm512_fmadd_ps(n, _mm512_set1_ps(VEXP_LN2_LO), x);
    __m512 y = _mm512_set1_ps(VEXP_P0);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEXP_P1));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEXP_P2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEXP_P3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEXP_P4));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEXP_P5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return (vf)_mm512_scalef_ps(y, n);
}
#else
#define gelu_exp vexp
#endif

INLINE vf gelu_vector(vf x, vf dy, int backward) {
    vf x2 = x * x, a = -2.0f * GELU_BETA * (x + GELU_KAPPA * x2 * x), e = gelu_exp(a);
    vf s = vsel(a < 87.0f, 1.0f / (1.0f + e), splat(0.0f)); /* 0 past exp's range: no 1e-38 left behind */
    if (!backward) return x * s;
    return dy * (s + 2.0f * GELU_BETA * x * s * (e * s) * (1.0f + 3.0f * GELU_KAPPA * x2));
}

static void gelu_part(void *arg, int index, int64_t first, int64_t end, int backward) {
    (void)index;
    const Gelu *G = arg;
    const int esize = G->bf16 ? 2 : 4;
    for (int64_t c = first; c < end; c++) {
        int64_t i0 = c * GELU_CHUNK, i1 = i0 + GELU_CHUNK < G->n ? i0 + GELU_CHUNK : G->n, i = i0;
        for (; i + VL <= i1; i += VL)
            store_any(G->out, i, G->bf16, gelu_vector(load_any(G->x, i, G->bf16),
                                                      backward ? load_any(G->dy, i, G->bf16) : splat(0.0f), backward));
        if (i < i1) { /* the last partial vector, through buffers */
            float xs[VL] = {0}, gs[VL] = {0};
            char out[VL * 4];
            for (int j = 0; j < i1 - i; j++) {
                xs[j] = load1(G->x, i + j, G->bf16);
                if (backward) gs[j] = load1(G->dy, i + j, G->bf16);
            }
            store_any(out, 0, G->bf16, gelu_vector(vld(xs), vld(gs), backward));
            memcpy((char *)G->out + i * esize, out, (size_t)(i1 - i) * esize);
        }
    }
}
static void gelu_fwd_part(void *arg, int index, int64_t first, int64_t end) { gelu_part(arg, index, first, end, 0); }
static void gelu_bwd_part(void *arg, int index, int64_t first, int64_t end) { gelu_part(arg, index, first, end, 1); }

/* out = gelu(x) over n elements (float32, or bfloat16 where bf16 = 1). Returns 0. */
int gelu_forward(const void *x, void *out, int64_t n, int bf16, int threads) {
    Gelu G = {x, NULL, out, n, bf16};
    parallel(gelu_fwd_part, &G, (n + GELU_CHUNK - 1) / GELU_CHUNK, NULL, threads);
    return 0;
}

/* dx = dy * gelu'(x) over n elements, all of one dtype (as gelu_forward). Returns 0. */
int gelu_backward(const void *dy, const void *x, void *dx, int64_t n, int bf16, int threads) {
    Gelu G = {x, dy, dx, n, bf16};
    parallel(gelu_bwd_part, &G, (n + GELU_CHUNK - 1) / GELU_CHUNK, NULL, threads);
    return 0;
}

/* ---- attention heads <-> rows ------------------------------------------------------------------------------ */

/* Between the qkv projection's layout and the band kernels' (kernels/cpu_attention.py, PackedBand): rows
   [B, N, P, H, D] in float32 or bfloat16 (bf16 = 1), and P float32 tensors [B, H, N, D] (heads[p]). to_heads = 1
   copies the rows into the heads (widening), 0 the heads into the rows (bfloat16 rounded as store_any does):
   one pass in place of a permuted copy per tensor, a cast and a stack. D is a multiple of VL. */
#define HEADS_CHUNK 64 /* positions per thread item */
typedef struct { void *rows; void *const *heads; int64_t B, N; int P, H, D, to_heads, bf16; } Heads;

static void heads_part(void *arg, int index, int64_t first, int64_t end) {
    (void)index;
    const Heads *A = arg;
    int64_t chunks = (A->N + HEADS_CHUNK - 1) / HEADS_CHUNK;
    for (int64_t item = first; item < end; item++) { /* item: (p, b, h), then a chunk of positions */
        int64_t phb = item / chunks, bh = phb % (A->B * A->H), n0 = item % chunks * HEADS_CHUNK;
        int64_t n1 = n0 + HEADS_CHUNK < A->N ? n0 + HEADS_CHUNK : A->N, p = phb / (A->B * A->H);
        int64_t b = bh / A->H, h = bh % A->H;
        float *heads = (float *)A->heads[p] + bh * A->N * A->D;
        for (int64_t n = n0; n < n1; n++) {
            int64_t r = (((b * A->N + n) * A->P + p) * A->H + h) * A->D, c = n * A->D;
            for (int j = 0; j < A->D; j += VL) {
                if (A->to_heads) vst(heads + c + j, load_any(A->rows, r + j, A->bf16));
                else store_any(A->rows, r + j, A->bf16, vld(heads + c + j));
            }
        }
    }
}

/* See Heads. Returns 0, or -1 for a D that is not a multiple of the vector width. */
int heads_copy(void *rows, void *const *heads, int64_t B, int64_t N, int P, int H, int D, int to_heads, int bf16,
               int threads) {
    if (D % VL) return -1;
    Heads A = {rows, heads, B, N, P, H, D, to_heads, bf16};
    parallel(heads_part, &A, P * B * H * ((N + HEADS_CHUNK - 1) / HEADS_CHUNK), NULL, threads);
    return 0;
}

/* ---- layer norm ------------------------------------------------------------------------------------------ */

/* Over rows of d floats (d a multiple of VL): y = (x - mean) rstd w + b, rstd = 1 / sqrt(var + eps) with the
   biased variance, x float32 and y float32 or bfloat16 (bf16 = 1: rounded as store_any does), mean and rstd kept
   per row for the backward. The backward takes dy (y's dtype) and gives dx (float32) and, per item of
   item_rows rows, the partial sums of dw = sum dy xhat and db = sum dy (dwb [items][2][d]), which the caller
   adds up in item order, so that the sums do not depend on the thread count. */
typedef struct {
    const float *x, *w, *b;
    const void *dy;
    void *y;
    float *mean, *rstd, *dx, *dwb;
    int64_t rows, item_rows;
    int d, bf16;
    float eps;
} Norm;

static void norm_fwd_part(void *arg, int index, int64_t first, int64_t end) {
    (void)index;
    const Norm *N = arg;
    const int d = N->d;
    for (int64_t r = first * N->item_rows; r < end * N->item_rows && r < N->rows; r++) {
        const float *x = N->x + r * d;
        vf s = splat(0.0f);
        for (int j = 0; j < d; j += VL) s += vld(x + j);
        float mean = 0.0f;
        for (int l = 0; l < VL; l++) mean += s[l];
        mean /= d;
        vf q = splat(0.0f);
        for (int j = 0; j < d; j += VL) { vf c = vld(x + j) - mean; q += c * c; }
        float var = 0.0f;
        for (int l = 0; l < VL; l++) var += q[l];
        const float rstd = 1.0f / sqrtf(var / d + N->eps);
        for (int j = 0; j < d; j += VL)
            store_any(N->y, r * d + j, N->bf16, (vld(x + j) - mean) * rstd * vld(N->w + j) + vld(N->b + j));
        N->mean[r] = mean, N->rstd[r] = rstd;
    }
}

static void norm_bwd_part(void *arg, int index, int64_t first, int64_t end) {
    (void)index;
    const Norm *N = arg;
    const int d = N->d;
    for (int64_t item = first; item < end; item++) {
        float *dw = N->dwb + item * 2 * d, *db = dw + d;
        for (int j = 0; j < 2 * d; j += VL) vst(dw + j, splat(0.0f));
        for (int64_t r = item * N->item_rows; r < (item + 1) * N->item_rows && r < N->rows; r++) {
            const float *x = N->x + r * d;
            const float mean = N->mean[r], rstd = N->rstd[r];
            vf sg = splat(0.0f), sgx = splat(0.0f); /* sums of g = dy w and of g xhat */
            for (int j = 0; j < d; j += VL) {
                vf dy = load_any(N->dy, r * d + j, N->bf16), xhat = (vld(x + j) - mean) * rstd, g = dy * vld(N->w + j);
                sg += g, sgx += g * xhat;
                vst(dw + j, vld(dw + j) + dy * xhat);
                vst(db + j, vld(db + j) + dy);
            }
            float mg = 0.0f, mgx = 0.0f;
            for (int l = 0; l < VL; l++) mg += sg[l], mgx += sgx[l];
            mg /= d, mgx /= d;
            for (int j = 0; j < d; j += VL) {
                vf xhat = (vld(x + j) - mean) * rstd, g = load_any(N->dy, r * d + j, N->bf16) * vld(N->w + j);
                vst(N->dx + r * d + j, rstd * (g - mg - xhat * mgx));
            }
        }
    }
}

/* y, mean, rstd = layer_norm(x [rows][d]; w, b [d]) as above, item_rows rows a thread item. Returns 0; -1 where d
   is not a multiple of VL. */
int norm_forward(const float *x, const float *w, const float *b, void *y, float *mean, float *rstd, int64_t rows,
                 int64_t item_rows, int d, float eps, int bf16, int threads) {
    if (d % VL || item_rows < 1) return -1;
    Norm N = {x, w, b, NULL, y, mean, rstd, NULL, NULL, rows, item_rows, d, bf16, eps};
    parallel(norm_fwd_part, &N, (rows + item_rows - 1) / item_rows, NULL, threads);
    return 0;
}

/* dx [rows][d] and dwb [ceil(rows / item_rows)][2][d] from dy (float32, or bfloat16 where bf16 = 1), x, w and
   the forward's mean and rstd. Returns 0; -1 where d is not a multiple of VL. */
int norm_backward(const void *dy, const float *x, const float *w, const float *mean, const float *rstd, float *dx,
                  float *dwb, int64_t rows, int64_t item_rows, int d, int bf16, int threads) {
    if (d % VL || item_rows < 1) return -1;
    Norm N = {x, w, NULL, dy, NULL, (float *)mean, (float *)rstd, dx, dwb, rows, item_rows, d, bf16, 0.0f};
    parallel(norm_bwd_part, &N, (rows + item_rows - 1) / item_rows, NULL, threads);
    return 0;
}
