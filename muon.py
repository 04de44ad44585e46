"""
Muon with its Newton-Schulz iteration in a chosen dtype. torch.optim.Muon always orthogonalises in bfloat16,
which a CPU without native bf16 matmuls (no AVX512-BF16 or AMX, as on many cloud AMD EPYC machines) runs about
100x slower than float32: there the optimizer step outweighs the model. ns_dtype=bfloat16 is torch's own step,
untouched; any other dtype runs the same update (momentum, Nesterov, decoupled weight decay, the lr adjustment)
with the iteration in that dtype, on a wide matrix in the small side's space (newtonschulz_gram). The state and
its state_dict are torch's, so checkpoints move between the two freely. Where each dtype is chosen:
runtime.resolve_muon_ns_dtype.
"""
import math

import torch


def zeropower_via_newtonschulz(grad, coefficients, steps, eps, dtype, use_addmm=True, gram=None):
    """torch.optim.Muon's quintic Newton-Schulz iteration (an approximate U V^T of grad = U S V^T, its singular
    values spread around 1 rather than equal to it) computed in `dtype`. The op sequence is torch's (addmm, or the
    plain products of the torch versions whose Muon has use_addmm=False), so dtype=bfloat16 gives torch's bits.
    gram=True runs the same iteration in the small side's space (newtonschulz_gram); None = where it saves FLOPs
    (a side 1.5x the other or longer) and the dtype is not bfloat16 (whose bits stay torch's)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    if gram or (gram is None and dtype != torch.bfloat16 and 2 * x.size(1) >= 3 * x.size(0)):
        x = newtonschulz_gram(x, coefficients, steps)
    else:
        for _ in range(steps):
            g = x @ x.T
            if use_addmm:
                x = torch.addmm(x, torch.addmm(g, g, g, beta=b, alpha=c), x, beta=a)
            else:
                x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


def newtonschulz_gram(x, coefficients, steps):
    """The iteration x <- (a I + b G + c G^2) x, G = x x^T, for a wide x (m, n), m < n, carried out on the (m, m)
    matrix Q with x_k = Q_k x_0: Q_k is a polynomial in A = x_0 x_0^T, so it commutes with A and G_k = Q_k A Q_k.
    4 m^2 n + 34 m^3 FLOPs against the direct form's 20 m^2 n + 10 m^3 (0.55x at n = 4m)."""
    a, b, c = coefficients
    A = x @ x.T
    q = None
    for _ in range(steps):
        g = A if q is None else q @ A @ q
        p = torch.addmm(g, g, g, beta=b, alpha=c)
        p.diagonal().add_(a)
        q = p if q is None else p @ q
    return x if q is None else q @ x


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch.optim.Muon's per-matrix lr scale: 'original' (its default) sqrt(max(1, rows/cols)), or Moonshot's
    'match_rms_adamw' 0.2 sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # torch < 2.9: refused by train_config
    """torch.optim.Muon whose Newton-Schulz iteration runs in ns_dtype (an attribute, not a group key, so the
    state_dict stays torch's)."""

    def __init__(self, params, ns_dtype=torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)  # torch's step, bit for bit
        return self.own_step(closure)

    @torch.no_grad()
    def own_step(self, closure=None):
        """torch's update with the iteration in self.ns_dtype (the tests run it in bfloat16 against torch's)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr = float(group["lr"])
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"], self.ns_dtype,
                                                    group.get("use_addmm", True))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
