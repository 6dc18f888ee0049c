"""SevenNet (sevenn): its layers are plain e3nn ones, so patching needs no rule of its
own; the fine-tuning harness loads its models by name (``7net-0``) or checkpoint."""

from ..base import register_family
from .family import SevenNetFamily

register_family(SevenNetFamily())
