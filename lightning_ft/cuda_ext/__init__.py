"""Custom kernels for the hot paths of the methods, each with a pure-PyTorch reference and one dispatch point.

=================  ==================================================  ================================================
dispatch           kernel (``csrc/``)                                  reference (:mod:`~lightning_ft.cuda_ext.reference`)
=================  ==================================================  ================================================
``sparse_adamw_``  ``sparse_adamw.cu``: gather, compact AdamW, write    ``reference.sparse_adamw_``
``copilot_error``  ``copilot_error.cu``: onehot - softmax, fp32 -> bf16  ``reference.copilot_error``
``pack_bits``      ``bits.cu``: ComPEFT's bit packing                   ``reference.pack_bits``
``unpack_bits``    ``bits.cu``: ComPEFT's bit unpacking                 ``reference.unpack_bits``
=================  ==================================================  ================================================

Kernels are plain CUDA C built just in time with nvcc on first use on a CUDA machine (see ``_build``); on CPU,
when the build fails, or with ``LIGHTNING_FT_FORCE_REFERENCE=1``, the reference runs (announced once). The methods
(:mod:`lightning_ft.sparse.compact`, :mod:`lightning_ft.merging.compeft`, the copilot) call these dispatch
functions; the package imports nothing from lightning_ft outside itself.
"""

from lightning_ft.cuda_ext.dispatch import (
    FORCE_REFERENCE_ENV,
    backend,
    copilot_error,
    pack_bits,
    sparse_adamw_,
    unpack_bits,
)

__all__ = ["FORCE_REFERENCE_ENV", "backend", "copilot_error", "pack_bits", "sparse_adamw_", "unpack_bits"]
