"""The op layer: each op (linear, element_linear, channelwise_tp, conv,
symmetric_contraction, radial_mlp) is a function of a descriptor (``descriptors``) and
tensors, implemented by peer back ends (one package each: ``torch``, ``triton``, ``cuda``) that
the ``registry`` names, checks and chooses between. Nothing here imports the layers or the
fine-tuning code."""
