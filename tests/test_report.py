from __future__ import annotations

import base64
import re

import pytest

from eval.report.report import write_report
from moodguard.cli import main
from mood_data.domains import OOD_DOMAINS
from test_sweep_fixtures import PNG_1x1, make_sweep


@pytest.fixture(scope="module")
def sweep_with_report(tmp_path_factory):
    root = make_sweep(tmp_path_factory.mktemp("rep") / "sweep")
    return root, write_report(root, fpr=0.01)


def test_report_self_contained_and_complete(sweep_with_report):
    root, files = sweep_with_report
    page = files["html"].read_text()
    # no external assets: every src/href is a data URI or an in-page anchor
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", page)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs)
    assert not re.search(r"""(?:src|href|url)\s*[=(]\s*['"]?https?://""", page)
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    # 12 eval folders x 4 plots + the scaling chart
    assert len(imgs) == 12 * 4 + 1
    assert base64.b64decode(imgs[-1]) == PNG_1x1
    for dom in OOD_DOMAINS + ("id", "overall"):
        assert f"<td>{dom}</td>" in page
    md = files["md"].read_text()
    for dom in OOD_DOMAINS:
        assert f"| {dom} |" in md
    assert (root / "chart" / "recall_vs_params.png").is_file()
    assert "x31.6 larger" in page and "x31.6 larger" in md


def test_report_numbers_and_cost(sweep_with_report):
    root, files = sweep_with_report
    md = files["md"].read_text()
    # tiny-s guard, jailbroken (domain idx 3): TPR@0.01 = 0.05 + 0.03 + 0.02 = 0.10, CI [0.05, 0.15]
    section = md.split("## tiny-s / guard\n")[1].split("## ")[0]
    assert "| jailbroken | ood | 43 | 0.090 [0.040, 0.140] | 0.100 [0.050, 0.150] | 0.120 [0.070, 0.170] |" in section
    # cost: guard+maha+ppl 0.021 s/conv -> 3600/0.021 = 171,429 conv/h; $2/h -> 1e6*0.021/3600*2 = 11.67 USD
    # only the GPU run is priced at the GPU rate; the CPU run is not priced; unknown hardware neither
    assert re.search(r"\| tiny-s \| guard\+maha\+ppl \| 1,000,000 \| cuda \(NVIDIA H100\) / bfloat16 \| 0\.6000 \| 0\.400 "
                     r"\| 0\.0210 \| 0\.0110 \| 171,429 \| 11\.67 \(GPU @ \$2/h\) \|", md)
    assert re.search(r"\| tiny-m \| guard\+maha\+ppl \| [\d,]+ \| cpu / float32 \| .* \| – \(CPU run, not priced\) \|", md)
    assert re.search(r"\| tiny-l \| guard\+maha\+ppl \| [\d,]+ \| not recorded \| .* \| – \(hardware not recorded\) \|", md)


def test_report_prices_cpu_only_at_a_stated_cpu_rate(tmp_path):
    root = make_sweep(tmp_path / "sw")
    md = write_report(root, cpu_hour_cost=0.1)["md"].read_text()
    # 1e6 * 0.021 s / 3600 * $0.1/h = 0.58
    assert re.search(r"\| tiny-m \| guard\+maha\+ppl \| .* \| 0\.58 \(CPU @ \$0\.1/h\) \|", md)


def test_report_header_caveats_and_folded_monitors(sweep_with_report):
    root, files = sweep_with_report
    page = files["html"].read_text()
    head = page.split("<h2>")[0]
    assert "Caveats" in head and "Settings:" in head  # before the first section
    assert page.count("<details>") == 12 and page.count("<summary>") == 12


def test_report_links_plots_when_not_embedded(tmp_path):
    root = make_sweep(tmp_path / "sw")
    page = write_report(root, embed_plots=False)["html"].read_text()
    srcs = re.findall(r"<img loading='lazy'[^>]* src='([^']+)'", page)
    assert len(srcs) == 12 * 4 and not any(s.startswith("data:") for s in srcs)
    assert all((root / s).is_file() for s in srcs)  # relative to the report's folder
    # the chart stays embedded
    assert page.count("src='data:image/png") == 1


def test_cli_chart_report_compare(tmp_path, capsys):
    root = make_sweep(tmp_path / "sw")
    run = root / "tiny-m"
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "Recall vs parameters" not in page and "tiny-m / guard+ppl" in page
    assert main(["chart", str(root), "--fpr", "0.02"]) == 0
    assert "recall_vs_params.svg" in capsys.readouterr().out
    assert main(["compare", str(root / "tiny-s"), str(root / "tiny-m"), "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "| guard | jailbroken |" in out and "regressed: none" in out
    assert main(["compare", str(root / "tiny-m"), str(root / "tiny-s"), "--n-boot", "20", "--fail-on-regression"]) == 1
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "moodguard report: error:" in capsys.readouterr().err
