"""Simulation plugin: a restricted N-body galaxy-merger simulator and 14-camera renderer writing Zarr stores."""
