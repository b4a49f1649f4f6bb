"""``bdrun gallery``: each attack's trigger on one test image (the survey's Fig. 2).

For each attack: the clean image, its backdoored version and their difference, amplified to
the full grey range so that invisible triggers show.
"""
from __future__ import annotations

from pathlib import Path

import click

from bdbench.errors import BdbenchError


def render(plugins, attacks: list[str], dataset: str, out: Path, *, index: int = 0, target: int = 0,
           data_dir: Path | None = None, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Write the gallery figure for ``attacks`` on ``dataset`` to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from bdbench.cache import default_cache_dir
    from bdbench.components import Attack, to_float
    from bdbench.context import RunContext

    builder = plugins.create("dataset", dataset)
    info = builder.info()
    test = builder.load("test", data_dir)
    candidates = (test.labels != target).nonzero().flatten()
    if not len(candidates):
        raise BdbenchError(f"{dataset}: no test image outside the target class {target}")
    i = int(candidates[index % len(candidates)])
    x = to_float(test.images[i:i + 1])
    ctx = RunContext(dataset=info, seed=seed, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir())
    components = [plugins.create("attack", name) for name in attacks]  # unknown names fail before any work
    rows = []
    train = None
    for name, attack in zip(attacks, components):
        if type(attack).prepare is not Attack.prepare:  # the attack builds resources first
            train = train if train is not None else builder.load("train", data_dir)
            attack.prepare(info, train, ctx)
        with torch.no_grad():
            bd = attack.apply(x.clone(), test.labels[i:i + 1]).clamp(0, 1)
        diff = (bd - x).abs()
        rows.append((name, x[0], bd[0], diff[0] / diff.max().clamp_min(1e-8)))
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, (name, clean, backdoored, amplified) in enumerate(rows):
        for c, (img, title) in enumerate(((clean, "clean"), (backdoored, name), (amplified, "difference (amplified)"))):
            ax = axes[r][c]
            arr = img.permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{dataset}, test image {i} (label {int(test.labels[i])})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def add_to(cli: click.Group) -> None:
    @cli.command("gallery")
    @click.option("--attacks", default=None, help="Comma-separated attacks [default: every installed attack].")
    @click.option("--dataset", default="fashion-mnist", show_default=True)
    @click.option("--out", type=click.Path(path_type=Path), default=Path("gallery.png"), show_default=True)
    @click.option("--index", type=int, default=0, show_default=True, help="Which non-target test image.")
    @click.option("--data-dir", type=click.Path(path_type=Path), default=None)
    @click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
    @click.pass_context
    def gallery(ctx: click.Context, attacks: str | None, dataset: str, out: Path, index: int,
                data_dir: Path | None, cache_dir: Path | None) -> None:
        """One figure: for each attack, a clean test image, its backdoored version and the
        amplified difference."""
        from bdbench_cli.main import State

        plugins = ctx.find_object(State).plugins
        names = ([a.strip() for a in attacks.split(",") if a.strip()] if attacks
                 else [c.name for c in plugins.list("attack") if c.name != "none"])
        if not names:
            raise BdbenchError("no attack to show")
        click.echo(str(render(plugins, names, dataset, out, index=index, data_dir=data_dir, cache_dir=cache_dir)))
