"""The op table (tests/op_table.py) is complete: every public op of ``minidet.functional`` has its cases, and every
``Function`` of ``minidet.functional`` runs in one of them, so that a new op cannot go without its gradcheck and
its comparison with torch."""

import inspect

import numpy as np
import pytest
from op_table import CASES, EXEMPT, constants_as

import minidet.functional as F
from minidet import functional
from minidet.autograd import Function, Tensor


def functions_of_the_functional_package():
    """Every ``Function`` subclass defined in a module of ``minidet.functional``."""
    found, todo = set(), [Function]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith(functional.__name__ + "."):
                found.add(sub)
    return found


def test_every_public_op_has_cases_or_a_reason():
    tabled = {case.op for case in CASES}
    missing = set(F.__all__) - tabled - set(EXEMPT)
    assert not missing, f"ops of minidet.functional without cases: {sorted(missing)}; add them to tests/op_table.py"
    unknown = tabled - set(F.__all__)
    assert not unknown, f"cases of ops that minidet.functional does not export: {sorted(unknown)}"
    assert not set(EXEMPT) & tabled, f"exempt but tabled: {sorted(set(EXEMPT) & tabled)}"


def test_every_function_of_the_package_runs_in_some_case(monkeypatch):
    ran = set()
    call = Function.__call__

    def recording(self, *args, **kwargs):
        ran.add(type(self))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Function, "__call__", recording)
    for index, case in enumerate(CASES):
        inputs, constants = case.inputs(np.random.default_rng(index))
        case.minidet(*[Tensor(a, requires_grad=True) for a in inputs], *constants_as(constants, np.asarray))
    never = {f"{cls.__module__}.{cls.__name__}" for cls in functions_of_the_functional_package() - ran}
    assert not never, f"Functions no case of tests/op_table.py runs: {sorted(never)}"


def test_the_completeness_check_sees_a_new_op(monkeypatch):
    # The check above can fail: an op added to minidet.functional without cases is reported.
    monkeypatch.setattr(F, "__all__", [*F.__all__, "new_op"])
    with pytest.raises(AssertionError, match="new_op"):
        test_every_public_op_has_cases_or_a_reason()


def test_each_case_is_named_once():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert all(inspect.isfunction(case.inputs) for case in CASES)
