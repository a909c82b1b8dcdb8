"""What the two InverseSR methods share (Wang et al., MICCAI 2023): the fitting loop (solver.py) and the memory and
time it needs on a device, estimated before a run (budget.py). The methods themselves are inversesr_decoder.py and
inversesr_ldm.py beside this package."""
