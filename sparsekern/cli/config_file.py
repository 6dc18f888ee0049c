"""``--config FILE``: a command's options from a YAML file, as MACE's ``--config``
(configargparse's YAML): each key is an option's name without its dashes, in any of its
spellings; an option also given on the command line takes the command line's value."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

from .mace_options import architecture_refusal, reason, refusal


def with_config(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """``argv`` with the options of its ``--config`` file (if any) put before the rest,
    so that argparse's last value, the command line's, wins; a one-line error (the
    parser's) for a file that cannot be read or names an option the command lacks."""
    path, rest = _config_path(parser, argv)
    if path is None:
        return rest
    options = _read(parser, Path(path))
    by_name: Dict[str, argparse.Action] = {s[2:]: a for a in parser._actions for s in a.option_strings
                                           if s.startswith("--")}
    unknown = [k for k in options if k not in by_name or k in ("config", "help")]
    message = refusal([f"--{k}={options[k]}" if reason(k) else f"--{k}" for k in unknown],
                      "this command has no option") if unknown else None
    if message:
        parser.error(f"--config {path}: {message} (MACE's full set of options runs under `sparsekern mace-train`)")
    options = {k: v for k, v in options.items() if k not in unknown}  # (MACE's, stating what finetune does)
    model = architecture_refusal(options.get("model"))
    if model:
        parser.error(f"--config {path}: {model}")
    for dest in {by_name[k].dest for k in options}:
        twice = [k for k in options if by_name[k].dest == dest]
        if len(twice) > 1:  # one would win, silently
            parser.error(f"--config {path}: {' and '.join(twice)} set the same option: keep one")
    tokens: List[str] = []
    for key, value in options.items():
        tokens += _tokens(parser, by_name, key, value, path)
    return tokens + rest


def _config_path(parser: argparse.ArgumentParser, argv: List[str]):
    """(the ``--config`` file named in ``argv`` or None, ``argv`` without it)."""
    path: Optional[str] = None
    rest: List[str] = []
    it = iter(argv)
    for token in it:
        if token == "--":  # what follows is not an option
            rest += [token, *it]
            break
        if token == "--config" or token.startswith("--config="):
            if path is not None:
                parser.error("--config given twice")
            path = token.partition("=")[2] if "=" in token else next(it, None)
            if not path or path.startswith("--"):
                parser.error("--config needs a YAML file")
        else:
            rest.append(token)
    return path, rest


def _read(parser: argparse.ArgumentParser, path: Path) -> dict:
    import yaml

    if not path.is_file():
        parser.error(f"--config: file not found: {path}")
    try:
        options = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        parser.error(f"--config {path}: not YAML: {' '.join(str(exc).split())}")
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        parser.error(f"--config {path}: expected a mapping of option names to values, got {type(options).__name__}")
    return options


def _tokens(parser: argparse.ArgumentParser, by_name: Dict[str, argparse.Action], key: str, value, path) -> List[str]:
    """The command-line tokens for ``key: value``: a switch given when true (false: its
    ``--no_`` counterpart where there is one, else nothing), a value as its string."""
    action = by_name[key]
    if value is None:  # `key:` with nothing after it: the default
        return []
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            parser.error(f"--config {path}: {key} is a switch: give true or false, got {value!r}")
        if value:
            return [f"--{key}"]
        opposite = next((f"--{k}" for k, a in by_name.items() if a.dest == action.dest and a.nargs == 0
                         and a.const != action.const), None)
        return [opposite] if opposite is not None else []
    if isinstance(value, list):
        parser.error(f"--config {path}: {key} takes one value, got a list")
    return [f"--{key}={value}"]  # one token: a value may start with "-" (a mapping as Python writes it: --E0s reads it)
