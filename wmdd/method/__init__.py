"""The WMDD method itself (Liu et al., arXiv 2311.18531): per-class Wasserstein barycenters of
teacher features (``barycenter``) and the distillation entry with its loss (``distill``)."""
