"""`ddpm-fast bench-report`: pytest-benchmark JSON as one markdown table of ratios."""

import json

import pytest

from ddpm_fast.cli import main
from ddpm_fast.tools import benchreport


def bench(group, impl, median, **info):
    return {"group": group, "name": f"test[{impl}]", "params": {"impl": impl}, "stats": {"median": median},
            "extra_info": {"impl": impl, "device": "NVIDIA H100 80GB HBM3", "torch": "2.15.0", "triton": "3.9.0",
                           **info}}  # fmt: skip


DATA = {"benchmarks": [
    bench("attention fwd (128, 1, 256, 256) fp16", "eager", 4e-3),
    bench("attention fwd (128, 1, 256, 256) fp16", "fused", 1e-3, **{"TFLOP/s": 400.0, "fraction of peak": 0.404}),
    bench("attention fwd (128, 1, 256, 256) fp16", "compile", 3e-3),
    bench("attention fwd (128, 1, 256, 256) fp16", "compile-max", 2e-3),
    bench("attention fwd (128, 1, 256, 256) fp16", "sdpa", 0.5e-3),
    bench("DDIM-100 run, batch 1", "fused", 0.8),
    bench("DDIM-100 run, batch 1", "fused+cuda-graph", 0.2),
    bench("DDIM-100 run, batch 1", "eager", 1.0),
    bench("q_sample fwd (1, 3, 32, 32) fp32", "eager", 2e-5),
]}  # fmt: skip


def test_one_row_per_case_with_ratios_against_each_alternative():
    text = benchreport.table(DATA)
    lines = text.splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "torch 2.15.0" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["case", "eager ms", "fused ms", "fused+cuda-graph ms", "compile ms", "compile-max ms", "sdpa ms",
                      "fused vs eager", "vs compile", "vs SDPA", "fused throughput"]  # fmt: skip
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[4:]}
    attn = rows["attention fwd (128, 1, 256, 256) fp16"]
    assert attn[1:7] == ["4.000", "1.000", "-", "3.000", "2.000", "0.500"]
    assert attn[7:] == ["4.00x", "2.00x", "0.50x", "400.0 TFLOP/s (40% of peak)"]  # the better compile: max-autotune
    ddim = rows["DDIM-100 run, batch 1"]
    assert ddim[7] == "5.00x"  # the best fused variant: the CUDA graph
    assert rows["q_sample fwd (1, 3, 32, 32) fp32"][7:] == ["-", "-", "-", "-"]  # CPU data: no fused row


def test_the_command_writes_the_table_and_refuses_what_is_not_benchmark_json(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(DATA))
    main(["bench-report", str(src), "--out", str(tmp_path / "table.md")])
    assert (tmp_path / "table.md").read_text() == benchreport.table(DATA)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["bench-report", str(tmp_path / "bad.json")])
    assert e.value.code == 2 and "not pytest-benchmark JSON" in capsys.readouterr().err


def test_peaks_of_known_gpus():
    # H100 SXM: HBM3 at 2619 MHz on a 5120-bit bus; A100 40GB: HBM2 at 1215 MHz.
    assert benchreport.peak("NVIDIA H100 80GB HBM3", 2_619_000, 5120, half=True) == {
        "peak GB/s": 3352.3, "peak TFLOP/s": 989.4}  # fmt: skip
    assert benchreport.peak("NVIDIA A100-SXM4-40GB", 1_215_000, 5120, half=False) == {
        "peak GB/s": 1555.2, "peak TFLOP/s": 19.5}  # fmt: skip
    assert benchreport.peak("NVIDIA H100 PCIe", 1_593_000, 5120, half=True)["peak TFLOP/s"] == 756.5
    assert "peak TFLOP/s" not in benchreport.peak("NVIDIA GeForce RTX 4090", 10_501_000, 384, half=True)


def test_entries_without_timings_are_left_out_and_named(tmp_path, capsys):
    """An entry without stats (a run cut short, a hand-edited file) crashed the report with a
    KeyError; it is left out and named under the table, and a file with no timings at all is
    refused in one line."""
    untimed = {"group": "attention fwd (1, 1, 16, 32) fp32", "name": "test_attn[fused]", "params": {"impl": "fused"}}
    text = benchreport.table({"benchmarks": [*DATA["benchmarks"], untimed, {**untimed, "stats": {}}]})
    assert text.splitlines()[-1] == "Left out, without timings: test_attn[fused], test_attn[fused]."
    assert "| DDIM-100 run, batch 1 |" in text
    (tmp_path / "none.json").write_text(json.dumps({"benchmarks": [untimed]}))
    with pytest.raises(SystemExit) as e:
        main(["bench-report", str(tmp_path / "none.json")])
    assert e.value.code == 2 and "no entry has timings (stats.median): test_attn[fused]" in capsys.readouterr().err
