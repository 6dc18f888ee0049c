"""``sparsekern`` itself: its commands listed, an unknown one refused, its version."""

import re
from pathlib import Path

from sparsekern.cli import COMMANDS, main


def test_usage_version_and_unknown_commands(capsys):
    assert main([]) == 2
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in COMMANDS)
    assert main(["--help"]) == 0 and "sparsekern --version" in capsys.readouterr().out
    assert main(["finetuen"]) == 2
    assert capsys.readouterr().err.startswith("sparsekern: unknown command 'finetuen'")
    project = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"$', project, re.M).group(1)
    for flag in ("--version", "-V"):
        assert main([flag]) == 0 and capsys.readouterr().out == f"sparsekern {version}\n"


def test_ctrl_c_before_a_run_starts_is_one_line(capsys, monkeypatch):
    """Ctrl-C while a command is still setting up (importing, parsing): one line, exit 130."""
    import sparsekern.cli.report as report

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "main", interrupted)
    assert main(["report", "x.safetensors"]) == 130
    assert capsys.readouterr().err == "\nsparsekern report: interrupted\n"
