"""The application layer: corpora on disk (corpus, video, listfile, datasets), frozen CNN backbones (backbones,
efficientnet), the `fvkernels train` and `extract` jobs (corpus_training, extract) on one process or a torchrun
job (distributed), the demo and the command line (cli, arguments)."""
