/* Block-sparse weight matmul on the CPU, float32, blocks of 16, 32 or 64 (see kernels/blocksparse_cpu.py).

   y = x @ W, W sparse in b x b blocks stored compactly as w [nnz][b][b]. bs_mm reads x, dy and w in
   place: no gathered copies.
     bs_mm: out[:, j] = sum over the list of j of  a[:, src[e]] @ w[wid[e]]  (or @ w[wid[e]]^T with trans).
            The forward is bs_mm over the layout's columns; dX is bs_mm over its rows with trans.
            A tile of R rows x b outputs stays in registers over the whole list, so each output is written
            once; the weight blocks of one output block (at most a few hundred KB) stay in the cache for
            all its row tiles. With trans, an output block's weight blocks are first transposed into a
            per-thread buffer.
     bs_dw: dw[e] = x[:, rows[e]]^T @ dy[:, cols[e]] for every listed block (dW only where W has blocks),
            from packed copies of x's and dy's column blocks, DW_CHUNK tokens at a time.
   Each call runs on `threads` threads (the caller and threads - 1 it starts), the work split into
   contiguous ranges of equal cost; each output is summed in the same order whatever the thread count. */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
   that index (its scratch); cum[k] (k = 0..n) is the cost of items [0, k) (NULL: one each). The caller
   runs the first part, and any part whose thread could not start. */
static void parallel(part_fn fn, void *arg, int64_t n, const int64_t *cum, int threads) {
    threads = thread_count(n, threads);
    Part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
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
    for (int t = 1; t < threads; t++)
        started[t] = parts[t].first < parts[t].end && pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0;
    for (int t = 1; t < threads; t++)
        if (!started[t] && parts[t].first < parts[t].end) run_part(&parts[t]);
    if (parts[0].first < parts[0].end) run_part(&parts[0]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
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

/* ---- dw = x^T @ dy on the listed blocks ------------------------------------------------------------------ */

/* out[k, :b] (+)= sum_t x[t, k] * dy[t, :b] for k < KR (a KR x b slice of one weight block's gradient);
   x [T][b], dy [T][b] packed. */
INLINE void dw_tile(const int KR, const int NV, const float *x, const float *dy, int64_t T, int add, float *out) {
    const int b = NV * VL;
    vf acc[ACC]; /* [KR][NV] */
#pragma GCC unroll 32
    for (int i = 0; i < KR * NV; i++) acc[i] = add ? vld(out + (i / NV) * b + (i % NV) * VL) : (vf){0};
    rank_updates(KR, NV, acc, x, 1, b, dy, b, T);
    store_tile(KR, NV, acc, out, b);
}

/* A whole block's gradient, its b rows in tiles. */
INLINE void dw_block(const int NV, const float *x, const float *dy, int64_t T, int add, float *out) {
    const int b = NV * VL;
    int k = 0;
#define DW_TILE(r) dw_tile(r, NV, x + k, dy, T, add, out + k * b)
    IN_TILES(ACC / NV > MAX_ROWS ? MAX_ROWS : ACC / NV, b, k, DW_TILE);
#undef DW_TILE
}

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
            float *out = m->dw + e * b * b;
            switch (b / VL) {
            case 1: dw_block(1, xb, db, t1 - t0, t0 > 0, out); break;
            case 2: dw_block(2, xb, db, t1 - t0, t0 > 0, out); break;
            case 4: dw_block(4, xb, db, t1 - t0, t0 > 0, out); break;
            default: dw_block(8, xb, db, t1 - t0, t0 > 0, out);
            }
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
