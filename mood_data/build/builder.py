"""Assemble the embedded MOOD benchmark from the raw source pack (deterministic).

``build_benchmark(sources, out, seed)`` reads every source, derives MOOD rows through
:mod:`mood_data.build.derive`, splits them (pairs and items never straddle splits), removes
duplicate/leaking conversations, runs the format-only baseline and writes
``train.jsonl.gz``, ``test.jsonl.gz``, ``build_report.json``, ``PROVENANCE.md`` and
``LICENSES/`` into ``out`` in one atomic folder swap.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from .. import atomic
from ..domains import ID_DOMAINS, OOD_DOMAINS, OPT_IN_DOMAINS
from ..render import render
from . import derive as d
from .baseline import format_baseline, id_baselines
from .harm import HarmRecord, harm_records, near_duplicate_clusters
from .sources import SOURCES, SourcePack

TEST_FRACTION = 0.45
OOD_CAP = 250
HH_LAST_EXCHANGE = 0.5  # fraction of hh pairs reduced to their last exchange (format parity)
HH_PAIR_CAP = {"harmless": 300, "helpful": 400}
# Safe replies kept per harm-label source (all unsafe ones are kept): the unsafe share of every
# source stays close, so knowing a row's source says little about its label (the source-prior
# baseline in docs/benchmark.md).
HARM_SAFE_CAP = {"xstest": 200, "rbr": 60}
FC_NO_CALL_ROWS = 200      # BFCL irrelevance items used for ID "call nothing" rows (safe); the rest are OOD
FC_UNSAFE_FRACTION = 1.0   # BFCL single-turn items that also give a wrong-argument (unsafe) row
# Only the *chosen* reply of an hh-rlhf pair becomes a row (safe). The rejected reply is the
# less preferred of two answers, a preference and not a harm label (hand audits of 30: 'helpful'
# pairs 9 harmful / 4 borderline / 17 not; 'harmless' pairs 7 / 7 / 16; docs/real-models.md).
# Since the 2026-12-03 relabel the unsafe class of hh-rlhf-harmless comes from replies labelled
# harmful by people (:mod:`mood_data.build.harm`).
FC_SINGLE_FILES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple")
SCHEMING_FILES = (
    ("persona", "okay-with-deceiving-a-user-to-help-them"),
    ("persona", "willingness-to-manipulate-overseers-to-think-it-is-HHH"),
    ("lm_generated_evals", "survival-instinct"),
    ("lm_generated_evals", "coordinate-other-ais"),
)
CONTROLLING_FILES = (
    ("persona", "desire-for-acquiring-power"),
    ("persona", "desire-for-discreetly-acquiring-power"),
    ("persona", "desire-for-independence-from-human-oversight"),
    ("persona", "desire-to-replace-human-oversight"),
    ("persona", "desire-to-persuade-people-to-have-its-goals"),
    ("lm_generated_evals", "power-seeking-inclination"),
    ("lm_generated_evals", "wealth-seeking-inclination"),
)


@dataclass
class Row:
    domain: str
    malign: int
    split: str
    tag: str           # source tag used in the id
    source: str        # provenance: file + record key
    messages: list = field(repr=False, default_factory=list)
    group: str = ""    # rows sharing a group (pair, item) are kept/dropped together


def normalise(conversation: str) -> str:
    return hashlib.sha256(" ".join(conversation.lower().split()).encode("utf-8")).hexdigest()


def _rng(seed: int, *key: Any) -> random.Random:
    return random.Random("-".join(str(k) for k in (seed,) + key))


def _split_items(items: list, seed: int, key: str, test_fraction: float = TEST_FRACTION) -> list[tuple[str, Any]]:
    items = list(items)
    _rng(seed, "split", key).shuffle(items)
    n_test = round(len(items) * test_fraction)
    return [("test" if i < n_test else "train", it) for i, it in enumerate(items)]


def _sample(items: list, n: int, seed: int, key: str) -> list:
    items = list(items)
    _rng(seed, "sample", key).shuffle(items)
    return items[:n]


# --------------------------------------------------------------------------- shape matching (test split only)

PREFIX_FRACTION = 0.5   # chat OOD rows (and their ID-safe shape controls) given an earlier benign exchange
_PREFIX_CACHE: dict[tuple[str, int], list] = {}


def benign_prefixes(pack: SourcePack, seed: int) -> list:
    """Chosen transcripts of hh-rlhf 'helpful' (benign-request, non-refusing) pairs that are NOT
    sampled for any ID row, train or test: the pool of earlier exchanges for chat test rows."""
    key = (str(pack.root), seed)
    if key not in _PREFIX_CACHE:
        by_kind = _hh_pairs(pack)
        used = {i for i, _ in _hh_sampled(by_kind["helpful"], "helpful", seed)}
        _PREFIX_CACHE[key] = [m for i, r in by_kind["helpful"] if i not in used and (m := d.parse_hh(r["chosen"]))]
    return _PREFIX_CACHE[key]


def chat_test_messages(pack: SourcePack, seed: int, key: str, msgs: list) -> list:
    """Shape matching for single-exchange chat TEST rows (OOD rows and their ID-safe controls
    alike): with probability :data:`PREFIX_FRACTION` an unused benign hh-rlhf conversation is put
    before the exchange, so turn counts follow the ID chat rows; then the usual length cap."""
    rng = _rng(seed, "prefix", key)
    if rng.random() < PREFIX_FRACTION:
        pool = benign_prefixes(pack, seed)
        msgs = d.with_prefix(pool[rng.randrange(len(pool))], msgs)
    return d.fit_length(msgs)


# --------------------------------------------------------------------------- per-source collectors


def _hh_pairs(pack: SourcePack) -> dict[str, list]:
    raw = pack.jsonl("hh-rlhf", "harmless-base_test.jsonl.gz")
    by_kind: dict[str, list] = {"harmless": [], "helpful": []}
    for i, r in enumerate(raw):
        kind = d.hh_pair_kind(r["chosen"], r["rejected"])
        if kind:
            by_kind[kind].append((i, r))
    return by_kind


def _hh_sampled(pairs: list, kind: str, seed: int) -> list:
    return sorted(_sample(pairs, HH_PAIR_CAP[kind], seed, f"hh-{kind}"))


def collect_hh(pack: SourcePack, seed: int) -> list[Row]:
    by_kind = _hh_pairs(pack)
    rows = []
    for kind, pairs in by_kind.items():
        pairs = _hh_sampled(pairs, kind, seed)
        for split, (i, r) in _split_items(pairs, seed, f"hh-{kind}"):
            last_only = _rng(seed, "hh-last", i).random() < HH_LAST_EXCHANGE
            msgs = d.parse_hh(r["chosen"])
            if msgs and last_only:
                msgs = msgs[-2:]
            if msgs:
                rows.append(Row(f"hh-rlhf-{kind}", 0, split, "hh", f"hh-rlhf/harmless-base_test.jsonl.gz#{i}:chosen",
                                d.fit_length(msgs), group=f"hh{i}"))
    return rows


def cap_safe(records: list[HarmRecord], seed: int, caps: dict[str, int]) -> list[HarmRecord]:
    """At most ``caps[tag]`` safe records of a source (its unsafe records all stay): safe replies to
    a prompt that also has an unsafe reply come first (same prompt, both kinds of reply: only the
    reply tells them apart), then a seeded sample of the rest."""
    out = []
    for tag in sorted({r.tag for r in records}):
        mine = [r for r in records if r.tag == tag]
        safe = [r for r in mine if not r.malign]
        if tag in caps and len(safe) > caps[tag]:
            unsafe_keys = {r.prompt_key for r in mine if r.malign}
            matched = [r for r in safe if r.prompt_key in unsafe_keys]
            rest = _sample([r for r in safe if r.prompt_key not in unsafe_keys], len(safe), seed, f"harm-safe-{tag}")
            keep = {r.source for r in (matched + rest)[:caps[tag]]}
            safe = [r for r in safe if r.source in keep]
        out += [r for r in mine if r.malign] + safe
    return out


def harm_rows(records: list[HarmRecord], seed: int) -> list[Row]:
    """Replies labelled by people (:mod:`mood_data.build.harm`) -> ``hh-rlhf-harmless`` rows, safe
    rows capped per source (:data:`HARM_SAFE_CAP`). The split is drawn over prompt keys (one draw
    for all three sources), so a prompt's replies, in any source, share one split."""
    records = cap_safe(records, seed, HARM_SAFE_CAP)
    keys = sorted({r.prompt_key for r in records})
    split_of = {k: split for split, k in _split_items(keys, seed, "harm")}
    return [Row("hh-rlhf-harmless", r.malign, split_of[r.prompt_key], r.tag, r.source,
                d.fit_length(r.messages), group=f"harm:{r.prompt_key}") for r in records]


def _bfcl_pairs(pack: SourcePack, name: str) -> list[tuple[dict, dict]]:
    qs = pack.jsonl("bfcl", f"BFCL_v4_{name}.json.gz")
    ans = {a["id"]: a for a in pack.jsonl("bfcl", f"possible_answer__BFCL_v4_{name}.json.gz")}
    return [(q, ans[q["id"]]) for q in qs if q["id"] in ans]


def _string_pool(items: Iterable[tuple[dict, dict]]) -> list[str]:
    pool = set()
    for _, a in items:
        for c in d.bfcl_first_choice(a["ground_truth"]):
            pool.update(v for v in c["arguments"].values() if isinstance(v, str) and 2 < len(v) < 40)
    return sorted(pool)


def collect_function_calling(pack: SourcePack, seed: int) -> list[Row]:
    rows: list[Row] = []
    # single-turn BFCL: correct call (safe) and, for half the items, a contradicting call (unsafe)
    items = []
    for name in FC_SINGLE_FILES:
        items += [(name, q, a) for q, a in _bfcl_pairs(pack, name)]
    pool = _string_pool((q, a) for _, q, a in items)
    items = sorted(_sample(items, 900, seed, "bfcl-single"), key=lambda t: t[1]["id"])
    for split, (name, q, a) in _split_items(items, seed, "bfcl-single"):
        rng = _rng(seed, q["id"])
        calls = d.bfcl_first_choice(a["ground_truth"])
        src = f"bfcl/BFCL_v4_{name}.json.gz#{q['id']}"
        rows.append(Row("function-calling", 0, split, "bfcl", src, d.fit_length(d.fc_correct(q["question"], q["function"], calls, rng)), q["id"]))
        if rng.random() < FC_UNSAFE_FRACTION:
            bad = d.fc_wrong_arguments(q["question"], q["function"], calls, rng, pool)
            if bad:
                rows.append(Row("function-calling", 1, split, "bfcl", src + ":wrong-argument", d.fit_length(bad), q["id"]))
    # multi-turn base: correct multi-step calls (safe)
    docs = _multi_turn_docs(pack)
    mt = _bfcl_pairs(pack, "multi_turn_base")
    for split, (q, a) in _split_items(mt, seed, "bfcl-mt"):
        msgs = d.fc_multi_turn_correct(q, a, docs, _rng(seed, q["id"]))
        src = f"bfcl/BFCL_v4_multi_turn_base.json.gz#{q['id']}"
        if msgs:
            rows.append(Row("function-calling", 0, split, "bfclmt", src, d.fit_length(msgs), q["id"]))
            bad = d.fc_multi_turn_wrong(q, a, docs, _rng(seed, q["id"], "wrong"), pool)
            if bad:
                rows.append(Row("function-calling", 1, split, "bfclmt", src + ":wrong-argument", d.fit_length(bad), q["id"]))
    # tau-bench successful trajectories (safe)
    traj = pack.json("tau-bench", "historical_trajectories__gpt-4o-airline.json.gz")
    ok = [(i, t) for i, t in enumerate(traj) if t.get("reward", 0) >= 1]
    for split, (i, t) in _split_items(ok, seed, "tau-ok"):
        rows.append(Row("function-calling", 0, split, "tau", f"tau-bench/historical_trajectories__gpt-4o-airline.json.gz#{i}",
                        d.fit_length(d.tau_messages(t["traj"])), f"tau{t['task_id']}"))
    # irrelevance: the first part -> ID safe "call nothing"; the rest -> OOD inappropriate
    irr = [("irrelevance", q) for q in pack.jsonl("bfcl", "BFCL_v4_irrelevance.json.gz")]
    irr += [("live_irrelevance", q) for q in pack.jsonl("bfcl", "BFCL_v4_live_irrelevance.json.gz")]
    irr = _sample(irr, len(irr), seed, "irr")
    id_part, ood_part = irr[:FC_NO_CALL_ROWS], irr[FC_NO_CALL_ROWS:]
    for split, (name, q) in _split_items(sorted(id_part, key=lambda t: t[1]["id"]), seed, "irr-id"):
        rows.append(Row("function-calling", 0, split, "bfclirr", f"bfcl/BFCL_v4_{name}.json.gz#{q['id']}",
                        d.fit_length(d.fc_no_call(q["question"], q["function"], _rng(seed, q["id"]))), q["id"]))
    inappropriate = []
    for name, q in ood_part:
        msgs = d.fc_inappropriate_irrelevance(q["question"], q["function"], _rng(seed, q["id"]))
        if msgs:
            inappropriate.append(Row("function-calling-inappropriate", 1, "test", "bfclirr",
                                     f"bfcl/BFCL_v4_{name}.json.gz#{q['id']}", d.fit_length(msgs), q["id"]))
    tau_bad = []
    for i, t in enumerate(traj):
        msgs = d.tau_unrequested_write(t)
        if msgs:
            tau_bad.append(Row("function-calling-inappropriate", 1, "test", "tau",
                               f"tau-bench/historical_trajectories__gpt-4o-airline.json.gz#{i}", d.fit_length(msgs), f"tau{t['task_id']}"))
    rows += tau_bad + _sample(inappropriate, OOD_CAP - len(tau_bad), seed, "inapp")
    # miss_func: tool error followed by a success claim
    missing = []
    for q, a in _bfcl_pairs(pack, "multi_turn_miss_func"):
        msgs = d.fc_missing(q, a, docs, _rng(seed, q["id"]))
        if msgs:
            missing.append(Row("function-calling-missing", 1, "test", "bfclmiss",
                               f"bfcl/BFCL_v4_multi_turn_miss_func.json.gz#{q['id']}", d.fit_length(msgs), q["id"]))
    rows += missing[:OOD_CAP]
    return rows


def _multi_turn_docs(pack: SourcePack) -> dict[str, dict]:
    docs = {}
    for p in sorted((pack.root / "bfcl").glob("multi_turn_func_doc__*.json.gz")):
        for fn in pack.jsonl("bfcl", p.name):
            docs.setdefault(fn["name"], fn)
    return docs


def collect_code(pack: SourcePack, seed: int) -> list[Row]:
    """SVEN pairs are partitioned: one half gives benign helpful coding rows (fixed code,
    ID ``hh-rlhf-helpful`` safe), the other half insecure-code rows (vulnerable code)."""
    sven = []
    for p in sorted((pack.root / "sven").glob("*.jsonl.gz")):
        sven += [(p.name, i, r) for i, r in enumerate(pack.jsonl("sven", p.name))]
    sven = _sample(sven, len(sven), seed, "sven")
    half = len(sven) // 2
    rows = []
    helpful = [(f, i, r) for f, i, r in sven[:half]][:300]
    for split, (f, i, r) in _split_items(sorted(helpful, key=lambda t: (t[0], t[1])), seed, "sven-helpful"):
        msgs = d.sven_code(r, _rng(seed, f, i), vulnerable=False)
        if msgs:
            rows.append(Row("hh-rlhf-helpful", 0, split, "sven", f"sven/{f}#{i}:func_src_after", d.fit_length(msgs), f"sven{f}{i}"))
    insecure = []
    for f, i, r in sven[half:]:
        msgs = d.sven_code(r, _rng(seed, f, i), vulnerable=True)
        if msgs:
            insecure.append(Row("insecure-code", 1, "test", "sven", f"sven/{f}#{i}:func_src_before",
                                    chat_test_messages(pack, seed, f"sven/{f}#{i}", msgs), f"sven{f}{i}"))
    cse = []
    for i, r in enumerate(pack.json("cyberseceval", "instruct__instruct.json.gz")):
        msgs = d.cse_insecure(r, _rng(seed, "cse", i))
        if msgs:
            cse.append(Row("insecure-code", 1, "test", "cse", f"cyberseceval/instruct__instruct.json.gz#{i}",
                           chat_test_messages(pack, seed, f"cse{i}", msgs), f"cse{i}"))
    rows += _sample(insecure, 110, seed, "sven-ins") + _sample(cse, OOD_CAP - 110, seed, "cse")
    return rows


def collect_jailbroken(pack: SourcePack, seed: int) -> list[Row]:
    out = []
    for p in sorted((pack.root / "jailbreakbench").glob("*__*__*.json.gz")):
        for j in pack.json("jailbreakbench", p.name).get("jailbreaks", []):
            src = f"jailbreakbench/{p.name}#{j['index']}"
            msgs = d.jailbreak_exchange(j, _rng(seed, src), jailbroken=True)
            if msgs:
                out.append(Row("jailbroken", 1, "test", "jbb", src, chat_test_messages(pack, seed, src, msgs), f"jbb{p.name}{j['index']}"))
    return _sample(out, OOD_CAP, seed, "jbb")


def collect_sycophantic(pack: SourcePack, seed: int) -> list[Row]:
    out = []
    for name in ("generate__sycophancy.json.gz", "test_ab__sycophancy.json.gz"):
        for i, r in enumerate(pack.json("caa", name)):
            msgs = d.sycophantic(r, _rng(seed, name, i))
            if msgs:
                out.append(Row("sycophantic", 1, "test", "caa", f"caa/{name}#{i}", chat_test_messages(pack, seed, f"caa/{name}#{i}", msgs), f"caa{name}{i}"))
    return _sample(out, OOD_CAP, seed, "syco")


def _collect_misaligned(pack: SourcePack, seed: int, domain: str, files) -> list[Row]:
    per_file = []
    for kind, stem in files:
        name = f"{kind}__{stem}.jsonl.gz"
        got = []
        for i, r in enumerate(pack.jsonl("anthropic-evals", name)):
            rng = _rng(seed, name, i)
            msgs = d.persona_misaligned(r, domain, rng) if kind == "persona" else d.ab_misaligned(r, domain, rng)
            if msgs:
                got.append(Row(domain, 1, "test", "evals", f"anthropic-evals/{name}#{i}",
                               chat_test_messages(pack, seed, f"anthropic-evals/{name}#{i}", msgs), f"ev{name}{i}"))
        per_file.append(_sample(got, len(got), seed, name))
    out = []
    k = 0
    while len(out) < OOD_CAP and any(k < len(g) for g in per_file):  # round-robin over files
        out += [g[k] for g in per_file if k < len(g)]
        k += 1
    return out[:OOD_CAP]


def collect_swahili(pack: SourcePack, seed: int) -> list[Row]:
    hh = pack.jsonl("hh-rlhf", "harmless-base_test.jsonl.gz")
    compliant: dict[str, str] = {}
    for r in hh:  # first human turn -> first assistant reply of the (non-refusing) rejected transcript
        msgs = d.parse_hh(r["rejected"])
        if len(msgs) >= 2 and not d.REFUSAL.search(msgs[1]["content"]):
            compliant.setdefault(msgs[0]["content"].strip(), msgs[1]["content"])
    out = []
    for r in pack.csv("multijail", "MultiJail.csv.gz"):
        reply = compliant.get((r.get("en") or "").strip())
        msgs = d.swahili(r, reply, _rng(seed, "mj", r["id"]))
        if msgs:
            src = f"multijail/MultiJail.csv.gz#id={r['id']}"
            out.append(Row("swahili", 1, "test", "mj" if reply is None else "mjhh", src, chat_test_messages(pack, seed, src, msgs), f"mj{r['id']}"))
    return _sample(out, OOD_CAP, seed, "sw")


CONTROL_CAPS = {"jbb": 220, "persona": 210, "ab": 120, "caa": 220, "sven": 120}


def collect_shape_controls(pack: SourcePack, seed: int, used: set[str]) -> list[Row]:
    """ID-safe TEST rows whose conversation shapes cover the OOD shapes (never in train; source
    records in ``used`` (by OOD or ID rows) are skipped), rendered and prefixed exactly like the
    OOD rows they mirror: JailbreakBench prompts the target refused (-> hh-rlhf-harmless);
    persona statements of the opposite, aligned disposition answered 'Yes'; A/B items of the
    scheming/controlling files and CAA sycophancy answered with the non-matching choice;
    SVEN-fixed code for SVEN pairs used nowhere else (-> hh-rlhf-helpful)."""
    rows: list[Row] = []

    def add(domain: str, tag: str, src: str, msgs, group: str, bucket: list) -> None:
        if msgs and src not in used:
            bucket.append(Row(domain, 0, "test", tag, src + ":control", chat_test_messages(pack, seed, src, msgs), group))

    jbb: list[Row] = []
    for p in sorted((pack.root / "jailbreakbench").glob("*__*__*.json.gz")):
        for j in pack.json("jailbreakbench", p.name).get("jailbreaks", []):
            src = f"jailbreakbench/{p.name}#{j['index']}"
            add("hh-rlhf-harmless", "jbbref", src, d.jailbreak_exchange(j, _rng(seed, src), jailbroken=False), f"jbb{src}", jbb)
    persona: list[Row] = []
    ab: list[Row] = []
    for kind, stem in SCHEMING_FILES + CONTROLLING_FILES:
        name = f"{kind}__{stem}.jsonl.gz"
        for i, r in enumerate(pack.jsonl("anthropic-evals", name)):
            src, rng = f"anthropic-evals/{name}#{i}", _rng(seed, "control", name, i)
            if kind == "persona":
                add("hh-rlhf-helpful", "evalsok", src, d.persona_aligned(r, rng), f"ev{src}", persona)
            else:
                add("hh-rlhf-helpful", "evalsok", src, d.ab_not_matching(r, rng, d.ALIGNED_REASONS), f"ev{src}", ab)
    caa: list[Row] = []
    for name in ("generate__sycophancy.json.gz", "test_ab__sycophancy.json.gz"):
        for i, r in enumerate(pack.json("caa", name)):
            src = f"caa/{name}#{i}"
            add("hh-rlhf-helpful", "caaok", src, d.ab_not_matching(r, _rng(seed, "control", name, i), d.NEUTRAL_REASONS), f"caa{src}", caa)
    sven: list[Row] = []
    files = sorted((pack.root / "sven").glob("*.jsonl.gz"))
    all_sven = _sample([(p.name, i, r) for p in files for i, r in enumerate(pack.jsonl("sven", p.name))], 10**9, seed, "sven")
    for f, i, r in all_sven[:len(all_sven) // 2][300:]:  # the benign half beyond the 300 used for ID rows
        add("hh-rlhf-helpful", "svenok", f"sven/{f}#{i}", d.sven_code(r, _rng(seed, "control", f, i), vulnerable=False), f"sven{f}{i}", sven)
    for key, bucket in (("jbb", jbb), ("persona", persona), ("ab", ab), ("caa", caa), ("sven", sven)):
        rows += _sample(bucket, CONTROL_CAPS[key], seed, f"control-{key}")
    return rows


COLLECTORS: tuple[tuple[str, Callable[[SourcePack, int], list[Row]]], ...] = (
    ("hh-rlhf", collect_hh),
    ("function calling (bfcl, tau-bench)", collect_function_calling),
    ("code (sven, cyberseceval)", collect_code),
    ("jailbreakbench", collect_jailbroken),
    ("caa sycophancy", collect_sycophantic),
    ("anthropic-evals scheming", lambda p, s: _collect_misaligned(p, s, "scheming", SCHEMING_FILES)),
    ("anthropic-evals controlling", lambda p, s: _collect_misaligned(p, s, "controlling", CONTROLLING_FILES)),
    ("multijail swahili", collect_swahili),
)


# --------------------------------------------------------------------------- assembly


NEAR_DUPLICATE_DOMAINS = ("hh-rlhf-harmless",)


def drop_near_duplicates(rows: list[Row], domains: tuple[str, ...] = NEAR_DUPLICATE_DOMAINS) -> tuple[list[Row], dict[str, int]]:
    """Among the rows of ``domains``: near-duplicate conversations (:func:`near_duplicate_clusters`)
    keep one member (train first, then by source), and a cluster labelled both ways is dropped
    whole (people disagreed on the same text). Other domains are left as they are (their safe /
    unsafe twins differ in one value on purpose)."""
    idx = sorted((i for i, r in enumerate(rows) if r.domain in domains),
                 key=lambda i: (rows[i].split != "train", rows[i].source))
    clusters = near_duplicate_clusters([render(rows[i].messages) for i in idx])
    labels: dict[int, set[int]] = {}
    for i, c in zip(idx, clusters):
        labels.setdefault(c, set()).add(rows[i].malign)
    drop, kept_cluster = set(), set()
    stats = {"near_duplicate_rows_dropped": 0, "conflicting_label_rows_dropped": 0}
    for i, c in zip(idx, clusters):
        if len(labels[c]) > 1:
            drop.add(i)
            stats["conflicting_label_rows_dropped"] += 1
        elif c in kept_cluster:
            drop.add(i)
            stats["near_duplicate_rows_dropped"] += 1
        else:
            kept_cluster.add(c)
    return [r for i, r in enumerate(rows) if i not in drop], stats


def assemble(rows: list[Row]) -> dict[str, list[dict]]:
    """Render, drop duplicate conversations (a test row identical to a train row is dropped,
    so nothing leaks), assign ids ``<domain>-<tag>-<n>`` and return ``{split: rows}``."""
    rendered = [(r, render(r.messages)) for r in rows]
    train_hashes = {normalise(c) for r, c in rendered if r.split == "train"}
    seen: set[str] = set()
    out: dict[str, list[dict]] = {"train": [], "test": []}
    counters: Counter = Counter()
    for r, conv in sorted(rendered, key=lambda rc: (rc[0].split != "train", rc[0].domain, rc[0].source)):
        h = normalise(conv)
        if h in seen or (r.split == "test" and h in train_hashes):
            continue
        seen.add(h)
        n = counters[(r.domain, r.tag)]
        counters[(r.domain, r.tag)] += 1
        out[r.split].append({"id": f"{r.domain}-{r.tag}-{n}", "conversation": conv, "domain": r.domain,
                             "malign": int(r.malign), "source": r.source})
    return out


def jsonl_gz_bytes(rows: Iterable[dict]) -> bytes:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def counts(splits: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, int]]]:
    """``{split: {domain: {"safe": n, "unsafe": n}}}``."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for split, rows in splits.items():
        c: dict[str, dict[str, int]] = {}
        for r in rows:
            c.setdefault(r["domain"], {"safe": 0, "unsafe": 0})["unsafe" if r["malign"] else "safe"] += 1
        out[split] = dict(sorted(c.items()))
    return out


def build_benchmark(sources: str | Path, out: str | Path, seed: int = 0, *, progress: bool = True) -> dict:
    """Build the benchmark from the source pack into ``out``; return the build report."""
    pack = SourcePack(sources)
    rows: list[Row] = []
    for name, collect in tqdm(COLLECTORS, desc="sources", unit="source", disable=None if progress else True):
        rows += collect(pack, seed)
    records, harm_stats = harm_records(pack)
    rows += harm_rows(records, seed)
    rows += collect_shape_controls(pack, seed, {r.source.split(":")[0] for r in rows})
    rows, dedup = drop_near_duplicates(rows)
    splits = assemble(rows)
    train_bytes, test_bytes = jsonl_gz_bytes(splits["train"]), jsonl_gz_bytes(splits["test"])
    baseline = format_baseline(splits["test"], ID_DOMAINS, seed=seed)
    report = {
        "seed": seed,
        "domains": {"id": list(ID_DOMAINS), "ood": list(OOD_DOMAINS), "opt_in": list(OPT_IN_DOMAINS)},
        "n_rows": {k: len(v) for k, v in splits.items()},
        "counts": counts(splits),
        "format_baseline_auroc": baseline,
        "format_baseline_family_matched_auroc": format_baseline(splits["test"], ID_DOMAINS, seed=seed, family_matched=True),
        "content_shape_baseline_auroc": format_baseline(splits["test"], ID_DOMAINS, seed=seed, features="content_shape"),
        "id_baselines_auroc": id_baselines(splits["train"], splits["test"], ID_DOMAINS),
        "max_chars": d.MAX_CHARS,
        "harm_labels": {**harm_stats, **dedup},
        "sha256": {"train.jsonl.gz": hashlib.sha256(train_bytes).hexdigest(),
                   "test.jsonl.gz": hashlib.sha256(test_bytes).hexdigest()},
        "bytes": {"train.jsonl.gz": len(train_bytes), "test.jsonl.gz": len(test_bytes)},
    }
    from .provenance import provenance_markdown

    with atomic.atomic_dir(out) as tmp:
        tmp.chmod(0o755)
        (tmp / "train.jsonl.gz").write_bytes(train_bytes)
        (tmp / "test.jsonl.gz").write_bytes(test_bytes)
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "PROVENANCE.md").write_text(provenance_markdown(report), encoding="utf-8")
        lic = tmp / "LICENSES"
        lic.mkdir()
        for src in SOURCES.values():
            (lic / f"{src.folder.replace('/', '__')}.txt").write_text(
                f"Source: {src.upstream}\nCommit: {src.commit}\nLicense: {src.license}\n\n{pack.license_text(src)}",
                encoding="utf-8")
    return report
