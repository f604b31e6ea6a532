"""The tools moved to ddpm_fast.tools; their old paths stay as aliases for one release."""

import subprocess
import sys

import pytest

OLD = ["aot", "traffic", "launches", "selfcheck"]


@pytest.mark.parametrize("name", OLD)
def test_the_old_import_path_is_the_tools_module_itself(name):
    import importlib

    with pytest.warns(DeprecationWarning, match=f"ddpm_fast.tools.{name}"):
        sys.modules.pop(f"ddpm_fast.{name}", None)
        old = importlib.import_module(f"ddpm_fast.{name}")
    assert old is importlib.import_module(f"ddpm_fast.tools.{name}")


def test_python_dash_m_on_an_old_path_runs_the_tool():
    proc = subprocess.run([sys.executable, "-m", "ddpm_fast.traffic", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m ddpm_fast.tools.traffic")
