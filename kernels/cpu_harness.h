// cpu_harness.h: run the CUDA kernels of this folder on a CPU, as real grid launches, with checks a GPU never makes.
//
// A .cu file is compiled with g++ (C++20) with this header in front of it (minidet/cpu_harness.py does that, and
// calls the kernels); the .cu file itself is not changed. What a launch looks like here:
//
// - Blocks run on a few worker threads (operating-system threads): each worker takes the next block of the grid
//   until none is left, so blocks really run at the same time and their atomics on global memory really race.
// - The threads of a block run as cooperative fibers on their worker: each fiber has its own stack, and runs until
//   it reaches a synchronisation point (__syncthreads, a warp operation) or its end; then the next fiber runs.
//   Between two synchronisation points the fibers of a block run in the order the launch asks for: forward
//   (thread 0 first), reverse, or a seeded random order, redrawn at every round. Code that is right on a GPU is
//   right in every order; a missing __syncthreads shows up in one of them.
// - `__shared__` variables are `static thread_local`: one copy per worker thread, and a worker runs one block at a
//   time, so one copy per running block, as on a GPU. Before every block they are filled with a poison byte, so a
//   read of shared memory that nobody wrote this block gives garbage (0x7F... is about 3.4e38, 0xFF... is NaN).
// - `__syncthreads()` is a barrier of all the threads of the block. Threads waiting at different __syncthreads
//   calls, or a thread that has exited while others wait, is an error that names the file and line of each.
// - The warp operations (__shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync, __ballot_sync,
//   __any_sync, __all_sync, __syncwarp) complete when every lane named in the mask has arrived at the same call;
//   a lane that reads a lane outside the mask, or calls with a mask without itself, is an error.
// - When no thread of a block can go on (a deadlock), the launch fails with the place where each thread waits,
//   instead of hanging.
// - atomicAdd, atomicMax, atomicMin, atomicCAS and atomicExch on int, unsigned, long long, unsigned long long,
//   float and double are std::atomic_ref operations.
//
// What still differs from a GPU: the math library (glibc's expf and log1pf against CUDA's, each within an ulp or
// two of the exact value); -ftz (CuPy compiles with it: the GPU reads float32 values below 1.2e-38 as 0, the CPU
// keeps them); the memory model (a CPU's atomics and plain stores are ordered more strictly than a GPU's, so a
// missing __threadfence does not show here); and timing (nothing here says how fast a kernel is on a GPU).
// Build flags that round as the GPU build does: -ffp-contract=off (nvcc's --fmad=false: a * b + c is two
// roundings, not one fused multiply-add).
#ifndef MINIDET_CPU_HARNESS_H
#define MINIDET_CPU_HARNESS_H

#if defined(__x86_64__) && !defined(CUDA_CPU_PORTABLE_SWITCH)
#define CUDA_CPU_FAST_SWITCH 1
#endif

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <source_location>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// --- the CUDA words, for the host compiler -------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // the loader reads it from the source and checks every launch against it
#define __shared__ static thread_local

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

constexpr int warpSize = 32;

using std::max;
using std::min;

namespace cuda_cpu {

using Where = std::source_location;

// An error in the kernel's use of CUDA (a barrier or warp operation used wrongly): ends the launch.
struct KernelError {
    std::string message;
};

enum class State : unsigned char { runnable, at_barrier, at_warp_op, done };
enum class WarpOp : unsigned char { shfl, shfl_up, shfl_down, shfl_xor, ballot, any, all, syncwarp };

const char* op_name(WarpOp op) {
    static const char* const names[] = {"__shfl_sync",   "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                        "__ballot_sync", "__any_sync",     "__all_sync",       "__syncwarp"};
    return names[static_cast<int>(op)];
}

// One thread of the block: a fiber, with its own stack.
struct Fiber {
#if defined(CUDA_CPU_FAST_SWITCH)
    void* stack_pointer = nullptr;  // where its registers were saved when it last stopped
#else
    ucontext_t context;             // the same, for the portable switch
#endif
    uint3 thread_idx{};
    int index = 0;                  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    State state = State::runnable;
    Where where;                    // the call it waits at
    // A warp operation it waits in: which, with what, and (once complete) its result.
    WarpOp op = WarpOp::syncwarp;
    unsigned int mask = 0;
    int operand = 0;                // srcLane, delta or laneMask
    int width = warpSize;
    std::uint64_t value = 0, result = 0;
};

// What one worker thread knows: the launch, its block, its fibers. It lives on the worker thread's own stack; the
// thread-local pointer `worker` finds it. That pointer is all the harness keeps in thread-local storage: the rest
// of this library's thread-local block is the __shared__ variables, which are poisoned before every block.
struct Launch;
struct Worker {
    Launch* launch = nullptr;
    uint3 block_idx{};
    Fiber* fiber = nullptr;         // the fiber running now; nullptr while the scheduler runs
    std::vector<Fiber> fibers;
    char* stacks = nullptr;         // fibers' stacks, each above a guard page
    std::size_t stacks_size = 0;
#if defined(CUDA_CPU_FAST_SWITCH)
    void* scheduler_stack_pointer = nullptr;
#else
    ucontext_t scheduler_context;
#endif
    int waiting_at_barrier = 0;
    int finished = 0;
    std::vector<int> warp_waiting;  // per warp: lanes waiting in a warp operation
    std::string error;              // set by a fiber that found an error
    char* shared_begin = nullptr;   // this thread's thread-local block (see poison_shared_memory)
    std::size_t shared_bytes = 0;
};

static thread_local Worker* worker = nullptr;

// The kernels of the file, registered by the loader's generated code after the .cu file.
struct Kernel {
    const char* name;
    void (*call)(void* function, void** args);
    void* function;
    std::string signature;  // the parameter types, comma separated, as C++ spells them
    int max_threads;        // its __launch_bounds__, or 1024
};

std::vector<Kernel>& kernels() {
    static std::vector<Kernel> registry;
    return registry;
}

// One launch, shared by its workers.
struct ArgumentArray {
    const char* begin;
    std::size_t bytes;
    std::size_t guard_bytes;
    int argument;
};

constexpr int MAX_WORKERS = 16;

struct Launch {
    const Kernel* kernel;
    dim3 grid, block;
    void** args;
    int schedule;                   // 0 forward, 1 reverse, 2 random
    std::uint64_t seed;
    int poison;
    std::vector<std::uint32_t> block_order;
    std::atomic<std::size_t> next_block{0};
    std::atomic<bool> failed{false};
    std::string error;
    const ArgumentArray* arrays;
    int num_arrays;
    const char* const* argument_names;
    int num_workers;
    std::size_t stack_size;

    void fail(std::string message) {
        if (!failed.exchange(true)) error = std::move(message);
    }
};

// --- small helpers for messages ------------------------------------------------------------------------------

std::string format(const char* pattern, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* pattern, ...) {
    char text[1024];
    va_list arguments;
    va_start(arguments, pattern);
    std::vsnprintf(text, sizeof text, pattern, arguments);
    va_end(arguments);
    return text;
}

std::string place(const Where& where) {
    const char* file = std::strrchr(where.file_name(), '/');
    return format("%s:%u", file ? file + 1 : where.file_name(), static_cast<unsigned>(where.line()));
}

bool same_call(const Where& a, const Where& b) {
    return a.line() == b.line() && a.column() == b.column() &&
           (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

std::string triple(const uint3& v) { return format("(%u, %u, %u)", v.x, v.y, v.z); }

// "0-7, 12, 20-31" for a sorted list of numbers.
std::string ranges(const std::vector<int>& numbers) {
    std::string text;
    for (std::size_t i = 0; i < numbers.size();) {
        std::size_t j = i;
        while (j + 1 < numbers.size() && numbers[j + 1] == numbers[j] + 1) ++j;
        if (!text.empty()) text += ", ";
        text += numbers[i] == numbers[j] ? format("%d", numbers[i]) : format("%d-%d", numbers[i], numbers[j]);
        i = j + 1;
    }
    return text;
}

std::string block_name() {
    return format("block %s of kernel %s", triple(worker->block_idx).c_str(), worker->launch->kernel->name);
}

std::string thread_name(const Fiber& fiber) {
    return format("thread %s (lane %d of warp %d) of %s", triple(fiber.thread_idx).c_str(), fiber.index % warpSize,
                  fiber.index / warpSize, block_name().c_str());
}

// --- switching between fibers ----------------------------------------------------------------------------------
// On x86-64 a switch saves the six registers a function call must preserve on the current stack, stores the stack
// pointer, loads the other fiber's and pops its registers: a few nanoseconds. Elsewhere (or with
// CUDA_CPU_PORTABLE_SWITCH defined, which the tests use to check it) swapcontext does the same job, slower: it also
// saves and restores the signal mask, with a system call each time.

void fiber_main(Fiber* fiber);

#if defined(CUDA_CPU_FAST_SWITCH)
extern "C" __attribute__((visibility("hidden"))) void cuda_cpu_switch(void** save, void* load);
extern "C" __attribute__((visibility("hidden"))) void cuda_cpu_fiber_start(Fiber* fiber) { fiber_main(fiber); }
asm(R"(
    .text
    .p2align 4
    .globl cuda_cpu_switch
    .hidden cuda_cpu_switch
    .type cuda_cpu_switch, @function
cuda_cpu_switch:                # (rdi: where to save our stack pointer, rsi: the stack pointer to load)
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_cpu_switch, .-cuda_cpu_switch

    .p2align 4
    .type cuda_cpu_trampoline, @function
cuda_cpu_trampoline:            # a new fiber's first return lands here, with its Fiber* in r12
    movq %r12, %rdi
    call cuda_cpu_fiber_start
    ud2                         # fiber_main never returns
    .size cuda_cpu_trampoline, .-cuda_cpu_trampoline
)");
extern "C" __attribute__((visibility("hidden"))) void cuda_cpu_trampoline();

void prepare_fiber(Fiber& fiber, char* stack_top) {
    // What cuda_cpu_switch pops: r15, r14, r13, r12 (the Fiber*), rbx, rbp, then the return address (the
    // trampoline), placed so that the stack is 16-byte aligned at the trampoline's call, as the ABI requires.
    auto* top = reinterpret_cast<std::uintptr_t*>(reinterpret_cast<std::uintptr_t>(stack_top) & ~std::uintptr_t(15));
    std::uintptr_t* frame = top - 9;
    frame[0] = frame[1] = frame[2] = 0;
    frame[3] = reinterpret_cast<std::uintptr_t>(&fiber);
    frame[4] = frame[5] = 0;
    frame[6] = reinterpret_cast<std::uintptr_t>(&cuda_cpu_trampoline);
    fiber.stack_pointer = frame;
}

void switch_to_fiber(Fiber& fiber) { cuda_cpu_switch(&worker->scheduler_stack_pointer, fiber.stack_pointer); }
void switch_to_scheduler(Fiber& fiber) { cuda_cpu_switch(&fiber.stack_pointer, worker->scheduler_stack_pointer); }
#else
void start_portable(unsigned high, unsigned low) {
    fiber_main(reinterpret_cast<Fiber*>((static_cast<std::uintptr_t>(high) << 32) | low));
}

void prepare_fiber(Fiber& fiber, char* stack_top) {
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = stack_top - worker->launch->stack_size;
    fiber.context.uc_stack.ss_size = worker->launch->stack_size;
    fiber.context.uc_link = nullptr;
    const auto address = reinterpret_cast<std::uintptr_t>(&fiber);
    makecontext(&fiber.context, reinterpret_cast<void (*)()>(&start_portable), 2,
                static_cast<unsigned>(address >> 32), static_cast<unsigned>(address));
}

void switch_to_fiber(Fiber& fiber) { swapcontext(&worker->scheduler_context, &fiber.context); }
void switch_to_scheduler(Fiber& fiber) { swapcontext(&fiber.context, &worker->scheduler_context); }
#endif

// The running fiber stops here; the scheduler runs the next one.
void yield() {
    Fiber& fiber = *worker->fiber;
    switch_to_scheduler(fiber);
}

void fiber_main(Fiber* fiber) {
    try {
        worker->launch->kernel->call(worker->launch->kernel->function, worker->launch->args);
    } catch (const KernelError& error) {
        worker->error = error.message;
    } catch (const std::exception& error) {
        worker->error = std::string("a C++ exception in the kernel: ") + error.what();
    }
    fiber->state = State::done;
    ++worker->finished;
    switch_to_scheduler(*fiber);
}

Fiber& current_fiber() { return *worker->fiber; }

// --- __syncthreads ---------------------------------------------------------------------------------------------

void syncthreads(const Where& where) {
    Fiber& self = current_fiber();
    self.state = State::at_barrier;
    self.where = where;
    const int num_threads = static_cast<int>(worker->fibers.size());
    if (++worker->waiting_at_barrier == num_threads) {  // the last to arrive
        std::vector<Where> calls;  // the different __syncthreads calls, in the order of their first thread
        for (const Fiber& f : worker->fibers) {
            if (std::none_of(calls.begin(), calls.end(), [&f](const Where& w) { return same_call(w, f.where); }))
                calls.push_back(f.where);
        }
        if (calls.size() > 1) {
            std::string groups;
            for (const Where& call : calls) {
                std::vector<int> threads;
                for (const Fiber& f : worker->fibers)
                    if (same_call(f.where, call)) threads.push_back(f.index);
                groups += format("%sthreads %s at %s", groups.empty() ? "" : ", ", ranges(threads).c_str(),
                                 place(call).c_str());
            }
            throw KernelError{format("__syncthreads in %s: threads wait at different __syncthreads calls: %s (is a "
                                     "__syncthreads inside a branch or loop that not every thread takes the same "
                                     "way?)",
                                     block_name().c_str(), groups.c_str())};
        }
        for (Fiber& f : worker->fibers) f.state = State::runnable;
        worker->waiting_at_barrier = 0;
    }
    yield();
}

// --- warp operations -------------------------------------------------------------------------------------------

// The lanes named in `mask`, lowest first: for (int l : lanes(mask)).
struct lanes {
    unsigned int bits;
    struct iterator {
        unsigned int bits;
        int operator*() const { return std::countr_zero(bits); }
        iterator& operator++() {
            bits &= bits - 1;  // clears the lowest set bit
            return *this;
        }
        bool operator!=(const iterator& other) const { return bits != other.bits; }
    };
    iterator begin() const { return {bits}; }
    iterator end() const { return {0}; }
};

std::uint64_t warp_operation(WarpOp op, unsigned int mask, std::uint64_t value, int operand, int width,
                             const Where& where) {
    Worker& w = *worker;
    Fiber& self = *w.fiber;
    const int lane = self.index % warpSize;
    const int warp = self.index / warpSize;
    const int first = warp * warpSize;
    const int lanes_in_warp = std::min(warpSize, static_cast<int>(w.fibers.size()) - first);
    if (!(mask >> lane & 1u)) {
        throw KernelError{format("%s at %s: %s calls it with mask 0x%08x, which does not name its own lane %d",
                                 op_name(op), place(where).c_str(), thread_name(self).c_str(), mask, lane)};
    }
    if (width < 1 || width > warpSize || (width & (width - 1)) != 0) {
        throw KernelError{format("%s at %s: width %d; it must be a power of 2 from 1 to 32", op_name(op),
                                 place(where).c_str(), width)};
    }
    if (lanes_in_warp < warpSize && (mask >> lanes_in_warp) != 0) {
        throw KernelError{format("%s at %s: the mask 0x%08x names lane %d of warp %d, but the block has only %zu "
                                 "threads, so that lane does not exist",
                                 op_name(op), place(where).c_str(), mask,
                                 lanes_in_warp + std::countr_zero(mask >> lanes_in_warp), warp, w.fibers.size())};
    }
    self.state = State::at_warp_op;
    self.where = where;
    self.op = op;
    self.mask = mask;
    self.value = value;
    self.operand = operand;
    self.width = width;
    // Complete the operation if every lane of the mask is now waiting at this call.
    Fiber* const warp_fibers = &w.fibers[first];
    if (++w.warp_waiting[warp] >= std::popcount(mask)) {
        bool all_here = true;
        for (int l : lanes{mask}) {
            const Fiber& other = warp_fibers[l];
            all_here = all_here && other.state == State::at_warp_op && same_call(other.where, where);
        }
        if (all_here) {
            unsigned int predicates = 0;
            for (int l : lanes{mask}) {
                const Fiber& other = warp_fibers[l];
                if (other.mask != mask) {
                    throw KernelError{format("%s at %s in warp %d of %s: lanes call it with different masks "
                                             "(0x%08x in lane %d, 0x%08x in lane %d)",
                                             op_name(op), place(where).c_str(), warp, block_name().c_str(), mask, lane,
                                             other.mask, l)};
                }
                if (other.value != 0) predicates |= 1u << l;
            }
            for (int l : lanes{mask}) {
                Fiber& target = warp_fibers[l];
                const int segment = l / target.width * target.width;  // the first lane of its group of `width`
                int source = l;                                        // a lane out of range gets its own value
                switch (op) {
                    case WarpOp::shfl: source = segment + target.operand % target.width; break;
                    case WarpOp::shfl_up:
                        if (l - segment >= target.operand) source = l - target.operand;
                        break;
                    case WarpOp::shfl_down:
                        if (l - segment + target.operand < target.width) source = l + target.operand;
                        break;
                    case WarpOp::shfl_xor:
                        if ((l ^ target.operand) < segment + target.width) source = l ^ target.operand;
                        break;
                    default: break;
                }
                if (source < 0 || source >= warpSize || !(mask >> source & 1u)) {
                    throw KernelError{format("%s at %s in warp %d of %s: lane %d reads lane %d, which is not in the "
                                             "mask 0x%08x (its value is undefined on a GPU)",
                                             op_name(op), place(where).c_str(), warp, block_name().c_str(), l, source,
                                             mask)};
                }
                switch (op) {
                    case WarpOp::ballot: target.result = predicates; break;
                    case WarpOp::any: target.result = predicates != 0; break;
                    case WarpOp::all: target.result = predicates == mask; break;
                    case WarpOp::syncwarp: target.result = 0; break;
                    default: target.result = warp_fibers[source].value;
                }
                target.state = State::runnable;
            }
            w.warp_waiting[warp] -= std::popcount(mask);
        }
    }
    yield();
    return self.result;
}

template <typename T>
std::uint64_t to_word(T value) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a warp shuffle moves at most 8 bytes");
    std::uint64_t word = 0;
    std::memcpy(&word, &value, sizeof(T));
    return word;
}

template <typename T>
T from_word(std::uint64_t word) {
    T value;
    std::memcpy(&value, &word, sizeof(T));
    return value;
}

// --- atomics ---------------------------------------------------------------------------------------------------

template <typename T>
constexpr bool atomic_type = std::is_same_v<T, int> || std::is_same_v<T, unsigned int> ||
                             std::is_same_v<T, long long> || std::is_same_v<T, unsigned long long> ||
                             std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T, typename Update>
T atomic_update(T* address, Update update) {
    static_assert(atomic_type<T>, "CUDA atomics take int, unsigned, long long, unsigned long long, float, double");
    std::atomic_ref<T> cell(*address);
    T old = cell.load();
    while (!cell.compare_exchange_weak(old, update(old))) {
    }
    return old;
}

// --- the deadlock report ---------------------------------------------------------------------------------------

std::string waiting_description(const Fiber& fiber) {
    switch (fiber.state) {
        case State::done: return "have exited";
        case State::runnable: return "can run";
        case State::at_barrier: return "wait at __syncthreads at " + place(fiber.where);
        case State::at_warp_op: {
            const Fiber* const warp_fibers = &worker->fibers[fiber.index / warpSize * warpSize];
            std::vector<int> missing;
            for (int l : lanes{fiber.mask}) {
                const Fiber& other = warp_fibers[l];
                if (!(other.state == State::at_warp_op && same_call(other.where, fiber.where))) missing.push_back(l);
            }
            return format("wait at %s (mask 0x%08x) at %s for lanes %s of their warp", op_name(fiber.op), fiber.mask,
                          place(fiber.where).c_str(), ranges(missing).c_str());
        }
    }
    return "";
}

std::string deadlock_report() {
    std::string report = format("deadlock in %s: no thread can go on.", block_name().c_str());
    bool all_at_barrier = true;
    for (const Fiber& f : worker->fibers) all_at_barrier &= f.state == State::at_barrier || f.state == State::done;
    if (all_at_barrier) {
        report += " Some threads have exited while the others wait at __syncthreads: every thread of a block must "
                  "reach every __syncthreads (does a thread return early?).";
    }
    for (std::size_t i = 0; i < worker->fibers.size();) {
        const std::string description = waiting_description(worker->fibers[i]);
        std::size_t j = i;
        while (j + 1 < worker->fibers.size() && waiting_description(worker->fibers[j + 1]) == description) ++j;
        report += i == j ? format(" Thread %zu %s.", i, description.c_str())
                         : format(" Threads %zu-%zu %s.", i, j, description.c_str());
        i = j + 1;
    }
    return report;
}

// --- running a block -------------------------------------------------------------------------------------------

std::uint64_t splitmix(std::uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// This library's thread-local block, as the calling thread has it: the __shared__ variables and the pointer
// `worker`. dl_iterate_phdr tells each loaded library's block for the calling thread; ours is the one that holds
// `worker`.
int find_tls_block(dl_phdr_info* info, std::size_t, void* out) {
    auto* self = static_cast<Worker*>(out);
    const char* pointer = reinterpret_cast<const char*>(&worker);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const auto& header = info->dlpi_phdr[i];
        char* data = static_cast<char*>(info->dlpi_tls_data);
        if (header.p_type == PT_TLS && data && data <= pointer && pointer < data + header.p_memsz) {
            self->shared_begin = data;
            self->shared_bytes = header.p_memsz;
            return 1;
        }
    }
    return 0;
}

// Fill the __shared__ variables with the poison byte: every byte of the thread-local block but the pointer `worker`.
void poison_shared_memory(int poison) {
    if (!worker->shared_begin) dl_iterate_phdr(find_tls_block, worker);
    char* const pointer = reinterpret_cast<char*>(&worker);
    for (char* p = worker->shared_begin; p < worker->shared_begin + worker->shared_bytes; ++p) {
        if (p < pointer || p >= pointer + sizeof(worker)) *p = static_cast<char>(poison);
    }
}

void allocate_stacks(std::size_t num_threads) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t per_fiber = worker->launch->stack_size + page;
    if (worker->stacks_size >= num_threads * per_fiber) return;
    if (worker->stacks) munmap(worker->stacks, worker->stacks_size);
    worker->stacks_size = num_threads * per_fiber;
    void* memory = mmap(nullptr, worker->stacks_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) throw KernelError{"cannot allocate the fibers' stacks"};
    worker->stacks = static_cast<char*>(memory);
    for (std::size_t i = 0; i < num_threads; ++i) mprotect(worker->stacks + i * per_fiber, page, PROT_NONE);
}

// Run one block to its end; false (with the launch's error set) if it failed.
bool run_block(uint3 block_idx) {
    Launch& launch = *worker->launch;
    const dim3 block = launch.block;
    const int num_threads = static_cast<int>(block.x * block.y * block.z);
    worker->block_idx = block_idx;
    poison_shared_memory(launch.poison);
    const std::size_t per_fiber = launch.stack_size + static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    allocate_stacks(num_threads);
    worker->fibers.assign(num_threads, Fiber{});
    worker->warp_waiting.assign((num_threads + warpSize - 1) / warpSize, 0);
    worker->waiting_at_barrier = 0;
    worker->finished = 0;
    worker->error.clear();
    for (int i = 0; i < num_threads; ++i) {
        Fiber& fiber = worker->fibers[i];
        fiber.index = i;
        fiber.thread_idx = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        prepare_fiber(fiber, worker->stacks + (i + 1) * per_fiber);
    }
    const std::uint64_t block_number = block_idx.x + launch.grid.x * (block_idx.y + std::uint64_t(launch.grid.y) *
                                                                                        block_idx.z);
    std::uint64_t random = splitmix(launch.seed ^ splitmix(block_number));
    std::vector<int> order;
    order.reserve(num_threads);
    // Rounds: every fiber that can run runs once, up to its next synchronisation point, in the schedule's order.
    Worker& w = *worker;
    while (w.finished < num_threads) {
        order.clear();
        for (const Fiber& fiber : w.fibers)
            if (fiber.state == State::runnable) order.push_back(fiber.index);
        if (order.empty()) {
            launch.fail(deadlock_report());
            return false;
        }
        if (launch.schedule == 1) std::reverse(order.begin(), order.end());
        if (launch.schedule == 2) {
            for (std::size_t i = order.size(); i > 1; --i) {
                random = splitmix(random);
                std::swap(order[i - 1], order[random % i]);
            }
        }
        for (int index : order) {
            w.fiber = &w.fibers[index];
            switch_to_fiber(*w.fiber);
            w.fiber = nullptr;
            if (!w.error.empty()) {
                launch.fail(w.error);
                return false;
            }
            if (launch.failed) return false;  // another worker failed: stop early
        }
    }
    return true;
}

// --- faults: a read or write past the end of an argument array -------------------------------------------------

Launch* active_launch = nullptr;

// The file and line of a code address, from addr2line (binutils, which g++ needs anyway), or "".
void print_source_line(void* address) {
    Dl_info info;
    if (!dladdr(address, &info) || !info.dli_fname) return;
    char offset[32];
    std::snprintf(offset, sizeof offset, "0x%lx",
                  static_cast<unsigned long>(static_cast<char*>(address) - static_cast<char*>(info.dli_fbase)));
    std::fputs("cuda_cpu: the faulting instruction is at ", stderr);
    std::fflush(stderr);
    const pid_t child = fork();
    if (child == 0) {
        dup2(2, 1);
        execlp("addr2line", "addr2line", "-e", info.dli_fname, "-f", "-i", "-p", "-s", offset,
               static_cast<char*>(nullptr));
        _exit(127);
    }
    int status = 0;
    if (child > 0) waitpid(child, &status, 0);
}

void on_fault(int signal, siginfo_t* info, void* context) {
    const Launch* launch = active_launch;
    const char* address = static_cast<const char*>(info->si_addr);
    std::string what = format("an invalid memory access at %p", static_cast<const void*>(address));
#if defined(__x86_64__)
    const auto* machine = static_cast<const ucontext_t*>(context);
    const bool write = machine->uc_mcontext.gregs[REG_ERR] & 2;
    void* instruction = reinterpret_cast<void*>(machine->uc_mcontext.gregs[REG_RIP]);
    what = format("an invalid %s at %p", write ? "write" : "read", static_cast<const void*>(address));
#else
    void* instruction = nullptr;
    (void)context;
#endif
    if (launch) {
        for (int i = 0; i < launch->num_arrays; ++i) {
            const ArgumentArray& array = launch->arrays[i];
            const char* end = array.begin + array.bytes;
            if (address >= end && address < end + array.guard_bytes) {
                what += format(", %zu bytes past the end of argument %d (%s), an array of %zu bytes",
                               static_cast<std::size_t>(address - end), array.argument,
                               launch->argument_names[array.argument], array.bytes);
            }
        }
        if (worker->stacks && address >= worker->stacks && address < worker->stacks + worker->stacks_size) {
            what += format(": a fiber's stack overflowed (each thread has %zu KiB)", launch->stack_size / 1024);
        }
    }
    const std::string who = worker->fiber ? thread_name(*worker->fiber)
                                         : (launch ? format("a launch of %s", launch->kernel->name) : "a launch");
    std::fprintf(stderr, "\ncuda_cpu: %s made %s (signal %d). On a GPU this is an illegal memory access.\n",
                 who.c_str(), what.c_str(), signal);
    if (instruction) print_source_line(instruction);
    std::fflush(stderr);
    _exit(86);
}

// --- a worker thread -------------------------------------------------------------------------------------------

void run_worker(Launch* launch) {
    Worker self;
    self.launch = launch;
    worker = &self;
    std::vector<char> signal_stack(64 * 1024);  // where on_fault runs, even when a fiber's stack overflowed
    stack_t alternate{};
    alternate.ss_sp = signal_stack.data();
    alternate.ss_size = signal_stack.size();
    sigaltstack(&alternate, nullptr);
    const std::size_t total = launch->block_order.size();
    try {
        for (std::size_t next = launch->next_block++; next < total && !launch->failed; next = launch->next_block++) {
            const std::uint32_t b = launch->block_order[next];
            const uint3 block_idx{b % launch->grid.x, b / launch->grid.x % launch->grid.y,
                                  b / (launch->grid.x * launch->grid.y)};
            if (!run_block(block_idx)) break;
        }
    } catch (const KernelError& error) {
        launch->fail(error.message);
    }
    alternate.ss_flags = SS_DISABLE;
    sigaltstack(&alternate, nullptr);
    if (self.stacks) munmap(self.stacks, self.stacks_size);
    worker = nullptr;
}

// --- registering the kernels (the loader's generated code calls this) --------------------------------------------

template <typename T>
std::string type_name() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        using Pointee = std::remove_pointer_t<U>;
        return (std::is_const_v<Pointee> ? "const " : "") + type_name<std::remove_cv_t<Pointee>>() + "*";
    } else if constexpr (std::is_same_v<U, float>) return "float";
    else if constexpr (std::is_same_v<U, double>) return "double";
    else if constexpr (std::is_same_v<U, bool>) return "bool";
    else if constexpr (std::is_same_v<U, signed char>) return "signed char";
    else if constexpr (std::is_same_v<U, unsigned char>) return "unsigned char";
    else if constexpr (std::is_same_v<U, short>) return "short";
    else if constexpr (std::is_same_v<U, unsigned short>) return "unsigned short";
    else if constexpr (std::is_same_v<U, int>) return "int";
    else if constexpr (std::is_same_v<U, unsigned int>) return "unsigned int";
    else if constexpr (std::is_same_v<U, long long> || (std::is_same_v<U, long> && sizeof(long) == 8))
        return "long long";
    else if constexpr (std::is_same_v<U, unsigned long long> ||
                       (std::is_same_v<U, unsigned long> && sizeof(long) == 8))
        return "unsigned long long";
    else return "unsupported";
}

// Calls the kernel with its arguments read from `args`, an array of pointers to each, as cuLaunchKernel takes them.
template <typename... Args, std::size_t... I>
void call_with(void (*function)(Args...), void** args, std::index_sequence<I...>) {
    function(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

template <typename... Args>
void call_kernel(void* function, void** args) {
    call_with(reinterpret_cast<void (*)(Args...)>(function), args, std::index_sequence_for<Args...>{});
}

template <typename... Args>
int register_kernel(const char* name, void (*function)(Args...), int max_threads) {
    std::string signature;
    ((signature += (signature.empty() ? "" : ",") + type_name<Args>()), ...);
    kernels().push_back(Kernel{name, &call_kernel<Args...>, reinterpret_cast<void*>(function), signature,
                               max_threads});
    return 0;
}

}  // namespace cuda_cpu

// --- the CUDA built-ins ----------------------------------------------------------------------------------------

#define threadIdx (::cuda_cpu::current_fiber().thread_idx)
#define blockIdx (::cuda_cpu::worker->block_idx)
#define blockDim (::cuda_cpu::worker->launch->block)
#define gridDim (::cuda_cpu::worker->launch->grid)

inline void __syncthreads(cuda_cpu::Where where = cuda_cpu::Where::current()) { cuda_cpu::syncthreads(where); }
inline void __syncwarp(unsigned int mask = 0xffffffffu, cuda_cpu::Where where = cuda_cpu::Where::current()) {
    cuda_cpu::warp_operation(cuda_cpu::WarpOp::syncwarp, mask, 0, 0, warpSize, where);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize,
              cuda_cpu::Where where = cuda_cpu::Where::current()) {
    return cuda_cpu::from_word<T>(
        cuda_cpu::warp_operation(cuda_cpu::WarpOp::shfl, mask, cuda_cpu::to_word(var), src_lane, width, where));
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                 cuda_cpu::Where where = cuda_cpu::Where::current()) {
    return cuda_cpu::from_word<T>(cuda_cpu::warp_operation(cuda_cpu::WarpOp::shfl_up, mask, cuda_cpu::to_word(var),
                                                           static_cast<int>(delta), width, where));
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                   cuda_cpu::Where where = cuda_cpu::Where::current()) {
    return cuda_cpu::from_word<T>(cuda_cpu::warp_operation(cuda_cpu::WarpOp::shfl_down, mask,
                                                           cuda_cpu::to_word(var), static_cast<int>(delta), width,
                                                           where));
}
template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize,
                  cuda_cpu::Where where = cuda_cpu::Where::current()) {
    return cuda_cpu::from_word<T>(
        cuda_cpu::warp_operation(cuda_cpu::WarpOp::shfl_xor, mask, cuda_cpu::to_word(var), lane_mask, width, where));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate,
                                  cuda_cpu::Where where = cuda_cpu::Where::current()) {
    return static_cast<unsigned int>(
        cuda_cpu::warp_operation(cuda_cpu::WarpOp::ballot, mask, predicate != 0, 0, warpSize, where));
}
inline int __any_sync(unsigned int mask, int predicate, cuda_cpu::Where where = cuda_cpu::Where::current()) {
    return static_cast<int>(cuda_cpu::warp_operation(cuda_cpu::WarpOp::any, mask, predicate != 0, 0, warpSize, where));
}
inline int __all_sync(unsigned int mask, int predicate, cuda_cpu::Where where = cuda_cpu::Where::current()) {
    return static_cast<int>(cuda_cpu::warp_operation(cuda_cpu::WarpOp::all, mask, predicate != 0, 0, warpSize, where));
}

template <typename T>
T atomicAdd(T* address, T value) {
    return cuda_cpu::atomic_update(address, [value](T old) { return old + value; });
}
template <typename T>
T atomicMax(T* address, T value) {
    return cuda_cpu::atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
T atomicMin(T* address, T value) {
    return cuda_cpu::atomic_update(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
T atomicExch(T* address, T value) {
    return cuda_cpu::atomic_update(address, [value](T) { return value; });
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
    return cuda_cpu::atomic_update(address, [compare, value](T old) { return old == compare ? value : old; });
}

inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// --- what the loader calls -------------------------------------------------------------------------------------

#define CUDA_CPU_EXPORT extern "C" __attribute__((visibility("default")))

CUDA_CPU_EXPORT int cuda_cpu_kernel_count() { return static_cast<int>(cuda_cpu::kernels().size()); }
CUDA_CPU_EXPORT const char* cuda_cpu_kernel_name(int i) { return cuda_cpu::kernels()[i].name; }
CUDA_CPU_EXPORT const char* cuda_cpu_kernel_signature(int i) { return cuda_cpu::kernels()[i].signature.c_str(); }
CUDA_CPU_EXPORT int cuda_cpu_kernel_max_threads(int i) { return cuda_cpu::kernels()[i].max_threads; }

// The bytes of __shared__ memory that the kernels of this file declare, all of them together: the library's
// thread-local block less the pointer `worker`. It may count a few bytes too many: the block's size is rounded up
// to its alignment (8 bytes, or more if a __shared__ variable asks for more).
CUDA_CPU_EXPORT long cuda_cpu_shared_bytes() {
    long bytes = 0;
    std::thread([&bytes] {
        cuda_cpu::Worker self;
        cuda_cpu::worker = &self;  // the first use of the thread-local block makes it exist for this thread
        dl_iterate_phdr(cuda_cpu::find_tls_block, &self);
        bytes = static_cast<long>(self.shared_bytes) - static_cast<long>(sizeof(cuda_cpu::worker));
        cuda_cpu::worker = nullptr;
    }).join();
    return std::max(bytes, 0L);
}

// One launch: 0 when it ran to its end, 1 with a message in `error` when it failed.
// schedule: 0 forward, 1 reverse, 2 random (seeded); arrays: the pointer arguments, for the fault message.
CUDA_CPU_EXPORT int cuda_cpu_launch(int kernel, const unsigned int* grid, const unsigned int* block, void** args,
                                    const char* const* argument_names, const cuda_cpu::ArgumentArray* arrays,
                                    int num_arrays, int schedule, unsigned long long seed, int poison,
                                    int num_workers, long stack_size, char* error, long error_size) {
    using namespace cuda_cpu;
    Launch launch;
    launch.kernel = &kernels()[kernel];
    launch.grid = dim3{grid[0], grid[1], grid[2]};
    launch.block = dim3{block[0], block[1], block[2]};
    launch.args = args;
    launch.schedule = schedule;
    launch.seed = seed;
    launch.poison = poison;
    launch.arrays = arrays;
    launch.num_arrays = num_arrays;
    launch.argument_names = argument_names;
    launch.num_workers = std::clamp(num_workers, 1, MAX_WORKERS);
    launch.stack_size = static_cast<std::size_t>(stack_size);
    const std::size_t total = std::size_t(grid[0]) * grid[1] * grid[2];
    launch.block_order.resize(total);
    for (std::size_t i = 0; i < total; ++i) launch.block_order[i] = static_cast<std::uint32_t>(i);
    if (schedule == 1) std::reverse(launch.block_order.begin(), launch.block_order.end());
    if (schedule == 2) {
        std::uint64_t random = splitmix(seed);
        for (std::size_t i = total; i > 1; --i) {
            random = splitmix(random);
            std::swap(launch.block_order[i - 1], launch.block_order[random % i]);
        }
    }
    struct sigaction on_fault_action {}, old_segv{}, old_bus{};
    on_fault_action.sa_sigaction = on_fault;
    on_fault_action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&on_fault_action.sa_mask);
    active_launch = &launch;
    sigaction(SIGSEGV, &on_fault_action, &old_segv);
    sigaction(SIGBUS, &on_fault_action, &old_bus);
    std::vector<std::thread> threads;
    for (int w = 0; w < launch.num_workers; ++w) threads.emplace_back(run_worker, &launch);
    for (std::thread& thread : threads) thread.join();
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    active_launch = nullptr;
    if (!launch.failed) return 0;
    std::snprintf(error, static_cast<std::size_t>(error_size), "%s", launch.error.c_str());
    return 1;
}

#endif  // MINIDET_CPU_HARNESS_H
