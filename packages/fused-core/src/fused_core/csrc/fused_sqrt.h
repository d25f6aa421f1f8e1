/* The square root of fused-optim's C kernels: torch's CPU sqrt, bit for bit.
 *
 * Where torch is built with MKL (x86-64 Linux and Windows wheels), ATen's vml.h computes
 * Tensor.sqrt() with MKL's vmsSqrt/vmdSqrt(VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is
 * not correctly rounded (one result in 130 to 150 is 1 ulp off sqrt() on an AVX-512 CPU). A kernel
 * that reproduces torch's bits must call the very functions: fused_sqrt_resolve() looks vmsSqrt,
 * vmdSqrt and MKL_Set_Num_Threads_Local up, once, with dlsym in the libtorch_cpu already loaded in
 * the process (or its dependencies); no MKL of our own is linked, so a kernel library needs -ldl.
 * Where they are not all there (torch without MKL), the block functions take sqrt()/sqrtf(), which
 * is what ATen's Vectorized<T>::sqrt computes. NaN payloads are not reproduced (torch's own differ
 * between its vectorised loops and their scalar tails).
 *
 * Threading: a kernel calls the block functions from its OpenMP threads (torch's own). After
 * torch.set_num_threads, which turns MKL's dynamic threading off, each MKL call there would open a
 * nested parallel region, ~1 us, longer than a block's square roots; so each thread makes MKL
 * sequential for itself with fused_mkl_sequential() on entering the parallel region and gives the
 * previous setting back with fused_mkl_threads_restore() on leaving it.
 *
 * The state lives in static variables: each kernel library that includes this header has its own
 * copy, resolved on its first call.
 */
#ifndef FUSED_SQRT_H
#define FUSED_SQRT_H

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>

typedef void (*fused_vml_sqrt_f32)(int n, const float *a, float *r, int64_t mode);
typedef void (*fused_vml_sqrt_f64)(int n, const double *a, double *r, int64_t mode);
typedef int (*fused_mkl_threads_fn)(int n);
#define FUSED_VML_MODE (0x2 | 0x140000 | 0x100) /* VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, ATen's vml.h */

static struct {
    fused_vml_sqrt_f32 f32;
    fused_vml_sqrt_f64 f64;
    fused_mkl_threads_fn set_threads_local;
    int resolved;
} fused_mkl;

/* Looks MKL's vmsSqrt/vmdSqrt (LP64, as ATen calls them) and MKL_Set_Num_Threads_Local (the C
 * interface; the lower-case name is Fortran's, which takes a pointer) up in the loaded
 * libtorch_cpu, once; all three or none are kept. Racing callers store the same values. A kernel
 * calls it before its parallel region. */
static inline void fused_sqrt_resolve(void) {
    if (__atomic_load_n(&fused_mkl.resolved, __ATOMIC_ACQUIRE)) return;
    void *torch = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD); /* kept open: torch stays loaded */
    void *f32 = torch ? dlsym(torch, "vmsSqrt") : 0, *f64 = torch ? dlsym(torch, "vmdSqrt") : 0;
    void *threads = torch ? dlsym(torch, "MKL_Set_Num_Threads_Local") : 0;
    if (f32 != 0 && f64 != 0 && threads != 0) {
        __atomic_store_n(&fused_mkl.f32, (fused_vml_sqrt_f32)f32, __ATOMIC_RELAXED);
        __atomic_store_n(&fused_mkl.f64, (fused_vml_sqrt_f64)f64, __ATOMIC_RELAXED);
        __atomic_store_n(&fused_mkl.set_threads_local, (fused_mkl_threads_fn)threads, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&fused_mkl.resolved, 1, __ATOMIC_RELEASE);
}

/* 1 where the block functions take MKL's square roots (torch built with MKL), 0 where sqrt()'s.
 * Resolves first: a kernel exports it (adam_sqrt_is_mkl, rmsprop_sqrt_is_mkl) for its tests. */
static inline int fused_sqrt_is_mkl(void) {
    fused_sqrt_resolve();
    return fused_mkl.f32 != 0;
}

/* MKL sequential on this (OpenMP) thread until fused_mkl_threads_restore; returns the previous
 * setting (0 where MKL is not used). */
static inline int fused_mkl_sequential(void) {
    return fused_mkl.set_threads_local != 0 ? fused_mkl.set_threads_local(1) : 0;
}

/* Gives this thread back the setting fused_mkl_sequential returned (0: MKL's global setting). */
static inline void fused_mkl_threads_restore(int previous) {
    if (fused_mkl.set_threads_local != 0) fused_mkl.set_threads_local(previous);
}

/* r[i] = torch's sqrt(x[i]) for the n (< 2^31) values of a block, after fused_sqrt_resolve. */
static inline void fused_sqrt_block_f32(const float *restrict x, float *restrict r, int64_t n) {
    if (fused_mkl.f32 != 0) fused_mkl.f32((int)n, x, r, FUSED_VML_MODE);
    else for (int64_t i = 0; i < n; i++) r[i] = sqrtf(x[i]);
}

static inline void fused_sqrt_block_f64(const double *restrict x, double *restrict r, int64_t n) {
    if (fused_mkl.f64 != 0) fused_mkl.f64((int)n, x, r, FUSED_VML_MODE);
    else for (int64_t i = 0; i < n; i++) r[i] = sqrt(x[i]);
}

#endif
