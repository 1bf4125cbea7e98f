"""Importing the registry and the compressors stays light: no bitsandbytes, no CUDA initialisation."""

import subprocess
import sys


def test_import_compressors_is_lean():
    code = (
        "import sys, torch\n"
        "import compress.recipe.registry as r\n"
        "r.available_passes(); r.available_evaluators()\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported'\n"
        "assert 'datasets' not in sys.modules, 'datasets imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
