"""The how-to's Python snippets run as scripts, as a reader would run them: each
``python`` block of ``docs/howto/vllm.md``, with ``MODEL_DIR`` the tiny model and the
server's address that of the live test server, in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.vllm.conftest import BASE_ENVIRONMENT, VLLM_MISSING

pytest.importorskip("vllm", reason=VLLM_MISSING)

HOWTO = Path(__file__).parents[3] / "docs" / "howto" / "vllm.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", HOWTO.read_text(), flags=re.DOTALL)
RUN_S = 300


def test_the_howto_has_the_snippets():
    assert len(SNIPPETS) == 2 and any("LLM(" in s for s in SNIPPETS) and any("OpenAI(" in s for s in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=["python-api", "openai-client"])
def test_snippet_runs_as_a_script(index, tiny_llama, server, tmp_path):
    code = SNIPPETS[index].replace("MODEL_DIR", str(tiny_llama))
    code = code.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{server}")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {k: v for k, v in BASE_ENVIRONMENT.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB: the tiny model needs little
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=RUN_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "document_blocks" in done.stdout, done.stdout[-2000:]
