"""`ddpm-fast bench-report bench.json`: pytest-benchmark's JSON as one markdown table of ratios.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    ddpm-fast bench-report bench.json --out docs/benchmarks.md

One row per benchmark group (one case: op, shape, dtype, layout), the median time of each impl
(eager, fused, torch.compile in both modes, SDPA, fused with a CUDA graph), then the speed-up of
the fused path (its best variant) over eager, over the better torch.compile and over SDPA
(> 1: fused is faster), and the throughput the fused kernel reaches with its fraction of the
device's peak.
"""

import argparse
import json
import sys

ORDER = ["eager", "fused", "fused+cuda-graph", "compile", "compile-max", "sdpa"]

# Datasheet dense TFLOP/s: (float16/bfloat16 on tensor cores, float32 on CUDA cores), by the
# first name fragment that matches torch.cuda.get_device_name(). Other GPUs: no peak is claimed.
PEAK_TFLOPS = [("H200", (989.4, 66.9)), ("H100 NVL", (835.5, 59.8)), ("H100 PCIe", (756.5, 51.2)),
               ("H100", (989.4, 66.9)), ("A100", (312.0, 19.5))]  # fmt: skip


def peak(name: str, memory_clock_khz: int, bus_width_bits: int, half: bool | None = None) -> dict:
    """A GPU's peak: memory bandwidth in GB/s (double data rate x bus width, from what
    torch.cuda.get_device_properties reports) and, if `half` is given, dense TFLOP/s for
    float16/bfloat16 (half=True) or float32 (False) where the datasheet is known."""
    out = {"peak GB/s": round(2 * memory_clock_khz * 1e3 * bus_width_bits / 8 / 1e9, 1)}
    for fragment, tflops in PEAK_TFLOPS:
        if half is not None and fragment in name:
            out["peak TFLOP/s"] = tflops[0] if half else tflops[1]
            break
    return out


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _ratio(other: float | None, fused: float | None) -> str:
    return f"{other / fused:.2f}x" if other and fused else "-"


def load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (write one with pytest benchmarks/ --benchmark-only "
                                f"--benchmark-json={path})") from None  # fmt: skip
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def table(data: dict) -> str:
    """The markdown table (with a line naming the device and versions) for pytest-benchmark JSON."""
    groups: dict[str, dict] = {}
    meta, untimed = {}, []
    for b in data["benchmarks"]:
        if not isinstance(b, dict):
            raise ValueError(f"a 'benchmarks' entry is not an object: {b!r:.80}")
        name = b.get("group") or b.get("name") or "?"
        median = (b.get("stats") or {}).get("median")
        if not isinstance(median, (int, float)):  # an entry without timings (cut short, hand-edited)
            untimed.append(b.get("name") or name)
            continue
        info = b.get("extra_info") or {}
        impl = info.get("impl") or (b.get("params") or {}).get("impl", "eager")
        groups.setdefault(name, {})[impl] = (median, info)
        meta = meta or info
    if not groups:
        raise ValueError(f"no entry has timings (stats.median): {', '.join(untimed) or 'the benchmarks list is empty'}")
    impls = [i for i in ORDER if any(i in g for g in groups.values())]
    impls += sorted({i for g in groups.values() for i in g} - set(impls))
    header = ["case"] + [f"{i} ms" for i in impls] + ["fused vs eager", "vs compile", "vs SDPA", "fused throughput"]
    lines = [
        f"Median times on {meta.get('device', '?')} (torch {meta.get('torch', '?')}, triton "
        f"{meta.get('triton', '?')}); ratios above 1 mean the fused path is faster.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name in sorted(groups):
        g = groups[name]
        med = {i: g[i][0] for i in g}
        fused_impls = [i for i in g if i.startswith("fused")]
        best_fused = min(fused_impls, key=lambda i: med[i]) if fused_impls else None
        fused = med[best_fused] if best_fused else None
        compile_ms = min((med[i] for i in ("compile", "compile-max") if i in med), default=None)
        throughput = "-"
        if best_fused:
            info = g[best_fused][1]
            for unit in ("GB/s", "TFLOP/s"):
                if unit in info:
                    frac = info.get("fraction of peak")
                    throughput = f"{info[unit]} {unit}" + (f" ({frac:.0%} of peak)" if frac is not None else "")
        row = [name] + [_ms(med[i]) if i in med else "-" for i in impls]
        row += [_ratio(med.get("eager"), fused), _ratio(compile_ms, fused), _ratio(med.get("sdpa"), fused), throughput]
        lines.append("| " + " | ".join(row) + " |")
    if untimed:
        lines += ["", f"Left out, without timings: {', '.join(untimed)}."]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("json", help="pytest-benchmark's --benchmark-json output")
    p.add_argument("--out", help="write the markdown here (default: print it)")


def main(args) -> None:
    text = table(load(args.json))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
