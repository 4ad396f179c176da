"""The detector protocol on a tiny model (the shipped ``embedded:tiny-s``): EVERY table entry
goes through fit -> score -> save -> load on the inputs its pass really produces (pytorch-ood's
"every detector" smoke test), and docs/architecture.md's worked example (one class + one table
entry) is run as written."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    """The tiny-s base as a shared backbone with two random guard heads (the guard and one more
    ensemble member), its tokenizer, and a few labelled conversations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.engine.forward import SharedBackbone
    from mood_data.embedded import model_path

    path = str(model_path("embedded:tiny-s"))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    hidden = model.config.hidden_size
    backbone = SharedBackbone(model, torch.nn.Linear(hidden, 2).eval(), has_lm=False)
    backbone.heads["guard-seed1"] = torch.nn.Linear(hidden, 2).eval()
    rows = make_rows(3, split="train")  # every ID domain, safe and unsafe
    return backbone, AutoTokenizer.from_pretrained(path), rows


@pytest.fixture(scope="module")
def inputs(tiny):
    """``{need: (inputs to score, (inputs, malign) batches to fit on)}`` from the real passes."""
    from eval.engine.detectors.base import (FEATURES, JUDGE_SCORES, LOG_ODDS, LOGITS, MEMBER_LOG_ODDS, NEEDS,
                                            TOKEN_NLL)
    from eval.engine.detectors.logits import guard_scores
    from eval.engine.forward import encode, guard_pass
    from eval.engine.judge_pass import Judge
    from eval.engine.perplexity import token_nll_pass
    from train.judge_prompts import load_rubric

    backbone, tok, rows = tiny
    convs = [r["conversation"] for r in rows]
    malign = np.array([r["malign"] for r in rows])
    enc = encode(tok, convs, 64)
    batches, index = [], []

    def keep(batch):
        batches.append((batch.features[-1], malign[batch.index]))
        index.append(batch.index)

    logits = guard_pass(backbone, enc, batch_size=8, layers=[-1], on_batch=keep)
    features = np.empty((len(convs), batches[0][0].shape[1]))
    for (f, _), idx in zip(batches, index):
        features[idx] = f.numpy()
    members = np.stack([guard_scores(guard_pass(backbone, enc, batch_size=8, adapter=name)) for name in backbone.heads],
                       axis=1)
    judge = Judge(backbone, None, tok, "embedded:tiny-s", None, None, [], 256)
    answers = {r: judge.score(load_rubric(None, r), convs, 8)[0] for r in ("alignment", "uncertainty")}
    out = {LOGITS: logits, LOG_ODDS: guard_scores(logits), FEATURES: features,
           TOKEN_NLL: token_nll_pass(backbone, enc, batch_size=8), MEMBER_LOG_ODDS: members, JUDGE_SCORES: answers}
    assert set(out) == set(NEEDS)  # a new kind of input needs a line here
    fit_batches = {need: [(x, malign)] for need, x in out.items()}
    fit_batches[FEATURES] = batches  # the fitted ones: fed batch by batch, as fitting does
    return {need: (x, fit_batches[need]) for need, x in out.items()}, len(convs)


def _settings(cls):
    """A detector's settings as every command resolves them (the tiny recipe's defaults)."""
    from eval.engine.table import NAMES
    from eval.run.context import resolve
    from train.recipe import load_recipe

    ctx = resolve(load_recipe(ROOT / "recipes" / "tiny" / "s.yaml"), list(NAMES))
    return ctx.detector_settings.get(cls.name, cls.Settings() if not cls.requires_fit else None)


def test_every_detector_fits_scores_saves_and_loads(inputs, tmp_path):
    from eval.engine.table import DETECTORS

    by_need, n = inputs
    for name, cls in DETECTORS.items():
        x, batches = by_need[cls.needs]
        det = cls.fit_stream(_settings(cls), batches, metadata={"detector": name})
        scores = det.score(x)
        assert scores.shape == (n,) and scores.dtype == np.float64, name
        assert np.isfinite(scores).all(), name
        assert np.ptp(scores) > 0, f"{name}: every row scored the same"
        path = det.save(tmp_path / name, name)
        assert path.is_file()
        back = cls.load(tmp_path / name, name)
        np.testing.assert_array_equal(back.score(x), scores, err_msg=name)
        assert back.settings == det.settings, name
        if cls.requires_fit:  # a fitted detector's file is refused by another kind
            other = next(c for c in DETECTORS.values() if c.requires_fit and c is not cls)
            from mood_data.errors import BundleError

            with pytest.raises(BundleError):
                other.load(tmp_path / name, name)


def test_fitted_detectors_fit_only_what_they_should(inputs):
    """The fitted detectors see the batches the guard pass streams: kNN keeps the safe rows only;
    Mahalanobis (plain) is fitted on the safe rows only (unsafe rows change nothing)."""
    from eval.engine.detectors.base import FEATURES
    from eval.engine.table import DETECTORS

    by_need, _ = inputs
    x, batches = by_need[FEATURES]
    safe_only = [(f[m == 0], m[m == 0]) for f, m in batches]
    for name in ("maha", "knn"):
        cls = DETECTORS[name]
        a = cls.fit_stream(_settings(cls), batches).score(x)
        b = cls.fit_stream(_settings(cls), safe_only).score(x)
        np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=name)


def _worked_example() -> str:
    """The python block after ``<!-- detector-example -->`` in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- detector-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/architecture.md lost its detector example"
    return m.group(1)


def test_adding_a_detector_is_one_class_and_one_entry(tiny, monkeypatch, tmp_path):
    """docs/architecture.md's worked example, run as written: the class, then the table entry;
    the monitor parser, the planner and the one guard pass pick it up with nothing else changed."""
    from eval.engine import table
    from eval.engine.detectors.logits import guard_logprob
    from eval.engine.forward import encode, guard_pass
    from eval.engine.planner import ScoreSettings, plan, score_shared

    namespace: dict = {}
    exec(compile(_worked_example(), "docs/architecture.md", "exec"), namespace)
    cls = namespace["LogProb"]
    assert cls.name not in table.DETECTORS
    monkeypatch.setitem(table.DETECTORS, cls.name, cls)  # the one table entry
    assert table.parse_monitor("guard+logprob") == ("guard", "logprob")
    p = plan(["guard", "logprob"])
    assert p.guard == ("guard", "logprob") and not p.lm and not p.features
    backbone, tok, rows = tiny
    convs = [r["conversation"] for r in rows]
    got, _ = score_shared(p, backbone, tok, convs, {}, ScoreSettings(max_length=64, batch_size=8))
    logits = guard_pass(backbone, encode(tok, convs, 64), batch_size=8)
    np.testing.assert_allclose(got["logprob"], guard_logprob(logits))
    det = cls.fit_stream(cls.Settings(), [])
    det.save(tmp_path, "logprob")
    np.testing.assert_array_equal(cls.load(tmp_path, "logprob").score(logits), got["logprob"])
