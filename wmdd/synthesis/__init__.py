"""Building blocks several distillation methods share: the image-synthesis loop
(``loop``: WMDD, SRe2L), per-class and global BatchNorm statistics with forward hooks
(``bn_stats``) and teacher features of real images (``features``: WMDD, herding)."""
