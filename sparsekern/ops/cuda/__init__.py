"""The CUDA back end: kernels from csrc/, compiled into ``sparsekern._C``."""

from . import element_linear

# op name -> function (the submodules keep their names)
OPS = {"element_linear": element_linear.element_linear}
