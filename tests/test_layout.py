"""What imports what: the library never imports the project's tools, and the U-Net never the
diffusers conversion (interop.py imports the U-Net; UNet.from_diffusers imports interop lazily)."""

import subprocess
import sys


def _imported(code: str) -> list[str]:
    code += "; import sys; print(sorted(m for m in sys.modules if m.startswith('ddpm_fast')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout)


def test_the_library_never_imports_the_tools():
    loaded = _imported("import ddpm_fast, ddpm_fast.kernels, ddpm_fast.train, ddpm_fast.interop, ddpm_fast.sampling")
    assert "ddpm_fast.train" in loaded and not [m for m in loaded if m.startswith("ddpm_fast.tools")]


def test_the_unet_does_not_import_the_diffusers_conversion():
    loaded = _imported("import ddpm_fast.unet")
    assert "ddpm_fast.unet" in loaded and "ddpm_fast.interop" not in loaded
