"""The Triton back end (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Every op is a multilinear form given by a sparse coefficient table; its derivative with
respect to one operand is a form of the same family with the operands permuted, so each
autograd Function's backward calls other autograd Functions of this package and
derivatives of any order are available (force training needs the second).
"""

from . import conv, element_linear, symmetric_contraction

# op name -> function (the submodules keep their names: ``ops.triton.conv`` is the module)
OPS = {"linear": element_linear.linear, "element_linear": element_linear.element_linear,
       "channelwise_tp": conv.channelwise_tp, "conv": conv.conv,
       "symmetric_contraction": symmetric_contraction.symmetric_contraction}
