"""pneumoscan: train, evaluate, explain and serve CNNs that tell pneumonia from normal on chest X-rays."""

__version__ = "0.1.0"
