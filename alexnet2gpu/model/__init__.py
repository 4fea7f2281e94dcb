"""The network in its three forms: two towers in one process (`AlexNet2GPU`), one grouped net
(`AlexNetFused`), one tower per process (`TowerProcess`). Imports `config` only."""
