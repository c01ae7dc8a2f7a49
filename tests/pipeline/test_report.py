"""The report (issue 16.6): self-contained HTML, metric help, provenance, captions, the LOO effect,
and a headless-Chromium check that no image is broken and nothing scrolls sideways at 1,400 px."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tdabench._io import write_json, write_sidecar
from tdabench.errors import IntegrityError, ProvenanceError
from tdabench.pipeline.report import METRIC_HELP, PLOT_CAPTIONS, loo_effect, render_report

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
METHODS = [f"method_{i}_with_a_long_name" for i in range(9)]


def _inputs(tmp_path):
    """Metrics + curves of 2 benchmarks x 9 methods, as evaluate writes them; ground-truth records."""
    metrics, curves, gt = {}, {}, {}
    for b in ("bench_a", "bench_b"):
        for i, m in enumerate(METHODS):
            v = 0.1 * (i % 7)
            mp = tmp_path / f"results/metrics/{b}/{m}.json"
            cp = tmp_path / f"results/{b}/plots/{m}.json"
            mp.parent.mkdir(parents=True, exist_ok=True)
            cp.parent.mkdir(parents=True, exist_ok=True)
            prov = {"benchmark": b, "method": m, "groundtruth_keys": {"loo": f"loo-key-of-{b}"}}
            write_json(
                mp,
                {
                    "benchmark": b,
                    "method": m,
                    "provenance": prov,
                    "lds": {
                        "value": v,
                        "ci_low": v - 0.02,
                        "ci_high": v + 0.03,
                        "n_test": 40,
                        "noise_ceiling": 0.9,
                    },
                    "loo": {
                        "value": v / 2,
                        "ci_low": v / 2 - 0.1,
                        "ci_high": v / 2 + 0.1,
                        "n_test": 40,
                    },
                    "auc": {"value": 0.5 + v / 2, "num_flipped": 60},
                },
            )
            write_sidecar(mp, {"attribution_seconds": 1.5})
            write_json(
                cp,
                {
                    "provenance": prov,
                    "roc": {"fpr": [0, 0.5, 1], "tpr": [0, 0.7, 1]},
                    "loo_scatter": {
                        "score": [0.1, 0.2, 0.3, 0.4],
                        "loo_effect": [2.0, 2.1, 2.3, 2.2],
                        "full_loss": 2.0,
                        "test_index": 0,
                        "first_removed": 0,
                    },
                },
            )
            metrics.setdefault(b, {})[m] = str(mp)
            curves.setdefault(b, {})[m] = str(cp)
        rec = tmp_path / f"results/{b}/groundtruth/lds/complete-8.json"
        rec.parent.mkdir(parents=True, exist_ok=True)
        rec.write_text(json.dumps({"key": f"key-of-{b}", "count": 8}))
        gt[f"{b}/lds"] = str(rec)
    return metrics, curves, gt


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    metrics, curves, gt = _inputs(tmp)
    r = tmp / "results"
    spec = {"stage": "report", "benchmarks": ["bench_a", "bench_b"], "report": {"plots": True}}
    context = {
        "configfiles": ["configs/default.yaml", "configs/smoke.yaml"],
        "hyperparameters": {"if_cg": {"params": {"regularization": 0.01}, "chosen": "fixed"}},
    }
    render_report(
        spec,
        metrics,
        str(r / "report.md"),
        str(r / "report.html"),
        str(r / "plots"),
        str(r / "summary.csv"),
        curves=curves,
        groundtruth=gt,
        context=context,
    )
    return r


def test_html_is_self_contained_and_explained(report):
    page = (report / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere
    assert page.count("<figcaption>") == 4
    for stem, caption in PLOT_CAPTIONS.items():
        assert caption.split(":")[0] in page, stem
    for name in METRIC_HELP:
        assert f"<dt>{name}</dt>" in page
    assert "| 1.5 |" in (report / "report.md").read_text()  # time from the metrics' sidecar
    for needed in (
        "configs/smoke.yaml",
        "commit",
        "commit_date",
        "key-of-bench_a",
        "loo-key-of-bench_b",
        "cpu",
        "&quot;regularization&quot;: 0.01",
    ):
        assert needed in page, needed
    # volatile facts go to a sidecar: the page itself is the same for the same inputs
    assert json.loads((report / "report.html.run.json").read_text())["created"]
    assert "created" not in page


def test_report_is_byte_reproducible(report, tmp_path):
    metrics, curves, gt = _inputs(tmp_path)
    r = tmp_path / "results"
    spec = {"stage": "report", "benchmarks": ["bench_a", "bench_b"], "report": {"plots": True}}
    context = {
        "configfiles": ["configs/default.yaml", "configs/smoke.yaml"],
        "hyperparameters": {"if_cg": {"params": {"regularization": 0.01}, "chosen": "fixed"}},
    }
    render_report(
        spec,
        metrics,
        str(r / "report.md"),
        str(r / "report.html"),
        str(r / "plots"),
        str(r / "summary.csv"),
        curves=curves,
        groundtruth=gt,
        context=context,
    )
    for name in ("report.html", "report.md", "summary.csv", "plots/loo_scatter.png"):
        assert (r / name).read_bytes() == (report / name).read_bytes(), name


def test_loo_effect_subtracts_the_full_model():
    y, label = loo_effect({"loo_effect": [2.0, 2.5, 1.5], "full_loss": 2.0})
    assert y == [0.0, 0.5, -0.5] and "full model" in label
    y, label = loo_effect({"loo_effect": [2.0, 2.5, 1.5]})  # not recorded: say so on the axis
    assert y == [0.0, 0.5, -0.5] and "not recorded" in label


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs it: .ci/run)")
def test_chromium_no_broken_image_no_horizontal_scroll(report, tmp_path):
    page = (report / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load',()=>{const d=document.createElement('pre');"
        "d.id='probe';d.textContent='PROBE '+JSON.stringify({scroll:document.documentElement"
        ".scrollWidth,width:window.innerWidth,images:document.images.length,"
        "broken:[...document.images].filter(i=>!i.complete||i.naturalWidth===0).length});"
        "document.body.appendChild(d);});</script>"
    )
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,1000",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r"PROBE (\{.*?\})", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr[-2000:]
    seen = json.loads(m.group(1))
    assert seen["images"] == 4 and seen["broken"] == 0, seen
    assert seen["scroll"] <= 1400, seen


def _render(tmp_path, metrics, curves):
    r = tmp_path / "out"
    render_report(
        {"report": {"plots": False}},
        metrics,
        str(r / "report.md"),
        str(r / "report.html"),
        str(r / "plots"),
        str(r / "summary.csv"),
        curves=curves,
    )


def test_report_refuses_edited_or_foreign_inputs(tmp_path):
    metrics, curves, _gt = _inputs(tmp_path)
    path = metrics["bench_a"][METHODS[0]]
    body = json.loads(Path(path).read_text())
    body["lds"]["value"] = 0.99
    Path(path).write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        _render(tmp_path, {"bench_a": {METHODS[0]: path}}, curves)
    other = metrics["bench_b"][METHODS[1]]  # another benchmark's file under this name
    with pytest.raises(ProvenanceError, match="belongs to benchmark 'bench_b'"):
        _render(tmp_path, {"bench_a": {METHODS[1]: other}}, None)
