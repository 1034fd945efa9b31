"""models.bench_fullres: whole-image DANet-101 inference, fused vs released attention."""
from models import bench_fullres


def test_fullres_benchmark_runs_small(tmp_path):
    """models.bench_fullres at a small size: both attention kinds run in their own processes, report
    time and peak memory, and predict the same classes."""
    records = bench_fullres.main(["--size", "64", "96", "--dtype", "fp32", "--json", str(tmp_path / "r.json")])
    assert [(r["attention"], r["ok"]) for r in records] == [("fused", True), ("released", True)], records
    for r in records:
        assert r["N"] == 8 * 12 and r["time_s"] > 0 and r["peak_rss_mib"] >= r["rss_before_mib"] > 100
        assert r["argmax_agreement"] >= 0.99  # random weights: near-ties may flip a few pixels
