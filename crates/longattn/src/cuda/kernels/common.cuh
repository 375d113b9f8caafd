// Shared device helpers for longattn kernels (compiled by NVRTC; no CUDA headers needed).
// Element types travel as raw 16-bit words; conversions and matrix instructions are inline PTX.
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define LA_INF __int_as_float(0x7f800000)
#define LA_LOG2E 1.4426950408889634f
#define LA_LN2 0.6931471805599453f

// 2^x (approximate unit, ~2 ulp; -inf -> 0).
__device__ __forceinline__ float la_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Two f32 -> packed pair of the storage type (round to nearest even); lo in the low half.
__device__ __forceinline__ u32 la_pack2(float lo, float hi) {
    u32 r;
#if LA_F16
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ float la_to_f32(u16 x) {
#if LA_F16
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#else
    return __uint_as_float(((u32)x) << 16);
#endif
}

__device__ __forceinline__ u32 la_smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous global -> shared copy; `bytes` = 0 fills the destination with zeros.
__device__ __forceinline__ void la_cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(la_smem_addr(dst)), "l"(src),
                 "r"(bytes));
}
__device__ __forceinline__ void la_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void la_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void la_ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(la_smem_addr(p)));
}
__device__ __forceinline__ void la_ldmatrix_x4_trans(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(la_smem_addr(p)));
}

// C[16x8] += A[16x16] * B[16x8] on the tensor cores, f32 accumulation.
__device__ __forceinline__ void la_mma16816(float* c, const u32* a, const u32* b) {
#if LA_F16
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Mask arithmetic is 32-bit: the host refuses sequences longer than 2^29 and clamps atom
// constants to 2^30, so positions, their differences and sums stay inside int (see
// mask/codegen.rs).
// Capacity of the atom constants in the parameter structs (`int mc[LA_MASK_CONSTS]` in LaFwdParams
// and LaBwdParams; MASK_CONSTS in mask/codegen.rs): the generated mask programs read every
// window bound, sink / prefix length, chunk size, stride and neighborhood size from p.mc[k], so
// masks that differ only in those constants share one compiled kernel.
#define LA_MASK_CONSTS 32
// Floor division and Euclidean remainder (the mask language's semantics).
__device__ __forceinline__ int la_imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int la_imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int la_fdiv(int a, int b) {
    const int q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
__device__ __forceinline__ int la_emod(int a, int b) {
    const int r = a % b;
    return r < 0 ? r + b : r;
}

// PowerAttention: the block distance |floor(pos / b) - floor(j / b)| is 0 or a power of two.
__device__ __forceinline__ bool la_power(int pos, int j, int b) {
    int d = la_fdiv(pos, b) - la_fdiv(j, b);
    d = d < 0 ? -d : d;
    return (d & (d - 1)) == 0;
}

// Radial Attention: frames of f tokens; spatial indices within w >> floor(log2 dt) of each other
// at frame distance dt >= 2 (w at 0 and 1).
__device__ __forceinline__ bool la_radial(int pos, int j, int f, int w) {
    const int tq = la_fdiv(pos, f), tk = j / f;
    int dt = tq - tk;
    dt = dt < 0 ? -dt : dt;
    int ds = la_emod(pos, f) - j % f;
    ds = ds < 0 ? -ds : ds;
    const int r = dt <= 1 ? 0 : 31 - __clz(dt);
    return ds <= (w >> r);
}

// One axis of a NATTEN neighborhood: coordinates (t / stride) % n, kernel k, dilation d.
__device__ __forceinline__ bool la_nbr_axis(int i, int j, int n, int stride, int k, int d) {
    const int cq = (i / stride) % n, ck = (j / stride) % n;
    if (cq % d != ck % d) return false;
    const int r = cq % d;
    const int nr = (n - r + d - 1) / d;
    if (k >= nr) return true;
    const int gq = cq / d, gk = ck / d;
    int s = gq - k / 2;
    s = s < 0 ? 0 : (s > nr - k ? nr - k : s);
    return s <= gk && gk < s + k;
}
