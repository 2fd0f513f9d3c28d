"""Optimizers (SGD, Adam) and learning-rate schedules with linear warm-up.

Updates follow PyTorch's formulas exactly, so the same settings train the same way.
"""

import math

import numpy as np

from minidet.backend import get_array_module, to_numpy


class Optimizer:
    def __init__(self, params, defaults):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got no parameters to optimize")
        self.param_groups = [dict(defaults, params=params)]
        self.state = {}  # per-parameter state, keyed by id: a dict such as {"momentum_buffer": array}

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _parameters(self):
        """Every parameter, numbered in the order the optimizer was given them (the numbering state_dict uses)."""
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self):
        """What ``step`` depends on besides the parameters' values: a flat dict of name -> NumPy array.

        - ``"group.<g>.<setting>"``: each group's settings (lr, momentum, weight_decay, betas, ...);
        - ``"state.<i>.<name>"``: the state of parameter i, numbered in the order the parameters were given
          (the momentum buffer for SGD; step and the two moments for Adam). Parameters without state yet
          (never stepped) have no entry.

        Flat and made of arrays, so it goes into a checkpoint as it is. Keyed by position, not by ``id``, so it
        loads into a new optimizer over a new model's parameters (built the same way).
        """
        state = {}
        for g, group in enumerate(self.param_groups):
            for setting, value in group.items():
                if setting != "params":
                    state[f"group.{g}.{setting}"] = np.asarray(value)
        for i, p in enumerate(self._parameters()):
            for name, value in self.state.get(id(p), {}).items():
                state[f"state.{i}.{name}"] = to_numpy(value).copy()
        return state

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict`` returned, onto the devices of this optimizer's parameters."""
        params = self._parameters()
        expected = {f"group.{g}.{setting}" for g, group in enumerate(self.param_groups) for setting in group
                    if setting != "params"}
        missing = sorted(expected - set(state_dict))
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {missing}; is this the state of "
                           f"a {type(self).__name__}?")
        for g, group in enumerate(self.param_groups):
            for setting in group:
                if setting != "params":
                    value = np.asarray(state_dict[f"group.{g}.{setting}"]).tolist()   # back to Python numbers
                    group[setting] = tuple(value) if isinstance(value, list) else value
        self.state = {}
        for key, value in state_dict.items():
            if not key.startswith("state."):
                continue
            _, index, name = key.split(".", 2)
            index = int(index)
            if index >= len(params):
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for parameter {index}, but this "
                               f"optimizer has {len(params)} parameters")
            p = params[index]
            value = np.asarray(value)
            if value.ndim == 0:                      # a counter such as Adam's step
                value = value.item()
            else:
                if value.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {key} has shape {value.shape}, "
                                     f"parameter {index} has shape {tuple(p.shape)}")
                value = get_array_module(p.data).asarray(value, dtype=p.dtype).copy()
            self.state.setdefault(id(p), {})[name] = value

    def _gradients(self):
        """(group, parameter, gradient with weight decay) for every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * p.data  # L2 penalty (wd / 2) |p|^2 adds wd * p to the gradient
                yield group, p, g


class SGD(Optimizer):
    """Stochastic gradient descent with momentum: v = momentum * v + g; p -= lr * v."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self):
        for group, p, g in self._gradients():
            if group["momentum"]:
                state = self.state.setdefault(id(p), {})
                velocity = state.get("momentum_buffer")
                velocity = g.copy() if velocity is None else group["momentum"] * velocity + g
                state["momentum_buffer"] = velocity
                g = velocity
            p.data -= group["lr"] * g


class Adam(Optimizer):
    """Adam: per-parameter steps from running averages of the gradient and its square, bias-corrected."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def step(self):
        for group, p, g in self._gradients():
            xp = get_array_module(g)
            beta1, beta2 = group["betas"]
            state = self.state.setdefault(id(p), {"step": 0, "m": xp.zeros_like(g), "v": xp.zeros_like(g)})
            state["step"] += 1
            state["m"] = beta1 * state["m"] + (1 - beta1) * g
            state["v"] = beta2 * state["v"] + (1 - beta2) * g * g
            m_hat = state["m"] / (1 - beta1 ** state["step"])
            v_hat = state["v"] / (1 - beta2 ** state["step"])
            p.data -= group["lr"] * m_hat / (xp.sqrt(v_hat) + group["eps"])


class LRScheduler:
    """Sets ``lr = base_lr * warmup(step) * factor(step)``; call ``step()`` once per iteration (or epoch).

    Warm-up (as in the RetinaNet paper's training recipe) multiplies the rate by
    a factor that rises linearly from ``warmup_factor`` to 1 over ``warmup_iters``
    steps, so the large early gradients of a fresh detector do not blow it up.
    """

    def __init__(self, optimizer, warmup_iters=0, warmup_factor=1 / 3):
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor
        self.last_step = 0
        self._apply()

    def factor(self, step):
        raise NotImplementedError

    def _apply(self):
        step = self.last_step
        warmup = 1.0
        if step < self.warmup_iters:
            warmup = self.warmup_factor + (1 - self.warmup_factor) * step / self.warmup_iters
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * warmup * self.factor(step)

    def step(self):
        self.last_step += 1
        self._apply()

    def state_dict(self):
        """The step count and the base rates, as NumPy arrays: with them, ``load_state_dict`` puts a new
        scheduler (built with the same settings) at the same point of the schedule."""
        return {"last_step": np.asarray(self.last_step), "base_lrs": np.asarray(self.base_lrs, dtype=np.float64)}

    def load_state_dict(self, state_dict):
        """Restore ``state_dict()`` and set the optimizer's rates for that step."""
        self.last_step = int(state_dict["last_step"])
        self.base_lrs = [float(lr) for lr in state_dict["base_lrs"]]
        self._apply()

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]


class StepLR(LRScheduler):
    """Multiply the rate by ``gamma`` every ``step_size`` steps."""

    def __init__(self, optimizer, step_size, gamma=0.1, **warmup):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, **warmup)

    def factor(self, step):
        return self.gamma ** (step // self.step_size)


class MultiStepLR(LRScheduler):
    """Multiply the rate by ``gamma`` at each of the ``milestones`` (the paper: x0.1 at 60k and 80k of 90k)."""

    def __init__(self, optimizer, milestones, gamma=0.1, **warmup):
        self.milestones, self.gamma = sorted(milestones), gamma
        super().__init__(optimizer, **warmup)

    def factor(self, step):
        return self.gamma ** sum(step >= m for m in self.milestones)


class CosineAnnealingLR(LRScheduler):
    """Lower the rate along half a cosine, from its base value to ``eta_min`` at step ``T_max``.

    Past ``T_max`` the cosine goes on, so the rate rises again (PyTorch does the same): set ``T_max`` to the
    length of training.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0, **warmup):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, **warmup)

    def factor(self, step):
        # Expressed as a factor of each group's base rate: eta_min is an absolute rate.
        base = self.base_lrs[0]
        cosine = (1 + math.cos(math.pi * step / self.T_max)) / 2   # past T_max it rises again, as in PyTorch
        return (self.eta_min + (base - self.eta_min) * cosine) / base
