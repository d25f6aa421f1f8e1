// Read and reset the gradients of many parameters at once, without a Python call per parameter.
//
// A parameter is named by its TensorImpl address (`Tensor._cdata`), which stays the same for the
// life of the Python object (`.data = t` re-points the storage, not the TensorImpl). The
// functions run with the GIL held (loaded through ctypes.PyDLL): resetting a gradient may free
// its Python object.
//
// fused_read_grads, per parameter i:
//   status[i] = NO_GRAD     .grad is None                               grad_ptrs[i] = 0
//             = IN_PLACE    .grad can be read where it lies: strided, same dtype, device and
//                           sizes as the parameter, same strides (size-1 dims aside)
//                                                                       grad_ptrs[i] = its data
//             = NEEDS_COPY  same dtype, device and sizes, other strides: copy it into place
//             = MISMATCH    another dtype, device or sizes, or not strided: an error to report
//             = MOVED       the parameter no longer lives at param_ptrs[i] (re-allocated)
// It returns how many are NEEDS_COPY, MISMATCH or MOVED (0 on the fast path), or -1 if torch
// threw (the Python side then falls back to its own reading).
//
// fused_clear_grads moves every gradient out of its parameter (`.grad` is None at once) and drops
// that reference. Where it was the last one, dropping it destroys the gradient (TensorImpl,
// StorageImpl, three free()s, and a Python object's dealloc where it has one): most of the time of
// a `zero_grad()` of many small tensors. A gradient whose destruction provably needs nothing of
// Python and no lock but malloc's (`release_cost`) is handed instead to the reaper, a thread of
// this library that destroys it: the deferred release. Everything else is dropped here, as
// `p.grad = None` drops it. The bytes waiting for the reaper are capped (the caller passes the
// cap and the largest tensor it may take): beyond, gradients are destroyed here.
//
// The reaper never takes the GIL and holds its lock only to take a batch of at most REAP_BATCH
// tensors from its queue. A fork() waits for the batch it is destroying and the child starts with
// the queue as it was and no reaper (it starts its own at its next hand-over); at exit() the
// reaper stops destroying after its batch, and what it had not destroyed is left to the OS.
#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <pthread.h>
#include <signal.h>

#if __has_include(<torch/csrc/api/include/torch/version.h>)
#include <torch/csrc/api/include/torch/version.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <typeinfo>
#include <utility>
#include <vector>

// The deferred release reads what it must know of a gradient through torch 2.13's c10 API (the
// PyObject slot and the combined reference count, where a Python object holds a counted
// reference): on an older torch nothing is deferred, and clearing destroys every gradient inline.
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR) && \
    (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13))
#define FUSED_DEFERRED_RELEASE 1
#else
#define FUSED_DEFERRED_RELEASE 0
#endif

namespace {

enum Status : int8_t { NO_GRAD = 0, IN_PLACE = 1, NEEDS_COPY = 2, MISMATCH = 3, MOVED = 4 };

bool same_strides(const c10::TensorImpl* a, const c10::TensorImpl* b) {
    auto sizes = a->sizes();
    auto sa = a->strides(), sb = b->strides();
    for (size_t d = 0; d < sizes.size(); d++) {
        if (sizes[d] != 1 && sa[d] != sb[d]) return false;
    }
    return true;
}

Status read_one(const c10::TensorImpl* param, int64_t param_ptr, int64_t* grad_ptr) {
    *grad_ptr = 0;
    const int64_t numel = param->numel();
    if (numel != 0 && reinterpret_cast<int64_t>(param->data()) != param_ptr) return MOVED;
    const at::Tensor& grad = param->grad();
    if (!grad.defined()) return NO_GRAD;
    const c10::TensorImpl* g = grad.unsafeGetTensorImpl();
    if (g->layout() != c10::kStrided || g->dtype() != param->dtype() || g->device() != param->device() ||
        g->sizes() != param->sizes())
        return MISMATCH;
    if (numel == 0) return IN_PLACE;
    if (!g->has_storage() || !same_strides(g, param)) return NEEDS_COPY;
    *grad_ptr = reinterpret_cast<int64_t>(g->data());
    return IN_PLACE;
}

// Reading one parameter's gradient follows a chain of pointers (the parameter's TensorImpl, its
// autograd meta, the gradient's TensorImpl, the gradient's storage), each usually a cache miss.
// The chains of different parameters are independent, so each is started ahead of its turn, one
// link per distance: by the time parameter i is read, its whole chain is in cache. A TensorImpl
// (176 bytes with torch 2.13) spans three or four cache lines and the reader reads fields on all of
// them (sizes, strides, dtype and dispatch keys lie at its end), so it fetches them all, and the
// parameter's StorageImpl (its data pointer). Clearing reads of the parameter only its autograd
// meta pointer, and of the gradient's TensorImpl its first 56 bytes (counts, pointers, Python
// object slot) and its last 24 (flags, dispatch keys). Both fetch the lines of the first 64 bytes
// of the autograd meta (the gradient lies there) and the whole gradient's StorageImpl (96 bytes:
// the reader reads its data pointer, clearing also its counts, deleter and Python object slot).
constexpr int64_t AHEAD = 4;
constexpr int64_t READ_BLOCK = 2048;  // parameters per unit of work of the threads

inline const c10::TensorImpl* param_at(const int64_t* params, int64_t n, int64_t i) {
    return i < n ? reinterpret_cast<const c10::TensorImpl*>(params[i]) : nullptr;
}

inline void prefetch_bytes(const void* object, size_t size) {
    const char* bytes = static_cast<const char*>(object);
    for (size_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
    __builtin_prefetch(bytes + size - 1);
}

inline const at::Tensor* grad_of(const c10::TensorImpl* param) {
    const c10::AutogradMetaInterface* meta = param->autograd_meta();
    return meta == nullptr ? nullptr : &meta->grad();
}

// `reader`: for fused_read_grads, which also reads the whole parameter and its storage.
void prefetch_ahead(const int64_t* params, int64_t n, int64_t i, bool reader) {
    if (const c10::TensorImpl* p = param_at(params, n, i + 4 * AHEAD))
        prefetch_bytes(p, reader ? sizeof(c10::TensorImpl) : 32);
    if (const c10::TensorImpl* p = param_at(params, n, i + 3 * AHEAD)) {
        if (const c10::AutogradMetaInterface* meta = p->autograd_meta()) prefetch_bytes(meta, 64);
        if (reader && p->has_storage()) prefetch_bytes(p->unsafe_storage().unsafeGetStorageImpl(), sizeof(c10::StorageImpl));
    }
    if (const c10::TensorImpl* p = param_at(params, n, i + 2 * AHEAD)) {
        const at::Tensor* grad = grad_of(p);
        if (grad != nullptr && grad->defined()) {
            const c10::TensorImpl* g = grad->unsafeGetTensorImpl();
            if (reader) {
                prefetch_bytes(g, sizeof(c10::TensorImpl));
            } else {  // its counts, pointers and Python object slot; its flags and dispatch keys
                prefetch_bytes(g, 56);
                prefetch_bytes(reinterpret_cast<const char*>(g) + sizeof(c10::TensorImpl) - 24, 24);
            }
        }
    }
    if (const c10::TensorImpl* p = param_at(params, n, i + AHEAD)) {
        const at::Tensor* grad = grad_of(p);
        if (grad != nullptr && grad->defined() && grad->unsafeGetTensorImpl()->has_storage())
            prefetch_bytes(grad->unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), sizeof(c10::StorageImpl));
    }
}

// ----- the deferred release ---------------------------------------------------------------------
constexpr size_t REAP_BATCH = 256;  // tensors the reaper destroys between two looks at its queue
constexpr size_t HAND_OVER = 16384;  // tensors fused_clear_grads collects before it hands them over
// (The reaper destroys what it was handed on another core while the walk goes on: the two share
// the memory system, and hand-overs of 1024 made the walk twice as slow as of 16384.)
constexpr size_t SPARE_BATCHES = 8;  // emptied batches kept (with their capacity) for the next hand-overs
constexpr int64_t TENSOR_OVERHEAD = sizeof(c10::TensorImpl) + sizeof(c10::StorageImpl) + 64;
// ^ bytes counted per tensor beyond its data: its TensorImpl, StorageImpl and malloc's headers

struct Dropped {
    c10::TensorImpl* impl;  // one owning reference, released from its at::Tensor
    int64_t bytes;          // what it counts in pending_bytes
};

using Batch = std::vector<Dropped>;

// What the threads share. Allocated once and never destroyed: the reaper may still wait on its
// condition variable while the process's static objects are destroyed at exit. A hand-over moves a
// whole batch into the queue (no copy, no allocation while the mutex is held but the queue's own
// nodes, a few per thousands of tensors); the reaper takes REAP_BATCH tensors at a time from the
// front batch and keeps emptied batches as spares, whose capacity the next hand-overs reuse.
struct Reaper {
    pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t work = PTHREAD_COND_INITIALIZER;  // the reaper waits here for gradients
    pthread_cond_t idle = PTHREAD_COND_INITIALIZER;  // fork, exit and wait_released wait here for `busy` to fall
    std::deque<Batch> queue;                         // handed over; the front one's first `front_taken` are taken
    size_t front_taken = 0;
    int64_t queued = 0;                              // handed over, not yet taken by the reaper
    std::vector<Batch> spares;                       // emptied batches, capacity kept
    int64_t in_hand = 0;                             // taken by the reaper, being destroyed
    bool busy = false;     // the reaper is destroying a batch, outside the mutex
    bool started = false;  // a reaper runs in this process
    bool held = false;     // a fork is under way: the reaper takes no batch
    int64_t handed = 0;    // gradients handed over in this process (for the tests)
    std::atomic<bool> stopping{false};  // the process exits: the reaper destroys nothing more
    std::atomic<bool> broken{false};    // no thread could be started: every gradient is destroyed inline
    std::atomic<int64_t> pending_bytes{0};
};

Reaper& reaper() {
    static Reaper* const instance = new Reaper();  // never deleted, see above
    return *instance;
}

// Drops the references of `count` gradients, the last ones: this destroys them. Returns their bytes.
int64_t destroy(const Dropped* dropped, size_t count) noexcept {
    int64_t bytes = 0;
    for (size_t i = 0; i < count; i++) {
        bytes += dropped[i].bytes;
        c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(dropped[i].impl);
    }
    return bytes;
}

// With the mutex held: drops the emptied front batch of the queue, kept as a spare if there is room.
void retire_front(Reaper& r) noexcept {
    Batch emptied = std::move(r.queue.front());
    r.queue.pop_front();
    r.front_taken = 0;
    emptied.clear();
    if (r.spares.size() < SPARE_BATCHES && r.spares.capacity() >= SPARE_BATCHES) r.spares.push_back(std::move(emptied));
}

void* reap(void*) {
    Reaper& r = reaper();
    Dropped batch[REAP_BATCH];  // nothing the reaper does allocates but the destructors' free()s
    pthread_mutex_lock(&r.mutex);
    for (;;) {
        while (r.queued == 0 || r.held || r.stopping.load()) pthread_cond_wait(&r.work, &r.mutex);
        Batch& front = r.queue.front();
        const size_t left = front.size() - r.front_taken, take = left < REAP_BATCH ? left : REAP_BATCH;
        std::copy(front.begin() + static_cast<std::ptrdiff_t>(r.front_taken),
                  front.begin() + static_cast<std::ptrdiff_t>(r.front_taken + take), batch);
        r.front_taken += take;
        r.queued -= static_cast<int64_t>(take);
        if (r.front_taken == front.size()) retire_front(r);
        r.busy = true;
        r.in_hand = static_cast<int64_t>(take);
        pthread_mutex_unlock(&r.mutex);
        const int64_t bytes = destroy(batch, take);
        pthread_mutex_lock(&r.mutex);
        r.pending_bytes.fetch_sub(bytes);
        r.busy = false;
        r.in_hand = 0;
        pthread_cond_broadcast(&r.idle);
    }
    return nullptr;
}

// With the mutex held: returns once the reaper is not inside a destructor (or free()).
void wait_not_busy(Reaper& r) {
    while (r.busy) pthread_cond_wait(&r.idle, &r.mutex);
}

// fork() copies this process with one thread, the forking one. Before it, the reaper finishes the
// batch it is destroying and takes no other: the child's copy of the queue is whole, and no lock of
// the reaper's or of malloc's is held by a thread the child lacks. The child re-creates the
// reaper's mutex and condition variables (the reaper was waiting on one) and has no reaper: it
// starts its own at its next hand-over, or destroys what is queued in wait_released.
void before_fork() {
    Reaper& r = reaper();
    pthread_mutex_lock(&r.mutex);
    r.held = true;
    wait_not_busy(r);
}

void after_fork_in_parent() {
    Reaper& r = reaper();
    r.held = false;
    pthread_cond_signal(&r.work);
    pthread_mutex_unlock(&r.mutex);
}

void after_fork_in_child() {
    Reaper& r = reaper();
    pthread_mutex_init(&r.mutex, nullptr);
    pthread_cond_init(&r.work, nullptr);
    pthread_cond_init(&r.idle, nullptr);
    r.held = false;
    r.busy = false;
    r.in_hand = 0;
    r.started = false;
}

// exit() destroys static objects that the reaper's destructors may use (torch's allocator
// bookkeeping): the reaper finishes its batch and stops first. Registered after those objects
// were constructed (see register_handlers), so it runs before they are destroyed.
void before_exit() {
    Reaper& r = reaper();
    pthread_mutex_lock(&r.mutex);
    r.stopping.store(true);
    wait_not_busy(r);
    pthread_mutex_unlock(&r.mutex);
}

// Registers the fork and exit handlers, once, without the mutex: a fork under way in another thread
// holds glibc's lock of the fork handlers while before_fork waits for the mutex. True if registered.
bool register_handlers() {
    static const bool registered = []() noexcept {
        // Free one block through torch's CPU allocator first: every static object its deleter
        // uses exists before before_exit is registered.
        try {
            c10::Allocator* allocator = c10::GetDefaultCPUAllocator();
            allocator->raw_deallocate(allocator->raw_allocate(64));
        } catch (...) {
            return false;
        }
        return pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0 &&
               std::atexit(before_exit) == 0;
    }();
    return registered;
}

// Starts the reaper, with the mutex held; false where no thread can be had.
bool start_reaper(Reaper& r) {
    try {
        r.spares.reserve(SPARE_BATCHES);  // keeping a spare then never allocates
    } catch (...) {
    }
    pthread_attr_t attributes;
    if (pthread_attr_init(&attributes) != 0) return false;
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attributes, 1 << 20);
    // Signals are for the other threads (Python handles them in its main one): the reaper blocks all.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pthread_t thread;
    const int failed = pthread_create(&thread, &attributes, reap, nullptr);
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    pthread_attr_destroy(&attributes);
    if (failed != 0) return false;
    r.started = true;
    return true;
}

// Hands `batch` (`bytes` in all) to the reaper and empties it; destroys it here where there is no
// reaper to hand it to.
void hand_over(Batch& batch, int64_t bytes) {
    if (batch.empty()) return;
    Reaper& r = reaper();
    if (!register_handlers()) r.broken.store(true);
    bool taken = false;
    pthread_mutex_lock(&r.mutex);
    if (!r.stopping.load() && !r.broken.load()) {
        if (!r.started && !start_reaper(r)) r.broken.store(true);
        if (r.started) {
            try {
                const int64_t count = static_cast<int64_t>(batch.size());
                r.queue.push_back(std::move(batch));  // all or nothing: a vector moves without throwing
                r.queued += count;
                r.pending_bytes.fetch_add(bytes);
                r.handed += count;
                pthread_cond_signal(&r.work);
                taken = true;
            } catch (...) {  // out of memory: the queue is as it was, `batch` too
            }
        }
    }
    pthread_mutex_unlock(&r.mutex);
    if (!taken) destroy(batch.data(), batch.size());
    batch.clear();
}

// Gives the empty `batch` room for HAND_OVER tensors: a spare's, or newly reserved (that may throw,
// with `batch` still empty).
void refill(Batch& batch) {
    if (batch.capacity() >= HAND_OVER) return;
    Reaper& r = reaper();
    pthread_mutex_lock(&r.mutex);
    if (!r.spares.empty()) {
        batch = std::move(r.spares.back());
        r.spares.pop_back();
    }
    pthread_mutex_unlock(&r.mutex);
    batch.reserve(HAND_OVER);  // no-op for a spare
}

#if FUSED_DEFERRED_RELEASE
// intrusive_ptr_target's counts are private, and c10::Storage gives the weak count only through a
// weak reference it would add and drop (two atomic writes per gradient). An explicit instantiation
// may name a private member ([temp.spec.general]/6): `Expose` hands out the two accessors, which
// read the counts and change nothing.
template <typename Tag, typename Tag::type Member>
struct Expose {
    friend typename Tag::type member(Tag) { return Member; }
};
using CountOf = uint32_t (c10::intrusive_ptr_target::*)(std::memory_order) const;
struct RefcountOf {
    using type = CountOf;
    friend type member(RefcountOf);
};
struct WeakcountOf {
    using type = CountOf;
    friend type member(WeakcountOf);
};
template struct Expose<RefcountOf, &c10::intrusive_ptr_target::refcount>;
template struct Expose<WeakcountOf, &c10::intrusive_ptr_target::weakcount>;

// One strong reference and no weak one: whoever holds that reference is the only way to the object.
inline bool sole_reference(const c10::intrusive_ptr_target* target) {
    return (target->*member(RefcountOf{}))(std::memory_order_acquire) == 1 &&
           (target->*member(WeakcountOf{}))(std::memory_order_acquire) == 1;
}

#endif

// What fused_clear_grads may hand to the reaper, fixed for one call.
struct Rules {
    c10::DeleterFnPtr deleter;  // what torch's default CPU allocator frees with
    c10::DispatchKeySet keys;   // every dispatch key a plain dense CPU tensor may have
    int64_t max_tensor_bytes;
};

Rules rules_for(int64_t max_tensor_bytes) {
    c10::Allocator* allocator = c10::GetDefaultCPUAllocator();
    return {allocator == nullptr ? nullptr : allocator->raw_deleter(),
            c10::DispatchKeySet({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCPU,
                                 c10::DispatchKey::AutocastCPU}),
            max_tensor_bytes};
}

// The bytes `grad` counts if the reaper may destroy it, else -1 (destroy it here; anything unsure
// is -1). It may if this reference is the only way to it and destroying it needs no Python and no
// lock but malloc's: a plain dense CPU tensor (exactly a c10::TensorImpl, no Python object, no
// autograd meta, no symbolic sizes, no dispatch key a CPU tensor lacks) that no one else
// references, strongly or weakly, whose storage (exactly a c10::StorageImpl) is referenced by it
// alone, has no Python object and was allocated by torch's default CPU allocator: its deleter
// frees memory and does nothing else (numpy's, DLPack's, shared memory's or a custom allocator's
// deleter may need Python or a lock). At most `max_tensor_bytes` of data.
int64_t release_cost(const at::Tensor& grad, const Rules& rules) {
#if !FUSED_DEFERRED_RELEASE
    (void)grad;
    (void)rules;
    return -1;
#else
    const c10::TensorImpl* g = grad.unsafeGetTensorImpl();
    if (!sole_reference(g) || g->pyobj_slot()->load_pyobj() != nullptr) return -1;
    if (typeid(*g) != typeid(c10::TensorImpl) || g->autograd_meta() != nullptr || !g->has_storage()) return -1;
    const c10::DispatchKeySet keys = g->key_set();
    if (!rules.keys.isSupersetOf(keys) || !keys.has(c10::DispatchKey::CPU) || g->has_symbolic_sizes_strides()) return -1;
    const c10::StorageImpl* s = g->unsafe_storage().unsafeGetStorageImpl();
    if (s == nullptr || !sole_reference(s) || s->pyobj_slot()->load_pyobj() != nullptr) return -1;
    if (typeid(*s) != typeid(c10::StorageImpl) || s->device_type() != c10::DeviceType::CPU) return -1;
    if (rules.deleter == nullptr || s->data_ptr().get_deleter() != rules.deleter) return -1;
    if (s->sym_nbytes().is_heap_allocated()) return -1;
    const int64_t bytes = static_cast<int64_t>(s->nbytes());
    return bytes > rules.max_tensor_bytes ? -1 : bytes + TENSOR_OVERHEAD;
#endif
}

// Keeps an emptied batch's capacity for the next call.
void keep_spare(Batch&& batch) noexcept {
    if (batch.capacity() < HAND_OVER) return;
    Reaper& r = reaper();
    pthread_mutex_lock(&r.mutex);
    if (r.spares.size() < SPARE_BATCHES && r.spares.capacity() >= SPARE_BATCHES) r.spares.push_back(std::move(batch));
    pthread_mutex_unlock(&r.mutex);
}

int64_t clear_grads(const int64_t* params, int64_t n, int64_t cap_bytes, int64_t max_tensor_bytes) {
    Reaper& r = reaper();
    const Rules rules = rules_for(max_tensor_bytes);
    // The memory profiler, and torch's own memory reports, count a free on the thread that frees.
    const bool defer = cap_bytes > 0 && !r.broken.load() && !r.stopping.load() && rules.deleter != nullptr &&
                       !c10::memoryProfilingEnabled() && !FLAGS_caffe2_report_cpu_memory_usage;
    int64_t budget = defer ? cap_bytes - r.pending_bytes.load() : 0;
    int64_t handed = 0, batch_bytes = 0;
    Batch batch;
    if (budget > 0) refill(batch);  // room for HAND_OVER: push_back cannot throw
    try {
        for (int64_t i = 0; i < n; i++) {
            prefetch_ahead(params, n, i, false);
            c10::AutogradMetaInterface* meta = reinterpret_cast<c10::TensorImpl*>(params[i])->autograd_meta();
            if (meta == nullptr) continue;
            at::Tensor& slot = meta->mutable_grad();
            if (!slot.defined()) continue;
            at::Tensor grad = std::move(slot);  // .grad is None from here on
            if (budget <= 0) continue;          // and `grad` is destroyed here, as before
            const int64_t bytes = release_cost(grad, rules);
            if (bytes < 0 || bytes > budget) continue;
            budget -= bytes;
            batch_bytes += bytes;
            batch.push_back({grad.unsafeReleaseTensorImpl(), bytes});
            if (batch.size() == HAND_OVER) {
                handed += static_cast<int64_t>(batch.size());
                hand_over(batch, batch_bytes);
                batch_bytes = 0;
                refill(batch);  // may throw: `batch` is empty then
            }
        }
    } catch (...) {
        hand_over(batch, batch_bytes);  // the references in `batch` are not lost
        throw;
    }
    handed += static_cast<int64_t>(batch.size());
    hand_over(batch, batch_bytes);
    keep_spare(std::move(batch));
    return handed;
}

int64_t wait_released() {
    Reaper& r = reaper();
    std::deque<Batch> orphans;
    size_t orphans_taken = 0;
    pthread_mutex_lock(&r.mutex);
    const int64_t waited = r.queued + r.in_hand;
    if (r.started && !r.stopping.load()) {
        while (r.queued > 0 || r.busy) pthread_cond_wait(&r.idle, &r.mutex);
    } else {  // no reaper (a forked child): destroy them here
        orphans.swap(r.queue);
        orphans_taken = r.front_taken;
        r.front_taken = 0;
        r.queued = 0;
    }
    pthread_mutex_unlock(&r.mutex);
    int64_t bytes = 0;
    for (const Batch& orphan : orphans) {
        bytes += destroy(orphan.data() + orphans_taken, orphan.size() - orphans_taken);
        orphans_taken = 0;
    }
    r.pending_bytes.fetch_sub(bytes);
    return waited;
}

}  // namespace

extern "C" {

// Reading changes nothing (no reference count moves), so parameters are read on `threads` OpenMP
// threads (torch's own libgomp, as the C kernels): the work is waiting on memory, which overlaps.
int64_t fused_read_grads(const int64_t* params, const int64_t* param_ptrs, int64_t n, int64_t* grad_ptrs,
                         int8_t* status, int threads) {
    int64_t problems = 0;
    int failed = 0;
    const int64_t blocks = (n + READ_BLOCK - 1) / READ_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && blocks > 1) reduction(+ : problems) reduction(| : failed)
    for (int64_t block = 0; block < blocks; block++) {
        const int64_t end = (block + 1) * READ_BLOCK < n ? (block + 1) * READ_BLOCK : n;
        try {
            for (int64_t i = block * READ_BLOCK; i < end; i++) {
                prefetch_ahead(params, end, i, true);
                Status s = read_one(reinterpret_cast<const c10::TensorImpl*>(params[i]), param_ptrs[i], &grad_ptrs[i]);
                status[i] = s;
                problems += s >= NEEDS_COPY;
            }
        } catch (...) {
            failed = 1;
        }
    }
    return failed ? -1 : problems;
}

// p.grad = None for every parameter that has one (see the top of this file). `cap_bytes`: the
// most bytes that may wait for the reaper (0: destroy every gradient here); `max_tensor_bytes`:
// a gradient with more data is destroyed here. Returns how many gradients went to the reaper, or
// -1 if torch threw (every parameter before the one that threw has no gradient).
int64_t fused_clear_grads(const int64_t* params, int64_t n, int64_t cap_bytes, int64_t max_tensor_bytes) {
    try {
        return clear_grads(params, n, cap_bytes, max_tensor_bytes);
    } catch (...) {
        return -1;
    }
}

// tensors[i].grad = the tensor whose TensorImpl is grads[i] (0: undefined, None in Python), one
// reference taken; no check of shape or dtype (the reader checks them). For fused_core.sharded,
// which lends each DTensor parameter's local shard its gradient's local shard for one launch and
// takes it back with fused_clear_grads. Returns -1 if torch threw (tensors before it were set).
int64_t fused_lend_grads(const int64_t* tensors, const int64_t* grads, int64_t n) {
    try {
        for (int64_t i = 0; i < n; i++) {
            at::Tensor& slot = reinterpret_cast<c10::TensorImpl*>(tensors[i])->mutable_grad();
            if (grads[i] == 0) {
                slot.reset();
            } else {
                slot = at::Tensor(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(
                    reinterpret_cast<c10::TensorImpl*>(grads[i])));
            }
        }
    } catch (...) {
        return -1;
    }
    return 0;
}

// out[0], out[1]: the gradients and bytes waiting for the reaper now; out[2]: how many gradients
// it was handed in this process.
void fused_release_pending(int64_t* out) {
    Reaper& r = reaper();
    pthread_mutex_lock(&r.mutex);
    out[0] = r.queued + r.in_hand;
    out[1] = r.pending_bytes.load();
    out[2] = r.handed;
    pthread_mutex_unlock(&r.mutex);
}

// Returns once the reaper has destroyed every gradient handed to it (a process without a reaper,
// a forked child, destroys them here); returns how many were waiting.
int64_t fused_release_wait() { return wait_released(); }

}  // extern "C"
