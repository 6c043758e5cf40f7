"""What every layer of fvkernels shares: set masks and the improved normalisation, value checks that also run
under torch.compile, atomic files and digests, and the few torch.distributed collectives. Imports torch only."""
