"""Fabricated sweep folders (3 sizes x 4 monitors) that follow docs/architecture.md formats.

Imported by the sweep/scaling/report/compare tests; the one test here checks the fabric.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from mood_data.domains import ID_DOMAINS, OOD_DOMAINS

MONITORS = ("guard", "guard+maha", "guard+ppl", "guard+maha+ppl")
SIZES = {"tiny-s": 1_000_000, "tiny-m": 10_000_000, "tiny-l": 100_000_000}
FPRS = (0.005, 0.01, 0.02)
# a valid 1x1 PNG
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
SECONDS = {"guard": 0.010, "guard+maha": 0.011, "guard+ppl": 0.020, "guard+maha+ppl": 0.021}


def tpr_value(size_idx: int, monitor_idx: int, domain_idx: int, fpr: float) -> float:
    """Hand-made recall: grows with size, monitor and FPR; distinct per domain."""
    v = 0.05 + 0.2 * size_idx + 0.1 * monitor_idx + 0.01 * domain_idx + 2.0 * fpr
    return round(min(v, 0.99), 4)


def make_analysis(monitor: str, size_idx: int) -> dict:
    m = MONITORS.index(monitor)
    groups = {}
    for d_idx, domain in enumerate(OOD_DOMAINS + ("id",)):
        tpr = {str(f): tpr_value(size_idx, m, d_idx, f) for f in FPRS}
        groups[domain] = {
            "kind": "id" if domain == "id" else "ood",
            "n_unsafe": 40 + d_idx,
            "tpr": tpr,
            "tpr_ci": {k: [round(v - 0.05, 4), round(min(v + 0.05, 1.0), 4)] for k, v in tpr.items()},
            "auroc": round(0.6 + 0.1 * size_idx + 0.02 * m, 4),
            "auroc_ci": [0.5, 0.9],
        }
    ood = [groups[d]["tpr"] for d in OOD_DOMAINS]
    overall_tpr = {str(f): round(sum(t[str(f)] for t in ood) / len(ood), 6) for f in FPRS}
    return {
        "monitor": monitor,
        "fprs": list(FPRS),
        "n_id_safe": 120,
        "thresholds": {str(f): 1.0 - f * 10 - 0.1 * m for f in FPRS},
        "groups": groups,
        "overall": {
            "tpr": overall_tpr,
            "tpr_ci": {k: [round(v - 0.03, 6), round(v + 0.03, 6)] for k, v in overall_tpr.items()},
            "auroc": round(0.65 + 0.1 * size_idx + 0.02 * m, 4),
            "n_domains": len(OOD_DOMAINS),
        },
    }


def make_results(size_idx: int, monitor_idx: int, n_safe: int = 60, n_unsafe: int = 30) -> list[dict]:
    """Scores: ID safe rows spread over [0, 1), unsafe rows shifted up with size/monitor."""
    rows = []
    for i in range(n_safe):
        rows.append({"id": f"safe-{i}", "conversation": "c", "domain": ID_DOMAINS[i % 3], "malign": 0,
                     "score": i / n_safe})
    for d_idx, domain in enumerate(OOD_DOMAINS):
        for i in range(n_unsafe):
            rows.append({"id": f"{domain}-{i}", "conversation": "c", "domain": domain, "malign": 1,
                         "score": 0.5 + 0.1 * size_idx + 0.05 * monitor_idx + i / (2 * n_unsafe) + 0.01 * d_idx})
    return rows


# measured hardware per run: a GPU run, a CPU run, and one that predates the field
DEVICES = {"tiny-s": {"device": "cuda (NVIDIA H100)", "dtype": "bfloat16"}, "tiny-m": {"device": "cpu", "dtype": "float32"}}


def make_eval_folder(folder: Path, monitor: str, run: str, params: int, size_idx: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.json").write_text(json.dumps(make_analysis(monitor, size_idx)))
    (folder / "meta.json").write_text(json.dumps({
        "monitor": monitor, "recipe": f"recipes/tiny/{run}.yaml", "model": f"embedded:{run}",
        "params": params, "n_rows": 270, "seconds": 2.7, "seconds_per_conversation": SECONDS[monitor],
        "truncated_rows": 0, "versions": {"moodguard": "0.1.0"}, **DEVICES.get(run, {}),
    }))
    with open(folder / "results.jsonl", "w") as fh:
        for r in make_results(size_idx, MONITORS.index(monitor)):
            fh.write(json.dumps(r) + "\n")
    (folder / "plots").mkdir(exist_ok=True)
    for group in ("overall", "jailbroken"):
        (folder / "plots" / f"{group}_hist.png").write_bytes(PNG_1x1)
        (folder / "plots" / f"{group}_roc.png").write_bytes(PNG_1x1)
    (folder / "summary.md").write_text(f"# {monitor}\n")
    return folder


def make_sweep(root: Path) -> Path:
    for size_idx, (run, params) in enumerate(SIZES.items()):
        for monitor in MONITORS:
            make_eval_folder(root / run / "eval" / monitor, monitor, run, params, size_idx)
    return root


def test_fabricated_sweep_layout(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("analysis.json"))
    assert len(found) == 12
    assert "tiny-m/eval/guard+maha/analysis.json" in found
    a = json.loads((root / "tiny-l/eval/guard/analysis.json").read_text())
    # overall = unweighted mean over the 7 OOD domains
    assert a["overall"]["tpr"]["0.01"] == round(sum(tpr_value(2, 0, d, 0.01) for d in range(7)) / 7, 6)
