"""The front ends: the command line, the HTTP server and its web page, the DICOM node and the model card."""
