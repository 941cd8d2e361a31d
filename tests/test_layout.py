"""The package's layering: no import circle, lazy torch, one registry, the CLI's entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ferrolm

PKG = Path(ferrolm.__file__).parent


def _modules():
    """{dotted module name: path} of every Python module of the installed package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules, top_level_only: bool):
    """The ferrolm modules ``name`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def _cycle(graph):
    """One import cycle of ``graph`` as a list of names, or None."""
    state = {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m, stack)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [])
            if found:
                return found
    return None


def _graph(top_level_only: bool):
    modules = _modules()
    graph = {n: set() for n in modules}
    for n, p in modules.items():
        for m in _imports(n, p, modules, top_level_only):
            # Importing a package's submodule imports the package first, not the other way round.
            if not n.startswith(m + "."):
                graph[n].add(m)
    return graph


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "function-level-too"])
def test_no_import_cycle(top_level_only):
    assert _cycle(_graph(top_level_only)) is None


def test_models_imports_nothing_that_imports_it_back():
    graph = _graph(top_level_only=True)
    reach, todo = set(), ["ferrolm.models"]
    while todo:
        for m in graph[todo.pop()]:
            if m not in reach:
                reach.add(m)
                todo.append(m)
    back = [m for m in reach if "ferrolm.models" in graph[m] or any(d.startswith("ferrolm.models.") for d in graph[m])]
    assert sorted(m for m in back if not m.startswith("ferrolm.models")) == []


def test_import_ferrolm_does_not_import_torch_and_subpackages_load_on_use():
    code = (
        "import sys, ferrolm\n"
        "assert 'torch' not in sys.modules, 'import ferrolm imported torch'\n"
        "tok = ferrolm.Tokenizer.train(['abc abd'] * 20, vocab_size=258)\n"
        "assert tok.decode(tok.encode('abd')) == 'abd'\n"
        "assert 'torch' not in sys.modules\n"
        "import ferrolm\n"
        "assert ferrolm.models.GPT.__module__ == 'ferrolm.models.gpt'\n"
        "assert ferrolm.nn.LSTM.__module__ == 'ferrolm.nn.rnn'\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_architecture_table_resolves_every_entry():
    torch = pytest.importorskip("torch")  # noqa: F841
    from ferrolm.models import registry

    for name, arch in registry.ARCHITECTURES.items():
        cfg_cls, model_cls = registry.config_class(name), registry.model_class(name)
        assert (cfg_cls.__name__, model_cls.__name__) == (arch.config, arch.model)
        assert cfg_cls.__dataclass_fields__["architecture"].default == name
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        registry.model_class("nope")


def test_every_decoding_model_implements_the_protocol():
    pytest.importorskip("torch")
    from ferrolm.decoding import is_decoder
    from ferrolm.finetune import PromptTuning
    from ferrolm.models import (
        GPT,
        GPTConfig,
        LSTMConfig,
        LSTMLanguageModel,
        Seq2SeqLSTM,
        Seq2SeqLSTMConfig,
        Seq2SeqTransformer,
        Seq2SeqTransformerConfig,
    )

    gpt = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=4))
    models = [
        gpt,
        LSTMLanguageModel(LSTMConfig(vocab_size=20, n_embd=4, hidden_size=4, num_layers=1)),
        PromptTuning(gpt, 2),
        Seq2SeqTransformer(Seq2SeqTransformerConfig(n_layer=1, n_head=1, n_embd=4, ff_size=8)),
        Seq2SeqLSTM(Seq2SeqLSTMConfig(n_embd=4, hidden_size=4, num_layers=1)),
    ]
    assert all(is_decoder(m) for m in models)
    assert [m.context_window for m in models] == [8, None, 6, 256, 256]


def test_version_and_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "ferrolm", "--version"], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == f"ferrolm {ferrolm.__version__}"
    bad = subprocess.run([sys.executable, "-m", "ferrolm", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
