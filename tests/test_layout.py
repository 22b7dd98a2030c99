"""The package's structural rules, checked on its source (README, Layout)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwen_gptq"
MAX_PARAMETERS = 6  # more than this: a dataclass carries them
STATE_MODULE = "fastpath.py"  # the one module allowed module-level mutable state


def _modules():
    return sorted(PACKAGE.glob("*.py"))


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    """A @triton.jit function: its parameters are a kernel's launch signature."""
    return any(isinstance(d, ast.Attribute) and d.attr == "jit" for d in fn.decorator_list)


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_no_function_takes_more_than_six_parameters(path):
    tree = ast.parse(path.read_text())
    for fn in _functions(tree):
        if _is_triton_kernel(fn):
            continue
        a = fn.args
        params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
        assert len(params) <= MAX_PARAMETERS, f"{path.name}:{fn.lineno} {fn.name} takes {len(params)} parameters"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_public_functions_are_typed(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        fns = [node] if isinstance(node, ast.FunctionDef) else [
            n for n in node.body if isinstance(n, ast.FunctionDef)] if isinstance(node, ast.ClassDef) else []
        for fn in fns:
            if fn.name.startswith("_") or _is_triton_kernel(fn):
                continue
            a = fn.args
            untyped = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs
                       if p.annotation is None and p.arg not in ("self", "cls")]
            assert not untyped, f"{path.name}:{fn.lineno} {fn.name}: untyped {untyped}"
            assert fn.returns is not None or fn.name == "__init__", f"{path.name}:{fn.lineno} {fn.name}: no return type"


@pytest.mark.parametrize("path", [p for p in _modules() if p.name != STATE_MODULE], ids=lambda p: p.name)
def test_no_module_level_mutable_state_outside_the_fast_path(path):
    tree = ast.parse(path.read_text())
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    for node in tree.body:
        is_mutable = isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, mutable)
        assert not is_mutable, f"{path.name}:{node.lineno}: module-level mutable value"
        assert not any(isinstance(n, ast.Global) for n in ast.walk(node)), f"{path.name}:{node.lineno}: `global`"
