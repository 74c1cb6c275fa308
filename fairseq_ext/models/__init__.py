"""fairseq models of the btm plugin (imported by fairseq's ``--user-dir`` loader)."""
from fairseq_ext.models import elm  # noqa: F401
