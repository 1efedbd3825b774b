"""Vectorised (torch.func vmap) vs looped members: one LeNet-5 training step, B=128 per member."""
from common import DEVICE, header, lenet_setup, median_ms, step_fn

from raysweep.members import LoopedMembers, VmappedMembers, make_local_executor


def main():
    header("members: vmap vs loop, LeNet-5 train step")
    for k in (3, 9):
        cfg, _, members, x, y = lenet_setup(k)
        loop = median_ms(step_fn(LoopedMembers, cfg, members, x, y))
        vmap = median_ms(step_fn(VmappedMembers, cfg, members, x, y))
        default = type(make_local_executor(members[:1], "auto", DEVICE.type)).__name__
        print(f"K={k}: loop {loop:6.1f} ms  vmap {vmap:6.1f} ms  vmap/loop {vmap / loop:4.2f}x  "
              f"(auto picks {default} on {DEVICE.type}; fastest: {'vmap' if vmap < loop else 'loop'})")


if __name__ == "__main__":
    main()
