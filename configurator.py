"""
How every script here reads its settings, and writes its outputs, in one place.

train.py and sample.py, nanoGPT style: a dataclass of defaults, then config files (Python files of `key = value`),
then `--key=value` flags, each checked against the default's type:

    python train.py config/celerity.py --n_layer=6 --compile

The tools with subcommands (data.py, mup.py, scaling.py, collapse.py, bench.py) use argparse through
`ArgumentParser` below, whose errors are one line. Booleans are spelled one way everywhere: `--flag` or
`--flag=true` / `--flag=false`.
"""
import argparse
import contextlib
import inspect
import os
import re
import sys
from dataclasses import fields


class ConfigError(ValueError):
    """A setting that cannot be used (one sentence naming the key, the value and where it came from)."""


def boolean(text):
    """The one boolean spelling: true or false (any case)."""
    value = {"true": True, "false": False}.get(str(text).lower())
    if value is None:
        raise ValueError(f"{text!r} is not true or false")
    return value


def _comments(schema):
    """The trailing `# comment` of each field in the dataclass's source: the text --help shows beside it."""
    try:
        src = inspect.getsource(schema)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^=\n]*=[^#\n]*#(.*)$", src, re.M)}


def usage(schema):
    """The --help text: the script's docstring, then every setting with its default and comment."""
    doc = sys.modules[schema.__module__].__doc__ or ""
    notes = _comments(schema)
    rows = [f"  --{f.name}={f.default!r}".ljust(36) + (f" {notes[f.name]}" if f.name in notes else "")
            for f in fields(schema)]
    return doc.strip() + "\n\nsettings (--key=value; config files set the same keys):\n" + "\n".join(rows)


def configure(schema, argv):
    """(settings, given): defaults of the dataclass `schema`, then each config file named in argv, then the
    --key=value flags; `given` holds the keys a file or flag set. A config file sees the command line's settings
    as variables, so a family preset can derive a whole model from one dial (config/celerity.py --n_layer=6).
    --help prints usage(schema) and exits."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(schema))
        sys.exit(0)
    types = {f.name: type(f.default) for f in fields(schema)}

    def typed(key, value, where):
        if key not in types:
            raise ConfigError(f"unknown setting {key!r} in {where}; valid keys: {', '.join(types)}")
        t = types[key]
        if isinstance(value, str) and t is not str:
            raw = value
            try:
                value = boolean(raw) if t is bool else float(raw)
                if t is int and value != int(value):
                    raise ValueError
                value = int(value) if t is int else value
            except (ValueError, OverflowError):
                raise ConfigError(f"{key}={raw!r} from {where} is not a valid {t.__name__}") from None
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, t) or (t is int and isinstance(value, bool)):
            raise ConfigError(f"{key} must be a {t.__name__}, got {value!r} in {where}")
        return value

    cli = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            cli[key] = typed(key, value if eq else "true", "the command line")
    given = {}
    for arg in argv:
        if arg.startswith("--"):
            continue
        if not os.path.isfile(arg):
            raise ConfigError(f"config file {arg} does not exist (settings are given as --key=value)")
        ns = dict(cli)
        try:
            exec(open(arg).read(), ns)
        except Exception as e:  # a config file is the user's Python: report its error as one sentence
            raise ConfigError(f"config file {arg} failed: {type(e).__name__}: {e}") from None
        for key, value in ns.items():
            if key not in cli and not key.startswith("_") and not callable(value) and not inspect.ismodule(value):
                given[key] = typed(key, value, arg)
    given.update(cli)
    cfg = schema()
    for key, value in given.items():
        setattr(cfg, key, value)
    return cfg, given


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as the tools show it: the description (a module docstring) as written, each flag with its default."""

    def _get_help_string(self, action):  # no "(default: None)" after a flag that has no default
        return action.help if action.default in (None, "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the tools, with a bad flag reported as one line (`error: …`, exit 2) instead of usage + error.
    Flags are spelled out in full: no prefix matching (argparse's default would take --width=64 as --widths)."""

    def __init__(self, *args, allow_abbrev=False, formatter_class=None, **kwargs):  # subcommand parsers too
        super().__init__(*args, allow_abbrev=allow_abbrev, formatter_class=formatter_class or HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")

    def add_bool(self, name, help=""):
        """A boolean flag: `--name` alone is true; `--name=true` / `--name=false` spell it out."""
        self.add_argument(name, nargs="?", const=True, default=False, type=boolean, metavar="true|false", help=help)


# ---------------------------------------------------------------------------------------------------------------
# outputs: a file that exists under its real name is complete

@contextlib.contextmanager
def atomic(path):
    """Yields a temporary name beside `path` and renames it to `path` when the block ends without an error (a rename
    within one folder is atomic), so a crash never leaves a half-written file under the real name. The temporary name
    keeps the extension, from which savefig reads the format."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def save_figure(fig, path, dpi=110, **kw):
    """A matplotlib figure to `path` (PNG, or the format its extension names), atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    try:
        with atomic(path) as tmp:
            fig.savefig(tmp, dpi=dpi, **kw)
    finally:
        plt.close(fig)
