"""The paper's Figure 2 drawn from the model: the two towers, layer by layer, and where they exchange.
With the defaults, K12's network (layers-145.cfg): LRN1 before the ReLU, the spatial norm after LRN2,
one fc8 on tower A.

Layer widths and map sizes come from AlexNetConfig, the exchange points and their sizes from
alexnet2gpu.accounting.exchanges, so the picture is the network the code builds (P 3.5, Figure 2).

    python experiments/figure2.py docs/figure2-towers.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from alexnet2gpu.config import AlexNetConfig  # noqa: E402
from alexnet2gpu.model.exchanges import exchanges  # noqa: E402

TOWER_Y = {"A": 2.6, "B": 0.6}  # tower A (device 0) above, tower B (device 1) below
COLOURS = {"conv": "#cfe2f3", "fc": "#d9ead3", "input": "#eeeeee"}


def layers(c: AlexNetConfig) -> list[tuple[str, str, str]]:
    """(name, what one tower holds, kind) in order, from the config: per tower half of every layer."""
    conv1, pool1, pool2, pool5 = c.map_sizes  # 55, 27, 13, 6 in P's network
    half = [ch // c.towers for ch in c.conv_channels]
    sizes = [conv1, pool1, pool2, pool2, pool2]  # the size each conv layer computes at
    if not c.lrn:
        lrn1, lrn2 = f"pool {pool1}", f"pool {pool2}"
    elif c.lrn1_input == "linear":  # K12's order: LRN1 on conv1's output, the ReLU after pool1
        lrn1 = f"LRN, pool {pool1},\nthen ReLU"
    else:
        lrn1 = f"LRN, pool {pool1}"
    if c.lrn:
        lrn2 = f"LRN, spatial\nnorm, pool {pool2}" if c.spatial_norm else f"LRN, pool {pool2}"
    pools = {0: lrn1, 1: lrn2, 4: f"pool {pool5}"}
    rows = [("input", f"{c.in_channels}x{c.input_size}x{c.input_size}\n(both towers)", "input")]
    for i, (k, s) in enumerate(zip(half, sizes, strict=True)):
        rows.append((f"conv{i + 1}", f"{k} @ {s}x{s}\n{pools.get(i, '')}".rstrip(), "conv"))
    fc6, fc7 = (f // c.towers for f in c.fc_features)
    rows += [("fc6", f"{fc6}\ndropout", "fc"), ("fc7", f"{fc7}\ndropout", "fc"), ("fc8", f"{c.fc8_out[0]}", "fc")]
    return rows


def draw(path: str, config: AlexNetConfig | None = None) -> None:
    c = config or AlexNetConfig()
    rows = layers(c)
    crossing = {e.point.split()[0]: e for e in exchanges(c)}  # "conv3", "fc6", "fc7", "fc8", "logits"
    fig, ax = plt.subplots(figsize=(12, 3.8), dpi=110)
    ax.set_xlim(-1.3, (len(rows) - 1) * 1.5 + 0.6)
    ax.set_ylim(-0.4, 4.0)
    ax.axis("off")
    w, h = 1.0, 0.95
    x = {name: i * 1.5 for i, (name, _, _) in enumerate(rows)}
    for tower, y in TOWER_Y.items():
        ax.text(-0.5, y, f"tower {tower}\n(device {0 if tower == 'A' else 1})", ha="right", va="center", fontsize=9)
        for i, (name, text, kind) in enumerate(rows):
            if (name == "input" or (name == "fc8" and not c.fc8_out[-1])) and tower == "B":
                continue  # one input box; tower B has no fc8 where fc8 is tower A's alone (K12)
            yy = (TOWER_Y["A"] + TOWER_Y["B"]) / 2 if name == "input" else y
            box = FancyBboxPatch((x[name] - w / 2, yy - h / 2), w, h, boxstyle="round,pad=0.02", fc=COLOURS[kind])
            ax.add_patch(box)
            ax.text(x[name], yy + 0.2, name, ha="center", va="center", fontsize=9, weight="bold")
            ax.text(x[name], yy - 0.12, text, ha="center", va="center", fontsize=7)
            if i == 0:
                continue
            prev = rows[i - 1][0]
            start = (x[prev] + w / 2, (TOWER_Y["A"] + TOWER_Y["B"]) / 2 if prev == "input" else y)
            ax.add_patch(FancyArrowPatch(start, (x[name] - w / 2, y), arrowstyle="->", mutation_scale=10, lw=1))
            if name in crossing:  # the other tower's previous layer feeds this one too (P 3.2)
                other = TOWER_Y["B" if tower == "A" else "A"]
                ax.add_patch(
                    FancyArrowPatch(
                        (x[prev] + w / 2, other), (x[name] - w / 2, y), arrowstyle="->", mutation_scale=10,
                        lw=1.6, color="#cc0000",
                    )
                )  # fmt: skip
    for name, e in crossing.items():
        if name in x:
            label = f"{e.features:,}" + (" each way" if e.directions == 2 else " one way")
            ax.text(x[name] - 0.75, 1.6, label, ha="center", va="center", fontsize=7, color="#cc0000",
                    bbox=dict(fc="white", ec="none", pad=0.5))  # fmt: skip
    logits = crossing.get("logits")
    note = f"; tower B's {logits.features} logits gathered on device 0" if logits else ""
    ax.text(
        x["input"] - 0.5,
        3.6,
        f"{c.num_classes}-way AlexNet in two towers (P Figure 2, as K12 layers-145 builds it). Red: the exchanges, "
        "into conv3, fc6, fc7 and fc8; "
        f"numbers are floats per image{note}.",
        fontsize=8.5,
        ha="left",
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/figure2-towers.png", help="the PNG to write")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
