"""Predictions: the line format shared by offline scoring, the simulator and the stream."""
