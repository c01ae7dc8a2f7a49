"""DataInf / LoGra / FactGraSS beside TRAK-10: one table from compare.py's rows (issue 12).

    .venv/bin/python benchmarks/lowrank_table.py [compare.json ...]

Reads the rows of the given compare.py JSON files (default: benchmarks/results/compare.json; a
later file's row replaces an earlier one for the same model and method), keeps the low-rank
methods and the TRAK-10 / Grad-Dot reference rows, adds the held-out choices of
benchmarks/lowrank_tuning.py, and writes benchmarks/results/lowrank_compare.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

METHODS = (
    "datainf",
    "datainf_default",
    "logra",
    "logra_tuned",
    "factgrass",
    "factgrass_tuned",
    "grad_dot",
    "trak_10",
)


def _f(x: Any, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def load_rows(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for p in paths:
        for r in json.loads(p.read_text())["rows"]:
            if r["method"] in METHODS:
                rows[(r["model"], r["method"])] = r
    return rows


def render(rows: dict[tuple[str, str], dict[str, Any]], tuning: dict[tuple[str, str], Any]) -> str:
    head = [
        "| model | method | hyper-parameters (ours) | ours (s) | dattri (s) | time ours/dattri | LDS ours | LDS dattri | "
        "agreement | goals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in common.MODELS:
        for method in METHODS:
            r = rows.get((model, method))
            if r is None:
                continue
            o, t = r.get("ours") or {}, r.get("dattri") or {}
            spec = common.METHODS.get(method, {})
            hp = spec.get("hparams_by_model", {}).get(model, spec.get("hparams", {}))
            hp = {k: v for k, v in hp.items() if k not in ("projector_kwargs", "offload")}
            peer = t.get("peer_method")
            name = method + (f" (dattri: {peer})" if peer else "")
            if (model, method.removesuffix("_tuned")) in tuning and method.endswith("_tuned"):
                name += " [held-out choice]"
            goals = []
            time_ratio = r.get("time_ratio")
            if time_ratio is not None and o.get("ok") and t.get("ok"):
                goals.append(("✓" if time_ratio <= 0.5 else "✗") + "time")
            lo, lt = o.get("lds"), t.get("lds")
            if lo is not None and lt is not None and lo == lo and lt == lt:
                goals.append(("✓" if lo >= lt - 0.01 else "✗") + "LDS")
            dt = t.get("time_total") if t.get("ok") else ("fail" if t else None)
            head.append(
                f"| {model} | {name} | {json.dumps(hp)} | {_f(o.get('time_total'), '.2f')} | "
                f"{dt if isinstance(dt, str) else _f(dt, '.2f')} | {_f(time_ratio, '.3f')} | {_f(lo, '.3f')} | "
                f"{_f(lt, '.3f')} | {_f(r.get('agreement'), '.3f')} | {' '.join(goals) or '-'} |"
            )
    return "\n".join(head)


def _seeds_section(path: Path) -> str:
    """The projection-seed spread of benchmarks/factgrass_seeds.py (mean +- sd per side), if run."""
    if not path.is_file():
        return ""
    out = json.loads(path.read_text())
    lines = [
        "",
        "Over projection seeds (benchmarks/results/factgrass_seeds.md, dattri's defaults on both sides):",
    ]
    for r in out["rows"]:
        lines.append(
            f"- {r['model']} {r['method']} {r['side']}: LDS {_f(r['lds_mean'], '.3f')} +- {_f(r['lds_sd'], '.3f')} "
            f"over {len(r['lds'])} seeds; agreement between two seeds {_f(r['seed_agreement'], '.3f')}"
        )
    for c in out["cross"]:
        ok = c["gap"] is not None and c["gap"] <= 0.01
        lines.append(
            f"- {c['model']} {c['method']}: dattri - ours {_f(c['gap'], '.3f')} (sd {_f(c['gap_sd'], '.3f')}): "
            + ("within" if ok else "outside")
            + " the goal's 0.01"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [common.RESULTS_DIR / "compare.json"]
    rows = load_rows(paths)
    tpath = common.RESULTS_DIR / "lowrank_tuning.json"
    tuning = (
        {(r["model"], r["method"]): r for r in json.loads(tpath.read_text())["results"]}
        if tpath.is_file()
        else {}
    )
    table = render(rows, tuning)
    notes = [
        f"{side} {m}/{meth}: {(r.get(side) or {}).get('error')}"
        for (m, meth), r in rows.items()
        for side in ("ours", "dattri")
        if not (r.get(side) or {}).get("ok", True) and not (r.get(side) or {}).get("peer_method")
    ]
    text = (
        table
        + "\n\nMNIST 4,500 train x 500 test, one CPU thread per side, shared 2-core host (contended), one run "
        "per cell (compare.py --quick), cache + attribute time; LDS: Spearman over the 50 evaluation subsets, target "
        "-loss. *_tuned / datainf_default are tdabench-only rows compared with dattri's run of the named row (its "
        "defaults); their hyper-parameters were chosen on held-out subsets (benchmarks/results/lowrank_tuning.md). "
        "The grad_dot / trak_10 reference rows are those of the compare.json given (earlier runs, see compare.md).\n"
    )
    text += "".join(f"- {n}\n" for n in notes if n)
    text += _seeds_section(common.RESULTS_DIR / "factgrass_seeds.json")
    (common.RESULTS_DIR / "lowrank_compare.md").write_text(text)
    (common.RESULTS_DIR / "lowrank_compare.json").write_text(
        json.dumps({"rows": list(rows.values()), "sources": [str(p) for p in paths]}, indent=1)
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
