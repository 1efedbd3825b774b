"""Where the members live. An executor turns inputs into stacked logits [K,B,C] and owns the
members' parameters; ensemble objectives never see which executor ran them."""
from raysweep.members.local import (
    LoopedMembers,
    VmappedMembers,
    make_local_executor,
    resolve_device,
)

__all__ = ["LoopedMembers", "VmappedMembers", "make_local_executor", "resolve_device"]
