"""``import lazyattention.fast`` without Triton says which extra to install."""

import subprocess
import sys


def test_without_triton_the_import_error_names_the_extra():
    code = "import sys; sys.modules['triton'] = None; import lazyattention.fast"  # None: as if not installed
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: lazyattention.fast needs Triton: pip install lazyattention[fast]"
    )
