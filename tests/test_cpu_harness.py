"""The CPU launch harness (kernels/cpu_harness.h, minidet/cpu_harness.py): what it executes, and what it catches.

1. Its CUDA semantics, on small kernels written here: the thread orders, the warp operations against their
   definitions in the CUDA Programming Guide, atomics racing between blocks, shared memory one copy per block.
2. Its checks, each on a kernel that breaks one rule: barriers at different places, a thread that exits while
   others wait, warp operations with a bad mask, a deadlock, reads of unwritten shared memory, a write past the end
   of an array (in a subprocess: the guard page ends the process), argument types, launch bounds, shared memory.
3. The production kernels' ``gpu`` tests (tests/test_kernels.py), run through the CuPy stand-in
   (tests/cupy_on_cpu.py) in a subprocess, once in forward order with poison 0x7F and once in seeded random order
   with poison 0xFF; and every other ``gpu`` test once, through the same stand-in. Nothing here is a GPU result.

The planted bugs in the production kernels and launchers are in tests/test_planted_bugs.py.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minidet import cpu_harness, cuda
from minidet.cpu_harness import HarnessError, device_empty
from minidet.functional.loss import focal_loss_with_labels_reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU launch harness needs g++")


def compile_kernels(source):
    """The kernels of ``source`` (CUDA C++ text) compiled for the harness, its lines named test.cu in messages;
    headers from kernels/."""
    return cpu_harness.load_module(textwrap.dedent(source), str(cuda.kernels_dir()), "test.cu")


def filled(shape, dtype, value):
    array = device_empty(shape, dtype)
    array[...] = value
    return array


# --- 1. semantics --------------------------------------------------------------------------------------------------

ORDER = compile_kernels(r"""
    // Each thread takes the next ticket when it runs: the tickets say in which order the threads ran.
    extern "C" __global__ void ticket_order(unsigned int* counter, unsigned int* ticket) {
        const unsigned int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
        ticket[blockIdx.x * blockDim.x * blockDim.y * blockDim.z + t] = atomicAdd(&counter[blockIdx.x], 1u);
    }

    extern "C" __global__ void indices(unsigned int* out) {
        const unsigned int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        const unsigned int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
        unsigned int* slot = out + 8 * (b * blockDim.x * blockDim.y * blockDim.z + t);
        slot[0] = threadIdx.x; slot[1] = threadIdx.y; slot[2] = threadIdx.z;
        slot[3] = blockIdx.x; slot[4] = blockIdx.y; slot[5] = blockIdx.z;
        slot[6] = blockDim.x * blockDim.y * blockDim.z; slot[7] = gridDim.x * gridDim.y * gridDim.z;
    }
""")


def tickets(schedule, seed=0, threads=64):
    counter, ticket = filled(2, np.uint32, 0), filled(2 * threads, np.uint32, 99999)
    ORDER.get_function("ticket_order")(2, threads, (counter, ticket), schedule=schedule, seed=seed)
    return ticket.reshape(2, threads)


def test_threads_run_in_the_order_the_schedule_says():
    np.testing.assert_array_equal(tickets("forward"), np.tile(np.arange(64), (2, 1)))
    np.testing.assert_array_equal(tickets("reverse"), np.tile(np.arange(64)[::-1], (2, 1)))
    random = tickets("random", seed=1)
    assert sorted(random[0]) == list(range(64)) and random[0].tolist() != list(range(64))
    assert random[0].tolist() != random[1].tolist(), "each block draws its own order"
    np.testing.assert_array_equal(tickets("random", seed=1), random)            # the seed decides it
    assert tickets("random", seed=2).tolist() != random.tolist()


def test_every_thread_sees_its_own_indices():
    grid, block = (3, 2, 2), (4, 3, 2)
    out = filled(12 * 24 * 8, np.uint32, 0)
    ORDER.get_function("indices")(grid, block, (out,))
    out = out.reshape(12, 24, 8)
    for b in range(12):
        for t in range(24):
            expected = [t % 4, t // 4 % 3, t // 12, b % 3, b // 3 % 2, b // 6, 24, 12]
            assert out[b, t].tolist() == expected, (b, t)


WARP = compile_kernels(r"""
    // out[op, thread]: each warp operation's result for every thread, with the arguments given.
    extern "C" __global__ void warp_ops(const int* in, unsigned int mask, int operand, int width, int* out) {
        const int t = threadIdx.x;
        const int n = blockDim.x;
        const int v = in[t];
        if (mask >> (t % 32) & 1u) {
            out[0 * n + t] = __shfl_sync(mask, v, operand, width);
            out[1 * n + t] = __shfl_up_sync(mask, v, operand, width);
            out[2 * n + t] = __shfl_down_sync(mask, v, operand, width);
            out[3 * n + t] = __shfl_xor_sync(mask, v, operand, width);
            out[4 * n + t] = static_cast<int>(__ballot_sync(mask, v > 0));
            out[5 * n + t] = __any_sync(mask, v > 0);
            out[6 * n + t] = __all_sync(mask, v > 0);
            __syncwarp(mask);
        }
    }

    extern "C" __global__ void shuffle_double(const double* in, double* out) {
        out[threadIdx.x] = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);
    }
""")


def expected_warp_ops(values, mask, operand, width):
    """The CUDA Programming Guide's definitions, lane by lane (a lane outside the mask: no result)."""
    n = len(values)
    out = np.full((7, n), -7, dtype=np.int64)
    for t in range(n):
        lane, first = t % 32, t - t % 32
        if not mask >> lane & 1:
            continue
        segment = lane // width * width
        out[0, t] = values[first + segment + operand % width]
        out[1, t] = values[t - operand] if lane - segment >= operand else values[t]
        out[2, t] = values[t + operand] if lane - segment + operand < width else values[t]
        out[3, t] = values[first + (lane ^ operand)] if (lane ^ operand) < segment + width else values[t]
        predicates = [values[first + other] > 0 and mask >> other & 1 for other in range(32)]
        ballot = sum(1 << other for other in range(32) if predicates[other])
        out[4, t] = np.uint32(ballot).view(np.int32)
        out[5, t] = int(ballot != 0)
        out[6, t] = int(ballot == mask)
    return out


@pytest.mark.parametrize("operand, width", [(1, 32), (5, 32), (16, 32), (3, 8), (1, 4), (0, 1), (31, 32)])
def test_warp_operations_follow_their_definitions(operand, width, rng):
    values = rng.integers(-50, 50, 64).astype(np.int32)
    out = filled(7 * 64, np.int32, -7)
    WARP.get_function("warp_ops")(1, 64, (values, np.uint32(0xFFFFFFFF), np.int32(operand), np.int32(width), out))
    np.testing.assert_array_equal(out.reshape(7, 64), expected_warp_ops(values, 0xFFFFFFFF, operand, width))


def test_warp_operations_on_part_of_a_warp(rng):
    # The even lanes only, xor with 2: every lane reads another even lane. (Offsets that would read an odd lane
    # are errors; see the checks below.)
    values = rng.integers(-50, 50, 32).astype(np.int32)
    mask = 0x55555555
    out = filled(7 * 32, np.int32, -7)
    kernel = WARP.get_function("warp_ops")
    kernel(1, 32, (values, np.uint32(mask), np.int32(2), np.int32(32), out), schedule="random", seed=3)
    expected = expected_warp_ops(values, mask, 2, 32)
    np.testing.assert_array_equal(out.reshape(7, 32)[[3, 4, 5, 6]], expected[[3, 4, 5, 6]])


def test_a_shuffle_moves_all_eight_bytes_of_a_double(rng):
    values = rng.standard_normal(32) * 1e300
    out = filled(32, np.float64, np.nan)
    WARP.get_function("shuffle_double")(1, 32, (values, out))
    np.testing.assert_array_equal(out, np.concatenate([values[1:], values[-1:]]))


ATOMICS = compile_kernels(r"""
    template <typename T>
    __device__ void add_ones(T* total, T* largest, T* smallest, unsigned int* exchanged, int* swapped) {
        const int id = blockIdx.x * blockDim.x + threadIdx.x;
        atomicAdd(total, T(1));
        atomicMax(largest, T(id));
        atomicMin(smallest, T(-id));
        atomicExch(exchanged, 7u);
        atomicCAS(swapped, 0, id + 1);  // only the first thread to get there finds 0
    }
    extern "C" __global__ void atomics_int(int* a, int* b, int* c, unsigned int* d, int* e) { add_ones(a, b, c, d, e); }
    extern "C" __global__ void atomics_double(double* a, double* b, double* c, unsigned int* d, int* e) {
        add_ones(a, b, c, d, e);
    }
""")


@pytest.mark.parametrize("dtype, name", [(np.int32, "atomics_int"), (np.float64, "atomics_double")])
def test_atomics_from_many_blocks_lose_no_update(dtype, name):
    # 64 blocks on 4 worker threads, 16,384 additions to one number: a lost update would show.
    cells = [filled(1, dtype, 0), filled(1, dtype, -1), filled(1, dtype, 1), filled(1, np.uint32, 0),
             filled(1, np.int32, 0)]
    ATOMICS.get_function(name)(64, 256, tuple(cells), schedule="random", seed=5)
    assert [float(c[0]) for c in cells[:4]] == [64 * 256, 64 * 256 - 1, -(64 * 256 - 1), 7]
    assert 1 <= cells[4][0] <= 64 * 256


SHARED = compile_kernels(r"""
    // Each block sums its threads' values through shared memory; out[block] is the block's sum. The two extra
    // kernels break the rules: one reads shared memory nobody wrote, one writes a lot of it.
    extern "C" __global__ void block_sum(const int* in, int* out) {
        __shared__ int values[128];
        values[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
        __syncthreads();
        if (threadIdx.x == 0) {
            int sum = 0;
            for (int i = 0; i < blockDim.x; ++i) sum += values[i];
            out[blockIdx.x] = sum;
        }
    }

    // Reads shared memory that this block has not written (it is written only after the read, and only when
    // `write` is set: a variable never written anywhere would be folded to 0 by the compiler).
    extern "C" __global__ void read_unwritten(unsigned int* out, int write) {
        __shared__ unsigned int not_yet_written[4];
        out[threadIdx.x] = not_yet_written[threadIdx.x];
        if (write) not_yet_written[threadIdx.x] = 1;
    }
""")


def test_shared_memory_is_one_copy_per_block(rng):
    values = rng.integers(-100, 100, 40 * 128).astype(np.int32)
    out = filled(40, np.int32, 0)
    SHARED.get_function("block_sum")(40, 128, (values, out), schedule="random", seed=1)
    np.testing.assert_array_equal(out, values.reshape(40, 128).sum(axis=1))


@pytest.mark.parametrize("poison", [0x7F, 0xFF, 0x00])
def test_shared_memory_starts_as_the_poison_byte(poison):
    out = filled(4, np.uint32, 1)
    for write in (1, 0):      # the writes of one launch are gone in the next: every block starts poisoned
        SHARED.get_function("read_unwritten")(1, 4, (out, np.int32(write)), poison=poison)
        assert out.tolist() == [int.from_bytes(bytes([poison]) * 4, "little")] * 4


def test_the_shared_memory_size_is_measured():
    assert SHARED.shared_bytes == 128 * 4 + 4 * 4
    module = cpu_harness.load_module(cuda.kernel_source("focal_loss"), str(cuda.kernels_dir()))
    assert module.shared_bytes == 8 * 4 + 8 * 8                  # warp_sums, float and double


# --- 2. checks -----------------------------------------------------------------------------------------------------

BROKEN = compile_kernels(r"""
    extern "C" __global__ void barrier_in_a_branch(int* out) {
        if (threadIdx.x < 40) {
            __syncthreads();
        } else {
            __syncthreads();
        }
        out[threadIdx.x] = 1;
    }

    extern "C" __global__ void early_return(int* out) {
        if (threadIdx.x >= 100) return;
        __syncthreads();
        out[threadIdx.x] = 1;
    }

    extern "C" __global__ void shuffle_in_a_branch(int* out) {
        int v = threadIdx.x;
        if (threadIdx.x % 32 < 8) v = __shfl_down_sync(0xffffffffu, v, 1);
        out[threadIdx.x] = v;
    }

    extern "C" __global__ void shuffle_reads_outside_the_mask(int* out) {
        out[threadIdx.x] = __shfl_down_sync(0x000000ffu, static_cast<int>(threadIdx.x), 4);
    }

    extern "C" __global__ void mask_without_itself(int* out) {
        out[threadIdx.x] = __shfl_sync(0x1u, static_cast<int>(threadIdx.x), 0);
    }

    extern "C" __global__ void different_masks(int* out) {
        out[threadIdx.x] = __ballot_sync(threadIdx.x == 0 ? 0x3u : 0x7u, 1);
    }

    extern "C" __global__ void mask_names_missing_lanes(int* out) {
        out[threadIdx.x] = __any_sync(0xffffffffu, 1);
    }

    extern "C" __global__ void __launch_bounds__(128) bounded(int* out) { out[threadIdx.x] = 1; }

    extern "C" __global__ void takes_types(const float* x, int n, float scale, long long* out) {
        if (threadIdx.x < n) out[threadIdx.x] = static_cast<long long>(x[threadIdx.x] * scale);
    }
""")


def run_broken(name, threads, *, out_size=256, **settings):
    out = filled(out_size, np.int32, 0)
    BROKEN.get_function(name)(1, threads, (out,), **settings)
    return out


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_barriers_at_different_places_are_an_error(schedule):
    with pytest.raises(HarnessError, match=r"different __syncthreads calls: threads 0-39 at test.cu:4, threads "
                                           r"40-63 at test.cu:6"):
        run_broken("barrier_in_a_branch", 64, schedule=schedule)


def test_a_thread_that_exits_while_others_wait_at_a_barrier_is_reported():
    with pytest.raises(HarnessError, match=r"deadlock in block \(0, 0, 0\) of kernel early_return.*exited while the "
                                           r"others wait at __syncthreads.*Threads 0-99 wait at __syncthreads at "
                                           r"test.cu:\d+\. Threads 100-127 have exited"):
        run_broken("early_return", 128)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_a_shuffle_in_a_divergent_branch_is_a_deadlock_with_every_thread_placed(schedule):
    with pytest.raises(HarnessError) as caught:
        run_broken("shuffle_in_a_branch", 64, schedule=schedule)
    message = str(caught.value)
    assert "deadlock in block (0, 0, 0) of kernel shuffle_in_a_branch" in message
    assert "Threads 0-7 wait at __shfl_down_sync (mask 0xffffffff) at test.cu:" in message
    assert "for lanes 8-31 of their warp" in message
    assert "Threads 8-31 have exited" in message and "Threads 40-63 have exited" in message


def test_warp_operations_check_their_masks():
    with pytest.raises(HarnessError, match="lane 4 reads lane 8, which is not in the mask 0x000000ff"):
        run_broken("shuffle_reads_outside_the_mask", 32)
    with pytest.raises(HarnessError, match="mask 0x00000001, which does not name its own lane 1"):
        run_broken("mask_without_itself", 32)
    with pytest.raises(HarnessError, match="lanes call it with different masks"):
        run_broken("different_masks", 3)
    with pytest.raises(HarnessError, match="names lane 20 of warp 0, but the block has only 20 threads"):
        run_broken("mask_names_missing_lanes", 20)


def test_launches_are_checked_against_the_launch_bounds_and_cuda_limits():
    with pytest.raises(HarnessError, match="launched with 256 threads per block, but its __launch_bounds__ allows "
                                           "at most 128"):
        run_broken("bounded", 256)
    run_broken("bounded", 128)
    with pytest.raises(HarnessError, match="at most 1024 threads"):
        run_broken("early_return", (32, 33))
    with pytest.raises(HarnessError, match="grid"):
        BROKEN.get_function("bounded")((1, 70000), 1, (filled(1, np.int32, 0),))


def test_static_shared_memory_is_limited_to_48_kib():
    big = compile_kernels(r"""
        extern "C" __global__ void big(float* out) {
            __shared__ float tile[12 * 1024 + 1];
            tile[threadIdx.x] = 1;
            __syncthreads();
            out[threadIdx.x] = tile[threadIdx.x];
        }
    """)
    # Measured to within the thread-local block's alignment (8 bytes: the harness's own pointer is in it).
    assert (12 * 1024 + 1) * 4 <= big.shared_bytes < (12 * 1024 + 1) * 4 + 8
    with pytest.raises(HarnessError, match="bytes of __shared__ memory together; a kernel may have at most 49152"):
        big.get_function("big")(1, 32, (filled(32, np.float32, 0),))


def test_arguments_are_checked_against_the_kernels_signature():
    kernel = BROKEN.get_function("takes_types")
    assert kernel.parameters == [("const float*", "x"), ("int", "n"), ("float", "scale"), ("long long*", "out")]
    x, out = filled(8, np.float32, 2.5), filled(8, np.int64, 0)
    kernel(1, 8, (x, np.int32(8), np.float32(2.0), out))
    assert out.tolist() == [5] * 8
    with pytest.raises(HarnessError, match=r"argument 2 \(scale\) is a Python float, which a launch passes as "
                                           r"double \(8 bytes\), but the kernel's parameter is float.*numpy.float32"):
        kernel(1, 8, (x, np.int32(8), 2.0, out))
    with pytest.raises(HarnessError, match=r"argument 1 \(n\) is a Python int, which a launch passes as long long"):
        kernel(1, 8, (x, 8, np.float32(2.0), out))
    with pytest.raises(HarnessError, match=r"argument 0 \(x\) is an array of float64, but the kernel's parameter is "
                                           r"const float\*"):
        kernel(1, 8, (filled(8, np.float64, 1), np.int32(8), np.float32(2.0), out))
    with pytest.raises(HarnessError, match=r"argument 3 \(out\) is not C-contiguous"):
        kernel(1, 8, (x, np.int32(8), np.float32(2.0), np.zeros(16, np.int64)[::2]))
    with pytest.raises(HarnessError, match=r"takes 4 arguments \(x, n, scale, out\), got 3"):
        kernel(1, 8, (x, np.int32(8), np.float32(2.0)))


def test_host_arrays_are_copied_to_guarded_memory_and_back():
    x, out = np.full(8, 1.5, np.float32), np.zeros(8, np.int64)      # plain NumPy arrays
    BROKEN.get_function("takes_types")(1, 8, (x, np.int32(8), np.float32(4.0), out))
    assert out.tolist() == [6] * 8


def run_in_subprocess(code, **env):
    """Run ``code`` in a fresh Python (a guard-page fault ends that process, not pytest): (exit code, output)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def test_a_write_past_the_end_of_an_array_stops_at_once_and_says_where():
    code, output = run_in_subprocess(r"""
        import numpy as np
        from minidet import cpu_harness, cuda
        module = cpu_harness.load_module('''
        extern "C" __global__ void off_by_one(const float* in, float* out, int n) {
            const int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i <= n) out[i] = 2 * in[i < n ? i : 0];     // <= : one element too far
        }
        ''', str(cuda.kernels_dir()), "off_by_one.cu")
        out = cpu_harness.device_empty(100, np.float32)
        module.get_function("off_by_one")(4, 32, (np.ones(100, np.float32), out, np.int32(100)))
        print("not caught")
    """)
    assert code == 86, output
    assert "not caught" not in output
    assert "thread (4, 0, 0) (lane 4 of warp 0) of block (3, 0, 0) of kernel off_by_one made an invalid write" in output
    assert "0 bytes past the end of argument 1 (out), an array of 400 bytes" in output
    assert "the faulting instruction is at off_by_one at off_by_one.cu:4" in output


def test_the_portable_fiber_switch_runs_the_same_launches(tmp_path):
    # Where the x86-64 switch is not available, swapcontext switches the fibers; CUDA_CPU_PORTABLE_SWITCH forces it.
    source = cuda.kernel_source("focal_loss")
    (tmp_path / "kernel.cpp").write_text(cpu_harness.translation_unit(source, "focal_loss.cu"))
    gxx, _ = cpu_harness.compiler()
    subprocess.run([gxx, *cpu_harness.GXX_FLAGS, "-DCUDA_CPU_PORTABLE_SWITCH", f"-I{cuda.kernels_dir()}", "-o",
                    str(tmp_path / "portable.so"), str(tmp_path / "kernel.cpp")], check=True, timeout=300)
    module = cpu_harness.Module(tmp_path / "portable.so", cpu_harness.kernel_declarations(source))
    assert "cuda_cpu_switch" not in subprocess.run(["nm", "-D", "--defined-only", str(tmp_path / "portable.so")],
                                                   capture_output=True, text=True).stdout
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((3000, 7)) * 4).astype(np.float32)
    labels = rng.integers(-2, 7, 3000).astype(np.int32)
    weights = rng.uniform(0.5, 2, 3000).astype(np.float32)
    expected_loss, expected_grad = focal_loss_with_labels_reference(logits, labels, weights, 0.25, 2.0)
    for schedule in ("forward", "random"):
        loss, grad = filled((), np.float32, 0), filled(logits.shape, np.float32, np.nan)
        module.get_function("focal_loss_with_labels_float32")(
            8, 256, (logits, labels, weights, np.int32(3000), np.int32(7), np.float32(0.25), np.float32(2.0), grad,
                     loss), schedule=schedule)
        assert float(loss) == pytest.approx(float(expected_loss), rel=1e-5)
        np.testing.assert_allclose(grad, expected_grad, rtol=4e-6, atol=1e-38)


# --- 3. the production kernels' launch tests, through the CuPy stand-in --------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("schedule, poison", [("forward", "0x7F"), ("random:20261201", "0xFF")])
def test_the_gpu_kernel_tests_pass_on_the_cpu_harness(schedule, poison):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_kernels.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, MINIDET_TEST_CUPY="cpu-harness", MINIDET_HARNESS_SCHEDULE=schedule,
                 MINIDET_HARNESS_POISON=poison))
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1].strip("= ")
    assert result.returncode == 0, output[-6000:]
    assert "the CPU launch harness, not on a GPU" in output          # the stand-in was in place
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
    assert int(summary.split()[0]) >= 15, summary


@pytest.mark.slow
def test_every_other_gpu_test_passes_on_the_cupy_stand_in():
    """The ``gpu`` tests outside tests/test_kernels.py (every op, the model, training, all on "CuPy"): through the
    stand-in they run minidet's CuPy code path (the array module each op picks, what stays on the device, the
    kernels inside the losses and the matching) before any GPU does. NumPy is underneath, so neither CuPy's own
    API nor a GPU's rounding is tested here; only the NCCL test skips (it needs a real GPU)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "tests",
         "--deselect", "tests/test_kernels.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, MINIDET_TEST_CUPY="cpu-harness"))
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1].strip("= ")
    assert result.returncode == 0, output[-6000:]
    assert "the CPU launch harness, not on a GPU" in output
    assert "failed" not in summary and "1 skipped" in summary, summary
    assert int(summary.split()[0]) >= 400, summary


def test_the_cupy_stand_in_refuses_host_arrays_as_cupy_does():
    """CuPy's functions and operators raise TypeError for a NumPy array (no implicit copy to the device); the
    stand-in does too, so a GPU-only failure of that kind shows on the CPU. NumPy's own code inside one of its
    functions is not held to the rule (``zeros_like`` copies a host array into its result)."""
    code, output = run_in_subprocess(r"""
        import cupy_on_cpu
        cupy_on_cpu.install()
        import cupy
        import numpy as np

        device, host = cupy.ones(3), np.ones(3)
        for name, call in [("add", lambda: device + host), ("add", lambda: host + device),
                           ("where", lambda: cupy.where(device > 0, device, host)),
                           ("concatenate", lambda: cupy.concatenate([device, host]))]:
            try:
                call()
            except TypeError as error:
                assert f"cupy.{name}: an argument is a NumPy (host) array" in str(error), error
            else:
                raise AssertionError(f"{name} took a host array")
        assert type(cupy.zeros_like(device)) is type(device) is type(device + np.float32(1)) is type(device[0])
        assert type(cupy.asarray(host)) is type(cupy.array(host)) is type(device)
        print("ok")
    """)
    assert code == 0 and output.strip().endswith("ok"), output
