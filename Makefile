# Three environments: mace-torch pins e3nn 0.4.4 and sevenn needs e3nn >= 0.5; MACE
# changes its models when cuequivariance imports, so it is tested with and without.
# Each is a venv inside the repo (ignored by git), made on first use.
PY ?= python3
TORCH := torch==2.13.0
SRC := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)

.PHONY: demo test test-mace test-sevenn test-cueq clean

demo: .venv-sevenn/.installed
	.venv-sevenn/bin/python -m sparsekern.demo

test: test-mace test-sevenn test-cueq

test-mace: .venv-mace/.installed
	.venv-mace/bin/python -m pytest tests -q -p no:cacheprovider

# tests/ops checks each back end's kernels against the torch reference, whatever the
# family: once, in the MACE environment (they are a third of the suite's time); only the
# sm_90 compile of SevenNet-0's own kernels and its whole-model host path run here
test-sevenn: .venv-sevenn/.installed
	.venv-sevenn/bin/python -m pytest tests -q -p no:cacheprovider --ignore=tests/ops
	.venv-sevenn/bin/python -m pytest tests/ops/test_gpu_proxy_aot.py tests/ops/test_gpu_proxy_sync.py -q -p no:cacheprovider

test-cueq: .venv-cueq/.installed
	.venv-cueq/bin/python -m pytest tests/integrations/test_cueq.py tests/integrations/test_mace.py tests/ops/test_cueq_conv.py -q -p no:cacheprovider

# torch first and pinned (an unpinned torch pulls several GB of CUDA wheels); then the
# package, which builds its CUDA extension when nvcc is present (a compile error fails).
.venv-%/.installed: $(SRC)
	test -x .venv-$*/bin/python || $(PY) -m venv .venv-$*
	.venv-$*/bin/pip install -q --upgrade pip
	.venv-$*/bin/pip install -q $(TORCH)
	.venv-$*/bin/pip install -q -e ".[$*,test]"
	touch $@

clean:
	rm -rf .venv-mace .venv-sevenn .venv-cueq build sparsekern/_C*.so
