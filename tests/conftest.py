import os
import sys
import warnings

import torch  # (importing torch does not import triton)

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
if not torch.cuda.is_available():
    # Triton binds its language functions when it is first imported, and e3nn >= 0.5,
    # mace and sevenn import it: choose the interpreter before any of them loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Understood and harmless, from e3nn / MACE / SevenNet compiling and saving TorchScript
# (about 2,000 per run otherwise); our own warnings still show.
_THIRD_PARTY_WARNINGS = (
    (r"`torch\.jit\.(save|load|script)` is deprecated", DeprecationWarning),
    (r"The TorchScript type system doesn't support instance-level annotations", UserWarning),
)
for _message, _category in _THIRD_PARTY_WARNINGS:  # while this file imports them
    warnings.filterwarnings("ignore", _message, _category)

import sparsekern  # noqa: E402,F401  (first: lets e3nn 0.4.4 import under torch >= 2.6)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and the compiled sparsekern._C extension)")
    config.addinivalue_line("markers", "gpu_proxy: CPU proxies of GPU speed (sm_90 compile ahead of time, "
                            "host syncs on meta tensors, launch and op budgets); run in CI")
    for message, category in _THIRD_PARTY_WARNINGS:  # and in each test
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
