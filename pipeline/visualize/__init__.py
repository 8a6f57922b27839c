"""Feature-map QA: strongest channels, Grad-CAM, before/after-compression similarity, HTML gallery.

Modules, one job each: `featuremaps` (layer choice, activation capture, grids), `gradcam` (Grad-CAM
and Grad-CAM++ with hooks), `similarity` (CAM/feature-map agreement, ONNX intermediate outputs),
`gallery` (self-contained qa.html), `tensorboard` (optional export), `scaling` (computed memory and
MACs vs resolution/batch), `images` (load user images for `fmap visualize`), `plots` (matplotlib).
"""
