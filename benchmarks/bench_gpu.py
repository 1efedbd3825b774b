"""GPU check: raysweep's executors, precision, trial packing, UAP batching, memory, the
gloo staged gather and the members' memory layout, all on one CUDA device. Rerun on any machine
with a CUDA GPU:

    python benchmarks/bench_gpu.py            # CUDA (fails if none is visible)
    python benchmarks/bench_gpu.py --smoke    # tiny sizes on the CPU: catches Python errors only

Prints one markdown table per section and, when $OUT (or --json PATH) is set, writes the same
numbers as JSON to $OUT/bench_gpu.json. Needs torch, torchvision (ResNet-18), numpy, safetensors,
pyyaml, tqdm and pydantic; it imports no Ray, MLflow or Optuna (checked at the end).

Timing protocol: every timed quantity is the median over N timed calls after W warm-up calls,
each call bracketed by torch.cuda.synchronize() and timed with time.perf_counter (so launch
overhead is included, as it is in training). fp32 parameters and inputs; PyTorch's default
precision flags (cuDNN convolutions may use TF32, matmuls do not) unless a row says otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from raysweep.config import validate_config  # noqa: E402
from raysweep.core.data import load_dataset, member_batches  # noqa: E402
from raysweep.core.ensemble import uniform_weights  # noqa: E402
from raysweep.errors import ConfigError  # noqa: E402
from raysweep.members import LoopedMembers, VmappedMembers, make_local_executor  # noqa: E402
from raysweep.core.seeding import generator  # noqa: E402
from raysweep.training.step import TrainStep  # noqa: E402
from raysweep.training.trainer import Trainer, build_members, make_optimizer  # noqa: E402

FORBIDDEN = ("ray", "mlflow", "optuna")

# Sizes: full run (CUDA) and --smoke (CPU, tiny: only catches errors; its numbers mean nothing).
FULL = dict(batch=128, warm=5, timed=50, warm_big=3, timed_big=20, resnet_batch=128, pack_trials=8,
            uap_seeds=50, uap_iters=5, uap_batch=100, uap_reps=5, uap_reps_slow=2, dist_steps=4)
SMOKE = dict(batch=16, warm=1, timed=2, warm_big=1, timed_big=1, resnet_batch=4, pack_trials=3,
             uap_seeds=4, uap_iters=2, uap_batch=20, uap_reps=1, uap_reps_slow=1, dist_steps=2)

S = FULL
DEVICE = torch.device("cuda")
RESULTS: dict = {}


# ----------------------------------------------------------------------------- helpers

def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, warm: int, timed: int) -> float:
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(timed):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def strict_fp32(on: bool):
    """on: no TF32 anywhere (IEEE fp32 convolutions and matmuls); off: PyTorch's defaults as set."""
    if not on or DEVICE.type != "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def tf32_flags() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                f"cudnn.benchmark={torch.backends.cudnn.benchmark}")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e5:
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(section: str, title: str, protocol: str, rows: list[dict], notes: list[str] = ()) -> None:
    """Print a markdown table and keep the same rows for the JSON."""
    RESULTS[section] = {"title": title, "protocol": protocol, "rows": rows, "notes": list(notes)}
    print(f"\n### {title}\n\n{protocol}\n")
    if not rows:
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    for n in notes:
        print(f"\n{n}")
    sys.stdout.flush()


def setup(arch: str, k: int, batch: int, lambda_jr: float = 0.0, shape=(1, 28, 28), seed: int = 0):
    """Config, data, K freshly initialised members (on the CPU) and one per-member batch x [K,B,...], y [K,B]."""
    cfg = validate_config({
        "seed": seed,
        "data": {"dataset": "synthetic", "train_size": batch * 4, "test_size": 100, "batch_size": batch,
                 "synthetic": {"image_shape": list(shape)}},
        "model": {"arch": arch}, "ensemble": {"k": k}, "train": {"jr": {"lambda_jr": lambda_jr}},
        "executor": {"device": "cuda" if DEVICE.type == "cuda" else "cpu"}})
    data = load_dataset(cfg.data, seed)
    x, y = next(member_batches(data.train, k, "independent", batch, 0, seed, DEVICE))
    return cfg, data, build_members(cfg, data, k), x, y


def make_step(cls, cfg, members):
    """An executor of class cls over copies of members, its optimiser, and raysweep's TrainStep
    with its generator on the device (as Trainer builds it)."""
    ex = cls(copy.deepcopy(members), DEVICE)
    opt = make_optimizer(ex.parameters(), cfg)
    step = TrainStep(cfg, ex, uniform_weights(len(members)), generator(cfg.seed, "step", device=DEVICE))
    return ex, opt, step


def member_grads(ex) -> list[dict[str, torch.Tensor]]:
    """Per member {name: grad} after a backward, for looped or vmapped members."""
    if isinstance(ex, VmappedMembers):
        return [{n: p.grad[k] for n, p in ex.params.items() if p.requires_grad} for k in range(ex.k)]
    return [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in ex.members]


def max_diff(a: list[dict], b: list[dict]) -> float:
    return max((x[n].double() - y[n].double()).abs().max().item() for x, y in zip(a, b) for n in x)


def equivalence(cfg, members, x, y, strict: bool) -> tuple[float, float]:
    """One TrainStep from identical members, looped vs vmapped: max |logits diff|, max abs grad diff."""
    with strict_fp32(strict):
        out = {}
        for cls in (LoopedMembers, VmappedMembers):
            ex, opt, step = make_step(cls, cfg, members)
            _, logits = step(opt, x, y)
            out[cls] = (logits, member_grads(ex))
        sync()
    (ll, lg), (vl, vg) = out[LoopedMembers], out[VmappedMembers]
    return (ll.double() - vl.double()).abs().max().item(), max_diff(lg, vg)


def step_ms(cls, cfg, members, x, y, big=False) -> float:
    _, opt, step = make_step(cls, cfg, members)
    warm, timed = (S["warm_big"], S["timed_big"]) if big else (S["warm"], S["timed"])
    return median_ms(lambda: step(opt, x, y), warm, timed)


def auto_executor(members):
    """The executor class `vectorize: auto` picks for these members on DEVICE."""
    return type(make_local_executor(copy.deepcopy(members[:1]), "auto", DEVICE.type))


def vmap_refusal(members) -> str | None:
    try:
        VmappedMembers(copy.deepcopy(members[:1]), torch.device("cpu"))
    except ConfigError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------- sections

def section_executors():
    b = S["batch"]
    rows = []
    cases = [("lenet5", 3, 0.0, (1, 28, 28), b), ("lenet5", 9, 0.0, (1, 28, 28), b),
             ("lenet5", 3, 0.1, (1, 28, 28), b), ("resnet18", 3, 0.0, (3, 32, 32), S["resnet_batch"])]
    notes = []
    for arch, k, ljr, shape, bs in cases:
        cfg, _, members, x, y = setup(arch, k, bs, ljr, shape)
        big = arch == "resnet18"
        row = {"model": arch, "input": "x".join(map(str, shape)), "K": k, "B": bs,
               "step": f"JR (lambda_jr={ljr}, n_proj=1)" if ljr else "CE"}
        refused = vmap_refusal(members)
        if refused:
            row["loop ms"] = step_ms(LoopedMembers, cfg, members, x, y, big)
            row["vmap ms"] = None
            row["vmap/loop"] = None
            row["max abs logit diff (default flags)"] = None
            notes.append(f"{arch}: vmap refused by raysweep (BatchNorm): \"{refused}\"; loop timed only.")
        else:
            row["loop ms"] = step_ms(LoopedMembers, cfg, members, x, y, big)
            row["vmap ms"] = step_ms(VmappedMembers, cfg, members, x, y, big)
            row["vmap/loop"] = row["vmap ms"] / row["loop ms"]
            ld, gd = equivalence(cfg, members, x, y, strict=False)
            ls, gs = equivalence(cfg, members, x, y, strict=True)
            row.update({"max abs logit diff (default flags)": ld, "max abs grad diff (default flags)": gd,
                        "max abs logit diff (strict fp32)": ls, "max abs grad diff (strict fp32)": gs,
                        "strict fp32 <= 1e-4": "yes" if max(ls, gs) <= 1e-4 else "NO"})
        row["auto picks"] = auto_executor(members).__name__
        rows.append(row)
        del members, x, y
    table("executors", "1. Local executor: vmap (VmappedMembers) vs loop (LoopedMembers), one training step",
          f"raysweep TrainStep (SGD lr 0.05 momentum 0.9, member_ce loss, independent batches: x [K,B,...]), "
          f"fp32, the same batch every step; median of {S['timed']} timed steps after {S['warm']} warm-up (ResNet-18: {S['timed_big']} after "
          f"{S['warm_big']}). Equivalence: one step from identical members, max abs difference of the stacked "
          f"logits and of every parameter gradient, under PyTorch's default flags ({tf32_flags()}) and with TF32 "
          f"off (strict fp32).", rows, notes)


def section_bf16():
    rows = []
    for arch, k, shape, bs in (("lenet5", 9, (1, 28, 28), S["batch"]), ("resnet18", 3, (3, 32, 32), S["resnet_batch"])):
        cfg, _, members, x, y = setup(arch, k, bs, 0.0, shape)
        big = arch == "resnet18"
        ex_cls = auto_executor(members)
        fp32 = step_ms(ex_cls, cfg, members, x, y, big)
        bf16_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})})
        bf16 = step_ms(ex_cls, bf16_cfg, members, x, y, big)
        rows.append({"model": arch, "K": k, "B": bs, "executor (auto)": ex_cls.__name__, "fp32 ms": fp32,
                     "bf16 autocast ms": bf16, "bf16/fp32": bf16 / fp32})
    table("bf16", "2. train.precision bf16 vs fp32, one training step",
          "The step's passes and backward under torch.autocast(bfloat16), logits cast to fp32 as they leave the "
          "members, parameters and optimiser fp32 (docs/performance.md). Same "
          f"TrainStep as section 1, median of {S['timed']} ({S['timed_big']} for ResNet-18) timed steps after "
          f"warm-up.", rows)


def section_jr():
    rows = []
    for arch, k, shape, bs in (("lenet5", 3, (1, 28, 28), S["batch"]), ("resnet18", 3, (3, 32, 32), S["resnet_batch"])):
        cfg, _, members, x, y = setup(arch, k, bs, 0.0, shape)
        big = arch == "resnet18"
        ex_cls = auto_executor(members)
        row = {"model": arch, "K": k, "B": bs, "executor (auto)": ex_cls.__name__,
               "plain ms": step_ms(ex_cls, cfg, members, x, y, big)}
        for estimator in ("double_backward", "forward_mode"):
            raw = cfg.model_dump(mode="json")
            raw["train"]["jr"] = {"lambda_jr": 0.05, "estimator": estimator}
            cfg_jr = validate_config(raw)
            row[f"{estimator} ms"] = step_ms(ex_cls, cfg_jr, members, x, y, big)
            row[f"{estimator}/plain"] = row[f"{estimator} ms"] / row["plain ms"]
            if vmap_refusal(members) is None and estimator == "forward_mode":
                row["forward_mode loop vs vmap max abs grad diff"] = equivalence(cfg_jr, members, x, y, strict=True)[1]
        rows.append(row)
        del members, x, y
    table("jr", "7. JR estimators (train.jr.estimator): step time against a plain step",
          f"raysweep TrainStep with lambda_jr 0.05, n_proj 1, fp32 (TF32 off), the executor `auto` picks; median "
          f"of {S['timed']} ({S['timed_big']} for ResNet-18) timed steps after warm-up. Equivalence: one "
          f"forward_mode step from identical members, looped vs vmapped.", rows)


def section_packing():
    """N Jacobian Ensembles trials (own lr and lambda_JR) one training step each: packed (training.pack,
    one step over N*K vmapped members) vs N lone Trainers stepped in turn."""
    from raysweep.members.pack import PackedMembers
    from raysweep.training.pack import PackStep

    n, k, b = S["pack_trials"], 3, S["batch"]
    lrs = [1e-3 * (1 + i / 4) for i in range(n)]
    lams = [0.05 * (1 + i) for i in range(n)]

    def trainers():
        cfgs = [validate_config({"data": {"dataset": "synthetic", "train_size": b * 4, "batch_size": b},
                                 "ensemble": {"k": k, "method": "bagging"},
                                 "executor": {"vectorize": "vmap", "device": DEVICE.type},
                                 "train": {"lr": lr, "jr": {"lambda_jr": lam}}}) for lr, lam in zip(lrs, lams)]
        data = load_dataset(cfgs[0].data, 0)
        return [Trainer(c, data, progress=False) for c in cfgs], data

    def params(ts):
        return [p.detach().clone() for t in ts for p in t.ex.parameters()]

    with strict_fp32(True):
        alone, data = trainers()
        x, y = next(alone[0].batches())
        for t in alone:
            t.step(t.opt, x, y)
        packed, _ = trainers()
        PackStep(packed, PackedMembers([t.ex for t in packed]))(x, y)
        diff = max((p - q).abs().max().item() for p, q in zip(params(packed), params(alone)))
    step = PackStep(packed, PackedMembers([t.ex for t in packed]))
    packed_ms = median_ms(lambda: step(x, y), S["warm"], S["timed"])
    sep_ms = median_ms(lambda: [t.step(t.opt, x, y) for t in alone], S["warm"], S["timed"])
    rows = [{"trials N": n, "K per trial": k, "B": b, "packed (PackStep, N*K vmapped members), ms": packed_ms,
             "in turn (N Trainers' steps), ms": sep_ms, "in turn/packed": sep_ms / packed_ms,
             "max abs param diff after one step, packed vs alone (strict fp32)": diff}]
    table("packing", "3. Trial packing: N trials in one step (training/pack.py) vs N steps in turn",
          f"LeNet-5, K={k} bagging, JR double backward with each trial's own lambda_JR and learning rate (Adam), "
          f"vmapped members. Time for all N trials to take one training step; median of {S['timed']} after "
          f"{S['warm']} warm-up.", rows)


def section_uap():
    from raysweep.attacks.uap import seeds_per_forward, sgd_uap, uap_init

    _, data, members, _, _ = setup("lenet5", 3, S["batch"])
    ex = make_local_executor(members, "auto", DEVICE.type)
    ex.train(False)
    weights = uniform_weights(3).to(DEVICE)
    seeds = S["uap_seeds"]
    init = uap_init(seeds, data.train.x.shape[1:], 0.1, generator(0, "init"))
    kw = dict(eps=0.1, iterations=S["uap_iters"], batch_size=S["uap_batch"], step_size=0.005, objective="ce_prob",
              weights=weights, how="probability", device=DEVICE)

    def batched():
        return sgd_uap(ex.stacked_logits, data.train, init, generator=generator(0, "o"), chunk=seeds, **kw)

    def one_at_a_time():
        return torch.cat([sgd_uap(ex.stacked_logits, data.train, init[s:s + 1], generator=generator(0, "o"), **kw)
                          for s in range(seeds)])

    with strict_fp32(True):
        diff = (batched() - one_at_a_time()).abs().max().item()
    b = median_ms(batched, 1, S["uap_reps"])
    o = median_ms(one_at_a_time, 1, S["uap_reps_slow"])
    rows = [{"seeds": seeds, "iterations": S["uap_iters"], "crafting batch": S["uap_batch"],
             "executor": type(ex).__name__, "all seeds in one forward ms": b, "seed by seed ms": o,
             "seed by seed / batched": o / b, "default seeds_per_forward": seeds_per_forward(seeds, S["uap_batch"], DEVICE),
             "max abs delta diff batched vs seed by seed (strict fp32)": diff}]
    table("uap", "4. SGD-UAP: all seeds in one forward vs seed by seed",
          f"K=3 LeNet-5 (eval mode, the evaluation executor make_local_executor(auto)), sgd_uap eps 0.1, sign "
          f"steps of 0.005, ce_prob objective, synthetic 1x28x28 crafting split; time of the whole sgd_uap call(s) "
          f"for all seeds, median of {S['uap_reps']} (batched) / {S['uap_reps_slow']} (seed by seed) after 1 "
          f"warm-up.", rows)


def section_memory():
    if DEVICE.type != "cuda":
        table("memory", "5. Peak GPU memory per member", "not measured: no CUDA device (smoke run)", [])
        return
    rows = []
    b = S["batch"]
    cases = [("lenet5", 3, (1, 28, 28), b, VmappedMembers), ("lenet5", 3, (1, 28, 28), b, LoopedMembers),
             ("lenet5", 9, (1, 28, 28), b, VmappedMembers), ("lenet5", 9, (1, 28, 28), b, LoopedMembers),
             ("resnet18", 3, (3, 32, 32), S["resnet_batch"], LoopedMembers)]
    for arch, k, shape, bs, cls in cases:
        cfg, _, members, _, _ = setup(arch, k, bs, 0.0, shape)
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        _, data, _, x, y = setup(arch, k, bs, 0.0, shape)
        ex, opt, step = make_step(cls, cfg, members)
        for _ in range(2):  # optimiser state exists from the first step on
            step(opt, x, y)
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(opt, x, y)
        sync()
        peak = torch.cuda.max_memory_allocated()
        mib = 2 ** 20
        rows.append({"model": arch, "K": k, "B": bs, "executor": cls.__name__,
                     "peak in step / K, MiB": (peak - base) / k / mib,
                     "of which step transients / K, MiB": (peak - before) / k / mib,
                     "resident (params, grads, momentum, batch) / K, MiB": (before - base) / k / mib})
        del ex, opt, step, x, y, members
    table("memory", "5. Peak GPU memory per member, one training step",
          "torch.cuda.max_memory_allocated during the third step (after two, so SGD momentum exists), minus what "
          "was allocated before the executor and batch were created, divided by K; 'step transients' is the peak "
          "minus what was allocated just before that step (activations, autograd buffers). fp32, default flags.",
          rows)


# --- 6: gloo staged gather

DIST_CASES = [("CE", 0.0, True), ("JR lambda_jr=0.1", 0.1, True), ("CE", 0.0, False)]


def dist_cfg(lambda_jr: float, k: int, device: str, vectorize: str = "auto"):
    b = S["batch"]
    return validate_config({
        "data": {"dataset": "synthetic", "train_size": b * S["dist_steps"], "test_size": 100, "batch_size": b},
        "ensemble": {"k": k}, "train": {"epochs": 1, "jr": {"lambda_jr": lambda_jr}},
        "executor": {"device": device, "vectorize": vectorize}})


def _dist_worker(rank: int, world: int, k: int, tmp: str, device: str, sizes: dict, vectorize: str):
    import torch.distributed as dist

    from raysweep.members.distributed import DistributedMembers

    global S, DEVICE
    S, DEVICE = sizes, torch.device(device)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        n = k // world
        first = rank * n
        for i, (_, ljr, strict) in enumerate(DIST_CASES):
            with strict_fp32(strict):
                cfg = dist_cfg(ljr, k, device, vectorize)
                data = load_dataset(cfg.data, cfg.seed)
                mine = build_members(cfg, data, k)[first:first + n]  # as ray_train._worker_loop does
                local = make_local_executor(mine, cfg.executor.vectorize, device)
                ex = DistributedMembers(local, k)
                trainer = Trainer(cfg, data, ex, progress=False)
                row = trainer.run_epoch()
                sync()
                state = {f"{first + j}.{name}": t.detach().cpu() for j, m in enumerate(ex.export_members())
                         for name, t in m.state_dict().items()}
                torch.save({"params": state, "steps": trainer.state.step, "loss": row["loss"],
                            "bytes": ex.bytes_received, "via_cpu": ex._via_cpu, "local": type(local).__name__,
                            "device": str(local.device)}, f"{tmp}/rank{rank}_case{i}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def section_gloo(vectorize: str = "auto"):
    import torch.multiprocessing as mp

    k, world = 4, 2
    device = DEVICE.type
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.spawn(_dist_worker, args=(world, k, tmp, device, S, vectorize), nprocs=world, join=True)
        spawn_s = time.perf_counter() - t0
        for i, (name, ljr, strict) in enumerate(DIST_CASES):
            with strict_fp32(strict):
                cfg = dist_cfg(ljr, k, device, vectorize)
                data = load_dataset(cfg.data, cfg.seed)
                ex = make_local_executor(build_members(cfg, data, k), cfg.executor.vectorize, device)
                trainer = Trainer(cfg, data, ex, progress=False)
                row = trainer.run_epoch()
                ref = {f"{j}.{n}": t.detach().cpu() for j, m in enumerate(ex.export_members())
                       for n, t in m.state_dict().items()}
            parts = [torch.load(f"{tmp}/rank{r}_case{i}.pt", weights_only=True) for r in range(world)]
            got = {n: t for p in parts for n, t in p["params"].items()}
            assert set(got) == set(ref), (sorted(got)[:4], sorted(ref)[:4])
            diff = max((got[n].double() - ref[n].double()).abs().max().item() for n in ref)
            moved = max((ref[n].double() - init_ref(cfg, data, k)[n].double()).abs().max().item() for n in ref)
            rows.append({"step": name, "flags": "strict fp32" if strict else "default (TF32 convs allowed)",
                         "K": k, "ranks": world, "members/rank": k // world,
                         "rank executor": f"{parts[0]['local']} on {parts[0]['device']}",
                         "staged via CPU": parts[0]["via_cpu"], "steps": parts[0]["steps"],
                         "max abs param diff distributed vs local": diff,
                         "max abs param change over the steps (scale)": moved,
                         "loss rank0 / local": f"{parts[0]['loss']:.5f} / {row['loss']:.5f}",
                         "bytes received by rank 0": parts[0]["bytes"]})
    table("gloo", "6. DistributedMembers over gloo (2 processes, both on one device) vs the local executor",
          f"torch.multiprocessing.spawn of 2 ranks, torch.distributed gloo, init_method file:// in a temp dir; each "
          f"rank builds all K members from the seeded stream and keeps its slice, wraps make_local_executor(vectorize="
          f"{vectorize}) in raysweep.members.distributed.DistributedMembers and runs raysweep's Trainer for one epoch of "
          f"{S['dist_steps']} steps (B={S['batch']}, independent batches), as ray_train._worker_loop does without "
          f"Ray. Reference: the local executor with all K members in this process, same steps. Spawn + all runs: "
          f"{spawn_s:.1f} s.", rows)


def section_layout():
    """NHWC vs NCHW looped members on the device: executor.channels_last `auto` keeps NCHW on CUDA because
    nothing had measured it there; this is that measurement."""
    from bench_layout import layout_work  # benchmarks/: the CPU benchmark's workloads, run here on DEVICE

    rows = []
    cases = (("lenet5", 3, S["batch"]), ("lenet5", 9, S["batch"]), ("small_cnn", 3, S["batch"]),
             ("resnet18", 3, S["resnet_batch"]))
    for arch, k, bs in cases:
        big = arch == "resnet18"
        warm, timed = (S["warm_big"], S["timed_big"]) if big else (S["warm"], S["timed"])
        nchw, nhwc = layout_work(arch, k, bs, False, DEVICE), layout_work(arch, k, bs, True, DEVICE)
        for work in nchw:
            t_nchw, t_nhwc = median_ms(nchw[work], warm, timed), median_ms(nhwc[work], warm, timed)
            rows.append({"model": arch, "K": k, "B": bs, "work": work, "NCHW ms": t_nchw, "NHWC ms": t_nhwc,
                         "NHWC/NCHW": t_nhwc / t_nchw})
        del nchw, nhwc
    table("layout", "8. executor.channels_last: NHWC vs NCHW, looped members",
          "benchmarks/bench_layout.py's three workloads (training step: CE backward to the weights; attack step: the "
          "input gradient with frozen weights, as every PGD and UAP iteration takes; inference) on looped members "
          f"(vectorize: loop), fp32, default flags ({tf32_flags()}); median of {S['timed']} timed calls after "
          f"{S['warm']} warm-up ({S['timed_big']} after {S['warm_big']} for ResNet-18). `auto` picks NCHW on CUDA.",
          rows)


_INIT_CACHE: dict = {}


def init_ref(cfg, data, k):
    key = (cfg.seed, k, cfg.model.arch)
    if key not in _INIT_CACHE:
        _INIT_CACHE[key] = {f"{j}.{n}": t.detach().cpu() for j, m in enumerate(build_members(cfg, data, k))
                            for n, t in m.state_dict().items()}
    return _INIT_CACHE[key]


# ----------------------------------------------------------------------------- main

SECTIONS = {"executors": section_executors, "bf16": section_bf16, "packing": section_packing, "uap": section_uap,
            "memory": section_memory, "gloo": section_gloo, "jr": section_jr, "layout": section_layout}


def main():
    global S, DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script, not the GPU)")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections only")
    ap.add_argument("--dist-vectorize", default="auto", choices=["auto", "loop", "vmap"],
                    help="executor.vectorize of the ranks and the reference in section 6")
    ap.add_argument("--json", help="where to write the JSON (default $OUT/bench_gpu.json when OUT is set)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.smoke:
        S, DEVICE = SMOKE, torch.device("cpu")
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (use --smoke to check the script on the CPU)")
    else:
        S, DEVICE = FULL, torch.device("cuda")
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if DEVICE.type == "cuda" else None,
           "python": sys.version.split()[0], "flags": tf32_flags(), "smoke": args.smoke, "sizes": S}
    print(f"# raysweep GPU check{' (SMOKE: tiny sizes on the CPU, numbers meaningless)' if args.smoke else ''}\n")
    print(f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), python {env['python']}, "
          f"device: {env['device']}; {env['flags']}")
    failed = {}
    for name, fn in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            fn(args.dist_vectorize) if name == "gloo" else fn()
        except Exception as err:  # keep going: one broken section must not cost the others' device time
            import traceback

            traceback.print_exc()
            failed[name] = f"{type(err).__name__}: {err}"
            print(f"\n### section {name} FAILED: {failed[name]}")
        print(f"\n(section {name}: {time.perf_counter() - t0:.1f} s)")
        sys.stdout.flush()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    env.update({"wall_s": time.perf_counter() - t_start, "failed": failed, "forbidden_modules_imported": leaked})
    print(f"\ntotal wall time {env['wall_s']:.1f} s; failed sections: {failed or 'none'}; "
          f"ray/mlflow/optuna imported: {leaked or 'none'}")
    out = args.json or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({"env": env, "sections": RESULTS}, indent=1, default=str))
        print(f"wrote {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
