"""``Module`` and ``Parameter``: the bookkeeping that turns ops into layers.

A module owns parameters (tensors the optimizer updates), buffers (arrays it
keeps but does not train, such as batch norm's running statistics) and
sub-modules, all registered by plain attribute assignment, in order.
"""

from collections import OrderedDict

import numpy as np

from minidet import backend
from minidet.autograd import Tensor


class Parameter(Tensor):
    """A tensor that a module trains: it always requires gradients."""

    def __init__(self, data):
        super().__init__(data, requires_grad=True)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Module:
    """Base class of layers and models: subclasses set attributes in ``__init__`` and define ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if isinstance(value, Parameter):
            registry = self._parameters
        elif isinstance(value, Module):
            registry = self._modules
        elif name in self._buffers:  # assigning a new array to a buffer keeps it a buffer
            registry = self._buffers
        else:
            registry = None
        for other in (self._parameters, self._buffers, self._modules):
            if other is not registry:
                other.pop(name, None)
        if registry is not None:
            registry[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        """Keep ``array`` (raw, not trained) as ``self.<name>``; ``to()`` moves it, ``state_dict()`` saves it."""
        self._buffers[name] = array
        setattr(self, name, array)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- walking the tree ---------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self):
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                yield prefix + name, p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                yield prefix + name, b

    def children(self):
        return list(self._modules.values())

    def modules(self):
        return [m for _, m in self.named_modules()]

    # --- modes and devices --------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device_or_dtype):
        """Move every parameter and buffer, in place; returns self.

        ``"cpu"`` or ``"cuda"`` moves them to that device. A NumPy floating dtype (``np.float64``) converts the
        floating-point ones to it, as torch's ``module.double()`` does: ``model.to(np.float64)`` is how a whole
        model is gradient-checked. Integer buffers keep their dtype.
        """
        if isinstance(device_or_dtype, str):
            convert = lambda array: backend.to_device(array, device_or_dtype)
        else:
            dtype = np.dtype(device_or_dtype)
            if dtype.kind != "f":
                raise TypeError(f"Module.to: expected 'cpu', 'cuda' or a floating dtype such as numpy.float64, "
                                f"got {device_or_dtype!r}")
            convert = lambda array: array.astype(dtype, copy=False) if array.dtype.kind == "f" else array
        for module in self.modules():
            for p in module._parameters.values():
                p.data = convert(p.data)
                p.grad = None if p.grad is None else convert(p.grad)
            for name, b in list(module._buffers.items()):
                setattr(module, name, convert(b))
        return self

    # --- saving and loading -------------------------------------------------
    def state_dict(self):
        """Every parameter and buffer by dotted name, as NumPy arrays (copies)."""
        state = {name: p.numpy().copy() for name, p in self.named_parameters()}
        state.update((name, backend.to_numpy(b).copy()) for name, b in self.named_buffers())
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from ``state_dict`` (name -> array) into this module's parameters and buffers.

        Every problem is reported at once, in one ValueError: missing keys, unexpected keys and
        shape mismatches (the first five of each, and how many). With ``strict=False``, missing and unexpected keys
        are allowed (shape mismatches never are). Returns ``(missing, unexpected)``.
        """
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, model {tuple(np.shape(own[k]))}"
                      for k in own if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(np.shape(own[k]))]
        def listed(items, separator=", ", shown=5):
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            return f"({len(items)}) " + separator.join(items[:shown]) + more

        problems = []
        if mismatched:
            problems.append("shape mismatch for " + listed(mismatched, "; "))
        if strict and missing:
            problems.append("missing keys " + listed(missing))
        if strict and unexpected:
            problems.append("unexpected keys " + listed(unexpected))
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__}: " + ". ".join(problems)
                             + ". Were these weights saved from a model built with other settings?")
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if prefix + name in state_dict:
                    xp = backend.get_array_module(p.data)
                    p.data = xp.asarray(state_dict[prefix + name], dtype=p.dtype).copy()
            for name, b in list(module._buffers.items()):
                if prefix + name in state_dict:
                    xp = backend.get_array_module(b)
                    setattr(module, name, xp.asarray(state_dict[prefix + name], dtype=b.dtype).copy())
        return missing, unexpected

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def extra_repr(self):
        return ""
