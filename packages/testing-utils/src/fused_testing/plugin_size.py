"""The size of a plugin as the measure of the plugin API: a plugin's own modules (its optimizer
classes, hyperparameter model and hooks, not its kernels) count only their code lines, and may use
no private name of fused-core.

    assert code_lines(fused_adam.optimizer, fused_adam.hyperparams, fused_adam.plugin) <= 150
    assert private_core_names(fused_adam.optimizer, ...) == []
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from types import ModuleType


def code_lines(*modules: ModuleType) -> int:
    """Lines holding code in ``modules``: not blank, not only a comment, not part of a docstring."""
    total = 0
    for module in modules:
        source = inspect.getsource(module)
        docstrings: set[int] = set()
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                value = body[0].value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    docstrings.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
        code: set[int] = set()
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                continue
            if token.type == tokenize.ENDMARKER:
                continue
            code.update(line for line in range(token.start[0], token.end[0] + 1) if line not in docstrings)
        total += len(code)
    return total


def private_core_names(*modules: ModuleType, core: str = "fused_core") -> list[str]:
    """Private names of ``core`` that ``modules`` use: ``from fused_core.x import _y``, a private
    module of it, and attributes starting with one underscore (not dunders) read on fused-core
    objects or on ``self``/``cls`` (a base class's private state, such as ``self._layout``)."""
    found = []
    for module in modules:
        tree = ast.parse(inspect.getsource(module))
        roots = {"self", "cls"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(core):
                roots.update(alias.asname or alias.name for alias in node.names)
                found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
                found += [node.module] if any(part.startswith("_") for part in node.module.split(".")) else []
            elif isinstance(node, ast.Import):
                roots.update(
                    (alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name.startswith(core)
                )
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in roots:
                    found.append(f"{module.__name__}: {base.id}...{node.attr}")
    return found
