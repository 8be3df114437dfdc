"""Scale-out: the parallel runner that executes the DVC pipeline's stages (and the tasks
inside large stages) on a Dask cluster, local or remote, with DVC as the record
(``runner``)."""
