"""`interplab bench`: the machinery and the table's structure (never the timings, which are machine noise)."""

import json

import pytest

from interplab import bench

# one made-up result per section, in the shape each section function returns
FAKE = {
    "probes": {
        "torch_seconds": 4.5,
        "sklearn_seconds": 0.7,
        "torch_accuracy": [0.1, 0.5],
        "sklearn_accuracy": [0.1, 0.5],
        "n_train": 80,
        "n_test": 20,
        "hooks": ["a", "b"],
    },
    "lenses": {
        "train_seconds_wall": 30.0,
        "train_seconds_cpu": 29.0,
        "threads": 1,
        "steps": 1000,
        "labels": ["embed", "layer 0"],
        "kl_logit": [3.0, 1.0],
        "kl_tuned": [1.0, 0.2],
    },
    "saes": {
        "setup": {"steps": 10, "batch_size": 8, "d_sae": 32, "k": 4},
        "interplab": {"tokens_per_second": 2000, "explained_variance": 0.9, "l0": 4.0, "loss_recovered": 0.95},
        "sae_lens": {"tokens_per_second": 1000, "explained_variance": 0.85, "l0": 4.0, "loss_recovered": 0.9},
    },
    "transcoders": {
        "loss_recovered": 0.85,
        "ce_clean": 1.0,
        "ce_replaced": 1.2,
        "ce_ablated": 2.3,
        "docs": 40,
        "skip": {"loss_recovered": 0.9, "ce_replaced": 1.1},
    },
    "patching": {
        "n_prompts": 4,
        **{
            f"{k}_{m}": v
            for k in ("resid_pre", "head_out_all_pos", "head_out_by_pos")
            for m, v in (("ours_s", 0.1), ("tl_s", 0.5), ("max_abs_diff", 1e-6))
        },
        "attribution_s": 0.01,
        "head_by_pos_sweep_s": 0.1,
        "attribution_vs_activation_r": 0.9,
        "integrated_attribution_s": 0.05,
        "integrated_attribution_vs_activation_r": 0.99,
    },
    "notebooks": {
        "all_chapters": ["00_orientation", "01_probes"],
        "00_orientation": {"as_shipped": {"seconds": 50.0, "peak_mb": 900}},
    },
}


def _report(sections):
    return {"machine": bench.machine(), "mode": "quick", "date": "now", "total_seconds": 1.0, "sections": sections}


def test_every_section_has_rows_with_numeric_ratios():
    rows = bench.table_rows(_report(FAKE))
    for name in bench.section_names():
        mine = [r for r in rows if r["section"] == name]
        assert mine, f"no rows for {name}"
        assert all(set(r) == {"section", "measurement", "interplab", "peer", "ratio", "note"} for r in mine)
    for r in rows:
        if r["peer"] is not None:
            assert isinstance(r["ratio"], float)
            assert r["ratio"] == pytest.approx(r["interplab"] / r["peer"], rel=1e-2)
    sae = {r["measurement"]: r for r in rows if r["section"] == "saes"}
    assert sae["training throughput (tokens/s)"]["ratio"] == 2.0
    # a chapter not measured in this run is still listed
    assert any(r["measurement"].startswith("01_probes") and r["note"] == "not run" for r in rows)


def test_markdown_is_one_table_row_per_measurement():
    report = _report(FAKE)
    text = bench.to_markdown(report)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(bench.COLUMNS) + " |"
    assert len(table) == 2 + len(bench.table_rows(report))
    assert all(line.count("|") == len(bench.COLUMNS) + 1 for line in table)
    assert "```" not in text and "interplab bench" in text


def test_a_failing_section_keeps_the_others():
    rows = bench.table_rows(_report({"probes": {"error": "RuntimeError: boom"}, "transcoders": FAKE["transcoders"]}))
    assert rows[0]["measurement"] == "(section failed)" and "boom" in rows[0]["note"]
    assert any(r["section"] == "transcoders" for r in rows)


def test_quick_mode_carries_over_chapters_from_a_full_run():
    report = _report(
        {
            "notebooks": {
                "all_chapters": ["00_orientation", "01_probes"],
                "00_orientation": {"as_shipped": {"seconds": 40.0, "peak_mb": 800}},
            }
        }
    )
    previous = {
        "mode": "full",
        "date": "yesterday",
        "sections": {
            "notebooks": {
                "00_orientation": {"as_shipped": {"seconds": 1.0, "peak_mb": 1}},
                "01_probes": {"as_shipped": {"seconds": 90.0, "peak_mb": 1200}},
            }
        },
    }
    bench.carry_over_notebooks(report, previous)
    nb = report["sections"]["notebooks"]
    assert nb["00_orientation"]["as_shipped"]["seconds"] == 40.0  # measured now, not replaced
    assert nb["01_probes"]["carried_over_from"] == "yesterday"
    rows = bench.rows_notebooks(nb)
    assert any("carried over" in r["note"] and r["interplab"] == 90.0 for r in rows)


def test_a_real_section_end_to_end(tmp_path):
    """The probes section, shrunk, through main(): files written, table rows present."""
    import unittest.mock as mock

    tiny = {"probes": {"n_docs": 60, "repeats": 1}}
    real_run = bench.run
    with mock.patch.object(bench, "run", lambda sections, quick, overrides=None: real_run(sections, quick, tiny)):
        assert bench.main(["--quick", "--only", "probes", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmarks.json").read_text())
    assert report["mode"] == "quick" and report["sections"]["probes"]["_arguments"] == tiny["probes"]
    rows = [r for r in report["rows"] if r["section"] == "probes"]
    assert len(rows) == 3 and all(isinstance(r["ratio"], float) for r in rows)
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| probes | training time, 5 depths (s) |" in md


def test_a_busy_run_compares_each_chapter_with_its_idle_pass_of_the_same_run():
    from interplab.bench import add_idle_peers, rows_notebooks

    busy = {"sections": {"notebooks": {"all_chapters": ["00_x"], "00_x": {"as_shipped": {"seconds": 30.0}}}}}
    idle = {
        "date": "now",
        "idle_date": "earlier in this run",
        "sections": {"notebooks": {"00_x": {"as_shipped": {"seconds": 20.0, "peak_mb": 5}}}},
    }
    add_idle_peers(busy, idle)
    (r,) = rows_notebooks(busy["sections"]["notebooks"])
    assert r["ratio"] == 1.5 and r["peer"] == 20.0 and "earlier in this run" in r["note"]
