"""The tasks a user asks for: train, fit, evaluate, predict, explain, adapt, ensemble, audit, compare,
import a Keras model, and the scoring service that every front end shares; each writes its own outputs."""
