"""The package's layering: what may import what, and how large a module may grow."""

import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "atlasfl"


def test_report_reads_runs_without_the_training_code():
    code = ("import sys, atlasfl.report; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
            "'atlasfl.engine', 'atlasfl.client', 'atlasfl.strategies', 'atlasfl.phases'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("package", ["phases", "strategies"])
def test_algorithms_never_reach_into_the_engine(package):
    for path in (SRC / package).glob("*.py"):
        imports = [line for line in path.read_text().splitlines()
                   if line.lstrip().startswith(("import ", "from "))]
        assert not [line for line in imports if "atlasfl.engine" in line
                    or "atlasfl.client" in line], path


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}
