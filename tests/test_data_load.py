"""Loading MOOD splits: formats, folders, embedded, hub path, messages, safe column, leakage, domains."""
from __future__ import annotations

import copy
import csv
import gzip
import hashlib
import json
from pathlib import Path

import pytest
from conftest import make_rows, write_jsonl

import mood_data.embedded as embedded
from mood_data.domains import load_registry
from mood_data.errors import DataError
from mood_data.leakage import LeakageWarning, conversation_hash, leakage_report, normalize_conversation
from mood_data.load import load_split_file, load_splits

MSGS = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}]
MOOD_TEXT = ('<start_of_turn>user\nbe kind\n\nhi<end_of_turn>\n'
             '<start_of_turn>model\nhello\n<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call><end_of_turn>\n')


def _as_dicts(ds) -> list[dict]:
    return [dict(r) for r in ds]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return make_rows(2, split="test")  # 12 ID + 7 OOD rows x 2


@pytest.fixture(scope="module")
def reference(rows, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("ref") / "test.jsonl", rows)
    return _as_dicts(load_split_file(path, "test"))


def test_columns_and_types(reference, rows, tmp_path):
    ds = load_split_file(write_jsonl(tmp_path / "test.jsonl", rows))
    assert ds.column_names == ["id", "conversation", "domain", "malign"]
    assert {k: v.dtype for k, v in ds.features.items()} == {"id": "string", "conversation": "string",
                                                           "domain": "string", "malign": "int64"}
    assert reference == rows  # jsonl content survives unchanged
    assert len(ds) == 26 and sum(ds["malign"]) == 3 * 2 + 7 * 2


def _write(path: Path, rows: list[dict]) -> Path:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return write_jsonl(path, rows)
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        if ".json" in name:
            json.dump(rows, fh, indent=1)
        else:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("name", ["test.jsonl.gz", "test.json", "test.json.gz", "test.parquet", "test.csv", "test.csv.gz"])
def test_every_format_gives_the_same_rows(tmp_path, rows, reference, name):
    assert _as_dicts(load_split_file(_write(tmp_path / name, rows), "test")) == reference


def test_json_file_holding_json_lines(tmp_path, rows, reference):
    path = write_jsonl(tmp_path / "test.json", rows)
    assert _as_dicts(load_split_file(path)) == reference


def test_bool_malign_and_safe_column(tmp_path):
    base = {"conversation": "c", "domain": "scheming"}
    rows = [dict(base, id="1", malign=True), dict(base, id="2", malign=False), dict(base, id="3", safe=True),
            dict(base, id="4", safe=0), dict(base, id="5", safe=False, malign=1), dict(base, id="6", safe=1, source="s", meta={"k": 1})]
    ds = load_split_file(write_jsonl(tmp_path / "test.jsonl", rows))
    assert ds["malign"][:] == [1, 0, 0, 1, 1, 0]
    csv_path = tmp_path / "test.csv"
    csv_path.write_text("id,conversation,domain,safe\na,c,scheming,true\nb,c,scheming,0\nc,c,scheming,FALSE\n")
    assert load_split_file(csv_path)["malign"][:] == [0, 1, 1]


def test_messages_rendered_with_builtin_template(tmp_path):
    rows = [{"id": "m", "messages": MSGS, "domain": "function-calling", "malign": 0},
            {"id": "c", "conversation": "given", "messages": MSGS, "domain": "function-calling", "malign": 1}]
    ds = load_split_file(write_jsonl(tmp_path / "train.jsonl", rows))
    assert ds["conversation"][:] == [MOOD_TEXT, "given"]  # a given conversation wins over messages
    csv_path = _write(tmp_path / "test.csv", [{"id": "m", "conversation": "", "messages": json.dumps(MSGS),
                                               "domain": "function-calling", "malign": 0}])
    assert load_split_file(csv_path)["conversation"][0] == MOOD_TEXT


def test_messages_rendered_with_a_tokenizer_template(tmp_path, tiny_tokenizer):
    rows = [{"id": "m", "messages": MSGS[1:], "domain": "function-calling", "malign": 0}]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    plain = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": 'hello\n<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'}]
    assert load_split_file(path, template=tiny_tokenizer)["conversation"][0] == \
        tiny_tokenizer.apply_chat_template(plain, tokenize=False)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
    assert load_split_file(path, template=tok)["conversation"][0] == \
        '[user] hi|[assistant] hello\n<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>|'
    tok.save_pretrained(tmp_path / "tok")  # a tokenizer path works as well
    assert load_split_file(path, template=str(tmp_path / "tok"))["conversation"][0].startswith("[user] hi|")


def test_folder_loading(tiny_dataset_dir):
    splits = load_splits(tiny_dataset_dir)
    assert list(splits) == ["train", "test"]
    assert (len(splits["train"]), len(splits["test"])) == (72, 104)
    assert set(splits["train"]["domain"]) == {"hh-rlhf-helpful", "hh-rlhf-harmless", "function-calling"}
    assert len(set(splits["test"]["domain"])) == 10
    assert splits.leakage == {"n_test_rows": 0, "n_train_rows": 0, "by_domain": {}, "examples": []}
    only = load_splits(tiny_dataset_dir, splits=("test",))
    assert list(only) == ["test"] and only.leakage is None


def test_folder_problems(tmp_path, rows):
    write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DataError) as exc:
        load_splits(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path}: no train file (expected one of train.csv, train.csv.gz, ")
    _write(tmp_path / "test.csv", rows)
    with pytest.raises(DataError) as exc:
        load_splits(tmp_path, splits=("test",))
    assert str(exc.value) == f"{tmp_path}: several test files (test.csv, test.jsonl); keep one"
    with pytest.raises(DataError, match=r"^split 'dev': unknown split \(expected one of train, test\)$"):
        load_splits(tmp_path, splits=("dev",))


def test_single_file_source_needs_one_split(tmp_path, rows):
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    assert len(load_splits(path, splits=("test",))["test"]) == 26
    with pytest.raises(DataError, match="a single file holds one split"):
        load_splits(path)


def test_embedded_source(monkeypatch, tiny_dataset_dir, tmp_path):
    monkeypatch.setattr(embedded, "benchmark_dir", lambda: tiny_dataset_dir)
    assert [len(d) for d in load_splits().values()] == [72, 104]
    assert [len(d) for d in load_splits("embedded", splits=("train",)).values()] == [72]
    monkeypatch.setattr(embedded, "benchmark_dir", lambda: tmp_path / "missing")
    with pytest.raises(DataError, match=r"^embedded: benchmark not found at .*moodguard data build"):
        load_splits()


def test_model_path():
    assert embedded.model_path("embedded:tiny-s", must_exist=False) == embedded.models_dir() / "tiny-s"
    assert embedded.model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert embedded.model_path("/some/dir") == "/some/dir"
    assert embedded.benchmark_dir() == Path(embedded.__file__).parent / "embedded" / "benchmark"
    with pytest.raises(DataError, match="embedded model not found"):
        embedded.model_path("embedded:no-such-model")
    with pytest.raises(DataError, match="not a valid embedded model name"):
        embedded.model_path("embedded:../x")


@pytest.fixture
def hub_mirror(tmp_path, monkeypatch, tiny_dataset_dir):
    """A local mirror folder of the hub repo 'mood-bench/mood-bench', reached through load_dataset."""
    import datasets

    mirror = tmp_path / "mirror" / "mood-bench" / "mood-bench"
    mirror.mkdir(parents=True)
    for split in ("train", "test"):
        (mirror / f"{split}.jsonl").write_bytes((tiny_dataset_dir / f"{split}.jsonl").read_bytes())
    calls = []
    real = datasets.load_dataset

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        local = tmp_path / "mirror" / path
        return real(str(local) if local.is_dir() else path, *args, cache_dir=str(tmp_path / "cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)  # "mood-bench/mood-bench" is not a local path here
    return mirror, calls


def test_hub_path_through_datasets(hub_mirror, tiny_dataset_dir):
    mirror, calls = hub_mirror
    splits = load_splits("mood-bench/mood-bench")
    assert calls == [("mood-bench/mood-bench", "train"), ("mood-bench/mood-bench", "test")]
    assert _as_dicts(splits["test"]) == _as_dicts(load_split_file(tiny_dataset_dir / "test.jsonl"))
    assert len(splits["train"]) == 72 and splits.leakage["n_test_rows"] == 0


def test_hub_rows_are_validated(hub_mirror):
    mirror, _ = hub_mirror
    rows = make_rows(1, split="test")
    rows[3]["malign"] = 5
    write_jsonl(mirror / "test.jsonl", rows)
    with pytest.raises(DataError) as exc:
        load_splits("mood-bench/mood-bench", splits=("test",))
    assert str(exc.value) == "mood-bench/mood-bench[test]: row 4: field 'malign': expected 0/1 or bool, got 5"


def test_unreachable_hub_id_is_a_one_line_error(hub_mirror):
    with pytest.raises(DataError) as exc:
        load_splits("nobody/nothing", splits=("test",))
    msg = str(exc.value)
    assert msg.startswith("nobody/nothing: could not load split 'test' with datasets.load_dataset (") and "\n" not in msg


def _leaky(tmp_path: Path) -> Path:
    train, test = make_rows(3, split="train"), make_rows(2, split="test")
    # test row 2 (hh-rlhf-helpful) and the first scheming test row repeat train rows up to case/whitespace
    test[1]["conversation"] = "  " + train[4]["conversation"].upper().replace(" ", "\n \t")
    scheming = next(i for i, r in enumerate(test) if r["domain"] == "scheming")
    test[scheming]["conversation"] = train[0]["conversation"]
    test.append(dict(test[scheming], id="extra"))  # the same train row leaks twice
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    return tmp_path


def test_leakage_is_an_error(tmp_path):
    folder = _leaky(tmp_path)
    with pytest.raises(DataError) as exc:
        load_splits(folder)
    assert str(exc.value) == (
        f"{folder / 'test.jsonl'}: row 2: field 'conversation': same conversation as {folder / 'train.jsonl'} "
        "row 5 (id 'train-hh-rlhf-helpful-1-1'); 3 test rows leak from train (by domain: hh-rlhf-helpful=1, "
        "scheming=2); pass --allow-leakage (allow_leakage=True) to load anyway"
    )


def test_leakage_allowed_warns_with_counts(tmp_path):
    folder = _leaky(tmp_path)
    with pytest.warns(LeakageWarning, match=r"3 test rows leak from train \(by domain: hh-rlhf-helpful=1, scheming=2\)"):
        splits = load_splits(folder, allow_leakage=True)
    report = splits.leakage
    assert (report["n_test_rows"], report["n_train_rows"]) == (3, 2)
    assert report["by_domain"] == {"hh-rlhf-helpful": 1, "scheming": 2}
    assert report["examples"][0] == {"test_index": 1, "test_id": "test-hh-rlhf-helpful-0-1",
                                     "train_index": 4, "train_id": "train-hh-rlhf-helpful-1-1"}
    assert json.loads(splits["test"].info.description)["leakage"] == report
    assert leakage_report(splits["train"], splits["test"]) == report


def test_normalised_hash():
    assert normalize_conversation("  Hello\n\tWORLD  x ") == "hello world x"
    assert conversation_hash("A  b") == conversation_hash("a\nB") == hashlib.sha1(b"a b").hexdigest()
    assert conversation_hash("ab") != conversation_hash("a b")


def test_user_domains_yaml(tmp_path):
    yaml_path = tmp_path / "domains.yaml"
    yaml_path.write_text("id: [my-support-chats]\nood: [my-failure]\n")
    rows = [{"id": "1", "conversation": "x", "domain": "my-support-chats", "malign": 0}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1: field 'domain': unknown domain 'my-support-chats'"):
        load_split_file(train, "train")
    assert load_split_file(train, "train", registry=load_registry(yaml_path))["domain"][:] == ["my-support-chats"]
    assert load_split_file(train, "train", registry=str(yaml_path))["domain"][:] == ["my-support-chats"]
    bad = write_jsonl(tmp_path / "train2.jsonl", [dict(rows[0], domain="my-failure")])
    with pytest.raises(DataError, match="domain 'my-failure' is not an ID domain"):
        load_split_file(bad, "train", registry=str(yaml_path))


def test_cap_groups_caps_each_domain_and_label_seeded_in_order():
    import datasets

    from mood_data.load import cap_groups

    rows = [{"id": f"{d}-{m}-{i}", "conversation": "x", "domain": d, "malign": m}
            for d, n0, n1 in (("a", 5, 3), ("b", 2, 4)) for m, n in ((0, n0), (1, n1)) for i in range(n)]
    ds = datasets.Dataset.from_list(rows)
    capped = cap_groups(ds, max_unsafe=2, max_safe=3, seed=0)
    count = {}
    for d, m in zip(capped["domain"], capped["malign"]):
        count[(d, m)] = count.get((d, m), 0) + 1
    assert count == {("a", 0): 3, ("a", 1): 2, ("b", 0): 2, ("b", 1): 2}
    # original order kept, and the same rows for the same seed
    order = [ids.index(i) for ids in [list(ds["id"])] for i in capped["id"]]
    assert order == sorted(order)
    assert list(cap_groups(ds, 2, 3, seed=0)["id"]) == list(capped["id"])
    assert cap_groups(ds) is ds
    with pytest.raises(DataError, match="positive integer"):
        cap_groups(ds, max_unsafe=0)
