"""DEG's parameter gradient by a finite-difference Hessian-vector product, against the exact double
backward (K=3 LeNet-5, B=128): the error of the gradient for each step size in fp32 and fp64, and the
step time of each against a plain step. Why raysweep ships no finite-difference DEG: docs/estimators.md.

The DEG penalty P = sum_{i<j} cos(g_i, g_j) with g_k = d CE_k / d x. Its parameter gradient is
grad_theta (w . g) with w = dP/dg held fixed, i.e. the derivative of grad_theta CE along the input
direction w. The finite difference takes it as (grad_theta CE(x + h w) - grad_theta CE(x)) / h (one-sided:
the gradient at x is the step's own; central adds a pass at x - h w). h is the length of the shift of
member k's whole batch (w normalised per member)."""
import torch
import torch.nn.functional as F
from common import alternating_ms, header

from raysweep.core.models import lenet5
from raysweep.regularisers.deg import deg_penalty

K, B, C = 3, 128, 10
STEPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def setup(dtype):
    torch.manual_seed(0)
    members = [lenet5((1, 28, 28), C, [0.5], [0.5]).to(dtype) for _ in range(K)]
    x = torch.rand(B, 1, 28, 28, dtype=dtype)
    y = torch.randint(0, C, (B,))
    return members, x, y


def member_ce(members, xs, y):
    """[K,B] per-sample CE of member k on its input copy xs[k]."""
    logits = torch.stack([m(xs[k]) for k, m in enumerate(members)])
    return F.cross_entropy(logits.reshape(K * B, C), y.repeat(K), reduction="none").view(K, B)


def exact_loss(members, x, y, with_ce=True):
    """CE + DEG penalty, its parameter gradient by double backward (raysweep's estimator)."""
    xs = x.expand(K, *x.shape).clone().requires_grad_(True)
    ce = member_ce(members, xs, y).sum()
    (g,) = torch.autograd.grad(ce, xs, create_graph=True)
    return ce * with_ce + deg_penalty(g.flatten(2))


def fd_loss(members, x, y, h, central=False, with_ce=True):
    """The same value; its parameter gradient is CE's plus the finite-difference HVP."""
    xs = x.expand(K, *x.shape).clone().requires_grad_(True)
    ce_b = member_ce(members, xs, y)
    (g,) = torch.autograd.grad(ce_b.sum(), xs, retain_graph=True)  # no graph of the backward
    g = g.detach().flatten(2).requires_grad_(True)
    penalty = deg_penalty(g)
    (w,) = torch.autograd.grad(penalty, g)
    step = h / w.norm(dim=(1, 2)).clamp_min(1e-30)  # [K]: member k's batch moves by h along w_k
    shift = (step.view(K, 1, 1) * w).view_as(xs)
    base = x.expand(K, *x.shape)
    if central:
        diff = (member_ce(members, base + shift, y) - member_ce(members, base - shift, y)).sum(1) / (2 * step)
    else:
        diff = (member_ce(members, base + shift, y).sum(1) - ce_b.sum(1)) / step
    # value: CE + penalty; gradient: CE's + d/dtheta (w . g) by the difference quotient
    return ce_b.sum() * with_ce + penalty.detach() + diff.sum() - diff.sum().detach()


def flat_grad(loss, members):
    return torch.cat([p.flatten() for p in torch.autograd.grad(loss, [p for m in members for p in m.parameters()])])


def errors():
    print("relative error |g_fd - g_exact| / |g_exact| of the DEG penalty's parameter gradient (cosine in brackets)")
    print(f"{'h':>8} " + " ".join(f"{name:>22}" for name in ("fp32 one-sided", "fp32 central", "fp64 one-sided",
                                                              "fp64 central")))
    setups = {dtype: setup(dtype) for dtype in (torch.float32, torch.float64)}
    exact = {dtype: flat_grad(exact_loss(*s, with_ce=False), s[0]) for dtype, s in setups.items()}
    for h in STEPS:
        cells = []
        for dtype, s in setups.items():
            for central in (False, True):
                got = flat_grad(fd_loss(*s, h, central, with_ce=False), s[0])
                ref = exact[dtype]
                rel = ((got - ref).norm() / ref.norm()).item()
                cells.append(f"{rel:12.3g} ({F.cosine_similarity(got, ref, dim=0).item():+.2f})")
        print(f"{h:8.0e} " + " ".join(f"{c:>22}" for c in cells))


def timings():
    members, x, y = setup(torch.float32)
    params = [p for m in members for p in m.parameters()]

    def run(loss_fn):
        def step():
            for p in params:
                p.grad = None
            loss_fn().backward()
        return step

    plain = run(lambda: member_ce(members, x.expand(K, *x.shape), y).sum())
    for name, fn in (("double backward (exact)", lambda: exact_loss(members, x, y)),
                     ("finite difference, one-sided", lambda: fd_loss(members, x, y, 1e-4)),
                     ("finite difference, central", lambda: fd_loss(members, x, y, 1e-4, True))):
        t, p = alternating_ms(run(fn), plain)
        print(f"{name:<30} {t:7.1f} ms  plain {p:6.1f} ms  {t / p:5.2f}x plain")


def main():
    header("DEG by a finite-difference HVP vs double backward, K=3 LeNet-5, B=128")
    errors()
    timings()


if __name__ == "__main__":
    main()
