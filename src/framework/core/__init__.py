"""The floor: errors and signals, the validation of values, weights on disk, items and their records, atomic files,
images, the offline tokenizers and the hacking monitor's rule. It imports nothing else of the package."""
