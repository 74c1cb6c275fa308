"""btm: Branch-Train-Merge and c-BTM forests of expert LMs, on SLURM or locally."""
from setuptools import find_packages, setup

# launcher/ and analysis/ must import on a login node without fairseq or torch: their core
# dependencies are the light ones below; fairseq_ext needs the "fairseq" extra.
core = [
    "numpy>=1.26",
    "pandas>=2.1",
    "pyarrow>=14",
    "PyYAML>=6",
    "submitit>=1.5",
    "tqdm>=4.60",
    "matplotlib>=3.8",
    "filelock>=3.12",
]
# fairseq-fixed==0.12.3.1 itself is installed by scripts/setup_env.sh with --no-deps and a
# sha256 pin: its metadata requires torchaudio, whose builds do not load beside a CPU torch, so
# listing it here would let pip pull one in. Its real runtime dependencies are listed instead.
fairseq = [
    "torch>=2.1",  # the exact build is chosen by scripts/setup_env.sh (BTM_TORCH_SPEC)
    "cffi",
    "cython>=3",
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "antlr4-python3-runtime==4.9.3",
    "bitarray",
    "regex",
    "sacrebleu>=1.4.12",
    "packaging",
    "sentencepiece>=0.2",
    "safetensors>=0.4",
    "scikit-learn>=1.4",
]
# Hugging Face export and the lm-evaluation-harness model (fairseq_ext/export_hf.py, lm_eval_btm.py).
hf = [
    "transformers>=5.20,<6",
    "tokenizers>=0.22",
    "lm-eval==0.4.13",
]
test = [
    "pytest>=8",
    "pytest-timeout>=2.2",
    "hypothesis>=6.100",
    "tensorboard>=2.16",  # tests/test_train_tensorboard.py reads the trainer's event files back
]

setup(
    name="btm",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["launcher", "launcher.*", "fairseq_ext", "fairseq_ext.*", "analysis", "analysis.*"]),
    package_data={"launcher": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=core,
    extras_require={"fairseq": fairseq, "hf": hf, "test": test},
    entry_points={"console_scripts": ["btm = launcher.cli:main"]},
)
