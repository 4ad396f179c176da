"""The embedded tiny backbones: shipped folders, loading, tokenizer, perplexity, build pipeline."""
from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from mood_data.domains import ID_DOMAINS
from mood_data.errors import DataError, MoodguardError
from mood_data.render import render
from train import tiny
from train.tiny import EMBEDDED_MODELS_DIR, FAMILY

from conftest import make_rows, write_jsonl

SHIPPED = [EMBEDDED_MODELS_DIR / f"tiny-{s}" for s in FAMILY]
TEST_SPLIT = EMBEDDED_MODELS_DIR.parent / "benchmark" / "test.jsonl.gz"


def _shipped_or_skip():
    missing = [p for p in SHIPPED if not (p / "model.safetensors").is_file()]
    if missing:
        pytest.fail(f"embedded models missing: {missing} (run 'moodguard models build-tiny')")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    _shipped_or_skip()
    return AutoTokenizer.from_pretrained(SHIPPED[0])


@pytest.fixture(scope="module")
def id_test_texts():
    if not TEST_SPLIT.is_file():
        pytest.skip("embedded benchmark test split not built")
    rows = []
    with gzip.open(TEST_SPLIT, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["domain"] in ID_DOMAINS:
                rows.append(row)
    # two short conversations from each ID domain, deterministic
    out = []
    for d in ID_DOMAINS:
        mine = sorted((r for r in rows if r["domain"] == d), key=lambda r: r["id"])[:2]
        out += [r["conversation"] for r in mine]
    return out


# --- the shipped folders ------------------------------------------------------------------

def test_shipped_files_and_size():
    _shipped_or_skip()
    for folder in SHIPPED:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), folder / name
    total = sum(f.stat().st_size for f in EMBEDDED_MODELS_DIR.rglob("*") if f.is_file())
    assert total < 12 * 2**20
    readme = (EMBEDDED_MODELS_DIR / "README.md").read_text()
    assert all(f"`{p.name}`" in readme for p in SHIPPED) and "Licence" in readme
    # one tokenizer for the whole family
    blobs = {(f / "tokenizer.json").read_bytes() for f in SHIPPED}
    assert len(blobs) == 1


def test_tokenizer_defaults(tok):
    cfg = json.loads((SHIPPED[0] / "tokenizer_config.json").read_text())
    assert cfg["padding_side"] == "left" and cfg["truncation_side"] == "left"
    assert "chat_template" in cfg
    assert tok.padding_side == "left" and tok.truncation_side == "left"
    assert tok.pad_token == "<pad>" and tok.pad_token_id is not None
    assert 3500 <= len(tok) <= 4200
    # the turn markers are single tokens
    ids = tok("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<start_of_turn>") != tok.unk_token_id
    assert ids[-1] == tok.convert_tokens_to_ids("<end_of_turn>") != tok.unk_token_id
    assert tok.decode(ids) == "<start_of_turn>user\nhi<end_of_turn>"


def test_chat_template_equals_render(tok):
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
    expected = (
        "<start_of_turn>user\nYou are a careful assistant.\n\nWhat's the weather in Paris?<end_of_turn>\n"
        "<start_of_turn>model\nLet me check.\n"
        '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call><end_of_turn>\n'
        '<start_of_turn>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><end_of_turn>\n'
        "<start_of_turn>model\nIt is 21 degrees.<end_of_turn>\n"
    )
    assert render(messages) == expected
    assert render(messages, template=tok) == expected
    gen = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert gen == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_param_counts_span_30x():
    from transformers import AutoConfig, AutoModelForCausalLM

    _shipped_or_skip()
    build = json.loads((EMBEDDED_MODELS_DIR / "build.json").read_text())["models"]
    counts = []
    for folder in SHIPPED:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        counts.append(tiny.parameter_counts(model)["total"])
        assert counts[-1] == build[folder.name]["params"]
    assert counts == sorted(set(counts))  # FAMILY is listed smallest first
    assert counts[-1] / counts[0] >= 30


def test_ladder_is_fair_and_heldout_perplexity_falls_strictly_with_size():
    """build.json: every size of the family saw the same tokens (steps x batch x length, one
    tokenizer, one corpus) and the held-out perplexity falls strictly as parameters grow."""
    _shipped_or_skip()
    models = json.loads((EMBEDDED_MODELS_DIR / "build.json").read_text())["models"]
    family = [models[f"tiny-{s}"] for s in FAMILY]
    assert len({m["tokens_seen"] for m in family}) == 1 and family[0]["tokens_seen"] > 0
    same = ("steps", "batch_size", "seq_len", "seed", "weight_decay", "lr_reference_width")
    assert len({tuple(m["pretrain"][k] for k in same) for m in family}) == 1
    assert len({m["tokenizer_sha256"] for m in family}) == 1
    # one learning-rate rule: the base rate up to the reference width, scaled by 1/width above it
    base = max(m["pretrain"]["learning_rate"] for m in family)
    for m in family:
        scale = min(1.0, m["pretrain"]["lr_reference_width"] / m["shape"]["hidden_size"])
        assert m["pretrain"]["learning_rate"] == pytest.approx(base * scale)
    by_size = sorted(family, key=lambda m: m["params"])
    ppl = [m["heldout_perplexity"] for m in by_size]
    assert all(a > b for a, b in zip(ppl, ppl[1:])), ppl
    assert all(m["heldout_perplexity"] < m["random_init_perplexity"] / 10 for m in family)


def test_loads_as_causal_lm_and_seq_cls(tok):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = SHIPPED[1]
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert lm.config.tie_word_embeddings and lm.dtype == torch.float32
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    default = AutoModelForCausalLM.from_pretrained(folder)
    assert default.dtype == torch.float32  # bf16 storage, float32 compute

    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32).eval()
    texts = ["<start_of_turn>user\nhello there, how are you today?<end_of_turn>\n", "<start_of_turn>user\nhi<end_of_turn>\n"]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][1, -1] == 1  # left padded
    with torch.no_grad():
        both = clf(**enc).logits
        alone = clf(**tok(texts[1:], return_tensors="pt")).logits
    assert both.shape == (2, 2) and torch.isfinite(both).all()
    # left padding does not change the padded row's logits (RoPE is shift-invariant)
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=1e-4)


def test_pretrained_perplexity_far_below_random(tok, id_test_texts):
    from transformers import AutoModelForCausalLM

    for folder in (SHIPPED[0], SHIPPED[-1]):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.manual_seed(0)
        random_init = AutoModelForCausalLM.from_config(model.config)
        ppl = tiny.perplexity(model, tok, id_test_texts, max_length=256)
        ppl_random = tiny.perplexity(random_init, tok, id_test_texts, max_length=256)
        assert ppl_random > len(tok) / 2  # an untrained model is about uniform over the vocabulary
        assert ppl < ppl_random / 4


# --- pure functions -----------------------------------------------------------------------

def test_perplexity_of_uniform_model_is_vocab_size(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()  # tied: all logits are 0 -> uniform
    texts = [render([{"role": "user", "content": "please help me"}]), "sure here is the plan thanks"]
    assert tiny.perplexity(model, tiny_tokenizer, texts, batch_size=2) == pytest.approx(len(tiny_tokenizer), rel=1e-9)


def test_parameter_counts_by_hand(tiny_tokenizer):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny.tiny_config("xs", tiny_tokenizer))
    v, h, i, layers, kv = len(tiny_tokenizer), 32, 64, 2, 2 * 16  # 2 kv heads x head_dim 16
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    expected = v * h + layers * per_layer + h  # tied embeddings counted once, final norm
    assert tiny.parameter_counts(model) == {"total": expected, "embedding": v * h, "non_embedding": expected - v * h}


def test_read_corpus_formats_and_errors(tmp_path):
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"conversation": "<start_of_turn>user\nhi<end_of_turn>\n"}) + "\n\n")
    assert tiny.read_corpus(conv) == ["<start_of_turn>user\nhi<end_of_turn>\n"]

    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as fh:
        fh.write(json.dumps({"chosen": "\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: thanks"}) + "\n")
    assert tiny.read_corpus(hh) == [
        "<start_of_turn>user\nhow do I bake bread?<end_of_turn>\n"
        "<start_of_turn>model\nMix flour and water.<end_of_turn>\n"
        "<start_of_turn>user\nthanks<end_of_turn>\n"
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversation": "ok"}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'conversation'"):
        tiny.read_corpus(bad)
    with pytest.raises(DataError, match="not found"):
        tiny.read_corpus(tmp_path / "nope.jsonl")


def test_split_heldout_deterministic_and_disjoint():
    texts = [f"t{i}" for i in range(500)]
    train, held = tiny.split_heldout(texts, fraction=0.02, seed=0)
    assert len(held) == 10 and len(train) == 490
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(texts)
    assert tiny.split_heldout(texts, fraction=0.02, seed=0) == (train, held)
    assert tiny.split_heldout(texts, fraction=0.02, seed=1)[1] != held


def test_pack_blocks(tiny_tokenizer):
    texts = ["please help me", "sure here is"]
    data = tiny.pack(tiny_tokenizer, texts, seq_len=4)
    stream = []
    for t in texts:
        stream += [tiny_tokenizer.bos_token_id] + tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert len(data) == len(stream) // 4
    assert [x for b in data["input_ids"] for x in b] == stream[: 4 * len(data)]
    assert data["labels"] == data["input_ids"]


# --- the build pipeline (tiny settings) ---------------------------------------------------

def _small_build(out, corpus):
    cfg = tiny.PretrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, seed=0)
    return tiny.build_family(out, sizes=("xs",), corpus=corpus, cfg=cfg, vocab_size=300)


def test_build_family_is_deterministic_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = write_jsonl(tmp_path / "train.jsonl.gz", make_rows(6, split="train"))
    info = _small_build(tmp_path / "a", corpus)
    _small_build(tmp_path / "b", corpus)
    m = info["models"]["tiny-xs"]
    assert m["steps"] == 4 and m["tokens_seen"] == 4 * 2 * 32
    assert info["heldout_conversations"] == 1 and info["corpus_conversations"] == len(make_rows(6, split="train"))
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a/tiny-xs" / name).read_bytes() == (tmp_path / "b/tiny-xs" / name).read_bytes()
    assert json.loads((tmp_path / "a/build.json").read_text())["models"]["tiny-xs"]["params"] == m["params"]
    assert "tiny-xs" in (tmp_path / "a/README.md").read_text()
    assert not list((tmp_path / "a").glob(".*tmp"))  # atomic: no temp folders left
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a/tiny-xs", dtype=torch.float32)
    assert model.dtype == torch.float32
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a/tiny-xs/model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(tmp_path / "a/tiny-xs")
    assert tok.padding_side == "left" and tok.chat_template == tiny.CHAT_TEMPLATE
    assert math.isfinite(m["final_train_loss"]) and m["final_train_loss"] < math.log(300) + 1


# --- CLI ------------------------------------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path, capsys):
    from moodguard.cli import main

    assert main(["models", "build-tiny", "--sizes", "zz", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moodguard models: error: --sizes: unknown size") and "\n" not in err
    assert main(["models", "build-tiny", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.jsonl: corpus not found" in err and "\n" not in err


def test_cli_list(capsys, tmp_path, monkeypatch):
    from moodguard.cli import main

    _shipped_or_skip()
    monkeypatch.setenv("MOODGUARD_CACHE", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "embedded:tiny-s" in out and "embedded:tiny-l" in out and "not converted" in out


def test_model_error_is_moodguard_error():
    with pytest.raises(MoodguardError):
        tiny.build_family("/nonexistent-out", sizes=("nope",))
