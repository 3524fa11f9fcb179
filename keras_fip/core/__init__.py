"""The core every layer above builds on: data adapters, copies, masks, the sparse
projection, output kinds, normalisation statistics, layer walking, tuning and the base of
the knob objects.

Nothing here walks: these are the pieces the geometry, the engine and the operations share.
"""
