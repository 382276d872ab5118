"""Importing sparsemerge before torch asks torch for huge pages, unless the user chose."""
from __future__ import annotations

import os
import subprocess
import sys


def _env_after_import(env: dict, first: str) -> str:
    code = f"import {first}, sparsemerge, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_thp_flag_set_only_before_torch_and_never_over_the_user():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert _env_after_import(env, "sys") == "1"  # sparsemerge first: set for torch's allocator
    assert _env_after_import(env, "torch") == "unset"  # torch already imported: too late, left alone
    assert _env_after_import({**env, "THP_MEM_ALLOC_ENABLE": "0"}, "sys") == "0"  # the user's choice wins
