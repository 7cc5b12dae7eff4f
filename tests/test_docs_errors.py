"""docs/errors.md matches the code: its exit-code, memory-flag and error-type tables are walked row by
row against resp_plugin.failures and resp_plugin.errors, and every test its tables cite exists."""

from __future__ import annotations

import builtins
import errno
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from resp_plugin import errors
from resp_plugin.failures import LOG_NAME, MEMORY_KNOBS, handle

DOC = Path(__file__).parents[1] / "docs" / "errors.md"
TESTS = Path(__file__).parent


def _tables() -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of the doc: (header cells, rows of cells)."""
    tables, lines = [], DOC.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|- "):
            if i and lines[i - 1].startswith("|"):
                continue
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            tables.append((_cells(line), rows))
    return tables


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split(" | ")]


def _table(*header: str) -> list[list[str]]:
    found = [rows for head, rows in _tables() if tuple(head) == header]
    assert len(found) == 1, f"docs/errors.md has {len(found)} tables headed {header}"
    return found[0]


def _code(cell: str) -> str:
    found = re.findall(r"`([^`]+)`", cell)
    assert len(found) == 1, cell
    return found[0]


def _chained_oom() -> BaseException:
    try:
        try:
            raise MemoryError()
        except MemoryError as e:
            raise RuntimeError("MESSAGE") from e
    except RuntimeError as e:
        return e


# One or more exceptions of each kind the exit-code table names, handed to the real handler.
EXAMPLES = {
    "a user error": [errors.UserError("MESSAGE"), errors.ConfigError("MESSAGE"), errors.InputNotFound("MESSAGE")],
    "out of memory": [torch.OutOfMemoryError("MESSAGE"), MemoryError("MESSAGE"),
                      RuntimeError("MESSAGE: DefaultCPUAllocator: can't allocate memory"), _chained_oom()],
    "the run was stopped from outside": [errors.RunAborted("MESSAGE"), OSError(errno.ENOSPC, "MESSAGE")],
    "anything else": [ZeroDivisionError("MESSAGE"), ValueError("MESSAGE"), FileNotFoundError("MESSAGE")],
    "Ctrl-C": [KeyboardInterrupt()],
}


def _pattern(template: str, log: Path) -> str:
    """The one-line template as a regex: MESSAGE and TYPE match anything, LOG the log's path."""
    knobs = "(?:" + "|".join(re.escape("; ".join(k)) for k in MEMORY_KNOBS.values()) + ")"
    parts = re.split(r"(MESSAGE|TYPE|LOG|KNOBS)", template)
    sub = {"MESSAGE": ".+", "TYPE": r"\w+", "LOG": re.escape(str(log)), "KNOBS": knobs}
    return "".join(sub.get(p, re.escape(p)) for p in parts)


def test_exit_code_table_is_what_the_handler_does(tmp_path, capsys):
    rows = _table("exit", "what happened", "stderr (one line)", "LOG")
    kinds = {next(k for k in EXAMPLES if what.startswith(k)) for _, what, _, _ in rows}
    assert kinds == set(EXAMPLES)
    for i, (code, what, stderr, written) in enumerate(rows):
        for name in re.findall(r"`([\w.]+(?:Error|Interrupt|Aborted))`", what):  # the named types exist
            owner = torch if name.startswith("torch.") else errors if hasattr(errors, name) else builtins
            assert getattr(owner, name.removeprefix("torch."), None) is not None, name
        kind = next(k for k in EXAMPLES if what.startswith(k))
        for j, exc in enumerate(EXAMPLES[kind]):
            out = tmp_path / f"run-{i}-{j}"
            args = SimpleNamespace(command="prune", out=str(out))
            assert handle(exc, args, ["prune", "M", "--out", str(out)], debug=False) == int(code), (kind, exc)
            err = capsys.readouterr().err
            assert re.fullmatch(_pattern(_code(stderr), out / LOG_NAME), err.strip()), (stderr, err)
            assert (out / LOG_NAME).is_file() == (written == "written"), (kind, exc)


def test_memory_knobs_table_is_the_handlers(tmp_path):
    rows = _table("command", "KNOBS")
    assert {cmd.strip("`").removeprefix("resp ") for cmd, _ in rows} == set(MEMORY_KNOBS)
    for cmd, knobs in rows:
        assert knobs == "; ".join(MEMORY_KNOBS[cmd.strip("`").removeprefix("resp ")])


def test_error_type_table_is_resp_plugin_errors(tmp_path, capsys):
    rows = _table("type", "also a", "raised for", "exit")
    defined = {name for name, obj in vars(errors).items()
               if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__}
    assert {_code(t) for t, *_ in rows} == defined
    for typ, also, _, code in rows:
        cls = getattr(errors, _code(typ))
        assert issubclass(cls, getattr(builtins, _code(also))), (typ, also)
        exc = cls("MESSAGE")
        assert handle(exc, SimpleNamespace(command="report", out=str(tmp_path)), [], debug=False) == int(code), typ
        capsys.readouterr()


def _resolves(ref: str, case_ids: set[str]) -> bool:
    """A test reference of the doc's tables: module::function(…), module[CASE], module, or a CASE id."""
    ref = ref.strip()
    if ref.startswith(("—", "same")):
        return True
    m = re.fullmatch(r"(test_\w+)(?:::(\w+)(…)?|\[([\w-]+)\])?", ref)
    if m is None:
        return ref in case_ids
    module, func, abridged, case = m.groups()
    path = TESTS / f"{module}.py"
    if not path.is_file():
        return False
    if func is not None:
        return re.search(rf"^def {func}{'' if abridged else '[(]'}", path.read_text(), re.M) is not None
    return case is None or case in case_ids


def test_every_cited_test_exists():
    sys.path.insert(0, str(TESTS))
    from test_entrypoint_errors import CASES

    case_ids = {c.id for c in CASES}
    cited = [(row[0], ref) for head, rows in _tables() if head[-1] in ("test", "case")
             for row in rows for ref in row[-1].split(", ")]
    assert len(cited) > 40
    missing = [(cond, ref) for cond, ref in cited if not _resolves(ref, case_ids)]
    assert not missing, missing
