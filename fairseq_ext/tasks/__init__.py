"""fairseq tasks of the btm plugin (imported by fairseq's ``--user-dir`` loader)."""
from fairseq_ext.tasks import multidomain_lm  # noqa: F401
