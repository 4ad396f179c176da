"""What a command prints: quiet by default, the detail back with ``-v``.

:func:`configure` is called once by every entry point (the ``moodguard`` dispatcher and the
``python -m train.<kind>`` modules that ``accelerate launch`` starts). By default it

* shows our own long loops (:func:`progress`) as a tqdm bar on a terminal and as a plain
  ``desc: i/n batch (elapsed)`` line every ``LOG_EVERY_S`` seconds otherwise;
* hides the progress bars of datasets / huggingface_hub / transformers when stderr is not a
  terminal (our own bars use ``tqdm(disable=None)``, which does the same) and Trainer's bar
  (see :func:`show_progress`; plain periodic log lines replace it);
* drops the loader's expected ``LOAD REPORT`` block when the only finding is the freshly
  initialised classification head (``score.*`` MISSING: the guard head we train);
* drops DeepSpeed's "Setting accelerator to CPU" notice (printed on import on a CPU machine);
* drops peft's use of the deprecated ``is_gradient_checkpointing`` property (a FutureWarning
  raised inside peft, not caused by any argument of ours).

``verbose=True`` (``moodguard -v``) changes none of this. The choice is passed to child
processes through ``MOODGUARD_VERBOSE`` so a launched training run behaves the same.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

ENV = "MOODGUARD_VERBOSE"
# a LOAD REPORT whose rows are all the classification head, MISSING (newly initialised)
_HEAD_ROW = re.compile(r"^\s*score\.(weight|bias)\s*\|\s*MISSING\s*\|")
_ROW = re.compile(r"^\s*[\w.\-]+\s*\|\s*[A-Z_]+\s*\|")


def verbose() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def show_progress() -> bool:
    """Progress bars only on a terminal (or with -v); logs get plain periodic lines instead."""
    return is_tty() or verbose()


def expected_load_report(message: str) -> bool:
    """True for a transformers LOAD REPORT listing only ``score.*`` MISSING rows."""
    if "LOAD REPORT" not in message:
        return False
    rows = [line for line in message.splitlines() if _ROW.match(line)]
    return bool(rows) and all(_HEAD_ROW.match(line) for line in rows)


class _Drop(logging.Filter):
    def __init__(self, predicate):
        super().__init__()
        self.predicate = predicate

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.predicate(record.getMessage())
        except Exception:  # noqa: BLE001  (a filter must never break logging)
            return True


_installed = False


def configure(verbose_flag: bool | None = None) -> None:
    """Set the output policy for this process (and, via the environment, its children)."""
    global _installed
    if verbose_flag is not None:
        os.environ[ENV] = "1" if verbose_flag else "0"
    if verbose():
        return
    if not is_tty():
        for var in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(var, "1")
    if _installed:
        return
    _installed = True
    # filters on the loggers themselves: they apply to records logged there directly
    logging.getLogger("transformers.modeling_utils").addFilter(_Drop(expected_load_report))
    logging.getLogger("DeepSpeed").addFilter(_Drop(lambda m: m.startswith("Setting accelerator to CPU")))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


LOG_EVERY_S = 30.0


def progress(iterable: Iterable[T], desc: str = "", unit: str = "it", total: int | None = None,
             leave: bool = True, every_s: float | None = None, file=None) -> Iterator[T]:
    """A tqdm bar on a terminal (or with -v); in a log, one plain line every ``every_s``
    seconds (default :data:`LOG_EVERY_S`) and nothing for a loop that ends sooner."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if show_progress():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, disable=False)
        return
    every = LOG_EVERY_S if every_s is None else every_s
    t0 = last = time.monotonic()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            of = f"/{total}" if total else ""
            print(f"{desc}: {i}{of} {unit} ({now - t0:.0f}s)", file=file or sys.stderr, flush=True)
