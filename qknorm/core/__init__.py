"""What every qknorm operator shares: call signatures and cached plans, the aliasing check.

An operator (the fused Q/K RMSNorm of :mod:`qknorm.api`, ...) describes its call as one
ordered table of fields (:class:`~qknorm.core.pipeline.Field`) and supplies a *planner*: a
pure function from the call's signature (each tensor's :class:`~qknorm.core.signature.TensorSpec`
and the scalar arguments) to an immutable plan, or a ``TypeError``/``ValueError``.
:class:`~qknorm.core.pipeline.Pipeline` caches plans per signature and checks the tensors'
memory spans on every call (:class:`~qknorm.core.aliasing.AliasCheck`); the first call of a
signature and every later one run the same code. ``docs/architecture.md`` walks through it.
"""
