"""Start a launcher with `app.run`, with command-line mistakes as one line on stderr.

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
  ...
  cli.run(main, _CONFIG)

Left to absl and ml_collections, a misspelled override (`--config.stepz=5`) or a config file
that is not there ends in a 40-60-line traceback with the useful part on its last line (or, for
a missing file, only once the training code first reads the config). `run` parses the flags
itself and turns those into one line, `error: ...`, exit status 2 (as a refused setting is),
keeping ml_collections' "Did you mean" suggestion; other flag errors (a value of the wrong
type, a required flag missing) get the same treatment. An exception raised by the config
file's own code (a syntax error, a bad `get_config`) keeps its traceback: that is where the
line to fix is.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags import config_path

EXIT_USAGE = 2


def run(main: Callable[[list[str]], None], *config_flags: flags.FlagHolder) -> None:
    """`app.run(main)`; errors in parsing the flags, the config flags' files and their
    `--NAME.FIELD=VALUE` overrides end the process with one line, exit status 2."""
    names = tuple(holder.name for holder in config_flags)
    app.run(main, flags_parser=lambda argv: parse_flags(argv, names))


def parse_flags(argv: Sequence[str], config_names: Sequence[str] = ("config",)) -> list[str]:
    """Parse `argv` into absl's FLAGS (the arguments left over returned, program name first);
    on a mistake print `error: ...` and exit 2."""
    try:
        rest = flags.FLAGS(list(argv))
    except flags.Error as e:
        _fail(f"{e} (--helpfull lists the flags)" if "\n" not in str(e) else str(e))
    except (AttributeError, KeyError, TypeError, OSError) as e:
        # Raised by ml_collections while it resolves the overrides against the loaded config.
        _fail(_override_error(argv, config_names, e))
    for name in config_names:
        try:
            # ml_collections defers a config file's load error (missing, a directory) to the
            # first attribute read: force it here, before the launcher imports anything heavy.
            getattr(flags.FLAGS[name].value, "_launch_cli_probe", None)
        except OSError as e:
            _fail(_file_error(name, _argument(argv, name), e))
    return rest


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _argument(argv: Sequence[str], name: str) -> str:
    """The value given to --NAME in `argv` ('' if none)."""
    value = ""
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.DOTALL)
        if match:
            value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv)
                                                            else "")
    return value


def _overrides(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
    """(the argument as typed, the field path) of every --NAME.FIELD override in `argv`."""
    found = []
    for arg in argv:
        match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if match:
            found.append((arg, match.group(1)))
    return found


def _file_error(name: str, argument: str, error: OSError) -> str:
    path = argument.split(":", 1)[0]
    where = f"--{name}={argument}"
    if not path:
        return f"{where}: give the path of a config file, e.g. configs/tiny.py"
    if os.path.isdir(path) or not os.path.exists(path):
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        problem = "is a directory, not a config file" if os.path.isdir(path) else "no such file"
        configs = sorted(f for f in os.listdir(folder) if f.endswith(".py")
                         and f != "__init__.py") if os.path.isdir(folder) else []
        if configs:
            return f"{where}: {problem}; {os.path.join(folder, '')} has {', '.join(configs)}"
        return f"{where}: {problem} (relative paths start at the current directory, {os.getcwd()})"
    cause = error.__cause__ or error
    return f"{where}: cannot load it: {str(cause).strip().splitlines()[-1].strip()}"


def _missing_key(error: BaseException) -> tuple[str, str]:
    """(the field ml_collections did not find, its "Did you mean" line or '')."""
    inner = error.args[0] if error.args and isinstance(error.args[0], KeyError) else error
    text = str(inner.args[0]) if inner.args else ""
    first, _, hint = text.partition("\n")
    return first.strip("'\""), hint.strip()


def _override_error(argv: Sequence[str], config_names: Sequence[str],
                    error: BaseException) -> str:
    """One line naming the override ml_collections could not apply, and why. The config is
    loaded again to find which override it was (get_config is cheap and has no side effects)."""
    for name in config_names:
        config = flags.FLAGS[name].parser.parse(_argument(argv, name))
        for arg, path in _overrides(argv, name):
            try:
                config_path.get_type(path, config)
            except OSError as e:
                return _file_error(name, _argument(argv, name), e)
            except (AttributeError, KeyError) as e:
                key, hint = _missing_key(e)
                parts = path.split(".")
                parent = ".".join([name, *parts[:parts.index(key)]]) if key in parts else name
                return f"{arg}: {parent} has no field '{key}'" + (f". {hint}" if hint else "")
            except TypeError as e:
                return f"{arg}: {_not_a_group(name, path, config) or e}"
    return f"a --{'/--'.join(config_names)} override could not be applied: {error!r}"


def _not_a_group(name: str, path: str, config) -> str:
    """'config.data.path is a str, not a group of fields' for the first prefix of `path` that
    holds a value rather than fields; '' if there is none."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        value = config_path.get_value(prefix, config)
        if not isinstance(value, config_dict.ConfigDict | dict):
            return f"{name}.{prefix} is a {type(value).__name__}, not a group of fields"
    return ""
