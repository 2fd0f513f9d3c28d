"""The engine: graph walking, accumulation, freeing, no_grad, and its error messages."""

import gc
import weakref

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet.autograd import Function


def test_chain_rule_through_a_small_graph(xp):
    x = md.tensor(xp.asarray([1.0, 2.0, 3.0]), requires_grad=True)
    y = (x * x + 3 * x).sum()          # dy/dx = 2x + 3
    y.backward()
    np.testing.assert_allclose(md.backend.to_numpy(x.grad), [5.0, 7.0, 9.0])


def test_a_tensor_used_twice_gets_both_gradients():
    x = md.tensor([2.0], requires_grad=True)
    y = x * x * x                      # x used three times: dy/dx = 3x^2 = 12
    y.backward()
    assert x.grad.tolist() == [12.0]


def test_diamond_graph_adds_gradients_from_both_branches():
    x = md.tensor([1.5], requires_grad=True)
    a, b = x.exp(), x * 2
    (a * b).backward()                 # d/dx 2x e^x = 2 e^x + 2x e^x
    np.testing.assert_allclose(x.grad, [2 * np.exp(1.5) + 3 * np.exp(1.5)], rtol=1e-6)


def test_a_chain_of_ten_thousand_ops_needs_no_recursion():
    x = md.tensor([1.0], requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y + 1
    y.backward()
    assert y.item() == 10_001.0
    assert x.grad.tolist() == [1.0]


def test_gradients_accumulate_across_backward_calls():
    x = md.tensor([1.0, 2.0], requires_grad=True)
    (x * 3).sum().backward()
    (x * 4).sum().backward()
    assert x.grad.tolist() == [7.0, 7.0]


def test_broadcast_operand_gets_summed_gradient(xp):
    x = md.tensor(xp.ones((4, 3), dtype=xp.float32), requires_grad=True)
    b = md.tensor(xp.ones((1, 3), dtype=xp.float32), requires_grad=True)
    (x * b).sum().backward()
    assert b.grad.shape == (1, 3)
    assert md.backend.to_numpy(b.grad).tolist() == [[4.0, 4.0, 4.0]]


def test_leaf_gradient_is_a_writable_array_of_its_own():
    x = md.tensor(np.zeros((2, 3)), requires_grad=True)
    x.sum().backward()                 # Sum's backward returns a read-only broadcast view
    x.grad[0, 0] = 5.0                 # must not raise, must not touch anything else
    assert x.grad.flags.owndata


def test_graph_is_freed_after_backward():
    x = md.tensor(np.ones(3), requires_grad=True)
    hidden = x * 2                      # an intermediate that only the graph refers to
    watch = weakref.ref(hidden)
    loss = (hidden * 3).sum()
    del hidden
    gc.collect()
    assert watch() is not None          # still held by the graph
    loss.backward()
    gc.collect()
    assert watch() is None              # released once backward has used it


def test_second_backward_on_a_freed_graph_fails_clearly():
    x = md.tensor([1.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = md.tensor([3.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert x.grad.tolist() == [12.0]


def test_no_grad_records_nothing():
    x = md.tensor([1.0], requires_grad=True)
    with md.no_grad():
        y = x * 2
    assert not y.requires_grad and y.is_leaf
    assert md.is_grad_enabled()


def test_detach_cuts_the_graph():
    x = md.tensor([2.0], requires_grad=True)
    y = (x * x).detach() * x            # only the last factor carries a gradient
    y.backward()
    assert x.grad.tolist() == [4.0]


def test_unused_output_of_a_multi_output_function_gets_zero_gradient():
    class Split(Function):
        def forward(self, x):
            return x[:2].copy(), x[2:].copy()

        def backward(self, g_first, g_rest):
            return np.concatenate([g_first, g_rest])

    x = md.tensor(np.arange(5.0), requires_grad=True)
    first, _ = Split()(x)
    (first * 10).sum().backward()
    assert x.grad.tolist() == [10.0, 10.0, 0.0, 0.0, 0.0]


def test_wrong_gradient_shape_names_the_op():
    class Broken(Function):
        def forward(self, x):
            return x * 2

        def backward(self, gy):
            return gy.sum()             # forgot the shape

    x = md.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Broken.backward returned a gradient of shape \(\)"):
        Broken()(x).sum().backward()


def test_wrong_gradient_dtype_names_the_op():
    class Broken(Function):
        def forward(self, x):
            return x * 2

        def backward(self, gy):
            return gy.astype(np.float64)

    x = md.tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(RuntimeError, match="Broken.*dtype float64.*dtype float32"):
        Broken()(x).sum().backward()


def test_backward_on_non_scalar_without_gradient_explains():
    x = md.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"shape \(3,\) needs a gradient.*y.sum\(\).backward\(\)"):
        (x * 2).backward()


def test_backward_with_an_explicit_gradient():
    x = md.tensor(np.ones(3), requires_grad=True)
    (x * 2).backward(np.array([1.0, 2.0, 3.0]))
    assert x.grad.tolist() == [2.0, 4.0, 6.0]


def test_backward_without_requires_grad_explains():
    with pytest.raises(RuntimeError, match="does not require grad"):
        md.tensor([1.0]).sum().backward()


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="floating-point"):
        md.tensor(np.arange(3), requires_grad=True)


def test_scalars_are_lifted_to_the_tensor_dtype(xp):
    x = md.tensor(xp.ones(2, dtype=xp.float32))
    for scalar in (2, 2.0, np.float64(2.0), np.int64(2), np.float16(2)):
        assert (x * scalar).dtype == np.float32
        assert (scalar - x).dtype == np.float32
        assert (x / scalar).dtype == np.float32


def test_mixed_float_dtypes_are_rejected_with_the_fix():
    a = md.tensor(np.ones(2, np.float32))
    b = md.tensor(np.ones(2, np.float64))
    with pytest.raises(TypeError, match=r"add: operand dtypes differ \(float32 and float64\)"):
        a + b


def test_tensor_copies_its_input():
    array = np.zeros(3, np.float32)
    x = md.tensor(array)
    x.data += 1
    assert array.tolist() == [0.0, 0.0, 0.0]


def test_python_floats_become_float32_and_arrays_keep_their_dtype():
    assert md.tensor([1.0, 2.0]).dtype == np.float32
    assert md.tensor(np.ones(2)).dtype == np.float64
    assert md.tensor(np.ones(2), dtype=np.float32).dtype == np.float32


def test_ndarray_on_the_left_still_builds_a_graph():
    x = md.tensor(np.ones(2), requires_grad=True)
    y = np.array([2.0, 3.0]) * x
    assert isinstance(y, md.Tensor)
    y.sum().backward()
    assert x.grad.tolist() == [2.0, 3.0]


def test_tensor_method_forms_match_functions():
    x = md.tensor(np.arange(6.0).reshape(2, 3))
    assert x.reshape(3, 2).shape == (3, 2) and x.reshape((3, 2)).shape == (3, 2)
    assert x.permute(1, 0).shape == (3, 2) and x.transpose(0, 1).shape == (3, 2)
    assert x.sum(dim=1).numpy().tolist() == [3.0, 12.0]
    assert x.max().item() == 5.0
    assert F.mean(x, dim=0).numpy().tolist() == [1.5, 2.5, 3.5]
