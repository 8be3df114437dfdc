"""Image augmentations: the protocol's and the synthesis loop's views (``views``: crop boxes,
``roi_align`` resized crops, flips, CutMix, rolls) and Differentiable Siamese Augmentation
(``dsa``) used by DM and the hard-label protocol. Imports nothing else from the project but
the root modules."""
