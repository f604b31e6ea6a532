"""The project's own tools, apart from the library users import (which never imports them):

- `aot`: the compile report (every launch real code makes, compiled for sm_80 and sm_90 without
  a GPU: registers, spills, shared memory, matrix instructions);
- `traffic`: kernels and bytes per op and per sampling step, fused and eager, counted on a CPU;
- `launches`: kernels per sampling step (Triton launches stubbed);
- `selfcheck` and `checkbench`: `ddpm-fast check` (every fused op against its eager twin on the
  user's device, and `--bench DIR`'s JSON and markdown report);
- `benchreport`: `ddpm-fast bench-report`, a pytest-benchmark JSON as a markdown table.

Each runs as `python -m ddpm_fast.tools.<name>` (or through `ddpm-fast`). The old paths
(`python -m ddpm_fast.aot`, `.traffic`, `.launches`, `.selfcheck`) stay as aliases for one release.
"""
