"""The command line: help lists every command, `python -m harness` works, bad input is one line and exit 2."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import typer

from harness.cli import app, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> int:
    """The real CLI entry, in process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code


def test_help_lists_every_command_with_one_line(capsys):
    group = typer.main.get_command(app)
    assert "data" in group.commands
    assert run("--help") == 0
    text = capsys.readouterr().out
    for name, command in group.commands.items():
        assert name in text
        assert command.get_short_help_str().strip(), f"`fluidbench {name}` has no help line"
    assert run("data", "--help") == 0
    text = capsys.readouterr().out
    for name in ("shapes", "shapes-render", "check"):
        assert name in text


def test_python_dash_m_harness_works():
    result = subprocess.run([sys.executable, "-m", "harness", "data", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "shapes-render" in result.stdout


def broken_tar(path: Path) -> Path:
    with tarfile.open(path.with_suffix(".good"), "w") as tar:
        for name, data in (("a.png", b"\x89PNG" + bytes(2000)), ("a.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(path.with_suffix(".good").read_bytes()[:1500])
    return path


def bad_input_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, text the one-line error must contain)."""
    coco = tmp / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2014").mkdir()
    (coco / "annotations" / "captions_val2014.json").write_text('{"images": [{"id": 1,')
    return [
        (["data", "check", "--kind", "coco", "--path", str(tmp / "missing")], f"{tmp / 'missing'}: COCO folder"),
        (["data", "check", "--kind", "shapes", "--path", str(tmp / "missing")], f"{tmp / 'missing'}: not a ShapesT2I"),
        (["data", "check", "--kind", "coco", "--path", str(coco), "--split", "val"],
         "captions_val2014.json: malformed JSON"),
        (["data", "check", "--kind", "wds", "--path", str(broken_tar(tmp / "shard.tar"))],
         "shard.tar: broken tar shard"),
        (["data", "check", "--kind", "wds", "--path", str(tmp / "nope-{0..3}.tar")], "nope-0.tar: WebDataset shard"),
        (["data", "check", "--kind", "imagenet", "--path", str(tmp)], "data kind 'imagenet'"),
        (["data", "shapes", "--out", str(tmp / "s"), "--size", "20"], "--size: expected 32 or 64"),
        (["data", "shapes-render", "--prompts", str(tmp / "p.jsonl"), "--out", str(tmp / "r")],
         "p.jsonl: prompt file not found"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for args, expected in bad_input_cases(tmp_path):
        assert run(*args) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, captured.err)
        assert "Traceback" not in captured.err + captured.out


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness", "data", "check", "--kind", "wds", "--path",
                             str(broken_tar(tmp_path / "shard.tar"))], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'shard.tar'}: broken tar shard "
                                                  "(unexpected end of data)"]
