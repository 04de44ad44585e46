import os
import re
import subprocess
import sys

import pytest

from configurator import ConfigError, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = dict(learning_rate=6e-4, max_iters=100, compile="auto", out_dir="out", min_lr=None, dropout=0.0,
         bias=False, anything=None)
T = dict(compile=bool, min_lr=float)


def test_types_follow_defaults():
    cfg = resolve(D, ["--learning_rate=1", "--max_iters=7", "--out_dir=out/x", "--bias=True"], T)
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["max_iters"] == 7 and isinstance(cfg["max_iters"], int)
    assert cfg["out_dir"] == "out/x" and cfg["bias"] is True
    assert D["max_iters"] == 100  # defaults untouched


@pytest.mark.parametrize("raw,want", [("false", False), ("False", False), ("0", False), ("true", True),
                                      ("True", True), ("1", True), ("auto", "auto")])
def test_bool_spellings_and_auto(raw, want):
    assert resolve(D, [f"--compile={raw}"], T)["compile"] == want


def test_none_defaults_can_be_set_and_reset():
    assert resolve(D, ["--min_lr=1e-5"], T)["min_lr"] == 1e-5
    assert resolve(D, ["--min_lr=1e-5", "--min_lr=None"], T)["min_lr"] is None
    assert resolve(D, ["--anything=[1, 2]"], T)["anything"] == [1, 2]
    assert resolve(D, ["--anything=hello"], T)["anything"] == "hello"


def test_quoted_strings():
    assert resolve(D, ["--out_dir='a b'"], T)["out_dir"] == "a b"


@pytest.mark.parametrize("argv,needle", [
    (["--learning_rat=1"], "did you mean 'learning_rate'"),
    (["--max_iters=1.5"], "expected int"),
    (["--compile=maybe"], "expected bool"),
    (["--max_iters"], "use --key=value"),
    (["stray"], "unexpected argument"),
    (["nope.py"], "not found"),
])
def test_errors(argv, needle):
    with pytest.raises(ConfigError) as e:
        resolve(D, argv, T)
    assert needle in str(e.value)


def test_config_file_order_and_checks(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nlearning_rate = 1\nmax_iters = 50\ncompile = False\n_private = 3\n")
    cfg = resolve(D, [str(f), "--max_iters=60"], T)
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["max_iters"] == 60 and cfg["compile"] is False
    cfg = resolve(D, ["--max_iters=60", str(f)], T)  # later wins
    assert cfg["max_iters"] == 50
    bad = tmp_path / "bad.py"
    bad.write_text("max_itres = 5\n")
    with pytest.raises(ConfigError, match="max_itres.*did you mean 'max_iters'"):
        resolve(D, [str(bad)], T)
    typed = tmp_path / "typed.py"
    typed.write_text("max_iters = 'ten'\n")
    with pytest.raises(ConfigError, match="expected int"):
        resolve(D, [str(typed)], T)
    broken = tmp_path / "broken.py"
    broken.write_text("max_iters = (\n")
    with pytest.raises(ConfigError, match="failed to run"):
        resolve(D, [str(broken)], T)


def test_script_prints_one_line_and_exits_2():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "baseline_model.py"), "--n_layr=2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == "config error: unknown config key 'n_layr' on the command line; did you mean 'n_layer'?"


@pytest.mark.parametrize("script,kind", [("baseline_model.py", "baseline"), ("novel_model.py", "asca")])
def test_help_lists_every_key_with_its_default_and_help(script, kind):
    """--help (and -h) exit 0 and list every key the script accepts, each with its default and its help line; the
    dense script lists none of ASCA's keys."""
    import train_config
    decls, defaults = train_config.key_declarations(kind), train_config.defaults_for(kind)
    for flag in ("--help", "-h"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "config/train_tiny.py", flag],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        listed = re.findall(r"^  --(\w+)=(.*?)(?:  \(.*\))?$", r.stdout, re.M)
        assert [k for k, _ in listed] == [k for k in train_config.TRAIN_KEYS if k in defaults] + [
            k for k in decls if k in defaults and k not in train_config.TRAIN_KEYS]
        assert dict(listed) == {k: str(v) for k, v in defaults.items()}
        text = " ".join(r.stdout.split())
        assert all(" ".join(decls[k].help.split()) in text for k in defaults)
    if kind == "baseline":
        assert "--target_sparsity" not in r.stdout and "--selector" not in r.stdout


def test_every_key_declares_a_one_line_help_and_the_usage_table_names_it():
    import train_config
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    for kind in ("baseline", "asca"):
        decls = train_config.key_declarations(kind)
        for k in train_config.defaults_for(kind):
            assert decls[k].help and "\n" not in decls[k].help and len(decls[k].help) <= 160, k
            assert f"`{k}`" in usage, f"docs/usage.md does not name {k}"


def test_include_builds_on_another_file(tmp_path):
    (tmp_path / "base.py").write_text("max_iters = 10\nlearning_rate = 0.5\n")
    (tmp_path / "child.py").write_text("include('base.py')\nmax_iters = 20\n")
    cfg = resolve(D, [str(tmp_path / "child.py")], T)
    assert cfg["max_iters"] == 20 and cfg["learning_rate"] == 0.5
    (tmp_path / "bad.py").write_text("include('missing.py')\n")
    with pytest.raises(ConfigError, match="missing.py, which does not exist"):
        resolve(D, [str(tmp_path / "bad.py")], T)
    (tmp_path / "badkey.py").write_text("include('base.py')\nmax_iter = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'max_iters'"):
        resolve(D, [str(tmp_path / "badkey.py")], T)


@pytest.mark.parametrize("kind,cfg", [("baseline", "train_enwik8.py"), ("asca", "train_enwik8_novel.py"),
                                      ("baseline", "train_enwik8_long.py"), ("asca", "train_enwik8_long_novel.py"),
                                      ("baseline", "train_excerpt_cpu.py"),
                                      ("asca", "train_excerpt_cpu_novel.py"), ("asca", "train_tiny.py")])
def test_shipped_configs_resolve_and_build(kind, cfg):
    import train_config
    from models import MODELS
    c = resolve(train_config.defaults_for(kind), [os.path.join(ROOT, "config", cfg)], train_config.types_for(kind))
    if cfg == "train_tiny.py":
        c["sparse_block_size"] = 8
    MODELS[kind].config_cls.from_dict(c).validate()
    twin = {"train_enwik8_novel.py": "train_enwik8.py", "train_excerpt_cpu_novel.py": "train_excerpt_cpu.py",
            "train_enwik8_long_novel.py": "train_enwik8_long.py"}.get(cfg)
    if twin:  # the ASCA configs differ from their baseline twins only in out_dir and ASCA keys
        b = resolve(train_config.defaults_for("baseline"), [os.path.join(ROOT, "config", twin)],
                    train_config.types_for("baseline"))
        shared = {k: v for k, v in c.items() if k in b and k != "out_dir"}
        assert shared == {k: v for k, v in b.items() if k != "out_dir"}
