"""Quiet by default, detail with -v (mood_data.console) and a help text without RST markup."""
from __future__ import annotations

import subprocess
import sys

from moodguard.cli import build_parser
from mood_data.console import expected_load_report

HEAD_ONLY = ("\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: tiny-s\n"
             "Key          | Status  | \n-------------+---------+-\nscore.weight | MISSING | \n\n"
             "Notes:\n- MISSING:\tthose params were newly initialized because missing from the checkpoint.")
OTHER = HEAD_ONLY.replace("score.weight | MISSING | \n", "score.weight | MISSING | \nmodel.norm.weight | UNEXPECTED | \n")

SCRIPT = """
import logging, sys, warnings
from mood_data.console import configure
configure({verbose})
logging.basicConfig(stream=sys.stderr)
logging.getLogger("transformers.modeling_utils").warning({head!r})
logging.getLogger("transformers.modeling_utils").warning({other!r})
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
"""


def test_expected_load_report_is_only_the_new_head():
    assert expected_load_report(HEAD_ONLY)
    assert not expected_load_report(OTHER)  # a real problem is still shown
    assert not expected_load_report("some other warning")


def _run(verbose: bool) -> str:
    code = SCRIPT.format(verbose=verbose, head=HEAD_ONLY, other=OTHER)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_quiet_by_default_and_verbose_restores():
    quiet = _run(False)
    assert quiet.count("LOAD REPORT") == 1 and "UNEXPECTED" in quiet  # only the unexpected report
    assert "Setting accelerator" not in quiet and "FutureWarning" not in quiet
    loud = _run(True)
    assert loud.count("LOAD REPORT") == 2 and "Setting accelerator" in loud and "FutureWarning" in loud


def test_help_has_no_rst_markup_and_a_verbose_flag():
    text = build_parser().format_help()
    assert "``" not in text and "-v, --verbose" in text


def test_progress_in_a_log_prints_plain_periodic_lines(capsys, monkeypatch):
    from mood_data import console

    monkeypatch.setattr(console, "is_tty", lambda: False)
    monkeypatch.delenv(console.ENV, raising=False)
    clock = iter(range(0, 1000, 10))  # every step takes 10 s
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    assert list(console.progress(range(7), desc="guard forward", unit="batch", every_s=25)) == list(range(7))
    err = capsys.readouterr().err
    assert err.splitlines() == ["guard forward: 3/7 batch (30s)", "guard forward: 6/7 batch (60s)"]
    assert "\r" not in err
    clock = iter(range(0, 1000, 1))  # a short loop prints nothing
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    list(console.progress(range(5), desc="x", every_s=25))
    assert capsys.readouterr().err == ""
