"""The README's `roe` examples parse as written (every optional [...] part included), and progress outside a
terminal is plain lines, never carriage-return bar frames."""

import io
import re
import shlex
from pathlib import Path

import pytest

from roe.cli import build_parser, main
from roe.progress import LineProgress, progress

README = Path(__file__).resolve().parents[1] / "README.md"


def _bash_words(line: str) -> list[str]:
    """shlex words, with bash's $'...' quoting (the README's newline in a prompt) decoded."""
    quoted = re.findall(r"\$'((?:[^'\\]|\\.)*)'", line)
    line = re.sub(r"\$'((?:[^'\\]|\\.)*)'", "__ANSI_C__", line)
    words = shlex.split(line)
    decoded = iter(q.encode().decode("unicode_escape") for q in quoted)
    return [next(decoded) if w == "__ANSI_C__" else w for w in words]


def _examples() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands, pending = [], ""
    for block in blocks:
        for raw in block.splitlines():
            line = pending + raw.split("  #")[0].strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line.startswith("roe "):
                line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # an optional part: include it
                commands.append(_bash_words(line)[1:])
    return commands


EXAMPLES = _examples()


def test_the_readme_has_an_example_of_every_command():
    assert {argv[0] for argv in EXAMPLES} >= {"generate", "eval", "tune", "bench", "serve", "train-builtin",
                                              "export-tasks", "demo"}


@pytest.mark.parametrize("argv", EXAMPLES, ids=[" ".join(a)[:40] for a in EXAMPLES])
def test_readme_example_parses(argv):
    args = build_parser(argv[0]).parse_args(argv)  # SystemExit (code 2) on any argument the parser refuses
    if argv[0] == "generate":
        assert "\n" in args.prompt and "\\n" not in args.prompt  # a newline, not a backslash and an n


def test_progress_outside_a_terminal_is_lines():
    out = io.StringIO()
    bar = progress(total=3, desc="math K=8", file=out)
    assert isinstance(bar, LineProgress)
    bar.every = 0  # a line per update here; every LINE_EVERY_S seconds in use
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines()[:3] == [f"math K=8: {n}/3 (0s)" for n in (1, 2, 3)]


def test_eval_writes_no_bar_frames_and_titles_the_file(tmp_path, capsys):
    items = tmp_path / "mine.jsonl"
    items.write_text("".join('{"question": "What is %d + 1?", "answer": "#### %d"}\n' % (i, i + 1) for i in range(5)))
    assert main(["eval", "--model", "builtin", "--task", "math", "-k", "1", "--file", str(items), "--dtype",
                 "float32"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    assert f"({items},5items" in "".join(out.split())  # the table's title, however rich wraps it


def test_bad_eval_input_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from roe import options

    monkeypatch.setattr(options, "load_roster", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    assert main(["eval", "--task", "math", "--file", str(tmp_path / "bad.jsonl")]) == 2
    assert "missing field 'answer'" in capsys.readouterr().err
    assert main(["generate", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
