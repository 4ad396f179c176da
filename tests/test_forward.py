"""One-pass guard forward and chunked perplexity equal the separate (mood-bench) computations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_rows
from train.data import padding_fraction
from eval.engine.forward import SharedBackbone, encode, guard_pass, length_batches, pad_left, pool
from eval.engine.detectors.perplexity import perplexity_from_nll
from eval.engine.forward import assistant_char_spans
from eval.engine.perplexity import chunked_token_nll, full_logits_nll, perplexity_pass, target_mask


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_adapters(model_dir: Path, out: Path, num_labels: int = 2, seed: int = 1) -> tuple[Path, Path]:
    """A random (non-zero) guard LoRA with a score head and a causal-LM LoRA, saved like training does."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    guard = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)
    get_peft_model(guard, cfg).save_pretrained(out / "guard")
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)
    get_peft_model(lm, cfg).save_pretrained(out / "lm")
    return out / "guard", out / "lm"


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def backbone(tiny_model_dir, tiny_adapters):
    guard, lm = tiny_adapters
    return SharedBackbone.from_pretrained(tiny_model_dir, guard, lm)


CONVS = [r["conversation"] for r in make_rows(2, seed=3, split="test")][:12]


def test_length_batches_restore_order():
    lengths = [3, 9, 1, 9, 4, 7, 2]
    batches = length_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[1, 3, 5], [4, 0, 6], [2]]
    # writing per-batch outputs by index gives back the original order
    out = np.zeros(len(lengths), dtype=int)
    for b in batches:
        out[b] = np.asarray(lengths)[b] * 10
    assert out.tolist() == [30, 90, 10, 90, 40, 70, 20]
    # padding: sorted [9,9,7] [4,3,2] [1] -> 35 real of 27+12+1=40 -> 1/8 padding
    assert padding_fraction(lengths, batches) == pytest.approx(1 - 35 / 40)
    # dataset order [3,9,1] [9,4,7] [2] -> 35 real of 27+27+2=56
    assert padding_fraction(lengths, length_batches(lengths, 3, sort=False)) == pytest.approx(1 - 35 / 56)


def test_encode_left_truncation_and_pooling(tiny_tokenizer):
    enc_full = encode(tiny_tokenizer, CONVS, 10_000)
    enc = encode(tiny_tokenizer, CONVS, 12)
    assert enc.n_truncated == sum(len(x) > 12 for x in enc_full.input_ids) > 0
    for a, b in zip(enc.input_ids, enc_full.input_ids):
        assert a.dtype == np.int32 and a.tolist() == b[-12:].tolist()  # the end is kept
    # chunked tokenisation (2 texts at a time) gives the same rows and truncation indices
    small = encode(tiny_tokenizer, CONVS, 12, chunk=2)
    assert [x.tolist() for x in small.input_ids] == [x.tolist() for x in enc.input_ids]
    assert small.truncated == enc.truncated
    assert pad_left([[5, 6], [7]], 0).tolist() == [[5, 6], [0, 7]]
    h = torch.tensor([[[0.0], [2.0], [4.0]], [[9.0], [1.0], [3.0]]])
    m = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert pool(h, m, "last").flatten().tolist() == [4.0, 3.0]
    assert pool(h, m, "mean").flatten().tolist() == [2.0, 2.0]


def test_assistant_only_mask(tiny_tokenizer):
    text = "<start_of_turn>user\nhello there<end_of_turn>\n<start_of_turn>model\nsure thanks<end_of_turn>\n"
    (s, e), = assistant_char_spans(text)
    assert text[s:e] == "sure thanks<end_of_turn>"
    enc = encode(tiny_tokenizer, [text], 1000, assistant_only=True)
    decoded = tiny_tokenizer.decode([i for i, m in zip(enc.input_ids[0], enc.lm_mask[0]) if m])
    assert decoded == "sure thanks<end_of_turn>"
    # the target mask skips padding and the first real token
    tm = target_mask(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    assert tm.tolist() == [[False, False, True, True]]


def test_chunked_nll_equals_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 23, 8)
    ids = torch.randint(0, 50, (3, 23))
    att = torch.ones(3, 23, dtype=torch.long)
    att[1, :5] = 0
    att[2, :20] = 0
    valid = target_mask(att)
    ref = full_logits_nll(head(hidden), ids, valid)
    for chunk in (1, 4, 7, 256):
        got = chunked_token_nll(hidden, head, ids, valid, chunk)
        assert torch.allclose(got[0], ref[0], atol=1e-9, rtol=1e-6) and torch.equal(got[1], ref[1])
    assert ref[1].tolist() == [22.0, 17.0, 2.0]
    # ppl = exp(mean nll); hand check: nll 2*log(3) over 2 tokens -> ppl 3
    assert perplexity_from_nll(np.array([2 * np.log(3.0), 0.0]), np.array([2.0, 0.0]))[0] == pytest.approx(3.0)
    assert np.isnan(perplexity_from_nll(np.array([0.0]), np.array([0.0]))[0])


def test_fused_guard_equals_mood_bench_way(tiny_model_dir, tiny_adapters, backbone, tiny_tokenizer):
    """Guard logits from the shared base (+score head as a Linear) == SeqCls + PeftModel; features
    equal hidden_states of a plain forward; batch order restored."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    guard_dir, _ = tiny_adapters
    ref_model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    ref_model.config.pad_token_id = tiny_tokenizer.pad_token_id
    ref_model = PeftModel.from_pretrained(ref_model, str(guard_dir)).eval()
    enc = encode(tiny_tokenizer, CONVS, 64)
    seen = {}

    def keep(b):
        for j, i in enumerate(b.index):
            seen[int(i)] = {k: v[j] for k, v in b.features.items()}

    logits = guard_pass(backbone, enc, batch_size=5, layers=(-1, 1), pooling="last", on_batch=keep)
    # reference: mood-bench pads to the batch maximum in dataset order (here: all rows at once)
    batch = tiny_tokenizer(CONVS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        out = ref_model(**batch, output_hidden_states=True)
    assert torch.allclose(torch.from_numpy(logits), out.logits.float(), atol=1e-4)
    assert not np.allclose(logits[:, 0], logits[:, 1])  # a real, non-degenerate head
    for layer in (-1, 1):
        ref = out.hidden_states[layer][:, -1].double()
        got = torch.stack([seen[i][layer] for i in range(len(CONVS))])
        assert torch.allclose(got, ref, atol=1e-4)


def test_fused_perplexity_equals_plain_full_logits(tiny_model_dir, tiny_adapters, backbone, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, lm_dir = tiny_adapters
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(lm_dir)).eval()
    enc = encode(tiny_tokenizer, CONVS, 64)
    ppl = perplexity_pass(backbone, enc, batch_size=4, chunk_size=7)
    ref = []
    for ids in enc.input_ids:  # one row at a time, no padding, full logits
        x = torch.tensor([ids.tolist()])
        with torch.no_grad():
            logits = ref_model(input_ids=x).logits
        lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None]).squeeze(-1)
        ref.append(float(torch.exp(-lp.mean())))
    assert np.allclose(ppl, ref, rtol=1e-4)
    # switching adapters really switches: the guard adapter is not active during the LM pass
    assert backbone.has_lm and backbone.has_guard


def test_score_rows_assistant_only_tokenises_once_and_matches_separate_passes(tiny_adapters, backbone,
                                                                              tiny_tokenizer, monkeypatch):
    """guard + ppl with assistant-only perplexity: ONE tokenisation serves both passes, and the
    scores equal a guard pass on plain ids and a perplexity pass on masked ids."""
    from eval.engine import planner
    from eval.engine.detectors.logits import guard_scores
    from eval.engine.planner import ScoreSettings, plan, score_shared

    settings = ScoreSettings(max_length=64, batch_size=4, assistant_only=True)
    calls = []
    real_encode = planner.encode
    monkeypatch.setattr(planner, "encode", lambda *a, **k: calls.append(k) or real_encode(*a, **k))
    got, _ = score_shared(plan(["guard", "ppl"]), backbone, tiny_tokenizer, CONVS, {}, settings)
    assert calls == [{"assistant_only": True}]
    ref_guard = guard_scores(guard_pass(backbone, encode(tiny_tokenizer, CONVS, 64), batch_size=4))
    ref_ppl = perplexity_pass(backbone, encode(tiny_tokenizer, CONVS, 64, assistant_only=True), batch_size=4)
    assert np.allclose(got["guard"], ref_guard, atol=1e-6)
    assert np.allclose(got["ppl"], ref_ppl, rtol=1e-6, equal_nan=True)
    calls.clear()
    score_shared(plan(["guard"]), backbone, tiny_tokenizer, CONVS, {}, settings)  # no perplexity: no mask computed
    assert calls == [{"assistant_only": False}]


def test_adapter_hash_follows_the_bytes_and_the_file_names(tmp_path):
    """The content part of every feature/statistics cache key: equal for a byte-identical copy,
    different when one weight byte changes, and config and weights cannot trade places."""
    import hashlib
    import shutil

    from eval.engine.forward import adapter_hash

    a = tmp_path / "a"
    a.mkdir()
    (a / "adapter_config.json").write_bytes(b'{"r": 8}')
    (a / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 5000)  # > one 1 MiB read block
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert adapter_hash(a) == adapter_hash(b)
    expected = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        expected.update(f"{name}:{hashlib.sha256((a / name).read_bytes()).hexdigest()};".encode())
    assert adapter_hash(a) == expected.hexdigest()
    data = bytearray((b / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "adapter_model.safetensors").write_bytes(bytes(data))
    assert adapter_hash(a) != adapter_hash(b)
    c = tmp_path / "c"
    c.mkdir()
    (c / "adapter_config.json").write_bytes((a / "adapter_model.safetensors").read_bytes())
    (c / "adapter_model.safetensors").write_bytes((a / "adapter_config.json").read_bytes())
    assert adapter_hash(c) != adapter_hash(a)
