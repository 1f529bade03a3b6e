"""Ingest plugin: turns a folder of real images (PNG/JPEG, FITS with astropy) into a deepgalaxy store."""
