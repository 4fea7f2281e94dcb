"""Experiment 4: the paper's ablations, each against the same base run: LRN off, non-overlapping
pooling, PCA colour noise off (with the paper's pipeline), and ten crops against the centre crop.

    python experiments/ablations.py --size cpu
"""

from __future__ import annotations

from dataclasses import replace

import runner


def main() -> None:
    args = runner.parse(__doc__.splitlines()[0])
    base_model, base_data, cfg = runner.BASE_MODEL, runner.BASE_DATA, runner.BASE_TRAIN
    paper_data = runner.paper_preset(base_data)
    runs = {
        "base (LRN, overlapping pooling)": runner.run("base", args, base_model, base_data, cfg),
        # P 3.3's "without normalization" (K12 run 148): the LRN and the spatial norm both off
        "LRN off": runner.run("no-lrn", args, replace(base_model, lrn=False, spatial_norm=False), base_data, cfg),
        "non-overlapping pooling": runner.run(
            "pool-2x2", args, replace(base_model, pooling="non-overlapping"), base_data, cfg
        ),
        "paper pipeline, PCA noise on": runner.run("pca-on", args, base_model, paper_data, cfg),
        "paper pipeline, PCA noise off": runner.run(
            "pca-off", args, base_model, replace(paper_data, pca_noise=False), cfg
        ),
    }
    crops = runner.ten_crop_error(runs["paper pipeline, PCA noise on"]["dir"], args)
    lines = [
        *runner.TABLE_HEAD,
        *(runner.errors_line(name, r) for name, r in runs.items()),
        "",
        f"- centre crop against ten crops (PCA-on run, {crops['centre']['images']} test images): top-1 error "
        f"{100 * crops['centre']['top1_err']:.1f}% against {100 * crops['ten-crop']['top1_err']:.1f}%",
        "- P's ImageNet figures: LRN 1.4% / 1.2% (top-1 / top-5), overlapping pooling 0.4% / 0.3%, "
        "PCA noise over 1% top-1, ten crops 1.5% top-1 (39.0% to 37.5%, ILSVRC-2010).",
    ]
    runner.record(args, "Experiment 4: ablations", runner.command_line(), lines)


if __name__ == "__main__":
    main()
