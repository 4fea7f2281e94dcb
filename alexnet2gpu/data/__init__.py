"""Files -> batches -> network inputs: the datasets, staging, statistics and the 2012 transforms.
Imports `config` and `files` only; knows nothing of the model or of a run."""
