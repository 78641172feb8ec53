"""Demo part: the torch MoE layer training on CPU with each balancer switched on in turn."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["run"]


def run(quick: bool, section: Callable[[str], None]) -> None:
    import torch

    E, k, hidden, ffn, T = 16, 2, 64, 128, 512
    steps = 15 if quick else 40
    section(
        f"MoE layer (torch path on {'GPU' if torch.cuda.is_available() else 'CPU'}): "
        f"E={E}, top-{k}, hidden={hidden}, {steps} training steps on a skewed router"
    )
    print(f"{'balancer':10s} MaxVio step 1   step {steps}   final loss")
    # one thread: at these sizes it is as fast as several, and it does not slow down on a busy machine (several
    # threads then wait on each other at every small matrix product)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(steps, E, k, hidden, ffn, T)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, E: int, k: int, hidden: int, ffn: int, T: int) -> None:
    import torch

    from moebalance.integrations.torch import MoEConfig, MoELayer

    for balancer in ("none", "aux_loss", "loss_free", "bip"):
        torch.manual_seed(0)
        cfg = MoEConfig(
            hidden=hidden,
            ffn=ffn,
            num_experts=E,
            top_k=k,
            balancer=balancer,
            bias_update_rate=2e-2,
            aux_loss_coeff=1e-1,
            backend="torch",
        )
        layer = MoELayer(cfg)
        with torch.no_grad():  # a router that prefers the first experts, as real routers drift to do
            layer.router.weight[:4] += 0.4 * torch.randn(hidden)
        target = MoELayer(MoEConfig(hidden=hidden, ffn=ffn, num_experts=E, top_k=k, backend="torch"))
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        vios = []
        for _ in range(steps):
            x = torch.randn(T, hidden, generator=gen) + 0.5
            with torch.no_grad():
                y_true = target(x)
            loss = (layer(x) - y_true).square().mean() + layer.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss = loss.detach()
            assert layer.last_stats is not None  # set by every forward
            vios.append(float(layer.last_stats.max_vio))
        print(f"{balancer:10s} {vios[0]:8.3f}       {vios[-1]:8.3f}    {loss.item():.4f}")
