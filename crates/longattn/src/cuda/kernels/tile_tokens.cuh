// Token of row r of query tile t (la_qtok) and of key tile t (la_ktok): row order, or patch order
// (LA_PATCH = 1, 2-D neighborhoods on a grid LA_PW tokens wide; mask/patch.rs): tile t is then
// the t-th LA_QPH x LA_QPW (query) or LA_KPH x LA_KPW (key) patch of the grid, patches numbered
// row-major over the grid of patches. Needs LA_BR and LA_BC.
#ifndef LA_PATCH
#define LA_PATCH 0
#endif
#if LA_PATCH
template <int PH, int PW>
__device__ __forceinline__ int la_patch_tok(int t, int r) {
    constexpr int per = LA_PW / PW;
    return ((t / per) * PH + r / PW) * LA_PW + (t % per) * PW + r % PW;
}
__device__ __forceinline__ int la_qtok(int t, int r) { return la_patch_tok<LA_QPH, LA_QPW>(t, r); }
__device__ __forceinline__ int la_ktok(int t, int r) { return la_patch_tok<LA_KPH, LA_KPW>(t, r); }
#else
__device__ __forceinline__ int la_qtok(int t, int r) { return t * LA_BR + r; }
__device__ __forceinline__ int la_ktok(int t, int r) { return t * LA_BC + r; }
#endif
