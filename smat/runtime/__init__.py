"""What every layer above needs from the machine: atomic files, checkpoints, the run log, processes and
devices. Nothing here knows about SMAT."""
