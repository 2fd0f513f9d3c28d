"""minidet's calls of CuPy functions against CuPy's own API: every function exists, every keyword is one it takes.

minidet calls NumPy and CuPy through one name, ``xp`` (or ``get_array_module(x)``), and NumPy's functions take
keywords that CuPy's versions do not (``as_strided(..., writeable=False)`` raised TypeError on every convolution on
a GPU before this test existed). The CuPy stand-in of the CPU tests is NumPy underneath, so it cannot see that.
This test reads minidet's source: for each call ``xp.name(...)`` or ``get_array_module(...).name(...)``, the
function must exist in CuPy and take every keyword given (where Python can read its signature: CuPy's ufuncs do
not show one, and take ``out``). It needs CuPy installed, not a GPU: importing CuPy touches no device.
"""

import ast
import importlib.util
import inspect
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs CuPy installed (no GPU)")


def array_module_calls(source):
    """(line, dotted name, keywords) of each call of ``xp.<name>`` or ``get_array_module(...).<name>``."""
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        names, base = [], node.func
        while isinstance(base, ast.Attribute):
            names.append(base.attr)
            base = base.value
        is_xp = isinstance(base, ast.Name) and base.id == "xp"
        is_lookup = isinstance(base, ast.Call) and getattr(base.func, "id", None) == "get_array_module"
        if is_xp or is_lookup:
            yield node.lineno, ".".join(reversed(names)), [k.arg for k in node.keywords if k.arg is not None]


def unknown_keywords(function, keywords):
    """The keywords ``function`` does not take; none where its signature cannot be read or takes ``**kwargs``."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return [k for k in keywords if k not in parameters]


def cupy_api_problems(paths, root=ROOT):
    """Each call's problem as "path:line: ...", and how many calls were checked."""
    import cupy

    problems, calls = [], 0
    for path in paths:
        for line, name, keywords in array_module_calls(path.read_text(encoding="utf-8")):
            calls += 1
            function = cupy
            for part in name.split("."):
                function = getattr(function, part, None)
            where = f"{path.relative_to(root)}:{line}"
            if function is None:
                problems.append(f"{where}: CuPy has no {name}")
            else:
                problems += [f"{where}: cupy.{name} takes no keyword {keyword!r}"
                             for keyword in unknown_keywords(function, keywords)]
    return problems, calls


def test_every_array_module_call_in_minidet_is_in_cupys_api():
    problems, calls = cupy_api_problems(sorted((ROOT / "minidet").rglob("*.py")))
    assert calls > 100, "the calls were found"
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_keyword_cupy_does_not_take(tmp_path):
    """NumPy's as_strided takes writeable; CuPy's does not. And a function CuPy lacks."""
    (tmp_path / "conv.py").write_text(
        "def f(x):\n"
        "    xp = get_array_module(x)\n"
        "    xp.lib.stride_tricks.as_strided(x, shape=(1,), strides=(4,), writeable=False)\n"
        "    return get_array_module(x).no_such_function(x, axis=0)\n")
    problems, calls = cupy_api_problems([tmp_path / "conv.py"], root=tmp_path)
    assert calls == 2
    assert problems == ["conv.py:3: cupy.lib.stride_tricks.as_strided takes no keyword 'writeable'",
                        "conv.py:4: CuPy has no no_such_function"]
