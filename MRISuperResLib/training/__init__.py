"""Training: the synthetic brain generator and the resumable training commands (`train ...`)."""
