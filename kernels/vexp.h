/* exp over a vector of floats with Cephes' polynomial (about 1 ulp); 0 where the result would be subnormal,
   so exp(-inf) = 0. Shared by kernels/cpu_kernels.c and sampling/compiled_step.c, whose vector widths differ:
   VEXP(NAME, V, VI) defines `static inline V NAME(V x)` for a float vector type V and the int32 vector type
   VI of the same width; the includer provides splat(float) -> V and vsel(VI mask, V a, V b) -> V. */
#define VEXP(NAME, V, VI)                                                      \
    static inline V NAME(V x) {                                                \
        x = vsel(x > 88.3762626647949f, splat(88.3762626647949f), x);          \
        x = vsel(x < -88.3762626647949f, splat(-88.3762626647949f), x);        \
        V fx = x * 1.44269504088896341f + 0.5f;                                \
        V n = __builtin_convertvector(__builtin_convertvector(fx, VI), V);     \
        n = n - vsel(n > fx, splat(1.0f), splat(0.0f));                        \
        x = x - n * 0.693359375f + n * 2.12194440e-4f;                         \
        V z = x * x;                                                           \
        V y = splat(1.9875691500E-4f);                                         \
        y = y * x + 1.3981999507E-3f;                                          \
        y = y * x + 8.3334519073E-3f;                                          \
        y = y * x + 4.1665795894E-2f;                                          \
        y = y * x + 1.6666665459E-1f;                                          \
        y = y * x + 5.0000001201E-1f;                                          \
        y = y * z + x + 1.0f;                                                  \
        VI e = (__builtin_convertvector(n, VI) + 127) << 23;                   \
        return y * (V)e;                                                       \
    }
