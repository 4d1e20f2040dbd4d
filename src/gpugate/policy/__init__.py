"""Policies: the pool's settings and its classes of jobs, read from TOML or Python.

A policy is what a pool enforces: published to Redis with its
:attr:`Policy.version`, read there by every admission script.  Start from
:data:`DEFAULT_POLICY_TOML`, which explains every knob.
"""

from ._model import DEFAULT_POLICY_TOML, ClassPolicy, Policy, PoolSettings

__all__ = ["DEFAULT_POLICY_TOML", "ClassPolicy", "Policy", "PoolSettings"]
