"""The type stubs shipped for the native module describe all of it."""

from __future__ import annotations

import ast
from pathlib import Path

import ferrolm
import ferrolm._core as core


def test_every_native_name_has_a_stub():
    stub = Path(ferrolm.__file__).parent / "_core.pyi"
    assert stub.is_file() and (Path(ferrolm.__file__).parent / "py.typed").is_file()
    tree = ast.parse(stub.read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    public = {n for n in dir(core) if not n.startswith("_")} | {"__version__"}
    assert public - names == set()
    assert names - public == set()
