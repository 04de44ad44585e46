"""The repository's shape: no import circle among the top-level modules, one copy of every model class
when a training script runs, each config key declared once, and a README whose relative links and anchors all
resolve."""
import ast
import os
import re
import runpy
import sys

import pytest

import train_config
from config_keys import Key, declarations
from helpers import ROOT
from models import MODELS


def import_graph():
    """{module: the repository's top-level modules it imports anywhere in its file (inside functions and
    `if __name__ == "__main__":` blocks too)}."""
    mods = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, m + ".py")).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
        graph[m] = (deps & mods) - {m}
    return graph


def circles(graph):
    """Every import circle, each as the list of modules along it (depth-first search for back edges)."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_top_level_modules_import_no_circle():
    graph = import_graph()
    assert {"trainer", "models", "gpt", "asca"} <= set(graph)
    assert circles(graph) == []
    assert "trainer" not in graph["models"] and not graph["models"] & {"baseline_model", "novel_model"}


def kind_specific(path):
    """Where a module reaches into a model kind: a comparison with or a registry lookup by a kind's name, or an
    attention module's selector."""
    import models
    names = set(models.MODELS)
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Attribute) and node.attr == "selector":
            found.append(f"line {node.lineno}: .selector")
        elif isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in names
                                                   for c in [node.left, *node.comparators]):
            found.append(f"line {node.lineno}: compares with a kind's name")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in names:
            found.append(f"line {node.lineno}: looks up a kind by name")
    return found


@pytest.mark.parametrize("module", ["trainer.py", "train_config.py", "checkpoint.py", "evaluate.py"])
def test_the_generic_loop_names_no_model_kind(module):
    """What a kind adds reaches the loop through the registry's fields and the attention hooks only."""
    assert kind_specific(os.path.join(ROOT, module)) == []


def test_the_kind_check_sees_a_kind_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('if kind == "asca":\n    a.selector.rule = 1\nx = MODELS["baseline"]\n')
    assert len(kind_specific(str(bad))) == 3


def test_the_attention_class_stays_readable():
    """AdaptiveSparseCausalSelfAttention holds the training path (its decoding is asca_decoding.py's mixin, its choice
    asca_selector.py's, its kernels asca_kernels.py's): at most 200 lines."""
    tree = ast.parse(open(os.path.join(ROOT, "asca.py")).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AdaptiveSparseCausalSelfAttention")
    assert cls.end_lineno - cls.lineno + 1 <= 200


def test_readme_names_every_top_level_module():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert [f for f in sorted(os.listdir(ROOT)) if f.endswith(".py") and f"`{f}`" not in readme] == []


def test_the_usage_page_names_every_test_file():
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    tests = sorted(f for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py"))
    assert [f for f in tests if f"`{f}`" not in usage] == []


def test_the_circle_finder_finds_a_circle():
    """The control: the search above does see a circle when there is one."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("script,kind", [("novel_model.py", "asca"), ("baseline_model.py", "baseline")])
def test_a_training_script_trains_the_registrys_classes(script, kind, monkeypatch):
    """`python novel_model.py` used to load that file twice, as __main__ and as novel_model (through the registry),
    so two copies of every class lived in one process. The script's classes are now the registry's."""
    import trainer
    seen = {}
    monkeypatch.setattr(trainer, "main", lambda argv, k: seen.setdefault("kind", k) and 0)
    monkeypatch.setattr(sys, "argv", [script])
    monkeypatch.setattr(sys, "exit", lambda code=0: seen.setdefault("exit", code))
    g = runpy.run_path(os.path.join(ROOT, script), run_name="__main__")  # as `python SCRIPT` runs it
    assert seen == {"kind": kind, "exit": 0}
    attn = "AdaptiveSparseCausalSelfAttention" if kind == "asca" else "CausalSelfAttention"
    config = "ASCAConfig" if kind == "asca" else "GPTConfig"
    assert g[attn] is MODELS[kind].attn_cls and g[config] is MODELS[kind].config_cls


def test_each_key_is_declared_once_and_the_lists_follow_the_declarations():
    for kind, m in MODELS.items():
        model_keys = set(declarations(m.config_cls))
        assert not model_keys & set(train_config.TRAIN_KEYS), kind  # a key belongs to the loop or to the model
        decls = train_config.key_declarations(kind)
        assert set(train_config.defaults_for(kind)) == set(decls) - {"vocab_size"}
    asca = MODELS["asca"].config_cls
    assert set(asca.runtime_keys()) == {"dropout", "attn_impl", "target_sparsity", "sparsity_warmup_iters",
                                        "budget_ema", "flex_gate_bias"}
    assert asca.device_defaults() == {"attn_impl": "auto"}
    assert asca.shape_keys() == ("block_size", "n_layer", "n_head", "n_embd")
    assert train_config.with_legacy({}, "asca")["local_blocks"] == 0  # old runs kept no nearest block
    assert train_config.with_legacy({"local_blocks": 2}, "asca")["local_blocks"] == 2
    assert train_config.with_legacy({}, "baseline")["optimizer"] == "adamw"
    with pytest.raises(ValueError, match="resume='sometimes' must be one of"):
        Key(1, resume="sometimes")


# ----------------------------------------------------------------------------- README

def anchors(markdown):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def links(markdown):
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


def markdown_in(*parts):
    return sorted(os.path.join(*parts, f) for f in os.listdir(os.path.join(ROOT, *parts)) if f.endswith(".md"))


@pytest.mark.parametrize("doc", ["README.md"] + markdown_in("docs") + markdown_in("docs", "results")
                         + markdown_in("docs", "results", "raw"))
def test_every_relative_link_and_anchor_resolves(doc):
    path = os.path.join(ROOT, doc)
    text = open(path).read()
    broken = []
    for target in links(text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            broken.append(target)
        elif anchor and dest.endswith(".md") and anchor not in anchors(open(dest).read()):
            broken.append(target)
    assert broken == []


def reachable(start):
    """Every file reached from the markdown file `start` by relative links, following markdown files."""
    seen, todo = set(), [os.path.normpath(start)]
    while todo:
        path = todo.pop()
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)
        if path.endswith(".md"):
            for target in links(open(path).read()):
                file = target.partition("#")[0]
                if file and not re.match(r"[a-z]+:", file):
                    todo.append(os.path.normpath(os.path.join(os.path.dirname(path), file)))
    return seen


def test_every_results_file_is_reachable_from_the_index():
    """docs/results/README.md indexes every study, and through the pages every raw table and figure; README links
    the index."""
    results = os.path.join(ROOT, "docs", "results")
    index = os.path.join(results, "README.md")
    files = {os.path.normpath(os.path.join(d, f)) for d, _, fs in os.walk(results) for f in fs}
    assert sorted(os.path.relpath(f, results) for f in files - reachable(index)) == []
    assert index in reachable(os.path.join(ROOT, "README.md"))


def test_the_reachability_check_sees_an_orphan(tmp_path):
    """The control: a file no link reaches is reported; one reached through a page is not."""
    (tmp_path / "README.md").write_text("[a](a.md)")
    (tmp_path / "a.md").write_text("[b](sub/b.json#x)")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    (tmp_path / "orphan.md").write_text("")
    got = reachable(str(tmp_path / "README.md"))
    assert {os.path.basename(p) for p in got} == {"README.md", "a.md", "b.json"}


def test_the_link_check_sees_a_broken_link(tmp_path):
    """The control: a missing file and a missing anchor are both caught by the same rules."""
    text = "# A title\n[ok](#a-title) [gone](nowhere.md) [bad anchor](#no-such-heading)"
    assert "a-title" in anchors(text)
    assert [t for t in links(text) if t.startswith("#") and t[1:] not in anchors(text)] == ["#no-such-heading"]


def test_every_python_file_compiles():
    """Scripts no test imports (benchmarks, tools) still compile: ruff does not catch every compile-time error
    (a name used before its `global` statement passed it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(d, f) for d, dirs, fs in os.walk(root) for f in fs if f.endswith(".py")
             and not any(part.startswith(".") or part in ("out", "data", "__pycache__")
                         for part in os.path.relpath(d, root).split(os.sep))]
    assert len(files) > 30
    for f in files:
        with open(f, encoding="utf-8") as fh:
            compile(fh.read(), f, "exec")  # a SyntaxError names the file and line


# ----------------------------------------------------------------------------- the quick loop and the e2e mark

TRAINS = re.compile(r"(?<![\w.])(train_in_process|run_script|trainer\.main|compare\.main|train|main_job)\("
                    r"|main_job\.sh")


def test_every_test_that_trains_is_marked_e2e():
    """The mark is explicit: a test that runs a training entry point (itself, through a module-level helper, or a
    fixture) must carry @pytest.mark.e2e. A method call such as model.train( is not training."""
    tests = os.path.join(ROOT, "tests")
    trains_fixture = {}
    trees = {}
    for f in sorted(os.listdir(tests)):
        if f.endswith(".py"):
            src = open(os.path.join(tests, f)).read()
            trees[f] = (src, ast.parse(src))
            for node in trees[f][1].body:
                if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list):
                    trains_fixture[node.name] = bool(TRAINS.search(ast.get_source_segment(src, node)))
    unmarked = []
    for f, (src, tree) in trees.items():
        helpers = {n.name: ast.get_source_segment(src, n) for n in tree.body
                   if isinstance(n, ast.FunctionDef) and not n.name.startswith("test_")}
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            seg = ast.get_source_segment(src, node)
            trains = (TRAINS.search(seg) or any(trains_fixture.get(a.arg) for a in node.args.args)
                      or any(re.search(rf"(?<![\w.]){h}\(", seg) and TRAINS.search(body)
                             for h, body in helpers.items()))
            marked = any("e2e" in ast.unparse(d) for d in node.decorator_list)
            if trains and not marked:
                unmarked.append(f"{f}::{node.name}")
    assert not unmarked, unmarked
    assert not TRAINS.search("model.train(mode == 'train')")  # the guess this replaces took that for training


def test_the_quick_loop_holds_every_causality_test():
    import subprocess
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                        "not e2e and not slow"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    quick = r.stdout
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    causal = [line for line in r.stdout.splitlines() if "::" in line and "causal" in line.split("::")[-1]
              and "cuda" not in line]
    assert len(causal) >= 40
    missing = [t for t in causal if t not in quick]
    assert not missing, missing
