"""The seven whole-heart structures and their MMWHS label codes.

A leaf with no imports: every layer (and the throughput benchmark, on machines without
nibabel) reads the class count and names from here.
"""
# MMWHS label codes in class order: class i (1..7) is STRUCTURES[i - 1], coded
# MMWHS_CODES[i - 1] in MMWHS label files; class 0 is background.
MMWHS_CODES = (205, 420, 500, 550, 600, 820, 850)
STRUCTURES = ("Myo", "LA", "LV", "RA", "RV", "AO", "PA")
NUM_CLASSES = len(STRUCTURES) + 1
