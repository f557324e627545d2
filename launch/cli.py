"""What every entry point shares: argument parsing and the one error boundary.

``entry_point(main, argv)`` runs ``main(argv)`` and turns a user error (``trainer.errors.
UserError``: a config key, a data file or row, a checkpoint, a missing path) into one line,
``error: <message>`` on stderr, and exit code 2, with no traceback. Under torchrun only rank 0
reports an error every rank hit (config errors, failures rank 0 shared); an error only one rank
hit is reported by that rank, prefixed with it. ``HYDRA_FULL_ERROR=1`` or
``logging.level=DEBUG`` also prints the traceback. Anything else is a bug and raises as usual.
The entry points close what they opened (process group, async checkpoint, wandb run) in their
own ``finally`` blocks; the boundary only reports.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, Callable, TypeVar

from trainer.errors import ConfigError, UserError

T = TypeVar("T")
MESSAGE_LIMIT = 1200  # characters of one error line; quoted values are cut far sooner (errors.quote)


def _debug(argv: list[str]) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        a.split("=", 1) == ["logging.level", "DEBUG"] for a in (x.lstrip("+") for x in argv))


def one_line(message: str) -> str:
    text = re.sub(r"\s*\n\s*", "; ", str(message).strip())
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "..."


def entry_point(main: Callable[[list[str]], T], argv: list[str] | None = None) -> T:
    """Run ``main(argv)`` behind the user-error boundary (exit code 2 on a UserError)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except UserError as e:
        if _debug(argv):
            traceback.print_exc()
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        elif not e.collective:
            print(f"error: [rank {rank}] {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def split_options(argv: list[str], flags: dict[str, int]) -> tuple[dict[str, list[str]], list[str]]:
    """Separate ``--flag [value...]`` options (``flags``: name -> number of values) from the
    Hydra overrides; an unknown ``--option`` is a ConfigError."""
    options: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and "=" not in arg:
            if arg not in flags:
                raise ConfigError(f"unknown option {arg!r}: arguments are Hydra overrides (key=value, "
                                  f"+experiment=NAME); options: {', '.join(flags) or 'none'}")
            n = flags[arg]
            if len(argv[i + 1:i + 1 + n]) < n:
                raise ConfigError(f"option {arg} needs {n} value(s)")
            options[arg] = argv[i + 1:i + 1 + n]
            i += 1 + n
            continue
        rest.append(arg)
        i += 1
    return options, rest


def parse_key_values(argv: list[str], own: tuple[str, ...], usage: str) -> tuple[dict[str, str], list[str]]:
    """``key=value`` arguments split into the entry point's own keys and config overrides."""
    mine: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"arguments are key=value, got {arg!r}; usage: {usage}")
        if key in own:
            mine[key] = value
        else:
            overrides.append(arg)
    return mine, overrides


def require(mine: dict[str, str], keys: tuple[str, ...], usage: str) -> None:
    missing = [k for k in keys if not mine.get(k)]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")


def print_config(cfg: Any) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
