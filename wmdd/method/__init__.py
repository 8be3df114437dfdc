"""The WMDD method itself (Liu et al., arXiv 2311.18531): its settings (``config``), per-class
Wasserstein barycenters of teacher features (``barycenter``), the synthesis loss (``loss``)
and the distill entry that wires them (``distill``)."""
