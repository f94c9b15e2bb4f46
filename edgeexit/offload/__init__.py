"""Offloading: inputs still undecided after stage K continue on a KServe v2 server (docs/OFFLOAD.md).

``protocol`` (the wire format) and ``client`` (the board's deadline-bound client and policy) need only the
standard library and numpy; ``server`` (the tail as a ``kserve.Model``) is imported only by ``edgeexit serve``.
"""
