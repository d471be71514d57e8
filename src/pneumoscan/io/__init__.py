"""Input and output: decoding images and DICOM, the data set and its patient split, the per-image result
record and its files, atomic writes, plots, the Structured Report, provenance and the training log."""
