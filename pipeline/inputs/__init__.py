"""Inputs: where images come from, cut into units of work, read and decoded.

The order an image meets them: ``sources`` (list a prefix, tell image names), ``units`` (the input
cut into deterministic units: listing chunks, tar shards, Parquet files; what is committed),
``read`` (a unit's items: bytes plus the shard key and sidecars), ``decode`` (bytes to an RGB
array, or an error row's reason). Nothing here knows about models or modes.
"""
