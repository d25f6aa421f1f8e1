/* The slot table of fused-optim's segment kernels (fused_core.kernels.GradSegments), and how the
 * kernels split it into work for their threads.
 *
 * Slot i occupies elements [offsets[i], offsets[i] + numels[i]) of the flat parameter and state
 * buffers; if has_grad[i], its gradient is the dense array at address grad_ptrs[i]. A kernel
 * concatenates the slots that have a gradient and splits the concatenation into pieces of a fixed
 * number of elements, taken dynamically by its OpenMP threads: a large slot spreads over every
 * thread, thousands of small ones share a piece. Within a piece, slots that lie back to back in
 * the flat buffers and whose gradients lie back to back too (bound gradients) run as one segment.
 */
#ifndef FUSED_SEGMENTS_H
#define FUSED_SEGMENTS_H

#include <stdint.h>
#include <stdlib.h>

/* starts[i]: where slot i begins in the concatenation of the slots with a gradient; starts[slots]:
 * its length. In a buffer of this thread's, reused by its next call (the caller does not free it;
 * never freed: one per thread that runs a kernel, of the largest table it has seen), so that a
 * step allocates nothing: right after autograd has handed over thousands of new gradients,
 * glibc's malloc sorts the chunks freed meanwhile on the next allocation of this size,
 * milliseconds on 20,000 of them. NULL when out of memory. */
static inline int64_t *fused_segment_starts(const int8_t *has_grad, const int64_t *numels, int64_t slots) {
    static _Thread_local int64_t *buffer = 0;
    static _Thread_local int64_t capacity = 0;
    if (slots + 1 > capacity) {
        int64_t *grown = realloc(buffer, (size_t)(slots + 1) * sizeof(int64_t));
        if (grown == 0) return 0;
        buffer = grown;
        capacity = slots + 1;
    }
    buffer[0] = 0;
    for (int64_t i = 0; i < slots; i++) buffer[i + 1] = buffer[i] + (has_grad[i] ? numels[i] : 0);
    return buffer;
}

/* The slot holding element `from` of the concatenation: the last i with starts[i] <= from. */
static inline int64_t fused_slot_at(const int64_t *starts, int64_t slots, int64_t from) {
    int64_t lo = 0, hi = slots;
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (starts[mid] <= from) lo = mid; else hi = mid;
    }
    return lo;
}

/* Whether slot j + 1 has a gradient and lies right after slot j, in the flat buffers and with its
 * gradient right after slot j's gradient (elements of `itemsize` bytes). */
static inline int fused_back_to_back(const int8_t *has_grad, const int64_t *offsets, const int64_t *numels,
                                     const int64_t *grad_ptrs, int64_t j, int64_t itemsize) {
    return has_grad[j + 1] && offsets[j + 1] == offsets[j] + numels[j] &&
           grad_ptrs[j + 1] == grad_ptrs[j] + numels[j] * itemsize;
}

/* After a call: mark the slots whose state the call initialised (a gradient, initialized[i] == 0)
 * with 2, as GradSegments asks, and return how many. */
static inline int64_t fused_mark_started(const int8_t *has_grad, uint8_t *initialized, int64_t slots) {
    int64_t started = 0;
    for (int64_t i = 0; i < slots; i++)
        if (has_grad[i] && !initialized[i]) { initialized[i] = 2; started++; }
    return started;
}

#endif
