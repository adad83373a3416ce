/* exp over a vector of floats with Cephes' polynomial (about 1 ulp); 0 where the result would be subnormal,
   so exp(-inf) = 0. Shared by kernels/cpu_kernels.c and sampling/compiled_step.c, whose vector widths differ:
   VEXP(NAME, V, VI) defines `static inline V NAME(V x)` for a float vector type V and the int32 vector type
   VI of the same width; the includer provides splat(float) -> V and vsel(VI mask, V a, V b) -> V.
   The constants are named so that other forms of the same exp (kernels/cpu_kernels.c's gelu_exp) share them. */
#define VEXP_MAX 88.3762626647949f /* largest argument; -VEXP_MAX the smallest */
#define VEXP_LOG2E 1.44269504088896341f
#define VEXP_LN2_HI 0.693359375f /* ln 2 = VEXP_LN2_HI - VEXP_LN2_LO, split so that n ln 2 loses no digits */
#define VEXP_LN2_LO 2.12194440e-4f
#define VEXP_P0 1.9875691500E-4f /* the polynomial's coefficients, highest degree first */
#define VEXP_P1 1.3981999507E-3f
#define VEXP_P2 8.3334519073E-3f
#define VEXP_P3 4.1665795894E-2f
#define VEXP_P4 1.6666665459E-1f
#define VEXP_P5 5.0000001201E-1f
#define VEXP(NAME, V, VI)                                                      \
    static inline V NAME(V x) {                                                \
        x = vsel(x > VEXP_MAX, splat(VEXP_MAX), x);                            \
        x = vsel(x < -VEXP_MAX, splat(-VEXP_MAX), x);                          \
        V fx = x * VEXP_LOG2E + 0.5f;                                          \
        V n = __builtin_convertvector(__builtin_convertvector(fx, VI), V);     \
        n = n - vsel(n > fx, splat(1.0f), splat(0.0f));                        \
        x = x - n * VEXP_LN2_HI + n * VEXP_LN2_LO;                             \
        V z = x * x;                                                           \
        V y = splat(VEXP_P0);                                                  \
        y = y * x + VEXP_P1;                                                   \
        y = y * x + VEXP_P2;                                                   \
        y = y * x + VEXP_P3;                                                   \
        y = y * x + VEXP_P4;                                                   \
        y = y * x + VEXP_P5;                                                   \
        y = y * z + x + 1.0f;                                                  \
        VI e = (__builtin_convertvector(n, VI) + 127) << 23;                   \
        return y * (V)e;                                                       \
    }
