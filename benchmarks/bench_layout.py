"""executor.channels_last: NHWC vs NCHW looped members, for the three kinds of work a run does: a
training step (CE, weights' gradients), an attack step (the input gradient every attack and UAP
iteration takes, weights frozen) and inference (clean accuracy). NHWC is alternated with NCHW, medians
of three rounds. `auto` turns NHWC on for conv members without BatchNorm on the CPU: this is the
measurement behind that rule."""
import copy

import torch
import torch.nn.functional as F
from common import DEVICE, alternating_ms, header

from raysweep.config import validate_config
from raysweep.core.data import load_dataset
from raysweep.members import make_local_executor
from raysweep.training.trainer import build_members

CASES = (("lenet5", 3, 128), ("small_cnn", 3, 128), ("resnet18", 1, 32))


def layout_work(arch: str, k: int, batch: int, channels_last: bool, device: torch.device = DEVICE) -> dict:
    """{work: a callable doing it once} for K looped members in the given layout (also bench_gpu.py's)."""
    cfg = validate_config({"data": {"dataset": "synthetic", "train_size": batch, "batch_size": batch},
                           "ensemble": {"k": k}, "model": {"arch": arch}})
    data = load_dataset(cfg.data, 0)
    x, y = data.train.batch(torch.arange(batch))
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    ex = make_local_executor(copy.deepcopy(build_members(cfg, data, k)), "loop", device.type, channels_last)

    def train():
        ex.train(True)
        for p in ex.parameters():
            p.grad = None
        F.cross_entropy(ex.stacked_logits(x).flatten(0, 1), y.repeat(k)).backward()

    def attack():
        ex.train(False)
        delta = torch.zeros_like(x, requires_grad=True)
        (g,) = torch.autograd.grad(F.cross_entropy(ex.stacked_logits(x + delta).mean(0), y), delta)
        return g

    def infer():
        ex.train(False)
        with torch.inference_mode():
            return ex.stacked_logits(x)

    return {"train step": train, "attack step": attack, "inference": infer}


def main():
    header("executor.channels_last: NHWC / NCHW looped members")
    print(f"{'members':<22} {'work':<12} {'NCHW ms':>8} {'NHWC ms':>8} {'NHWC/NCHW':>10}")
    for arch, k, batch in CASES:
        nchw, nhwc = layout_work(arch, k, batch, False), layout_work(arch, k, batch, True)
        for work in nchw:
            t_nhwc, t_nchw = alternating_ms(nhwc[work], nchw[work])
            print(f"{f'{arch} K={k} B={batch}':<22} {work:<12} {t_nchw:8.1f} {t_nhwc:8.1f} {t_nhwc / t_nchw:10.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
