"""The CLI tests' shared case (a module may define its own ``files``)."""

import pytest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny MACE model (Al, Cu) saved as a .model file, and EMT-labelled Cu2Al2 cells,
    one folder per test module."""
    pytest.importorskip("mace")
    from helpers import write_tiny_mace_case

    root = tmp_path_factory.mktemp("finetune")
    write_tiny_mace_case(root, n_train=3)
    return root
