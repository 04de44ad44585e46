"""
Config resolution: script defaults, then each config/*.py file, then --key=value overrides.

    cfg = resolve(DEFAULTS, sys.argv[1:], types={"lr_decay_iters": int})

Config files are plain Python assignments (as in nanoGPT), but only known keys may be
assigned; `include("other.py")` pulls in another config file first (relative to this one). Values are
typed by their default: an int is accepted for a float, true/false/1/0 for a bool, strings need no
quotes. A key whose default is None or "auto" takes the type given in `types` (or any Python literal).
Every user error raises ConfigError with one line that names the key and the fix; scripts print it and
exit(2) (see `resolve_or_exit`).
"""
import ast
import difflib
import os
import sys

_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


class ConfigError(Exception):
    pass


def _type_name(t):
    return {bool: "bool (true/false)", int: "int", float: "float", str: "str"}.get(t, getattr(t, "__name__", str(t)))


def _unknown(key, known, where):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' {where}{hint}")


def expected_type(key, defaults, types):
    d = defaults[key]
    if d is None or d == "auto":
        return types.get(key)
    return type(d)


def parse_value(key, raw, defaults, types=None):
    """Turn the command-line string `raw` into the type expected for `key`."""
    types = types or {}
    d = defaults[key]
    if raw == "auto" and d == "auto":
        return "auto"
    if raw == "None" and d is None:
        return None
    t = expected_type(key, defaults, types)
    try:
        if t is bool:
            if raw.lower() not in _BOOL:
                raise ValueError
            return _BOOL[raw.lower()]
        if t is int:
            return int(raw)
        if t is float:
            return float(raw)
        if t is str:
            return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
        if t is None:  # untyped None default: any literal, else a string
            try:
                return ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
        return t(raw)
    except ValueError:
        extra = " or auto" if d == "auto" else (" or None" if d is None else "")
        raise ConfigError(f"--{key}={raw}: expected {_type_name(t)}{extra}") from None


def check_value(key, value, defaults, types=None, where=""):
    """Type-check a Python value (from a config file); ints widen to float, 0/1 to bool."""
    types = types or {}
    d = defaults[key]
    if (value is None and d is None) or (value == "auto" and d == "auto"):
        return value
    t = expected_type(key, defaults, types)
    if t is None:
        return value
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is bool and isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, t) and not (t is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} = {value!r}{where}: expected {_type_name(t)}, got {type(value).__name__}")


def load_config_file(path, defaults, types=None):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (config files are Python files such as "
                          f"config/train_enwik8.py)")
    with open(path) as f:
        src = f.read()
    ns = {}

    def include(other):
        """Run another config file (path relative to this one) into the same namespace, so one
        config can build on another: include("train_enwik8.py") then override a few keys."""
        other = os.path.join(os.path.dirname(path), other)
        if not os.path.isfile(other):
            raise ConfigError(f"{path} includes {other}, which does not exist")
        with open(other) as f:
            exec(compile(f.read(), other, "exec"), {"include": include}, ns)

    try:
        exec(compile(src, path, "exec"), {"include": include}, ns)
    except ConfigError:
        raise
    except Exception as e:  # a broken config file is a user error: one line, with where
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    out = {}
    for key, value in ns.items():
        if key.startswith("_") or type(value).__name__ in ("module", "function", "type"):
            continue
        if key not in defaults:
            raise _unknown(key, defaults, f"in {path}")
        out[key] = check_value(key, value, defaults, types, where=f" in {path}")
    return out


def resolve(defaults, argv, types=None):
    """defaults <- config files <- --key=value, in command-line order. Returns a new dict."""
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"malformed argument '{arg}': use --key=value (for example --max_iters=100)")
            key, raw = arg[2:].split("=", 1)
            if key not in defaults:
                raise _unknown(key, defaults, "on the command line")
            cfg[key] = parse_value(key, raw, defaults, types)
        elif arg.endswith(".py"):
            cfg.update(load_config_file(arg, defaults, types))
        else:
            raise ConfigError(f"unexpected argument '{arg}': give config files (*.py) and --key=value overrides")
    return cfg


def resolve_or_exit(defaults, argv, types=None):
    try:
        return resolve(defaults, argv, types)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
