"""Using a trained model: load a run (`runs`), the Python API (`classifier.Classifier`), engines that
compute logits (`engines`), and the library side of `cxrfusion predict` (`predict`)."""
