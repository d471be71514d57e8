"""The core: pure functions with no file, image or network in them (the configuration and its recipes,
metrics and their intervals, calibration and the operating point, prevalence and site arithmetic)."""
