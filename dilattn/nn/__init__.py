"""Modules and models: attention layers (:mod:`~dilattn.nn.modules`, mixed heads in
:mod:`~dilattn.nn.mixed`), the KV cache, reversible couplings and the LongNet models. Their
public names are also in :mod:`dilattn`."""
