import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

import sparsekern  # noqa: E402,F401  (first: lets e3nn 0.4.4 import under torch >= 2.6)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and the compiled sparsekern._C extension)")
