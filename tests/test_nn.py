"""Modules, state dicts, optimizers and schedules."""

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet import nn, optim


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.layers = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 1, 1))

    def forward(self, x):
        return self.layers(self.bn(self.conv(x)))


def test_parameters_and_buffers_are_registered_in_order():
    block = Block()
    assert [n for n, _ in block.named_parameters()] == [
        "conv.weight", "bn.weight", "bn.bias", "layers.1.weight", "layers.1.bias"]
    assert [n for n, _ in block.named_buffers()] == ["bn.running_mean", "bn.running_var"]
    assert block.state_dict().keys() == {n for n, _ in block.named_parameters()} | {
        "bn.running_mean", "bn.running_var"}
    assert all(isinstance(v, np.ndarray) for v in block.state_dict().values())


def test_train_and_eval_reach_every_submodule():
    block = Block().eval()
    assert not any(m.training for m in block.modules())
    block.train()
    assert all(m.training for m in block.modules())


def test_batch_norm_updates_running_statistics_only_in_training():
    bn = nn.BatchNorm2d(3)
    x = md.tensor(np.random.default_rng(0).normal(2.0, 3.0, (8, 3, 4, 4)).astype(np.float32))
    bn(x)
    assert np.allclose(bn.running_mean, 0.1 * x.numpy().mean(axis=(0, 2, 3)), rtol=1e-5)
    assert np.allclose(bn.running_var, 0.9 + 0.1 * x.numpy().var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    before = bn.running_mean.copy()
    bn.eval()(x)
    assert np.array_equal(bn.running_mean, before)
    assert "bn.running_mean" in Block().state_dict()


def test_state_dict_round_trip_restores_outputs():
    md.manual_seed(0)
    a, b = Block(), Block()
    x = md.tensor(np.random.default_rng(1).standard_normal((2, 2, 5, 5)).astype(np.float32))
    a(x)                                     # changes a's running statistics
    a.eval(), b.eval()
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def test_state_dict_is_a_copy():
    block = Block()
    state = block.state_dict()
    state["conv.weight"][...] = 0
    assert np.abs(block.conv.weight.numpy()).sum() > 0


def test_load_state_dict_names_every_problem_at_once():
    state = Block().state_dict()
    del state["bn.bias"]
    state["head.weight"] = np.zeros(3)
    state["conv.weight"] = np.zeros((4, 2, 1, 1))
    with pytest.raises(ValueError) as error:
        Block().load_state_dict(state)
    message = str(error.value)
    assert "missing keys (1) bn.bias" in message
    assert "unexpected keys (1) head.weight" in message
    assert "conv.weight: checkpoint (4, 2, 1, 1), model (4, 2, 3, 3)" in message


def test_load_state_dict_lists_five_of_many_problems_and_counts_them():
    state = {f"extra{i}": np.zeros(1) for i in range(40)}
    with pytest.raises(ValueError, match=r"unexpected keys \(40\) extra0, extra1, extra2, extra3, extra4 and 35 more"):
        Block().load_state_dict({**Block().state_dict(), **state})


def test_load_state_dict_non_strict_reports_but_allows_missing_keys():
    state = Block().state_dict()
    del state["bn.bias"]
    missing, unexpected = Block().load_state_dict(state, strict=False)
    assert missing == ["bn.bias"] and unexpected == []


def test_frozen_batch_norm_has_no_parameters_and_folds_statistics():
    fbn = nn.FrozenBatchNorm2d(2, eps=0.0)
    fbn.weight[:] = [2.0, 1.0]
    fbn.bias[:] = [0.5, 0.0]
    fbn.running_mean[:] = [1.0, -1.0]
    fbn.running_var[:] = [4.0, 1.0]
    assert fbn.parameters() == []
    y = fbn(md.tensor(np.ones((1, 2, 1, 1), np.float32))).numpy().ravel()
    np.testing.assert_allclose(y, [(1 - 1) / 2 * 2 + 0.5, (1 + 1) / 1 * 1 + 0.0])
    assert set(fbn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_module_must_call_super_init():
    class Forgot(nn.Module):
        def __init__(self):
            self.conv = nn.Conv2d(1, 1, 1)

    with pytest.raises(AttributeError, match="must call super"):
        Forgot()


def test_to_cpu_keeps_parameter_objects_so_optimizers_still_see_them():
    block = Block()
    params = block.parameters()
    block.to("cpu")
    assert all(p is q for p, q in zip(params, block.parameters()))


def test_to_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Block().to("gpu")


@pytest.mark.gpu
def test_to_cuda_and_back_keeps_values():
    if not md.cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    block = Block()
    state = block.state_dict()
    block.to("cuda")
    assert all(p.device == "cuda" for p in block.parameters())
    assert all(np.array_equal(state[k], v) for k, v in block.to("cpu").state_dict().items())


def test_group_norm_layer_normalises_each_group():
    gn = nn.GroupNorm(2, 4)
    y = gn(md.tensor(np.random.default_rng(0).normal(5, 2, (2, 4, 3, 3)).astype(np.float32))).numpy()
    grouped = y.reshape(2, 2, -1)
    np.testing.assert_allclose(grouped.mean(axis=2), 0, atol=1e-5)
    np.testing.assert_allclose(grouped.var(axis=2), 1, rtol=1e-3)


def test_sgd_with_momentum_follows_the_formula():
    p = nn.Parameter(np.array([1.0]))
    opt = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    p.grad = np.array([2.0])
    opt.step()                               # v = 2 + 0.5*1 = 2.5, p = 1 - 0.25
    assert p.data.tolist() == pytest.approx([0.75])
    p.grad = np.array([2.0])
    opt.step()                               # v = 0.9*2.5 + 2 + 0.5*0.75 = 4.625
    assert p.data.tolist() == pytest.approx([0.75 - 0.4625])


def test_adam_first_step_moves_each_parameter_by_lr():
    p = nn.Parameter(np.array([1.0, -1.0]))
    opt = optim.Adam([p], lr=0.01)
    p.grad = np.array([10.0, -0.001])
    opt.step()                               # bias-corrected m / sqrt(v) = sign(g) on the first step
    np.testing.assert_allclose(p.data, [0.99, -0.99], rtol=1e-5)


def test_optimizer_skips_parameters_without_gradient_and_zero_grad_clears():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    opt = optim.SGD([a, b], lr=1.0)
    a.grad = np.ones(2)
    opt.step()
    assert a.data.tolist() == [0.0, 0.0] and b.data.tolist() == [1.0, 1.0]
    opt.zero_grad()
    assert a.grad is None


def test_optimizer_needs_parameters():
    with pytest.raises(ValueError, match="no parameters"):
        optim.SGD([], lr=0.1)


def test_warmup_then_steps():
    p = nn.Parameter(np.ones(1))
    opt = optim.SGD([p], lr=0.01)
    schedule = optim.MultiStepLR(opt, milestones=[6, 8], gamma=0.1, warmup_iters=4, warmup_factor=0.25)
    lrs = [schedule.get_last_lr()[0]]
    for _ in range(9):
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    expected = [0.0025, 0.00438, 0.00625, 0.00813, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
    np.testing.assert_allclose(lrs, expected, rtol=1e-2)


def test_cosine_schedule_ends_at_eta_min():
    opt = optim.SGD([nn.Parameter(np.ones(1))], lr=1.0)
    schedule = optim.CosineAnnealingLR(opt, T_max=10, eta_min=0.1)
    for _ in range(5):
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.55)
    for _ in range(5):
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.1)


def test_a_small_network_learns():
    md.manual_seed(0)
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    target = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    x = md.tensor(rng.standard_normal((8, 1, 6, 6)).astype(np.float32))
    y = F.conv2d(x, md.tensor(target), padding=1).detach()
    opt = optim.SGD(conv.parameters(), lr=0.05, momentum=0.9)
    for step in range(150):
        loss = ((conv(x) - y) ** 2).mean()
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 1e-3
    np.testing.assert_allclose(conv.weight.numpy(), target, atol=1e-2)


def test_max_pool_layer_halves_the_stem_output_as_in_a_resnet():
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    y = pool(md.tensor(x)).numpy()
    assert y.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(y, x[:, :, 1::2, 1::2])     # values increase along rows and columns
    assert pool.parameters() == [] and "kernel_size=3, stride=2, padding=1" in repr(pool)


def test_max_pool_pads_with_minus_infinity_and_gives_a_tie_to_its_first_tap():
    # Negative values with padding 1: a zero padding would win every border window; -inf never does.
    x = -np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)                  # -1 ... -9
    y = F.max_pool2d(md.tensor(x), 3, stride=1, padding=1).numpy()[0, 0]
    np.testing.assert_array_equal(y, [[-1, -1, -2], [-1, -1, -2], [-4, -4, -5]])
    # Overlapping windows (3 x 3, stride 1) full of ties: each window's gradient goes to its first tap in row-major
    # order (as torch), so pixel (0, 0), the first tap of the windows that contain it, collects several.
    t = md.tensor(np.zeros((1, 1, 3, 3)), requires_grad=True)
    F.max_pool2d(t, 3, stride=1, padding=1).sum().backward()
    np.testing.assert_array_equal(t.grad[0, 0], [[4, 2, 0], [2, 1, 0], [0, 0, 0]])


def test_max_pool_keeps_a_nan_and_sends_its_window_gradient_to_the_first_tap():
    x = np.array([[[[1, 2, 3, 4], [5, np.nan, 7, 8]]]], dtype=np.float64)    # windows (2 x 2): [1 2 5 nan], [3 4 7 8]
    t = md.tensor(x, requires_grad=True)
    y = F.max_pool2d(t, 2)
    np.testing.assert_array_equal(y.numpy(), [[[[np.nan, 8]]]])
    y.sum().backward()
    np.testing.assert_array_equal(t.grad, [[[[1, 0, 0, 0], [0, 0, 0, 1]]]])


def test_to_float64_converts_parameters_and_float_buffers_in_place():
    block = Block()
    params = block.parameters()
    block.register_buffer("steps", np.zeros(1, np.int64))
    block.to(np.float64)
    assert all(p.dtype == np.float64 for p in block.parameters())
    assert all(p is q for p, q in zip(params, block.parameters()))
    assert block.bn.running_mean.dtype == np.float64 and block.steps.dtype == np.int64
    y = block(md.tensor(np.ones((1, 2, 3, 3))))               # float64 in, float64 through every layer
    assert y.dtype == np.float64


def test_to_refuses_a_dtype_that_is_not_floating():
    with pytest.raises(TypeError, match="floating dtype"):
        Block().to(np.int32)
