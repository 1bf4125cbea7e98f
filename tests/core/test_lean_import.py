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


def test_validate_help_and_recipes_import_neither_torch_nor_transformers(tmp_path):
    """A typo costs the recipe's validation, not torch's import: every shipped recipe and a broken one validate, and
    --help and `recipes list/show` print, with neither torch nor transformers imported (the registry declares each
    pass with its torch-free config and imports the pass only when it runs)."""
    (tmp_path / "typo.yaml").write_text("model: some/model\npasses:\n  - gptq: {bits: 4, gropu_size: 128}\n")
    code = (
        "import sys\n"
        "from compress.cli.main import app\n"
        "from compress.recipes import shipped_recipes\n"
        "def run(*args):\n"
        "    return app([*args], standalone_mode=False) or 0  # the exit code\n"
        "codes = [run('validate', r.name) for r in shipped_recipes()]\n"
        "assert codes == [0] * len(codes), codes\n"
        "assert run('validate', 'typo.yaml') == 2\n"
        "assert run('--help') == 0 and run('recipes', 'list') == 0 and run('recipes', 'show', 'demo') == 0\n"
        "heavy = [name for name in ('torch', 'transformers') if name in sys.modules]\n"
        "assert not heavy, f'imported: {heavy}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gropu_size" in result.stderr  # the typo was reported, by file and line
