"""`roe generate -n` and the `--compile` option every command shares."""

import pytest

from roe import RosterOfExperts
from roe.cli import build_parser, main
from roe.options import load_roster

PROMPT = "x = 2\nprint(x + 3)\n# Output:\n"
ARGS = ["--model", "builtin", "-k", "2", "--tau", "0.3", "--skip-layers", "1", "--seed", "5"]


def test_n_prints_each_completion_with_its_own_seed(capsys):
    assert main(["generate", PROMPT, *ARGS, "-n", "3", "--do-sample", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    parts = out.split("--- completion ")
    assert parts[0] == "" and len(parts) == 4
    printed = [p.split(" ---\n", 1)[1].removesuffix("\n") for p in parts[1:]]
    assert [p.split(" ---")[0] for p in parts[1:]] == ["1 of 3", "2 of 3", "3 of 3"]
    roster = RosterOfExperts.from_pretrained("builtin").with_config(num_samples=2, tau=0.3, skip_layers=1, seed=5)
    alone = [roster.generate(PROMPT, max_new_tokens=6, do_sample=True, seeds=[5 + i])[0] for i in range(3)]
    assert printed == alone  # completion i is the one of seed + i
    assert len(set(printed)) > 1


def test_n_must_be_positive(capsys):
    assert main(["generate", PROMPT, *ARGS, "-n", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: -n must be at least 1, got 0"


@pytest.mark.parametrize("command", ["generate", "eval", "tune", "bench", "serve"])
def test_every_command_takes_compile(command):
    positional = [PROMPT] if command == "generate" else []
    parser = build_parser(command)
    assert parser.parse_args([command, *positional]).compile == "auto"
    assert parser.parse_args([command, *positional, "--compile", "off"]).compile == "off"
    with pytest.raises(SystemExit) as e:
        parser.parse_args([command, *positional, "--compile", "fast"])
    assert e.value.code == 2


def test_load_roster_passes_compile():
    parser = build_parser("generate")
    assert load_roster(parser.parse_args(["generate", PROMPT, "--compile", "off"])).compile == "off"
    assert load_roster(parser.parse_args(["generate", PROMPT])).compile == "auto"
