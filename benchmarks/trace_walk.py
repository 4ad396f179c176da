"""The road a request travels: from ``moodguard/cli_evaluate.py:run`` to the first forward pass.

Trains a throw-away tiny run (guard + LM adapter, one step each; not traced), then runs
``moodguard evaluate --monitors guard+maha+ppl`` on it under ``sys.setprofile`` and records every
project function entered between the entry of ``moodguard.cli_evaluate.run`` and the first call
of a ``torch.nn.Module`` (the first forward pass: with no cached statistics that is the fitting
guard pass).

Two walks, both over project code only (mood_data, train, eval, moodguard functions; module and
class bodies, comprehensions and generator resumptions are not entries):

* the REQUEST walk (the headline): the functions the request's configuration passes through, i.e.
  every function entered with an argument that is the parsed command line (``argparse.Namespace``)
  or a configuration object: the ``Recipe``, one of its sections, or anything resolved from them
  (a project dataclass whose class name ends in ``Recipe``, ``Section``, ``Settings``, ``Context``,
  ``Spec`` or ``Plan``). A function that receives plain values (a path, an int) is not on it;
* the CALL walk: every project function entered (data loading and validation included).

For each walk: ``functions`` (distinct functions, in the order first entered), ``modules``
(distinct modules among them) and ``returns`` (in that order, how often the walk enters a
function of a module it had already left: A -> B -> A counts once); the call walk also gives
``calls`` (every entry, loops counted each time). ``hops``: the project frames on the stack at
the first forward (the call chain from the command to the model).

``recipe touches``: over the whole ``evaluate`` command, the distinct source lines outside the
recipe's own modules (``train.recipe*``) that read an attribute of the ``Recipe`` or of one of its
sections, by module: where the whole recipe travels.

    python benchmarks/trace_walk.py [--json OUT] [--keep DIR] [-v]

Prints the walk (``-v``: every function) and the four numbers; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO  # noqa: E402  (the offline environment, the repo on the path)

PACKAGES = ("mood_data", "train", "eval", "moodguard")
CONFIG_SUFFIXES = ("Recipe", "Section", "Settings", "Context", "Spec", "Plan")
CO_OPTIMIZED = 0x1  # functions and lambdas (module and class bodies are not)
SKIP = {"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}
SMALL = ["guard.max_steps=1", "lm.max_steps=1", "guard.max_length=64", "lm.max_length=64", "eval.max_length=64",
         "eval.batch_size=32", "data.max_train_rows=120", "data.max_test_unsafe_per_domain=4",
         "data.max_test_safe_per_domain=8", "guard.global_batch_size=8", "guard.per_device_batch_size=8",
         "lm.global_batch_size=8", "lm.per_device_batch_size=8"]


def module_of(filename: str) -> str | None:
    """Dotted project module of a source file, or None outside the project's packages."""
    try:
        rel = Path(filename).resolve().relative_to(REPO)
    except ValueError:
        return None
    if not rel.parts or rel.parts[0] not in PACKAGES or rel.suffix != ".py":
        return None
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_config(value) -> bool:
    """The parsed command line, or a project configuration object (see the module docstring)."""
    import argparse
    import dataclasses

    if isinstance(value, argparse.Namespace):
        return True
    cls = type(value)
    return (dataclasses.is_dataclass(cls) and cls.__module__.split(".")[0] in PACKAGES
            and cls.__name__.endswith(CONFIG_SUFFIXES))


def summarise(entries: list[tuple[str, str]]) -> dict:
    """functions / modules / returns of a walk given as (module, function) first entries."""
    walk: list[str] = []
    for module, _ in entries:
        if not walk or walk[-1] != module:
            walk.append(module)
    seen: set[str] = set()
    returns = 0
    for m in walk:
        returns += m in seen
        seen.add(m)
    return {"functions": len(entries), "modules": len({m for m, _ in entries}), "returns": returns, "walk": walk,
            "entered": [f"{m}:{q}" for m, q in entries]}


class Walk:
    """A ``sys.setprofile`` hook: records project functions between the entry of ``start`` and
    the first ``torch.nn.Module`` call."""

    def __init__(self, start_module: str, start_name: str):
        self.start = (start_module, start_name)
        self.active = self.done = False
        self.first: list[tuple[str, str]] = []  # call walk: (module, qualname), first entries in order
        self.request: list[tuple[str, str]] = []  # request walk: functions given a configuration argument
        self.hops: list[str] = []
        self.calls = 0
        self._seen_frames: dict[int, object] = {}  # strong refs: ids are not reused meanwhile
        self._seen_funcs: set[tuple[str, str]] = set()
        self._seen_request: set[tuple[str, str]] = set()
        import torch

        mod = torch.nn.Module
        self._stop = {getattr(mod, n).__code__ for n in ("_call_impl", "_wrapped_call_impl") if hasattr(mod, n)}

    def _stack(self, frame) -> list[str]:
        out = []
        while frame is not None:
            module = module_of(frame.f_code.co_filename)
            if module is not None:
                out.append(f"{module}:{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}")
            frame = frame.f_back
        out.reverse()
        i = next((k for k, name in enumerate(out) if name == ":".join(self.start)), 0)
        return out[i:]

    def __call__(self, frame, event, arg):
        if event != "call" or self.done:
            return
        code = frame.f_code
        if self.active and code in self._stop:
            self.active, self.done = False, True
            self.hops = self._stack(frame.f_back)
            sys.setprofile(None)
            return
        module = module_of(code.co_filename)
        if module is None or code.co_name in SKIP or not code.co_flags & CO_OPTIMIZED:
            return
        key = (module, getattr(code, "co_qualname", code.co_name))
        if not self.active:
            if key != self.start:
                return
            self.active = True
        if id(frame) in self._seen_frames:  # a generator resumed: not a new entry
            return
        self._seen_frames[id(frame)] = frame
        self.calls += 1
        if key not in self._seen_funcs:
            self._seen_funcs.add(key)
            self.first.append(key)
        if key not in self._seen_request:
            n_args = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x4) + bool(code.co_flags & 0x8)
            local = frame.f_locals
            values = [local.get(name) for name in code.co_varnames[:n_args]]
            flat = []
            for v in values:
                flat += list(v) if isinstance(v, tuple) else list(v.values()) if isinstance(v, dict) else [v]
            if any(is_config(v) for v in flat):
                self._seen_request.add(key)
                self.request.append(key)

    def numbers(self) -> dict:
        return {"request": summarise(self.request), "calls": {**summarise(self.first), "calls": self.calls},
                "hops": self.hops, "reached_forward": self.done}


def recipe_classes() -> set[type]:
    """``train.recipe.Recipe`` and every dataclass reachable through its fields."""
    import dataclasses
    import typing

    try:
        from train.recipe_schema import Recipe
    except ImportError:  # before the recipe was split by job (b470419): measure the old code too
        from train.recipe import Recipe

    out, todo = set(), [Recipe]
    while todo:
        cls = todo.pop()
        if cls in out:
            continue
        out.add(cls)
        for hint in typing.get_type_hints(cls).values():
            for t in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(t) and isinstance(t, type):
                    todo.append(t)
    return out


class Touches:
    """Records the project source lines that read attributes of recipe objects (patched
    ``__getattribute__`` on the recipe classes while active)."""

    def __init__(self):
        self.places: dict[tuple[str, int], str] = {}
        self._patched: list[tuple[type, object]] = []

    def __enter__(self):
        places = self.places

        for cls in recipe_classes():
            orig = cls.__getattribute__

            def getattribute(obj, name, _orig=orig):
                if not name.startswith("__"):
                    f = sys._getframe(1)
                    module = module_of(f.f_code.co_filename)
                    if module is not None and not module.startswith("train.recipe"):
                        places.setdefault((module, f.f_lineno), getattr(f.f_code, "co_qualname", f.f_code.co_name))
                return _orig(obj, name)

            self._patched.append((cls, cls.__dict__.get("__getattribute__")))
            cls.__getattribute__ = getattribute
        return self

    def __exit__(self, *exc):
        for cls, old in self._patched:
            if old is None:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = old

    def numbers(self) -> dict:
        by_module: dict[str, int] = {}
        for module, _ in self.places:
            by_module[module] = by_module.get(module, 0) + 1
        return {"places": len(self.places), "modules": len(by_module), "by_module": dict(sorted(by_module.items())),
                "functions": sorted({f"{m}:{q}" for (m, _), q in self.places.items()})}


def train_tiny(recipe_path: Path, out: Path) -> list[str]:
    """A guard and an LM adapter of one step each under ``out`` (not traced); the overrides."""
    from train.guard import train_guard
    from train.lm import train_lm
    from train.recipe import load_recipe

    overrides = [*SMALL, f"output_dir={out}"]
    recipe = load_recipe(recipe_path, overrides)
    train_guard(recipe)
    train_lm(recipe)
    return overrides


def trace(recipe_path: Path, overrides: list[str]) -> dict:
    from moodguard.cli import main

    walk = Walk("moodguard.cli_evaluate", "run")
    with Touches() as touches:
        sys.setprofile(walk)
        try:
            rc = main(["evaluate", "--recipe", str(recipe_path), "--monitors", "guard+maha+ppl", "--no-plots",
                       "--n-boot", "10", "--device", "cpu", *overrides])
        finally:
            sys.setprofile(None)
    if rc != 0:
        raise SystemExit(f"evaluate exited with {rc}")
    return {**walk.numbers(), "recipe_touches": touches.numbers()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "tiny" / "s.yaml"))
    p.add_argument("--json", default=None, help="write the numbers (and the walk) here")
    p.add_argument("--keep", default=None, help="run folder to use (kept); default: a temporary folder")
    p.add_argument("-v", "--verbose", action="store_true", help="print every function entered")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="moodguard-trace-") as tmp:
        run = Path(args.keep or Path(tmp) / "run")
        overrides = train_tiny(Path(args.recipe), run)
        out = trace(Path(args.recipe), overrides)
    if not out["reached_forward"]:
        raise SystemExit("the trace never reached a forward pass")
    for title, key in (("request walk (functions given the configuration)", "request"),
                       ("call walk (every project function)", "calls")):
        w = out[key]
        print(f"== {title}")
        if args.verbose:
            for i, name in enumerate(w["entered"], 1):
                print(f"{i:4d} {name}")
        print("   " + " -> ".join(w["walk"]))
        print(f"   functions {w['functions']}  modules {w['modules']}  returns {w['returns']}"
              + (f"  calls {w['calls']}" if "calls" in w else ""))
    print(f"== hops (stack at the first forward): {len(out['hops'])}")
    print("   " + " -> ".join(out["hops"]))
    t = out["recipe_touches"]
    print(f"== recipe touches outside train.recipe*: {t['places']} places in {t['modules']} modules")
    print("   " + ", ".join(f"{m} {n}" for m, n in t["by_module"].items()))
    if args.verbose:
        for name in t["functions"]:
            print(f"     {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
