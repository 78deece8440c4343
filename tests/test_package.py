"""The package's import surface: the torch-only core stays torch-only."""

import subprocess
import sys


def test_core_import_loads_torch_only():
    code = ("import sys; from esam_hf import ESAM; "
            "print(sorted(m for m in ('transformers', 'timm', 'datasets', 'evaluate', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hf_layers_load_on_first_use():
    code = ("import esam_hf, timm; assert 'cifar_resnet18' not in timm.list_models('cifar*'); "
            "from esam_hf import ESAMTrainer, ESAMTrainingArguments; import esam_hf.models; "
            "assert 'cifar_resnet18' in timm.list_models('cifar*'); print(ESAMTrainer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ESAMTrainer"
