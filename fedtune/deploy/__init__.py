"""Deployment: `fedtune server` and `fedtune client` as real processes (Flower's SuperLink
and SuperNode behind fedtune's Fleet-only front, TLS, node keys, run seals)."""
