/* One decoding step of a Sparse Transformer on the CPU, fp32, in one call (see sampling/compiled_step.py).

   A step runs on T threads (the caller plus T - 1 workers that wait between steps) in lockstep,
   with a barrier after each phase:
     embed | per layer: norm + qkv | attention, the keys of each (row, head) split T ways, the new key and
     value written to the cache first | combine + proj + residual | norm + fc + gelu | proj + residual |
     norm + head
   st_sample steps its rows through every position in one call (sample_rows): all threads on every step together,
   thread 0 drawing the tokens between steps, or, with at least ALONE_ROWS rows for every thread, each thread its
   own rows by itself, never waiting for another thread; each thread then reads every matrix, but with no barrier;
   or, asked to (solo), the calling thread alone on every row, the workers left asleep (where other work holds the
   cores, threads that wait for each other at every phase lose more than they share). Alone, the attention still
   splits the keys of each (row, head) T ways, in turn, so that every way gives the same logits bit for bit.
   Every matrix is packed as [out / 16][in][16] so that a tile of 16 outputs streams contiguously; a block-sparse
   feed-forward matrix (models/sparse_ff.py) is packed per output block, over the input blocks it reads only
   (see Mat), and the same loops skip the blocks that are not there.
   Each output is summed in the same order whatever the batch size, so a sample does not depend on
   the batch it runs in.
   The matrices are float32, or bfloat16 where every weight of the matrix is a bfloat16 number (st_half): the same
   values from half the bytes. The KV caches are float32 or bfloat16 (Layer.half): a new key or value is rounded to
   the cache's type as torch rounds it, and widened back to float32 as it is read.
   Entry points: st_new / st_layer / st_sparse / st_half / st_lag / st_start (set up, on the caller's tensors),
   st_step (one position of the whole batch: logits), st_sample (positions [start, stop) of a range of rows,
   sampling each token in C with temperature, top-k and top-p), st_free. */

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/vexp.h"

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

#define TILE 16
#define MAX_HEADS 64
#define SPIN 20000      /* pauses a worker spins for the next step before it sleeps */
#define YIELD_AFTER 4000 /* pauses a thread spins at a barrier before it also yields its core */
#define ALONE_ROWS 2     /* st_sample gives each thread its own rows when every thread gets at least this many */

#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define PAUSE() __asm__ volatile("yield")
#else
#define PAUSE() ((void)0)
#endif

enum { ALL = 0, LOCAL = 1, STRIDED = 2, FIXED = 3 }; /* the patterns' kind codes (kernels/patterns.py) */
enum { PASS, ALONE, TOGETHER, SOLO }; /* Step.mode (the workers run it), and SOLO: the caller alone, no worker woken */

static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 splat(float a) { return a - (v8){0}; } /* not 0 + a: that is an add (-0 + 0 is +0) */
static inline v8 vsel(vi8 mask, v8 a, v8 b) { return (v8)(((vi8)a & mask) | ((vi8)b & ~mask)); }
/* The sum of a's lanes, in the order hsum8 sums each of its vectors. */
static inline float hsum(v8 a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }
/* Pairwise sums within each half: [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7] (vhaddps). */
static inline v8 hadd(v8 x, v8 y) {
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
}
/* [hsum(a[0]), ..., hsum(a[7])]: eight sums in one transpose-and-add tree. */
static inline v8 hsum8(const v8 *a) {
    v8 u = hadd(hadd(a[0], a[1]), hadd(a[2], a[3])), w = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
    return __builtin_shufflevector(u, w, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u, w, 4, 5, 6, 7, 12, 13, 14, 15);
}

VEXP(vexp, v8, vi8) /* kernels/vexp.h */

/* gelu, tanh approximation: 0.5 x (1 + tanh(u)), tanh(u) = 1 - 2 / (1 + exp(2u)). */
static inline v8 vgelu(v8 x) {
    v8 u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (2.0f - 2.0f / (1.0f + vexp(2.0f * u)));
}

/* A weight matrix as matmul reads it: output blocks of out_bs outputs (a multiple of TILE), output block j
   reading the input blocks col_ptr[j] .. col_ptr[j + 1] - 1 of the list, each in_bs inputs from input
   starts[k]. Packed per output block, then [out_bs / 16][listed blocks * in_bs][16]. A dense matrix is one
   output block (all outputs) reading one input block (all inputs): the packing [out / 16][in][16].
   half: the weights are bfloat16 (st_half), widened to float32 as they are read: the same values and sums
   as float32 weights holding the same numbers, from half the bytes. */
typedef struct {
    const void *w;
    const float *b;
    int half;
    int in_bs, out_bs;
    const int *col_ptr, *starts;
} Mat;

static const int DENSE_PTR[2] = {0, 1}, DENSE_START[1] = {0};
static Mat dense_mat(const float *w, const float *b, int in, int out) {
    return (Mat){.w = w, .b = b, .in_bs = in, .out_bs = out, .col_ptr = DENSE_PTR, .starts = DENSE_START};
}

typedef struct {
    int kind, slots, rows, summary;       /* slots: local ring / stride / sequence (all) */
    int lo[MAX_HEADS];                    /* fixed: first summary column of each head */
    void *kv, *summaries;                 /* the cache's tensors (sampling/kv_cache.py layouts) */
    int half;                             /* their elements are bfloat16 (else float32) */
    const float *n1w, *n1b, *n2w, *n2b;
    Mat qkv, proj, fc, fc2;               /* attention in and out, feed-forward in and out */
} Layer;

/* One step: position pos of rows row0 .. row0 + nrows - 1 of the batch, whose buffers (x, qkv, f and the
   attention's partial results) are rows buf .. buf + nrows - 1 of the step's; prev [nrows] (element stride
   prev_stride) the tokens at pos - 1, NULL at 0, each in its row of tokens: with lag inputs, prev[b * prev_stride - k]
   is the token at pos - 1 - k; logits [nrows, V]. */
typedef struct {
    int pos, row0, nrows, buf;
    const int64_t *prev;
    int64_t prev_stride;
    float *logits;
} Pass;

/* The sampling rule of sampling.options.choose_tokens: temperature (0: greedy), top_k (0: off) and top_p
   (1: off). */
typedef struct {
    float temperature, top_p;
    int top_k;
} Rule;

/* st_sample's arguments, for sample_rows */
typedef struct {
    int64_t *tokens, ld_tokens, ld_u;
    const float *u;
    Rule rule;
    int start, stop, row0, nrows;
} Job;

typedef struct {
    int B, d, H, D, ff, V, n_layers, T, max_keys;
    const float *tok_emb, *start, *pos_emb, *nw, *nb;
    int K;                                /* lag inputs (0: none): lag_t [K, d] (row k: the token k + 1 back) */
    const float *lag_t, *token_value;     /* and each token's value [V] */
    Mat head;
    Layer *layers;
    float *x, *qkv, *f;                   /* [B, d], [B, 3d], [B, ff] */
    float *norm, *y, *scores;             /* per thread: [B, d], [B, d], [max_keys] */
    float *part_acc, *part_m, *part_l;    /* [B, H, T, D], [B, H, T], [B, H, T] */
    Pass pass;                            /* st_step's step, all threads together */
    Job job;                              /* st_sample's rows and positions (sample_rows) */
    int mode;                             /* what the workers run next: PASS, ALONE or TOGETHER */
    float *own_logits, *cdf;              /* st_sample's logits [B, V] and a CDF [V] per thread */
    uint32_t *sort;                       /* per thread [4 V]: largest_first's scratch for a filtered draw */
    /* threads */
    pthread_t *threads;
    atomic_int gen, arrived, sense;
    int quit, sense0;                     /* sense0: the calling thread's barrier sense */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} Step;

/* Wait for all s->T threads; T: the threads that share the work (1: this thread runs alone, nothing to wait for). */
static void barrier(Step *s, int T, int *sense) {
    if (T == 1) return;
    *sense = !*sense;
    if (atomic_fetch_add(&s->arrived, 1) == s->T - 1) {
        atomic_store(&s->arrived, 0);
        atomic_store(&s->sense, *sense);
    } else {
        for (int spins = 0; atomic_load_explicit(&s->sense, memory_order_acquire) != *sense; spins++) {
            PAUSE();
            if (spins > YIELD_AFTER) sched_yield(); /* a descheduled thread holds everyone up: let it run */
        }
    }
}

/* Each row's mean and variance are sums of 16 lanes (input i in lane i % 16, inputs in increasing order), then of
   the lanes in a fixed tree; the rows are independent, so a row's result does not depend on the batch.
   d is a multiple of 32 (the head dims are 32, 64 and 128). */
static void layer_norm(const float *x, const float *w, const float *b, float *out, int B, int d) {
    for (int r = 0; r < B; r++, x += d, out += d) {
        v8 s0 = splat(0), s1 = splat(0);
        for (int i = 0; i < d; i += 16) s0 += ld(x + i), s1 += ld(x + i + 8);
        v8 mean = splat(hsum(s0 + s1) / d);
        s0 = s1 = splat(0);
        for (int i = 0; i < d; i += 16) {
            v8 a = ld(x + i) - mean, c = ld(x + i + 8) - mean;
            s0 += a * a, s1 += c * c;
        }
        v8 rstd = splat(1.0f / sqrtf(hsum(s0 + s1) / d + 1e-5f));
        for (int i = 0; i < d; i += 8) st(out + i, (ld(x + i) - mean) * rstd * ld(w + i) + ld(b + i));
    }
}

enum { STORE = 0, GELU = 1, ADD = 2 };

/* The matmul's vectors: a whole tile of 16 outputs in one register where the CPU has AVX-512 (32 registers),
   else two 8-wide halves (16 registers). Either way each output lane sums in the same order. */
#if defined(__AVX512F__)
typedef float vt __attribute__((vector_size(64)));
#define PARTS 1
#define ACC_REGS 16
#else
typedef float vt __attribute__((vector_size(32)));
#define PARTS 2
#define ACC_REGS 8
#endif
#define VW (TILE / PARTS)
#define PREFETCH 16 /* weight rows (64 bytes each) read ahead of their use */
#define MAX_ROWS 8
#define MAX_COLS 8
/* tiles at a time for R rows: as many as ACC_REGS accumulators hold, at most MAX_COLS */
#define COLS(R) (ACC_REGS / ((R) * PARTS) < MAX_COLS ? ACC_REGS / ((R) * PARTS) : MAX_COLS)
static inline vt ldt(const float *p) { vt v; memcpy(&v, p, sizeof v); return v; }
static inline void stt(float *p, vt v) { memcpy(p, &v, sizeof v); }
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
/* bfloat16 matrices hold rows i and i + 1 of a tile (i even) interleaved: lane k of a 32-bit vector is w[i + 1][k]
   in its high half and w[i][k] in its low half; each row, widened to float32, is that half alone */
static inline void ldh2(const uint16_t *p, vt *w0, vt *w1) {
    vu v;
    memcpy(&v, p, sizeof v);
    *w0 = (vt)(v << 16), *w1 = (vt)(v & 0xffff0000u);
}

/* R rows of x (row stride ldx) times C tiles of M from tile t (all in one output block of M):
   acc = bias + sum_i x[i] w[i] over the inputs the block reads, in increasing order for every output;
   then out = acc, gelu(acc) or out + acc. HALF: M's weights are bfloat16 (M->half). */
static inline __attribute__((always_inline)) void tiles(const float *x, int ldx, const Mat *M, int t, float *out,
                                                         int ldo, int mode, const int R, const int C, const int HALF) {
    int per_block = M->out_bs / TILE, j = t / per_block, first = M->col_ptr[j], bs = M->in_bs;
    int blocks = M->col_ptr[j + 1] - first, len = blocks * bs;  /* len: the inputs of each packed tile */
    const char *bytes = M->w;
    const size_t elem = HALF ? 2 : 4;
    vt acc[MAX_ROWS][MAX_COLS][PARTS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            for (int h = 0; h < PARTS; h++) acc[r][c][h] = ldt(M->b + (t + c) * TILE + VW * h);
    size_t wt = (size_t)first * bs * M->out_bs + (size_t)(t % per_block) * len * TILE;  /* element offsets */
    for (int q = 0; q < blocks; q++) {
        const float *xq = x + M->starts[first + q];
        size_t wq = wt + (size_t)q * bs * TILE;
        for (int i = 0; i < bs; i += 1 + HALF) {  /* HALF: inputs i and i + 1 from one load */
            vt wv[2][MAX_COLS][PARTS];
            for (int c = 0; c < C; c++) {
                size_t k = wq + ((size_t)c * len + i) * TILE;
                for (int h = 0; h < PARTS; h++) {
                    if (HALF)
                        ldh2((const uint16_t *)M->w + k + 2 * VW * h, &wv[0][c][h], &wv[1][c][h]);
                    else
                        wv[0][c][h] = ldt((const float *)M->w + k + VW * h);
                }
                __builtin_prefetch(bytes + (k + PREFETCH * TILE) * elem);
            }
            for (int e = 0; e <= HALF; e++)
                for (int r = 0; r < R; r++) {
                    vt xv = xq[r * ldx + i + e] - (vt){0};
                    for (int c = 0; c < C; c++)
                        for (int h = 0; h < PARTS; h++) acc[r][c][h] += xv * wv[e][c][h];
                }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float *o = out + r * ldo + (t + c) * TILE;
            for (int h = 0; h < PARTS; h++)
                stt(o + VW * h, mode == ADD ? ldt(o + VW * h) + acc[r][c][h] : acc[r][c][h]);
            if (mode == GELU) st(o, vgelu(ld(o))), st(o + 8, vgelu(ld(o + 8)));
        }
}

/* Tiles [t, t_end) for R rows, as many tiles at a time as the accumulators allow. */
#define RUN(R, C) \
    for (; (C) <= COLS(R) && t + (C) <= t_end; t += (C)) tiles(x, ldx, M, t, out, ldo, mode, R, C, HALF)
static inline __attribute__((always_inline)) void row_tiles(const float *x, int ldx, const Mat *M, int t,
                                                             int t_end, float *out, int ldo, int mode, const int R,
                                                             const int HALF) {
    RUN(R, 8);
    RUN(R, 4);
    RUN(R, 2);
    RUN(R, 1);
}
#undef RUN

/* out [B, n_out] (row stride ldo) from x [B, in] and M, for tiles [t0, t1) of this thread:
   groups of 8 rows (AVX-512 only), 4, 2 and 1 in turn through as many tiles as the first group takes at a
   time (never past the end of an output block of M), so that each tile is read from memory once for the
   whole batch and reused from L1 by the next. */
static inline __attribute__((always_inline)) void matmul_as(const float *x, int ldx, const Mat *M, int t0, int t1,
                                                             float *out, int ldo, int mode, int B, const int HALF) {
    int first = COLS(8) >= 1 && B >= 8 ? 8 : B >= 4 ? 4 : B >= 2 ? 2 : 1, chunk = COLS(first);
    int per_block = M->out_bs / TILE;
    for (int t = t0, te; t < t1; t = te) {
        int block_end = (t / per_block + 1) * per_block, r = 0;
        te = t + chunk < t1 ? t + chunk : t1;
        te = te < block_end ? te : block_end;
#define GROUP(R) for (; COLS(R) >= 1 && r + (R) <= B; r += (R)) \
    row_tiles(x + r * ldx, ldx, M, t, te, out + r * ldo, ldo, mode, R, HALF)
        GROUP(8);
        GROUP(4);
        GROUP(2);
        GROUP(1);
#undef GROUP
    }
}

static void matmul(const float *x, int ldx, const Mat *M, int t0, int t1, float *out, int ldo, int mode, int B) {
    if (M->half)
        matmul_as(x, ldx, M, t0, t1, out, ldo, mode, B, 1);
    else
        matmul_as(x, ldx, M, t0, t1, out, ldo, mode, B, 0);
}

static void my_tiles(int n_out, int T, int tid, int *t0, int *t1) {
    int n = n_out / TILE;
    *t0 = n * tid / T;
    *t1 = n * (tid + 1) / T;
}

/* Where position pos is stored in layer l for (b, which, h), and the key segments it may read (n0 rows from seg0,
   then n1 from seg1), as element offsets into the cache's tensors (dst, seg0 and seg1 into kv, or dst2 and seg0
   into summaries where the pattern keeps them; dst2 < 0: none); now: the index of position pos among those keys.
   The cache geometry per pattern is its decode_slots. */
typedef struct {
    size_t dst, seg0, seg1;
    ptrdiff_t dst2;
    int n0, n1, now;
} Rows;

static Rows cache_rows(const Step *s, const Layer *L, int pos, int b, int which, int h) {
    int H = s->H, D = s->D;
    size_t bh = ((size_t)b * 2 + which) * H + h;
    Rows w = {.dst2 = -1};
    if (L->kind == LOCAL || L->kind == ALL) {
        w.seg0 = bh * L->slots * D;
        w.dst = w.seg0 + (size_t)(pos % L->slots) * D;
        w.n0 = pos + 1 < L->slots ? pos + 1 : L->slots;
        w.now = pos % L->slots;
    } else if (L->kind == STRIDED) {
        int r = pos / L->slots, c = pos % L->slots;
        w.seg0 = (bh * L->slots + c) * L->rows * D;
        w.dst = w.seg0 + (size_t)r * D;
        w.n0 = r + 1;
        w.now = r;
    } else {
        int r = pos / L->slots, c = pos % L->slots, k = c - L->lo[h];
        size_t sums = bh * L->rows * L->summary * D;
        w.dst = bh * L->slots * D + (size_t)c * D;
        if (k >= 0 && k < L->summary) w.dst2 = (ptrdiff_t)(sums + ((size_t)r * L->summary + k) * D);
        w.seg0 = sums;
        w.n0 = r * L->summary;
        w.seg1 = bh * L->slots * D;
        w.n1 = c + 1;
        w.now = w.n0 + c;
    }
    return w;
}

/* A cache row: D elements, float32 or (HALF) bfloat16. */
static inline const void *row_at(const void *s0, const void *s1, int n0, int j, int D, const int HALF) {
    size_t es = HALF ? 2 : 4;
    return j < n0 ? (const char *)s0 + (size_t)j * D * es : (const char *)s1 + (size_t)(j - n0) * D * es;
}

typedef uint16_t vh8 __attribute__((vector_size(16)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
/* Elements e .. e + 7 of a cache row, widened to float32 (a bfloat16 is the high half of its float32). */
static inline v8 ldc(const void *p, int e, const int HALF) {
    if (!HALF) return ld((const float *)p + e);
    vh8 h;
    memcpy(&h, (const uint16_t *)p + e, sizeof h);
    return (v8)(__builtin_convertvector(h, vu8) << 16);
}

/* Store D floats as a cache row: as they are, or (half) rounded to the nearest bfloat16, ties to even (a NaN to
   0x7fc0), as torch rounds float32 to bfloat16. */
static void store_row(void *dst, const float *x, int D, int half) {
    if (!half) {
        memcpy(dst, x, D * sizeof(float));
        return;
    }
    uint16_t *out = dst;
    for (int e = 0; e < D; e++) {
        uint32_t u;
        memcpy(&u, x + e, sizeof u);
        out[e] = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

/* The lane-wise products of q's vectors and key k's, summed over the D / 8 vectors (hsum gives the dot). */
static inline __attribute__((always_inline)) v8 dot_lanes(const v8 *qv, const void *k, const int D, const int HALF) {
    v8 a = qv[0] * ldc(k, 0, HALF);
    for (int e = 1; e < D / 8; e++) a += qv[e] * ldc(k, 8 * e, HALF);
    return a;
}

/* One query against keys [lo, hi) of the two segments: partial max, sum and weighted values. */
static inline __attribute__((always_inline)) void attend_part(const float *q, const void *k0, const void *v0,
                                                               int n0, const void *k1, const void *v1, int lo,
                                                               int hi, float *scores, float *m_out, float *l_out,
                                                               float *acc_out, const int D, const int HALF) {
    v8 qv[16], acc[16];
    float scale = 1.0f / sqrtf((float)D);
    for (int e = 0; e < D / 8; e++) qv[e] = ld(q + 8 * e) * scale, acc[e] = splat(0);
    float m = -INFINITY;
    int j = lo;
    if (hi - lo >= 8) {  /* eight keys at a time: one reduction tree for their eight dot products */
        v8 mv = splat(-INFINITY);
        for (; j + 8 <= hi; j += 8) {
            v8 a[8];
            for (int c = 0; c < 8; c++) {
                const char *v = row_at(v0, v1, n0, j + c, D, HALF);
                for (int e = 0; e < D * (HALF ? 2 : 4); e += 64) __builtin_prefetch(v + e);  /* for the sum below */
                a[c] = dot_lanes(qv, row_at(k0, k1, n0, j + c, D, HALF), D, HALF);
            }
            v8 sc = hsum8(a);
            st(scores + j - lo, sc);
            mv = vsel((vi8)(sc > mv), sc, mv);
        }
        for (int c = 0; c < 8; c++) m = mv[c] > m ? mv[c] : m;
    }
    for (; j < hi; j++) {
        float sc = hsum(dot_lanes(qv, row_at(k0, k1, n0, j, D, HALF), D, HALF));
        scores[j - lo] = sc;
        m = sc > m ? sc : m;
    }
    int n = hi - lo;
    float l = 0;
    for (int j = 0; j < n; j += 8) {
        v8 p = vexp(ld(scores + j) - m);
        st(scores + j, p);
        for (int e = 0; e < 8 && j + e < n; e++) l += p[e];
    }
    for (int j = lo; j < hi; j++) {
        const void *v = row_at(v0, v1, n0, j, D, HALF);
        v8 p = splat(scores[j - lo]);
        for (int e = 0; e < D / 8; e++) acc[e] += p * ldc(v, 8 * e, HALF);
    }
    *m_out = m;
    *l_out = l;
    for (int e = 0; e < D / 8; e++) st(acc_out + 8 * e, acc[e]);
}

/* The keys of every (row, head) are split P = s->T ways, whatever the batch and however many threads share the
   pass (T, this one tid among them), so that a row's result is the same either way: part p of (b, h) is item
   bh * P + p. Each thread runs a contiguous range of the items, so that at batch 8 it reads whole segments of
   the cache (longer streams from memory) while at batch 1 the threads still share the work evenly. The part
   that holds position pos first writes its new key and value into the cache (no other part reads them).
   me: this thread's index among all (its scratch). */
static void attention(Step *s, const Layer *L, const Pass *ps, int me, int tid, int T) {
    int H = s->H, D = s->D, d = s->d, P = s->T, items = ps->nrows * H * P;
    float *scores = s->scores + (size_t)me * (s->max_keys + 8);
    size_t es = L->half ? 2 : 4;
    const char *kv = L->kv, *sums = L->summaries;
    for (int it = items * tid / T; it < items * (tid + 1) / T; it++) {
        int bh = it / P, p = it % P, b = bh / H, h = bh % H, at = (ps->buf * H + bh) * P + p;
        Rows kr = cache_rows(s, L, ps->pos, ps->row0 + b, 0, h), vr = cache_rows(s, L, ps->pos, ps->row0 + b, 1, h);
        int fixed = L->kind == FIXED, n0 = kr.n0, n = kr.n0 + kr.n1, now = kr.now;
        int lo = (int)((int64_t)n * p / P), hi = (int)((int64_t)n * (p + 1) / P);
        const float *q = s->qkv + (size_t)(ps->buf + b) * 3 * d + h * D, *k = q + d, *v = q + 2 * d;
        if (lo <= now && now < hi) {
            store_row((char *)kv + kr.dst * es, k, D, L->half), store_row((char *)kv + vr.dst * es, v, D, L->half);
            if (kr.dst2 >= 0)
                store_row((char *)sums + kr.dst2 * es, k, D, L->half),
                    store_row((char *)sums + vr.dst2 * es, v, D, L->half);
        }
        /* the fixed pattern's first segment is its summaries, the second its ring; the others have one in kv */
        const char *k0 = (fixed ? sums : kv) + kr.seg0 * es, *v0 = (fixed ? sums : kv) + vr.seg0 * es;
        const char *k1 = kv + kr.seg1 * es, *v1 = kv + vr.seg1 * es;
        float *m_out = s->part_m + at, *l_out = s->part_l + at, *acc = s->part_acc + (size_t)at * D;
#define ATTEND(DD, HH) attend_part(q, k0, v0, n0, k1, v1, lo, hi, scores, m_out, l_out, acc, DD, HH)
        if (L->half) {
            if (D == 32) ATTEND(32, 1);
            else if (D == 64) ATTEND(64, 1);
            else ATTEND(128, 1);
        } else {
            if (D == 32) ATTEND(32, 0);
            else if (D == 64) ATTEND(64, 0);
            else ATTEND(128, 0);
        }
#undef ATTEND
    }
}

/* y [nrows, d] from the P = s->T partial results of every (b, h) of the pass. */
static void combine(const Step *s, const Pass *ps, float *y) {
    int B = ps->nrows, H = s->H, D = s->D, T = s->T;
    for (int bh = 0; bh < B * H; bh++) {
        size_t at = (size_t)(ps->buf * H + bh) * T;
        const float *m = s->part_m + at, *l = s->part_l + at;
        float mx = -INFINITY, total = 0, w[64];
        for (int p = 0; p < T; p++) mx = m[p] > mx ? m[p] : mx;
        for (int p = 0; p < T; p++) w[p] = l[p] > 0 ? expf(m[p] - mx) : 0, total += w[p] * l[p];
        float *out = y + (size_t)bh * D;  /* (b, h) -> columns h * D of row b: [B, H, D] is [B, d] */
        for (int e = 0; e < D; e += 8) {  /* D is 32, 64 or 128 */
            v8 a = splat(0);
            for (int p = 0; p < T; p++) a += w[p] * ld(s->part_acc + (at + p) * D + e);
            st(out + e, a / total);
        }
    }
}

/* x [nrows, d]: each row's token and position embeddings plus its lag inputs (the values of the tokens at
   pos - 1, pos - 2, ... through lag_t's rows, in that order), up to EMBED_CHUNKS vectors of VW columns held in
   registers while the lags add up (independent sums, so that the adds overlap). */
#define EMBED_CHUNKS 8
static void embed(const Step *s, const Pass *ps, float *x) {
    int d = s->d, lags = ps->pos < s->K ? ps->pos : s->K;
    for (int b = 0; b < ps->nrows; b++) {
        const float *e = ps->prev ? s->tok_emb + (size_t)ps->prev[b * ps->prev_stride] * d : s->start;
        const float *p = s->pos_emb + (size_t)ps->pos * d;
        const int64_t *prev = ps->prev ? ps->prev + b * ps->prev_stride : NULL;  /* prev[-k]: the token k + 1 back */
        for (int i0 = 0; i0 < d; i0 += EMBED_CHUNKS * VW) {
            int n = (d - i0) / VW < EMBED_CHUNKS ? (d - i0) / VW : EMBED_CHUNKS;
            vt a[EMBED_CHUNKS];
            for (int c = 0; c < n; c++) a[c] = ldt(e + i0 + c * VW) + ldt(p + i0 + c * VW);
            for (int k = 0; k < lags; k++) {
                vt v = s->token_value[prev[-k]] - (vt){0};
                const float *w = s->lag_t + (size_t)k * d + i0;
                for (int c = 0; c < n; c++) a[c] += v * ldt(w + c * VW);
            }
            for (int c = 0; c < n; c++) stt(x + b * d + i0 + c * VW, a[c]);
        }
    }
}

/* Pass ps on T threads (tid: this one among them; me: its index among all, for its scratch). */
static void run_step(Step *s, const Pass *ps, int me, int tid, int T, int *sense) {
    int B = ps->nrows, d = s->d, t0, t1;
    float *norm = s->norm + (size_t)me * s->B * d, *y = s->y + (size_t)me * s->B * d;
    float *x = s->x + (size_t)ps->buf * d, *qkv = s->qkv + (size_t)ps->buf * 3 * d;
    float *f = s->f + (size_t)ps->buf * s->ff;
    if (tid == 0) embed(s, ps, x);  /* thread 0: it draws the tokens that the others wait for at this barrier */
    barrier(s, T, sense);
    for (int l = 0; l < s->n_layers; l++) {
        const Layer *L = &s->layers[l];
        layer_norm(x, L->n1w, L->n1b, norm, B, d);
        my_tiles(3 * d, T, tid, &t0, &t1);
        matmul(norm, d, &L->qkv, t0, t1, qkv, 3 * d, STORE, B);
        barrier(s, T, sense);
        attention(s, L, ps, me, tid, T);
        barrier(s, T, sense);
        combine(s, ps, y);
        my_tiles(d, T, tid, &t0, &t1);
        matmul(y, d, &L->proj, t0, t1, x, d, ADD, B);
        barrier(s, T, sense);
        layer_norm(x, L->n2w, L->n2b, norm, B, d);
        my_tiles(s->ff, T, tid, &t0, &t1);
        matmul(norm, d, &L->fc, t0, t1, f, s->ff, GELU, B);
        barrier(s, T, sense);
        my_tiles(d, T, tid, &t0, &t1);
        matmul(f, s->ff, &L->fc2, t0, t1, x, d, ADD, B);
        barrier(s, T, sense);
    }
    layer_norm(x, s->nw, s->nb, norm, B, d);
    my_tiles(s->V, T, tid, &t0, &t1);
    matmul(norm, d, &s->head, t0, t1, ps->logits, s->V, STORE, B);
    barrier(s, T, sense);
}

static int64_t sample_row(const float *logits, int V, const Rule *r, float u, float *cdf, uint32_t *scratch);

/* st_sample's job on thread me, every position of its rows: ALONE, its own share of the rows, stepped by itself
   without waiting for the other threads (the rows are independent); TOGETHER, every step of all the rows on all
   threads, thread 0 drawing the tokens between steps (the others wait at the next step's first barrier); SOLO,
   all the rows on the calling thread (me 0) alone. All give the same logits. The job is copied first: thread 0
   may set the next one while another thread is still leaving this one's last barrier. */
static void sample_rows(Step *s, int mode, int me, int *sense) {
    const Job job = s->job, *j = &job;
    int T = mode == TOGETHER ? s->T : 1, tid = mode == TOGETHER ? me : 0, alone = mode == ALONE;
    int a = alone ? j->nrows * me / s->T : 0, n = alone ? j->nrows * (me + 1) / s->T - a : j->nrows;
    int64_t *tokens = j->tokens + (int64_t)(j->row0 + a) * j->ld_tokens;
    const float *u = j->u + (int64_t)(j->row0 + a) * j->ld_u;
    float *logits = s->own_logits + (size_t)a * s->V, *cdf = s->cdf + (size_t)me * s->V;
    uint32_t *sort = s->sort + (size_t)me * 4 * s->V;
    for (int pos = j->start; pos < j->stop; pos++) {
        Pass ps = {.pos = pos, .row0 = j->row0 + a, .nrows = n, .buf = a, .prev = pos ? tokens + pos - 1 : NULL,
                   .prev_stride = j->ld_tokens, .logits = logits};
        run_step(s, &ps, me, tid, T, sense);
        for (int b = 0; b < n && tid == 0; b++)
            tokens[b * j->ld_tokens + pos] = sample_row(logits + (size_t)b * s->V, s->V, &j->rule,
                                                        u[b * j->ld_u + pos], cdf, sort);
    }
}

/* One job for every thread: st_step's pass, or st_sample's rows (then, alone, all wait for the last). */
static void run_job(Step *s, int me, int *sense) {
    int mode = s->mode; /* read once, before the job's first barrier (see sample_rows) */
    if (mode == PASS) {
        run_step(s, &s->pass, me, me, s->T, sense);
        return;
    }
    sample_rows(s, mode, me, sense);
    if (mode == ALONE) barrier(s, s->T, sense);
}

static void *worker(void *arg) {
    Step *s = ((void **)arg)[0];
    int tid = (int)(intptr_t)((void **)arg)[1], sense = 0, seen = 0;
    free(arg);
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&s->gen, memory_order_acquire) == seen) {
            if (++spins < SPIN) {
                PAUSE();
                continue;
            }
            pthread_mutex_lock(&s->mu);
            while (atomic_load(&s->gen) == seen) pthread_cond_wait(&s->cv, &s->mu);
            pthread_mutex_unlock(&s->mu);
        }
        seen = atomic_load(&s->gen);
        if (s->quit) return NULL;
        run_job(s, tid, &sense);
    }
}

static void *aligned(size_t floats) {
    size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    void *p = aligned_alloc(64, bytes ? bytes : 64);
    if (p) memset(p, 0, bytes ? bytes : 64);
    return p;
}

void st_free(Step *s);

Step *st_new(int B, int d, int H, int ff, int V, int n_layers, int T, int max_keys, const float *tok_emb,
             const float *start, const float *pos_emb, const float *nw, const float *nb, const float *hw,
             const float *hb) {
    Step *s = calloc(1, sizeof(Step));
    if (!s) return NULL;
    *s = (Step){.B = B, .d = d, .H = H, .D = d / H, .ff = ff, .V = V, .n_layers = n_layers, .T = T,
                .max_keys = max_keys, .tok_emb = tok_emb, .start = start, .pos_emb = pos_emb, .nw = nw, .nb = nb,
                .head = dense_mat(hw, hb, d, V)};
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->layers = calloc(n_layers, sizeof(Layer));
    s->x = aligned((size_t)B * d);
    s->qkv = aligned((size_t)B * 3 * d);
    s->f = aligned((size_t)B * ff);
    s->norm = aligned((size_t)T * B * d);
    s->y = aligned((size_t)T * B * d);
    s->scores = aligned((size_t)T * (max_keys + 8));
    s->part_acc = aligned((size_t)B * H * T * (d / H));
    s->part_m = aligned((size_t)B * H * T);
    s->part_l = aligned((size_t)B * H * T);
    s->own_logits = aligned((size_t)B * V);
    s->cdf = aligned((size_t)T * V);
    s->sort = aligned((size_t)T * V * 4);
    s->threads = calloc(T, sizeof(pthread_t));
    if (!s->layers || !s->x || !s->qkv || !s->f || !s->norm || !s->y || !s->scores || !s->part_acc || !s->part_m ||
        !s->part_l || !s->own_logits || !s->cdf || !s->sort || !s->threads) {
        st_free(s);
        return NULL;
    }
    return s;
}

/* Lag inputs: K of them, lag_t [K, d] and token_value [V] (the caller keeps them alive). */
void st_lag(Step *s, int K, const float *lag_t, const float *token_value) {
    s->K = K, s->lag_t = lag_t, s->token_value = token_value;
}

void st_layer(Step *s, int l, int kind, void *kv, void *summaries, int half, int slots, int rows, int summary,
              const int *lo, const float *const *w) {
    Layer *L = &s->layers[l];
    L->kind = kind, L->kv = kv, L->summaries = summaries, L->half = half, L->slots = slots, L->rows = rows;
    L->summary = summary;
    for (int h = 0; h < s->H && lo; h++) L->lo[h] = lo[h];
    int d = s->d;
    L->n1w = w[0], L->n1b = w[1], L->n2w = w[6], L->n2b = w[7];
    L->qkv = dense_mat(w[2], w[3], d, 3 * d), L->proj = dense_mat(w[4], w[5], d, d);
    L->fc = dense_mat(w[8], w[9], d, s->ff), L->fc2 = dense_mat(w[10], w[11], s->ff, d);
}

/* Make layer l's feed-forward matrix (which: 0 in, 1 out) block-sparse, in blocks of bs (a multiple of TILE):
   packed weights w, col_ptr [outputs / bs + 1] and starts [listed blocks] as in Mat; its bias stays. */
void st_sparse(Step *s, int l, int which, const float *w, int bs, const int *col_ptr, const int *starts) {
    Mat *M = which ? &s->layers[l].fc2 : &s->layers[l].fc;
    M->w = w, M->half = 0, M->in_bs = bs, M->out_bs = bs, M->col_ptr = col_ptr, M->starts = starts;
}

/* Read matrix which (0 qkv, 1 proj, 2 fc, 3 fc2) of layer l (l = -1: the head) from w: the float32 packing it
   replaces, in bfloat16, with each tile's rows i and i + 1 interleaved as ldh2 reads them. */
void st_half(Step *s, int l, int which, const uint16_t *w) {
    Layer *L = l >= 0 ? &s->layers[l] : NULL;
    Mat *M = !L ? &s->head : which == 0 ? &L->qkv : which == 1 ? &L->proj : which == 2 ? &L->fc : &L->fc2;
    M->w = w, M->half = 1;
}

/* Start the T - 1 workers; returns the threads that will run the steps (fewer if a worker could not start). */
int st_start(Step *s) {
    for (int t = 1; t < s->T; t++) {
        void **arg = malloc(2 * sizeof(void *));
        if (arg) arg[0] = s, arg[1] = (void *)(intptr_t)t;
        if (!arg || pthread_create(&s->threads[t], NULL, worker, arg)) {
            free(arg);
            s->T = t; /* run with the workers that started */
            break;
        }
    }
    return s->T;
}

/* Wake the workers for the job set in s, and run the calling thread's part of it. */
static void start_job(Step *s) {
    if (s->T > 1) {
        pthread_mutex_lock(&s->mu);
        atomic_fetch_add(&s->gen, 1);
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    run_job(s, 0, &s->sense0);
}

/* Whether the tokens a step at pos reads, t[b * stride - k] for n rows b and k < max(1, min(pos, K)), all lie in
   [0, V). */
static int tokens_in_vocab(const Step *s, const int64_t *t, int64_t stride, int n, int pos) {
    int back = pos < s->K ? pos : s->K;
    back = back > 1 ? back : 1;
    for (int b = 0; b < n; b++)
        for (int k = 0; k < back; k++)
            if (t[b * stride - k] < 0 || t[b * stride - k] >= s->V) return 0;
    return 1;
}


/* logits [B, V] of position pos for the whole batch; prev [B] (element stride prev_stride) the tokens at pos - 1,
   NULL at 0, in their rows as Pass says. -1 (nothing done) when a token it reads is outside [0, V). */
int st_step(Step *s, int pos, const int64_t *prev, int64_t prev_stride, float *logits) {
    if (prev && !tokens_in_vocab(s, prev, prev_stride, s->B, pos)) return -1;
    s->pass = (Pass){.pos = pos, .row0 = 0, .nrows = s->B, .buf = 0, .prev = prev, .prev_stride = prev_stride,
                     .logits = logits};
    s->mode = PASS;
    start_job(s);
    return 0;
}

/* The indices of x [V] (no NaN), largest first, ties by the lower index: a stable radix sort (least significant
   byte first) of each float's bits, mapped so that unsigned order is the reverse of float order, from the indices in
   increasing order. scratch: 4 V words; returns where the order is (within scratch). */
static const uint32_t *largest_first(const float *x, int V, uint32_t *scratch) {
    uint32_t *key = scratch, *idx = scratch + V, *key2 = scratch + 2 * V, *idx2 = scratch + 3 * V;
    for (int i = 0; i < V; i++) {
        uint32_t bits;
        memcpy(&bits, &x[i], 4);
        key[i] = bits >> 31 ? bits : ~bits & 0x7fffffffu; /* larger floats, smaller keys */
        idx[i] = (uint32_t)i;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        int count[256] = {0}, at = 0;
        for (int i = 0; i < V; i++) count[key[i] >> shift & 255]++;
        if (count[key[0] >> shift & 255] == V) continue; /* one digit for all: this pass keeps the order */
        for (int b = 0; b < 256; b++) {
            int n = count[b];
            count[b] = at, at += n;
        }
        for (int i = 0; i < V; i++) {
            int to = count[key[i] >> shift & 255]++;
            key2[to] = key[i], idx2[to] = idx[i];
        }
        uint32_t *t = key; key = key2, key2 = t;
        t = idx; idx = idx2, idx2 = t;
    }
    return idx;
}

/* Top-p on unnormalised probabilities p [V] (>= 0), in place: zero every token whose likelier tokens hold at
   least top_p of the mass, as choose_tokens computes it (the likeliest-first order, ties by index; a running
   sum in double rounded to float per token, as torch's cumsum). scratch: 4 V words. */
static void keep_top_p(float *p, int V, float top_p, uint32_t *scratch) {
    double total = 0;
    for (int i = 0; i < V; i++) total += p[i];
    const uint32_t *order = largest_first(p, V, scratch);
    float limit = top_p * (float)total; /* float times float, as torch multiplies a float tensor by a scalar */
    double run = 0;
    for (int k = 0; k < V; k++) {
        int i = (int)order[k];
        float q = p[i], before = (float)(run += q) - q; /* the mass of the likelier tokens */
        if (!(before < limit)) p[i] = 0;
    }
}

/* The token of one row: the inverse CDF at u of softmax(logits / temperature), filtered by top-k and top-p, as
   sampling.options.choose_tokens computes it (temperature 0: the first largest logit). cdf: V floats and scratch:
   4 V words of scratch. */
static int64_t sample_row(const float *logits, int V, const Rule *r, float u, float *cdf, uint32_t *scratch) {
    int best = 0;
    for (int i = 1; i < V; i++) best = logits[i] > logits[best] ? i : best;
    float temperature = r->temperature;
    if (temperature == 0) return best;
    float m = temperature == 1 ? logits[best] : logits[best] / temperature;
    float kth = -INFINITY; /* top-k: the k-th largest of logits / temperature, as torch.topk's last value */
    if (r->top_k > 0 && r->top_k < V) {
        for (int i = 0; i < V; i++) cdf[i] = temperature == 1 ? logits[i] : logits[i] / temperature;
        kth = cdf[largest_first(cdf, V, scratch)[r->top_k - 1]];
    }
    /* exp, then the running sum, in two loops: GCC 12.2 -O3 -march=native on an AVX-512 CPU miscompiled
       them as one loop (the tree vectorizer; 1 in 2 tokens wrong at temperature 0.7) */
    for (int i = 0; i < V; i += 8) {
        v8 z = ld(logits + i);
        if (temperature != 1) z = z / temperature;
        st(cdf + i, vsel((vi8)(z < splat(kth)), (v8){0}, vexp(z - m))); /* top-k: the logits under the k-th are out */
    }
    if (r->top_p < 1) keep_top_p(cdf, V, r->top_p, scratch);
    double total = 0; /* torch's cumsum of float accumulates in double */
    for (int i = 0; i < V; i++) cdf[i] = (float)(total += cdf[i]);
    float target = u * cdf[V - 1];
    int lo = 0, hi = V; /* the first i with cdf[i] > target */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (cdf[mid] > target) hi = mid;
        else lo = mid + 1;
    }
    return lo < V ? lo : V - 1;
}

/* Sample positions [start, stop) of rows row0 .. row0 + nrows - 1 in place: tokens [B, *] (row stride ld_tokens)
   hold the tokens before start; position p of row b uses the uniform u[b * ld_u + p], drawn by the rule
   temperature, top_k (0: off) and top_p (1: off); solo: on the calling thread alone (else on all threads). Returns
   0, or -1 (nothing more done) when a token before start is outside [0, V). */
int st_sample(Step *s, int64_t *tokens, int64_t ld_tokens, const float *u, int64_t ld_u, float temperature,
              int top_k, float top_p, int start, int stop, int row0, int nrows, int solo) {
    if (start > 0 && !tokens_in_vocab(s, tokens + (int64_t)row0 * ld_tokens + start - 1, ld_tokens, nrows, start))
        return -1;
    if (start >= stop) return 0; /* a job without steps has no barrier: a worker could still be starting it when the
                                    next one is set */
    s->job = (Job){.tokens = tokens, .ld_tokens = ld_tokens, .ld_u = ld_u, .u = u,
                   .rule = {.temperature = temperature, .top_p = top_p, .top_k = top_k},
                   .start = start, .stop = stop, .row0 = row0, .nrows = nrows};
    if (solo) {
        sample_rows(s, SOLO, 0, &s->sense0);
        return 0;
    }
    s->mode = s->T > 1 && nrows >= ALONE_ROWS * s->T ? ALONE : TOGETHER; /* alone: no step waits for another */
    start_job(s);
    return 0;
}

void st_free(Step *s) {
    if (!s) return;
    if (s->threads) {
        pthread_mutex_lock(&s->mu);
        s->quit = 1;
        atomic_fetch_add(&s->gen, 1);
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        for (int t = 1; t < s->T; t++)
            if (s->threads[t]) pthread_join(s->threads[t], NULL);
    }
    free(s->layers), free(s->x), free(s->qkv), free(s->f), free(s->norm), free(s->y), free(s->scores);
    free(s->part_acc), free(s->part_m), free(s->part_l), free(s->own_logits), free(s->cdf), free(s->sort);
    free(s->threads);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}
