"""Old module paths (ddpm_fast.aot, ...) kept for one release as aliases of ddpm_fast.tools.*."""

import importlib
import runpy
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make the module `old` the module `new`: imported, `sys.modules[old]` is `new` itself (the
    same functions and globals, so patching either patches both); run with `python -m old`, it
    runs `python -m new`. Either way a DeprecationWarning names the new path."""
    warnings.warn(f"{old.replace('__main__', 'this module')} moved to {new}", DeprecationWarning, stacklevel=3)
    if old == "__main__":
        runpy.run_module(new, run_name="__main__", alter_sys=True)
    else:
        sys.modules[old] = importlib.import_module(new)
