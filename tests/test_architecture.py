"""The structure of the code: imports flow one way, components copy out on their own, files stay readable, the
model compiles, and a checkpoint without MTP weights gets a helpful error.

The import graph is read from the source with ast (function-level imports included, relative imports resolved);
the folder kernels/ is the package glm5_kernels. Layers, lowest first: the components of glm5_ref (what a reader
copies), then training/, distributed/, apps/, and the CLI; nothing imports upwards and nothing imports in a cycle.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glm5_ref.config import GLM5Config
from glm5_ref.execution import Execution
from glm5_ref.model import GLM5ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"glm5_ref": ROOT / "glm5_ref", "glm5_kernels": ROOT / "kernels"}
LOWEST = {"glm5_ref.config", "glm5_ref.layers", "glm5_ref.execution"}  # may never import the kernels
LAYERS = ["component", "training", "distributed", "apps", "cli"]  # may import only from the same layer or below


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module that ``name`` imports anywhere in its file (``from a import b``: a.b if it is a
    module, else a)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # glm5_ref.model.X -> glm5_ref.model; torch -> nothing
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> str:
    if name.startswith("glm5_kernels"):
        return "component"
    part = name.split(".")[1] if "." in name else ""
    return {"training": "training", "distributed": "distributed", "apps": "apps", "__main__": "cli"}.get(
        part, "component")


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(n, stack):
        state[n] = 1
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m, stack + [m])
                if found:
                    return found
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def test_the_graph_reader_sees_function_level_and_relative_imports():
    g = graph()
    assert "glm5_kernels.newton_schulz" in g["glm5_ref.muon"]  # imported inside newton_schulz(), lazily
    assert "glm5_kernels._common" in g["glm5_kernels.indexer"]  # `from ._common import ...`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_anywhere():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_flow_one_way():
    bad = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in graph().items() for b in deps
           if LAYERS.index(layer(b)) > LAYERS.index(layer(a))]
    assert not bad, bad


def test_kernels_import_only_torch_triton_and_their_own_helpers():
    g = graph()
    for name, deps in g.items():
        if name.startswith("glm5_kernels") and name != "glm5_kernels.bench":
            assert all(d.startswith("glm5_kernels") for d in deps), (name, deps)
        if name in LOWEST:
            assert not any(d.startswith("glm5_kernels") for d in deps), (name, deps)
    bench = g["glm5_kernels.bench"]  # the twins it compares against, never the CLI or the apps
    assert not any(d.startswith(("glm5_ref.apps", "glm5_ref.__main__", "glm5_ref.training")) for d in bench), bench


def test_every_file_is_at_most_400_lines():
    long = {os.fspath(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_function_of_the_training_engine_is_over_60_lines():
    long = []
    for path in (ROOT / "glm5_ref" / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


# ---- copying a component into another project ---------------------------------------------------------------
COPY_CASES = {
    "mla": (["mla", "layers", "config"], """
        from mypkg.config import GLM5Config
        from mypkg.mla import MLA, MLACache
        cfg = GLM5Config.tiny()
        m = MLA(cfg)
        x = torch.randn(2, 7, cfg.hidden_size)
        y = m(x)
        cache = MLACache.for_config(cfg, 2, 7)
        step = torch.cat([m(x[:, :5], cache=cache, absorbed=True), m(x[:, 5:], cache=cache, absorbed=True)], 1)
        assert y.shape == x.shape and float((step - y).norm() / y.norm()) < 1e-5
    """),
    "dsa": (["dsa", "mla", "layers", "config"], """
        from mypkg.config import GLM5Config
        from mypkg.dsa import DSAAttention
        cfg = GLM5Config.tiny()
        m = DSAAttention(cfg)
        x = torch.randn(2, cfg.index_topk + 5, cfg.hidden_size)
        res = m.attend(x, indexer_loss=True)
        assert res.out.shape == x.shape and res.key_indices is not None and torch.isfinite(res.indexer_loss)
    """),
    "moe": (["moe", "layers", "config"], """
        from mypkg.config import GLM5Config
        from mypkg.moe import MoE
        cfg = GLM5Config.tiny()
        m = MoE(cfg)
        x = torch.randn(2, 7, cfg.hidden_size)
        y, aux = m(x, return_aux=True)
        assert float((y - m(x, impl="loop")).norm() / y.norm()) < 1e-5 and int(aux.tokens_per_expert.sum()) > 0
    """),
    "mtp": (["mtp", "block", "execution", "dsa", "mla", "moe", "layers", "config"], """
        from mypkg.config import GLM5Config
        from mypkg.mtp import MTPLayer, mtp_losses
        cfg = GLM5Config.tiny()
        mtp = MTPLayer(cfg)
        emb, head = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size), torch.nn.Linear(cfg.hidden_size, cfg.vocab_size)
        ids = torch.randint(0, cfg.vocab_size, (2, 9))
        ce, balance, kls, load = mtp_losses(mtp, emb, head, torch.randn(2, 9, cfg.hidden_size), ids, 3)
        assert len(ce) == 3 and all(torch.isfinite(c) for c in ce)
    """),
}


@pytest.mark.parametrize("name", sorted(COPY_CASES))
def test_a_component_copied_into_another_package_runs_without_glm5_ref(name, tmp_path):
    files, body = COPY_CASES[name]
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in files:
        (pkg / f"{f}.py").write_text((ROOT / "glm5_ref" / f"{f}.py").read_text().replace("glm5_ref.", "mypkg."))
    script = textwrap.dedent("""
        import sys
        class Block:  # glm5_ref (and its kernels) must not be needed, nor even importable
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("glm5_ref", "glm5_kernels", "kernels"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import torch
        torch.manual_seed(0)
    """) + textwrap.dedent(body) + "\nprint('ok')\n"
    env = {**os.environ, "PYTHONPATH": os.fspath(tmp_path)}
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


# ---- execution choices ------------------------------------------------------------------------------------------
def test_execution_is_one_validated_object_that_changes_only_through_set_execution():
    model = GLM5ForCausalLM(GLM5Config.tiny())
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    ex = model.set_execution(moe_impl="loop", sparse=False)
    assert model.execution is ex and ex.moe_impl == "loop" and not ex.sparse and ex.sparse_impl == "gathered"
    assert all(set(vars(m)) == set(before[n]) for n, m in model.named_modules() if n)  # no module was touched
    for bad, match in ((dict(moe_impl="fast"), "moe_impl"), (dict(sparse="yes"), "sparse"),
                       (dict(absorbed=1), "absorbed"), (dict(key_selector=3), "key_selector")):
        with pytest.raises(ValueError, match=match):
            model.set_execution(**bad)
    with pytest.raises(TypeError, match="unknown field"):
        model.set_execution(flash=True)
    assert model.execution is ex  # a refused change leaves the old execution in place


def test_a_per_call_execution_changes_the_path_not_the_result():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.tiny()).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        ref = model(ids).logits
        for ex in (Execution(moe_impl="loop"), Execution(absorbed=True), Execution(absorbed=True, sparse_impl="masked")):
            assert _rel(model(ids, execution=ex).logits, ref) < 1e-6  # fp64, but RoPE and softmax run in fp32
        assert _rel(model(ids, execution=Execution(sparse=False)).logits, ref) > 1e-4  # T > topk: DSA mattered


# ---- torch.compile ----------------------------------------------------------------------------------------------
def _grads(model):
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_compiled_training_step_equals_eager():
    """The whole training step (LM + MoE balance + MTP x3 + indexer KL) through dynamo and AOTAutograd in one graph
    (fullgraph: no graph break) equals eager in loss and gradients. aot_eager runs the graph op by op, which
    keeps the test fast; the benchmark (bench train-step) times the inductor-compiled step."""
    torch.manual_seed(0)
    eager = GLM5ForCausalLM(GLM5Config.tiny())
    compiled_model = copy.deepcopy(eager)
    step = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, eager.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = eager(ids, labels=ids, indexer_loss=True)
    out = step(ids, labels=ids, indexer_loss=True)
    ref.loss.backward()
    out.loss.backward()
    assert len(out.mtp_losses) == 3 and out.indexer_loss is not None
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5 * abs(ref.loss.item())
    g_ref, g_out = _grads(eager), _grads(compiled_model)
    worst = max(_rel(g_out[n], g) for n, g in g_ref.items() if g.norm() > 0)
    assert worst < 1e-5, worst


def test_inductor_compiled_decode_step_equals_eager():
    """One cached decode step compiled by inductor (C++ on the CPU) gives eager's logits; the next steps reuse
    the compiled code (no recompilation for every cache length)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(GLM5Config.tiny(), num_hidden_layers=1, first_k_dense_replace=0,
                              num_nextn_predict_layers=0)
    eager = GLM5ForCausalLM(cfg).eval()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c_ref, c_out = eager.new_cache(1, 16), eager.new_cache(1, 16)
        eager(ids[:, :12], cache=c_ref)
        compiled(ids[:, :12], cache=c_out)
        for t in range(12, 16):
            a = compiled(ids[:, t:t + 1], cache=c_out).logits
            b = eager(ids[:, t:t + 1], cache=c_ref).logits
            assert _rel(a, b) < 1e-5


# ---- loading a checkpoint that has no MTP layer -------------------------------------------------------------------
def test_a_checkpoint_without_mtp_weights_gets_an_error_that_says_so(tmp_path):
    cfg = GLM5Config.tiny()
    model = GLM5ForCausalLM(cfg)
    state = {k: v for k, v in model.hf_state_dict().items() if not k.startswith(model.mtp_prefix())}
    with pytest.raises(ValueError, match="belongs to the MTP layer.*strict=False"):
        GLM5ForCausalLM(cfg).load_hf_state_dict(state)
    report = GLM5ForCausalLM(cfg).load_hf_state_dict(state, strict=False)
    assert report["missing"] and all(k.startswith("mtp.") for k in report["missing"])
    del state["lm_head.weight"]  # a trunk tensor missing too: not only the MTP layer, so no such hint
    with pytest.raises(ValueError) as err:
        GLM5ForCausalLM(cfg).load_hf_state_dict(state)
    assert "MTP layer" not in str(err.value)


def test_pyproject_installs_every_package_of_the_source_tree():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "glm5_ref").rglob("__init__.py")}
    assert found | {"glm5_kernels"} == listed, (found ^ listed)
