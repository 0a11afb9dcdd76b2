/* The CPU's f32 multiply-add peak: twelve independent chains of AVX-512 FMAs (no memory traffic), on
 * one thread and then on two. What every kernel's GFLOP/s in BENCHMARKS.md is measured against.
 *
 *   gcc -O3 -mavx512f -mfma -pthread bench/fma_peak.c -o target/fma_peak && target/fma_peak
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>

#define STEPS 200000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *chains(void *out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m512 a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.999999f);
    for (long i = 0; i < STEPS; i++) {
        a0 = _mm512_fmadd_ps(a0, x, y); a1 = _mm512_fmadd_ps(a1, x, y);
        a2 = _mm512_fmadd_ps(a2, x, y); a3 = _mm512_fmadd_ps(a3, x, y);
        a4 = _mm512_fmadd_ps(a4, x, y); a5 = _mm512_fmadd_ps(a5, x, y);
        a6 = _mm512_fmadd_ps(a6, x, y); a7 = _mm512_fmadd_ps(a7, x, y);
        a8 = _mm512_fmadd_ps(a8, x, y); a9 = _mm512_fmadd_ps(a9, x, y);
        a10 = _mm512_fmadd_ps(a10, x, y); a11 = _mm512_fmadd_ps(a11, x, y);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    *(float *)out = _mm512_reduce_add_ps(s); /* keeps the chains alive */
    return NULL;
}

int main(void) {
    float sums[2];
    for (int threads = 1; threads <= 2; threads++) {
        pthread_t t[2];
        double start = now();
        for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, chains, &sums[i]);
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        double secs = now() - start;
        printf("%d thread(s): %.1f GFLOP/s\n", threads, threads * (double)STEPS * 12 * 16 * 2 / secs / 1e9);
    }
    return 0;
}
