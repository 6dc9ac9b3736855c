"""Progress bars: on a terminal's stderr when enabled, absent otherwise (logs stay clean)."""

from __future__ import annotations

import io

from megatron_vcap.progress import progress


def test_bar_on_a_given_stream_and_nothing_when_disabled_or_not_a_tty(capsys):
    out = io.StringIO()
    assert list(progress(range(3), total=3, desc="videos", unit="video", file=out)) == [0, 1, 2]
    assert "videos" in out.getvalue() and "3/3" in out.getvalue()
    off = io.StringIO()
    assert list(progress(range(3), enabled=False, file=off)) == [0, 1, 2]
    assert off.getvalue() == ""
    assert list(progress(iter("ab"), desc="x")) == ["a", "b"]  # stderr is captured: no TTY
    assert capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_data_synth_and_validate_show_bars_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    from megatron_vcap.cli import main

    def run(argv):
        assert main(argv) == 0

    synth = ["data", "synth", "--num-videos", "2", "--no-tokenizer", "--width", "32",
             "--height", "32", "--seconds", "1"]  # fmt: skip
    run([*synth, "--out", str(tmp_path / "piped")])
    run(["data", "validate", str(tmp_path / "piped" / "manifest.jsonl")])
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bars
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run([*synth, "--out", str(tmp_path / "tty")])
    run(["data", "validate", str(tmp_path / "tty" / "manifest.jsonl")])
    assert "videos" in term.getvalue() and "2/2" in term.getvalue()
    assert "samples" in term.getvalue()
