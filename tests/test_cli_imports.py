"""The `roe` command's import graph: a subcommand's module is imported only when that subcommand runs, so
`roe bench` works on a machine with PyTorch and transformers but without the server's or the tuner's packages;
and no module in the package imports `roe.cli` back (the shared options live in `roe.options`)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from roe import cli

SRC = Path(__file__).resolve().parents[1] / "src" / "roe"
MISSING = ("fastapi", "pydantic", "uvicorn", "optuna", "matplotlib", "lm_eval")

# Python run in a subprocess where MISSING cannot be imported (None in sys.modules makes `import x` fail with
# ModuleNotFoundError, as on a machine without the package).
SHIM = "import sys\nfor name in {missing!r}: sys.modules[name] = None\n"


def _run(body: str) -> subprocess.CompletedProcess:
    code = SHIM.format(missing=MISSING) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_bench_runs_without_server_tuner_or_lm_eval_packages(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(f"""
import json
from roe.cli import main
try:
    main(["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
top = sorted(m for m in sys.modules if m.startswith("roe.") or m in ("torch", "transformers"))
try:
    main(["bench", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
after_help = sorted(m for m in sys.modules if m.startswith("roe.") or m in ("torch", "transformers"))
rc = main(["bench", "--model", "builtin", "-k", "2", "--prompt-tokens", "4", "--new-tokens", "2", "--cache", "clean",
           "--independent-k", "", "--naive-k", "", "--batch-sizes", "1", "--no-hf", "--compile", "off",
           "--json", {str(out)!r}])
ran = sorted(m for m in sys.modules if m.startswith("roe."))
print("RESULT" + json.dumps({{"top": top, "after_help": after_help, "ran": ran, "rc": rc}}))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--compile" in proc.stdout and "--prompt-tokens" in proc.stdout  # bench's own help was printed
    for word in cli.COMMANDS:
        assert word in proc.stdout  # `roe --help` lists every subcommand ...
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    modules = {"roe.bench", "roe.server", "roe.tune", "roe.demo", "roe.train", "roe.evaluate", "torch", "transformers"}
    assert not modules & set(result["top"])  # ... without importing any subcommand's module, torch or transformers
    assert not modules & set(result["after_help"])  # `roe bench --help` answers from roe.parsers alone
    assert modules & set(result["ran"]) == {"roe.bench"}  # running bench imports bench, not the others
    assert result["rc"] == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["k"]) for r in rows} >= {("base", 1), ("roe", 2)}


def test_a_missing_package_is_a_one_line_error():
    proc = _run("from roe.cli import main\nsys.exit(main(['serve', '--port', '0']))\n")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].endswith("`roe serve` needs the Python package 'pydantic', which is not installed")


def _imports(path: Path) -> set[str]:
    """Absolute names of the roe modules a file imports (relative imports resolved)."""
    package = ".".join(("roe", *path.relative_to(SRC).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def test_no_module_imports_the_cli():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10 and SRC / "bench.py" in files
    assert "roe.options" in _imports(SRC / "bench.py")  # the check sees relative imports inside functions
    offenders = [str(f.relative_to(SRC)) for f in files if f.name != "cli.py" and "roe.cli" in _imports(f)]
    assert offenders == []


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_listed_help_is_the_subcommands_own(name):
    """The one-line help `roe --help` shows (without importing the module) is the one the module registers."""
    parser = cli.build_parser(name)
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert helps[name] == cli.COMMANDS[name][1]
    assert sub.choices[name].add_help  # the real subparser, not the placeholder
