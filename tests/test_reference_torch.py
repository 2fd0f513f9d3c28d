"""minidet against PyTorch on the same float32 inputs: forward values and the gradients of every input.

First every case of the op table (tests/op_table.py), with all inputs differentiable and with some constant; then
what a table cannot say well: operators and methods, ties, extremes, NumPy scalar settings, layers, optimizers.
Each op runs on both sides with the same inputs and the same random upstream gradient
(``y.backward(g)``), so a backward that forgets ``g``, a transposed gradient or a wrong
broadcast shows up as a relative error (``minidet.testing.relative_error``) above the tolerance.
The whole file skips where torch is not installed.
"""

import functools

import numpy as np
import pytest
from op_table import CASES, ELEMENTWISE, HEAVY, amax_dims, constants_as, torchvision_sigmoid_focal_loss

import minidet as md
import minidet.functional as F
from minidet import nn, optim
from minidet.testing import assert_close

torch = pytest.importorskip("torch")
TF = torch.nn.functional

pytestmark = pytest.mark.reference


# --- helpers -------------------------------------------------------------------------------------------------------

def randn(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def uniform(seed, low, high, *shape):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def with_extremes(x, values=(100.0, -100.0)):
    """``x`` (float32) with its first elements replaced by ``values`` (logits a confident detector produces)."""
    x = x.copy()
    x.reshape(-1)[:len(values)] = values
    return x


def check(op_md, op_torch, inputs, rtol=ELEMENTWISE, grad=None, seed=1234):
    """Run ``op_md`` on minidet tensors and ``op_torch`` on torch tensors made from the same ``inputs``.

    Compares the outputs (values, shape and dtype) and, after ``backward`` with one random upstream
    gradient on both sides, the gradient of every input listed in ``grad`` (default: all of them).
    Returns the two outputs for further checks.
    """
    grad = tuple(range(len(inputs))) if grad is None else tuple(grad)
    xs_md = [md.tensor(a, requires_grad=i in grad) for i, a in enumerate(inputs)]
    xs_t = [torch.tensor(a, requires_grad=i in grad) for i, a in enumerate(inputs)]
    y_md, y_t = op_md(*xs_md), op_torch(*xs_t)
    expected = y_t.detach().numpy()
    if y_md.dtype != expected.dtype:
        raise AssertionError(f"forward: dtype {y_md.dtype}, torch gives {expected.dtype}")
    assert_close(y_md.numpy(), expected, rtol, name="forward")
    if not grad:
        return y_md, y_t
    g = np.asarray(np.random.default_rng(seed).standard_normal(expected.shape), dtype=np.float32)
    y_md.backward(g)
    y_t.backward(torch.from_numpy(g.copy()))
    for i in grad:
        assert xs_md[i].grad is not None, f"input {i}: minidet computed no gradient"
        assert xs_md[i].grad.dtype == np.float32, f"input {i}: gradient dtype {xs_md[i].grad.dtype}"
        assert_close(xs_md[i].grad, xs_t[i].grad.numpy(), rtol, name=f"gradient of input {i}")
    return y_md, y_t


def torch_state(module):
    """A torch module's state dict as NumPy arrays (without torch's batch counter, which minidet does not keep)."""
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items() if k != "num_batches_tracked"}


def randomize_(module, seed):
    """Give every float parameter and buffer of a torch module random values (variances stay positive)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            values = rng.uniform(0.5, 2.0, t.shape) if "var" in name else rng.standard_normal(t.shape)
            t.copy_(torch.from_numpy(values.astype(np.float32)))


def check_module(module_md, module_t, x, rtol, seed=99):
    """Forward ``x`` through both modules, backward a random gradient, compare output and all gradients."""
    x_md, x_t = md.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y_md, y_t = module_md(x_md), module_t(x_t)
    assert_close(y_md.numpy(), y_t.detach().numpy(), rtol, name="forward")
    g = randn(seed, *y_t.shape)
    y_md.backward(g)
    y_t.backward(torch.from_numpy(g))
    assert_close(x_md.grad, x_t.grad.numpy(), rtol, name="gradient of the input")
    params_t = dict(module_t.named_parameters())
    params_md = dict(module_md.named_parameters())
    assert params_md.keys() == params_t.keys()
    for name, p in params_md.items():
        assert p.grad is not None, f"{name}: minidet computed no gradient"
        assert_close(p.grad, params_t[name].grad.numpy(), rtol, name=f"gradient of {name}")


def test_check_catches_a_wrong_gradient():
    """The harness itself can fail: a backward that drops the upstream gradient is caught."""

    class ForgetfulExp(md.autograd.Function):
        def forward(self, x):
            self.y = np.exp(x)
            return self.y

        def backward(self, gy):
            return self.y  # forgot "gy *"

    with pytest.raises(AssertionError, match="gradient of input 0"):
        check(lambda x: ForgetfulExp()(x), torch.exp, [randn(0, 3, 4)])


# --- every op of the table -----------------------------------------------------------------------------------------

def run_case(index, case, grad=None):
    """A case of the op table in float32 on both sides: its inputs, and its constants as each side's arrays."""
    inputs, constants = case.inputs(np.random.default_rng(index))
    constants = constants_as(constants, lambda a: a.astype(np.float32) if a.dtype.kind == "f" else a)
    on_torch = constants_as(constants, torch.from_numpy)
    check(lambda *ts: case.minidet(*ts, *constants), lambda *ts: case.torch(torch, *ts, *on_torch),
          [a.astype(np.float32) for a in inputs], rtol=case.rtol, grad=grad)


@pytest.mark.parametrize("index, case", list(enumerate(CASES)), ids=[case.id for case in CASES])
def test_op_against_torch(index, case):
    run_case(index, case)


def constant_subsets(count):
    """Which of ``count`` differentiable inputs keep their gradient: with two or more, the first alone and all but
    the first; with three or more also all but the second (a convolution's input and bias, its weights constant)."""
    subsets = {"first only": (0,), "all but the first": tuple(range(1, count))} if count > 1 else {}
    if count > 2:
        subsets["all but the second"] = (0, *range(2, count))
    return subsets


SOME_CONSTANT = [(index, case, label, grad) for index, case in enumerate(CASES)
                 for label, grad in constant_subsets(len(case.inputs(np.random.default_rng(index))[0])).items()]


@pytest.mark.parametrize("index, case, label, grad", SOME_CONSTANT,
                         ids=[f"{case.id}-{label}" for _, case, label, _ in SOME_CONSTANT])
def test_op_against_torch_with_some_inputs_constant(index, case, label, grad):
    # An op must give the gradients asked for and no others, whichever of its inputs are constants.
    run_case(index, case, grad=grad)


# --- arithmetic ----------------------------------------------------------------------------------------------------


def test_arithmetic_with_a_numpy_array_on_the_left():
    """``ndarray op Tensor`` must reach the Tensor's reflected operator, not NumPy's."""
    a, b = uniform(8, 0.5, 2.0, 3, 4), uniform(9, 0.5, 2.0, 4)
    b_t = torch.from_numpy(b)
    check(lambda x: (b + x) * (b - x) / (b / x) + b * x, lambda x: (b_t + x) * (b_t - x) / (b_t / x) + b_t * x, [a])


@pytest.mark.parametrize("name, fn", [
    ("x + 2.5", lambda x: x + 2.5), ("2.5 - x", lambda x: 2.5 - x), ("x * -3", lambda x: x * -3),
    ("1.5 / x", lambda x: 1.5 / x), ("x / 4", lambda x: x / 4), ("-x", lambda x: -x),
    ("(x * x - x) / (x + 3)", lambda x: (x * x - x) / (x + 3)),
])
def test_operators_with_python_scalars(name, fn):
    x = uniform(4, 0.5, 2.0, 3, 5)
    check(fn, fn, [x])


@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value")
def test_pow_zero_exponent_at_zero():
    x = np.array([0.0, 1.0, -2.0], np.float32)
    check(lambda t: F.pow(t, 0), lambda t: torch.pow(t, 0), [x])


@pytest.mark.parametrize("case", [
    "mul", "clamp", "pad", "focal", "pow float64", "pow int64", "smooth_l1 beta", "group_norm eps",
    "batch_norm train eps", "batch_norm eval eps",
])
def test_numpy_scalar_settings_keep_float32(case):
    """Settings given as NumPy scalars (say, read from a config through NumPy) act as the Python numbers would."""
    f64, i64 = np.float64, np.int64
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    ops = {  # case: (minidet op with NumPy scalars, the same torch op with Python numbers)
        "mul": (lambda x: x * f64(2.5), lambda x: x * 2.5),
        "clamp": (lambda x: F.clamp(x, f64(-0.5), f64(0.5)), lambda x: torch.clamp(x, -0.5, 0.5)),
        "pad": (lambda x: F.pad(x, (1, 1), f64(2.0)), lambda x: TF.pad(x, (1, 1), value=2.0)),
        "focal": (lambda x: F.sigmoid_focal_loss(x, np.ones_like(x.data), alpha=f64(0.25), gamma=f64(2.0)),
                  lambda x: torchvision_sigmoid_focal_loss(torch, x, torch.ones_like(x))),
        "pow float64": (lambda x: x ** f64(2.0), lambda x: x ** 2.0),
        "pow int64": (lambda x: x ** i64(3), lambda x: x ** 3),
        "smooth_l1 beta": (lambda x: F.smooth_l1_loss(x, np.zeros_like(x.data), beta=f64(0.11)),
                           lambda x: TF.smooth_l1_loss(x, torch.zeros_like(x), beta=0.11)),
        "group_norm eps": (lambda x: F.group_norm(x, 1, eps=f64(1e-5)), lambda x: TF.group_norm(x, 1, eps=1e-5)),
        "batch_norm train eps": (lambda x: F.batch_norm(x, None, None, training=True, eps=f64(1e-5)),
                                 lambda x: TF.batch_norm(x, None, None, training=True, eps=1e-5)),
        "batch_norm eval eps": (
            lambda x: F.batch_norm(x, mean, var, md.tensor(var), training=False, eps=f64(1e-5)),
            lambda x: TF.batch_norm(x, torch.tensor(mean), torch.tensor(var), torch.tensor(var), training=False,
                                    eps=1e-5)),
    }
    check(*ops[case], [randn(9, 4, 3, 2)], rtol=HEAVY)


def test_matmul_operator():
    check(lambda a, b: a @ b, lambda a, b: a @ b, [randn(12, 2, 3), randn(13, 3, 4)], rtol=HEAVY)


# --- reductions ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [None, 1, (0, 2)], ids=str)
def test_max_shares_the_gradient_among_ties(dim):
    x = np.random.default_rng(21).integers(0, 3, (3, 4, 2)).astype(np.float32)   # many equal maxima
    check(lambda t: F.max(t, dim=dim), lambda t: torch.amax(t, dim=amax_dims(dim)), [x])


def test_reduction_methods():
    x = randn(22, 3, 4)
    check(lambda t: t.sum(1) + t.mean(0, keepdim=True).reshape(4, 1)[:3, 0] + t.max(),
          lambda t: t.sum(1) + t.mean(0, keepdim=True).reshape(4, 1)[:3, 0] + t.amax(), [x])


# --- shape ops -----------------------------------------------------------------------------------------------------


def test_shape_methods():
    check(lambda t: t.reshape(6, 4).permute(1, 0).transpose(0, 1), lambda t: t.reshape(6, 4).permute(1, 0).t(),
          [randn(33, 2, 3, 4)])


# --- element-wise functions ----------------------------------------------------------------------------------------


def test_relu_including_exact_zeros():
    x = randn(62, 4, 5)
    x.reshape(-1)[::4] = 0.0   # the gradient at 0 is 0 on both sides
    check(F.relu, torch.relu, [x])
    check(lambda t: t.relu(), TF.relu, [x])


@pytest.mark.parametrize("name", ["sigmoid", "silu", "softplus", "logsigmoid"])
def test_sigmoid_family_including_logits_of_plus_minus_100(name):
    x = with_extremes(randn(63, 4, 5, scale=4.0), (100.0, -100.0, 30.0, -30.0, 0.0))
    torch_op = {"sigmoid": torch.sigmoid, "silu": TF.silu, "softplus": TF.softplus, "logsigmoid": TF.logsigmoid}[name]
    y_md, _ = check(getattr(F, name), torch_op, [x])
    assert np.all(np.isfinite(y_md.numpy()))


def test_sigmoid_family_at_the_extremes_elementwise():
    """Compared at +-100 alone, so that the larger values elsewhere do not hide an error there."""
    x = np.array([100.0, -100.0], np.float32)
    for md_op, torch_op in [(F.softplus, TF.softplus), (F.logsigmoid, TF.logsigmoid)]:
        xs_md, xs_t = md.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        y_md, y_t = md_op(xs_md), torch_op(xs_t)
        np.testing.assert_allclose(y_md.numpy(), y_t.detach().numpy(), rtol=1e-6, atol=1e-30)
        y_md.backward(np.ones(2, np.float32))
        y_t.backward(torch.ones(2))
        np.testing.assert_allclose(xs_md.grad, xs_t.grad.numpy(), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("low, high", [(-0.5, 0.5), (None, 0.25), (-0.25, None), (0, None)], ids=str)
def test_clamp_including_values_on_the_bounds(low, high):
    x = (np.random.default_rng(64).integers(-6, 7, (4, 5)) / 4).astype(np.float32)   # hits -0.5, -0.25, 0, ...
    check(lambda t: F.clamp(t, low, high), lambda t: torch.clamp(t, low, high), [x])


# --- convolution, pooling, upsampling ------------------------------------------------------------------------------


def test_conv2d_on_a_permuted_input_and_gradient():
    """Non-contiguous arrays both ways: the input is an NHWC array permuted to NCHW, the output is permuted back."""
    check(lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w, padding=1).permute(0, 2, 3, 1),
          lambda x, w: TF.conv2d(x.permute(0, 3, 1, 2), w, padding=1).permute(0, 2, 3, 1),
          [randn(79, 2, 7, 5, 4), randn(80, 3, 4, 3, 3)], rtol=HEAVY)


def test_max_pool2d_ties_go_to_the_first_maximum():
    x = np.random.default_rng(81).integers(0, 3, (2, 2, 7, 5)).astype(np.float32)   # windows full of ties
    check(lambda t: F.max_pool2d(t, 3, 2, 1), lambda t: TF.max_pool2d(t, 3, 2, 1), [x])
    check(lambda t: F.max_pool2d(t, 2), lambda t: TF.max_pool2d(t, 2), [x])


# --- normalisation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 3, 7, 5), (6, 3), (2, 3, 5)], ids=str)
def test_batch_norm_training_updates_running_stats_as_torch(shape, affine):
    c = shape[1]
    x = randn(100, *shape, scale=2.0) + 0.5
    stats = {side: (randn(101, c), uniform(102, 0.5, 2.0, c)) for side in ("md", "torch")}
    stats["torch"] = tuple(torch.from_numpy(a) for a in stats["torch"])
    inputs = [x, randn(103, c), randn(104, c)] if affine else [x]
    check(lambda *ts: F.batch_norm(ts[0], *stats["md"], *ts[1:], training=True, momentum=0.2, eps=1e-3),
          lambda *ts: TF.batch_norm(ts[0], *stats["torch"], *ts[1:], training=True, momentum=0.2, eps=1e-3),
          inputs, rtol=HEAVY)
    assert_close(stats["md"][0], stats["torch"][0].numpy(), HEAVY, name="running_mean")
    assert_close(stats["md"][1], stats["torch"][1].numpy(), HEAVY, name="running_var")


# --- losses --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("beta", [0.11, 1.0, 0.0])
def test_smooth_l1_loss_at_zero_differences(beta, reduction):
    # Where input equals target the slope is 0 on both sides, also for beta = 0 (plain L1, whose sign(0) is 0).
    x = randn(140, 5, 4)
    d = uniform(141, -3.0, 3.0, 5, 4) * (beta or 1.0)
    d.reshape(-1)[:3] = 0.0
    check(lambda x, t: F.smooth_l1_loss(x, t, reduction=reduction, beta=beta),
          lambda x, t: TF.smooth_l1_loss(x, t, reduction=reduction, beta=beta), [x, x - d])


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_binary_cross_entropy_with_logits_of_plus_minus_100(reduction, weighted):
    # Logits a confident detector produces, both wrong and right, among ordinary ones; targets differentiable too.
    x = with_extremes(randn(130, 6, 4, scale=3.0))
    t = uniform(131, 0.0, 1.0, 6, 4)
    t.reshape(-1)[:4] = [1.0, 0.0, 0.0, 1.0]   # +100 and -100 both wrong, then both right
    weight = uniform(132, 0.1, 2.0, 4) if weighted else None
    weight_t = None if weight is None else torch.from_numpy(weight)
    check(lambda x, t: F.binary_cross_entropy_with_logits(x, t, weight=weight, reduction=reduction),
          lambda x, t: TF.binary_cross_entropy_with_logits(x, t, weight=weight_t, reduction=reduction), [x, t])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 2.0), (0.25, 0.0), (-1, 0.0), (0.5, 1.0), (0.9, 1.5),
                                          (0.25, 5.0)], ids=str)
def test_sigmoid_focal_loss_with_logits_of_plus_minus_100(alpha, gamma, reduction):
    x = with_extremes(randn(150, 8, 3, scale=3.0), (100.0, -100.0, 100.0, -100.0))
    t = (np.random.default_rng(151).random((8, 3)) < 0.3).astype(np.float32)
    t.reshape(-1)[:4] = [0.0, 1.0, 1.0, 0.0]   # +100 and -100 confidently wrong, then confidently right
    y_md, _ = check(lambda x, t: F.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction),
                    lambda x, t: torchvision_sigmoid_focal_loss(torch, x, t, alpha=alpha, gamma=gamma,
                                                                reduction=reduction), [x, t], grad=[0])
    assert np.all(np.isfinite(y_md.numpy()))


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 0.0), (0.25, 1.5)], ids=str)
def test_losses_at_logits_of_plus_minus_100_elementwise(alpha, gamma):
    """Each element on its own (no reduction, tight tolerance): confidently wrong and confidently right."""
    x = np.array([100.0, -100.0, 100.0, -100.0, 30.0, -30.0], np.float32)
    t = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0], np.float32)
    ops = [(lambda x, t: F.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma),
            lambda x, t: torchvision_sigmoid_focal_loss(torch, x, t, alpha=alpha, gamma=gamma)),
           (lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction="none"),
            lambda x, t: TF.binary_cross_entropy_with_logits(x, t, reduction="none"))]
    for md_op, torch_op in ops:
        x_md, x_t = md.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        y_md, y_t = md_op(x_md, t), torch_op(x_t, torch.from_numpy(t))
        np.testing.assert_allclose(y_md.numpy(), y_t.detach().numpy(), rtol=1e-6, atol=1e-30)
        y_md.backward(np.ones(6, np.float32))
        y_t.backward(torch.ones(6))
        np.testing.assert_allclose(x_md.grad, x_t.grad.numpy(), rtol=1e-6, atol=1e-30)


def test_a_small_detector_graph_end_to_end():
    """Backbone conv, batch norm, pooling, a lateral connection with upsampling, group norm, a head and the
    two RetinaNet losses, in one graph: every parameter's gradient against torch's."""

    def forward(lib, x, w1, g1, b1, w2, w3, gn_w, gn_b, w_cls, b_cls, w_box, t_cls, t_box):
        Fn = F if lib is md else TF
        focal = F.sigmoid_focal_loss if lib is md else functools.partial(torchvision_sigmoid_focal_loss, torch)
        cat = F.cat if lib is md else torch.cat
        stats = (np.zeros(4, np.float32), np.ones(4, np.float32))
        if lib is torch:
            stats = tuple(torch.from_numpy(a) for a in stats)
        c1 = Fn.relu(Fn.batch_norm(Fn.conv2d(x, w1, stride=2, padding=1), *stats, g1, b1, training=True))  # (2,4,8,6)
        c2 = Fn.max_pool2d(c1, 3, 2, 1)                                                                     # (2,4,4,3)
        p2 = Fn.conv2d(c2, w2)                                                                              # (2,6,4,3)
        p1 = Fn.conv2d(c1, w3, padding=1) + Fn.interpolate(p2, scale_factor=2, mode="nearest")              # (2,6,8,6)
        feats = [Fn.relu(Fn.group_norm(p, 2, gn_w, gn_b)) for p in (p1, p2)]
        cls = cat([Fn.conv2d(f, w_cls, b_cls, padding=1).permute(0, 2, 3, 1).reshape(2, -1, 3) for f in feats], 1)
        box = cat([Fn.conv2d(f, w_box, padding=1).permute(0, 2, 3, 1).reshape(2, -1, 4) for f in feats], 1)
        positive = t_cls.max(-1) if lib is md else t_cls.amax(-1)  # (2, 60) anchors
        box_loss = (Fn.smooth_l1_loss(box, t_box, reduction="none", beta=1 / 9).sum(-1) * positive).sum()
        return focal(cls, t_cls, reduction="sum") / 10 + box_loss / 10

    rng = np.random.default_rng(300)
    shapes = [(2, 3, 15, 11), (4, 3, 3, 3), (4,), (4,), (6, 4, 1, 1), (6, 4, 3, 3), (6,), (6,), (3, 6, 3, 3), (3,),
              (4, 6, 3, 3)]
    inputs = [(rng.standard_normal(s) * 0.5).astype(np.float32) for s in shapes]
    t_cls = (rng.random((2, 60, 3)) < 0.1).astype(np.float32)
    t_box = rng.standard_normal((2, 60, 4)).astype(np.float32)
    n = len(inputs)
    check(lambda *ts: forward(md, *ts), lambda *ts: forward(torch, *ts), inputs + [t_cls, t_box], rtol=HEAVY,
          grad=range(n))


# --- nn layers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1, groups=1, bias=True),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2, bias=True),
    dict(in_channels=4, out_channels=8, kernel_size=1, stride=1, padding=0, groups=1, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=0, groups=4, bias=True),
], ids=lambda s: f"k{s['kernel_size']}s{s['stride']}p{s['padding']}g{s['groups']}{'b' if s['bias'] else ''}")
def test_conv2d_layer(settings):
    torch.manual_seed(0)
    conv_t = torch.nn.Conv2d(**settings)
    conv_md = nn.Conv2d(**settings)
    conv_md.load_state_dict(torch_state(conv_t))
    check_module(conv_md, conv_t, randn(160, 2, 4, 9, 7), HEAVY)


def test_batch_norm_layer_train_then_eval():
    bn_t = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.1)
    randomize_(bn_t, 170)
    bn_md = nn.BatchNorm2d(3, eps=1e-5, momentum=0.1)
    bn_md.load_state_dict(torch_state(bn_t))
    for step in range(3):   # training: batch statistics, running statistics move towards them
        bn_t.zero_grad()
        bn_md.zero_grad()
        check_module(bn_md, bn_t, randn(171 + step, 4, 3, 5, 6, scale=1.0 + step) + step, HEAVY)
        for name in ("running_mean", "running_var"):
            assert_close(getattr(bn_md, name), getattr(bn_t, name).numpy(), HEAVY, name=f"{name} after step {step}")
    bn_t.eval()
    bn_md.eval()
    bn_t.zero_grad()
    bn_md.zero_grad()
    before = {k: v.copy() for k, v in bn_md.state_dict().items()}
    check_module(bn_md, bn_t, randn(180, 2, 3, 5, 6), HEAVY)
    for name in ("running_mean", "running_var"):   # evaluation leaves the statistics alone
        np.testing.assert_array_equal(getattr(bn_md, name), before[name])


def torchvision_frozen_batch_norm(weight, bias, running_mean, running_var, eps):
    """``torchvision.ops.FrozenBatchNorm2d.forward``, written out."""
    w, b = weight.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)
    rv, rm = running_var.reshape(1, -1, 1, 1), running_mean.reshape(1, -1, 1, 1)
    scale = w * (rv + eps).rsqrt()
    shift = b - rm * scale
    return lambda x: x * scale + shift


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_frozen_batch_norm_layer(eps):
    rng = np.random.default_rng(190)
    state = {"weight": rng.standard_normal(5), "bias": rng.standard_normal(5),
             "running_mean": rng.standard_normal(5), "running_var": rng.uniform(0.5, 2.0, 5)}
    state = {k: v.astype(np.float32) for k, v in state.items()}
    frozen_md = nn.FrozenBatchNorm2d(5, eps=eps)
    frozen_md.load_state_dict(state)
    assert frozen_md.parameters() == []
    frozen_t = torchvision_frozen_batch_norm(*(torch.from_numpy(state[k]) for k in state), eps)
    check(frozen_md, frozen_t, [randn(191, 2, 5, 4, 3)], rtol=HEAVY)


@pytest.mark.parametrize("num_groups", [1, 3, 6])
def test_group_norm_layer(num_groups):
    gn_t = torch.nn.GroupNorm(num_groups, 6, eps=1e-5)
    randomize_(gn_t, 200)
    gn_md = nn.GroupNorm(num_groups, 6, eps=1e-5)
    gn_md.load_state_dict(torch_state(gn_t))
    check_module(gn_md, gn_t, randn(201, 2, 6, 5, 4, scale=2.0), HEAVY)


# --- optimizers and schedules --------------------------------------------------------------------------------------

PARAM_SHAPES = [(3, 4), (5,)]


def run_optimizers(make_md, make_torch, steps=6):
    """The same parameters and gradients through a minidet and a torch optimizer; compare after every step.

    At step 3 the second parameter gets no gradient: both optimizers must leave it (and its state) alone.
    """
    rng = np.random.default_rng(210)
    initial = [rng.standard_normal(s).astype(np.float32) for s in PARAM_SHAPES]
    params_md = [nn.Parameter(a.copy()) for a in initial]
    params_t = [torch.nn.Parameter(torch.tensor(a)) for a in initial]
    opt_md, opt_t = make_md(params_md), make_torch(params_t)
    for step in range(steps):
        opt_md.zero_grad()
        opt_t.zero_grad()
        for i, (p_md, p_t) in enumerate(zip(params_md, params_t)):
            if step == 3 and i == 1:
                continue
            g = rng.standard_normal(p_md.shape).astype(np.float32)
            p_md.grad, p_t.grad = g.copy(), torch.tensor(g)
        opt_md.step()
        opt_t.step()
        for i, (p_md, p_t) in enumerate(zip(params_md, params_t)):
            assert p_md.dtype == np.float32
            assert_close(p_md.data, p_t.detach().numpy(), ELEMENTWISE, name=f"parameter {i} after step {step}")
            # the comparison above is relative to the parameters' size; check the updates themselves too
            assert_close(p_md.data - initial[i], p_t.detach().numpy() - initial[i], 1e-4,
                         name=f"update of parameter {i} after step {step}")


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 1e-4), (0.0, 0.0), (0.9, 0.0), (0.0, 1e-2)], ids=str)
def test_sgd(momentum, weight_decay):
    run_optimizers(lambda ps: optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=weight_decay),
                   lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=weight_decay))


@pytest.mark.parametrize("settings", [dict(lr=1e-2), dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)],
                         ids=["defaults", "custom"])
def test_adam(settings):
    run_optimizers(lambda ps: optim.Adam(ps, **settings), lambda ps: torch.optim.Adam(ps, **settings))


SCHEDULES = {
    "StepLR": (lambda o: optim.StepLR(o, step_size=7, gamma=0.5),
               lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)),
    "MultiStepLR": (lambda o: optim.MultiStepLR(o, milestones=[12, 5, 20], gamma=0.1),
                    lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[12, 5, 20], gamma=0.1)),
    "MultiStepLR repeated milestone": (
        lambda o: optim.MultiStepLR(o, milestones=[5, 5, 20], gamma=0.5),
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 5, 20], gamma=0.5)),
    "CosineAnnealingLR": (lambda o: optim.CosineAnnealingLR(o, T_max=30, warmup_iters=0),
                          lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30)),
    "CosineAnnealingLR eta_min": (
        lambda o: optim.CosineAnnealingLR(o, T_max=30, eta_min=1e-3, warmup_iters=0),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=1e-3)),
}


def learning_rates(make_md, make_torch, steps=30, base_lr=0.1):
    """The learning rate at construction and after each of ``steps`` calls to ``step()``, on both sides."""
    opt_md = optim.SGD([nn.Parameter(np.zeros(2, np.float32))], lr=base_lr, momentum=0.9)
    opt_t = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=base_lr, momentum=0.9)
    sched_md, sched_t = make_md(opt_md), make_torch(opt_t)
    lrs_md, lrs_t = [opt_md.param_groups[0]["lr"]], [opt_t.param_groups[0]["lr"]]
    for _ in range(steps):
        opt_md.step()
        opt_t.step()
        sched_md.step()
        sched_t.step()
        lrs_md.append(opt_md.param_groups[0]["lr"])
        lrs_t.append(opt_t.param_groups[0]["lr"])
        assert sched_md.get_last_lr() == [lrs_md[-1]]
    return np.array(lrs_md), np.array(lrs_t)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_schedule(name):
    lrs_md, lrs_t = learning_rates(*SCHEDULES[name])
    assert lrs_md[0] == 0.1
    assert_close(lrs_md, lrs_t, 1e-9, name=f"{name} learning rates")
    # relative to the largest rate, the small ones late in a schedule could hide; compare them one by one too
    np.testing.assert_allclose(lrs_md, lrs_t, rtol=1e-9, atol=1e-15)


WARMUP_SCHEDULES = {
    "StepLR": (lambda o, **w: optim.StepLR(o, step_size=7, gamma=0.5, **w),
               lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)),
    "MultiStepLR": (lambda o, **w: optim.MultiStepLR(o, milestones=[3, 12], gamma=0.1, **w),
                    lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[3, 12], gamma=0.1)),
    "CosineAnnealingLR": (lambda o, **w: optim.CosineAnnealingLR(o, T_max=30, **w),
                          lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30)),
}


@pytest.mark.parametrize("name", list(WARMUP_SCHEDULES))
def test_lr_schedule_warmup_matches_torch_linear_lr(name):
    """minidet's linear warm-up is torch's LinearLR(start_factor=warmup_factor) chained with the schedule."""
    make_md, make_torch = WARMUP_SCHEDULES[name]
    lrs_md, lrs_t = learning_rates(
        lambda o: make_md(o, warmup_iters=6, warmup_factor=0.01),
        lambda o: torch.optim.lr_scheduler.ChainedScheduler(
            [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=6), make_torch(o)]))
    assert lrs_md[0] == pytest.approx(0.001)
    np.testing.assert_allclose(lrs_md, lrs_t, rtol=1e-9, atol=1e-15)


def test_cosine_annealing_past_t_max():
    lrs_md, lrs_t = learning_rates(lambda o: optim.CosineAnnealingLR(o, T_max=10, warmup_iters=0),
                                   lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10))
    assert_close(lrs_md[:11], lrs_t[:11], 1e-9)   # agree up to T_max
    assert_close(lrs_md, lrs_t, 1e-9)
