"""btm's fairseq user-dir plugin and model-side work.

This file imports nothing from fairseq, so pure modules (``fairseq_ext.ensemble``,
``fairseq_ext.cluster``) import on a login node. fairseq's ``--user-dir`` loader imports
``fairseq_ext/models`` and ``fairseq_ext/tasks`` itself; btm's own code calls
``fairseq_ext.registry.register_all()`` before it uses a registered component.
"""
