"""A trained run, looked at: reloading it, predict, Figure 4, curves and kernels."""
